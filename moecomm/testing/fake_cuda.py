"""A GPU's host path without a GPU: CPU tensors go where CUDA tensors go, down to cuLaunchKernel.

    with gpu_host_mock(kernels=[("sampling/sample.cu", "moecomm_sample_probs_qsum")]) as mock:
        S.top_p_sampling_from_probs(torch.rand(1, 1000), 0.9)   # packs and "launches" sample.cu
    assert mock.launches() == 1

Why: the host time of an eager call (argument checks, allocation, the launch's packing and driver
calls) is most of a decode step's sampling at small batch, and it can be cut and measured on a CPU
machine if everything that needs a GPU answers as on one. What is real here: every line of moecomm
(the dispatch, the checks, plan_launch, CudaKernel's packing, its ctypes calls with their argument
conversions). What is not: the driver (a C library of no-ops with libcuda's symbols and ABI, built
with the system C compiler through moecomm.jit.host), the CUDA allocator (torch.empty allocates host memory: ~0.5 us where
the caching allocator takes ~3-4 us), torch's stream and device queries (Python stand-ins), and the
default generator (a Python stand-in with torch.Generator's initial_seed / get_offset / set_offset).
So a figure here is a lower bound of the GPU host's; differences between two versions of moecomm
are what it measures well.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

# libcuda's entry points that moecomm.jit.cuda calls, as no-ops (device d's primary context is
# 0x1000 + 0x100 d; device 0's is current unless fake_set_current says otherwise; launches counted,
# the last one's arguments kept for tests; a launch without a current context fails as the driver's)
_SOURCE = r"""
#include <stdint.h>
static void* current = (void*)0x1000;
static void* stack[64];
static int depth = 0;
static long launches = 0, pushes = 0;
static void** last_params = 0;
static void* last_stream = 0;
static void* last_fn = 0;
static unsigned last_dims[7];
int cuInit(unsigned flags) { return 0; }
int cuGetErrorName(int rc, const char** s) { *s = "CUDA_ERROR_FAKE"; return 0; }
int cuDeviceGet(int* d, int i) { *d = i; return 0; }
int cuDevicePrimaryCtxRetain(void** c, int d) { *c = (void*)(uintptr_t)(0x1000 + 0x100 * d); return 0; }
int cuCtxGetCurrent(void** c) { *c = current; return 0; }
int cuCtxPushCurrent(void* c) { stack[depth++ & 63] = current; current = c; pushes++; return 0; }
int cuCtxPopCurrent(void** c) { if (c) *c = current; current = stack[--depth & 63]; return 0; }
int cuFuncSetAttribute(void* f, int attr, int value) { return 0; }
int cuModuleLoadData(void** m, const void* image) { *m = (void*)0x2000; return 0; }
int cuModuleGetFunction(void** f, void* m, const char* name) { *f = (void*)0x3000; return 0; }
int cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned smem, void* stream, void** params, void** extra) {
  unsigned d[7] = {gx, gy, gz, bx, by, bz, smem};
  for (int i = 0; i < 7; i++) last_dims[i] = d[i];
  last_fn = f; last_stream = stream; last_params = params; launches++;
  return current ? 0 : 201;  /* CUDA_ERROR_INVALID_CONTEXT without a current context, as the driver */
}
/* cuLaunchKernelEx: cuda.h's CUlaunchConfig and CUlaunchAttribute; the first attribute kept */
typedef struct { int id; char pad[4]; int value; char rest[60]; } Attr;
typedef struct { unsigned grid[3], block[3], smem; void* stream; Attr* attrs; unsigned n; } Config;
static long ex_launches = 0;
static int last_attr[2] = {-1, 0};
int cuLaunchKernelEx(const Config* c, void* f, void** params, void** extra) {
  for (int i = 0; i < 3; i++) { last_dims[i] = c->grid[i]; last_dims[3 + i] = c->block[i]; }
  last_dims[6] = c->smem;
  last_fn = f; last_stream = c->stream; last_params = params; launches++; ex_launches++;
  last_attr[0] = c->n ? c->attrs[0].id : -1;
  last_attr[1] = c->n ? c->attrs[0].value : 0;
  return current ? 0 : 201;
}
long fake_ex_launches(void) { return ex_launches; }
int fake_last_attr(int i) { return last_attr[i]; }
void** fake_last_params(void) { return last_params; }
void* fake_last_stream(void) { return last_stream; }
void* fake_last_fn(void) { return last_fn; }
unsigned fake_last_dim(int i) { return last_dims[i]; }
void* fake_current(void) { return current; }
long fake_launches(void) { return launches; }
long fake_pushes(void) { return pushes; }
void fake_set_current(void* c) { current = c; }
"""


def compiler_error() -> str | None:
    """None when the fake driver can be built here (a C compiler), else why not."""
    from ..jit import host

    return host.compile_error()


def fake_driver_library() -> Path:
    """The fake libcuda's path: _SOURCE compiled through moecomm.jit.host's cache (once per text)."""
    from ..jit import host

    src = Path(tempfile.gettempdir()) / f"moecomm-fake-libcuda-{hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]}.c"
    if not src.is_file():
        tmp = src.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(_SOURCE)
        tmp.replace(src)  # atomic: processes starting together read a whole file
    return host.compile(src).path


class FakeCudaGenerator:
    """torch's CUDA generator as the host sees it: a seed and a Philox offset (a multiple of 4)."""

    def __init__(self, seed: int = 67280421310721) -> None:
        self.seed, self.offset = seed, 0

    def initial_seed(self) -> int:
        return self.seed

    def manual_seed(self, seed: int) -> FakeCudaGenerator:
        self.seed, self.offset = seed, 0
        return self

    def get_offset(self) -> int:
        return self.offset

    def set_offset(self, offset: int) -> None:
        if offset % 4:
            raise RuntimeError("offset must be a multiple of 4")  # torch's CUDAGeneratorImpl check
        self.offset = offset


