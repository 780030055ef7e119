"""Pure-torch permute/combine on one rank: the truth in tests and the implementation on CPU.

# T = num_tokens, H = hidden, k = top_k, E = num_experts, M = T * k routed rows

Order of the permuted rows: grouped by expert, and inside an expert by flat slot index t * k + j
ascending (a stable sort). A slot whose expert id is outside [0, E) (possible only with
validate=False) goes to a "dropped" bucket after the last expert: its row still exists, so every
index stays in bounds and the permutation stays a bijection over all M rows, but no expert sees it
(expert_offsets[E] counts only the valid rows).

Nothing here synchronises with the device (no .item(), no bincount), so the reference can also run
on a GPU when Triton is missing.
"""

from __future__ import annotations

import torch


def bucket_of(topk_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, k] int64: the expert id, or num_experts for an id outside [0, num_experts)."""
    ids = topk_ids.long()
    valid = (ids >= 0) & (ids < num_experts)
    return torch.where(valid, ids, torch.full_like(ids, num_experts))


def permute_indices_ref(topk_ids: torch.Tensor, num_experts: int):
    """Reference of permute_indices: (src_token [M], dst_row [T, k], tokens_per_expert [E], expert_offsets [E+1]), int32."""
    num_tokens, top_k = topk_ids.shape
    m = num_tokens * top_k
    dev = topk_ids.device
    buckets = bucket_of(topk_ids, num_experts).reshape(m)  # [M]
    order = torch.argsort(buckets, stable=True)  # [M] permuted row -> flat slot
    src_token = (order // max(top_k, 1)).to(torch.int32)
    dst_row = torch.empty(m, dtype=torch.int32, device=dev)
    dst_row[order] = torch.arange(m, dtype=torch.int32, device=dev)
    counts = torch.zeros(num_experts + 1, dtype=torch.int64, device=dev)
    counts.scatter_add_(0, buckets, torch.ones_like(buckets))
    tokens_per_expert = counts[:num_experts].to(torch.int32)
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int32, device=dev)
    expert_offsets[1:] = torch.cumsum(tokens_per_expert, 0).to(torch.int32)
    return src_token, dst_row.reshape(num_tokens, top_k), tokens_per_expert, expert_offsets


def permute_rows_ref(x: torch.Tensor, src_token: torch.Tensor) -> torch.Tensor:
    """[M, H]: row i is x[src_token[i]] (same dtype as x)."""
    return x.index_select(0, src_token.long())


def combine_ref(expert_out: torch.Tensor, dst_row: torch.Tensor, topk_weights: torch.Tensor | None) -> torch.Tensor:
    """y [T, H] = sum_j w[t, j] * expert_out[dst_row[t, j]], summed in fp32 for j = 0..k-1 in order.

    A loop over top_k (a handful), never over experts or tokens.
    """
    num_tokens, top_k = dst_row.shape
    acc_dtype = torch.float64 if expert_out.dtype == torch.float64 else torch.float32
    acc = torch.zeros(num_tokens, expert_out.shape[1], dtype=acc_dtype, device=expert_out.device)
    for j in range(top_k):
        rows = expert_out.index_select(0, dst_row[:, j].long()).to(acc_dtype)  # [T, H]
        if topk_weights is None:
            acc += rows
        else:
            acc += topk_weights[:, j, None].to(acc_dtype) * rows
    return acc.to(expert_out.dtype)
