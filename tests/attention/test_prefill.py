"""BatchPrefillWithPagedKVCacheWrapper / BatchPrefillWithRaggedKVCacheWrapper: the reference against
a float64 truth; the Triton kernel against the reference over ragged batches, page sizes, GQA, masks
(causal, window, custom bool and packed bits, soft-cap), layouts; bad input.

# B = batch, Hq / Hk = heads, D = head_dim, P = page_size
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from attn_helpers import ATOL, LSE_ATOL, PagedKV, request_kv, workspace

from moecomm.attention import (
    BatchPrefillWithPagedKVCacheWrapper,
    BatchPrefillWithRaggedKVCacheWrapper,
)
from moecomm.attention import reference as ref
from moecomm.errors import MoeCommValueError


def _truth(q, qo_lens, cache, causal=False, window_left=-1, soft_cap=None, sm_scale=None, masks=None):
    """float64, query by query: the visible keys listed explicitly."""
    nnz, Hq, D = q.shape
    sm_scale = 1 / math.sqrt(D) if sm_scale is None else sm_scale
    out = torch.zeros(nnz, Hq, D, dtype=torch.float64)
    lse = torch.full((nnz, Hq), float("-inf"), dtype=torch.float64)
    Hk = cache.k.shape[2] if cache.layout == "NHD" else cache.k.shape[1]
    row = 0
    for b, (qn, kn) in enumerate(zip(qo_lens, cache.kv_lens)):
        K, V = request_kv(cache, b) if kn else (None, None)
        for i in range(qn):
            pos = kn - qn + i
            vis = [j for j in range(kn) if (not causal or j <= pos) and (window_left < 0 or j >= pos - window_left)
                   and (masks is None or bool(masks[b][i, j]))]
            if vis:
                for h in range(Hq):
                    x = K[vis, h // (Hq // Hk)] @ q[row + i, h].double().cpu() * sm_scale
                    if soft_cap:
                        x = soft_cap * torch.tanh(x / soft_cap)
                    out[row + i, h] = torch.softmax(x, 0) @ V[vis, h // (Hq // Hk)]
                    lse[row + i, h] = torch.logsumexp(x, 0) / math.log(2)
        row += qn
    return out, lse


def _close(out, lse, t_out, t_lse, dtype):
    assert not out.isnan().any()
    torch.testing.assert_close(out.double().cpu(), t_out, atol=ATOL[dtype], rtol=0)
    fin = torch.isfinite(t_lse)
    assert torch.equal(torch.isfinite(lse.cpu()), fin)
    torch.testing.assert_close(lse.double().cpu()[fin], t_lse[fin], atol=LSE_ATOL * 10, rtol=1e-5)


def _setup(qo_lens, kv_lens, Hq, Hk, D, P, dtype=torch.float16, device="cpu", layout="NHD", seed=0):
    cache = PagedKV(kv_lens, Hk, D, P, dtype=dtype, layout=layout, device=device, seed=seed)
    qo_indptr = torch.tensor([0] + np.cumsum(qo_lens).tolist(), dtype=torch.int32)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(int(qo_indptr[-1]), Hq, D, generator=gen).to(dtype).to(device)
    return cache, qo_indptr, q


def _run(cache, qo_indptr, q, device, **kw):
    w = BatchPrefillWithPagedKVCacheWrapper(workspace(device, 1), kv_layout=cache.layout)
    Hk = cache.k.shape[2] if cache.layout == "NHD" else cache.k.shape[1]
    w.plan(qo_indptr, cache.indptr, cache.indices, cache.last_page_len, q.shape[1], Hk, q.shape[2], cache.page_size,
           q_data_type=q.dtype, **kw)
    return w.run(q, (cache.k, cache.v), return_lse=True)


@pytest.mark.parametrize("causal,window_left,soft_cap", [(False, -1, None), (True, -1, None), (True, 3, 2.0)])
def test_reference_matches_float64(causal, window_left, soft_cap):
    qo_lens, kv_lens = [3, 1, 6], [3, 9, 10]
    cache, qo_indptr, q = _setup(qo_lens, kv_lens, 4, 2, 64, 4, dtype=torch.float32)
    out, lse = ref.batch_prefill(q, qo_indptr, cache.k, cache.v, "NHD", cache.indptr, cache.indices, cache.last_page_len,
                                 causal=causal, window_left=window_left, logits_soft_cap=soft_cap)
    _close(out, lse, *_truth(q, qo_lens, cache, causal, window_left, soft_cap), torch.float32)


CASES = [  # (qo_lens, kv_lens, Hq, Hk, D, P, layout)
    ([1, 2, 17], [1, 2, 17], 4, 2, 64, 16, "NHD"),          # lengths 1, 2, 17; prefill from empty
    ([5, 17, 1, 40], [5, 30, 100, 40], 8, 2, 64, 16, "HND"),  # ragged, queries after a cached prefix
    ([130], [200], 2, 1, 128, 1, "NHD"),                     # MQA, page size 1, two query tiles
    ([33, 0, 7], [33, 12, 7], 6, 2, 64, 128, "NHD"),         # group 3, page 128, a request with no queries
    ([6, 2], [3, 0], 2, 2, 64, 4, "NHD"),                    # more queries than keys; no keys at all
    ([20, 3], [40, 3], 2, 1, 256, 16, "HND"),                # head_dim 256 (its own tile shape)
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"Q{c[0]}-KV{c[1]}-H{c[2]}/{c[3]}-D{c[4]}-P{c[5]}-{c[6]}")
@pytest.mark.parametrize("causal", [False, True])
def test_triton_matches_truth(triton_backend, case, causal):
    qo_lens, kv_lens, Hq, Hk, D, P, layout = case
    cache, qo_indptr, q = _setup(qo_lens, kv_lens, Hq, Hk, D, P, device=triton_backend, layout=layout)
    out, lse = _run(cache, qo_indptr, q, triton_backend, causal=causal)
    _close(out, lse, *_truth(q, qo_lens, cache, causal), torch.float16)


def test_triton_long_sequence(triton_backend):
    """1023 queries over 1023 keys, causal: many KV blocks, the unmasked middle loop, tile ordering."""
    cache, qo_indptr, q = _setup([1023], [1023], 2, 1, 64, 16, device=triton_backend)
    out, lse = _run(cache, qo_indptr, q, triton_backend, causal=True)
    r_out, r_lse = ref.batch_prefill(q, qo_indptr, cache.k, cache.v, "NHD", cache.indptr, cache.indices,
                                     cache.last_page_len, causal=True)
    torch.testing.assert_close(out.float().cpu(), r_out.float().cpu(), atol=ATOL[torch.float16], rtol=0)
    torch.testing.assert_close(lse.cpu(), r_lse.cpu(), atol=LSE_ATOL * 10, rtol=1e-5)


@pytest.mark.parametrize("window_left,soft_cap,sm_scale", [(0, None, None), (20, None, None), (5, 3.0, 0.2)])
def test_triton_window_softcap(triton_backend, window_left, soft_cap, sm_scale):
    qo_lens, kv_lens = [70, 3], [150, 3]
    cache, qo_indptr, q = _setup(qo_lens, kv_lens, 4, 2, 64, 16, device=triton_backend)
    out, lse = _run(cache, qo_indptr, q, triton_backend, causal=True, window_left=window_left, logits_soft_cap=soft_cap,
                    sm_scale=sm_scale)
    _close(out, lse, *_truth(q, qo_lens, cache, True, window_left, soft_cap, sm_scale), torch.float16)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_triton_custom_mask(triton_backend, packed, causal):
    qo_lens, kv_lens = [5, 17, 9], [5, 30, 9]
    cache, qo_indptr, q = _setup(qo_lens, kv_lens, 4, 2, 64, 8, device=triton_backend)
    gen = torch.Generator().manual_seed(3)
    masks = [torch.rand(a, b, generator=gen) > 0.4 for a, b in zip(qo_lens, kv_lens)]
    masks[1][3] = False  # a query row that sees nothing: output 0, LSE -inf
    flat = torch.cat([m.reshape(-1) for m in masks])
    if packed:  # FlashInfer's layout: each request's bits little-endian, byte-aligned
        kw = dict(packed_custom_mask=torch.from_numpy(np.concatenate(
            [np.packbits(m.reshape(-1).numpy(), bitorder="little") for m in masks])))
    else:
        kw = dict(custom_mask=flat)
    out, lse = _run(cache, qo_indptr, q, triton_backend, causal=causal, **kw)
    t_out, t_lse = _truth(q, qo_lens, cache, causal, masks=masks)
    _close(out, lse, t_out, t_lse, torch.float16)
    assert (out[5 + 3].float() == 0).all()


def test_ragged_kv_wrapper(triton_backend):
    qo_lens, kv_lens = [4, 11], [9, 11]
    Hq, Hk, D = 4, 2, 64
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(sum(kv_lens), Hk, D, generator=gen).half().to(triton_backend)
    v = torch.randn(sum(kv_lens), Hk, D, generator=gen).half().to(triton_backend)
    q = torch.randn(sum(qo_lens), Hq, D, generator=gen).half().to(triton_backend)
    qo_indptr = torch.tensor([0, 4, 15], dtype=torch.int32)
    kv_indptr = torch.tensor([0, 9, 20], dtype=torch.int32)
    w = BatchPrefillWithRaggedKVCacheWrapper(workspace(triton_backend, 1))
    w.plan(qo_indptr, kv_indptr, Hq, Hk, D, causal=True, q_data_type=torch.float16)
    out, lse = w.run(q, k, v, return_lse=True)
    # the same through the paged wrapper with one-token pages
    cache = PagedKV(kv_lens, Hk, D, 1)
    cache.k, cache.v = k.cpu().unsqueeze(1), v.cpu().unsqueeze(1)
    cache.indices = torch.arange(20, dtype=torch.int32)
    t_out, t_lse = _truth(q, qo_lens, cache, True)
    _close(out, lse, t_out, t_lse, torch.float16)


def test_bad_input():
    cache, qo_indptr, q = _setup([3, 4], [5, 4], 4, 2, 64, 4)
    w = BatchPrefillWithPagedKVCacheWrapper(workspace("cpu", 1))
    args = (cache.indptr, cache.indices, cache.last_page_len, 4, 2, 64, 4)
    with pytest.raises(MoeCommValueError, match="qo_indptr must have batch_size"):
        w.plan(qo_indptr[:2], *args)
    with pytest.raises(MoeCommValueError, match="qo_indptr must start at 0 and be non-decreasing"):
        w.plan(torch.tensor([0, 5, 3], dtype=torch.int32), *args)
    with pytest.raises(MoeCommValueError, match="custom_mask must hold"):
        w.plan(qo_indptr, *args, custom_mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(MoeCommValueError, match="head_dim_vo must equal"):
        w.plan(qo_indptr, *args, head_dim_vo=128)
    with pytest.raises(MoeCommValueError, match="must be given with use_cuda_graph=True"):
        BatchPrefillWithPagedKVCacheWrapper(workspace("cpu", 1), use_cuda_graph=True)
    w.plan(qo_indptr, *args, q_data_type=torch.float16)
    with pytest.raises(MoeCommValueError, match="q must have shape"):
        w.run(q[:3], (cache.k, cache.v))


def test_empty_batch(triton_backend):
    dev = triton_backend
    cache, _, _ = _setup([1], [3], 4, 2, 64, 4, device=dev)
    w = BatchPrefillWithPagedKVCacheWrapper(workspace(dev, 1))
    w.plan(torch.zeros(2, dtype=torch.int32), cache.indptr, cache.indices, cache.last_page_len, 4, 2, 64, 4,
           causal=True, q_data_type=torch.float16)
    out, lse = w.run(torch.zeros(0, 4, 64, dtype=torch.float16, device=dev), (cache.k, cache.v), return_lse=True)
    assert out.shape == (0, 4, 64) and lse.shape == (0, 4)


@pytest.mark.parametrize("with_mask", [False, True])
def test_block_sparse(triton_backend, with_mask):
    """BSR pattern (R = 4, C = 8) with and without per-block masks against a dense-masked truth."""
    from moecomm.attention import BlockSparseAttentionWrapper

    dev = triton_backend
    M, N, R, C, Hq, Hk, D = 16, 32, 4, 8, 4, 2, 64
    gen = torch.Generator().manual_seed(4)
    block = torch.rand(M // R, N // C, generator=gen) > 0.5
    block[0] = False  # a block row that sees nothing
    indptr = torch.tensor([0] + block.sum(1).cumsum(0).tolist(), dtype=torch.int32)
    indices = block.nonzero()[:, 1].to(torch.int32)
    inner = (torch.rand(indices.shape[0], R, C, generator=gen) > 0.3) if with_mask else None
    dense = torch.zeros(M, N, dtype=torch.bool)
    for n, (i, j) in enumerate(block.nonzero().tolist()):
        dense[i * R:(i + 1) * R, j * C:(j + 1) * C] = inner[n] if with_mask else True
    q = torch.randn(M, Hq, D, generator=gen).half().to(dev)
    k = torch.randn(N, Hk, D, generator=gen).half().to(dev)
    v = torch.randn(N, Hk, D, generator=gen).half().to(dev)
    w = BlockSparseAttentionWrapper(workspace(dev, 1))
    w.plan(indptr, indices, M, N, R, C, Hq, Hk, D, mask=inner, q_data_type=torch.float16)
    out, lse = w.run(q, k, v, return_lse=True)
    cache = PagedKV([N], Hk, D, 1)
    cache.k, cache.v, cache.indices = k.cpu().unsqueeze(1), v.cpu().unsqueeze(1), torch.arange(N, dtype=torch.int32)
    _close(out, lse, *_truth(q, [M], cache, masks=[dense]), torch.float16)


def test_cuda_graph_mode_buffers(triton_backend):
    """Graph mode: metadata address and grid fixed at construction; later plans of other shapes (within
    the maxima) reuse them, q is the fixed buffer (rows past qo_indptr[-1] left alone)."""
    dev = triton_backend
    qo_buf = torch.zeros(4, dtype=torch.int32, device=dev)
    ind_buf = torch.zeros(64, dtype=torch.int32, device=dev)
    w = BatchPrefillWithPagedKVCacheWrapper(workspace(dev, 1), use_cuda_graph=True, qo_indptr_buf=qo_buf,
                                            paged_kv_indices_buf=ind_buf, max_num_qo_tokens=40)
    q_buf = torch.zeros(40, 4, 64, dtype=torch.float16, device=dev)
    out = torch.full((40, 4, 64), float("nan"), dtype=torch.float16, device=dev)
    seen = None
    for qo_lens, kv_lens in (([5, 17, 1], [5, 30, 100]), ([33], [40])):
        cache, qo_indptr, q = _setup(qo_lens, kv_lens, 4, 2, 64, 8, device=dev)
        q_buf[: q.shape[0]] = q
        w.plan(qo_indptr, cache.indptr, cache.indices, cache.last_page_len, 4, 2, 64, 8, causal=True,
               q_data_type=torch.float16)
        p = w._plan
        now = (p["meta"].data_ptr(), p["kv_indices"].data_ptr(), p["num_tiles"])
        assert seen is None or now == seen
        seen = now
        w.run(q_buf, (cache.k, cache.v), out=out)
        t_out, _ = _truth(q, qo_lens, cache, True)
        torch.testing.assert_close(out[: q.shape[0]].double().cpu(), t_out, atol=ATOL[torch.float16], rtol=0)
    with pytest.raises(MoeCommValueError, match="must be <= 3 and 40"):
        cache, qo_indptr, q = _setup([30, 30], [30, 30], 4, 2, 64, 8)
        w.plan(qo_indptr, cache.indptr, cache.indices, cache.last_page_len, 4, 2, 64, 8, q_data_type=torch.float16)
