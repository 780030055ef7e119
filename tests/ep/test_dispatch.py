"""Expert-parallel dispatch/combine: kernels vs references, the pipeline vs a single-process truth.

# T = num_tokens (a rank's), H = hidden, k = top_k, E = num_experts, W = ep_size, L = local experts

Payloads are small integers and weights powers of two, so every sum is exact in fp16/bf16/fp32 and
results are compared with torch.equal: a misrouted, lost or doubled row cannot hide in a tolerance.
Tolerances appear only for random (non-integer) data in gather_sum, where the kernel's sequential
fp32 sum and torch's may round differently: fp32 <= C terms of |v| <= 4: atol 1e-5; fp16 output
rounding, half an ulp of values up to C*4 = 32: atol 2e-2 (2^-11 * 32 = 0.016).

Run: python -m pytest -q tests/ep/test_dispatch.py -x   (~25 s on 2 cores, most of it in 2 gloo runs)
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from moecomm.errors import MoeCommTypeError, MoeCommValueError
from moecomm.ep.nccl import dispatcher as D
from moecomm.ep.nccl import plan as P
from moecomm.ep.nccl import ops as O
from moecomm.ep.nccl.reference import gather_sum_reference, pack_rows_reference
from moecomm.ep.nccl.virtual import virtual_ep_forward
from moecomm.ep.reference import ep_reference
from moecomm.ep.placement import ExpertPlacement
from moecomm.testing import compile_for_hopper, run_distributed

# ----------------------------------------------------------------------------- payloads


def routing(T: int, E: int, k: int, *, skew: bool, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, k] distinct expert ids (skewed: mostly the first few experts) and power-of-two weights."""
    g = torch.Generator().manual_seed(seed)
    if skew:
        p = torch.full((E,), 0.01)
        p[: max(k, 2)] = 10.0
    else:
        p = torch.ones(E)
    ids = torch.multinomial(p.expand(T, E), k, replacement=False, generator=g) if T else torch.zeros(0, k, dtype=torch.long)
    w = 2.0 ** torch.randint(-2, 2, (T, k), generator=g).float()
    return ids, w


def int_tokens(T: int, H: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, (T, H), generator=g).to(dtype)


def expert_times_id(rows: torch.Tensor, e: int) -> torch.Tensor:
    """The test expert: rows * (global expert id + 1), so a row sent to the wrong expert shows."""
    return rows * (e + 1)


def vectorised_expert(rows, expert_of_row, row_weights):
    return (rows.float() * (expert_of_row[:, None] + 1) * row_weights[:, None]).to(rows.dtype)


def check_against_reference(placement, xs, ids, ws, run_received, run_y):
    ref = ep_reference(xs, ids, ws, placement, expert_times_id)
    for r in range(placement.ep_size):
        res = run_received[r]
        g = res.tokens[res.gather_idx.long()]
        offs = res.expert_offsets.tolist()
        assert res.tokens_per_expert.tolist() == [len(t) for t in ref.received[r]]
        for lx in range(placement.num_local_experts(r)):
            assert torch.equal(g[offs[lx]:offs[lx + 1]], ref.received[r][lx]), (r, lx)
        assert torch.equal(run_y[r], ref.y[r]), r


CASES = {
    # name: (token counts per rank, E, k, H, placement map or None, skewed)
    "uniform_w2": ([33, 1], 8, 2, 16, None, False),
    "skew_t0_w3": ([0, 17, 9], 10, 4, 33, None, True),  # E % W != 0, a rank with no tokens
    "custom_w4": ([5, 8, 0, 3], 6, 3, 8, [3, 0, 3, 1, 1, 0], True),  # rank 2 holds no expert
}


def case_inputs(name, dtype=torch.float32):
    Ts, E, k, H, e2r, skew = CASES[name]
    W = len(Ts)
    pl = ExpertPlacement(E, W, tuple(e2r) if e2r else ())
    xs, ids, ws = [], [], []
    for r, T in enumerate(Ts):
        i, w = routing(T, E, k, skew=skew, seed=100 + r)
        xs.append(int_tokens(T, H, seed=r, dtype=dtype))
        ids.append(i)
        ws.append(w)
    return pl, xs, ids, ws


# ----------------------------------------------------------------------------- kernels


