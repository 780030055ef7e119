"""Triton kernel of the grouped GEMM: one persistent launch walks every group's output tiles.

Why one kernel for all groups: an MoE layer's experts receive very different row counts (zero
included), known only on the device. Launching per expert needs those counts on the host (a sync)
and pays a launch per expert; padding every expert to the largest count wastes FLOPs. Instead each
of ~num_SMs programs loads the E+1 offsets as one vector, derives every group's tile count with
vector ops (cdiv, cumsum), and walks the global tile list tile = pid, pid + NUM_PROGRAMS, ...;
an empty group owns zero tiles and costs nothing.

Tile order inside a group is "grouped" (GROUP_M m-tiles sweep the n-tiles together) so that a
weight tile [BLOCK_K, BLOCK_N] read by one program is still in L2 when its neighbours read it.

Loads:
- weights through TMA tensor descriptors (USE_TMA; 3-D descriptor over [E, K, N] or [E, N, K],
  zero-filled out of bounds) when every stride is 16-byte aligned, else masked pointer loads;
- A rows through masked pointer loads, gathered (row m of A is x[gather_idx[m]]) when HAS_GATHER:
  the token permute of an MoE layer fused into the GEMM's A load.
Rows of a tile that belong to the next group are loaded but never stored (the store is masked to
the group's rows), so no padding of the inputs is needed.

Epilogue: optional per-row fp32 scale (the MoE routing weight), optional fused GLU (FUSE_GLU: two
accumulators, gate columns n and up columns n + N_HALF of the same weight; writes act(gate) * up
once), cast to the output dtype, masked store.

All loads are upcast/accumulated in fp32 (tl.dot accumulates in fp32; the interpreter computes bf16
arithmetic wrongly, so elementwise math also runs on fp32 values).
"""

# Shape legend: M = rows (sum of group sizes), K = in features, N = out features,
# E = groups/experts, T = rows of x before the gather, N_HALF = N of each GLU half.

from __future__ import annotations

import triton
import triton.language as tl

ACT_NONE = 0
ACT_SILU = 1
ACT_GELU = 2


