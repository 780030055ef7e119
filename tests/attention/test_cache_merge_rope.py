"""append_paged_kv_cache, get_batch_indices_positions, merge_state(s), RoPE: kernels against the
references (exact for data movement), references against direct formulas.

# nnz = tokens, B = batch, Hk = KV heads, D = head_dim, P = page_size, S = states
"""

from __future__ import annotations

import math

import pytest
import torch
from attn_helpers import ATOL, PagedKV

import moecomm.attention as A
from moecomm.attention import reference as ref
from moecomm.errors import MoeCommValueError


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_append_then_gather_exact(triton_backend, layout, page_size):
    """Append tokens to requests with cached prefixes; the gathered KV must equal prefix + new tokens
    exactly, and no other slot of the cache may change (data movement: exact equality)."""
    dev = triton_backend
    old_lens, new_lens = [3, 0, 17], [2, 5, 1]
    total = [a + b for a, b in zip(old_lens, new_lens)]
    cache = PagedKV(total, 2, 64, page_size, dtype=torch.float16, layout=layout, device=dev)
    before = [ref.gather_kv(cache.k, cache.v, layout, cache.indptr, cache.indices, cache.last_page_len, b)
              for b in range(3)]
    nnz = sum(new_lens)
    gen = torch.Generator().manual_seed(5)
    k_new = torch.randn(nnz, 2, 64, generator=gen).half().to(dev)
    v_new = torch.randn(nnz, 2, 64, generator=gen).half().to(dev)
    append_indptr = torch.tensor([0, 2, 7, 8], dtype=torch.int32, device=dev)
    seq_lens = A.get_seq_lens(cache.indptr.to(dev), cache.last_page_len.to(dev), page_size)
    assert seq_lens.tolist() == total
    bi, pos = A.get_batch_indices_positions(append_indptr, seq_lens, nnz)
    assert bi.tolist() == [0, 0, 1, 1, 1, 1, 1, 2] and pos.tolist() == [3, 4, 0, 1, 2, 3, 4, 17]
    k_before = cache.k.clone()
    A.append_paged_kv_cache(k_new, v_new, bi, pos, (cache.k, cache.v), cache.indices.to(dev), cache.indptr.to(dev),
                            cache.last_page_len.to(dev), kv_layout=layout)
    row = 0
    for b in range(3):
        k, v = ref.gather_kv(cache.k, cache.v, layout, cache.indptr, cache.indices, cache.last_page_len, b)
        n_old = old_lens[b]
        assert torch.equal(k[:n_old], before[b][0][:n_old]) and torch.equal(v[:n_old], before[b][1][:n_old])
        assert torch.equal(k[n_old:], k_new[row:row + new_lens[b]]) and torch.equal(v[n_old:], v_new[row:row + new_lens[b]])
        row += new_lens[b]
    changed = ~((cache.k == k_before) | (cache.k.isnan() & k_before.isnan()))
    assert int(changed.any(-1).sum()) == nnz * 2  # exactly the appended (slot, head) rows


def test_append_skips_out_of_range_tokens(triton_backend):
    dev = triton_backend
    cache = PagedKV([4, 4], 1, 64, 4, device=dev)
    k_before = cache.k.clone()
    kv = torch.ones(3, 1, 64, dtype=torch.float16, device=dev)
    bi = torch.tensor([5, -1, 0], dtype=torch.int32, device=dev)  # request 5 and -1 do not exist
    pos = torch.tensor([0, 0, 4], dtype=torch.int32, device=dev)  # position 4 is past request 0's length
    A.append_paged_kv_cache(kv, kv, bi, pos, (cache.k, cache.v), cache.indices.to(dev), cache.indptr.to(dev),
                            cache.last_page_len.to(dev))
    assert torch.equal(cache.k.nan_to_num(7.0), k_before.nan_to_num(7.0))


