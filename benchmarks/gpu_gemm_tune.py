"""Cold-start check of the grouped GEMM's tuning: time of the first MoE expert forward in this process.

    python -m benchmarks.gpu_gemm_tune [--model mixtral|qwen3] [--tokens 4096] [--out results.jsonl]

Run it twice in fresh processes: with an empty MOECOMM_CACHE_DIR the first call compiles and tunes
both GEMMs (budget 30 s); with the cache the second process compiles only the picked configs
(budget 3 s). Also checks the first call's result against the reference (relative error < 1.5e-2
in bf16), so a tuned config that computes garbage is caught.
"""

# Shape legend: T = tokens, M = T * top_k rows, H = hidden, I = intermediate, E = experts.

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch

from moecomm.gemm import expert_mlp, expert_mlp_reference
from moecomm.testing import ResultWriter

MODELS = {"mixtral": (4096, 14336, 8, 2), "qwen3": (2048, 768, 128, 8)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mixtral", choices=sorted(MODELS))
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--out", default=None)
    p.add_argument("--quick", action="store_true", help="tiny shapes on CPU (smoke test)")
    p.add_argument("--profile", action="store_true", help="print where the first call's time went (cProfile)")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    H, I, E, k = MODELS[args.model] if not args.quick else (64, 32, 4, 2)
    T = args.tokens if not args.quick else 8
    M = T * k
    sizes = [M // E + (1 if e < M % E else 0) for e in range(E)]
    offs = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32, device=dev)
    x = torch.randn(T, H, device=dev, dtype=dtype)
    gu = (torch.randn(E, 2 * I, H, device=dev) * H**-0.5).to(dtype)
    dn = (torch.randn(E, H, I, device=dev) * I**-0.5).to(dtype)
    g = torch.arange(M, device=dev, dtype=torch.int32) % T
    s = torch.rand(M, device=dev)
    if cuda:
        torch.cuda.synchronize()
    prof = cProfile.Profile() if args.profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    y = expert_mlp(x, gu, dn, offs, gather_idx=g, row_scale=s)
    if cuda:
        torch.cuda.synchronize()
    first_s = time.perf_counter() - t0
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(18)
    ref = expert_mlp_reference(x.float(), gu.float(), dn.float(), offs, gather_idx=g, row_scale=s)
    err = ((y.float() - ref).norm() / ref.norm()).item()
    rec = ResultWriter(args.out).write(bench="gemm_cold_start", model=args.model, T=T, first_call_s=first_s, rel_err=err)
    print(f"{args.model} T={T}: first expert_mlp call {first_s:.2f} s (compile + tune + run), rel err {err:.2e}")
    return rec


if __name__ == "__main__":
    main()
