"""The two data-movement ops of NCCL dispatch/combine: pack the send buffer, sum rows back.

# T = num_tokens (this rank), H = hidden, W = ep_size, S = rows sent, C = index columns

pack_rows and gather_sum are custom ops (moecomm::ep_pack_rows, moecomm::ep_gather_sum) with fakes;
each runs the Triton kernel of moecomm.ep.nccl._triton on a GPU and the reference of
moecomm.ep.nccl.reference elsewhere.
"""

from __future__ import annotations

import torch

from ...errors import check_positive_int, check_tensor
from ...jit.backend import call_op, use_triton
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
    if use_triton(x, "ep_pack_rows"):
        return _triton_kernels().pack_rows_triton(x, pos, num_rows)
    return pack_rows_reference(x, pos, num_rows)


@torch.library.custom_op("moecomm::ep_pack_rows", mutates_args=())
def _pack_rows_op(x: torch.Tensor, pos: torch.Tensor, num_rows: int) -> torch.Tensor:
    return _pack_rows_impl(x, pos, num_rows)


@_pack_rows_op.register_fake
def _(x: torch.Tensor, pos: torch.Tensor, num_rows: int) -> torch.Tensor:
    return x.new_empty((num_rows, x.shape[1]))


def _gather_sum_impl(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if use_triton(src, "ep_gather_sum"):
        return _triton_kernels().gather_sum_triton(src, idx)
    return gather_sum_reference(src, idx)


@torch.library.custom_op("moecomm::ep_gather_sum", mutates_args=())
def _gather_sum_op(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return _gather_sum_impl(src, idx)


@_gather_sum_op.register_fake
def _(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return src.new_empty((idx.shape[0], src.shape[1]))


# Internal callers (dispatch, combine) pass arguments they built or validated themselves: they run
# the op without re-checking. The public functions below check everything, with a fast path for
# the common case (torch tensors, right dtypes and shapes, one device): a few attribute reads
# instead of check_tensor's general machinery (~3 us of host time per call on the CI box), which
# runs only when the fast test fails, to convert DLPack arrays or to raise the precise error.


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
    if not (isinstance(x, torch.Tensor) and isinstance(pos, torch.Tensor) and x.dtype in _FLOAT_DTYPES
            and pos.dtype in _ID_DTYPES and x.dim() == 2 and pos.dim() == 2 and pos.shape[0] == x.shape[0]
            and pos.device == x.device and type(num_rows) is int and num_rows >= 0):
        x = check_tensor("pack_rows", "x", x, ndim=2, dtype=_FLOAT_DTYPES)
        pos = check_tensor("pack_rows", "pos", pos, shape=[x.shape[0], None], dtype=_ID_DTYPES, device=x.device)
        check_positive_int("pack_rows", "num_rows", num_rows, minimum=0)
    return call_op(_pack_rows_op, _pack_rows_impl, x, pos, num_rows)


def gather_sum(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Row m = sum of src[idx[m, c]] over the idx >= 0 of row m; fp32 accumulation, written once.

    Args:
        src: [N, H] fp32/fp16/bf16 rows (any strides).
        idx: [M, C] int32/int64 row indices into src, on src's device, -1 = none.

    Returns:
        [M, H] of src.dtype (a row whose indices are all -1 is zeros).
    """
    if not (isinstance(src, torch.Tensor) and isinstance(idx, torch.Tensor) and src.dtype in _FLOAT_DTYPES
            and idx.dtype in _ID_DTYPES and src.dim() == 2 and idx.dim() == 2 and idx.device == src.device):
        src = check_tensor("gather_sum", "src", src, ndim=2, dtype=_FLOAT_DTYPES)
        idx = check_tensor("gather_sum", "idx", idx, ndim=2, dtype=_ID_DTYPES, device=src.device)
    return call_op(_gather_sum_op, _gather_sum_impl, src, idx)


