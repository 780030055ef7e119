"""kernels/sampling/sample.cu through moecomm.sampling._cuda: sampling from fp32 probabilities with
top-k / top-p / min-p (the design is in the .cu file's header).

# B = output rows, R = rows of probs, V = vocab, CAP = the list's capacity in keys

CPU: the source compiles for sm_90a with nvcc (no spills; registers, shared memory within a
block's limits); the wrapper's argument list matches each entry point's PTX signature for every
kind of argument; flags and constants agree with the source; covers() and the capacity. And the
kernel itself, compiled as host C++ over tests/sampling/cuda_host_shim.h (one thread per CUDA
thread, the real __syncthreads / shuffle / atomic structure), launched with the wrapper's argument
list, against the reference token for token on every path (the list in shared memory, top-p's
window, the radix levels over the row, the race over the row: forced with a small LIST_CAPACITY)
and edge case (ties, flat rows, bad rows and parameters, odd vocabularies and strides, per-row
tensors, indices, per-row seeds). Exact equality there: kernel and reference use the same Philox
bits, the same fp32 rounding steps for E and v / E, and fp64 sums for the kept set.

GPU (-m gpu): the compiled kernel against the reference at V = 128256 for B 1 / 7 / 128 and every
filter combination: >= 99.5% of rows equal (the brief's bound; the design expects all), never a
token outside the kept set computed with a 1e-5 relative margin; ties, flat rows, the scalar path,
bad rows, the fallback paths forced, CUDA-graph capture with fresh numbers per replay, no host sync,
and the dispatch (the CUDA kernel runs the calls it covers, the Triton kernel the rest).
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import NamedTuple

import pytest
import torch

import moecomm.sampling as S
from moecomm.jit import cuda
from moecomm.sampling import _cuda, api
from moecomm.sampling import reference as ref

import _cuda_emulation as emu

needs_nvcc = pytest.mark.skipif(cuda._nvcc() is None, reason="nvcc not found: the CUDA source cannot be compiled here")
needs_gxx = pytest.mark.skipif(emu.compiler_error() is not None, reason="g++ not found: no host emulation of the kernel")
MAX_SMEM_BLOCK = 232448  # H100 / H200: 227 KB of shared memory a block (opt-in)


def _probs(rows, vocab, scale=3.0, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, vocab, generator=g) * scale, -1).to(device)


# ---------------------------------------------------------------------------------------------
# the source: compiles, fits, and the wrapper passes what the kernel takes


HOT_ENTRY = _cuda.SPLIT_ENTRY["qsum", 8]  # top-p at B1-B12: the CUDA-graph target's entry
_NVCC: dict = {}  # the one compile: its commands (the library's), the process, the folder of its files


def start_nvcc() -> None:
    """Start the library's own nvcc commands for the sampling source (moecomm.jit.cuda.nvcc_command)
    in the background, one after another: the front end (the whole source's PTX), that PTX assembled
    whole with -Xptxas -v (every entry's registers, spills and shared memory; -v changes no code:
    the whole build, the reference of the SASS check), and HOT_ENTRY's own build (the source with that
    entry alone: _cuda.entry_flags) as _cuda.launch_sample compiles it. tests/sampling/conftest.py calls this after collection when a
    selected test uses nvcc_out, so the ~30 s (2 cores) overlap the tests before this module."""
    if _NVCC or cuda._nvcc() is None:
        return
    import shlex
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="moecomm-test-nvcc-"))
    src, arch, flags = cuda.source_path(_cuda.SOURCE), cuda.DEFAULT_ARCH, cuda.DEFAULT_FLAGS
    ptx = d / f"{src.stem}.ptx"
    cmds = {"ptx": cuda.nvcc_command(src, arch, flags, ptx, stage="ptx"),
            "whole": cuda.nvcc_command(ptx, arch, (*flags, "-Xptxas", "-v"), d / "whole.cubin"),
            "group": cuda.nvcc_command(src, arch, _cuda.entry_flags(HOT_ENTRY), d / "group.cubin")}
    script = (f"{shlex.join(cmds['ptx'])} && {shlex.join(cmds['whole'])} > {d / 'whole.log'} 2>&1 && "
              f"{shlex.join(cmds['group'])}")
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _NVCC.update(cmds=cmds, dir=d, ptx=ptx, proc=proc)
    atexit.register(_kill_nvcc, proc)  # a run that ends before the fixture leaves no compiler behind


def _kill_nvcc(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)  # the shell and the nvcc it runs: their own process group


def _same_command(ran: list[str], want: list[str]) -> bool:
    """The same nvcc command but for its output and input files."""
    o, w = ran.index("-o"), want.index("-o")
    return ran[:o] + ran[o + 2:-1] == want[:w] + want[w + 2:-1] and Path(ran[-1]).suffix == Path(want[-1]).suffix


class NvccOut(NamedTuple):
    log: str  # ptxas -v of the whole build
    ptx: str  # the whole source's PTX
    group: cuda.Compiled  # moecomm.jit.cuda.compile(SOURCE, flags=entry_flags(HOT_ENTRY)): HOT_ENTRY's cubin
    whole: Path  # the whole build's cubin


@pytest.fixture(scope="module")
def nvcc_out(tmp_path_factory) -> NvccOut:
    """The compile start_nvcc began (started here if it was not), then cuda.compile of HOT_ENTRY's
    own build into a fresh cache: it runs the same command (checked), answered by that run's file,
    and a second compile finds the cubin on disk."""
    if cuda._nvcc() is None:
        pytest.skip("nvcc not found")
    from moecomm.jit import cache

    start_nvcc()
    so, se = _NVCC["proc"].communicate(timeout=900)
    d = _NVCC["dir"]
    log = (d / "whole.log").read_text() if (d / "whole.log").is_file() else ""
    assert _NVCC["proc"].returncode == 0, f"nvcc failed (exit {_NVCC['proc'].returncode})\n{se}{so}{log}"
    ran = []

    def finished(cmd, out, error, who, src, timeout_s):  # the library's commands, answered by that run
        ran.append(cmd)
        return (_NVCC["ptx"] if "-ptx" in cmd else d / "group.cubin").read_bytes()

    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("MOECOMM_CACHE_DIR", str(tmp_path_factory.mktemp("nvcc") / "cache"))
        mp.setattr(cache, "run_compiler", finished)
        c = cuda.compile(_cuda.SOURCE, flags=_cuda.entry_flags(HOT_ENTRY))
        again = cuda.compile(_cuda.SOURCE, flags=_cuda.entry_flags(HOT_ENTRY))
    finally:
        mp.undo()
    assert len(ran) == 1 and not again.compiled and again.path == c.path, ran
    assert _same_command(ran[0], _NVCC["cmds"]["group"]), ran
    return NvccOut(log, _NVCC["ptx"].read_text(), c, d / "whole.cubin")


def _cuobjdump(cubin: Path, *args: str) -> str:
    import triton

    return subprocess.run([triton.knobs.nvidia.cuobjdump.path, *args, str(cubin)], capture_output=True, text=True,
                          check=True).stdout


def _sass(cubin: Path, function: str | None = None) -> dict[str, list[str]]:
    """{function: its SASS instructions, addresses and encodings left out} (Triton's cuobjdump), of
    every function or the one named."""
    funcs: dict[str, list[str]] = {}
    cur: list[str] = []
    for line in _cuobjdump(cubin, "-sass", *(("-fun", function) if function else ())).splitlines():
        m = re.match(r"\s*Function : (\S+)", line)
        if m:
            cur = funcs.setdefault(m.group(1), [])
        elif re.match(r"\s+/\*[0-9a-f]{4,}\*/", line):
            cur.append(re.sub(r"/\*[^*]*\*/", "", line).split(";")[0].strip())
    return funcs


def _resources(cubin: Path) -> dict[str, str]:
    """{function: its REG / STACK / SHARED / LOCAL figures} (cuobjdump --dump-resource-usage)."""
    text = _cuobjdump(cubin, "--dump-resource-usage")
    return dict(re.findall(r"Function (\S+):\s*\n\s*(REG:\d+ STACK:\d+ SHARED:\d+ LOCAL:\d+)", text))


@needs_nvcc
def test_source_compiles_for_sm90a(nvcc_out):
    c = nvcc_out.group
    assert c.compiled and c.arch == "sm_90a" and c.entries is None  # the entry alone by its flags (entry_flags), not an entry group
    blob = nvcc_out.whole.read_bytes()
    for entry in [*_cuda.ENTRY.values(), *_cuda.PAIRED_ENTRY.values(), *_cuda.SPLIT_ENTRY.values()]:
        assert entry.encode() in blob


@needs_nvcc
def test_entry_builds_hold_their_entry_with_the_whole_builds_resources(nvcc_out):
    """launch_sample compiles one entry a cubin (the source with that entry alone: entry_flags): the
    entries it launches are the whole build's PTX's, all of them; HOT_ENTRY's cubin holds that entry
    alone, with the whole build's registers and shared memory and its instruction count within 1%
    (the same code, not the same bytes: the layout of the other entries' helpers moves call targets)."""
    entries = {*_cuda.ENTRY.values(), *_cuda.PAIRED_ENTRY.values(), *_cuda.SPLIT_ENTRY.values()}
    assert set(re.findall(r"^\.visible \.entry (\w+)\(", nvcc_out.ptx, re.MULTILINE)) == entries
    group, whole = _sass(nvcc_out.group.path), _sass(nvcc_out.whole, HOT_ENTRY)
    assert set(group) == {HOT_ENTRY} and set(_resources(nvcc_out.whole)) == entries
    # cuobjdump lists an entry's code with that of the functions it calls (sample_row_split and
    # small_select are __noinline__): ~28K instructions
    n, m = len(group[HOT_ENTRY]), len(whole[HOT_ENTRY])
    assert n > 10000 and abs(n - m) <= 0.01 * m, (n, m)
    res_group, res_whole = _resources(nvcc_out.group.path), _resources(nvcc_out.whole)
    pick = lambda r: [f for f in r.split() if f.startswith(("REG:", "SHARED:"))]  # noqa: E731
    assert pick(res_group[HOT_ENTRY]) == pick(res_whole[HOT_ENTRY]) and res_group[HOT_ENTRY].startswith("REG:64 ")


def test_launch_compiles_only_its_entry(monkeypatch):
    """launch_sample asks moecomm.jit.cuda.load for its entry's own build (flags: entry_flags, the
    source's #if guards keep that entry alone), so a first call compiles one entry of sample.cu; the
    entry is the plan's, launched on its grid; the flags are one memoised tuple an entry."""
    asked, launched = [], []

    class Kernel:
        def launch(self, grid, block, signature, values, shared_mem=0, programmatic=False):
            launched.append((grid, block, shared_mem, programmatic))

    def load(source, name, **kw):
        asked.append((source, name, kw.get("entries"), kw.get("flags")))
        return Kernel()

    monkeypatch.setattr(cuda, "load", load)
    for split, kw in ((None, dict(top_p=0.9)), (None, dict(top_k=50, top_p=0.9)), (None, dict(min_p=0.1)),
                      (8, dict(top_p=0.9))):
        monkeypatch.setattr(_cuda, "SPLIT", split)
        args = _plan_args(**kw)
        x, rowmap, rows, out, valid, logprob, k, p, m, tkf, seed, offset, per_row = args
        _cuda.launch_sample(x, rowmap, rows, out, valid, logprob, None, _cuda.MODE_SAMPLE, False, k, p, m, None,
                            tkf, seed, offset, per_row)
        plan = _cuda.plan_launch(*args)
        want = (*cuda.DEFAULT_FLAGS, "-DMOECOMM_SAMPLE_ONLY", f"-DMOECOMM_SAMPLE_ONLY_{plan.entry}")
        assert asked[-1] == (_cuda.SOURCE, plan.entry, None, want), kw
        assert asked[-1][3] is _cuda.entry_flags(plan.entry)
        assert launched[-1] == ((plan.grid[0], 1, 1), (plan.block[0], 1, 1), plan.shared_bytes, False), kw
    assert plan.grid == (4 * 8,) and len(asked) == len(launched) == 4


@needs_nvcc
def test_registers_spills_and_shared_memory(nvcc_out):
    """ptxas -v: every entry at most 64 registers (1024 threads a block) and at most 128 bytes of
    spill stores and loads in each function (cuobjdump places them at small_select's call sites and
    in setup code: a few words a row, none in the streaming loops; more means registers ran out
    somewhere that matters); its static shared memory plus the default list's dynamic bytes fit a
    block of an H100 / H200 (the paired entries: two blocks with the paired list fit an SM's 228 KB,
    with the 1 KB the driver reserves a block)."""
    log = nvcc_out.log
    for entry in [*_cuda.ENTRY.values(), *_cuda.PAIRED_ENTRY.values(), *_cuda.SPLIT_ENTRY.values()]:
        part = log[log.index(f"Compiling entry function '{entry}'"):]
        part = part[:part.index("Compile time")]
        regs = int(re.search(r"Used (\d+) registers", part).group(1))
        smem = int(re.search(r"(\d+) bytes smem", part).group(1))
        assert regs <= 64, (entry, regs)
        for st, ld in re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", part):
            assert int(st) <= 128 and int(ld) <= 128, (entry, part)
        assert smem <= _cuda.STATIC_SMEM_BYTES, (entry, smem)
        assert smem + _cuda.shared_bytes(_cuda.DEFAULT_CAPACITY) <= MAX_SMEM_BLOCK, (entry, smem)
        if entry.endswith("_paired"):
            assert 2 * (smem + _cuda.shared_bytes(_cuda.PAIRED_CAPACITY) + 1024) <= 228 * 1024, (entry, smem)
        print(f"{entry}: {regs} registers, {smem} + {_cuda.shared_bytes(_cuda.DEFAULT_CAPACITY)} bytes of shared memory")


def _ptx_params(entry: str, text: str) -> list[str]:
    head = text[text.index(f".entry {entry}("):]
    return re.findall(r"\.param \.([a-z]\d+)", head[:head.index(")")])


def _ptx_type(a) -> str:
    if isinstance(a, (torch.Tensor, ctypes.c_longlong)):
        return "u64"
    return {ctypes.c_int: "u32", ctypes.c_float: "f32", ctypes.c_double: "f64"}[type(a)]


_PLANS = [  # (top_k, top_p, min_p, top_k_first, rowmap dtype, out dtype, seed / offset as tensors, per-row seed) -> entry
    (dict(top_p=0.9), "qsum"),
    (dict(top_k=50, top_p=0.9), "count"),
    (dict(min_p=0.1), "none"),
    (dict(top_k="t32", top_p="t", min_p="t", rowmap=torch.int64, out=torch.int64, seed="t", offset="t", per_row=True), "count"),
    (dict(top_k="t64", top_p=0.5, top_k_first=False, rowmap=torch.int32, seed="t"), "count"),
    (dict(top_p="t", min_p=0.2, offset="t"), "qsum"),
]


def _plan_args(num_rows=4, vocab=1000, top_k=None, top_p=None, min_p=None, top_k_first=True, rowmap=None,
               out=torch.int32, seed=7, offset=3, per_row=False):
    x = torch.rand(num_rows, vocab)
    t = lambda dtype, v: torch.full((num_rows,), v, dtype=dtype)  # noqa: E731
    kk = {"t32": t(torch.int32, 5), "t64": t(torch.int64, 5)}.get(top_k, top_k) if isinstance(top_k, str) else top_k
    pp = t(torch.float32, 0.9) if top_p == "t" else top_p
    mm = t(torch.bfloat16, 0.1) if min_p == "t" else min_p
    rm = torch.arange(num_rows, dtype=rowmap) if rowmap is not None else None
    ss = t(torch.int64, 11) if seed == "t" else seed
    oo = t(torch.int64, 2) if offset == "t" else offset
    return (x, rm, num_rows, torch.empty(num_rows, dtype=out), torch.empty(num_rows, dtype=torch.bool),
            torch.empty(num_rows), kk, pp, mm, top_k_first, ss, oo, per_row)


@needs_nvcc
@pytest.mark.parametrize("kw,entry", _PLANS, ids=[str(i) for i in range(len(_PLANS))])
def test_launch_arguments_match_the_kernel_signature(kw, entry, nvcc_out):
    """The argument list (count, width, order) against the entry's PTX parameters, and the flags
    against what was asked: a mismatch would only show as garbage on the device."""
    args = _plan_args(**kw)
    plan = _cuda.plan_launch(*args)
    assert plan.entry == _cuda.ENTRY[entry]
    assert [_ptx_type(a) for a in plan.args] == _ptx_params(plan.entry, nvcc_out.ptx)
    assert plan.block == (_cuda.THREADS,) and plan.grid == (4,)
    assert plan.shared_bytes == _cuda.shared_bytes(_cuda.DEFAULT_CAPACITY)
    assert plan.args[-1].value == _cuda.DEFAULT_CAPACITY
    flags = plan.args[-2].value
    x, rowmap, _, out, valid, logprob, top_k, top_p, min_p, tkf, seed, offset, per_row = args
    want = {
        _cuda.F_ROWMAP: rowmap is not None, _cuda.F_ROWMAP64: rowmap is not None and rowmap.dtype is torch.int64,
        _cuda.F_OUT64: out.dtype is torch.int64, _cuda.F_HAS_K: top_k is not None,
        _cuda.F_K_TENSOR: isinstance(top_k, torch.Tensor),
        _cuda.F_K64: isinstance(top_k, torch.Tensor) and top_k.dtype is torch.int64,
        _cuda.F_HAS_P: top_p is not None, _cuda.F_P_TENSOR: isinstance(top_p, torch.Tensor),
        _cuda.F_HAS_MINP: min_p is not None, _cuda.F_MINP_TENSOR: isinstance(min_p, torch.Tensor),
        _cuda.F_TOPK_FIRST: tkf, _cuda.F_SEED_TENSOR: isinstance(seed, torch.Tensor), _cuda.F_SEED_PER_ROW: per_row,
        _cuda.F_OFFSET_TENSOR: isinstance(offset, torch.Tensor),
        _cuda.F_OFFSET_PER_ROW: isinstance(offset, torch.Tensor), _cuda.F_LOGPROB: True, _cuda.F_SECTOR_MAP: True,
        _cuda.F_MAP_BINS: False,  # the default map is by exponents (SECTOR_MAP_BINS: the bin map, no faster)
        _cuda.F_PASS_B_REVERSE: True,  # pass B last chunk first (the L2 holds the tail pass A read last)
        _cuda.F_PASS_B_GATHER: True,  # pass B's sectors gathered into slots before they are loaded
        _cuda.F_PASS_A_PIPE: True,  # pass A's next loads issued before the current chunk's work
    }
    assert {f: bool(flags & f) for f in want} == want
    assert plan.args[0] is x and plan.args[2] is out and plan.args[3] is valid and plan.args[4] is logprob
    if isinstance(min_p, torch.Tensor):  # a bf16 tensor goes to the kernel as fp32
        assert plan.args[7].dtype is torch.float32 and torch.equal(plan.args[7], min_p.float())


@needs_nvcc
def test_paired_launches_match_their_entries(nvcc_out, monkeypatch):
    """Calls with one top-k of at most PAIRED_MAX_TOP_K, or top-p without top-k, over two rows an SM
    and more (PAIRED_MIN_ROWS_PER_SM; or PAIRED = True) take the paired entries: 512 threads, the
    lean layout's list and scratch (the cap argument, the scratch's KB in the flags, the shared
    bytes), the same parameter list as the PTX's. On 132 SMs (the H200) the cut is 264 rows, so the
    benchmark's B512 pairs and B128 does not. A per-row or a larger top-k and min-p alone keep the
    single blocks; LEAN_SCRATCH = False gives the classic paired list, and top-p the single blocks."""
    assert _cuda.PAIRED_MIN_ROWS_PER_SM == 2
    monkeypatch.setattr(_cuda, "_sms", {torch.device("cpu"): 132})
    for rows, want in ((1, False), (128, False), (263, False), (264, True), (512, True)):
        assert _cuda.paired(torch.device("cpu"), rows, 50, 0.9) == want, rows
        assert _cuda.paired(torch.device("cpu"), rows, None, 0.9) == want, rows
    monkeypatch.setattr(_cuda, "_sms", {torch.device("cpu"): 8})  # a 16-row cut: small plans
    for kw, kind in ((dict(top_k=50, top_p=0.9), "count"), (dict(top_p=0.9), "qsum")):
        for rows, want in ((15, False), (16, True)):
            plan = _cuda.plan_launch(*_plan_args(num_rows=rows, **kw))
            assert plan.entry == (_cuda.PAIRED_ENTRY if want else _cuda.ENTRY)[kind], rows
            scratch = _cuda.lean_scratch_bytes(1000) if want else None
            cap = (_cuda.PAIRED_SHARED_BYTES - scratch) // 8 if want else _cuda.DEFAULT_CAPACITY
            assert plan.block == ((_cuda.PAIRED_THREADS if want else _cuda.THREADS),) and plan.args[-1].value == cap
            assert (plan.args[-2].value >> _cuda.SCRATCH_KB_SHIFT) & 255 == (scratch // 1024 if want else 0)
            assert plan.shared_bytes == _cuda.shared_bytes(cap, scratch)
            assert plan.shared_bytes == (_cuda.PAIRED_SHARED_BYTES if want else _cuda.shared_bytes(cap))
            assert [_ptx_type(a) for a in plan.args] == _ptx_params(plan.entry, nvcc_out.ptx)
    for kw in (dict(min_p=0.1), dict(top_k=_cuda.PAIRED_MAX_TOP_K + 1), dict(top_k="t32", top_p=0.9)):
        assert _cuda.plan_launch(*_plan_args(num_rows=16, vocab=5000, **kw)).entry in _cuda.ENTRY.values(), kw
    monkeypatch.setattr(_cuda, "PAIRED_TOP_P", False)
    assert _cuda.plan_launch(*_plan_args(num_rows=16, top_p=0.9)).entry == _cuda.ENTRY["qsum"]
    monkeypatch.setattr(_cuda, "PAIRED_TOP_P", True)
    monkeypatch.setattr(_cuda, "LEAN_SCRATCH", False)  # the classic paired list (the session-10 entries)
    assert _cuda.plan_launch(*_plan_args(num_rows=16, top_p=0.9)).entry == _cuda.ENTRY["qsum"]
    plan = _cuda.plan_launch(*_plan_args(num_rows=16, top_k=50))
    assert plan.entry == _cuda.PAIRED_ENTRY["count"] and plan.args[-1].value == _cuda.PAIRED_CAPACITY
    assert (plan.args[-2].value >> _cuda.SCRATCH_KB_SHIFT) & 255 == 0
    assert plan.shared_bytes == _cuda.shared_bytes(_cuda.PAIRED_CAPACITY) == _cuda.PAIRED_SHARED_BYTES
    monkeypatch.setattr(_cuda, "LEAN_SCRATCH", True)
    monkeypatch.setattr(_cuda, "PAIRED", False)
    assert _cuda.plan_launch(*_plan_args(num_rows=4, top_k=5)).entry == _cuda.ENTRY["count"]
    monkeypatch.setattr(_cuda, "PAIRED", True)
    assert _cuda.plan_launch(*_plan_args(num_rows=1, min_p=0.1)).entry == _cuda.PAIRED_ENTRY["none"]


def test_lean_layout_sizes():
    """The lean layout's scratch (whole KB, >= 24 KB: pass A's 8 KB of bins and the sector map, a
    byte per 8 tokens) and the list it leaves within the paired block's shared memory, at the
    benchmark's vocabularies (napkin math: top-p 0.9 lists at V151936 are ~4.7-8.7K keys, the
    plan's bound ~4.9-9.1K: over the classic 6656, within the lean 9856), at a vocabulary whose map
    fills the scratch's maximum and beyond it (no map: 24 KB); the flag bits hold it."""
    for vocab, scratch in ((1000, 24576), (128256, 24576), (151936, 27648), (32000, 24576), (262144, 40960)):
        assert _cuda.lean_scratch_bytes(vocab) == scratch, vocab
        nq = (vocab + 3) // 4
        assert scratch >= _cuda.MAP_OFFSET_BYTES + (nq + 1) // 2  # the kernel's use_map test holds
    assert (_cuda.PAIRED_SHARED_BYTES - _cuda.lean_scratch_bytes(151936)) // 8 == 9856
    assert (_cuda.PAIRED_SHARED_BYTES - _cuda.lean_scratch_bytes(128256)) // 8 == 10240
    v_max = 8 * (_cuda.LEAN_SCRATCH_MAX - _cuda.MAP_OFFSET_BYTES) - 8  # the largest V whose map fits
    assert _cuda.lean_scratch_bytes(v_max) == _cuda.LEAN_SCRATCH_MAX
    assert _cuda.lean_scratch_bytes(v_max + 64) == _cuda.HIST_SCRATCH_BYTES
    assert _cuda.LEAN_SCRATCH_MAX // 1024 < 256  # 8 bits of the flags


def test_flags_and_constants_agree_with_the_source():
    src = cuda.source_path(_cuda.SOURCE).read_text()
    assert f"constexpr int SCRATCH_KB_SHIFT = {_cuda.SCRATCH_KB_SHIFT};" in src
    from benchmarks import profile_sampling as prof  # its reading of the profile build's marks

    assert f"constexpr int PROFILE_ROWS = {prof.PROFILE_ROWS}, PROFILE_SLOTS = {prof.PROFILE_SLOTS};" in src
    for _, a, b in prof.SPLIT_MARKS:
        assert f"MOECOMM_SAMPLE_CLOCK({b});" in src and f"MOECOMM_SAMPLE_CLOCK({a});" in src
    assert "constexpr int MAP_OFFSET = NUM_BINS * 4;" in src and _cuda.MAP_OFFSET_BYTES == 2048 * 4
    assert "constexpr int MAP_BASE_BIN = 760;" in src and (127 - 32) << 3 == 760  # the bin of 2^-32
    flags = dict(re.findall(r"(F_[A-Z0-9_]+) = 1 << (\d+)", src))
    assert {name: 1 << int(bit) for name, bit in flags.items()} == {
        name: getattr(_cuda, name) for name in flags}, flags
    assert len(flags) == 23  # bits 0-19, 28-30 (20-27: the lean scratch in KB)
    assert f"constexpr int SCRATCH_MIN_BYTES = {_cuda.HIST_SCRATCH_BYTES};" in src
    assert f"constexpr int PHILOX_ROUNDS = {ref.PHILOX_ROUNDS};" in src
    assert _cuda.THREADS == 1024 and _cuda.PAIRED_THREADS == 512
    assert "constexpr int NUM_BINS = 2048;" in src and _cuda.HIST_SCRATCH_BYTES == 2048 * (4 + 8)
    hist = {"count": "HIST_COUNT", "qsum": "HIST_QSUM", "none": "HIST_NONE"}
    for kind, entry in _cuda.ENTRY.items():
        assert f"MOECOMM_SAMPLE_ENTRY({entry}, {hist[kind]}, 1024, 1)" in src
        assert f"MOECOMM_SAMPLE_ENTRY({_cuda.PAIRED_ENTRY[kind]}, {hist[kind]}, 512, 2)" in src
    for (kind, size), entry in _cuda.SPLIT_ENTRY.items():
        assert f"MOECOMM_SAMPLE_SPLIT_ENTRY({entry}, {hist[kind]}, {size})" in src
    for entry in {*_cuda.ENTRY.values(), *_cuda.PAIRED_ENTRY.values(), *_cuda.SPLIT_ENTRY.values()}:
        guard = f"#if !defined(MOECOMM_SAMPLE_ONLY) || defined(MOECOMM_SAMPLE_ONLY_{entry})\nMOECOMM_SAMPLE_"
        assert src.count(guard) == 1, entry  # each entry alone in its own build (entry_flags)
    assert "constexpr int MAX_CLUSTER = 16;" in src and max(_cuda.SPLIT_SIZES) <= 16


def test_covers_and_capacity(monkeypatch):
    x = torch.rand(3, 100)
    base = dict(rowmap=None, num_rows=3, out=None, valid=None, logprob=None, y=None, mode=0, from_logits=False,
                top_k=None, top_p=None, min_p=None, temperature=None, top_k_first=True, seed=0, offset=0,
                per_row_seed=False)

    def covers(x=x, **kw):
        return _cuda.covers(x, **{**base, **kw})

    assert covers(top_p=0.9) and covers(top_k=5) and covers(min_p=0.1) and covers(top_k=torch.ones(3, dtype=torch.int64))
    assert covers(top_p=torch.full((3,), 0.9)) and covers(top_k=5, top_p=0.5, top_k_first=False)
    assert not covers()  # plain sampling: the Triton kernel's one-pass race
    assert not covers(top_p=1.0) and not covers(top_k=100) and not covers(min_p=0.0)  # no-ops: plain sampling
    assert covers(top_k=99) and covers(top_p=1.0, min_p=0.5)
    assert not covers(top_p=0.9, from_logits=True) and not covers(top_p=0.9, temperature=0.7)
    assert not covers(top_p=0.9, mode=1) and not covers(top_p=0.9, y=x)
    assert not covers(x.bfloat16(), top_p=0.9) and not covers(x.half(), top_p=0.9)
    assert not covers(torch.rand(100, 3).t(), top_p=0.9)  # column stride 3
    assert covers(torch.rand(3, 200)[:, ::1][:, :100], top_p=0.9)  # a row stride other than V is fine
    assert _cuda.effective_filters(7, 1.0, 0.0, 7) == (None, None, None)
    assert _cuda.shared_bytes(12288) == 196608 and _cuda.shared_bytes(8) == 64 + _cuda.HIST_SCRATCH_BYTES
    # capacity: the default on a large device, less on a small one, the override for tests
    assert _cuda.capacity(torch.device("cpu")) == _cuda.DEFAULT_CAPACITY
    dev = torch.device("cuda", 0)
    for optin, cap in ((232448, 12288), (166912, 9216), (101376, 5120), (49152, 2048)):
        monkeypatch.setitem(_cuda._optin, 0, optin)
        monkeypatch.setattr(_cuda, "_capacity", {})  # memoised per device: forget the last answer
        assert _cuda.capacity(dev) == cap, optin
        assert _cuda._capacity == {dev: cap}
        assert _cuda.device_ok(dev) == (cap >= _cuda.MIN_CAPACITY)
    monkeypatch.setattr(_cuda, "LIST_CAPACITY", 16)
    assert _cuda.capacity(dev) == 16 and _cuda.device_ok(dev)


def test_dispatch_on_cpu_never_picks_the_cuda_kernel(monkeypatch):
    """CPU tensors: the reference, or the Triton interpreter when MOECOMM_BACKEND=triton."""
    from moecomm.jit import backend

    x = torch.rand(2, 50)
    args = (None, 2, None, None, None, None, 0, False, None, 0.9, None, None, True, 0, 0, False)
    assert api._sample_kernel(backend.Impl.REFERENCE, x, args) is None
    assert api._sample_kernel(backend.Impl.TRITON, x, args) == ("triton" if backend.triton_import_error() is None else None)
    monkeypatch.setattr(api, "SAMPLE_KERNEL", "fast")
    with pytest.raises(ValueError, match=r"SAMPLE_KERNEL must be one of \('cuda', 'triton'\), got 'fast'"):
        api._sample_kernel(backend.Impl.TRITON, x, args)


# ---------------------------------------------------------------------------------------------
# the kernel's logic on the CPU (host emulation of the source)


def _same_as_reference(x, *, cap=None, threads=32, indices=None, top_k=None, top_p=None, min_p=None,
                       top_k_first=True, seed=5, offset=3, per_row_seed=False, monkeypatch=None, lag_us=0):
    """Runs the emulated kernel and the reference; asserts equal tokens, valid flags and log-probs.
    Returns the paths the rows took (sample.cu's PATH_* bits)."""
    if cap is not None:
        monkeypatch.setattr(_cuda, "LIST_CAPACITY", cap)
    out_dtype = torch.int64 if indices is not None and indices.dtype is torch.int64 else torch.int32
    num_rows = indices.shape[0] if indices is not None else x.shape[0]
    bounds = torch.full((num_rows,), -1, dtype=torch.int64)
    a, va, la, paths = emu.sample(x, indices=indices, top_k=top_k, top_p=top_p, min_p=min_p, top_k_first=top_k_first,
                                  seed=seed, offset=offset, per_row_seed=per_row_seed, out_dtype=out_dtype,
                                  threads=threads, lag_us=lag_us, bounds=bounds)
    t = lambda v: v if isinstance(v, torch.Tensor) else torch.tensor([v])  # noqa: E731
    b, vb, lb = ref.sample(x, from_logits=False, indices=indices, top_k=top_k, top_p=top_p, min_p=min_p,
                           top_k_first=top_k_first, seed=t(seed), offset=t(offset), per_row_seed=per_row_seed,
                           out_dtype=out_dtype)
    assert a.dtype == b.dtype
    assert torch.equal(va, vb), (va, vb)
    assert torch.equal(a, b), (a[a != b], b[a != b], paths[a != b])
    assert torch.equal(la.isnan(), ~vb)
    torch.testing.assert_close(la[vb], lb[vb], atol=1e-6, rtol=0)
    # the kept set the race ran over (v > 0 and K >= the row's threshold), exactly the reference's:
    # the tokens alone rarely show a boundary one token off
    rows = indices.long().clamp(0, x.shape[0] - 1) if indices is not None else torch.arange(num_rows)
    v = x.float()[rows]
    keys = (v.view(torch.int32).long() << 32) | (0xFFFFFFFF - torch.arange(v.shape[1]))
    mine = (v > 0) & (keys >= bounds[:, None])
    want = ref.kept_mask(v, top_k, top_p, min_p, top_k_first)
    assert torch.equal(mine[vb], want[vb]), (mine[vb].sum(-1), want[vb].sum(-1), paths[vb])
    return paths


EMU_CASES = [
    ("top_p", dict(top_p=0.9)), ("top_p_small", dict(top_p=0.3)), ("top_k", dict(top_k=40)),
    ("top_k_1", dict(top_k=1)), ("min_p", dict(min_p=0.05)),
    ("top_k_top_p", dict(top_k=40, top_p=0.8)), ("joint", dict(top_k=40, top_p=0.8, top_k_first=False)),
    ("top_p_min_p", dict(top_p=0.95, min_p=0.01)), ("top_k_min_p", dict(top_k=300, min_p=0.02)),
    ("all_three", dict(top_k=200, top_p=0.9, min_p=0.005)), ("top_p_0.99", dict(top_p=0.99)),
]


@needs_gxx
@pytest.mark.parametrize("name,kw", EMU_CASES, ids=[c[0] for c in EMU_CASES])
def test_emulated_kernel_matches_reference(name, kw, monkeypatch):
    """16 draws from one distribution (V = 2500: not a multiple of the block's loads) and 5 distinct
    rows (V = 333) through indices: every token, valid flag and log-prob as the reference's."""
    p = _probs(1, 2500, seed=3)
    paths = _same_as_reference(p, indices=torch.zeros(16, dtype=torch.int32), **kw)
    assert bool(((paths & ~(16 | 128)) == 1).all()), paths  # the list in shared memory holds every kept set here
    if set(kw) == {"top_p"}:  # top-p selects on its uncertain bins only
        assert bool((paths & 16).any()), paths
    _same_as_reference(_probs(5, 333, seed=4), seed=9, offset=2**33 + 5, **kw)


@needs_gxx
@pytest.mark.parametrize("split", [1, 8])
def test_emulated_window_select_by_sub_bins(split, monkeypatch):
    """top-p's window of uncertain bins cut by its sub-bins (sample.cu's window_select: exact counts,
    q-sum mass bounds, the keys above the uncertain sub-bins summed, the rest to small_select;
    PATH_SUB_BINS = 128 seen) on windows of over 64 keys: V 40000 at logits x 3, rows of 1500 tokens
    within 5% of each other (a window of one pass-A bin, ~15 keys a sub-bin; one of them in ties of
    ~50 equal values), with min-p,
    on one block a row and on split rows (rank 0's gather list): the reference's tokens, valid flags
    and log-probs."""
    monkeypatch.setattr(_cuda, "SPLIT", split)
    seen = 0
    g = torch.Generator().manual_seed(13)
    # 1500 tokens within 5% of 1 (one pass-A bin, ~100 sub-bins; the others spread over 1e-8 .. 1e-6), and ties
    dense = 1e-6 * 10.0 ** (-2.0 * torch.rand(2, 40000, generator=g))
    dense[:, :1500] = 1.0 + 0.05 * torch.rand(2, 1500, generator=g)
    dense[1, :1500] = torch.round(dense[1, :1500] * 4000) / 4000  # ~50 tokens a value
    dense = dense[:, torch.randperm(40000, generator=g)]
    for x, kw in ((_probs(2, 40000, seed=11), dict(top_p=0.9)), (dense, dict(top_p=0.5)), (dense, dict(top_p=0.93)),
                  (_probs(1, 40000, seed=14), dict(top_p=0.95, min_p=0.001))):
        paths = _same_as_reference(x, threads=64, seed=6, **kw)
        seen |= functools.reduce(lambda a, b: a | b, paths.tolist())
    assert seen & 128, seen
    # per-row top_p (fp32) just below and just above the mass before each of 8 tokens near the 0.9
    # point (p * S within an fp32 step of it): each sub-bin's mass bounds straddle such a p, where
    # only the exact sums decide, so "certainly kept / dropped" by the wrong bound moves the boundary
    x = _probs(1, 40000, seed=11)
    vs = torch.sort(x[0].double(), descending=True).values
    before, total = torch.cumsum(vs, 0) - vs, float(vs.sum())
    at = int(torch.searchsorted(before, 0.9 * total))
    ps = []
    for d in range(-4, 4):
        m = float(before[at + d])
        p = torch.tensor(m / total, dtype=torch.float32)
        while float(p) * total >= m:
            p = torch.nextafter(p, torch.tensor(0.0))
        ps += [p, torch.nextafter(p, torch.tensor(1.0))]  # P just below m (the token dropped), just above (kept)
    _same_as_reference(x, threads=64, seed=7, indices=torch.zeros(len(ps), dtype=torch.int32), top_p=torch.stack(ps))


FALLBACK_CASES = [
    dict(top_p=0.9), dict(top_p=0.99), dict(top_p=0.5, min_p=0.02), dict(top_k=50), dict(top_k=300, top_p=0.9),
    dict(top_k=300, top_p=0.9, top_k_first=False), dict(min_p=0.01), dict(top_k=2000, top_p=0.95, min_p=0.001),
]


@needs_gxx
@pytest.mark.parametrize("cap", [8, 64, 256])
def test_emulated_fallback_paths(cap, monkeypatch):
    """A small list capacity forces the fallbacks: top-p's window of uncertain bins, the radix
    levels over the row, the race over the row. Same tokens as the reference on each; together the
    capacities take every path."""
    p = _probs(1, 3000, seed=5)
    idx = torch.zeros(4, dtype=torch.int32)
    seen = 0
    for kw in FALLBACK_CASES:
        paths = _same_as_reference(p, indices=idx, cap=cap, monkeypatch=monkeypatch, seed=21, **kw)
        for v in paths.tolist():
            seen |= v
    want = {8: 2 | 4 | 8, 64: 1 | 2 | 4 | 8, 256: 1 | 2 | 8}[cap]
    assert seen & want == want, (cap, seen)


@needs_gxx
def test_emulated_ties_and_flat_rows(monkeypatch):
    """All-equal rows (top-k keeps the lowest indices; top-p the shortest prefix), rows of a few
    distinct values, one non-zero value, a vocabulary of 1 and 3; with a small capacity the ties go
    through the radix levels' index digits."""
    vocab = 1000
    rows = torch.zeros(6, vocab)
    rows[0] = 1.0  # flat
    rows[1, ::3] = 0.5  # two values
    rows[1, 1::3] = 0.25
    rows[2, [10, 20, 30]] = 0.3  # three equal maxima and a smaller one
    rows[2, 40] = 0.1
    rows[3, 777] = 2.0  # one non-zero token
    rows[4] = torch.arange(vocab) % 4 + 1.0  # four values, repeating
    rows[5, :500] = 1e-3
    for cap in (None, 16):
        for kw in (dict(top_k=1), dict(top_k=7), dict(top_p=0.5), dict(top_k=50, top_p=0.3), dict(min_p=1.0),
                   dict(top_k=600, top_p=0.999, top_k_first=False), dict(top_p=0.001), dict(min_p=0.3, top_p=0.7)):
            _same_as_reference(rows, cap=cap, monkeypatch=monkeypatch, seed=2, **kw)
    a, *_ = emu.sample(rows[:1].expand(8, -1).contiguous(), top_k=4, seed=1)
    assert bool((a < 4).all())  # flat row, top-k 4: the four lowest indices
    for v in (1, 3):
        _same_as_reference(_probs(4, v, seed=6), top_k=2, top_p=0.6)


@needs_gxx
@pytest.mark.parametrize("mode", ["off", "bins"])
def test_emulated_without_the_sector_map(mode, monkeypatch):
    """SECTOR_MAP = False (pass B reads the whole row; with SECTOR_MAP_BINS on too: no map, no bins
    flag), or the map of bins instead of the default's exponents (SECTOR_MAP_BINS = True): the same
    tokens, and the list holds every kept set (a bin map's map_min one bin too high leaves holes that
    top-p 0.3 sends to the exact fallback: only the path shows them); the flags say which."""
    if mode == "off":
        monkeypatch.setattr(_cuda, "SECTOR_MAP", False)
    monkeypatch.setattr(_cuda, "SECTOR_MAP_BINS", True)
    p = _probs(1, 2500, seed=3)
    flags = _cuda.plan_launch(*_plan_args(top_p=0.9)).args[-2].value
    assert bool(flags & _cuda.F_SECTOR_MAP) == bool(flags & _cuda.F_MAP_BINS) == (mode != "off")
    for kw in (dict(top_p=0.9), dict(top_p=0.3), dict(top_k=40, top_p=0.8), dict(min_p=0.05)):
        paths = _same_as_reference(p, indices=torch.zeros(8, dtype=torch.int32), **kw)
        assert bool(((paths & ~(16 | 128)) == 1).all()), (kw, paths)


@needs_gxx
def test_emulated_bin_map_at_its_clamps(monkeypatch):
    """The map of bins (SECTOR_MAP_BINS = True, the control) around its clamps: rows whose values
    straddle b0's binade (listed and skipped sectors in one binade), rows below 2^-32 (byte 0: b0
    below the base loads every sector), rows near and above 1 (byte 255); same tokens as the
    reference, and as the map of exponents (the default)."""
    monkeypatch.setattr(_cuda, "SECTOR_MAP_BINS", True)
    g = torch.Generator().manual_seed(8)
    base = torch.rand(3000, generator=g) + 1.0  # one binade, [1, 2): eight bins
    rows = torch.stack([base * 2.0**-10, base * 2.0**-40, base * 2.0**-1, base * 4.0])
    for kw in (dict(top_p=0.3), dict(top_k=100), dict(min_p=0.8)):
        _same_as_reference(rows, threads=64, **kw)
    # (a map_min one bin too high is caught by test_emulated_without_the_sector_map[bins]: most
    # such holes in the list only send the row to the fallback, which is exact)
    monkeypatch.setattr(_cuda, "SECTOR_MAP_BINS", False)
    _same_as_reference(rows, threads=64, top_p=0.3)


@needs_gxx
def test_emulated_scalar_path_and_odd_strides():
    """Rows that are not 16-byte aligned (a row stride of V + 1, a view starting one element in)
    take the scalar loads; vocabularies not a multiple of 4 end in a partial quad."""
    base = _probs(5, 1302, seed=7)
    for view in (base[:, :1001], base[:, 1:1302], base[:, 3:1302:1][:, :1298]):
        assert view.stride(1) == 1 and (view.stride(0) % 4 != 0 or view.data_ptr() % 16 != 0)
        for kw in (dict(top_p=0.9), dict(top_k=30, top_p=0.9), dict(min_p=0.05)):
            _same_as_reference(view, **kw)


@needs_gxx
def test_emulated_bad_rows_parameters_and_indices():
    """NaN, +inf, a negative value, an all-zero row: invalid (token 0, logprob NaN); per-row
    parameters out of range and indices out of [0, R) likewise; the other rows are sampled."""
    p = _probs(6, 300, seed=9)
    p[1, 3] = float("nan")
    p[2, 5] = float("inf")
    p[3, 7] = -0.5
    p[4] = 0.0
    for kw in (dict(top_p=0.9), dict(top_k=5), dict(min_p=0.1), dict(top_k=5, top_p=0.9)):
        _same_as_reference(p, **kw)
    q = _probs(4, 300, seed=10)
    _same_as_reference(q, top_k=torch.tensor([5, 0, 5, -1]), top_p=torch.tensor([0.9, 0.9, 1.5, 0.9]))
    _same_as_reference(q, top_p=torch.tensor([0.5, 0.0, float("nan"), 1.0]), min_p=torch.tensor([0.1, 0.1, 0.1, -0.1]))
    _same_as_reference(q, min_p=torch.tensor([0.0, 1.5, float("nan"), 1.0]))
    _same_as_reference(q, top_p=0.9, indices=torch.tensor([0, 9, -1, 3], dtype=torch.int32))


@needs_gxx
def test_emulated_per_row_tensors_seeds_and_indices():
    """Per-row top-k (int32 and int64, some >= V), top-p (some 1.0), min-p; indices with repeats
    (int64 indices: int64 tokens); one seed per row (the row left out of the counter) and per-row
    offsets; seeds and offsets beyond 32 bits."""
    p = _probs(4, 700, seed=11)
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([3, 0, 0, 2, 3, 1, 1, 1], dtype=torch.int64)
    k32 = torch.tensor([1, 5, 700, 50, 2, 9, 10_000, 3], dtype=torch.int32)
    tp = torch.tensor([0.9, 1.0, 0.5, 0.2, 0.99, 0.7, 1.0, 0.95])
    mp = torch.rand(8, generator=g) * 0.1
    seeds = torch.randint(-2**62, 2**62, (8,), generator=g)
    offs = torch.randint(0, 2**40, (8,), generator=g)
    _same_as_reference(p, indices=idx, top_k=k32, top_p=tp)
    _same_as_reference(p, indices=idx, top_k=k32.long(), top_p=tp, top_k_first=False, min_p=mp)
    _same_as_reference(p, indices=idx, top_p=tp, min_p=mp, seed=seeds, offset=offs, per_row_seed=True)
    _same_as_reference(p, indices=idx, min_p=mp, seed=torch.tensor([-3]), offset=torch.tensor([2**35 + 1]))
    # a per-row seed: a row's token depends on its own seed, not on its slot or its neighbours
    a, *_ = emu.sample(p, indices=idx, top_p=0.9, seed=seeds, offset=0, per_row_seed=True)
    b, *_ = emu.sample(p, indices=idx.flip(0), top_p=0.9, seed=seeds.flip(0), offset=0, per_row_seed=True)
    assert torch.equal(a, b.flip(0))


@needs_gxx
def test_emulated_unnormalised_and_tiny_values(monkeypatch):
    """Rows that do not sum to 1 (x 1e6, x 1e-30: the bins' scale and the fp64 sums), and
    subnormal probabilities (the bins below 2^-126), on the list and through the fallbacks."""
    p = _probs(3, 800, seed=12)
    rows = torch.cat([p * 1e6, p * 1e-30, torch.where(p > p.median(), p, p * 1e-38)])
    for cap in (None, 32):
        for kw in (dict(top_p=0.9), dict(top_k=20, top_p=0.8), dict(min_p=0.001), dict(top_p=0.999)):
            _same_as_reference(rows, cap=cap, monkeypatch=monkeypatch, **kw)


@needs_gxx
def test_emulated_long_lists_radix_levels_then_cuts():
    """Lists longer than small_select takes (2048 keys): a radix level over the list, then its
    bucket finished by cuts in place; and lists just above and below 32 and 64 keys (the warp's sort)."""
    p = _probs(2, 40000, seed=14)
    for kw in (dict(top_k=3000), dict(top_k=2500, top_p=0.95), dict(top_p=0.999), dict(top_k=33), dict(top_k=32), dict(top_k=63), dict(top_k=65, top_p=0.95),
               dict(top_k=31, top_p=0.9)):
        paths = _same_as_reference(p, threads=128, **kw)
        assert bool((paths & 1).all()) or "top_k" not in kw, (kw, paths)  # top-p 0.999 overflows to the window


@needs_gxx
def test_emulated_short_lists_in_one_warp_at_both_spans():
    """small_select's one-warp pick at <= 32 keys, on keys spanning 24 binades (the widest where an
    fp64 sum of 32 fp32 values is exact in any order) and 25. Rows of 32 powers of two over 24 and
    over 25 binades (shuffled, under 300 smaller values), cut by top-k inside the 32 and by top-p at
    each prefix's mass and just past it: every kept set and token as the reference's."""
    g = torch.Generator().manual_seed(21)
    rows = []
    for span in (24, 25):
        e = torch.linspace(0, span, 32).round()
        e[-1] = span
        head = torch.pow(2.0, -e)
        tail = torch.rand(300, generator=g) * 2.0 ** -(span + 2)
        row = torch.cat([head, tail])
        rows.append(row[torch.randperm(row.numel(), generator=g)])
    x = torch.stack(rows)
    for k in (1, 2, 17, 31, 32):
        _same_as_reference(x, threads=64, top_k=k)
    total = x.double().sum(-1)
    for j in (1, 2, 5, 20, 30):
        before = torch.pow(2.0, -torch.linspace(0, 24, 32).round()[:j].double()).sum() / total[0]
        for p in (float(before), float(before) * (1 + 1e-6)):
            _same_as_reference(x, threads=64, top_p=p, top_k=32)
            _same_as_reference(x, threads=64, top_p=p)


@needs_gxx
def test_emulated_negative_zeros_are_zeros(monkeypatch):
    """-0.0 entries (sign bit set: a float-bits compare that ignores the sign would list them above
    every positive token) are zeros: never drawn, not counted; on the list and through the fallbacks."""
    p = _probs(2, 900, seed=13)
    p[:, ::2] = -0.0
    for cap in (None, 16):
        for kw in (dict(top_p=0.9), dict(top_k=30), dict(top_k=30, top_p=0.8), dict(min_p=0.01)):
            _same_as_reference(p, cap=cap, monkeypatch=monkeypatch, **kw)


@needs_gxx
def test_emulated_with_thread_0_running_ahead(monkeypatch):
    """After every __syncthreads the other threads wait 100 us: a shared variable that thread 0
    rewrites (a counter reset, the next level's digit counts) before they have read it shows as
    wrong tokens or a deadlock (seen when list_select lost its trailing barrier). Every path once."""
    p = _probs(1, 2000, seed=14)
    idx = torch.zeros(2, dtype=torch.int32)
    for cap, kw in ((None, dict(top_k=40, top_p=0.8)), (None, dict(top_p=0.9)), (None, dict(top_p=0.9, min_p=0.01)),
                    (64, dict(top_p=0.95)),
                    (8, dict(top_k=300, top_p=0.9)), (8, dict(min_p=0.02))):
        _same_as_reference(p, indices=idx, cap=cap, monkeypatch=monkeypatch, lag_us=100, **kw)


@needs_gxx
def test_emulated_full_block_of_1024_threads(monkeypatch):
    """The block sizes the GPU runs (1024, and 512 for the paired entries; the other emulated tests
    use 64 threads: the kernel takes any multiple of 32), on the list and on the radix levels."""
    p = _probs(1, 5000, seed=13)
    for threads in (1024, 512):
        _same_as_reference(p, threads=threads, top_k=50, top_p=0.9)
        _same_as_reference(p, threads=threads, cap=64, monkeypatch=monkeypatch, top_p=0.95)


def _list_and_window(row, top_p):
    """(list size, uncertain-bin window size) of the top-p plan of sample.cu for one fp32 row: the
    bins >= the highest bin whose first token is certainly dropped, and those of them <= the lowest
    bin whose first token is certainly kept (pass A's q-sum bounds, as the kernel computes them)."""
    bits = row.contiguous().view(torch.int32).long()
    pos = bits > 0
    b = bits >> 20
    q = ((bits >> 11) & 0xFFF) | 0x1000
    qs = torch.zeros(2048, dtype=torch.float64).index_add_(0, b[pos], q[pos].double())
    ar = torch.arange(2048)
    scale = torch.pow(2.0, (torch.clamp(ar >> 3, min=1) - 139).double())
    lo = torch.where(ar >= 8, qs * scale, torch.zeros_like(qs))
    hi = (qs + torch.floor(qs / (4096 + 512 * (ar & 7)).double())) * scale
    P = top_p * row.double().sum()
    above_lo = lo.flip(0).cumsum(0).flip(0) - lo  # the bounds of the mass of the bins above
    above_hi = hi.flip(0).cumsum(0).flip(0) - hi
    dropped, kept = ar[(qs > 0) & (above_lo >= P)], ar[(qs > 0) & (above_hi < P)]
    wlo = int(dropped.max()) if dropped.numel() else 0
    whi = int(kept.min()) if kept.numel() else 2047
    return int((pos & (b >= wlo)).sum()), int((pos & (b >= wlo) & (b <= whi)).sum())


@needs_gxx
def test_emulated_lean_layout_lists_longer_than_the_scratch(monkeypatch):
    """The paired entries' lean layout (PAIRED forced; at V 8000 a 24 KB scratch of 3072 keys
    beside a list of 10240): top-p 0.9 lists of ~3.5K keys (logits x 1.5), more than the scratch holds, selected
    on their uncertain bins (the list path, split); a row whose window is the whole list (values
    within one bin) and a top-k list longer than the scratch: the fallback, on the scratch's
    capacity. Same tokens as the reference on each, and as the classic layout's."""
    monkeypatch.setattr(_cuda, "PAIRED", True)
    vocab = 8000
    p = _probs(2, vocab, scale=1.5, seed=21)
    scap = _cuda.lean_scratch_bytes(vocab) // 8
    plan = _cuda.plan_launch(p, None, 2, torch.empty(2, dtype=torch.int32), torch.empty(2, dtype=torch.bool), None,
                             None, 0.9, None, True, 1, 0, False)
    assert plan.entry == _cuda.PAIRED_ENTRY["qsum"] and plan.args[-1].value == 10240 and scap == 3072
    for r in range(2):  # the case this layout is for: a list longer than the scratch, a short window
        n, nw = _list_and_window(p[r], 0.9)
        assert scap < n <= 10240 and 0 < 2 * nw <= scap, (n, nw)
    paths = _same_as_reference(p, threads=64, top_p=0.9, seed=3)
    assert bool(((paths & ~128) == (1 | 16)).all()), paths  # the list, split (by sub-bins): no fallback
    flat = 1.0 + torch.rand(1, 8000, generator=torch.Generator().manual_seed(2)) * 1e-3  # one bin: window = list
    assert _list_and_window(flat[0], 0.5)[1] == 8000
    paths = _same_as_reference(flat, threads=64, top_p=0.5, seed=4)
    assert bool((paths & 4).all()) and not bool((paths & 1).any()), paths  # the radix levels over the row
    paths = _same_as_reference(p[:1], threads=64, top_k=3500, top_p=0.95, seed=5)  # top_k_first's list > scap
    assert bool((paths & 4).all()), paths
    monkeypatch.setattr(_cuda, "LEAN_SCRATCH", False)  # the classic paired list: the same tokens
    paths = _same_as_reference(p, threads=64, top_p=0.9, seed=3)


@needs_nvcc
def test_split_plan_and_its_cluster_entries(nvcc_out, monkeypatch):
    """Split rows (a row over a cluster of 8 blocks): by the batch on a device with clusters, at most
    SPLIT_MAX_BLOCKS / 8 = 16 rows, calls with a top-k or a top-p (not min-p alone), never where
    PAIRED is forced; SPLIT forces a size (1: off). The launch: rows x 8 blocks of 1024 threads, the
    single block's list and scratch, the entry's PTX parameters and its cluster shape in the PTX."""
    dev = torch.device("cuda", 0)
    monkeypatch.setitem(_cuda._cluster_ok, dev, True)
    assert _cuda.SPLIT is None and _cuda.SPLIT_SIZES == (8,) and _cuda.SPLIT_MAX_BLOCKS == 96
    for rows, want in ((1, 8), (7, 8), (12, 8), (13, 1), (128, 1)):
        assert _cuda.split_blocks(dev, rows, None, 0.9) == want, rows
        assert _cuda.split_blocks(dev, rows, 50, 0.9) == want and _cuda.split_blocks(dev, rows, 50, None) == want
    assert _cuda.split_blocks(dev, 1, None, None) == 1  # min-p alone
    assert _cuda.split_blocks(torch.device("cpu"), 1, None, 0.9) == 1  # no clusters: the host emulation
    monkeypatch.setitem(_cuda._cluster_ok, dev, False)  # compute capability < 9
    assert _cuda.split_blocks(dev, 1, None, 0.9) == 1
    monkeypatch.setitem(_cuda._cluster_ok, dev, True)
    monkeypatch.setattr(_cuda, "PAIRED", True)
    assert _cuda.split_blocks(dev, 1, None, 0.9) == 1
    monkeypatch.setattr(_cuda, "PAIRED", None)
    monkeypatch.setattr(_cuda, "SPLIT", 1)
    assert _cuda.split_blocks(dev, 1, None, 0.9) == 1
    monkeypatch.setattr(_cuda, "SPLIT", 8)
    assert _cuda.split_blocks(torch.device("cpu"), 300, 50, None) == 8
    for kw, kind in _PLANS:
        plan = _cuda.plan_launch(*_plan_args(num_rows=3, **kw))
        if kind == "none":
            assert plan.entry == _cuda.ENTRY["none"] and plan.grid == (3,)
            continue
        assert plan.entry == _cuda.SPLIT_ENTRY[kind, 8] and _cuda.cluster_of(plan.entry) == 8
        assert plan.grid == (24,) and plan.block == (1024,) and plan.args[-1].value == _cuda.DEFAULT_CAPACITY
        # SPLIT_SLICE: the slice (V1000: 250 quads, 32 a block) after a 32 KB scratch, no sector map
        f = plan.args[-2].value
        assert f & _cuda.F_SPLIT_SLICE and not f & _cuda.F_SECTOR_MAP and (f >> _cuda.SCRATCH_KB_SHIFT) & 255 == 32
        assert plan.shared_bytes == _cuda.shared_bytes(_cuda.DEFAULT_CAPACITY, 32 * 1024) + 32 * 16
        assert [_ptx_type(a) for a in plan.args] == _ptx_params(plan.entry, nvcc_out.ptx)
        head = nvcc_out.ptx[nvcc_out.ptx.index(f".entry {plan.entry}("):]
        assert re.search(r"\.reqnctapercluster\s+8,\s*1,\s*1", head[:head.index("{")]), plan.entry
    assert _cuda.cluster_of(_cuda.ENTRY["qsum"]) == _cuda.cluster_of(_cuda.PAIRED_ENTRY["qsum"]) == 1
    monkeypatch.setattr(_cuda, "SPLIT_SLICE", False)  # the control: the single block's layout and the map
    plan = _cuda.plan_launch(*_plan_args(num_rows=3, top_p=0.9))
    assert plan.shared_bytes == _cuda.shared_bytes(_cuda.DEFAULT_CAPACITY) and plan.args[-2].value & _cuda.F_SECTOR_MAP
    assert not plan.args[-2].value & _cuda.F_SPLIT_SLICE


def test_split_slice_layout_sizes():
    """A split block's slice (sample.cu's chunk: ceil(quads / 8) rounded up to 32 quads) and the layout
    it fits in: V128256 at 8 blocks 63 KB beside the whole 12288-key list and the 32 KB scratch in an
    H200's 227 KB; V256000 (125 KB) with the list cut to 7168 keys (a block lists its slice's tokens
    only); a slice that leaves less than MIN_CAPACITY keys goes without (None)."""
    cpu = torch.device("cpu")
    assert _cuda.split_slice_bytes(128256, 8) == 16 * 4032 and _cuda.split_slice_bytes(1000, 8) == 16 * 32
    assert _cuda.split_slice_layout(cpu, 128256, 8, 12288) == 12288
    assert _cuda.split_slice_layout(cpu, 256000, 8, 12288) == 7168
    assert _cuda.split_slice_layout(cpu, 400000, 8, 12288) is None
    assert _cuda.split_slice_layout(cpu, 128256, 8, 64) == 64  # a test's small capacity stays
    for vocab in (128256, 256000):
        cap = _cuda.split_slice_layout(cpu, vocab, 8, 12288)
        total = _cuda.shared_bytes(cap, _cuda.SPLIT_SLICE_SCRATCH) + _cuda.split_slice_bytes(vocab, 8)
        assert total + _cuda.STATIC_SMEM_BYTES <= 227 * 1024, vocab


def test_paired_top_p_keeps_the_sector_map_by_default(monkeypatch):
    """Top-p alone on the paired entries writes and reads the sector map (PAIRED_TOP_P_SECTOR_MAP =
    True: ~2% faster at B512 on the H200 since pass B gathers its sectors); False leaves it out there
    only: top-k + top-p on the paired entries and top-p on single blocks keep it."""
    assert _cuda.PAIRED_TOP_P_SECTOR_MAP is True
    monkeypatch.setattr(_cuda, "PAIRED", True)
    flags = lambda **kw: _cuda.plan_launch(*_plan_args(**kw)).args[-2].value  # noqa: E731
    assert flags(top_p=0.9) & _cuda.F_SECTOR_MAP and flags(top_k=50, top_p=0.9) & _cuda.F_SECTOR_MAP
    monkeypatch.setattr(_cuda, "PAIRED_TOP_P_SECTOR_MAP", False)
    assert not flags(top_p=0.9) & _cuda.F_SECTOR_MAP and flags(top_k=50, top_p=0.9) & _cuda.F_SECTOR_MAP
    monkeypatch.setattr(_cuda, "PAIRED", False)
    assert flags(top_p=0.9) & _cuda.F_SECTOR_MAP


@needs_gxx
@pytest.mark.parametrize("split", [1, 8])
def test_emulated_pass_b_directions_and_gathered_sectors(split, monkeypatch):
    """PASS_B_REVERSE (pass B's chunks last to first), PASS_B_GATHER (the sectors to load gathered
    into a warp's 64 slots first; one block a row only) and PASS_A_PIPE (pass A's next chunk loaded
    before the current one's work), each on (the defaults) and off: the
    reference's tokens, valid flags and log-probs on the list path, on rows of several chunks whose
    last is short (32 threads: 512 tokens a chunk; V 2500, and V 1301 whose last sector holds one
    quad), with and without the sector map, top-p (~40% of the sectors loaded) and top-k + top-p
    (a few), on one block a row and on split rows (each block's slice backwards)."""
    assert _cuda.PASS_B_REVERSE is True and _cuda.PASS_B_GATHER is True and _cuda.PASS_A_PIPE is True
    monkeypatch.setattr(_cuda, "SPLIT", split)
    for rev, gather, pipe in ((True, True, True), (False, True, False), (True, False, False), (False, False, True)):
        monkeypatch.setattr(_cuda, "PASS_B_REVERSE", rev)
        monkeypatch.setattr(_cuda, "PASS_B_GATHER", gather)
        monkeypatch.setattr(_cuda, "PASS_A_PIPE", pipe)
        flags = _cuda.plan_launch(*_plan_args(top_p=0.9)).args[-2].value
        assert bool(flags & _cuda.F_PASS_B_REVERSE) == rev and bool(flags & _cuda.F_PASS_B_GATHER) == gather
        assert bool(flags & _cuda.F_PASS_A_PIPE) == pipe
        for sector_map in (True, False) if rev and gather else (True,):  # the map off: the loop over fixed quads
            monkeypatch.setattr(_cuda, "SECTOR_MAP", sector_map)
            for kw in (dict(top_p=0.9), dict(top_k=40, top_p=0.8)):
                paths = _same_as_reference(_probs(2, 2500, seed=3), threads=32, seed=4, **kw)
                assert bool(((paths & 1) == 1).all()), (rev, kw, paths)  # the list path, where pass B runs
            _same_as_reference(_probs(3, 1301, seed=8), seed=2, top_p=0.95)
            _same_as_reference(_probs(2, 1301, seed=9), threads=64, seed=3, top_k=3)


SPLIT_CASES = [  # (the CPU suite's budget: ~2-4 s each)
    ("top_p", dict(top_p=0.9)), ("joint", dict(top_k=40, top_p=0.8, top_k_first=False)),
    ("top_p_min_p", dict(top_p=0.95, min_p=0.01)),
]


@needs_gxx
@pytest.mark.parametrize("name,kw", SPLIT_CASES, ids=[c[0] for c in SPLIT_CASES])
def test_emulated_split_rows_match_reference(name, kw, monkeypatch):
    """SPLIT = 8: each row over a cluster of 8 emulated blocks at once (distributed shared memory
    between library copies), V = 2500 (slices of 32-quad multiples, the last one short): the
    reference's tokens, valid flags and log-probs, on the cluster's list path (top-p: its window
    gathered into rank 0)."""
    monkeypatch.setattr(_cuda, "SPLIT", 8)
    p = _probs(2, 2500, seed=3)
    paths = _same_as_reference(p, threads=32, seed=4, **kw)
    assert bool(((paths & ~(16 | 128)) == (32 | 1)).all()), paths
    if set(kw) == {"top_p"}:
        assert bool((paths & 16).all()), paths  # the window gathered, the bins above summed


@needs_gxx
@pytest.mark.parametrize("split", [1, 8])
def test_emulated_pass_a_candidates(split, monkeypatch):
    """_cuda.PASS_A_LIST on (top-p's candidates listed during pass A, sample.cu's pass_a_list): the
    reference's tokens, valid flags and log-probs on one block a row and on split rows, where the
    candidates cover the plan's bins (PATH_PASS_A = 64: seen) and where a small capacity overflows
    them (pass B or the fallbacks, as before)."""
    monkeypatch.setattr(_cuda, "PASS_A_LIST", True)
    monkeypatch.setattr(_cuda, "SPLIT", split)
    seen = 0
    for kw in (dict(top_p=0.9), dict(top_p=0.3), dict(top_p=0.99), dict(top_p=0.95, min_p=0.01)):
        paths = _same_as_reference(_probs(2, 2500, seed=3), threads=32, seed=4, **kw)
        seen |= int(paths[0]) | int(paths[1])
        _same_as_reference(_probs(3, 333, seed=4), seed=9, offset=2**33 + 5, **kw)
    assert seen & 64, seen
    for cap in (8, 64):
        _same_as_reference(_probs(1, 3000, seed=5), cap=cap, monkeypatch=monkeypatch, seed=21, top_p=0.9)


@needs_gxx
def test_emulated_split_rows_fallbacks_edges_and_races(monkeypatch):
    """The split rows where the lists do not settle it (small capacities: rank 0's fallback over the
    whole row, then every block races its slice from HBM), bad rows and parameters, tiny vocabularies
    (blocks with empty slices), per-row tensors, and thread 0 of every block running ahead."""
    monkeypatch.setattr(_cuda, "SPLIT", 8)
    p = _probs(1, 3000, seed=5)
    for split_slice in (True, False):  # the slice in shared memory (the default) and read from HBM
        monkeypatch.setattr(_cuda, "SPLIT_SLICE", split_slice)
        seen = 0
        for cap, kw in ((8, dict(top_p=0.9)), (8, dict(top_k=300, top_p=0.9)), (64, dict(top_p=0.99))):
            paths = _same_as_reference(p, cap=cap, monkeypatch=monkeypatch, seed=21, **kw)
            seen |= int(paths[0])
        assert seen & (32 | 2 | 4 | 8) == 32 | 2 | 4 | 8, (split_slice, seen)
        _same_as_reference(_probs(2, 2500, seed=3), threads=32, seed=4, top_p=0.9)
    monkeypatch.setattr(_cuda, "SPLIT_SLICE", True)
    monkeypatch.setattr(_cuda, "LIST_CAPACITY", None)
    bad = _probs(4, 700, seed=9)
    bad[1, 3] = float("nan")
    bad[2] = 0.0
    _same_as_reference(bad, top_k=torch.tensor([5, 5, 5, 0]), top_p=torch.tensor([0.9, 0.5, 0.9, 0.9]), seed=2)
    _same_as_reference(_probs(2, 3, seed=6), top_k=2, top_p=0.6)
    _same_as_reference(_probs(1, 1500, seed=7), top_p=0.9, lag_us=100, seed=8)


# ---------------------------------------------------------------------------------------------
# GPU: the compiled kernel


def _gpu_probs(rows, vocab, scale=3.0, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    return torch.softmax(torch.randn(rows, vocab, device="cuda", generator=g) * scale, -1)


@pytest.fixture
def on_cuda_kernel(monkeypatch):
    """Kernels (not the reference), the CUDA kernel for the calls it covers; counts its launches."""
    assert cuda.toolchain_error() is None, cuda.toolchain_error()
    monkeypatch.setattr(api, "SAMPLE_KERNEL", "cuda")
    calls = []
    real = _cuda.launch_sample
    monkeypatch.setattr(_cuda, "launch_sample", lambda *a, **k: (calls.append(a[2]), real(*a, **k))[1])
    return calls


def _kernel_vs_reference(fn, *args, **kwargs):
    from _sampling_helpers import both

    return both(fn, *args, **kwargs)


def _kept_with_margin(v, top_k=None, top_p=None, min_p=None, top_k_first=True, rel=1e-5):
    """The reference's kept set, widened by a relative margin on the mass and min-p thresholds (a
    token at the boundary within fp rounding counts as kept)."""
    wide_p = None if top_p is None else (torch.clamp(top_p * (1 + rel), max=1.0) if isinstance(top_p, torch.Tensor)
                                         else min(1.0, top_p * (1 + rel)))
    wide_m = None if min_p is None else min_p * (1 - rel)
    return ref.kept_mask(v, top_k, wide_p, wide_m, top_k_first)


def _check_rows(a, b, va, vb, x_rows, kw, what):
    mismatch = int((a != b).sum())
    agree = 1 - mismatch / a.numel()
    print(f"{what}: {agree:.4f} of {a.numel()} rows equal to the reference")
    assert torch.equal(va, vb), what
    assert mismatch <= max(1, int(0.005 * a.numel())), what  # >= 99.5% (one row may differ at small B)
    keep = _kept_with_margin(x_rows, kw.get("top_k"), kw.get("top_p"), kw.get("min_p"), kw.get("top_k_first", True))
    inside = keep.gather(1, a.long()[:, None])[:, 0]
    assert bool(inside[va].all()), f"{what}: a token outside the kept set"


GPU_CASES = [
    ("top_p", dict(top_p=0.9)), ("top_p_0.5", dict(top_p=0.5)), ("top_p_0.99", dict(top_p=0.99)),
    ("top_k", dict(top_k=50)), ("top_k_1", dict(top_k=1)), ("top_k_top_p", dict(top_k=50, top_p=0.9)),
    ("joint", dict(top_k=50, top_p=0.9, top_k_first=False)), ("top_k_2000_top_p", dict(top_k=2000, top_p=0.95)),
    ("min_p", dict(min_p=0.1)), ("min_p_small", dict(min_p=0.001)), ("top_p_min_p", dict(top_p=0.95, min_p=0.01)),
    ("top_k_min_p", dict(top_k=100, min_p=0.05)), ("per_row", "per_row"), ("indices_per_row_seed", "indices"),
]


def _gpu_case(kw, batch):
    """(kwargs for S.sample, the rows of probs each output row samples from)."""
    g = torch.Generator(device="cuda").manual_seed(batch)
    if kw == "per_row":
        k = torch.randint(1, 3000, (batch,), device="cuda", generator=g)
        tp = torch.rand(batch, device="cuda", generator=g) * 0.7 + 0.3
        tp[::3] = 1.0
        mp = torch.rand(batch, device="cuda", generator=g) * 0.05
        return dict(top_k=k.int(), top_p=tp, min_p=mp), None
    if kw == "indices":
        idx = torch.randint(0, 4, (batch,), device="cuda", generator=g)
        seeds = torch.randint(-2**62, 2**62, (batch,), device="cuda", generator=g)
        return dict(top_p=0.9, top_k=100, indices=idx, seed=seeds, offset=torch.tensor([7], device="cuda")), idx
    return dict(kw), None


def _gpu_sample_case(kw, batch, vocab, probs_seed, seed):
    """(a call of S.sample for one of GPU_CASES, the probs, the rows each output samples, the filters)."""
    p = _gpu_probs(4 if kw == "indices" else batch, vocab, seed=probs_seed)
    kwargs, idx = _gpu_case(kw, batch)
    kwargs.setdefault("seed", seed)
    filt = {k: v for k, v in kwargs.items() if k in ("top_k", "top_p", "min_p", "top_k_first")}
    order = "top_k_first" if filt.pop("top_k_first", True) else "joint"
    run = lambda: S.sample(probs=p, **{k: v for k, v in kwargs.items() if k != "top_k_first"},  # noqa: E731
                           filter_apply_order=order, return_logprobs=True)
    return run, p, idx, {**filt, "top_k_first": order == "top_k_first"}


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 7, 128])
@pytest.mark.parametrize("name,kw", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_kernel_matches_reference_large_vocab(name, kw, batch, on_cuda_kernel):
    run, p, idx, filt = _gpu_sample_case(kw, batch, 128256, batch + 1, 7)
    a, b = _kernel_vs_reference(run)
    assert len(on_cuda_kernel) == 1, "the CUDA kernel did not run"
    rows = p[idx] if idx is not None else p
    _check_rows(a.tokens, b.tokens, a.valid, b.valid, rows, filt, f"{name} B{batch}")
    same = a.tokens == b.tokens
    torch.testing.assert_close(a.logprobs[same], b.logprobs[same], atol=1e-5, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "classic"])
@pytest.mark.parametrize("name,kw", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_paired_blocks_match_the_reference_and_the_single_blocks(name, kw, lean, on_cuda_kernel, monkeypatch):
    """The paired entries (512 threads, two an SM, the smaller list; its lean layout and the
    classic one) forced at B 64: the reference's tokens, and the same tokens as the 1024-thread
    entries (the draw depends on the row and the seed, not on the block size or the layout)."""
    batch = 64
    monkeypatch.setattr(_cuda, "LEAN_SCRATCH", lean)
    run, p, idx, filt = _gpu_sample_case(kw, batch, 151936, batch + 5, 11)
    monkeypatch.setattr(_cuda, "PAIRED", False)
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    single = run()
    monkeypatch.setattr(_cuda, "PAIRED", True)
    a, b = _kernel_vs_reference(run)
    assert len(on_cuda_kernel) == 2, "the CUDA kernel did not run"
    rows = p[idx] if idx is not None else p
    _check_rows(a.tokens, b.tokens, a.valid, b.valid, rows, filt, f"{name} paired B{batch}")
    assert torch.equal(a.tokens, single.tokens) and torch.equal(a.valid, single.valid), name
    torch.testing.assert_close(a.logprobs, single.logprobs, atol=1e-6, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,vocab", [(1, 128256), (16, 128256), (3, 151936)])
@pytest.mark.parametrize("name,kw", GPU_CASES, ids=[c[0] for c in GPU_CASES])
def test_split_rows_match_the_reference_and_the_single_blocks(name, kw, batch, vocab, on_cuda_kernel, monkeypatch):
    """Rows split over a cluster of 8 blocks (the default at B1 and B3 on the H200; SPLIT = 8 forces
    it, at B16 too: two waves of clusters): the reference's tokens, and the same tokens, valid flags
    and log-probs as one block a row (SPLIT = 1): the draw depends on the row and the seed, not on
    who streams which slice."""
    assert _cuda.split_blocks(torch.device("cuda"), batch, 50, 0.9) == (8 if batch <= 12 else 1)
    run, p, idx, filt = _gpu_sample_case(kw, batch, vocab, batch + 3, 19)
    monkeypatch.setattr(_cuda, "SPLIT", 1)
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    single = run()
    monkeypatch.setattr(_cuda, "SPLIT", 8)
    a, b = _kernel_vs_reference(run)
    assert len(on_cuda_kernel) == 2, "the CUDA kernel did not run"
    rows = p[idx] if idx is not None else p
    _check_rows(a.tokens, b.tokens, a.valid, b.valid, rows, filt, f"{name} split B{batch} V{vocab}")
    assert torch.equal(a.tokens, single.tokens) and torch.equal(a.valid, single.valid), name
    torch.testing.assert_close(a.logprobs, single.logprobs, atol=1e-6, rtol=0, equal_nan=True)


@pytest.mark.gpu
def test_split_rows_fallbacks_and_bad_rows(on_cuda_kernel, monkeypatch):
    """Split rows with a small list capacity (rank 0's fallback over the whole row, the race over
    every block's slice) and with bad rows: the reference's tokens and valid flags."""
    monkeypatch.setattr(_cuda, "SPLIT", 8)
    p = _gpu_probs(4, 128256, seed=23)
    p[1, 3] = float("nan")
    p[2] = 0.0
    for cap in (None, 64, 2048):
        monkeypatch.setattr(_cuda, "LIST_CAPACITY", cap)
        for kw in (dict(top_p=0.9), dict(top_p=0.99), dict(top_k=50), dict(top_k=3000, top_p=0.9),
                   dict(top_p=0.6, min_p=0.001)):
            run = lambda: S.sample(probs=p, **kw, seed=5)  # noqa: E731
            a, b = _kernel_vs_reference(run)
            assert a.valid.tolist() == [True, False, False, True]
            _check_rows(a.tokens, b.tokens, a.valid, b.valid, p, kw, f"split cap {cap} {kw}")


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [151936, 128256])
def test_top_p_takes_the_lean_paired_blocks_over_many_rows(vocab, on_cuda_kernel, monkeypatch):
    """Top-p alone over PAIRED_MIN_ROWS_PER_SM rows an SM (the cut: 264 rows on the H200) picks the
    lean paired entries by itself, one row fewer does not: the reference's tokens and the single
    blocks' (PAIRED = False), on rows whose lists (~5-9K keys at V151936) outgrow the classic
    paired list."""
    import math

    batch = math.ceil(torch.cuda.get_device_properties(0).multi_processor_count * _cuda.PAIRED_MIN_ROWS_PER_SM)
    p = _gpu_probs(batch, vocab, seed=17)
    assert _cuda.paired(p.device, batch, None, 0.9) and not _cuda.paired(p.device, batch - 1, None, 0.9)
    run = lambda: S.sample(probs=p, top_p=0.9, seed=13, return_logprobs=True)  # noqa: E731
    a, b = _kernel_vs_reference(run)
    _check_rows(a.tokens, b.tokens, a.valid, b.valid, p, dict(top_p=0.9), f"top-p lean paired B{batch} V{vocab}")
    monkeypatch.setattr(_cuda, "PAIRED", False)
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    single = run()
    assert torch.equal(a.tokens, single.tokens) and torch.equal(a.valid, single.valid)
    torch.testing.assert_close(a.logprobs, single.logprobs, atol=1e-6, rtol=0)
    assert len(on_cuda_kernel) == 2


@pytest.mark.gpu
def test_ties_flat_rows_and_odd_vocabularies(on_cuda_kernel):
    """Flat rows at V = 128256 (the list cannot hold a top-k boundary inside 128256 equal values:
    the radix levels over the row run on the index digits), rows of a few values, V not a multiple
    of 4 and rows not 16-byte aligned (scalar loads)."""
    vocab = 128256
    rows = torch.zeros(7, vocab, device="cuda")
    rows[0] = 1.0
    rows[1, ::3] = 0.5
    rows[1, 1::3] = 0.25
    rows[2, [10, 20, 30]] = 0.3
    rows[3, 100_000] = 1.0
    rows[4] = (torch.arange(vocab, device="cuda") % 5 + 1).float()
    rows[5, :60_000] = 1.0
    rows[6] = _gpu_probs(1, vocab, seed=5)[0]
    base = torch.zeros(7, vocab + 4, device="cuda")
    base[:, 1:vocab + 1] = rows
    odd = base[:, 1:vocab]  # V = 128255, rows start one element in
    for x in (rows, odd):
        for kw in (dict(top_k=1), dict(top_k=50), dict(top_p=0.5), dict(top_k=50, top_p=0.3), dict(min_p=1.0),
                   dict(top_p=0.9, min_p=0.5), dict(top_k=70_000, top_p=0.99, top_k_first=False)):
            order = "top_k_first" if kw.pop("top_k_first", True) else "joint"
            run = lambda: S.sample(probs=x, **kw, filter_apply_order=order, seed=3, return_logprobs=True)  # noqa: E731
            a, b = _kernel_vs_reference(run)
            _check_rows(a.tokens, b.tokens, a.valid, b.valid, x, {**kw, "top_k_first": order == "top_k_first"},
                        f"ties {kw} V{x.shape[1]}")
    assert len(on_cuda_kernel) == 14
    a = S.top_k_sampling_from_probs(rows[:1].expand(64, -1), 4, seed=1)
    assert bool((a < 4).all())  # a flat row's top 4 are its four lowest indices


@pytest.mark.gpu
def test_bad_rows_parameters_and_indices(on_cuda_kernel):
    p = _gpu_probs(6, 128256, seed=9)
    p[1, 3] = float("nan")
    p[2, 5] = float("inf")
    p[3, 7] = -0.5
    p[4] = 0.0
    for fn, args in ((S.top_p_sampling_from_probs, (0.9,)), (S.top_k_sampling_from_probs, (5,)),
                     (S.min_p_sampling_from_probs, (0.1,)), (S.top_k_top_p_sampling_from_probs, (5, 0.9))):
        (a, va), (b, vb) = _kernel_vs_reference(fn, p, *args, seed=4, return_valid=True)
        assert va.tolist() == [True, False, False, False, False, True] and torch.equal(va, vb)
        assert torch.equal(a, b)
    q = _gpu_probs(4, 128256, seed=10)
    out = S.sample(probs=q, top_k=torch.tensor([5, 0, 5, -1], device="cuda"),
                   top_p=torch.tensor([0.9, 0.9, 1.5, 0.9], device="cuda"), seed=1, return_logprobs=True)
    assert out.valid.tolist() == [True, False, False, False] and out.tokens[1:].tolist() == [0, 0, 0]
    assert bool(out.logprobs[1:].isnan().all()) and not bool(out.logprobs[0].isnan())
    (a, va), (b, vb) = _kernel_vs_reference(S.top_p_sampling_from_probs, q, 0.9, seed=1, return_valid=True,
                                            indices=torch.tensor([0, 9, -1, 3], device="cuda", dtype=torch.int32))
    assert va.tolist() == [True, False, False, True] and torch.equal(a, b)
    assert len(on_cuda_kernel) == 6


@pytest.mark.gpu
@pytest.mark.parametrize("cap", [64, 2048])
def test_fallback_paths_forced(cap, on_cuda_kernel, monkeypatch):
    """A small list capacity at V = 128256: top-p's window of uncertain bins, the radix levels over
    the row and the race over the row do the work the list does by default."""
    monkeypatch.setattr(_cuda, "LIST_CAPACITY", cap)
    p = _gpu_probs(16, 128256, seed=11)
    for kw in (dict(top_p=0.9), dict(top_p=0.99), dict(top_k=50), dict(top_k=3000, top_p=0.9),
               dict(top_k=3000, top_p=0.9, top_k_first=False), dict(min_p=0.01), dict(top_p=0.6, min_p=0.001)):
        order = "top_k_first" if kw.pop("top_k_first", True) else "joint"
        run = lambda: S.sample(probs=p, **kw, filter_apply_order=order, seed=5)  # noqa: E731
        a, b = _kernel_vs_reference(run)
        _check_rows(a.tokens, b.tokens, a.valid, b.valid, p, {**kw, "top_k_first": order == "top_k_first"},
                    f"cap {cap} {kw}")


@pytest.mark.gpu
def test_cuda_graph_fresh_numbers_per_replay_and_no_sync(on_cuda_kernel):
    """Captured with seed / offset tensors (and per-row seeds) and with the default generator: each
    replay reads them on the device; the eager calls never sync the host."""
    p = _gpu_probs(8, 128256, seed=2)
    seed = torch.tensor([5], device="cuda")
    seeds = torch.arange(8, device="cuda") * 1000 + 1
    offset = torch.tensor([0], device="cuda")
    k = torch.full((8,), 50, device="cuda", dtype=torch.int32)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:  # compiled and loaded here, outside the capture; and no host sync in the calls
        S.top_k_top_p_sampling_from_probs(p, k, 0.9, seed=seed, offset=offset)
        S.top_p_sampling_from_probs(p, 0.9)
        S.min_p_sampling_from_probs(p, 0.05, seed=seeds, offset=offset)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    g1, g2, g3 = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
    with torch.cuda.graph(g1):
        out_default = S.top_p_sampling_from_probs(p, 0.9)
    with torch.cuda.graph(g2):
        out_seeded = S.top_k_top_p_sampling_from_probs(p, k, 0.9, seed=seed, offset=offset)
    with torch.cuda.graph(g3):
        out_rows = S.min_p_sampling_from_probs(p, 0.05, seed=seeds, offset=offset)
    draws, seeded, per_row = [], [], []
    for i in range(6):
        for g in (g1, g2, g3):
            g.replay()
        draws.append(out_default.clone())
        seeded.append(out_seeded.clone())
        per_row.append(out_rows.clone())
        if i % 2 == 1:
            offset += 1  # the caller advances the offset: fresh numbers at the next replay
    torch.cuda.synchronize()
    assert len({tuple(d.tolist()) for d in draws}) > 1, "the default generator gave the same tokens every replay"
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[1], seeded[2])
    assert torch.equal(per_row[2], per_row[3]) and not torch.equal(per_row[3], per_row[4])
    want = S.top_k_top_p_sampling_from_probs(p, k, 0.9, seed=5, offset=2)
    assert torch.equal(seeded[4], want)
    assert len(on_cuda_kernel) == 7  # 3 eager, 3 captured, 1 eager: the replays launch from the graphs


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 128])
def test_cuda_graph_programmatic_launch_after_the_drawn_seed(batch, on_cuda_kernel, monkeypatch):
    """The default seed under capture (torch.randint, then the kernel launched programmatically
    with PDL on: split rows at B1, one block a row at B128): each replay after the same manual_seed
    draws the tokens of the same graph captured with plain launches, and the tokens change from one
    seed to the next; both top-p and top-k + top-p."""
    if not _cuda.programmatic_ok(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs sm_90 or later")
    p = _gpu_probs(batch, 128256, seed=3)
    calls = (lambda: S.top_p_sampling_from_probs(p, 0.9), lambda: S.top_k_top_p_sampling_from_probs(p, 50, 0.9))
    for call in calls:
        call()  # compiled and loaded outside the capture
        torch.cuda.synchronize()
        graphs, outs = {}, {}
        for pdl in (True, False):
            monkeypatch.setattr(_cuda, "PDL", pdl)
            graphs[pdl] = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graphs[pdl]):
                outs[pdl] = call()
        got = {True: [], False: []}
        for s in (11, 12, 13):
            for pdl in (True, False):
                torch.cuda.manual_seed(s)
                graphs[pdl].replay()
                got[pdl].append(outs[pdl].clone())
        torch.cuda.synchronize()
        for a, b in zip(got[True], got[False]):
            assert torch.equal(a, b)
        assert len({tuple(t.tolist()) for t in got[True]}) > 1, "the same tokens for three seeds"


