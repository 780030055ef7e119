"""kernels/sampling/sample.cu run on the CPU: the source compiled as host C++ over cuda_host_shim.h
(one thread per CUDA thread), launched with the argument list of moecomm.sampling._cuda.plan_launch.
So the kernel's logic and its wrapper's flags are tested without a GPU; what this cannot show is
the GPU's own behaviour (memory ordering beyond __syncthreads, timing, register limits).

Cluster launches (the _split entries: a row over a thread-block cluster): the blocks of a cluster
run at the same time, each in its own copy of the library (copies of one .so file, each with its
own __shared__ globals); the shim's cluster_sync is a barrier over all their threads and its
cluster_map moves an address to the same offset in another copy (distributed shared memory)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TIMEOUT_S = 120.0


def compiler_error() -> str | None:
    return None if shutil.which("g++") else "g++ not found"


def _library() -> ctypes.CDLL:
    from moecomm.jit import cuda

    src = cuda.source_path("sampling/sample.cu")
    parts = [*cuda.included_files(src), HERE / "cuda_host_shim.h", HERE / "cuda_host_run.cpp"]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()[:16]
    out = Path(tempfile.gettempdir()) / f"moecomm-sample-emu-{key}.so"
    if not out.is_file():
        tmp = out.with_suffix(f".{os.getpid()}.tmp")
        cmd = ["g++", "-O2", "-std=c++20", "-pthread", "-fPIC", "-shared", "-Wno-unknown-pragmas",
               "-fvisibility=hidden", "-fno-gnu-unique",  # the cluster's copies bind no symbol of each other
               f'-DSAMPLE_CU="{src}"', "-o", str(tmp), str(HERE / "cuda_host_run.cpp")]
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            raise RuntimeError(f"building the host emulation failed:\n{' '.join(cmd)}\n{res.stderr[-4000:]}")
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    lib.emu_sample.restype = ctypes.c_int
    return lib


def _copies(n: int) -> list[ctypes.CDLL]:
    """n copies of the library, each loaded on its own (RTLD_LOCAL: its own globals), for the ranks
    of a cluster launch."""
    global _lib
    if _lib is None:
        _lib = _library()
    while len(_rank_libs) < n:
        src = Path(_lib._name)
        dst = src.with_name(f"{src.stem}-rank{len(_rank_libs)}.so")
        if not dst.is_file():
            tmp = dst.with_suffix(f".{os.getpid()}.tmp")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
        lib = ctypes.CDLL(str(dst))
        lib.emu_sample_block.restype = ctypes.c_int
        lib.emu_cluster_new.restype = ctypes.c_void_p
        lib.emu_cluster_new.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.emu_cluster_free.argtypes = [ctypes.c_void_p]
        _rank_libs.append(lib)
    return _rank_libs[:n]


_lib: ctypes.CDLL | None = None
_rank_libs: list[ctypes.CDLL] = []


def launch(x, rowmap, num_rows, out, valid, logprob, top_k, top_p, min_p, top_k_first, seed, offset, per_row_seed,
           threads: int = 128, lag_us: int = 0, bounds=None):
    """One launch of the kernel on CPU tensors, planned by _cuda.plan_launch (threads: the block size
    to emulate; the GPU runs 1024, the kernel takes any multiple of 32; lag_us: after every
    __syncthreads the threads other than 0 sleep this long, to shake out shared-memory races;
    bounds: an int64 [num_rows] tensor that gets each row's race threshold key, or None)."""
    global _lib
    from moecomm.sampling import _cuda

    if _lib is None:
        _lib = _library()
    plan = _cuda.plan_launch(x, rowmap, num_rows, out, valid, logprob, top_k, top_p, min_p, top_k_first, seed,
                             offset, per_row_seed)
    args = [ctypes.c_void_p(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in plan.args]
    paths = torch.zeros(num_rows, dtype=torch.int32)
    size = _cuda.cluster_of(plan.entry)
    libs = _copies(size) if size > 1 else [_lib]
    for lib in libs:
        lib.emu_record_bounds(ctypes.c_void_p(bounds.data_ptr() if bounds is not None else None))
    try:
        if size > 1:
            _launch_clusters(plan, size, num_rows, threads, lag_us, paths, args)
            return plan, paths
        return _launch_blocks(plan, threads, lag_us, paths, args)
    finally:
        for lib in libs:
            lib.emu_record_bounds(ctypes.c_void_p(None))


def _launch_blocks(plan, threads, lag_us, paths, args):
    """A launch of one block a row: every block in turn on the host's threads (emu_sample)."""
    rc = []

    def run():
        rc.append(_lib.emu_sample(ctypes.c_void_p(paths.data_ptr()), ctypes.c_int(lag_us), plan.entry.encode(),
                                  ctypes.c_int(plan.grid[0]), ctypes.c_int(threads),
                                  ctypes.c_longlong(plan.shared_bytes), *args))

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(TIMEOUT_S)
    if th.is_alive():
        raise TimeoutError(f"the emulated kernel did not finish in {TIMEOUT_S} s (a barrier reached by part of a block?)")
    if rc == [3]:
        raise RuntimeError(f"{plan.entry} wrote past its {plan.shared_bytes} bytes of dynamic shared memory")
    if rc != [0]:
        raise RuntimeError(f"emu_sample returned {rc}")
    return plan, paths


def _launch_clusters(plan, size, num_rows, threads, lag_us, paths, args):
    """A cluster launch: for each row its `size` blocks at once, block r in library copy r."""
    libs = _copies(size)
    for row in range(num_rows):
        cluster = libs[0].emu_cluster_new(size, threads)
        rc: dict[int, int] = {}

        def run(r, cluster=cluster, rc=rc):
            rc[r] = libs[r].emu_sample_block(
                ctypes.c_void_p(cluster), ctypes.c_int(r), ctypes.c_int(row * size + r), ctypes.c_void_p(paths.data_ptr()),
                ctypes.c_int(lag_us), plan.entry.encode(), ctypes.c_int(plan.grid[0]), ctypes.c_int(threads),
                ctypes.c_longlong(plan.shared_bytes), *args)

        ths = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(size)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(TIMEOUT_S)
            if th.is_alive():
                raise TimeoutError(f"the emulated cluster did not finish in {TIMEOUT_S} s (a barrier reached by part of it?)")
        libs[0].emu_cluster_free(ctypes.c_void_p(cluster))
        if any(v == 3 for v in rc.values()):
            raise RuntimeError(f"{plan.entry} wrote past its {plan.shared_bytes} bytes of dynamic shared memory")
        if sorted(rc.items()) != [(r, 0) for r in range(size)]:
            raise RuntimeError(f"emu_sample_block returned {rc}")


def sample(x, *, indices=None, top_k=None, top_p=None, min_p=None, top_k_first=True, seed=0, offset=0,
           per_row_seed=False, out_dtype=torch.int32, threads: int = 128, lag_us: int = 0, bounds=None):
    """(tokens, valid, logprob, paths) of the emulated kernel (outputs prefilled with garbage so that
    unwritten rows show; paths: [B] int32, the OR of sample.cu's PATH_* bits each row took; bounds:
    as launch's)."""
    num_rows = indices.shape[0] if indices is not None else x.shape[0]
    out = torch.full((num_rows,), -7, dtype=out_dtype)
    valid = torch.full((num_rows,), True)
    logprob = torch.full((num_rows,), 123.0)
    _, paths = launch(x, indices, num_rows, out, valid, logprob, top_k, top_p, min_p, top_k_first, seed, offset,
                      per_row_seed, threads, lag_us, bounds)
    return out, valid, logprob, paths
