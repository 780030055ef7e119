"""One helper to define a moecomm custom op: its implementation, its fake, its autograd formula.

    def _scale_impl(x: torch.Tensor, s: float) -> torch.Tensor:        # the real work (typed: torch
        return x * s                                                  # derives the op's schema)

    scale = define_op(
        "scale", _scale_impl,
        fake=lambda x, s: torch.empty_like(x),                        # shapes only, for torch.compile
        setup_context=lambda ctx, inputs, output: setattr(ctx, "s", inputs[1]),
        backward=lambda ctx, grad: (grad * ctx.s, None),              # one gradient per input
    )
    y = scale(x, 2.0)

Why a helper: every op needs the same three parts and the same eager fast path, and 13 hand-copied
impl/op/fake triples drift apart (one op had no autograd formula, so a training step under
torch.compile(fullgraph=True) failed while eager training silently recorded no gradient on a GPU).

Calling an Op:
- under torch.compile: the registered op (the graph sees one opaque node, its fake gives shapes);
- eager, with autograd to record (grad mode on and a tensor argument requiring grad): the
  registered op, so its backward is recorded;
- eager otherwise: the implementation directly. The dispatcher costs tens of microseconds of host
  time per call, most of a decode step (see moecomm/jit/launch.py); both paths run the same code.

An op whose inputs are never differentiable (integer indices) passes ``differentiable=False``; a
tensor requiring grad then raises a clear error instead of torch's "no autograd formula".
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..errors import MoeCommTypeError

__all__ = ["Op", "define_op"]

NAMESPACE = "moecomm"


class Op:
    """A registered custom op (``.op``, i.e. torch.ops.moecomm.<name>) and its eager fast path.

    Attributes:
        name: the op's name in the ``moecomm`` namespace.
        op: the torch.library custom op.
        impl: the implementation (what eager calls without autograd run directly).
    """

    __slots__ = ("differentiable", "impl", "name", "op", "tensor_positions")

    def __init__(self, name: str, op: Any, impl: Callable[..., Any], differentiable: bool):
        self.name, self.op, self.impl, self.differentiable = name, op, impl, differentiable
        self.tensor_positions = _tensor_positions(impl)

    def __call__(self, *args: Any) -> Any:
        if torch.compiler.is_compiling():
            return self.op(*args)
        if torch.is_grad_enabled() and _any_requires_grad_at(args, self.tensor_positions):
            if not self.differentiable:
                raise MoeCommTypeError(
                    f"{self.name}: its tensor arguments must not require grad (the op has no gradient), "
                    "got one that does; pass tensor.detach()")
            return self.op(*args)
        return self.impl(*args)

    def __repr__(self) -> str:
        return f"Op({NAMESPACE}::{self.name})"


_Tensor = torch.Tensor
# types an op's argument list is mostly made of, skipped by one set lookup: isinstance(3, Tensor)
# takes twice an isinstance that matches, and the sampling op's 23 arguments hold 2-6 tensors
_NOT_TENSORS = frozenset((int, float, bool, str, type(None), torch.dtype, torch.device))


def _any_requires_grad(args: Sequence[Any]) -> bool:
    """Whether a tensor in ``args`` (or in a list / tuple among them) requires grad (4.9 -> 0.8 us
    for the sampling op's arguments, every eager call with grad mode on pays it)."""
    for a in args:
        t = type(a)
        if t is _Tensor:
            if a.requires_grad:
                return True
        elif t in _NOT_TENSORS:
            continue
        elif t is list or t is tuple:
            if _any_requires_grad(a):
                return True
        elif isinstance(a, _Tensor):  # a subclass (Parameter, a tensor subclass)
            if a.requires_grad:
                return True
        elif isinstance(a, (list, tuple)) and _any_requires_grad(a):
            return True
    return False


def _tensor_positions(impl: Callable[..., Any]) -> tuple[int, ...] | None:
    """The positions of ``impl``'s parameters whose annotation holds a Tensor (Tensor, Tensor | None,
    list[Tensor]: what torch's schema inference accepts), or None when the annotations cannot be
    read (then every argument is looked at). The sampling op's 24 arguments hold 8 such: its
    requires-grad test takes 0.25 us instead of 0.9."""
    try:
        hints = typing.get_type_hints(impl)
        params = list(inspect.signature(impl).parameters.values())
    except (NameError, TypeError, AttributeError, SyntaxError, ValueError):  # an annotation that does not
        # evaluate here, or a callable without a signature: look at every argument
        return None
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
        return None

    def has_tensor(hint: Any) -> bool:
        return hint is _Tensor or (isinstance(hint, type) and issubclass(hint, _Tensor)) or any(
            has_tensor(h) for h in typing.get_args(hint))

    return tuple(i for i, p in enumerate(params) if p.name not in hints or has_tensor(hints[p.name]))


def _any_requires_grad_at(args: Sequence[Any], positions: tuple[int, ...] | None) -> bool:
    """_any_requires_grad over the arguments at ``positions`` only (all of them: None)."""
    if positions is None or (positions and len(args) <= positions[-1]):  # fewer arguments: defaults
        return _any_requires_grad(args)
    for i in positions:
        a = args[i]
        if a is None:
            continue
        if type(a) is _Tensor:
            if a.requires_grad:
                return True
        elif _any_requires_grad((a,)):
            return True
    return False


def define_op(
    name: str,
    impl: Callable[..., Any],
    *,
    fake: Callable[..., Any],
    mutates_args: Sequence[str] = (),
    backward: Callable[..., Any] | None = None,
    setup_context: Callable[..., Any] | None = None,
    differentiable: bool = True,
) -> Op:
    """Register ``moecomm::<name>`` with its fake and autograd formula; return the callable Op.

    Args:
        name: the op's name (torch.ops.moecomm.<name>).
        impl: the implementation, with type annotations (torch derives the schema from them).
        fake: same signature, returns empty tensors of the outputs' shapes and dtypes (no data read).
        mutates_args: names of arguments the op writes (``out=`` buffers).
        backward: ``backward(ctx, *grads) -> one gradient (or None) per input``; required unless
            ``differentiable`` is False. Plain torch ops are fine in it.
        setup_context: ``setup_context(ctx, inputs, output)``, saves what backward needs.
        differentiable: False for ops that never take a tensor requiring grad.

    Returns:
        Op: call it like the implementation.
    """
    if differentiable and backward is None:
        raise MoeCommTypeError(f"define_op: backward must be given for the differentiable op {name!r}, got None "
                               "(pass differentiable=False for an op without gradients)")
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", impl, mutates_args=tuple(mutates_args))
    op.register_fake(fake)
    if backward is not None:
        op.register_autograd(backward, setup_context=setup_context)
    return Op(name, op, impl, differentiable)
