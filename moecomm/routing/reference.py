"""Pure-torch routing: the truth in tests and the path on CPU.

# T = num_tokens, E = num_experts, k = top_k, G = n_group, S = E // G (experts per group)

Both functions follow the Hugging Face transformers 5.17 routers operation by operation and in fp32
(MixtralTopKRouter, Qwen2MoeTopKRouter, Qwen3MoeTopKRouter, DeepseekV3TopkRouter), with one
deliberate difference: ties.

Ties. torch.topk has no tie rule. On CPU it runs libstdc++'s partial_sort / nth_element, so among
equal scores it returns an arbitrary subset in an arbitrary order (all-equal rows of 8 experts give
ids [6, 5, 4] for k=3; of 16 experts [10, 11, 12]); even the *set* differs from any index rule. A
kernel cannot reproduce that, so moecomm defines the rule "highest score first; among equal scores,
the lowest expert index first" (what a stable descending sort gives) and the reference implements
it with ``torch.sort(stable=True)``. The chosen *values* always equal torch.topk's; only which of
several equal-score experts is chosen can differ. Rows are returned in descending score order (the
score used for the choice: the probability, or the bias-corrected sigmoid score).
"""

from __future__ import annotations

import torch

# the +1e-20 of DeepseekV3TopkRouter's renormalisation, so that an all-zero row divides safely
GROUPED_RENORM_EPS = 1e-20


def _acc(dtype: torch.dtype) -> torch.dtype:
    """fp32 arithmetic and weights; float64 logits (gradcheck, ground truths) stay float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _topk_stable(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last dim, highest first, ties to the lowest index. [T, E] -> ([T, k], [T, k])."""
    values, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return values[..., :k], idx[..., :k]


def route_softmax_topk(
    router_logits: torch.Tensor,
    top_k: int,
    renormalize: bool = False,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over all experts in fp32, then top-k (Mixtral, Qwen2-MoE, Qwen3-MoE).

    Args:
        router_logits: [T, E] fp32/bf16/fp16, the router's output for each token.
        top_k: experts per token, 1 <= top_k <= E.
        renormalize: divide the top-k probabilities by their sum (Mixtral always; Qwen when
            ``norm_topk_prob``), without an epsilon, as transformers does.
        routed_scaling_factor: multiplies the final weights.

    Returns:
        (topk_ids [T, k] int32, topk_weights [T, k] float32), highest probability first.
    """
    probs = torch.softmax(router_logits.to(_acc(router_logits.dtype)), dim=-1)  # [T, E] fp32, as transformers
    weights, ids = _topk_stable(probs, top_k)  # [T, k]
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    if routed_scaling_factor != 1.0:
        weights = weights * routed_scaling_factor
    return ids.to(torch.int32), weights.contiguous()


def empty_route_outputs(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (topk_ids int32 [T, k], topk_weights fp32 [T, k]) on the logits' device: what
    the kernels fill and the fake implementations return."""
    shape = (router_logits.shape[0], top_k)
    return router_logits.new_empty(shape, dtype=torch.int32), router_logits.new_empty(shape, dtype=_acc(router_logits.dtype))


def route_grouped_topk(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool = False,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid scores, bias-corrected choice, grouped top-k (DeepSeek-V3's DeepseekV3TopkRouter).

    Args:
        router_logits: [T, E] fp32/bf16/fp16.
        e_score_correction_bias: [E] or None; added to the scores for the choice only.
        top_k: experts per token, <= topk_group * (E // n_group).
        n_group: G, the number of expert groups (E % G == 0).
        topk_group: groups kept per token; a group scores the sum of its top-2 biased scores (its
            top-1 when a group holds one expert).
        renormalize: divide the chosen (unbiased) scores by their sum + 1e-20.
        routed_scaling_factor: multiplies the final weights (after renormalisation).

    Returns:
        (topk_ids [T, k] int32, topk_weights [T, k] float32), highest biased score first.
    """
    num_tokens, num_experts = router_logits.shape
    group_size = num_experts // n_group  # S
    scores = router_logits.to(_acc(router_logits.dtype)).sigmoid()  # [T, E] fp32
    choice = scores + e_score_correction_bias if e_score_correction_bias is not None else scores  # fp32 by promotion
    group_scores = (
        choice.view(num_tokens, n_group, group_size).topk(min(2, group_size), dim=-1)[0].sum(dim=-1)
    )  # [T, G]; values only, so ties cannot matter here
    _, group_idx = _topk_stable(group_scores, topk_group)  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)  # [T, G]
    score_mask = group_mask.unsqueeze(-1).expand(-1, n_group, group_size).reshape(num_tokens, num_experts)
    choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
    _, ids = _topk_stable(choice, top_k)  # [T, k]
    weights = scores.gather(1, ids)  # the unbiased scores of the chosen experts
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + GROUPED_RENORM_EPS)
    weights = weights * routed_scaling_factor
    return ids.to(torch.int32), weights.contiguous()
