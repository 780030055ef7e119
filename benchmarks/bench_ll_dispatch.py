"""Low-latency (IPC) dispatch/combine kernels with W virtual ranks on one GPU, beside a device copy.

# T = num_tokens per rank, H = hidden, k = top_k, E = num_experts, W = ep_size, C = capacity, e = bytes/element

    python -m benchmarks.bench_ll_dispatch                # one GPU: W 8 virtual ranks, T 1 and 128
    python -m benchmarks.bench_ll_dispatch --quick        # tiny shapes (CPU: the layout model, a smoke test)
    ... --out r.jsonl                                     # also append JSON lines

W virtual ranks (moecomm.distributed.symmetric.open_virtual: W buffers on one GPU), one IPCDispatcher
and one CUDA stream a rank. One "call" launches every rank's op on its own stream (forked from and
joined to the current one), as the W GPUs of a node would run it: its time is the time until the
slowest rank is done. Timed two ways (moecomm.testing): graph (CALLS calls captured in one CUDA
graph, replayed, per call: the kernels' own time) and eager (launched from Python: W ranks' launch
paths in a row, so host-bound at these sizes).
Every call goes through moecomm.ep.ipc.virtual (every rank's LL kernel launched before any rank's
Triton / torch work: see moecomm.ep.ipc.dispatcher on lazy loading); a spin that times out
(TIMEOUT_S) is printed at once, naming the rank, and that shape is reported FAILED, never timed.
Payloads (--payload): native (bf16 rows) and fp8 (e4m3 + a scale per 128 columns: ~0.52 of the
bytes; the dispatch row includes the quantisation and, in its finish phase, the dequantisation).
Ops: dispatch (ll_dispatch + the expansion by local expert), combine (ll_combine + the source's sum),
d+c (both, the expert skipped). Repeated dispatches (or combines) without the other in between race
on the buffers' contents, not on their flags: fine for timing, never for results (the tests check those).
Bytes: the rows a dispatch writes into peers' buffers, sum over ranks of (rows sent) * row_bytes with
row_bytes = H * e + 8k (T 128, H 7168, top-8 of 256, W 8: each token reaches ~5.3 of 8 ranks, ~9.8 MB
a rank, ~78 MB a call over the W ranks); combine writes the same rows of H * e back. The baseline is one device copy (dst.copy_(src))
of those bytes, timed the same way: on one GPU the W ranks share one HBM, so the copy is the floor
the virtual-rank kernels can approach; over NVLink (the multi-GPU issue) the targets are dispatch
<= 40 us and combine <= 50 us at T 128.
"""

from __future__ import annotations

import argparse

import torch

from moecomm.ep.placement import ExpertPlacement
from moecomm.testing import ResultWriter, bench, graph_bench

SHAPES = [(1, 7168, 256, 8, 8), (128, 7168, 256, 8, 8)]  # (T, H, E, k, W)
QUICK_SHAPES = [(5, 128, 8, 2, 2)]  # H % 128 == 0: the fp8 payload too
CALLS = 20
TIMEOUT_S = 5.0  # a spin that waits longer is a bug: fail naming the rank, not a long hang


