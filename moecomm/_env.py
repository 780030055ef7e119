"""The one module that reads moecomm's environment variables (MOECOMM_*).

Every variable is read when asked for, never at import time, so tests and launchers can set them
late. README.md lists them; keep the two in step.
"""

from __future__ import annotations

import os
from pathlib import Path

# name -> (default, meaning); README.md's table is generated from the same words.
VARIABLES: dict[str, tuple[str, str]] = {
    "MOECOMM_CACHE_DIR": ("~/.cache/moecomm", "where tuned launch configurations and compiled kernels are cached"),
    "MOECOMM_BACKEND": ("auto", "auto | reference | triton | cuda: force the implementation of every op (where the op has it)"),
    "MOECOMM_AUTOTUNE": ("1", "0 disables on-GPU autotuning of launch configurations (heuristic pick instead)"),
    "MOECOMM_DIST_BACKEND": ("", "nccl | gloo: override the process-group backend chosen by moecomm.distributed.init()"),
    "MOECOMM_TIMEOUT_S": ("300", "timeout of every collective and rendezvous, and the longest wait for a cache lock, in seconds"),
    "MOECOMM_LOG_LEVEL": ("WARNING", "level of the 'moecomm' logger"),
    "MOECOMM_MPIEXEC": ("", "the mpiexec `moecomm demo --launcher mpirun` runs (default: the one beside mpi4py's MPI library)"),
    "MOECOMM_CUDA_GRAPH_TOKENS": ("128", "MoE layers replay a CUDA graph per token count up to this many tokens (0: never)"),
    "MOECOMM_HOST_C": ("1", "0 makes the attention wrappers' plan() run its numpy path instead of its compiled C one (kernels/attention/plan_host.c, built with the system C compiler)"),
    "MOECOMM_PREFILL_GLUON": ("1", "0 keeps paged prefill's TMA path on the Triton v2 loop instead of the warp-specialised Gluon kernel it launches on sm_90 (fp16 / bf16, head_dim 64 / 128, causal or no mask)"),
    "MOECOMM_PREFILL_WS": ("0", "1 makes paged prefill's TMA path launch its warp-specialised variant (experimental: wrong results on the H200 with Triton 3.6, measured 2026-12-02)"),
    "MOECOMM_EP_NATIVE": ("1", "0 keeps the EP dispatcher's throughput mode on its Python path instead of one C call per phase (kernels/ep/native.c, built with the system C compiler)"),
    "MOECOMM_ALLREDUCE_ONESHOT_BYTES": ("", "IPC all-reduce: largest input (bytes per rank) taking one-shot instead of two-shot (default: 512 KB at 2-4 ranks, 256 KB at 8)"),
}


# os.environ.get costs ~1.1 us (it encodes the key and decodes the value); choose() reads two
# variables on every launch. CPython's os.environ keeps its bytes-keyed dict in ``_data`` (POSIX), so
# a lookup there sees every os.environ / monkeypatch change at ~0.1 us. Where it is absent (another
# interpreter, Windows' str keys), the plain os.environ.get is used.
_RAW = getattr(os.environ, "_data", None)
_RAW_BYTES = isinstance(_RAW, dict) and all(isinstance(k, bytes) for k in list(_RAW)[:1])


def raw(name: str) -> bytes | str | None:
    """The raw value of an environment variable, as cheaply as the platform allows (None: unset):
    for cache keys that must notice a change, not for parsing (use get())."""
    if _RAW_BYTES:
        return _RAW.get(name.encode())
    return os.environ.get(name)


def get(name: str) -> str:
    """The value of a MOECOMM_* variable, or its default."""
    if name not in VARIABLES:
        raise KeyError(f"unknown moecomm environment variable {name!r}; known: {sorted(VARIABLES)}")
    return os.environ.get(name, VARIABLES[name][0])


def cache_dir() -> Path:
    return Path(os.path.expanduser(get("MOECOMM_CACHE_DIR")))


def backend() -> str:
    value = get("MOECOMM_BACKEND").strip().lower() or "auto"
    if value not in ("auto", "reference", "triton", "cuda"):
        raise ValueError(f"MOECOMM_BACKEND must be one of auto, reference, triton, cuda, got {value!r}")
    return value


def autotune() -> bool:
    return get("MOECOMM_AUTOTUNE").strip() not in ("0", "false", "no", "")


def timeout_s() -> float:
    raw = get("MOECOMM_TIMEOUT_S")
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"MOECOMM_TIMEOUT_S must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"MOECOMM_TIMEOUT_S must be > 0, got {raw!r}")
    return value


def dist_backend() -> str | None:
    value = get("MOECOMM_DIST_BACKEND").strip().lower()
    if value and value not in ("nccl", "gloo"):
        raise ValueError(f"MOECOMM_DIST_BACKEND must be nccl or gloo, got {value!r}")
    return value or None


def cuda_graph_tokens() -> int:
    raw = get("MOECOMM_CUDA_GRAPH_TOKENS").strip()
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"MOECOMM_CUDA_GRAPH_TOKENS must be an integer >= 0, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"MOECOMM_CUDA_GRAPH_TOKENS must be an integer >= 0, got {raw!r}")
    return value


def allreduce_oneshot_bytes() -> int | None:
    raw = get("MOECOMM_ALLREDUCE_ONESHOT_BYTES").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"MOECOMM_ALLREDUCE_ONESHOT_BYTES must be an integer >= 0, got {raw!r}") from None
    if value < 0:
        raise ValueError(f"MOECOMM_ALLREDUCE_ONESHOT_BYTES must be an integer >= 0, got {raw!r}")
    return value


def host_c() -> bool:
    """Whether plan() may use its compiled C path (MOECOMM_HOST_C, default 1)."""
    return get("MOECOMM_HOST_C").strip().lower() not in ("0", "false", "no", "off")


def c_compiler() -> str | None:
    """The C compiler moecomm.jit.host runs, from CC (a command line: "ccache gcc" works); None when unset."""
    return os.environ.get("CC", "").strip() or None


def cuda_home() -> str | None:
    """The CUDA toolkit's root from CUDA_HOME (or CUDA_PATH), where moecomm.jit.cuda looks for nvcc
    after PATH; None when neither is set."""
    return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or None


def triton_interpret() -> bool:
    """True when Triton runs kernels through its numpy interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("0", "")