@pytest.mark.gpu
def test_dispatch_cuda_for_covered_calls_triton_for_the_rest(monkeypatch):
    """With SAMPLE_KERNEL = "cuda" the covered calls launch sample.cu and nothing else does; with
    "triton" none does."""
    from moecomm.sampling import _triton

    seen = []
    real_c, real_t = _cuda.launch_sample, _triton.launch_sample
    monkeypatch.setattr(_cuda, "launch_sample", lambda *a, **k: (seen.append("cuda"), real_c(*a, **k))[1])
    monkeypatch.setattr(_triton, "launch_sample", lambda *a: (seen.append("triton"), real_t(*a))[1])
    p = _gpu_probs(4, 1000)
    calls = [
        (lambda: S.top_p_sampling_from_probs(p, 0.9), "cuda"),
        (lambda: S.top_k_top_p_sampling_from_probs(p, 5, 0.9), "cuda"),
        (lambda: S.min_p_sampling_from_probs(p, 0.1), "cuda"),
        (lambda: S.sampling_from_probs(p), "triton"),
        (lambda: S.top_p_sampling_from_probs(p, 1.0), "triton"),
        (lambda: S.top_p_sampling_from_probs(p.bfloat16(), 0.9), "triton"),
        (lambda: S.top_k_top_p_sampling_from_logits(torch.log(p), 5, 0.9), "triton"),
        (lambda: S.top_p_renorm_probs(p, 0.9), "triton"),
    ]
    for kernel in ("cuda", "triton"):
        monkeypatch.setattr(api, "SAMPLE_KERNEL", kernel)
        for call, want in calls:
            seen.clear()
            call()
            assert seen == [want if kernel == "cuda" else "triton"], (kernel, want, seen)
