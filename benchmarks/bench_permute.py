"""Permute and combine on one rank: moecomm vs the torch baselines, side by side in one process.

# T = num_tokens, H = hidden, k = top_k, E = num_experts, M = T * k routed rows

    python -m benchmarks.bench_permute                  # issue-2 shapes, bf16, GPU
    python -m benchmarks.bench_permute --quick          # tiny shapes, CPU in seconds (CI smoke test)
    python -m benchmarks.bench_permute --out r.jsonl    # also append JSON lines
    python -m benchmarks.bench_permute --sweep          # also time other row-kernel tile configs (GPU)
    python -m benchmarks.bench_permute --pieces         # also the host time of each step of permute (GPU)

Columns (GPU):
  eager   ours and torch called in turn (moecomm.testing.bench_interleaved), CUDA events around each
          call: what a caller sees. Where the host's launch path is longer than the kernels, the GPU
          waits for it and the time is the host's.
  graph   the calls (over the rotating inputs) captured in one CUDA graph and replayed: the device
          time alone. Targets are judged on it (MISSED); an eager time over the target is flagged
          as host-bound.
  host    microseconds of host time per eager call of ours (back-to-back calls, no sync).

Rows:
  permute          ours: permute(x, topk_ids, E) = counting-sort indices + row scatter
                   torch: argsort(topk_ids, stable) + index_select (the baseline of issue 2)
  permute_indices  ours: the index computation alone (torch: the stable argsort alone)
  combine          ours: unpermute(expert_out, indices, topk_weights), fp32 accumulate, no atomics
                   torch: (expert_out * w) then index_add_ into zeros
Minimum bytes (napkin math, what GB/s is computed from):
  permute: read x (T*H*e) + write M rows (M*H*e) + read ids (M*4) + write src_token/dst_row (2*M*4)
  combine: read M rows (M*H*e) + write y (T*H*e) + read dst_row and weights (2*M*4)
  e.g. T=8192, H=4096, k=8, bf16: permute 64 MiB + 512 MiB, combine 512 MiB + 64 MiB: at the
  ~2.97 TB/s of an H100 copy, ~0.20 ms each; targets (issue 2): permute <= 0.30 ms, combine <= 0.25 ms.
"""

from __future__ import annotations

import argparse

import torch

from moecomm.permute import permute, permute_indices
from moecomm.permute import unpermute
from moecomm.testing import ResultWriter, bench, bench_interleaved, graph_bench, host_us

SHAPES = [  # (T, H, k, E, name)
    (8192, 4096, 8, 64, "T8192_H4096_top8of64"),
    (4096, 7168, 8, 256, "T4096_H7168_top8of256"),
]
QUICK_SHAPES = [(64, 128, 2, 8, "quick_T64_H128_top2of8"), (33, 64, 4, 16, "quick_T33_H64_top4of16")]
TARGET_MS = {("permute", "T8192_H4096_top8of64"): 0.30, ("combine", "T8192_H4096_top8of64"): 0.25}
L2_BYTES = 50 * 2**20  # H100


