"""Sorting-free sampling kernels: one program per output row, a few passes over the row.

# B = output rows, V = vocab, NP = value pivots per pass, BLOCK = tokens per chunk

The rule (reference.py): the kept set K is a prefix of the tokens in descending-value order (ties:
lowest index first), and the sample is the exponential-race winner argmax_{i in K} v_i / E_i.

Why a race: the winner over any SUPERSET U of K that happens to lie in K is the winner over K (it
beats everything in U, K included). So the kernel never needs K itself, only a superset and a
proof that its winner is kept:

  pass 1   row max M and sum S (online softmax for logits); for probabilities fused with NP
           value pivots 2^(-24 j / NP) and, for top-p / min-p / plain, the race above pivot 0 = (0, 0).
  pass n   pivot 0, a composite (value, index): the count and mass of the tokens above it in the
           order (v > pv, or v == pv and index < pi) and the race winner among them; NP value
           pivots: count and mass above each (2-3 instructions a pivot a token: no race).
  decide   a value pivot whose hypothetical token would be kept (count < k, mass < p * S_ref,
           pv >= min_p * M) proves every token above it kept (hi); one that would be dropped
           proves every token at or below it dropped (lo). The candidate is the race winner above
           lo (a superset of K). Above hi, it is the answer. Otherwise the next pass takes it as
           pivot 0 (its exact rank and mass-before): kept -> the answer; dropped -> lo = the
           candidate, and the race above it (same pass) gives the next candidate. For top-k the
           race pivot is a guess with ~2k tokens above it (log-count interpolation of the last
           pass's pivots): when it proves dropped, its winner comes from a small superset.
Measured in the interpreter at V = 128256 (logits x 3): top-p 0.9 ends after 1 pass for most rows,
2 for the rest; top-k 50 (+ top-p 0.9) after 2. Nothing is sorted, nothing is synced, and every
pass streams the row once (the loads of the next DEPTH chunks are issued before this one is reduced).
With top_k_first (top-p measured on the top-k set) the top-k mass S_K is bracketed by the
pivots; a candidate whose verdict depends on the unknown part waits while the value pivots
bisect the top-k boundary (rare).

Renormalising and masking (top_k_renorm_probs, top_p_renorm_probs, top_k_mask_logits, softmax)
need the exact boundary: the same passes without the race bisect the bracket until it holds at
most one token or one value (ties, cut by index), then one pass writes the output.

Pivots are placed uniformly in the order-preserving int32 image of fp32 (for v >= 0, its bit
pattern: uniform in exponent, then mantissa), so a pass narrows a wide bracket like a 3-bit radix
step and a narrow one like bisection.

Cost, napkin math (H200: 4.8 TB/s HBM, 132 SMs, 128 fp32 lanes a clock an SM at ~1.98 GHz =
253 G lane-instructions/s an SM, 33 T/s the chip). One pass streams the row once: B * V * 4 bytes,
65.7 MB at B128 V128256 (13.7 us at HBM speed), 311 MB at B512 V151936 (65 us); a row is 513 KB
(V128256). Work a token a pass, counted from the code below (lane-instructions, SASS-level):
load and upcast ~1, validity and max / sum (pass 1) ~6, pivot 0 (composite compare, select, add)
~5, NP value pivots x 3 (compare, select, add; + 2 with counts for top-k) = 24 at NP 8, the race
~29 (Philox4x32-7 is ~56 integer instructions a quad = 14 a token; E = -log(1 - u) ~9; v / E and
the winner update ~6): ~65 a token a pass for top-p, ~80 with counts.
- B512 V151936: 512 * 151936 * 65 = 5.1 G lane-instructions = 151 us a pass for the whole chip
  at full issue, 2.3x the 65 us of its bytes: the kernel is ALU-bound, not bandwidth-bound. With
  ~1.3-2 passes a row on average (and Philox's dependent multiply chain keeping the issue rate
  near half), that is today's 0.54 ms; the 0.20 ms target needs far fewer instructions a token.
- B128 V128256: one row per SM (128 programs, 132 SMs). An SM's share of HBM is 36 GB/s, so a
  pass could take 14 us; but "v1" keeps one 8 KB chunk of loads in flight an SM: 8 KB / ~1 us
  latency = 8 GB/s, 64 us for the row's 513 KB; and its ALU time is 128256 * 65 / 253 G = 33 us
  at full issue (16 warps, 4 a scheduler, on a dependent Philox chain: well below full issue).
  The wave lasts as long as its slowest row, and with 128 rows some always need 3-4 passes:
  ~60 us x 3-4 = today's 0.22 ms. "deep" (32 KB in flight) attacks the first.
- B1 (a CUDA graph): one program, one SM: >= 33 us a pass of ALU alone, whatever the bandwidth.
  The 20 us target needs the row split across >= 8-16 programs, combined by a second small
  kernel or atomics (not done).
What would reach the targets (not done; issue 14 says so): (1) passes over a compacted list: a
full pass also writes (index, value, E) of the tokens above lo to a per-row scratch and later
passes scan only that. Not a clear win by this math: after pass 1 lo lies up to 8x below the
boundary in value, which at logits x 3 leaves 15-30% of V above it (12 bytes each: most of a
pass's bytes again, and a B x V/4 x 12-byte scratch); after pass 2 it is ~5% (the kept set is
~4% of V), so only rows needing 4+ passes gain; (2) split rows across programs when B < ~2 * SMs, the per-pass statistics (max, sum,
NP counts and masses, the race winner (key, index, value)) combined per row between passes;
(3) fewer pivot instructions (NP 4: -12 a token, at the price of a slower bracket: the
benchmark's --sweep times it). Done here: the "deep" configuration (CONFIGS below: 4 chunks of
loads in flight, 4 counted pivots so top-k's loop stops spilling), argued for B128 and B1, where
one program per SM was latency-bound (8 KB in flight); at B512 (ALU-bound) it can only remove
top-k's spills, and its 4 counted pivots may cost top-k a pass. The benchmark times "v1" (the
previous launch) beside it in the same run. What cannot change: the per-token race (same seed -> same tokens
as reference.py, the tests' contract), so ~29 instructions a token stay in every pass that races.

Randomness: Philox4x32-7, counter (token // 4, row or 0, offset lo, offset hi), key = seed; one
Philox call gives the four tokens of a quad. u = (r + 0.5) 2^-32, E = -log(1 - u) (series for small
u, where 1 - u would round). Loads are upcast to fp32 before any arithmetic.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..jit.launch import launch
from .reference import PHILOX_ROUNDS

MODE_SAMPLE, MODE_RENORM, MODE_MASK = 0, 1, 2
# Launch configurations, by name (CONFIG picks one; benchmarks/bench_sampling.py times each).
# block / pivots: tokens a chunk and value pivots a pass without counts (top-p, min-p, plain);
# *_counted: with top-k's counts (and renorm / mask); warps; depth: chunks of loads in flight.
# From cuobjdump of sm_90a builds specialised as a real launch (16-byte-aligned rows):
#   "v1":   top-p 128 regs, no spill; top-k + top-p 128 regs and 88 spill stores (NP 8 counted);
#           8 KB of loads in flight an SM
#   "deep": top-p 128 regs, no spill; top-k + top-p 128 regs, no spill (4 counted pivots);
#           32 KB of loads in flight an SM (one program per SM at B128 needs ~36 KB)
# Both: 16-byte loads, one Philox call a quad per thread. Tried and dropped: 32 warps (64 regs)
# halves the loads to 8 bytes and splits each quad over 2 threads, so Philox runs twice a quad.
CONFIGS = {
    "v1": dict(block=2048, block_counted=2048, warps=16, pivots=8, pivots_counted=8, depth=1),  # before issue 14's rework
    "deep": dict(block=2048, block_counted=2048, warps=16, pivots=8, pivots_counted=4, depth=4),
}
CONFIG = "deep"
BLOCK = 2048  # the largest block of any configuration (block_for's cap)
MAX_PASSES = 48  # a safety bound: the search removes at least one token or one bracket step a pass
_LOG2E = 1.4426950408889634


@triton.jit
def _ord(v):
    """fp32 -> int32 with the same order (negative floats: magnitude bits flipped)."""
    b = v.to(tl.int32, bitcast=True)
    return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)


@triton.jit
def _unord(o):
    b = tl.where(o >= 0, o, o ^ 0x7FFFFFFF)
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _exponentials(start, seed, c1, c2, c3, N_ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    """[BLOCK] fp32 E = -log(1 - u) of tokens start .. start + BLOCK - 1 (start % 4 == 0)."""
    Q: tl.constexpr = BLOCK // 4
    q = tl.arange(0, Q)
    lane = tl.arange(0, 4)[None, :]
    c0 = (start // 4 + q).to(tl.uint32)
    zero = tl.zeros([Q], dtype=tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, zero + c1, zero + c2, zero + c3, N_ROUNDS)
    r = tl.where(lane == 0, r0[:, None], tl.where(lane == 1, r1[:, None], tl.where(lane == 2, r2[:, None], r3[:, None])))
    r = tl.reshape(r, (BLOCK,))
    u = (r.to(tl.float32) + 0.5) * 2.3283064365386963e-10
    series = u * (1.0 + u * (0.5 + u * 0.33333334))
    return tl.where(u < 0.00390625, series, -tl.log(1.0 - u))


@triton.jit
def _fresh(x):
    """x as an IR value of its own (x + 0), to start a piece of while-loop state from another name.

    Triton (3.6, code_generator._find_carries) decides which names a `while` carries by visiting
    the body once and comparing each name's IR value at its end with the value it had before the
    loop. With `c_idx = widx` before the loop both names hold ONE value, so the body's
    `c_idx = widx` (widx not yet reassigned at that point of the trial visit) looks like no
    change: c_idx was silently not carried, every pass restarted from the pass-1 winner, and a
    row could return that unfiltered winner on the proof of another candidate (issue 14: 0.04%
    of top-p draws outside the kept set, GPU only: the interpreter runs the Python as written).
    tests/sampling/test_sampling.py::test_loop_state_is_carried guards the rule."""
    return x + 0


@triton.jit
def _values(x, inv_t, shift, FROM_LOGITS: tl.constexpr):
    if FROM_LOGITS:
        return tl.exp2((x * inv_t - shift) * 1.4426950408889634)
    return x


@triton.jit
def _scan(row_ptr, V, pv0, pi0, pv, inv_t, shift, seed, c1, c2, c3,
          STATS: tl.constexpr, PIV: tl.constexpr, NEED_CNT: tl.constexpr, NEED_MASS: tl.constexpr,
          RACE0: tl.constexpr, LOG_RACE: tl.constexpr, FROM_LOGITS: tl.constexpr, RAW: tl.constexpr,
          N_ROUNDS: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr, DEPTH: tl.constexpr):
    """One pass over a row.

    STATS: max, sum (online softmax for logits), min, bad flag. PIV: for pivot 0 (a composite
    (pv0, pi0): tokens with v > pv0, or v == pv0 and index < pi0, are above it) and for the NP value
    pivots pv (tokens with v > pv), the count and mass above. RACE0: the race winner above pivot 0.
    LOG_RACE: the race of plain logits, argmax x / T - log E.

    Every statistic is accumulated per lane (elementwise, in registers) and reduced across the
    program once, after the loop: a cross-warp reduction costs shared memory and barriers, and
    eight of them per chunk made the first version ~10x slower than its loads. The next chunk's
    load is issued before the current one is used, so a load is always in flight. DEPTH (1, 2 or 4)
    chunks are in flight: BLOCK * 4 * DEPTH bytes an SM, against the ~36 KB (36 GB/s an SM's share
    of HBM x ~1 us latency) that one program per SM needs to stream at its share.

    The loads are a queue of DEPTH registers rotated each chunk (xq1 <- xq2 <- ...): each starts as
    a load of its own (never an alias of another name: see _fresh)."""
    offs0 = tl.arange(0, BLOCK)
    m_acc = tl.full([BLOCK], -float("inf"), dtype=tl.float32)
    s_acc = tl.zeros([BLOCK], dtype=tl.float32)
    mn_acc = tl.full([BLOCK], float("inf"), dtype=tl.float32)
    bad_acc = tl.zeros([BLOCK], dtype=tl.int32)
    cnt0_acc = tl.zeros([BLOCK], dtype=tl.int32)
    mass0_acc = tl.zeros([BLOCK], dtype=tl.float32)
    wkey_acc = tl.full([BLOCK], -1.0, dtype=tl.float32)
    widx_acc = tl.zeros([BLOCK], dtype=tl.int32)
    wval_acc = tl.zeros([BLOCK], dtype=tl.float32)
    lkey_acc = tl.full([BLOCK], -float("inf"), dtype=tl.float32)
    lidx_acc = tl.zeros([BLOCK], dtype=tl.int32)
    cnt_acc = tl.zeros([BLOCK, NP], dtype=tl.int32)
    mass_acc = tl.zeros([BLOCK, NP], dtype=tl.float32)
    xq1 = tl.load(row_ptr + offs0, mask=offs0 < V, other=0.0)
    if DEPTH >= 2:
        xq2 = tl.load(row_ptr + BLOCK + offs0, mask=offs0 + BLOCK < V, other=0.0)
    if DEPTH >= 4:
        xq3 = tl.load(row_ptr + 2 * BLOCK + offs0, mask=offs0 + 2 * BLOCK < V, other=0.0)
        xq4 = tl.load(row_ptr + 3 * BLOCK + offs0, mask=offs0 + 3 * BLOCK < V, other=0.0)
    for start in range(0, V, BLOCK):
        offs = start + offs0
        ok = offs < V
        x = xq1.to(tl.float32)
        ahead = offs + DEPTH * BLOCK
        if DEPTH == 1:
            xq1 = tl.load(row_ptr + ahead, mask=ahead < V, other=0.0)
        elif DEPTH == 2:
            xq1 = xq2
            xq2 = tl.load(row_ptr + ahead, mask=ahead < V, other=0.0)
        else:
            xq1 = xq2
            xq2 = xq3
            xq3 = xq4
            xq4 = tl.load(row_ptr + ahead, mask=ahead < V, other=0.0)
        if STATS:
            if FROM_LOGITS or RAW:
                xs = x * inv_t
                bad_acc = bad_acc | (ok & ((x != x) | (x == float("inf")))).to(tl.int32)
                xs = tl.where(ok & (x == x), xs, -float("inf"))
                new_m = tl.maximum(m_acc, xs)
                safe_m = tl.where(new_m == -float("inf"), 0.0, new_m)
                s_acc = s_acc * tl.exp2((m_acc - safe_m) * 1.4426950408889634) + tl.exp2((xs - safe_m) * 1.4426950408889634)
                m_acc = new_m
                mn_acc = tl.minimum(mn_acc, tl.where(ok & (xs > -float("inf")), xs, float("inf")))
            else:
                bad_acc = bad_acc | (ok & ((x != x) | (x < 0) | (x == float("inf")))).to(tl.int32)
                m_acc = tl.maximum(m_acc, tl.where(ok, x, -float("inf")))
                s_acc += tl.where(ok, x, 0.0)
        if LOG_RACE:
            e = _exponentials(start, seed, c1, c2, c3, N_ROUNDS, BLOCK)
            xs = x * inv_t
            key = tl.where(ok & (xs > -float("inf")), xs - tl.log(e), -float("inf"))
            upd = key > lkey_acc
            lidx_acc = tl.where(upd, offs, lidx_acc)
            lkey_acc = tl.where(upd, key, lkey_acc)
        if PIV:
            if RAW:
                v = tl.where(ok, x, -float("inf"))
            else:
                v = tl.where(ok, _values(x, inv_t, shift, FROM_LOGITS), -1.0)
            gt0 = (v > pv0) | ((v == pv0) & (offs < pi0))
            gt = v[:, None] > pv[None, :]
            if NEED_CNT:
                cnt0_acc += gt0.to(tl.int32)
                cnt_acc += gt.to(tl.int32)
            if NEED_MASS:
                mass0_acc += tl.where(gt0, v, 0.0)
                mass_acc += tl.where(gt, v[:, None], 0.0)
            if RACE0:
                e = _exponentials(start, seed, c1, c2, c3, N_ROUNDS, BLOCK)
                key = tl.where(gt0, v / e, -1.0)
                upd = key > wkey_acc  # strictly: a lane keeps its earliest index among equal keys
                widx_acc = tl.where(upd, offs, widx_acc)
                wval_acc = tl.where(upd, v, wval_acc)
                wkey_acc = tl.where(upd, key, wkey_acc)
    m_run = tl.max(m_acc, axis=0)
    if FROM_LOGITS or RAW:
        safe = tl.where(m_run == -float("inf"), 0.0, m_run)
        s_run = tl.sum(s_acc * tl.exp2((m_acc - safe) * 1.4426950408889634), axis=0)
    else:
        s_run = tl.sum(s_acc, axis=0)
    mn_run = tl.min(mn_acc, axis=0)
    bad = tl.max(bad_acc, axis=0)
    cnt0 = tl.sum(cnt0_acc, axis=0)
    mass0 = tl.sum(mass0_acc, axis=0)
    cnt = tl.sum(cnt_acc, axis=0)
    mass = tl.sum(mass_acc, axis=0)
    wkey = tl.max(wkey_acc, axis=0)
    widx = tl.min(tl.where(wkey_acc == wkey, widx_acc, 2147483647), axis=0)
    # the winner's value as this loop computed it (a scalar recomputation of exp2 could round
    # differently and misplace the token against itself as a pivot)
    wval = tl.max(tl.where((wkey_acc == wkey) & (widx_acc == widx), wval_acc, -float("inf")), axis=0)
    lkey = tl.max(lkey_acc, axis=0)
    lidx = tl.min(tl.where(lkey_acc == lkey, lidx_acc, 2147483647), axis=0)
    lidx = tl.where(lkey > -float("inf"), lidx, 0)
    return m_run, s_run, mn_run, bad, cnt0, mass0, wkey, widx, cnt, mass, lidx, wval


@triton.jit
def _load_value(row_ptr, idx, inv_t, shift, FROM_LOGITS: tl.constexpr):
    x = tl.load(row_ptr + idx).to(tl.float32)
    return _values(x, inv_t, shift, FROM_LOGITS)


@triton.jit
def sample_kernel(
    x_ptr, rowmap_ptr, out_ptr, valid_ptr, logprob_ptr, y_ptr,
    k_ptr, p_ptr, minp_ptr, temp_ptr, seed_ptr, offset_ptr,
    V, num_in_rows, stride_x, stride_y,
    k_val, p_val, minp_val, temp_val, seed_val, offset_val,
    MODE: tl.constexpr, FROM_LOGITS: tl.constexpr, HAS_ROWMAP: tl.constexpr,
    HAS_TOPK: tl.constexpr, K_TENSOR: tl.constexpr, HAS_TOPP: tl.constexpr, P_TENSOR: tl.constexpr,
    HAS_MINP: tl.constexpr, MINP_TENSOR: tl.constexpr, HAS_TEMP: tl.constexpr, TEMP_TENSOR: tl.constexpr,
    TOPK_FIRST: tl.constexpr, SEED_TENSOR: tl.constexpr, SEED_PER_ROW: tl.constexpr,
    OFFSET_TENSOR: tl.constexpr, OFFSET_PER_ROW: tl.constexpr, WRITE_LOGPROB: tl.constexpr,
    N_ROUNDS: tl.constexpr, BLOCK: tl.constexpr, NP: tl.constexpr, MAX_PASSES: tl.constexpr,
    DEPTH: tl.constexpr,
):
    pid = tl.program_id(0)
    row_ok = pid >= 0
    if HAS_ROWMAP:
        in_row = tl.load(rowmap_ptr + pid).to(tl.int64)
        row_ok = (in_row >= 0) & (in_row < num_in_rows)  # a bad index: an invalid row, never a fault
        in_row = tl.minimum(tl.maximum(in_row, 0), num_in_rows - 1)
    else:
        in_row = pid.to(tl.int64)
    row_ptr = x_ptr + in_row * stride_x
    SAMPLE: tl.constexpr = MODE == 0
    RAW: tl.constexpr = MODE == 2
    FILTERED: tl.constexpr = HAS_TOPK or HAS_TOPP or HAS_MINP
    TKF: tl.constexpr = TOPK_FIRST and HAS_TOPK and HAS_TOPP
    NEED_CNT: tl.constexpr = HAS_TOPK or MODE != 0
    NEED_MASS: tl.constexpr = HAS_TOPP or MODE == 1
    INF: tl.constexpr = float("inf")

    # per-row parameters and their range check (a bad value makes the row invalid, never a crash)
    param_ok = row_ok
    k = V
    if HAS_TOPK:
        if K_TENSOR:
            k = tl.load(k_ptr + pid).to(tl.int32)
        else:
            k = k_val
        param_ok = param_ok & (k >= 1)
        k = tl.minimum(k, V)
    top_p = 1.0
    if HAS_TOPP:
        if P_TENSOR:
            top_p = tl.load(p_ptr + pid).to(tl.float32)
        else:
            top_p = p_val
        param_ok = param_ok & (top_p > 0) & (top_p <= 1)
    min_p = 0.0
    if HAS_MINP:
        if MINP_TENSOR:
            min_p = tl.load(minp_ptr + pid).to(tl.float32)
        else:
            min_p = minp_val
        param_ok = param_ok & (min_p >= 0) & (min_p <= 1)
    inv_t = 1.0
    if HAS_TEMP:
        if TEMP_TENSOR:
            t = tl.load(temp_ptr + pid).to(tl.float32)
        else:
            t = temp_val
        param_ok = param_ok & (t > 0)
        inv_t = 1.0 / t
    if SEED_TENSOR:
        if SEED_PER_ROW:
            seed = tl.load(seed_ptr + pid)
        else:
            seed = tl.load(seed_ptr)
    else:
        seed = seed_val
    if OFFSET_TENSOR:
        if OFFSET_PER_ROW:
            off = tl.load(offset_ptr + pid)
        else:
            off = tl.load(offset_ptr)
    else:
        off = offset_val
    off = off.to(tl.int64)
    if SEED_PER_ROW:
        c1 = pid * 0
    else:
        c1 = pid
    c1 = c1.to(tl.uint32)
    c2 = (off & 0xFFFFFFFF).to(tl.uint32)
    c3 = ((off >> 32) & 0xFFFFFFFF).to(tl.uint32)

    jr = tl.arange(0, NP)
    p_all = (tl.zeros([NP], dtype=tl.float32) + top_p) >= 1.0  # top_p = 1: every positive token
    # pass 1: stats; for probabilities fused with pivot 0 = (0, 0) (the race above it when it can
    # end the row: no top-k) and the value pivots 2^(-3j), j = 1..NP
    pv0 = 0.0
    if RAW:
        pv0 = -INF
    pi0 = 0
    pv = tl.exp2(-(24.0 / NP) * (jr + 1).to(tl.float32))  # 24 binades below 1 (normalised rows)
    RACE1: tl.constexpr = SAMPLE and not HAS_TOPK
    FUSE1: tl.constexpr = (not FROM_LOGITS) and (not RAW)
    PLAIN_LOGITS: tl.constexpr = SAMPLE and FROM_LOGITS and not FILTERED
    m_run, s_run, mn_run, bad, cnt0, mass0, wkey, widx, cnt, mass, lidx, wval = _scan(
        row_ptr, V, pv0, pi0, pv, inv_t, 0.0, seed, c1, c2, c3,
        True, FUSE1 and (FILTERED or SAMPLE), NEED_CNT, NEED_MASS, FUSE1 and RACE1, PLAIN_LOGITS, FROM_LOGITS, RAW,
        N_ROUNDS, BLOCK, NP, DEPTH)
    if FROM_LOGITS:
        shift = m_run
        M = 1.0
        S = s_run
        valid = ((bad == 0) & (m_run > -INF) & param_ok).to(tl.int32)
    elif RAW:
        shift = 0.0
        M = m_run
        S = 1.0
        valid = ((bad == 0) & (m_run > -INF) & param_ok).to(tl.int32)
    else:
        shift = 0.0
        M = m_run
        S = s_run
        valid = ((bad == 0) & (S > 0) & param_ok).to(tl.int32)
    thr = min_p * M
    done = (valid == 0).to(tl.int32)
    if FILTERED and (FROM_LOGITS or RAW):
        if RAW:
            span = _ord(M).to(tl.int64) - _ord(mn_run).to(tl.int64) + 1
            pv = _unord((_ord(mn_run).to(tl.int64) - 1 + span * (jr + 1) // (NP + 1)).to(tl.int32))
        _, _, _, _, cnt0, mass0, wkey, widx, cnt, mass, _, wval = _scan(
            row_ptr, V, pv0, pi0, pv, inv_t, shift, seed, c1, c2, c3,
            False, True, NEED_CNT, NEED_MASS, RACE1, False, FROM_LOGITS, RAW, N_ROUNDS, BLOCK, NP, DEPTH)
    # search state. lo: the highest composite known dropped (every token at or below it is
    # dropped), with its count / mass above; hi: the lowest value known kept (every token above it
    # is kept). The candidate: the race winner above lo; c_eval: pivot 0 of the pass just made was
    # the candidate (its exact rank and mass-before are in cnt0 / mass0), else it was lo.
    # each name below starts as an IR value of its own (_fresh: an alias would not be carried)
    lo_v = _fresh(pv0)
    lo_i = 0
    lo_cnt = _fresh(cnt0)
    lo_mass = _fresh(mass0)
    hi_v = _fresh(M)  # a token at the row maximum would be kept (nothing lies above it)
    hi_cnt = 0
    hi_mass = 0.0
    c_idx = 0
    c_v = 0.0
    c_ok = 0
    c_eval = 0
    race_on_p0 = pid * 0  # 1 once pivot 0 of the last pass was raced above (lo)
    if RACE1 and FILTERED:
        race_on_p0 += 1
    sk_lo = _fresh(M)
    sk_hi = _fresh(S)
    klo_v = -INF
    khi_v = INF
    khi_cnt = 0
    khi_mass = 0.0
    tau_v = _fresh(pv0)
    m_ties = 0
    kept_mass = _fresh(S)
    result = 0
    if SAMPLE and not FILTERED:
        if FROM_LOGITS:
            result = _fresh(lidx)
        else:
            result = _fresh(widx)
    if not FILTERED:
        done = done * 0 + 1
    if RACE1 and FILTERED:  # pass 1 (or 1b) raced above lo = (0, 0)
        c_idx = _fresh(widx)
        c_v = _fresh(wval)
        c_ok = (wkey >= 0).to(tl.int32)
    if FILTERED:
        npass = 1
        while (done == 0) & (npass <= MAX_PASSES):
            # what a token at each value pivot (and at pivot 0 when it is the candidate) would be
            if TKF:
                sk_hi = tl.minimum(sk_hi, tl.min(tl.where(cnt >= k, mass, INF), axis=0))
                sk_lo = tl.maximum(sk_lo, tl.max(tl.where(cnt <= k, mass, -INF), axis=0))
                if (c_eval == 0) & (race_on_p0 != 0):  # pivot 0 was a value pivot
                    if cnt0 >= k:
                        sk_hi = tl.minimum(sk_hi, mass0)
                    if cnt0 <= k:
                        sk_lo = tl.maximum(sk_lo, mass0)
                if c_eval != 0:
                    if cnt0 >= k:
                        sk_hi = tl.minimum(sk_hi, mass0)
                    if cnt0 < k:
                        sk_lo = tl.maximum(sk_lo, mass0 + c_v)
                    if cnt0 == k - 1:
                        sk_hi = tl.minimum(sk_hi, mass0 + c_v)
                klo_v = tl.maximum(klo_v, tl.max(tl.where(cnt >= k, pv, -INF), axis=0))
                kh = tl.min(tl.where(cnt < k, pv, INF), axis=0)
                if kh < khi_v:
                    kh_sel = (cnt < k) & (pv == kh)
                    khi_cnt = tl.max(tl.where(kh_sel, cnt, 0), axis=0)
                    khi_mass = tl.max(tl.where(kh_sel, mass, 0.0), axis=0)
                    khi_v = kh
                if (_ord(khi_v).to(tl.int64) - _ord(klo_v).to(tl.int64) <= 1) & (khi_v < INF):
                    # the top-k boundary is one value: S_K = mass above it + the ties it takes
                    sk_exact = khi_mass + (k - khi_cnt).to(tl.float32) * khi_v
                    sk_lo = sk_exact
                    sk_hi = sk_exact
            kk = pv == pv
            if not RAW:
                kk = kk & (pv > 0)
            if HAS_TOPK:
                kk = kk & (cnt < k)
            if HAS_MINP:
                kk = kk & (pv >= thr)
            if HAS_TOPP:
                if TKF:
                    yes_p = p_all | (mass < top_p * sk_lo)
                    no_p = (p_all == 0) & (mass >= top_p * sk_hi)
                else:
                    yes_p = p_all | (mass < top_p * S)
                    no_p = yes_p == 0
                keep_yes = kk & yes_p
                keep_no = (kk == 0) | no_p
            else:
                keep_yes = kk
                keep_no = kk == 0
            hv = tl.min(tl.where(keep_yes, pv, INF), axis=0)
            if hv < hi_v:
                hsel = keep_yes & (pv == hv)
                hi_cnt = tl.max(tl.where(hsel, cnt, 0), axis=0)
                hi_mass = tl.max(tl.where(hsel, mass, 0.0), axis=0)
                hi_v = hv
            if SAMPLE:
                if c_eval != 0:  # the candidate's exact verdict
                    ck = (c_v > 0) & (c_v >= thr)
                    if HAS_TOPK:
                        ck = ck & (cnt0 < k)
                    c_yes = ck
                    c_no = ck == 0
                    if HAS_TOPP:
                        if top_p < 1:
                            if TKF:
                                c_yes = ck & (mass0 < top_p * sk_lo)
                                c_no = (ck == 0) | (mass0 >= top_p * sk_hi)
                            else:
                                c_yes = ck & (mass0 < top_p * S)
                                c_no = c_yes == 0
                    if c_yes:
                        done = 1
                        result = c_idx
                    elif c_no:
                        lo_v = c_v
                        lo_i = c_idx
                        lo_cnt = cnt0
                        lo_mass = mass0
                        c_idx = widx
                        c_ok = (wkey >= 0).to(tl.int32)
                        c_v = wval
                elif race_on_p0 != 0:
                    # pivot 0 was lo or a guess above it: dropped -> the new lo, its race winner the
                    # candidate; kept -> a new hi
                    k0 = (pv0 > 0) & (pv0 >= thr)
                    if HAS_TOPK:
                        k0 = k0 & (cnt0 < k)
                    y0 = k0
                    n0 = k0 == 0
                    if HAS_TOPP:
                        if top_p < 1:
                            if TKF:
                                y0 = k0 & (mass0 < top_p * sk_lo)
                                n0 = (k0 == 0) | (mass0 >= top_p * sk_hi)
                            else:
                                y0 = k0 & (mass0 < top_p * S)
                                n0 = y0 == 0
                    if n0:
                        if (pv0 > lo_v) | ((pv0 == lo_v) & (pi0 <= lo_i)):
                            lo_v = pv0
                            lo_i = pi0
                            lo_cnt = cnt0
                            lo_mass = mass0
                            c_idx = widx
                            c_ok = (wkey >= 0).to(tl.int32)
                            c_v = wval
                    elif y0:
                        if pv0 < hi_v:
                            hi_v = pv0
                            hi_cnt = cnt0
                            hi_mass = mass0
            # dropped value pivots raise lo (then a candidate at or below it is dropped too)
            bv = tl.max(tl.where(keep_no, pv, -INF), axis=0)
            if (done == 0) & ((bv > lo_v) | ((bv == lo_v) & (lo_i > 0))):
                bsel = keep_no & (pv == bv)
                lo_v = bv
                lo_i = 0
                lo_cnt = tl.max(tl.where(bsel, cnt, 0), axis=0)
                lo_mass = tl.max(tl.where(bsel, mass, 0.0), axis=0)
                if c_v <= bv:
                    c_ok = 0
            if SAMPLE:
                if HAS_MINP:
                    tv = _unord(_ord(thr) - 1)  # every token below thr is dropped
                    if (done == 0) & (tv > lo_v):
                        lo_v = tv
                        lo_i = 0
                        if c_v <= tv:
                            c_ok = 0
                c_eval = 0
                if (done == 0) & (c_ok != 0):
                    decided = c_v > hi_v
                    if not (HAS_TOPK or HAS_TOPP):
                        decided = c_v >= thr
                    if decided:
                        done = 1
                        result = c_idx
                    else:
                        c_eval = 1
            else:
                # exact boundary: at most one token left between lo and hi, or a single value (ties)
                if lo_cnt - hi_cnt <= 1:
                    done = 1
                    tau_v = lo_v
                    m_ties = 0
                    kept_mass = lo_mass
                elif (_ord(hi_v).to(tl.int64) - _ord(lo_v).to(tl.int64) <= 1) & (hi_v < INF):
                    done = 1
                    n_ties = lo_cnt - hi_cnt
                    mt = n_ties
                    if HAS_TOPK:
                        mt = tl.minimum(mt, k - hi_cnt)
                    if HAS_TOPP:
                        if top_p < 1:
                            need = tl.ceil((top_p * S - hi_mass) / hi_v)
                            mt = tl.minimum(mt, tl.maximum(need, 0.0).to(tl.int32))
                    mt = tl.maximum(mt, 0)
                    tau_v = hi_v
                    m_ties = mt
                    kept_mass = hi_mass + mt.to(tl.float32) * hi_v
            if (done == 0) & (npass < MAX_PASSES):
                # next pass: pivot 0 = the candidate (to verify) or lo (to race above it); NP value
                # pivots bisecting the bracket (the top-k boundary while S_K decides the candidate)
                # the race pivot when no candidate waits: lo, or (top-k) a guess with about 2k tokens
                # above it, interpolated in log-count between this pass's value pivots: if it proves
                # dropped, its race winner is a candidate from a far smaller superset than lo's
                g_v = lo_v
                g_i = lo_i
                if SAMPLE and HAS_TOPK:
                    tk = 2.0 * k.to(tl.float32)
                    cf = cnt.to(tl.float32)
                    ga = tl.max(tl.where(cf >= tk, pv, -INF), axis=0)
                    gb = tl.min(tl.where(cf < tk, pv, INF), axis=0)
                    ca = tl.max(tl.where(pv == ga, cf, 0.0), axis=0)
                    cb = tl.max(tl.where(pv == gb, cf, 0.0), axis=0)
                    if (ga > lo_v) & (ga < INF):
                        g_v = ga
                        g_i = 0
                        if gb < INF:
                            la = tl.log2(tl.maximum(ca, 1.0))
                            frac = (la - tl.log2(tk)) / tl.maximum(la - tl.log2(tl.maximum(cb, 1.0)), 1e-6)
                            oa = _ord(ga).to(tl.float32)
                            ob = _ord(gb).to(tl.float32)
                            g_v = _unord((oa + (ob - oa) * tl.minimum(tl.maximum(frac, 0.0), 1.0)).to(tl.int32))
                            g_v = tl.maximum(tl.minimum(g_v, gb), ga)
                a_v = lo_v
                b_v = tl.minimum(hi_v, M)
                if TKF:
                    if sk_lo < sk_hi:
                        a_v = klo_v  # below lo is fine: these pivots only tighten S_K
                        b_v = tl.minimum(khi_v, M)
                bo = _ord(b_v).to(tl.int64)
                if RAW:
                    ao = _ord(tl.maximum(a_v, mn_run)).to(tl.int64)
                else:
                    ao = _ord(tl.maximum(a_v, 0.0)).to(tl.int64)
                    ao = tl.maximum(ao, bo - (24 << 23))
                pv = _unord((ao + (bo - ao) * (jr + 1).to(tl.int64) // (NP + 1)).to(tl.int32))
                if c_eval != 0:
                    pv0 = c_v
                    pi0 = c_idx
                else:
                    pv0 = g_v
                    pi0 = g_i
                race_on_p0 = pid * 0 + 1
                _, _, _, _, cnt0, mass0, wkey, widx, cnt, mass, _, wval = _scan(
                    row_ptr, V, pv0, pi0, pv, inv_t, shift, seed, c1, c2, c3,
                    False, True, NEED_CNT, NEED_MASS, SAMPLE, False, FROM_LOGITS, RAW, N_ROUNDS, BLOCK, NP, DEPTH)
            npass += 1
    if SAMPLE:
        if done == 0:  # the safety bound was hit: the candidate is in range but not proven kept
            result = c_idx
            valid = valid * 0
        result = tl.where(valid != 0, result, 0)
        tl.store(out_ptr + pid, result.to(out_ptr.dtype.element_ty))
        tl.store(valid_ptr + pid, valid != 0)
        if WRITE_LOGPROB:
            vw = _load_value(row_ptr, result, inv_t, shift, FROM_LOGITS)
            lp = tl.log(vw) - tl.log(S)
            tl.store(logprob_ptr + pid, tl.where(valid != 0, lp, float("nan")))
    else:
        if done == 0:
            tau_v = lo_v
            m_ties = 0
            kept_mass = lo_mass
        inv_mass = 1.0 / kept_mass
        y_row = y_ptr + pid.to(tl.int64) * stride_y
        offs0 = tl.arange(0, BLOCK)
        ties_before = 0
        for start in range(0, V, BLOCK):
            offs = start + offs0
            ok = offs < V
            x = tl.load(row_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            if RAW:
                v = x
            else:
                v = _values(x, inv_t, shift, FROM_LOGITS)
            keep = v > tau_v
            if not RAW:
                keep = keep & (v > 0)
            if m_ties > 0:
                eq = ok & (v == tau_v)
                eqi = eq.to(tl.int32)
                rank = ties_before + tl.cumsum(eqi, axis=0) - eqi
                keep = keep | (eq & (rank < m_ties))
                ties_before += tl.sum(eqi, axis=0)
            if RAW:
                y = tl.where(valid != 0, tl.where(keep, x, -float("inf")), x)
            else:
                y = tl.where((valid != 0) & keep, v * inv_mass, 0.0)
            tl.store(y_row + offs, y.to(y_ptr.dtype.element_ty), mask=ok)


def launch_sample(
    x: torch.Tensor, rowmap, num_rows: int, out: torch.Tensor, valid: torch.Tensor, logprob, y,
    mode: int, from_logits: bool, top_k, top_p, min_p, temperature, top_k_first: bool,
    seed, offset, per_row_seed: bool,
) -> None:
    """Launch sample_kernel over num_rows programs. Scalars or tensors for every parameter (None:
    off); seed/offset: int or int64 tensor ([1] or [num_rows]). Arguments already validated."""
    if num_rows == 0:
        return
    cfg = CONFIGS[CONFIG]
    counted = top_k is not None or mode != MODE_SAMPLE  # the kernel's NEED_CNT
    vocab = x.shape[1]
    filtered = top_k is not None or top_p is not None or min_p is not None
    dummy = out
    def split(v, dtype_default):
        if v is None:
            return dummy, dtype_default, False, False
        if isinstance(v, torch.Tensor):
            return v, dtype_default, True, True
        return dummy, v, True, False
    k_t, k_v, has_k, k_tensor = split(top_k, 0)
    p_t, p_v, has_p, p_tensor = split(top_p, 1.0)
    m_t, m_v, has_m, m_tensor = split(min_p, 0.0)
    t_t, t_v, has_t, t_tensor = split(temperature, 1.0)
    seed_tensor = isinstance(seed, torch.Tensor)
    offset_tensor = isinstance(offset, torch.Tensor)
    y_t = y if y is not None else dummy
    lp_t = logprob if logprob is not None else dummy
    args = (
        x, rowmap if rowmap is not None else dummy, out, valid, lp_t, y_t,
        k_t, p_t, m_t, t_t, seed if seed_tensor else dummy, offset if offset_tensor else dummy,
        vocab, x.shape[0], x.stride(0), y.stride(0) if y is not None else 0,
        int(k_v), float(p_v), float(m_v), float(t_v), 0 if seed_tensor else int(seed), 0 if offset_tensor else int(offset),
    )
    consts = {
        "MODE": mode, "FROM_LOGITS": bool(from_logits), "HAS_ROWMAP": rowmap is not None,
        "HAS_TOPK": has_k, "K_TENSOR": k_tensor, "HAS_TOPP": has_p, "P_TENSOR": p_tensor,
        "HAS_MINP": has_m, "MINP_TENSOR": m_tensor, "HAS_TEMP": has_t, "TEMP_TENSOR": t_tensor,
        "TOPK_FIRST": bool(top_k_first), "SEED_TENSOR": seed_tensor, "SEED_PER_ROW": bool(per_row_seed),
        "OFFSET_TENSOR": offset_tensor, "OFFSET_PER_ROW": offset_tensor and offset.numel() > 1 and num_rows > 1,
        "WRITE_LOGPROB": logprob is not None,
        "N_ROUNDS": PHILOX_ROUNDS, "BLOCK": block_for(vocab, cfg, counted), "MAX_PASSES": MAX_PASSES,
        "NP": (cfg["pivots_counted"] if counted else cfg["pivots"]) if filtered else 2,
        "DEPTH": cfg["depth"],
    }
    launch(sample_kernel, (num_rows,), args, consts, cfg["warps"])


def block_for(vocab: int, cfg: dict | None = None, counted: bool = False) -> int:
    """Tokens per chunk: the configuration's block (with counts: block_counted), smaller for small
    vocabularies (the interpreter's tests)."""
    cfg = cfg or CONFIGS[CONFIG]
    cap = cfg["block_counted"] if counted else cfg["block"]
    b = 64
    while b < vocab and b < cap:
        b *= 2
    return min(b, cap)
