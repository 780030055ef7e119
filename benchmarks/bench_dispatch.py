"""Expert-parallel dispatch/combine: our pack/unpack kernels and collectives vs their baselines.

# T = num_tokens per rank, H = hidden, k = top_k, E = num_experts, W = ep_size, S = rows sent,
# R = rows received, N = expanded (row, local expert) pairs, e = bytes per element

    python -m benchmarks.bench_dispatch                   # one GPU: kernel bandwidth vs a device copy
    python -m benchmarks.bench_dispatch --sweep           # ... plus BLOCK_H / num_warps candidates (graph)
    python -m benchmarks.bench_dispatch --kernel --quick  # kernel mode on tiny shapes (GPU smoke; CPU too)
    python -m benchmarks.bench_dispatch --quick           # CPU: 2 gloo ranks, tiny shapes (CI smoke test)
    torchrun --nproc-per-node 8 -m benchmarks.bench_dispatch --multigpu   # NCCL, one GPU per rank
    ... --out r.jsonl                                     # also append JSON lines

Kernel mode (one GPU; EP size 1 and one of W = 8 virtual ranks), each row beside a plain device
copy (`dst.copy_(src)`) moving the same number of bytes, both timed the same two ways:
  eager   every call launched from Python, back to back, CUDA events around each call (the harness
          moecomm.testing.bench): what a caller of the public function sees. Where the kernel is
          shorter than the host's launch path, the GPU waits for the host and the time includes it.
  graph   CALLS_PER_GRAPH calls (same rotating inputs) captured into one torch.cuda.CUDAGraph,
          replayed; CUDA events around each replay, divided by the calls: the kernel's own time,
          with no host launch cost. The issue's target, >= 80% of copy bandwidth, is a kernel
          property: judged on this column (MISSED), the eager one is flagged separately (eager<80%).
  host    microseconds of host time per eager call (perf_counter over back-to-back calls, no sync):
          the fixed cost that eager pays when it exceeds the kernel's time.
Ops and the minimum bytes each must move:
  pack    ours: pack_send(x, ..., out [S, width]), token t written once per destination rank
          (dedup), its metadata (8k bytes) beside it   bytes: read x (T*H*e) + write S*width*e
          (+ T*k*16 of the plan)
  unpack  ours: gather_sum(returned [S, H], home [T, k]) on the source rank, fp32 sum per token
          bytes: read S*H*e + write T*H*e (+ T*k*4)
  reduce  ours: gather_sum(expert_out [N, H], slot_pos [R, k]) on the receiver (rows summed over
          its local experts before the return trip)   bytes: read N*H*e + write R*H*e (+ R*k*4)
  e.g. T=8192, H=4096, top-8 of 64, W=8, bf16: each token reaches ~5.3 ranks, S ~ 43.6k rows:
  pack reads 64 MiB and writes ~341 MiB: ~0.14 ms at the ~2.97 TB/s of an H100 copy. At W=1,
  T=4096 a pack moves 64 MiB: ~23 us of copy time, about what one Python launch path costs.
--sweep adds, for the H=4096 shapes, graph-replay times of pack and unpack for each launch
configuration in SWEEP_CONFIGS (BLOCK_H, num_warps), to choose the kernels' defaults.

Distributed mode (--quick on CPU/gloo, --multigpu on NCCL), every rank timing:
  ours      EPDispatcher.dispatch + combine (the expert in between is a row gather, as in naive)
  d+c       dispatch + combine alone: combine takes expert rows computed once beforehand
  a2a       all_to_all_single of the same [S, H] rows there and back (the floor; target: d+c <= 1.2x)
  naive     per-(token, expert) rows sorted by expert (no dedup), counts exchanged per expert, list
            all_to_all (all_to_all_single on gloo, whose list form rejects uneven sizes), weighted
            index_add_ on return (target: ours >= 1.5x faster)
"""

from __future__ import annotations

import argparse

import torch

from moecomm.ep.nccl import dispatcher as D
from moecomm.ep.nccl import plan as P
from moecomm.ep.nccl import ops as O
from moecomm.ep.placement import ExpertPlacement
from moecomm.testing import ResultWriter, bench, graph_bench, host_us

