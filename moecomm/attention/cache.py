"""The paged KV cache: layouts, append_paged_kv_cache, and the index helpers FlashInfer offers.

# B = batch, nnz = appended tokens, P = page_size, Hk = num_kv_heads, D = head_dim

A cache is K and V pages: a (k_cache, v_cache) tuple, or one tensor [num_pages, 2, ...] holding both.
  NHD: [num_pages, P, Hk, D]        HND: [num_pages, Hk, P, D]
A request's pages are kv_indices[kv_indptr[b]:kv_indptr[b + 1]], the last one holding
kv_last_page_len[b] tokens. To append tokens, grow the page table first (the new tokens' pages must
already be listed and last_page_len must count them), then call append_paged_kv_cache.
"""

from __future__ import annotations

import torch

from ..errors import MoeCommTypeError, MoeCommValueError, check_tensor
from ..jit import backend as _backend
from ..jit.launch import launch, next_pow2
from ..jit.ops import define_op
from . import reference
from ._common import KV_DTYPES, check_layout, nhd_strides

_OP = "append_paged_kv_cache"
_INDEX = (torch.int32, torch.int64)


def _append_impl(append_key: torch.Tensor, append_value: torch.Tensor, batch_indices: torch.Tensor,
                 positions: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, kv_indices: torch.Tensor,
                 kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, kv_layout_hnd: bool) -> None:
    layout = reference.HND if kv_layout_hnd else reference.NHD
    if _backend.choose(k_cache, "append_paged_kv_cache") is not _backend.Impl.TRITON:
        reference.append_paged_kv_cache(append_key, append_value, batch_indices, positions, k_cache, v_cache, layout,
                                        kv_indices.cpu(), kv_indptr.cpu(), kv_last_page_len)
        return
    from . import _triton_misc as kern

    nnz, num_heads, head_dim = append_key.shape
    if nnz == 0:
        return
    page = k_cache.shape[2] if kv_layout_hnd else k_cache.shape[1]
    launch(kern.append_kv_kernel, (nnz,), (
        append_key, append_value, batch_indices, positions, k_cache, v_cache, kv_indices, kv_indptr, kv_last_page_len,
        kv_last_page_len.shape[0], kv_indices.shape[0], k_cache.shape[0],
        append_key.stride(0), append_key.stride(1), append_value.stride(0), append_value.stride(1),
        *nhd_strides(k_cache, layout), *nhd_strides(v_cache, layout),
    ), dict(NUM_HEADS=num_heads, HEAD_DIM=head_dim, PAGE=page, BLOCK_H=next_pow2(num_heads)), 4)


_append_op = define_op("attention_append_paged_kv_cache", _append_impl, fake=lambda *args: None,
                       mutates_args=("k_cache", "v_cache"), differentiable=False)


