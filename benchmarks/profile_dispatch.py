"""Where the time of an expert-parallel dispatch + combine goes, on several GPUs (NCCL).

    torchrun --nproc-per-node 2 -m benchmarks.profile_dispatch [--tokens 4096] [--hidden 4096]
    python -m benchmarks.profile_dispatch --count [--tokens 4096] [--hidden 64]   # one process, any machine
    python -m benchmarks.profile_dispatch --host [--timeline]                     # one GPU: host time, timed

--host: the host time of one eager round trip over a one-rank NCCL group (the exchange forced),
timed with the GPU idle at the start of each trip (median of --reps; back to back the count
exchange's sync would also wait for the previous trip's kernels), each stage of the dispatcher
timed inside it (inclusive perf_counter around its functions), and the unit costs a round trip is
made of (--timeline: one trip's host and GPU events in time order): a Triton launch (Triton's own path, moecomm's Launcher), an all_to_all_single of the
[W, 3] counts (torch.distributed's function, the process group's method), an allocation, a
small device-to-host copy.

--count: what one eager round trip (dispatch + combine, EPDispatcher(force_exchange=True) over a
one-rank group: gloo on CPU with the Triton kernels interpreted, NCCL on a GPU) asks of the host,
counted, not timed: Triton launches through moecomm.jit.launch, torch ops by kind (allocations =
outputs with fresh storage, views, device ops = the rest), collectives, host syncs (item, tolist,
device-to-host copies; on a CPU-only run each tolist / item, where a GPU would wait). The counts do
not depend on H, and on T only through the kernels' size thresholds (the counting sorts' block-scan
fallback): T 4096 is the issue's shape; the CPU default, T 512, takes the same paths in ~1 min.

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


class _HostOpCounter:
    """Counts what a block of code asks of the host: Triton launches, torch ops by kind, collectives, syncs."""

    def __init__(self):
        from collections import Counter

        self.counts = Counter()
        self.ops = Counter()  # aten op name -> calls (the table under the totals)

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

        from moecomm.jit import launch as L

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                counter._record(func, args, out)
                return out

        orig_call, orig_tolist = L.Launcher.__call__, torch.Tensor.tolist

        def counted_call(launcher, *a, **kw):
            counter.counts["triton launches"] += 1
            with _disable_current_modes():  # the interpreter's own torch calls are not ours
                return orig_call(launcher, *a, **kw)

        cpu_only = not torch.cuda.is_available()

        def counted_tolist(t):
            # a GPU syncs here when t lives on it; on a CPU-only run every tolist stands for that read
            counter.counts["host syncs"] += 1 if (t.is_cuda or cpu_only) else 0
            return orig_tolist(t)

        self._restore = lambda: (setattr(L.Launcher, "__call__", orig_call),
                                 setattr(torch.Tensor, "tolist", orig_tolist))
        L.Launcher.__call__, torch.Tensor.tolist = counted_call, counted_tolist
        self._mode = Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        self._restore()
        return False

    def _record(self, func, args, out) -> None:
        name = str(func.overloadpacket).split(".")[-1]
        ns = func.namespace
        self.ops[f"{ns}.{name}"] += 1
        if ns == "c10d":
            self.counts["collectives"] += 1
            return
        if name == "_local_scalar_dense":
            self.counts["host syncs"] += 1
            return
        if func.is_view:
            self.counts["views"] += 1
            return
        ins = [a for a in torch.utils._pytree.tree_leaves(args) if isinstance(a, torch.Tensor)]
        outs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        in_ptrs = {t.untyped_storage().data_ptr() for t in ins}
        fresh = [o for o in outs if o.untyped_storage().data_ptr() not in in_ptrs]
        self.counts["allocations"] += len(fresh)
        if name in ("_to_copy", "copy_") and ins and ins[-1].is_cuda and not outs[0].is_cuda:
            self.counts["host syncs"] += 1  # device -> host: waits for the GPU
        if name not in ("empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"):
            self.counts["torch device ops"] += 1  # something that runs a kernel (a fill, a copy, arithmetic)


def count_round_trip(T: int, H: int, E: int, k: int, *, device: torch.device, dtype: torch.dtype) -> dict:
    """Host work of one eager dispatch and one combine (their counts apart), after two warm-up trips."""
    from benchmarks.bench_dispatch_onerank import _routing
    from moecomm.ep.nccl.dispatcher import EPDispatcher

    disp = EPDispatcher(E, k, H, dtype=dtype, force_exchange=True)
    ids, w = _routing(T, E, k, device)
    x = torch.randn(T, H, device=device).to(dtype)
    d = disp.dispatch(x, ids, w)
    h = torch.randn(d.gather_idx.shape[0], H, device=device).to(dtype)  # the experts' rows, once
    for _ in range(2):  # warm-up: kernels compiled, workspaces grown
        disp.combine(h, disp.dispatch(x, ids, w).handle)
    _sync()
    res = {}
    with _HostOpCounter() as c:
        d = disp.dispatch(x, ids, w)
    res["dispatch"] = c
    with _HostOpCounter() as c:
        disp.combine(h, d.handle)
    res["combine"] = c
    _sync()
    return res


def _count_main(args) -> int:
    import torch.distributed as dist

    from benchmarks.bench_dispatch_onerank import _one_rank_group

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    _one_rank_group(device)
    try:
        res = count_round_trip(args.tokens, args.hidden, args.experts, args.top_k, device=device, dtype=dtype)
    finally:
        dist.destroy_process_group()
    keys = ("triton launches", "torch device ops", "allocations", "views", "collectives", "host syncs")
    print(f"host work of one round trip, T={args.tokens} H={args.hidden} E={args.experts} top-{args.top_k}, one-rank "
          f"{'NCCL' if cuda else 'gloo (Triton interpreted)'} group, {str(dtype).replace('torch.', '')}")
    print(f"  {'':<18}" + "".join(f"{k:>18}" for k in keys))
    total = {k: 0 for k in keys}
    for part, c in res.items():
        print(f"  {part:<18}" + "".join(f"{c.counts[k]:>18}" for k in keys))
        for k in keys:
            total[k] += c.counts[k]
    print(f"  {'round trip':<18}" + "".join(f"{total[k]:>18}" for k in keys))
    for part, c in res.items():
        print(f"  {part} torch ops: " + ", ".join(f"{n} {v}" for n, v in sorted(c.ops.items())))
    return 0


def _host_us(fn, reps: int, idle: bool = True) -> float:
    """Median host time of fn in us; idle: the GPU drained before each call (not timed)."""
    ts = []
    for _ in range(reps):
        if idle:
            _sync()
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e6)
    _sync()
    return statistics.median(ts)


class _StageTimer:
    """Inclusive host time of named module functions while active (perf_counter around each call)."""

    def __init__(self, targets):  # [(module, attribute name)]
        from collections import defaultdict

        self.targets, self.total, self.calls = targets, defaultdict(float), defaultdict(int)
        self._saved = []

    def __enter__(self):
        for mod, name in self.targets:
            orig = getattr(mod, name)
            self._saved.append((mod, name, orig))

            def timed(*a, _orig=orig, _key=f"{mod.__name__.split('.')[-1]}.{name}", **kw):
                t = time.perf_counter()
                try:
                    return _orig(*a, **kw)
                finally:
                    self.total[_key] += time.perf_counter() - t
                    self.calls[_key] += 1

            setattr(mod, name, timed)
        return self

    def __exit__(self, *exc):
        for mod, name, orig in reversed(self._saved):
            setattr(mod, name, orig)
        return False


def _timeline(round_trip, stages, reps: int = 3) -> None:
    """One native round trip (the last of ``reps``, the GPU idle at its start) as a timeline: the
    host's events (torch ops, the driver's calls that native.c makes, the ``stages`` as ranges)
    and the GPU's (kernels, copies), in us from the trip's start, in start order."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    saved = []
    for mod, name in stages:
        orig = getattr(mod, name)
        saved.append((mod, name, orig))

        def ranged(*a, _orig=orig, _name=f"## {name}", **kw):
            with record_function(_name):
                return _orig(*a, **kw)

        setattr(mod, name, ranged)
    try:
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for i in range(reps):
                _sync()
                with record_function(f"## trip {i}"):
                    round_trip()
            _sync()
    finally:
        for mod, name, orig in reversed(saved):
            setattr(mod, name, orig)
    events = list(prof.events())
    trip = next(e for e in events if e.name == f"## trip {reps - 1}")
    t0, t1 = trip.time_range.start, trip.time_range.end
    rows = sorted((e for e in events if t0 <= e.time_range.start <= t1 + 200 and e is not trip),
                  key=lambda e: e.time_range.start)
    print(f"  timeline of one native round trip (torch.profiler; host events inflated by it): {t1 - t0:.1f} us on the host")
    print(f"  {'start':>8} {'dur':>7}  side  event")
    for e in rows:
        side = "GPU " if e.device_type == DeviceType.CUDA else "host"
        print(f"  {e.time_range.start - t0:8.1f} {e.time_range.end - e.time_range.start:7.1f}  {side}  {e.name[:90]}")


