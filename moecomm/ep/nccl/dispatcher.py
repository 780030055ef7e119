"""Expert-parallel dispatch and combine across the ranks of a process group, over NCCL (or gloo).

# T = num_tokens (this rank), H = hidden, k = top_k, E = num_experts, W = ep_size,
# L = num_local_experts (this rank), S = rows sent, R = rows received, N = expanded rows (pairs),
# C = capacity (static mode: rows per peer)

    disp = EPDispatcher(num_experts=64, top_k=8, hidden=4096, group=ep_group)
    d = disp.dispatch(x, topk_ids, topk_weights)        # d.tokens [R, H], d.gather_idx [N]
    h = experts(d.tokens[d.gather_idx], d.expert_offsets) * d.row_weights[:, None]
    y = disp.combine(h, d.handle)                       # [T, H] on the source rank

Two modes (moecomm/ep/nccl/plan.py has the row layout and the kernels' story):

Throughput mode (prefill; every call when no max_tokens is given): one step, on every rank:
1. plan (two kernels: the plan with a counting sort's histogram, then the sort's scatter; plan.py):
   destination ranks, the dedup (a token whose several experts live on one rank is sent there ONCE,
   with its k (local expert, weight) pairs), each row's place grouped by rank, the [W, 3] counts
   and an error flag;
2. the counts in one small all_to_all_single: THE host sync of a step (all_to_all_single takes host
   split sizes, and the receiver must size its buffers). A rank whose input failed validation sends
   its flag instead of hanging its peers: every rank raises, naming it;
3. pack (one kernel): the send rows, tokens and metadata side by side, grouped by rank;
4. one all_to_all_single of the rows;
5. expand (receiver; a counting sort again, two kernels reading the received rows in place): the
   (row, local expert) pairs grouped by local expert, stably, so the rows of expert l are ordered
   by (source rank, token, slot);
6. combine: the receiver sums each received token's rows over its local experts (gather_sum, fp32)
   BEFORE they travel back, the reverse all_to_all_single returns one row per (token, rank), and the
   source rank sums those per token (gather_sum): each output row is written once, no atomics, so
   results are deterministic.
On CUDA over NCCL, a synchronous call queues 1-2 (with the sync), 3-5 and 6 in one C call each
(native.py: the same kernels and exchanges, ~2x less host time; MOECOMM_EP_NATIVE=0: this Python).

Static-capacity mode (decode; EPDispatcher(max_tokens=...) and a call of at most max_tokens tokens):
at most C rows per peer (capacity_per_peer, default max_tokens, which never overflows), buffers
allocated once at construction, equal split sizes: dispatch and combine make NO host sync and can
be captured in a CUDA graph with the experts. Every output keeps its static size: d.tokens is
[W * C, H], d.gather_idx and d.row_weights [W * C * k], and the rows after d.expert_offsets[L] are
padding that no expert owns (the grouped GEMMs skip them). The result's tensors (the index tensors
too) are views of the dispatcher's buffers, valid until its next dispatch. A step whose rows to a
peer do not fit is not silently truncated: the rows that fit are exchanged, the others dropped
(never written out of bounds), and a device flag is set; check_overflow() raises it on the host at
the sync point the caller chooses. In static mode a rank whose input is bad raises at once; its peers wait in the
exchange and raise within the group's timeout, naming it (moecomm.distributed.health).

Under torch.compile(fullgraph=True) a static-mode dispatch and its combine are one opaque custom op
each (static_ops.py; results copied out of the buffers there), the DispatchResult and EPHandle built
from their outputs; eager calls do not go through them. The throughput mode cannot be compiled
fullgraph (its count exchange is a host sync and its shapes depend on the routing).

EP size 1 is LocalDispatcher's permute: no exchange and no host sync (beyond the optional id check),
unless force_exchange=True (benchmarks: the exchange path over a one-rank group).

Memory and lifetimes in the throughput mode. The kernels' scratch (the send plan, the sorts'
histograms, the exchanged counts) lives in a grow-only Workspace (plan.py) that an EPDispatcher
keeps per stream and reuses: it is never handed out. What a result holds is the caller's: tokens
(the received rows) is a new tensor, and gather_idx, row_weights, tokens_per_expert,
expert_offsets and the handle's home and slot_pos are views of ONE new int32 tensor per dispatch
(plan.DispatchOutputs; on the native path each view is made when first read, and the received
rows are in the same allocation), so results of earlier calls stay valid while later ones run (a
training step that keeps them for backward, micro-batches in flight). The rows that never leave
one call (the send rows, combine's partial sums and returned rows): on the native path one
grow-only plan.Scratch per stream, shared by every dispatcher on it (so a model's MoE layers hold
one set, not one each: ~0.7 GB a layer at DeepSeek-V3 prefill sizes), safe because each is written
and read by one native call's queue on that stream; on the Python path new tensors from the
caching allocator, which tracks NCCL's streams for async_op. The functional dispatch() has no
dispatcher, hence no workspace: its scratch is one new int32 tensor per step. Static mode: every
result tensor is a view of the dispatcher's buffers, valid until its next dispatch.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

from ...distributed.collectives import all_to_all as _collective_all_to_all
from ...distributed.collectives import global_rank as _global_rank
from ...distributed.collectives import group_device as _group_device
from ...distributed.collectives import group_info as _group_info
from ...distributed.collectives import report_failure as _report
from ...distributed.collectives import wait_all as _wait_all
from ...errors import MoeCommTypeError, MoeCommValueError, check_positive_int, check_tensor
from ...jit.backend import Impl, choose, device_checks_allowed
from ..placement import ExpertPlacement
from ..types import DispatchResult
from . import native as _native
from . import phases as _phases
from .phases import _gather_sum_into, _gather_sum_new
from . import static_ops as _sops
from .handle import (EPHandle, NativeHandle, NativeResult, PendingCombine, PendingDispatch, _Done, _StaticBuffers,
                     _StaticIndex)
from .ops import gather_sum_unchecked
from .plan import DispatchOutputs, RowLayout, Workspace, dispatch_outputs, expand_received, pack_send, plan_send

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_ID_DTYPES = (torch.int32, torch.int64)

# error flags carried by the count exchange, and what the other ranks are told
_FLAG_OK, _FLAG_BAD_IDS, _FLAG_BAD_ARGS = 0, 1, 2
_FLAG_REASONS = {
    _FLAG_BAD_IDS: "topk_ids out of range [0, num_experts)",
    _FLAG_BAD_ARGS: "invalid arguments to dispatch (that rank raised the details)",
}


# EPHandle and the async results live in handle.py (re-exported here: the package's names)


# ----------------------------------------------------------------------------- the exchange


class _Finished:
    """The work of an exchange that completed at once (a one-rank group without torch.distributed)."""

    def is_completed(self) -> bool:
        return True

    def wait(self) -> None:
        return None


def _all_to_all(out, inp, out_splits, in_splits, group, what: str, async_op: bool = False):
    """all_to_all_single over the group; in a process without torch.distributed (a group of one,
    EPDispatcher(force_exchange=True)) the exchange is a copy."""
    import torch.distributed as dist

    if group is None and not (dist.is_available() and dist.is_initialized()):
        out.copy_(inp)
        return _Finished() if async_op else None
    return _collective_all_to_all(out, inp, out_splits, in_splits, group, what, async_op)


# ----------------------------------------------------------------------------- the count exchange


def _exchange_counts(info: torch.Tensor, group, op: str, counts: torch.Tensor | None = None,
                     workspace: Workspace | None = None,
                     counts_recv: torch.Tensor | None = None) -> tuple[list[int], list[int], list[int], list[int]]:
    """all_to_all_single of [W, 3] (rows, pairs, flag) per destination; THE host sync of a step.

    Args:
        info: [W, 3] int32, what this rank sends each destination.
        counts: optional [2, W, 3] int32 whose [0] is info (plan_send's buffer): the exchange
            receives into [1] and both come to the host in one copy.
        workspace: a CUDA exchange copies into its pinned host buffer (no allocation).
        counts_recv: counts[1], when the caller has that view already.

    Returns (rows sent, rows received, pairs received, flags received) as host lists.
    """
    W = info.shape[0]
    if counts is None:
        counts = torch.empty((2, W, 3), dtype=info.dtype, device=info.device)
        counts[0].copy_(info)
    if counts_recv is None:
        info, counts_recv = counts[0], counts[1]
    _all_to_all(counts_recv, info, None, None, group, f"{op}: count exchange", False)
    if not counts.is_cuda:
        host = counts.view(-1).tolist()
    elif workspace is not None:
        host = workspace.host_counts((2, W, 3)).copy_(counts).view(-1).tolist()  # one device->host copy: the sync
    else:
        host = counts.cpu().view(-1).tolist()  # one device->host copy: the sync
    return _parse_flat(host, W)


def _parse_flat(flat: list, W: int) -> tuple[list[int], list[int], list[int], list[int]]:
    """(rows sent, rows received, pairs received, flags received) from the [2, W, 3] counts as one
    flat list."""
    got = flat[3 * W:]
    return flat[0:3 * W:3], got[0::3], got[1::3], got[2::3]


def _fail_peers(group, W: int, device: torch.device, op: str, flag: int) -> None:
    """This rank's input is bad: take part in the count exchange with the flag so no peer hangs."""
    info = torch.zeros((W, 3), dtype=torch.int32, device=device)  # as plan_send's counts
    info[:, 2] = flag
    try:
        _exchange_counts(info, group, op)
    except Exception:  # the peers may already be gone; our own error is the one to raise
        pass


# ----------------------------------------------------------------------------- dispatch / combine


def _validate(op, x, topk_ids, topk_weights, hidden, top_k, dtype):
    # the common case in one expression (~1 us); anything else takes the checks below, which name
    # what is wrong
    if type(x) is torch.Tensor and type(topk_ids) is torch.Tensor and type(topk_weights) is torch.Tensor:
        xs, ks = x.shape, topk_ids.shape
        if (len(xs) == 2 and len(ks) == 2 and ks[0] == xs[0] and ks[1] >= 1 and topk_weights.shape == ks
                and (hidden is None or xs[1] == hidden) and (top_k is None or ks[1] == top_k)
                and (x.dtype is dtype if dtype is not None else x.dtype in _FLOAT_DTYPES)
                and topk_ids.dtype in _ID_DTYPES and topk_weights.dtype in _FLOAT_DTYPES
                and topk_ids.device == x.device and topk_weights.device == x.device):
            return x, topk_ids, topk_weights
    x = check_tensor(op, "x", x, ndim=2, dtype=_FLOAT_DTYPES)
    T = x.shape[0]
    if hidden is not None and x.shape[1] != hidden:
        raise MoeCommValueError(f"{op}: x must have shape [*, {hidden}], got {list(x.shape)}")
    if dtype is not None and x.dtype != dtype:
        raise MoeCommTypeError(f"{op}: x must have dtype {str(dtype).replace('torch.', '')}, "
                               f"got {str(x.dtype).replace('torch.', '')}")
    ids = check_tensor(op, "topk_ids", topk_ids, shape=[T, top_k], dtype=_ID_DTYPES, device=x.device)
    k = ids.shape[1]
    if k < 1:
        raise MoeCommValueError(f"{op}: topk_ids must have at least 1 column, got shape {list(ids.shape)}")
    w = check_tensor(op, "topk_weights", topk_weights, shape=[T, k], dtype=_FLOAT_DTYPES, device=x.device)
    return x, ids, w


def _local(x, ids, w, E, check, op, async_op):
    """EP size 1 without force_exchange: LocalDispatcher's permute, no exchange and no host sync
    unless the ids are checked."""
    T, H = x.shape
    k = ids.shape[1]
    if check and T > 0 and bool(((ids < 0) | (ids >= E)).any()):
        raise MoeCommValueError(f"{op}: topk_ids must be in [0, {E}), got values in "
                                f"[{int(ids.min())}, {int(ids.max())}]")
    from ..local import LocalDispatcher

    res = LocalDispatcher(E, k, validate=False).dispatch_unchecked(x, ids.contiguous(), w.float())  # checked above
    res.handle = EPHandle(None, 1, [T], [T], None, None, T, H, T * k, local=res.handle)
    return _Done(res) if async_op else res


def _dispatch(x, topk_ids, topk_weights, *, group, placement: ExpertPlacement, rank: int, ep_size: int,
              e2r: torch.Tensor, e2l: torch.Tensor, hidden, top_k, dtype, async_op: bool, validate: bool,
              op: str, force_exchange: bool = False, checked: bool = True, workspaces: dict | None = None,
              num_local_experts: int | None = None):
    """The throughput mode (see the module docstring); arguments as dispatch(). checked=False: the
    caller (the MoE forward) built x, topk_ids and topk_weights itself, so the argument checks are
    skipped (validate still decides the device check of the ids). workspaces: the dispatcher's
    Workspace per stream (None: every scratch tensor new); num_local_experts: L, when the caller
    knows it (the placement counts it in O(E) otherwise).

    Host work per call (kernel path): the plan's launch, the count exchange (1 all_to_all_single,
    1 device-to-host copy: the sync), the allocations (native path: 1, the received rows with the
    result's int32 indices, the send rows in the stream's Scratch; Python path: 3), the pack's
    launch, the rows' all_to_all_single, the expansion's 2 launches."""
    W = ep_size
    if not checked:
        x, ids, w = x, topk_ids, topk_weights
    else:
        try:
            x, ids, w = _validate(op, x, topk_ids, topk_weights, hidden, top_k, dtype)
        except (MoeCommValueError, MoeCommTypeError) as exc:
            if W > 1:
                _report(exc)
                # the group's device, not x's: x is what was wrong, and NCCL needs a CUDA tensor
                _fail_peers(group, W, _group_device(group), op, _FLAG_BAD_ARGS)
            raise
    T, H = x.shape
    k = ids.shape[1]
    E = placement.num_experts
    L = placement.num_local_experts(rank) if num_local_experts is None else num_local_experts
    dev = x.device
    if e2r.device != dev:  # the caller's guess of x's device was wrong (a DLPack array, say)
        e2r, e2l = _placement_maps(placement, dev)
    check = device_checks_allowed(validate)
    if W == 1 and not force_exchange:
        return _local(x, ids, w, E, check, op, async_op)

    ws = _workspace(workspaces, dev) if workspaces is not None else None
    nat = _native.for_call(group, dev, async_op) if ws is not None else None
    key = (x.dtype, ids.dtype, w.dtype, dev.index)  # a family's kernels are loaded on one device
    plan = None
    if nat is not None:  # plan, count exchange and the sync in one native call
        plan = _phases.counts_phase(nat, key, ws, ids, e2r, e2l, W, check, group, op)
        if plan is None:
            nat = None
        else:
            send_splits, recv_splits, recv_pairs, flags = _parse_flat(ws.host_counts_list((2, W, 3)), W)
    if plan is None:
        plan = plan_send(ids, e2r, e2l, W, check_ids=check, workspace=ws)
        send_splits, recv_splits, recv_pairs, flags = _exchange_counts(plan.info, group, op, plan.counts, ws,
                                                                       plan.counts_recv)
    me_bad = flags[rank]
    if me_bad:
        lo, hi = int(ids.min()), int(ids.max())
        exc = MoeCommValueError(f"{op}: topk_ids must be in [0, {E}), got values in [{lo}, {hi}]")
        _report(exc)
        raise exc
    for j, f in enumerate(flags):
        if f:
            raise MoeCommValueError(f"{op}: rank {_global_rank(group, j)} failed: "
                                    f"{_FLAG_REASONS.get(f, f'error flag {f}')}")
    S, R, N = sum(send_splits), sum(recv_splits), sum(recv_pairs)
    layout = RowLayout.of(H, k, x.dtype)
    if nat is not None:  # pack, the rows' exchange and the expansion in one native call
        # the received rows, home, the expansion's outputs and a copy of the counts: one allocation,
        # owned by the result, its views made when read (the templates take their addresses); the
        # send buffer is the stream's Scratch
        outputs = DispatchOutputs(T, k, R, N, L, dev, W, rows=(layout.width, x.dtype))
        ex = _phases.rows_phase(nat, key, ws, x, w, plan, layout, outputs, send_splits, recv_splits, L, N, group, op)
        if ex is outputs:
            handle = NativeHandle(group, W, send_splits, recv_splits, outputs, T, H, N, nat)
            return NativeResult(outputs.received(H), outputs, handle)
        home = outputs.home
        if ex is not None:  # the reference's expansion (new tensors)
            handle = EPHandle(group, W, send_splits, recv_splits, home, ex.slot_pos, T, H, N)
            return DispatchResult(outputs.received(H), ex.expert_offsets, ex.tokens_per_expert, ex.row_weights,
                                  ex.gather_idx, handle)
        recv = outputs.received()
    else:
        # home and the expansion's outputs: one int32 allocation, owned by the result
        home, outputs = dispatch_outputs(T, k, R, N, L, dev)
        recv = x.new_empty((R, layout.width))
    send = x.new_empty((S, layout.width))  # [S, width]: tokens and metadata, one exchange
    pack_send(x, w, plan, layout, send, home)
    works = [_all_to_all(recv, send, recv_splits, send_splits, group, f"{op}: all_to_all", async_op)]

    def finish(works):
        if async_op:
            _wait_all(works, group, f"{op}: all_to_all")
        ex = expand_received(recv, layout, L, N, out=outputs, workspace=ws)
        handle = EPHandle(group, W, send_splits, recv_splits, home, ex.slot_pos, T, H, N)
        return DispatchResult(recv[:, :H], ex.expert_offsets, ex.tokens_per_expert, ex.row_weights, ex.gather_idx,
                              handle)

    return PendingDispatch(works, finish) if async_op else finish(works)


def _dispatch_static(x, ids, w, *, group, bufs: _StaticBuffers, rank: int, ep_size: int, e2r, e2l, L: int,
                     check: bool, async_op: bool, op: str, index: _StaticIndex | None = None):
    """The static-capacity mode (see the module docstring): no host sync, fixed shapes."""
    T, H = x.shape
    lay = bufs.layout
    ws = index.workspace if index is not None else None
    plan = plan_send(ids, e2r, e2l, ep_size, check_ids=check, workspace=ws)
    # rows this step leaves empty must read as empty at the receiver: their ids -1
    bufs.send_ids.fill_(-1)
    home = bufs.home[:T]
    pack_send(x, w, plan, lay, bufs.send, home, capacity=bufs.capacity, overflow=bufs.overflow)
    works = [_all_to_all(bufs.recv, bufs.send, None, None, group, f"{op}: all_to_all", async_op)]

    def finish(works):
        if async_op:
            _wait_all(works, group, f"{op}: all_to_all")
        ex = expand_received(bufs.recv, lay, L, None, out=index.outputs if index is not None else None, workspace=ws)
        handle = EPHandle(group, ep_size, None, None, home, ex.slot_pos, T, H, ex.gather_idx.shape[0], buffers=bufs)
        return DispatchResult(bufs.recv[:, :H], ex.expert_offsets, ex.tokens_per_expert, ex.row_weights,
                              ex.gather_idx, handle)

    return PendingDispatch(works, finish) if async_op else finish(works)


def combine(expert_out: Any, handle: EPHandle, async_op: bool = False) -> torch.Tensor | PendingCombine:
    """Bring expert outputs home and sum them per token: the reverse of dispatch.

    The routing weights must already be applied to ``expert_out`` (row_weights, in the down GEMM's
    epilogue): combine is an unweighted sum. The receiver sums a token's rows over its local
    experts before they travel back (fp32 accumulation), the source rank sums the partials.

    Args:
        expert_out: [N, H] fp32/fp16/bf16, row i = the output of expanded row i of the dispatch
            result (the rows ``gather_idx`` selected, in the same order; static mode: N = R * k,
            the padding rows after expert_offsets[L] are never read).
        handle: DispatchResult.handle of the matching dispatch.
        async_op: return a PendingCombine whose ``wait()`` gives y, so the caller can compute meanwhile.

    Returns:
        y [T, H] of expert_out's dtype on the source rank (or a PendingCombine).
    """
    op = "combine"
    if not isinstance(handle, EPHandle):
        raise MoeCommTypeError(f"{op}: handle must be the EPHandle of a dispatch result, got {type(handle).__name__}")
    if handle.outputs is not None:  # a native dispatch's (its slot_pos is made when read)
        dev = handle.outputs.base.device
    else:
        dev = handle.slot_pos.device if handle.slot_pos is not None else None
    try:
        out = check_tensor(op, "expert_out", expert_out, shape=[handle.num_rows, handle.hidden], dtype=_FLOAT_DTYPES,
                           device=dev)
    except (MoeCommValueError, MoeCommTypeError) as exc:
        # the peers will wait in the reverse all_to_all until the group's timeout; the report lets
        # their explain_failure name this rank
        if handle.ep_size > 1 or handle.local is None:
            _report(exc)
        raise
    return _combine(out, handle, async_op, op)


def _combine(out: torch.Tensor, handle: EPHandle, async_op: bool, op: str) -> torch.Tensor | PendingCombine:
    """combine without checks: ``out`` [N, H] is right (checked by combine, or the MoE forward's own)."""
    if handle.local is not None:
        from ...permute.api import unpermute_unchecked

        y = unpermute_unchecked(out, handle.local, None)  # [T, H]
        return _Done(y) if async_op else y
    if handle.op_handle is not None and (handle.buffers is None or torch.compiler.is_compiling()):
        # static mode, a handle made under torch.compile (or compiling now): one opaque node (static_ops.py)
        y = _sops.ep_static_combine(out, handle.slot_pos, handle.home, handle.op_handle)
        return _Done(y) if async_op else y
    # the indices are the handle's: the ops run without re-checking
    bufs = handle.buffers
    if bufs is None:
        R, S, H = sum(handle.recv_splits), sum(handle.send_splits), handle.hidden
        if out.requires_grad and torch.is_grad_enabled():
            # through the op, which records the sum (the exchange without a process group is a copy_)
            partial = gather_sum_unchecked(out, handle.slot_pos)  # [R, H]: summed over local experts
            back = out.new_empty((S, H))  # [S, H]
        else:
            nat = _native.for_combine(handle, out.device, async_op)
            if nat is not None:  # the sum, the exchange back and the source's sum in one native call
                y = _phases.back_phase(nat, out, handle, op)
                if y is not None:
                    return y
            # one allocation: [R, H] sent back, [S, H] received (both views in one call)
            partial, back = torch.split_with_sizes(out.new_empty((R + S, H)), [R, S])
            _gather_sum_into(out, handle.slot_pos, partial)  # summed over local experts
        splits_out, splits_in = handle.send_splits, handle.recv_splits
    else:
        if out.dtype != bufs.partial.dtype:
            raise MoeCommTypeError(f"{op}: expert_out must have dtype {str(bufs.partial.dtype).replace('torch.', '')} "
                                   f"(the dispatcher's), got {str(out.dtype).replace('torch.', '')}")
        partial, back = bufs.partial, bufs.back
        _gather_sum_into(out, handle.slot_pos, partial)
        splits_out = splits_in = None
    works = [_all_to_all(back, partial, splits_out, splits_in, handle.group, f"{op}: all_to_all", async_op)]

    def finish(works):
        if async_op:
            _wait_all(works, handle.group, f"{op}: all_to_all")
        if back.requires_grad:
            return gather_sum_unchecked(back, handle.home)  # [T, H], recorded
        return _gather_sum_new(back, handle.home)  # [T, H]

    return PendingCombine(works, finish) if async_op else finish(works)


def dispatch(
    x: Any,
    topk_ids: Any,
    topk_weights: Any,
    group: Any = None,
    placement: ExpertPlacement | None = None,
    async_op: bool = False,
    *,
    num_experts: int | None = None,
    validate: bool = True,
) -> DispatchResult | PendingDispatch:
    """Send each token to the ranks holding its top-k experts; functional form of EPDispatcher.dispatch.

    Does not check that the ranks agree on the configuration (EPDispatcher does, once, at set-up).

    Args:
        x: [T, H] fp32/fp16/bf16 tokens of this rank (a torch tensor or a DLPack array; T may be 0).
        topk_ids: [T, k] int32/int64 global expert ids in [0, E).
        topk_weights: [T, k] fp32/fp16/bf16 routing weights.
        group: the expert-parallel process group (None: the default group, or no group at all).
        placement: expert -> rank map with ep_size = the group's size; None: contiguous blocks of
            ``num_experts``.
        async_op: return a PendingDispatch to ``wait()`` on.
        num_experts: E, needed when ``placement`` is None.
        validate: check the ids on the device (costs no extra sync for W > 1: the flag rides on the
            count exchange; one sync for W = 1). Skipped anyway under CUDA-graph capture and compile.

    Returns:
        DispatchResult: tokens [R, H] received rows, gather_idx [N] int32, expert_offsets [L + 1]
        int32, tokens_per_expert [L] int32, row_weights [N] fp32, handle for combine.
    """
    op = "dispatch"
    rank, W = _group_info(group)
    if placement is None:
        if num_experts is None:
            raise MoeCommValueError(f"{op}: placement or num_experts must be given, got neither")
        placement = ExpertPlacement(check_positive_int(op, "num_experts", num_experts), W)
    if not isinstance(placement, ExpertPlacement):
        raise MoeCommTypeError(f"{op}: placement must be an ExpertPlacement, got {type(placement).__name__}")
    if placement.ep_size != W:
        raise MoeCommValueError(f"{op}: placement.ep_size must be {W} (the group's size), got {placement.ep_size}")
    dev = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    e2r, e2l = _placement_maps(placement, dev)
    return _dispatch(x, topk_ids, topk_weights, group=group, placement=placement, rank=rank, ep_size=W,
                     e2r=e2r, e2l=e2l, hidden=None, top_k=None, dtype=None, async_op=async_op,
                     validate=validate, op=op)


_current_stream = getattr(torch._C, "_cuda_getCurrentStream", None)  # (stream id, device, type); ~0.3 us


def _stream_key(device: torch.device):
    """Which stream the calls on ``device`` queue on now (CPU: None)."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    if _current_stream is not None:
        return _current_stream(index)[0]
    return torch.cuda.current_stream(index).cuda_stream


def _workspace(workspaces: dict, device: torch.device) -> Workspace:
    """The dispatcher's Workspace for the current stream of ``device`` (made on first use)."""
    key = (device, _stream_key(device))
    ws = workspaces.get(key)
    if ws is None:
        if len(workspaces) >= 16:  # streams come and go (a stream per micro-batch, say): keep a few
            workspaces.clear()
        ws = workspaces[key] = Workspace(device)
    return ws


@functools.lru_cache(maxsize=64)
def _placement_maps(placement: ExpertPlacement, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    # the [E] tables copied to the device once per placement, not once per call
    return placement.expert_to_rank_tensor(device), placement.expert_to_local_tensor(device)


# static-mode buffers shared by the dispatchers that ask for it (EPDispatcher(share_buffers=True))
_SHARED_BUFFERS: dict[tuple, _StaticBuffers] = {}


class EPDispatcher:
    """Expert-parallel dispatcher of one MoE layer (implements moecomm.ep.types.Dispatcher).

    Args:
        num_experts: E, global experts.
        top_k: k, experts per token.
        hidden: H.
        group: the expert-parallel process group (None: the default group; a single process
            without torch.distributed is EP size 1).
        placement: expert -> rank map; None: contiguous blocks (E not divisible by W is fine).
        dtype: the token dtype every call must use (None: any of fp32/fp16/bf16; required with
            max_tokens).
        max_tokens: static-capacity mode for calls of at most this many tokens per rank (decode):
            buffers allocated here, no host sync, CUDA-graph capturable; larger calls run the
            throughput mode. None: always the throughput mode.
        capacity_per_peer: C, rows a rank may send to one peer in static mode (default
            max_tokens: a token goes at most once to each rank, so it never overflows). Smaller
            C moves fewer bytes; a step that needs more sets the overflow flag (check_overflow()).
        force_exchange: at EP size 1, run the exchange path over the one-rank group instead of the
            local permute (benchmarks measure the path's cost on one GPU this way).
        share_buffers: static mode: use the one set of buffers that every dispatcher of the same
            group, sizes and dtype shares in this process (the MoE layers of a model, which run one
            after another: 61 layers of DeepSeek-V3 at EP 8 would hold ~3.5 GB of buffers apart).
            A dispatch result then stays valid until the next dispatch of ANY sharing dispatcher.

    Every rank of the group must construct it (a set-up collective checks that all ranks agree on
    E, k, H, dtype, placement and the static-mode sizes, raising on every rank otherwise).

    Example:
        disp = EPDispatcher(64, 8, 4096, group=ep_group, dtype=torch.bfloat16, max_tokens=128)
        d = disp.dispatch(x, topk_ids, topk_weights)     # static mode when x has <= 128 rows
        y = disp.combine(expert_mlp(d.tokens[d.gather_idx]) * d.row_weights[:, None], d.handle)
        disp.check_overflow()                            # when the caller syncs anyway
    """

    def __init__(self, num_experts: int, top_k: int, hidden: int, *, group: Any = None,
                 placement: ExpertPlacement | None = None, dtype: torch.dtype | None = None,
                 max_tokens: int | None = None, capacity_per_peer: int | None = None, force_exchange: bool = False,
                 share_buffers: bool = False):
        op = "EPDispatcher"
        self.num_experts = check_positive_int(op, "num_experts", num_experts)
        self.top_k = check_positive_int(op, "top_k", top_k)
        self.hidden = check_positive_int(op, "hidden", hidden)
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise MoeCommTypeError(f"{op}: dtype must be float32, float16, bfloat16 or None, got {dtype}")
        if top_k > num_experts:
            raise MoeCommValueError(f"{op}: top_k must be <= num_experts ({num_experts}), got {top_k}")
        self.group = group
        self.rank, self.ep_size = _group_info(group)
        if placement is None:
            placement = ExpertPlacement(num_experts, self.ep_size)
        if not isinstance(placement, ExpertPlacement):
            raise MoeCommTypeError(f"{op}: placement must be an ExpertPlacement, got {type(placement).__name__}")
        if placement.ep_size != self.ep_size or placement.num_experts != num_experts:
            raise MoeCommValueError(f"{op}: placement must be for {num_experts} experts on {self.ep_size} ranks, "
                                    f"got {placement.num_experts} experts on {placement.ep_size} ranks")
        self.placement = placement
        self.dtype = dtype
        self.num_local_experts = placement.num_local_experts(self.rank)
        self.local_experts = placement.local_experts(self.rank)
        self.force_exchange = bool(force_exchange)
        self._static: _StaticBuffers | None = None
        self._static_index: _StaticIndex | None = None
        self._pending_static: tuple | None = None  # static mode without a process group: sizes until the first call
        self._workspaces: dict = {}  # throughput mode: (device, stream) -> Workspace (plan.py says what lives there)
        self._op_handle = _sops.REGISTRY.add(self)  # what torch.compile's static-mode ops find it by
        if max_tokens is not None:
            check_positive_int(op, "max_tokens", max_tokens)
            cap = max_tokens if capacity_per_peer is None else check_positive_int(op, "capacity_per_peer", capacity_per_peer)
            if cap > max_tokens:
                raise MoeCommValueError(f"{op}: capacity_per_peer must be <= max_tokens ({max_tokens}), got {cap}")
            if dtype is None:
                raise MoeCommValueError(f"{op}: dtype must be given with max_tokens (the static buffers' dtype), got None")
            if self.ep_size > 1 or self.force_exchange:
                self._pending_static = (max_tokens, cap, dtype, bool(share_buffers))
                import torch.distributed as dist

                if dist.is_available() and dist.is_initialized():  # else on the first call's device
                    self._resolve_static(_group_device(group))
        elif capacity_per_peer is not None:
            raise MoeCommValueError(f"{op}: capacity_per_peer needs max_tokens, got max_tokens=None")
        if self.ep_size > 1:
            from ...distributed import check_agreement

            check_agreement(group, op, num_experts=num_experts, top_k=top_k, hidden=hidden,
                            dtype=str(dtype), ep_size=self.ep_size, placement=placement.describe(),
                            max_tokens=max_tokens, capacity_per_peer=capacity_per_peer)

    def _resolve_static(self, device: torch.device) -> None:
        """Allocate (or find the shared) static buffers on ``device``: the group's device, or without a
        process group (force_exchange on one rank) the device of the first dispatch."""
        max_tokens, capacity, dtype, share = self._pending_static
        self._pending_static = None
        if not share:
            self._static = self._allocate(max_tokens, capacity, dtype, device)
        else:
            key = (id(self.group), self.ep_size, max_tokens, capacity, self.hidden, self.top_k, dtype, device)
            if key not in _SHARED_BUFFERS:
                _SHARED_BUFFERS[key] = self._allocate(max_tokens, capacity, dtype, device)
            self._static = _SHARED_BUFFERS[key]
        rows, k, L = self.ep_size * capacity, self.top_k, self.num_local_experts
        ws = Workspace(device)
        outputs = None
        if choose(self._static.send, "ep_plan") is Impl.TRITON:  # the kernel path: scratch and outputs made here
            from .plan import expand_scratch_elems, plan_scratch_elems

            ws.reserve(max(plan_scratch_elems(max_tokens, k, self.ep_size), expand_scratch_elems(rows, k, L)))
            ws.semaphore  # noqa: B018 (made here, not inside a CUDA graph's capture)
            if L:
                outputs = dispatch_outputs(0, k, rows, rows * k, L, device)[1]
        self._static_index = _StaticIndex(ws, outputs)

    def _allocate(self, max_tokens: int, capacity: int, dtype: torch.dtype, dev: torch.device) -> _StaticBuffers:
        lay = RowLayout.of(self.hidden, self.top_k, dtype)
        rows = self.ep_size * capacity
        send = torch.zeros((rows, lay.width), dtype=dtype, device=dev)
        return _StaticBuffers(
            capacity, max_tokens, lay,
            send=send,
            recv=torch.zeros((rows, lay.width), dtype=dtype, device=dev),
            partial=torch.zeros((rows, self.hidden), dtype=dtype, device=dev),
            back=torch.zeros((rows, self.hidden), dtype=dtype, device=dev),
            home=torch.full((max_tokens, self.top_k), -1, dtype=torch.int32, device=dev),
            overflow=torch.zeros(1, dtype=torch.int32, device=dev),
            send_ids=send.view(torch.int32)[:, lay.meta_col:lay.meta_col + self.top_k],
        )

    @property
    def max_tokens(self) -> int | None:
        """Tokens per rank up to which a call runs the static-capacity mode (None: never)."""
        if self._pending_static is not None:
            return self._pending_static[0]
        return self._static.max_tokens if self._static is not None else None

    def dispatch(self, x: Any, topk_ids: Any, topk_weights: Any, *, async_op: bool = False,
                 validate: bool = True) -> DispatchResult | PendingDispatch:
        """Send tokens to their experts' ranks; see moecomm.ep.nccl.dispatcher.dispatch for the arguments.

        Args:
            x: [T, H] tokens (dtype as constructed, if given).
            topk_ids: [T, k] int32/int64 global expert ids.
            topk_weights: [T, k] routing weights.
            async_op: return a PendingDispatch.
            validate: check ids on the device (throughput mode: the flag rides on the count
                exchange; static mode: no check, ids are clamped, never out of bounds).
        """
        op = "EPDispatcher.dispatch"
        if self._static_fits(x) and torch.compiler.is_compiling():
            x, ids, w = _validate(op, x, topk_ids, topk_weights, self.hidden, self.top_k, self.dtype)
            return self._dispatch_compiled(x, ids, w, async_op)
        dev = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
        e2r, e2l = _placement_maps(self.placement, dev)
        if self._pending_static is not None:
            self._resolve_static(dev)
        bufs = self._static
        if bufs is not None and isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] <= bufs.max_tokens:
            try:
                x, ids, w = _validate(op, x, topk_ids, topk_weights, self.hidden, self.top_k, self.dtype)
                if x.device != bufs.send.device:
                    raise MoeCommValueError(f"{op}: x must be on device {bufs.send.device} (the dispatcher's), got {x.device}")
            except (MoeCommValueError, MoeCommTypeError) as exc:
                _report(exc)  # the peers wait in the exchange and then name this rank
                raise
            return _dispatch_static(x, ids, w, group=self.group, bufs=bufs, rank=self.rank, ep_size=self.ep_size,
                                    e2r=e2r, e2l=e2l, L=self.num_local_experts, check=False, async_op=async_op, op=op,
                                    index=self._static_index)
        return _dispatch(x, topk_ids, topk_weights, group=self.group, placement=self.placement, rank=self.rank,
                         ep_size=self.ep_size, e2r=e2r, e2l=e2l, hidden=self.hidden, top_k=self.top_k,
                         dtype=self.dtype, async_op=async_op, validate=validate, op=op,
                         force_exchange=self.force_exchange, workspaces=self._workspaces,
                         num_local_experts=self.num_local_experts)

    def combine(self, expert_out: Any, handle: EPHandle, *, async_op: bool = False) -> torch.Tensor | PendingCombine:
        """y [T, H] = per token, the sum of its expert outputs (weights already applied); see combine()."""
        return combine(expert_out, handle, async_op=async_op)

    def dispatch_unchecked(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *,
                           async_op: bool = False, validate: bool = True) -> DispatchResult | PendingDispatch:
        """dispatch without the argument checks, for the MoE forward: x [T, H] of the layer's dtype
        (checked once by the layer), topk_ids [T, k] int32 and topk_weights [T, k] fp32 from route().
        ``validate`` still checks the ids on the device in throughput mode (free for W > 1: the flag
        rides on the count exchange)."""
        if self._static_fits(x) and torch.compiler.is_compiling():
            return self._dispatch_compiled(x, topk_ids, topk_weights, async_op)
        e2r, e2l = _placement_maps(self.placement, x.device)
        if self._pending_static is not None:
            self._resolve_static(x.device)
        bufs = self._static
        if bufs is not None and x.shape[0] <= bufs.max_tokens:
            return _dispatch_static(x, topk_ids, topk_weights, group=self.group, bufs=bufs, rank=self.rank,
                                    ep_size=self.ep_size, e2r=e2r, e2l=e2l, L=self.num_local_experts, check=False,
                                    async_op=async_op, op="EPDispatcher.dispatch", index=self._static_index)
        return _dispatch(x, topk_ids, topk_weights, group=self.group, placement=self.placement, rank=self.rank,
                         ep_size=self.ep_size, e2r=e2r, e2l=e2l, hidden=self.hidden, top_k=self.top_k,
                         dtype=self.dtype, async_op=async_op, validate=validate, op="EPDispatcher.dispatch",
                         force_exchange=self.force_exchange, checked=False, workspaces=self._workspaces,
                         num_local_experts=self.num_local_experts)

    # ------------------------------------------------------------- static mode under torch.compile

    def _static_fits(self, x: Any) -> bool:
        mt = self.max_tokens
        return mt is not None and isinstance(x, torch.Tensor) and x.dim() == 2 and x.shape[0] <= mt

    def _static_rows(self) -> int:
        """R = W * C, the static mode's received rows."""
        cap = self._pending_static[1] if self._pending_static is not None else self._static.capacity
        return self.ep_size * cap

    def _dispatch_compiled(self, x, ids, w, async_op):
        """The static mode as one opaque op (static_ops.py); the result built from its outputs."""
        tokens, offsets, tpe, row_w, gather_idx, home, slot_pos = _sops.ep_static_dispatch.op(x, ids, w, self._op_handle)
        T, H = x.shape
        handle = EPHandle(self.group, self.ep_size, None, None, home, slot_pos, T, H, gather_idx.shape[0],
                          op_handle=self._op_handle)
        res = DispatchResult(tokens, offsets, tpe, row_w, gather_idx, handle)
        return _Done(res) if async_op else res

    def _static_dispatch_eager(self, x, ids, w) -> DispatchResult:
        """static_ops' dispatch body: the eager static mode (buffers resolved on x's device first)."""
        if self._pending_static is not None:
            self._resolve_static(x.device)
        bufs = self._static
        if x.device != bufs.send.device:
            raise MoeCommValueError(f"EPDispatcher.dispatch: x must be on device {bufs.send.device} (the "
                                    f"dispatcher's), got {x.device}")
        e2r, e2l = _placement_maps(self.placement, x.device)
        return _dispatch_static(x, ids, w, group=self.group, bufs=bufs, rank=self.rank, ep_size=self.ep_size, e2r=e2r,
                                e2l=e2l, L=self.num_local_experts, check=False, async_op=False,
                                op="EPDispatcher.dispatch", index=self._static_index)

    def _static_combine_eager(self, expert_out, slot_pos, home) -> torch.Tensor:
        """static_ops' combine body: the eager static combine over this dispatcher's buffers."""
        handle = EPHandle(self.group, self.ep_size, None, None, home, slot_pos, home.shape[0], expert_out.shape[1],
                          expert_out.shape[0], buffers=self._static)  # no op_handle: the eager body
        return _combine(expert_out, handle, False, "combine")

    def combine_unchecked(self, expert_out: torch.Tensor, handle: EPHandle, *,
                          async_op: bool = False) -> torch.Tensor | PendingCombine:
        """combine without checks, for the MoE forward (expert_out [N, H] from its expert_mlp)."""
        return _combine(expert_out, handle, async_op, "combine")

    def overflowed(self) -> bool:
        """Whether a static-mode step since the last check_overflow() had more rows for a peer than
        capacity_per_peer (one device read: a host sync)."""
        return self._static is not None and bool(self._static.overflow.item())

    def check_overflow(self) -> None:
        """Raise (and clear the flag) if a static-mode step dropped rows; call it where you sync anyway.

        Raises:
            MoeCommValueError naming this rank, the capacity and what to change.
        """
        if self.overflowed():
            self._static.overflow.zero_()
            raise MoeCommValueError(
                f"EPDispatcher: capacity_per_peer must hold every row a rank sends to one peer, got "
                f"{self._static.capacity} rows on rank {_global_rank(self.group, self.rank) if self.ep_size > 1 else 0}, "
                "which a step exceeded: rows were dropped from that step (raise capacity_per_peer, up to max_tokens)")
