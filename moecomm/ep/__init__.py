"""Token permute/combine on one rank and expert-parallel dispatch/combine across ranks."""

from .api import PermuteIndices, PermuteResult, combine, permute, permute_indices
from .local import LocalDispatcher
from .placement import ExpertPlacement
from .types import DispatchResult, Dispatcher
from .dispatch import EPDispatcher, EPHandle, PendingCombine, PendingDispatch, combine as ep_combine, dispatch as ep_dispatch
