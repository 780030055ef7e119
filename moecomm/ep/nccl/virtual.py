"""The NCCL path's steps and kernels for W virtual ranks in one process, the all_to_all replaced by copies.

# T = num_tokens (a rank's), H = hidden, k = top_k, W = ep_size, R = rows received, N = expanded rows

Tests the kernels on one GPU (each rank's kernels on its own stream) and feeds the benchmark; checked
against moecomm.ep.reference.ep_reference.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..placement import ExpertPlacement
from ..types import DispatchResult
from .ops import gather_sum_unchecked as gather_sum  # the dispatcher's trusted ops: every argument is built here
from .ops import pack_rows_unchecked as pack_rows
from .plan import expand_received, pack_metadata, plan_send


@dataclass
class VirtualEPRun:
    """Outputs of virtual_ep_forward: per rank, the dispatch result and the combined output."""

    results: list[DispatchResult]  # handle: the [R, k] slot_pos of the receiver
    send_splits: list[list[int]]
    y: list[torch.Tensor]


def virtual_ep_forward(
    xs: Sequence[torch.Tensor],
    topk_ids: Sequence[torch.Tensor],
    topk_weights: Sequence[torch.Tensor],
    placement: ExpertPlacement,
    expert_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    *,
    streams: Sequence[torch.cuda.Stream] | None = None,
) -> VirtualEPRun:
    """Run the NCCL dispatcher's steps for W virtual ranks in one process; all_to_all becomes copies.

    Args:
        xs, topk_ids, topk_weights, placement: as in ep_reference.
        expert_fn: (gathered rows [N, H], global expert id per row [N] int64, row_weights [N] fp32)
            -> expert output [N, H] of the dtype of xs; None: skip combine (y is empty).
        streams: one CUDA stream per rank: each rank's kernels are queued on its own stream.
    """
    W = placement.ep_size
    dev = xs[0].device
    e2r = placement.expert_to_rank_tensor(dev)
    e2l = placement.expert_to_local_tensor(dev)
    k = topk_ids[0].shape[1]

    def on(r):
        return torch.cuda.stream(streams[r]) if streams is not None else _null()

    plans, sends, metas, splits = [], [], [], []
    for r in range(W):
        with on(r):
            plan = plan_send(topk_ids[r], topk_weights[r], e2r, e2l, W, check_ids=False)
            rows = plan.rows_per_rank.tolist()
            num_rows = sum(rows)
            plans.append(plan)
            splits.append(rows)
            sends.append(pack_rows(xs[r], plan.pos, num_rows))
            metas.append(pack_metadata(plan, num_rows))
    if streams is not None:
        torch.cuda.synchronize()
    offs = [[sum(s[:w]) for w in range(W + 1)] for s in splits]
    results, recv_splits = [], []
    for r in range(W):
        with on(r):
            tokens = torch.cat([sends[s][offs[s][r]:offs[s][r + 1]] for s in range(W)])
            meta = torch.cat([metas[s][offs[s][r]:offs[s][r + 1]] for s in range(W)])
            num_pairs = int((meta[:, :k] >= 0).sum())
            ex = expand_received(meta, k, placement.num_local_experts(r), num_pairs)
            results.append(DispatchResult(tokens, ex.expert_offsets, ex.tokens_per_expert, ex.row_weights,
                                          ex.gather_idx, ex.slot_pos))
            recv_splits.append([splits[s][r] for s in range(W)])
    ys: list[torch.Tensor] = []
    if expert_fn is not None:
        partials = []
        for r in range(W):
            with on(r):
                res = results[r]
                local = torch.tensor(placement.local_experts(r), dtype=torch.long, device=dev)
                expert_of_row = local[torch.repeat_interleave(res.tokens_per_expert.long())] if res.gather_idx.numel() else local[:0]
                out = expert_fn(res.tokens[res.gather_idx.long()], expert_of_row, res.row_weights)
                partials.append(gather_sum(out, res.handle))
        if streams is not None:
            torch.cuda.synchronize()
        roffs = [[sum(s[:w]) for w in range(W + 1)] for s in recv_splits]
        for s in range(W):
            with on(s):
                back = torch.cat([partials[r][roffs[r][s]:roffs[r][s + 1]] for r in range(W)])
                ys.append(gather_sum(back, plans[s].pos))
        if streams is not None:
            torch.cuda.synchronize()
    return VirtualEPRun(results, splits, ys)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
