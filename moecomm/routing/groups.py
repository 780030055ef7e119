"""The rules of grouped top-k (SIGMOID_GROUPED_TOPK): one definition, read by route() and MoEConfig.

# E = num_experts, k = top_k, G = n_group

Experts fall in G groups of E // G; a token keeps its best topk_group groups and picks its k experts
among theirs, so k can be at most topk_group * (E // G).
"""

from __future__ import annotations

from ..errors import MoeCommValueError, check_positive_int

__all__ = ["check_groups"]


def check_groups(op: str, num_experts: int, top_k: int, n_group: int | None, topk_group: int | None) -> tuple[int, int]:
    """Check the grouping of SIGMOID_GROUPED_TOPK; return (n_group, topk_group) with defaults filled.

    Args:
        op: the caller's name, for the messages ("route", "MoE").
        num_experts: E; top_k: k (both already checked >= 1).
        n_group: G, must divide E; None means 1 (plain sigmoid top-k).
        topk_group: groups kept per token, 1 <= topk_group <= G; None means G (every group).

    Raises MoeCommTypeError / MoeCommValueError naming the argument.
    """
    n_group = 1 if n_group is None else check_positive_int(op, "n_group", n_group)
    if num_experts % n_group != 0:
        raise MoeCommValueError(f"{op}: n_group must divide num_experts ({num_experts}), got {n_group}")
    topk_group = n_group if topk_group is None else check_positive_int(op, "topk_group", topk_group)
    if topk_group > n_group:
        raise MoeCommValueError(f"{op}: topk_group must be <= n_group ({n_group}), got {topk_group}")
    eligible = topk_group * (num_experts // n_group)
    if top_k > eligible:
        raise MoeCommValueError(
            f"{op}: top_k must be <= topk_group * (num_experts // n_group) = {eligible} (the experts of the kept groups), got {top_k}"
        )
    return n_group, topk_group
