"""Which implementation an op runs: Impl.REFERENCE (pure torch), Impl.TRITON or Impl.CUDA (C++ in kernels/).

    impl = choose(x, "allreduce", has=(Impl.CUDA,))   # the op's implementations besides the reference

Rules, in order (MOECOMM_BACKEND = auto | reference | triton | cuda):
- reference: always the reference.
- CUDA tensors: the forced implementation if the op has it, else the op's first one (CUDA C++ before
  Triton when it has both) whose toolchain is usable here (Triton imports / the CUDA compile cache
  works); else the reference, logged once with the reason.
- CPU tensors: the reference, unless MOECOMM_BACKEND=triton and TRITON_INTERPRET=1, when the Triton
  kernel runs through Triton's interpreter (that is how CI tests kernels without a GPU).
- float64 tensors: the reference everywhere (the kernels take 16- and 32-bit floats; float64 is for
  gradcheck and ground truths).

An op's implementation then reads, e.g.:

    if choose(x, "grouped_mm") is Impl.TRITON:
        return launch(...)
    return reference(...)
"""

from __future__ import annotations

import enum
import functools
import logging

import torch

from .. import _env

log = logging.getLogger("moecomm")
_warned: set[str] = set()


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message)


@functools.lru_cache(maxsize=1)
def triton_import_error() -> str | None:
    """None when Triton imports, else why not (kept for `moecomm info`)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"{type(exc).__name__}: {exc}"
    return None


class Impl(enum.Enum):
    """An op's implementation."""

    REFERENCE = "reference"
    TRITON = "triton"
    CUDA = "cuda"


def choose(t: torch.Tensor, op: str, has: tuple[Impl, ...] = (Impl.TRITON,)) -> Impl:
    """The implementation ``op`` runs on tensors living where ``t`` lives.

    Args:
        t: a tensor argument of the call (its device decides).
        op: the op's name (for the log line of a fallback).
        has: the op's implementations besides the reference, in order of preference.

    Every op calls this on every launch, so the decision is cached per (MOECOMM_BACKEND and
    TRITON_INTERPRET as set now, CUDA, CPU or other, float64 or not, has, op): ~0.5 us instead of ~2.5 us of
    environment parsing. The environment is still read on each call (tests and launchers set it
    late; _env.raw), and a changed value is a new key.
    """
    key = (_env.raw("MOECOMM_BACKEND"), _env.raw("TRITON_INTERPRET"), t.is_cuda, t.is_cpu, t.dtype is torch.float64, has,
           op)
    impl = _CHOSEN.get(key)
    if impl is None:
        impl = _choose(t, op, has)
        if len(_CHOSEN) >= 4096:  # bounded: op names are a fixed set, so this never fills in practice
            _CHOSEN.clear()
        _CHOSEN[key] = impl
    return impl


_CHOSEN: dict[tuple, Impl] = {}


def _choose(t: torch.Tensor, op: str, has: tuple[Impl, ...]) -> Impl:
    """choose() without its cache."""
    mode = _env.backend()
    if mode == "reference" or t.dtype is torch.float64:
        return Impl.REFERENCE
    if t.device.type == "cuda":
        order = list(has)
        if mode != "auto":
            forced = Impl(mode)
            order = [forced] if forced in has else order
        for impl in order:
            err = triton_import_error() if impl is Impl.TRITON else cuda_compile_error()
            if err is None:
                return impl
            warn_once(f"{impl.value}-missing-{op}",
                      f"{op}: its {impl.value} implementation is not usable ({err}); running the next choice "
                      "(the pure-torch reference last, slower on a GPU). Set MOECOMM_BACKEND=reference to silence this.")
        return Impl.REFERENCE
    if t.device.type == "cpu" and mode == "triton" and _env.triton_interpret() and Impl.TRITON in has:
        return Impl.TRITON if triton_import_error() is None else Impl.REFERENCE
    return Impl.REFERENCE


@functools.lru_cache(maxsize=1)
def cuda_compile_error() -> str | None:
    """None when CUDA C++ sources can be compiled and loaded here (moecomm.jit.cuda), else why not."""
    try:
        from . import cuda
    except ImportError as exc:
        return f"{type(exc).__name__}: {exc}"
    return cuda.toolchain_error()


def device_checks_allowed(validate: bool = True) -> bool:
    """Whether a value check may read device data (it syncs the host): not when the caller passed
    validate=False, while torch.compile traces, or while a CUDA graph is being captured."""
    if not validate or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
