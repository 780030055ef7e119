"""moecomm.jit.cuda on CPU: kernels/ is found, the CUDA sources compile for sm_90a with nvcc (no GPU
needed), the cache hits without recompiling, a changed source, header or flag gives a new key, the
cubin is published atomically, compile errors carry the command and the compiler's message."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from moecomm.errors import MoeCommTypeError, MoeCommValueError
from moecomm.jit import cuda

needs_nvcc = pytest.mark.skipif(cuda._nvcc() is None, reason="nvcc not found (PATH, CUDA_HOME, /usr/local/cuda): "
                                "the CUDA sources cannot be compiled here")

TINY = r"""
#include "tiny.cuh"
extern "C" __global__ void tiny_add(float* x, int n) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) x[i] += TINY_STEP;
}
"""


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(d))
    return d


@pytest.fixture
def tiny(tmp_path):
    src = tmp_path / "src" / "tiny.cu"
    src.parent.mkdir()
    src.write_text(TINY)
    (src.parent / "tiny.cuh").write_text("#define TINY_STEP 1.0f\n")
    return src


def test_kernels_dir_holds_the_sources():
    d = cuda.kernels_dir()
    assert (d / "allreduce" / "reduce.cu").is_file() and (d / "common" / "dtypes.cuh").is_file()
    assert cuda.source_path("allreduce/reduce.cu") == d / "allreduce" / "reduce.cu"
    files = cuda.included_files(cuda.source_path("allreduce/reduce.cu"))
    assert [f.name for f in files] == ["reduce.cu", "dtypes.cuh"]
    for f in files:  # no torch headers, no CUDA headers (NVRTC has no system include path)
        text = f.read_text()
        assert "torch" not in text.split("//")[0] and "<cuda" not in text and "#include <" not in text


def test_bad_arguments_are_named(tiny):
    with pytest.raises(MoeCommValueError, match="arch must be like 'sm_90a' or 'sm_80', got 'sm90'"):
        cuda.cache_key(tiny, arch="sm90", compiler_id="x")
    with pytest.raises(MoeCommTypeError, match="flags must be a sequence of str, got '-O3'"):
        cuda.cache_key(tiny, flags="-O3", compiler_id="x")
    with pytest.raises(MoeCommValueError, match="source must be a file under"):
        cuda.source_path("allreduce/missing.cu")
    with pytest.raises(MoeCommTypeError, match="source must be a path"):
        cuda.source_path(3)
    with pytest.raises(MoeCommValueError, match="compiler must be auto, nvcc or nvrtc, got 'gcc'"):
        cuda.compiler("gcc")


def test_key_follows_source_header_flags_arch_and_toolchain(tiny):
    key = lambda **kw: cuda.cache_key(tiny, **{"compiler_id": "nvcc 13.0", **kw})  # noqa: E731
    base = key()
    assert key() == base and len(base) == 64
    assert key(flags=("-O3", "-std=c++17", "-lineinfo")) != base
    assert key(arch="sm_100a") != base
    assert key(compiler_id="nvcc 13.1") != base
    tiny.write_text(TINY + "\n// edited\n")
    assert key() != base
    tiny.write_text(TINY)
    assert key() == base
    (tiny.parent / "tiny.cuh").write_text("#define TINY_STEP 2.0f\n")  # an included header
    assert key() != base


def test_toolchain_error_on_a_machine_without_gpu():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible: the CPU-only answer does not apply")
    err = cuda.toolchain_error()
    assert err and "no CUDA device is visible" in err
    from moecomm.jit import backend

    assert backend.cuda_compile_error.__wrapped__() == err
    with pytest.raises(Exception, match="cannot load moecomm_reduce_bf16: no CUDA device"):
        cuda.load("allreduce/reduce.cu", "moecomm_reduce_bf16")


@needs_nvcc
def test_reduce_cu_compiles_for_sm90a_and_hits_the_cache(cache_dir, monkeypatch):
    first = cuda.compile("allreduce/reduce.cu")
    assert first.compiled and first.arch == "sm_90a"
    assert first.path.parent == cache_dir / "cuda" and first.path.name.startswith("reduce-sm_90a-")
    data = first.path.read_bytes()
    assert data[:4] == b"\x7fELF"
    for name in (b"moecomm_reduce_bf16", b"moecomm_reduce_fp16", b"moecomm_reduce_fp32"):
        assert name in data

    def no_compile(*a, **k):
        raise AssertionError("the second call must not run the compiler")

    monkeypatch.setattr(cuda, "_run_nvcc", no_compile)
    second = cuda.compile("allreduce/reduce.cu")
    assert not second.compiled and second.path == first.path and second.key == first.key
    assert second.path.read_bytes() == data


@needs_nvcc
def test_changed_source_or_flag_compiles_anew_and_publishes_atomically(cache_dir, tiny, monkeypatch):
    replaced, runs = [], []
    real_replace, real_run = os.replace, cuda._run_nvcc
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    monkeypatch.setattr(cuda, "_run_nvcc", lambda *a: (runs.append(a), real_run(*a))[1])

    a = cuda.compile(tiny)
    assert a.compiled and runs and replaced[-1][1] == a.path and replaced[-1][0] != str(a.path)
    assert Path(replaced[-1][0]).parent == a.path.parent  # the temp file sits beside the entry
    assert not [p for p in a.path.parent.iterdir() if p.name.endswith(".tmp")]
    assert b"tiny_add" in a.path.read_bytes()
    n = len(runs)
    assert not cuda.compile(tiny).compiled and len(runs) == n  # hit: the compiler did not run

    b = cuda.compile(tiny, flags=("-O3", "-std=c++17", "-lineinfo"))
    assert b.compiled and b.key != a.key and b.path != a.path
    (tiny.parent / "tiny.cuh").write_text("#define TINY_STEP 2.0f\n")
    c = cuda.compile(tiny)
    assert c.compiled and c.key not in (a.key, b.key)
    assert len({p.name for p in (cache_dir / "cuda").glob("*.cubin")}) == 3


@needs_nvcc
def test_compile_error_carries_the_command_and_the_message(cache_dir, tmp_path):
    bad = tmp_path / "bad.cu"
    bad.write_text('extern "C" __global__ void broken(float* x) { x[0] = undefined_name; }\n')
    with pytest.raises(cuda.CudaCompileError) as info:
        cuda.compile(bad)
    msg = str(info.value)
    assert "undefined_name" in msg and "-arch=sm_90a" in msg and "-cubin" in msg and str(bad) in msg
    assert not list((cache_dir / "cuda").glob("*.cubin"))  # nothing published


@needs_nvcc
def test_nvcc_found_outside_path_through_cuda_home(monkeypatch, tmp_path):
    nvcc = cuda._nvcc()
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    os.symlink(nvcc, home / "bin" / "nvcc")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setenv("CUDA_HOME", str(home))
    assert cuda._nvcc() == str(home / "bin" / "nvcc")


def test_nvrtc_compiles_when_importable(cache_dir):
    if cuda._nvrtc() is None:
        pytest.skip("neither cupy nor cuda-python (NVRTC) imports here")
    c = cuda.compile("allreduce/reduce.cu", compiler_kind="nvrtc")
    assert c.compiled and c.path.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.gpu
def test_load_and_launch_a_tiny_kernel_on_gpu(cache_dir, tiny):
    """The driver-API path: load the cubin for the device's arch, launch on torch's current stream
    with a torch tensor and ctypes scalars; a second load() is the same kernel object."""
    import ctypes

    import torch

    assert cuda.toolchain_error() is None, cuda.toolchain_error()
    assert cuda.device_arch(0).startswith("sm_")
    k = cuda.load(tiny, "tiny_add")
    assert cuda.load(tiny, "tiny_add") is k and k.compiled.arch == cuda.device_arch(0)
    x = torch.arange(1000, dtype=torch.float32, device="cuda")
    k((4,), (256,), (x, ctypes.c_int(1000)))
    k((4,), (256,), (x, ctypes.c_int(999)))
    want = torch.arange(1000, dtype=torch.float32) + 2
    want[999] -= 1
    assert torch.equal(x.cpu(), want)
    with pytest.raises(MoeCommTypeError, match="launch argument 1 must be a torch.Tensor or a ctypes scalar"):
        k((1,), (1,), (x, 3))
    with pytest.raises(cuda.CudaDriverError, match="cuModuleGetFunction"):
        cuda.load(tiny, "no_such_kernel")


def _recording_driver(lib):
    """A stand-in for moecomm.jit.cuda's driver whose library is ``lib`` (no GPU here)."""
    import contextlib

    class Driver:
        def check(self, rc, what):
            assert rc == 0, what

        @contextlib.contextmanager
        def current(self, index):
            yield

        def launch(self, index, fn, g, b, shared_mem, stream, params, programmatic=False):
            assert not programmatic  # (the fake_driver fixture covers cuLaunchKernelEx)
            return self.lib.cuLaunchKernel(fn, *g, *b, shared_mem, stream, params, None)

    Driver.lib = lib
    return Driver


