"""Gradients of grouped_mm and expert_mlp: their ops' autograd formulas (see moecomm/gemm/_autograd.py).

# M = rows, K = in features, N = out features, E = groups, T = rows before the gather, H, I

- gradcheck on float64 (the reference runs for float64): both layouts, an empty group, the fused
  gather (a row gathered twice), row_scale; silu and gelu;
- fp32 against autograd through the plain-torch references: GEMMs of depth <= 32 in another
  order, fp32 rounding ~sqrt(32) * 2**-24 relative on O(1) values -> 1e-5;
- the Triton kernels (the interpreter on CPU) in forward and backward against the same;
- opcheck of the ops with inputs that require grad, and of the weight-gradient op.
"""

from __future__ import annotations

import pytest
import torch

from moecomm.gemm import expert_mlp, expert_mlp_reference, grouped_mm, grouped_mm_reference
from moecomm.gemm import _autograd as AG
from moecomm.gemm import api as GA
from moecomm.gemm import mlp as GM

SIZES = [3, 0, 5]  # an empty group in the middle


def _offs(sizes, device="cpu"):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _t(*shape, dtype=torch.float64, device="cpu", seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g, dtype=dtype) * scale).to(device).requires_grad_(True)


def _gather(m, t, device="cpu"):
    idx = torch.arange(m) % t  # rows 0.. gathered more than once when m > t
    return idx.flip(0).to(torch.int32).to(device)


@pytest.mark.parametrize("layout", ["ekn", "enk"])
@pytest.mark.parametrize("gather,scale", [(False, False), (True, True)])
def test_gradcheck_grouped_mm(layout, gather, scale):
    m, k, n, e = sum(SIZES), 4, 3, len(SIZES)
    offs = _offs(SIZES)
    t = 5 if gather else m
    x = _t(t, k)
    w = _t(e, k, n, seed=1) if layout == "ekn" else _t(e, n, k, seed=1)
    gi = _gather(m, t) if gather else None
    rs = torch.rand(m, dtype=torch.float64).requires_grad_(True) if scale else None
    args = (x, w) if rs is None else (x, w, rs)
    assert torch.autograd.gradcheck(lambda x, w, *r: GA.grouped_mm_op(x, w, offs, layout, gi, r[0] if r else None), args)


@pytest.mark.parametrize("layout", ["enk", "ekn"])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_gradcheck_expert_mlp(layout, activation):
    h, i, e = 4, 3, len(SIZES)
    m, t = sum(SIZES), 6
    offs, gi = _offs(SIZES), _gather(m, t)
    x = _t(t, h)
    gu = _t(e, 2 * i, h, seed=1) if layout == "enk" else _t(e, h, 2 * i, seed=1)
    dn = _t(e, h, i, seed=2) if layout == "enk" else _t(e, i, h, seed=2)
    rs = torch.rand(m, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x, gu, dn, rs: GM.expert_mlp_op(x, gu, dn, offs, layout, activation, gi, rs), (x, gu, dn, rs))
    assert torch.autograd.gradcheck(
        lambda x, gu, dn: GM.expert_mlp_op(x, gu, dn, offs, layout, activation, None, None), (x[:m], gu, dn))


def _close(got, want, dev):
    # CPU: fp32 throughout, 1e-5. GPU: the kernels run fp32 as tf32 (10-bit mantissa, 2**-11 relative
    # per operand), depth <= 32 -> a few 1e-3 relative to the operands: compare norms.
    for a, b in zip(got, want):
        if dev == "cpu":
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        else:
            assert ((a - b).norm() / b.norm()).item() < 1e-2