class _Pos:  # pack_rows' [T, W] destination rows, from a send plan
    def __init__(self, plan, W):
        T = plan.first.shape[0]
        self.pos = torch.full((T, W), -1, dtype=torch.int32)
        tt, jj = (plan.first < W).nonzero(as_tuple=True)
        self.pos[tt, plan.first[tt, jj].long()] = plan.places()[tt, jj]


def _pack_inputs(T, H, W, seed, dtype):
    ids, w = routing(T, 2 * W, 2, skew=False, seed=seed)
    pl = ExpertPlacement(2 * W, W)
    plan = P.plan_send(ids, pl.expert_to_rank_tensor(), pl.expert_to_local_tensor(), W)
    x = torch.randn(T, 2 * H, dtype=torch.float32).to(dtype)[:, ::2]  # non-contiguous [T, H]
    return x, _Pos(plan, W), int(plan.info[:, 0].sum())


@pytest.mark.parametrize("T,H,W", [(0, 8, 2), (1, 33, 1), (33, 199, 3), (7, 64, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_pack_kernel_interpreted(triton_backend, T, H, W, dtype):
    from moecomm.ep.nccl._triton import pack_rows_triton

    x, plan, S = _pack_inputs(T, H, W, seed=T + H, dtype=dtype)
    out = torch.full((S, H), float("nan"), dtype=dtype)  # unwritten rows stay NaN and fail
    pack_rows_triton(x, plan.pos, S, out=out)
    assert torch.equal(out, pack_rows_reference(x, plan.pos, S))
    # every row is one of x's rows (reference itself checked against the obvious loop)
    for t in range(T):
        for w in range(W):
            p = int(plan.pos[t, w])
            if p >= 0:
                assert torch.equal(out[p], x[t])


@pytest.mark.parametrize("M,C,H,N", [(0, 2, 8, 3), (1, 1, 33, 1), (33, 8, 199, 50), (5, 4, 16, 0)])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.float16, 2e-2)])
def test_gather_sum_kernel_interpreted(triton_backend, M, C, H, N, dtype, atol):
    from moecomm.ep.nccl._triton import gather_sum_triton

    g = torch.Generator().manual_seed(M * 7 + C)
    src = (torch.rand(N, 2 * H, generator=g) * 8 - 4).to(dtype)[:, :H]  # non-contiguous rows
    idx = torch.randint(-1, max(N, 1), (M, C), generator=g, dtype=torch.int32)
    if N == 0:
        idx.fill_(-1)
    out = torch.full((M, H), float("nan"), dtype=dtype)
    gather_sum_triton(src, idx, out=out)
    truth = torch.zeros(M, H, dtype=torch.float64)  # float64 ground truth, the obvious loop
    for m in range(M):
        for c in range(C):
            if idx[m, c] >= 0:
                truth[m] += src[idx[m, c]].double()
    torch.testing.assert_close(out.double(), truth, atol=atol, rtol=0)
    torch.testing.assert_close(gather_sum_reference(src, idx).double(), truth, atol=atol, rtol=0)


