"""The compile cache of the plain C sources under kernels/ that run on the host: compile with the
system C compiler into a shared library, cache it on disk, load it with ctypes.

    lib = host.load("attention/plan_host.c", {"moecomm_plan_version": (ctypes.c_int, [])})
    lib.moecomm_plan_version()

Why C on the host at all: plan() of the attention wrappers has a budget of ~30 us of host time per
batch, and its numpy version spends it on the count of numpy calls (~0.3-1 us each, however small
the arrays), not on arithmetic. One call into compiled C does the same page-table work in a few us
(kernels/attention/plan_host.c says what it computes). Callers keep their numpy path: a machine
without a C compiler, or with one that rejects the source, runs that instead (the caller logs it once).

Compiler: $CC (words split as a shell would: "ccache gcc" works), else the first of cc, gcc, clang
on PATH; flags ``-O3 -std=c99 -shared -fPIC`` (DEFAULT_FLAGS) plus ``-I kernels/``. The sources
include only the C standard library's headers (stdint.h, stdlib.h).

Cache: one library per key under MOECOMM_CACHE_DIR/host, never inside the package. The key is a
sha256 over the source and every header it includes with ``#include "..."`` (recursively), the
flags, the compiler's identity (its command and the first line of ``--version``), the machine
(platform.machine(), sys.platform: a cache directory shared by x86-64 and aarch64 hosts keeps both)
and moecomm's version with this cache's format number. A miss compiles under the entry's
cross-process lock and publishes atomically (moecomm/jit/cache.py), as jit/cuda.py does for cubins.

Loading: ctypes.CDLL of the cached file, once per process per (source, flags); the caller's table
sets each function's restype and argtypes (so a call converts Python ints without ctypes objects).
Nothing happens at import time: the compiler is looked for on the first compile.
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .. import _env
from ..errors import MoeCommError, MoeCommTypeError, UnsupportedHardwareError
from . import cache
from .cuda import included_files, kernels_dir, source_path

DEFAULT_FLAGS = ("-O3", "-std=c99", "-shared", "-fPIC")  # -O3: GCC vectorises loops with a remainder only from -O3
CACHE_FORMAT = 1  # bump when the key or the file layout changes
_COMPILERS = ("cc", "gcc", "clang")


class HostCompileError(MoeCommError, RuntimeError):
    """The C compiler rejected a source (or could not be run); the message holds its command and output."""


def compiler() -> list[str]:
    """The C compiler's command (a list: $CC may carry words of its own), or UnsupportedHardwareError."""
    env = _env.c_compiler()
    if env:
        words = shlex.split(env)
        if words and shutil.which(words[0]):
            return words
        raise UnsupportedHardwareError(f"moecomm.jit.host: the C compiler CC={env!r} was not found")
    for name in _COMPILERS:
        found = shutil.which(name)
        if found:
            return [found]
    raise UnsupportedHardwareError(f"moecomm.jit.host: no C compiler here ({', '.join(_COMPILERS)} not on PATH, CC "
                                   "not set); install gcc or set CC")


