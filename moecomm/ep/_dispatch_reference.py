"""Pure-torch references of expert-parallel dispatch/combine: the truth in tests, the CPU path.

# T = num_tokens (a rank's), H = hidden, k = top_k, E = num_experts, W = ep_size,
# L = num_local_experts, S = rows sent, R = rows received, C = index columns (k or W)

Three levels:
- pack_rows_reference / gather_sum_reference: the two data-movement steps the Triton kernels do;
  no host sync (invalid indices go to a trash row instead of a boolean mask), so they also run on a
  GPU when MOECOMM_BACKEND=reference.
- ep_reference: the whole dispatch -> experts -> combine of W ranks computed in one process, the
  obvious way (a loop over experts, float64 sums): what every rank must get, bit for bit, with
  integer-valued payloads.
- virtual_ep_forward: the real pipeline (dispatch.py's steps and kernels) run for W virtual ranks in
  one process, the all-to-all replaced by copies: tests the kernels on one GPU and feeds the benchmark.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .placement import ExpertPlacement
from .types import DispatchResult


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
    """[M, H]: row m = sum over c with idx[m, c] >= 0 of src[idx[m, c]], in fp32, cast to src.dtype.

    Args:
        src: [N, H] rows to sum.
        idx: [M, C] int32/int64 row indices into src, -1 = nothing.
    """
    n, H = src.shape
    i = idx.long()
    i = torch.where((i >= 0) & (i < n), i, n)
    padded = torch.cat([src.float(), src.new_zeros((1, H), dtype=torch.float32)])  # row n = zeros
    return padded[i].sum(dim=1).to(src.dtype)  # [M, C, H] -> [M, H]


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
    """Run dispatch.py's steps for W virtual ranks in one process; all_to_all becomes copies.

    Args:
        xs, topk_ids, topk_weights, placement: as in ep_reference.
        expert_fn: (gathered rows [N, H], global expert id per row [N] int64, row_weights [N] fp32)
            -> expert output [N, H] of the dtype of xs; None: skip combine (y is empty).
        streams: one CUDA stream per rank: each rank's kernels are queued on its own stream.
    """
    from . import dispatch as d

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
            plan = d.plan_send(topk_ids[r], topk_weights[r], e2r, e2l, W, check_ids=False)
            rows = plan.rows_per_rank.tolist()
            num_rows = sum(rows)
            plans.append(plan)
            splits.append(rows)
            sends.append(d.pack_rows(xs[r], plan.pos, num_rows))
            metas.append(d.pack_metadata(plan, num_rows))
    if streams is not None:
        torch.cuda.synchronize()
    offs = [[sum(s[:w]) for w in range(W + 1)] for s in splits]
    results, recv_splits = [], []
    for r in range(W):
        with on(r):
            tokens = torch.cat([sends[s][offs[s][r]:offs[s][r + 1]] for s in range(W)])
            meta = torch.cat([metas[s][offs[s][r]:offs[s][r + 1]] for s in range(W)])
            num_pairs = int((meta[:, :k] >= 0).sum())
            ex = d.expand_received(meta, k, placement.num_local_experts(r), num_pairs)
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
                partials.append(d.gather_sum(out, res.handle))
        if streams is not None:
            torch.cuda.synchronize()
        roffs = [[sum(s[:w]) for w in range(W + 1)] for s in recv_splits]
        for s in range(W):
            with on(s):
                back = torch.cat([partials[r][roffs[r][s]:roffs[r][s + 1]] for r in range(W)])
                ys.append(d.gather_sum(back, plans[s].pos))
        if streams is not None:
            torch.cuda.synchronize()
    return VirtualEPRun(results, splits, ys)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
