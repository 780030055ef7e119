"""Pure-torch attention over a paged KV cache: the CPU path and the truth in tests.

# B = batch (requests), Hq = num_qo_heads, Hk = num_kv_heads, G = Hq // Hk (group size), D = head_dim
# P = page_size, L = a request's KV length, nnz = tokens of all requests (ragged)

Every function here gathers a request's pages into contiguous [L, Hk, D] K and V, upcasts to fp32
and runs plain softmax attention, one request at a time: obviously correct, slow, any device.

Conventions (FlashInfer's, so that callers can switch by changing an import):
- A request owns pages indices[indptr[b]:indptr[b+1]], in order; its last page holds
  last_page_len[b] tokens (1..P), so L = (num_pages - 1) * P + last_page_len (0 without pages).
- logits = sm_scale * q.k; with a soft cap c: c * tanh(logits / c).
- The LSE is in base 2: log2(sum_j exp(logits_j)) (FlashInfer's get_lse is m + log2(d) in its
  exp2 domain). A row that attends to nothing has output 0 and LSE -inf.
- Prefill, causal: query i of a request with qo_len queries and L keys sits at position
  L - qo_len + i and sees keys j <= that; window_left w >= 0 also drops keys j < position - w.
"""

from __future__ import annotations

import math

import torch

LOG2E = 1.4426950408889634

NHD = "NHD"
HND = "HND"


