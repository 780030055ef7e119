"""BatchDecodeWithPagedKVCacheWrapper: the reference against a float64 truth; the Triton kernel
(interpreter on CPU, compiled on GPU) against the reference over page sizes, GQA ratios, lengths,
layouts, split-KV, window, soft-cap; CUDA-graph-mode buffers; bad input.

# B = batch, Hq / Hk = heads, D = head_dim, P = page_size
"""

from __future__ import annotations

import math

import pytest
import torch
from attn_helpers import ATOL, LSE_ATOL, PagedKV, request_kv, workspace

from moecomm.attention import BatchDecodeWithPagedKVCacheWrapper
from moecomm.attention import reference as ref
from moecomm.errors import MoeCommTypeError, MoeCommValueError


def _truth(q, cache, sm_scale=None, window_left=-1, soft_cap=None):
    """float64, written without reference.py's helpers: gather token by token."""
    B, Hq, D = q.shape
    sm_scale = 1 / math.sqrt(D) if sm_scale is None else sm_scale
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    lse = torch.full((B, Hq), float("-inf"), dtype=torch.float64)
    Hk = cache.k.shape[2] if cache.layout == "NHD" else cache.k.shape[1]
    for b, n in enumerate(cache.kv_lens):
        if n == 0:
            continue
        K, V = request_kv(cache, b)  # [n, Hk, D]
        for h in range(Hq):
            x = K[:, h // (Hq // Hk)] @ q[b, h].double().cpu() * sm_scale
            if soft_cap:
                x = soft_cap * torch.tanh(x / soft_cap)
            if window_left >= 0:
                x[: max(0, n - 1 - window_left)] = float("-inf")
            p = torch.softmax(x, 0)
            out[b, h] = p @ V[:, h // (Hq // Hk)]
            lse[b, h] = torch.logsumexp(x, 0) / math.log(2)
    return out, lse


def _run(cache, q, device, **plan_kw):
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(device), kv_layout=cache.layout)
    _, Hq, D = q.shape
    Hk = cache.k.shape[2] if cache.layout == "NHD" else cache.k.shape[1]
    w.plan(cache.indptr, cache.indices, cache.last_page_len, Hq, Hk, D, cache.page_size, q_data_type=q.dtype, **plan_kw)
    out, lse = w.run(q, (cache.k, cache.v), return_lse=True)
    return out, lse, w


def _close(out, lse, t_out, t_lse, dtype):
    assert not out.isnan().any()
    torch.testing.assert_close(out.double().cpu(), t_out, atol=ATOL[dtype], rtol=0)
    fin = torch.isfinite(t_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin)
    torch.testing.assert_close(lse.double().cpu()[fin], t_lse[fin], atol=LSE_ATOL * 10, rtol=1e-5)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("window_left,soft_cap", [(-1, None), (5, None), (-1, 3.0)])
def test_reference_matches_float64(layout, window_left, soft_cap):
    cache = PagedKV([1, 2, 17, 40, 0], 2, 64, 16, dtype=torch.float32, layout=layout)
    q = torch.randn(5, 8, 64)
    out, lse = ref.batch_decode(q, cache.k, cache.v, layout, cache.indptr, cache.indices, cache.last_page_len,
                                window_left=window_left, logits_soft_cap=soft_cap)
    t_out, t_lse = _truth(q, cache, window_left=window_left, soft_cap=soft_cap)
    _close(out, lse, t_out, t_lse, torch.float32)


CASES = [  # (kv_lens, Hq, Hk, D, P)
    ([1, 2, 17], 8, 2, 64, 16),        # GQA 4
    ([1023, 5], 4, 4, 64, 16),         # MHA, multi-block
    ([33, 200], 8, 1, 128, 1),         # MQA, page size 1
    ([129, 7, 0], 6, 2, 64, 128),      # group 3 (not a power of two), page 128, an empty request
    ([300], 16, 2, 256, 5),            # head_dim 256, page size 5 (not a power of two)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"L{c[0]}-H{c[1]}/{c[2]}-D{c[3]}-P{c[4]}")
@pytest.mark.parametrize("split", ["auto", "forced", "off"])
def test_triton_matches_reference(triton_backend, case, split):
    kv_lens, Hq, Hk, D, P = case
    dtype = torch.float16
    cache = PagedKV(kv_lens, Hk, D, P, dtype=dtype, device=triton_backend, layout="HND" if P == 5 else "NHD")
    q = torch.randn(len(kv_lens), Hq, D, dtype=dtype, device=triton_backend)
    kw = {"auto": {}, "forced": dict(kv_chunk_size=64), "off": dict(disable_split_kv=True)}[split]
    out, lse, w = _run(cache, q, triton_backend, **kw)
    if split == "off":
        assert w._plan["direct"]
    if split == "forced" and max(kv_lens) > 64:
        assert w._plan["num_work"] > len(kv_lens) and not w._plan["direct"]
    t_out, t_lse = _truth(q, cache)
    _close(out, lse, t_out, t_lse, dtype)


@pytest.mark.parametrize("window_left,soft_cap,sm_scale", [(9, None, None), (-1, 2.5, None), (0, None, 0.3)])
def test_triton_window_softcap_scale(triton_backend, window_left, soft_cap, sm_scale):
    cache = PagedKV([1, 40, 150], 2, 64, 16, device=triton_backend)
    q = torch.randn(3, 4, 64, dtype=torch.float16, device=triton_backend)
    out, lse, _ = _run(cache, q, triton_backend, window_left=window_left, logits_soft_cap=soft_cap, sm_scale=sm_scale,
                       kv_chunk_size=64)
    t_out, t_lse = _truth(q, cache, sm_scale=sm_scale, window_left=window_left, soft_cap=soft_cap)
    _close(out, lse, t_out, t_lse, torch.float16)


def test_fp32_and_one_tensor_cache(triton_backend):
    cache = PagedKV([17, 3], 2, 64, 4, dtype=torch.float32, device=triton_backend)
    q = torch.randn(2, 4, 64, device=triton_backend)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(triton_backend))
    w.plan(cache.indptr, cache.indices, cache.last_page_len, 4, 2, 64, 4, data_type=torch.float32)
    both = torch.stack((cache.k, cache.v), dim=1)  # [num_pages, 2, P, Hk, D]
    out = w.run(q, both)
    t_out, _ = _truth(q, cache)
    torch.testing.assert_close(out.double().cpu(), t_out, atol=ATOL[torch.float32], rtol=0)


def test_plan_reused_and_out_buffers(triton_backend):
    """One plan, several run() calls (the layers), into caller-owned out / lse."""
    cache = PagedKV([20, 50], 2, 64, 8, device=triton_backend)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(triton_backend))
    w.plan(cache.indptr, cache.indices, cache.last_page_len, 4, 2, 64, 8, q_data_type="float16", kv_chunk_size=16)
    out = torch.full((2, 4, 64), float("nan"), dtype=torch.float16, device=triton_backend)
    lse = torch.full((2, 4), float("nan"), device=triton_backend)
    for seed in range(2):
        torch.manual_seed(seed)
        q = torch.randn(2, 4, 64, dtype=torch.float16, device=triton_backend)
        res = w.run(q, (cache.k, cache.v), out=out, lse=lse, return_lse=True)
        assert res[0] is out and res[1] is lse
        _close(out, lse, *_truth(q, cache), torch.float16)


