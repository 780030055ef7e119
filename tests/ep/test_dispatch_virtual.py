"""GPU tier of expert-parallel dispatch/combine: W virtual ranks in one process on one GPU.

# T = num_tokens per rank, H = hidden, k = top_k, E = num_experts, W = ep_size

The all_to_all is replaced by copies between the virtual ranks' buffers; each rank's kernels run on
its own CUDA stream (moecomm.ep.nccl.virtual.virtual_ep_forward). bf16 payloads are integers
in [-2, 2], weights 0.5 or 1, and the test expert multiplies by (e % 2 + 1): every partial sum of
k = 8 terms is a multiple of 0.5 of magnitude <= 32, i.e. at most 7 significant bits, exact in bf16
(8 bits), so the comparison is torch.equal whatever the summation order.

Run on a GPU: python -m pytest -q tests/ep/test_dispatch_virtual.py
"""

from __future__ import annotations

import pytest
import torch

from moecomm.ep.nccl import dispatcher as D
from moecomm.ep.nccl import plan as P
from moecomm.ep.nccl import ops as O
from moecomm.ep.nccl.reference import gather_sum_reference, pack_rows_reference
from moecomm.ep.nccl.virtual import virtual_ep_forward
from moecomm.ep.reference import ep_reference
from moecomm.ep.placement import ExpertPlacement

pytestmark = pytest.mark.gpu


