"""moecomm.jit.cuda's entry groups (compile(..., entries=)) on CPU: a group's cubin holds its entries
and no other, the whole source's PTX is made once and shared by every group, the whole cubin keeps
its key, two processes compiling two groups of one source at once both get theirs from one PTX,
and bad groups are named errors. (tests/sampling checks a real entry's SASS against the whole build.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moecomm.errors import MoeCommValueError
from moecomm.jit import cuda

needs_nvcc = pytest.mark.skipif(cuda._nvcc() is None, reason="nvcc not found: the CUDA sources cannot be compiled here")

THREE = r"""
extern "C" __global__ void k_add(float* x) { x[threadIdx.x] += 1.0f; }
extern "C" __global__ void k_mul(float* x) { x[threadIdx.x] *= 2.0f; }
extern "C" __global__ void k_sub(float* x) { x[threadIdx.x] -= 3.0f; }
"""


@pytest.fixture
def three(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "three.cu"
    src.write_text(THREE)
    return src


def _functions(cubin: Path) -> set[str]:
    data = cubin.read_bytes()
    return {k for k in ("k_add", "k_mul", "k_sub") if f".text.{k}".encode() in data}


@needs_nvcc
def test_groups_hold_their_entries_and_share_one_ptx(three, monkeypatch):
    stages = []
    real = cuda._run_nvcc
    monkeypatch.setattr(cuda, "_run_nvcc", lambda src, arch, flags, **kw: (stages.append(kw), real(src, arch, flags, **kw))[1])
    a = cuda.compile(three, entries=("k_add",))
    assert a.compiled and a.entries == ("k_add",) and _functions(a.path) == {"k_add"}
    assert [s.get("stage") for s in stages] == ["ptx", None]  # the front end, then the group's ptxas
    b = cuda.compile(three, entries=["k_sub", "k_mul", "k_sub"])  # sorted, duplicates dropped
    assert b.entries == ("k_mul", "k_sub") and _functions(b.path) == {"k_mul", "k_sub"}
    assert len(stages) == 3 and stages[-1]["entries"] == ("k_mul", "k_sub")  # the PTX came from the cache
    assert not cuda.compile(three, entries=("k_sub", "k_mul")).compiled and len(stages) == 3
    whole = cuda.compile(three)
    assert _functions(whole.path) == {"k_add", "k_mul", "k_sub"} and whole.entries is None
    assert whole.key == cuda.cache_key(three, compiler_id=cuda.compiler()[1])  # the key it always had
    assert len({a.key, b.key, whole.key, cuda.cache_key(three, compiler_id="x", stage="ptx")}) == 4
    assert len(list(a.path.parent.glob("*.ptx"))) == 1 and not list(a.path.parent.glob("*.tmp"))


@needs_nvcc
def test_two_processes_compile_two_groups_at_once(three, tmp_path):
    """Both get their group; the PTX is compiled by one of them (the other waits on its lock)."""
    code = textwrap.dedent(f"""
        import sys
        from moecomm.jit import cuda
        real = cuda._run_nvcc
        def run(src, arch, flags, **kw):
            if kw.get("stage") == "ptx":
                print("PTX", flush=True)
            return real(src, arch, flags, **kw)
        cuda._run_nvcc = run
        c = cuda.compile({str(three)!r}, entries=(sys.argv[1],))
        print("CUBIN", c.path)
    """)
    procs = [subprocess.Popen([sys.executable, "-c", code, e], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for e in ("k_add", "k_mul")]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert sum(o.count("PTX") for o, _ in outs) == 1, outs
    paths = [Path(o.split("CUBIN ")[1].strip()) for o, _ in outs]
    assert [_functions(p) for p in paths] == [{"k_add"}, {"k_mul"}]


def test_bad_groups_are_named(three):
    for bad in ("k_add", (), ("k add",), (3,)):
        with pytest.raises(MoeCommValueError, match="entries must be a non-empty sequence of entry-point names"):
            cuda.cache_key(three, compiler_id="x", entries=bad)
    with pytest.raises(MoeCommValueError, match="entries must hold the kernel 'k_add'"):
        cuda.load(three, "k_add", entries=("k_mul",))


@needs_nvcc
def test_an_entry_missing_from_the_source_is_a_compile_error(three):
    with pytest.raises(cuda.CudaCompileError, match="Unknown function k_div"):
        cuda.compile(three, entries=("k_div",))


def test_load_tells_groups_apart(three):
    """load()'s memo key holds the group: a kernel of another group's cubin is another module's (its
    __device__ variables are that module's), so it is never handed out for this group."""
    key = lambda entries: cuda._call_key(three, "k_add", "cuda:0", None, cuda.DEFAULT_FLAGS, "auto", entries)  # noqa: E731
    assert key(("k_add", "k_mul")) == key(["k_mul", "k_add", "k_mul"])
    assert len({key(None), key(("k_add",)), key(("k_add", "k_mul"))}) == 3
