"""Collective helpers of the capabilities: group facts, and collectives whose failures name the rank at fault.

    rank, W = group_info(group)                      # (0, 1) without torch.distributed
    work = all_to_all(out, inp, out_splits, in_splits, group, "dispatch: all_to_all", async_op=True)
    wait_all([work], group, "dispatch: all_to_all")  # a dead peer -> RankFailureError naming it
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..errors import MoeCommValueError
from .health import explain_failure, report_failure

__all__ = ["all_to_all", "global_rank", "group_device", "group_info", "report_failure", "wait_all"]


def group_info(group) -> tuple[int, int]:
    """(rank in group, W); a process without torch.distributed is a group of one."""
    if not dist.is_available() or not dist.is_initialized():
        if group is not None:
            raise MoeCommValueError("dispatch: group must be None when torch.distributed is not initialised, "
                                    f"got {group!r}")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def global_rank(group, group_rank: int) -> int:
    """The global rank of ``group_rank`` of ``group`` (None: the default group)."""
    return dist.get_global_rank(group, group_rank) if group is not None else group_rank


def group_device(group) -> torch.device:
    """Where the group's tensors live: the current CUDA device for NCCL, the CPU otherwise."""
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def all_to_all(out, inp, out_splits, in_splits, group, what: str, async_op: bool = False):
    """dist.all_to_all_single; a failure is explained (the rank at fault named) before it is re-raised."""
    try:
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=group, async_op=async_op)
    except Exception as exc:
        explain_failure(group, what, exc)
        raise


def wait_all(works: list, group, what: str) -> None:
    """Wait for async works (None entries are skipped); failures are explained as in all_to_all."""
    for w in works:
        if w is None:
            continue
        try:
            w.wait()
        except Exception as exc:
            explain_failure(group, what, exc)
            raise
