"""Paged decode attention (flash-decoding): one program per (work item, KV head), then a merge.

# B = batch, Hq / Hk = query / KV heads, G = Hq // Hk, D = head_dim, P = page_size, W = work items
# BLOCK_G = max(16, next_pow2(G)) query rows per program (tl.dot needs M >= 16), BLOCK_N KV tokens
# per step, BLOCK_D = D

Why this shape. Decode reads every K and V byte once and does ~2 FLOP per byte: it is purely
memory-bound (B64 L4096 Hk8 D128 bf16 is 1.07 GB of KV: 0.22 ms at 4.8 TB/s). So:
- a program owns one KV head and ALL G query heads that read it: K/V are read once per group, not
  once per query head (GQA's point), and the G x BLOCK_N logits come from one tl.dot;
- the KV of one request is cut into chunks (work items, planned on the host) so that short batches
  of long sequences still fill 132 SMs; each chunk writes an fp32 partial output and its LSE, and
  merge_partials_kernel combines a request's chunks by their LSEs (a few MB: a few us);
- when plan() gave every request one chunk, the decode kernel writes the output directly (DIRECT);
- the page table is read per token (a BLOCK_N gather of int32 page ids, cached), so any page size
  1..128 works with one code path; the page id is clamped to the cache (never an out-of-bounds read)
  and positions past a chunk's end are masked.

Work items are metadata arrays in one int32 device buffer (written by plan() with one copy), at
int offsets: meta[0] = num_work, work_req[w] (the request of work item w), and per request b:
kv_indptr[b] (its first entry of kv_indices), work_indptr[b] (its first work item), kv_len[b]; the
chunk section (off_chunk) is no longer written: a request's n = work_indptr[b + 1] - work_indptr[b]
items split its window's span into equal chunks, chunk = ceil(ceil(span / n) / BLOCK_N) * BLOCK_N,
computed by the kernel. Item w covers tokens [s0 + i * chunk, min(s0 + (i + 1) * chunk, kv_len))
with i = w - work_indptr[b] and s0 the window's first token: the host writes only per-request
arrays and one repeat (plan() is on the host's critical path). The programs loop
``for w in range(pid, num_work, num_programs)`` with num_work read from the device, so that a CUDA
graph captured once replays for any plan with at most as many work items as the grid covers.

Softmax runs in the exp2 domain (logits * log2(e)), as FlashInfer does; the LSE it returns is base 2.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _tanh(x):
    # tanh from exp2 (tl has no tanh on every backend): 1 - 2 / (exp(2x) + 1), exact at +-inf
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def decode_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
    meta_ptr, kv_indices_ptr,
    off_req, off_chunk, off_work_indptr, off_kv_indptr, off_len,
    num_pages, num_programs, window_left,
    stride_qb, stride_qh,
    stride_kp, stride_kt, stride_kh,
    stride_vp, stride_vt, stride_vh,
    stride_ob, stride_oh,
    sm_scale, soft_cap,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr, WRITE_LSE: tl.constexpr, SOFT_CAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HEADS_FIRST: tl.constexpr,
):
    if HEADS_FIRST:  # grid (Hk, programs): the Hk programs of one chunk run side by side and read
        kvh = tl.program_id(0)  # the neighbouring 256-byte head rows of the same NHD token rows
        pid = tl.program_id(1)
        num_kv_heads = tl.num_programs(0)
    else:
        pid = tl.program_id(0)
        kvh = tl.program_id(1)
        num_kv_heads = tl.num_programs(1)
    num_work = tl.load(meta_ptr)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, HEAD_DIM)
    n = tl.arange(0, BLOCK_N)
    g_ok = g < GROUP
    qh = kvh * GROUP + g  # [BG] query heads of this KV head
    for w in range(pid, num_work, num_programs):
        if DIRECT:  # one work item per request
            b = w
            local = 0
            chunk = 1 << 30
            length = tl.load(meta_ptr + off_len + b)
        else:
            b = tl.load(meta_ptr + off_req + w)
            w0 = tl.load(meta_ptr + off_work_indptr + b)
            num_chunks = tl.load(meta_ptr + off_work_indptr + b + 1) - w0
            local = w - w0
            length = tl.load(meta_ptr + off_len + b)
            # equal chunks of the window, rounded up to BLOCK_N (aligned loads): computed here, not
            # by plan() (five numpy calls of host time less); 0 for a request without keys
            span = tl.minimum(length, window_left + 1)
            chunk = ((span + num_chunks - 1) // num_chunks + BLOCK_N - 1) // BLOCK_N * BLOCK_N
        start = tl.maximum(length - 1 - window_left, 0) + local * chunk  # window_left: 2**30 for none
        end = tl.minimum(start + chunk, length)
        page_base = tl.load(meta_ptr + off_kv_indptr + b)
        q = tl.load(q_ptr + b.to(tl.int64) * stride_qb + qh[:, None] * stride_qh + d[None, :],
                    mask=g_ok[:, None], other=0.0)  # [BG, D]
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
        for s in range(start, end, BLOCK_N):
            pos = s + n  # [BN] token positions in the request
            ok = pos < end
            page = tl.load(kv_indices_ptr + page_base + pos // PAGE, mask=ok, other=0)
            page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)  # never out of the cache
            slot = pos % PAGE
            k_row = page * stride_kp + slot * stride_kt + kvh * stride_kh  # [BN]
            v_row = page * stride_vp + slot * stride_vt + kvh * stride_vh
            # [BN, D]; an fp8 cache is widened to q's dtype here (a no-op when the dtypes agree)
            k = tl.load(k_ptr + k_row[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(q.dtype)
            v = tl.load(v_ptr + v_row[:, None] + d[None, :], mask=ok[:, None], other=0.0).to(q.dtype)
            qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BG, BN] fp32
            if SOFT_CAP:
                qk = soft_cap * _tanh(qk * (sm_scale / soft_cap)) * 1.4426950408889634
            else:
                qk = qk * (sm_scale * 1.4426950408889634)
            qk = tl.where(ok[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # finite: every step holds a valid token
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, axis=1)
            acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            m_i = m_new
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        lse = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        if DIRECT:
            tl.store(out_ptr + b.to(tl.int64) * stride_ob + qh[:, None] * stride_oh + d[None, :],
                     o.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])
            if WRITE_LSE:
                tl.store(lse_ptr + b.to(tl.int64) * (num_kv_heads * GROUP) + qh, lse, mask=g_ok)
        else:
            row = (w * (num_kv_heads * GROUP) + qh).to(tl.int64)  # [BG] partial rows [W, Hq]
            tl.store(part_o_ptr + row[:, None] * HEAD_DIM + d[None, :], o, mask=g_ok[:, None])
            tl.store(part_lse_ptr + row, lse, mask=g_ok)


@triton.jit
def merge_partials_kernel(
    part_o_ptr, part_lse_ptr, meta_ptr, out_ptr, lse_ptr,
    off_work_indptr, num_qo_heads, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    """out[b, h] = sum_c 2^(lse_c - lse) * o_c over request b's chunks c (online, one pass)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    c0 = tl.load(meta_ptr + off_work_indptr + b)
    c1 = tl.load(meta_ptr + off_work_indptr + b + 1)
    m = float("-inf")
    l = 0.0
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for c in range(c0, c1):
        row = c * num_qo_heads + h  # W * Hq < 2**31
        s = tl.load(part_lse_ptr + row)
        o = tl.load(part_o_ptr + row.to(tl.int64) * HEAD_DIM + d)
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(s - m_safe)
        acc = acc * alpha + o * beta
        l = l * alpha + beta
        m = m_new
    has = l > 0
    res = acc / tl.where(has, l, 1.0)
    tl.store(out_ptr + b.to(tl.int64) * stride_ob + h * stride_oh + d, res.to(out_ptr.dtype.element_ty))
    if WRITE_LSE:
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        tl.store(lse_ptr + b.to(tl.int64) * num_qo_heads + h,
                 tl.where(has, m_safe + tl.log2(tl.where(has, l, 1.0)), float("-inf")))