def test_cuda_graph_mode_buffers(triton_backend):
    """Graph mode: buffers fixed at construction; a later plan with another batch and other lengths
    reuses them (same addresses), and results stay right."""
    dev = triton_backend
    indptr_buf = torch.zeros(5, dtype=torch.int32, device=dev)
    indices_buf = torch.zeros(64, dtype=torch.int32, device=dev)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(dev), use_cuda_graph=True, paged_kv_indptr_buffer=indptr_buf,
                                           paged_kv_indices_buffer=indices_buf)
    addrs = None
    for kv_lens in ([5, 70, 1, 33], [100, 2]):
        cache = PagedKV(kv_lens, 2, 64, 8, device=dev)
        q = torch.randn(len(kv_lens), 4, 64, dtype=torch.float16, device=dev)
        w.plan(cache.indptr, cache.indices, cache.last_page_len, 4, 2, 64, 8, q_data_type=torch.float16)
        p = w._plan
        now = (p["meta"].data_ptr(), p["kv_indices"].data_ptr(), p["part_o"].data_ptr(), p["num_programs"])
        assert addrs is None or now == addrs
        addrs = now
        out, lse = w.run(q, (cache.k, cache.v), return_lse=True)
        _close(out, lse, *_truth(q, cache), torch.float16)
    with pytest.raises(MoeCommValueError, match="batch size must be <= 4"):
        cache = PagedKV([1] * 5, 2, 64, 8)
        w.plan(cache.indptr, cache.indices, cache.last_page_len, 4, 2, 64, 8, q_data_type=torch.float16)


def _plan(w, cache, **kw):
    args = dict(indptr=cache.indptr, indices=cache.indices, last_page_len=cache.last_page_len, num_qo_heads=4,
                num_kv_heads=2, head_dim=64, page_size=cache.page_size, q_data_type=torch.float16)
    args.update(kw)
    w.plan(**args)


