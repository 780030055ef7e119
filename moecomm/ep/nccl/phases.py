"""The throughput mode's three native phases (native.py), each queued from its Template when one
of its shapes exists, else recorded (and its template kept).

    plan = counts_phase(...)       # plan + count exchange + the sync: depends on T, k, W (the ids' address patched)
    rows_phase(...)                # pack + the rows' exchange + the expansion
    y = back_phase(...)            # the receiver's sum + the exchange back + the source's sum

A template is valid for a call when everything its launches depend on besides the sources'
addresses and the exchanges' splits is in its key, and the Workspace it points into is the one
of the call (templates live in its memo, which it clears when its buffer grows; one recorded while
it grew is not kept). The count phase's program depends on the
shapes of the ids only. The other two read the counts on the device (the exchanged [2, W, 3]
counts, copied into the dispatch's result so that its combine reads its own): S, R and N are
not host ints of their launches, whose grids cover a bucket of R (_triton.DeviceCounts.bucket: 1/8
of R's power of two); so their keys hold shapes, strides, dtypes and R's bucket, and a step whose
routing changes the counts patches the splits. Templates are only kept when the phase ran the
kernel path (the reference ops run eagerly while a phase records, outside its program).
"""

from __future__ import annotations

import torch

from ...jit.backend import Impl, choose
from . import native as _native
from .ops import _triton_kernels
from .plan import expand_received, pack_send, plan_send, rows_scratch
from .reference import gather_sum_reference

TEMPLATES = True  # False: every phase recorded (tests and benchmarks compare the two)
_BACK_TEMPLATES: dict = {}  # combine's Templates by shapes (their programs point only into their sources)


def counts_phase(nat, key, ws, ids, e2r, e2l, W: int, check: bool, group, op: str):
    """plan_send + the count exchange + its copy to ws's pinned host counts + the wait: the
    SendPlan, or None (it runs in Python)."""
    T, k = ids.shape
    what = f"{op}: count exchange"
    host = ws.host_counts((2, W, 3))
    kernels = choose(ids, "ep_plan") is Impl.TRITON
    tkey = ("native-counts", T, k, W, ids.dtype, ids.stride(), check, e2r.data_ptr(), e2l.data_ptr())
    tpl = ws.memo(tkey) if kernels and TEMPLATES else None
    if tpl is not None and tpl.run(nat, [ids.data_ptr()], what, group):
        return tpl.result

    def record(rec):
        p = plan_send(ids, e2r, e2l, W, check_ids=check, workspace=ws)
        rec.all_to_all(p.counts_recv, p.info, 12, [1] * W, [1] * W)  # [W, 3] int32: 12 bytes a peer
        rec.to_host(host, p.counts)
        return p

    cap = ws.capacity
    tpl = _native.phase(nat, key, what, group, record, (ids,))
    if tpl is False:
        return None
    if tpl.reusable and kernels and ws.capacity == cap:  # ws forgets it when its buffer grows
        ws.keep(tkey, tpl)
    return tpl.result


def rows_phase(nat, key, ws, x, w, plan, layout, outputs, send_splits, recv_splits, L: int, N: int, group, op: str):
    """pack_send into the stream's Scratch + the rows' exchange into ``outputs``' received rows +
    expand_received into ``outputs`` (a DispatchOutputs with rows and counts, which get the
    dispatch's counts): ``outputs``, or the reference's new Expanded, or None (it runs in Python)."""
    R = outputs.num_rows
    dc = _triton_kernels().DeviceCounts
    # L 0: the expansion is torch ops, not a program
    kernels = L > 0 and choose(x, "ep_pack") is Impl.TRITON and choose(x, "ep_expand") is Impl.TRITON
    tkey = ("native-rows", x.shape, w.shape, x.stride(), w.stride(), x.dtype, w.dtype, L, dc.bucket(R) if R else 0)
    what = f"{op}: all_to_all"
    row_bytes = layout.width * x.element_size()
    scratch = rows_scratch(nat[2], x.device)
    send_at = scratch.address(sum(send_splits) * row_bytes)
    tpl = ws.memo(tkey) if kernels and TEMPLATES else None
    if tpl is not None and tpl.run(nat, [x.data_ptr(), w.data_ptr(), send_at, outputs.rows_address(),
                                         *outputs.addresses()], what, group, (send_splits + recv_splits,)):
        return outputs
    W = len(send_splits)
    send = scratch.view((sum(send_splits), layout.width), x.dtype)
    recv = outputs.received()
    home = outputs.home
    sources = (x, w, send, recv, home, outputs.slot_pos, outputs.gather_idx, outputs.row_weights,
               outputs.tokens_per_expert, outputs.expert_offsets, outputs.counts)  # the order of the addresses above

    def record(rec):
        # the counts stay with the result (its combine reads them): copied by the expansion's first
        # launch where it has one (R > 0 on the kernel path), else by a device copy
        by_kernel = kernels and R > 0
        if not by_kernel:
            rec.copy(outputs.counts, plan.counts)
        pack_send(x, w, plan, layout, send, home, device_rows=True)
        rec.all_to_all(recv, send, row_bytes, send_splits, recv_splits)
        return expand_received(recv, layout, L, N, out=outputs, workspace=ws, counts=dc(outputs.counts, W),
                               counts_from=plan.counts if by_kernel else None)

    cap = ws.capacity
    tpl = _native.phase(nat, key, what, group, record, sources)
    if tpl is False:
        return None
    # kept only when ws did not grow while recording: the plan (made before) lives in the old
    # buffer then, which the program would read on every later call
    if tpl.reusable and kernels and ws.capacity == cap:
        ws.keep(tkey, tpl)
    return tpl.result


