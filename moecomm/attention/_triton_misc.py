"""The small kernels of moecomm.attention: append to the paged cache, merge states, RoPE.

# nnz = appended / rotated tokens, Hk = num_kv_heads, H = heads, D = head_dim, P = page_size,
# S = num_states, R = rotary_dim; BLOCK_H = next_pow2(H)

Each is one launch, one program per token (or per (row, head) for the merges), memory-bound:
append moves nnz * Hk * D * 2 elements once; a merge reads its S states once; RoPE reads and
writes q and k once. Loads are upcast to fp32 before arithmetic.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def append_kv_kernel(
    key_ptr, value_ptr, batch_ptr, pos_ptr, k_ptr, v_ptr, kv_indices_ptr, kv_indptr_ptr, last_ptr,
    batch_size, num_indices, num_pages,
    stride_kn, stride_kh, stride_vn, stride_vh,
    stride_cp, stride_ct, stride_ch, stride_dp, stride_dt, stride_dh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, PAGE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Token i -> slot positions[i] % P of page kv_indices[kv_indptr[b] + positions[i] // P], b =
    batch_indices[i]; a token whose request, position or page is out of range is not written."""
    i = tl.program_id(0).to(tl.int64)
    b = tl.load(batch_ptr + i).to(tl.int32)
    pos = tl.load(pos_ptr + i).to(tl.int32)
    b_ok = (b >= 0) & (b < batch_size)
    b_safe = tl.where(b_ok, b, 0)
    p0 = tl.load(kv_indptr_ptr + b_safe)
    p1 = tl.load(kv_indptr_ptr + b_safe + 1)
    last = tl.load(last_ptr + b_safe)
    length = tl.where(p1 > p0, (p1 - p0 - 1) * PAGE + last, 0)
    idx = p0 + pos // PAGE
    ok = b_ok & (pos >= 0) & (pos < length) & (idx < num_indices)
    page = tl.load(kv_indices_ptr + tl.where(ok, idx, 0))
    ok = ok & (page >= 0) & (page < num_pages)
    page = tl.where(ok, page, 0).to(tl.int64)
    slot = pos % PAGE
    h = tl.arange(0, BLOCK_H)
    d = tl.arange(0, HEAD_DIM)
    m = (h[:, None] < NUM_HEADS) & ok
    kx = tl.load(key_ptr + i * stride_kn + h[:, None] * stride_kh + d[None, :], mask=m)
    vx = tl.load(value_ptr + i * stride_vn + h[:, None] * stride_vh + d[None, :], mask=m)
    tl.store(k_ptr + page * stride_cp + slot * stride_ct + h[:, None] * stride_ch + d[None, :],
             kx.to(k_ptr.dtype.element_ty), mask=m)
    tl.store(v_ptr + page * stride_dp + slot * stride_dt + h[:, None] * stride_dh + d[None, :],
             vx.to(v_ptr.dtype.element_ty), mask=m)


@triton.jit
def merge_states_kernel(
    v_ptr, s_ptr, out_ptr, out_s_ptr, mask_ptr,
    num_states, stride_vn, stride_vs, stride_vh, stride_sn, stride_ss, stride_sh,
    stride_on, stride_oh, stride_osn, stride_osh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
):
    """out[n, h] = sum_s 2^(s[n, s, h] - S) v[n, s, h] with S = log2 sum_s 2^s[n, s, h] (one pass).

    Also the two-state and in-place merges: v_a / v_b as two 'states' through their strides."""
    n = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    d = tl.arange(0, BLOCK_D)
    dm = d < HEAD_DIM
    keep = True
    if HAS_MASK:
        keep = tl.load(mask_ptr + n) != 0  # rows left out keep their values (CUDA-graph friendly)
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([BLOCK_D], tl.float32)
    for j in range(num_states):
        s = tl.load(s_ptr + n * stride_sn + j * stride_ss + h * stride_sh).to(tl.float32)
        v = tl.load(v_ptr + n * stride_vn + j * stride_vs + h * stride_vh + d, mask=dm, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(s - m_safe)
        acc = acc * alpha + v * beta
        l = l * alpha + beta
        m = m_new
    has = l > 0
    res = acc / tl.where(has, l, 1.0)
    tl.store(out_ptr + n * stride_on + h * stride_oh + d, res.to(out_ptr.dtype.element_ty), mask=dm & keep)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tl.store(out_s_ptr + n * stride_osn + h * stride_osh, m_safe + tl.log2(l), mask=keep)


@triton.jit
def rope_kernel(
    x_ptr, out_ptr, pos_ptr, inv_freq_ptr,
    num_heads, stride_xn, stride_xh, stride_on, stride_oh,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_H: tl.constexpr,
    INTERLEAVE: tl.constexpr, COPY_REST: tl.constexpr, BLOCK_REST: tl.constexpr,
):
    """Rotate token i's heads at position pos[i]: pairs (j, j + R/2), or (2j, 2j + 1) interleaved."""
    i = tl.program_id(0).to(tl.int64)
    hb = tl.program_id(1)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    j = tl.arange(0, BLOCK_HALF)
    hm = h < num_heads
    jm = j < HALF
    m = hm[:, None] & jm[None, :]
    pos = tl.load(pos_ptr + i).to(tl.float32)
    ang = pos * tl.load(inv_freq_ptr + j, mask=jm, other=0.0)  # [BHALF] fp32
    c = tl.cos(ang)[None, :]
    s = tl.sin(ang)[None, :]
    if INTERLEAVE:
        d1 = 2 * j
        d2 = 2 * j + 1
    else:
        d1 = j
        d2 = j + HALF
    base_x = x_ptr + i * stride_xn + h[:, None] * stride_xh
    base_o = out_ptr + i * stride_on + h[:, None] * stride_oh
    x1 = tl.load(base_x + d1[None, :], mask=m, other=0.0).to(tl.float32)
    x2 = tl.load(base_x + d2[None, :], mask=m, other=0.0).to(tl.float32)
    tl.store(base_o + d1[None, :], (x1 * c - x2 * s).to(out_ptr.dtype.element_ty), mask=m)
    tl.store(base_o + d2[None, :], (x2 * c + x1 * s).to(out_ptr.dtype.element_ty), mask=m)
    if COPY_REST:
        r = 2 * HALF + tl.arange(0, BLOCK_REST)
        rm = hm[:, None] & (r < HEAD_DIM)[None, :]
        tl.store(base_o + r[None, :], tl.load(base_x + r[None, :], mask=rm), mask=rm)
