"""Rotary position embeddings for ragged q / k (FlashInfer's apply_rope family), one kernel each.

# nnz = tokens, Hq / Hk = heads of q / k, D = head_dim, R = rotary_dim (<= D, even)

Positions: apply_rope* take (indptr [B + 1], offsets [B]): token t of request b is at offsets[b] + t;
apply_rope_pos_ids* take pos_ids [nnz]. Frequencies: theta^(-2i/R) / rope_scale, or Llama 3.1's
smoothed scaling (apply_llama31_rope*: factor, low / high frequency factors, original context).
interleave=False rotates pairs (i, i + R/2) (Llama / GPT-NeoX), True pairs (2i, 2i + 1) (GPT-J).
"""

from __future__ import annotations

import functools

import torch

from ..errors import MoeCommValueError, check_tensor
from ..jit import backend as _backend
from ..jit.launch import cdiv, launch, next_pow2
from ..jit.ops import define_op
from . import reference
from ._common import KV_DTYPES

_INDEX = (torch.int32, torch.int64)


@functools.lru_cache(maxsize=64)
def _inv_freq(rotary_dim: int, theta: float, scale: float, llama31: tuple | None, device: torch.device) -> torch.Tensor:
    params = None if llama31 is None else dict(zip(("factor", "low_freq_factor", "high_freq_factor", "old_context_len"), llama31))
    return reference.rope_inv_freq(rotary_dim, theta, scale, params, "cpu").to(device)


def _rope_impl(x: torch.Tensor, out: torch.Tensor, pos_ids: torch.Tensor, inv_freq: torch.Tensor, interleave: bool) -> None:
    if _backend.choose(x, "apply_rope") is not _backend.Impl.TRITON:
        out.copy_(reference.apply_rope_pos_ids(x, pos_ids, inv_freq, interleave))
        return
    from . import _triton_misc as kern

    nnz, heads, dim = x.shape
    if nnz == 0:
        return
    half = inv_freq.shape[0]
    block_h = min(next_pow2(heads), max(1, 4096 // next_pow2(max(half, 1))))
    rest = dim - 2 * half
    launch(kern.rope_kernel, (nnz, cdiv(heads, block_h)), (
        x, out, pos_ids, inv_freq, heads, x.stride(0), x.stride(1), out.stride(0), out.stride(1),
    ), dict(HEAD_DIM=dim, HALF=half, BLOCK_HALF=next_pow2(half), BLOCK_H=block_h, INTERLEAVE=interleave,
            COPY_REST=rest > 0 and x.data_ptr() != out.data_ptr(), BLOCK_REST=max(next_pow2(rest), 1)), 4)


_rope_op = define_op("attention_apply_rope", _rope_impl, fake=lambda *args: None, mutates_args=("out",), differentiable=False)


def _positions(op, indptr, offsets, nnz, device):
    indptr = check_tensor(op, "indptr", indptr, dtype=_INDEX, ndim=1, device=device)
    offsets = check_tensor(op, "offsets", offsets, dtype=_INDEX, shape=(indptr.shape[0] - 1,), device=device)
    counts = (indptr[1:] - indptr[:-1]).long()
    batch = torch.repeat_interleave(torch.arange(counts.shape[0], device=device), counts, output_size=nnz)
    return (offsets.long()[batch] + torch.arange(nnz, device=device) - indptr[:-1].long()[batch]).to(torch.int32)


def _rope(op, q, k, pos_ids, rotary_dim, interleave, theta, scale, llama31, inplace):
    q = check_tensor(op, "q", q, dtype=KV_DTYPES, ndim=3)
    nnz, _, dim = q.shape
    k = check_tensor(op, "k", k, dtype=q.dtype, shape=(nnz, None, dim), device=q.device)
    pos_ids = check_tensor(op, "pos_ids", pos_ids, dtype=_INDEX, shape=(nnz,), device=q.device).contiguous()
    rotary_dim = dim if rotary_dim is None else rotary_dim
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or not (2 <= rotary_dim <= dim) or rotary_dim % 2:
        raise MoeCommValueError(f"{op}: rotary_dim must be an even int in [2, head_dim = {dim}], got {rotary_dim!r}")
    if not (theta > 0 and scale > 0):
        raise MoeCommValueError(f"{op}: rope_theta and rope_scale must be > 0, got {theta} and {scale}")
    for name, t in (("q", q), ("k", k)):
        if t.stride(-1) != 1:
            raise MoeCommValueError(f"{op}: {name} must be contiguous along head_dim (stride 1), got stride {t.stride(-1)}")
    inv = _inv_freq(rotary_dim, float(theta), float(scale), llama31, q.device)
    q_out = q if inplace else torch.empty_like(q, memory_format=torch.contiguous_format)
    k_out = k if inplace else torch.empty_like(k, memory_format=torch.contiguous_format)
    _rope_op(q, q_out, pos_ids, inv, bool(interleave))
    _rope_op(k, k_out, pos_ids, inv, bool(interleave))
    return None if inplace else (q_out, k_out)


def apply_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1.0, rope_theta=1e4):
    """RoPE at explicit positions. q: [nnz, Hq, D], k: [nnz, Hk, D] (fp16/bf16/fp32, D contiguous),
    pos_ids: [nnz] int32/int64. Returns (q_rope, k_rope); dims past rotary_dim are copied."""
    return _rope("apply_rope_pos_ids", q, k, pos_ids, rotary_dim, interleave, rope_theta, rope_scale, None, False)


def apply_rope_pos_ids_inplace(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=1.0, rope_theta=1e4):
    """apply_rope_pos_ids, writing q and k in place."""
    _rope("apply_rope_pos_ids_inplace", q, k, pos_ids, rotary_dim, interleave, rope_theta, rope_scale, None, True)


def apply_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1.0, rope_theta=1e4):
    """RoPE of ragged requests. q: [nnz, Hq, D], k: [nnz, Hk, D]; indptr: [B + 1] (request b owns rows
    indptr[b]:indptr[b + 1]); offsets: [B], the position of each request's first row.
    Returns (q_rope, k_rope).

    Example:
        >>> q, k = apply_rope(q, k, qo_indptr, kv_len - qo_len, rope_theta=5e5)
    """
    pos = _positions("apply_rope", indptr, offsets, q.shape[0], q.device)
    return _rope("apply_rope", q, k, pos, rotary_dim, interleave, rope_theta, rope_scale, None, False)