def test_bad_input():
    cache = PagedKV([5, 20], 2, 64, 8)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace())
    with pytest.raises(MoeCommValueError, match="num_qo_heads must be a multiple of num_kv_heads"):
        _plan(w, cache, num_qo_heads=5)
    with pytest.raises(MoeCommValueError, match="head_dim must be one of"):
        _plan(w, cache, head_dim=96)
    with pytest.raises(MoeCommValueError, match="non-decreasing"):
        _plan(w, cache, indptr=torch.tensor([0, 3, 2], dtype=torch.int32))
    with pytest.raises(MoeCommValueError, match=r"indptr\[0\] must be 0"):
        _plan(w, cache, indptr=torch.tensor([1, 3, 4], dtype=torch.int32))
    with pytest.raises(MoeCommValueError, match="indices must be >= 0"):
        _plan(w, cache, indices=torch.tensor([0, -1, 2, 3], dtype=torch.int32))
    with pytest.raises(MoeCommValueError, match="indices must be < num_pages"):
        _plan(w, cache, indices=torch.tensor([0, 1, 2, 99], dtype=torch.int32), num_pages=cache.num_pages)
    with pytest.raises(MoeCommValueError, match="indices must hold"):
        _plan(w, cache, indices=cache.indices[:2])
    with pytest.raises(MoeCommValueError, match="last_page_len must be in"):
        _plan(w, cache, last_page_len=torch.tensor([9, 4], dtype=torch.int32))
    with pytest.raises(MoeCommTypeError, match="kv_data_type must equal"):
        _plan(w, cache, kv_data_type=torch.bfloat16)
    with pytest.raises(MoeCommTypeError, match="indptr must have dtype int32 or int64"):
        _plan(w, cache, indptr=cache.indptr.float())
    with pytest.raises(MoeCommValueError, match="run\\(\\) must follow plan"):
        BatchDecodeWithPagedKVCacheWrapper(workspace()).run(torch.zeros(2, 4, 64), (cache.k, cache.v))
    _plan(w, cache, indices=torch.tensor([0, 1, 2, cache.num_pages + 4], dtype=torch.int32))
    q = torch.randn(2, 4, 64, dtype=torch.float16)
    with pytest.raises(MoeCommValueError, match="indices must be < num_pages"):  # caught at run from host data
        w.run(q, (cache.k, cache.v))
    _plan(w, cache)
    with pytest.raises(MoeCommTypeError, match="q must have dtype float16"):
        w.run(q.float(), (cache.k, cache.v))
    with pytest.raises(MoeCommValueError, match="q must have shape"):
        w.run(q[:1], (cache.k, cache.v))
    with pytest.raises(MoeCommValueError, match="k_cache must have shape"):
        w.run(q, (cache.k.transpose(1, 2), cache.v))
    with pytest.raises(MoeCommTypeError, match="k_cache must have dtype"):
        w.run(q, (cache.k.float(), cache.v.float()))


def test_plan_host_time():
    """plan() host cost at B = 128, L = 4096, P = 16 (host indices): printed; the GPU tier asserts it."""
    import time

    B, P = 128, 16
    indptr = torch.arange(0, B * 256 + 1, 256, dtype=torch.int32)
    indices = torch.randperm(B * 256).to(torch.int32)
    last = torch.full((B,), P, dtype=torch.int32)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace())
    for _ in range(3):
        w.plan(indptr, indices, last, 64, 8, 128, P, q_data_type=torch.bfloat16)
    t0 = time.perf_counter()
    for _ in range(20):
        w.plan(indptr, indices, last, 64, 8, 128, P, q_data_type=torch.bfloat16)
    us = (time.perf_counter() - t0) / 20 * 1e6
    print(f"plan() host time B={B}: {us:.1f} us")
    assert us < 2000  # a CPU-only CI box; the figure that counts is the GPU tier's


def test_empty_batch_and_strided_q(triton_backend):
    """B = 0 plans and runs; q as a view of a fused QKV projection (row stride > Hq * D) works."""
    dev = triton_backend
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(dev))
    w.plan(torch.zeros(1, dtype=torch.int32), torch.zeros(0, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
           4, 2, 64, 8, q_data_type=torch.float16)
    k = torch.zeros(3, 8, 2, 64, dtype=torch.float16, device=dev)
    assert w.run(torch.zeros(0, 4, 64, dtype=torch.float16, device=dev), (k, k)).shape == (0, 4, 64)
    cache = PagedKV([30, 7], 2, 64, 8, device=dev)
    qkv = torch.randn(2, (4 + 2 + 2) * 64, dtype=torch.float16, device=dev)
    q = qkv[:, : 4 * 64].view(2, 4, 64)
    assert not q.is_contiguous()
    out, lse, _ = _run(cache, q, dev, kv_chunk_size=16)
    _close(out, lse, *_truth(q, cache), torch.float16)


def test_grid_order_and_grid_cap(triton_backend, monkeypatch):
    """Both grid orders of the decode kernel, and more work items than programs (the in-kernel loop)."""
    from moecomm.attention import decode as dec

    cache = PagedKV([70, 9, 130], 2, 64, 16, device=triton_backend)
    q = torch.randn(3, 4, 64, dtype=torch.float16, device=triton_backend)
    monkeypatch.setattr(dec, "HEADS_FIRST", False)
    monkeypatch.setattr(dec, "_MAX_GRID", 2)
    for chunk in (None, 64):
        out, lse, w = _run(cache, q, triton_backend, **({} if chunk is None else dict(kv_chunk_size=chunk)))
        assert w._plan["num_programs"] == 2
        _close(out, lse, *_truth(q, cache), torch.float16)