def back_phase(nat, out: torch.Tensor, handle, op: str):
    """combine's sum of ``out`` [N, H] into the partial sums [R, H], the exchange of those into the
    returned rows [S, H] (both in the stream's Scratch), and the sum of these into a new [T, H]:
    that tensor, or None (it runs in Python)."""
    T, H, W = handle.num_tokens, handle.hidden, handle.ep_size
    R, S = sum(handle.recv_splits), sum(handle.send_splits)
    scratch = rows_scratch(nat[2], out.device)  # the partial sums [R, H], then the rows back [S, H]
    p = scratch.address((R + S) * H * out.element_size())
    y = out.new_empty((T, H))
    what = f"{op}: all_to_all"
    outputs = handle.outputs
    fkey = (out.dtype, out.device.index)
    K = _triton_kernels()
    dc = K.DeviceCounts
    if outputs is None or not outputs.has_counts or choose(out, "ep_gather_sum") is not Impl.TRITON:
        partial, back = _rows(scratch, R, S, H, out.dtype)

        def record_plain(rec):  # host counts, no template
            _gather_sum_into(out, handle.slot_pos, partial)
            rec.all_to_all(back, partial, H * out.element_size(), handle.recv_splits, handle.send_splits)
            _gather_sum_into(back, handle.home, y)

        return y if _native.phase(nat, fkey, what, handle.group, record_plain) else None
    k = outputs.top_k
    tkey = (H, out.stride(), out.dtype, k, T, W, dc.bucket(R) if R else 0, fkey[1], nat[2])  # out: [N, H] (checked)
    splits = (handle.recv_splits + handle.send_splits,)
    tpl = _BACK_TEMPLATES.get(tkey) if TEMPLATES else None
    if tpl is not None:
        a = outputs.addresses()
        if tpl.run(nat, [out.data_ptr(), a[1], p, p + R * H * out.element_size(), a[0], y.data_ptr(), a[6]], what,
                   handle.group, splits):
            return y
    partial, back = _rows(scratch, R, S, H, out.dtype)
    cnt = outputs.counts
    sources = (out, handle.slot_pos, partial, back, handle.home, y, cnt)  # the order of the addresses above

    def record(rec):
        K.gather_sum_triton(out, handle.slot_pos, partial, counts=dc(cnt, W, rows=dc.RECV_ROWS, src=dc.RECV_PAIRS))
        rec.all_to_all(back, partial, H * out.element_size(), handle.recv_splits, handle.send_splits)
        K.gather_sum_triton(back, handle.home, y, counts=dc(cnt, W, src=dc.SENT_ROWS))

    tpl = _native.phase(nat, fkey, what, handle.group, record, sources)
    if tpl is False:
        return None
    if tpl.reusable:
        if len(_BACK_TEMPLATES) >= 64:
            _BACK_TEMPLATES.clear()
        _BACK_TEMPLATES[tkey] = tpl
    return y


def _rows(scratch, R: int, S: int, H: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """combine's partial sums [R, H] and the rows back [S, H], one after the other in ``scratch``."""
    return scratch.view((R, H), dtype), scratch.view((S, H), dtype, R * H * dtype.itemsize)


def _gather_sum_into(src: torch.Tensor, idx: torch.Tensor, out: torch.Tensor) -> None:
    """gather_sum written into a caller-owned buffer (the receiver's partial sums)."""
    if choose(src, "ep_gather_sum") is Impl.TRITON:
        _triton_kernels().gather_sum_triton(src, idx, out)
    else:
        out.copy_(gather_sum_reference(src, idx))


def _gather_sum_new(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """gather_sum into a new tensor, without the custom op's dispatch (nothing to record)."""
    if choose(src, "ep_gather_sum") is Impl.TRITON:
        return _triton_kernels().gather_sum_triton(src, idx)
    return gather_sum_reference(src, idx)
