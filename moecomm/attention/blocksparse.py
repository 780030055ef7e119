"""BlockSparseAttentionWrapper: attention whose visible (query, key) pairs are a block-sparse (BSR)
pattern, FlashInfer's class and plan()/run() arguments.

# M = query rows, N = key rows, R x C = block shape, MB = M // R block rows, NB = N // C

The pattern: block row i sees the key blocks indices[indptr[i]:indptr[i + 1]] (optionally only
the (r, c) pairs of a per-block mask). plan() expands it into the prefill kernel's packed bit mask
([M, N] bits, M * N / 8 bytes), so the result is exact for any pattern; the kernel still reads
every key block (a block-skipping kernel is not written yet: no speed-up over dense masking).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import MoeCommValueError
from ._common import host_ints
from .prefill import BatchPrefillWithRaggedKVCacheWrapper

_OP = "BlockSparseAttentionWrapper"


def bsr_to_dense(indptr: np.ndarray, indices: np.ndarray, M: int, N: int, R: int, C: int,
                 block_mask: np.ndarray | None = None) -> np.ndarray:
    """[M, N] bool of a BSR pattern (block_mask: [nnz_blocks, R, C] bool within each block, or None)."""
    MB, NB = M // R, N // C
    rows = np.repeat(np.arange(MB), np.diff(indptr))
    dense = np.zeros((MB, R, NB, C), dtype=bool)
    if block_mask is None:
        dense[rows, :, indices, :] = True
    else:
        dense[rows, :, indices, :] = block_mask.reshape(-1, R, C)
    return dense.reshape(M, N)


class BlockSparseAttentionWrapper:
    """Block-sparse attention of q [M, Hq, D] over k, v [N, Hk, D] (one sequence).

    Args:
        float_workspace_buffer: a tensor on the wrapper's device. backend: accepted (FlashInfer's).
    """

    def __init__(self, float_workspace_buffer: torch.Tensor, backend: str = "auto"):
        self._inner = BatchPrefillWithRaggedKVCacheWrapper(float_workspace_buffer)
        self._inner._op = _OP

    def plan(self, indptr, indices, M: int, N: int, R: int, C: int, num_qo_heads: int, num_kv_heads: int,
             head_dim: int, mask=None, packed_mask=None, causal: bool = False, pos_encoding_mode: str = "NONE",
             use_fp16_qk_reduction: bool = False, logits_soft_cap: float | None = None, sm_scale: float | None = None,
             rope_scale=None, rope_theta=None, q_data_type="float16", kv_data_type=None, non_blocking: bool = True) -> None:
        """Plan the pattern.

        Args:
            indptr: [M // R + 1] block-row pointers into indices; indices: [nnz_blocks] key-block ids (< N // C).
            M, N: query and key rows; R, C: block rows and columns (R | M, C | N).
            mask: [nnz_blocks, R, C] bool, the visible pairs inside each listed block (None: all).
            causal, logits_soft_cap, sm_scale, q_data_type, kv_data_type: as the prefill wrapper's.
        """
        for name, v in (("M", M), ("N", N), ("R", R), ("C", C)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MoeCommValueError(f"{_OP}: {name} must be an int >= 1, got {v!r}")
        if M % R or N % C:
            raise MoeCommValueError(f"{_OP}: R must divide M and C must divide N, got M={M}, R={R}, N={N}, C={C}")
        if packed_mask is not None:
            raise MoeCommValueError(f"{_OP}: packed_mask must be None (pass mask as bool [nnz_blocks, R, C]), got a tensor")
        ip = host_ints(_OP, "indptr", indptr)
        ix = host_ints(_OP, "indices", indices)
        if ip.shape[0] != M // R + 1 or ip[0] != 0 or (np.diff(ip) < 0).any() or ip[-1] != ix.shape[0]:
            raise MoeCommValueError(f"{_OP}: indptr must be {M // R + 1} non-decreasing block-row pointers from 0 to "
                                    f"len(indices) = {ix.shape[0]}, got {ip.tolist()[:8]}...")
        if ix.size and (ix.min() < 0 or ix.max() >= N // C):
            raise MoeCommValueError(f"{_OP}: indices must be key-block ids in [0, {N // C}), got [{int(ix.min())}, {int(ix.max())}]")
        bm = None
        if mask is not None:
            bm = mask.cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
            if bm.shape != (ix.shape[0], R, C):
                raise MoeCommValueError(f"{_OP}: mask must have shape [nnz_blocks, R, C] = [{ix.shape[0]}, {R}, {C}], got {list(bm.shape)}")
            bm = bm.astype(bool)
        dense = bsr_to_dense(ip, ix, M, N, R, C, bm)
        self._inner.plan(torch.tensor([0, M], dtype=torch.int32), torch.tensor([0, N], dtype=torch.int32), num_qo_heads,
                         num_kv_heads, head_dim, custom_mask=dense.reshape(-1), causal=causal,
                         logits_soft_cap=logits_soft_cap, sm_scale=sm_scale, q_data_type=q_data_type,
                         kv_data_type=kv_data_type, non_blocking=non_blocking, pos_encoding_mode=pos_encoding_mode)

    begin_forward = plan

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False):
        """q [M, Hq, D], k / v [N, Hk, D] -> out [M, Hq, D] (and the base-2 LSE [M, Hq] with return_lse)."""
        return self._inner.run(q, k, v, out=out, lse=lse, return_lse=return_lse)

    forward = run
