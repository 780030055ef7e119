"""GPU tier: long sequences in bf16 (4096, 33000), CUDA-graph capture and replay across plans,
device page ids clamped, plan() host time. Marked gpu: skipped without a CUDA device.

# B = batch, L = KV length, Hq / Hk = heads, D = head_dim, P = page_size
"""

from __future__ import annotations

import math
import time

import pytest
import torch

import moecomm.attention as A
from moecomm.attention import reference as ref

pytestmark = pytest.mark.gpu

BF16_ATOL = 1.6e-2  # bf16 keeps 8 bits: outputs |o| < ~1 round to within 2^-8 ~ 4e-3; P.V in bf16 adds ~ as much


def _cache(kv_lens, Hk, D, P, dtype=torch.bfloat16, layout="NHD", seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    npages = [math.ceil(n / P) for n in kv_lens]
    num_pages = sum(npages) + 7
    shape = (num_pages, P, Hk, D) if layout == "NHD" else (num_pages, Hk, P, D)
    k = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    v = torch.randn(shape, device="cuda", generator=gen).to(dtype)
    indices = torch.randperm(num_pages, device="cuda", generator=gen)[: sum(npages)].to(torch.int32)
    indptr = torch.tensor([0] + torch.tensor(npages).cumsum(0).tolist(), dtype=torch.int32)
    last = torch.tensor([n - (p - 1) * P for n, p in zip(kv_lens, npages)], dtype=torch.int32)
    return k, v, indices, indptr, last


@pytest.mark.parametrize("kv_lens,Hq,Hk,P", [([4096, 1, 33000], 32, 8, 16), ([33000, 4096], 8, 1, 1),
                                              ([4096] * 3, 64, 8, 128)])
@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_decode_long_bf16(kv_lens, Hq, Hk, P, layout):
    D = 128
    k, v, indices, indptr, last = _cache(kv_lens, Hk, D, P, layout=layout)
    q = torch.randn(len(kv_lens), Hq, D, device="cuda").to(torch.bfloat16)
    w = A.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"), kv_layout=layout)
    w.plan(indptr, indices, last, Hq, Hk, D, P, q_data_type=torch.bfloat16)
    out, lse = w.run(q, (k, v), return_lse=True)
    r_out, r_lse = ref.batch_decode(q, k, v, layout, indptr, indices.cpu(), last)
    torch.testing.assert_close(out.float(), r_out.float(), atol=BF16_ATOL, rtol=0)
    torch.testing.assert_close(lse, r_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("head_dim", [64, 256])
def test_decode_head_dims_fp16(head_dim):
    k, v, indices, indptr, last = _cache([4096, 17, 2], 2, head_dim, 16, dtype=torch.float16)
    q = torch.randn(3, 8, head_dim, device="cuda").half()
    w = A.BatchDecodeWithPagedKVCacheWrapper(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(indptr, indices, last, 8, 2, head_dim, 16, q_data_type=torch.float16)
    out = w.run(q, (k, v))
    r_out, _ = ref.batch_decode(q, k, v, "NHD", indptr, indices.cpu(), last)
    torch.testing.assert_close(out.float(), r_out.float(), atol=2e-3, rtol=0)


def test_decode_cuda_graph_replay_across_plans():
    """Capture run() once; re-plan with other lengths (same max batch); replay gives the new results."""
    D, Hq, Hk, P, max_batch = 128, 32, 8, 16, 8
    indptr_buf = torch.zeros(max_batch + 1, dtype=torch.int32, device="cuda")
    indices_buf = torch.zeros(8192, dtype=torch.int32, device="cuda")
    w = A.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"), use_cuda_graph=True,
                                             paged_kv_indptr_buffer=indptr_buf, paged_kv_indices_buffer=indices_buf)
    k1, v1, indices, indptr, last = _cache([5000, 3, 700, 1, 64, 2048, 9, 4096], Hk, D, P)
    k = torch.zeros(3000, P, Hk, D, device="cuda", dtype=torch.bfloat16)  # room for every later plan's pages
    v = torch.zeros_like(k)
    k[: k1.shape[0]].copy_(k1)
    v[: v1.shape[0]].copy_(v1)
    q = torch.randn(max_batch, Hq, D, device="cuda").to(torch.bfloat16)
    out = torch.empty_like(q)
    lse = torch.empty(max_batch, Hq, device="cuda")
    w.plan(indptr, indices, last, Hq, Hk, D, P, q_data_type=torch.bfloat16)
    w.run(q, (k, v), out=out, lse=lse, return_lse=True)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w.run(q, (k, v), out=out, lse=lse, return_lse=True)
    for seed, lens in enumerate(([5000, 3, 700, 1, 64, 2048, 9, 4096], [1, 1, 1, 1, 1, 1, 1, 33000], [4096] * 8)):
        k2, v2, indices2, indptr2, last2 = _cache(lens, Hk, D, P, seed=seed + 1)
        assert k2.shape[0] <= k.shape[0]
        k.zero_()
        v.zero_()
        k[: k2.shape[0]].copy_(k2)
        v[: v2.shape[0]].copy_(v2)
        w.plan(indptr2, indices2, last2, Hq, Hk, D, P, q_data_type=torch.bfloat16)
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        r_out, r_lse = ref.batch_decode(q, k, v, "NHD", indptr2, indices2.cpu(), last2)
        torch.testing.assert_close(out.float(), r_out.float(), atol=BF16_ATOL, rtol=0)
        torch.testing.assert_close(lse, r_lse, atol=2e-3, rtol=1e-4)


def test_prefill_cuda_graph_replay_across_plans():
    D, Hq, Hk, P, max_batch, max_tokens = 128, 8, 2, 16, 4, 3000
    w = A.BatchPrefillWithPagedKVCacheWrapper(
        torch.empty(1 << 20, dtype=torch.uint8, device="cuda"), use_cuda_graph=True,
        qo_indptr_buf=torch.zeros(max_batch + 1, dtype=torch.int32, device="cuda"),
        paged_kv_indices_buf=torch.zeros(4096, dtype=torch.int32, device="cuda"), max_num_qo_tokens=max_tokens)
    k = torch.zeros(4096, P, Hk, D, device="cuda", dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    q = torch.zeros(max_tokens, Hq, D, device="cuda", dtype=torch.bfloat16)
    out = torch.zeros_like(q)
    graph = None
    for seed, (qo_lens, kv_lens) in enumerate((([100, 1, 2000, 7], [5000, 1, 2000, 300]), ([2999], [3100]),
                                               ([1, 1], [9000, 17]))):
        k2, v2, indices, indptr, last = _cache(kv_lens, Hk, D, P, seed=seed)
        k[: k2.shape[0]].copy_(k2)
        v[: v2.shape[0]].copy_(v2)
        nnz = sum(qo_lens)
        q[:nnz].copy_(torch.randn(nnz, Hq, D, device="cuda").to(torch.bfloat16))
        qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
        w.plan(qo_indptr, indptr, indices, last, Hq, Hk, D, P, causal=True, q_data_type=torch.bfloat16)
        if graph is None:
            w.run(q, (k, v), out=out)  # compile outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                w.run(q, (k, v), out=out)
        graph.replay()
        torch.cuda.synchronize()
        r_out, _ = ref.batch_prefill(q[:nnz], qo_indptr, k, v, "NHD", indptr, indices.cpu(), last, causal=True)
        torch.testing.assert_close(out[:nnz].float(), r_out.float(), atol=BF16_ATOL, rtol=0)


@pytest.mark.parametrize("qo_lens,kv_lens", [([4096], [4096]), ([1, 300, 2000], [33000, 300, 4096])])
def test_prefill_long_bf16(qo_lens, kv_lens):
    D, Hq, Hk, P = 128, 8, 2, 16
    k, v, indices, indptr, last = _cache(kv_lens, Hk, D, P)
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(qo_lens), Hq, D, device="cuda").to(torch.bfloat16)
    w = A.BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8, device="cuda"))
    for kw in (dict(causal=True), dict(causal=True, window_left=1000), dict(causal=False, logits_soft_cap=30.0)):
        w.plan(qo_indptr, indptr, indices, last, Hq, Hk, D, P, q_data_type=torch.bfloat16, **kw)
        out, lse = w.run(q, (k, v), return_lse=True)
        r_out, r_lse = ref.batch_prefill(q, qo_indptr, k, v, "NHD", indptr, indices.cpu(), last, **kw)
        torch.testing.assert_close(out.float(), r_out.float(), atol=BF16_ATOL, rtol=0)
        torch.testing.assert_close(lse, r_lse, atol=2e-3, rtol=1e-4)


