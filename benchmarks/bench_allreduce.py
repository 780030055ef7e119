"""IPC all-reduce kernels on one GPU with W virtual ranks: one-shot, two-shot, fused residual + RMSNorm.

# W = world_size (virtual ranks on one GPU), n = elements per rank, T = num_tokens, H = hidden

    python -m benchmarks.bench_allreduce                 # W 2/4/8, 4 KB .. 8 MB, bf16, GPU
    python -m benchmarks.bench_allreduce --quick         # CPU: the references only, seconds (CI smoke test)
    python -m benchmarks.bench_allreduce --out r.jsonl   # also append JSON lines

What is timed (all in CUDA graphs, moecomm.testing.graph_bench: device time, no host launch path):
  oneshot / twoshot    the kernel alone over inputs already staged: ONE launch covering all W
                       virtual ranks (grid (SMs / W, W)), so the figure is W ranks' kernels sharing
                       one GPU's SMs and HBM, not one rank of a real node (peers' reads are local HBM
                       here, NVLink there). The multi-GPU issue measures the real thing.
  <algo>+stage         the public call, path by size, on one [W, n] tensor: the kernel copies each
                       rank's input into its staging itself, one launch (eager, or a graph captured
                       with capture(register=False)).
  <algo>+hoststage     what the public call did before (and still does for a list or a misaligned
                       input): W staging copies (torch copy_, one kernel each: serialized on one
                       stream here, ~1 us each) then the kernel.
  oneshot+registered   one-shot captured with ar.capture() around the graph: the kernel reads the
                       inputs in place, nothing is copied (what graph users get by default).
  copy                 the baseline beside every row: one device copy of the same bytes the W ranks
                       hand in (W * n * e): the floor of moving the input once.
  rmsnorm_fused        all_reduce_residual_rmsnorm (one kernel, staging inside), path by size as
                       CustomAllReduce takes it (one-shot up to the threshold, two-shot above)
  rmsnorm_fused_<algo> the same, the variant forced (both at every T: where each stops paying)
  rmsnorm_unfused      all_reduce (path by size) then residual add and torch's rms_norm
  rmsnorm_allreduce_only  the all_reduce alone: fused - this = what the fusion adds (target <= 2 us)
Napkin math, one GPU: one-shot reads W * W * n * e bytes in all (each rank reads everyone) and writes
W * n * e; two-shot reads/writes ~4 W * n * e. At W 8 and 64 KB per rank, one-shot reads 4 MiB:
~1-2 us at HBM speed, so the barriers and the launch dominate, as they will on 8 GPUs.
Each kernel is checked against the reference (exact, integer payload) before it is timed.
"""

from __future__ import annotations

import argparse

import torch

from moecomm.allreduce import Algo, VirtualAllReduce, layout
from moecomm.allreduce.reference import reduce_sum_reference, residual_rmsnorm_reference
from moecomm.testing import ResultWriter, bench, graph_bench

SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 8 << 20]
WORLD_SIZES = [2, 4, 8]
RMS_SHAPES = [(1, 7168), (8, 7168), (64, 7168), (128, 7168), (128, 4096)]


def _print(row: dict) -> None:
    base = row.get("copy_ms")
    ratio = f"{row['median_ms'] / base:6.2f}x copy" if base else ""
    print(f"{row['op']:<16} W{row['world_size']} {row['shape']:>12} {row['impl']:<18} "
          f"{row['median_ms'] * 1e3:9.2f} us  [{row['p10_ms'] * 1e3:.2f}, {row['p90_ms'] * 1e3:.2f}]  {ratio}")


