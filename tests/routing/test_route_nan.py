"""The defined result of NaN router logits (route's docstring) and that a NaN stays in its token, in
route() and in the MoE layer.

A token whose logits are all NaN gets ids 0..k-1 and NaN weights on every backend and method; under
SOFTMAX_TOPK a single NaN logit does the same. Other tokens are bit-identical to a clean run.
"""

from __future__ import annotations

import pytest
import torch

from moecomm.layer import MoE
from moecomm.routing import RoutingMethod, route

E, K = 16, 3


def _kwargs(method):
    if method is RoutingMethod.SOFTMAX_TOPK:
        return dict(renormalize=True)
    return dict(method=method, n_group=4, topk_group=2, e_score_correction_bias=torch.randn(E) * 0.1,
                renormalize=True, routed_scaling_factor=2.5)


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")  # numpy, inside the interpreter
@pytest.mark.parametrize("method", list(RoutingMethod))
def test_all_nan_token_gets_the_lowest_ids_and_nan_weights(backend, method):
    torch.manual_seed(0)
    clean = torch.randn(9, E, device=backend)
    dirty = clean.clone()
    dirty[4] = float("nan")
    kw = {k: v.to(backend) if isinstance(v, torch.Tensor) else v for k, v in _kwargs(method).items()}
    a, b = route(clean, K, **kw), route(dirty, K, **kw)
    assert b.topk_ids[4].tolist() == list(range(K))
    assert torch.isnan(b.topk_weights[4]).all()
    others = torch.arange(9, device=backend) != 4
    assert torch.equal(a.topk_ids[others], b.topk_ids[others])
    assert torch.equal(a.topk_weights[others], b.topk_weights[others])


@pytest.mark.filterwarnings("ignore:All-NaN slice:RuntimeWarning")
def test_one_nan_logit_under_softmax_is_the_all_nan_result(backend):
    logits = torch.randn(3, E, device=backend)
    logits[1, 7] = float("nan")
    r = route(logits, K, renormalize=True)
    assert r.topk_ids[1].tolist() == list(range(K)) and torch.isnan(r.topk_weights[1]).all()
    assert torch.isfinite(r.topk_weights[[0, 2]]).all()


@pytest.mark.parametrize("method", list(RoutingMethod))
@torch.no_grad()
def test_layer_nan_token_reaches_experts_0_to_k_minus_1_and_stays_in_its_row(method):
    torch.manual_seed(1)
    kw = dict(renormalize=True) if method is RoutingMethod.SOFTMAX_TOPK else dict(
        routing=method, n_group=4, topk_group=2, renormalize=True)
    moe = MoE(32, 16, E, K, **kw)
    x = torch.randn(21, 32)
    clean = moe(x)
    x[10] = float("nan")  # every logit of token 10 is NaN
    assert moe.route(x).topk_ids[10].tolist() == list(range(K))
    y = moe(x)
    assert torch.isnan(y[10]).all()
    others = torch.arange(21) != 10
    assert torch.isfinite(y[others]).all()
    # to rounding only: the NaN token's rows join experts 0..k-1, so the groups' sizes change
    torch.testing.assert_close(y[others], clean[others], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(moe.reference_forward(x)[others], y[others], atol=1e-4, rtol=1e-4)
