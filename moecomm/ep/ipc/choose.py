"""Which expert-parallel path a step takes: the low-latency IPC path, NCCL's static mode, or its throughput mode.

# T = num_tokens (this rank's step), W = ep_size

The rule (issue 13): inside one node, when the symmetric-buffer layer says IPC works over the group
(moecomm.distributed.symmetric.eligibility, decided once and cached) and the step's tokens fit the
low-latency dispatcher's capacity, take the IPC path; else NCCL's static-capacity mode when the
tokens fit its max_tokens (decode, CUDA graphs); else the throughput mode. EP size 1 is the local
permute. Pure and host-only: the MoE layer calls it per step and reports the choice.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...errors import MoeCommValueError

LOCAL, IPC_LL, NCCL_STATIC, NCCL_THROUGHPUT = "local", "ipc_ll", "nccl_static", "nccl_throughput"


@dataclass(frozen=True)
class PathChoice:
    """The path of one step and why (a sentence for the log and the layer's report).

    Attributes:
        path: "local", "ipc_ll", "nccl_static" or "nccl_throughput".
        reason: why this path, and why not the faster ones.
    """

    path: str
    reason: str


def choose_ep_path(num_tokens: int, *, ep_size: int, eligibility: Any = None, ll_max_tokens: int | None = None,
                   static_max_tokens: int | None = None) -> PathChoice:
    """The path a step of ``num_tokens`` tokens per rank takes.

    Args:
        num_tokens: T, this step's tokens on this rank (>= 0).
        ep_size: W, ranks of the expert-parallel group.
        eligibility: the symmetric layer's Eligibility (``.ok``, ``.reason``) for the group, or None
            when no IPC buffer was set up.
        ll_max_tokens: the IPCDispatcher's max_tokens (None: no low-latency dispatcher).
        static_max_tokens: EPDispatcher's static-mode max_tokens (None: no static mode).
    """
    op = "choose_ep_path"
    for name, v in (("num_tokens", num_tokens), ("ep_size", ep_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "num_tokens" else 1):
            raise MoeCommValueError(f"{op}: {name} must be an int >= {0 if name == 'num_tokens' else 1}, got {v!r}")
    if ep_size == 1:
        return PathChoice(LOCAL, "EP size 1: the local permute, no exchange")
    why_not: str
    if eligibility is not None and not eligibility.ok:  # the root cause first: why no dispatcher was built
        why_not = f"IPC is not eligible over the group: {eligibility.reason}"
    elif ll_max_tokens is None:
        why_not = "no low-latency dispatcher was built"
    elif eligibility is None:
        why_not = "no symmetric (IPC) buffer was set up"
    elif num_tokens > ll_max_tokens:
        why_not = f"{num_tokens} tokens exceed the low-latency capacity of {ll_max_tokens} a rank"
    else:
        return PathChoice(IPC_LL, f"inside one node over IPC, {num_tokens} <= {ll_max_tokens} tokens a rank")
    if static_max_tokens is not None and num_tokens <= static_max_tokens:
        return PathChoice(NCCL_STATIC, f"NCCL static-capacity mode ({num_tokens} <= {static_max_tokens} tokens a "
                                       f"rank); not IPC: {why_not}")
    return PathChoice(NCCL_THROUGHPUT, f"NCCL throughput mode; not IPC: {why_not}" +
                      (f"; not static: {num_tokens} > {static_max_tokens} tokens a rank" if static_max_tokens else ""))