def append_paged_kv_cache(append_key, append_value, batch_indices, positions, paged_kv_cache, kv_indices, kv_indptr,
                          kv_last_page_len, kv_layout: str = "NHD") -> None:
    """Write new tokens' keys and values into their pages, in one kernel (in place).

    Args:
        append_key, append_value: [nnz, Hk, D] in the cache's dtype (fp16/bf16/fp32), D contiguous.
        batch_indices: [nnz] int32/int64, each token's request. positions: [nnz], its position in the
            request (0-based); both from get_batch_indices_positions.
        paged_kv_cache: (k_cache, v_cache) or one [num_pages, 2, ...] tensor, in kv_layout.
        kv_indices, kv_indptr [B + 1], kv_last_page_len [B]: the page table after the append, on the
            cache's device.
        kv_layout: "NHD" or "HND".

    A token whose request, position or page is out of range is skipped: the kernel never writes
    (or reads) outside the cache. No host sync.

    Example:
        >>> bi, pos = get_batch_indices_positions(append_indptr, seq_lens, nnz)
        >>> append_paged_kv_cache(k_new, v_new, bi, pos, (k_cache, v_cache), kv_indices, kv_indptr, last_page_len)
    """
    layout = check_layout(_OP, kv_layout)
    k_cache, v_cache = reference.split_paged_kv_cache(paged_kv_cache, layout)
    k_cache = check_tensor(_OP, "k_cache", k_cache, dtype=KV_DTYPES, ndim=4)
    v_cache = check_tensor(_OP, "v_cache", v_cache, dtype=k_cache.dtype, shape=tuple(k_cache.shape), device=k_cache.device)
    heads, dim = (k_cache.shape[2], k_cache.shape[3]) if layout == reference.NHD else (k_cache.shape[1], k_cache.shape[3])
    dev = k_cache.device
    key = check_tensor(_OP, "append_key", append_key, dtype=k_cache.dtype, shape=(None, heads, dim), device=dev)
    nnz = key.shape[0]
    value = check_tensor(_OP, "append_value", append_value, dtype=k_cache.dtype, shape=(nnz, heads, dim), device=dev)
    bi = check_tensor(_OP, "batch_indices", batch_indices, dtype=_INDEX, shape=(nnz,), device=dev)
    pos = check_tensor(_OP, "positions", positions, dtype=_INDEX, shape=(nnz,), device=dev)
    indptr = check_tensor(_OP, "kv_indptr", kv_indptr, dtype=_INDEX, ndim=1, device=dev)
    last = check_tensor(_OP, "kv_last_page_len", kv_last_page_len, dtype=_INDEX, shape=(indptr.shape[0] - 1,), device=dev)
    indices = check_tensor(_OP, "kv_indices", kv_indices, dtype=_INDEX, ndim=1, device=dev)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("append_key", key), ("append_value", value)):
        if t.stride(-1) != 1:
            raise MoeCommValueError(f"{_OP}: {name} must be contiguous along head_dim (stride 1), got stride {t.stride(-1)}")
    if indices.shape[0] == 0:
        indices = torch.zeros(1, dtype=torch.int32, device=dev)  # nothing valid; a pointer for the kernel
    _append_op(key, value, bi.contiguous(), pos.contiguous(), k_cache, v_cache, indices.contiguous(),
               indptr.contiguous(), last.contiguous(), layout == reference.HND)


def get_seq_lens(kv_indptr: torch.Tensor, kv_last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """[B] int32 KV length of each request (device ops, no sync)."""
    pages = kv_indptr[1:] - kv_indptr[:-1]
    return torch.where(pages > 0, (pages - 1) * page_size + kv_last_page_len, torch.zeros_like(pages)).to(torch.int32)


def get_batch_indices_positions(append_indptr: torch.Tensor, seq_lens: torch.Tensor, nnz: int):
    """(batch_indices [nnz] int32, positions [nnz] int32) of appended tokens (FlashInfer's helper).

    Args:
        append_indptr: [B + 1], request b appends tokens append_indptr[b]:append_indptr[b + 1].
        seq_lens: [B], each request's KV length after the append (its new tokens are the last ones).
        nnz: append_indptr[-1], passed so that no host sync is needed.
    """
    append_indptr = check_tensor("get_batch_indices_positions", "append_indptr", append_indptr, dtype=_INDEX, ndim=1)
    if isinstance(nnz, bool) or not isinstance(nnz, int) or nnz < 0:
        raise MoeCommTypeError(f"get_batch_indices_positions: nnz must be an int >= 0, got {nnz!r}")
    counts = (append_indptr[1:] - append_indptr[:-1]).long()
    batch = torch.repeat_interleave(torch.arange(counts.shape[0], device=append_indptr.device), counts, output_size=nnz)
    local = torch.arange(nnz, device=append_indptr.device) - append_indptr[:-1].long()[batch]
    positions = seq_lens.long()[batch] - counts[batch] + local
    return batch.to(torch.int32), positions.to(torch.int32)
