"""The compile cache of the CUDA C++ sources under kernels/: compile to a cubin, cache, load, launch.

    kernel = cuda.load("allreduce/reduce.cu", "moecomm_reduce_bf16", device=x.device)
    kernel(grid=(blocks,), block=(256,), args=(ptrs, out, ctypes.c_int(W), ctypes.c_longlong(n), ctypes.c_int(1)))

Compiling (no GPU needed): nvcc (``-cubin -arch=sm_90a`` by default, or the device's arch) when it is
found (PATH, CUDA_HOME, /usr/local/cuda), else NVRTC through cupy (``cupy.cuda.nvrtc``) or
cuda-python (``cuda.bindings.nvrtc``). nvcc comes first because it is what both the CPU machines
(CI) and the GPU machines have, so the cubin the tests compile is the one the GPU runs; NVRTC is the
fallback for pip-only environments. The sources include no CUDA header (kernels/common/dtypes.cuh
converts dtypes in inline PTX), so NVRTC needs no system include path.

Cache: one cubin per key under MOECOMM_CACHE_DIR/cuda, never inside the package. The key is a
sha256 over the source and every header it includes with ``#include "..."`` (recursively), the
flags, the arch, the compiler's identity and version (``nvcc --version``, or NVRTC's version) and
moecomm's version with this cache's format number: editing a header, changing a flag or upgrading
the toolchain compiles anew, nothing else does. A miss compiles under the entry's cross-process
lock and publishes atomically (moecomm/jit/cache.py), so ranks starting together compile once.

Entry groups (``entries=``, nvcc only): a large source whose entry points are launched one at a time
need not be assembled whole on its first call. The whole source's PTX is made once and cached (the
front end, cicc, sees every entry as before), then ptxas assembles only the group asked for
(``ptxas --entry``) into its own cubin, cached under a key that adds the group. ptxas compiles each
entry on its own, so an entry's machine code is the whole build's (tests/sampling checks the SASS);
the first call pays the front end and one group's ptxas instead of every entry's (sample.cu on 2
cores: ~10 s + ~3 s instead of ~10 s + ~16 s), and a later group reuses the PTX. NVRTC compiles the
whole source whatever ``entries`` says.

Loading and launching: the CUDA driver API through ctypes (libcuda.so.1, which every machine with an
NVIDIA driver has). Chosen over cupy.RawModule and cuda-python because it needs no package beyond
torch: the cubin is loaded into the device's primary context, the one torch's runtime uses, and
launched with cuLaunchKernel on torch's current stream (its raw handle), with torch tensors passed as
device pointers. So kernels order with torch's work on that stream and CUDA-graph capture sees them,
and cupy's own allocator, streams and device state never enter the process. A wrapper whose kernel
takes fixed parameter types launches through a Signature made once (``kernel.launch(grid, block,
SIGNATURE, values)``, plain ints and floats): one struct.pack_into and two driver calls, ~2.5 us of
host time on the CPU machine (benchmarks/profile_sampling.py --host-mock).

Seen on the GPU machine (H200, torch 2.11, cupy-cuda13x 14.2, cuda-python 13.3, nvcc 13.0): cubins
from nvcc, cupy's NVRTC and cuda-python's NVRTC load and run; reduce.cu's first call (compile, load,
run) took 0.76-0.90 s, a later process's first call (disk cache, load) ~1 ms.

Nothing happens at import time: the compiler, the driver and torch's CUDA state are looked at on the
first call. ``toolchain_error()`` says whether compiling and loading can work here.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import _env
from ..errors import (
    MoeCommError,
    MoeCommTypeError,
    MoeCommValueError,
    UnsupportedHardwareError,
)
from . import cache

DEFAULT_ARCH = "sm_90a"  # Hopper with its arch-specific instructions (wgmma, setmaxnreg); plain sm_90 lacks them
DEFAULT_FLAGS = ("-O3", "-std=c++17")
CACHE_FORMAT = 1  # bump when the key or the file layout changes
_ARCH = re.compile(r"^sm_\d{2,3}[af]?$")
_INCLUDE = re.compile(r'^\s*#\s*include\s*"([^"]+)"', re.MULTILINE)


class CudaCompileError(MoeCommError, RuntimeError):
    """The compiler rejected a source; the message holds its command and output."""


class CudaDriverError(MoeCommError, RuntimeError):
    """A CUDA driver call (module load, launch) failed."""


# --------------------------------------------------------------------------- where the sources are


def kernels_dir() -> Path:
    """The folder of the CUDA sources: ``moecomm/_kernels`` in a wheel, ``kernels/`` in a checkout.

    A wheel maps the repository's top-level kernels/ to the package ``moecomm._kernels``
    (setup.py); an editable install or a checkout on PYTHONPATH imports moecomm from the repository,
    beside which kernels/ lies.
    """
    pkg = Path(__file__).resolve().parents[1]
    candidates = [pkg / "_kernels"]
    if (pkg.parent / "pyproject.toml").is_file():
        candidates.append(pkg.parent / "kernels")
    for c in candidates:
        if c.is_dir():
            return c
    import importlib.util  # an editable install whose finder maps moecomm._kernels elsewhere

    spec = importlib.util.find_spec("moecomm._kernels")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if Path(loc).is_dir():
            return Path(loc)
    raise MoeCommError(f"moecomm.jit.cuda: the CUDA sources were not found (looked in {', '.join(map(str, candidates))} "
                       "and for the package moecomm._kernels): reinstall moecomm")


def source_path(source: str | os.PathLike) -> Path:
    """``source`` as a file: a path relative to kernels/ ("allreduce/reduce.cu") or any existing path."""
    if not isinstance(source, (str, os.PathLike)):
        raise MoeCommTypeError(f"moecomm.jit.cuda: source must be a path (str or os.PathLike), got {type(source).__name__}")
    p = Path(source)
    if not p.is_absolute():
        inside = kernels_dir() / p
        if inside.is_file():
            return inside
    if p.is_file():
        return p.resolve()
    raise MoeCommValueError(f"moecomm.jit.cuda: source must be a file under {kernels_dir()} or an existing path, got {source!s}")


def included_files(path: Path) -> list[Path]:
    """``path`` and every file it includes with ``#include "..."``, recursively (system headers,
    ``<...>``, belong to the toolchain, whose version is in the key)."""
    seen: dict[Path, None] = {}
    todo = [path.resolve()]
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen[f] = None
        for name in _INCLUDE.findall(f.read_text(errors="replace")):
            for base in (f.parent, kernels_dir()):
                cand = (base / name).resolve()
                if cand.is_file():
                    todo.append(cand)
                    break
    return list(seen)


# --------------------------------------------------------------------------- compilers


def _nvcc() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (_env.cuda_home(), "/usr/local/cuda"):
        if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
            return os.path.join(home, "bin", "nvcc")
    return None


@functools.lru_cache(maxsize=None)
def _nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=60)
    return " ".join(out.stdout.split()[-6:])  # "... release 13.0, V13.0.88 Build cuda_13.0.r13.0/compiler.36424714_0"


def _nvrtc() -> tuple[str, Any] | None:
    """(flavour, module) of the first NVRTC binding that imports: cupy's, then cuda-python's."""
    try:
        from cupy.cuda import nvrtc  # noqa: PLC0415

        return "cupy", nvrtc
    except Exception:  # ImportError, or cupy failing to find its CUDA libraries
        pass
    try:
        from cuda.bindings import nvrtc  # noqa: PLC0415

        return "cuda-python", nvrtc
    except Exception:
        return None


def _nvrtc_version(flavour: str, nvrtc: Any) -> str:
    v = nvrtc.getVersion() if flavour == "cupy" else nvrtc.nvrtcVersion()[1:]  # cuda-python: (err, major, minor)
    return f"nvrtc {flavour} {v[0]}.{v[1]}"


def compiler(which: str = "auto") -> tuple[str, str]:
    """(compiler kind, identity with version) of the compiler ``compile`` uses: "nvcc" or "nvrtc"."""
    if which not in ("auto", "nvcc", "nvrtc"):
        raise MoeCommValueError(f"moecomm.jit.cuda: compiler must be auto, nvcc or nvrtc, got {which!r}")
    if which in ("auto", "nvcc"):
        nvcc = _nvcc()
        if nvcc:
            return "nvcc", f"nvcc {_nvcc_version(nvcc)}"
        if which == "nvcc":
            raise UnsupportedHardwareError("moecomm.jit.cuda: nvcc not found (PATH, CUDA_HOME, /usr/local/cuda)")
    rtc = _nvrtc()
    if rtc is None:
        raise UnsupportedHardwareError(
            "moecomm.jit.cuda: no CUDA C++ compiler here: nvcc not found (PATH, CUDA_HOME, /usr/local/cuda) and "
            "NVRTC not importable (pip install cupy-cuda13x, or cuda-python)")
    return "nvrtc", _nvrtc_version(*rtc)


def compile_error() -> str | None:
    """None when CUDA sources can be compiled here (no GPU needed), else why not."""
    try:
        compiler()
    except Exception as exc:
        return str(exc)
    return None


def nvcc_command(src: Path, arch: str, flags: Sequence[str], out: Path, *, stage: str = "cubin",
                 entries: Sequence[str] | None = None) -> list[str]:
    """The nvcc command line of one compile: ``stage`` "cubin" (the source, or with ``entries`` a
    .ptx file assembled for those entry points only) or "ptx" (the front end alone)."""
    group = [a for e in entries or () for a in ("-Xptxas", f"--entry={e}")]
    return [_nvcc() or "nvcc", f"-{stage}", f"-arch={arch}", *flags, *group, "-o", str(out), str(src)]


def _run_nvcc(src: Path, arch: str, flags: Sequence[str], *, stage: str = "cubin",
              entries: Sequence[str] | None = None) -> bytes:
    with tempfile.TemporaryDirectory(prefix="moecomm-nvcc-") as tmp:
        out = Path(tmp) / f"{src.stem}.{stage}"
        cmd = nvcc_command(src, arch, flags, out, stage=stage, entries=entries)
        return cache.run_compiler(cmd, out, CudaCompileError, "moecomm.jit.cuda", src, 600)


def _run_nvrtc(src: Path, arch: str, flags: Sequence[str]) -> bytes:
    flavour, nvrtc = _nvrtc() or (None, None)
    if nvrtc is None:
        raise UnsupportedHardwareError("moecomm.jit.cuda: NVRTC is not importable (cupy or cuda-python)")
    # nvcc's -O3 is a host-compiler flag; NVRTC optimises device code by default and rejects it.
    opts = [f"--gpu-architecture={arch}", f"--include-path={src.parent}", f"--include-path={kernels_dir()}",
            *[f for f in flags if not f.startswith("-O")]]
    cmd = f"nvrtc({flavour}) {' '.join(opts)} {src}"
    text = src.read_bytes()
    if flavour == "cupy":
        prog = nvrtc.createProgram(text.decode(), src.name, [], [])
        try:
            try:
                nvrtc.compileProgram(prog, opts)
            except nvrtc.NVRTCError as exc:
                raise CudaCompileError(f"moecomm.jit.cuda: compiling {src} failed ({exc})\n$ {cmd}\n"
                                       f"{nvrtc.getProgramLog(prog)}") from None
            return bytes(nvrtc.getCUBIN(prog))
        finally:
            nvrtc.destroyProgram(prog)
    err, prog = nvrtc.nvrtcCreateProgram(text, src.name.encode(), 0, [], [])
    try:
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), [o.encode() for o in opts])
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            _, size = nvrtc.nvrtcGetProgramLogSize(prog)
            log = b" " * size
            nvrtc.nvrtcGetProgramLog(prog, log)
            raise CudaCompileError(f"moecomm.jit.cuda: compiling {src} failed ({err})\n$ {cmd}\n"
                                   f"{log.decode(errors='replace').rstrip(chr(0))}")
        _, size = nvrtc.nvrtcGetCUBINSize(prog)
        cubin = b" " * size
        nvrtc.nvrtcGetCUBIN(prog, cubin)
        return cubin
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# --------------------------------------------------------------------------- the compile cache


@dataclasses.dataclass(frozen=True)
class Compiled:
    """One compiled source: where its cubin is, its key, and whether this call compiled it."""

    path: Path
    key: str
    arch: str
    compiled: bool  # False: found in the cache
    seconds: float  # wall time of this call (compile and publish, or the lookup)
    entries: tuple[str, ...] | None = None  # the entry group the cubin holds (None: the whole source)


def _check_arch(arch: Any) -> str:
    if not isinstance(arch, str) or not _ARCH.match(arch):
        raise MoeCommValueError(f"moecomm.jit.cuda: arch must be like 'sm_90a' or 'sm_80', got {arch!r}")
    return arch


def _check_flags(flags: Any) -> tuple[str, ...]:
    if isinstance(flags, str) or not isinstance(flags, Sequence) or not all(isinstance(f, str) for f in flags):
        raise MoeCommTypeError(f"moecomm.jit.cuda: flags must be a sequence of str, got {flags!r}")
    return tuple(flags)


_ENTRY_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_entries(entries: Any) -> tuple[str, ...]:
    """An entry group as a sorted tuple of distinct C identifiers (the key and the file name follow it)."""
    if isinstance(entries, str) or not isinstance(entries, Sequence) or not entries or not all(
            isinstance(e, str) and _ENTRY_NAME.match(e) for e in entries):
        raise MoeCommValueError(f"moecomm.jit.cuda: entries must be a non-empty sequence of entry-point names, got {entries!r}")
    return tuple(sorted(set(entries)))


def cache_key(source: str | os.PathLike, *, arch: str = DEFAULT_ARCH, flags: Sequence[str] = DEFAULT_FLAGS,
              compiler_id: str | None = None, entries: Sequence[str] | None = None, stage: str = "cubin") -> str:
    """The sha256 (hex) a compilation of ``source`` is cached under (see the module docstring):
    ``stage`` "ptx" is the front end's output, ``entries`` an entry group's cubin (both change the
    key; the whole source's cubin keeps the key it always had)."""
    src = source_path(source)
    parts = {
        "format": CACHE_FORMAT,
        "moecomm": getattr(sys.modules.get("moecomm"), "__version__", "?"),
        "sources": [[f.name, hashlib.sha256(f.read_bytes()).hexdigest()] for f in included_files(src)],
        "flags": list(_check_flags(flags)),
        "arch": _check_arch(arch),
        "compiler": compiler_id if compiler_id is not None else compiler()[1],
    }
    if entries is not None:
        parts["entries"] = list(_check_entries(entries))
    if stage != "cubin":
        parts["stage"] = stage
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def compile(source: str | os.PathLike, *, arch: str = DEFAULT_ARCH, flags: Sequence[str] = DEFAULT_FLAGS,
            compiler_kind: str = "auto", timeout_s: float | None = None,
            entries: Sequence[str] | None = None) -> Compiled:
    """Compile ``source`` to a cubin, or find it in the cache; no GPU needed.

    Args:
        source: a path under kernels/ ("allreduce/reduce.cu") or any .cu file.
        arch: the target, "sm_90a" (Hopper) by default; ``device_arch(device)`` gives a device's.
        flags: compiler flags (nvcc's; NVRTC drops the -O ones).
        compiler_kind: "auto" (nvcc, else NVRTC), "nvcc" or "nvrtc".
        timeout_s: the longest wait for another process compiling the same key (MOECOMM_TIMEOUT_S).
        entries: with nvcc, a cubin of these entry points only, assembled from the whole source's
            cached PTX (see the module docstring); None (or NVRTC): the whole source.

    Raises CudaCompileError with the compiler's command and output when the source does not compile
    (or an entry of the group is not in it).
    """
    start = time.perf_counter()
    src = source_path(source)
    arch, flags = _check_arch(arch), _check_flags(flags)
    group = _check_entries(entries) if entries is not None else None
    kind, ident = compiler(compiler_kind)
    if kind != "nvcc":
        group = None
    key = cache_key(src, arch=arch, flags=flags, compiler_id=ident, entries=group)
    path = cache.cache_root("cuda") / f"{src.stem}-{arch}-{key[:24]}.cubin"
    if group is not None:
        def run():  # the PTX under its own lock (always taken inside a group's: no deadlock)
            ptx_key = cache_key(src, arch=arch, flags=flags, compiler_id=ident, stage="ptx")
            ptx, _ = cache.get_or_create(cache.cache_root("cuda") / f"{src.stem}-{arch}-{ptx_key[:24]}.ptx",
                                         lambda: _run_nvcc(src, arch, flags, stage="ptx"), timeout_s=timeout_s)
            return _run_nvcc(ptx, arch, flags, entries=group)
    elif kind == "nvcc":
        run = lambda: _run_nvcc(src, arch, flags)  # noqa: E731
    else:
        run = lambda: _run_nvrtc(src, arch, flags)  # noqa: E731
    path, created = cache.get_or_create(path, run, timeout_s=timeout_s)
    return Compiled(path=path, key=key, arch=arch, compiled=created, seconds=time.perf_counter() - start,
                    entries=group)


def device_arch(device: Any = None) -> str:
    """The cubin arch of a CUDA device: sm_90a on Hopper (arch-specific features on from sm_90 on)."""
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}{'a' if major >= 9 else ''}"


