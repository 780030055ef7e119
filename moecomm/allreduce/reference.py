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
