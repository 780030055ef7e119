"""The IPC all-reduce (moecomm.allreduce: CustomAllReduce, VirtualAllReduce; kernels/allreduce/
{oneshot,twoshot,rmsnorm}.cu). CPU: the sources compile for sm_90a, the buffer layout agrees with
sync.cuh, thresholds, grid sizes, references, error messages and argument checks. GPU (virtual
ranks on one GPU, one launch for all W): exact on small-integer payloads at W 1/2/4/8, sizes up to
8 MB with odd tails, every dtype, one-shot and two-shot, outputs NaN-prefilled, bit-identical across
ranks; fused residual + RMSNorm against the reference; CUDA-graph capture and replay with fresh
inputs, registered (the one-shot reads the captured inputs in place) and staged; a rank that never
launches makes check() name it within the timeout."""

# W = world_size, n = elements per rank.

from __future__ import annotations

import ctypes
import re
import subprocess
import time

import pytest
import torch

from moecomm.allreduce import Algo, AllReduceTimeoutError, CustomAllReduce, VirtualAllReduce, layout
from moecomm.allreduce.engine import check_sizes, timeout_message
from moecomm.allreduce.reference import all_reduce_reference, residual_rmsnorm_reference
from moecomm.errors import MoeCommError, MoeCommValueError
from moecomm.jit import cuda

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SOURCES = ("allreduce/oneshot.cu", "allreduce/twoshot.cu", "allreduce/rmsnorm.cu")


# --------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("source", SOURCES)
def test_sources_compile_for_sm90a(source, tmp_path, monkeypatch):
    if cuda.compile_error():
        pytest.skip(cuda.compile_error())
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path))
    c = cuda.compile(source)
    assert c.compiled and c.arch == "sm_90a" and c.path.stat().st_size > 0
    names = {"oneshot": ["moecomm_ar_oneshot_"], "twoshot": ["moecomm_ar_twoshot_"],
             "rmsnorm": ["moecomm_ar_rmsnorm_", "moecomm_ar_rmsnorm_twoshot_"]}
    blob = c.path.read_bytes()
    for prefix in names[c.path.name.split("-")[0]]:
        for suffix in ("bf16", "fp16", "fp32"):
            assert (prefix + suffix).encode() in blob


def test_layout_constants_agree_with_the_header():
    text = (cuda.kernels_dir() / "allreduce" / "sync.cuh").read_text()
    got = {m[0]: int(m[1]) for m in re.findall(r"constexpr (?:int|long long) ([A-Z_]+) = (\d+);", text)}
    for name in ("MAX_PEERS", "MAX_BLOCKS", "COUNTERS_OFFSET", "FLAGS_OFFSET", "HEADER_BYTES", "ERR_WORDS", "THREADS",
                 "INV_OFFSET", "MAX_NORM_ROWS"):
        assert got[name] == getattr(layout, name), name
    assert re.search(r"PHASE_START = 0, PHASE_MID = 1, PHASE_END = 2", text)
    flags_end = layout.FLAGS_OFFSET + 4 * layout.NUM_PHASES * layout.MAX_BLOCKS * layout.MAX_PEERS
    assert layout.COUNTERS_OFFSET + 4 * layout.MAX_BLOCKS <= layout.FLAGS_OFFSET and flags_end <= layout.HEADER_BYTES
    # the two-shot RMSNorm's 1/rms slots sit between the flags and the staging
    assert flags_end <= layout.INV_OFFSET and layout.INV_OFFSET + 4 * layout.MAX_NORM_ROWS <= layout.HEADER_BYTES
    assert layout.HEADER_BYTES % 128 == 0 and layout.buffer_bytes(1000) == layout.HEADER_BYTES + 1024
    # the peer-pointer table of the kernels is reduce.cu's size too
    assert "constexpr int MAX_PEERS = 32;" in (cuda.kernels_dir() / "allreduce" / "reduce.cu").read_text()


