"""Pure-torch references of the NCCL path's two kernels: the truth in tests, the CPU path.

# T = num_tokens (a rank's), H = hidden, k = top_k, E = num_experts, W = ep_size,
# L = num_local_experts, S = rows sent, R = rows received, C = index columns (k or W)

pack_rows_reference / gather_sum_reference: the two data-movement steps the Triton kernels do; no
host sync (invalid indices go to a trash row instead of a boolean mask), so they also run on a GPU
when MOECOMM_BACKEND=reference. The whole exchange's reference is moecomm.ep.reference.ep_reference;
the real pipeline over virtual ranks is moecomm.ep.nccl.virtual.
"""

from __future__ import annotations

import torch


def pack_rows_reference(x: torch.Tensor, pos: torch.Tensor, num_rows: int) -> torch.Tensor:
    """[S, H]: row pos[t, w] of the result is x[t]; pos -1 = token t is not sent to rank w.

    Args:
        x: [T, H] tokens.
        pos: [T, W] int32/int64, destination row of token t in rank w's part of the send buffer, or -1.
        num_rows: S, rows of the send buffer (every row is some pos entry).
    """
    T, H = x.shape
    out = x.new_empty((num_rows + 1, H))  # row S is a trash row for the -1 entries
    p = pos.long()
    p = torch.where((p >= 0) & (p < num_rows), p, num_rows)  # [T, W]
    src = x.unsqueeze(1).expand(T, p.shape[1], H)  # [T, W, H]
    out.index_put_((p.reshape(-1),), src.reshape(-1, H))
    return out[:num_rows]


def gather_sum_reference(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """[M, H]: row m = sum over c with idx[m, c] >= 0 of src[idx[m, c]], in fp32 (float64 for float64), cast to src.dtype.

    Args:
        src: [N, H] rows to sum.
        idx: [M, C] int32/int64 row indices into src, -1 = nothing.
    """
    n, H = src.shape
    i = idx.long()
    i = torch.where((i >= 0) & (i < n), i, n)
    acc = torch.float64 if src.dtype == torch.float64 else torch.float32  # float64: gradcheck
    padded = torch.cat([src.to(acc), src.new_zeros((1, H), dtype=acc)])  # row n = zeros
    return padded[i].sum(dim=1).to(src.dtype)  # [M, C, H] -> [M, H]


def plan_send_reference(topk_ids: torch.Tensor, expert_to_rank: torch.Tensor, expert_to_local: torch.Tensor,
                        ep_size: int, check_ids: bool = True):
    """(rank [T, k], local [T, k], first [T, k], info [W, 3]) int32, as ep_plan_kernel computes them.

    rank: each slot's destination rank (ids clamped into [0, E)); local: its expert's index on that
    rank; first: rank for the first slot of a token going to each rank, W for later slots to a rank
    already taken (the dedup: a token travels once to each rank); info[w] = (rows to w, (token,
    expert) pairs to w, 1 if any id was outside [0, E) and check_ids).
    """
    T, k = topk_ids.shape
    W = ep_size
    E = expert_to_rank.shape[0]
    ids = topk_ids.long()
    ids_c = ids.clamp(0, E - 1)
    rank = expert_to_rank[ids_c].to(torch.int32)  # [T, k]
    local = expert_to_local[ids_c].to(torch.int32)
    earlier = torch.triu(torch.ones(k, k, dtype=torch.bool, device=ids.device), diagonal=1)  # [j', j]: j' < j
    dup = ((rank[:, :, None] == rank[:, None, :]) & earlier[None]).any(dim=1)  # [T, k]
    first = torch.where(dup, torch.full_like(rank, W), rank)
    info = torch.zeros(W, 3, dtype=torch.int32, device=ids.device)
    info[:, 0] = torch.zeros(W + 1, dtype=torch.int32, device=ids.device).scatter_add_(
        0, first.reshape(-1).long(), torch.ones(T * k, dtype=torch.int32, device=ids.device))[:W]
    info[:, 1] = torch.zeros(W, dtype=torch.int32, device=ids.device).scatter_add_(
        0, rank.reshape(-1).long(), torch.ones(T * k, dtype=torch.int32, device=ids.device))
    if check_ids and T * k:
        info[:, 2] = ((ids < 0) | (ids >= E)).any().to(torch.int32)
    return rank, local, first, info


def pack_send_reference(x: torch.Tensor, topk_weights: torch.Tensor, rank: torch.Tensor, local: torch.Tensor,
                        first: torch.Tensor, sort_row: torch.Tensor, rank_offsets: torch.Tensor, out: torch.Tensor,
                        home: torch.Tensor, overflow: torch.Tensor | None, *, meta_col: int,
                        capacity: int | None) -> None:
    """What ep_pack_send_kernel writes: the token part and the metadata of every send row, home [T, k].

    Row of (token t, first slot j): sort_row[t, j] (throughput: out has the S rows), or, with
    ``capacity``, first * capacity + (sort_row - rank_offsets[first]) when that is < capacity (else
    the row is dropped, home is -1 and overflow[0] is set). Metadata at int32 column meta_col of
    the row: k local expert ids (-1 for slots of other ranks), then the k fp32 weights' bits.
    """
    T, k = rank.shape
    H = x.shape[1]
    W = rank_offsets.shape[0] - 1
    nrows = out.shape[0]
    keep = first < W
    fl = first.long().clamp(max=W - 1)
    if capacity is None:
        row = torch.where(keep & (sort_row < nrows), sort_row, -1)
    else:
        inr = sort_row - rank_offsets[fl]
        ok = keep & (inr < capacity)
        row = torch.where(ok, first * capacity + inr, -1)
        if overflow is not None:  # sticky, and no host sync
            overflow.copy_(torch.maximum(overflow, (keep & ~ok).any().to(torch.int32).reshape(1)))
    home.copy_(row)
    # scatter through a trash row (index nrows) instead of a boolean mask: no host sync
    r = torch.where(row >= 0, row, nrows).reshape(-1).long()  # [T * k]
    tmp = torch.cat([out, out.new_zeros((1, out.shape[1]))])
    tmp[r, :H] = x.unsqueeze(1).expand(T, k, H).reshape(T * k, H)
    mine = rank[:, None, :] == first[:, :, None]  # [T, k (the row's slot), k (every slot)]
    ids = torch.where(mine, local[:, None, :], -1).reshape(T * k, k)
    wbits = topk_weights.float().contiguous().view(torch.int32)[:, None, :].expand(T, k, k)
    bits = torch.where(mine, wbits, 0).reshape(T * k, k)
    meta = tmp.view(torch.int32)
    meta[r, meta_col:meta_col + k] = ids
    meta[r, meta_col + k:meta_col + 2 * k] = bits
    out.copy_(tmp[:nrows])
