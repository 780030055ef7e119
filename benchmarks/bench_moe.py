"""The whole MoE layer's forward: ours, ours' GEMMs alone, and transformers' blocks, side by side.

# T = num_tokens, H = hidden, I = intermediate, E = num_experts, k = top_k

    python -m benchmarks.bench_moe                 # Mixtral-8x7B and Qwen3-30B-A3B shapes, bf16, GPU
    python -m benchmarks.bench_moe --quick         # tiny shapes, CPU in seconds (CI smoke test)
    python -m benchmarks.bench_moe --cold-start    # first forward in fresh processes, cache cold / warm

Rows per (shape, T):
  ours           moecomm.MoE forward as a user calls it, eager: up to cuda_graph_tokens (128) tokens
                 it replays the graph it captured for that token count (see MoE's docstring)
  ours_direct    the same layer with cuda_graph_tokens=0: every launch from Python, every call
  ours_gather    (where the layer materializes the routed rows, T*k >= materialize_min_rows) the
                 same layer gathering rows inside the GEMM instead: the choice's evidence
  ours_graph     the whole layer captured in one CUDA graph by the caller and replayed (what a
                 model-level capture, as vLLM does, gets)
  ours_gemms     expert_mlp alone on the same routing (the GEMMs the layer cannot avoid), eager,
                 timed in the same alternating blocks as ours and the hf_<impl> rows
  ours_gemms_graph  the same GEMMs replayed from a CUDA graph: their GPU time without launch cost
  hf_<impl>      the transformers block under each experts implementation (eager, grouped_mm,
                 batched_mm, selected through config._experts_implementation); OOM is reported.
                 ours and the hf_<impl> rows are timed side by side in alternating sustained blocks
                 (moecomm.testing.bench_sustained): at prefill sizes the GPU runs at its power limit,
                 and each is timed at the clock its own load holds
Targets (issue 2): ours / ours_gemms <= 1.2; fastest hf / ours >= 1.5. The summary line also gives
ours / ours_gemms_graph, the stricter reading (the GEMMs' GPU time alone).

Minimum work, counted once per forward: FLOPs = 2*T*H*E (router) + 6*T*k*H*I (three projections of
the routed rows); bytes = the weights of the experts that receive tokens (3*H*I each) + the router
weight + x in and y out. GB/s is the figure to read at decode sizes, TFLOP/s at prefill sizes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

SHAPES = {  # name: (H, I, E, k, transformers family)
    "mixtral_8x7b": (4096, 14336, 8, 2, "mixtral"),
    "qwen3_30b_a3b": (2048, 768, 128, 8, "qwen3_moe"),
}
# more families from_hf supports (opt-in with --shapes; no target of the issue): a gated shared expert
# and top-10 of 512; sigmoid routing with a shared expert; sigmoid + bias routing over 256 experts
EXTRA_SHAPES = {
    "qwen3_next_80b": (2048, 512, 512, 10, "qwen3_next"),
    "glm4_5_air": (4096, 1408, 128, 8, "glm4_moe"),
    "minimax_m2": (3072, 1536, 256, 8, "minimax_m2"),
}
QUICK_SHAPES = {"tiny_mixtral": (64, 32, 8, 2, "mixtral"), "tiny_qwen3": (64, 32, 16, 4, "qwen3_moe"),
                "tiny_glm4": (64, 32, 8, 2, "glm4_moe"), "tiny_minimax": (64, 32, 8, 2, "minimax_m2"),
                "tiny_qwen3_next": (64, 32, 8, 2, "qwen3_next")}
HF_IMPLS = ("eager", "grouped_mm", "batched_mm")


def _hf_block(family: str, H: int, I: int, E: int, k: int, dtype, device):
    """A transformers block of that family and size, random weights (std 1/sqrt(fan_in))."""
    import importlib

    import transformers as t

    configs = {  # family: (config, block class)
        "mixtral": (lambda: t.MixtralConfig(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k),
                    "MixtralSparseMoeBlock"),
        "qwen3_moe": (lambda: t.Qwen3MoeConfig(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=k,
                                               norm_topk_prob=True), "Qwen3MoeSparseMoeBlock"),
        "qwen3_next": (lambda: t.Qwen3NextConfig(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=I,
                                                 num_experts=E, num_experts_per_tok=k, norm_topk_prob=True),
                       "Qwen3NextSparseMoeBlock"),
        "glm4_moe": (lambda: t.Glm4MoeConfig(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=k,
                                             n_group=1, topk_group=1, n_shared_experts=1, routed_scaling_factor=1.0,
                                             norm_topk_prob=True), "Glm4MoeMoE"),
        "minimax_m2": (lambda: t.MiniMaxM2Config(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k),
                       "MiniMaxM2SparseMoeBlock"),
    }
    make_config, block_name = configs[family]
    Block = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), block_name)
    with torch.device(device):
        block = Block(make_config()).to(dtype).eval()
    with torch.no_grad():
        for p in block.parameters():  # the last dimension is the fan-in: Linear [out, in], experts [E, out, in]
            p.normal_(0, p.shape[-1] ** -0.5)
        for b in block.buffers():  # a router's score-correction bias
            b.normal_(0, 0.01)
    return block


def _set_impl(block, impl: str) -> None:
    block.experts.config._experts_implementation = impl


def _min_work(T, H, I, E, k, experts_hit, elem) -> tuple[float, float]:
    flops = 2 * T * H * E + 6 * T * k * H * I
    nbytes = (experts_hit * 3 * H * I + E * H + 2 * T * H) * elem
    return flops, nbytes


def _graph(fn, x):
    """Capture fn(x) in a CUDA graph; returns replay (which reads x's storage, writes the same output)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            fn(x)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn(x)
    return g.replay


def run(shapes, tokens, device, dtype, writer, rep, stream=print) -> list[dict]:
    import moecomm
    from moecomm.gemm import expert_mlp
    from moecomm.testing import bench, bench_sustained

    gpu = device.type == "cuda"
    rows = []
    header = f"{'shape':<14} {'T':>5} {'impl':<15} {'ms':>9} {'ours/this':>9} {'GB/s':>8} {'TFLOP/s':>8}"
    for name, (H, I, E, k, family) in shapes.items():
        torch.manual_seed(0)
        block = _hf_block(family, H, I, E, k, dtype, device)
        moe = moecomm.from_hf(block)  # shares the block's weights: same routing, same math, no extra memory
        stream(f"\n{name}: H={H} I={I} E={E} top-{k}, {str(dtype).replace('torch.', '')} on {device}")
        stream(header)
        for T in tokens:
            nsets = 4 if gpu else 1  # rotate inputs; the weights (>1 GB) dwarf L2 anyway
            xs = [torch.randn(T, H, device=device, dtype=dtype) for _ in range(nsets)]
            with torch.no_grad():
                r = moe.route(xs[0])
                experts_hit = int(torch.unique(r.topk_ids).numel())
                d = moe.dispatcher.dispatch(xs[0], r.topk_ids, r.topk_weights)

                def gemms(_x, d=d, moe=moe):
                    return expert_mlp(d.tokens, moe.w_gate_up, moe.w_down, d.expert_offsets, gather_idx=d.gather_idx,
                                      row_scale=d.row_weights, validate=False)

                results: dict[str, float | str] = {}
                args = [(x,) for x in xs]
                # ours and every transformers implementation side by side in alternating sustained
                # blocks (bench_sustained): each at the pace its own load holds under the GPU's power
                # limit. One that fails on its trial call (OOM, no kernel) is reported, not timed.
                contenders = {"ours": moe, "ours_gemms": gemms}
                failed: dict[str, str] = {}
                for impl in HF_IMPLS:
                    def hf(x, impl=impl, block=block):
                        _set_impl(block, impl)
                        return block(x.view(1, *x.shape))
                    try:
                        hf(xs[0])
                        if gpu:
                            torch.cuda.synchronize()
                        contenders[f"hf_{impl}"] = hf
                    except torch.cuda.OutOfMemoryError:
                        failed[f"hf_{impl}"] = "OOM"
                        torch.cuda.empty_cache()
                    except (RuntimeError, NotImplementedError) as exc:  # e.g. grouped_mm has no CPU kernel
                        failed[f"hf_{impl}"] = f"error: {str(exc).splitlines()[0][:60]}"
                side_by_side = bench_sustained(contenders, args, block_ms=300.0 if gpu else 2.0,
                                               rounds=3 if gpu else 1, min_calls=4 if gpu else 2)
                _set_impl(block, "eager")
                results["ours"] = side_by_side["ours"].median_ms
                if gpu:
                    graph_tokens, moe.cuda_graph_tokens = moe.cuda_graph_tokens, 0
                    results["ours_direct"] = bench(moe, args, rep=rep, device=device).median_ms
                    moe.cuda_graph_tokens = graph_tokens
                    if d.gather_idx is None:  # materialized at this size: show what the gather would cost
                        min_rows, moe.dispatcher.materialize_min_rows = moe.dispatcher.materialize_min_rows, None
                        results["ours_gather"] = bench(moe, args, rep=rep, device=device).median_ms
                        moe.dispatcher.materialize_min_rows = min_rows
                    static = xs[0].clone()
                    results["ours_graph"] = bench(_graph(moe, static), rep=rep, device=device).median_ms
                results["ours_gemms"] = side_by_side["ours_gemms"].median_ms
                if gpu:
                    results["ours_gemms_graph"] = bench(_graph(gemms, xs[0]), rep=rep, device=device).median_ms
                for impl in HF_IMPLS:
                    key = f"hf_{impl}"
                    results[key] = side_by_side[key].median_ms if key in side_by_side else failed[key]
            flops, nbytes = _min_work(T, H, I, E, k, experts_hit, torch.finfo(dtype).bits // 8)
            ours = results["ours"]
            for impl, ms in results.items():
                if isinstance(ms, str):
                    stream(f"{name:<14} {T:>5} {impl:<15} {ms:>9}")
                    writer.write(bench="moe", shape=name, num_tokens=T, impl=impl, error=ms)
                    continue
                gbs, tfl = nbytes / (ms * 1e-3) / 1e9, flops / (ms * 1e-3) / 1e12
                stream(f"{name:<14} {T:>5} {impl:<15} {ms:>9.4f} {ours / ms:>9.2f} {gbs:>8.0f} {tfl:>8.2f}")
                rows.append(writer.write(
                    bench="moe", shape=name, hidden=H, intermediate=I, num_experts=E, top_k=k, num_tokens=T,
                    dtype=str(dtype).replace("torch.", ""), impl=impl, median_ms=ms, gb_per_s=gbs, tflop_per_s=tfl,
                    ratio_to_ours=ms / ours, experts_hit=experts_hit,
                ))
            hf = [v for kk, v in results.items() if kk.startswith("hf_") and not isinstance(v, str)]
            own = ours / results["ours_gemms"]
            own_gpu = ours / results["ours_gemms_graph"] if "ours_gemms_graph" in results else float("nan")
            speedup = (min(hf) / ours) if hf else float("nan")
            if name in SHAPES:
                stream(
                    f"{'':<14} {T:>5} ours/own GEMMs {own:.2f} (target <= 1.2: {'met' if own <= 1.2 else 'MISSED'}; "
                    f"vs their graphed GPU time {own_gpu:.2f}); "
                    f"fastest transformers/ours {speedup:.2f} (target >= 1.5: {'met' if speedup >= 1.5 else 'MISSED'})"
                )
            else:  # no target; own GEMMs leave out the shared expert, which the layer also runs
                stream(f"{'':<14} {T:>5} ours/own routed GEMMs {own:.2f} (graphed {own_gpu:.2f}); "
                       f"fastest transformers/ours {speedup:.2f}")
            writer.write(bench="moe", shape=name, num_tokens=T, impl="summary", ours_over_own_gemms=own,
                         ours_over_own_gemms_graph=own_gpu, fastest_hf_over_ours=speedup)
        del block, moe
        if gpu:
            torch.cuda.empty_cache()
    return rows


_COLD_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import torch, moecomm
H, I, E, k, dev = {H}, {I}, {E}, {k}, {dev!r}
dtype = torch.bfloat16 if dev == "cuda" else torch.float32
moe = moecomm.MoE(H, I, E, k, renormalize=True, dtype=dtype, device=dev)
x = torch.randn(64, H, device=dev, dtype=dtype)
t1 = time.perf_counter()
moe(x)
if dev == "cuda":
    torch.cuda.synchronize()
t2 = time.perf_counter()
print(json.dumps({{"first_forward_s": t2 - t1, "process_s": t2 - t0}}))
"""


def cold_start(device, quick: bool, writer, stream=print) -> list[dict]:
    """First forward in fresh processes: empty cache (compiles every kernel), then the cache warm."""
    H, I, E, k = (64, 32, 8, 2) if quick else (2048, 768, 128, 8)
    code = _COLD_CHILD.format(H=H, I=I, E=E, k=k, dev=device.type)
    rows = []
    with tempfile.TemporaryDirectory(prefix="moecomm-cold-") as tmp:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, importable by the child
        env = dict(os.environ, MOECOMM_CACHE_DIR=os.path.join(tmp, "moecomm"), TRITON_CACHE_DIR=os.path.join(tmp, "triton"),
                   PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
        for state, target in (("cold", 30.0), ("warm", 3.0)):
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                raise RuntimeError(f"cold-start child failed ({state}):\n{out.stderr[-2000:]}")
            res = json.loads(out.stdout.strip().splitlines()[-1])
            ok = res["first_forward_s"] <= target
            stream(f"cold start ({state} cache) H={H} I={I} E={E} top-{k} on {device.type}: first forward "
                   f"{res['first_forward_s']:.2f} s, whole process {res['process_s']:.2f} s "
                   f"(target <= {target:g} s: {'met' if ok else 'MISSED'})")
            rows.append(writer.write(bench="moe", impl=f"cold_start_{state}", hidden=H, intermediate=I, num_experts=E,
                                     top_k=k, first_forward_s=res["first_forward_s"], process_s=res["process_s"]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes; runs on CPU in seconds")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--cold-start", action="store_true", help="measure the first forward in fresh processes instead")
    p.add_argument("--tokens", default=None, help="comma-separated token counts (default 1,64,4096; quick: 1,33)")
    p.add_argument("--shapes", default=None,
                   help=f"comma-separated, from {', '.join(SHAPES | EXTRA_SHAPES)} (default: the first two)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--rep", type=int, default=None, help="timed calls per row (default 30; quick: 3)")
    args = p.parse_args(argv)

    from moecomm.testing import ResultWriter

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    writer = ResultWriter(args.out)
    if args.cold_start:
        cold_start(device, args.quick, writer)
        return 0
    if args.quick:
        shapes, tokens, rep = QUICK_SHAPES, (1, 33), args.rep or 3
    else:
        shapes, tokens, rep = SHAPES, (1, 64, 4096), args.rep or 30
    if args.shapes:
        shapes = {n: (SHAPES | EXTRA_SHAPES | QUICK_SHAPES)[n] for n in args.shapes.split(",")}
    if args.tokens:
        tokens = tuple(int(t) for t in args.tokens.split(","))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    run(shapes, tokens, device, dtype, writer, rep)
    return 0


if __name__ == "__main__":
    sys.exit(main())