def _inputs(Ts, E, k, H, device, *, skew, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    xs, ids, ws = [], [], []
    for T in Ts:
        p = torch.ones(E)
        if skew:
            p[:k] = 50.0  # most pairs on the first rank's experts; many experts get nothing
        i = torch.multinomial(p.expand(T, E), k, replacement=False, generator=g) if T else torch.zeros(0, k, dtype=torch.long)
        xs.append(torch.randint(-2, 3, (T, H), generator=g).to(torch.bfloat16).to(device))
        ids.append(i.to(torch.int32).to(device))
        ws.append((2.0 ** torch.randint(-1, 1, (T, k), generator=g)).float().to(device))
    return xs, ids, ws


def _expert(rows, e):
    return rows * (e % 2 + 1)


def _vector_expert(rows, expert_of_row, row_weights):
    return (rows.float() * (expert_of_row[:, None] % 2 + 1) * row_weights[:, None]).to(rows.dtype)


def _plan(ids: torch.Tensor, num_experts: int, W: int):
    """The send plan of ids [T, k] over W ranks (contiguous placement, unit weights) and its row count S."""
    pl = ExpertPlacement(num_experts, W)
    plan = P.plan_send(ids, pl.expert_to_rank_tensor(ids.device), pl.expert_to_local_tensor(ids.device), W)
    pos = torch.full((ids.shape[0], W), -1, dtype=torch.int32, device=ids.device)  # pack_rows' [T, W] rows
    tt, jj = (plan.first < W).nonzero(as_tuple=True)
    pos[tt, plan.first[tt, jj].long()] = plan.places()[tt, jj]
    plan.pos = pos
    return plan, int(plan.info[:, 0].sum())


@pytest.mark.parametrize("W,E,k,H,Ts,skew", [
    (8, 64, 8, 4096, [2048] * 7 + [0], False),      # a rank with no tokens
    (8, 256, 8, 7168, [1024, 33, 199, 1, 1024, 0, 512, 1024], True),  # DeepSeek-V3-like, skewed
    (3, 10, 2, 4096, [777, 4096, 5], True),         # E % W != 0
])
def test_virtual_ranks_bf16_exact(monkeypatch, W, E, k, H, Ts, skew):
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    xs, ids, ws = _inputs(Ts, E, k, H, "cuda", skew=skew)
    pl = ExpertPlacement(E, W)
    streams = [torch.cuda.Stream() for _ in range(W)]
    run = virtual_ep_forward(xs, ids, ws, pl, _vector_expert, streams=streams)
    ref = ep_reference(xs, ids, ws, pl, _expert)
    for r in range(W):
        res = run.results[r]
        g = res.tokens[res.gather_idx.long()]
        offs = res.expert_offsets.tolist()
        for lx in range(pl.num_local_experts(r)):
            assert torch.equal(g[offs[lx]:offs[lx + 1]], ref.received[r][lx]), (r, lx)
        assert torch.equal(run.y[r], ref.y[r]), r


@pytest.mark.parametrize("T,H,W", [(4096, 7168, 8), (8192, 4096, 4), (199, 33, 3), (1, 4096, 2)])
def test_kernels_match_reference_bf16(monkeypatch, T, H, W):
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    torch.manual_seed(T + H)
    E = 8 * W
    ids = torch.stack([torch.randperm(E, device="cuda")[:8] for _ in range(T)])
    plan, S = _plan(ids, E, W)
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    packed = O.pack_rows(x, plan.pos, S)
    assert torch.equal(packed, pack_rows_reference(x, plan.pos, S))  # a copy: exact
    y = O.gather_sum(packed, plan.pos)
    # fp32 sums of <= W bf16 values in another order than torch's, then one bf16 rounding: the two
    # results differ by at most one bf16 ulp of the sum (2^-8 relative)
    torch.testing.assert_close(y, gather_sum_reference(packed, plan.pos), rtol=2**-7, atol=1e-2)
    torch.testing.assert_close(y.float(), x.float() * (plan.pos >= 0).sum(1, keepdim=True).float(), rtol=2**-7, atol=1e-2)


def test_nan_rows_and_non_contiguous_bf16(monkeypatch):
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    from moecomm.ep.nccl._triton import gather_sum_triton, pack_rows_triton

    T, H, W = 333, 4096, 4
    ids = torch.randint(0, 16, (T, 2), device="cuda")
    plan, S = _plan(ids, 16, W)
    x = torch.randn(T, 2 * H, device="cuda", dtype=torch.bfloat16)[:, H:]  # non-contiguous
    out = torch.full((S, H), float("nan"), device="cuda", dtype=torch.bfloat16)
    pack_rows_triton(x, plan.pos, S, out=out)
    assert not out.isnan().any()
    back = torch.full((T, H), float("nan"), device="cuda", dtype=torch.bfloat16)
    gather_sum_triton(out, plan.pos, out=back)
    assert not back.isnan().any()


def test_direct_launch_exact_for_every_layout(monkeypatch):
    """After its first launch of a specialisation, a kernel is launched without JITFunction.run
    (Triton 3.6): exact for aligned, misaligned and strided inputs and int64 indices, each of
    which Triton compiles separately, whatever order they come in."""
    import triton

    from moecomm.ep.nccl import _triton as DT

    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    T, H, W = 257, 4096, 4
    ids = torch.randint(0, 16, (T, 2), device="cuda")
    plan, S = _plan(ids, 16, W)
    big = torch.randn(T, H + 8, device="cuda").to(torch.bfloat16)
    layouts = {
        "contiguous": (big[:, :H].contiguous(), plan.pos),
        "misaligned": (big[:, 1:H + 1], plan.pos),  # address 2 bytes off, row stride H + 8
        "strided": (big.t().contiguous().t()[:, :H], plan.pos),  # column-major view
        "int64_pos": (big[:, :H].contiguous(), plan.pos.long()),
    }
    before = DT._pack_launcher.direct_launches, DT._gather_sum_launcher.direct_launches
    for _ in range(2):
        for name in ("contiguous", "misaligned", "strided", "int64_pos", "contiguous"):
            x, pos = layouts[name]
            assert torch.equal(O.pack_rows(x, pos, S), pack_rows_reference(x, pos, S)), name
            src = O.pack_rows(x, pos, S)
            torch.testing.assert_close(O.gather_sum(src, pos), gather_sum_reference(src, pos), rtol=2**-7, atol=1e-2)
    torch.cuda.synchronize()
    if triton.__version__.split(".")[:2] == ["3", "6"]:
        assert DT._pack_launcher.direct_launches > before[0] and DT._gather_sum_launcher.direct_launches > before[1]


def test_public_ops_replay_from_a_cuda_graph(monkeypatch):
    """pack_rows and gather_sum captured in a CUDA graph (warm-up on a side stream first) replay
    on new data in the captured input buffers: exact, as eager."""
    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    T, H, W = 513, 4096, 8
    ids = torch.stack([torch.randperm(64, device="cuda")[:8] for _ in range(T)])
    plan, S = _plan(ids, 64, W)
    x = torch.randint(-4, 5, (T, H), device="cuda").to(torch.bfloat16)

    def step():
        packed = O.pack_rows(x, plan.pos, S)
        return packed, O.gather_sum(packed, plan.pos)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        packed, y = step()
    for seed in range(3):
        g = torch.Generator(device="cuda").manual_seed(seed)
        x.copy_(torch.randint(-4, 5, (T, H), device="cuda", generator=g).to(torch.bfloat16))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(packed, pack_rows_reference(x, plan.pos, S))
        # integers in [-4, 4] summed over <= 8 copies: exact in fp32 and in bf16
        assert torch.equal(y, x * (plan.pos >= 0).sum(1, keepdim=True).to(torch.bfloat16))


def test_benchmark_kernel_mode_quick_with_graphs(tmp_path, monkeypatch):
    """bench_dispatch's kernel mode on tiny shapes, CUDA-graph column and --sweep included: the
    paths the full benchmark takes, in seconds."""
    import json
    import os

    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from benchmarks import bench_dispatch

    out = tmp_path / "r.jsonl"
    assert bench_dispatch.main(["--kernel", "--quick", "--sweep", "--rep", "3", "--out", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    graph = [r for r in recs if r["mode"] == "kernel" and r["timing"] == "graph"]
    assert len(graph) == len(bench_dispatch.QUICK_KERNEL_SHAPES) * 3 * 3 * 2  # (shapes x W + static) x ops x impls
    assert all(r["median_ms"] > 0 for r in graph)
    assert any(r["mode"] == "sweep" for r in recs)


def _nccl_worker(Ts, E, k, H, max_tokens=None):
    """Every rank: dispatch -> expert -> combine over NCCL (static mode with max_tokens); returns its
    outputs as numpy (by value)."""
    import torch.distributed as dist

    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    xs, ids, ws = _inputs(Ts, E, k, H, "cuda", skew=True)
    disp = D.EPDispatcher(E, k, H, dtype=torch.bfloat16, max_tokens=max_tokens)
    pl = disp.placement
    res = disp.dispatch(xs[rank], ids[rank], ws[rank], async_op=True).wait()
    n = int(res.expert_offsets[-1])  # static mode: the rows after it are padding
    local = torch.tensor(pl.local_experts(rank), dtype=torch.long, device="cuda")
    h = torch.zeros(res.gather_idx.shape[0], H, dtype=torch.bfloat16, device="cuda")
    h[:n] = _vector_expert(res.tokens[res.gather_idx[:n].long()],
                           local[torch.repeat_interleave(res.tokens_per_expert.long())], res.row_weights[:n])
    y = disp.combine(h, res.handle, async_op=True).wait()
    g = res.tokens[res.gather_idx[:n].long()]
    disp.check_overflow()
    return g.float().cpu().numpy(), res.expert_offsets.cpu().numpy(), y.float().cpu().numpy()


@pytest.mark.multigpu
@pytest.mark.parametrize("max_tokens", [None, 1024])
def test_nccl_two_ranks_bf16_exact(max_tokens):
    from moecomm.testing import run_distributed

    Ts, E, k, H = [1024, 0], 16, 4, 4096
    outs = run_distributed(2, _nccl_worker, Ts, E, k, H, max_tokens, backend="nccl", timeout_s=180)
    xs, ids, ws = _inputs(Ts, E, k, H, "cpu", skew=True)
    pl = ExpertPlacement(E, 2)
    ref = ep_reference(xs, ids, ws, pl, _expert)
    for r, (g, offs, y) in enumerate(outs):
        for lx in range(pl.num_local_experts(r)):
            assert torch.equal(torch.from_numpy(g[offs[lx]:offs[lx + 1]]), ref.received[r][lx].float()), (r, lx)
        assert torch.equal(torch.from_numpy(y), ref.y[r].float()), r


@pytest.mark.parametrize("T,E,k,H,scanned", [
    (4096, 64, 8, 512, False),   # the shape (H cut): the receiver's sort fused (256 blocks x 65 counts)
    (4096, 64, 8, 512, True),    # the same through the scan launch
    (8192, 256, 8, 256, False),  # 257 buckets x 512 blocks: past the limit, the scan launch on its own
    (333, 10, 3, 4096, False),   # k not a power of two, E not one either
])
def test_force_exchange_one_rank_bf16_exact_and_stable(monkeypatch, T, E, k, H, scanned):
    """EP size 1 through the exchange path (what bench_dispatch_onerank times), the compiled kernels:
    exact against the reference, twice with new routing (the workspace's kept views rewritten), the
    first result still exact after the second call (it owns its tensors)."""
    from moecomm.ep.nccl import _triton as K

    monkeypatch.setenv("MOECOMM_BACKEND", "triton")
    if scanned:
        monkeypatch.setattr(K, "PREFIX_MAX_ELEMS", 0)
    K.sort_shape.cache_clear()
    try:
        disp = D.EPDispatcher(E, k, H, dtype=torch.bfloat16, force_exchange=True)
        runs = []
        for seed in (0, 1):
            xs, ids, ws = _inputs([T], E, k, H, "cuda", skew=bool(seed), seed=seed)
            res = disp.dispatch(xs[0], ids[0], ws[0])
            runs.append((xs, ids, ws, res))
        pl = ExpertPlacement(E, 1)
        for xs, ids, ws, res in runs:
            local = torch.arange(E, device="cuda")[torch.repeat_interleave(res.tokens_per_expert.long())]
            y = disp.combine(_vector_expert(res.tokens[res.gather_idx.long()], local, res.row_weights), res.handle)
            ref = ep_reference([t.cpu() for t in xs], [t.cpu() for t in ids], [t.cpu() for t in ws], pl, _expert)
            g = res.tokens[res.gather_idx.long()].cpu()
            offs = res.expert_offsets.tolist()
            for e in range(E):
                assert torch.equal(g[offs[e]:offs[e + 1]], ref.received[0][e]), e
            assert torch.equal(y.cpu(), ref.y[0])
    finally:
        K.sort_shape.cache_clear()