def _host_main(args) -> int:
    """--host (see the module docstring): one process, one GPU, a one-rank NCCL group."""
    if not torch.cuda.is_available():
        print("profile_dispatch --host times the NCCL path's host work: it needs a CUDA GPU (none is visible "
              "here; --count counts the same work on any machine)")
        return 2
    from benchmarks.bench_dispatch_onerank import _one_rank_group, _routing
    from moecomm.ep.nccl import _triton as K
    from moecomm.ep.nccl import dispatcher as D
    from moecomm.jit import launch as L

    dev = torch.device("cuda", torch.cuda.current_device())
    _one_rank_group(dev)
    T, H, E, k, reps = args.tokens or 4096, args.hidden or 4096, args.experts, args.top_k, max(args.reps, 30)
    dtype = torch.bfloat16
    disp = D.EPDispatcher(E, k, H, dtype=dtype, force_exchange=True)
    ids, w = _routing(T, E, k, dev)
    x = torch.randn(T, H, device=dev).to(dtype)
    d = disp.dispatch(x, ids, w)
    h = torch.randn(d.gather_idx.shape[0], H, device=dev).to(dtype)

    def round_trip():
        d = disp.dispatch(x, ids, w, validate=False)
        d.tokens, d.gather_idx, d.expert_offsets, d.row_weights  # what the experts read (views made when read)
        disp.combine(h, d.handle)

    import os

    from moecomm.ep.nccl import native as NV
    from moecomm.ep.nccl import phases as PH

    print(f"T={T} H={H} E={E} top-{k}, bf16, one-rank NCCL group, exchange forced")
    for path in ("native", "python", "native"):  # the native path twice: its spread is the noise
        os.environ["MOECOMM_EP_NATIVE"] = "1" if path == "native" else "0"
        for _ in range(5):
            round_trip()
        _sync()
        why = NV.why_not(None, dev) if path == "native" else None
        print(f" [{path}{' NOT TAKEN: ' + why if why else ''}]")
        ts = sorted(_host_us(round_trip, 1) for _ in range(3 * reps))
        idle, p10 = statistics.median(ts), ts[len(ts) // 10]
        b2b = _host_us(round_trip, reps, idle=False)
        print(f"  round trip host time: {idle:.1f} us (GPU idle at the start; median of {len(ts)}; p10 {p10:.1f}); "
              f"back to back {b2b:.1f} us")
        state = {}
        only_d = lambda: state.__setitem__("d", disp.dispatch(x, ids, w, validate=False))  # noqa: E731
        print(f"  dispatch alone {_host_us(only_d, reps):.1f} us; combine alone "
              f"{_host_us(lambda: disp.combine(h, state['d'].handle), reps):.1f} us")
        targets = [(D, n) for n in ("plan_send", "_exchange_counts", "dispatch_outputs", "pack_send", "_all_to_all",
                                    "expand_received", "_gather_sum_into", "_gather_sum_new")]
        targets += [(L.Launcher, "__call__"), (NV, "for_call"), (NV, "phase"), (NV.Recorder, "run"),
                    (NV.Recorder, "launch"), (NV.Template, "run"), (PH, "counts_phase"), (PH, "rows_phase"),
                    (PH, "back_phase")]
        with _StageTimer(targets) as st:
            for _ in range(reps):
                _sync()
                round_trip()
            _sync()
        for key in st.total:
            print(f"    {key:<28} {st.total[key] / reps * 1e6:8.1f} us a trip ({st.calls[key] / reps:.0f} calls)")
    os.environ.pop("MOECOMM_EP_NATIVE", None)
    if args.timeline:
        _timeline(round_trip, [(PH, "counts_phase"), (PH, "rows_phase"), (PH, "back_phase"),
                               (D, "dispatch_outputs"), (NV.Template, "run")])
    # unit costs
    src = torch.randn(64, 128, device=dev, dtype=dtype)
    idx = torch.randint(0, 64, (16, 2), device=dev, dtype=torch.int32)
    out = torch.empty(16, 128, device=dev, dtype=dtype)
    K.gather_sum_triton(src, idx, out)
    bh = K._block_h(128)
    regular = lambda: K.ep_gather_sum_kernel[(16, 1)](src, idx, out, src, 64, *src.stride(), *idx.stride(),  # noqa: E731
                                                       out.stride(0), H=128, C=2, BLOCK_H=bh, CNT_W=0, CNT_WP=1,
                                                       CNT_ROWS=-1, CNT_SRC=-1, num_warps=4)
    regular()
    units = {"triton launch, JITFunction.run": regular,
             "triton launch, moecomm Launcher (gather_sum_triton)": lambda: K.gather_sum_triton(src, idx, out)}
    import torch.distributed as dist

    cnt = torch.zeros(2, 1, 3, dtype=torch.int32, device=dev)
    pg = dist.distributed_c10d._get_default_group()
    opts = dist.AllToAllOptions()
    units["all_to_all_single [W,3], torch.distributed"] = lambda: dist.all_to_all_single(cnt[1], cnt[0])
    units["all_to_all_single [W,3], pg.alltoall_base"] = lambda: pg.alltoall_base(cnt[1], cnt[0], [], [], opts)
    units["torch.empty [4096, 4096] bf16"] = lambda: torch.empty((4096, 4096), device=dev, dtype=dtype)
    pinned = torch.empty(6, dtype=torch.int32, pin_memory=True)
    units["device-to-host copy of [2, 1, 3] (GPU idle)"] = lambda: pinned.copy_(cnt.view(-1)).tolist()
    rt = NV.runtime(None, dev)
    if rt is not None:
        from array import array

        wait = array("q", [NV.OP_WAIT])
        addr = wait.buffer_info()[0]
        stream = torch.cuda.current_stream().cuda_stream
        units["native.c: a program of one wait (ctypes call + cuStreamQuery)"] = (
            lambda: rt.library.run(addr, 1, stream, 0, 10**9, rt.library.info_addr))
        rec = NV.Recorder(rt, ("unit",))
        with rec:
            K.gather_sum_triton(src, idx, out)
        rec.run(stream, NV.comm(None), "unit", None, lambda: 0)  # adds the variant
        one_launch = array("q", rec.ops)
        la, ln = one_launch.buffer_info()
        units["native.c: a program of one launch (gather_sum [16, 128])"] = (
            lambda: rt.library.run(la, ln, stream, 0, 10**9, rt.library.info_addr))
        comm = NV.comm(None)
        if comm:
            one_a2a = array("q", [NV.OP_A2A, cnt[0].data_ptr(), cnt[1].data_ptr(), 12, 1, 1, 1])
            aa, an = one_a2a.buffer_info()
            units["native.c: a program of one exchange ([1, 3] int32, ncclSend/Recv group)"] = (
                lambda: rt.library.run(aa, an, stream, comm, 10**9, rt.library.info_addr))
    for name, fn in units.items():
        fn()
        print(f"  unit: {name:<52} {_host_us(fn, 200, idle=False):6.1f} us (back to back), "
              f"{_host_us(fn, 50):6.1f} us (GPU idle)")
    dist.destroy_process_group()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=None, help="default 4096 (--count on CPU: 512)")
    p.add_argument("--hidden", type=int, default=None, help="default 4096 (--count on CPU: 64)")
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--count", action="store_true", help="count launches, torch ops and syncs of one round trip")
    p.add_argument("--force-exchange", action="store_true", help="exchange through NCCL even on one rank")
    p.add_argument("--cprofile", action="store_true", help="also cProfile's top functions of the round trip")
    p.add_argument("--host", action="store_true", help="host time of a round trip, by stage, and its unit costs")
    p.add_argument("--timeline", action="store_true", help="--host: also one native round trip's host and GPU events")
    args = p.parse_args(argv)
    if args.host:
        return _host_main(args)
    if args.count:
        import os

        if not torch.cuda.is_available():  # the kernels through Triton's interpreter (before triton is imported)
            os.environ.setdefault("TRITON_INTERPRET", "1")
            os.environ.setdefault("MOECOMM_BACKEND", "triton")
        gpu = torch.cuda.is_available()
        args.tokens, args.hidden = args.tokens or (4096 if gpu else 512), args.hidden or (4096 if gpu else 64)
        return _count_main(args)
    args.tokens, args.hidden = args.tokens or 4096, args.hidden or 4096

    import moecomm.distributed as mdist
    from moecomm.ep.nccl import dispatcher as D
    from benchmarks.bench_dispatch import _routing

    mdist.init()
    rank, W = dist.get_rank(), dist.get_world_size()
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")  # CPU: gloo smoke run
    dtype = torch.bfloat16 if cuda else torch.float32
    T, H, E, k = args.tokens, args.hidden, args.experts, args.top_k
    disp = D.EPDispatcher(E, k, H, dtype=dtype, force_exchange=args.force_exchange)
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
    if args.cprofile:
        import cProfile
        import io
        import pstats

        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.reps):
            round_trip()
        pr.disable()
        _sync()
        if rank == 0:
            for key in ("tottime", "cumulative"):
                s = io.StringIO()
                pstats.Stats(pr, stream=s).sort_stats(key).print_stats(25)
                print(f"cProfile of {args.reps} round trips, by {key}:")
                print(s.getvalue())
    dist.barrier()
    mdist.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
