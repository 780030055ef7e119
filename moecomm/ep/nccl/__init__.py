"""Expert-parallel dispatch/combine over NCCL (torch.distributed all_to_all_single): the throughput path.

Its parts: plan.py (destinations, dedup, counts, the receiver's expansion), ops.py (the pack and
gather-sum custom ops), _triton.py (their kernels), reference.py (their references), dispatcher.py
(dispatch, combine, the handle, EPDispatcher), virtual.py (the same steps over virtual ranks in one
process, for tests and benchmarks).
"""

from .dispatcher import EPDispatcher, EPHandle, PendingCombine, PendingDispatch, combine, dispatch
from .ops import gather_sum, pack_rows

__all__ = ["EPDispatcher", "EPHandle", "PendingCombine", "PendingDispatch", "combine", "dispatch", "gather_sum",
           "pack_rows"]
