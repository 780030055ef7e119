"""Set-up check that every rank of a group was built with the same configuration.

A rank built with num_experts=16 while the others say 8 would not crash: it would exchange
wrongly-sized buffers and produce garbage, or hang in a collective whose sizes do not match.
check_agreement() turns that into a clear error raised on EVERY rank at construction time, naming
the ranks and the field that differ, so no rank is left waiting for the ones that raised.

It uses all_gather_object (pickling, a host sync): set-up only, never on the hot path.
"""

# W = ranks in the group; fields are plain values (no tensors), one dict per rank

from __future__ import annotations

from typing import Any

import torch.distributed as dist

from ..errors import MoeCommValueError

_MISSING = "<not given>"


def _fmt(value: Any) -> str:
    return repr(value) if isinstance(value, str) and value != _MISSING else str(value)


def _describe_split(values: list[Any], ranks: list[int]) -> str:
    """"rank 0 has 8, rank 2 has 16": groups ranks by value, the most common value first."""
    groups: list[tuple[Any, list[int]]] = []
    for rank, value in zip(ranks, values):
        for v, rs in groups:
            if v == value:
                rs.append(rank)
                break
        else:
            groups.append((value, [rank]))
    # the majority first (ties: the group holding the lowest rank), so the odd rank out reads last
    groups.sort(key=lambda g: (-len(g[1]), g[1][0]))
    parts = []
    for value, rs in groups:
        who = f"rank {rs[0]} has" if len(rs) == 1 else f"ranks {', '.join(map(str, rs))} have"
        parts.append(f"{who} {_fmt(value)}")
    return ", ".join(parts)


def disagreement_message(op: str, gathered: list[dict[str, Any]], ranks: list[int]) -> str | None:
    """The error message for ranks' field dicts that differ, or None when they all agree.

    Args:
        op: the name of the thing being set up (e.g. "EPDispatcher").
        gathered: one dict of fields per rank, in group-rank order.
        ranks: the global rank of each entry of ``gathered``.
    """
    names: list[str] = []
    for fields in gathered:
        names += [n for n in fields if n not in names]
    problems = []
    for name in names:
        values = [fields.get(name, _MISSING) for fields in gathered]
        if any(v != values[0] for v in values[1:]):
            problems.append(f"ranks disagree on {name}: {_describe_split(values, ranks)}")
    if not problems:
        return None
    return f"{op}: " + "; ".join(problems)


def check_agreement(group: dist.ProcessGroup | None, op: str, **fields: Any) -> None:
    """Raise on every rank of ``group`` unless all ranks passed equal ``fields``.

    Call it at set-up (a constructor), on every rank of the group, with picklable, comparable values:
    ints, strings, dtypes, tuples (``ExpertPlacement.describe()``). Does nothing when torch.distributed
    is not initialised or the group has one rank.

    Args:
        group: the process group whose ranks must agree (None: the default group).
        op: the name of the thing being set up, the prefix of the error message.
        **fields: name -> this rank's value, e.g. ``num_experts=8, hidden=1024, dtype=torch.bfloat16``.

    Raises:
        MoeCommValueError on every rank, e.g.
        "EPDispatcher: ranks disagree on num_experts: rank 0 has 8, rank 2 has 16"
        (ranks are global ranks; ranks holding the most common value are listed first).

    Example:
        check_agreement(group, "EPDispatcher", num_experts=8, hidden=1024, placement=placement.describe())
    """
    if not dist.is_available() or not dist.is_initialized():
        return
    size = dist.get_world_size(group)
    if size <= 1:
        return
    gathered: list[Any] = [None] * size
    payload = {"__op__": op, **fields}
    try:
        dist.all_gather_object(gathered, payload, group=group)
    except Exception as exc:
        # a rank died or timed out during set-up: name it if the health store knows who
        from .health import explain_failure

        explain_failure(group, f"{op}: agreement check", exc)
        raise
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(size))
    message = disagreement_message(op, gathered, ranks)
    if message is not None:
        raise MoeCommValueError(message)