def test_append_bad_input():
    cache = PagedKV([4], 2, 64, 4)
    kv = torch.zeros(1, 2, 64, dtype=torch.float16)
    idx = torch.zeros(1, dtype=torch.int32)
    with pytest.raises(MoeCommValueError, match="append_key must have shape"):
        A.append_paged_kv_cache(kv[:, :1], kv, idx, idx, (cache.k, cache.v), cache.indices, cache.indptr, cache.last_page_len)
    with pytest.raises(MoeCommValueError, match="kv_layout must be"):
        A.append_paged_kv_cache(kv, kv, idx, idx, (cache.k, cache.v), cache.indices, cache.indptr, cache.last_page_len,
                                kv_layout="NDH")


def _attn(q, k, v):
    """Softmax attention of q [n, H, D] over k, v [L, H, D] in float64: (out, base-2 LSE)."""
    x = torch.einsum("nhd,lhd->nhl", q.double(), k.double()) / math.sqrt(q.shape[-1])
    return torch.einsum("nhl,lhd->nhd", torch.softmax(x, -1), v.double()), torch.logsumexp(x, -1) / math.log(2)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_merge_state_equals_attention_over_both(triton_backend, dtype):
    """Attention over A and over B, merged, equals attention over A + B."""
    dev = triton_backend
    gen = torch.Generator().manual_seed(0)
    q, ka, va, kb, vb = (torch.randn(s, 3, 64, generator=gen) for s in (5, 7, 7, 9, 9))
    oa, sa = _attn(q, ka, va)
    ob, sb = _attn(q, kb, vb)
    o, s = _attn(q, torch.cat((ka, kb)), torch.cat((va, vb)))
    v_m, s_m = A.merge_state(oa.to(dtype).to(dev), sa.float().to(dev), ob.to(dtype).to(dev), sb.float().to(dev))
    torch.testing.assert_close(v_m.double().cpu(), o, atol=ATOL[dtype], rtol=0)
    torch.testing.assert_close(s_m.double().cpu(), s, atol=1e-5, rtol=0)
    # in place, with a mask: rows left out keep their values
    v_ip, s_ip = oa.to(dtype).to(dev), sa.float().to(dev)
    mask = torch.tensor([True, False, True, True, False], device=dev)
    A.merge_state_in_place(v_ip, s_ip, ob.to(dtype).to(dev), sb.float().to(dev), mask=mask)
    torch.testing.assert_close(v_ip[mask.cpu()].double().cpu(), o[mask.cpu()], atol=ATOL[dtype], rtol=0)
    assert torch.equal(v_ip[~mask].cpu(), oa.to(dtype)[~mask.cpu()])


def test_merge_states_many_and_empty(triton_backend):
    dev = triton_backend
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(4, 2, 64, generator=gen)
    segs = [(torch.randn(n, 2, 64, generator=gen), torch.randn(n, 2, 64, generator=gen)) for n in (1, 5, 33)]
    parts = [_attn(q, k, v) for k, v in segs]
    v = torch.stack([p[0] for p in parts], 1).float()
    s = torch.stack([p[1] for p in parts], 1).float()
    v = torch.cat((v, torch.zeros(4, 1, 2, 64)), 1)  # a fourth, empty state: LSE -inf, weight 0
    s = torch.cat((s, torch.full((4, 1, 2), float("-inf"))), 1)
    o, lse = _attn(q, torch.cat([k for k, _ in segs]), torch.cat([v_ for _, v_ in segs]))
    v_m, s_m = A.merge_states(v.to(dev), s.to(dev))
    torch.testing.assert_close(v_m.double().cpu(), o, atol=1e-5, rtol=0)
    torch.testing.assert_close(s_m.double().cpu(), lse, atol=1e-5, rtol=0)
    v0, s0 = A.merge_states(torch.zeros(2, 3, 2, 64, device=dev), torch.full((2, 3, 2), float("-inf"), device=dev))
    assert (v0 == 0).all() and (s0 == float("-inf")).all()


