"""What an NCCL dispatch hands back: the handle combine needs, and the async results.

Shared by the NCCL dispatcher (dispatcher.py) and the IPC one (moecomm/ep/ipc), which keep the same
handle and results so that the MoE layer can take either path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..types import DispatchResult
from .plan import RowLayout, Workspace


@dataclass
class EPHandle:
    """What combine needs to bring rows home; built by dispatch, opaque to callers.

    Attributes:
        group: the process group (None: default), ep_size W.
        send_splits: [W] host ints, rows this rank sent to each rank (S = sum); None in static mode.
        recv_splits: [W] host ints, rows this rank received from each rank (R = sum); None in static mode.
        home: [T, k] int32, the send row of each token's owning slots (-1: none).
        slot_pos: [R, k] int32 expanded row of each received (row, slot) (-1: none).
        num_tokens, hidden: T, H of the source rank; num_rows: N expanded rows (static: R * k).
        local: EP size 1 only, the LocalDispatcher's handle (home and slot_pos are None then).
        buffers: static mode, the dispatcher's buffers (combine writes into them).
        op_handle: static mode, the dispatcher's handle in static_ops.REGISTRY (torch.compile's ops;
            buffers is None in a handle made under compile: combine then runs through the op).
        counts: the native path's copy of the dispatch's [2, W, 3] counts on the device (its
            combine's kernels read R, N and S there); None otherwise.
        outputs: the native path's DispatchOutputs (NativeHandle), which home, slot_pos and counts
            view; None otherwise.
    """

    group: Any
    ep_size: int
    send_splits: list[int] | None
    recv_splits: list[int] | None
    home: torch.Tensor | None
    slot_pos: torch.Tensor | None
    num_tokens: int
    hidden: int
    num_rows: int
    local: Any = None
    buffers: Any = None
    op_handle: int | None = None
    counts: Any = None
    outputs: Any = None


class NativeHandle(EPHandle):
    """The EPHandle of a dispatch that took the native path (native.py): home, slot_pos and counts
    are views of that dispatch's DispatchOutputs (``outputs``), made when first read; its combine's
    template takes their addresses instead."""

    def __init__(self, group: Any, ep_size: int, send_splits: list[int], recv_splits: list[int], outputs,
                 num_tokens: int, hidden: int, num_rows: int, nat=None):
        self.group, self.ep_size, self.send_splits, self.recv_splits = group, ep_size, send_splits, recv_splits
        self.num_tokens, self.hidden, self.num_rows, self.outputs = num_tokens, hidden, num_rows, outputs
        self.nat = nat  # the dispatch's (runtime, communicator, stream): its combine's, on the same stream

    home = property(lambda self: self.outputs.home)
    slot_pos = property(lambda self: self.outputs.slot_pos)
    counts = property(lambda self: self.outputs.counts)


class NativeResult(DispatchResult):
    """The DispatchResult of a native-path dispatch: the index tensors are DispatchOutputs' views,
    made when first read."""

    def __init__(self, tokens: torch.Tensor, outputs, handle: NativeHandle):
        self.tokens, self.handle, self._outputs = tokens, handle, outputs

    expert_offsets = property(lambda self: self._outputs.expert_offsets)
    tokens_per_expert = property(lambda self: self._outputs.tokens_per_expert)
    row_weights = property(lambda self: self._outputs.row_weights)
    gather_idx = property(lambda self: self._outputs.gather_idx)


class _Done:
    """An already-finished async result (EP size 1, or nothing to exchange)."""

    def __init__(self, value: Any):
        self._value = value

    def is_completed(self) -> bool:
        return True

    def wait(self) -> Any:
        return self._value


class PendingDispatch:
    """Returned by dispatch(..., async_op=True): the all-to-alls are in flight.

    ``wait()`` -> DispatchResult (on a GPU, it orders the current stream after the exchange);
    ``is_completed()`` -> whether the exchange has finished.
    """

    def __init__(self, works: list, finish):
        self._works, self._finish, self._value = works, finish, None

    def is_completed(self) -> bool:
        return self._value is not None or all(w.is_completed() for w in self._works)

    def wait(self) -> DispatchResult:
        if self._value is None:
            self._value = self._finish(self._works)
        return self._value


class PendingCombine(PendingDispatch):
    """Returned by combine(..., async_op=True); ``wait()`` -> y [T, H]."""


@dataclass
class _StaticBuffers:
    """The static mode's buffers, allocated once (EPDispatcher(max_tokens=...))."""

    capacity: int
    max_tokens: int
    layout: RowLayout
    send: torch.Tensor  # [W * C, width]
    recv: torch.Tensor  # [W * C, width]
    partial: torch.Tensor  # [W * C, H]: the receiver's sums, sent back
    back: torch.Tensor  # [W * C, H]
    home: torch.Tensor  # [max_tokens, k] int32
    overflow: torch.Tensor  # [1] int32, sticky until check_overflow()
    send_ids: torch.Tensor  # send's [W * C, k] int32 expert-id columns (reset to -1 every step)


@dataclass
class _StaticIndex:
    """One dispatcher's own part of the static mode (not shared by share_buffers: L is its own), made
    once: the kernels' scratch, reserved for max_tokens and W * C rows so that it never grows (a
    captured CUDA graph keeps its addresses), and the expansion's outputs (None on a rank without
    experts), which a dispatch result views until the next dispatch."""

    workspace: Workspace
    outputs: Any
