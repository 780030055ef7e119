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
   (rows, pairs, bad-id flag) the ranks exchange; then the permute's stable counting sort of the
   owning slots by rank: rows grouped by rank, token order kept (moecomm.permute's kernels).
2. pack_send: each row's token part and metadata; home [T, k], the row each owning slot's token was
   written to (-1 for the other slots), which combine reads to sum the returned rows.
   Throughput mode: S rows, rank w's at rank_offsets[w]. Static mode: W * C rows, rank w's at
   w * C; a rank's rows beyond C are not sent (never written out of bounds), and the overflow flag
   is set on the device.
Receive side: expand_received groups the received (row, local expert) pairs by local expert with
the same counting sort (rows of expert l ordered by source rank, token, slot), with each pair's
routing weight riding along.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ...jit.backend import Impl, choose
from ...permute.api import permute_indices_unchecked, permute_indices_weighted_op
from .reference import pack_send_reference, plan_send_reference


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
            other slots).
        rank_offsets: [W + 1] where each rank's rows start in that order.
        info: [W, 3] per destination rank: rows, (token, expert) pairs, 1 if an id was out of [0, E).
        counts: [2, W, 3] whose [0] is info and [1] the count exchange's receive slot (kernel path;
            None on the reference path).
    """

    rank: torch.Tensor
    local: torch.Tensor
    first: torch.Tensor
    sort_row: torch.Tensor
    rank_offsets: torch.Tensor
    info: torch.Tensor
    counts: torch.Tensor | None = None


def plan_send(topk_ids: torch.Tensor, expert_to_rank: torch.Tensor, expert_to_local: torch.Tensor, ep_size: int,
              *, check_ids: bool = True) -> SendPlan:
    """Destinations, dedup, counts and row order of every token; no host sync. Trusted arguments.

    Args:
        topk_ids: [T, k] int32/int64 global expert ids (any strides).
        expert_to_rank: [E] int32, rank of each expert (ExpertPlacement.expert_to_rank_tensor).
        expert_to_local: [E] int32, local index of each expert on its rank.
        ep_size: W.
        check_ids: set the bad-id flag of info for ids outside [0, E) (False: it stays 0).
    """
    T, k = topk_ids.shape
    dev = topk_ids.device
    if choose(topk_ids, "ep_plan") is Impl.TRITON:
        from ._triton import plan_send_triton

        rank = torch.empty((T, k), dtype=torch.int32, device=dev)
        local = torch.empty_like(rank)
        first = torch.empty_like(rank)
        # [2, W, 3]: info, then the slot the count exchange receives into; one buffer so that both
        # reach the host in one copy (no cat launch, no second allocation)
        counts = torch.zeros((2, ep_size, 3), dtype=torch.int32, device=dev)
        info = counts[0]
        plan_send_triton(topk_ids, expert_to_rank, expert_to_local, ep_size, rank, local, first, info, check_ids)
    else:
        rank, local, first, info = plan_send_reference(topk_ids, expert_to_rank, expert_to_local, ep_size, check_ids)
        counts = None
    order = permute_indices_unchecked(first, ep_size)  # ids W (repeated ranks) sort into the dropped bucket
    return SendPlan(rank, local, first, order.dst_row, order.expert_offsets, info, counts)


def pack_send(x: torch.Tensor, topk_weights: torch.Tensor, plan: SendPlan, layout: RowLayout, out: torch.Tensor,
              home: torch.Tensor, *, capacity: int | None = None, overflow: torch.Tensor | None = None) -> None:
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
    """
    if choose(x, "ep_pack") is Impl.TRITON:
        from ._triton import pack_send_triton as run
    else:
        run = pack_send_reference
    run(x, topk_weights, plan.rank, plan.local, plan.first, plan.sort_row, plan.rank_offsets, out, home, overflow,
        meta_col=layout.meta_col, capacity=capacity)


@dataclass
class Expanded:
    """The received rows expanded per local expert (on the receiver).

    Attributes:
        gather_idx: [N] int32, received row of each expanded row (grouped by local expert); static
            mode: [R * k], the rows after expert_offsets[L] are padding no expert owns.
        expert_offsets: [L + 1] int32.
        tokens_per_expert: [L] int32.
        row_weights: [N] (static: [R * k]) fp32 routing weight of each expanded row.
        slot_pos: [R, k] int32, expanded row of each (received row, slot); -1 or >= N = none.
    """

    gather_idx: torch.Tensor
    expert_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    row_weights: torch.Tensor
    slot_pos: torch.Tensor


def expand_received(recv: torch.Tensor, layout: RowLayout, num_local_experts: int, num_pairs: int | None) -> Expanded:
    """Group the received (row, local expert) pairs by local expert; no host sync.

    Args:
        recv: [R, width] received rows (RowLayout).
        layout: their RowLayout.
        num_local_experts: L.
        num_pairs: N, the valid pairs (throughput mode, known from the count exchange); None in
            static mode, where empty rows carry ids -1 and every output keeps its static size.
    """
    k = layout.top_k
    if num_local_experts == 0:  # a rank without experts: nothing to expand, in either mode (static shapes stay static)
        dev, R = recv.device, recv.shape[0]
        none = torch.empty(0, dtype=torch.int32, device=dev)
        return Expanded(none, torch.zeros(1, dtype=torch.int32, device=dev), none, none.float(),
                        torch.full((R, k), -1, dtype=torch.int32, device=dev))
    meta = recv.view(torch.int32)[:, layout.meta_col:layout.meta_col + 2 * k]  # [R, 2k]
    lid = meta[:, :k].contiguous()  # [R, k]; -1 (and any id >= L) sorts into the dropped bucket
    w = meta[:, k:].view(torch.float32)  # [R, k]
    src, dst_row, tpe, offsets, row_w = permute_indices_weighted_op(lid, num_local_experts, w)
    if num_pairs is not None:
        # the valid pairs are the first N rows of the order; rows >= N in slot_pos are ignored by gather_sum
        return Expanded(src[:num_pairs], offsets, tpe, row_w[:num_pairs], dst_row)
    slot_pos = torch.where((lid >= 0) & (lid < num_local_experts), dst_row, -1)
    return Expanded(src, offsets, tpe, row_w, slot_pos)