# --------------------------------------------------------------------------- loading and launching (driver API)


_CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT = 16
_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8
DEFAULT_DYNAMIC_SHARED_BYTES = 48 * 1024  # what a launch may use without opting in (every arch since sm_30)


_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6


class _LaunchAttribute(ctypes.Structure):  # cuda.h's CUlaunchAttribute: an id, padding, a 64-byte union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # cuda.h's CUlaunchConfig, cuLaunchKernelEx's first argument
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


class _Driver:
    """The few CUDA driver calls a launch needs, through ctypes."""

    def __init__(self, path: str = "libcuda.so.1") -> None:
        # path: the driver library; benchmarks/profile_sampling.py --host-mock passes a stand-in built
        # from C no-ops, so that a launch's host work (ctypes conversions included) is timed without a GPU
        self.lib = ctypes.CDLL(path)
        self.check(self.lib.cuInit(0), "cuInit")
        self.lib.cuLaunchKernel.argtypes = [ctypes.c_void_p] + [ctypes.c_uint] * 7 + [ctypes.c_void_p] * 3
        self.lib.cuModuleGetFunction.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_char_p]
        self.lib.cuModuleLoadData.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        self.lib.cuFuncSetAttribute.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self.contexts: dict[int, ctypes.c_void_p] = {}
        # The launch path's own handles on cuLaunchKernel and cuCtxGetCurrent, without argtypes:
        # ctypes then converts nothing through from_param (cuLaunchKernel with its 11 argtypes took
        # 1.25 us a call on the CPU machine, 0.45 us without; cuCtxGetCurrent 0.45 -> 0.20 us). Safe
        # because every pointer-sized argument is passed as a ctypes object (c_void_p, an array,
        # byref, None) and the rest are ints < 2**31 passed as C int, which every ABI CUDA runs on
        # passes like the unsigned int the prototype says. lib[name] is a fresh function object,
        # so the argtypes above (error paths, other callers) stay as they are.
        self._launch_fn = self.lib["cuLaunchKernel"]
        # a programmatic launch (launch(..., programmatic=True)): cuLaunchKernelEx with one attribute,
        # programmatic stream serialisation, in a config written under _launch_lock
        self._pdl_attr = _LaunchAttribute(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
        self._pdl_config = _LaunchConfig(attrs=ctypes.pointer(self._pdl_attr), num_attrs=1)
        self._pdl_config_ref = ctypes.byref(self._pdl_config)
        self._launch_ex_fn = getattr(self.lib, "cuLaunchKernelEx", None)  # CUDA >= 11.8
        self._get_current_fn = self.lib["cuCtxGetCurrent"]
        self._current_out = ctypes.c_void_p()  # written under _launch_lock only
        self._current_ref = ctypes.byref(self._current_out)
        self._context_values: dict[int, int] = {}  # device -> its primary context's handle, as an int

    def check(self, rc: int, what: str) -> None:
        if rc != 0:
            name = ctypes.c_char_p()
            self.lib.cuGetErrorName(rc, ctypes.byref(name))
            raise CudaDriverError(f"moecomm.jit.cuda: {what} failed: {(name.value or b'?').decode()} ({rc})")

    def context(self, index: int) -> ctypes.c_void_p:
        """The primary context of device ``index`` (the one torch's runtime uses), retained once."""
        ctx = self.contexts.get(index)
        if ctx is None:
            dev = ctypes.c_int()
            self.check(self.lib.cuDeviceGet(ctypes.byref(dev), index), "cuDeviceGet")
            ctx = ctypes.c_void_p()
            self.check(self.lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
            self.contexts[index] = ctx
        return ctx

    @contextlib.contextmanager
    def current(self, index: int):
        ctx = self.context(index)
        cur = ctypes.c_void_p()
        self.check(self.lib.cuCtxGetCurrent(ctypes.byref(cur)), "cuCtxGetCurrent")
        if cur.value == ctx.value:
            yield
            return
        self.check(self.lib.cuCtxPushCurrent(ctx), "cuCtxPushCurrent")
        try:
            yield
        finally:
            self.lib.cuCtxPopCurrent(ctypes.byref(ctypes.c_void_p()))

    def launch(self, index: int, fn: ctypes.c_void_p, g: tuple, b: tuple, shared_mem: int, stream: int,
               params: Any, programmatic: bool = False) -> int:
        """cuLaunchKernel in device ``index``'s primary context; its return code. The caller holds
        _launch_lock (this writes the one cuCtxGetCurrent buffer). programmatic: cuLaunchKernelEx
        with programmatic stream serialisation instead (see CudaKernel.launch).

        The context is asked for on every launch, and pushed only when another (or none) is current.
        Not skipped when torch's current device is the kernel's: torch's current device is not a
        current context. c10/cuda/CUDAFunctions.cpp (CUDA 12 path) keeps a thread_local
        targetDeviceIndex that c10::cuda::GetDevice returns before any context exists on that
        device (MaybeSetDevice, called by device guards' destructors, only records the index when
        the device has no primary context yet), and on a thread that never made a runtime call
        cudaGetDevice answers 0 while no context is bound (the runtime binds it lazily). A launch
        there would fail with CUDA_ERROR_INVALID_CONTEXT. The check costs ~0.2 us (the C call and
        a compare); the push/pop pair it saves, and the contextmanager around it, ~2 us.
        """
        ctx = self._context_values.get(index)
        if ctx is None:
            ctx = self._context_values[index] = self.context(index).value
        if programmatic:
            if self._launch_ex_fn is None:
                raise CudaDriverError("moecomm.jit.cuda: a programmatic launch needs cuLaunchKernelEx (CUDA 11.8 or "
                                      "later); this driver has none")
            c = self._pdl_config
            c.grid[:], c.block[:], c.shared_mem, c.stream = g, b, shared_mem, stream
            call, args = self._launch_ex_fn, (self._pdl_config_ref, fn, params, None)
        else:
            call, args = self._launch_fn, (fn, *g, *b, shared_mem, ctypes.c_void_p(stream), params, None)
        rc = self._get_current_fn(self._current_ref)
        if rc == 0 and self._current_out.value == ctx:
            return call(*args)
        with self.current(index):
            return call(*args)


_driver_lock = threading.Lock()
_driver: _Driver | None = None


def _get_driver() -> _Driver:
    global _driver
    if _driver is not None:  # every launch asks: no lock once it exists
        return _driver
    with _driver_lock:
        if _driver is None:
            _driver = _Driver()
        return _driver


def _arg(i: int, a: Any) -> ctypes._SimpleCData:
    import torch

    if isinstance(a, torch.Tensor):
        return ctypes.c_void_p(a.data_ptr())
    if isinstance(a, ctypes._SimpleCData):
        return a
    raise MoeCommTypeError(f"moecomm.jit.cuda: launch argument {i} must be a torch.Tensor or a ctypes scalar "
                           f"(ctypes.c_int(3), say), got {type(a).__name__}")


# ctypes scalar type -> struct format character (standard sizes: "=" below, padding made explicit)
_FORMATS = {ctypes.c_void_p: "Q", ctypes.c_int: "i", ctypes.c_uint: "I", ctypes.c_long: "q", ctypes.c_ulong: "Q",
            ctypes.c_longlong: "q", ctypes.c_ulonglong: "Q", ctypes.c_float: "f", ctypes.c_double: "d",
            ctypes.c_short: "h", ctypes.c_ushort: "H", ctypes.c_byte: "b", ctypes.c_ubyte: "B", ctypes.c_bool: "?"}
_launch_lock = threading.Lock()


class Signature:
    """A kernel's parameter list as C types, with the one buffer its launches pack the values into.

        SIGNATURE = cuda.Signature((ctypes.c_void_p, ctypes.c_int))    # (float* x, int n), at import
        kernel.launch((blocks,), (256,), SIGNATURE, (x.data_ptr(), n))

    Each parameter sits at an offset aligned to its size and kernelParams points at the offsets, so
    a launch costs one struct.pack_into of plain ints and floats, instead of a ctypes object and a
    byref per argument (~1 us each; the sampling kernel's 20 arguments were ~20 us of its host
    time). cuLaunchKernel copies the parameters during the call, so the buffer is free again when
    it returns; launches hold _launch_lock around pack and launch, which keeps threads sharing a
    signature apart.
    """

    __slots__ = ("buffer", "packer", "params", "types")

    def __init__(self, types: Sequence[type]) -> None:
        fmt, offsets, at = "=", [], 0
        for i, kind in enumerate(types):
            ch = _FORMATS.get(kind)
            if ch is None:
                raise MoeCommTypeError(f"moecomm.jit.cuda: launch argument {i} has type {getattr(kind, '__name__', kind)}, "
                                       f"which launches do not pack (use one of {sorted(t.__name__ for t in _FORMATS)})")
            size = struct.calcsize("=" + ch)
            pad = -at % size
            fmt += "x" * pad + ch
            at += pad
            offsets.append(at)
            at += size
        self.types = tuple(types)
        self.packer = struct.Struct(fmt) if offsets else None
        self.buffer = ctypes.create_string_buffer(max(at, 8))
        base = ctypes.addressof(self.buffer)
        self.params = (ctypes.c_void_p * max(len(offsets), 1))(*[base + o for o in offsets])

    def pack_error(self, values: Sequence[Any]) -> MoeCommTypeError:
        """The named error of values that struct.pack_into refused (the slow path of a failure)."""
        if len(values) != len(self.types):
            return MoeCommTypeError(f"moecomm.jit.cuda: launch values must number {len(self.types)} (the signature's "
                                    f"parameters), got {len(values)}")
        for i, (kind, v) in enumerate(zip(self.types, values)):
            try:
                struct.pack("=" + _FORMATS[kind], v)
            except (struct.error, TypeError, OverflowError) as exc:
                return MoeCommTypeError(f"moecomm.jit.cuda: launch value {i} must fit {kind.__name__}, got {v!r} ({exc})")
        return MoeCommTypeError(f"moecomm.jit.cuda: launch values do not pack: {values!r}")


def _raw_stream(index: int) -> int:
    """The handle of torch's current stream of device ``index``: the private call Triton's launcher
    uses (an int, no Stream object: ~0.2 us), or the public API (~5 us) where a torch lacks it."""
    import torch

    get = getattr(torch._C, "_cuda_getCurrentRawStream", None)
    if get is not None:
        return get(index)
    return torch.cuda.current_stream(index).cuda_stream


class CudaKernel:
    """One ``extern "C" __global__`` function of a loaded cubin, launchable on torch's stream."""

    def __init__(self, compiled: Compiled, name: str, device_index: int, handle: ctypes.c_void_p):
        self.compiled, self.name, self.device_index, self._fn = compiled, name, device_index, handle
        self.max_dynamic_shared_bytes = DEFAULT_DYNAMIC_SHARED_BYTES  # raised by set_max_dynamic_shared_bytes
        # argument types -> (Signature, which arguments are tensors), for __call__
        self._packed: dict[tuple, tuple[Signature, tuple[bool, ...]]] = {}

    def set_max_dynamic_shared_bytes(self, nbytes: int) -> None:
        """Let launches of this kernel use up to ``nbytes`` of dynamic shared memory (beyond 48 KB a
        kernel must opt in: cuFuncSetAttribute(MAX_DYNAMIC_SHARED_SIZE_BYTES); an H100/H200 allows
        227 KB a block). A launch does it by itself for a larger shared_mem; the driver refuses more
        than the device has (CudaDriverError)."""
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise MoeCommValueError(f"moecomm.jit.cuda: nbytes must be an int >= 0, got {nbytes!r}")
        drv = _get_driver()
        with drv.current(self.device_index):
            drv.check(drv.lib.cuFuncSetAttribute(self._fn, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes),
                      f"cuFuncSetAttribute({self.name}, MAX_DYNAMIC_SHARED_SIZE_BYTES, {nbytes})")
        self.max_dynamic_shared_bytes = nbytes

    def __call__(self, grid: Sequence[int], block: Sequence[int], args: Sequence[Any], *, shared_mem: int = 0,
                 stream: Any = None) -> None:
        """Launch on ``stream`` (default: torch's current stream of the kernel's device).

        Args:
            grid, block: up to three sizes each.
            args: the kernel's parameters in order: torch tensors (passed as device pointers) or
                ctypes scalars of the parameter's exact type (ctypes.c_int, ctypes.c_longlong, ...).
            shared_mem: bytes of dynamic shared memory (past 48 KB the kernel is opted in first).
        """
        kinds = tuple(map(type, args))  # the signature's key: C speed (a generator over isinstance was ~7 us)
        hit = self._packed.get(kinds)
        if hit is None:
            hit = self._packed[kinds] = _signature_of(args, kinds)
        sig, is_tensor = hit
        values = [a.data_ptr() if t else (a.value or 0) for a, t in zip(args, is_tensor)]
        self.launch(grid, block, sig, values, shared_mem=shared_mem, stream=stream)

    def launch(self, grid: Sequence[int], block: Sequence[int], signature: Signature, values: Sequence[Any], *,
               shared_mem: int = 0, stream: Any = None, programmatic: bool = False) -> None:
        """Launch with the parameters ``values`` of types ``signature`` (a Signature made once): the
        path of a caller whose kernel's parameter types are fixed (no types looked at per launch).

        Args:
            grid, block: up to three sizes each.
            signature: the kernel's parameter types (ctypes.c_void_p for a pointer).
            values: one per parameter: ints (device pointers: tensor.data_ptr()) and floats.
            shared_mem, stream: as __call__'s.
            programmatic: launch with programmatic stream serialisation (PDL, sm_90 and later): the
                kernel may start while the stream's previous kernel still runs, and must execute
                ``griddepcontrol.wait`` before it touches memory that kernel writes. Only for a
                caller that knows which kernel precedes it on the stream.
        """
        g = grid if type(grid) is tuple and len(grid) == 3 else (tuple(grid) + (1, 1))[:3]
        b = block if type(block) is tuple and len(block) == 3 else (tuple(block) + (1, 1))[:3]
        if shared_mem > self.max_dynamic_shared_bytes:
            self.set_max_dynamic_shared_bytes(shared_mem)
        if stream is None:
            handle = _raw_stream(self.device_index)
        else:
            handle = stream.cuda_stream if hasattr(stream, "cuda_stream") else int(stream)
        drv = _get_driver()
        packer = signature.packer
        with _launch_lock:
            if packer is not None:
                try:
                    packer.pack_into(signature.buffer, 0, *values)
                except (struct.error, TypeError, OverflowError):
                    raise signature.pack_error(values) from None
            rc = drv.launch(self.device_index, self._fn, g, b, shared_mem, handle, signature.params, programmatic)
        if rc != 0:
            drv.check(rc, f"{'cuLaunchKernelEx' if programmatic else 'cuLaunchKernel'}({self.name}, grid={g}, "
                      f"block={b}, shared_mem={shared_mem})")


def _signature_of(args: Sequence[Any], kinds: tuple) -> tuple[Signature, tuple[bool, ...]]:
    """(Signature, tensor or not per argument) of a launch's arguments; the named error for an
    argument that is neither a tensor nor a ctypes scalar."""
    import torch

    types, is_tensor = [], []
    for i, (a, kind) in enumerate(zip(args, kinds)):
        t = issubclass(kind, torch.Tensor)
        if not t:
            _arg(i, a)  # raises the named error for anything that is not a tensor or a ctypes scalar
        types.append(ctypes.c_void_p if t else kind)
        is_tensor.append(t)
    return Signature(types), tuple(is_tensor)


_loaded: dict[tuple[str, int], ctypes.c_void_p] = {}
_kernels: dict[tuple[str, str, int], CudaKernel] = {}  # (cubin, function, device) -> kernel
_by_call: dict[tuple, CudaKernel] = {}  # load()'s arguments, normalised (_call_key) -> kernel
_by_args: dict[tuple, CudaKernel] = {}  # load()'s arguments as given (a device given) -> kernel


def forget_loaded() -> None:
    """Forget the kernels load() returned (tests: the next load looks at the disk cache again).
    Module handles stay loaded: a cubin's functions are reused, not loaded twice."""
    _kernels.clear()
    _by_call.clear()
    _by_args.clear()


def load(source: str | os.PathLike, name: str, *, device: Any = None, arch: str | None = None,
         flags: Sequence[str] = DEFAULT_FLAGS, compiler_kind: str = "auto",
         entries: Sequence[str] | None = None) -> CudaKernel:
    """Compile (or find in the cache) ``source`` for ``device``'s arch, load it, return kernel ``name``.

    The first call with given arguments in a process hashes the sources, finds or compiles the
    cubin and loads it; later calls with the same arguments return the same kernel from a
    dictionary (so an edit of a source takes effect in the next process, not in this one).
    ``entries`` (holding ``name``): compile and load only that entry group's cubin (compile()'s
    argument). The group is part of the dictionary's key: the code of ``name`` is the same in every
    group, but a module's __device__ variables are not shared between modules (a kernel that reads
    what another wrote must come from the same group).
    """
    # first the arguments as given (a launch wrapper calls with the same objects every time: ~0.3 us
    # instead of ~1 us for the normalised key); device None follows the current device: no shortcut
    fast = (source, name, device, arch, flags, compiler_kind, entries) if device is not None else None
    if fast is not None:
        try:
            kern = _by_args.get(fast)
        except TypeError:  # an unhashable argument (flags as a list): the normalised key only
            fast = None
        else:
            if kern is not None:
                return kern
    import torch

    memo = _call_key(source, name, device, arch, flags, compiler_kind, entries)
    kern = _by_call.get(memo)
    if kern is not None:
        if fast is not None:
            _by_args[fast] = kern
        return kern
    if entries is not None and (isinstance(entries, str) or name not in entries):
        raise MoeCommValueError(f"moecomm.jit.cuda: entries must hold the kernel {name!r}, got {entries!r}")
    err = load_error()
    if err is not None:
        raise UnsupportedHardwareError(f"moecomm.jit.cuda: cannot load {name}: {err}")
    dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if dev.type != "cuda":
        raise MoeCommValueError(f"moecomm.jit.cuda: device must be a CUDA device, got {dev}")
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    compiled = compile(source, arch=arch or device_arch(index), flags=flags, compiler_kind=compiler_kind,
                       entries=entries)
    k = (str(compiled.path), name, index)
    kern = _kernels.get(k)
    if kern is not None:
        _by_call[memo] = kern
        if fast is not None:
            _by_args[fast] = kern
        return kern
    drv = _get_driver()
    torch.cuda.init()
    with _driver_lock, drv.current(index):
        mod = _loaded.get((str(compiled.path), index))
        if mod is None:
            mod = ctypes.c_void_p()
            drv.check(drv.lib.cuModuleLoadData(ctypes.byref(mod), compiled.path.read_bytes()),
                      f"cuModuleLoadData({compiled.path})")
            _loaded[(str(compiled.path), index)] = mod
        fn = ctypes.c_void_p()
        drv.check(drv.lib.cuModuleGetFunction(ctypes.byref(fn), mod, name.encode()),
                  f"cuModuleGetFunction({name!r} in {compiled.path})")
    kern = _kernels[k] = CudaKernel(compiled, name, index, fn)
    _by_call[memo] = kern
    if fast is not None:
        _by_args[fast] = kern
    return kern


def _call_key(source, name: str, device: Any, arch: str | None, flags: Sequence[str], compiler_kind: str,
              entries: Sequence[str] | None = None) -> tuple:
    """load()'s memo key of its arguments."""
    import torch

    where = str(device) if device is not None else (torch.cuda.current_device() if torch.cuda.is_available() else None)
    group = None if entries is None else (entries if isinstance(entries, str) else tuple(sorted(set(entries))))
    return (str(source), name, where, arch, tuple(flags) if not isinstance(flags, str) else flags, compiler_kind, group)


def load_error() -> str | None:
    """None when a cubin can be loaded here (a CUDA device and the driver library), else why not."""
    try:
        import torch
    except ImportError as exc:
        return f"torch does not import ({exc})"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False); compiling works without one, loading does not"
    try:
        _get_driver()
    except (OSError, MoeCommError) as exc:
        return f"the CUDA driver library libcuda.so.1 is not usable ({exc})"
    return None


def toolchain_error() -> str | None:
    """None when CUDA sources can be compiled and loaded here, else why not (moecomm.jit.backend asks)."""
    return compile_error() or load_error()
