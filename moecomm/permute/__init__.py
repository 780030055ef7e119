"""Token permute/unpermute on one rank: group routed rows by expert, and sum them back per token."""

from .api import PermuteIndices, PermuteResult, permute, permute_indices, unpermute

__all__ = ["PermuteIndices", "PermuteResult", "permute", "permute_indices", "unpermute"]
