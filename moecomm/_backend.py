"""Which implementation an op runs: a Triton kernel or the pure-torch reference.

Rules, in order:
- MOECOMM_BACKEND=reference: always the reference.
- CUDA tensors: the Triton kernel when Triton imports (else the reference, logged once).
- CPU tensors: the reference, unless MOECOMM_BACKEND=triton and TRITON_INTERPRET=1, when the kernel
  runs through Triton's interpreter (that is how CI tests kernels without a GPU).
"""

from __future__ import annotations

import functools
import logging

import torch

from . import _env

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


def use_triton(t: torch.Tensor, op: str) -> bool:
    """True when op should launch its Triton kernel on tensors living where ``t`` lives."""
    mode = _env.backend()
    if mode == "reference":
        return False
    if t.device.type == "cuda":
        err = triton_import_error()
        if err is not None:
            warn_once(
                f"triton-missing-{op}",
                f"{op}: Triton is not usable ({err}); running the pure-torch reference on the GPU, which is slower. "
                "Install triton, or set MOECOMM_BACKEND=reference to silence this.",
            )
            return False
        return True
    if t.device.type == "cpu" and mode == "triton" and _env.triton_interpret():
        return triton_import_error() is None
    return False


def call_op(op, impl, *args):
    """Run a registered custom op: the op itself under torch.compile (so the graph sees it), else
    ``impl`` directly. In eager mode the dispatcher adds tens of microseconds of host time per call,
    which is most of a decode step's time; both paths run the same implementation."""
    if torch.compiler.is_compiling():
        return op(*args)
    return impl(*args)


def device_checks_allowed(validate: bool = True) -> bool:
    """Whether a value check may read device data (it syncs the host): not when the caller passed
    validate=False, while torch.compile traces, or while a CUDA graph is being captured."""
    if not validate or torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())
