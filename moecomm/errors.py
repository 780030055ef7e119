"""Errors and argument checks shared by every public op.

Every message reads "<op>: <arg> must be <expected>, got <actual>" so that a user can tell which
argument of which call was wrong without reading our source.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch


class MoeCommError(Exception):
    """Base class of every error moecomm raises on purpose."""


class MoeCommValueError(MoeCommError, ValueError):
    """An argument has the right type but a wrong value (shape, range, layout)."""


class MoeCommTypeError(MoeCommError, TypeError):
    """An argument has the wrong type or dtype."""


class UnsupportedHardwareError(MoeCommError, RuntimeError):
    """The op needs hardware or software that is not here; the message says what was found."""


def _fmt_dtypes(dtypes: Iterable[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def as_tensor(op: str, name: str, value: Any) -> torch.Tensor:
    """Return ``value`` as a torch.Tensor, sharing memory with any DLPack-exporting array.

    torch tensors pass through untouched; cupy/numpy/jax arrays (anything with ``__dlpack__``) are
    wrapped with ``torch.from_dlpack`` without a copy.
    """
    if isinstance(value, torch.Tensor):
        return value
    if hasattr(value, "__dlpack__"):
        try:
            return torch.from_dlpack(value)
        except Exception as exc:  # a DLPack object torch cannot wrap (dtype, device)
            raise MoeCommTypeError(
                f"{op}: {name} must be a torch.Tensor or a DLPack array torch can import, "
                f"got {type(value).__name__} ({exc})"
            ) from exc
    raise MoeCommTypeError(f"{op}: {name} must be a torch.Tensor or a DLPack-exporting array, got {type(value).__name__}")


def check_tensor(
    op: str,
    name: str,
    t: Any,
    *,
    ndim: int | Sequence[int] | None = None,
    dtype: torch.dtype | Sequence[torch.dtype] | None = None,
    device: torch.device | None = None,
    shape: Sequence[int | None] | None = None,
) -> torch.Tensor:
    """Check one tensor argument; return it as a torch.Tensor (DLPack arrays are wrapped).

    ``shape`` entries of None match any size. Raises MoeCommTypeError / MoeCommValueError.
    """
    t = t if type(t) is torch.Tensor else as_tensor(op, name, t)  # this runs ~16 times per MoE forward: kept lean
    if dtype is not None and t.dtype is not dtype:
        allowed = (dtype,) if isinstance(dtype, torch.dtype) else tuple(dtype)
        if t.dtype not in allowed:
            raise MoeCommTypeError(f"{op}: {name} must have dtype {_fmt_dtypes(allowed)}, got {str(t.dtype).replace('torch.', '')}")
    if ndim is not None and t.dim() != ndim:
        allowed_nd = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in allowed_nd:
            raise MoeCommValueError(
                f"{op}: {name} must have {' or '.join(map(str, allowed_nd))} dimensions, got shape {tuple(t.shape)}"
            )
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != d for s, d in zip(shape, t.shape)):
            want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
            raise MoeCommValueError(f"{op}: {name} must have shape {want}, got {list(t.shape)}")
    if device is not None and not same_device(t.device, device):
        raise MoeCommValueError(f"{op}: {name} must be on device {device}, got {t.device}")
    return t


def same_device(a: torch.device, b: torch.device) -> bool:
    if a == b:  # the common case, without building devices or asking CUDA which one is current
        return True
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cuda":
        ia = a.index if a.index is not None else torch.cuda.current_device()
        ib = b.index if b.index is not None else torch.cuda.current_device()
        return ia == ib
    return True


def check_positive_int(op: str, name: str, value: Any, *, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise MoeCommTypeError(f"{op}: {name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise MoeCommValueError(f"{op}: {name} must be >= {minimum}, got {value}")
    return value


def check_choice(op: str, name: str, value: Any, choices: Sequence[Any]) -> Any:
    if value not in choices:
        raise MoeCommValueError(f"{op}: {name} must be one of {list(choices)}, got {value!r}")
    return value
