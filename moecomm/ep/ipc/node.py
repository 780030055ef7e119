"""One dispatcher for an MoE layer inside a node: the low-latency IPC path when a step fits, NCCL otherwise.

# T = num_tokens (this rank's step), W = ep_size

    elig = moecomm.distributed.symmetric.eligibility(group)           # collective, once, cached
    disp = NodeDispatcher(EPDispatcher(E, k, H, group=g, dtype=dt, max_tokens=256),
                          IPCDispatcher(E, k, H, buffer=buf, dtype=dt, max_tokens=128, group=g) if elig.ok else None,
                          eligibility=elig)
    d = disp.dispatch(x, topk_ids, topk_weights); y = disp.combine(h, d.handle)
    disp.last_path                                                    # PathChoice: which path, and why

Each call takes the path choose_ep_path picks for its T (moecomm/ep/ipc/choose.py), and says so:
``last_path`` holds the choice and a change of path is logged once (logger 'moecomm', INFO). As with
EPDispatcher's static mode, the ranks must agree on the path of a step, so they must agree on
whether T fits: decode batches padded to one size on every rank do (the layer's CUDA-graph sizes).
combine goes back through the path whose dispatch made the handle.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..types import DispatchResult
from .choose import IPC_LL, PathChoice, choose_ep_path

log = logging.getLogger("moecomm")


class NodeDispatcher:
    """EPDispatcher plus, inside a node, an IPCDispatcher for the steps that fit it (implements
    moecomm.ep.types.Dispatcher).

    Args:
        ep: the EPDispatcher of the layer (every step that does not take the IPC path).
        ipc: the IPCDispatcher over the node's symmetric buffer, or None (no IPC: always ``ep``).
        eligibility: the symmetric layer's Eligibility for the group (``.ok``, ``.reason``), or None.
    """

    def __init__(self, ep: Any, ipc: Any = None, *, eligibility: Any = None):
        self.ep, self.ipc, self.eligibility = ep, ipc, eligibility
        self.num_local_experts = ep.num_local_experts
        self.last_path: PathChoice | None = None

    @property
    def ep_size(self) -> int:
        """W, ranks of the expert-parallel group."""
        return self.ep.ep_size

    @property
    def max_tokens(self) -> int | None:
        """The EPDispatcher's static-mode max_tokens (the IPC path's is ``ipc.max_tokens``)."""
        return self.ep.max_tokens

    def choose(self, num_tokens: int) -> PathChoice:
        """The path of a step of ``num_tokens`` tokens a rank (recorded in last_path, logged on a change)."""
        c = choose_ep_path(num_tokens, ep_size=self.ep.ep_size, eligibility=self.eligibility,
                           ll_max_tokens=self.ipc.max_tokens if self.ipc is not None else None,
                           static_max_tokens=self.ep.max_tokens)
        # not while compiling: dynamo cannot trace a logging call (fullgraph would fail); a compiled
        # graph's shapes are fixed, so its path is the one its eager calls (or last_path) show
        if (self.last_path is None or c.path != self.last_path.path) and not torch.compiler.is_compiling():
            log.info("moecomm: expert-parallel steps of %d tokens a rank take the %s path: %s", num_tokens, c.path,
                     c.reason)
        self.last_path = c
        return c

    def _target(self, num_tokens: int) -> Any:
        return self.ipc if self.choose(num_tokens).path == IPC_LL else self.ep

    def _owner(self, handle: Any) -> Any:
        return self.ipc if self.ipc is not None and getattr(handle, "buffers", None) is self.ipc else self.ep

    def dispatch(self, x: Any, topk_ids: Any, topk_weights: Any) -> DispatchResult:
        """x [T, H], topk_ids [T, k], topk_weights [T, k]: as EPDispatcher.dispatch / IPCDispatcher.dispatch."""
        T = x.shape[0] if isinstance(x, torch.Tensor) and x.dim() == 2 else 0
        return self._target(T).dispatch(x, topk_ids, topk_weights)

    def dispatch_unchecked(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        """dispatch without the argument checks (the MoE forward)."""
        return self._target(x.shape[0]).dispatch_unchecked(x, topk_ids, topk_weights)

    def combine(self, expert_out: Any, handle: Any) -> torch.Tensor:
        """expert_out [N, H] -> y [T, H], through the path whose dispatch made ``handle``."""
        return self._owner(handle).combine(expert_out, handle)

    def combine_unchecked(self, expert_out: torch.Tensor, handle: Any) -> torch.Tensor:
        """combine without checks (the MoE forward)."""
        return self._owner(handle).combine_unchecked(expert_out, handle)

    def check_overflow(self) -> None:
        """Both paths' check_overflow (the IPC path's timeouts included); a host sync."""
        self.ep.check_overflow()
        if self.ipc is not None:
            self.ipc.check_overflow()
