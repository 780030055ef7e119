"""Attention over a paged KV cache with a plan()/run() split (FlashInfer's names and arguments).

    BatchDecodeWithPagedKVCacheWrapper   decode: one query token per request
"""

from .decode import BatchDecodeWithPagedKVCacheWrapper

__all__ = ["BatchDecodeWithPagedKVCacheWrapper"]