@pytest.mark.parametrize("qo_lens,kv_lens", [([4096] * 2, [4096] * 2), ([1, 300, 2000], [33000, 301, 4096])])
@pytest.mark.parametrize("kernel", ["v2", "v1"])
def test_prefill_consecutive_pages_bf16(monkeypatch, qo_lens, kv_lens, kernel):
    """v2's TMA path (each request's pages consecutive, host ids) and v1 on the same cache match the
    reference; the last pages' unused slots and page 0 hold NaN, so a tile read past kv_len (the
    TMA path reads whole tiles) that leaked into the output would fail."""
    from moecomm.attention import prefill as pre

    monkeypatch.setattr(pre, "PREFILL_KERNEL", kernel)
    monkeypatch.setattr(pre, "PREFILL_GLUON", False)  # v2's own TMA loop (the Gluon kernel: test_prefill_gluon)
    seen = []
    real = pre.launch
    monkeypatch.setattr(pre, "launch", lambda kern, grid, args, consts, *rest: (
        seen.append(dict(consts)), real(kern, grid, args, consts, *rest))[1])
    D, Hq, Hk, P = 128, 32, 8, 16
    k, v, _, indptr, last = _cache(kv_lens, Hk, D, P)
    nnz = int(indptr[-1])
    indices = torch.arange(1, nnz + 1, dtype=torch.int32)  # host ids, consecutive from page 1
    k[0] = float("nan")
    v[0] = float("nan")
    for b in range(len(kv_lens)):
        page, used = int(indices[int(indptr[b + 1]) - 1]), int(last[b])
        k[page, used:] = float("nan")
        v[page, used:] = float("nan")
    qo_indptr = torch.tensor([0] + torch.tensor(qo_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(qo_lens), Hq, D, device="cuda").to(torch.bfloat16)
    w = A.BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8, device="cuda"))
    for kw in (dict(causal=True), dict(causal=True, window_left=1000), dict(causal=False, logits_soft_cap=30.0)):
        w.plan(qo_indptr, indptr, indices, last, Hq, Hk, D, P, q_data_type=torch.bfloat16, **kw)
        out, lse = w.run(q, (k, v), return_lse=True)
        assert seen[-1].get("KV_TMA", False) is (kernel == "v2")
        r_out, r_lse = ref.batch_prefill(q, qo_indptr, k, v, "NHD", indptr, indices, last, **kw)
        assert not out.isnan().any()
        torch.testing.assert_close(out.float(), r_out.float(), atol=BF16_ATOL, rtol=0)
        torch.testing.assert_close(lse, r_lse, atol=2e-3, rtol=1e-4)