KERNEL_SHAPES = [  # (T, H, E, k)
    (4096, 4096, 64, 8), (8192, 4096, 64, 8), (4096, 7168, 256, 8), (8192, 7168, 256, 8),
]
QUICK_KERNEL_SHAPES = [(33, 64, 8, 2)]
STATIC_KERNEL_SHAPES = [(128, 7168, 256, 8), (1, 7168, 256, 8)]
DIST_SHAPES = [(4096, 4096, 64, 8), (8192, 7168, 256, 8)]
QUICK_DIST_SHAPES = [(256, 128, 8, 2), (33, 64, 16, 4)]
SWEEP_CONFIGS = [(512, 2), (1024, 4), (1024, 8), (2048, 4), (2048, 8), (4096, 8), (4096, 16)]  # (BLOCK_H, warps)
L2_BYTES = 50 * 2**20  # H100
TARGET_OF_COPY = 0.8
CALLS_PER_GRAPH = 20


def _routing(T, E, k, device, seed):
    g = torch.Generator().manual_seed(seed)
    w, ids = torch.rand(T, E, generator=g).softmax(-1).topk(k, dim=1)
    return ids.to(torch.int32).to(device), w.float().to(device)


def _n_sets(nbytes: int) -> int:
    return max(2, min(8, -(-2 * L2_BYTES // max(nbytes, 1))))  # rotate inputs past L2


# ----------------------------------------------------------------------------- kernel mode (one GPU)


def _copy_sets(nbytes: int, H: int, dtype, device):
    """(dst, src) pairs for a device copy moving nbytes in total (half read, half written)."""
    e = torch.tensor([], dtype=dtype).element_size()
    rows = max(1, nbytes // (2 * H * e))
    sets = [(torch.empty(rows, H, dtype=dtype, device=device), torch.randn(rows, H, device=device).to(dtype))
            for _ in range(_n_sets(rows * H * e))]
    return sets, 2 * rows * H * e


def _copy(dst, src):
    dst.copy_(src)


def kernel_rows(T, H, E, k, W, dtype, device, writer, rep, warmup, *, graph: bool, capacity: int | None = None) -> list[dict]:
    """Measure pack, unpack and reduce of one shape (eager, host and, if ``graph``, CUDA-graph replay);
    with ``capacity``, the static-capacity mode's buffers (W * C rows per rank)."""
    e = torch.tensor([], dtype=dtype).element_size()
    pl = ExpertPlacement(E, W)
    e2r, e2l = pl.expert_to_rank_tensor(device), pl.expert_to_local_tensor(device)
    # W source ranks' routing: rank 0's plan is the one timed; all of them feed rank 0's receive side
    routes = [_routing(T, E, k, device, seed=s) for s in range(W)]
    plans = [P.plan_send(ids, e2r, e2l, W) for ids, _ in routes]
    lay = P.RowLayout.of(H, k, dtype)
    splits = [p.info[:, 0].tolist() for p in plans]
    S = sum(splits[0])
    x0 = torch.randn(T, H, device=device).to(dtype)
    sends, homes = [], []
    rows_out = S if capacity is None else W * capacity
    static = {} if capacity is None else {"capacity": capacity, "overflow": torch.zeros(1, dtype=torch.int32, device=device)}
    for (ids, w), plan, sp in zip(routes, plans, splits):
        send = x0.new_empty((sum(sp) if capacity is None else rows_out, lay.width))
        if capacity is not None:
            send.view(torch.int32)[:, lay.meta_col:lay.meta_col + k].fill_(-1)
        home = torch.empty((T, k), dtype=torch.int32, device=device)
        P.pack_send(x0, w, plan, lay, send, home, **static)
        sends.append(send)
        homes.append(home)
    N = sum(int(p.info[0, 1]) for p in plans)
    if capacity is None:
        recv = torch.cat([snd[:sp[0]] for snd, sp in zip(sends, splits)])  # what rank 0 receives
        ex = P.expand_received(recv, lay, pl.num_local_experts(0), N)
    else:
        recv = torch.cat([snd[:capacity] for snd in sends])
        ex = P.expand_received(recv, lay, pl.num_local_experts(0), None)
    R = recv.shape[0]
    home, w0, plan0 = homes[0], routes[0][1], plans[0]
    n = _n_sets(max(S, N) * H * e)
    xs = [torch.randn(T, H, device=device).to(dtype) for _ in range(n)]
    backs = [torch.randn(rows_out, H, device=device).to(dtype) for _ in range(n)]
    outs = [torch.randn(ex.gather_idx.shape[0], H, device=device).to(dtype) for _ in range(n)]
    packed = [x0.new_empty((rows_out, lay.width)) for _ in range(n)]
    home_t = torch.empty_like(home)
    # correctness before timing: kernel == reference
    from moecomm.ep.nccl.reference import gather_sum_reference, pack_send_reference

    want, want_home = x0.new_zeros((rows_out, lay.width)), torch.empty_like(home)
    packed[0].zero_()
    pack_send_reference(xs[0], w0, plan0.rank, plan0.local, plan0.first, plan0.places(), plan0.rank_offsets, want,
                        want_home, static.get("overflow"), meta_col=lay.meta_col, capacity=capacity)
    P.pack_send(xs[0], w0, plan0, lay, packed[0], home_t, **static)
    assert torch.equal(packed[0].view(torch.int32), want.view(torch.int32)) and torch.equal(home_t, want_home)
    torch.testing.assert_close(O.gather_sum(backs[0], home), gather_sum_reference(backs[0], home), rtol=2**-7, atol=1e-2)
    slot_pos = ex.slot_pos
    cases = [  # (op, minimum bytes, fn, input sets): the steps as the dispatcher runs them
        ("pack", T * H * e + S * lay.width * e + T * k * 16,
         lambda x, o: P.pack_send(x, w0, plan0, lay, o, home_t, **static), list(zip(xs, packed))),
        ("unpack", S * H * e + T * H * e + T * k * 4, lambda b: O.gather_sum(b, home), [(b,) for b in backs]),
        ("reduce", N * H * e + R * H * e + R * k * 4, lambda o: O.gather_sum(o, slot_pos), [(o,) for o in outs]),
    ]
    rows = []
    shape = f"T{T}_H{H}_top{k}of{E}_W{W}" + ("" if capacity is None else f"_C{capacity}")
    for op, nbytes, fn, sets in cases:
        copy_sets, copy_bytes = _copy_sets(nbytes, H, dtype, device)
        timings = {"eager": (bench(fn, sets, rep=rep, warmup=warmup, device=device),
                             bench(_copy, copy_sets, rep=rep, warmup=warmup, device=device))}
        row = dict(shape=shape, op=op, nbytes=nbytes, host_us=host_us(fn, sets, max(rep, 20)))  # after warm-up
        if graph:
            timings["graph"] = (graph_bench(fn, sets, replays=rep), graph_bench(_copy, copy_sets, replays=rep))
        for mode, (t, tc) in timings.items():
            gbps, copy_gbps = nbytes / t.median_ms / 1e6, copy_bytes / tc.median_ms / 1e6
            frac = gbps / copy_gbps
            row[mode] = dict(ms=t.median_ms, copy_ms=tc.median_ms, frac=frac, gbps=gbps)
            for impl, tt, g in (("moecomm", t, gbps), ("copy", tc, copy_gbps)):
                writer.write(bench="dispatch", mode="kernel", timing=mode, op=op, shape=shape, T=T, H=H, E=E, k=k,
                             W=W, dtype=str(dtype).replace("torch.", ""), impl=impl, median_ms=tt.median_ms,
                             p10_ms=tt.p10_ms, p90_ms=tt.p90_ms, gbps=g, min_bytes=nbytes,
                             fraction_of_copy=frac if impl == "moecomm" else 1.0,
                             host_us=row["host_us"] if impl == "moecomm" else None)
        rows.append(row)
    return rows


def _fmt(row: dict, mode: str) -> str:
    m = row.get(mode)
    if m is None:
        return f"{'n/a':>9} {'n/a':>9} {'n/a':>7}"
    return f"{m['ms']:>9.4f} {m['copy_ms']:>9.4f} {m['frac']:>7.0%}"


def kernel_mode(args, writer) -> list[dict]:
    gpu = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if gpu else ("cpu", torch.float32)
    rep, warmup = args.rep or 50, 10
    shapes = QUICK_KERNEL_SHAPES if args.quick else KERNEL_SHAPES
    name = torch.cuda.get_device_name() if gpu else "cpu (no CUDA graph timing)"
    print(f"device: {name}, {str(dtype).replace('torch.', '')}; GB/s = minimum bytes / time; copy = dst.copy_(src) "
          f"of the same bytes, timed the same way\n"
          f"  eager: calls launched from Python back to back, CUDA events around each call (host cost included "
          f"where it exceeds the kernel's; wall clock on CPU)\n"
          f"  graph: {CALLS_PER_GRAPH} calls captured in one CUDA graph and replayed, time per call (the kernel "
          f"alone); target >= {TARGET_OF_COPY:.0%} of copy, judged on graph\n"
          f"  host:  host time per eager call, us;  GB/s: ours, graph (eager without a GPU)")
    head = (f"{'shape':<28} {'op':<7} {'host us':>8} | {'eager ms':>9} {'copy ms':>9} {'of copy':>7} | "
            f"{'graph ms':>9} {'copy ms':>9} {'of copy':>7} | {'GB/s':>7}")
    print(head)
    print("-" * len(head))
    rows = []
    for T, H, E, k in shapes:
        for W in (1, 8) if not args.quick else (1, 2):
            for row in kernel_rows(T, H, E, k, W, dtype, device, writer, rep, warmup, graph=gpu):
                best = row.get("graph") or row["eager"]
                flags = []
                if "graph" in row and row["graph"]["frac"] < TARGET_OF_COPY:
                    flags.append("MISSED")
                if row["eager"]["frac"] < TARGET_OF_COPY:
                    flags.append("eager<80%")
                print(f"{row['shape']:<28} {row['op']:<7} {row['host_us']:>8.1f} | {_fmt(row, 'eager')} | "
                      f"{_fmt(row, 'graph')} | {best['gbps']:>7.0f} {' '.join(flags)}")
                rows.append(row)
    # the static-capacity mode at decode sizes (DeepSeek-V3 shape), W 8 virtual ranks, C = T
    for T, H, E, k in (QUICK_KERNEL_SHAPES if args.quick else STATIC_KERNEL_SHAPES):
        W = 2 if args.quick else 8
        for row in kernel_rows(T, H, E, k, W, dtype, device, writer, rep, warmup, graph=gpu, capacity=T):
            best = row.get("graph") or row["eager"]
            print(f"{row['shape']:<28} {row['op']:<7} {row['host_us']:>8.1f} | {_fmt(row, 'eager')} | "
                  f"{_fmt(row, 'graph')} | {best['gbps']:>7.0f}")
            rows.append(row)
    if args.sweep and gpu:
        sweep(shapes if args.quick else [s for s in shapes if s[1] == 4096], dtype, device, writer, rep)
    return rows


def sweep(shapes, dtype, device, writer, rep) -> None:
    """Graph-replay time of unpack (gather_sum) per launch configuration (BLOCK_H, num_warps)."""
    from moecomm.ep.nccl._triton import NUM_WARPS_DEFAULT, _block_h, gather_sum_triton

    e = torch.tensor([], dtype=dtype).element_size()
    print("\nsweep: graph replay, per call; * = the default configuration")
    print(f"{'shape':<28} {'BLOCK_H/warps':>14} {'unpack ms':>10} {'GB/s':>6}")
    for T, H, E, k in shapes:
        for W in (1, 8):
            pl = ExpertPlacement(E, W)
            ids, w = _routing(T, E, k, device, seed=0)
            plan = P.plan_send(ids, pl.expert_to_rank_tensor(device), pl.expert_to_local_tensor(device), W)
            S = int(plan.info[:, 0].sum())
            lay = P.RowLayout.of(H, k, dtype)
            home = torch.empty((T, k), dtype=torch.int32, device=device)
            P.pack_send(torch.randn(T, H, device=device).to(dtype), w, plan, lay,
                        torch.empty((S, lay.width), dtype=dtype, device=device), home)
            n = _n_sets(S * H * e)
            backs = [(torch.randn(S, H, device=device).to(dtype),) for _ in range(n)]
            shape = f"T{T}_H{H}_top{k}of{E}_W{W}"
            widest = max(16, 1 << (H - 1).bit_length())  # a block wider than the row only adds masked lanes
            for bh, nw in sorted({(min(bh, widest), nw) for bh, nw in SWEEP_CONFIGS}):
                nbytes = S * H * e + T * H * e
                t = graph_bench(lambda b: gather_sum_triton(b, home, block_h=bh, num_warps=nw), backs, replays=rep)
                gbps = nbytes / t.median_ms / 1e6
                writer.write(bench="dispatch", mode="sweep", timing="graph", op="unpack", shape=shape, T=T, H=H, E=E,
                             k=k, W=W, impl="moecomm", block_h=bh, num_warps=nw, median_ms=t.median_ms,
                             p10_ms=t.p10_ms, p90_ms=t.p90_ms, gbps=gbps, min_bytes=nbytes)
                mark = "*" if (bh, nw) == (_block_h(H), NUM_WARPS_DEFAULT) else " "
                print(f"{shape:<28} {f'{bh}/{nw}{mark}':>14} {t.median_ms:>10.4f} {gbps:>6.0f}")


# ----------------------------------------------------------------------------- distributed mode


def _naive_dispatch_combine(x, ids, w, placement, group, list_a2a: bool):
    """The per-expert path: rows per (token, expert) sorted by expert, no dedup, index_add_ back."""
    import torch.distributed as dist

    W, E = placement.ep_size, placement.num_experts
    T, k = ids.shape
    order = torch.argsort(ids.reshape(-1).long(), stable=True)  # [T*k] sorted by expert
    rows = x.index_select(0, order // k)  # [T*k, H]
    per_expert = torch.bincount(ids.reshape(-1).long(), minlength=E).tolist()  # [E], a host sync
    send = [0] * W
    for ex in range(E):  # a host loop over experts: what the naive path does
        send[placement.expert_to_rank[ex]] += per_expert[ex]
    send_t = torch.tensor(send, device=x.device)
    recv_t = torch.empty_like(send_t)
    dist.all_to_all_single(recv_t, send_t, group=group)
    recv = recv_t.tolist()
    if list_a2a:
        outs = [x.new_empty((r, x.shape[1])) for r in recv]
        dist.all_to_all(outs, list(rows.split(send)), group=group)
        got = torch.cat(outs)
        back = [x.new_empty((s, x.shape[1])) for s in send]
        dist.all_to_all(back, list(got.split(recv)), group=group)
        back = torch.cat(back)
    else:
        got = x.new_empty((sum(recv), x.shape[1]))
        dist.all_to_all_single(got, rows, recv, send, group=group)
        back = x.new_empty((T * k, x.shape[1]))
        dist.all_to_all_single(back, got, send, recv, group=group)
    y = torch.zeros_like(x)
    return y.index_add_(0, order // k, back * w.reshape(-1)[order][:, None].to(x.dtype))


def _dist_worker(shapes, rep, warmup, use_cuda) -> list:
    """Runs on every rank; returns rank 0's table rows (and writes nothing itself)."""
    import torch.distributed as dist

    rank, W = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dtype = torch.bfloat16 if use_cuda else torch.float32
    list_a2a = dist.get_backend() == "nccl"
    if not use_cuda:
        # ranks share the CPU cores: OpenMP threads spinning against each other make a 0.05 ms op
        # take 10 ms, so each rank computes on one thread
        torch.set_num_threads(1)
    table = []
    for T, H, E, k in shapes:
        pl = ExpertPlacement(E, W)
        disp = D.EPDispatcher(E, k, H, dtype=dtype)
        ids, w = _routing(T, E, k, device, seed=rank)
        w = 2.0 ** torch.round(torch.log2(w))  # powers of two: integer payloads check exactly
        x = torch.randint(-3, 4, (T, H), device=device).to(dtype)

        def ours(x, ids, w):
            d = disp.dispatch(x, ids, w, validate=False)
            h = d.tokens.index_select(0, d.gather_idx.long()) * d.row_weights[:, None].to(dtype)
            return disp.combine(h, d.handle)

        y = ours(x, ids, w)
        y_naive = _naive_dispatch_combine(x, ids, w, pl, None, list_a2a)
        if not torch.equal(y, y_naive):
            raise AssertionError(f"rank {rank}: ours and the naive path disagree at T={T} H={H} E={E} k={k}")
        d = disp.dispatch(x, ids, w)
        send_splits, recv_splits = d.handle.send_splits, d.handle.recv_splits
        h_fixed = d.tokens.index_select(0, d.gather_idx.long())  # [N, H]: N is the same every call

        def dispatch_combine(x, ids, w):
            return disp.combine(h_fixed, disp.dispatch(x, ids, w, validate=False).handle)
        sbuf = x.new_empty((sum(send_splits), H))
        rbuf = x.new_empty((sum(recv_splits), H))

        def a2a_there_and_back():
            dist.all_to_all_single(rbuf, sbuf, recv_splits, send_splits)
            dist.all_to_all_single(sbuf, rbuf, send_splits, recv_splits)

        # A fixed number of calls on every rank: each call runs collectives, and a warm-up that
        # lasts until some time has passed (bench's min_warmup_ms) can end after a different number
        # of calls on each rank, leaving one rank in a collective the others never enter (a hang
        # seen on two H200s).
        timed = dict(rep=rep, warmup=warmup, device=device, min_warmup_ms=0.0)
        dist.barrier()
        t_ours = bench(ours, [(x, ids, w)], **timed)
        dist.barrier()
        t_dc = bench(dispatch_combine, [(x, ids, w)], **timed)
        dist.barrier()
        t_a2a = bench(a2a_there_and_back, None, **timed)
        dist.barrier()
        t_naive = bench(lambda: _naive_dispatch_combine(x, ids, w, pl, None, list_a2a), None, **timed)
        e = x.element_size()
        sent_bytes = 2 * sum(send_splits) * H * e  # rows out and back
        table.append(dict(shape=f"T{T}_H{H}_top{k}of{E}_W{W}", T=T, H=H, E=E, k=k, W=W,
                          ours_ms=t_ours.median_ms, dc_ms=t_dc.median_ms, a2a_ms=t_a2a.median_ms,
                          naive_ms=t_naive.median_ms,
                          bytes_sent=sent_bytes, rank=rank))
    gathered = [None] * W
    dist.all_gather_object(gathered, table)
    return gathered if rank == 0 else []


def _print_dist(gathered, writer, backend) -> None:
    head = (f"{'shape':<26} {'ours ms':>9} {'d+c ms':>9} {'a2a ms':>9} {'naive ms':>9} {'d+c/a2a':>9} {'naive/ours':>10} "
            f"{'GB/s sent':>10}")
    print(f"backend: {backend}; times: the slowest rank's median\n{head}")
    print("-" * len(head))
    keys = ("ours_ms", "dc_ms", "a2a_ms", "naive_ms")
    for i, row in enumerate(gathered[0]):
        slow = {key: max(g[i][key] for g in gathered) for key in keys}
        gbps = max(g[i]["bytes_sent"] for g in gathered) / slow["dc_ms"] / 1e6
        print(f"{row['shape']:<26} {slow['ours_ms']:>9.3f} {slow['dc_ms']:>9.3f} {slow['a2a_ms']:>9.3f} {slow['naive_ms']:>9.3f} "
              f"{slow['dc_ms'] / slow['a2a_ms']:>8.2f}x {slow['naive_ms'] / slow['ours_ms']:>9.2f}x {gbps:>10.2f}")
        for impl, key in zip(("moecomm", "moecomm dispatch+combine", "all_to_all_single", "naive"), keys):
            writer.write(bench="dispatch", mode="distributed", backend=backend, shape=row["shape"], T=row["T"],
                         H=row["H"], E=row["E"], k=row["k"], W=row["W"], impl=impl, median_ms=slow[key],
                         ratio_to_ours=slow[key] / slow["ours_ms"],
                         per_rank_ms=[g[i][key] for g in gathered])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="tiny shapes: 2 gloo ranks on CPU (CI smoke test), or with --kernel the kernel mode")
    parser.add_argument("--kernel", action="store_true",
                        help="kernel mode even without a GPU (CPU: eager timings of the reference, no graph column)")
    parser.add_argument("--sweep", action="store_true", help="kernel mode: also time launch configurations (GPU)")
    parser.add_argument("--multigpu", action="store_true", help="under torchrun: NCCL, one GPU per rank")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--rep", type=int, default=None, help="timed calls (eager) / replays (graph) per measurement")
    args = parser.parse_args(argv)
    writer = ResultWriter(args.out)

    if args.multigpu:
        import moecomm.distributed

        world = moecomm.distributed.init()
        gathered = _dist_worker(DIST_SHAPES, args.rep or 30, 5, True)
        if world.rank == 0:
            _print_dist(gathered, writer, "nccl")
        moecomm.distributed.shutdown()
        return 0
    if args.kernel or (torch.cuda.is_available() and not args.quick):
        kernel_mode(args, writer)
        return 0
    if not args.quick:
        print("no GPU: running the --quick CPU mode (2 gloo ranks)")
    from moecomm.testing import run_distributed

    outs = run_distributed(2, _dist_worker, QUICK_DIST_SHAPES, args.rep or 5, 2, False, timeout_s=120)
    _print_dist(outs[0], writer, "gloo (CPU)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
