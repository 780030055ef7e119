"""Expert-parallel dispatch/combine: our pack/unpack kernels and collectives vs their baselines.

# T = num_tokens per rank, H = hidden, k = top_k, E = num_experts, W = ep_size, S = rows sent,
# R = rows received, N = expanded (row, local expert) pairs, e = bytes per element

    python -m benchmarks.bench_dispatch                   # one GPU: kernel bandwidth vs a device copy
    python -m benchmarks.bench_dispatch --quick           # CPU: 2 gloo ranks, tiny shapes (CI smoke test)
    torchrun --nproc-per-node 8 -m benchmarks.bench_dispatch --multigpu   # NCCL, one GPU per rank
    ... --out r.jsonl                                     # also append JSON lines

Kernel mode (one GPU; EP size 1 and one of W = 8 virtual ranks), each row beside a plain device
copy (`dst.copy_(src)`) moving the same number of bytes; the target is >= 80% of copy bandwidth:
  pack    ours: pack_rows(x, pos, S), token t written once per destination rank (dedup)
          bytes: read x (T*H*e) + write S*H*e (+ T*W*4 of pos)
  unpack  ours: gather_sum(returned [S, H], pos [T, W]) on the source rank, fp32 sum per token
          bytes: read S*H*e + write T*H*e (+ T*W*4)
  reduce  ours: gather_sum(expert_out [N, H], slot_pos [R, k]) on the receiver (rows summed over
          its local experts before the return trip)   bytes: read N*H*e + write R*H*e (+ R*k*4)
  e.g. T=8192, H=4096, top-8 of 64, W=8, bf16: each token reaches ~5.3 ranks, S ~ 43.6k rows:
  pack reads 64 MiB and writes ~341 MiB: ~0.14 ms at the ~2.97 TB/s of an H100 copy.

Distributed mode (--quick on CPU/gloo, --multigpu on NCCL), every rank timing:
  ours      EPDispatcher.dispatch + combine (the expert in between is a row gather, in every impl)
  a2a       all_to_all_single of the same [S, H] rows there and back (the floor; target: ours <= 1.2x)
  naive     per-(token, expert) rows sorted by expert (no dedup), counts exchanged per expert, list
            all_to_all (all_to_all_single on gloo, whose list form rejects uneven sizes), weighted
            index_add_ on return (target: ours >= 1.5x faster)
"""

from __future__ import annotations

import argparse

import torch

from moecomm.ep import dispatch as D
from moecomm.ep.placement import ExpertPlacement
from moecomm.testing import ResultWriter, bench

KERNEL_SHAPES = [  # (T, H, E, k)
    (4096, 4096, 64, 8), (8192, 4096, 64, 8), (4096, 7168, 256, 8), (8192, 7168, 256, 8),
]
DIST_SHAPES = [(4096, 4096, 64, 8), (8192, 7168, 256, 8)]
QUICK_DIST_SHAPES = [(256, 128, 8, 2), (33, 64, 16, 4)]
L2_BYTES = 50 * 2**20  # H100
TARGET_OF_COPY = 0.8


def _routing(T, E, k, device, seed):
    g = torch.Generator().manual_seed(seed)
    w, ids = torch.rand(T, E, generator=g).softmax(-1).topk(k, dim=1)
    return ids.to(torch.int32).to(device), w.float().to(device)