def _rope_truth(x, pos, inv_freq, interleave):
    """float64 complex rotation: pairs as complex numbers times e^(i * pos * freq)."""
    rot = 2 * inv_freq.shape[0]
    xd = x.double()
    if interleave:
        pairs = torch.complex(xd[..., 0:rot:2], xd[..., 1:rot:2])
    else:
        pairs = torch.complex(xd[..., : rot // 2], xd[..., rot // 2: rot])
    ang = pos.double()[:, None, None] * inv_freq.double()[None, None, :]
    r = pairs * torch.exp(1j * ang)
    out = xd.clone()
    if interleave:
        out[..., 0:rot:2], out[..., 1:rot:2] = r.real, r.imag
    else:
        out[..., : rot // 2], out[..., rot // 2: rot] = r.real, r.imag
    return out


@pytest.mark.parametrize("interleave", [False, True])
@pytest.mark.parametrize("rotary_dim", [None, 32])
def test_rope_matches_complex_rotation(triton_backend, interleave, rotary_dim):
    dev = triton_backend
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(9, 4, 64, generator=gen)
    k = torch.randn(9, 2, 64, generator=gen)
    indptr = torch.tensor([0, 2, 9], dtype=torch.int32)
    offsets = torch.tensor([5, 100], dtype=torch.int32)
    pos = torch.tensor([5, 6] + list(range(100, 107)))
    inv = ref.rope_inv_freq(rotary_dim or 64, 1e4, 1.0, None, "cpu")
    q_r, k_r = A.apply_rope(q.to(dev), k.to(dev), indptr.to(dev), offsets.to(dev), rotary_dim=rotary_dim,
                            interleave=interleave)
    torch.testing.assert_close(q_r.double().cpu(), _rope_truth(q, pos, inv, interleave), atol=2e-5, rtol=0)
    torch.testing.assert_close(k_r.double().cpu(), _rope_truth(k, pos, inv, interleave), atol=2e-5, rtol=0)
    q2, k2 = q.clone().to(dev), k.clone().to(dev)
    A.apply_rope_inplace(q2, k2, indptr.to(dev), offsets.to(dev), rotary_dim=rotary_dim, interleave=interleave)
    assert torch.equal(q2.cpu(), q_r.cpu()) and torch.equal(k2.cpu(), k_r.cpu())


def test_llama31_rope_matches_transformers(triton_backend):
    """Llama 3.1 frequencies against transformers' own rope init and its rotate_half application."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   max_position_embeddings=131072,
                                   rope_parameters=dict(rope_type="llama3", rope_theta=5e5, factor=8.0, low_freq_factor=1.0,
                                                        high_freq_factor=4.0, original_max_position_embeddings=8192))
    inv_hf, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    inv = ref.rope_inv_freq(64, 5e5, 1.0, dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                               old_context_len=8192), "cpu")
    torch.testing.assert_close(inv.double(), inv_hf.double(), atol=0, rtol=1e-6)
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(6, 4, 64, generator=gen)
    k = torch.randn(6, 2, 64, generator=gen)
    pos = torch.tensor([0, 1, 2, 9000, 9001, 20000])
    ang = pos.double()[:, None] * inv_hf.double()[None]
    emb = torch.cat((ang, ang), -1)
    q_hf, k_hf = apply_rotary_pos_emb(q.double().transpose(0, 1)[None], k.double().transpose(0, 1)[None],
                                      emb.cos()[None], emb.sin()[None])
    dev = triton_backend
    q_r, k_r = A.apply_llama31_rope_pos_ids(q.to(dev), k.to(dev), pos.to(torch.int32).to(dev))
    # fp32 angles up to 2e4 rad: ~2e4 * 2^-24 = 1e-3 rad of rounding in the angle itself
    torch.testing.assert_close(q_r.double().cpu(), q_hf[0].transpose(0, 1), atol=5e-3, rtol=0)
    torch.testing.assert_close(k_r.double().cpu(), k_hf[0].transpose(0, 1), atol=5e-3, rtol=0)
