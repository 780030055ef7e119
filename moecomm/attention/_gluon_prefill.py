"""Paged prefill attention, third kernel: a hand-scheduled warp-specialised Hopper kernel in Gluon
(triton.experimental.gluon), FlashAttention-3's structure, for the TMA path's common case.

# B = batch, Hq / Hk = heads, G = Hq // Hk, D = head_dim, P = page_size
# work item w = t * Hq + h: BLOCK_M (128) query rows of plan()'s tile t (heaviest first) and query
# head h; BLOCK_N KV tokens per step

Why (benchmarks/RESULTS.md, "Paged attention"): at 8 x 4096 causal, 32/8 heads, D128, v2's TMA path
reached 0.77x cuDNN on the H200. Its one loop per program does load, Q K^T, softmax and P V in
program order in 8 warps that all wait for the same wgmma; Triton 3.6's automatic warp
specialisation of that loop gave wrong values. Here the schedule is written out:

- partitions (gl.warp_specialize): a producer (1 warp) issues every TMA load: per work item Q (two
  halves of BLOCK_M / 2 rows) into one of Q_SLOTS slots, then K and V tiles into a STAGES-deep ring
  guarded by mbarriers (ready: the TMA's bytes arrived; empty: both consumers are done with the slot,
  count 2), the ring counted across items. Two consumer warpgroups (the default partition and one
  worker of 4 warps) own BLOCK_M / 2 rows each and run both GEMMs as async wgmma (S = Q K^T from
  shared memory, O += P V with P from registers) and the online softmax in registers; the two
  interleave on the SM's tensor cores (one's softmax beside the other's GEMMs).
- work items: program p runs items p, p + grid, ...: with GluonConfig.persistent the grid is the SM
  count (prefill.gluon_grid), so the producer loads the next item's Q, K and V while the consumers
  finish this one (its last blocks, the epilogue's stores) instead of each tile paying its own start
  and drain with the SM idle (one 196 KB program fits an SM). Items are visited in plan()'s order,
  heaviest tiles first, strided: each round of grid items is about even. A Q slot is released
  (q_empty) after the item's last P V: every load of that item has landed, so its descriptors (two
  sets, by item parity, each its own global scratch) can be rewritten two items on.
- PIPE (FlashAttention-3's intra-warpgroup overlap): block j's Q K^T is issued before block j-1's
  P V, and block j's softmax is meant to run while that P V is in flight (wgmma_wait(1) retires only
  the older Q K^T). ptxas hoists the P V wait (WARPGROUP.DEPBAR) to the top of its basic block, i.e.
  before the softmax, when only the mask sits in the branch; BRANCH_SOFTMAX puts the whole softmax
  in each branch, and the wait then stays after it (checked in SASS on CPU). Measured, it gains
  nothing (the other consumer warpgroup keeps the tensor cores busy meanwhile) and costs ~0.016x
  persistent: off for D128. Costs one more [BLOCK_M / 2, BLOCK_N] fp32 tile of registers.
- PINGPONG (FlashAttention-3's warp scheduler barriers): the two consumers take turns issuing
  their wgmma (two mbarriers), so one's softmax runs beside the other's GEMMs by construction.
- LATE_K_RELEASE: block j's K slot released with block j-1's V slot after the softmax (one
  mbarrier arrive point, whose warpgroup barrier then sits off the Q K^T -> softmax path).
- masks: every row of a block strictly below the tile's first row's diagonal (and inside kv_len)
  sees every key of it: no mask arithmetic; the diagonal / last blocks (s >= F1) take the causal
  and length mask, a uniform branch per block.
- K / V / Q descriptors are made in the kernel and bounded to the request (base = its first row,
  shape = its length): rows past kv_len / qo_len read as 0 (a zero key's logit is masked, a zero
  value row adds nothing, and no NaN from the next request's or an unused slot reaches 0 * NaN).
- exp2 with log2(e) folded into sm_scale; the LSE written as v2 writes it (log2 domain, scaled).

Measured (H200, 2026-12-02, session 13, benchmarks/probe_prefill_gluon.py; benchmarks/RESULTS.md):
8 x 4096 causal, 32/8 heads, D128 bf16: persistent 535.0 TFLOP/s = 0.957x cuDNN (559.0), one
program a tile 0.857x, v2 0.762x, FlashInfer 0.7.2 0.864x; non-causal (branch + persistent) 0.947x.

Applies (prefill.py's _gluon_applies): sm_90, NHD cache whose token rows are evenly strided, pages
consecutive per request, head_dim 64 / 128, bf16 / fp16, causal or no mask, any sm_scale; not with
a window, soft cap or custom mask. Gluon does not run in the interpreter: CPU tests compile it for
sm_90a (tests/attention/test_prefill_gluon.py).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

_LOG2E = 1.4426950408889634


@gluon.jit
def _softmax_rows(qk, m_i, l_i, qk_scale):
    m_new = gl.maximum(m_i, gl.max(qk, axis=1) * qk_scale)
    m_safe = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
    p = gl.exp2(qk * qk_scale - m_safe[:, None])
    alpha = gl.exp2(m_i - m_safe)
    l_new = l_i * alpha + gl.sum(p, axis=1)
    return p, alpha, m_new, l_new


@gluon.jit
def _mask_block(qk, s, qpos, kv_len, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr, s_layout: gl.constexpr):
    kpos = s + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))  # [BN]
    vis = (kpos < kv_len)[None, :]
    if CAUSAL:
        vis = vis & (kpos[None, :] <= qpos[:, None])
    return gl.where(vis, qk, float("-inf"))


@gluon.jit
def _softmax_block(qk, m_i, l_i, s, F1, qpos, kv_len, qk_scale, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                   s_layout: gl.constexpr, BRANCH_SOFTMAX: gl.constexpr):
    """Block s's probabilities (fp32, s_layout), alpha = exp2(m_old - m_new), and the new m, l. The
    diagonal / last blocks (s >= F1) take the causal and length mask. BRANCH_SOFTMAX: the whole
    softmax inside each branch, so that the block after them starts with the caller's wgmma wait:
    ptxas hoists a WARPGROUP.DEPBAR to the top of its basic block, and with only the mask in the
    branch that block is the softmax (the wait for P V then runs before it, no overlap)."""
    if BRANCH_SOFTMAX:
        if s >= F1:
            p, alpha, m_new, l_new = _softmax_rows(_mask_block(qk, s, qpos, kv_len, BLOCK_N, CAUSAL, s_layout), m_i,
                                                   l_i, qk_scale)
        else:
            p, alpha, m_new, l_new = _softmax_rows(qk, m_i, l_i, qk_scale)
    else:
        if s >= F1:
            qk = _mask_block(qk, s, qpos, kv_len, BLOCK_N, CAUSAL, s_layout)
        p, alpha, m_new, l_new = _softmax_rows(qk, m_i, l_i, qk_scale)
    return p, alpha, m_new, l_new


@gluon.jit
def _turn_wait(turn, k, WG: gl.constexpr, PINGPONG: gl.constexpr):
    """PINGPONG: wait for this warpgroup's k-th turn to issue wgmma. Turns alternate WG 0, 1, 0, ...
    (FlashAttention-3's warp scheduler barriers): turn.index(WG) completes its phase k - 1 + WG when
    the other warpgroup passed; WG 0's first wait (parity 1 on a fresh barrier) passes at once."""
    if PINGPONG:
        mbarrier.wait(turn.index(WG), (k + WG + 1) & 1)


@gluon.jit
def _turn_pass(turn, WG: gl.constexpr, PINGPONG: gl.constexpr):
    if PINGPONG:
        mbarrier.arrive(turn.index(1 - WG), count=1)


@gluon.jit
def _tile(meta_ptr, kv_indices_ptr, w, off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len, num_pages,
          num_qo_heads, PAGE: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Work item w = t * Hq + h (plan()'s tile t, heaviest first; query head h): its request's rows
    and KV, and the KV blocks [0, n_blocks) its rows see (blocks before F1 need no mask for any row)."""
    t = w // num_qo_heads
    h = w - t * num_qo_heads
    b = gl.load(meta_ptr + off_tile_req + t)
    q0 = gl.load(meta_ptr + off_tile_q0 + t)
    row0 = gl.load(meta_ptr + off_qo_indptr + b)
    qo_len = gl.load(meta_ptr + off_qo_indptr + b + 1) - row0
    kv_len = gl.load(meta_ptr + off_kv_len + b)
    page_base = gl.load(meta_ptr + off_kv_indptr + b)
    first = gl.load(kv_indices_ptr + page_base, mask=kv_len > 0, other=0)
    tok0 = gl.minimum(gl.maximum(first, 0), num_pages - 1) * PAGE  # run() checked stride_kp == PAGE * stride_kt
    qpos_min = q0 + (kv_len - qo_len)
    qpos_max = gl.minimum(q0 + BLOCK_M, qo_len) - 1 + (kv_len - qo_len)
    hi = kv_len
    F1 = kv_len // BLOCK_N * BLOCK_N
    if CAUSAL:
        hi = gl.minimum(kv_len, qpos_max + 1)
        F1 = gl.maximum(gl.minimum(kv_len, qpos_min + 1), 0) // BLOCK_N * BLOCK_N
    n_blocks = (gl.maximum(hi, 0) + BLOCK_N - 1) // BLOCK_N
    return h, row0, q0, qo_len, tok0, kv_len, n_blocks, F1


@gluon.jit
def _consumer(q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn,
              out_ptr, lse_ptr, meta_ptr, kv_indices_ptr, off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr,
              off_kv_len, num_pages, num_qo_heads, stride_on, stride_oh, qk_scale, w0, w_step, num_items,
              WG: gl.constexpr, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr,
              PIPE: gl.constexpr, PINGPONG: gl.constexpr, LATE_K_RELEASE: gl.constexpr,
              BRANCH_SOFTMAX: gl.constexpr, Q_SLOTS: gl.constexpr):
    """Rows [WG * BLOCK_M / 2, (WG + 1) * BLOCK_M / 2) of each work item's tile: both GEMMs, softmax,
    store. KV blocks are counted across items (base: the ring position of the item's first block);
    item i's Q slot (i % Q_SLOTS) is released after its last P V."""
    HALF: gl.constexpr = BLOCK_M // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    dtype: gl.constexpr = q_bufs.dtype
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    s_zero = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)

    base = 0
    i = 0
    turns = 0  # PINGPONG's turns taken, counted across items (n_blocks + 1 an item)
    for w in range(w0, num_items, w_step):
        h, row0, q0, qo_len, tok0, kv_len, n_blocks, F1 = _tile(meta_ptr, kv_indices_ptr, w, off_tile_req, off_tile_q0,
                                                               off_qo_indptr, off_kv_indptr, off_kv_len, num_pages,
                                                               num_qo_heads, PAGE, BLOCK_M, BLOCK_N, CAUSAL)
        q_rows = q0 + WG * HALF + gl.arange(0, HALF, layout=row_s)  # [HALF] rows within the request
        qpos = q_rows + (kv_len - qo_len)  # positions in the KV sequence
        m_i = gl.full([HALF], float("-inf"), gl.float32, layout=row_s)
        l_i = gl.zeros([HALF], gl.float32, layout=row_s)
        acc = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=o_layout)
        qs = i % Q_SLOTS
        q_s = q_bufs.index(qs * 2 + WG)
        mbarrier.wait(q_ready.index(qs), (i // Q_SLOTS) & 1)
        if n_blocks > 0:
            if PIPE:
                # block 0: Q K^T, softmax (O is 0: nothing to rescale)
                mbarrier.wait(k_ready.index(base % STAGES), (base // STAGES) & 1)
                _turn_wait(turn, turns, WG, PINGPONG)
                qk = warpgroup_mma(q_s, k_bufs.index(base % STAGES).permute((1, 0)), s_zero, use_acc=False,
                                   is_async=True)
                _turn_pass(turn, WG, PINGPONG)
                qk = warpgroup_mma_wait(0, deps=[qk])
                mbarrier.arrive(k_empty.index(base % STAGES), count=1)
                p, alpha, m_i, l_i = _softmax_block(qk, m_i, l_i, 0, F1, qpos, kv_len, qk_scale, BLOCK_N, CAUSAL,
                                                    s_layout, BRANCH_SOFTMAX)
                p_op = gl.convert_layout(p.to(dtype), p_layout)
                for j in range(1, n_blocks):
                    slot = (base + j) % STAGES
                    prev = (base + j - 1) % STAGES
                    mbarrier.wait(k_ready.index(slot), ((base + j) // STAGES) & 1)
                    mbarrier.wait(v_ready.index(prev), ((base + j - 1) // STAGES) & 1)
                    _turn_wait(turn, turns + j, WG, PINGPONG)
                    qk = warpgroup_mma(q_s, k_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                    # O (not in flight: the last P V retired) rescaled to block j-1's max while Q K^T runs
                    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                    acc = warpgroup_mma(p_op, v_bufs.index(prev), acc, is_async=True)
                    _turn_pass(turn, WG, PINGPONG)
                    qk = warpgroup_mma_wait(1, deps=[qk])  # groups retire in order: Q K^T done, P V may run on
                    if not LATE_K_RELEASE:
                        mbarrier.arrive(k_empty.index(slot), count=1)
                    p, alpha, m_i, l_i = _softmax_block(qk, m_i, l_i, j * BLOCK_N, F1, qpos, kv_len, qk_scale,
                                                        BLOCK_N, CAUSAL, s_layout, BRANCH_SOFTMAX)
                    acc, p_op = warpgroup_mma_wait(0, deps=[acc, p_op])
                    if LATE_K_RELEASE:  # both slots at one point: one warpgroup barrier (arrive's) an iteration
                        mbarrier.arrive(k_empty.index(slot), count=1)
                    mbarrier.arrive(v_empty.index(prev), count=1)
                    p_op = gl.convert_layout(p.to(dtype), p_layout)
                last = (base + n_blocks - 1) % STAGES
                mbarrier.wait(v_ready.index(last), ((base + n_blocks - 1) // STAGES) & 1)
                _turn_wait(turn, turns + n_blocks, WG, PINGPONG)
                turns += n_blocks + 1
                acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                acc = warpgroup_mma(p_op, v_bufs.index(last), acc, is_async=True)
                _turn_pass(turn, WG, PINGPONG)
                acc = warpgroup_mma_wait(0, deps=[acc])
                mbarrier.arrive(v_empty.index(last), count=1)
            else:
                for j in range(0, n_blocks):
                    slot = (base + j) % STAGES
                    phase = ((base + j) // STAGES) & 1
                    mbarrier.wait(k_ready.index(slot), phase)
                    qk = warpgroup_mma(q_s, k_bufs.index(slot).permute((1, 0)), s_zero, use_acc=False, is_async=True)
                    qk = warpgroup_mma_wait(0, deps=[qk])
                    mbarrier.arrive(k_empty.index(slot), count=1)
                    p, alpha, m_i, l_i = _softmax_block(qk, m_i, l_i, j * BLOCK_N, F1, qpos, kv_len, qk_scale,
                                                        BLOCK_N, CAUSAL, s_layout, BRANCH_SOFTMAX)
                    acc = acc * gl.convert_layout(alpha, row_o)[:, None]
                    p_op = gl.convert_layout(p.to(dtype), p_layout)
                    mbarrier.wait(v_ready.index(slot), phase)
                    acc = warpgroup_mma(p_op, v_bufs.index(slot), acc, is_async=True)
                    acc = warpgroup_mma_wait(0, deps=[acc])
                    mbarrier.arrive(v_empty.index(slot), count=1)
        # every read of Q slot qs and of this item's K / V retired: the producer may reuse the slot
        # and (two items on) the item's descriptors
        mbarrier.arrive(q_empty.index(qs), count=1)
        # epilogue: O / l (rows that saw no key: 0), LSE = m + log2(l) as v2 (log2 domain, scaled)
        l_o = gl.convert_layout(l_i, row_o)
        has = l_o > 0
        o = acc / gl.where(has, l_o, 1.0)[:, None]
        o_rows = q0 + WG * HALF + gl.arange(0, HALF, layout=row_o)
        d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        rows64 = (row0 + o_rows).to(gl.int64)
        ok = o_rows < qo_len
        gl.store(out_ptr + rows64[:, None] * stride_on + h * stride_oh + d[None, :], o.to(out_ptr.dtype.element_ty),
                 mask=ok[:, None])
        if WRITE_LSE:
            has_s = l_i > 0
            m_safe = gl.where(m_i == float("-inf"), 0.0, m_i)
            lse = gl.where(has_s, m_safe + gl.log2(gl.where(has_s, l_i, 1.0)), float("-inf"))
            lse_rows = (row0 + q_rows).to(gl.int64)
            gl.store(lse_ptr + lse_rows * num_qo_heads + h, lse, mask=q_rows < qo_len)
        base += n_blocks
        i += 1


@gluon.jit
def _produce_item(q_ptr, k_ptr, v_ptr, q_bufs, k_bufs, v_bufs, q_bar, k_ready, k_empty, v_ready, v_empty, qs,
                  row0, q0, qo_len, tok0, kv_len, h, kvh, num_qo_heads, kv_width, stride_qn, stride_kt, stride_vt,
                  n_blocks, base, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                  STAGES: gl.constexpr):
    """One item's loads: Q's two halves into buffers 2 qs, 2 qs + 1, then K_j and V_j for j < n_blocks
    at ring positions base + j. Descriptors bounded to the request (rows past its end read as 0), made
    here: each of the producer's two call sites has its own global scratch."""
    HALF: gl.constexpr = BLOCK_M // 2
    q_desc = tma.make_tensor_descriptor(q_ptr + row0.to(gl.int64) * stride_qn,
                                        shape=[gl.maximum(qo_len, 1), num_qo_heads * HEAD_DIM],
                                        strides=[stride_qn, 1], block_shape=[HALF, HEAD_DIM], layout=q_bufs.layout)
    k_desc = tma.make_tensor_descriptor(k_ptr + tok0.to(gl.int64) * stride_kt, shape=[gl.maximum(kv_len, 1), kv_width],
                                        strides=[stride_kt, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=k_bufs.layout)
    v_desc = tma.make_tensor_descriptor(v_ptr + tok0.to(gl.int64) * stride_vt, shape=[gl.maximum(kv_len, 1), kv_width],
                                        strides=[stride_vt, 1], block_shape=[BLOCK_N, HEAD_DIM], layout=v_bufs.layout)
    mbarrier.expect(q_bar, 2 * q_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(q_desc, [q0, h * HEAD_DIM], q_bar, q_bufs.index(2 * qs))
    tma.async_copy_global_to_shared(q_desc, [q0 + HALF, h * HEAD_DIM], q_bar, q_bufs.index(2 * qs + 1))
    col = kvh * HEAD_DIM
    for j in range(0, n_blocks):
        slot = (base + j) % STAGES
        phase = (((base + j) // STAGES) & 1) ^ 1  # a fresh barrier's "previous phase" counts as complete
        mbarrier.wait(k_empty.index(slot), phase)
        mbarrier.expect(k_ready.index(slot), k_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(k_desc, [j * BLOCK_N, col], k_ready.index(slot), k_bufs.index(slot))
        mbarrier.wait(v_empty.index(slot), phase)
        mbarrier.expect(v_ready.index(slot), v_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(v_desc, [j * BLOCK_N, col], v_ready.index(slot), v_bufs.index(slot))


@gluon.jit
def _producer(q_ptr, k_ptr, v_ptr, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty,
              meta_ptr, kv_indices_ptr, off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len, num_pages,
              num_qo_heads, kv_width, stride_qn, stride_kt, stride_vt, w0, w_step, num_items,
              GROUP: gl.constexpr, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr,
              BLOCK_N: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr, Q_SLOTS: gl.constexpr):
    """One warp: each work item's Q (slot i % Q_SLOTS, once the item Q_SLOTS back released it), K and V.
    Descriptor set i % 2 (Q_SLOTS <= 2): the item two back, which used it, has released its Q slot."""
    base = 0
    i = 0
    for w in range(w0, num_items, w_step):
        h, row0, q0, qo_len, tok0, kv_len, n_blocks, F1 = _tile(meta_ptr, kv_indices_ptr, w, off_tile_req, off_tile_q0,
                                                               off_qo_indptr, off_kv_indptr, off_kv_len, num_pages,
                                                               num_qo_heads, PAGE, BLOCK_M, BLOCK_N, CAUSAL)
        kvh = h // GROUP
        qs = i % Q_SLOTS
        mbarrier.wait(q_empty.index(qs), ((i // Q_SLOTS) & 1) ^ 1)
        if i % 2 == 0:
            _produce_item(q_ptr, k_ptr, v_ptr, q_bufs, k_bufs, v_bufs, q_ready.index(qs), k_ready, k_empty, v_ready,
                          v_empty, qs, row0, q0, qo_len, tok0, kv_len, h, kvh, num_qo_heads, kv_width, stride_qn,
                          stride_kt, stride_vt, n_blocks, base, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES)
        else:
            _produce_item(q_ptr, k_ptr, v_ptr, q_bufs, k_bufs, v_bufs, q_ready.index(qs), k_ready, k_empty, v_ready,
                          v_empty, qs, row0, q0, qo_len, tok0, kv_len, h, kvh, num_qo_heads, kv_width, stride_qn,
                          stride_kt, stride_vt, n_blocks, base, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES)
        base += n_blocks
        i += 1


@gluon.jit
def prefill_gluon_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, meta_ptr, kv_indices_ptr, mask_ptr,
    off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr, off_kv_len, off_mask,
    num_pages, num_qo_heads,
    stride_qn, stride_qh, stride_kp, stride_kt, stride_kh, stride_vp, stride_vt, stride_vh,
    stride_on, stride_oh,
    sm_scale, soft_cap, window_left,
    GROUP: gl.constexpr, PAGE: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, CAUSAL: gl.constexpr, WRITE_LSE: gl.constexpr, PIPE: gl.constexpr, PINGPONG: gl.constexpr,
    LATE_K_RELEASE: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    BRANCH_SOFTMAX: gl.constexpr, Q_SLOTS: gl.constexpr,
):
    """The arguments of prefill_v2_kernel (run() launches either); mask_ptr, soft_cap, window_left and
    the page / head strides are unused (no custom mask, no soft cap, no window; KV rows by stride_kt).
    A 1-D grid: program p runs work items p, p + grid, ... of meta[0] * Hq (t * Hq + h): one each
    when the grid covers them all, a persistent loop when it is the SM count."""
    num_items = gl.load(meta_ptr) * num_qo_heads
    w0 = gl.program_id(0)
    w_step = gl.num_programs(0)
    if w0 < num_items:
        qk_scale = sm_scale * 1.4426950408889634
        kv_width = (num_qo_heads // GROUP) * HEAD_DIM

        dtype: gl.constexpr = q_ptr.dtype.element_ty
        q_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M // 2, HEAD_DIM], dtype)
        kv_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, HEAD_DIM], dtype)
        q_bufs = gl.allocate_shared_memory(dtype, [2 * Q_SLOTS, BLOCK_M // 2, HEAD_DIM], q_layout)  # [slot, half]
        k_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        v_bufs = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], kv_layout)
        q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
        k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # PINGPONG's turns
        for i in gl.static_range(2):
            mbarrier.init(q_ready.index(i), count=1)
            mbarrier.init(q_empty.index(i), count=2)  # both consumers
            mbarrier.init(turn.index(i), count=1)
        for i in gl.static_range(STAGES):
            mbarrier.init(k_ready.index(i), count=1)
            mbarrier.init(v_ready.index(i), count=1)
            mbarrier.init(k_empty.index(i), count=2)  # both consumers release a slot
            mbarrier.init(v_empty.index(i), count=2)
        fence_async_shared()

        # (constexprs spelled out in each tuple: a tuple held in a variable turns them into tensors)
        gl.warp_specialize([
            (_consumer, (q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, out_ptr,
                         lse_ptr, meta_ptr, kv_indices_ptr, off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr,
                         off_kv_len, num_pages, num_qo_heads, stride_on, stride_oh, qk_scale, w0, w_step, num_items,
                         0, PAGE, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, WRITE_LSE, PIPE, PINGPONG, LATE_K_RELEASE,
                         BRANCH_SOFTMAX, Q_SLOTS)),
            (_consumer, (q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, out_ptr,
                         lse_ptr, meta_ptr, kv_indices_ptr, off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr,
                         off_kv_len, num_pages, num_qo_heads, stride_on, stride_oh, qk_scale, w0, w_step, num_items,
                         1, PAGE, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, WRITE_LSE, PIPE, PINGPONG, LATE_K_RELEASE,
                         BRANCH_SOFTMAX, Q_SLOTS)),
            (_producer, (q_ptr, k_ptr, v_ptr, q_bufs, k_bufs, v_bufs, q_ready, q_empty, k_ready, k_empty, v_ready,
                         v_empty, meta_ptr, kv_indices_ptr, off_tile_req, off_tile_q0, off_qo_indptr, off_kv_indptr,
                         off_kv_len, num_pages, num_qo_heads, kv_width, stride_qn, stride_kt, stride_vt, w0, w_step,
                         num_items, GROUP, PAGE, HEAD_DIM, BLOCK_M, BLOCK_N, STAGES, CAUSAL, Q_SLOTS)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
