"""The second prefill kernel (_triton_prefill_v2) through the interpreter: its TMA path (a request's
pages consecutive, NHD) and its gather path against the float64 truth of test_prefill, every mask
kind of the first kernel; which path runs (a launch spy); the first kernel still selectable and
right; plan()'s consecutive-pages test; both paths compile for sm_90 (TMA: bulk tensor copies).

# B = batch, Hq / Hk = heads, D = head_dim, P = page_size
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from attn_helpers import PagedKV
from test_prefill import CASES, _close, _run, _setup, _truth

from moecomm.attention import prefill as pre


def _consecutive(cache: PagedKV) -> PagedKV:
    """The same tokens with each request's pages renumbered consecutively from page 1 (page 0 and
    the spares stay NaN): request b + 1's first page follows request b's last, so a TMA tile that
    runs past kv_len reads the next request's tokens or the last page's NaN slots."""
    P = cache.page_size
    k_nhd = cache.k if cache.layout == "NHD" else cache.k.transpose(1, 2)
    v_nhd = cache.v if cache.layout == "NHD" else cache.v.transpose(1, 2)
    k, v = torch.full_like(k_nhd, float("nan")), torch.full_like(v_nhd, float("nan"))
    nnz = int(cache.indptr[-1])
    new = torch.arange(1, nnz + 1, dtype=torch.int32)
    k[new.long()] = k_nhd[cache.indices.long()]
    v[new.long()] = v_nhd[cache.indices.long()]
    if cache.layout == "HND":
        k, v = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
    cache.k, cache.v, cache.indices = k, v, new
    assert cache.num_pages >= nnz + 1 and P >= 1
    return cache


@pytest.fixture
def spy(monkeypatch):
    """The constexprs of every prefill launch (KV_TMA says which path ran)."""
    calls = []
    real = pre.launch

    def record(kernel, grid, args, consts, *rest):
        calls.append((getattr(kernel, "fn", kernel).__name__, dict(consts)))
        return real(kernel, grid, args, consts, *rest)

    monkeypatch.setattr(pre, "launch", record)
    return calls


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"Q{c[0]}-KV{c[1]}-H{c[2]}/{c[3]}-D{c[4]}-P{c[5]}-{c[6]}")
@pytest.mark.parametrize("causal", [False, True])
def test_tma_path_matches_truth(triton_backend, spy, case, causal):
    qo_lens, kv_lens, Hq, Hk, D, P, layout = case
    cache, qo_indptr, q = _setup(qo_lens, kv_lens, Hq, Hk, D, P, device="cpu", layout=layout)
    cache = _consecutive(cache)
    cache.k, cache.v, q = cache.k.to(triton_backend), cache.v.to(triton_backend), q.to(triton_backend)
    out, lse = _run(cache, qo_indptr, q, triton_backend, causal=causal)
    _close(out, lse, *_truth(q, qo_lens, cache, causal), torch.float16)
    assert spy[-1][0] == "prefill_v2_kernel"
    assert spy[-1][1]["KV_TMA"] is (layout == "NHD")  # HND: a page's tokens are not one row run


def _masked_cases():
    qo_lens, kv_lens = [70, 3], [150, 3]
    return qo_lens, kv_lens


@pytest.mark.parametrize("consecutive", [True, False])
@pytest.mark.parametrize("window_left,soft_cap,sm_scale", [(0, None, None), (20, None, None), (5, 3.0, 0.2)])
def test_window_softcap_both_paths(triton_backend, spy, consecutive, window_left, soft_cap, sm_scale):
    qo_lens, kv_lens = _masked_cases()
    cache, qo_indptr, q = _setup(qo_lens, kv_lens, 4, 2, 64, 16, device="cpu")
    if consecutive:
        cache = _consecutive(cache)
    cache.k, cache.v, q = cache.k.to(triton_backend), cache.v.to(triton_backend), q.to(triton_backend)
    out, lse = _run(cache, qo_indptr, q, triton_backend, causal=True, window_left=window_left, logits_soft_cap=soft_cap,
                    sm_scale=sm_scale)
    _close(out, lse, *_truth(q, qo_lens, cache, True, window_left, soft_cap, sm_scale), torch.float16)
    assert spy[-1][1]["KV_TMA"] is consecutive


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_custom_mask_tma_path(triton_backend, spy, packed, causal):
    qo_lens, kv_lens = [5, 17, 9], [5, 30, 9]
    cache, qo_indptr, q = _setup(qo_lens, kv_lens, 4, 2, 64, 8)
    cache = _consecutive(cache)
    cache.k, cache.v, q = cache.k.to(triton_backend), cache.v.to(triton_backend), q.to(triton_backend)
    gen = torch.Generator().manual_seed(3)
    masks = [torch.rand(a, b, generator=gen) > 0.4 for a, b in zip(qo_lens, kv_lens)]
    masks[1][3] = False  # a query row that sees nothing: output 0, LSE -inf
    if packed:
        kw = dict(packed_custom_mask=torch.from_numpy(np.concatenate(
            [np.packbits(m.reshape(-1).numpy(), bitorder="little") for m in masks])))
    else:
        kw = dict(custom_mask=torch.cat([m.reshape(-1) for m in masks]))
    out, lse = _run(cache, qo_indptr, q, triton_backend, causal=causal, **kw)
    _close(out, lse, *_truth(q, qo_lens, cache, causal, masks=masks), torch.float16)
    assert (out[5 + 3].float() == 0).all()
    assert spy[-1][1]["KV_TMA"] is True


def test_long_causal_tma_path(triton_backend, spy):
    """300 queries after a 200-token prefix, two requests: many unmasked blocks, tiles heaviest first."""
    qo_lens, kv_lens = [300, 130], [500, 130]
    cache, qo_indptr, q = _setup(qo_lens, kv_lens, 2, 1, 64, 16, device="cpu")
    cache = _consecutive(cache)
    cache.k, cache.v, q = cache.k.to(triton_backend), cache.v.to(triton_backend), q.to(triton_backend)
    out, lse = _run(cache, qo_indptr, q, triton_backend, causal=True)
    _close(out, lse, *_truth(q, qo_lens, cache, True), torch.float16)
    assert spy[-1][1]["KV_TMA"] is True


def test_one_tensor_cache_takes_the_gather(triton_backend, spy):
    """[num_pages, 2, P, Hk, D]: K's page stride is 2 * P * Hk * D, not P rows: no TMA, still right."""
    qo_lens, kv_lens = [9, 20], [9, 33]
    cache, qo_indptr, q = _setup(qo_lens, kv_lens, 4, 2, 64, 8, device="cpu")
    cache = _consecutive(cache)
    both = torch.stack([cache.k, cache.v], dim=1).to(triton_backend)
    w = pre.BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8, device=triton_backend))
    w.plan(qo_indptr, cache.indptr, cache.indices, cache.last_page_len, 4, 2, 64, 8, causal=True,
           q_data_type=torch.float16)
    out, lse = w.run(q.to(triton_backend), both, return_lse=True)
    _close(out, lse, *_truth(q, qo_lens, cache, True), torch.float16)
    assert spy[-1][1]["KV_TMA"] is False


