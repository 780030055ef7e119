"""CustomAllReduce under torch.compile(fullgraph=True): its calls are custom ops
(moecomm/allreduce/ops.py) found by an int handle. CPU: gloo groups of 1 and 2 ranks, where
CustomAllReduce takes its fallback (torch.distributed.all_reduce inside the op): compiled ==
eager, bit for bit, and both == the exact sum of small-integer payloads; the fakes match the
real op (torch.library.opcheck); a closed all-reduce's handle raises a clear error.
GPU (test_compiled_ipc_paths_at_one_rank): a one-rank group on one GPU, where the IPC kernels run
at W 1 (one-shot, two-shot, fused RMSNorm inside the ops): compiled == eager bit for bit."""

# W = world_size, n = elements per rank.

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from moecomm.allreduce import CustomAllReduce
from moecomm.allreduce import ops as ar_ops
from moecomm.allreduce.reference import residual_rmsnorm_reference
from moecomm.errors import MoeCommValueError
from moecomm.testing import run_distributed


def _payload(rank: int, shape, dtype) -> torch.Tensor:
    # small integers: every partial sum is exact in bf16, so any order of addition gives the same bits
    n = 1
    for s in shape:
        n *= s
    return ((torch.arange(n) * 7 + 3 * rank) % 11 - 5).to(dtype).view(shape)


def _compiled_vs_eager(dtype_name: str) -> str:
    torch._dynamo.reset()
    dtype = getattr(torch, dtype_name)
    W, rank = dist.get_world_size(), dist.get_rank()
    ar = CustomAllReduce(max_size=1 << 16)
    x = _payload(rank, (33, 64), dtype)
    res = _payload(7, (33, 64), dtype)  # replicated residual
    weight = (torch.arange(64) % 3 + 1).to(dtype)
    want = sum(_payload(r, (33, 64), torch.float64) for r in range(W)).to(dtype)

    def step(x, res, weight):
        y = ar.all_reduce(x)
        out, new_res = ar.all_reduce_residual_rmsnorm(x, res, weight, eps=1e-6)
        z = torch.empty_like(x)
        ar.all_reduce(x * 2, out=z)
        return y, out, new_res, z

    eager = step(x, res, weight)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, res, weight)
    assert torch.equal(eager[0], want), "eager all_reduce is not the exact sum"
    assert torch.equal(eager[3], (2 * want.double()).to(dtype))
    ref_out, ref_res = residual_rmsnorm_reference(want, res, weight, 1e-6)
    assert torch.equal(eager[1], ref_out) and torch.equal(eager[2], ref_res)
    for i, (a, b) in enumerate(zip(eager, compiled)):
        assert a.dtype == b.dtype and a.shape == b.shape, (i, a.shape, b.shape)
        assert torch.equal(a, b), f"output {i}: compiled differs from eager"
    # the graph holds the custom ops (one node each), not an inlined torch.distributed call
    targets = []

    def record(gm, example_inputs):
        targets.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(step, fullgraph=True, backend=record)(x, res, weight)
    assert sum("moecomm.ipc_all_reduce.default" in t for t in targets) == 2, targets
    assert sum("moecomm.ipc_all_reduce_residual_rmsnorm.default" in t for t in targets) == 1, targets
    assert not any("all_reduce" in t and "moecomm" not in t for t in targets), targets
    ar.close()
    return "ok"


@pytest.mark.parametrize("world_size", [1, 2])
def test_compiled_equals_eager_gloo(world_size):
    assert run_distributed(world_size, _compiled_vs_eager, "bfloat16", start_method="spawn") == ["ok"] * world_size


def _opcheck_and_closed() -> str:
    ar = CustomAllReduce(max_size=1 << 16)
    x = _payload(0, (5, 16), torch.float32)
    res, weight = _payload(1, (5, 16), torch.float32), torch.ones(16)
    torch.library.opcheck(ar_ops.ipc_all_reduce.op, (x, ar._handle))
    torch.library.opcheck(ar_ops.ipc_all_reduce_residual_rmsnorm.op, (x, res, weight, 1e-6, ar._handle))
    h = ar._handle
    ar.close()
    try:
        torch.ops.moecomm.ipc_all_reduce(x, h)
    except MoeCommValueError as exc:
        assert "handle must name a live CustomAllReduce" in str(exc), str(exc)
        return "ok"
    raise AssertionError("a closed all-reduce's handle did not raise")


def _eager_skips_the_op() -> str:
    ar = CustomAllReduce(max_size=1 << 16)
    x = _payload(0, (5, 16), torch.float32)

    class Refuse:
        op = staticmethod(lambda *a: (_ for _ in ()).throw(AssertionError("eager call went through the op")))

    real = ar_ops.ipc_all_reduce, ar_ops.ipc_all_reduce_residual_rmsnorm
    ar_ops.ipc_all_reduce = ar_ops.ipc_all_reduce_residual_rmsnorm = Refuse()
    try:
        assert torch.equal(ar.all_reduce(x), x)
        out, res = ar.all_reduce_residual_rmsnorm(x, x, torch.ones(16))
        assert torch.equal(res, 2 * x)
    finally:
        ar_ops.ipc_all_reduce, ar_ops.ipc_all_reduce_residual_rmsnorm = real
    ar.close()
    return "ok"


def test_eager_calls_skip_the_dispatcher():
    """The eager path stays as it was: the implementation is called directly, not the registered op."""
    assert run_distributed(1, _eager_skips_the_op, start_method="spawn") == ["ok"]


def test_opcheck_and_closed_handle():
    assert run_distributed(1, _opcheck_and_closed, start_method="spawn") == ["ok"]


@pytest.mark.gpu
def test_compiled_ipc_paths_at_one_rank(tmp_path):
    """CustomAllReduce on one GPU over a one-rank gloo group: the IPC kernels (ctypes launches through
    the driver API, untraceable by dynamo) inside the custom ops."""
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        dev = torch.device("cuda", torch.cuda.current_device())
        one = CustomAllReduce(device=dev, max_size=1 << 20, timeout_s=10.0)
        if not one.ipc:
            pytest.skip(f"not eligible at one rank: {one.eligibility.reason}")
        two = CustomAllReduce(device=dev, max_size=1 << 20, timeout_s=10.0, oneshot_max_bytes=0)
        with one, two:
            for ar, algo in ((one, "ONESHOT"), (two, "TWOSHOT")):
                x = _payload(0, (9, 4096), torch.bfloat16).to(dev)
                res = _payload(3, (9, 4096), torch.bfloat16).to(dev)
                weight = (torch.arange(4096) % 3 + 1).to(torch.bfloat16).to(dev)
                assert ar.path_for(x.numel() * 2).name == algo

                def step(x, res, weight):
                    y = ar.all_reduce(x)
                    out, new_res = ar.all_reduce_residual_rmsnorm(x, res, weight, eps=1e-6)
                    return y, out, new_res

                eager = step(x, res, weight)
                torch._dynamo.reset()
                compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, res, weight)
                torch.cuda.synchronize()
                ar.check()
                assert torch.equal(eager[0], x)  # W 1: the sum is x
                for a, b in zip(eager, compiled):
                    assert torch.equal(a, b), algo
    finally:
        dist.destroy_process_group()
