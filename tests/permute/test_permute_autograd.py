"""Gradients of permute / permute_with_row_weights / unpermute: their ops' autograd formulas.

# T = num_tokens, H = hidden, k = top_k, E = num_experts, M = T * k routed rows

- gradcheck on float64 (the reference runs for float64 on every device): the formulas are the
  derivative of the forward, to finite-difference precision;
- fp32 against autograd through the plain-torch reference (index_select, scatter, combine_ref), on
  the reference and on the Triton kernels (the interpreter on CPU): data movement gives the same
  sums in the same order, so 1e-6;
- opcheck with inputs that require grad (the autograd registration is consistent).
"""

from __future__ import annotations

import pytest
import torch

from moecomm.ep import LocalDispatcher
from moecomm.permute import permute, unpermute
from moecomm.permute import api as P
from moecomm.permute import reference as ref
from moecomm.permute.api import permute_with_row_weights


def _ids(num_tokens, top_k, num_experts, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(num_tokens, num_experts, generator=g).topk(top_k, dim=1).indices.to(torch.int32).to(device)


def _leaf(*shape, dtype=torch.float64, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).to(device).requires_grad_(True)


# --------------------------------------------------------------------------- gradcheck, float64


@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(5, 2, 3), (1, 1, 1), (7, 3, 4)])
def test_gradcheck_permute_and_unpermute(num_tokens, top_k, num_experts):
    ids = _ids(num_tokens, top_k, num_experts)
    x = _leaf(num_tokens, 3)
    assert torch.autograd.gradcheck(lambda x: P.permute_op(x, ids, num_experts)[0], (x,))
    dst_row = P.permute_indices_op(ids, num_experts)[1]
    eo = _leaf(num_tokens * top_k, 3, seed=1)
    w = _leaf(num_tokens, top_k, seed=2)
    assert torch.autograd.gradcheck(lambda eo, w: P.unpermute_op(eo, dst_row, w), (eo, w))
    assert torch.autograd.gradcheck(lambda eo: P.unpermute_op(eo, dst_row, None), (eo,))


def test_gradcheck_weighted_permutes():
    ids, e = _ids(6, 2, 4), 4
    x, w = _leaf(6, 3), _leaf(6, 2, seed=1)
    assert torch.autograd.gradcheck(lambda x, w: [P.permute_weighted_op(x, ids, e, w)[i] for i in (0, 5)], (x, w))
    assert torch.autograd.gradcheck(lambda w: P.permute_indices_weighted_op(ids, e, w)[4], (w,))


# --------------------------------------------------------------------------- fp32 against the reference


def test_fp32_matches_autograd_through_the_reference(backend):
    dev = backend
    num_tokens, top_k, num_experts, hidden = 9, 2, 4, 16
    ids = _ids(num_tokens, top_k, num_experts, device=dev)
    x = _leaf(num_tokens, hidden, dtype=torch.float32, device=dev)
    w = torch.rand(num_tokens, top_k, device=dev).requires_grad_(True)
    up = torch.randn(num_tokens * top_k, hidden, device=dev)  # a per-row factor, so rows differ in the loss
    p = permute(x, ids, num_experts)
    y = unpermute(p.permuted * up, p.indices, w)
    gy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), gy)

    xr, wr = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    src, dst, _, _ = ref.permute_indices_ref(ids, num_experts)
    yr = ref.combine_ref(ref.permute_rows_ref(xr, src) * up, dst, wr)
    gxr, gwr = torch.autograd.grad(yr, (xr, wr), gy)
    torch.testing.assert_close(gx, gxr, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(gw, gwr, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("materialize", [False, True])
def test_row_weights_carry_the_gradient_of_topk_weights(backend, materialize):
    dev = backend
    ids = _ids(8, 3, 5, device=dev)
    x = _leaf(8, 16, dtype=torch.float32, device=dev)
    w = torch.rand(8, 3, device=dev).requires_grad_(True)
    res = permute_with_row_weights(x, ids, w, 5, materialize=materialize)
    g_rows = torch.randn(24, device=dev)
    loss = (res.row_weights * g_rows).sum()
    if materialize:
        loss = loss + res.permuted.square().sum()
    loss.backward()
    torch.testing.assert_close(w.grad, g_rows[res.indices.dst_row.long()], atol=0, rtol=0)  # exact: a gather
    if materialize:
        torch.testing.assert_close(x.grad, 2 * x.detach() * 3, atol=1e-6, rtol=1e-6)  # each token in 3 rows
    else:
        assert x.grad is None


def test_local_dispatcher_round_trip_gradient(backend):
    """dispatch -> per-row weight -> combine is sum_j w[t, j] * x[t]: d x = sum_j w, d w = <g, x>."""
    dev = backend
    d = LocalDispatcher(4, 2, materialize=True)
    x = _leaf(6, 8, dtype=torch.float32, device=dev)
    w = torch.rand(6, 2, device=dev).requires_grad_(True)
    r = d.dispatch(x, _ids(6, 2, 4, device=dev), w)
    y = d.combine(r.tokens * r.row_weights[:, None], r.handle)
    g = torch.randn_like(y)
    y.backward(g)
    torch.testing.assert_close(x.grad, g * w.detach().sum(1, keepdim=True), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(w.grad, (g * x.detach()).sum(1, keepdim=True).expand(6, 2), atol=1e-5, rtol=1e-5)


def test_out_variants_refuse_grad_clearly():
    ids = _ids(4, 2, 3)
    x = _leaf(4, 8, dtype=torch.float32)
    with pytest.raises(TypeError, match="permute_out: its tensor arguments must not require grad"):
        permute(x, ids, 3, out=torch.empty(8, 8))
    with torch.no_grad():
        permute(x, ids, 3, out=torch.empty(8, 8))  # fine without autograd


NO_AOT = ("test_schema", "test_autograd_registration", "test_faketensor")


def test_opcheck_with_grad():
    ids, e = _ids(5, 2, 3), 3
    x, w = _leaf(5, 8, dtype=torch.float32), torch.rand(5, 2).requires_grad_(True)
    torch.library.opcheck(P.permute_op.op, (x, ids, e))
    torch.library.opcheck(P.permute_weighted_op.op, (x, ids, e, w))
    # opcheck's AOT test sums every output into the first one's dtype: an op whose first output is
    # an integer index cannot take it with a float gradient (test_row_weights_... and the layer's
    # compiled training step cover that path)
    torch.library.opcheck(P.permute_indices_weighted_op.op, (ids, e, w), test_utils=NO_AOT)
    dst_row = P.permute_indices_op(ids, e)[1]
    eo = _leaf(10, 8, dtype=torch.float32)
    torch.library.opcheck(P.unpermute_op.op, (eo, dst_row, w))
    torch.library.opcheck(P.unpermute_op.op, (eo, dst_row, None))