def test_thresholds_per_world_size_and_overrides(monkeypatch):
    monkeypatch.delenv("MOECOMM_ALLREDUCE_ONESHOT_BYTES", raising=False)
    assert [layout.default_oneshot_max(w) for w in (2, 3, 4, 5, 8)] == [512 << 10] * 3 + [256 << 10] * 2
    assert layout.choose_algo(512 << 10, 512 << 10, 8 << 20) is Algo.ONESHOT
    assert layout.choose_algo((512 << 10) + 2, 512 << 10, 8 << 20) is Algo.TWOSHOT
    assert layout.choose_algo(8 << 20, 512 << 10, 8 << 20) is Algo.TWOSHOT
    assert layout.choose_algo((8 << 20) + 2, 512 << 10, 8 << 20) is Algo.NCCL
    assert layout.choose_algo(4096, 1 << 20, 2048) is Algo.NCCL  # never one-shot past the buffer
    monkeypatch.setenv("MOECOMM_ALLREDUCE_ONESHOT_BYTES", "65536")
    assert layout.default_oneshot_max(8) == 65536 and layout.default_oneshot_max(2) == 65536
    monkeypatch.setenv("MOECOMM_ALLREDUCE_ONESHOT_BYTES", "lots")
    with pytest.raises(ValueError, match="MOECOMM_ALLREDUCE_ONESHOT_BYTES must be an integer >= 0, got 'lots'"):
        layout.default_oneshot_max(2)


def test_grid_is_a_function_of_the_sizes_only():
    # one-shot: a thread per 16-byte pack; 8 KB of bf16 = 512 packs = 1 block; capped
    assert layout.grid_blocks(Algo.ONESHOT, 4096, 2, 8, 16) == 1
    assert layout.grid_blocks(Algo.ONESHOT, 4096 + 1, 2, 8, 16) == 2
    assert layout.grid_blocks(Algo.ONESHOT, 1 << 22, 2, 8, 16) == 16
    # two-shot: a shard of the full packs; 8 ranks x 512 packs -> 1 block
    assert layout.grid_blocks(Algo.TWOSHOT, 8 * 4096, 2, 8, 16) == 1
    assert layout.grid_blocks(Algo.TWOSHOT, 3, 2, 8, 16) == 1  # no full pack: the tail alone
    assert layout.grid_blocks(Algo.ONESHOT, 7 * 4096, 2, 8, 300, rows=7) == 7
    # two-shot RMSNorm: a block per row of one shard, ceil(rows / W)
    assert layout.grid_blocks(Algo.TWOSHOT, 128 * 7168, 2, 8, 16, rows=128) == 16
    assert layout.grid_blocks(Algo.TWOSHOT, 129 * 7168, 2, 8, 300, rows=129) == 17
    assert layout.grid_blocks(Algo.TWOSHOT, 3 * 7168, 2, 8, 16, rows=3) == 1
    assert layout.grid_blocks(Algo.ONESHOT, 10 ** 9, 4, 2, 1000) == layout.MAX_BLOCKS


def _ptx_params(source: str, entry: str, tmp_path) -> list[str]:
    ptx = tmp_path / "k.ptx"
    subprocess.run([cuda._nvcc(), "-arch=sm_90a", "-ptx", "-std=c++17", "-o", str(ptx),
                    str(cuda.kernels_dir() / source)], check=True, capture_output=True)
    text = ptx.read_text()
    head = text[text.index(f".entry {entry}("):]
    return re.findall(r"\.param \.([a-z]\d+)", head[:head.index(")")])


def _ctype(a) -> str:
    if isinstance(a, (torch.Tensor, ctypes.c_void_p, ctypes.c_longlong)):
        return "u64"
    return {ctypes.c_int: "u32", ctypes.c_float: "f32"}[type(a)]


