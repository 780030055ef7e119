"""Where the time of an expert-parallel dispatch + combine goes, on several GPUs (NCCL).

    torchrun --nproc-per-node 2 -m benchmarks.profile_dispatch [--tokens 4096] [--hidden 4096]

# T = tokens per rank, H = hidden, E = experts, k = top_k, W = ranks

Rank 0 prints: the wall time of dispatch and of combine (each followed by a device sync, medians),
the same round trip without syncs between the steps, one all_to_all_single there and back of the
same rows (the floor), and torch.profiler's top operators by host time and by device time over a
few round trips. The expert computation in between is a stand-in (rows gathered and weighted), as
in bench_dispatch --multigpu.
"""

# Shape legend: T = tokens per rank, H = hidden, E = experts, k = top_k, W = ranks.

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _median_ms(fn, reps: int) -> float:
    ts = []
    for _ in range(reps):
        _sync()
        t = time.perf_counter()
        fn()
        _sync()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args(argv)

    import moecomm.distributed as mdist
    from moecomm.ep.nccl import dispatcher as D
    from benchmarks.bench_dispatch import _routing

    mdist.init()
    rank, W = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")  # CPU: gloo smoke run
    dtype = torch.bfloat16 if cuda else torch.float32
    T, H, E, k = args.tokens, args.hidden, args.experts, args.top_k
    disp = D.EPDispatcher(E, k, H, dtype=dtype)
    ids, w = _routing(T, E, k, dev, seed=rank)
    x = torch.randn(T, H, device=dev).to(dtype)

    def experts(d):
        return d.tokens.index_select(0, d.gather_idx.long()) * d.row_weights[:, None].to(x.dtype)

    def round_trip():
        d = disp.dispatch(x, ids, w, validate=False)
        return disp.combine(experts(d), d.handle)

    for _ in range(5):
        round_trip()
    state = {}

    def only_dispatch():
        state["d"] = disp.dispatch(x, ids, w, validate=False)

    def only_experts():
        state["h"] = experts(state["d"])

    def only_combine():
        disp.combine(state["h"], state["d"].handle)

    res = {name: _median_ms(fn, args.reps) for name, fn in
           (("round trip", round_trip), ("dispatch", only_dispatch), ("experts (stand-in)", only_experts),
            ("combine", only_combine))}
    d = state["d"]
    sbuf = x.new_empty((sum(d.handle.send_splits), H))
    rbuf = x.new_empty((sum(d.handle.recv_splits), H))

    def a2a():
        dist.all_to_all_single(rbuf, sbuf, d.handle.recv_splits, d.handle.send_splits)
        dist.all_to_all_single(sbuf, rbuf, d.handle.send_splits, d.handle.recv_splits)

    res["a2a there and back"] = _median_ms(a2a, args.reps)
    # host time of the round trip alone: launches queued, no sync but the one inside dispatch
    _sync()
    t = time.perf_counter()
    for _ in range(args.reps):
        round_trip()
    host_ms = (time.perf_counter() - t) * 1e3 / args.reps
    _sync()

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(5):
            round_trip()
        _sync()
    dist.barrier()
    if rank == 0:
        print(f"T={T} H={H} E={E} top-{k} W={W}, {dtype}; rows sent by rank 0: {sum(d.handle.send_splits)}")
        for name, ms in res.items():
            print(f"  {name:<22} {ms:8.3f} ms (median of {args.reps}, device synced around it)")
        print(f"  round trip, back to back: {host_ms:.3f} ms per call (wall)")
        ka = prof.key_averages()
        print(ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=60))
        if cuda:
            print(ka.table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    dist.barrier()
    mdist.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
