"""The reference of expert-parallel dispatch -> experts -> combine: every rank computed in one process.

# T = num_tokens (a rank's), H = hidden, k = top_k, E = num_experts, W = ep_size

ep_reference does it the obvious way (a loop over experts, float64 sums): what every rank must get,
bit for bit, with integer-valued payloads, whichever path (NCCL, low-latency IPC) moved the rows.
It imports no dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .placement import ExpertPlacement


@dataclass
class EPReference:
    """What each rank must see. received[r][l]: [n, H] rows of rank r's local expert l, ordered by
    (source rank, token, top-k slot); y[r]: [T_r, H] combined output of rank r."""

    received: list[list[torch.Tensor]]
    y: list[torch.Tensor]


def ep_reference(
    xs: Sequence[torch.Tensor],
    topk_ids: Sequence[torch.Tensor],
    topk_weights: Sequence[torch.Tensor],
    placement: ExpertPlacement,
    expert_fn: Callable[[torch.Tensor, int], torch.Tensor],
) -> EPReference:
    """Single-process dispatch -> expert_fn -> weighted combine of every rank, in float64.

    Args:
        xs: per rank, [T_r, H] tokens.
        topk_ids: per rank, [T_r, k] global expert ids.
        topk_weights: per rank, [T_r, k] routing weights.
        placement: the expert -> rank map (W = placement.ep_size = len(xs)).
        expert_fn: (rows [n, H], global expert id) -> [n, H], the expert.
    """
    W = placement.ep_size
    received: list[list[torch.Tensor]] = []
    for r in range(W):
        per_expert = []
        for e in placement.local_experts(r):
            rows = []
            for s in range(W):
                hit = topk_ids[s].long() == e  # [T_s, k]
                t_idx = hit.nonzero()[:, 0]  # ordered by (token, slot)
                rows.append(xs[s][t_idx])
            per_expert.append(torch.cat(rows) if rows else xs[0].new_empty((0, xs[0].shape[1])))
        received.append(per_expert)
    ys = []
    for s in range(W):
        x64 = xs[s].double()
        y = torch.zeros_like(x64)
        for j in range(topk_ids[s].shape[1]):
            ids = topk_ids[s][:, j].long()
            for e in ids.unique().tolist():
                m = ids == e
                y[m] += topk_weights[s][m, j].double()[:, None] * expert_fn(x64[m], e)
        ys.append(y.to(xs[s].dtype))
    return EPReference(received, ys)
