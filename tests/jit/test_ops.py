"""moecomm.jit.ops: the eager fast path's requires-grad test."""

from __future__ import annotations


def test_any_requires_grad_finds_every_tensor_kind():
    """ops._any_requires_grad (the eager fast path's test): a plain tensor, a Parameter, a tensor
    in a list or tuple (or a list subclass), never a scalar, dtype, device or None."""
    import torch

    from moecomm.jit.ops import _any_requires_grad as f

    g = torch.ones(2, requires_grad=True)
    p = torch.nn.Parameter(torch.ones(2))
    plain = torch.ones(2)

    class Rows(list):
        pass

    assert f((1, 2.0, True, None, "s", torch.float32, torch.device("cpu"), plain, [plain, (plain,)])) is False
    assert f((1, g)) and f((None, p)) and f(([1, (plain, g)],)) and f((Rows([p]),)) and f(((p,),))
    assert f((plain.detach(), g.detach())) is False
