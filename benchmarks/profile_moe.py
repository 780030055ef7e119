"""Where a decode-sized MoE forward spends its GPU time: every kernel of one forward, by name.

    python -m benchmarks.profile_moe [--tokens 1 64] [--shapes qwen3_30b_a3b mixtral_8x7b]

The layer runs its direct path (cuda_graph_tokens=0) under torch.profiler for 20 forwards; the
table gives each kernel's mean device time per forward, and the summary the device time of the
GEMMs against everything else (routing, permute, combine), and the wall time of one forward
replayed from a CUDA graph (the launch gaps show as the difference to the kernels' sum).
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from benchmarks.bench_moe import SHAPES


def profile(name: str, T: int, reps: int = 20, host_profile: bool = False) -> None:
    import moecomm
    from moecomm.testing import graph_bench, host_us

    H, I, E, k, _ = SHAPES[name]
    torch.manual_seed(0)
    moe = moecomm.MoE(H, I, E, k, renormalize=True, dtype=torch.bfloat16, device="cuda", cuda_graph_tokens=0).eval()
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        for _ in range(3):
            moe(x)
        torch.cuda.synchronize()
        acts = [torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(reps):
                moe(x)
            torch.cuda.synchronize()
        per = defaultdict(float)
        for ev in prof.events():
            if ev.device_type == torch.autograd.DeviceType.CUDA:
                per[ev.name] += ev.device_time_total / reps  # us
        t = graph_bench(moe, [(x,)], replays=50, calls=1)
        host = sorted(host_us(moe, [(x,)], 50) for _ in range(3))[1]
    gemm = sum(v for n, v in per.items() if "grouped_mm" in n)
    total = sum(per.values())
    print(f"--- {name} T={T}: kernels {total:.1f} us per forward (GEMMs {gemm:.1f}, other {total - gemm:.1f}); "
          f"graph replay {t.median_ms * 1e3:.1f} us; host {host:.1f} us per eager forward")
    for n, v in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"  {v:8.1f} us  {n[:110]}")
    if host_profile:  # where the eager forward's host time goes, by Python function
        import cProfile
        import pstats

        with torch.inference_mode():
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(reps):
                moe(x)
            pr.disable()
            torch.cuda.synchronize()
        print(f"  host profile of {reps} eager forwards (by own time, then cumulative; s):")
        pstats.Stats(pr).sort_stats("tottime").print_stats(30)
        pstats.Stats(pr).sort_stats("cumulative").print_stats(40)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 64])
    p.add_argument("--shapes", nargs="+", default=["qwen3_30b_a3b", "mixtral_8x7b"])
    p.add_argument("--host-profile", action="store_true", help="also profile the eager forward's host time (cProfile)")
    args = p.parse_args(argv)
    for name in args.shapes:
        for T in args.tokens:
            profile(name, T, host_profile=args.host_profile)


if __name__ == "__main__":
    main()
