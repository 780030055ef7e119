"""The one-shot all-reduce's reduction step (kernels/allreduce/reduce.cu through moecomm.jit.cuda)
against its reference: exact on small-integer payloads, bit-identical on random ones (the kernel and
the reference add in the same rank order in fp32), W virtual ranks as separate buffers."""

# W = world_size (number of peer buffers), n = elements per buffer.

from __future__ import annotations

import time

import pytest
import torch

from moecomm.allreduce import reduce_sum
from moecomm.allreduce.reference import reduce_sum_reference
from moecomm.errors import MoeCommTypeError, MoeCommValueError

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
SIZES = (1, 7, 4096 + 3)


def _peers(world_size, n, dtype, device, *, integer, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for r in range(world_size):
        # rank r's buffer encodes r and the position (small integers: every partial sum is exact in
        # bf16/fp16/fp32, so any reordering or missed peer shows as a wrong value)
        if integer:
            t = (torch.arange(n) % 13 - 6 + r).to(dtype)
        else:
            t = torch.randn(n, generator=g).to(dtype)
        out.append(t.to(device))
    return out


def test_reference_sums_in_rank_order_in_fp32():
    a = torch.tensor([1.0, -0.0, 256.0], dtype=torch.bfloat16)
    b = torch.tensor([2.0**-9, -0.0, 1.0], dtype=torch.bfloat16)
    got = reduce_sum_reference([a, b, b])
    # 256 + 1 + 1: fp32 gives 258, which bf16 holds; added pairwise in bf16 (ulp 2 at 256) each
    # 257 is a tie that rounds to even, 256, and both ones are lost
    want = (a.float() + b.float() + b.float()).to(torch.bfloat16)
    assert torch.equal(got, want) and got[2].item() == 258.0 and (a + b + b)[2].item() == 256.0
    assert torch.signbit(got[1])  # -0.0 + -0.0 + -0.0 stays -0.0 (the sum starts from peers[0])
    assert torch.equal(reduce_sum_reference([a]), a)


@pytest.mark.parametrize("dtype", DTYPES)
def test_reduce_sum_cpu_runs_the_reference(dtype):
    peers = _peers(4, 4099, dtype, "cpu", integer=True)
    out = torch.full_like(peers[0], float("nan"))
    assert reduce_sum(peers, out=out) is out
    assert torch.equal(out, sum(p.float() for p in peers).to(dtype))


def test_reduce_sum_validates_its_arguments():
    x = torch.zeros(4)
    with pytest.raises(MoeCommTypeError, match="peers must be a list or tuple of torch.Tensor, got Tensor"):
        reduce_sum(x)
    with pytest.raises(MoeCommValueError, match="peers must hold 1 to 32 tensors, got 0"):
        reduce_sum([])
    with pytest.raises(MoeCommValueError, match="got 33"):
        reduce_sum([x] * 33)
    with pytest.raises(MoeCommTypeError, match=r"peers\[1\] must have dtype bfloat16, float16 or float32, got int32"):
        reduce_sum([x, x.int()])
    with pytest.raises(MoeCommValueError, match=r"peers\[1\] must match peers\[0\]"):
        reduce_sum([x, torch.zeros(5)])
    with pytest.raises(MoeCommValueError, match=r"peers\[0\] must be contiguous"):
        reduce_sum([torch.zeros(4, 2).t()])
    with pytest.raises(MoeCommValueError, match="out must be contiguous with shape"):
        reduce_sum([x, x], out=torch.zeros(3))
    with pytest.raises(MoeCommTypeError, match=r"peers\[1\] must be a torch.Tensor, got list"):
        reduce_sum([x, [1.0]])


@pytest.mark.gpu
def test_reduce_kernel_matches_reference_on_gpu(tmp_path, monkeypatch):
    """All dtypes, sizes 1 / 7 / 4099, W 2 / 4 / 8 virtual ranks (separate buffers): exact on integer
    payloads, bit-identical on random ones; misaligned buffers take the scalar path. The first call
    compiles into an empty cache, the second finds the cubin: both times are printed."""
    from moecomm.allreduce import _cuda
    from moecomm.jit import cuda

    err = cuda.toolchain_error()
    assert err is None, err
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path))  # a cold cache: the first call compiles
    monkeypatch.setenv("MOECOMM_BACKEND", "auto")
    dev = torch.device("cuda")
    cuda.forget_loaded()

    peers = _peers(2, 7, torch.bfloat16, dev, integer=True)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = reduce_sum(peers)
    torch.cuda.synchronize()
    first = time.perf_counter() - t0
    k = _cuda.kernel(torch.bfloat16, dev)
    assert k.compiled.compiled and str(k.compiled.path).startswith(str(tmp_path))
    cuda.forget_loaded()  # drop the in-process handles: the second call must come from the disk cache
    t0 = time.perf_counter()
    out2 = reduce_sum(peers)
    torch.cuda.synchronize()
    second = time.perf_counter() - t0
    assert not _cuda.kernel(torch.bfloat16, dev).compiled.compiled
    t0 = time.perf_counter()
    reduce_sum(peers)
    torch.cuda.synchronize()
    third = time.perf_counter() - t0
    print(f"\nreduce.cu first call (compile + load + run) {first * 1e3:.1f} ms; second (disk cache + load) "
          f"{second * 1e3:.1f} ms; third (in-process) {third * 1e3:.3f} ms")
    assert torch.equal(out, out2) and torch.equal(out, reduce_sum_reference(peers))

    for dtype in DTYPES:
        for n in SIZES:
            for world_size in (2, 4, 8):
                for integer in (True, False):
                    peers = _peers(world_size, n, dtype, dev, integer=integer, seed=n + world_size)
                    out = torch.full_like(peers[0], float("nan"))
                    got = reduce_sum(peers, out=out)
                    want = reduce_sum_reference([p.cpu() for p in peers])
                    assert got is out
                    assert torch.equal(out.cpu(), want), (dtype, n, world_size, integer)
                # misaligned by one element: the scalar path, same results
                base = [torch.zeros(n + 1, dtype=dtype, device=dev) for _ in range(world_size)]
                views = [b[1:] for b in base]
                for v, p in zip(views, _peers(world_size, n, dtype, dev, integer=True)):
                    v.copy_(p)
                assert views[0].data_ptr() % 16 != 0
                out = torch.full((n,), float("nan"), dtype=dtype, device=dev)
                reduce_sum(views, out=out)
                assert torch.equal(out.cpu(), reduce_sum_reference([v.cpu() for v in views])), (dtype, n, "misaligned")


@pytest.mark.gpu
def test_reduce_kernel_runs_on_torch_current_stream():
    """The launch goes on torch's current stream: work queued before it on a side stream is seen."""
    dev = torch.device("cuda")
    s = torch.cuda.Stream()
    a = torch.zeros(1 << 20, device=dev)
    b = torch.ones(1 << 20, device=dev)
    with torch.cuda.stream(s):
        torch.cuda._sleep(50_000_000)
        a.fill_(2.0)
        out = reduce_sum([a, b])
    s.synchronize()
    assert torch.equal(out, torch.full_like(a, 3.0))