def apply_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=1.0, rope_theta=1e4):
    """apply_rope, writing q and k in place."""
    pos = _positions("apply_rope_inplace", indptr, offsets, q.shape[0], q.device)
    _rope("apply_rope_inplace", q, k, pos, rotary_dim, interleave, rope_theta, rope_scale, None, True)


def _llama(rope_scale, low_freq_factor, high_freq_factor, old_context_len):
    return (float(rope_scale), float(low_freq_factor), float(high_freq_factor), float(old_context_len))


def apply_llama31_rope(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8.0, rope_theta=5e5,
                       low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192):
    """apply_rope with Llama 3.1's frequency scaling (rope_scale is its 'factor')."""
    pos = _positions("apply_llama31_rope", indptr, offsets, q.shape[0], q.device)
    return _rope("apply_llama31_rope", q, k, pos, rotary_dim, interleave, rope_theta, 1.0,
                 _llama(rope_scale, low_freq_factor, high_freq_factor, old_context_len), False)


def apply_llama31_rope_inplace(q, k, indptr, offsets, rotary_dim=None, interleave=False, rope_scale=8.0, rope_theta=5e5,
                               low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192):
    """apply_llama31_rope, writing q and k in place."""
    pos = _positions("apply_llama31_rope_inplace", indptr, offsets, q.shape[0], q.device)
    _rope("apply_llama31_rope_inplace", q, k, pos, rotary_dim, interleave, rope_theta, 1.0,
          _llama(rope_scale, low_freq_factor, high_freq_factor, old_context_len), True)


def apply_llama31_rope_pos_ids(q, k, pos_ids, rotary_dim=None, interleave=False, rope_scale=8.0, rope_theta=5e5,
                               low_freq_factor=1.0, high_freq_factor=4.0, old_context_len=8192):
    """apply_rope_pos_ids with Llama 3.1's frequency scaling."""
    return _rope("apply_llama31_rope_pos_ids", q, k, pos_ids, rotary_dim, interleave, rope_theta, 1.0,
                 _llama(rope_scale, low_freq_factor, high_freq_factor, old_context_len), False)
