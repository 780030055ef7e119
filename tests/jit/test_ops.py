"""moecomm.jit.ops: the eager fast path's requires-grad test."""

from __future__ import annotations

import pytest
import torch

import moecomm.sampling as S
from moecomm.jit import ops
from moecomm.jit.ops import _any_requires_grad


def test_any_requires_grad_finds_every_tensor_kind():
    """ops._any_requires_grad (the eager fast path's test): a plain tensor, a Parameter, a tensor
    in a list or tuple (or a list subclass), never a scalar, dtype, device or None."""
    f = _any_requires_grad

    g = torch.ones(2, requires_grad=True)
    p = torch.nn.Parameter(torch.ones(2))
    plain = torch.ones(2)

    class Rows(list):
        pass

    assert f((1, 2.0, True, None, "s", torch.float32, torch.device("cpu"), plain, [plain, (plain,)])) is False
    assert f((1, g)) and f((None, p)) and f(([1, (plain, g)],)) and f((Rows([p]),)) and f(((p,),))
    assert f((plain.detach(), g.detach())) is False


def test_requires_grad_is_looked_for_at_the_tensor_parameters():
    """Op's eager test reads only the parameters annotated with a Tensor (Tensor, Tensor | None,
    list[Tensor]), found from the implementation's annotations; a call with fewer arguments (a
    default used) or unreadable annotations looks at every argument."""

    def impl(x: torch.Tensor, n: int, y: torch.Tensor | None, zs: list[torch.Tensor], f: float = 1.0) -> torch.Tensor:
        return x

    assert ops._tensor_positions(impl) == (0, 2, 3)
    g = torch.ones(2, requires_grad=True)
    plain = torch.ones(2)
    at = ops._tensor_positions(impl)
    assert not ops._any_requires_grad_at((plain, 3, None, [plain], 2.0), at)
    assert ops._any_requires_grad_at((plain, 3, g, [plain], 2.0), at)
    assert ops._any_requires_grad_at((plain, 3, None, [plain, g], 2.0), at)
    assert ops._any_requires_grad_at((g,), at)  # fewer arguments than positions: every one is read

    def untyped(x, y: NoSuchType):  # noqa: F821 (the point: an annotation that does not evaluate)
        return x

    assert ops._tensor_positions(untyped) is None
    assert ops._any_requires_grad_at((plain, g), None)


def test_a_non_differentiable_op_names_a_tensor_requiring_grad():
    """Through a real op: sampling's op raises the named error for probs requiring grad, eagerly
    with grad mode on, and runs under torch.no_grad()."""

    p = torch.softmax(torch.randn(2, 10), -1).requires_grad_()
    with pytest.raises(TypeError, match="sampling_sample: its tensor arguments must not require grad"):
        S.top_p_sampling_from_probs(p, 0.9, seed=1)
    with torch.no_grad():
        assert S.top_p_sampling_from_probs(p, 0.9, seed=1).shape == (2,)