@pytest.mark.parametrize("which", ("oneshot", "twoshot", "rmsnorm", "rmsnorm_twoshot"))
def test_launch_arguments_match_the_kernel_signatures(which, tmp_path, monkeypatch):
    """The wrappers pass exactly the kernels' parameters (count and width), with and without the
    in-kernel staging copy: a mismatch would launch with garbage arguments on the GPU."""
    if cuda._nvcc() is None:
        pytest.skip("no nvcc")
    from moecomm.allreduce import _ipc

    calls = []

    class Recorder:
        def __call__(self, grid, block, args):
            calls.append((grid, block, list(args)))

    picked = []
    monkeypatch.setattr(_ipc, "kernel", lambda w, dtype, device: picked.append(w[1] + _ipc._SUFFIX[dtype]) or Recorder())
    t = torch.zeros(64, dtype=torch.bfloat16)
    ptrs, err = torch.zeros(4, dtype=torch.int64), torch.zeros(16, dtype=torch.int32)
    for src in (None, t):
        if which in ("oneshot", "twoshot"):
            algo = Algo.ONESHOT if which == "oneshot" else Algo.TWOSHOT
            _ipc.launch_allreduce(algo, ptrs, 4, 0, 4, t, 16, 16, err, 10, 8, stage_src=src, stage_stride=16)
        else:
            algo = Algo.ONESHOT if which == "rmsnorm" else Algo.TWOSHOT
            _ipc.launch_rmsnorm(algo, ptrs, 4, 0, 4, src, t, t, t, 16, t[:8], 2, 8, 1e-6, err, 10, 8)
    entry = picked[0]
    assert entry == {"oneshot": "moecomm_ar_oneshot_bf16", "twoshot": "moecomm_ar_twoshot_bf16",
                     "rmsnorm": "moecomm_ar_rmsnorm_bf16", "rmsnorm_twoshot": "moecomm_ar_rmsnorm_twoshot_bf16"}[which]
    source = "allreduce/rmsnorm.cu" if which.startswith("rmsnorm") else f"allreduce/{which}.cu"
    want = _ptx_params(source, entry, tmp_path)
    for grid, block, args in calls:
        assert [_ctype(a) for a in args] == want, (which, args)
        assert block == (layout.THREADS,) and grid[1] == 4


def test_references():
    xs = [torch.tensor([1.0, 256.0, -0.0], dtype=torch.bfloat16), torch.tensor([2.0, 1.0, -0.0], dtype=torch.bfloat16),
          torch.tensor([3.0, 1.0, -0.0], dtype=torch.bfloat16)]
    got = all_reduce_reference(xs)
    assert got.shape == (3, 3) and got[:, 1].tolist() == [258.0] * 3 and torch.signbit(got[:, 2]).all()
    g = torch.Generator().manual_seed(0)
    s = torch.randn(5, 64, generator=g, dtype=torch.float64)
    res = torch.randn(5, 64, generator=g, dtype=torch.float64)
    w = torch.rand(64, generator=g, dtype=torch.float64) + 0.5
    out, new_res = residual_rmsnorm_reference(s, res, w, 1e-6)
    r = s + res
    assert torch.equal(new_res, r)
    assert torch.allclose(out, r / torch.sqrt((r * r).mean(-1, keepdim=True) + 1e-6) * w, rtol=1e-12, atol=1e-12)
    o16, r16 = residual_rmsnorm_reference(s.bfloat16(), res.bfloat16(), w.bfloat16(), 1e-6)
    assert torch.equal(r16, (s.bfloat16().float() + res.bfloat16().float()).bfloat16())


def test_timeout_message_names_the_missing_rank():
    assert timeout_message("op", [[0, 0, 0, 0], [0, 0, 0, 1]], [0, 1], 0.5) is None
    msg = timeout_message("moecomm.allreduce.X.all_reduce", [[0, 0, 0, 0], [4, 2, 3, 1]], [0, 1], 0.5)
    assert msg.startswith("moecomm.allreduce.X.all_reduce: rank 3 did not arrive within the timeout of 0.5 s "
                          "(the end barrier, seen by rank 1 in block 3)")


def test_arguments_are_checked():
    op = "moecomm.allreduce.CustomAllReduce"
    with pytest.raises(MoeCommValueError, match="max_size must be an int >= 16 and a multiple of 16"):
        check_sizes(op, 1000 + 1, None, 1.0, None)
    with pytest.raises(MoeCommValueError, match="oneshot_max_bytes must be None or an int >= 0, got -1"):
        check_sizes(op, 1024, -1, 1.0, None)
    with pytest.raises(MoeCommValueError, match="timeout_s must be a number of seconds > 0, got 0"):
        check_sizes(op, 1024, None, 0, None)
    with pytest.raises(MoeCommValueError, match=r"max_blocks must be None or an int in \[1, 256\], got 0"):
        check_sizes(op, 1024, None, 1.0, 0)
    import torch.distributed as dist

    if not dist.is_initialized():
        with pytest.raises(MoeCommValueError, match="CustomAllReduce: needs an initialised process group"):
            CustomAllReduce()


