"""Expert-parallel dispatch/combine: tokens to the ranks that hold their experts, and back.

    from moecomm.ep import EPDispatcher, LocalDispatcher, dispatch, combine

Paths, each behind the Dispatcher protocol of types.py: local.py (EP size 1, a permute on this
rank), nccl/ (across ranks over NCCL all_to_all_single), ipc/ (low latency inside a node over IPC buffers). reference.py is the truth for every path;
placement.py says which rank holds which expert. Permute/unpermute on one rank is moecomm.permute.
"""

from .ipc import IPCDispatcher, NodeDispatcher, PathChoice, choose_ep_path
from .local import LocalDispatcher
from .nccl import EPDispatcher, EPHandle, PendingCombine, PendingDispatch, combine, dispatch
from .placement import ExpertPlacement
from .types import DispatchResult, Dispatcher

__all__ = ["DispatchResult", "Dispatcher", "EPDispatcher", "EPHandle", "ExpertPlacement", "IPCDispatcher",
           "LocalDispatcher", "NodeDispatcher", "PathChoice", "PendingCombine", "PendingDispatch", "choose_ep_path", "combine", "dispatch"]
