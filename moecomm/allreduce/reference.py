"""The truth of the all-reduce kernels: plain PyTorch, any device."""

# W = world_size (number of peer buffers), n = elements per buffer.

from __future__ import annotations

from collections.abc import Sequence

import torch


def reduce_sum_reference(peers: Sequence[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
    """out = sum over r = 0..W-1 of peers[r], added in rank order in fp32, rounded once to the dtype.

    The order and the fp32 accumulator are what the kernel does, so results are bit-identical; the
    sum starts from peers[0] itself (0.0 + -0.0 would be +0.0).
    """
    acc = peers[0].float()
    for p in peers[1:]:
        acc = acc + p.float()
    res = acc.to(peers[0].dtype)
    if out is None:
        return res
    out.copy_(res)
    return out


def all_reduce_reference(xs: Sequence[torch.Tensor]) -> torch.Tensor:
    """[W, *shape]: every rank's all-reduce output, the rank-order fp32 sum of the W inputs, rounded once.

    Args:
        xs: W tensors of one shape and dtype, rank order (rank r's input).
    """
    res = reduce_sum_reference(list(xs))
    return torch.stack([res] * len(xs))


def residual_rmsnorm_reference(summed: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                               eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, new_residual) of the fused all-reduce + residual add + RMSNorm, given the all-reduce's output.

    Args:
        summed: [num_tokens, hidden] the all-reduce's output (already rounded to the dtype).
        residual: [num_tokens, hidden] the residual stream, the same dtype.
        weight: [hidden] RMSNorm's scale, the same dtype.
        eps: added to the mean square.

    new_residual = round(summed + residual) in fp32; out = round(new_residual * rsqrt(mean(new_residual^2)
    + eps) * weight), all in fp32 (float64 inputs stay float64: the ground truth of tests).
    """
    acc = torch.float64 if summed.dtype is torch.float64 else torch.float32
    new_res = (summed.to(acc) + residual.to(acc)).to(summed.dtype)
    r = new_res.to(acc)
    inv = torch.rsqrt(r.pow(2).mean(dim=-1, keepdim=True) + eps)
    out = (r * inv * weight.to(acc)).to(summed.dtype)
    return out, new_res
