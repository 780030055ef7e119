"""The send plan of NCCL dispatch, the packing of the send buffer, and the receiver's expansion.

# T = num_tokens (this rank), H = hidden, k = top_k, E = num_experts, W = ep_size,
# L = num_local_experts, S = rows sent, R = rows received, N = expanded rows (pairs), C = capacity

Row layout (RowLayout): one row per (token, destination rank) holds the token's H elements (padded
to whole 4-byte words), then 2k int32 words: the k local expert ids on that rank (-1 = a slot of
another rank) and the k fp32 routing weights as int32 bits (0 where the id is -1). Tokens and their
metadata travel in ONE all_to_all_single (one NCCL call fewer than rows and metadata apart; the
metadata adds 8k bytes to a row of 2H: 0.8% at H 4096, k 8).

Send side, all on the device, no host sync:
1. plan_send: each slot's rank and local expert, the dedup (a token goes ONCE to each rank that
   holds any of its experts: the first of its slots on that rank "owns" the row), the [W, 3] counts
   (rows, pairs, bad-id flag) the ranks exchange, and a stable counting sort of the owning slots by
   rank: rows grouped by rank, token order kept. One launch (_triton.py's ep_plan_kernel: its last
   program sums the blocks' histograms), no zeros fill.
2. pack_send: each row's token part and metadata; home [T, k], the row each owning slot's token was
   written to (-1 for the other slots), which combine reads to sum the returned rows.
   Throughput mode: S rows, rank w's at rank_offsets[w]. Static mode: W * C rows, rank w's at
   w * C; a rank's rows beyond C are not sent (never written out of bounds), and the overflow flag
   is set on the device.
Receive side: expand_received groups the received (row, local expert) pairs by local expert with
the same counting sort (rows of expert l ordered by source rank, token, slot), with each pair's
routing weight riding along: two launches reading the received rows' metadata in place.

Memory (the host cost of a call is mostly launches and allocations, ~16 and ~6 us each on the H200
host): the kernels' scratch (the plan's [T, k] arrays, the sorts' histograms, the [2, W, 3] counts)
comes from a Workspace, grow-only, that the dispatcher keeps per stream and reuses across calls;
what a dispatch hands its caller (home, slot_pos, gather_idx, row_weights, tokens_per_expert,
expert_offsets) is carved from ONE new int32 tensor per call (dispatch_outputs; the native
path's DispatchOutputs also holds the received rows), so it is the caller's to keep; the native
path's rows that never leave a call (send rows, combine's partial sums and returned rows) live in
a Scratch per stream (rows_scratch).
"""

from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass

import torch

from ...jit.backend import Impl, choose
from ...permute.api import permute_indices_unchecked, permute_indices_weighted_op
from .ops import _triton_kernels as _triton  # moecomm.ep.nccl._triton, imported on first use
from .reference import pack_send_reference, plan_send_reference



# ----------------------------------------------------------------------------- scratch and outputs

_ALIGN = 4  # int32 per 16 bytes: every carved part starts 16-byte aligned (what Triton specialises on)


def _carve(base: torch.Tensor, shapes: list[tuple[int, ...]], offsets: list[int]) -> list[torch.Tensor]:
    out = []
    for shape, off in zip(shapes, offsets):
        stride, st = [], 1
        for d in reversed(shape):
            stride.append(st)
            st *= d
        out.append(base.as_strided(shape, tuple(reversed(stride)), off))
    return out


