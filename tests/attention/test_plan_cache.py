"""plan()'s per-wrapper caches (scalar checks once per distinct argument tuple, the staging buffer's
views) never let bad input through: a wrapper that planned well still raises on each bad argument,
True never passes for a cached 1, and a replan after the buffer grew sees the new metadata.

# B = batch, Hq / Hk = heads, D = head_dim, P = page_size
"""

from __future__ import annotations

import pytest
import torch
from attn_helpers import PagedKV, workspace

from moecomm.attention import (
    BatchDecodeWithPagedKVCacheWrapper,
    BatchPrefillWithPagedKVCacheWrapper,
)
from moecomm.errors import MoeCommTypeError, MoeCommValueError


def test_decode_cached_checks_still_raise():
    cache = PagedKV([5, 20], 2, 64, 8)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace())
    args = dict(indptr=cache.indptr, indices=cache.indices, last_page_len=cache.last_page_len, num_qo_heads=4,
                num_kv_heads=2, head_dim=64, page_size=8, q_data_type=torch.float16, window_left=1)
    w.plan(**args)
    w.plan(**args)  # the cached path
    for bad, err, match in ((dict(num_qo_heads=5), MoeCommValueError, "multiple of num_kv_heads"),
                            (dict(window_left=True), MoeCommValueError, "window_left must be an int"),
                            (dict(page_size=True), MoeCommTypeError, "page_size must be an int"),
                            (dict(sm_scale=float("nan")), MoeCommValueError, "sm_scale must be a finite"),
                            (dict(logits_soft_cap=float("nan")), MoeCommValueError, "logits_soft_cap"),
                            (dict(kv_data_type=torch.bfloat16), MoeCommTypeError, "kv_data_type must equal")):
        with pytest.raises(err, match=match):
            w.plan(**dict(args, **bad))
        w.plan(**args)  # and the good arguments plan again after the error


def test_prefill_cached_checks_still_raise():
    cache = PagedKV([5, 20], 2, 64, 8)
    qo_indptr = torch.tensor([0, 3, 7], dtype=torch.int32)
    w = BatchPrefillWithPagedKVCacheWrapper(workspace("cpu", 1))
    args = dict(qo_indptr=qo_indptr, paged_kv_indptr=cache.indptr, paged_kv_indices=cache.indices,
                paged_kv_last_page_len=cache.last_page_len, num_qo_heads=4, num_kv_heads=2, head_dim_qk=64,
                page_size=8, causal=True, q_data_type=torch.float16)
    w.plan(**args)
    w.plan(**args)
    for bad, err, match in ((dict(num_qo_heads=5), MoeCommValueError, "multiple of num_kv_heads"),
                            (dict(head_dim_vo=128), MoeCommValueError, "head_dim_vo must equal"),
                            (dict(window_left=True), MoeCommValueError, "window_left must be an int"),
                            (dict(num_kv_heads=True), MoeCommTypeError, "num_kv_heads must be an int"),
                            (dict(kv_data_type=torch.bfloat16), MoeCommTypeError, "kv_data_type must equal"),
                            (dict(paged_kv_indices=torch.tensor([0, 1, -1, 2], dtype=torch.int32)),
                             MoeCommValueError, "indices must be >= 0")):
        with pytest.raises(err, match=match):
            w.plan(**dict(args, **bad))
        w.plan(**args)


def test_staging_views_follow_growth(triton_backend):
    """A small plan, then one past the staging buffer's size (it is reallocated), then the small one
    again: each run() sees its own plan's metadata (outputs equal a fresh wrapper's)."""
    small, big = PagedKV([5, 20], 2, 64, 8, seed=1), PagedKV([700, 3, 900], 2, 64, 1, seed=2)
    w = BatchDecodeWithPagedKVCacheWrapper(workspace(triton_backend))
    q2, q3 = torch.randn(2, 4, 64).half().to(triton_backend), torch.randn(3, 4, 64).half().to(triton_backend)

    def run(wr, c, q):
        wr.plan(c.indptr, c.indices, c.last_page_len, 4, 2, 64, c.page_size, q_data_type=torch.float16)
        return wr.run(q, (c.k.to(triton_backend), c.v.to(triton_backend)))

    outs = [run(w, small, q2), run(w, big, q3), run(w, small, q2)]
    fresh = [run(BatchDecodeWithPagedKVCacheWrapper(workspace(triton_backend)), c, q)
             for c, q in ((small, q2), (big, q3), (small, q2))]
    for o, f in zip(outs, fresh):
        assert torch.equal(o, f)