def _n_sets(nbytes: int) -> int:
    return max(2, min(8, -(-2 * L2_BYTES // max(nbytes, 1))))  # rotate inputs past L2


# ----------------------------------------------------------------------------- kernel mode (one GPU)


def _copy_baseline(nbytes: int, H: int, dtype, device, rep, warmup):
    """A device copy moving nbytes in total (half read, half written)."""
    e = torch.tensor([], dtype=dtype).element_size()
    rows = max(1, nbytes // (2 * H * e))
    sets = [(torch.empty(rows, H, dtype=dtype, device=device), torch.randn(rows, H, device=device).to(dtype))
            for _ in range(_n_sets(rows * H * e))]
    t = bench(lambda dst, src: dst.copy_(src), sets, rep=rep, warmup=warmup, device=device)
    return t, 2 * rows * H * e


def kernel_rows(T, H, E, k, W, dtype, device, writer, rep, warmup):
    e = torch.tensor([], dtype=dtype).element_size()
    pl = ExpertPlacement(E, W)
    e2r, e2l = pl.expert_to_rank_tensor(device), pl.expert_to_local_tensor(device)
    # W source ranks' routing: rank 0's plan is the one timed; all of them feed rank 0's receive side
    plans = [D.plan_send(*_routing(T, E, k, device, seed=s), e2r, e2l, W) for s in range(W)]
    splits = [p.rows_per_rank.tolist() for p in plans]
    S = sum(splits[0])
    recv_meta = torch.cat([D.pack_metadata(p, sum(sp))[:sp[0]] for p, sp in zip(plans, splits)])  # to rank 0
    N = int((recv_meta[:, :k] >= 0).sum())
    ex = D.expand_received(recv_meta, k, pl.num_local_experts(0), N)
    R = recv_meta.shape[0]
    pos = plans[0].pos
    n = _n_sets(max(S, N) * H * e)
    xs = [torch.randn(T, H, device=device).to(dtype) for _ in range(n)]
    backs = [torch.randn(S, H, device=device).to(dtype) for _ in range(n)]
    outs = [torch.randn(N, H, device=device).to(dtype) for _ in range(n)]
    # correctness before timing: kernel == reference
    from moecomm.ep._dispatch_reference import gather_sum_reference, pack_rows_reference

    assert torch.equal(D.pack_rows(xs[0], pos, S), pack_rows_reference(xs[0], pos, S))
    torch.testing.assert_close(D.gather_sum(backs[0], pos), gather_sum_reference(backs[0], pos), rtol=2**-7, atol=1e-2)
    cases = [
        ("pack", T * H * e + S * H * e + T * W * 4, lambda i: D.pack_rows(xs[i], pos, S)),
        ("unpack", S * H * e + T * H * e + T * W * 4, lambda i: D.gather_sum(backs[i], pos)),
        ("reduce", N * H * e + R * H * e + R * k * 4, lambda i: D.gather_sum(outs[i], ex.slot_pos)),
    ]
    rows = []
    shape = f"T{T}_H{H}_top{k}of{E}_W{W}"
    for op, nbytes, fn in cases:
        t = bench(fn, [(i,) for i in range(n)], rep=rep, warmup=warmup, device=device)
        tc, copy_bytes = _copy_baseline(nbytes, H, dtype, device, rep, warmup)
        gbps, copy_gbps = nbytes / t.median_ms / 1e6, copy_bytes / tc.median_ms / 1e6
        frac = gbps / copy_gbps
        for impl, tt, g in (("moecomm", t, gbps), ("copy", tc, copy_gbps)):
            writer.write(bench="dispatch", mode="kernel", op=op, shape=shape, T=T, H=H, E=E, k=k, W=W,
                         dtype=str(dtype).replace("torch.", ""), impl=impl, median_ms=tt.median_ms, p10_ms=tt.p10_ms,
                         p90_ms=tt.p90_ms, gbps=g, min_bytes=nbytes, fraction_of_copy=frac if impl == "moecomm" else 1.0)
        rows.append((shape, op, t.median_ms, tc.median_ms, frac, gbps))
    return rows


def kernel_mode(args, writer) -> None:
    device, dtype = "cuda", torch.bfloat16
    rep, warmup = args.rep or 50, 10
    head = f"{'shape':<28} {'op':<7} {'ours ms':>9} {'copy ms':>9} {'of copy':>8} {'ours GB/s':>10}"
    print(f"device: {torch.cuda.get_device_name()}, bf16; copy = dst.copy_(src) of the same bytes; target >= 80% of copy\n{head}")
    print("-" * len(head))
    for T, H, E, k in KERNEL_SHAPES:
        for W in (1, 8):
            for shape, op, ms, cms, frac, gbps in kernel_rows(T, H, E, k, W, dtype, device, writer, rep, warmup):
                flag = "" if frac >= TARGET_OF_COPY else " MISSED"
                print(f"{shape:<28} {op:<7} {ms:>9.4f} {cms:>9.4f} {frac:>7.0%} {gbps:>10.1f}{flag}")


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
        sbuf = x.new_empty((sum(send_splits), H))
        rbuf = x.new_empty((sum(recv_splits), H))

        def a2a_there_and_back():
            dist.all_to_all_single(rbuf, sbuf, recv_splits, send_splits)
            dist.all_to_all_single(sbuf, rbuf, send_splits, recv_splits)

        dist.barrier()
        t_ours = bench(ours, [(x, ids, w)], rep=rep, warmup=warmup, device=device)
        dist.barrier()
        t_a2a = bench(a2a_there_and_back, None, rep=rep, warmup=warmup, device=device)
        dist.barrier()
        t_naive = bench(lambda: _naive_dispatch_combine(x, ids, w, pl, None, list_a2a), None, rep=rep,
                        warmup=warmup, device=device)
        e = x.element_size()
        sent_bytes = 2 * sum(send_splits) * H * e  # rows out and back
        table.append(dict(shape=f"T{T}_H{H}_top{k}of{E}_W{W}", T=T, H=H, E=E, k=k, W=W,
                          ours_ms=t_ours.median_ms, a2a_ms=t_a2a.median_ms, naive_ms=t_naive.median_ms,
                          bytes_sent=sent_bytes, rank=rank))
    gathered = [None] * W
    dist.all_gather_object(gathered, table)
    return gathered if rank == 0 else []


def _print_dist(gathered, writer, backend) -> None:
    head = f"{'shape':<26} {'ours ms':>9} {'a2a ms':>9} {'naive ms':>9} {'ours/a2a':>9} {'naive/ours':>10} {'GB/s sent':>10}"
    print(f"backend: {backend}; times: the slowest rank's median\n{head}")
    print("-" * len(head))
    for i, row in enumerate(gathered[0]):
        slow = {key: max(g[i][key] for g in gathered) for key in ("ours_ms", "a2a_ms", "naive_ms")}
        gbps = max(g[i]["bytes_sent"] for g in gathered) / slow["ours_ms"] / 1e6
        print(f"{row['shape']:<26} {slow['ours_ms']:>9.3f} {slow['a2a_ms']:>9.3f} {slow['naive_ms']:>9.3f} "
              f"{slow['ours_ms'] / slow['a2a_ms']:>8.2f}x {slow['naive_ms'] / slow['ours_ms']:>9.2f}x {gbps:>10.2f}")
        for impl, key in (("moecomm", "ours_ms"), ("all_to_all_single", "a2a_ms"), ("naive", "naive_ms")):
            writer.write(bench="dispatch", mode="distributed", backend=backend, shape=row["shape"], T=row["T"],
                         H=row["H"], E=row["E"], k=row["k"], W=row["W"], impl=impl, median_ms=slow[key],
                         ratio_to_ours=slow[key] / slow["ours_ms"],
                         per_rank_ms=[g[i][key] for g in gathered])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 gloo ranks on CPU, tiny shapes (CI smoke test)")
    parser.add_argument("--multigpu", action="store_true", help="under torchrun: NCCL, one GPU per rank")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--rep", type=int, default=None, help="timed calls per measurement")
    args = parser.parse_args(argv)
    writer = ResultWriter(args.out)

    if args.multigpu:
        import moecomm.dist

        world = moecomm.dist.init()
        gathered = _dist_worker(DIST_SHAPES, args.rep or 30, 5, True)
        if world.rank == 0:
            _print_dist(gathered, writer, "nccl")
        moecomm.dist.shutdown()
        return 0
    if args.quick or not torch.cuda.is_available():
        if not args.quick:
            print("no GPU: running the --quick CPU mode (2 gloo ranks)")
        from moecomm.testing import run_distributed

        outs = run_distributed(2, _dist_worker, QUICK_DIST_SHAPES, args.rep or 5, 2, False, timeout_s=120)
        _print_dist(outs[0], writer, "gloo (CPU)")
        return 0
    kernel_mode(args, writer)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