def _layout(shapes: list[tuple[int, ...]]) -> tuple[list[int], int]:
    offsets, at = [], 0
    for shape in shapes:
        n = 1
        for d in shape:
            n *= d
        offsets.append(at)
        at += -(-n // _ALIGN) * _ALIGN
    return offsets, max(at, _ALIGN)


class Workspace:
    """Grow-only int32 scratch on one device, for the kernels of one dispatcher on one stream.

    What lives here: plan_send's SendPlan (rank, local, first, sort_row [T, k], rank_offsets [W + 1],
    counts [2, W, 3], the sort's histograms) and expand_received's histograms, each carved from
    offset 0 of one buffer (so they overlap), plus a pinned host copy of the counts. None of it is
    handed to a caller. That is safe because each part is written and then read by kernels that
    ONE call queues back to back on ONE stream (plan, count exchange, pack inside dispatch; the
    expansion's two launches inside its finish): a later call's kernels queue after them. Hence one
    Workspace per stream (EPDispatcher keys them by the current stream): two streams never share
    one. The views are made once per shape key and kept, so a call whose shapes repeat makes no
    view op and no allocation; growing replaces the buffer and forgets the kept views. Apart from
    the buffer, one int32 that stays 0 between launches (``semaphore``: the plan kernel's ticket).
    """

    MAX_KEYS = 64

    def __init__(self, device: torch.device):
        self.device = device
        self._buf: torch.Tensor | None = None
        self._memo: dict = {}
        self._host: dict = {}
        self._host_arrays: dict = {}
        self._sem: torch.Tensor | None = None

    @property
    def semaphore(self) -> torch.Tensor:
        """[1] int32, zero when no launch is using it (allocated once, never regrown)."""
        if self._sem is None:
            self._sem = torch.zeros(1, dtype=torch.int32, device=self.device)
        return self._sem

    @property
    def capacity(self) -> int:
        """int32 elements the buffer holds now."""
        return 0 if self._buf is None else self._buf.numel()

    def reserve(self, elems: int) -> torch.Tensor:
        """The buffer, grown to at least ``elems`` int32 (kept views are forgotten when it grows)."""
        if self._buf is None or self._buf.numel() < elems:
            self._buf = torch.empty(max(elems, 2 * self.capacity), dtype=torch.int32, device=self.device)
            self._memo.clear()
        return self._buf

    def memo(self, key):
        return self._memo.get(key)

    def keep(self, key, value):
        if len(self._memo) >= self.MAX_KEYS:
            self._memo.clear()
        self._memo[key] = value
        return value

    def host_counts(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A pinned int32 host tensor of ``shape`` (the count exchange's device-to-host copy lands here)."""
        t = self._host.get(shape)
        if t is None:
            t = self._host[shape] = torch.empty(shape, dtype=torch.int32, pin_memory=True)
        return t

    def host_counts_list(self, shape: tuple[int, ...]) -> list[int]:
        """host_counts(shape)'s values, flat, read through a ctypes array over its memory (~0.3 us;
        tolist() is ~10 us on the H200 host). Only after the copy into it has completed (the sync)."""
        a = self._host_arrays.get(shape)
        if a is None:
            t = self.host_counts(shape)
            a = self._host_arrays[shape] = (ctypes.c_int32 * t.numel()).from_address(t.data_ptr())
        return a[:]


class Scratch:
    """Grow-only device bytes for rows that never leave one native phase: a dispatch's send buffer
    (read by its exchange), combine's partial sums and the rows they come back as (read by its last
    sum). Shared by every dispatcher queueing on one stream (rows_scratch): each phase's kernels and
    exchange use it back to back on that stream, so a later phase's use queues after them. The
    phases' templates patch its address like a call's tensors' (it may move when it grows); a tensor
    view is only made when a phase records."""

    __slots__ = ("device", "buf")

    def __init__(self, device: torch.device):
        self.device, self.buf = device, None

    def address(self, nbytes: int) -> int:
        """The first byte of at least ``nbytes`` (grown 2x at a time; the old buffer goes back to
        torch's allocator on this stream, after the work queued on it)."""
        buf = self.buf
        if buf is None or buf.numel() < nbytes:
            self.buf = buf = torch.empty(max(nbytes, 2 * (0 if buf is None else buf.numel()), 4096), dtype=torch.uint8,
                                         device=self.device)
        return buf.data_ptr()

    def view(self, shape: tuple[int, ...], dtype: torch.dtype, offset: int = 0) -> torch.Tensor:
        """A contiguous tensor of ``shape`` and ``dtype`` at byte ``offset`` (reserved by address())."""
        n = 1
        for d in shape:
            n *= d
        return self.buf[offset:offset + n * dtype.itemsize].view(dtype).view(shape)


_SCRATCH: dict = {}  # (the stream's handle, the device) -> its Scratch (a default stream's handle is 0 on every device)


def rows_scratch(stream: int, device: torch.device) -> Scratch:
    """The Scratch of the stream with this handle on ``device`` (see Scratch)."""
    key = (stream, device)
    sc = _SCRATCH.get(key)
    if sc is None:
        if len(_SCRATCH) >= 16:  # streams come and go: keep a few (a dropped buffer is freed on its stream)
            _SCRATCH.clear()
        sc = _SCRATCH[key] = Scratch(device)
    return sc


def carve_int32(shapes: list[tuple[int, ...]], device: torch.device,
                workspace: Workspace | None = None) -> list[torch.Tensor]:
    """Contiguous int32 views of the given shapes, 16-byte aligned, from ``workspace`` (offset 0) or
    from one new tensor."""
    offsets, total = _layout(shapes)
    base = workspace.reserve(total) if workspace is not None else torch.empty(total, dtype=torch.int32, device=device)
    return _carve(base, shapes, offsets)


@dataclass(frozen=True)
class RowLayout:
    """Where a token and its metadata sit in one row of the send / receive buffers.

    Attributes:
        hidden: H.
        top_k: k.
        token_cols: H rounded up to whole 4-byte words (in elements of the token dtype).
        width: elements (of the token dtype) per row: token_cols + 2k words of metadata.
        meta_col: the int32 column where the k local expert ids start (the k weights follow).
    """

    hidden: int
    top_k: int
    token_cols: int
    width: int
    meta_col: int

    @staticmethod
    @functools.lru_cache(maxsize=64)
    def of(hidden: int, top_k: int, dtype: torch.dtype) -> RowLayout:
        es = dtype.itemsize
        per_word = max(1, 4 // es)
        cols = -(-hidden // per_word) * per_word
        return RowLayout(hidden, top_k, cols, cols + 2 * top_k * 4 // es, cols * es // 4)


@dataclass
class SendPlan:
    """Step 1 of a dispatch on one rank (all int32, on the device).

    Attributes:
        rank: [T, k] destination rank of each slot.
        local: [T, k] index of each slot's expert among its rank's local experts.
        first: [T, k] the rank for the slot that owns the token's row to that rank, W for a slot
            whose rank an earlier slot of the token already owns.
        sort_row: [T, k] the owning slot's place in the rows grouped by rank (values >= S for the
            other slots); on the kernel path (``block_base`` set) its rank among the earlier slots
            of its key in its block of ``block_tokens`` tokens instead: places() adds the base.
        rank_offsets: [W + 1] where each rank's rows start in that order.
        info: [W, 3] per destination rank: rows, (token, expert) pairs, 1 if an id was out of [0, E).
        counts: [2, W, 3] whose [0] is info and [1] the count exchange's receive slot (kernel path;
            None on the reference path).
        counts_recv: counts[1] (kernel path).
        hist: the kernel's per-block histograms (kernel path).
        block_base: [blocks, W + 1] where each block's first slot of each key goes (kernel path).
        block_tokens: tokens a block (kernel path).
        sem: [1] int32, the plan kernel's ticket (zero between launches; kernel path).
    """

    rank: torch.Tensor
    local: torch.Tensor
    first: torch.Tensor
    sort_row: torch.Tensor
    rank_offsets: torch.Tensor
    info: torch.Tensor
    counts: torch.Tensor | None = None
    counts_recv: torch.Tensor | None = None
    hist: torch.Tensor | None = None
    block_base: torch.Tensor | None = None
    block_tokens: int = 0
    sem: torch.Tensor | None = None

    def places(self) -> torch.Tensor:
        """[T, k] each slot's place in the rows grouped by rank (torch ops: tests and references)."""
        if self.block_base is None:
            return self.sort_row
        T, k = self.first.shape
        blk = (torch.arange(T, device=self.first.device) // self.block_tokens)[:, None].expand(T, k)
        return self.sort_row + self.block_base[blk, self.first.long()]


def _plan_shapes(T: int, k: int, W: int) -> list[tuple[int, ...]]:
    nb, _ = _triton().plan_blocks(T, k, W)
    return [(T, k), (T, k), (T, k), (T, k), (W + 1,), (2, W, 3), (nb * (2 * W + 2),), (nb, W + 1)]


def _new_plan(T: int, k: int, W: int, device: torch.device, workspace: Workspace | None) -> SendPlan:
    rank, local, first, inrank, offsets, counts, hist, base = carve_int32(_plan_shapes(T, k, W), device, workspace)
    sem = workspace.semaphore if workspace is not None else torch.zeros(1, dtype=torch.int32, device=device)
    # counts: info, then the slot the count exchange receives into; one buffer so that both reach
    # the host in one copy
    return SendPlan(rank, local, first, inrank, offsets, counts[0], counts, counts[1], hist, base,
                    _triton().plan_blocks(T, k, W)[1], sem)


def plan_scratch_elems(num_tokens: int, top_k: int, ep_size: int) -> int:
    """int32 elements of a Workspace that plan_send (kernel path) carves for these sizes."""
    return _layout(_plan_shapes(num_tokens, top_k, ep_size))[1]


def expand_scratch_elems(num_rows: int, top_k: int, num_local_experts: int) -> int:
    """int32 elements of a Workspace that expand_received (kernel path) carves for these sizes."""
    sh = _triton().expand_sort_shape(num_rows, top_k, num_local_experts)
    return _layout([(sh.hist_elems,), (sh.base_elems,)])[1]


def plan_send(topk_ids: torch.Tensor, expert_to_rank: torch.Tensor, expert_to_local: torch.Tensor, ep_size: int,
              *, check_ids: bool = True, workspace: Workspace | None = None) -> SendPlan:
    """Destinations, dedup, counts and row order of every token; no host sync. Trusted arguments.

    Args:
        topk_ids: [T, k] int32/int64 global expert ids (any strides).
        expert_to_rank: [E] int32, rank of each expert (ExpertPlacement.expert_to_rank_tensor).
        expert_to_local: [E] int32, local index of each expert on its rank.
        ep_size: W.
        check_ids: set the bad-id flag of info for ids outside [0, E) (False: it stays 0).
        workspace: where the plan lives (kernel path): then the SAME SendPlan object, rewritten, is
            returned by every call of these shapes, valid until the workspace's next use (the
            dispatcher consumes it inside its call). None: new tensors (one allocation).
    """
    T, k = topk_ids.shape
    if choose(topk_ids, "ep_plan") is Impl.TRITON:
        plan = None
        if workspace is not None:
            key = ("plan", T, k, ep_size)
            plan = workspace.memo(key) or workspace.keep(key, _new_plan(T, k, ep_size, topk_ids.device, workspace))
        else:
            plan = _new_plan(T, k, ep_size, topk_ids.device, None)
        _triton().plan_send_triton(topk_ids, expert_to_rank, expert_to_local, ep_size, plan.rank, plan.local,
                                   plan.first, plan.sort_row, plan.rank_offsets, plan.info, plan.hist,
                                   plan.block_base, plan.sem, check_ids)
        return plan
    rank, local, first, info = plan_send_reference(topk_ids, expert_to_rank, expert_to_local, ep_size, check_ids)
    order = permute_indices_unchecked(first, ep_size)  # ids W (repeated ranks) sort into the dropped bucket
    return SendPlan(rank, local, first, order.dst_row, order.expert_offsets, info)


def pack_send(x: torch.Tensor, topk_weights: torch.Tensor, plan: SendPlan, layout: RowLayout, out: torch.Tensor,
              home: torch.Tensor, *, capacity: int | None = None, overflow: torch.Tensor | None = None,
              device_rows: bool = False) -> None:
    """Write every send row (token part and metadata) into ``out`` and home [T, k]. Trusted arguments.

    Args:
        x: [T, H] tokens (unit inner stride not needed).
        topk_weights: [T, k] routing weights (sent as fp32).
        plan: plan_send's result.
        layout: the rows' RowLayout (out has layout.width columns of x's dtype, contiguous rows).
        out: throughput mode [S, width]; static mode [W * C, width] whose metadata ids the caller
            set to -1 (the rows this step does not fill must read as empty at the receiver).
        home: [T, k] int32 out: the row of each owning slot, -1 for the other slots (and overflow).
        capacity: C, static mode; None: throughput mode.
        overflow: [1] int32, static mode: set to 1 when a rank's rows did not fit (sticky).
        device_rows: kernel path, throughput mode: the kernel takes S from the plan on the device
            (its launch then depends on no count: a native phase's template).
    """
    if choose(x, "ep_pack") is Impl.TRITON:
        _triton().pack_send_triton(x, topk_weights, plan.rank, plan.local, plan.first, plan.sort_row,
                                   plan.rank_offsets, out, home, overflow, meta_col=layout.meta_col,
                                   capacity=capacity, device_rows=device_rows, block_base=plan.block_base,
                                   block_tokens=plan.block_tokens)
        return
    pack_send_reference(x, topk_weights, plan.rank, plan.local, plan.first, plan.places(), plan.rank_offsets, out,
                        home, overflow, meta_col=layout.meta_col, capacity=capacity)


@dataclass
class Expanded:
    """The received rows expanded per local expert (on the receiver).

    Attributes:
        gather_idx: [N] int32, received row of each expanded row (grouped by local expert); static
            mode: [R * k], the rows after expert_offsets[L] are padding no expert owns.
        expert_offsets: [L + 1] int32.
        tokens_per_expert: [L] int32.
        row_weights: [N] (static: [R * k]) fp32 routing weight of each expanded row.
        slot_pos: [R, k] int32, expanded row of each (received row, slot); -1 = none.
        counts: dispatch_outputs(counts=W): [2, W, 3] int32 for a copy of the dispatch's counts
            (the native path's: its combine reads them on the device); else None.
    """

    gather_idx: torch.Tensor
    expert_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    row_weights: torch.Tensor
    slot_pos: torch.Tensor
    counts: torch.Tensor | None = None


class DispatchOutputs:
    """home [T, k] and what the expansion writes (an Expanded's fields: gather_idx [N],
    expert_offsets [L + 1], tokens_per_expert [L], row_weights [N] fp32, slot_pos [R, k]; with
    ``counts`` = W also counts [2, W, 3], else None) as ONE new int32 tensor, each part 16-byte
    aligned; with ``rows`` = (width, dtype) the received rows [R, width] of that dtype (RowLayout)
    in front of them, in the same allocation (the native path's: one allocation a dispatch). A
    part's view is made when it is first read: the native path's templates take the parts'
    addresses (addresses(), rows_address()), so a round trip makes the views its caller reads, not
    all of them. They belong to the dispatch result they are handed to (nothing writes them later)."""

    __slots__ = ("base", "_at", "_shapes", "_views", "_w", "_rows", "_addresses")

    def __init__(self, num_tokens: int, top_k: int, num_rows: int, num_pairs: int, num_local_experts: int,
                 device: torch.device, counts: int = 0, rows: tuple[int, torch.dtype] | None = None):
        T, k, R, N, L = num_tokens, top_k, num_rows, num_pairs, num_local_experts
        o = 0
        if rows is not None:  # [R, width] rows of whole int32 words (RowLayout), first
            n = R * rows[0] * rows[1].itemsize // 4
            o = n + (-n % _ALIGN)
        at = []
        for n in (T * k, R * k, N, N, L, L + 1, 6 * counts):  # each part, then the padding to the next 16 bytes
            at.append(o)
            o += n + (-n % _ALIGN)
        self.base = torch.empty(max(o, 1), dtype=torch.int32, device=device)
        self._at, self._w, self._views, self._rows, self._addresses = at, counts, [None] * 7, rows, None
        self._shapes = ((T, k), (R, k), (N,), (N,), (L,), (L + 1,), (2, counts, 3))

    def _view(self, i: int) -> torch.Tensor:
        v = self._views[i]
        if v is None:
            shape = self._shapes[i]
            strides = (shape[1], 1) if len(shape) == 2 else (1,) if len(shape) == 1 else (3 * self._w, 3, 1)
            v = self.base.as_strided(shape, strides, self._at[i])
            self._views[i] = v = v.view(torch.float32) if i == 3 else v
        return v

    home = property(lambda self: self._view(0))
    slot_pos = property(lambda self: self._view(1))
    gather_idx = property(lambda self: self._view(2))
    row_weights = property(lambda self: self._view(3))
    tokens_per_expert = property(lambda self: self._view(4))
    expert_offsets = property(lambda self: self._view(5))
    counts = property(lambda self: self._view(6) if self._w else None)
    has_counts = property(lambda self: self._w > 0)
    top_k = property(lambda self: self._shapes[0][1])
    num_rows = property(lambda self: self._shapes[1][0])  # R, the received rows

    def addresses(self) -> list[int]:
        """The device addresses of home, slot_pos, gather_idx, row_weights, tokens_per_expert,
        expert_offsets and counts (what each view's data_ptr() is), without making the views."""
        a = self._addresses
        if a is None:
            p = self.base.data_ptr()
            a = self._addresses = [p + 4 * a for a in self._at]
        return a

    def rows_address(self) -> int:
        """Where the received rows start (``rows``: the allocation's first byte)."""
        return self.base.data_ptr()

    def received(self, columns: int | None = None) -> torch.Tensor:
        """The received rows [R, width] (``rows`` given), or their first ``columns`` (the tokens)."""
        width, dtype = self._rows
        return self.base.view(dtype).as_strided((self.num_rows, columns or width), (width, 1))


def dispatch_outputs(num_tokens: int, top_k: int, num_rows: int, num_pairs: int, num_local_experts: int,
                     device: torch.device, counts: int = 0) -> tuple[torch.Tensor, Expanded]:
    """home [T, k] and an Expanded to fill: DispatchOutputs' parts, every view made."""
    o = DispatchOutputs(num_tokens, top_k, num_rows, num_pairs, num_local_experts, device, counts)
    return o.home, Expanded(o.gather_idx, o.expert_offsets, o.tokens_per_expert, o.row_weights, o.slot_pos, o.counts)


def expand_received(recv: torch.Tensor, layout: RowLayout, num_local_experts: int, num_pairs: int | None, *,
                    out: Expanded | None = None, workspace: Workspace | None = None, counts=None,
                    counts_from: torch.Tensor | None = None) -> Expanded:
    """Group the received (row, local expert) pairs by local expert; no host sync.

    Args:
        recv: [R, width] received rows (RowLayout), rows with unit inner stride; read in place.
        layout: their RowLayout.
        num_local_experts: L.
        num_pairs: N, the valid pairs (throughput mode, known from the count exchange); None in
            static mode, where empty rows carry ids -1 and every output keeps its static size.
        out: where the kernel path writes (dispatch_outputs' Expanded, N = num_pairs or R * k); the
            reference path returns new tensors. None: new ones (one allocation).
        workspace: where the kernels' histograms live (see Workspace); None: one new tensor.
        counts: kernel path, throughput mode: a _triton.DeviceCounts, the dispatch's counts on the
            device from which the kernels take R and N (their launches then depend on a bucket of R
            only: a native phase's template).
        counts_from: kernel path, with ``counts`` and R > 0: where the counts are now (the
            Workspace's), copied into counts.tensor by the expansion's first launch.
    """
    k = layout.top_k
    L = num_local_experts
    R = recv.shape[0]
    if L == 0:  # a rank without experts: nothing to expand, in either mode (static shapes stay static)
        dev = recv.device
        none = torch.empty(0, dtype=torch.int32, device=dev)
        return Expanded(none, torch.zeros(1, dtype=torch.int32, device=dev), none, none.float(),
                        torch.full((R, k), -1, dtype=torch.int32, device=dev))
    if choose(recv, "ep_expand") is Impl.TRITON:
        kernels = _triton()
        if out is None:
            _, out = dispatch_outputs(0, k, R, R * k if num_pairs is None else num_pairs, L, recv.device)
        scratch = None
        rows = R if counts is None or R == 0 else counts.bucket(R)  # the kernels' blocks cover these
        if workspace is not None:
            key = ("expand", rows, k, L)
            scratch = workspace.memo(key)
        if scratch is None:
            sh = kernels.expand_sort_shape(rows, k, L)
            scratch = carve_int32([(sh.hist_elems,), (sh.base_elems,)], recv.device, workspace)
            if workspace is not None:
                workspace.keep(key, scratch)
        kernels.expand_received_triton(recv, layout.meta_col, k, L, *scratch, out.gather_idx,
                                       out.expert_offsets, out.tokens_per_expert, out.row_weights, out.slot_pos,
                                       counts=counts, counts_from=counts_from)
        return out
    meta = recv.view(torch.int32)[:, layout.meta_col:layout.meta_col + 2 * k]  # [R, 2k]
    lid = meta[:, :k].contiguous()  # [R, k]; -1 (and any id >= L) sorts into the dropped bucket
    w = meta[:, k:].view(torch.float32)  # [R, k]
    src, dst_row, tpe, offsets, row_w = permute_indices_weighted_op(lid, L, w)
    slot_pos = torch.where((lid >= 0) & (lid < L), dst_row, -1)
    if num_pairs is not None:
        # the valid pairs are the first N rows of the order
        return Expanded(src[:num_pairs], offsets, tpe, row_w[:num_pairs], slot_pos)
    return Expanded(src, offsets, tpe, row_w, slot_pos)
