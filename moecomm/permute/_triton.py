"""Triton kernels of permute/combine on one rank: a stable counting sort, a row scatter, a k-way row sum.

# T = num_tokens, H = hidden, k = top_k, E = num_experts, M = T * k routed rows,
# NB = number of slot blocks of BLOCK_M slots, NBUCKETS = E + 1 (the last bucket holds dropped slots)

Why a counting sort and not torch.argsort: the keys are small integers (< E + 1), so three cheap
passes over M int32 ids beat a radix sort of M keys, and the result is stable by construction
(ranks come from positions, not from thread timing), with no host sync:

  1. permute_hist_kernel, one program per BLOCK_M flat slots: the block's histogram over buckets
     [NB, NBUCKETS] and each slot's rank among the block's earlier slots of the same bucket.
  2. permute_scan_kernel, one program per tile of buckets: exclusive scan of the histograms over
     blocks (where block b's slots of bucket e start inside bucket e), and tokens_per_expert.
  3. permute_scatter_kernel: every program turns tokens_per_expert (<= 1024 ints, from L2) into
     the buckets' starts with its own exclusive scan (program 0 stores them: expert_offsets), so no
     launch of a cumsum sits between 2 and 3 (it cost ~20 us of host time, more than its work);
     then dst = start[e] + base[b, e] + rank; writes dst_row and src_token, when HAS_W the routing
     weight of each row (row_weights[dst] = topk_weights[slot]), and, when COPY, stores each token
     row to its k destination rows.

At decode sizes (M <= SMALL_M) those are four launches of ~2-4 us each around ~1 us of work, so
permute_small_kernel does the whole sort in ONE program instead (grid (1,)): bucket totals with
tl.histogram, their exclusive scan in registers, then per block of slots the same in-block rank as
the hist kernel plus a per-bucket cursor carried across blocks (tl.gather reads cursor[bucket]).
Same stable order, bit for bit. A row copy then runs as one more launch, permute_rows_kernel.

The copy reads x once and writes k rows per token: the minimum traffic, M * H * itemsize written
plus T * H * itemsize read (512 MiB + 64 MiB at T=8192, H=4096, k=8, bf16: ~0.19 ms at ~3 TB/s).
Rows are addressed with 64-bit offsets (M * H can pass 2**31) and hidden offsets are marked
contiguous and aligned so that loads and stores become 16-byte vectors.

combine_kernel: one program per (BLOCK_T tokens, BLOCK_H columns); the k rows of each token are
gathered in slot order and summed in fp32, then written once: deterministic, no atomics. Traffic
M * H * itemsize read + T * H * itemsize written.

Every index read from memory is clamped into range before it is used as an address, so no kernel
touches memory out of bounds even on unvalidated input.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from ..jit.launch import cdiv, launch, next_pow2

# Launch configurations. H100: 132 SMs; a permute at T=8192, H=4096 gets (T/4) * (H/1024) = 8192
# programs of 4 x 1024 elements (8 KiB read, 64 KiB written each): enough bytes in flight per SM.
HIST_BLOCK_M = 128  # pairwise rank compare: 128 x 128 booleans per program, cheap in registers
SCAN_BLOCK_B = 256  # T=8192, k=8: NB = 512 blocks, two loop trips per program
SCAN_BLOCK_E = 16
INDEX_BLOCK_T = 128
ROW_TILE_ELEMS = 4096  # elements per program tile in permute/combine (BLOCK_T * BLOCK_H)
MAX_BLOCK_H = 1024
ROW_NUM_WARPS = 4  # 128 threads x 8 bf16 (16 B) = 1024 columns per pass; benchmarks --sweep tries others
# One-program sort (permute_small_kernel). Its blocks run one after another: each of the M / 128
# trips is a chain of dependent steps (ids load, compare, histogram, gather through shared memory,
# stores), while the multi-kernel path costs ~5 launches whatever M. Measured on the H100 inside a
# CUDA graph (top-8 of 128, session 3; `python -m benchmarks.bench_permute --small-m`),
# one program / multi-kernel, us, two runs: M 64 5.3 / 12.6 and 4.4 / 10.2, 256 8.6 / 15.1 and
# 7.6 / 12.3, 512 15.0 / 15.2 and 14.1 / 12.6, 1024 28.0 / 16.2. So up to 256 slots (decode graphs
# of up to 32 tokens at top-8, 128 at top-2); from 512 on the multi-kernel path.
SMALL_M = 256
SMALL_BLOCK_M = 128  # the pairwise compare is BLOCK_M**2 booleans, as in permute_hist_kernel
SMALL_MAX_BUCKETS = 1024  # E <= 1023 experts: cursor and totals are [1024] int32, 8 registers a thread
SMALL_NUM_WARPS = 4


@triton.jit
def permute_hist_kernel(
    ids_ptr,  # [M] int32/int64 flat topk_ids
    hist_ptr,  # [NB, NBUCKETS] int32 out
    rank_ptr,  # [M] int32 out: rank among earlier slots of the same bucket inside the block
    M,
    E,
    NBUCKETS,
    BLOCK_M: tl.constexpr,
    NUM_BINS: tl.constexpr,  # power of two >= NBUCKETS
):
    pid = tl.program_id(0)
    idx = tl.arange(0, BLOCK_M)
    offs = pid * BLOCK_M + idx
    mask = offs < M
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    valid = (ids >= 0) & (ids < E)
    bucket = tl.where(valid, ids, E).to(tl.int32)  # [BLOCK_M] in [0, E]
    hist = tl.histogram(bucket, NUM_BINS, mask=mask)  # [NUM_BINS]
    bins = tl.arange(0, NUM_BINS)
    tl.store(hist_ptr + pid * NBUCKETS + bins, hist, mask=bins < NBUCKETS)
    # rank_i = #{j < i in this block : bucket_j == bucket_i}: the stable order inside the block.
    same = (bucket[:, None] == bucket[None, :]) & (idx[None, :] < idx[:, None]) & mask[None, :]
    rank = tl.sum(same.to(tl.int32), axis=1)
    tl.store(rank_ptr + offs, rank, mask=mask)


@triton.jit
def permute_scan_kernel(
    hist_ptr,  # [NB, NBUCKETS] int32
    base_ptr,  # [NB, NBUCKETS] int32 out: exclusive prefix over blocks
    tokens_per_expert_ptr,  # [E] int32 out
    NB,
    NBUCKETS,
    E,
    BLOCK_B: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = pid * BLOCK_E + tl.arange(0, BLOCK_E)
    cmask = cols < NBUCKETS
    carry = tl.zeros([BLOCK_E], dtype=tl.int32)
    for b0 in range(0, NB, BLOCK_B):
        rows = b0 + tl.arange(0, BLOCK_B)
        m = (rows < NB)[:, None] & cmask[None, :]
        ptrs = rows[:, None] * NBUCKETS + cols[None, :]
        tile = tl.load(hist_ptr + ptrs, mask=m, other=0)
        incl = tl.cumsum(tile, axis=0)
        tl.store(base_ptr + ptrs, incl - tile + carry[None, :], mask=m)
        carry += tl.sum(tile, axis=0)
    tl.store(tokens_per_expert_ptr + cols, carry, mask=cols < E)


@triton.jit
def _row_block(T, H, BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    """This program's block of the row kernels' [T, H] grid: token ids, their mask, columns, 2-D mask."""
    toks = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = toks < T
    hs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    hs = tl.max_contiguous(tl.multiple_of(hs, BLOCK_H), BLOCK_H)
    return toks, tmask, hs, tmask[:, None] & (hs < H)[None, :]


@triton.jit
def _slot_row(dst_row_ptr, toks, j, tmask, M, TOP_K: tl.constexpr):
    """Row (of M) that slot j of each token went to, clamped into [0, M) (int64 for addressing)."""
    r = tl.load(dst_row_ptr + toks * TOP_K + j, mask=tmask, other=0)
    return tl.minimum(tl.maximum(r, 0), M - 1).to(tl.int64)


@triton.jit
def permute_scatter_kernel(
    ids_ptr,  # [M] int32/int64
    rank_ptr,  # [M] int32
    base_ptr,  # [NB, NBUCKETS] int32
    tokens_per_expert_ptr,  # [E] int32
    offsets_ptr,  # [E + 1] int32 out: expert_offsets (program (0, 0) writes them)
    dst_row_ptr,  # [M] int32 out
    src_token_ptr,  # [M] int32 out
    x_ptr,  # [T, H] (COPY only)
    out_ptr,  # [M, H] (COPY only)
    w_ptr,  # [T, k] fp32 topk_weights (HAS_W only)
    row_w_ptr,  # [M] fp32 out: row_weights (HAS_W only)
    T,
    H,
    E,
    NBUCKETS,
    stride_xt,
    stride_ot,
    stride_wt,
    stride_wk,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    COPY: tl.constexpr,
    HAS_W: tl.constexpr,
    NUM_BINS: tl.constexpr,  # power of two >= NBUCKETS
):
    pid_t = tl.program_id(0)
    pid_h = tl.program_id(1)
    toks, tmask, hs, xm = _row_block(T, H, BLOCK_T, BLOCK_H)
    M = T * TOP_K
    # where each bucket starts: exclusive scan of the counts (the dropped bucket E starts after all)
    bins = tl.arange(0, NUM_BINS)
    counts = tl.load(tokens_per_expert_ptr + bins, mask=bins < E, other=0)
    start = tl.cumsum(counts, axis=0) - counts
    if (pid_t == 0) & (pid_h == 0):
        tl.store(offsets_ptr + bins, start, mask=bins < NBUCKETS)
    if COPY:
        xrow = toks.to(tl.int64) * stride_xt
        xt = tl.load(x_ptr + xrow[:, None] + hs[None, :], mask=xm, other=0)  # [BLOCK_T, BLOCK_H]
    for j in tl.static_range(TOP_K):
        s = toks * TOP_K + j  # flat slot
        ids = tl.load(ids_ptr + s, mask=tmask, other=0)
        bucket = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
        blk = s // BLOCK_M
        dst = tl.gather(start, bucket, 0)
        dst += tl.load(base_ptr + blk * NBUCKETS + bucket, mask=tmask, other=0)
        dst += tl.load(rank_ptr + s, mask=tmask, other=0)
        dst = tl.minimum(tl.maximum(dst, 0), M - 1)
        if pid_h == 0:
            tl.store(dst_row_ptr + s, dst, mask=tmask)
            tl.store(src_token_ptr + dst, toks, mask=tmask)
            if HAS_W:  # the weight follows its slot to row dst: no separate scatter launch
                w = tl.load(w_ptr + toks.to(tl.int64) * stride_wt + j * stride_wk, mask=tmask, other=0)
                tl.store(row_w_ptr + dst, w, mask=tmask)
        if COPY:
            orow = dst.to(tl.int64) * stride_ot
            tl.store(out_ptr + orow[:, None] + hs[None, :], xt, mask=xm)


@triton.jit
def permute_small_kernel(
    ids_ptr,  # [M] int32/int64 flat topk_ids
    w_ptr,  # [T, k] fp32 topk_weights (HAS_W only)
    dst_row_ptr,  # [M] int32 out
    src_token_ptr,  # [M] int32 out
    row_w_ptr,  # [M] fp32 out: row_weights (HAS_W only)
    tokens_per_expert_ptr,  # [E] int32 out
    offsets_ptr,  # [E + 1] int32 out: expert_offsets
    M,
    E,
    NBUCKETS,
    stride_wt,
    stride_wk,
    TOP_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # slots per trip of the ranking loop
    COUNT_BLOCK: tl.constexpr,  # slots per trip of the counting loop (>= M in practice: one trip)
    NUM_BINS: tl.constexpr,  # power of two >= NBUCKETS
    HAS_W: tl.constexpr,
):
    # One program: the whole stable counting sort of M <= SMALL_M slots, in registers.
    bins = tl.arange(0, NUM_BINS)
    # 1. bucket totals, then where each bucket starts (exclusive scan).
    counts = tl.zeros([NUM_BINS], dtype=tl.int32)
    for c0 in range(0, M, COUNT_BLOCK):
        offs = c0 + tl.arange(0, COUNT_BLOCK)
        mask = offs < M
        ids = tl.load(ids_ptr + offs, mask=mask, other=0)
        bucket = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)
        counts += tl.histogram(bucket, NUM_BINS, mask=mask)
    start = tl.cumsum(counts, axis=0) - counts  # [NUM_BINS]; start[E] = valid slots = expert_offsets[E]
    tl.store(tokens_per_expert_ptr + bins, counts, mask=bins < E)
    tl.store(offsets_ptr + bins, start, mask=bins < NBUCKETS)
    # 2. blocks in slot order: dst = start[e] + (slots of e in earlier blocks) + (rank inside the block).
    # cursor[e] = start[e] + slots of bucket e seen so far: the scan's base[b, e], carried in registers.
    idx = tl.arange(0, BLOCK_M)
    cursor = start
    for b0 in range(0, M, BLOCK_M):
        offs = b0 + idx
        mask = offs < M
        ids = tl.load(ids_ptr + offs, mask=mask, other=0)
        bucket = tl.where((ids >= 0) & (ids < E), ids, E).to(tl.int32)  # [BLOCK_M] in [0, E]
        same = (bucket[:, None] == bucket[None, :]) & (idx[None, :] < idx[:, None]) & mask[None, :]
        rank = tl.sum(same.to(tl.int32), axis=1)
        dst = tl.gather(cursor, bucket, 0) + rank
        dst = tl.minimum(tl.maximum(dst, 0), M - 1)
        tok = offs // TOP_K
        tl.store(dst_row_ptr + offs, dst, mask=mask)
        tl.store(src_token_ptr + dst, tok, mask=mask)
        if HAS_W:
            w = tl.load(w_ptr + tok.to(tl.int64) * stride_wt + (offs - tok * TOP_K) * stride_wk, mask=mask, other=0)
            tl.store(row_w_ptr + dst, w, mask=mask)
        cursor += tl.histogram(bucket, NUM_BINS, mask=mask)


@triton.jit
def permute_rows_kernel(
    x_ptr,  # [T, H]
    dst_row_ptr,  # [T, k] int32 (written by permute_small_kernel)
    out_ptr,  # [M, H] out
    T,
    H,
    stride_xt,
    stride_ot,
    TOP_K: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    # The COPY half of permute_scatter_kernel with dst read back instead of recomputed: x read once,
    # each token row stored to its k rows.
    toks, tmask, hs, xm = _row_block(T, H, BLOCK_T, BLOCK_H)
    xt = tl.load(x_ptr + (toks.to(tl.int64) * stride_xt)[:, None] + hs[None, :], mask=xm, other=0)
    M = T * TOP_K
    for j in tl.static_range(TOP_K):
        dst = _slot_row(dst_row_ptr, toks, j, tmask, M, TOP_K)
        tl.store(out_ptr + (dst * stride_ot)[:, None] + hs[None, :], xt, mask=xm)


@triton.jit
def combine_kernel(
    eo_ptr,  # [M, H] expert outputs
    dst_row_ptr,  # [T * k] int32
    w_ptr,  # [T, k] fp32 (HAS_WEIGHTS only)
    y_ptr,  # [T, H] out
    T,
    H,
    stride_et,
    stride_yt,
    stride_wt,
    stride_wk,
    TOP_K: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    toks, tmask, hs, m = _row_block(T, H, BLOCK_T, BLOCK_H)
    M = T * TOP_K
    acc = tl.zeros([BLOCK_T, BLOCK_H], dtype=tl.float32)
    # Slots summed in the fixed order j = 0..k-1: the result does not depend on scheduling.
    for j in tl.static_range(TOP_K):
        r = _slot_row(dst_row_ptr, toks, j, tmask, M, TOP_K)
        v = tl.load(eo_ptr + (r * stride_et)[:, None] + hs[None, :], mask=m, other=0).to(tl.float32)
        if HAS_WEIGHTS:
            w = tl.load(w_ptr + toks.to(tl.int64) * stride_wt + j * stride_wk, mask=tmask, other=0).to(tl.float32)
            acc += w[:, None] * v
        else:
            acc += v
    yrow = toks.to(tl.int64) * stride_yt
    tl.store(y_ptr + yrow[:, None] + hs[None, :], acc.to(y_ptr.dtype.element_ty), mask=m)


def _row_tiles(hidden: int) -> tuple[int, int]:
    block_h = min(MAX_BLOCK_H, next_pow2(max(hidden, 1)))
    block_t = max(1, ROW_TILE_ELEMS // block_h)
    return block_t, block_h


# Row kernels at decode sizes: a grid of at least this many programs. At T=64, H=2048 the default
# tiles (4 tokens x 1024 columns) made 32 programs, each a chain of k dependent row loads: combine
# took 7.2 us in the Qwen3 layer's profile for 2 MB of reads.
MIN_ROW_PROGRAMS = 256


def _small_row_tiles(num_tokens: int, hidden: int) -> tuple[int, int, int]:
    """(BLOCK_T, BLOCK_H, num_warps): the default tiles, split until the grid has MIN_ROW_PROGRAMS
    programs (tokens first, then columns down to 256); warps so that a thread moves 8 elements."""
    block_t, block_h = _row_tiles(hidden)
    programs = lambda: cdiv(num_tokens, block_t) * cdiv(hidden, block_h)  # noqa: E731
    while block_t > 1 and programs() < MIN_ROW_PROGRAMS:
        block_t //= 2
    while block_h > 256 and programs() < MIN_ROW_PROGRAMS:
        block_h //= 2
    return block_t, block_h, max(1, min(ROW_NUM_WARPS, block_t * block_h // 256))


def _on_device(dev: torch.device):
    # Triton launches on the current CUDA device: make it the tensors' one (cuda:1 data, cuda:0 current).
    if dev.type != "cuda" or dev.index is None or dev.index == torch.cuda.current_device():
        return contextlib.nullcontext()
    return torch.cuda.device(dev)


def permute_triton(
    topk_ids: torch.Tensor,
    num_experts: int,
    x: torch.Tensor | None,
    out: torch.Tensor | None,
    topk_weights: torch.Tensor | None = None,
):
    """Counting-sort permute. topk_ids [T, k] contiguous; x [T, H] with unit inner stride or None;
    topk_weights [T, k] fp32 (any strides) or None.

    Returns (src_token [M], dst_row [T, k], tokens_per_expert [E], expert_offsets [E+1],
    row_weights [M] fp32 or None when topk_weights is None); when x is given its rows are written to
    ``out`` [M, H] (contiguous rows).
    """
    num_tokens, top_k = topk_ids.shape
    m = num_tokens * top_k
    dev = topk_ids.device
    src_token = torch.empty(m, dtype=torch.int32, device=dev)
    dst_row = torch.empty(num_tokens, top_k, dtype=torch.int32, device=dev)
    # Every row is written: dst_row is a bijection onto [0, M), dropped slots included.
    row_weights = None if topk_weights is None else torch.empty(m, dtype=torch.float32, device=dev)
    if m == 0:
        zeros = torch.zeros
        return (src_token, dst_row, zeros(num_experts, dtype=torch.int32, device=dev),
                zeros(num_experts + 1, dtype=torch.int32, device=dev), row_weights)
    tokens_per_expert = torch.empty(num_experts, dtype=torch.int32, device=dev)  # every entry written by the scan
    expert_offsets = torch.empty(num_experts + 1, dtype=torch.int32, device=dev)
    with _on_device(dev):
        _permute_launch(topk_ids.reshape(m), num_tokens, top_k, num_experts, x, out,
                        src_token, dst_row, tokens_per_expert, expert_offsets, topk_weights, row_weights)
    return src_token, dst_row, tokens_per_expert, expert_offsets, row_weights


def _uses_small_path(m: int, num_experts: int) -> bool:
    """Whether a permute of m slots over num_experts runs as the one-program sort."""
    return m <= SMALL_M and num_experts + 1 <= SMALL_MAX_BUCKETS


def _permute_launch(ids, num_tokens, top_k, num_experts, x, out, src_token, dst_row, tokens_per_expert,
                    expert_offsets, w, row_weights):
    m = num_tokens * top_k
    dev = ids.device
    nbuckets = num_experts + 1
    num_bins = next_pow2(nbuckets)
    copy = x is not None and x.shape[1] > 0  # hidden 0: out is empty, nothing to copy
    has_w = w is not None
    w_strides = (w.stride(0), w.stride(1)) if has_w else (0, 0)
    if _uses_small_path(m, num_experts):
        # Indices (and row weights) in one launch; with rows, one more to copy them. The copy needs
        # every dst first, so it cannot share the single program (one SM would copy M * H alone).
        launch(permute_small_kernel, (1,), (
            ids, w if has_w else ids, dst_row, src_token, row_weights if has_w else ids,
            tokens_per_expert, expert_offsets, m, num_experts, nbuckets, *w_strides,
        ), {"TOP_K": top_k, "BLOCK_M": SMALL_BLOCK_M, "COUNT_BLOCK": next_pow2(max(m, SMALL_BLOCK_M)),
            "NUM_BINS": num_bins, "HAS_W": has_w}, SMALL_NUM_WARPS)
        if copy:
            hidden = x.shape[1]
            block_t, block_h = _row_tiles(hidden)
            launch(permute_rows_kernel, (cdiv(num_tokens, block_t), cdiv(hidden, block_h)),
                   (x, dst_row, out, num_tokens, hidden, x.stride(0), out.stride(0)),
                   {"TOP_K": top_k, "BLOCK_T": block_t, "BLOCK_H": block_h}, ROW_NUM_WARPS)
        return
    nb = cdiv(m, HIST_BLOCK_M)
    hist = torch.empty(nb, nbuckets, dtype=torch.int32, device=dev)
    base = torch.empty_like(hist)
    rank = torch.empty(m, dtype=torch.int32, device=dev)
    launch(permute_hist_kernel, (nb,), (ids, hist, rank, m, num_experts, nbuckets),
           {"BLOCK_M": HIST_BLOCK_M, "NUM_BINS": num_bins}, 4)
    launch(permute_scan_kernel, (cdiv(nbuckets, SCAN_BLOCK_E),), (hist, base, tokens_per_expert, nb, nbuckets, num_experts),
           {"BLOCK_B": SCAN_BLOCK_B, "BLOCK_E": SCAN_BLOCK_E}, 4)
    w_args = (w, row_weights) if has_w else (ids, ids)
    if not copy:
        launch(permute_scatter_kernel, (cdiv(num_tokens, INDEX_BLOCK_T), 1), (
            ids, rank, base, tokens_per_expert, expert_offsets, dst_row, src_token, ids, ids, *w_args,
            num_tokens, 0, num_experts, nbuckets, 0, 0, *w_strides,
        ), {"TOP_K": top_k, "BLOCK_M": HIST_BLOCK_M, "BLOCK_T": INDEX_BLOCK_T, "BLOCK_H": 16, "COPY": False,
            "HAS_W": has_w, "NUM_BINS": num_bins}, 4)
    else:
        hidden = x.shape[1]
        block_t, block_h = _row_tiles(hidden)
        launch(permute_scatter_kernel, (cdiv(num_tokens, block_t), cdiv(hidden, block_h)), (
            ids, rank, base, tokens_per_expert, expert_offsets, dst_row, src_token, x, out, *w_args,
            num_tokens, hidden, num_experts, nbuckets, x.stride(0), out.stride(0), *w_strides,
        ), {"TOP_K": top_k, "BLOCK_M": HIST_BLOCK_M, "BLOCK_T": block_t, "BLOCK_H": block_h, "COPY": True,
            "HAS_W": has_w, "NUM_BINS": num_bins}, ROW_NUM_WARPS)


def combine_triton(expert_out: torch.Tensor, dst_row: torch.Tensor, topk_weights: torch.Tensor | None, out: torch.Tensor) -> None:
    """out [T, H] = sum_j w[t, j] * expert_out[dst_row[t, j]]; expert_out and out with unit inner stride."""
    num_tokens, top_k = dst_row.shape
    hidden = expert_out.shape[1]
    if num_tokens == 0 or hidden == 0:
        return
    block_t, block_h, warps = _small_row_tiles(num_tokens, hidden)
    grid = (cdiv(num_tokens, block_t), cdiv(hidden, block_h))
    has_w = topk_weights is not None
    w = topk_weights if has_w else dst_row
    with _on_device(out.device):
        launch(combine_kernel, grid, (
            expert_out, dst_row, w, out, num_tokens, hidden, expert_out.stride(0), out.stride(0),
            w.stride(0) if has_w else 0, w.stride(1) if has_w else 0,
        ), {"TOP_K": top_k, "HAS_WEIGHTS": has_w, "BLOCK_T": block_t, "BLOCK_H": block_h}, warps)