def test_append_then_decode_matches_prefill_of_all():
    """Prefill a prompt into pages with append, decode one more token: equals prefill over everything."""
    D, Hq, Hk, P, L = 128, 8, 2, 16, 1000
    k = torch.zeros(100, P, Hk, D, device="cuda", dtype=torch.bfloat16)
    v = torch.zeros_like(k)
    pages = torch.randperm(100, device="cuda")[: math.ceil((L + 1) / P)].to(torch.int32)
    kv_new = torch.randn(L + 1, Hk, D, device="cuda").to(torch.bfloat16)
    vv_new = torch.randn(L + 1, Hk, D, device="cuda").to(torch.bfloat16)
    indptr = torch.tensor([0, pages.shape[0]], dtype=torch.int32, device="cuda")
    last = torch.tensor([(L + 1) - (pages.shape[0] - 1) * P], dtype=torch.int32, device="cuda")
    bi, pos = A.get_batch_indices_positions(torch.tensor([0, L + 1], dtype=torch.int32, device="cuda"),
                                            A.get_seq_lens(indptr, last, P), L + 1)
    A.append_paged_kv_cache(kv_new, vv_new, bi, pos, (k, v), pages, indptr, last)
    q = torch.randn(1, Hq, D, device="cuda").to(torch.bfloat16)
    w = A.BatchDecodeWithPagedKVCacheWrapper(torch.empty(32 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(indptr.cpu(), pages, last.cpu(), Hq, Hk, D, P, q_data_type=torch.bfloat16)
    out = w.run(q, (k, v))
    r = torch.nn.functional.scaled_dot_product_attention(q[:, :, None].float(), kv_new.float().transpose(0, 1)[None],
                                                         vv_new.float().transpose(0, 1)[None], enable_gqa=True)
    torch.testing.assert_close(out.float(), r[:, :, 0], atol=BF16_ATOL, rtol=0)


def test_device_page_ids_are_clamped():
    k, v, indices, indptr, last = _cache([300, 20], 2, 128, 16)
    bad = indices.clone()
    bad[0], bad[1] = 10**7, -3
    w = A.BatchDecodeWithPagedKVCacheWrapper(torch.empty(32 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(indptr, bad, last, 8, 2, 128, 16, q_data_type=torch.bfloat16)
    out = w.run(torch.randn(2, 8, 128, device="cuda").to(torch.bfloat16), (k, v))
    torch.cuda.synchronize()  # an out-of-bounds read would fault here
    assert torch.isfinite(out.float()).all()


def test_plan_host_time():
    """plan() for B = 128 (L = 1024, P = 16, page ids on the device): printed (the issue's target is <= 30 us)."""
    B, P, L = 128, 16, 1024
    indptr = torch.arange(0, B * (L // P) + 1, L // P, dtype=torch.int32)
    indices = torch.randperm(B * (L // P), device="cuda").to(torch.int32)
    last = torch.full((B,), P, dtype=torch.int32)
    w = A.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device="cuda"))
    res = {}
    for name, Hq, ind in (("device ids", 64, indices), ("host ids", 64, indices.cpu()), ("split, B=16", 32, None)):
        if ind is None:
            ip, ind_, la = indptr[:17], indices[: 16 * (L // P)], last[:16]
        else:
            ip, ind_, la = indptr, ind, last
        for _ in range(5):
            w.plan(ip, ind_, la, Hq, 8, 128, P, q_data_type=torch.bfloat16)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            w.plan(ip, ind_, la, Hq, 8, 128, P, q_data_type=torch.bfloat16)
        res[name] = (time.perf_counter() - t0) / 50 * 1e6
    # the prefill wrapper's plan() at the benchmark's shape (8 x 4096 causal, host ids, shuffled pages)
    pp = 4096 // P
    p_indptr = torch.arange(0, 8 * pp + 1, pp, dtype=torch.int32)
    p_ids, p_last = torch.randperm(8 * pp).to(torch.int32), torch.full((8,), P, dtype=torch.int32)
    qo = torch.arange(0, 8 * 4096 + 1, 4096, dtype=torch.int32)
    pw = A.BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8, device="cuda"))
    pplan = lambda: pw.plan(qo, p_indptr, p_ids, p_last, 32, 8, 128, P, causal=True, q_data_type=torch.bfloat16)
    for _ in range(5):
        pplan()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(50):
        pplan()
    res["prefill 8x4096 host ids"] = (time.perf_counter() - t0) / 50 * 1e6
    print("plan() host us:", {k: round(v, 1) for k, v in res.items()})
    # the target is 30 us; on the sandboxed H200 host measured (2026-12-01) one driver call
    # costs ~10 us and this was 51.5 us with a pinned buffer + event: a guard against regressions
    assert res["device ids"] <= 60.0, res


@pytest.mark.parametrize("fp8", ["float8_e4m3fn", "float8_e5m2"])
def test_decode_fp8_kv(fp8):
    """An fp8 cache with bf16 queries: widened in the kernel; k_scale / v_scale as dequantisation scales."""
    dt = getattr(torch, fp8)
    k, v, indices, indptr, last = _cache([4096, 33, 1], 2, 128, 16)
    k8, v8 = (k * 0.5).to(dt), (v * 0.25).to(dt)  # stored scaled: k = 2 * k8, v = 4 * v8
    q = torch.randn(3, 8, 128, device="cuda").to(torch.bfloat16)
    w = A.BatchDecodeWithPagedKVCacheWrapper(torch.empty(64 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(indptr, indices, last, 8, 2, 128, 16, q_data_type=torch.bfloat16, kv_data_type=dt)
    out = w.run(q, (k8, v8), k_scale=2.0, v_scale=4.0)
    r_out, _ = ref.batch_decode(q, (k8.float() * 2).to(torch.bfloat16), (v8.float() * 4).to(torch.bfloat16), "NHD",
                                indptr, indices.cpu(), last)
    torch.testing.assert_close(out.float(), r_out.float(), atol=3e-2, rtol=0)
