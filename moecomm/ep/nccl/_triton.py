"""Triton kernels of expert-parallel dispatch/combine: pack the send buffer, sum rows back.

# T = num_tokens (this rank), H = hidden, W = ep_size, S = rows sent, C = index columns

Both ops are pure data movement, so they are bandwidth-bound: one program per (row, H-block), a
block of 1024 elements (2 KiB of bf16) per program keeps enough bytes in flight per SM on an H100
while a row of H=4096..7168 still spreads over 4..7 programs. H is a constexpr: a model has one
hidden size, and when BLOCK_H divides it the kernels drop the column mask.

- pack: out[pos[t, w]] = x[t] for every destination w of token t (pos -1: not sent there). The token
  is read once and written once per destination rank: the permute fused with the send layout.
- gather_sum: out[m] = sum_c src[idx[m, c]] over idx >= 0, accumulated in fp32 and written once.
  The receiver uses it to sum a token's rows over its local experts (C = top_k) before they travel
  back, and the source rank to sum the returned partials over ranks (C = W).

Host cost. At EP size 1 a pack of T=4096, H=4096 bf16 moves 64 MiB: ~23 us at the ~2.9 TB/s of an
H100 copy, less than a Python call into Triton takes to reach the GPU. So the wrappers below do only
"allocate, launch", and launch through moecomm._launch.Launcher, which skips JITFunction.run once a
specialisation is compiled: on the 2-core CI box JITFunction.run spends ~7 us of Python per launch
(binding, specialisation, cache key, two empty hook calls), the direct path ~2.5 us.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...jit.launch import Launcher, cdiv, next_pow2

BLOCK_H_DEFAULT = 1024
NUM_WARPS_DEFAULT = 4
# pack_send's launch configuration when set (benchmarks/probe_pack.py sweeps them); None: the defaults
PACK_BLOCK_H: int | None = None
PACK_BLOCK_H_DEFAULT = 2048
PACK_NUM_WARPS: int | None = None


@triton.jit
def ep_pack_kernel(
    x_ptr, pos_ptr, out_ptr,
    num_out_rows,
    stride_xt, stride_xh, stride_pt, stride_pw, stride_ot,
    H: tl.constexpr, W: tl.constexpr, BLOCK_H: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + t * stride_xt + offs.to(tl.int64) * stride_xh
    # pure copy: no arithmetic, so the raw bf16 bits pass through unchanged (interpreter-safe)
    if H % BLOCK_H == 0:
        v = tl.load(x_ptrs)
    else:
        v = tl.load(x_ptrs, mask=offs < H)
    for w in tl.static_range(W):  # unrolled: the W index loads issue together, not one per trip
        p = tl.load(pos_ptr + t * stride_pt + w * stride_pw).to(tl.int64)
        # -1 = not sent to w; the upper bound keeps a corrupt index from writing out of bounds
        ok = (p >= 0) & (p < num_out_rows)
        if H % BLOCK_H == 0:
            tl.store(out_ptr + p * stride_ot + offs, v, mask=ok)
        else:
            tl.store(out_ptr + p * stride_ot + offs, v, mask=(offs < H) & ok)


@triton.jit
def ep_gather_sum_kernel(
    src_ptr, idx_ptr, out_ptr, cnt_ptr,
    num_src_rows,
    stride_sm, stride_sh, stride_im, stride_ic, stride_om,
    H: tl.constexpr, C: tl.constexpr, BLOCK_H: tl.constexpr,
    CNT_W: tl.constexpr, CNT_WP: tl.constexpr, CNT_ROWS: tl.constexpr, CNT_SRC: tl.constexpr,
):
    # CNT_W > 0: a dispatch's [2, CNT_W, 3] int32 counts at cnt_ptr; a count c = 3 * part + column
    # is the sum over peers of counts[part, :, column]. CNT_SRC >= 0: num_src_rows = count CNT_SRC;
    # CNT_ROWS >= 0: the grid is a bucket of count CNT_ROWS, the programs past it read and write nothing
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_row = offs < H
    live = m >= 0
    if CNT_W > 0:
        wi = tl.arange(0, CNT_WP)
        if CNT_SRC >= 0:
            num_src_rows = tl.sum(tl.load(cnt_ptr + (CNT_SRC // 3) * CNT_W * 3 + wi * 3 + CNT_SRC % 3, mask=wi < CNT_W,
                                          other=0), axis=0)
        if CNT_ROWS >= 0:
            live = m < tl.sum(tl.load(cnt_ptr + (CNT_ROWS // 3) * CNT_W * 3 + wi * 3 + CNT_ROWS % 3, mask=wi < CNT_W,
                                      other=0), axis=0)
    # tl.full, not tl.zeros: tl.zeros is a @jit helper, and the triton 3.6 interpreter patches
    # triton.language.core for helpers without restoring it, which breaks every later sm_90
    # compile in the same process (CI runs interpreted tests before the compile checks)
    acc = tl.full([BLOCK_H], 0.0, tl.float32)
    for c in tl.static_range(C):  # unrolled: C row loads in flight at once (C = k or W, small)
        i = tl.load(idx_ptr + m * stride_im + c * stride_ic, mask=live, other=-1).to(tl.int64)
        ok = (i >= 0) & (i < num_src_rows)
        src_ptrs = src_ptr + i * stride_sm + offs.to(tl.int64) * stride_sh
        # upcast before adding: fp32 accumulation (and the interpreter adds bf16 bits wrongly)
        if H % BLOCK_H == 0:
            v = tl.load(src_ptrs, mask=ok, other=0.0)
        else:
            v = tl.load(src_ptrs, mask=in_row & ok, other=0.0)
        acc += v.to(tl.float32)
    if H % BLOCK_H == 0 and CNT_ROWS < 0:
        tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=in_row & live)


# ----------------------------------------------------------------------------- launching


_pack_launcher = Launcher(ep_pack_kernel)
_gather_sum_launcher = Launcher(ep_gather_sum_kernel)


def _block_h(hidden: int) -> int:
    return min(BLOCK_H_DEFAULT, max(16, next_pow2(hidden)))


def pack_rows_triton(x: torch.Tensor, pos: torch.Tensor, num_rows: int, out: torch.Tensor | None = None, *,
                     block_h: int | None = None, num_warps: int = NUM_WARPS_DEFAULT) -> torch.Tensor:
    """[S, H] send buffer: row pos[t, w] = x[t]. Checks nothing (dispatch.py validated).

    ``out``: a caller-owned [S, H] buffer with unit inner stride (tests pass a NaN-filled one).
    ``block_h``, ``num_warps``: launch configuration (the benchmark's --sweep); default: BLOCK_H = min(1024, next power of 2 of H), 4 warps.
    """
    T, H = x.shape
    if out is None:
        out = torch.empty((num_rows, H), dtype=x.dtype, device=x.device)
    if T == 0 or num_rows == 0 or H == 0:
        return out
    BLOCK_H = block_h or _block_h(H)
    stride_xt, stride_xh = x.stride()
    stride_pt, stride_pw = pos.stride()
    _pack_launcher((T, cdiv(H, BLOCK_H)), (x, pos, out, num_rows, stride_xt, stride_xh, stride_pt, stride_pw, out.stride(0)),
                   {"H": H, "W": pos.shape[1], "BLOCK_H": BLOCK_H}, num_warps)
    return out


def gather_sum_triton(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor | None = None, *,
                      block_h: int | None = None, num_warps: int = NUM_WARPS_DEFAULT,
                      counts: DeviceCounts | None = None) -> torch.Tensor:
    """[M, H] with row m = sum of src[idx[m, c]] over idx >= 0 (fp32 accumulate, src.dtype out).

    ``out``: a caller-owned [M, H] buffer with unit inner stride (tests pass a NaN-filled one).
    ``block_h``, ``num_warps``: launch configuration (the benchmark's --sweep); default: BLOCK_H = min(1024, next power of 2 of H), 4 warps.
    ``counts``: take the row counts from a dispatch's counts on the device (DeviceCounts: the
    launch then depends on no count, what a recorded program's template needs).
    """
    M, C = idx.shape
    H = src.shape[1]
    if out is None:
        out = torch.empty((M, H), dtype=src.dtype, device=src.device)
    if M == 0 or H == 0:
        return out
    BLOCK_H = block_h or _block_h(H)
    stride_sm, stride_sh = src.stride()
    stride_im, stride_ic = idx.stride()
    grid_m, nsrc, cnt = M, src.shape[0], src
    cx = {"H": H, "C": C, "BLOCK_H": BLOCK_H, "CNT_W": 0, "CNT_WP": 1, "CNT_ROWS": -1, "CNT_SRC": -1}
    if counts is not None:
        grid_m, nsrc, cnt = (counts.bucket(M) if counts.rows >= 0 else M), 0, counts.tensor
        cx.update(CNT_W=counts.W, CNT_WP=max(2, next_pow2(counts.W)), CNT_ROWS=counts.rows, CNT_SRC=counts.src)
    _gather_sum_launcher((grid_m, cdiv(H, BLOCK_H)), (src, idx, out, cnt, nsrc, stride_sm, stride_sh, stride_im,
                                                        stride_ic, out.stride(0)), cx, num_warps)
    return out


@dataclass(frozen=True)
class DeviceCounts:
    """A dispatch's [2, W, 3] int32 counts on the device (rows, pairs, flag per peer: [0] sent, [1]
    received), from which a kernel takes a count instead of a host int. gather_sum: ``rows`` / ``src``
    the count that bounds the launch's programs / its source rows, as 3 * part + column (SENT_ROWS,
    RECV_ROWS, RECV_PAIRS; -1: the host's)."""

    tensor: torch.Tensor
    W: int
    rows: int = -1
    src: int = -1

    SENT_ROWS, RECV_ROWS, RECV_PAIRS = 0, 3, 4

    @staticmethod
    def bucket(n: int) -> int:
        """n rounded up to 1/8 of its power of two (>= 16): the grids of templated launches."""
        g = max(16, next_pow2(n) // 8)
        return -(-n // g) * g


# ----------------------------------------------------------------------------- plan, sort and pack
#
# Both sides of a dispatch sort small integer keys stably: the sender its (token, rank) rows by
# destination rank (keys in [0, W], W = a slot whose rank an earlier slot of its token owns), the
# receiver its (row, slot) pairs by local expert (keys in [0, L], L = a slot of another rank). A
# counting sort with no zeros fill and no atomics on the data, one program per block of BLOCK_R
# rows (BLOCK_R * KP slots):
#   receiver, two launches: 1. ep_expand_hist_kernel, the block's count of every key into hist
#      [NB, HC]; 2. ep_sort_scatter_kernel: in its prologue the totals of every key and the sum over
#      the earlier blocks (it reads hist, NB * HC int32 from L2: a few KiB at prefill sizes), so where
#      its slots of key v start; then each slot's rank among the block's earlier slots of the same
#      key; the place of each slot = start[v] + earlier blocks + that rank. Program 0 writes the
#      totals and the starts.
#   sender, one launch: ep_plan_kernel computes each slot's rank and local expert and the dedup,
#      its block's hist row (rows per key, (token, expert) pairs per rank, a bad-id flag) and each
#      slot's in-block rank; the last of its programs to finish (a ticket) sums the hist rows over
#      the blocks into each block's base per key and the [W, 3] counts the ranks exchange, and the
#      pack kernel adds the base to the in-block rank. One launch fewer than a scatter's: the count
#      exchange that waits on it is on the host's critical path.
# The counts are integers: exact, and written once each.
# The order is that of a stable sort by key over the flat slot index (token-major at the sender,
# received-row-major at the receiver), the one moecomm.permute's counting sort gives: bit-identical
# results. When the receiver's prologue share of hist would be large (NB * HC > PREFIX_MAX_ELEMS:
# DeepSeek-V3 prefill sizes), a third launch, ep_sort_scan_kernel, computes the exclusive prefix
# over blocks once and the scatter reads its row (SCANNED).
# The in-block rank: with few keys, a one-hot [BLOCK_R * KP, NUM_BINS] tile and its cumulative sum
# over slots (ONEHOT: up to ONEHOT_MAX_ELEMS int32, larger blocks, fewer of them); with many keys
# the pairwise compare of PAIR_BLOCK slots (as moecomm.permute's hist kernel).
#
# ep_pack_send_kernel: the token's part of each of its rows and (column block 0) their metadata:
# k local expert ids and k weights, so tokens and metadata travel in ONE all_to_all_single.

ONEHOT_MAX_ELEMS = 8192  # the one-hot tile, int32: 64 registers a thread at 4 warps
MAX_SORT_BLOCK = 512  # slots per block (the plan kernel's former 64 tokens x top-8)
PAIR_BLOCK = 128  # slots per block when the keys are too many for the one-hot tile: a [128, 128] compare
# hist entries (NB * HC) each scatter program sums in its prologue, 96 KiB from L2; beyond, a scan
# launch. The crossover: an eager round trip at W 1, T 4096 (L 64: 256 x 65 entries) is host-bound,
# so a launch (~16 us of host) costs more than the prologue's reads; at T 8192 it is GPU-bound, so
# the prologue's ~2x more reads per program (NB^2 * HC in all) cost more than the scan's few us.
PREFIX_MAX_ELEMS = 24576
SCAN_BLOCK_B = 64


@triton.jit
def ep_plan_kernel(
    ids_ptr, e2r_ptr, e2l_ptr, rank_ptr, local_ptr, first_ptr, inrank_ptr, hist_ptr, base_ptr, offs_ptr, info_ptr,
    sem_ptr,
    T, E, NB, stride_it, stride_ik,
    K: tl.constexpr, KP: tl.constexpr, W: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK_T: tl.constexpr,
    CHECK: tl.constexpr, HB: tl.constexpr, ONEHOT: tl.constexpr, CHUNK_B: tl.constexpr,
):
    # The sender's whole plan in one launch of NB programs (the sort's scatter launch folded in):
    # each program its block's rank / local / first [T, k], its hist row (HC = 2W + 2 int32: rows per
    # key [0, W] (W: the slots that own no row), then (token, expert) pairs per rank [0, W), then 1 if
    # an id was outside [0, E)) and each slot's rank among the block's earlier slots of its key
    # (inrank); the LAST program to finish (a ticket on sem, reset to 0 by it: the counter is zero
    # between launches) sums the hist rows over blocks: base [NB, W + 1] where the block's first slot
    # of each key goes (the stable order by key over the flat slot index, as the scatter's: a slot's
    # place is base[its block, key] + inrank, which pack_send adds), offs [W + 1] where each key
    # starts, and info [W, 3] (rows, pairs, bad-id flag) for the count exchange. The ticket is
    # CUTLASS's semaphore pattern: a block barrier, one acq_rel atomic, the hist rows read through
    # L2 (.cg) after it.
    pid = tl.program_id(0)
    toks = pid * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.arange(0, KP)
    m = (toks < T)[:, None] & (cols < K)[None, :]
    ids = tl.load(ids_ptr + toks.to(tl.int64)[:, None] * stride_it + cols[None, :] * stride_ik, mask=m, other=0)
    ids = ids.to(tl.int32)
    idc = tl.minimum(tl.maximum(ids, 0), E - 1)  # a bad id never addresses out of bounds; the flag says it
    rank = tl.load(e2r_ptr + idc, mask=m, other=W)
    local = tl.load(e2l_ptr + idc, mask=m, other=-1)
    # slot j repeats a rank if an earlier slot jj < j has it (no @jit helpers and no tl.zeros here:
    # the 3.6 interpreter leaves helpers patched, which breaks later sm_90 compiles in one process)
    dup = tl.full([BLOCK_T, KP], 0, tl.int32)
    for jj in tl.static_range(K - 1):
        rj = tl.sum(tl.where(cols[None, :] == jj, rank, 0), axis=1)  # column jj
        dup = dup | ((rank == rj[:, None]) & (cols[None, :] > jj)).to(tl.int32)
    first = tl.where((dup > 0) | ~m, W, rank)
    flat = toks.to(tl.int64)[:, None] * K + cols[None, :]
    tl.store(rank_ptr + flat, rank, mask=m)
    tl.store(local_ptr + flat, local, mask=m)
    tl.store(first_ptr + flat, first, mask=m)
    bins = tl.arange(0, NUM_BINS)
    m1 = tl.reshape(m.to(tl.int32), [BLOCK_T * KP]) > 0
    f1 = tl.reshape(first, [BLOCK_T * KP])  # flat slot order: token-major, the sort's stable order
    rk1 = tl.reshape(rank, [BLOCK_T * KP])
    row_ptr = hist_ptr + pid * (2 * W + 2)
    # the block's counts as one-hot sums, HB bins at a time (a [BLOCK_T * KP, HB] tile of at most
    # ONEHOT_MAX_ELEMS): tl.histogram of these reshaped tiles miscounted on the H200 (Triton 3.6;
    # right in the interpreter), see tests/ep/test_dispatch_static.py::test_plan_kernels_match_reference
    for c0 in tl.static_range(0, NUM_BINS, HB):
        hb = c0 + tl.arange(0, HB)
        rows = tl.sum(((f1[:, None] == hb[None, :]) & m1[:, None]).to(tl.int32), axis=0)
        pairs = tl.sum(((rk1[:, None] == hb[None, :]) & m1[:, None]).to(tl.int32), axis=0)
        tl.store(row_ptr + hb, rows, mask=hb <= W)
        tl.store(row_ptr + W + 1 + hb, pairs, mask=hb < W)
    if CHECK:
        bad = tl.max(tl.max((m & ((ids < 0) | (ids >= E))).to(tl.int32), axis=1), axis=0)
    else:
        bad = 0
    tl.store(row_ptr + 2 * W + 1 + bins, bad + bins * 0, mask=bins == 0)
    # each slot's rank among the block's earlier slots of its key (as ep_sort_scatter_kernel's)
    if ONEHOT:
        oh = ((f1[:, None] == bins[None, :]) & m1[:, None]).to(tl.int32)  # [BLOCK_T * KP, NUM_BINS]
        incl = tl.cumsum(oh, axis=0)
        r1 = tl.sum(oh * (incl - 1), axis=1)
    else:
        idx = tl.arange(0, BLOCK_T * KP)
        same = (f1[:, None] == f1[None, :]) & (idx[None, :] < idx[:, None]) & m1[None, :]
        r1 = tl.sum(same.to(tl.int32), axis=1)
    tl.store(inrank_ptr + flat, tl.reshape(r1, [BLOCK_T, KP]), mask=m)
    # the last program: the prefix over blocks
    tl.debug_barrier()  # every thread's hist stores before the ticket's release
    ticket = tl.atomic_add(sem_ptr, 1, sem="acq_rel")
    if ticket == NB - 1:
        HC = 2 * W + 2
        bm = bins <= W
        pm = bins < W
        tot = tl.full([NUM_BINS], 0, tl.int32)
        pairs_tot = tl.full([NUM_BINS], 0, tl.int32)
        badv = tl.full([CHUNK_B], 0, tl.int32)
        for b0 in range(0, NB, CHUNK_B):
            blk = b0 + tl.arange(0, CHUNK_B)
            bk = blk < NB
            tptr = hist_ptr + blk[:, None] * HC + bins[None, :]
            tot += tl.sum(tl.load(tptr, mask=bk[:, None] & bm[None, :], other=0, cache_modifier=".cg"), axis=0)
            pairs_tot += tl.sum(tl.load(tptr + W + 1, mask=bk[:, None] & pm[None, :], other=0, cache_modifier=".cg"),
                                axis=0)
            badv += tl.load(hist_ptr + blk * HC + 2 * W + 1, mask=bk, other=0, cache_modifier=".cg")
        start = tl.cumsum(tot, axis=0) - tot  # [NUM_BINS]; start[W] = the rows sent (S)
        carry = start
        for b0 in range(0, NB, CHUNK_B):
            blk = b0 + tl.arange(0, CHUNK_B)
            mk = (blk < NB)[:, None] & bm[None, :]
            tile = tl.load(hist_ptr + blk[:, None] * HC + bins[None, :], mask=mk, other=0, cache_modifier=".cg")
            tl.store(base_ptr + blk[:, None] * (W + 1) + bins[None, :], tl.cumsum(tile, axis=0) - tile + carry[None, :],
                     mask=mk)
            carry += tl.sum(tile, axis=0)
        tl.store(offs_ptr + bins, start, mask=bm)
        tl.store(info_ptr + bins * 3, tot, mask=pm)
        tl.store(info_ptr + bins * 3 + 1, pairs_tot, mask=pm)
        tl.store(info_ptr + bins * 3 + 2, (tl.sum(badv, axis=0) > 0).to(tl.int32) + bins * 0, mask=pm)
        tl.atomic_xchg(sem_ptr, 0)  # zero for the next launch


@triton.jit
def ep_expand_hist_kernel(
    key_ptr, hist_ptr, cnt_ptr, copy_ptr,
    R, NV, stride_kr, key_col,
    K: tl.constexpr, KP: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK_R: tl.constexpr, HB: tl.constexpr,
    CNT_W: tl.constexpr, CNT_WP: tl.constexpr, COPY: tl.constexpr,
):
    # keys (r, j) at int32 key_col + r * stride_kr + j of key_ptr's memory, read in place (the received
    # rows' metadata, whatever the rows' dtype: no view op on the host); key v in [0, NV) is its
    # bucket, anything else (-1: another rank's slot) bucket NV. CNT_W > 0: R = the rows received
    # by a dispatch's [2, CNT_W, 3] counts at cnt_ptr (the grid: blocks of a bucket of R; a block
    # past R counts zeros); COPY: program 0 also copies those counts to copy_ptr (the result's own,
    # which the launches after this one read: no device copy of its own on the host)
    key_ptr = key_ptr.to(tl.pointer_type(tl.int32))
    pid = tl.program_id(0)
    if CNT_W > 0:
        wi = tl.arange(0, CNT_WP)
        R = tl.sum(tl.load(cnt_ptr + CNT_W * 3 + wi * 3, mask=wi < CNT_W, other=0), axis=0)
        if COPY:
            if pid == 0:
                ci = tl.arange(0, 8 * CNT_WP)
                tl.store(copy_ptr + ci, tl.load(cnt_ptr + ci, mask=ci < 6 * CNT_W), mask=ci < 6 * CNT_W)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, KP)
    m = (rows < R)[:, None] & (cols < K)[None, :]
    v = tl.load(key_ptr + key_col + rows.to(tl.int64)[:, None] * stride_kr + cols[None, :], mask=m, other=-1)
    bucket = tl.where((v >= 0) & (v < NV), v, NV)
    m1 = tl.reshape(m.to(tl.int32), [BLOCK_R * KP]) > 0
    b1 = tl.reshape(bucket, [BLOCK_R * KP])
    for c0 in tl.static_range(0, NUM_BINS, HB):  # one-hot sums, as ep_plan_kernel (not tl.histogram)
        hb = c0 + tl.arange(0, HB)
        h = tl.sum(((b1[:, None] == hb[None, :]) & m1[:, None]).to(tl.int32), axis=0)
        tl.store(hist_ptr + pid * (NV + 1) + hb, h, mask=hb <= NV)


@triton.jit
def ep_sort_scan_kernel(hist_ptr, base_ptr, NB, HC, BLOCK_B: tl.constexpr, BLOCK_C: tl.constexpr):
    # base [NB, HC]: exclusive prefix of hist over blocks; base[NB] (one row more): the totals
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = cols < HC
    carry = tl.full([BLOCK_C], 0, tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        blk = b0 + tl.arange(0, BLOCK_B)
        mk = (blk < NB)[:, None] & cm[None, :]
        ptrs = blk[:, None] * HC + cols[None, :]
        tile = tl.load(hist_ptr + ptrs, mask=mk, other=0)
        tl.store(base_ptr + ptrs, tl.cumsum(tile, axis=0) - tile + carry[None, :], mask=mk)
        carry += tl.sum(tile, axis=0)
    tl.store(base_ptr + NB * HC + cols, carry, mask=cm)


@triton.jit
def ep_sort_scatter_kernel(
    key_ptr, hist_ptr, base_ptr, dst_ptr, src_ptr, row_w_ptr, offs_ptr, cnt_ptr, info_ptr,
    R, NV, NB, HC, num_out, stride_kr, key_col, stride_cnt,
    K: tl.constexpr, KP: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK_R: tl.constexpr, CHUNK_B: tl.constexpr,
    ONEHOT: tl.constexpr, SCANNED: tl.constexpr, CNT_W: tl.constexpr, CNT_WP: tl.constexpr,
):
    # The receiver's (the sender's sort is in ep_plan_kernel). Outputs: dst [R, K] the place of each
    # slot (-1 for bucket NV); at each place p < num_out, src[p] = the slot's row and row_w[p] = the
    # fp32 bits beside its key (at key + K); program 0: offs [NV + 1] where each bucket starts,
    # cnt[v * stride_cnt] its count (v < NV). Keys as in ep_expand_hist_kernel (int32 units of
    # key_ptr's memory). CNT_W > 0: info_ptr holds a dispatch's [2, CNT_W, 3] counts, R = the rows
    # and num_out = the pairs received (NB: blocks of a bucket of R, as ep_expand_hist_kernel's).
    key_ptr = key_ptr.to(tl.pointer_type(tl.int32))
    if CNT_W > 0:
        wi = tl.arange(0, CNT_WP)
        R = tl.sum(tl.load(info_ptr + CNT_W * 3 + wi * 3, mask=wi < CNT_W, other=0), axis=0)
        num_out = tl.sum(tl.load(info_ptr + CNT_W * 3 + wi * 3 + 1, mask=wi < CNT_W, other=0), axis=0)
    pid = tl.program_id(0)
    bins = tl.arange(0, NUM_BINS)
    bm = bins <= NV
    if SCANNED:
        tot = tl.load(base_ptr + NB * HC + bins, mask=bm, other=0)
        pre = tl.load(base_ptr + pid * HC + bins, mask=bm & (pid < NB), other=0)
    else:
        tot = tl.full([NUM_BINS], 0, tl.int32)
        pre = tl.full([NUM_BINS], 0, tl.int32)
        for c0 in range(0, NB, CHUNK_B):
            blk = c0 + tl.arange(0, CHUNK_B)
            tile = tl.load(hist_ptr + blk[:, None] * HC + bins[None, :], mask=(blk < NB)[:, None] & bm[None, :],
                           other=0)
            tot += tl.sum(tile, axis=0)
            pre += tl.sum(tl.where((blk < pid)[:, None], tile, 0), axis=0)
    start = tl.cumsum(tot, axis=0) - tot  # [NUM_BINS]; start[NV] = the slots of buckets < NV
    base = start + pre
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, KP)
    m = (rows < R)[:, None] & (cols < K)[None, :]
    kptr = key_ptr + key_col + rows.to(tl.int64)[:, None] * stride_kr + cols[None, :]
    v = tl.load(kptr, mask=m, other=-1)
    bucket = tl.where((v >= 0) & (v < NV), v, NV)  # [BLOCK_R, KP]
    b1 = tl.reshape(bucket, [BLOCK_R * KP])  # flat slot order: row-major, the sort's stable order
    m1 = tl.reshape(m.to(tl.int32), [BLOCK_R * KP]) > 0
    if ONEHOT:
        oh = ((b1[:, None] == bins[None, :]) & m1[:, None]).to(tl.int32)  # [BLOCK_R * KP, NUM_BINS]
        incl = tl.cumsum(oh, axis=0)  # slots of each key up to and including this one
        d1 = tl.sum(oh * (base[None, :] + incl - 1), axis=1)
    else:
        idx = tl.arange(0, BLOCK_R * KP)
        same = (b1[:, None] == b1[None, :]) & (idx[None, :] < idx[:, None]) & m1[None, :]
        d1 = tl.gather(base, b1, 0) + tl.sum(same.to(tl.int32), axis=1)
    dst = tl.reshape(d1, [BLOCK_R, KP])
    tl.store(dst_ptr + rows.to(tl.int64)[:, None] * K + cols[None, :], tl.where(bucket < NV, dst, -1), mask=m)
    ok = m & (dst >= 0) & (dst < num_out)  # throughput: the N valid places only; static: all R * K
    tl.store(src_ptr + dst, rows[:, None] + cols[None, :] * 0, mask=ok)
    wv = tl.load(kptr + K, mask=m, other=0).to(tl.float32, bitcast=True)  # a bit copy
    tl.store(row_w_ptr + dst, wv, mask=ok)
    if pid == 0:
        tl.store(offs_ptr + bins, start, mask=bm)
        tl.store(cnt_ptr + bins * stride_cnt, tot, mask=bins < NV)


@triton.jit
def ep_pack_send_kernel(
    x_ptr, w_ptr, rank_ptr, local_ptr, first_ptr, sort_row_ptr, offs_ptr, block_base_ptr, out_ptr, home_ptr,
    flag_ptr, num_rows, capacity, stride_xt, stride_xh, stride_wt, stride_wk, stride_ot, stride_mt, meta_col,
    H: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, W: tl.constexpr, BLOCK_H: tl.constexpr,
    STATIC: tl.constexpr, DEV_ROWS: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # DEV_ROWS (throughput mode): num_rows = offs[W], the rows the plan sends (not a host int).
    # BLOCK_T > 0: sort_row holds ep_plan_kernel's in-block ranks, and a slot's place adds
    # block_base[t // BLOCK_T, its key] (the plan's blocks of BLOCK_T tokens); 0: sort_row is the place
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    if DEV_ROWS:
        num_rows = tl.load(offs_ptr + W)
    cols = tl.arange(0, KP)
    cm = cols < K
    first = tl.load(first_ptr + t * K + cols, mask=cm, other=W)
    srow = tl.load(sort_row_ptr + t * K + cols, mask=cm, other=0)
    keep = cm & (first < W)
    if BLOCK_T > 0:
        srow += tl.load(block_base_ptr + (t // BLOCK_T) * (W + 1) + first, mask=keep, other=0)
    if STATIC:  # rank w's rows live at [w * capacity, (w + 1) * capacity); the rest would overflow
        base = tl.load(offs_ptr + tl.minimum(first, W - 1), mask=keep, other=0)
        inr = srow - base
        ok = keep & (inr < capacity)
        row = tl.where(ok, first * capacity + inr, -1)
    else:
        ok = keep & (srow < num_rows)
        row = tl.where(ok, srow, -1)
    offs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    # raw bits: a pure copy; where BLOCK_H divides H the column mask is dropped (whole 16-byte vectors)
    if H % BLOCK_H == 0:
        v = tl.load(x_ptr + t * stride_xt + offs.to(tl.int64) * stride_xh)
    else:
        v = tl.load(x_ptr + t * stride_xt + offs.to(tl.int64) * stride_xh, mask=offs < H)
    for jj in tl.static_range(K):
        r = tl.sum(tl.where(cols == jj, row, 0), axis=0).to(tl.int64)
        if H % BLOCK_H == 0:
            if r >= 0:  # the slots that own no row (every one but the first per rank) store nothing
                tl.store(out_ptr + r * stride_ot + offs, v)
        else:
            tl.store(out_ptr + r * stride_ot + offs, v, mask=(offs < H) & (r >= 0))
    if hb == 0:
        tl.store(home_ptr + t * K + cols, row, mask=cm)
        if STATIC:
            lost = tl.max((keep & ~ok).to(tl.int32), axis=0)
            tl.atomic_max(flag_ptr + cols * 0, tl.full([KP], 1, tl.int32), mask=(cols == 0) & (lost > 0))
        rank = tl.load(rank_ptr + t * K + cols, mask=cm, other=-1)
        local = tl.load(local_ptr + t * K + cols, mask=cm, other=-1)
        wbits = tl.load(w_ptr + t * stride_wt + cols * stride_wk, mask=cm, other=0.0).to(tl.float32)
        wbits = wbits.to(tl.int32, bitcast=True)
        for jj in tl.static_range(K):
            r = tl.sum(tl.where(cols == jj, row, 0), axis=0).to(tl.int64)
            w_of_row = tl.sum(tl.where(cols == jj, first, 0), axis=0)
            mine = rank == w_of_row
            base_ptr = out_ptr.to(tl.pointer_type(tl.int32)) + r * stride_mt + meta_col  # the row's int32 words
            tl.store(base_ptr + cols, tl.where(mine, local, -1), mask=cm & (r >= 0))
            tl.store(base_ptr + K + cols, tl.where(mine, wbits, 0), mask=cm & (r >= 0))


_plan_launcher = Launcher(ep_plan_kernel)
_expand_hist_launcher = Launcher(ep_expand_hist_kernel)
_sort_scan_launcher = Launcher(ep_sort_scan_kernel)
_sort_scatter_launcher = Launcher(ep_sort_scatter_kernel)
_pack_send_launcher = Launcher(ep_pack_send_kernel)


@dataclass(frozen=True)
class SortShape:
    """How a counting sort of R rows x k keys over NV + 1 buckets is cut into blocks (host side).

    Attributes:
        kp: k rounded up to a power of two (>= 2): a block's columns.
        num_bins: NV + 1 rounded up to a power of two.
        block_r: rows per block (block_r * kp slots).
        onehot: the in-block rank through the one-hot tile (else the pairwise compare).
        num_blocks: NB, blocks (>= 0); the scatter runs max(NB, 1) programs (program 0 writes the totals).
        hist_cols: HC, int32 per block row of hist.
        scanned: a scan launch computes the prefix over blocks (else the scatter's prologue does).
        hist_elems, base_elems: int32 the scratch of hist and of the scan's output take (0: none).
        chunk_b: blocks per trip of the prologue's loop.
    """

    kp: int
    num_bins: int
    block_r: int
    onehot: bool
    num_blocks: int
    hist_cols: int
    scanned: bool
    hist_elems: int
    base_elems: int
    chunk_b: int


@functools.lru_cache(maxsize=512)
def sort_shape(num_rows: int, top_k: int, num_values: int, hist_cols: int) -> SortShape:
    """SortShape of a sort of ``num_rows`` x ``top_k`` keys with values [0, num_values) (+ the dropped
    bucket num_values), hist rows of ``hist_cols`` int32."""
    kp = max(2, next_pow2(top_k))
    num_bins = max(2, next_pow2(num_values + 1))
    onehot = num_bins * PAIR_BLOCK <= ONEHOT_MAX_ELEMS
    slots = min(MAX_SORT_BLOCK, ONEHOT_MAX_ELEMS // num_bins) if onehot else PAIR_BLOCK
    block_r = max(1, slots // kp)
    nb = cdiv(num_rows, block_r)
    scanned = nb * hist_cols > PREFIX_MAX_ELEMS
    chunk_b = max(1, min(64, 4096 // num_bins))
    return SortShape(kp, num_bins, block_r, onehot, nb, hist_cols, scanned, nb * hist_cols,
                     (nb + 1) * hist_cols if scanned else 0, chunk_b)


def plan_sort_shape(num_tokens: int, top_k: int, ep_size: int) -> SortShape:
    """The sender's sort: keys = destination rank [0, W] per slot, hist rows of 2W + 2 (rows, pairs, flag)."""
    return sort_shape(num_tokens, top_k, ep_size, 2 * ep_size + 2)


def expand_sort_shape(num_rows: int, top_k: int, num_local_experts: int) -> SortShape:
    """The receiver's sort: keys = local expert [0, L] per (received row, slot)."""
    return sort_shape(num_rows, top_k, num_local_experts, num_local_experts + 1)


def _hist_chunk(sh: SortShape) -> int:
    """Bins a histogram kernel counts at a time: its one-hot tile [block_r * kp, HB] stays within
    ONEHOT_MAX_ELEMS int32 (both powers of two)."""
    return max(1, min(sh.num_bins, ONEHOT_MAX_ELEMS // (sh.block_r * sh.kp)))


def _scan(sh: SortShape, hist: torch.Tensor, base: torch.Tensor) -> None:
    block_c = max(16, min(64, next_pow2(sh.hist_cols)))
    _sort_scan_launcher((cdiv(sh.hist_cols, block_c),), (hist, base, sh.num_blocks, sh.hist_cols),
                        {"BLOCK_B": SCAN_BLOCK_B, "BLOCK_C": block_c}, 4)


def plan_send_triton(topk_ids: torch.Tensor, e2r: torch.Tensor, e2l: torch.Tensor, ep_size: int, rank: torch.Tensor,
                     local: torch.Tensor, first: torch.Tensor, inrank: torch.Tensor, rank_offsets: torch.Tensor,
                     info: torch.Tensor, hist: torch.Tensor, block_base: torch.Tensor, sem: torch.Tensor,
                     check_ids: bool) -> None:
    """The sender's plan in one launch (ep_plan_kernel): rank/local/first/inrank [T, k], rank_offsets
    [W + 1], info [W, 3] and block_base (all int32, every entry written: no zeros fill; a slot's place
    in the rows grouped by rank is block_base[t // plan_sort_shape's block_r, first] + inrank);
    hist: int32 scratch of plan_hist_elems; sem: one int32 that is 0 (the kernel leaves it 0)."""
    T, k = topk_ids.shape
    W = ep_size
    sh = plan_sort_shape(T, k, W)
    nb = max(sh.num_blocks, 1)  # T 0: one program writes the zero counts
    _plan_launcher((nb,), (topk_ids, e2r, e2l, rank, local, first, inrank, hist, block_base, rank_offsets, info, sem,
                           T, e2r.shape[0], nb, topk_ids.stride(0), topk_ids.stride(1)),
                   {"K": k, "KP": sh.kp, "W": W, "NUM_BINS": sh.num_bins, "BLOCK_T": sh.block_r,
                    "CHECK": bool(check_ids), "HB": _hist_chunk(sh), "ONEHOT": sh.onehot, "CHUNK_B": sh.chunk_b}, 4)


def plan_blocks(num_tokens: int, top_k: int, ep_size: int) -> tuple[int, int]:
    """(programs, tokens a program) of plan_send_triton: its hist has programs * (2W + 2) int32, its
    block_base programs * (W + 1)."""
    sh = plan_sort_shape(num_tokens, top_k, ep_size)
    return max(sh.num_blocks, 1), sh.block_r


def expand_received_triton(recv: torch.Tensor, meta_col: int, top_k: int, num_local_experts: int, hist: torch.Tensor,
                           base: torch.Tensor, gather_idx: torch.Tensor, expert_offsets: torch.Tensor,
                           tokens_per_expert: torch.Tensor, row_weights: torch.Tensor, slot_pos: torch.Tensor,
                           counts: DeviceCounts | None = None, counts_from: torch.Tensor | None = None) -> None:
    """The receiver's expansion in two launches (three when SCANNED), reading the received rows'
    metadata in place: recv [R, width] (any row dtype, rows of whole int32 words), ids at int32
    column meta_col, the weights' bits after them. Writes slot_pos [R, k] (-1: a slot of another
    rank), expert_offsets [L + 1], tokens_per_expert [L], and gather_idx / row_weights at the places
    < their size (N in the throughput mode, R * k in the static one). hist, base: scratch of
    expand_sort_shape's sizes (of DeviceCounts.bucket(R) with ``counts``). ``counts``: R and N
    from the dispatch's counts on the device (the launches then depend on R's bucket only);
    ``counts_from`` (with ``counts``, R > 0): where those counts are now, copied into counts.tensor
    by the first launch, which reads them there."""
    R = recv.shape[0]
    k, L = top_k, num_local_experts
    stride = recv.stride(0) * recv.element_size() // 4  # int32 words per row
    meta = recv
    rows, num_out, cnt, cw = R, gather_idx.shape[0], hist, {"CNT_W": 0, "CNT_WP": 1}
    if counts is not None:
        rows, num_out, cnt = counts.bucket(R) if R > 0 else 0, 0, counts.tensor
        cw = {"CNT_W": counts.W, "CNT_WP": max(2, next_pow2(counts.W))}
    sh = expand_sort_shape(rows, k, L)
    if R > 0:
        copy = counts is not None and counts_from is not None
        _expand_hist_launcher((sh.num_blocks,), (meta, hist, counts_from if copy else cnt, cnt,
                                                 0 if counts is not None else R, L, stride, meta_col),
                              {"K": k, "KP": sh.kp, "NUM_BINS": sh.num_bins, "BLOCK_R": sh.block_r,
                               "HB": _hist_chunk(sh), "COPY": copy, **cw}, 4)
    elif counts_from is not None:
        raise ValueError("expand_received_triton: counts_from needs rows (R > 0) to copy in the first launch")
    if sh.scanned:
        _scan(sh, hist, base)
    info = cnt if counts is not None else expert_offsets
    _sort_scatter_launcher((max(sh.num_blocks, 1),), (
        meta, hist, base, slot_pos, gather_idx, row_weights, expert_offsets, tokens_per_expert, info,
        0 if counts is not None else R, L, sh.num_blocks, sh.hist_cols, num_out, stride, meta_col, 1,
    ), {"K": k, "KP": sh.kp, "NUM_BINS": sh.num_bins, "BLOCK_R": sh.block_r, "CHUNK_B": sh.chunk_b,
        "ONEHOT": sh.onehot, "SCANNED": sh.scanned, **cw}, 4)


def pack_send_triton(x: torch.Tensor, topk_weights: torch.Tensor, rank: torch.Tensor, local: torch.Tensor,
                     first: torch.Tensor, sort_row: torch.Tensor, rank_offsets: torch.Tensor, out: torch.Tensor,
                     home: torch.Tensor, overflow: torch.Tensor | None, *, meta_col: int, capacity: int | None,
                     device_rows: bool = False, block_base: torch.Tensor | None = None, block_tokens: int = 0) -> None:
    """ep_pack_send_kernel: see moecomm.ep.nccl.reference.pack_send_reference for what it writes.
    ``device_rows`` (throughput mode): the bound on the rows written read from rank_offsets[W] on
    the device (the launch then depends on no count). ``block_base``, ``block_tokens``: sort_row
    holds plan_send_triton's in-block ranks (its places are block_base + them); None: the places."""
    T, H = x.shape
    if T == 0:
        return
    k = rank.shape[1]
    W = rank_offsets.shape[0] - 1
    # 2048 columns a program: 87% of a copy's bandwidth at W 1 on the H200, where 1024 gave 78% and
    # 8 warps or 4096 columns less (benchmarks/probe_pack.py, T 8192 H 4096, graph replay)
    BLOCK_H = PACK_BLOCK_H or min(PACK_BLOCK_H_DEFAULT, max(16, next_pow2(H)))
    flag = overflow if overflow is not None else home
    _pack_send_launcher((T, cdiv(H, BLOCK_H)), (
        x, topk_weights, rank, local, first, sort_row, rank_offsets, block_base if block_base is not None else home,
        out, home, flag,
        0 if device_rows else out.shape[0], capacity or 0, x.stride(0), x.stride(1), topk_weights.stride(0),
        topk_weights.stride(1), out.stride(0), out.stride(0) * out.element_size() // 4, meta_col,
    ), {"H": H, "K": k, "KP": max(2, next_pow2(k)), "W": W, "BLOCK_H": BLOCK_H, "STATIC": capacity is not None,
        "DEV_ROWS": bool(device_rows) and capacity is None, "BLOCK_T": block_tokens if block_base is not None else 0},
       PACK_NUM_WARPS or NUM_WARPS_DEFAULT)