@pytest.mark.parametrize("case", CASES[:4], ids=lambda c: f"Q{c[0]}-KV{c[1]}-P{c[5]}-{c[6]}")
def test_first_kernel_still_selectable(triton_backend, spy, monkeypatch, case):
    monkeypatch.setattr(pre, "PREFILL_KERNEL", "v1")
    qo_lens, kv_lens, Hq, Hk, D, P, layout = case
    cache, qo_indptr, q = _setup(qo_lens, kv_lens, Hq, Hk, D, P, device=triton_backend, layout=layout)
    out, lse = _run(cache, qo_indptr, q, triton_backend, causal=True)
    _close(out, lse, *_truth(q, qo_lens, cache, True), torch.float16)
    assert spy[-1][0] == "prefill_kernel" and "KV_TMA" not in spy[-1][1]


def test_pages_consecutive():
    t = lambda ip, ids: pre.pages_consecutive(np.array(ip, np.int32), np.array(ids, np.int32))
    assert t([0, 3, 5], [4, 5, 6, 0, 1]) is True
    assert t([0, 3, 5], [4, 6, 5, 0, 1]) is False      # ends right (4 .. 6), middle swapped
    assert t([0, 3, 5], [4, 5, 6, 1, 0]) is False
    assert t([0, 0, 2, 2, 3], [7, 8, 2]) is True        # requests with no pages
    assert t([0, 0], []) is True
    assert t([0, 2], [3, 4, 9]) is True                 # ids past indptr[-1] are not read
    assert t([0, 1, 2], [5, 5]) is True                 # one page each: trivially consecutive


def _compile_v2_for_hopper() -> int:
    """Both paths of v2 compile for sm_90 with real launches' hints; TMA: bulk tensor loads."""
    from test_compile import _compile, _sig

    from moecomm.attention import _triton_prefill_v2 as k2

    count = 0
    for dt in ("bf16", "fp16"):
        ptrs = {"q_ptr": f"*{dt}", "k_ptr": f"*{dt}", "v_ptr": f"*{dt}", "out_ptr": f"*{dt}", "lse_ptr": "*fp32",
                "meta_ptr": "*i32", "kv_indices_ptr": "*i32", "mask_ptr": "*u8"}
        for head_dim, causal, window, custom, page, tma in ((128, True, False, False, 16, True),
                                                            (128, True, False, False, 16, False),
                                                            (64, False, True, True, 1, True),
                                                            (256, True, True, False, 128, True)):
            bm, bn, warps, stages = (pre.PREFILL_TMA_CONFIGS if tma else pre.PREFILL_CONFIGS)[head_dim]
            consts = dict(GROUP=4, PAGE=page, HEAD_DIM=head_dim, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, WINDOW=window,
                          SOFT_CAP=False, CUSTOM=custom, WRITE_LSE=True, DOT_PRECISION="tf32", KV_TMA=tma)
            k = _compile(k2.prefill_v2_kernel, _sig(k2.prefill_v2_kernel, ptrs), consts, num_warps=warps,
                         num_stages=stages)
            ptx = k.asm["ptx"]
            assert "wgmma" in ptx
            assert ("cp.async.bulk.tensor" in ptx) if tma else ("cp.async" in ptx)
            count += 1
    return count


def test_v2_compiles_for_hopper():
    pytest.importorskip("triton")
    from moecomm.testing import run_without_interpreter

    assert run_without_interpreter(__file__, "_compile_v2_for_hopper") == "8"
