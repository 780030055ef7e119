"""Routing: moecomm.routing.route (one fused kernel) vs the torch code of the transformers routers.

# T = num_tokens, E = num_experts, k = top_k

    python -m benchmarks.bench_routing            # GPU shapes: T = 1, 64, 4096, 16384
    python -m benchmarks.bench_routing --quick    # tiny shapes, CPU, seconds (CI smoke test)

Napkin math: routing must read the logits once (T * E * 2 bytes in bf16; plus the E * 4 bytes of
bias) and write ids and weights (T * k * 8 bytes); GB/s below counts exactly that. At T = 16384,
E = 256 that is 8.4 MB + 1 MB: ~3 us at 3 TB/s, so small T is launch-bound and the torch
baseline's cost is its number of launches (softmax, topk, sum, div; ~15 for the grouped path).
"""

from __future__ import annotations

import argparse
import math

import torch

from moecomm.routing import RoutingMethod, route
from moecomm.testing import ResultWriter, bench

L2_BYTES = 50 * 2**20  # H100: rotate inputs past it


def torch_softmax_topk(logits: torch.Tensor, top_k: int, renormalize: bool):
    """Mixtral / Qwen-MoE routers of transformers 5.17, after the router linear."""
    probs = torch.nn.functional.softmax(logits, dtype=torch.float, dim=-1)
    values, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        values /= values.sum(dim=-1, keepdim=True)
    return ids, values


def torch_grouped_topk(logits, bias, top_k, n_group, topk_group, renormalize, scale):
    """DeepseekV3TopkRouter of transformers 5.17, after the router linear."""
    num_experts = logits.shape[-1]
    scores = logits.float().sigmoid()
    choice = scores + bias
    group_scores = choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    ids = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, ids)
    if renormalize:
        weights /= weights.sum(dim=-1, keepdim=True) + 1e-20
    return ids, weights * scale


# (name, E, k, grouped kwargs or None)
CONFIGS = [
    ("mixtral E8 k2", 8, 2, None),
    ("qwen3 E128 k8", 128, 8, None),
    ("deepseek-v3 E256 k8 g8/4", 256, 8, dict(n_group=8, topk_group=4)),
]


def _same_choice(ours_w, ref_w) -> float:
    """Fraction of tokens whose chosen weights agree (sorted: the baselines' topk may order them otherwise).

    Weights, not ids: bf16 logits hold exact ties, which torch.topk breaks by no fixed rule.
    """
    if ours_w.numel() == 0:
        return 1.0
    close = (ours_w.sort(-1)[0] - ref_w.float().sort(-1)[0]).abs() <= 1e-5
    return close.all(-1).float().mean().item()


def run_case(writer, device, dtype, name, num_tokens, num_experts, top_k, grouped, warmup, rep):
    set_bytes = num_tokens * num_experts * dtype.itemsize
    num_sets = max(2, min(64, math.ceil(2 * L2_BYTES / max(set_bytes, 1)))) if device.type == "cuda" else 2
    gen = torch.Generator(device=device).manual_seed(0)
    sets = [(torch.randn(num_tokens, num_experts, device=device, generator=gen).to(dtype),) for _ in range(num_sets)]
    if grouped is not None:
        bias = torch.randn(num_experts, device=device, generator=gen) * 0.1
        kw = dict(method=RoutingMethod.SIGMOID_GROUPED_TOPK, e_score_correction_bias=bias, renormalize=True,
                  routed_scaling_factor=2.5, validate=False, **grouped)

        def ours(x):
            return route(x, top_k, **kw)

        def baseline(x):
            return torch_grouped_topk(x, bias, top_k, grouped["n_group"], grouped["topk_group"], True, 2.5)
    else:
        def ours(x):
            return route(x, top_k, renormalize=True)

        def baseline(x):
            return torch_softmax_topk(x, top_k, True)

    # validate before timing
    ids, w = ours(*sets[0])
    ref_ids, ref_w = baseline(*sets[0])
    agree = _same_choice(w, ref_w)
    if agree < 0.99:
        raise RuntimeError(f"{name} T={num_tokens}: ours and torch agree on only {agree:.1%} of tokens")

    t_ours = bench(ours, sets, warmup=warmup, rep=rep, device=device)
    t_base = bench(baseline, sets, warmup=warmup, rep=rep, device=device)
    min_bytes = set_bytes + num_tokens * top_k * 8 + (num_experts * 4 if grouped is not None else 0)
    gbps = min_bytes / (t_ours.median_ms * 1e-3) / 1e9
    shape = dict(num_tokens=num_tokens, num_experts=num_experts, top_k=top_k, dtype=str(dtype).replace("torch.", ""),
                 method="sigmoid_grouped_topk" if grouped else "softmax_topk", **(grouped or {}))
    for impl, t in (("moecomm", t_ours), ("torch", t_base)):
        writer.write(op="route", name=name, impl=impl, **shape, median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms,
                     gbps=min_bytes / (t.median_ms * 1e-3) / 1e9, min_bytes=min_bytes,
                     ratio_to_baseline=t.median_ms / t_base.median_ms, same_choice=agree)
    print(f"{name:26s} {num_tokens:>6d} {t_ours.median_ms:10.4f} {t_base.median_ms:10.4f} "
          f"{t_base.median_ms / t_ours.median_ms:8.2f}x {gbps:9.2f} {agree:8.2%}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on whatever device, a few seconds (CI)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--tokens", type=int, nargs="*", default=None, help="override the list of num_tokens")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    tokens = args.tokens or ([1, 64] if args.quick else [1, 64, 4096, 16384])
    warmup, rep = (2, 5) if args.quick else (10, 100)
    writer = ResultWriter(args.out)
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, logits {args.dtype}; "
          "ours = moecomm.route (fused kernel on GPU, reference on CPU), torch = the transformers router code")
    print(f"{'shape':26s} {'T':>6s} {'ours ms':>10s} {'torch ms':>10s} {'speedup':>9s} {'GB/s':>9s} {'same':>8s}")
    for name, num_experts, top_k, grouped in CONFIGS:
        for num_tokens in tokens:
            run_case(writer, device, dtype, name, num_tokens, num_experts, top_k, grouped, warmup, rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
