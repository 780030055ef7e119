"""Paged prefill attention, second kernel: the first one's tiles, masks and metadata, with the K / V
loads of Triton's Hopper attention (tutorial 06-fused-attention) where the cache allows them.

# B = batch, Hq / Hk = heads, G = Hq // Hk, D = head_dim, P = page_size
# one program = BLOCK_M query rows of one request and one query head; BLOCK_N KV tokens per step

Why a second kernel (the first, _triton_prefill, stays selectable: prefill.PREFILL_KERNEL): at 8 x
4096 causal, 32/8 heads, the first reached 322.6 TFLOP/s on an H200, 0.60x cuDNN's SDPA. Its K / V
tiles are gathered token by token: a [BLOCK_N, D] tile needs BLOCK_N * D / (32 * warps) 64-bit
addresses per thread (BLOCK_N 64, 8 warps: 32 per thread, 64 registers, twice for K and V), which is
why its sweep preferred BLOCK_N 32 with 4 warps, half the tile the tutorial runs on sm_90. Here:

- KV_TMA (a request's pages are consecutive page ids, checked by plan() on the host; the cache's
  token rows evenly strided, checked by run()): K and V are 2-D tensors [num_pages * P, Hk * D] of
  token rows, a request's keys rows tok0 .. tok0 + kv_len with tok0 = P * its first page id, and
  each [BLOCK_N, D] tile is one TMA load through a tensor descriptor (no address registers, no
  predicates; rows past the tensor's end read as 0). Tiles of BLOCK_N 64-128 with 8 warps, as the
  tutorial. Rows past kv_len that a boundary block reads (the last page's unused slots, or the next
  request's tokens) get probability 0 from the mask and their V is zeroed (0 * NaN would be NaN).
- otherwise (shuffled pages): the first kernel's gather, but the blocks known to lie inside kv_len
  load without masks (one predicate less per element, the common case of a long prefill).

- WS (KV_TMA's warp-specialised variant, prefill.PREFILL_WS / MOECOMM_PREFILL_WS, default off until
  timed on the GPU): the loop written so that Triton 3.6's Hopper warp-specialisation pass
  (nvidia.passes.hopper.add_hopper_warpspec, taken for a `tl.range(..., warp_specialize=True)` loop)
  transforms it into one producer warpgroup issuing the TMA loads and two consumer warpgroups of
  BLOCK_M / 2 rows each doing both GEMMs and the softmax (ttg.warp_specialize with two partitions,
  12 warps from num_warps=4, setmaxnreg 232 for the consumers). What the pass takes, found by
  compiling for sm_90 on CPU (tests/attention/test_prefill_ws.py keeps it so): num_warps == 4 and
  num_stages > 1 (else it leaves the loop alone); ONE KV loop in the function (a second loop, before
  or after, masked or not, warp-specialised or not, crashes the pass: "operation destroyed but still
  has uses" / a dominance assertion); Q through a tensor descriptor (a pointer load of Q, kept in
  registers, crashes it in WSLowerToken); no scf.if with an else inside (it declines). Hence one loop
  over every block with the causal / length / window mask applied to each (2 ops an element more
  than the unmasked blocks above), and Q, K and V through descriptors bounded to the request (rows
  past qo_len / kv_len read as 0, so V needs no zeroing in registers and stays in shared memory for
  the second GEMM). 128 x 128 tiles fit 2 stages (180 KB of shared memory; 3 would need 246 KB).

Both (the non-WS loops): the causal split of the tutorial (blocks strictly below every row's diagonal
without any mask arithmetic, then the diagonal blocks masked); all: exp2 with log2(e) folded into sm_scale, the
heaviest tiles first (plan()), and query heads of one KV head next to each other in the grid (their
K / V tiles shared through L2).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def _load_kv(k_ptr, v_ptr, k_desc, v_desc, kv_indices_ptr, page_base, tok0, s, kv_len, kvh, num_pages,
             stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
             PAGE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
             KV_TMA: tl.constexpr):
    """The [BLOCK_N, D] K and V tiles of keys s .. s + BLOCK_N (rows past kv_len: V is 0)."""
    n = tl.arange(0, BLOCK_N)
    kpos = s + n
    ok = kpos < kv_len
    if KV_TMA:
        k = k_desc.load([tok0 + s, kvh * HEAD_DIM])
        v = v_desc.load([tok0 + s, kvh * HEAD_DIM])
        if MASKED:
            v = tl.where(ok[:, None], v, 0.0)
    else:
        d = tl.arange(0, HEAD_DIM)
        if MASKED:
            page = tl.load(kv_indices_ptr + page_base + kpos // PAGE, mask=ok, other=0)
        else:  # the whole block inside kv_len
            page = tl.load(kv_indices_ptr + page_base + kpos // PAGE)
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
        slot = kpos % PAGE
        k_off = (page * stride_kp + slot * stride_kt + kvh * stride_kh)[:, None] + d[None, :]
        v_off = (page * stride_vp + slot * stride_vt + kvh * stride_vh)[:, None] + d[None, :]
        if MASKED:
            k = tl.load(k_ptr + k_off, mask=ok[:, None], other=0.0)
            v = tl.load(v_ptr + v_off, mask=ok[:, None], other=0.0)
        else:
            k = tl.load(k_ptr + k_off)
            v = tl.load(v_ptr + v_off)
    return k, v


@triton.jit
def _step(acc, l_i, m_i, q, k, v, s, kv_len, qpos, q_rows, q_ok, mask_ptr, mask_base, sm_scale, soft_cap,
          window_left, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
          SOFT_CAP: tl.constexpr, CUSTOM: tl.constexpr, DOT_PRECISION: tl.constexpr):
    n = tl.arange(0, BLOCK_N)
    kpos = s + n  # [BN]
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BM, BN] fp32
    if SOFT_CAP:
        qk = soft_cap * _tanh(qk * (sm_scale / soft_cap))
    if MASKED:
        qk = qk * 1.4426950408889634 if SOFT_CAP else qk * (sm_scale * 1.4426950408889634)
        vis = (kpos < kv_len)[None, :] & q_ok[:, None]
        if CAUSAL:
            vis = vis & (kpos[None, :] <= qpos[:, None])
        if WINDOW:
            vis = vis & (kpos[None, :] >= qpos[:, None] - window_left)
        if CUSTOM:
            bit = mask_base + q_rows.to(tl.int64)[:, None] * kv_len + kpos[None, :]
            byte = tl.load(mask_ptr + (bit >> 3), mask=vis, other=0).to(tl.int32)
            vis = vis & (((byte >> (bit & 7).to(tl.int32)) & 1) != 0)
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.exp2(qk - m_safe[:, None])
    else:
        # every row sees every key of the block: the scale folded into one multiply-subtract
        scale = 1.4426950408889634 if SOFT_CAP else sm_scale * 1.4426950408889634
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale)
        m_safe = m_new
        p = tl.exp2(qk * scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def _ws_blocks(q_ptr, k_ptr, v_ptr, row0, q0, qo_len, tok0, kv_len, h, kvh, num_qo_heads, qpos, lo, hi,
               stride_qn, stride_kt, stride_vt, sm_scale, soft_cap, window_left,
               GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """WS: (acc, l_i, m_i) of one tile over all its KV blocks, in the one loop the Hopper
    warp-specialisation pass takes (module docstring). Q [BLOCK_M, D], K and V [BLOCK_N, D] tiles
    come through descriptors whose rows are this request's only: the rows past qo_len / kv_len read
    as 0 (a zero key's logit is masked, a zero value adds nothing)."""
    kv_width = (num_qo_heads // GROUP) * HEAD_DIM
    q_desc = tl.make_tensor_descriptor(q_ptr + row0.to(tl.int64) * stride_qn,
                                       shape=[tl.maximum(qo_len, 1), num_qo_heads * HEAD_DIM],
                                       strides=[stride_qn, 1], block_shape=[BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(k_ptr + tok0.to(tl.int64) * stride_kt, shape=[tl.maximum(kv_len, 1), kv_width],
                                       strides=[stride_kt, 1], block_shape=[BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(v_ptr + tok0.to(tl.int64) * stride_vt, shape=[tl.maximum(kv_len, 1), kv_width],
                                       strides=[stride_vt, 1], block_shape=[BLOCK_N, HEAD_DIM])
    q = q_desc.load([q0, h * HEAD_DIM])  # [BM, D]; through shared memory (the pass needs a TMA load here)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    scale = 1.4426950408889634 if SOFT_CAP else sm_scale * 1.4426950408889634
    for s in tl.range(lo, hi, BLOCK_N, warp_specialize=True):
        k = k_desc.load([s, kvh * HEAD_DIM])
        v = v_desc.load([s, kvh * HEAD_DIM])
        kpos = s + tl.arange(0, BLOCK_N)  # [BN]
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)  # [BM, BN] fp32
        if SOFT_CAP:
            qk = soft_cap * _tanh(qk * (sm_scale / soft_cap))
        # causal: kpos <= qpos implies kpos < kv_len for the rows stored (qpos < kv_len); the rows
        # past qo_len may see the zero rows past kv_len, and are not stored
        if CAUSAL:
            vis = kpos[None, :] <= qpos[:, None]
        else:
            vis = (kpos < kv_len)[None, :]
        if WINDOW:
            vis = vis & (kpos[None, :] >= qpos[:, None] - window_left)
        qk = tl.where(vis, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1) * scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
        p = tl.exp2(qk * scale - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = tl.dot(p.to(q.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def prefill_v2_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, meta_ptr, kv_indices_ptr, mask_ptr,
    off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len, off_mask,
    num_pages, num_qo_heads,
    stride_qn, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_on, stride_oh,
    sm_scale, soft_cap, window_left,
    GROUP: tl.constexpr, PAGE: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, WINDOW: tl.constexpr, SOFT_CAP: tl.constexpr, CUSTOM: tl.constexpr,
    WRITE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, KV_TMA: tl.constexpr, WS: tl.constexpr = False,
):
    h = tl.program_id(0)
    t = tl.program_id(1)
    if t < tl.load(meta_ptr):
        kvh = h // GROUP
        b = tl.load(meta_ptr + off_tile_req + t)
        q0 = tl.load(meta_ptr + off_tile_q0 + t)
        row0 = tl.load(meta_ptr + off_qo_indptr + b)
        qo_len = tl.load(meta_ptr + off_qo_indptr + b + 1) - row0
        kv_len = tl.load(meta_ptr + off_kv_len + b)
        page_base = tl.load(meta_ptr + off_kv_indptr + b)
        mask_base = 0
        if CUSTOM:
            mask_base = tl.load(meta_ptr + off_mask + b).to(tl.int64)
        k_desc = None
        v_desc = None
        tok0 = 0
        if KV_TMA:
            # token rows of the whole cache; run() checked stride_kp == PAGE * stride_kt (and V's)
            num_rows = num_pages * PAGE
            if not WS:  # (WS: bounded to the request, in _ws_blocks)
                k_desc = tl.make_tensor_descriptor(k_ptr, shape=[num_rows, (num_qo_heads // GROUP) * HEAD_DIM],
                                                   strides=[stride_kt, 1], block_shape=[BLOCK_N, HEAD_DIM])
                v_desc = tl.make_tensor_descriptor(v_ptr, shape=[num_rows, (num_qo_heads // GROUP) * HEAD_DIM],
                                                   strides=[stride_vt, 1], block_shape=[BLOCK_N, HEAD_DIM])
            first = tl.load(kv_indices_ptr + page_base, mask=kv_len > 0, other=0)
            tok0 = tl.minimum(tl.maximum(first, 0), num_pages - 1) * PAGE
        m = tl.arange(0, BLOCK_M)
        d = tl.arange(0, HEAD_DIM)
        q_rows = q0 + m  # [BM] rows within the request
        q_ok = q_rows < qo_len
        qpos = q_rows + (kv_len - qo_len)  # positions in the KV sequence
        rows = (row0 + q_rows).to(tl.int64)
        # the KV blocks [lo, hi) any row of the tile sees
        qpos_min = q0 + (kv_len - qo_len)
        qpos_max = tl.minimum(q0 + BLOCK_M, qo_len) - 1 + (kv_len - qo_len)
        hi = kv_len
        if CAUSAL:
            hi = tl.minimum(kv_len, qpos_max + 1)
        lo = 0
        if WINDOW:
            lo = tl.maximum(qpos_min - window_left, 0) // BLOCK_N * BLOCK_N
        if WS:
            acc, l_i, m_i = _ws_blocks(q_ptr, k_ptr, v_ptr, row0, q0, qo_len, tok0, kv_len, h, kvh, num_qo_heads, qpos,
                                       lo, hi, stride_qn, stride_kt, stride_vt, sm_scale, soft_cap, window_left, GROUP,
                                       HEAD_DIM, BLOCK_M, BLOCK_N, CAUSAL, WINDOW, SOFT_CAP, DOT_PRECISION)
        else:
            q = tl.load(q_ptr + rows[:, None] * stride_qn + h * stride_qh + d[None, :], mask=q_ok[:, None], other=0.0)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
            f0 = 0  # blocks from f0 on are above the window's lower edge for every row
            if WINDOW:
                f0 = (tl.maximum(qpos_max - window_left, 0) + BLOCK_N - 1) // BLOCK_N * BLOCK_N
            f1 = kv_len // BLOCK_N * BLOCK_N  # blocks before f1 lie inside kv_len
            if CAUSAL:
                # and before every row's diagonal
                f1 = tl.maximum(tl.minimum(kv_len, qpos_min + 1), 0) // BLOCK_N * BLOCK_N
            if CUSTOM:
                f0 = lo
                f1 = lo
            f0 = tl.maximum(f0, lo)
            f1 = tl.maximum(f1, f0)
            # [lo, f0): window's lower edge, masked; [f0, f1): no mask at all; [f1, hi): diagonal / end, masked
            for s in range(lo, tl.minimum(f0, hi), BLOCK_N):
                k, v = _load_kv(k_ptr, v_ptr, k_desc, v_desc, kv_indices_ptr, page_base, tok0, s, kv_len, kvh,
                                num_pages, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                                PAGE, HEAD_DIM, BLOCK_N, True, KV_TMA)
                acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, s, kv_len, qpos, q_rows, q_ok, mask_ptr, mask_base,
                                      sm_scale, soft_cap, window_left, BLOCK_N, True, CAUSAL, WINDOW, SOFT_CAP, CUSTOM,
                                      DOT_PRECISION)
            for s in range(f0, tl.minimum(f1, hi), BLOCK_N):
                k, v = _load_kv(k_ptr, v_ptr, k_desc, v_desc, kv_indices_ptr, page_base, tok0, s, kv_len, kvh,
                                num_pages, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                                PAGE, HEAD_DIM, BLOCK_N, False, KV_TMA)
                acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, s, kv_len, qpos, q_rows, q_ok, mask_ptr, mask_base,
                                      sm_scale, soft_cap, window_left, BLOCK_N, False, CAUSAL, WINDOW, SOFT_CAP, CUSTOM,
                                      DOT_PRECISION)
            for s in range(tl.maximum(f1, lo), hi, BLOCK_N):
                k, v = _load_kv(k_ptr, v_ptr, k_desc, v_desc, kv_indices_ptr, page_base, tok0, s, kv_len, kvh,
                                num_pages, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
                                PAGE, HEAD_DIM, BLOCK_N, True, KV_TMA)
                acc, l_i, m_i = _step(acc, l_i, m_i, q, k, v, s, kv_len, qpos, q_rows, q_ok, mask_ptr, mask_base,
                                      sm_scale, soft_cap, window_left, BLOCK_N, True, CAUSAL, WINDOW, SOFT_CAP, CUSTOM,
                                      DOT_PRECISION)
        has = l_i > 0
        o = acc / tl.where(has, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_on + h * stride_oh + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=q_ok[:, None])
        if WRITE_LSE:
            m_safe = tl.where(m_i == float("-inf"), 0.0, m_i)
            tl.store(lse_ptr + rows * num_qo_heads + h, tl.where(has, m_safe + tl.log2(tl.where(has, l_i, 1.0)),
                                                                float("-inf")), mask=q_ok)