@pytest.mark.parametrize("layout", ["ekn", "enk"])
def test_grouped_mm_fp32_matches_autograd_through_the_reference(backend, layout):
    dev = backend
    sizes, k, n = [5, 0, 7, 4], 16, 32
    m, e, t = sum(sizes), len(sizes), 10
    offs, gi = _offs(sizes, dev), _gather(m, t, dev)
    x = _t(t, k, dtype=torch.float32, device=dev)
    w = _t(e, k, n, dtype=torch.float32, device=dev, seed=1) if layout == "ekn" else _t(e, n, k, dtype=torch.float32, device=dev, seed=1)
    rs = torch.rand(m, device=dev).requires_grad_(True)
    y = grouped_mm(x, w, offs, layout=layout, gather_idx=gi, row_scale=rs)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, w, rs), g)
    yr = grouped_mm_reference(x, w, offs, layout=layout, gather_idx=gi, row_scale=rs)
    want = torch.autograd.grad(yr, (x, w, rs), g)
    _close(got, want, dev)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_expert_mlp_fp32_matches_autograd_through_the_reference(backend, activation):
    dev = backend
    sizes, h, i = [4, 6, 0, 3], 16, 8
    m, e, t = sum(sizes), len(sizes), 9
    offs, gi = _offs(sizes, dev), _gather(m, t, dev)
    x = _t(t, h, dtype=torch.float32, device=dev)
    gu = _t(e, 2 * i, h, dtype=torch.float32, device=dev, seed=1, scale=h**-0.5)
    dn = _t(e, h, i, dtype=torch.float32, device=dev, seed=2, scale=i**-0.5)
    rs = torch.rand(m, device=dev).requires_grad_(True)
    y = expert_mlp(x, gu, dn, offs, activation=activation, gather_idx=gi, row_scale=rs)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (x, gu, dn, rs), g)
    yr = expert_mlp_reference(x, gu, dn, offs, activation=activation, gather_idx=gi, row_scale=rs)
    want = torch.autograd.grad(yr, (x, gu, dn, rs), g)
    _close(got, want, dev)


def test_only_the_needed_gradients_are_computed(monkeypatch):
    """Frozen weights: no weight-gradient op runs (it reads the offsets on the host off the bf16 GPU path)."""
    calls = []
    orig = AG._weight_grad
    monkeypatch.setattr(AG, "_weight_grad", lambda *a: calls.append(1) or orig(*a))
    offs = _offs(SIZES)
    x = _t(8, 4, dtype=torch.float32)
    w = torch.randn(3, 4, 6)
    grouped_mm(x, w, offs).sum().backward()
    assert not calls and x.grad is not None
    w.requires_grad_(True)
    grouped_mm(x, w, offs).sum().backward()
    assert calls == [1] and w.grad is not None


def test_out_argument_with_autograd_copies_the_op_result():
    offs = _offs(SIZES)
    x, w = _t(8, 4, dtype=torch.float32), torch.randn(3, 4, 6)
    out = torch.full((8, 6), float("nan"))
    y = grouped_mm(x, w, offs, out=out)
    assert y is out and y.grad_fn is not None
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(grouped_mm_reference(x, w, offs).sum(), x)[0])


def test_opcheck_with_grad():
    offs = _offs(SIZES)
    x, w = _t(8, 4, dtype=torch.float32), _t(3, 4, 6, dtype=torch.float32)
    rs = torch.rand(8).requires_grad_(True)
    torch.library.opcheck(GA.grouped_mm_op.op, (x, w, offs, "ekn", None, rs))
    torch.library.opcheck(GA.grouped_mm_op.op, (x[:5], w.transpose(1, 2).contiguous(), offs, "enk", _gather(8, 5), None))
    gu, dn = _t(3, 8, 4, dtype=torch.float32), _t(3, 4, 4, dtype=torch.float32)
    torch.library.opcheck(GM.expert_mlp_op.op, (x, gu, dn, offs, "enk", "silu", None, rs))
    torch.library.opcheck(AG.grouped_mm_wgrad.op, (torch.randn(8, 4), torch.randn(8, 6), offs))


@pytest.mark.gpu
@pytest.mark.parametrize("sizes", [[0, 37, 0, 64, 27], [256, 0, 0, 1]])
def test_gpu_weight_gradient_bf16_equals_the_loop(sizes):
    """The bf16 CUDA path (torch._grouped_mm over each group's rows) against the fp32 loop over groups,
    empty groups (experts without tokens) included: bf16 inputs, fp32 accumulation, one rounding."""
    offs = _offs(sizes, "cuda")
    a = torch.randn(sum(sizes), 64, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(sum(sizes), 48, device="cuda", dtype=torch.bfloat16)
    got = AG.grouped_mm_wgrad(a, b, offs).float()
    want = AG.grouped_mm_wgrad(a.float(), b.float(), offs)  # fp32: the loop
    torch.testing.assert_close(got, want, atol=0.5, rtol=1.6e-2)  # sums of up to 256 O(1) products
    for e, n in enumerate(sizes):
        if n == 0:
            assert torch.equal(got[e], torch.zeros_like(got[e]))
