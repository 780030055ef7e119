"""route(): validate, pick the implementation, launch.

# T = num_tokens, E = num_experts, k = top_k, G = n_group

The two methods are torch.library custom ops (moecomm::route_softmax_topk, moecomm::route_grouped_topk)
with fake implementations and autograd formulas (the weights are differentiable w.r.t. the logits),
so that torch.compile(fullgraph=True), training and CUDA-graph capture go through them. Inside an op,
the Triton kernel runs on CUDA tensors and the reference elsewhere (moecomm.jit.backend.choose).
Output shapes depend only on T and k: no host synchronisation. route() checks its arguments;
route_unchecked() is its trusted twin for the MoE layer, which validated its configuration once.
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import torch

from ..jit import backend as _backend
from ..jit.ops import define_op
from ..errors import MoeCommTypeError, MoeCommValueError, check_positive_int, check_tensor
from . import reference
from .groups import check_groups

_OP = "route"
_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class RoutingMethod(enum.Enum):
    """How router logits become expert choices.

    SOFTMAX_TOPK: softmax over all experts in fp32, top-k, optional renormalisation of the top-k
        weights (Mixtral, Qwen2-MoE, Qwen3-MoE).
    SIGMOID_GROUPED_TOPK: sigmoid scores; the e_score_correction_bias is added for the choice only;
        experts fall in n_group groups, a group scores the sum of its top-2 biased scores, the
        topk_group best groups are kept, top-k over their experts; weights are the unbiased sigmoid
        scores, renormalised (+1e-20) when asked, times routed_scaling_factor (DeepSeek-V3).
    """

    SOFTMAX_TOPK = "softmax_topk"
    SIGMOID_GROUPED_TOPK = "sigmoid_grouped_topk"


class Routing(NamedTuple):
    """The result of route().

    Attributes:
        topk_ids: [T, k] int32, the chosen experts of each token, best first; ties go to the lowest
            expert index.
        topk_weights: [T, k] float32, the weight of each chosen expert.
    """

    topk_ids: torch.Tensor
    topk_weights: torch.Tensor


# ---------------------------------------------------------------------------------------------
# custom ops (moecomm/jit/ops.py define_op), with autograd formulas for the weights w.r.t. the logits
# (the ids and the correction bias get none: the choice is piecewise constant, the bias is a buffer).
#
# Softmax: p = softmax(l), the chosen p_j, r = p_j / sum_i p_i when renormalised, w = c * r. So
# d r -> d p_j = (d r_j - sum_i d r_i r_i) / sum_i p_i, scattered into [T, E], then the softmax
# backward d l = p * (d p - <d p, p>). Sigmoid: s = sigmoid(l), r = s_j / (sum_i s_i + 1e-20), the same
# renormalisation step, then d l_j = d s_j * s_j * (1 - s_j). Recomputed from the logits in fp32.


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _renorm_grad(g: torch.Tensor, chosen: torch.Tensor, eps: float) -> torch.Tensor:
    """d chosen [T, k] from d r [T, k] where r = chosen / (sum(chosen) + eps)."""
    total = chosen.sum(dim=-1, keepdim=True) + eps
    r = chosen / total
    return (g - (g * r).sum(dim=-1, keepdim=True)) / total


def _route_softmax_topk_impl(
    router_logits: torch.Tensor, top_k: int, renormalize: bool, routed_scaling_factor: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if _backend.choose(router_logits, "route") is _backend.Impl.TRITON:
        from . import _triton

        return _triton.route_softmax_topk(router_logits, top_k, renormalize, routed_scaling_factor)
    return reference.route_softmax_topk(router_logits, top_k, renormalize, routed_scaling_factor)


def _save_logits_and_ids(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[0])
    ctx.args = inputs[1:]


def _route_softmax_topk_backward(ctx, _grad_ids, grad_weights):
    logits, ids = ctx.saved_tensors
    _top_k, renormalize, scale = ctx.args
    acc = _acc(logits.dtype)
    ids = ids.long()
    p = torch.softmax(logits.to(acc), dim=-1)  # [T, E]
    g = grad_weights.to(acc) * scale  # [T, k]
    if renormalize:
        g = _renorm_grad(g, p.gather(1, ids), 0.0)
    gp = torch.zeros_like(p).scatter_(1, ids, g)  # the k ids of a row are distinct
    return (p * (gp - (gp * p).sum(dim=-1, keepdim=True))).to(logits.dtype), None, None, None


route_softmax_topk_op = define_op(
    "route_softmax_topk", _route_softmax_topk_impl,
    fake=lambda router_logits, top_k, renormalize, routed_scaling_factor: reference.empty_route_outputs(router_logits, top_k),
    setup_context=_save_logits_and_ids, backward=_route_softmax_topk_backward)


def _route_grouped_topk_impl(
    router_logits: torch.Tensor,
    e_score_correction_bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    renormalize: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    if _backend.choose(router_logits, "route") is _backend.Impl.TRITON:
        from . import _triton

        return _triton.route_grouped_topk(
            router_logits, e_score_correction_bias, top_k, n_group, topk_group, renormalize,
            routed_scaling_factor, reference.GROUPED_RENORM_EPS,
        )
    return reference.route_grouped_topk(
        router_logits, e_score_correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor
    )


def _route_grouped_topk_setup(ctx, inputs, output) -> None:
    ctx.save_for_backward(inputs[0], output[0])
    ctx.renormalize, ctx.scale = inputs[5], inputs[6]


def _route_grouped_topk_backward(ctx, _grad_ids, grad_weights):
    logits, ids = ctx.saved_tensors
    acc = _acc(logits.dtype)
    ids = ids.long()
    s = torch.sigmoid(logits.to(acc))  # [T, E]
    chosen = s.gather(1, ids)  # [T, k], the unbiased scores
    g = grad_weights.to(acc) * ctx.scale
    if ctx.renormalize:
        g = _renorm_grad(g, chosen, reference.GROUPED_RENORM_EPS)
    gl = torch.zeros_like(s).scatter_(1, ids, g * chosen * (1 - chosen))
    return gl.to(logits.dtype), None, None, None, None, None, None


route_grouped_topk_op = define_op(
    "route_grouped_topk", _route_grouped_topk_impl,
    fake=lambda router_logits, e_score_correction_bias, top_k, n_group, topk_group, renormalize, routed_scaling_factor:
        reference.empty_route_outputs(router_logits, top_k),
    setup_context=_route_grouped_topk_setup, backward=_route_grouped_topk_backward)


def route_unchecked(
    router_logits: torch.Tensor,
    top_k: int,
    method: RoutingMethod,
    renormalize: bool,
    n_group: int | None,
    topk_group: int | None,
    e_score_correction_bias: torch.Tensor | None,
    routed_scaling_factor: float,
) -> Routing:
    """route() without any check: for callers whose arguments were validated once up front (the MoE
    layer checks its configuration at construction and builds the logits itself). Same results, the
    same custom ops (with their autograd formulas); n_group None means 1, topk_group None means n_group."""
    if method is RoutingMethod.SOFTMAX_TOPK:
        return Routing(*route_softmax_topk_op(router_logits, top_k, renormalize, float(routed_scaling_factor)))
    n_group = 1 if n_group is None else n_group
    topk_group = n_group if topk_group is None else topk_group
    return Routing(*route_grouped_topk_op(router_logits, e_score_correction_bias, top_k, n_group, topk_group,
                                          renormalize, float(routed_scaling_factor)))


def route(
    router_logits,
    top_k: int,
    *,
    method: RoutingMethod = RoutingMethod.SOFTMAX_TOPK,
    renormalize: bool = False,
    n_group: int | None = None,
    topk_group: int | None = None,
    e_score_correction_bias=None,
    routed_scaling_factor: float = 1.0,
    validate: bool = True,
) -> Routing:
    """Choose top_k experts per token from router logits; one fused kernel on GPU.

    Args:
        router_logits: [T, E] float32/bfloat16/float16 (a torch.Tensor or any DLPack array, taken
            without a copy; any strides), the router's output for each token. T may be 0.
        top_k: k, experts per token, 1 <= k <= E.
        method: a RoutingMethod; SOFTMAX_TOPK (default) or SIGMOID_GROUPED_TOPK.
        renormalize: divide the top-k weights by their sum (SIGMOID_GROUPED_TOPK adds 1e-20 to the
            sum, as DeepSeek-V3 does). Mixtral: True; Qwen-MoE: its ``norm_topk_prob``.
        n_group: G, SIGMOID_GROUPED_TOPK only: expert groups, E % G == 0 (default 1).
        topk_group: SIGMOID_GROUPED_TOPK only: groups kept per token, 1 <= topk_group <= G
            (default G), with k <= topk_group * (E // G).
        e_score_correction_bias: [E] float32/bfloat16/float16 on the logits' device, or None;
            SIGMOID_GROUPED_TOPK only; added to the sigmoid scores for the choice, not the weights.
        routed_scaling_factor: multiplies every weight, after renormalisation.
        validate: also run checks that read device data (the bias is finite); they sync the host,
            so the MoE layer passes False. Skipped anyway under CUDA-graph capture and torch.compile.

    Returns:
        Routing(topk_ids [T, k] int32, topk_weights [T, k] float32), best expert first. Among equal
        scores the lowest expert index wins (torch.topk has no tie rule: see reference.py).

    NaN (a diverged model, an uninitialised router): the result is defined, never an error, and a
    NaN stays in its token.
        - A token whose logits are all NaN gets topk_ids 0, 1, ..., k-1 (the lowest expert indices)
          and NaN weights, under both methods, on the reference and the kernel alike. Downstream its
          rows go to those experts and its output is NaN; no other token's rows change.
        - SOFTMAX_TOPK: one NaN logit makes the token's whole softmax NaN, so the same result.
        - SIGMOID_GROUPED_TOPK with only some NaN scores: distinct ids in [0, E) and weights of which
          at least one is NaN when a NaN expert is chosen; which experts is not defined (the
          reference ranks NaN above every number, the kernel below).
        - Every other token's ids and weights are bit-identical to a run without the NaN token.
        moecomm does not check logits for NaN (a device read per call); check your model's outputs.

    Example:
        >>> r = route(torch.randn(4, 8), 2, renormalize=True)           # Mixtral
        >>> r = route(logits, 8, method=RoutingMethod.SIGMOID_GROUPED_TOPK, n_group=8, topk_group=4,
        ...           e_score_correction_bias=bias, renormalize=True, routed_scaling_factor=2.5)
    """
    logits = check_tensor(_OP, "router_logits", router_logits, dtype=_LOGIT_DTYPES, ndim=2)
    num_experts = logits.shape[1]
    if num_experts < 1:
        raise MoeCommValueError(f"{_OP}: router_logits must have at least 1 expert column, got shape {list(logits.shape)}")
    check_positive_int(_OP, "top_k", top_k)
    if top_k > num_experts:
        raise MoeCommValueError(f"{_OP}: top_k must be <= num_experts ({num_experts}), got {top_k}")
    if not isinstance(method, RoutingMethod):
        raise MoeCommTypeError(f"{_OP}: method must be a RoutingMethod, got {method!r}")
    if not isinstance(renormalize, bool):
        raise MoeCommTypeError(f"{_OP}: renormalize must be a bool, got {type(renormalize).__name__}")
    if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)):
        raise MoeCommTypeError(f"{_OP}: routed_scaling_factor must be a float, got {type(routed_scaling_factor).__name__}")
    if not math.isfinite(routed_scaling_factor):
        raise MoeCommValueError(f"{_OP}: routed_scaling_factor must be finite, got {routed_scaling_factor}")

    if method is RoutingMethod.SOFTMAX_TOPK:
        for name, value in (("n_group", n_group), ("topk_group", topk_group), ("e_score_correction_bias", e_score_correction_bias)):
            if value is not None:
                raise MoeCommValueError(
                    f"{_OP}: {name} must be None with method=SOFTMAX_TOPK (it belongs to SIGMOID_GROUPED_TOPK), "
                    f"got {type(value).__name__ if isinstance(value, torch.Tensor) else value!r}"
                )
        return Routing(*route_softmax_topk_op(logits, top_k, renormalize, float(routed_scaling_factor)))

    n_group, topk_group = check_groups(_OP, num_experts, top_k, n_group, topk_group)
    bias = None
    if e_score_correction_bias is not None:
        bias = check_tensor(
            _OP, "e_score_correction_bias", e_score_correction_bias,
            dtype=_LOGIT_DTYPES, shape=(num_experts,), device=logits.device,
        )
        if _backend.device_checks_allowed(validate) and not bool(torch.isfinite(bias).all()):
            raise MoeCommValueError(
                f"{_OP}: e_score_correction_bias must be finite (it shifts every token's choice), got NaN or inf; "
                "pass validate=False to skip this check"
            )
    return Routing(*route_grouped_topk_op(logits, bias, top_k, n_group, topk_group, renormalize, float(routed_scaling_factor)))
