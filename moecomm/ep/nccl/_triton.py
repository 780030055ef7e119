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

import torch
import triton
import triton.language as tl

from ...jit.launch import Launcher, cdiv, next_pow2

BLOCK_H_DEFAULT = 1024
NUM_WARPS_DEFAULT = 4


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
    src_ptr, idx_ptr, out_ptr,
    num_src_rows,
    stride_sm, stride_sh, stride_im, stride_ic, stride_om,
    H: tl.constexpr, C: tl.constexpr, BLOCK_H: tl.constexpr,
):
    m = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    in_row = offs < H
    # tl.full, not tl.zeros: tl.zeros is a @jit helper, and the triton 3.6 interpreter patches
    # triton.language.core for helpers without restoring it, which breaks every later sm_90
    # compile in the same process (CI runs interpreted tests before the compile checks)
    acc = tl.full([BLOCK_H], 0.0, tl.float32)
    for c in tl.static_range(C):  # unrolled: C row loads in flight at once (C = k or W, small)
        i = tl.load(idx_ptr + m * stride_im + c * stride_ic).to(tl.int64)
        ok = (i >= 0) & (i < num_src_rows)
        src_ptrs = src_ptr + i * stride_sm + offs.to(tl.int64) * stride_sh
        # upcast before adding: fp32 accumulation (and the interpreter adds bf16 bits wrongly)
        if H % BLOCK_H == 0:
            v = tl.load(src_ptrs, mask=ok, other=0.0)
        else:
            v = tl.load(src_ptrs, mask=in_row & ok, other=0.0)
        acc += v.to(tl.float32)
    if H % BLOCK_H == 0:
        tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty))
    else:
        tl.store(out_ptr + m * stride_om + offs, acc.to(out_ptr.dtype.element_ty), mask=in_row)


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
                      block_h: int | None = None, num_warps: int = NUM_WARPS_DEFAULT) -> torch.Tensor:
    """[M, H] with row m = sum of src[idx[m, c]] over idx >= 0 (fp32 accumulate, src.dtype out).

    ``out``: a caller-owned [M, H] buffer with unit inner stride (tests pass a NaN-filled one).
    ``block_h``, ``num_warps``: launch configuration (the benchmark's --sweep); default: BLOCK_H = min(1024, next power of 2 of H), 4 warps.
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
    _gather_sum_launcher((M, cdiv(H, BLOCK_H)), (src, idx, out, src.shape[0], stride_sm, stride_sh, stride_im, stride_ic,
                                                   out.stride(0)),
                         {"H": H, "C": C, "BLOCK_H": BLOCK_H}, num_warps)
    return out


# ----------------------------------------------------------------------------- plan and pack
#
# The send side of a dispatch in two kernels around one counting sort (moecomm.permute's):
#   ep_plan_kernel: per token, each slot's rank and local expert, the dedup (a token goes once to
#     each rank that holds any of its experts) and, with atomics, the [W, 3] counts the ranks
#     exchange (rows, pairs, bad-id flag); the counts are integers, so their sums are exact and
#     independent of the atomics' order;
#   the permute's counting sort of the dedup'd ranks: each (token, rank) row's place, grouped by
#     rank, token order kept;
#   ep_pack_send_kernel: the token's part of each of its rows and (column block 0) their metadata:
#     k local expert ids and k weights, so tokens and metadata travel in ONE all_to_all_single.


@triton.jit
def ep_plan_kernel(
    ids_ptr, e2r_ptr, e2l_ptr, rank_ptr, local_ptr, first_ptr, info_ptr,
    T, E, stride_it, stride_ik,
    K: tl.constexpr, KP: tl.constexpr, W: tl.constexpr, NUM_BINS: tl.constexpr, BLOCK_T: tl.constexpr,
    CHECK: tl.constexpr,
):
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
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
    rows = tl.histogram(tl.reshape(first, [BLOCK_T * KP]), NUM_BINS)
    pairs = tl.histogram(tl.reshape(tl.where(m, rank, W), [BLOCK_T * KP]), NUM_BINS)
    tl.atomic_add(info_ptr + bins * 3, rows, mask=bins < W)
    tl.atomic_add(info_ptr + bins * 3 + 1, pairs, mask=bins < W)
    if CHECK:
        bad = tl.max(tl.max((m & ((ids < 0) | (ids >= E))).to(tl.int32), axis=1), axis=0)
        tl.atomic_max(info_ptr + bins * 3 + 2, tl.full([NUM_BINS], 1, tl.int32), mask=(bins < W) & (bad > 0))


@triton.jit
def ep_pack_send_kernel(
    x_ptr, w_ptr, rank_ptr, local_ptr, first_ptr, sort_row_ptr, offs_ptr, out_ptr, meta_ptr, home_ptr, flag_ptr,
    num_rows, capacity, stride_xt, stride_xh, stride_wt, stride_wk, stride_ot, stride_mt, meta_col,
    H: tl.constexpr, K: tl.constexpr, KP: tl.constexpr, W: tl.constexpr, BLOCK_H: tl.constexpr,
    STATIC: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    cols = tl.arange(0, KP)
    cm = cols < K
    first = tl.load(first_ptr + t * K + cols, mask=cm, other=W)
    srow = tl.load(sort_row_ptr + t * K + cols, mask=cm, other=0)
    keep = cm & (first < W)
    if STATIC:  # rank w's rows live at [w * capacity, (w + 1) * capacity); the rest would overflow
        base = tl.load(offs_ptr + tl.minimum(first, W - 1), mask=keep, other=0)
        inr = srow - base
        ok = keep & (inr < capacity)
        row = tl.where(ok, first * capacity + inr, -1)
    else:
        ok = keep & (srow < num_rows)
        row = tl.where(ok, srow, -1)
    offs = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    v = tl.load(x_ptr + t * stride_xt + offs.to(tl.int64) * stride_xh, mask=offs < H)  # raw bits: a pure copy
    for jj in tl.static_range(K):
        r = tl.sum(tl.where(cols == jj, row, 0), axis=0).to(tl.int64)
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
            base_ptr = meta_ptr + r * stride_mt + meta_col
            tl.store(base_ptr + cols, tl.where(mine, local, -1), mask=cm & (r >= 0))
            tl.store(base_ptr + K + cols, tl.where(mine, wbits, 0), mask=cm & (r >= 0))


_plan_launcher = Launcher(ep_plan_kernel)
_pack_send_launcher = Launcher(ep_pack_send_kernel)
PLAN_BLOCK_T = 64


def plan_send_triton(topk_ids: torch.Tensor, e2r: torch.Tensor, e2l: torch.Tensor, ep_size: int, rank: torch.Tensor,
                     local: torch.Tensor, first: torch.Tensor, info: torch.Tensor, check_ids: bool) -> None:
    """ep_plan_kernel into rank/local/first [T, k] int32 and info [W, 3] int32 (zeroed by the caller)."""
    T, k = topk_ids.shape
    if T == 0:
        return
    kp = max(2, next_pow2(k))
    _plan_launcher((cdiv(T, PLAN_BLOCK_T),), (topk_ids, e2r, e2l, rank, local, first, info, T, e2r.shape[0],
                                              topk_ids.stride(0), topk_ids.stride(1)),
                   {"K": k, "KP": kp, "W": ep_size, "NUM_BINS": max(2, next_pow2(ep_size + 1)),
                    "BLOCK_T": PLAN_BLOCK_T, "CHECK": bool(check_ids)}, 4)


def pack_send_triton(x: torch.Tensor, topk_weights: torch.Tensor, rank: torch.Tensor, local: torch.Tensor,
                     first: torch.Tensor, sort_row: torch.Tensor, rank_offsets: torch.Tensor, out: torch.Tensor,
                     home: torch.Tensor, overflow: torch.Tensor | None, *, meta_col: int, capacity: int | None) -> None:
    """ep_pack_send_kernel: see moecomm.ep.nccl.reference.pack_send_reference for what it writes."""
    T, H = x.shape
    if T == 0:
        return
    k = rank.shape[1]
    W = rank_offsets.shape[0] - 1
    meta = out.view(torch.int32)
    BLOCK_H = _block_h(H)
    flag = overflow if overflow is not None else home
    _pack_send_launcher((T, cdiv(H, BLOCK_H)), (
        x, topk_weights, rank, local, first, sort_row, rank_offsets, out, meta, home, flag,
        out.shape[0], capacity or 0, x.stride(0), x.stride(1), topk_weights.stride(0), topk_weights.stride(1),
        out.stride(0), meta.stride(0), meta_col,
    ), {"H": H, "K": k, "KP": max(2, next_pow2(k)), "W": W, "BLOCK_H": BLOCK_H, "STATIC": capacity is not None},
        NUM_WARPS_DEFAULT)