def test_dynamic_shared_memory_past_48kb_is_opted_in_once(monkeypatch):
    """A launch asking for more than 48 KB of dynamic shared memory first sets the function's
    MAX_DYNAMIC_SHARED_SIZE_BYTES (attribute 8) to it, once; smaller launches set nothing (checked
    against a recording driver: no GPU here)."""
    import ctypes

    calls = []

    class Lib:
        def cuFuncSetAttribute(self, fn, attr, value):
            calls.append(("attr", fn.value, attr, value))
            return 0

        def cuLaunchKernel(self, fn, *rest):
            calls.append(("launch", fn.value, rest[:6], rest[6]))
            return 0

    Driver = _recording_driver(Lib())
    monkeypatch.setattr(cuda, "_get_driver", lambda: Driver())
    k = cuda.CudaKernel(None, "k", 0, ctypes.c_void_p(1234))
    assert k.max_dynamic_shared_bytes == 48 * 1024
    k((2,), (1024,), (ctypes.c_int(1),), shared_mem=40_000, stream=0)
    k((2,), (1024,), (ctypes.c_int(1),), shared_mem=200_704, stream=0)
    k((2,), (1024,), (ctypes.c_int(1),), shared_mem=200_704, stream=0)
    k((2,), (1024,), (ctypes.c_int(1),), shared_mem=100_000, stream=0)
    assert [c for c in calls if c[0] == "attr"] == [("attr", 1234, 8, 200_704)]
    assert [c[3] for c in calls if c[0] == "launch"] == [40_000, 200_704, 200_704, 100_000]
    assert k.max_dynamic_shared_bytes == 200_704
    with pytest.raises(MoeCommValueError, match="nbytes must be an int >= 0, got -1"):
        k.set_max_dynamic_shared_bytes(-1)