def split_paged_kv_cache(paged_kv_cache, kv_layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_cache, v_cache) from a (K, V) tuple or one [num_pages, 2, ...] tensor (no copy)."""
    if isinstance(paged_kv_cache, torch.Tensor):
        return paged_kv_cache[:, 0], paged_kv_cache[:, 1]
    k, v = paged_kv_cache
    return k, v


def as_nhd(cache: torch.Tensor, kv_layout: str) -> torch.Tensor:
    """A [num_pages, P, Hk, D] view of a cache in either layout (HND is [num_pages, Hk, P, D])."""
    return cache if kv_layout == NHD else cache.transpose(1, 2)


def kv_lengths(indptr: torch.Tensor, last_page_len: torch.Tensor, page_size: int) -> torch.Tensor:
    """[B] int64 KV length of each request."""
    num_pages = (indptr[1:] - indptr[:-1]).long()
    return torch.where(num_pages > 0, (num_pages - 1) * page_size + last_page_len.long(), torch.zeros_like(num_pages))


def gather_kv(k_cache, v_cache, kv_layout, indptr, indices, last_page_len, b: int):
    """Request b's keys and values, [L, Hk, D] each, in the cache's dtype."""
    k_nhd, v_nhd = as_nhd(k_cache, kv_layout), as_nhd(v_cache, kv_layout)
    page_size = k_nhd.shape[1]
    lo, hi = int(indptr[b]), int(indptr[b + 1])
    if hi <= lo:
        return k_nhd.new_zeros(0, *k_nhd.shape[2:]), v_nhd.new_zeros(0, *v_nhd.shape[2:])
    pages = indices[lo:hi].long().to(k_nhd.device)
    length = (hi - lo - 1) * page_size + int(last_page_len[b])
    k = k_nhd[pages].reshape(-1, *k_nhd.shape[2:])[:length]
    v = v_nhd[pages].reshape(-1, *v_nhd.shape[2:])[:length]
    return k, v


def attend(q, k, v, mask, sm_scale: float, logits_soft_cap: float | None):
    """Softmax attention in fp32 for one request.

    Args:
        q: [Lq, Hq, D]; k, v: [L, Hk, D] (Hq % Hk == 0; query head h reads KV head h // G).
        mask: [Lq, L] bool (True: attend) or None.
    Returns:
        out [Lq, Hq, D] float32, lse [Lq, Hq] float32 (base 2).
    """
    num_qo_heads, num_kv_heads = q.shape[1], k.shape[1]
    group = num_qo_heads // num_kv_heads
    qf = q.float().transpose(0, 1)  # [Hq, Lq, D]
    kf = k.float().repeat_interleave(group, dim=1).transpose(0, 1)  # [Hq, L, D]
    vf = v.float().repeat_interleave(group, dim=1).transpose(0, 1)
    logits = torch.matmul(qf, kf.transpose(1, 2)) * sm_scale  # [Hq, Lq, L]
    if logits_soft_cap is not None and logits_soft_cap > 0:
        logits = logits_soft_cap * torch.tanh(logits / logits_soft_cap)
    if mask is not None:
        logits = logits.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(logits, dim=-1)  # [Hq, Lq], natural log; -inf for empty rows
    probs = torch.exp(logits - torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))[..., None])
    out = torch.matmul(probs, vf)  # [Hq, Lq, D]; rows without keys: 0
    return out.transpose(0, 1).contiguous(), (lse * LOG2E).transpose(0, 1).contiguous()


def causal_window_mask(qo_len: int, kv_len: int, causal: bool, window_left: int, device) -> torch.Tensor | None:
    """[qo_len, kv_len] bool mask of the causal / sliding-window rules (module docstring), or None."""
    if not causal and window_left < 0:
        return None
    qpos = torch.arange(qo_len, device=device)[:, None] + (kv_len - qo_len)
    kpos = torch.arange(kv_len, device=device)[None, :]
    mask = torch.ones(qo_len, kv_len, dtype=torch.bool, device=device)
    if causal:
        mask &= kpos <= qpos
    if window_left >= 0:
        mask &= kpos >= qpos - window_left
    return mask


def batch_decode(q, k_cache, v_cache, kv_layout, indptr, indices, last_page_len, *, sm_scale=None,
                 logits_soft_cap=None, window_left=-1):
    """Decode attention, one query token per request.

    Args:
        q: [B, Hq, D]; k_cache, v_cache: [num_pages, P, Hk, D] (NHD) or [num_pages, Hk, P, D] (HND);
        indptr [B + 1], indices [indptr[-1]], last_page_len [B]: the page table (module docstring).
    Returns:
        out [B, Hq, D] in q's dtype, lse [B, Hq] float32 (base 2).
    """
    head_dim = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(q.shape[0]):
        k, v = gather_kv(k_cache, v_cache, kv_layout, indptr, indices, last_page_len, b)
        if k.shape[0] == 0:
            continue
        mask = None
        if window_left >= 0:
            mask = torch.arange(k.shape[0], device=q.device)[None, :] >= k.shape[0] - 1 - window_left
        o, s = attend(q[b:b + 1], k.to(q.device), v.to(q.device), mask, sm_scale, logits_soft_cap)
        out[b], lse[b] = o[0], s[0]
    return out.to(q.dtype), lse


def unpack_mask_bits(packed: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Little-endian bits of a uint8 tensor (numpy.packbits(..., bitorder="little")) as bool [num_bits]."""
    bits = (packed.to(torch.int32)[:, None] >> torch.arange(8, device=packed.device)) & 1
    return bits.reshape(-1)[:num_bits].bool()


def batch_prefill(q, qo_indptr, k_cache, v_cache, kv_layout, indptr, indices, last_page_len, *, causal=False,
                  sm_scale=None, logits_soft_cap=None, window_left=-1, custom_mask=None, mask_indptr=None):
    """Prefill attention over ragged queries and a paged KV.

    Args:
        q: [nnz, Hq, D], request b's queries in rows qo_indptr[b]:qo_indptr[b+1].
        custom_mask: flattened bool, request b's [qo_len, kv_len] mask (row-major) at
            mask_indptr[b]:mask_indptr[b+1]; combined (and) with causal / window rules.
    Returns:
        out [nnz, Hq, D] in q's dtype, lse [nnz, Hq] float32 (base 2).
    """
    head_dim = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(head_dim) if sm_scale is None else sm_scale
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    lse = torch.full(q.shape[:2], float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(len(qo_indptr) - 1):
        q0, q1 = int(qo_indptr[b]), int(qo_indptr[b + 1])
        if q1 <= q0:
            continue
        k, v = gather_kv(k_cache, v_cache, kv_layout, indptr, indices, last_page_len, b)
        kv_len = k.shape[0]
        mask = causal_window_mask(q1 - q0, kv_len, causal, window_left, q.device)
        if custom_mask is not None:
            m0 = int(mask_indptr[b])
            cm = custom_mask[m0:m0 + (q1 - q0) * kv_len].reshape(q1 - q0, kv_len).bool().to(q.device)
            mask = cm if mask is None else mask & cm
        if kv_len == 0:
            continue
        o, s = attend(q[q0:q1], k.to(q.device), v.to(q.device), mask, sm_scale, logits_soft_cap)
        out[q0:q1], lse[q0:q1] = o, s
    return out.to(q.dtype), lse


def append_paged_kv_cache(append_key, append_value, batch_indices, positions, k_cache, v_cache, kv_layout,
                          kv_indices, kv_indptr, kv_last_page_len) -> None:
    """Write token i's key and value at position positions[i] of request batch_indices[i] (in place).

    Tokens whose request, position or page is out of range are skipped (as the kernel skips them).
    """
    k_nhd, v_nhd = as_nhd(k_cache, kv_layout), as_nhd(v_cache, kv_layout)
    num_pages_total, page_size = k_nhd.shape[0], k_nhd.shape[1]
    lengths = kv_lengths(kv_indptr.cpu(), kv_last_page_len.cpu(), page_size)
    bi, pos = batch_indices.long().cpu(), positions.long().cpu()
    for i in range(append_key.shape[0]):
        b, p = int(bi[i]), int(pos[i])
        if not (0 <= b < len(lengths)) or not (0 <= p < int(lengths[b])):
            continue
        page = int(kv_indices[int(kv_indptr[b]) + p // page_size])
        if not 0 <= page < num_pages_total:
            continue
        k_nhd[page, p % page_size] = append_key[i].to(k_nhd.dtype)
        v_nhd[page, p % page_size] = append_value[i].to(v_nhd.dtype)


def merge_state(v_a, s_a, v_b, s_b):
    """Merge two partial attention states by their base-2 LSEs: (v [n, H, D], s [n, H] float32)."""
    s_max = torch.maximum(s_a, s_b)
    s_max = torch.where(torch.isfinite(s_max), s_max, torch.zeros_like(s_max))
    wa, wb = torch.exp2(s_a - s_max), torch.exp2(s_b - s_max)
    total = wa + wb
    v = (v_a.float() * wa[..., None] + v_b.float() * wb[..., None]) / torch.where(total > 0, total, 1.0)[..., None]
    return v.to(v_a.dtype), torch.log2(total) + s_max


def merge_states(v, s):
    """Merge num_states partial states: v [n, S, H, D], s [n, S, H] -> (v [n, H, D], s [n, H])."""
    s_max = s.max(dim=1).values
    s_max = torch.where(torch.isfinite(s_max), s_max, torch.zeros_like(s_max))
    w = torch.exp2(s - s_max[:, None])  # [n, S, H]
    total = w.sum(dim=1)
    out = (v.float() * w[..., None]).sum(dim=1) / torch.where(total > 0, total, 1.0)[..., None]
    return out.to(v.dtype), torch.log2(total) + s_max


def rope_inv_freq(rotary_dim: int, rope_theta: float, rope_scale: float, llama31: dict | None, device) -> torch.Tensor:
    """[rotary_dim // 2] float32 inverse frequencies; positions are divided by rope_scale
    (FlashInfer's apply_rope) or, with llama31 = dict(factor, low_freq_factor, high_freq_factor,
    old_context_len), smoothed as Llama 3.1 does (transformers' _compute_llama3_parameters)."""
    inv = 1.0 / (rope_theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64, device=device) / rotary_dim))
    if llama31 is None:
        return (inv / rope_scale).float()
    factor, lo, hi, old = llama31["factor"], llama31["low_freq_factor"], llama31["high_freq_factor"], llama31["old_context_len"]
    wavelen = 2 * math.pi / inv
    low_wl, high_wl = old / lo, old / hi
    smooth = (old / wavelen - lo) / (hi - lo)
    scaled = torch.where(wavelen > low_wl, inv / factor, inv)
    mid = (wavelen <= low_wl) & (wavelen >= high_wl)
    scaled = torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    return scaled.float()


def apply_rope_pos_ids(x, pos_ids, inv_freq, interleave: bool):
    """Rotate the first 2 * len(inv_freq) dims of x [nnz, H, D] at positions pos_ids [nnz]; fp32 math.

    interleave=False: pairs (i, i + R/2) (GPT-NeoX / Llama style); True: pairs (2i, 2i + 1) (GPT-J)."""
    rot = 2 * inv_freq.shape[0]
    xf = x.float()
    ang = pos_ids.float()[:, None] * inv_freq[None, :]  # [nnz, R/2]
    cos, sin = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    xr = xf[..., :rot]
    if interleave:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        r = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., : rot // 2], xr[..., rot // 2:]
        r = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return torch.cat((r, xf[..., rot:]), dim=-1).to(x.dtype)
