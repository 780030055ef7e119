"""Gradients of route(): the weights w.r.t. the logits (the ids and the correction bias get none).

# T = num_tokens, E = num_experts, k = top_k, G = n_group

- gradcheck on float64 logits (the reference keeps float64): renormalised or not, scaled, grouped
  with a bias; random logits are far from ties, so the finite differences never change the choice;
- fp32 against autograd through the reference (softmax/sigmoid, sort, gather), on the reference and
  on the Triton kernels (the interpreter on CPU): the same expressions in another order, 1e-6;
- opcheck of both ops, with and without a tensor requiring grad.
"""

from __future__ import annotations

import pytest
import torch

from moecomm.routing import RoutingMethod, route
from moecomm.routing import api as A
from moecomm.routing import reference as ref

SIG = RoutingMethod.SIGMOID_GROUPED_TOPK
# opcheck's AOT test sums every output into the first one's dtype (the int32 ids): see test_opcheck
NO_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")


def _logits(num_tokens, num_experts, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, num_experts, generator=g, dtype=dtype).to(device).requires_grad_(True)


@pytest.mark.parametrize("renormalize,scale", [(False, 1.0), (True, 1.0), (True, 2.5), (False, 0.5)])
def test_gradcheck_softmax_topk(renormalize, scale):
    logits = _logits(6, 8)
    assert torch.autograd.gradcheck(lambda l: A.route_softmax_topk_op(l, 3, renormalize, scale)[1], (logits,))


@pytest.mark.parametrize("n_group,topk_group,renormalize,scale,with_bias", [
    (1, 1, False, 1.0, False), (4, 2, True, 2.5, True), (2, 1, True, 1.0, False), (8, 4, False, 1.5, True),
])
def test_gradcheck_grouped_topk(n_group, topk_group, renormalize, scale, with_bias):
    logits = _logits(5, 16)
    bias = torch.randn(16, dtype=torch.float32) * 0.1 if with_bias else None
    assert torch.autograd.gradcheck(
        lambda l: A.route_grouped_topk_op(l, bias, 4, n_group, topk_group, renormalize, scale)[1], (logits,))


@pytest.mark.parametrize("kw", [
    dict(renormalize=True),
    dict(routed_scaling_factor=2.0),
    dict(method=SIG, n_group=4, topk_group=2, renormalize=True, routed_scaling_factor=2.5, bias=True),
    dict(method=SIG),
])
def test_fp32_matches_autograd_through_the_reference(backend, kw):
    dev = backend
    kw = dict(kw)
    logits = _logits(11, 16, dtype=torch.float32, device=dev)
    bias = (torch.randn(16, device=dev) * 0.1).requires_grad_(True) if kw.pop("bias", False) else None
    if bias is not None:
        kw["e_score_correction_bias"] = bias
    r = route(logits, 4, **kw)
    g = torch.randn_like(r.topk_weights)
    (got,) = torch.autograd.grad(r.topk_weights, logits, g, retain_graph=True)

    lr = logits.detach().clone().requires_grad_(True)
    if kw.get("method") is SIG:
        ids, w = ref.route_grouped_topk(lr, bias, 4, kw.get("n_group", 1), kw.get("topk_group", kw.get("n_group", 1)),
                                        kw.get("renormalize", False), kw.get("routed_scaling_factor", 1.0))
    else:
        ids, w = ref.route_softmax_topk(lr, 4, kw.get("renormalize", False), kw.get("routed_scaling_factor", 1.0))
    assert torch.equal(ids, r.topk_ids)
    (want,) = torch.autograd.grad(w, lr, g)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    if bias is not None:  # the correction bias shifts the choice only: no gradient reaches it
        r.topk_weights.sum().backward()
        assert bias.grad is None


def test_half_precision_logits_get_gradients_in_their_dtype():
    logits = torch.randn(4, 8, dtype=torch.bfloat16).requires_grad_(True)
    route(logits, 2, renormalize=True).topk_weights.sum().backward()
    assert logits.grad.dtype == torch.bfloat16
    # renormalised weights sum to 1 per token: the gradient of their sum is 0 up to rounding
    torch.testing.assert_close(logits.grad.float(), torch.zeros(4, 8), atol=1e-3, rtol=0)


def test_torch_compile_backward_equals_eager():
    def loss(logits):
        a = route(logits, 2, renormalize=True).topk_weights
        b = route(logits, 4, method=SIG, n_group=4, topk_group=2, renormalize=True).topk_weights
        return (a.square().sum() + b.sin().sum())

    logits = _logits(7, 16, dtype=torch.float32)
    (want,) = torch.autograd.grad(loss(logits), logits)
    (got,) = torch.autograd.grad(torch.compile(loss, fullgraph=True, backend="aot_eager")(logits), logits)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_opcheck():
    logits = torch.randn(6, 8)
    bias = torch.randn(8) * 0.1
    for l, utils in ((logits, None), (logits.clone().requires_grad_(True), NO_AOT)):
        kw = {} if utils is None else {"test_utils": utils}
        torch.library.opcheck(A.route_softmax_topk_op.op, (l, 2, True, 1.0), **kw)
        torch.library.opcheck(A.route_grouped_topk_op.op, (l, bias, 3, 4, 2, True, 2.5), **kw)
        torch.library.opcheck(A.route_grouped_topk_op.op, (l, None, 3, 1, 1, False, 1.0), **kw)