def fake_library() -> ctypes.CDLL:
    """The fake driver loaded with its test hooks' return types (fake_* functions)."""
    lib = ctypes.CDLL(str(fake_driver_library()))
    lib.fake_launches.restype = lib.fake_pushes.restype = lib.fake_ex_launches.restype = ctypes.c_long
    lib.fake_last_params.restype = ctypes.POINTER(ctypes.c_void_p)
    lib.fake_last_stream.restype = lib.fake_last_fn.restype = lib.fake_current.restype = ctypes.c_void_p
    lib.fake_last_dim.restype = ctypes.c_uint
    lib.fake_set_current.argtypes = [ctypes.c_void_p]
    return lib


class Mock:
    """What gpu_host_mock() gives: the fake driver's counters and the default generator."""

    def __init__(self, lib: ctypes.CDLL, generator: FakeCudaGenerator) -> None:
        self.lib, self.generator = lib, generator

    def launches(self) -> int:
        return int(self.lib.fake_launches())

    def programmatic_launches(self) -> int:
        """Launches through cuLaunchKernelEx so far (CudaKernel.launch(programmatic=True)); the
        last one's first attribute: lib.fake_last_attr(0) its id, (1) its value."""
        return int(self.lib.fake_ex_launches())

    def pushes(self) -> int:
        """Context pushes so far (a launch whose context was not current pushes it)."""
        return int(self.lib.fake_pushes())


@contextlib.contextmanager
def gpu_host_mock(kernels: Sequence[tuple[str, str]] = (), capturing: bool = False) -> Iterator[Mock]:
    """CPU tensors take a CUDA tensor's host path, cuLaunchKernel included (see the module docstring).

    Args:
        kernels: (source, function) or (source, function, flags) that cuda.load(source, function,
            device=<a CPU tensor's device>, flags=flags (default cuda.DEFAULT_FLAGS)) returns as
            loaded kernels of device 0, with entries=None or (function,) (nothing is compiled or loaded).
        capturing: what torch.cuda.is_current_stream_capturing() answers.
    """
    from ..jit import backend, cuda

    lib_path = fake_driver_library()
    lib = fake_library()
    gen = FakeCudaGenerator()
    mp = _Patches()
    try:
        mp.set(torch.Tensor, "is_cuda", property(lambda self: True))
        mp.set(backend, "_choose", lambda t, op, has: has[0] if t.dtype is not torch.float64 else backend.Impl.REFERENCE)
        mp.set(backend, "cuda_compile_error", lambda: None)
        backend._CHOSEN.clear()
        mp.set(cuda, "_driver", cuda._Driver(str(lib_path)))
        mp.set(cuda, "_by_call", {})
        mp.set(cuda, "_by_args", {})
        mp.set(torch.cuda, "current_device", lambda: 0)
        mp.set(torch.cuda, "is_current_stream_capturing", lambda: capturing)
        mp.set(torch.cuda, "default_generators", (gen,))
        mp.set(torch.cuda, "current_stream", lambda device=None: _FakeStream())
        mp.set(torch._C, "_cuda_getCurrentRawStream", lambda index: 0)
        mp.set(torch._C, "_cuda_getDevice", lambda: 0)
        for source, name, *flags in kernels:  # the memo entries the first real load() would leave (whole, or the
            kern = cuda.CudaKernel(None, name, 0, ctypes.c_void_p(0x3000))  # name's group)
            for group in (None, (name,)):
                key = cuda._call_key(source, name, torch.device("cpu"), None, flags[0] if flags else cuda.DEFAULT_FLAGS,
                                     "auto", group)
                cuda._by_call[key] = kern
        yield Mock(lib, gen)
    finally:
        mp.undo()
        backend._CHOSEN.clear()


class _FakeStream:
    cuda_stream = 0


class _Patches:
    """setattr with undo (monkeypatch without pytest)."""

    _MISSING = object()

    def __init__(self) -> None:
        self.done: list[tuple[object, str, object]] = []

    def set(self, obj: object, name: str, value: object) -> None:
        self.done.append((obj, name, obj.__dict__.get(name, self._MISSING) if isinstance(obj, type) else
                          getattr(obj, name, self._MISSING)))
        setattr(obj, name, value)

    def undo(self) -> None:
        for obj, name, old in reversed(self.done):
            if old is self._MISSING:
                delattr(obj, name)
            else:
                setattr(obj, name, old)
        self.done.clear()
