"""The two data-movement ops of NCCL dispatch/combine: pack the send buffer, sum rows back.

# T = num_tokens (this rank), H = hidden, W = ep_size, S = rows sent, C = index columns

pack_rows and gather_sum are custom ops (moecomm::ep_pack_rows, moecomm::ep_gather_sum) with fakes and
autograd formulas (each is the other's gradient, up to the scatter-add of repeated indices); each runs
the Triton kernel of moecomm.ep.nccl._triton on a GPU and the reference of moecomm.ep.nccl.reference
elsewhere. pack_rows / gather_sum check their arguments; *_unchecked are the dispatcher's.
"""

from __future__ import annotations

import torch

from ...errors import check_positive_int, check_tensor
from ...jit.backend import Impl, choose
from ...jit.ops import define_op
from .reference import gather_sum_reference, pack_rows_reference

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ID_DTYPES = (torch.int32, torch.int64)

# ----------------------------------------------------------------------------- custom ops


_kernels = None  # moecomm.ep.nccl._triton, imported on first use (it imports triton)


def _triton_kernels():
    global _kernels
    if _kernels is None:
        from . import _triton as _dispatch_triton

        _kernels = _dispatch_triton
    return _kernels


def _pack_rows_impl(x: torch.Tensor, pos: torch.Tensor, num_rows: int) -> torch.Tensor:
    if choose(x, "ep_pack_rows") is Impl.TRITON:
        return _triton_kernels().pack_rows_triton(x, pos, num_rows)
    return pack_rows_reference(x, pos, num_rows)


def _pack_rows_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[1])


def _pack_rows_backward(ctx, grad_send):
    # send[pos[t, w]] = x[t] for every pos >= 0, so d x[t] = sum over w of d send[pos[t, w]]: a gather_sum
    (pos,) = ctx.saved_tensors
    return torch.ops.moecomm.ep_gather_sum(grad_send.contiguous(), pos), None, None


pack_rows_unchecked = define_op(
    "ep_pack_rows", _pack_rows_impl, fake=lambda x, pos, num_rows: x.new_empty((num_rows, x.shape[1])),
    setup_context=_pack_rows_setup, backward=_pack_rows_backward)


def _gather_sum_impl(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if choose(src, "ep_gather_sum") is Impl.TRITON:
        return _triton_kernels().gather_sum_triton(src, idx)
    return gather_sum_reference(src, idx)


def _gather_sum_setup(ctx, inputs, output) -> None:
    src, idx = inputs
    ctx.save_for_backward(idx)
    ctx.num_src, ctx.src_dtype = src.shape[0], src.dtype


def _gather_sum_backward(ctx, grad_out):
    # out[m] = sum_c src[idx[m, c]] over idx >= 0: d src[n] sums the d out[m] of every (m, c) naming n.
    # The -1 slots go to a spare row N, dropped at the end (no data-dependent shapes, no host sync).
    (idx,) = ctx.saved_tensors
    num_rows, num_cols = idx.shape
    hidden = grad_out.shape[1]
    acc = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    flat = idx.reshape(-1).long()
    target = torch.where((flat >= 0) & (flat < ctx.num_src), flat, torch.full_like(flat, ctx.num_src))
    rows = grad_out.to(acc)[:, None, :].expand(num_rows, num_cols, hidden).reshape(num_rows * num_cols, hidden)
    g = torch.zeros((ctx.num_src + 1, hidden), dtype=acc, device=grad_out.device).index_add_(0, target, rows)
    return g[: ctx.num_src].to(ctx.src_dtype), None


gather_sum_unchecked = define_op(
    "ep_gather_sum", _gather_sum_impl, fake=lambda src, idx: src.new_empty((idx.shape[0], src.shape[1])),
    setup_context=_gather_sum_setup, backward=_gather_sum_backward)


# Internal callers (dispatch, combine) pass arguments they built or validated themselves: they call
# pack_rows_unchecked / gather_sum_unchecked (the ops, without re-checking). The public functions
# below check everything.


def pack_rows(x: torch.Tensor, pos: torch.Tensor, num_rows: int) -> torch.Tensor:
    """The send buffer: row pos[t, w] is token x[t] (Triton kernel on GPU, reference on CPU).

    Args:
        x: [T, H] fp32/fp16/bf16 tokens (any strides).
        pos: [T, W] int32/int64 on x's device, row of token t in the send buffer for rank w, -1 =
            not sent there.
        num_rows: S, rows of the send buffer.

    Returns:
        [S, H] of x.dtype.
    """
    x = check_tensor("pack_rows", "x", x, ndim=2, dtype=_FLOAT_DTYPES)
    pos = check_tensor("pack_rows", "pos", pos, shape=[x.shape[0], None], dtype=_ID_DTYPES, device=x.device)
    check_positive_int("pack_rows", "num_rows", num_rows, minimum=0)
    return pack_rows_unchecked(x, pos, num_rows)


def gather_sum(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row m = sum of src[idx[m, c]] over the idx >= 0 of row m; fp32 accumulation, written once.

    Args:
        src: [N, H] fp32/fp16/bf16 rows (any strides).
        idx: [M, C] int32/int64 row indices into src, on src's device, -1 = none.

    Returns:
        [M, H] of src.dtype (a row whose indices are all -1 is zeros).
    """
    src = check_tensor("gather_sum", "src", src, ndim=2, dtype=_FLOAT_DTYPES)
    idx = check_tensor("gather_sum", "idx", idx, ndim=2, dtype=_ID_DTYPES, device=src.device)
    return gather_sum_unchecked(src, idx)
