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
