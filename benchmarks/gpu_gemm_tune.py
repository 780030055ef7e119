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
    p.add_argument("--sweep", action="store_true", help="time a grid of launch configs on the issue's shapes instead")
    args = p.parse_args(argv)
    if args.sweep:
        return sweep(args.out)
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


# (name, E, M, K, N, layout, glu): shapes whose candidate sets were in doubt after run 2
SWEEP_SHAPES = [
    ("decode E64 M512 K2048 N1536 enk", 64, 512, 2048, 1536, "enk", False),
    ("decode E64 M512 K2048 N1536 ekn", 64, 512, 2048, 1536, "ekn", False),
    ("decode E32 M256 K7168 N4096 enk", 32, 256, 7168, 4096, "enk", False),
    ("gate_up E8 M8192 K4096 N28672 ekn", 8, 8192, 4096, 28672, "ekn", False),
]


def _sweep_configs(M: int, E: int):
    from moecomm.gemm._configs import GemmConfig

    if M // E <= 24:
        return [GemmConfig(16, bn, bk, 1, 4, st, tma, pps)
                for bn, bk, st in ((32, 128, 4), (64, 128, 4), (64, 64, 6), (128, 64, 4), (64, 256, 3), (128, 128, 3))
                for tma in (False, True) for pps in (4, 16)]
    return [GemmConfig(bm, bn, 64, gm, w, st, True, 1)
            for bm, bn, w in ((128, 256, 8), (128, 128, 8), (256, 128, 8))
            for gm in (4, 8, 16) for st in (3, 4)]


def sweep(out_path) -> list:
    """Time many configs per shape (CUDA events, median of 20, rotating weights); print the best ten."""
    from moecomm.gemm.api import launch
    from moecomm.testing import bench

    writer = ResultWriter(out_path)
    recs = []
    for name, E, M, K, N, layout, glu in SWEEP_SHAPES:
        sizes = [M // E] * E
        offs = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        shape = (E, K, N) if layout == "ekn" else (E, N, K)
        sets = [(torch.randn(M, K, device="cuda", dtype=torch.bfloat16),
                 torch.randn(shape, device="cuda", dtype=torch.bfloat16)) for _ in range(3)]
        outb = torch.empty(M, N, device="cuda", dtype=torch.bfloat16)
        res = []
        for cfg in _sweep_configs(M, E):
            try:
                t = bench(lambda x, w: launch(x, w, offs, outb, layout=layout, config=cfg), sets, rep=20)
            except Exception as exc:  # a config that does not fit (shared memory) is just skipped
                print(f"{name} {cfg}: failed {type(exc).__name__}")
                continue
            res.append((t.median_ms, cfg))
            recs.append(writer.write(bench="gemm_sweep", shape=name, config=cfg.to_json(), median_ms=t.median_ms))
        res.sort(key=lambda r: r[0])
        wbytes = E * K * N * 2
        for ms, cfg in res[:10]:
            print(f"{name:36s} {ms:8.4f} ms {wbytes / ms / 1e6:6.0f} GB/s {2 * M * K * N / ms / 1e9:6.1f} TFLOP/s  {cfg}")
        del sets
    return recs


if __name__ == "__main__":
    main()