@triton.jit
def _tile_of(tile, offs_ptr, E, NUM_N_TILES, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr, E_POW2: tl.constexpr):
    """Map a global tile index to (row start, row end, group, m-tile start row, n-tile).

    Recomputed from the offsets vector (E_POW2 lanes); a handful of vector ops, no memory traffic
    beyond the offsets (which stay in L1).
    """
    e_idx = tl.arange(0, E_POW2)
    starts = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    ends = tl.load(offs_ptr + e_idx + 1, mask=e_idx < E, other=0)
    # Clamp so malformed offsets (decreasing) never produce negative sizes: the kernel stays in
    # bounds even when validation was skipped.
    sizes = tl.maximum(ends - starts, 0)
    m_tiles = (sizes + BLOCK_M - 1) // BLOCK_M
    tiles = m_tiles * NUM_N_TILES
    cum_end = tl.cumsum(tiles, axis=0)
    cum_start = cum_end - tiles
    # group = number of groups whose tile range ends at or before this tile
    g = tl.sum((cum_end <= tile).to(tl.int32), axis=0)
    sel = e_idx == g
    g_tile0 = tl.sum(tl.where(sel, cum_start, 0), axis=0)
    g_mt = tl.sum(tl.where(sel, m_tiles, 0), axis=0)
    row0 = tl.sum(tl.where(sel, starts, 0), axis=0)
    size = tl.sum(tl.where(sel, sizes, 0), axis=0)
    local = tile - g_tile0
    # grouped ordering within the group, as in Triton's matmul tutorial
    width = GROUP_M * NUM_N_TILES
    first_m = (local // width) * GROUP_M
    group_size_m = tl.minimum(g_mt - first_m, GROUP_M)
    pid_m = first_m + (local % width) % group_size_m
    pid_n = (local % width) // group_size_m
    return row0, row0 + size, g, row0 + pid_m * BLOCK_M, pid_n


@triton.jit
def _total_tiles(offs_ptr, E, NUM_N_TILES, BLOCK_M: tl.constexpr, E_POW2: tl.constexpr):
    e_idx = tl.arange(0, E_POW2)
    starts = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    ends = tl.load(offs_ptr + e_idx + 1, mask=e_idx < E, other=0)
    sizes = tl.maximum(ends - starts, 0)
    return tl.sum(((sizes + BLOCK_M - 1) // BLOCK_M) * NUM_N_TILES, axis=0)


@triton.jit
def grouped_mm_kernel(
    a_ptr, b_ptr, c_ptr, offs_ptr, gather_ptr, scale_ptr,
    M, N, K, E, T,
    stride_am, stride_ak,
    stride_be, stride_bk, stride_bn,
    stride_cm, stride_cn,
    N_HALF,
    NUM_PROGRAMS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    E_POW2: tl.constexpr,
    HAS_GATHER: tl.constexpr, HAS_SCALE: tl.constexpr,
    FUSE_GLU: tl.constexpr, ACT: tl.constexpr,
    USE_TMA: tl.constexpr, B_KN: tl.constexpr,
    FLATTEN: tl.constexpr = False, TMA_STORE: tl.constexpr = False,
):
    """C[m, n] = scale[m] * sum_k A[m, k] * B[group(m), k, n]   (FUSE_GLU: act(gate) * up).

    B is addressed through (stride_be, stride_bk, stride_bn), so both weight layouts [E, K, N]
    (B_KN) and [E, N, K] work; B_KN tells the TMA path which dimension is contiguous.
    N is the number of output columns (N_HALF of them when FUSE_GLU).
    """
    pid = tl.program_id(0)
    n_out = N_HALF if FUSE_GLU else N
    num_n_tiles = tl.cdiv(n_out, BLOCK_N)
    total = _total_tiles(offs_ptr, E, num_n_tiles, BLOCK_M, E_POW2)

    if USE_TMA:
        if B_KN:
            b_desc = tl.make_tensor_descriptor(
                b_ptr, shape=[E, K, N], strides=[stride_be, stride_bk, 1], block_shape=[1, BLOCK_K, BLOCK_N])
        else:
            b_desc = tl.make_tensor_descriptor(
                b_ptr, shape=[E, N, K], strides=[stride_be, stride_bn, 1], block_shape=[1, BLOCK_N, BLOCK_K])
        if not HAS_GATHER:
            # A through TMA too; rows past the group's end are read (the next group's rows, or
            # zero-fill past M) and dropped by the masked store.
            a_desc = tl.make_tensor_descriptor(a_ptr, shape=[M, K], strides=[stride_am, 1], block_shape=[BLOCK_M, BLOCK_K])

        if TMA_STORE:
            c_desc = tl.make_tensor_descriptor(c_ptr, shape=[M, n_out], strides=[stride_cm, 1], block_shape=[BLOCK_M, BLOCK_N])

    offs_k0 = tl.arange(0, BLOCK_K)
    # FLATTEN: the compiler fuses the tile loop with the k loop into one software pipeline, so the
    # next tile's first loads are in flight during this tile's epilogue. (Triton 3.6's automatic
    # warp specialization leaves this kernel unchanged on sm_90: no ttg.warp_specialize in its IR.)
    for tile in tl.range(pid, total, NUM_PROGRAMS, flatten=FLATTEN):
        row_lo, row_hi, g, m0, pid_n = _tile_of(tile, offs_ptr, E, num_n_tiles, BLOCK_M, GROUP_M, E_POW2)
        rows = m0 + tl.arange(0, BLOCK_M)
        row_ok = (rows < row_hi) & (rows < M)
        if HAS_GATHER:
            src = tl.load(gather_ptr + rows, mask=row_ok, other=0)
            # clamp: an out-of-range gather index (validation skipped) must not read out of bounds
            src = tl.minimum(tl.maximum(src, 0), T - 1)
        else:
            src = tl.minimum(rows, M - 1)
        a_rows = a_ptr + src.to(tl.int64)[:, None] * stride_am
        n0 = pid_n * BLOCK_N
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_out
        b_base = b_ptr + g.to(tl.int64) * stride_be
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if FUSE_GLU:
            acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + offs_k0
            k_ok = ks < K
            if USE_TMA and not HAS_GATHER:
                a = a_desc.load([m0, k0])
            else:
                a = tl.load(a_rows + ks[None, :] * stride_ak, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if USE_TMA:
                if B_KN:
                    b = b_desc.load([g, k0, n0]).reshape(BLOCK_K, BLOCK_N)
                else:
                    b = b_desc.load([g, n0, k0]).reshape(BLOCK_N, BLOCK_K).T
            else:
                b = tl.load(b_base + ks[:, None] * stride_bk + cols[None, :] * stride_bn,
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            if FUSE_GLU:
                if USE_TMA:
                    if B_KN:
                        bu = b_desc.load([g, k0, n0 + N_HALF]).reshape(BLOCK_K, BLOCK_N)
                    else:
                        bu = b_desc.load([g, n0 + N_HALF, k0]).reshape(BLOCK_N, BLOCK_K).T
                else:
                    bu = tl.load(b_base + ks[:, None] * stride_bk + (cols + N_HALF)[None, :] * stride_bn,
                                 mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                acc_up = tl.dot(a, bu, acc_up)
        if FUSE_GLU:
            # The TMA load of the gate half can run past N_HALF into the up half (it only
            # zero-fills past N); those columns are masked at the store, so it is harmless.
            if ACT == 1:
                acc = acc * tl.sigmoid(acc)
            elif ACT == 2:
                acc = 0.5 * acc * (1.0 + tl.erf(acc * 0.7071067811865476))
            acc = acc * acc_up
        if HAS_SCALE:
            s = tl.load(scale_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
            acc = acc * s[:, None]
        c_ptrs = c_ptr + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
        if USE_TMA and TMA_STORE:
            # a tile wholly inside its group goes out through TMA (asynchronous, clipped at n_out);
            # the group's last, partial tile keeps the masked store, since TMA would also write the
            # next group's rows
            if m0 + BLOCK_M <= row_hi:
                c_desc.store([m0, n0], acc.to(c_ptr.dtype.element_ty))
            else:
                tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
        else:
            tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
