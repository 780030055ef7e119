"""Attention over a paged KV cache with a plan()/run() split (FlashInfer's names and arguments).

    BatchDecodeWithPagedKVCacheWrapper     decode, one query token per request (split-KV, CUDA graphs)
    BatchPrefillWithPagedKVCacheWrapper    prefill of ragged queries over a paged KV (causal, window,
                                           custom mask, soft-cap)
    BatchPrefillWithRaggedKVCacheWrapper   the same over contiguous ragged K / V
    BlockSparseAttentionWrapper            a block-sparse (BSR) pattern, as a packed mask
    append_paged_kv_cache                  write new tokens into their pages (one kernel)
    merge_state, merge_states, ...         combine partial results by their (base-2) LSE
    apply_rope, apply_llama31_rope, ...    rotary embeddings of ragged q / k

Every LSE is base 2 (FlashInfer's convention). Pure-torch references: moecomm.attention.reference.
"""

from .blocksparse import BlockSparseAttentionWrapper
from .cache import append_paged_kv_cache, get_batch_indices_positions, get_seq_lens
from .decode import BatchDecodeWithPagedKVCacheWrapper
from .merge import merge_state, merge_state_in_place, merge_states
from .prefill import (
                   BatchPrefillWithPagedKVCacheWrapper,
                   BatchPrefillWithRaggedKVCacheWrapper,
)
from .rope import (
                   apply_llama31_rope,
                   apply_llama31_rope_inplace,
                   apply_llama31_rope_pos_ids,
                   apply_rope,
                   apply_rope_inplace,
                   apply_rope_pos_ids,
                   apply_rope_pos_ids_inplace,
)

__all__ = [
    "BatchDecodeWithPagedKVCacheWrapper",
    "BatchPrefillWithPagedKVCacheWrapper",
    "BatchPrefillWithRaggedKVCacheWrapper",
    "BlockSparseAttentionWrapper",
    "append_paged_kv_cache",
    "apply_llama31_rope",
    "apply_llama31_rope_inplace",
    "apply_llama31_rope_pos_ids",
    "apply_rope",
    "apply_rope_inplace",
    "apply_rope_pos_ids",
    "apply_rope_pos_ids_inplace",
    "get_batch_indices_positions",
    "get_seq_lens",
    "merge_state",
    "merge_state_in_place",
    "merge_states",
]
