"""The send plan of NCCL dispatch and the receiver's expansion by local expert (device ops, no sync).

# T = num_tokens (this rank), k = top_k, E = num_experts, W = ep_size, L = num_local_experts,
# S = rows sent, R = rows received, N = expanded rows (pairs)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class SendPlan:
    """Step 1 of dispatch on one rank.

    Attributes:
        pos: [T, W] int32, send-buffer row of token t for rank w, -1 = not sent there.
        rows_per_rank: [W] int64, tokens sent to each rank (each token once per rank).
        pairs_per_rank: [W] int64, (token, expert) pairs sent to each rank.
        meta: [T, W, 2k] int32: per (token, rank) the k local expert ids (-1 = other rank) then the
            k fp32 weights as int32 bits (0 where id is -1).
        bad_ids: [] int64 device scalar, 1 when an id was out of [0, E) (those ids were clamped).
    """

    pos: torch.Tensor
    rows_per_rank: torch.Tensor
    pairs_per_rank: torch.Tensor
    meta: torch.Tensor
    bad_ids: torch.Tensor


def plan_send(
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    expert_to_rank: torch.Tensor,
    expert_to_local: torch.Tensor,
    ep_size: int,
    *,
    check_ids: bool = True,
) -> SendPlan:
    """Destination ranks and send-buffer rows of every token; device ops only, no host sync.

    Args:
        topk_ids: [T, k] int32/int64 global expert ids.
        topk_weights: [T, k] routing weights (sent as fp32).
        expert_to_rank: [E] int32, rank of each expert (ExpertPlacement.expert_to_rank_tensor).
        expert_to_local: [E] int32, local index of each expert on its rank.
        ep_size: W.
        check_ids: compute the out-of-range flag (False: the flag is 0).
    """
    T, k = topk_ids.shape
    E = expert_to_rank.shape[0]
    dev = topk_ids.device
    ids = topk_ids.long()
    # clamp so that a bad id can never index out of bounds; the flag reports it instead
    ids_c = ids.clamp(0, E - 1)  # [T, k]
    bad = ((ids < 0) | (ids >= E)).any().long() if check_ids else torch.zeros((), dtype=torch.long, device=dev)
    dest = expert_to_rank[ids_c].long()  # [T, k]
    local = expert_to_local[ids_c]  # [T, k] int32
    hit = torch.zeros((T, ep_size), dtype=torch.int32, device=dev).scatter_(1, dest, 1)  # [T, W] 0/1, dedup
    rows_per_rank = hit.sum(0, dtype=torch.long)  # [W]
    pairs_per_rank = torch.zeros(ep_size, dtype=torch.long, device=dev).scatter_add_(
        0, dest.reshape(-1), torch.ones(T * k, dtype=torch.long, device=dev))  # [W]
    start = torch.cumsum(rows_per_rank, 0) - rows_per_rank  # [W] exclusive prefix
    # tokens before t going to w: scanned along the last dimension of the [W, T] transpose, since
    # CUDA torch's scan over dim 0 of a [T, W] tensor with small W is one slow sequential pass
    # (376 us for T = 4096, W = 2 on an H200, most of the step's device time)
    rank_in_dest = torch.cumsum(hit.t().contiguous(), 1, dtype=torch.long).t() - hit  # [T, W]
    pos = torch.where(hit > 0, start[None, :] + rank_in_dest, -1).to(torch.int32)  # [T, W]
    mine = dest[:, None, :] == torch.arange(ep_size, device=dev)[None, :, None]  # [T, W, k]
    meta_ids = torch.where(mine, local[:, None, :], -1).to(torch.int32)
    w32 = topk_weights.float()[:, None, :].expand(T, ep_size, k)
    meta_w = torch.where(mine, w32, 0.0).contiguous().view(torch.int32)  # fp32 bits travel as int32
    meta = torch.cat([meta_ids, meta_w], dim=2)  # [T, W, 2k]
    return SendPlan(pos, rows_per_rank, pairs_per_rank, meta, bad)


def pack_metadata(plan: SendPlan, num_rows: int) -> torch.Tensor:
    """[S, 2k] int32 metadata rows in send-buffer order (the small companion of pack_rows)."""
    T, W, k2 = plan.meta.shape
    out = plan.meta.new_empty((num_rows + 1, k2))  # row S: trash for the (t, w) not sent
    p = plan.pos.long().reshape(-1)
    p = torch.where(p >= 0, p, num_rows)
    out.index_put_((p,), plan.meta.reshape(T * W, k2))
    return out[:num_rows]


@dataclass
class Expanded:
    """Step 5 on the receiver: the received rows expanded per local expert.

    Attributes:
        gather_idx: [N] int32, received row of each expanded row (grouped by local expert).
        expert_offsets: [L + 1] int32.
        tokens_per_expert: [L] int32.
        row_weights: [N] fp32 routing weight of each expanded row.
        slot_pos: [R, k] int32, expanded row of (received row, slot), -1 = slot of another rank.
    """

    gather_idx: torch.Tensor
    expert_offsets: torch.Tensor
    tokens_per_expert: torch.Tensor
    row_weights: torch.Tensor
    slot_pos: torch.Tensor


def expand_received(meta: torch.Tensor, top_k: int, num_local_experts: int, num_pairs: int) -> Expanded:
    """Group the received (row, local expert) pairs by local expert; no host sync.

    Args:
        meta: [R, 2k] int32 received metadata (pack_metadata's rows).
        top_k: k.
        num_local_experts: L.
        num_pairs: N, valid pairs in meta (known on the host from the count exchange).
    """
    R = meta.shape[0]
    dev = meta.device
    L = num_local_experts
    lid = meta[:, :top_k]  # [R, k]
    w = meta[:, top_k:].contiguous().view(torch.float32)  # [R, k]
    # -1 (slot of another rank) sorts after every local expert; a corrupt id is clamped to L too
    key = torch.where((lid >= 0) & (lid < L), lid, L).reshape(-1).long()  # [R*k]
    order = torch.sort(key, stable=True).indices[:num_pairs]  # [N]
    counts = torch.zeros(L + 1, dtype=torch.long, device=dev).scatter_add_(0, key, torch.ones_like(key))
    tokens_per_expert = counts[:L].to(torch.int32)
    offsets = torch.zeros(L + 1, dtype=torch.int32, device=dev)
    offsets[1:] = torch.cumsum(counts[:L], 0).to(torch.int32)
    slot_pos = torch.full((R * top_k,), -1, dtype=torch.int32, device=dev)
    slot_pos[order] = torch.arange(num_pairs, dtype=torch.int32, device=dev)
    return Expanded(
        gather_idx=torch.div(order, top_k, rounding_mode="floor").to(torch.int32),
        expert_offsets=offsets,
        tokens_per_expert=tokens_per_expert,
        row_weights=w.reshape(-1)[order],
        slot_pos=slot_pos.view(R, top_k),
    )