# --------------------------------------------------------------------------- GPU (virtual ranks)


def _int_inputs(world_size, n, dtype, device):
    # rank r's input encodes r and the position; every partial sum is a small integer (|x| <= 13 * W),
    # exact in bf16/fp16/fp32, so a missed, doubled or misplaced peer element shows as a wrong value
    i = torch.arange(n, device=device)
    return torch.stack([((i * 7 + r) % 13 - 6 + r).to(dtype) for r in range(world_size)])


def _run(ar, xs, algo):
    """Stage, then launch into a NaN-prefilled output: unwritten elements fail the comparison."""
    W, n = xs.shape[0], xs[0].numel()
    pack = layout.pack_elems(xs.element_size())
    stride = -(-n // pack) * pack
    store = torch.full((W, stride), float("nan"), dtype=xs.dtype, device=xs.device)
    ar.stage(xs)
    ar.launch_staged(algo, n, store, stride)
    torch.cuda.synchronize()
    ar.check()
    return store[:, :n]


@pytest.fixture(scope="module")
def dev():
    return torch.device("cuda", torch.cuda.current_device())


SIZES_BYTES = (2, 14, 4096, 65536 + 6, (1 << 20) + 10, (3 << 20) + 2, (8 << 20) - 6)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", (1, 2, 4, 8))
@pytest.mark.parametrize("algo", (Algo.ONESHOT, Algo.TWOSHOT))
def test_exact_on_integer_payloads(world_size, algo, dev):
    with VirtualAllReduce(world_size, max_size=8 << 20, device=dev, timeout_s=10.0) as ar:
        for dtype in DTYPES:
            for nbytes in SIZES_BYTES:
                n = max(1, nbytes // torch.tensor([], dtype=dtype).element_size())
                xs = _int_inputs(world_size, n, dtype, dev)
                got = _run(ar, xs, algo)
                want = xs.float().sum(0).to(dtype)
                for r in range(world_size):
                    assert torch.equal(got[r], want), (dtype, n, r, algo)


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", (1, 2, 4, 8))
@pytest.mark.parametrize("algo", (Algo.ONESHOT, Algo.TWOSHOT))
def test_the_kernel_stages_its_own_input(world_size, algo, dev, monkeypatch):
    """The public call on one [W, n] tensor copies the inputs into the staging inside the kernel:
    no host copy (Engine.stage is made to fail), exact on integer payloads with odd tails (a padded
    [W, stride][:, :n] view, so every rank's slice is aligned), and the staging holds the input after
    a one-shot call (it was NaN-filled before)."""
    with VirtualAllReduce(world_size, max_size=8 << 20, device=dev, timeout_s=10.0) as ar:
        monkeypatch.setattr(ar._e, "stage", lambda *a: pytest.fail("the host staged an input"))
        for dtype in DTYPES:
            e = torch.tensor([], dtype=dtype).element_size()
            pack = layout.pack_elems(e)
            for nbytes in SIZES_BYTES:
                n = max(1, nbytes // e)
                padded = torch.full((world_size, -(-n // pack) * pack), float("nan"), dtype=dtype, device=dev)
                xs = padded[:, :n]
                xs.copy_(_int_inputs(world_size, n, dtype, dev))
                for st in ar._e.staging:
                    st.fill_(255)  # bf16/fp16 NaN bits; fp32 NaN too
                got = ar.all_reduce(xs, algo=algo)
                torch.cuda.synchronize()
                ar.check()
                want = xs.float().sum(0).to(dtype)
                for r in range(world_size):
                    assert torch.equal(got[r], want), (dtype, n, r)
                    if algo is Algo.ONESHOT:
                        assert torch.equal(ar._e.staging[r][:n * e].view(dtype), xs[r]), (dtype, n, r)
    # a list of tensors still works, through host copies
    with VirtualAllReduce(2, max_size=1 << 20, device=dev, timeout_s=10.0) as ar:
        xs = _int_inputs(2, 1001, torch.float16, dev)
        got = ar.all_reduce(list(xs), algo=algo)
        torch.cuda.synchronize()
        assert all(torch.equal(got[r], xs.float().sum(0).half()) for r in range(2))


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", (2, 8))
def test_random_payloads_bit_identical_across_ranks_and_paths(world_size, dev):
    g = torch.Generator(device="cpu").manual_seed(world_size)
    with VirtualAllReduce(world_size, max_size=1 << 20, device=dev, timeout_s=10.0) as ar:
        for dtype in DTYPES:
            for n in (1, 33, 4099, 100003):
                xs = torch.randn(world_size, n, generator=g).to(dtype).to(dev)
                want = all_reduce_reference(list(xs))  # rank order, fp32: the kernels' exact bits
                one, two = _run(ar, xs, Algo.ONESHOT), _run(ar, xs, Algo.TWOSHOT)
                assert torch.equal(one, want) and torch.equal(two, want), (dtype, n)
                # the public call picks by size and returns [W, *shape]
                out = ar.all_reduce(xs.view(world_size, 1, n))
                torch.cuda.synchronize()
                assert out.shape == (world_size, 1, n) and torch.equal(out.view(world_size, n), want)


@pytest.mark.gpu
def test_calls_back_to_back_advance_the_epochs(dev):
    """Many calls of both paths and the fused kernel, alternating grids, without a sync between them:
    the epochs must agree and the staging must not be overwritten while a peer reads it."""
    W = 4
    with VirtualAllReduce(W, max_size=2 << 20, device=dev, timeout_s=10.0) as ar:
        outs, wants = [], []
        for j in range(40):
            n = (j * 7919) % (1 << 19) + 1
            xs = _int_inputs(W, n, torch.bfloat16, dev) + j % 3
            outs.append(ar.all_reduce(xs, algo=Algo.ONESHOT if j % 2 else Algo.TWOSHOT))
            wants.append(xs.float().sum(0).bfloat16())
        # fused calls of both variants between all-reduces, still without a sync
        g = torch.Generator(device="cpu").manual_seed(3)
        fused = []
        for j in range(12):
            rows = 1 + (j * 5) % 23
            xs = torch.randn(W, rows, 512, generator=g).bfloat16().to(dev)
            res = torch.randn(1, rows, 512, generator=g).bfloat16().to(dev).expand(W, -1, -1).contiguous()
            w = (torch.rand(512, generator=g) + 0.5).bfloat16().to(dev)
            got = ar.all_reduce_residual_rmsnorm(xs, res, w, 1e-6, algo=Algo.TWOSHOT if j % 2 else Algo.ONESHOT)
            fused.append((got, xs, res, w))
            n = (j * 104729) % (1 << 18) + 1
            x2 = _int_inputs(W, n, torch.bfloat16, dev) - j % 5
            outs.append(ar.all_reduce(x2, algo=Algo.ONESHOT if j % 3 else Algo.TWOSHOT))
            wants.append(x2.float().sum(0).bfloat16())
        torch.cuda.synchronize()
        ar.check()
        for o, w in zip(outs, wants):
            assert all(torch.equal(o[r], w) for r in range(W))
        for (out, new_res), xs, res, w in fused:
            _, ref_res = residual_rmsnorm_reference(all_reduce_reference(list(xs))[0], res[0], w, 1e-6)
            assert all(torch.equal(new_res[r], ref_res) for r in range(W))
            assert all(torch.equal(out[r], out[0]) for r in range(W))


# tolerance of the normalised output against the float64 truth: the kernel and the reference both
# round new_residual exactly alike; out differs by rsqrtf (2 ulp of fp32) and the order of the row's
# sum of squares, both far below the storage dtype's half-ulp (bf16 2^-9, fp16 2^-12 relative), so
# one ulp of the dtype bounds it; fp32: rsqrtf's 2 ulp plus a tree sum's ~log2(hidden) ulp, under 1e-5
TOL = {torch.bfloat16: (2 ** -7, 2 ** -7), torch.float16: (2 ** -10, 2 ** -10), torch.float32: (1e-5, 1e-5)}


@pytest.mark.gpu
@pytest.mark.parametrize("world_size", (2, 8))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algo", (Algo.ONESHOT, Algo.TWOSHOT))
def test_fused_residual_rmsnorm(world_size, dtype, algo, dev):
    """Both variants (one-shot: every rank every row; two-shot: shards of rows, gathered with the
    owner's 1/rms), rows fewer than ranks (empty shards), odd hidden (the scalar path)."""
    g = torch.Generator(device="cpu").manual_seed(1)
    with VirtualAllReduce(world_size, max_size=1 << 20, device=dev, timeout_s=10.0) as ar:
        for rows, hidden in ((1, 4096), (7, 7168), (33, 2048), (3, 4099), (2, 5), (17, 1024)):
            xs = torch.randn(world_size, rows, hidden, generator=g).to(dtype).to(dev)
            # the residual stream is replicated under tensor parallelism: the same on every rank, so
            # every rank's normalised output must be bit-identical (checked below)
            res = torch.randn(1, rows, hidden, generator=g).to(dtype).to(dev).expand(world_size, -1, -1).contiguous()
            w = (torch.rand(hidden, generator=g) + 0.5).to(dtype).to(dev)
            out, new_res = ar.all_reduce_residual_rmsnorm(xs, res, w, 1e-6, algo=algo)
            torch.cuda.synchronize()
            ar.check()
            # the other variant, and the host-staged path (a list): the same bits
            other = Algo.TWOSHOT if algo is Algo.ONESHOT else Algo.ONESHOT
            o2, nr2 = ar.all_reduce_residual_rmsnorm(list(xs), res, w, 1e-6, algo=other)
            torch.cuda.synchronize()
            ar.check()
            assert torch.equal(o2, out) and torch.equal(nr2, new_res), (rows, hidden, "variants disagree")
            summed = all_reduce_reference(list(xs))[0]
            for r in range(world_size):
                ref_out, ref_res = residual_rmsnorm_reference(summed, res[r], w, 1e-6)
                assert torch.equal(new_res[r], ref_res), (rows, hidden, r)
                truth, _ = residual_rmsnorm_reference(ref_res.double(), torch.zeros_like(ref_res).double(),
                                                      w.double(), 1e-6)
                rtol, atol = TOL[dtype]
                torch.testing.assert_close(out[r].double(), truth, rtol=rtol, atol=atol)
                assert torch.equal(out[r], out[0]), "ranks disagree"
            # beside all-reduce + torch's RMSNorm (what the fused kernel replaces)
            if hasattr(torch.nn.functional, "rms_norm"):
                ref = torch.nn.functional.rms_norm(ref_res.float(), (hidden,), w.float(), 1e-6).to(dtype)
                torch.testing.assert_close(out[0], ref, rtol=2 * TOL[dtype][0], atol=2 * TOL[dtype][1])


@pytest.mark.gpu
@pytest.mark.parametrize("register", (True, False))
def test_cuda_graph_capture_and_replay_with_fresh_inputs(register, dev):
    """register=True: the one-shot call reads the captured input in place (its table is written when
    capture() exits), the two-shot call stages; register=False: both stage inside the graph."""
    W, n = 4, 3000
    with VirtualAllReduce(W, max_size=1 << 20, device=dev, timeout_s=10.0) as ar:
        x1 = _int_inputs(W, n, torch.bfloat16, dev)
        x2 = _int_inputs(W, 40000, torch.bfloat16, dev)
        ar.all_reduce(x1)  # compile and load outside the capture
        ar.all_reduce(x2, algo=Algo.TWOSHOT)
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with ar.capture(register=register), torch.cuda.graph(g):
            y1 = ar.all_reduce(x1)
            y2 = ar.all_reduce(x2, algo=Algo.TWOSHOT)
        for j in range(5):
            x1.copy_(_int_inputs(W, n, torch.bfloat16, dev) * (j - 2))
            x2.copy_(_int_inputs(W, 40000, torch.bfloat16, dev) + j)
            g.replay()
            torch.cuda.synchronize()
            ar.check()
            for y, x in ((y1, x1), (y2, x2)):
                want = x.float().sum(0).bfloat16()
                assert all(torch.equal(y[r], want) for r in range(W)), j
        if register:
            # a graph of one registered one-shot call leaves the staging untouched: it copies nothing
            g1 = torch.cuda.CUDAGraph()
            with ar.capture(), torch.cuda.graph(g1):
                y3 = ar.all_reduce(x1)
            for st in ar._e.staging:
                st.fill_(255)
            x1.copy_(_int_inputs(W, n, torch.bfloat16, dev) + 1)
            g1.replay()
            torch.cuda.synchronize()
            ar.check()
            want = x1.float().sum(0).bfloat16()
            assert all(torch.equal(y3[r], want) for r in range(W))
            assert all(bool((st[:n * 2] == 255).all()) for st in ar._e.staging)
            # registering needs the capture to have ended: capture() inside torch.cuda.graph says so
            g2 = torch.cuda.CUDAGraph()
            with pytest.raises(MoeCommValueError, match=r"must enclose the graph capture \(with ar.capture\(\), "
                                                        r"torch.cuda.graph\(g\)"):
                with torch.cuda.graph(g2), ar.capture():
                    ar.all_reduce(x1)


@pytest.mark.gpu
@pytest.mark.parametrize("algo", (Algo.ONESHOT, Algo.TWOSHOT))
def test_fused_rmsnorm_in_a_cuda_graph_reads_fresh_inputs(algo, dev):
    """The in-kernel staging copy is captured with the kernel: replays read the captured tensors."""
    W, rows, hidden = 4, 9, 2048
    g = torch.Generator(device="cpu").manual_seed(5)
    with VirtualAllReduce(W, max_size=1 << 20, device=dev, timeout_s=10.0) as ar:
        xs = torch.randn(W, rows, hidden, generator=g).bfloat16().to(dev)
        res = torch.randn(W, rows, hidden, generator=g).bfloat16().to(dev)
        w = (torch.rand(hidden, generator=g) + 0.5).bfloat16().to(dev)
        ar.all_reduce_residual_rmsnorm(xs, res, w, algo=algo)  # load outside the capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with ar.capture(), torch.cuda.graph(graph):
            out, new_res = ar.all_reduce_residual_rmsnorm(xs, res, w, algo=algo)
        for j in range(3):
            xs.copy_(torch.randn(W, rows, hidden, generator=g).bfloat16())
            res.copy_(torch.randn(1, rows, hidden, generator=g).bfloat16().expand(W, -1, -1))
            graph.replay()
            torch.cuda.synchronize()
            ar.check()
            want_out, want_res = ar.all_reduce_residual_rmsnorm(xs, res, w, algo=algo)
            torch.cuda.synchronize()
            assert torch.equal(out, want_out) and torch.equal(new_res, want_res), j


@pytest.mark.gpu
@pytest.mark.parametrize("which", ("oneshot", "twoshot", "rmsnorm", "rmsnorm_twoshot"))
def test_a_rank_that_never_arrives_is_named_within_the_timeout(which, dev):
    W, timeout = 4, 0.25
    ar = VirtualAllReduce(W, max_size=1 << 20, device=dev, timeout_s=timeout)
    xs = _int_inputs(W, 5000, torch.float16, dev)
    ar.all_reduce(xs)  # compile and load first: the timing below is the kernel's
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    if which.startswith("rmsnorm"):
        ar.all_reduce_residual_rmsnorm(xs.view(W, 5, 1000), xs.view(W, 5, 1000), xs[0, :1000], launch_ranks=W - 1,
                                       algo=Algo.TWOSHOT if which == "rmsnorm_twoshot" else Algo.ONESHOT)
    else:
        ar.all_reduce(xs, algo=Algo.ONESHOT if which == "oneshot" else Algo.TWOSHOT, launch_ranks=W - 1)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - t0
    with pytest.raises(AllReduceTimeoutError, match=r"rank 3 did not arrive within the timeout of 0.25 s \(the start "
                                                    r"barrier, seen by rank 0"):
        ar.check()
    assert timeout <= elapsed < timeout + 5.0, elapsed
    # poisoned: a later call of the ranks that timed out exits at once instead of waiting again
    t0 = time.perf_counter()
    ar.all_reduce(xs, launch_ranks=W - 1)
    torch.cuda.synchronize()
    assert time.perf_counter() - t0 < timeout
    with pytest.raises(AllReduceTimeoutError):
        ar.check()
    ar.close()


@pytest.mark.gpu
def test_inputs_are_checked(dev):
    with VirtualAllReduce(2, max_size=4096, device=dev) as ar:
        with pytest.raises(MoeCommValueError, match=r"xs must have shape \[world_size=2, \.\.\.\], got \[3, 4\]"):
            ar.all_reduce(torch.zeros(3, 4, device=dev))
        with pytest.raises(MoeCommValueError, match=r"xs\[0\] must hold at most max_size = 4096 bytes per rank, got 8192"):
            ar.all_reduce(torch.zeros(2, 2048, device=dev))
        with pytest.raises(TypeError, match=r"xs\[0\] must have dtype bfloat16, float16 or float32, got int32"):
            ar.all_reduce(torch.zeros(2, 4, dtype=torch.int32, device=dev))
        assert ar.algo_for(4096) is Algo.ONESHOT and ar.oneshot_max_bytes == 512 << 10
    with pytest.raises(MoeCommError, match="VirtualAllReduce: used after close"):
        ar.all_reduce(torch.zeros(2, 4, device=dev))


@pytest.mark.gpu
def test_custom_allreduce_at_one_rank_stages_in_the_kernel(dev, tmp_path, monkeypatch):
    """CustomAllReduce itself (one process, a one-rank gloo group): the call paths of custom.py.
    A contiguous input is staged by the kernel (Engine.stage fails if called; the staging holds x
    afterwards), a transposed one by the host; the fused op on the one-shot and two-shot kernels
    (oneshot_max_bytes=0) gives the same bits, and W = 1 means the sum is x itself."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        one = CustomAllReduce(device=dev, max_size=1 << 20, timeout_s=10.0)
        if not one.ipc:
            pytest.skip(f"not eligible at one rank: {one.eligibility.reason}")
        two = CustomAllReduce(device=dev, max_size=1 << 20, timeout_s=10.0, oneshot_max_bytes=0)
        g = torch.Generator(device="cpu").manual_seed(7)
        with one, two:
            real_stage = one._e.stage
            monkeypatch.setattr(one._e, "stage", lambda *a: pytest.fail("the host staged a contiguous input"))
            for dtype in DTYPES:
                e = torch.tensor([], dtype=dtype).element_size()
                for n in (1, 1001, 4096, 100003):
                    x = torch.randn(n, generator=g).to(dtype).to(dev)
                    one._e.staging[0].fill_(255)
                    y = one.all_reduce(x)
                    torch.cuda.synchronize()
                    one.check()
                    assert torch.equal(y, x) and torch.equal(one._e.staging[0][:n * e].view(dtype), x), (dtype, n)
                    out = torch.full_like(x, float("nan"))
                    assert one.all_reduce(x, out=out) is out
                    torch.cuda.synchronize()
                    assert torch.equal(out, x)
                    assert two.path_for(n * e) is Algo.TWOSHOT
                    assert torch.equal(two.all_reduce(x), x)
            monkeypatch.setattr(one._e, "stage", real_stage)
            xt = torch.randn(64, 48, generator=g).bfloat16().to(dev).t()  # not contiguous: host-staged
            assert torch.equal(one.all_reduce(xt), xt)
            for rows, hidden in ((1, 7168), (9, 4096), (3, 4099)):
                x = torch.randn(rows, hidden, generator=g).bfloat16().to(dev)
                res = torch.randn(rows, hidden, generator=g).bfloat16().to(dev)
                w = (torch.rand(hidden, generator=g) + 0.5).bfloat16().to(dev)
                o1, r1 = one.all_reduce_residual_rmsnorm(x, res, w, 1e-6)
                o2, r2 = two.all_reduce_residual_rmsnorm(x, res, w, 1e-6)
                torch.cuda.synchronize()
                one.check()
                two.check()
                _, ref_res = residual_rmsnorm_reference(x, res, w, 1e-6)
                assert torch.equal(r1, ref_res) and torch.equal(r2, ref_res), (rows, hidden)
                assert torch.equal(o1, o2), (rows, hidden, "one-shot and two-shot kernels disagree")
                ref = torch.nn.functional.rms_norm(ref_res.float(), (hidden,), w.float(), 1e-6).bfloat16()
                torch.testing.assert_close(o1, ref, rtol=2 * TOL[torch.bfloat16][0], atol=2 * TOL[torch.bfloat16][1])
    finally:
        dist.destroy_process_group()
