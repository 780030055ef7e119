"""The driver of W virtual ranks on one GPU (one IPCDispatcher and one CUDA stream a rank): the phase order.

# T = num_tokens (a rank's), H = hidden, k = top_k, W = ranks, N = expanded rows of a rank

    results = virtual_dispatch(disps, streams, xs, ids, ws)          # [W] DispatchResult
    ys = virtual_combine(disps, streams, hs, [d.handle for d in results])
    results, ys = virtual_step(disps, streams, xs, ids, ws, expert)  # both, the expert in between

Why the order (moecomm.ep.ipc.dispatcher's docstring, "THE RULE"): a rank's signal phase (the LL
kernel) spins until every peer's kernel has run; if the host, before launching the last peer's, does
anything that synchronises the context (a module load at a Triton or torch kernel's first launch,
cudaMalloc, .item()), the host waits for the spinning kernel and the kernel for the host: deadlock
until the spin's timeout. So each function below runs, for every rank in turn: first everything a
send needs that may launch or allocate (prepare_inputs, .contiguous()), then every rank's signal
phase, and only then every rank's finish phase; virtual_step puts every rank's expert after every
dispatch_finish and before any combine_send. Each rank's work is on its own stream, forked from and
joined to the current stream (under CUDA-graph capture: the capturing one), so a graph captured
through these functions has W branches and its replay keeps every kernel of a phase independent.

No host sync anywhere; nothing here allocates between two ranks' signal phases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..types import DispatchResult


def _fork(streams: Sequence[Any], ranks: Sequence[int]) -> Any:
    cur = torch.cuda.current_stream()
    for r in ranks:
        streams[r].wait_stream(cur)
    return cur


def _join(cur: Any, streams: Sequence[Any], ranks: Sequence[int]) -> None:
    for r in ranks:
        cur.wait_stream(streams[r])


def _phase(streams: Sequence[Any], ranks: Sequence[int], fn: Callable[[int], Any]) -> dict[int, Any]:
    out = {}
    for r in ranks:
        with torch.cuda.stream(streams[r]):
            out[r] = fn(r)
    return out


def virtual_dispatch(disps: Sequence[Any], streams: Sequence[Any], xs: Sequence[torch.Tensor],
                     ids: Sequence[torch.Tensor], ws: Sequence[torch.Tensor], *,
                     ranks: Sequence[int] | None = None, join: bool = True) -> dict[int, DispatchResult]:
    """Every rank's dispatch, phase by phase (unchecked: the MoE forward's contract).

    Args:
        disps: [W] IPCDispatcher, rank r's at r; streams: [W] torch.cuda.Stream.
        xs, ids, ws: [W] x [T_r, H] (dispatcher dtype), topk_ids [T_r, k], topk_weights [T_r, k].
        ranks: the ranks to run (default all; fewer only to test a rank that never arrives).
        join: make the current stream wait for every rank's stream at the end.

    Returns:
        {rank: DispatchResult}.
    """
    ranks = range(len(disps)) if ranks is None else ranks
    cur = _fork(streams, ranks)
    prep = _phase(streams, ranks, lambda r: disps[r].prepare_inputs(xs[r], ids[r], ws[r]))
    pend = _phase(streams, ranks, lambda r: disps[r].dispatch_send_unchecked(*prep[r]))
    res = _phase(streams, ranks, lambda r: disps[r].dispatch_finish(pend[r]))
    if join:
        _join(cur, streams, ranks)
    return res


def virtual_combine(disps: Sequence[Any], streams: Sequence[Any], hs: dict[int, torch.Tensor] | Sequence[torch.Tensor],
                    handles: dict[int, Any] | Sequence[Any], *, ranks: Sequence[int] | None = None,
                    join: bool = True) -> dict[int, torch.Tensor]:
    """Every rank's combine, phase by phase. hs[r]: [N_r, H] expert outputs; handles[r]: rank r's
    dispatch handle. Returns {rank: y [T_r, H]}."""
    ranks = range(len(disps)) if ranks is None else ranks
    cur = _fork(streams, ranks)
    outs = _phase(streams, ranks, lambda r: hs[r].contiguous())
    sent = _phase(streams, ranks, lambda r: disps[r].combine_send_unchecked(outs[r], handles[r]))
    ys = _phase(streams, ranks, lambda r: disps[r].combine_finish(sent[r]))
    if join:
        _join(cur, streams, ranks)
    return ys


def virtual_step(disps: Sequence[Any], streams: Sequence[Any], xs: Sequence[torch.Tensor], ids: Sequence[torch.Tensor],
                 ws: Sequence[torch.Tensor], expert: Callable[[int, DispatchResult], torch.Tensor], *,
                 ranks: Sequence[int] | None = None) -> tuple[dict[int, DispatchResult], dict[int, torch.Tensor]]:
    """dispatch -> expert -> combine on every rank, phase by phase: every dispatch phase, then
    expert(r, result_r) -> h [N_r, H] for every rank (on its stream), then every combine phase.
    Returns ({rank: DispatchResult}, {rank: y [T_r, H]})."""
    ranks = range(len(disps)) if ranks is None else ranks
    cur = _fork(streams, ranks)
    res = virtual_dispatch(disps, streams, xs, ids, ws, ranks=ranks, join=False)
    hs = _phase(streams, ranks, lambda r: expert(r, res[r]))
    ys = virtual_combine(disps, streams, hs, {r: res[r].handle for r in ranks}, ranks=ranks, join=False)
    _join(cur, streams, ranks)
    return res, ys