def _registered_graph(ar, xs, replays: int, calls: int = 20):
    """Time per call of ``calls`` one-shot all-reduces captured with ar.capture() (inputs registered:
    no staging copy in the graph), CUDA events around each replay."""
    ar.all_reduce(xs, algo=Algo.ONESHOT)  # loaded before the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with ar.capture(), torch.cuda.graph(g):
        for _ in range(calls):
            ar.all_reduce(xs, algo=Algo.ONESHOT)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / calls)
    del g
    times.sort()
    return times[len(times) // 2], times[len(times) // 10], times[(9 * len(times)) // 10]


def run_quick(writer: ResultWriter) -> None:
    """CPU: the references on tiny sizes (what the GPU rows are checked against), so CI runs the script."""
    for W in (2, 4):
        xs = [torch.randn(1024) for _ in range(W)]
        t = bench(lambda: reduce_sum_reference(xs), [()], rep=5, warmup=1, device="cpu")
        row = writer.write(op="allreduce", world_size=W, shape=f"n{1024}", dtype="float32", impl="reference",
                           median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, device="cpu")
        _print(row)
    s, r, w = torch.randn(4, 256), torch.randn(4, 256), torch.rand(256)
    t = bench(lambda: residual_rmsnorm_reference(s, r, w, 1e-6), [()], rep=5, warmup=1, device="cpu")
    _print(writer.write(op="rmsnorm", world_size=1, shape="T4_H256", dtype="float32", impl="reference",
                        median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms, device="cpu"))


def _int_inputs(W, n, dtype, device):
    i = torch.arange(n, device=device)
    return torch.stack([((i * 7 + r) % 13 - 6 + r).to(dtype) for r in range(W)])


def run_gpu(writer: ResultWriter, dtype: torch.dtype, sizes, world_sizes, rms_shapes, replays: int) -> None:
    dev = torch.device("cuda", torch.cuda.current_device())
    e = torch.tensor([], dtype=dtype).element_size()
    dname = str(dtype).replace("torch.", "")
    for W in world_sizes:
        with VirtualAllReduce(W, max_size=max(sizes), device=dev, timeout_s=10.0) as ar:
            for nbytes in sizes:
                n = nbytes // e
                xs = _int_inputs(W, n, dtype, dev)
                pack = layout.pack_elems(e)
                stride = -(-n // pack) * pack
                store = torch.empty(W, stride, dtype=dtype, device=dev)
                want = xs.float().sum(0).to(dtype)
                src = torch.empty(W * n, dtype=dtype, device=dev)
                dst = torch.empty_like(src)
                copy = graph_bench(lambda: dst.copy_(src), [()], replays=replays)
                for algo in (Algo.ONESHOT, Algo.TWOSHOT):
                    store.fill_(float("nan"))
                    ar.stage(xs)
                    ar.launch_staged(algo, n, store, stride)
                    torch.cuda.synchronize()
                    ar.check()
                    assert all(torch.equal(store[r, :n], want) for r in range(W)), (algo, W, nbytes)
                    t = graph_bench(lambda a=algo: ar.launch_staged(a, n, store, stride), [()], replays=replays)
                    ar.check()
                    _print(writer.write(op="allreduce", world_size=W, shape=f"{nbytes // 1024}KB", dtype=dname,
                                        impl=algo.value, median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms,
                                        copy_ms=copy.median_ms, bytes_per_rank=nbytes))
                algo = ar.algo_for(nbytes)
                got = ar.all_reduce(xs)
                torch.cuda.synchronize()
                ar.check()
                assert all(torch.equal(got[r], want) for r in range(W)), ("stage", W, nbytes)

                def hoststage(a=algo, xs=xs, n=n, store=store, stride=stride):
                    ar.stage(list(xs))
                    ar.launch_staged(a, n, store, stride)

                for impl, fn in ((f"{algo.value}+stage", lambda xs=xs: ar.all_reduce(xs)),
                                 (f"{algo.value}+hoststage", hoststage)):
                    t = graph_bench(fn, [()], replays=replays)
                    ar.check()
                    _print(writer.write(op="allreduce", world_size=W, shape=f"{nbytes // 1024}KB", dtype=dname,
                                        impl=impl, median_ms=t.median_ms, p10_ms=t.p10_ms,
                                        p90_ms=t.p90_ms, copy_ms=copy.median_ms, bytes_per_rank=nbytes))
                med, p10, p90 = _registered_graph(ar, xs, replays)
                ar.check()
                _print(writer.write(op="allreduce", world_size=W, shape=f"{nbytes // 1024}KB", dtype=dname,
                                    impl="oneshot+registered", median_ms=med, p10_ms=p10, p90_ms=p90,
                                    copy_ms=copy.median_ms, bytes_per_rank=nbytes))
                _print(writer.write(op="allreduce", world_size=W, shape=f"{nbytes // 1024}KB", dtype=dname,
                                    impl="copy", median_ms=copy.median_ms, p10_ms=copy.p10_ms, p90_ms=copy.p90_ms,
                                    copy_ms=copy.median_ms, bytes_per_rank=nbytes))
            for T, H in rms_shapes:
                g = torch.Generator(device="cpu").manual_seed(T * H)
                xs = torch.randn(W, T, H, generator=g).to(dtype).to(dev)
                # replicated, as under tensor parallelism (the two-shot variant adds each row's
                # residual on the row's owner)
                res = torch.randn(1, T, H, generator=g).to(dtype).expand(W, -1, -1).contiguous().to(dev)
                w = (torch.rand(H, generator=g) + 0.5).to(dtype).to(dev)
                _, ref_res = residual_rmsnorm_reference(reduce_sum_reference(list(xs)), res[0], w, 1e-6)
                for algo in (Algo.ONESHOT, Algo.TWOSHOT):
                    out, new_res = ar.all_reduce_residual_rmsnorm(xs, res, w, 1e-6, algo=algo)
                    torch.cuda.synchronize()
                    ar.check()
                    assert torch.equal(new_res[0], ref_res), (W, T, H, algo)

                def unfused(xs=xs, res=res, w=w, H=H):
                    y = ar.all_reduce(xs)
                    r = y + res
                    return torch.nn.functional.rms_norm(r, (H,), w, 1e-6), r

                src = torch.empty(W * T * H, dtype=dtype, device=dev)
                dst = torch.empty_like(src)
                copy = graph_bench(lambda: dst.copy_(src), [()], replays=replays)
                fused = {"fused": None, "fused_oneshot": Algo.ONESHOT, "fused_twoshot": Algo.TWOSHOT}
                impls = [(k, lambda xs=xs, res=res, w=w, a=a: ar.all_reduce_residual_rmsnorm(xs, res, w, 1e-6, algo=a))
                         for k, a in fused.items()] + [("unfused", unfused),
                                                       ("allreduce_only", lambda xs=xs: ar.all_reduce(xs))]
                for impl, fn in impls:
                    t = graph_bench(fn, [()], replays=replays)
                    ar.check()
                    _print(writer.write(op="rmsnorm", world_size=W, shape=f"T{T}_H{H}", dtype=dname,
                                        impl=f"rmsnorm_{impl}", median_ms=t.median_ms, p10_ms=t.p10_ms,
                                        p90_ms=t.p90_ms, copy_ms=copy.median_ms, bytes_per_rank=T * H * e))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="CPU: the references on tiny sizes, seconds (CI)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--world-sizes", type=int, nargs="*", default=WORLD_SIZES)
    parser.add_argument("--replays", type=int, default=20)
    args = parser.parse_args(argv)
    writer = ResultWriter(args.out)
    if args.quick or not torch.cuda.is_available():
        if not args.quick:
            print("bench_allreduce: no CUDA device: the references only (as --quick)")
        run_quick(writer)
        return 0
    run_gpu(writer, getattr(torch, args.dtype), SIZES, args.world_sizes, RMS_SHAPES, args.replays)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