@functools.lru_cache(maxsize=16)
def _version(command: tuple[str, ...]) -> str:
    try:
        out = subprocess.run([*command, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise UnsupportedHardwareError(f"moecomm.jit.host: could not run the C compiler {' '.join(command)} ({exc})") from exc
    first = (out.stdout or out.stderr).strip().splitlines()
    return first[0] if first else "?"


def compiler_id() -> str:
    """The compiler's identity for the cache key: its command and the first line of ``--version``."""
    cmd = compiler()
    return f"{' '.join(cmd)}: {_version(tuple(cmd))}"


def compile_error() -> str | None:
    """None when a C compiler is usable here, else why not."""
    try:
        compiler_id()
    except MoeCommError as exc:
        return str(exc)
    return None


def _check_flags(flags: Any) -> tuple[str, ...]:
    if isinstance(flags, str) or not isinstance(flags, Sequence) or not all(isinstance(f, str) for f in flags):
        raise MoeCommTypeError(f"moecomm.jit.host: flags must be a sequence of str, got {flags!r}")
    return tuple(flags)


def cache_key(source: str | os.PathLike, *, flags: Sequence[str] = DEFAULT_FLAGS, compiler: str | None = None) -> str:
    """The sha256 (hex) a compilation of ``source`` is cached under (see the module docstring)."""
    src = source_path(source)
    parts = {
        "format": CACHE_FORMAT,
        "moecomm": getattr(sys.modules.get("moecomm"), "__version__", "?"),
        "sources": [[f.name, hashlib.sha256(f.read_bytes()).hexdigest()] for f in included_files(src)],
        "flags": list(_check_flags(flags)),
        "compiler": compiler if compiler is not None else compiler_id(),
        "machine": [platform.machine(), sys.platform],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def _run_cc(src: Path, flags: Sequence[str]) -> bytes:
    with tempfile.TemporaryDirectory(prefix="moecomm-cc-") as tmp:
        out = Path(tmp) / (src.stem + ".so")
        cmd = [*compiler(), *flags, f"-I{kernels_dir()}", "-o", str(out), str(src)]
        return cache.run_compiler(cmd, out, HostCompileError, "moecomm.jit.host", src, 300)


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compiled source: where its library is, its key, and whether this call compiled it."""

    path: Path
    key: str
    compiled: bool  # False: found in the cache
    seconds: float  # wall time of this call (compile and publish, or the lookup)


def compile(source: str | os.PathLike, *, flags: Sequence[str] = DEFAULT_FLAGS,
            timeout_s: float | None = None) -> Compiled:
    """Compile ``source`` into a shared library, or find it in the cache.

    Args:
        source: a path under kernels/ ("attention/plan_host.c") or any .c file.
        flags: the compiler's flags (DEFAULT_FLAGS: -O3 -std=c99 -shared -fPIC).
        timeout_s: the longest wait for another process compiling the same key (MOECOMM_TIMEOUT_S).

    Raises HostCompileError with the command and the compiler's output when the source does not
    compile, UnsupportedHardwareError when there is no compiler.
    """
    start = time.perf_counter()
    src = source_path(source)
    flags = _check_flags(flags)
    key = cache_key(src, flags=flags, compiler=compiler_id())
    path = cache.cache_root("host") / f"{src.stem}-{key[:24]}.so"
    path, created = cache.get_or_create(path, lambda: _run_cc(src, flags), timeout_s=timeout_s)
    return Compiled(path=path, key=key, compiled=created, seconds=time.perf_counter() - start)


_lock = threading.Lock()
_loaded: dict[tuple[str, tuple[str, ...]], ctypes.CDLL] = {}


def load(source: str | os.PathLike, functions: Mapping[str, tuple[Any, Sequence[Any]]], *,
         flags: Sequence[str] = DEFAULT_FLAGS) -> ctypes.CDLL:
    """Compile (or find in the cache) ``source``, load it, set up ``functions``; return the library.

    Args:
        source: as compile().
        functions: name -> (restype, argtypes) of each function the caller calls (ctypes types).
        flags: as compile().

    The first call with given (source, flags) in a process compiles or finds the library and loads
    it; later calls return the same library (an edit of a source takes effect in the next process).
    Raises what compile() raises, HostCompileError when the library does not load (a cache directory
    mounted noexec, say) or lacks one of ``functions``.
    """
    flags = _check_flags(flags)
    memo = (str(source), flags)
    with _lock:
        lib = _loaded.get(memo)
        if lib is None:
            compiled = compile(source, flags=flags)
            try:
                lib = ctypes.CDLL(str(compiled.path))
            except OSError as exc:
                raise HostCompileError(f"moecomm.jit.host: loading {compiled.path} failed ({exc})") from exc
            _loaded[memo] = lib
    for name, (restype, argtypes) in functions.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise HostCompileError(f"moecomm.jit.host: {source} has no function {name!r}") from None
        fn.restype, fn.argtypes = restype, list(argtypes)
    return lib


def forget_loaded() -> None:
    """Forget the libraries load() returned (tests: the next load looks at the disk cache again)."""
    with _lock:
        _loaded.clear()