def test_launch_parameters_are_packed_at_their_offsets(monkeypatch):
    """The kernelParams array a launch hands cuLaunchKernel points at each argument's value, of its
    own C type, aligned to its size: read back through the recording driver for a mixed signature
    (tensor pointers, int, long long, float, double, a null pointer), twice with other values (the
    signature's buffer is reused)."""
    import ctypes

    import torch

    seen = []
    kinds = [ctypes.c_uint64, ctypes.c_int, ctypes.c_uint64, ctypes.c_longlong, ctypes.c_float, ctypes.c_double,
             ctypes.c_uint64, ctypes.c_int]

    class Lib:
        def cuLaunchKernel(self, fn, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
            ptrs = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
            seen.append([k.from_address(ptrs[i]).value for i, k in enumerate(kinds)])
            return 0

    Driver = _recording_driver(Lib())
    monkeypatch.setattr(cuda, "_get_driver", lambda: Driver())
    k = cuda.CudaKernel(None, "k", 0, ctypes.c_void_p(1))
    a, b = torch.zeros(3), torch.zeros(5, dtype=torch.int32)
    for n, x in ((7, 1.5), (-3, -0.25)):
        k((1,), (32,), (a, ctypes.c_int(n), b, ctypes.c_longlong(2**40 + n), ctypes.c_float(x), ctypes.c_double(x / 3),
                        ctypes.c_void_p(0), ctypes.c_int(-n)), stream=0)
        want = [a.data_ptr(), n, b.data_ptr(), 2**40 + n, x, x / 3, 0, -n]
        got = seen[-1]
        assert got[:4] == want[:4] and got[6:] == want[6:] and got[4] == pytest.approx(x) and got[5] == x / 3
    with pytest.raises(MoeCommTypeError, match="launch argument 1 must be a torch.Tensor or a ctypes scalar"):
        k((1,), (1,), (a, 3))


needs_cc = pytest.mark.skipif(__import__("moecomm.testing.fake_cuda", fromlist=["x"]).compiler_error() is not None,
                              reason="no C compiler: the fake driver library cannot be built")


@pytest.fixture
def fake_driver(monkeypatch):
    """The real _Driver over moecomm.testing.fake_cuda's C library (libcuda's ABI, no GPU), with its
    test hooks; device 0's primary context current at the start."""
    from moecomm.testing import fake_cuda

    lib = fake_cuda.fake_library()
    drv = cuda._Driver(str(fake_cuda.fake_driver_library()))
    monkeypatch.setattr(cuda, "_driver", drv)
    lib.fake_set_current(0x1000)
    yield lib
    lib.fake_set_current(0x1000)


@needs_cc
def test_launch_pushes_the_context_only_when_it_is_not_current(fake_driver):
    """A launch asks the driver for the current context (cuCtxGetCurrent) and pushes the kernel's
    device's primary context only when another one, or none, is current (a fresh thread: no
    context although torch's current device may read 0); the pushed context is popped after."""
    import ctypes

    lib = fake_driver
    k0 = cuda.CudaKernel(None, "k0", 0, ctypes.c_void_p(0x3000))
    k1 = cuda.CudaKernel(None, "k1", 1, ctypes.c_void_p(0x3100))
    seen = []

    def launch(k, current):
        lib.fake_set_current(current)
        pushes, launches = lib.fake_pushes(), lib.fake_launches()
        k((2,), (32,), (ctypes.c_int(5),), stream=0)
        assert lib.fake_launches() == launches + 1
        assert lib.fake_current() == (current or None)  # restored after a push
        seen.append(lib.fake_pushes() - pushes)

    launch(k0, 0x1000)  # device 0's context current: no push
    launch(k0, 0)  # none current (a thread that made no runtime call yet): pushed
    launch(k0, 0x1100)  # device 1's current: pushed
    launch(k1, 0x1000)
    launch(k1, 0x1100)
    assert seen == [0, 1, 1, 1, 0]
    assert lib.fake_last_fn() == 0x3100


@needs_cc
def test_launch_hands_the_driver_packed_values_and_64bit_handles(fake_driver):
    """Through the real ctypes call (no argtypes on the launch path): the kernelParams array points
    at each value of its C type, the stream handle keeps its 64 bits, grid, block and shared memory
    arrive; the Signature path and __call__ pack the same bytes."""
    import ctypes

    import torch

    lib = fake_driver
    k = cuda.CudaKernel(None, "k", 0, ctypes.c_void_p(0x3000))
    a = torch.zeros(4)
    types = (ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_float, ctypes.c_double, ctypes.c_int)
    stream = 0x7F12_3456_789A

    def read():
        ptrs = lib.fake_last_params()
        return [t.from_address(ptrs[i]).value for i, t in enumerate(types)]

    k((3, 2), (128,), (a, ctypes.c_int(-7), ctypes.c_longlong(-2**40), ctypes.c_float(0.1), ctypes.c_double(1 / 3),
                       ctypes.c_int(2**31 - 1)), shared_mem=1000, stream=stream)
    first = read()
    assert first == [a.data_ptr(), -7, -2**40, ctypes.c_float(0.1).value, 1 / 3, 2**31 - 1]
    assert lib.fake_last_stream() == stream
    assert [lib.fake_last_dim(i) for i in range(7)] == [3, 2, 1, 128, 1, 1, 1000]
    sig = cuda.Signature(types)
    k.launch((1,), (32,), sig, (a.data_ptr(), -7, -2**40, 0.1, 1 / 3, 2**31 - 1), stream=stream)
    assert read() == first
    with pytest.raises(MoeCommTypeError, match=r"launch value 1 must fit c_int, got 2.5"):
        k.launch((1,), (32,), sig, (a.data_ptr(), 2.5, 0, 0.0, 0.0, 0), stream=0)
    with pytest.raises(MoeCommTypeError, match="launch values must number 6"):
        k.launch((1,), (32,), sig, (a.data_ptr(),), stream=0)
    with pytest.raises(MoeCommTypeError, match="launch argument 1 has type c_char_p"):
        cuda.Signature((ctypes.c_void_p, ctypes.c_char_p))


@needs_cc
def test_programmatic_launch_goes_through_cuLaunchKernelEx(fake_driver):
    """launch(programmatic=True): cuLaunchKernelEx with the same grid, block, shared bytes, stream
    and packed values, one attribute (programmatic stream serialisation = 1); pushed like a plain
    launch when the context is not current; a plain launch after it is plain again."""
    import ctypes

    lib = fake_driver
    k = cuda.CudaKernel(None, "k", 0, ctypes.c_void_p(0x3000))
    sig = cuda.Signature((ctypes.c_int, ctypes.c_longlong))
    stream = 0x7F12_3456_789B
    for current in (0x1000, 0):
        lib.fake_set_current(current)
        ex, pushes = lib.fake_ex_launches(), lib.fake_pushes()
        k.launch((5, 3), (256,), sig, (-3, 2**40 + 1), shared_mem=4096, stream=stream, programmatic=True)
        assert lib.fake_ex_launches() == ex + 1
        assert lib.fake_pushes() - pushes == (0 if current else 1)
        assert [lib.fake_last_dim(i) for i in range(7)] == [5, 3, 1, 256, 1, 1, 4096]
        assert lib.fake_last_stream() == stream
        assert (lib.fake_last_attr(0), lib.fake_last_attr(1)) == (6, 1)
        ptrs = lib.fake_last_params()
        assert (ctypes.c_int.from_address(ptrs[0]).value, ctypes.c_longlong.from_address(ptrs[1]).value) == (-3, 2**40 + 1)
    lib.fake_set_current(0x1000)
    ex, launches = lib.fake_ex_launches(), lib.fake_launches()
    k.launch((1,), (32,), sig, (1, 2), stream=0)
    assert (lib.fake_ex_launches(), lib.fake_launches()) == (ex, launches + 1)


@needs_cc
def test_launch_failure_names_the_kernel(fake_driver, monkeypatch):
    """A launch the driver refuses raises CudaDriverError with the kernel, grid and error name."""
    import ctypes

    k = cuda.CudaKernel(None, "moecomm_k", 0, ctypes.c_void_p(0x3000))
    drv = cuda._driver
    monkeypatch.setattr(drv, "_launch_fn", lambda *a: 999)
    with pytest.raises(cuda.CudaDriverError, match=r"cuLaunchKernel\(moecomm_k, grid=\(1, 1, 1\).*CUDA_ERROR_FAKE \(999\)"):
        k((1,), (1,), (ctypes.c_int(1),), stream=0)


def test_load_memo_by_the_arguments_as_given(monkeypatch):
    """load() answers a repeated call from a memo of its arguments as given (a device given), filled
    from the normalised memo; an unhashable argument (flags as a list) uses the normalised key
    only; forget_loaded() clears both (no GPU: the normalised memo holds a stand-in kernel)."""
    import ctypes

    import torch

    monkeypatch.setattr(cuda, "_by_call", {})
    monkeypatch.setattr(cuda, "_by_args", {})
    dev = torch.device("cuda", 0)
    kern = cuda.CudaKernel(None, "k", 0, ctypes.c_void_p(1))
    cuda._by_call[cuda._call_key("allreduce/reduce.cu", "k", dev, None, cuda.DEFAULT_FLAGS, "auto")] = kern
    assert cuda.load("allreduce/reduce.cu", "k", device=dev) is kern
    assert list(cuda._by_args.values()) == [kern]
    assert cuda.load("allreduce/reduce.cu", "k", device=torch.device("cuda:0")) is kern  # equal device: same entry
    assert cuda.load("allreduce/reduce.cu", "k", device="cuda:0", flags=list(cuda.DEFAULT_FLAGS)) is kern
    assert len(cuda._by_args) == 1
    cuda.forget_loaded()
    assert not cuda._by_args and not cuda._by_call
