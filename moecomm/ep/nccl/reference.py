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
