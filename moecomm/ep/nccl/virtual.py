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
from .plan import RowLayout, expand_received, pack_send, plan_send


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
    capacity: int | None = None,
) -> VirtualEPRun:
    """Run the NCCL dispatcher's steps for W virtual ranks in one process; all_to_all becomes copies.

    Args:
        xs, topk_ids, topk_weights, placement: as in ep_reference.
        expert_fn: (gathered rows [N, H], global expert id per row [N] int64, row_weights [N] fp32)
            -> expert output [N, H] of the dtype of xs; None: skip combine (y is empty).
        streams: one CUDA stream per rank: each rank's kernels are queued on its own stream.
        capacity: C, the static-capacity mode (W * C rows per rank, fixed shapes); None: throughput.
            In static mode each result's handle is (slot_pos, overflow flag [1]).
    """
    W = placement.ep_size
    dev = xs[0].device
    e2r = placement.expert_to_rank_tensor(dev)
    e2l = placement.expert_to_local_tensor(dev)
    k = topk_ids[0].shape[1]
    H = xs[0].shape[1]
    lay = RowLayout.of(H, k, xs[0].dtype)

    def on(r):
        return torch.cuda.stream(streams[r]) if streams is not None else _null()

    homes, sends, splits, pairs, flags = [], [], [], [], []
    for r in range(W):
        with on(r):
            T = xs[r].shape[0]
            plan = plan_send(topk_ids[r], e2r, e2l, W, check_ids=False)
            home = torch.empty((T, k), dtype=torch.int32, device=dev)
            if capacity is None:
                info = plan.info.tolist()
                rows = [i[0] for i in info]
                send = xs[r].new_empty((sum(rows), lay.width))
                pack_send(xs[r], topk_weights[r], plan, lay, send, home)
                pairs.append([i[1] for i in info])
            else:
                rows = [capacity] * W
                send = xs[r].new_zeros((W * capacity, lay.width))
                send.view(torch.int32)[:, lay.meta_col:lay.meta_col + k].fill_(-1)
                flags.append(torch.zeros(1, dtype=torch.int32, device=dev))
                pack_send(xs[r], topk_weights[r], plan, lay, send, home, capacity=capacity, overflow=flags[r])
            homes.append(home)
            splits.append(rows)
            sends.append(send)
    if streams is not None:
        torch.cuda.synchronize()
    offs = [[sum(s[:w]) for w in range(W + 1)] for s in splits]
    results, recv_splits = [], []
    for r in range(W):
        with on(r):
            recv = torch.cat([sends[s][offs[s][r]:offs[s][r + 1]] for s in range(W)])
            num_pairs = None if capacity is not None else sum(pairs[s][r] for s in range(W))
            ex = expand_received(recv, lay, placement.num_local_experts(r), num_pairs)
            handle = ex.slot_pos if capacity is None else (ex.slot_pos, flags[r])
            results.append(DispatchResult(recv[:, :H], ex.expert_offsets, ex.tokens_per_expert, ex.row_weights,
                                          ex.gather_idx, handle))
            recv_splits.append([splits[s][r] for s in range(W)])
    ys: list[torch.Tensor] = []
    if expert_fn is not None:
        partials = []
        for r in range(W):
            with on(r):
                res = results[r]
                n = int(res.expert_offsets[-1])  # static mode: the rows after it are padding
                local = torch.tensor(placement.local_experts(r), dtype=torch.long, device=dev)
                expert_of_row = local[torch.repeat_interleave(res.tokens_per_expert.long())] if n else local[:0]
                rows = res.gather_idx[:n].long()
                out = res.tokens.new_zeros((res.gather_idx.shape[0], H))
                out[:n] = expert_fn(res.tokens[rows], expert_of_row, res.row_weights[:n])
                slot_pos = res.handle if capacity is None else res.handle[0]
                partials.append(gather_sum(out, slot_pos))
        if streams is not None:
            torch.cuda.synchronize()
        roffs = [[sum(s[:w]) for w in range(W + 1)] for s in recv_splits]
        for s in range(W):
            with on(s):
                back = torch.cat([partials[r][roffs[r][s]:roffs[r][s + 1]] for r in range(W)])
                ys.append(gather_sum(back, homes[s]))
        if streams is not None:
            torch.cuda.synchronize()
    return VirtualEPRun(results, splits, ys)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
