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
    p.add_argument("--sustained", action="store_true",
                   help="with --sweep: every prefill candidate and its GROUP_M / tile variants beside torch._grouped_mm "
                        "in alternating sustained blocks (the GPU at its power limit), not short bursts")
    args = p.parse_args(argv)
    if args.sweep:
        return sweep(args.out, sustained=args.sustained)
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


# (name, E, M, K, N, layout, glu, row_scale): the prefill shapes where the tile loop's epilogue
# (flatten / TMA store variants) is in question; torch._grouped_mm is timed beside the plain ones
SWEEP_SHAPES = [
    ("gate_up E8 M8192 K4096 N28672 ekn", 8, 8192, 4096, 28672, "ekn", False, False),
    ("gate_up E8 M8192 K4096 N28672 enk", 8, 8192, 4096, 28672, "enk", False, False),
    ("gate_up E32 M16384 K7168 N4096 enk", 32, 16384, 7168, 4096, "enk", False, False),
    ("mixtral T4096 gate_up+silu enk", 8, 8192, 4096, 28672, "enk", True, False),
    ("mixtral T4096 down*w enk", 8, 8192, 14336, 4096, "enk", False, True),
]


def _sweep_configs(M: int, N: int, K: int, E: int, glu: bool, sustained: bool = False):
    import dataclasses

    from moecomm.gemm._configs import candidates

    if sustained:  # the tuner's list, then GROUP_M and tile-shape neighbours of its first entry
        cands = candidates(M, N, K, E, glu=glu)
        first = cands[0]
        extra = [dataclasses.replace(first, group_m=g) for g in (4, 16) if g != first.group_m]
        extra += [dataclasses.replace(first, block_m=first.block_n, block_n=first.block_m)]
        extra += [dataclasses.replace(first, num_stages=first.num_stages + 1, tma_store=False)]
        out = []
        for c in cands + extra:
            if c not in out:
                out.append(c)
        return out
    out = []
    for cfg in candidates(M, N, K, E, glu=glu)[:3]:
        out += [dataclasses.replace(cfg, flatten=False, tma_store=False),
                dataclasses.replace(cfg, flatten=True, tma_store=False),
                dataclasses.replace(cfg, flatten=False, tma_store=True)]
    return out


def sweep(out_path, sustained: bool = False) -> list:
    """Time the epilogue variants of the first candidates per shape (CUDA events, median of 20, rotating inputs);
    sustained: the tuner's candidates and neighbours beside torch._grouped_mm in alternating sustained blocks."""
    from moecomm.gemm.api import launch
    from moecomm.testing import bench, bench_sustained

    writer = ResultWriter(out_path)
    recs = []
    for name, E, M, K, N, layout, glu, scale in SWEEP_SHAPES:
        sizes = [M // E] * E
        offs = torch.tensor([0] + torch.tensor(sizes).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        shape = (E, K, N) if layout == "ekn" else (E, N, K)
        sets = [(torch.randn(M, K, device="cuda", dtype=torch.bfloat16),
                 (torch.randn(shape, device="cuda", dtype=torch.bfloat16) * K**-0.5).to(torch.bfloat16))
                for _ in range(3)]
        n_out = N // 2 if glu else N
        outb = torch.empty(M, n_out, device="cuda", dtype=torch.bfloat16)
        rs = torch.rand(M, device="cuda") if scale else None
        ref = None
        res = []
        if not glu and not scale:
            offs_t = offs[1:]
            tw = [(x, w if layout == "ekn" else w.transpose(1, 2)) for x, w in sets]
            t = bench(lambda x, w: torch._grouped_mm(x, w, offs=offs_t), tw, rep=20)
            res.append((t.median_ms, "torch._grouped_mm"))
            recs.append(writer.write(bench="gemm_sweep", shape=name, config="torch._grouped_mm", median_ms=t.median_ms))
            ref = torch._grouped_mm(sets[0][0], tw[0][1], offs=offs_t)
        if sustained:
            fns = {}
            if ref is not None:
                fns["torch._grouped_mm"] = lambda x, w: torch._grouped_mm(x, w if layout == "ekn" else w.transpose(1, 2),
                                                                          offs=offs_t)
            for cfg in _sweep_configs(M, N, K, E, glu, sustained=True):
                def run(x, w, cfg=cfg):
                    launch(x, w, offs, outb, layout=layout, glu=glu, act=1 if glu else 0, row_scale=rs, config=cfg)
                try:
                    run(*sets[0])
                    torch.cuda.synchronize()
                    if ref is not None:
                        err = ((outb.float() - ref.float()).norm() / ref.float().norm()).item()
                        assert err < 1e-2, f"{cfg}: rel err {err}"
                except Exception as exc:  # a config that does not fit (shared memory) is just skipped
                    print(f"{name} {cfg}: failed {type(exc).__name__}: {str(exc)[:200]}")
                    continue
                fns[cfg] = run
            timed = bench_sustained(fns, sets, block_ms=200.0, rounds=2)
            res = sorted(((t.median_ms, c) for c, t in timed.items()), key=lambda r: r[0])
            for ms, cfg in res:
                print(f"{name:36s} {ms:8.4f} ms {2 * M * K * N / ms / 1e9:6.1f} TFLOP/s  sustained  {cfg}", flush=True)
                recs.append(writer.write(bench="gemm_sweep_sustained", shape=name, median_ms=ms,
                                         config=cfg if isinstance(cfg, str) else cfg.to_json()))
            del sets
            continue
        for cfg in _sweep_configs(M, N, K, E, glu):
            try:
                t = bench(lambda x, w: launch(x, w, offs, outb, layout=layout, glu=glu, act=1 if glu else 0,
                                              row_scale=rs, config=cfg), sets, rep=20)
                if ref is not None:
                    launch(sets[0][0], sets[0][1], offs, outb, layout=layout, config=cfg)
                    err = ((outb.float() - ref.float()).norm() / ref.float().norm()).item()
                    assert err < 1e-2, f"{cfg}: rel err {err}"
            except Exception as exc:  # a config that does not fit (shared memory) is just skipped
                print(f"{name} {cfg}: failed {type(exc).__name__}: {str(exc)[:200]}")
                continue
            res.append((t.median_ms, cfg))
            recs.append(writer.write(bench="gemm_sweep", shape=name, config=cfg.to_json(), median_ms=t.median_ms))
        res.sort(key=lambda r: r[0])
        for ms, cfg in res:
            print(f"{name:36s} {ms:8.4f} ms {2 * M * K * N / ms / 1e9:6.1f} TFLOP/s  {cfg}", flush=True)
        del sets
    return recs


if __name__ == "__main__":
    main()