def _routing(T, E, k, W, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for r in range(W):
        w, ids = torch.rand(T, E, generator=g).softmax(-1).topk(k, dim=1)
        out.append((ids.to(torch.int32), w.float()))
    return out


def _rows_sent(ids, pl) -> int:
    e2r = torch.tensor(pl.expert_to_rank)
    dest = torch.zeros(ids.shape[0], pl.ep_size, dtype=torch.bool)
    dest.scatter_(1, e2r[ids.long()], True)
    return int(dest.sum())


def gpu_rows(T, H, E, k, W, dtype, writer, replays, payload="native") -> list[dict]:
    from moecomm.distributed.symmetric import open_virtual
    from moecomm.ep.ipc import IPCDispatcher
    from moecomm.ep.ipc.virtual import virtual_combine, virtual_dispatch

    dev = torch.device("cuda")
    pl = ExpertPlacement(E, W)
    bufs = open_virtual(IPCDispatcher.buffer_bytes(W, T, H, k, dtype, payload), W, dev)
    disps = [IPCDispatcher(E, k, H, buffer=b, dtype=dtype, max_tokens=T, timeout_s=TIMEOUT_S, payload=payload)
             for b in bufs]
    try:
        streams = [torch.cuda.Stream() for _ in range(W)]
        route = _routing(T, E, k, W, seed=0)
        xs = [torch.randn(T, H, device=dev).to(dtype) for _ in range(W)]
        ids = [i.to(dev) for i, _ in route]
        ws = [w.to(dev) for _, w in route]
        rows = sum(_rows_sent(i, pl) for i, _ in route)
        row_bytes = disps[0].layout.row_bytes
        # every call through moecomm.ep.ipc.virtual: every rank's LL kernel before any rank's Triton / torch
        # work (a module load behind a spinning kernel deadlocks: the first H200 run's T=128 crash)
        state = {"res": virtual_dispatch(disps, streams, xs, ids, ws)}
        torch.cuda.synchronize()
        _check(disps, f"the first dispatch at T={T}")
        hs = [torch.randn(state["res"][r].gather_idx.shape[0], H, device=dev).to(dtype) for r in range(W)]
        handles = {r: state["res"][r].handle for r in range(W)}

        def d():
            state["res"] = virtual_dispatch(disps, streams, xs, ids, ws)

        def c():
            virtual_combine(disps, streams, hs, handles)

        def dc():
            res = virtual_dispatch(disps, streams, xs, ids, ws)
            virtual_combine(disps, streams, hs, {r: res[r].handle for r in range(W)})

        c()
        torch.cuda.synchronize()
        _check(disps, f"the first combine at T={T}")

        out = []
        for op, fn, nbytes in (("dispatch", d, rows * row_bytes), ("combine", c, rows * H * dtype.itemsize),
                               ("d+c", dc, rows * (row_bytes + H * dtype.itemsize))):
            src = torch.empty(max(nbytes, 16), dtype=torch.uint8, device=dev)
            dst = torch.empty_like(src)

            def copy():
                dst.copy_(src)

            for timing, t_ll, t_copy in (
                ("graph", graph_bench(fn, [()], replays=replays, calls=CALLS), graph_bench(copy, [()], replays=replays, calls=CALLS)),
                ("eager", bench(fn, None, rep=replays), bench(copy, None, rep=replays)),
            ):
                for impl, t in (("ll_ipc", t_ll), ("device_copy", t_copy)):
                    rec = writer.write(bench="ll_dispatch", op=op, timing=timing, impl=impl, payload=payload, T=T, H=H, E=E, k=k, W=W,
                                       dtype=str(dtype).replace("torch.", ""), bytes=nbytes, median_ms=t.median_ms,
                                       p10_ms=t.p10_ms, p90_ms=t.p90_ms, gbps=nbytes / t.median_ms / 1e6,
                                       ratio_to_copy=t.median_ms / t_copy.median_ms)
                    out.append(rec)
                    print(f"{op:9s} {timing:5s} {impl:12s} {payload:6s} T={T:4d} W={W} {nbytes / 1e6:8.3f} MB  {t.median_ms * 1e3:9.2f} us "
                          f"[{t.p10_ms * 1e3:.2f}, {t.p90_ms * 1e3:.2f}]  {rec['gbps']:8.1f} GB/s  x{rec['ratio_to_copy']:.2f} of copy",
                          flush=True)
                torch.cuda.synchronize()
                _check(disps, f"{op} {timing} at T={T}")
    finally:
        for b in bufs:
            b.close()  # synchronises first: every spin is bounded by TIMEOUT_S
    return out


def _check(disps, what: str) -> None:
    """Raise (after printing it at once) a timeout any rank saw, so that no timing of a broken exchange
    is reported as a time. (Overflow never happens here: C = T.)"""
    for dsp in disps:
        try:
            dsp.check_overflow()
        except Exception as exc:
            print(f"FAILED in {what}: {exc}", flush=True)
            raise


def cpu_rows(T, H, E, k, W, dtype, writer, rep) -> list[dict]:
    """No GPU: time the pure-torch model of the kernels (moecomm.ep.ipc.layout), a smoke test of this script."""
    from moecomm.ep.ipc import layout as LY

    pl = ExpertPlacement(E, W)
    lay = LY.LLLayout.of(W, T, H, k, dtype)
    bufs = [torch.zeros(lay.nbytes, dtype=torch.uint8) for _ in range(W)]
    route = _routing(T, E, k, W, seed=0)
    xs = [torch.randn(T, H).to(dtype) for _ in range(W)]
    e2r, e2l = pl.expert_to_rank_tensor(), pl.expert_to_local_tensor()
    homes = [torch.empty(T, k, dtype=torch.int32) for _ in range(W)]
    state = {"epoch": 0}

    def dispatch():
        state["epoch"] += 1
        for r in range(W):
            LY.send_reference(bufs, lay, r, xs[r], route[r][0], route[r][1], e2r, e2l, homes[r], state["epoch"])
        for r in range(W):
            LY.receive_reference(bufs[r], lay, state["epoch"])

    t = bench(dispatch, None, rep=rep, warmup=1, device="cpu")
    nbytes = sum(_rows_sent(i, pl) for i, _ in route) * lay.row_bytes
    rec = writer.write(bench="ll_dispatch", op="dispatch", timing="cpu", impl="layout_model", T=T, H=H, E=E, k=k, W=W,
                       dtype=str(dtype).replace("torch.", ""), bytes=nbytes, median_ms=t.median_ms, p10_ms=t.p10_ms,
                       p90_ms=t.p90_ms)
    assert int(LY.LLLayout.word(bufs[0], LY.ERROR_MASK)) == 0
    print(f"dispatch  cpu   layout_model T={T} W={W} {nbytes} B  {t}")
    return [rec]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes (on CPU: the layout model)")
    ap.add_argument("--out", default=None, help="append JSON lines here")
    ap.add_argument("--payload", default="native,fp8", help="dispatch payloads to time, comma-separated (native, fp8)")
    args = ap.parse_args(argv)
    writer = ResultWriter(args.out)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    rows, failed = [], []
    for T, H, E, k, W in shapes:
        if torch.cuda.is_available():
            for payload in args.payload.split(","):
                try:
                    rows += gpu_rows(T, H, E, k, W, torch.bfloat16, writer, 10 if args.quick else 50, payload)
                except Exception as exc:  # a timed-out exchange: say so, go on with the next shape
                    print(f"FAILED: {payload} T={T} H={H} E={E} k={k} W={W}: {type(exc).__name__}: {exc}", flush=True)
                    failed.append((payload, T))
                    torch.cuda.synchronize()  # bounded: every spin ends within TIMEOUT_S
        else:
            rows += cpu_rows(T, H, E, k, W, torch.float32, writer, 3)
    if failed:
        raise SystemExit(f"bench_ll_dispatch: (payload, T) {failed} failed (messages above)")
    print(f"{len(rows)} rows")
    return 0  # the exit status (`moecomm bench ll_dispatch` returns it)


if __name__ == "__main__":
    raise SystemExit(main())