@pytest.mark.parametrize("M,S", [(0, 3), (1, 1), (37, 50), (130, 20)])
def test_gather_sum_takes_its_counts_from_the_device(triton_backend, M, S):
    """gather_sum with DeviceCounts (a native phase's template): the rows from part 1 of the
    counts (the grid a bucket of them: the programs past them write nothing, read no index), the
    source bound from part 0 (indices >= S add nothing), equal to the host-count launch."""
    from moecomm.ep.nccl._triton import DeviceCounts, gather_sum_triton

    dev = torch.device(triton_backend)
    g = torch.Generator().manual_seed(M + S)
    H, C = 24, 3
    src = (torch.rand(S + 9, H, generator=g) * 8 - 4).to(dev)  # 9 rows past S that must not be read
    idx = torch.randint(-1, S + 9, (M + 40, C), generator=g, dtype=torch.int32).to(dev)
    counts = torch.zeros((2, 2, 3), dtype=torch.int32)
    counts[0, :, 0] = torch.tensor([S - S // 3, S // 3])  # part 0: rows sent (the source rows here)
    counts[1, :, 0] = torch.tensor([M // 2, M - M // 2])  # part 1: rows received (the launch's rows)
    counts[1, :, 1] = 10**6  # the pairs, another column: not read
    buf = torch.full((M + 40, H), float("nan"), device=dev)
    gather_sum_triton(src, idx[:M], out=buf[:M], counts=DeviceCounts(counts.to(dev), 2, rows=DeviceCounts.RECV_ROWS,
                                                                      src=DeviceCounts.SENT_ROWS))
    want = torch.full((M, H), float("nan"), device=dev)
    gather_sum_triton(src[:S], idx[:M], out=want)
    assert torch.equal(buf[:M], want) and buf[M:].isnan().all()


def test_nan_stays_in_its_token(triton_backend):
    x, plan, S = _pack_inputs(9, 16, 2, seed=3, dtype=torch.float32)
    x = x.clone()
    x[4, 3] = float("nan")
    packed = O.pack_rows(x, plan.pos, S)
    bad_rows = {int(p) for p in plan.pos[4] if p >= 0}
    for row in range(S):
        assert bool(packed[row].isnan().any()) == (row in bad_rows)
    y = O.gather_sum(packed, plan.pos)  # the round trip: token t = sum of its copies
    assert y[4].isnan().any() and not y[torch.arange(9) != 4].isnan().any()


def _compile_pack_gather() -> int:
    """Compile pack_rows' and gather_sum's kernels for sm_90; run without TRITON_INTERPRET."""
    from moecomm.ep.nccl._triton import ep_gather_sum_kernel, ep_pack_kernel

    common = {"num_out_rows": "i32", "stride_xt": "i32", "stride_xh": "i32", "stride_pt": "i32", "stride_pw": "i32",
              "stride_ot": "i32", "H": "constexpr", "W": "constexpr", "BLOCK_H": "constexpr"}
    k = compile_for_hopper(ep_pack_kernel, {"x_ptr": "*bf16", "pos_ptr": "*i32", "out_ptr": "*bf16", **common},
                           {"H": 7168, "W": 8, "BLOCK_H": 1024}, num_warps=4)
    assert "st.global" in k.asm["ptx"]
    sig = {"src_ptr": "*bf16", "idx_ptr": "*i32", "out_ptr": "*bf16", "cnt_ptr": "*i32", "num_src_rows": "i32",
           "stride_sm": "i32", "stride_sh": "i32", "stride_im": "i32", "stride_ic": "i32", "stride_om": "i32",
           "H": "constexpr", "C": "constexpr", "BLOCK_H": "constexpr", "CNT_W": "constexpr", "CNT_WP": "constexpr",
           "CNT_ROWS": "constexpr", "CNT_SRC": "constexpr"}
    for cnt in ((0, 1, -1, -1), (4, 4, 3, 4), (4, 4, -1, 0)):  # counts from the host; from the device
        k = compile_for_hopper(ep_gather_sum_kernel, sig, {"H": 33, "C": 8, "BLOCK_H": 64,
                                                           **dict(zip(("CNT_W", "CNT_WP", "CNT_ROWS", "CNT_SRC"), cnt))},
                               num_warps=4)
        assert "add.f32" in k.asm["ptx"] or "add.rn.f32" in k.asm["ptx"]  # fp32 accumulation
    return 2


def _vectorise_pack_gather() -> int:
    """With what Triton specialises a contiguous bf16 launch on (16-byte aligned pointers and row
    strides, unit inner strides), H = 4096 rows move as 16-byte vectors: a copy kernel that loads
    2 bytes at a time cannot reach copy bandwidth."""
    import re

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from moecomm.ep.nccl._triton import ep_gather_sum_kernel, ep_pack_kernel

    aligned = [["tt.divisibility", 16]]
    for kernel, names in ((ep_pack_kernel, ("x", "pos", "out", "num_out_rows", "stride_xt", "stride_xh", "stride_pt",
                                            "stride_pw", "stride_ot", "W")),
                          (ep_gather_sum_kernel, ("src", "idx", "out", "num_src_rows", "stride_sm", "stride_sh",
                                                  "stride_im", "stride_ic", "stride_om", "C"))):
        ptrs, (rows, s_row, s_col, s_it, s_iw, s_out, fan) = names[:3], names[3:]
        sig = {f"{ptrs[0]}_ptr": "*bf16", f"{ptrs[1]}_ptr": "*i32", f"{ptrs[2]}_ptr": "*bf16"}
        consts = {s_col: 1, s_iw: 1, "H": 4096, fan: 1, "BLOCK_H": 1024}
        if kernel is ep_gather_sum_kernel:  # its counts pointer, unused with CNT_W 0
            sig["cnt_ptr"] = "*i32"
            consts.update(CNT_W=0, CNT_WP=1, CNT_ROWS=-1, CNT_SRC=-1)
        first = len(sig)
        sig.update({rows: "i32", s_row: "i32", s_col: "constexpr", s_it: "i32", s_iw: "constexpr", s_out: "i32",
                    "H": "constexpr", fan: "constexpr", "BLOCK_H": "constexpr"})
        sig.update({n: "constexpr" for n in consts if n.startswith("CNT_")})
        attrs = {(i,): aligned for i in (0, 1, 2, first + 1, first + 5)}  # the pointers, the row strides
        fn = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)
        ptx = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                             options={"num_warps": 4}).asm["ptx"]
        ops = set(re.findall(r"(?:ld|st)\.global\.[\w.]+", ptx))
        assert "ld.global.v4.b32" in ops and "st.global.v4.b32" in ops, (kernel, sorted(ops))
    return 2


# In a fresh process without TRITON_INTERPRET: with it, a cold-cache sm_90 compile after interpreted
# kernels fails inside triton.language's helpers (moecomm.testing.run_without_interpreter).


def test_kernels_compile_for_hopper():
    pytest.importorskip("triton")
    from moecomm.testing import run_without_interpreter

    assert run_without_interpreter(__file__, "_compile_pack_gather") == "2"


def test_kernels_vectorise_for_hopper():
    pytest.importorskip("triton")
    from moecomm.testing import run_without_interpreter

    assert run_without_interpreter(__file__, "_vectorise_pack_gather") == "2"


def test_ops_under_torch_compile():
    x, plan, S = _pack_inputs(11, 32, 3, seed=1, dtype=torch.float32)

    def f(x, pos):  # the public functions: under compile they go through the registered ops
        return O.gather_sum(O.pack_rows(x, pos, S), pos)

    got = torch.compile(f, fullgraph=True, backend="aot_eager")(x, plan.pos)
    assert torch.equal(got, f(x, plan.pos))
    torch.library.opcheck(O.pack_rows_unchecked.op, (x.contiguous(), plan.pos, S))
    torch.library.opcheck(O.gather_sum_unchecked.op, (x.contiguous(), plan.pos))


@pytest.mark.parametrize("call,exc,msg", [
    (lambda x, p: O.pack_rows(x.long(), p, 3), MoeCommTypeError, "pack_rows: x must have dtype float32 or float16 or"),
    (lambda x, p: O.pack_rows(x[0], p, 3), MoeCommValueError, "pack_rows: x must have 2 dimensions, got shape (8,)"),
    (lambda x, p: O.pack_rows(x, p[:3], 3), MoeCommValueError, "pack_rows: pos must have shape [4, *], got [3, 2]"),
    (lambda x, p: O.pack_rows(x, p.float(), 3), MoeCommTypeError, "pack_rows: pos must have dtype int32 or int64"),
    (lambda x, p: O.pack_rows(x, p.to("meta"), 3), MoeCommValueError, "pack_rows: pos must be on device cpu, got meta"),
    (lambda x, p: O.pack_rows(x, p, -1), MoeCommValueError, "pack_rows: num_rows must be >= 0, got -1"),
    (lambda x, p: O.pack_rows(x, p, 3.0), MoeCommTypeError, "pack_rows: num_rows must be an int, got float"),
    (lambda x, p: O.pack_rows([1.0], p, 3), MoeCommTypeError, "pack_rows: x must be a torch.Tensor"),
    (lambda x, p: O.gather_sum(x.int(), p), MoeCommTypeError, "gather_sum: src must have dtype"),
    (lambda x, p: O.gather_sum(x, p[0]), MoeCommValueError, "gather_sum: idx must have 2 dimensions, got shape (2,)"),
    (lambda x, p: O.gather_sum(x, p.to("meta")), MoeCommValueError, "gather_sum: idx must be on device cpu, got meta"),
])
def test_public_kernels_still_validate(call, exc, msg):
    """The public pack_rows/gather_sum check every argument (the dispatcher calls the *_unchecked ops)."""
    x, pos = torch.zeros(4, 8), torch.tensor([[0, -1], [1, 2], [-1, -1], [-1, 0]], dtype=torch.int32)
    with pytest.raises(exc) as info:
        call(x, pos)
    assert msg in str(info.value)


def test_public_kernels_take_dlpack_arrays():
    x = np.arange(32, dtype=np.float32).reshape(4, 8)
    pos = np.array([[0, -1], [-1, 1], [-1, -1], [2, 3]], dtype=np.int32)  # token 3 goes to both ranks
    packed = O.pack_rows(x, pos, 4)
    assert torch.equal(packed, torch.from_numpy(x[[0, 1, 3, 3]]))
    y = O.gather_sum(packed.numpy(), pos)
    assert torch.equal(y, torch.from_numpy(x) * torch.tensor([[1.0], [1.0], [0.0], [2.0]]))


def test_combine_checks_expert_out_device(monkeypatch):
    monkeypatch.setattr(D, "_report", lambda exc: None)  # no process group here: nothing to report to
    handle = D.EPHandle(None, 2, [1, 1], [1, 1], torch.zeros(2, 2, dtype=torch.int32),
                        torch.zeros(2, 2, dtype=torch.int32), 2, 8, 3)
    with pytest.raises(MoeCommValueError, match="combine: expert_out must be on device cpu, got meta"):
        D.combine(torch.zeros(3, 8, device="meta"), handle)


def test_benchmark_kernel_quick_smoke(tmp_path, monkeypatch):
    """The benchmark's kernel mode runs end to end (on CPU: eager and host columns, no graph) and
    writes one JSON line per (op, impl, timing) with the fields RESULTS.md is built from."""
    import json
    import os

    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from benchmarks import bench_dispatch

    out = tmp_path / "r.jsonl"
    assert bench_dispatch.main(["--kernel", "--quick", "--rep", "2", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    timings = ["eager", "graph"] if torch.cuda.is_available() else ["eager"]
    # (shapes x W + the static-capacity rows) x ops x impls x timings
    assert len(recs) == len(bench_dispatch.QUICK_KERNEL_SHAPES) * 3 * 3 * 2 * len(timings)
    assert {r["timing"] for r in recs} == set(timings) and {r["op"] for r in recs} == {"pack", "unpack", "reduce"}
    for r in recs:
        assert r["median_ms"] > 0 and r["gbps"] > 0 and r["min_bytes"] > 0
        assert (r["host_us"] > 0) if r["impl"] == "moecomm" else r["host_us"] is None


def test_benchmark_sweep_runs_interpreted(triton_backend, tmp_path, monkeypatch):
    """The --sweep loop (launch configurations through the Triton kernels) on CPU: graph replay
    swapped for the CPU timer, kernels through the interpreter; one record per (config, op, W)."""
    import os

    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from benchmarks import bench_dispatch

    from moecomm.testing import ResultWriter, bench

    monkeypatch.setattr(bench_dispatch, "graph_bench",
                        lambda fn, sets, replays: bench(fn, sets, rep=replays, warmup=1, device="cpu"))
    writer = ResultWriter(None)
    bench_dispatch.sweep([(33, 64, 8, 2)], torch.float32, "cpu", writer, 1)
    configs = {(min(bh, 64), nw) for bh, nw in bench_dispatch.SWEEP_CONFIGS}
    assert len(writer.records) == len(configs) * 2  # configs x W (unpack: pack_send has one configuration)
    assert {(r["block_h"], r["num_warps"]) for r in writer.records} == configs


# ----------------------------------------------------------------------------- pipeline, one process


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_virtual_ranks_equal_reference(name, dtype):
    pl, xs, ids, ws = case_inputs(name, dtype)
    run = virtual_ep_forward(xs, ids, ws, pl, vectorised_expert)
    check_against_reference(pl, xs, ids, ws, run.results, run.y)


def test_virtual_ranks_interpreted(triton_backend):
    pl, xs, ids, ws = case_inputs("skew_t0_w3", torch.float16)
    run = virtual_ep_forward(xs, ids, ws, pl, vectorised_expert)
    check_against_reference(pl, xs, ids, ws, run.results, run.y)


def test_dedup_send_counts():
    # experts 0..3 on rank 0, 4..7 on rank 1: token 0 -> both ranks, token 1 -> rank 1 only (3 experts)
    pl = ExpertPlacement(8, 2)
    ids = torch.tensor([[0, 5, 1], [4, 6, 7]])
    plan = P.plan_send(ids, pl.expert_to_rank_tensor(), pl.expert_to_local_tensor(), 2)
    assert plan.info[:, 0].tolist() == [1, 2]  # rows
    assert plan.info[:, 1].tolist() == [2, 4]  # (token, expert) pairs
    lay = P.RowLayout.of(4, 3, torch.float32)
    out = torch.full((3, lay.width), float("nan"))
    home = torch.empty(2, 3, dtype=torch.int32)
    P.pack_send(torch.arange(8.0).view(2, 4), torch.ones(2, 3), plan, lay, out, home)
    meta = out.view(torch.int32)[:, lay.meta_col:lay.meta_col + 3]
    assert meta.tolist() == [[0, -1, 1], [-1, 1, -1], [0, 2, 3]]
    assert home.tolist() == [[0, 1, -1], [2, -1, -1]]  # the row of each token's owning slots
    assert torch.equal(out[:, :4], torch.arange(8.0).view(2, 4)[[0, 0, 1]])


@pytest.mark.parametrize("async_op", [False, True])
def test_ep_size_one_is_a_local_permute(async_op):
    pl, xs, ids, ws = case_inputs("uniform_w2")
    x = xs[0]
    d = D.EPDispatcher(8, 2, 16)
    res = d.dispatch(x, ids[0], ws[0], async_op=async_op)
    res = res.wait() if async_op else res
    assert res.tokens.data_ptr() == x.data_ptr()  # no copy: the GEMM gathers through gather_idx
    g = res.tokens[res.gather_idx.long()]
    local = torch.repeat_interleave(torch.arange(8), res.tokens_per_expert.long())
    out = vectorised_expert(g, local, res.row_weights)
    y = d.combine(out, res.handle, async_op=async_op)
    y = y.wait() if async_op else y
    ref = ep_reference([x], [ids[0]], [ws[0]], ExpertPlacement(8, 1), expert_times_id)
    assert torch.equal(y, ref.y[0])
    for e in range(8):
        o = res.expert_offsets.tolist()
        assert torch.equal(g[o[e]:o[e + 1]], ref.received[0][e])


def _expert_rows(res, E):
    local = torch.repeat_interleave(torch.arange(E, device=res.tokens.device), res.tokens_per_expert.long())
    return vectorised_expert(res.tokens[res.gather_idx.long()], local, res.row_weights)


def _check_result(res, y, x, ids, w, E):
    ref = ep_reference([x.cpu()], [ids.cpu()], [w.cpu()], ExpertPlacement(E, 1), expert_times_id)
    g = res.tokens[res.gather_idx.long()].cpu()
    offs = res.expert_offsets.tolist()
    for e in range(E):
        assert torch.equal(g[offs[e]:offs[e + 1]], ref.received[0][e]), e
    assert torch.equal(y.cpu(), ref.y[0])


def test_throughput_results_are_owned_across_calls(backend):
    """The workspace holds only scratch: a result (and its handle) stays right while the same
    dispatcher runs more calls, of other sizes too (the workspace grows), and async calls
    interleave. EP size 1 through the exchange path (force_exchange), no process group."""
    E, k, H = 8, 3, 16
    dev = torch.device(backend)
    disp = D.EPDispatcher(E, k, H, force_exchange=True)
    calls = []
    for T, seed in ((40, 1), (40, 2), (7, 3), (0, 4), (130, 5), (40, 6)):
        i, w = routing(T, E, k, skew=bool(seed % 2), seed=seed)
        x, i, w = int_tokens(T, H, seed).to(dev), i.to(dev), w.to(dev)
        res = disp.dispatch(x, i, w)
        calls.append((res, x, i, w))
    for res, x, i, w in calls:  # every earlier result read after all the later calls
        y = disp.combine(_expert_rows(res, E), res.handle)
        _check_result(res, y, x, i, w, E)
    ins = [tuple(t.to(dev) for t in (int_tokens(T, H, s), *routing(T, E, k, skew=False, seed=s)))
           for T, s in ((33, 7), (50, 8))]
    p1, p2 = (disp.dispatch(x, i, w, async_op=True) for x, i, w in ins)
    r2, r1 = p2.wait(), p1.wait()
    c1, c2 = (disp.combine(_expert_rows(r, E), r.handle, async_op=True) for r in (r1, r2))
    for r, c, (x, i, w) in ((r2, c2.wait(), ins[1]), (r1, c1.wait(), ins[0])):
        _check_result(r, c, x, i, w, E)
    # expert rows that require grad: the sums are recorded (as before), the result the same
    res, x, i, w = calls[0]
    h = _expert_rows(res, E).requires_grad_(True)
    y = disp.combine(h, res.handle)
    assert y.requires_grad
    _check_result(res, y.detach(), x, i, w, E)


def test_numpy_input_is_not_copied():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = np.array([[0, 1], [1, 2], [2, 0]], dtype=np.int64)
    w = np.ones((3, 2), dtype=np.float32)
    res = D.dispatch(x, ids, w, num_experts=4)
    assert res.tokens.data_ptr() == x.__array_interface__["data"][0]


# ----------------------------------------------------------------------------- bad input


def _good():
    return torch.zeros(4, 8), torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2)


@pytest.mark.parametrize("mutate,exc,msg", [
    (lambda a: (a[0][0], a[1], a[2]), MoeCommValueError, "dispatch: x must have 2 dimensions"),
    (lambda a: (a[0].long(), a[1], a[2]), MoeCommTypeError, "dispatch: x must have dtype"),
    (lambda a: (a[0], a[1][:3], a[2]), MoeCommValueError, "dispatch: topk_ids must have shape [4, *]"),
    (lambda a: (a[0], a[1].float(), a[2]), MoeCommTypeError, "dispatch: topk_ids must have dtype int32 or int64"),
    (lambda a: (a[0], a[1], a[2][:, :1]), MoeCommValueError, "dispatch: topk_weights must have shape [4, 2]"),
    (lambda a: (a[0], a[1] + 7, a[2]), MoeCommValueError, "dispatch: topk_ids must be in [0, 4), got values in [7, 7]"),
    (lambda a: ([1.0], a[1], a[2]), MoeCommTypeError, "dispatch: x must be a torch.Tensor"),
])
def test_dispatch_bad_input(mutate, exc, msg):
    x, ids, w = mutate(_good())
    with pytest.raises(exc) as info:
        D.dispatch(x, ids, w, num_experts=4)
    assert msg in str(info.value)


def test_validate_false_skips_id_check_but_stays_in_bounds():
    x, ids, w = _good()
    res = D.dispatch(x, ids + 99, w, num_experts=4, validate=False)  # clamped, never out of bounds
    assert res.gather_idx.shape == (8,)


def test_bad_arguments_elsewhere():
    x, ids, w = _good()
    with pytest.raises(MoeCommValueError, match="dispatch: placement or num_experts must be given"):
        D.dispatch(x, ids, w)
    with pytest.raises(MoeCommValueError, match=r"dispatch: placement.ep_size must be 1 \(the group's size\), got 2"):
        D.dispatch(x, ids, w, placement=ExpertPlacement(4, 2))
    with pytest.raises(MoeCommTypeError, match="dispatch: placement must be an ExpertPlacement"):
        D.dispatch(x, ids, w, placement=[0, 0, 0, 0])
    with pytest.raises(MoeCommValueError, match="EPDispatcher: top_k must be <= num_experts"):
        D.EPDispatcher(2, 4, 8)
    with pytest.raises(MoeCommTypeError, match="EPDispatcher: dtype must be"):
        D.EPDispatcher(4, 2, 8, dtype=torch.int32)
    with pytest.raises(MoeCommValueError, match="EPDispatcher: placement must be for 4 experts on 1 ranks"):
        D.EPDispatcher(4, 2, 8, placement=ExpertPlacement(5, 1))
    disp = D.EPDispatcher(4, 2, 8, dtype=torch.float16)
    with pytest.raises(MoeCommTypeError, match="EPDispatcher.dispatch: x must have dtype float16, got float32"):
        disp.dispatch(x, ids, w)
    with pytest.raises(MoeCommValueError, match=r"EPDispatcher.dispatch: x must have shape \[\*, 8\], got \[4, 9\]"):
        disp.dispatch(torch.zeros(4, 9, dtype=torch.float16), ids, w)
    with pytest.raises(MoeCommValueError, match=r"EPDispatcher.dispatch: topk_ids must have shape \[4, 2\]"):
        disp.dispatch(x.half(), ids[:, :1], w)
    res = disp.dispatch(x.half(), ids, w)
    with pytest.raises(MoeCommValueError, match=r"combine: expert_out must have shape \[8, 8\], got \[7, 8\]"):
        disp.combine(torch.zeros(7, 8), res.handle)
    with pytest.raises(MoeCommTypeError, match="combine: handle must be the EPHandle"):
        disp.combine(torch.zeros(8, 8), object())


# ----------------------------------------------------------------------------- gloo, several processes


def _dist_cases(case_names: list[str], bad_rank: int) -> dict:
    """Runs on every rank: each case through EPDispatcher (sync and async); then bad input on one rank."""
    import torch.distributed as dist

    rank = dist.get_rank()
    torch.set_num_threads(1)  # ranks share 2 cores: spinning OpenMP threads would slow every op 100x
    out: dict = {}
    for name in case_names:
        pl, xs, ids, ws = case_inputs(name)
        E, k, H = pl.num_experts, ids[0].shape[1], xs[0].shape[1]
        disp = D.EPDispatcher(E, k, H, placement=pl, dtype=torch.float32)
        for async_op in (False, True):
            pending = disp.dispatch(xs[rank], ids[rank], ws[rank], async_op=async_op)
            if async_op:
                assert isinstance(pending.is_completed(), bool)  # pollable while the caller computes
            res = pending.wait() if async_op else pending
            local = torch.tensor(pl.local_experts(rank), dtype=torch.long)
            expert_of_row = local[torch.repeat_interleave(res.tokens_per_expert.long())]
            h = vectorised_expert(res.tokens[res.gather_idx.long()], expert_of_row, res.row_weights)
            y = disp.combine(h, res.handle, async_op=async_op)
            y = y.wait() if async_op else y
            # numpy arrays: pickled by value (torch tensors would travel as shared memory that dies
            # with this process before the parent reads it)
            out[(name, async_op)] = tuple(t.numpy() for t in (res.tokens, res.gather_idx, res.expert_offsets,
                                                             res.tokens_per_expert, res.row_weights, y))
            out[(name, async_op)] += (res.handle.send_splits,)
    # bad ids on one rank: it raises its own error, the others name it; then bad shapes the same way
    disp = D.EPDispatcher(8, 2, 4)
    x, ids, w = torch.zeros(3, 4), torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 2)
    for what, bad in (("ids", (x, ids + 8, w)), ("shape", (x[:, :3], ids, w))):
        t0 = time.monotonic()
        try:
            disp.dispatch(*(bad if rank == bad_rank else (x, ids, w)))
            out[what] = "no error"
        except MoeCommValueError as exc:
            out[what] = str(exc)
        out[what + "_s"] = time.monotonic() - t0
    return out


def _check_dist(outs, names, bad_rank):
    W = len(outs)
    for name in names:
        pl, xs, ids, ws = case_inputs(name)
        for async_op in (False, True):
            got = [[torch.from_numpy(a) for a in o[(name, async_op)][:6]] + [o[(name, async_op)][6]] for o in outs]
            results = [D.DispatchResult(g[0], g[2], g[3], g[4], g[1], None) for g in got]
            check_against_reference(pl, xs, ids, ws, results, [g[5] for g in got])
            for r in range(W):  # dedup: each token sent once to each rank holding any of its experts
                dest = torch.tensor(pl.expert_to_rank)[ids[r]]
                want = [int((dest == w).any(1).sum()) for w in range(W)]
                assert got[r][6] == want
    for r, o in enumerate(outs):
        if r == bad_rank:
            assert "EPDispatcher.dispatch: topk_ids must be in [0, 8), got values in [8, 8]" in o["ids"]
            assert "EPDispatcher.dispatch: x must have shape [*, 4], got [3, 3]" in o["shape"]
        else:
            assert o["ids"] == f"EPDispatcher.dispatch: rank {bad_rank} failed: topk_ids out of range [0, num_experts)"
            assert o["shape"].startswith(f"EPDispatcher.dispatch: rank {bad_rank} failed: invalid arguments")
        assert o["ids_s"] < 10 and o["shape_s"] < 10  # no rank waits for a timeout


def test_gloo_two_ranks():
    outs = run_distributed(2, _dist_cases, ["uniform_w2"], 1, timeout_s=90)
    _check_dist(outs, ["uniform_w2"], 1)


def test_gloo_four_ranks():
    outs = run_distributed(4, _dist_cases, ["custom_w4"], 2, timeout_s=90)
    _check_dist(outs, ["custom_w4"], 2)


@pytest.mark.parametrize("W,case,bad_rank", [(2, "uniform_w2", 0), (3, "skew_t0_w3", 2), (4, "custom_w4", 1)])
def test_gloo_ranks_through_the_kernels(triton_backend, W, case, bad_rank):
    """The same through the Triton kernels (interpreted on CPU): the plan, the sorts, the workspace
    and the one-allocation outputs of every rank; a rank without tokens, one without experts."""
    outs = run_distributed(W, _dist_cases, [case], bad_rank, timeout_s=240)
    _check_dist(outs, [case], bad_rank)