def _routing(T, k, E, device, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(T, E, generator=g)
    w, ids = scores.softmax(-1).topk(k, dim=1)
    return ids.to(torch.int32).to(device), w.float().to(device)


def _torch_permute(x, ids):
    order = torch.argsort(ids.reshape(-1), stable=True)
    return x.index_select(0, order // ids.shape[1])


def _torch_argsort(x, ids):
    return torch.argsort(ids.reshape(-1), stable=True)


def _torch_combine(eo, src_token, row_w, T):
    y = torch.zeros(T, eo.shape[1], dtype=eo.dtype, device=eo.device)
    return y.index_add_(0, src_token, eo * row_w[:, None].to(eo.dtype))


def run_shape(T, H, k, E, name, dtype, device, writer, rep, warmup):
    e = torch.tensor([], dtype=dtype).element_size()
    M = T * k
    set_bytes = M * H * e  # the big tensor of each op
    n_sets = max(2, min(8, -(-2 * L2_BYTES // max(set_bytes, 1))))  # rotate past L2
    sets = []
    for s in range(n_sets):
        ids, w = _routing(T, k, E, device, seed=s)
        x = torch.randn(T, H, dtype=dtype, device=device)
        idx = permute_indices(ids, E)
        eo = torch.randn(M, H, dtype=dtype, device=device)
        row_w = torch.empty(M, dtype=torch.float32, device=device).scatter_(0, idx.dst_row.reshape(-1).long(), w.reshape(-1))
        sets.append((x, ids, w, idx, eo, row_w))

    # correctness first: ours equals the baseline before anything is timed
    x, ids, w, idx, eo, row_w = sets[0]
    assert torch.equal(permute(x, ids, E).permuted, _torch_permute(x, ids))
    want = _torch_combine(eo.float(), idx.src_token.long(), row_w, T)
    torch.testing.assert_close(unpermute(eo, idx, w).float(), want, rtol=2e-2, atol=2e-2)

    rows = []
    permute_bytes = T * H * e + M * H * e + 3 * M * 4
    combine_bytes = M * H * e + T * H * e + 2 * M * 4
    cases = [
        ("permute", permute_bytes,
         lambda x, ids, w, idx, eo, rw: permute(x, ids, E, validate=False),
         lambda x, ids, w, idx, eo, rw: _torch_permute(x, ids)),
        ("permute_indices", 3 * M * 4,
         lambda x, ids, w, idx, eo, rw: permute_indices(ids, E, validate=False),
         lambda x, ids, w, idx, eo, rw: _torch_argsort(x, ids)),
        ("combine", combine_bytes,
         lambda x, ids, w, idx, eo, rw: unpermute(eo, idx, w),
         lambda x, ids, w, idx, eo, rw: _torch_combine(eo, idx.src_token.long(), rw, T)),
    ]
    for op, nbytes, ours, base in cases:
        eager = bench_interleaved({"moecomm": lambda *a: ours(*a), "torch": lambda *a: base(*a)}, sets, rep=rep, warmup=warmup)
        t_ours, t_base = eager["moecomm"], eager["torch"]
        g_ours = g_base = None
        host = None
        if device == "cuda":
            g_ours = graph_bench(ours, sets, replays=max(5, rep // 2), calls=len(sets))
            g_base = graph_bench(base, sets, replays=max(5, rep // 2), calls=len(sets))
            host = host_us(ours, sets, max(rep, 20))
        kernel = g_ours or t_ours  # the device time, without the host's launch path
        gbps = nbytes / (kernel.median_ms * 1e-3) / 1e9
        ratio = t_base.median_ms / t_ours.median_ms
        target = TARGET_MS.get((op, name))
        for impl, t, g in (("moecomm", t_ours, g_ours), ("torch", t_base, g_base)):
            writer.write(
                bench="permute", op=op, shape=name, T=T, H=H, k=k, E=E, dtype=str(dtype).replace("torch.", ""),
                impl=impl, median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms,
                graph_ms=g.median_ms if g else None, host_us=host if impl == "moecomm" else None,
                gbps=nbytes / ((g or t).median_ms * 1e-3) / 1e9, min_bytes=nbytes,
                speedup_vs_torch=ratio if impl == "moecomm" else 1.0, target_ms=target,
            )
        rows.append((name, op, t_ours, t_base, g_ours, g_base, host, gbps, target))
    return rows


# (elements per program tile, max BLOCK_H, num_warps) of the permute-copy and combine kernels
SWEEP = [(4096, 1024, 4), (2048, 1024, 4), (8192, 1024, 4), (8192, 1024, 8), (8192, 2048, 8), (16384, 2048, 8), (4096, 512, 4)]


def sweep(T, H, k, E, dtype, device, writer, rep):
    """Time permute and combine under each row-tile config; the defaults of _triton are restored after."""
    from moecomm.permute import _triton

    defaults = (_triton.ROW_TILE_ELEMS, _triton.MAX_BLOCK_H, _triton.ROW_NUM_WARPS)
    ids, w = _routing(T, k, E, device, seed=0)
    sets = [(torch.randn(T, H, dtype=dtype, device=device), torch.randn(T * k, H, dtype=dtype, device=device)) for _ in range(2)]
    idx = permute_indices(ids, E)
    print(f"\nsweep at T={T} H={H} top-{k} of {E}: tile elems, max BLOCK_H, warps -> permute ms, combine ms")
    try:
        for tile, max_bh, warps in SWEEP:
            _triton.ROW_TILE_ELEMS, _triton.MAX_BLOCK_H, _triton.ROW_NUM_WARPS = tile, max_bh, warps
            tp = bench(lambda x, eo: permute(x, ids, E, validate=False), sets, rep=rep, device=device)
            tc = bench(lambda x, eo: unpermute(eo, idx, w), sets, rep=rep, device=device)
            print(f"  {tile:>6} {max_bh:>5} {warps:>2} -> {tp.median_ms:.4f} {tc.median_ms:.4f}")
            writer.write(bench="permute", op="sweep", T=T, H=H, k=k, E=E, tile_elems=tile, max_block_h=max_bh,
                         num_warps=warps, permute_ms=tp.median_ms, combine_ms=tc.median_ms)
    finally:
        _triton.ROW_TILE_ELEMS, _triton.MAX_BLOCK_H, _triton.ROW_NUM_WARPS = defaults


def small_m_table(rep: int = 200) -> None:
    """The dispatch indices + row weights at decode sizes, one-program path against the multi-kernel
    path, each replayed from a CUDA graph (20 calls per replay): the evidence for ep._triton.SMALL_M."""
    from moecomm.permute import _triton as K

    e, k = 128, 8
    print(f"permute_indices + row_weights, top-{k} of {e}, CUDA graph; M, one-program us, multi-kernel us")
    for t in (8, 32, 64, 128, 256):
        ids = torch.randint(0, e, (t, k), device="cuda", dtype=torch.int32)
        w = torch.rand(t, k, device="cuda")
        row = []
        for small in (1 << 30, 0):
            old, K.SMALL_M = K.SMALL_M, small
            try:  # the capture inside graph_bench takes the path this SMALL_M selects
                t_ = graph_bench(lambda: K.permute_triton(ids, e, None, None, w), [()], replays=max(5, rep // 20), calls=20)
            finally:
                K.SMALL_M = old
            row.append(t_.median_ms * 1e3)
        print(f"  {t * k:>5} {row[0]:8.2f} {row[1]:8.2f}")


def host_pieces(rep: int = 200, T: int = 8192, H: int = 4096, k: int = 8, E: int = 64, device: str = "cuda") -> dict:
    """Host microseconds per call of each step of permute at T=8192, H=4096, top-8 of 64 (launches
    are asynchronous: this is the time the Python side spends, which eager calls pay when it exceeds
    the kernels' time)."""
    import triton

    from moecomm.jit.launch import launch
    from moecomm.permute import _triton as K

    m, nb, nbk = T * k, triton.cdiv(T * k, K.HIST_BLOCK_M), E + 1
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    ids, w = _routing(T, k, E, device, seed=0)
    flat = ids.reshape(m)
    x = torch.randn(T, H, device=device, dtype=dtype)
    out = torch.empty(m, H, device=device, dtype=dtype)
    i32 = dict(dtype=torch.int32, device=device)
    hist, base, rank = torch.empty(nb, nbk, **i32), torch.empty(nb, nbk, **i32), torch.empty(m, **i32)
    src, dst, tpe, offs = torch.empty(m, **i32), torch.empty(T, k, **i32), torch.empty(E, **i32), torch.empty(E + 1, **i32)
    bins = triton.next_power_of_2(nbk)
    bt, bh = K._row_tiles(H)
    pieces = {
        "torch.empty (int32 [M])": lambda: torch.empty(m, **i32),
        "permute_hist_kernel launch (Triton's run)": lambda: K.permute_hist_kernel[(nb,)](
            flat, hist, rank, m, E, nbk, BLOCK_M=K.HIST_BLOCK_M, NUM_BINS=bins, num_warps=4),
        "permute_hist_kernel through moecomm.jit.launch (direct)": lambda: launch(
            K.permute_hist_kernel, (nb,), (flat, hist, rank, m, E, nbk), {"BLOCK_M": K.HIST_BLOCK_M, "NUM_BINS": bins}, 4),
        "permute_scan_kernel launch (Triton's run)": lambda: K.permute_scan_kernel[(triton.cdiv(nbk, K.SCAN_BLOCK_E),)](
            hist, base, tpe, nb, nbk, E, BLOCK_B=K.SCAN_BLOCK_B, BLOCK_E=K.SCAN_BLOCK_E, num_warps=4),
        "permute_scatter_kernel launch (Triton's run)": lambda: K.permute_scatter_kernel[(triton.cdiv(T, bt), triton.cdiv(H, bh))](
            flat, rank, base, tpe, offs, dst, src, x, out, flat, flat, T, H, E, nbk, x.stride(0), out.stride(0), 0, 0,
            TOP_K=k, BLOCK_M=K.HIST_BLOCK_M, BLOCK_T=bt, BLOCK_H=bh, COPY=True, HAS_W=False, NUM_BINS=bins,
            num_warps=K.ROW_NUM_WARPS),
        "_triton.permute_triton (indices)": lambda: K.permute_triton(ids, E, None, None),
        "_triton.permute_triton (rows)": lambda: K.permute_triton(ids, E, x, out),
        "ep.permute_indices(validate=False)": lambda: permute_indices(ids, E, validate=False),
        "ep.permute(validate=False)": lambda: permute(x, ids, E, validate=False),
    }
    print(f"\nhost us per call, T={T} H={H} top-{k} of {E} (median of 5 x {rep} calls)")
    times = {}
    for name, fn in pieces.items():
        fn()
        times[name] = sorted(host_us(fn, [()], rep) for _ in range(5))[2]
        print(f"  {times[name]:8.1f}  {name}")
    return times


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, seconds on CPU (CI smoke test)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--rep", type=int, default=None, help="timed calls per measurement")
    parser.add_argument("--sweep", action="store_true", help="also time other row-kernel tile configs (GPU only)")
    parser.add_argument("--small-m", action="store_true", help="also print the one-program vs multi-kernel table (GPU only)")
    parser.add_argument("--pieces", action="store_true", help="also print the host time of each step of permute (GPU only)")
    args = parser.parse_args(argv)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = QUICK_SHAPES if args.quick or device == "cpu" else SHAPES
    rep = args.rep or (5 if args.quick else 50)
    warmup = 2 if args.quick else 10
    writer = ResultWriter(args.out)
    print(f"device: {device}, dtype: {str(dtype).replace('torch.', '')}" + ("" if device == "cuda" else " (CPU: the reference path)"))
    head = (f"{'shape':<24} {'op':<16} {'ours ms':>9} {'torch ms':>9} {'ratio':>6} | {'graph ms':>9} {'torch gr':>9} "
            f"{'ratio':>6} | {'host us':>8} {'GB/s':>7} {'target':>6}")
    print(head)
    print("-" * len(head))
    for T, H, k, E, name in shapes:
        for name_, op, t_ours, t_base, g_ours, g_base, host, gbps, target in run_shape(T, H, k, E, name, dtype, device, writer, rep, warmup):
            kernel = g_ours or t_ours
            tgt = f"{target:.2f}" if target else "-"
            flag = ""
            if target and kernel.median_ms > target:
                flag = " MISSED"
            elif target and t_ours.median_ms > target:
                flag = " (eager over: host-bound)"
            gr = f"{g_ours.median_ms:>9.4f} {g_base.median_ms:>9.4f} {g_base.median_ms / g_ours.median_ms:>5.2f}x" if g_ours else f"{'-':>9} {'-':>9} {'-':>6}"
            hs = f"{host:>8.1f}" if host is not None else f"{'-':>8}"
            print(f"{name_:<24} {op:<16} {t_ours.median_ms:>9.4f} {t_base.median_ms:>9.4f} {t_base.median_ms / t_ours.median_ms:>5.2f}x | "
                  f"{gr} | {hs} {gbps:>7.0f} {tgt:>6}{flag}")
    if args.pieces and device == "cuda":
        host_pieces(rep)
    if args.small_m and device == "cuda":
        small_m_table()
    if args.sweep and device == "cuda":
        for T, H, k, E, _ in shapes:
            sweep(T, H, k, E, dtype, device, writer, rep)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
