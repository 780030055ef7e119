// Sampling from probabilities with top-k / top-p / min-p: one thread block per output row, two
// passes over the row in HBM, the kept set decided exactly in shared memory, the exponential race
// run only over the kept tokens. Draws the tokens of moecomm/sampling/reference.py (the contract):
//
//   kept(i)  <=>  v_i > 0  and  rank(i) < top_k  and  mass_before(i) < top_p * S_ref  and  v_i >= min_p * max v
//   token     =  argmax over kept i of v_i / E_i,  E_i = -log(1 - u_i),  u_i from Philox4x32-7
//
// in the composite order "descending v, ties by ascending index". Composite key of token i (v > 0):
//   K(i) = (fp32 bits of v_i) << 32 | (0xFFFFFFFF - i)     (uint64; larger = earlier; unique)
// The kept set is a prefix of that order, so it is {v > 0 and K >= K(l)} for its last token l, and
// min-p is the same with K >= (bits of thr) << 32: the race threshold is the larger of the two.
//
// Why not the Triton kernel's pivot passes (moecomm/sampling/_triton.py): they race every token in
// every pass (Philox4x32-7 is ~56 integer instructions a quad, -log(1 - u) ~9 more), ~65
// lane-instructions a token a pass: ALU-bound at ~2.3x the bytes at B512 V151936, and 2-4 passes a
// row. Here the race needs the random numbers of the KEPT tokens only (~4% of the row for top-p 0.9
// at logits x 3), and the kept set is found with a histogram and a short list instead of pivots:
//
//  pass A  (HBM) per token: S += v (fp64), max and min (bad rows), the count of v > 0, and ONE native
//          shared-memory atomic into 2048 bins of (bits of v) >> 20 (1/8 of a binade): the COUNT per
//          bin when top_k is given (the kept set lies in the top-k set), else for top-p bounds of
//          the MASS per bin from the sum of q = 1.(top 12 mantissa bits) * 2^12 (q 2^(e - 139) <= v <
//          (q + 1) 2^(e - 139)). fp32 atomicAdd on shared memory is a compare-and-swap loop on sm_90
//          (ATOMS.CAST.SPIN; integer adds are native), so the bins hold integers. No bins for min-p
//          alone. And a byte per 32-byte sector, its largest exponent (the sector map).
//  plan    a block scan of the bins from the top gives the lowest bin b0 that must be listed: for
//          top-k the bin holding rank k - 1 (exact counts: the list size is known), for top-p the
//          highest bin whose first token is certainly dropped (lower-bound mass above >= p * S),
//          for min-p the bin of min_p * max. An upper bound of the list size comes with it.
//  pass B  (HBM) every token with v > 0 in bins >= b0 is appended to a list of composite keys in
//          shared memory (warp-aggregated: one atomicAdd a warp per 16 tokens a lane); sectors whose
//          largest exponent (F_MAP_BINS: bin) is below b0's are not loaded. The list is a prefix of the order, so
//          ranks and masses inside it are the row's.
//  select  in shared memory, exact. Lists of <= 2048 keys (top-k's, top-p's window): small_select's
//          cuts (32 a round, counted and fp64-summed by the warps) down to <= 64 keys, sorted and
//          prefix-summed by one warp. Longer ones: a radix select over the list's keys (8-bit digits from the top;
//          a level counts the digits of the entries in the current bucket, scatters those entries
//          by digit into a scratch copy, and prefix-sums their values in fp64 in that order, which
//          gives each digit's rank and mass-before without floating-point atomics; the lowest digit
//          whose first entry is still kept holds l; ~3 levels). For top-p only the entries of the
//          uncertain bins are selected (those above are counted and summed in one sweep: ~5% of
//          the list). top_k_first selects the top-k boundary first (its mass is S_ref). Sums are fp64 like the reference's, so boundaries
//          agree with it except within ~1e-16 relative.
//  race    over the kept list entries (Philox of the entry's quad, its lane, E, v / E; block argmax,
//          ties to the lowest index). logprob = log(v) - log(S) in fp64.
//  check   the list is enough when some entry after l is dropped, or nothing below the list can be
//          kept (the list holds every v > 0, or k entries, or only tokens below min_p * max lie
//          below it). Otherwise, or when the list would not fit, the fallback below.
//  fallback (every input, slower): for top-p, a window list of the uncertain bins (those between
//          "certainly kept" and "certainly dropped" by the mass bounds) with the exact count and
//          mass above it summed in the same pass, the select on it, then a race pass over HBM
//          (Philox only for quads holding a kept token). Where no window fits (flat rows, ties,
//          huge top-k): radix levels over HBM (11-bit digits of the composite key, exact counts and
//          fp64 masses, one pass a level until the bucket holding l fits the list), the select on
//          that bucket, the race pass. No host sync, no inter-block communication, no spin.
//
// Napkin math (H200: 4.8 TB/s, 132 SMs at ~1.98 GHz, 227 KB shared memory a block). One pass over
// B128 V128256 fp32 is 65.7 MB (~14 us), B512 V151936 311 MB (~65 us). Why this beats the pivot
// passes: those spend ~65 lane-instructions a token a pass (the race of every token, 8 pivots) for
// 2-4 passes; here pass A is ~17 SASS instructions a token (cuobjdump: F2F.F64 + DADD, 2 FMNMX, the
// bin, q, a branch around ATOMS.ADD) and pass B ~8 on the sectors it loads, and Philox runs only
// for the kept tokens. B512: 78M tokens * ~25 / 33 T lane-instr/s = ~60 us of issue against 2 x 65
// us of bytes (F2F.F64 at 16 a clock an SM: ~19 us, hidden); B128: one row an SM, 64 KB of 16-byte
// loads in flight an SM against the ~36 KB its 36 GB/s share needs. The list: for top-p 0.9 at
// logits x 3 ~4.3% of V plus ~2 bins (~5.6K keys at V128256, 6.7K at V151936); the sectors holding a
// token of b0's binade or above ~45% of the row; top-k 50: ~60 keys, pass B loads <1% of the row.
// The select: one sweep of the list, then ~3 levels of ~10 barriers on the few hundred keys of the
// uncertain bins; the race ~5 kept entries a thread (~60 instructions each). Expected then: B128
// top-p ~30-40 us; measured (H200, benchmarks/profile_sampling.py, RESULTS.md): 63.5 us, of which
// pass A 22 (one block streams ~20-30 GB/s, not the 80-120 guessed), pass B 17 and the select 6.5
// (bound by issue and barriers, not bytes), plan 4, split 3, race 4. Shared memory: 2 * CAP
// keys (list + scratch; CAP = 12288: 192 KB) + ~6 KB static: one block of 1024 threads an SM. The
// _paired entries run blocks of 512 threads, two an SM (104 KB of dynamic shared memory each), for
// B >= SMs / 2 (H200, bench_sampling: top-k 50 + top-p at B512 162 -> 138 us; top-p at B128 99 ->
// 82). Their classic layout (CAP = 6656, a scratch as large) is too short for top-p's lists
// (~4.7-8.7K keys at V151936: 270 -> 462 us, the fallback); the lean layout (the scratch's KB in
// the flags) sizes the scratch to pass A's bins and sector map (8 KB + V / 8: 27 KB at V151936) and
// gives the list the rest (9856 keys). A select copies its keys into the scratch, so a list longer
// than the scratch is selected on its uncertain bins only (top-p's split: ~0.5-1K keys) or the row
// takes the fallback, whose lists are bounded by the scratch (select_cap_of).
//
// Randomness (reference.py): key = seed (lo, hi words), counter = (i / 4, row or 0 with one seed per
// row, offset lo, offset hi), lane i % 4; u = (r + 0.5) 2^-32 and E = -log(1 - u), by its series
// u (1 + u (1/2 + u / 3)) below 2^-8. Every rounding step is written with __f*_rn (no contraction),
// logf is the accurate one: the same bits as torch's kernels on the same device.
// No CUDA headers, no torch headers: fp32 probabilities in, tokens / valid / logprob out.

#include "../common/block.cuh"

extern __shared__ __align__(16) unsigned char moecomm_sample_dyn[];  // list + scratch (bytes: see _cuda.py)

// Which way a row went (tests/sampling's host emulation records it to check that each is tested);
// nothing in a real build.
#ifndef MOECOMM_SAMPLE_TRACE
#define MOECOMM_SAMPLE_TRACE(path) ((void)(path))
#endif
// The race's threshold key of each row (the host emulation records it: tests/sampling check the kept
// set it gives against the reference's exactly, which the drawn tokens alone rarely show).
#ifndef MOECOMM_SAMPLE_BOUNDARY
#define MOECOMM_SAMPLE_BOUNDARY(klo) ((void)sizeof(klo))
#endif

// Where a block's time goes (benchmarks/profile_sampling.py builds with -DMOECOMM_SAMPLE_PROFILE):
// thread 0 writes the SM clock at the end of each phase (slots 0-9), the list sizes (10-14) and
// marks inside phases (16-18, 20-23, 25: clocks; 19: small_select's rounds; 24: window_select's
// levels) of the first PROFILE_ROWS blocks;
// moecomm_sample_profile_read copies them out. Nothing otherwise.
#ifdef MOECOMM_SAMPLE_PROFILE
constexpr int PROFILE_ROWS = 4096, PROFILE_SLOTS = 32;
__device__ long long moecomm_sample_profile[PROFILE_ROWS * PROFILE_SLOTS];
#define MOECOMM_SAMPLE_CLOCK(slot)                                                        \
  if (threadIdx.x == 0 && blockIdx.x < PROFILE_ROWS)                                       \
  moecomm_sample_profile[blockIdx.x * PROFILE_SLOTS + (slot)] = static_cast<long long>(clock64())
#define MOECOMM_SAMPLE_VALUE(slot, v)                  \
  if (threadIdx.x == 0 && blockIdx.x < PROFILE_ROWS) \
  moecomm_sample_profile[blockIdx.x * PROFILE_SLOTS + (slot)] = static_cast<long long>(v)
extern "C" __global__ void moecomm_sample_profile_read(long long* dst, int n) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    dst[i] = moecomm_sample_profile[i];
    moecomm_sample_profile[i] = -1;
  }
}
#else
#define MOECOMM_SAMPLE_CLOCK(slot) ((void)0)
#define MOECOMM_SAMPLE_VALUE(slot, v) ((void)sizeof(v))
#endif

namespace moecomm {
namespace sampling {

typedef unsigned long long u64;

constexpr int PHILOX_ROUNDS = 7;  // reference.PHILOX_ROUNDS
constexpr int NUM_BINS = 2048;    // pass-A bins: (bits of v) >> 20, the top 11 bits below the sign
constexpr int NUM_DIGITS = 256;   // the list select's 8-bit digits
constexpr int SMALL_MAX = 2048;   // list_select hands a bucket of at most this many keys to small_select
constexpr int UNROLL = 4;         // 16-byte loads a thread keeps in flight
constexpr int HIST_NONE = 0, HIST_COUNT = 1, HIST_QSUM = 2;
constexpr int PATH_LIST = 1, PATH_WINDOW = 2, PATH_LEVELS = 4, PATH_HBM_RACE = 8, PATH_SPLIT = 16,
              PATH_CLUSTER = 32, PATH_PASS_A = 64, PATH_SUB_BINS = 128;  // the trace (PATH_CLUSTER: the row
              // ran split over a cluster; PATH_PASS_A: its list came from pass A's candidates, no pass B;
              // PATH_SUB_BINS: window_select cut the window by its sub-bins)

// flags (moecomm/sampling/_cuda.py builds them)
constexpr int F_ROWMAP = 1 << 0, F_ROWMAP64 = 1 << 1, F_OUT64 = 1 << 2, F_HAS_K = 1 << 3, F_K_TENSOR = 1 << 4,
              F_K64 = 1 << 5, F_HAS_P = 1 << 6, F_P_TENSOR = 1 << 7, F_HAS_MINP = 1 << 8, F_MINP_TENSOR = 1 << 9,
              F_TOPK_FIRST = 1 << 10, F_SEED_TENSOR = 1 << 11, F_SEED_PER_ROW = 1 << 12, F_OFFSET_TENSOR = 1 << 13,
              F_OFFSET_PER_ROW = 1 << 14, F_LOGPROB = 1 << 15, F_SECTOR_MAP = 1 << 16, F_MAP_BINS = 1 << 17,
              F_PASS_A_LIST = 1 << 18, F_PASS_B_REVERSE = 1 << 19, F_PASS_B_GATHER = 1 << 28, F_PASS_A_PIPE = 1 << 29,
              F_SPLIT_SLICE = 1 << 30;  // (20-27: the scratch's KB)
constexpr int SCRATCH_MIN_BYTES = 24576;  // the scratch's floor: the fallback's 2048 counts + 2048 fp64 masses
constexpr int MAP_OFFSET = NUM_BINS * 4;  // the sector map follows pass A's bins in the scratch
// flags >> SCRATCH_KB_SHIFT (bits 20-27): the scratch's size in KB, >= 24, set by _cuda.py for the
// lean layout (the paired entries: a scratch sized to pass A's bins and sector map, the list takes
// the rest of the block's shared memory); 0: the classic layout, a scratch of max(cap keys, 24 KB).
constexpr int SCRATCH_KB_SHIFT = 20;
// F_MAP_BINS: the sector map's byte is the sector's largest pass-A bin less MAP_BASE_BIN (the bin of
// 2^-32), clamped to [0, 255] (v from 2^-32 to ~0.94 at 1/8-binade precision, larger ones 255)
// instead of its largest exponent: pass B then skips the sectors below b0's bin, not only those
// below its binade (top-p 0.9 at logits x 3: ~32% of the sectors loaded instead of ~40-43%). Not the
// default (_cuda.SECTOR_MAP_BINS): on the H200 it was no faster (top-p B128 V128256: 98.8 us by
// bins, 89.6 by exponents; B512 V151936 paired: 240.7 / 241.1).
constexpr int MAP_BASE_BIN = 760;
// F_PASS_A_LIST: the most candidate keys pass A aims at for a row (pass_a_threshold; 13/16 of the
// room where that is less): top-p 0.9's pass-B lists at logits x 3 are ~6-7K keys, up to ~10K.
constexpr int PASS_A_BUDGET = 10240;

// Block-shared state. The kernel is the only user of these, one block at a time per SM.
__shared__ unsigned s_dcnt[NUM_DIGITS], s_dfill[NUM_DIGITS], s_doff[NUM_DIGITS];
__shared__ double s_dmass[NUM_DIGITS];
__shared__ int s_sel, s_sel2, s_sel3, s_n;
__shared__ int s_tau;  // pass_a_list's threshold (fp32 bits)
// small_select's cuts (one a warp) and its answer
__shared__ long long s_cut_cnt[32];
__shared__ double s_cut_mass[32];
__shared__ u64 s_cut_min[32];
__shared__ u64 s_pick_key;
__shared__ long long s_pick_rank;
__shared__ double s_pick_mass;
__shared__ double s_row_sum;  // S for the log-prob at the end (not held in a register across the row)

// ----------------------------------------------------------------------------- small helpers

__device__ __forceinline__ long long lmin(long long a, long long b) { return a < b ? a : b; }
__device__ __forceinline__ int imax(int a, int b) { return a > b ? a : b; }
__device__ __forceinline__ int imin(int a, int b) { return a < b ? a : b; }
__device__ __forceinline__ u64 umax64(u64 a, u64 b) { return a > b ? a : b; }

// The scratch's bytes (see SCRATCH_KB_SHIFT), and the most keys a select over the list may take:
// list_select / small_select copy their keys into the scratch, so min(cap, scratch keys) (cap in
// the classic layout; in the lean one the list may hold more keys than a select on all of them
// can take: such a list is selected on its uncertain bins only, or the row takes the fallback).
// Functions of the kernel's parameters, recomputed where used (no register held across the row).
__device__ __forceinline__ int scratch_bytes_of(int flags, int cap) {
  const int kb = (flags >> SCRATCH_KB_SHIFT) & 255;
  return kb > 0 ? kb * 1024 : imax(8 * cap, SCRATCH_MIN_BYTES);
}
__device__ __forceinline__ int select_cap_of(int flags, int cap) { return imin(cap, scratch_bytes_of(flags, cap) / 8); }
// The sector map's byte of a sector whose largest fp32 bits are mb, and the lowest byte pass B loads
// for a list of bins >= b0 (a sector is skipped iff its byte is below: then all of it is below b0).
// Either way a clamped (bits >> shift) - base: exponents (shift 23, base 0) or bins (F_MAP_BINS).
__device__ __forceinline__ unsigned map_byte(int flags, unsigned mb) {
  const int d = static_cast<int>(mb >> ((flags & F_MAP_BINS) ? 20 : 23)) - ((flags & F_MAP_BINS) ? MAP_BASE_BIN : 0);
  return static_cast<unsigned>(imin(imax(d, 0), 255));
}
__device__ __forceinline__ unsigned map_min_of(int flags, int b0) {
  return map_byte(flags, static_cast<unsigned>(b0) << 20);
}

__device__ __forceinline__ u64 make_key(float v, int i) {
  return (static_cast<u64>(__float_as_uint(v)) << 32) | static_cast<u64>(0xFFFFFFFFu - static_cast<unsigned>(i));
}
__device__ __forceinline__ float key_value(u64 k) { return __uint_as_float(static_cast<unsigned>(k >> 32)); }
__device__ __forceinline__ int key_index(u64 k) { return static_cast<int>(0xFFFFFFFFu - static_cast<unsigned>(k)); }

// Pass A's q of a token: 1 and the top 12 bits of its fp32 mantissa (4096 <= q < 8192; within bin b
// q >= 4096 + 512 * (b & 7)). For a normal v of biased exponent e: q 2^(e - 139) <= v < (q + 1) 2^(e - 139);
// a subnormal (e = 0, bins 0-7) is below (q + 1) 2^-138 and at least 0.
__device__ __forceinline__ unsigned q_of(unsigned bits) { return ((bits >> 11) & 0xFFFu) | 0x1000u; }
// 2^(max(e, 1) - 139) for the bin's biased exponent e = bin >> 3, exact.
__device__ __forceinline__ double q_scale(int bin) {
  const int e = imax(bin >> 3, 1);
  return __longlong_as_double(static_cast<long long>(e - 139 + 1023) << 52);
}
// Bounds from a bin's q-sum: at most this many tokens; their mass at least ..._lo, below ..._hi.
__device__ __forceinline__ long long q_count_bound(int bin, unsigned qsum) {
  return static_cast<long long>(qsum / (4096u + 512u * static_cast<unsigned>(bin & 7)));
}
__device__ __forceinline__ double q_mass_lo(int bin, unsigned qsum) {
  return bin >= 8 ? static_cast<double>(qsum) * q_scale(bin) : 0.0;
}
__device__ __forceinline__ double q_mass_hi(int bin, unsigned qsum) {
  return (static_cast<double>(qsum) + static_cast<double>(q_count_bound(bin, qsum))) * q_scale(bin);
}

// ----------------------------------------------------------------------------- thread-block clusters
// (sm_90; sample_row_split). In PTX, not cooperative_groups: this file includes no CUDA header (the
// same instructions: barrier.cluster.arrive.release + wait.acquire is cluster.sync(), mapa is
// map_shared_rank). tests/sampling/cuda_host_shim.h defines MOECOMM_CLUSTER_SHIM and its own.
#ifndef MOECOMM_CLUSTER_SHIM
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900  // no clusters: _cuda.py launches no _split entry there
__device__ __forceinline__ unsigned cluster_rank() { return 0; }
__device__ __forceinline__ unsigned cluster_size() { return 1; }
__device__ __forceinline__ void cluster_sync() { __syncthreads(); }
template <typename T>
__device__ __forceinline__ T* cluster_map(T* p, int) { return p; }
#else
__device__ __forceinline__ unsigned cluster_rank() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
  return r;
}
__device__ __forceinline__ unsigned cluster_size() {
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
  return r;
}
// Every thread of every block of the cluster; the writes before it (shared memory of any block of
// the cluster, and global) are seen by every thread after it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}
// The generic address of the same shared-memory location in block `rank` of the cluster.
template <typename T>
__device__ __forceinline__ T* cluster_map(T* p, int rank) {
  u64 out;
  asm volatile("mapa.u64 %0, %1, %2;" : "=l"(out) : "l"(reinterpret_cast<u64>(p)), "r"(rank));
  return reinterpret_cast<T*>(out);
}
#endif
#endif

// ----------------------------------------------------------------------------- randomness

struct Rng {
  unsigned k0, k1, c1, c2, c3;
};

// Philox4x32-7 of counter (q, c1, c2, c3) under key (k0, k1): reference.philox4x32, word for word.
__device__ __forceinline__ void philox(const Rng& g, unsigned q, unsigned& r0, unsigned& r1, unsigned& r2,
                                       unsigned& r3) {
  unsigned c0 = q, c1 = g.c1, c2 = g.c2, c3 = g.c3, k0 = g.k0, k1 = g.k1;
#pragma unroll
  for (int i = 0; i < PHILOX_ROUNDS; ++i) {
    const unsigned hb = __umulhi(0xCD9E8D57u, c2), lb = 0xCD9E8D57u * c2;
    const unsigned ha = __umulhi(0xD2511F53u, c0), la = 0xD2511F53u * c0;
    c0 = hb ^ c1 ^ k0;
    c2 = ha ^ c3 ^ k1;
    c1 = lb;
    c3 = la;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  r0 = c0;
  r1 = c1;
  r2 = c2;
  r3 = c3;
}

// E = -log(1 - u), u = (r + 0.5) 2^-32; the series below 2^-8 (reference.exponential_from_uniform).
__device__ __forceinline__ float exponential(unsigned r) {
  const float u = __fmul_rn(__fadd_rn(__uint2float_rn(r), 0.5f), 2.3283064365386963e-10f);
  if (u < 0.00390625f) return __fmul_rn(u, __fadd_rn(1.0f, __fmul_rn(u, __fadd_rn(0.5f, __fmul_rn(u, 0.33333334f)))));
  return -logf(__fsub_rn(1.0f, u));
}

__device__ __forceinline__ void race_update(float v, unsigned r, int i, float& best, int& best_i) {
  const float key = __fdiv_rn(v, exponential(r));
  if (key > best || (key == best && i < best_i)) {
    best = key;
    best_i = i;
  }
}

// ----------------------------------------------------------------------------- streaming the row

struct RowRef {
  const float* p;
  int V;
  int nq;    // quads: (V + 3) / 4 (a split row's slice: one past its last quad)
  bool vec;  // 16-byte aligned row: full quads by one 16-byte load
  int q0 = 0;  // the first quad (a split row's slice: sample_row_split; 0: the whole row)
  // F_SPLIT_SLICE: a split row's slice, quads q0 .. nq - 1, in this block's shared memory (pass A
  // wrote it; pass B and the race read it there instead of the L2 / HBM); nullptr: read the row.
  const float4* s = nullptr;
};

__device__ __forceinline__ float4 load_quad(const RowRef& r, int q) {
  if (r.s != nullptr) return r.s[q - r.q0];
  const int i = q << 2;
  if (r.vec && i + 4 <= r.V) return __ldg(reinterpret_cast<const float4*>(r.p) + q);
  float4 o;
  o.x = i < r.V ? __ldg(r.p + i) : 0.0f;
  o.y = i + 1 < r.V ? __ldg(r.p + i + 1) : 0.0f;
  o.z = i + 2 < r.V ? __ldg(r.p + i + 2) : 0.0f;
  o.w = i + 3 < r.V ? __ldg(r.p + i + 3) : 0.0f;
  return o;
}

// f(q, x) for every quad q of the row (x: tokens 4q .. 4q + 3, zeros past the end), UNROLL loads in
// flight a thread. Every thread runs the same number of iterations (quads past the row come as
// zeros), so f may use warp-wide operations.
// The N quads base + u * blockDim.x + threadIdx.x of the row (zeros past its end).
template <int N>
__device__ __forceinline__ void load_chunk(const RowRef& r, int base, float4 (&x)[N]) {
#pragma unroll
  for (int u = 0; u < N; ++u) {
    const int q = base + u * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
    x[u] = q < r.nq ? load_quad(r, q) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
}

// g(base, x) for every chunk of N quads a thread (x: float4[N], x[u] quad base + u * blockDim.x +
// threadIdx.x), as for_each_quad: N = UNROLL, or with PIPE (F_PASS_A_PIPE) N = PIPE_UNROLL and the
// next chunk's loads issued before g runs on this one, so that a chunk's work (pass A's atomics,
// pass_a_list's appends) overlaps the next chunk's memory latency instead of following it (the
// same 4 quads in flight a thread, the same registers). Measured alone (benchmarks/probe_stream.py,
// H200, pass A's per-token work, one 1024-thread block a row): B128 V128256 19.7 -> 18.5 us, B1
// 13.2 -> 11.8 (4 quads pipelined: 18.7 / 13.4, and ~240 bytes of spills in the q-sum entries); in
// sample.cu (bench_sampling, CUDA-graph replay): top-p B128 V128256 65.5 -> 62.0 us, B512 V151936
// 227.2 -> 223.7, top-k + top-p 37.6 -> 34.9 and 122.6 -> 117.1. Not for pass_a_list (slower there).
constexpr int PIPE_UNROLL = 2;
template <bool PIPE, typename G>
__device__ __forceinline__ void for_each_chunk(const RowRef& r, G&& g) {
  if (!PIPE) {
    const int step = UNROLL * static_cast<int>(blockDim.x);
    for (int base = r.q0; base < r.nq; base += step) {
      float4 x[UNROLL];
      load_chunk(r, base, x);
      g(base, x);
    }
    return;
  }
  const int step = PIPE_UNROLL * static_cast<int>(blockDim.x);
  float4 x[PIPE_UNROLL];
  load_chunk(r, r.q0, x);
  for (int base = r.q0; base < r.nq; base += step) {
    float4 y[PIPE_UNROLL];
    load_chunk(r, base + step, y);
    g(base, x);
#pragma unroll
    for (int u = 0; u < PIPE_UNROLL; ++u) x[u] = y[u];
  }
}

template <typename F>
__device__ __forceinline__ void for_each_quad(const RowRef& r, F&& f) {
  const int T = blockDim.x, t = threadIdx.x;
  for (int base = r.q0; base < r.nq; base += UNROLL * T) {
    float4 x[UNROLL];
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int q = base + u * T + t;
      x[u] = q < r.nq ? load_quad(r, q) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    }
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) f(base + u * T + t, x[u]);
  }
}

// ----------------------------------------------------------------------------- the kept set

struct Cond {  // kept(rank, mass_before) of a token: monotone along the order
  long long k;
  double P;
  bool use_mass;
  __device__ __forceinline__ bool operator()(long long rank, double mass) const {
    return rank < k && (!use_mass || mass < P);
  }
};

struct Pick {  // the last token of the order satisfying a Cond: its key, rank and mass before it
  u64 key;
  long long rank;
  double mass;
};

// The digits a thread owns in a descending scan over nd digits: top, top - 1, ..., top - per + 1 (>= 0).
__device__ __forceinline__ int digits_per_thread(int nd) {
  const int T = static_cast<int>(blockDim.x);
  return (nd + T - 1) / T;
}


// The last entry satisfying cond among the m keys of src (distinct, unsorted, m >= 1), a contiguous
// stretch of the order with cnt_hi tokens of mass mass_hi before it (as list_select; when not even
// the first entry satisfies cond, the first). X: room for m keys (X == src: in place).
//
// Cuts instead of digits, for the short lists of top-k and of top-p's uncertain bins. With
// H(c) = cond(count and fp64 mass of the entries >= c), an entry k is kept iff H(k + 1), and H only
// turns false going down. Each round the warps count and sum the entries at or above each cut
// lo + w * step (the 32 cuts split [lo, hi] evenly) and finds the smallest of them. For the lowest
// cut c* where H holds, every entry >= c* is kept (the smallest of them, f, is l unless an entry
// below c* is kept too) and every entry below the cut under c* is dropped: the next range is
// [cut under c*, c* - 1] (its entries compacted into X), with f as the answer if none of them is
// kept. The range shrinks 32-fold a round: a window of ~700 keys takes ~1-2 rounds of
// ~6 barriers; at <= 64 entries (top-k 50's list at once) one warp sorts them (bitonic),
// prefix-sums their values and picks: two barriers.
// The mass above f is its cut's sum less f (fp64: within an ulp of the in-order sum, as the radix
// levels' sums are within an ulp of the reference's).
__device__ __noinline__ Pick small_select(const u64* src, u64* X, int m, long long cnt_hi, double mass_hi, const Cond cond) {
  constexpr int C = 32;  // cuts a round (warp w takes cuts w, w + W, ...: one each at 1024 threads)
  const int t = threadIdx.x, T = blockDim.x, lane = t & 31, w = t >> 5, W = T >> 5;
  const u64* cur = src;
  const bool rounds = m > 64;
  u64 lo = 0, hi = 0;
  if (rounds) {
    u64 mn = ~0ull, mx = 0;
    for (int j = t; j < m; j += T) {
      const u64 k = src[j];
      mn = k < mn ? k : mn;
      mx = k > mx ? k : mx;
    }
    lo = ~block_reduce(~mn, Max<u64>(), 0ull);
    hi = block_reduce(mx, Max<u64>(), 0ull);
    if (t == 0) {  // the answer when no entry of the range is kept (in shared memory: registers are
      s_pick_key = hi;  // short at 1024 threads): at first, the first
      s_pick_rank = cnt_hi;
      s_pick_mass = mass_hi;
    }
  }
  int nrounds = 0;  // (the profile's slot 19)
  while (m > 64) {
    ++nrounds;
    const u64 step = (hi - lo) / static_cast<u64>(C) + 1;
    for (int ci = w; ci < C; ci += W) {
      const u64 cut = lo + step * static_cast<u64>(ci);  // keys are below 2^63: no overflow
      long long c = 0;
      double sm = 0.0;
      u64 kmin = ~0ull;
      for (int j = lane; j < m; j += 32) {
        const u64 k = cur[j];
        if (k >= cut) {
          ++c;
          sm += static_cast<double>(key_value(k));
          kmin = k < kmin ? k : kmin;
        }
      }
      c = warp_reduce(c, Sum<long long>());
      sm = warp_reduce(sm, Sum<double>());
      kmin = ~warp_reduce(~kmin, Max<u64>());
      if (lane == 0) {
        s_cut_cnt[ci] = c;
        s_cut_mass[ci] = sm;
        s_cut_min[ci] = kmin;
      }
    }
    __syncthreads();
    // the lowest cut where H holds (C when none: l lies above the top cut, or nothing is kept)
    const bool h = cond(cnt_hi + s_cut_cnt[lane], mass_hi + s_cut_mass[lane]);
    const unsigned hm = __ballot_sync(FULL, h);
    const int ws = hm ? __ffs(hm) - 1 : C;
    if (ws == 0) {  // every entry of the range is kept: l is the smallest
      MOECOMM_SAMPLE_VALUE(19, nrounds);
      const u64 k = s_cut_min[0];
      const Pick p{k, cnt_hi + s_cut_cnt[0] - 1, mass_hi + (s_cut_mass[0] - static_cast<double>(key_value(k)))};
      __syncthreads();
      return p;
    }
    const u64 lo2 = lo + step * static_cast<u64>(ws - 1);
    u64 hi2 = hi;
    if (ws < C) {
      hi2 = lo + step * static_cast<u64>(ws) - 1;
      if (s_cut_cnt[ws] > 0) {
        if (t == 0) {  // read after the barrier below
          const u64 f = s_cut_min[ws];
          s_pick_key = f;
          s_pick_rank = cnt_hi + s_cut_cnt[ws] - 1;
          s_pick_mass = mass_hi + (s_cut_mass[ws] - static_cast<double>(key_value(f)));
        }
        cnt_hi += s_cut_cnt[ws];
        mass_hi += s_cut_mass[ws];
      }
    }
    if (t == 0) s_n = 0;
    __syncthreads();  // the cuts read, the counter reset
    for (int j0 = 0; j0 < m; j0 += T) {  // compact [lo2, hi2] into X (in place: reads before writes)
      const int j = j0 + t;
      const u64 k = j < m ? cur[j] : 0;
      const bool in = j < m && k >= lo2 && k <= hi2;
      __syncthreads();
      const int pos = warp_append(in ? 1 : 0, &s_n);
      if (in) X[pos] = k;
    }
    __syncthreads();
    m = s_n;
    cur = X;
    lo = lo2;
    hi = hi2;
    __syncthreads();  // s_n read by every thread
  }
  // <= 64 entries: warp 0 sorts them descending (entry i = 32 r + lane in register r: a bitonic
  // network of 64), prefix-sums their values and picks the last kept
  if (w == 0) {
    u64 k0 = lane < m ? cur[lane] : 0, k1 = lane + 32 < m ? cur[lane + 32] : 0;  // 0: no key (low words >= 2^31)
    // (unrolled: as loops, to save ~16 KB of instructions run once a row, the kernels were 1-1.3%
    // slower, interleaved in one H200 call: B1 33.0 vs 32.4 us, B128 58.7 vs 58.1, B512 211.8 vs 209.1)
#pragma unroll
    for (int size = 2; size <= 64; size <<= 1) {
#pragma unroll
      for (int j = size >> 1; j > 0; j >>= 1) {
        if (j == 32) {  // partners in one lane: entry lane (>) and entry lane + 32
          const u64 a = k0 > k1 ? k0 : k1, b = k0 > k1 ? k1 : k0;
          k0 = a;
          k1 = b;
        } else {
          const u64 o0 = __shfl_xor_sync(FULL, k0, j), o1 = __shfl_xor_sync(FULL, k1, j);
          const bool low = (lane & j) == 0;
          const bool d0 = (lane & size) == 0, d1 = ((lane + 32) & size) == 0;  // descending blocks
          k0 = (low == d0) ? (k0 > o0 ? k0 : o0) : (k0 < o0 ? k0 : o0);
          k1 = (low == d1) ? (k1 > o1 ? k1 : o1) : (k1 < o1 ? k1 : o1);
        }
      }
    }
    const double v0 = k0 ? static_cast<double>(key_value(k0)) : 0.0, v1 = k1 ? static_cast<double>(key_value(k1)) : 0.0;
    double i0 = v0, i1 = v1;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const double y0 = __shfl_up_sync(FULL, i0, o), y1 = __shfl_up_sync(FULL, i1, o);
      if (lane >= o) {
        i0 += y0;
        i1 += y1;
      }
    }
    const double half = __shfl_sync(FULL, i0, 31);  // the first 32 entries' mass
    double e0 = __shfl_up_sync(FULL, i0, 1), e1 = __shfl_up_sync(FULL, i1, 1);
    if (lane == 0) {
      e0 = 0.0;
      e1 = 0.0;
    }
    e1 += half;
    const unsigned m0 = __ballot_sync(FULL, lane < m && cond(cnt_hi + lane, mass_hi + e0));
    const unsigned m1 = __ballot_sync(FULL, lane + 32 < m && cond(cnt_hi + 32 + lane, mass_hi + e1));
    const int L = m1 ? 32 + 31 - __clz(m1) : (m0 ? 31 - __clz(m0) : 0);  // the order keeps a prefix
    const u64 kl = __shfl_sync(FULL, L >= 32 ? k1 : k0, L & 31);
    const double el = __shfl_sync(FULL, L >= 32 ? e1 : e0, L & 31);
    if (lane == 0 && ((m0 | m1) || !rounds)) {  // else a round's fallback stays (none kept: the first)
      s_pick_key = kl;
      s_pick_rank = cnt_hi + L;
      s_pick_mass = mass_hi + el;
    }
  }
  __syncthreads();
  MOECOMM_SAMPLE_VALUE(19, nrounds);
  const Pick p{s_pick_key, s_pick_rank, s_pick_mass};
  __syncthreads();
  return p;
}

// top-p's window select (the list's entries of the uncertain bins, or a split row's gather list):
// the last entry satisfying cond among the m keys of W (distinct, unsorted; their fp32 bits in bins
// wb .. wb + nbins - 1), a contiguous stretch of the order with cnt_hi tokens of mass mass_hi before
// it (as small_select, which it ends in). Instead of small_select's cut rounds (each warp counting
// and summing every key at each of 32 cuts a round: two rounds for a window of ~700 keys), levels
// of finer bins: the range of fp32 bits in up to 256 sub-bins of 2^sh patterns (inside one pass-A
// bin each), an exact count and the q-sum (pass A's mass bounds; integer atomics: deterministic) of
// each; one warp's scan from the top finds the sub-bins whose first token is certainly kept
// (mass before it < P by the upper bounds) and certainly dropped (>= P by the lower bounds); the
// keys above the uncertain ones are counted and summed exactly (fp64, one sweep) and the uncertain
// ones (top-p 0.9 at logits x 3: 1-3 keys) compacted in place. A level again on those while more
// than 64 remain and it narrows them (a window over many bins: the bins first, then the one that
// holds the boundary); then small_select (at <= 64 keys one warp sorts them: no rounds). A window
// over more than 256 bins, or m <= 64: small_select directly. X: scratch of m keys. s_dcnt /
// s_dfill (list_select's) hold the sub-bins' counts and q-sums.
__device__ __noinline__ Pick window_select(u64* W, u64* X, int m, int wb, int nbins, long long cnt_hi, double mass_hi,
                                           const Cond cond) {
  static_assert(NUM_DIGITS == 256, "256 sub-bins in s_dcnt / s_dfill");
  const int t = threadIdx.x, T = blockDim.x, lane = t & 31;
  unsigned lo_bits = static_cast<unsigned>(wb) << 20, range = static_cast<unsigned>(nbins) << 20;
  int nlevels = 0;  // (the profile's slot 24)
  while (m > 64 && nbins >= 1 && nbins <= 256) {
    MOECOMM_SAMPLE_TRACE(PATH_SUB_BINS);
    int sh = 0;  // sub-bins of 2^sh fp32 bit patterns: as fine as 256 of them allow
    while (((range - 1) >> sh) >= 256) ++sh;
    const int nsub = static_cast<int>((range - 1) >> sh) + 1;
    for (int j = t; j < nsub; j += T) {
      s_dcnt[j] = 0;
      s_dfill[j] = 0;
    }
    __syncthreads();
    for (int j = t; j < m; j += T) {
      const unsigned bits = static_cast<unsigned>(W[j] >> 32);
      const int sub = imin(static_cast<int>((bits - lo_bits) >> sh), nsub - 1);  // (the keys lie in the range)
      atomicAdd(&s_dcnt[sub], 1u);
      atomicAdd(&s_dfill[sub], q_of(bits));
    }
    __syncthreads();
    MOECOMM_SAMPLE_CLOCK(22);  // window_select: the sub-bins counted (the last level's)
    if (t < 32) {  // warp 0: lane L owns sub-bins nsub - 1 - L * per - i (i < per), scanned from the top
      const int per = (nsub + 31) >> 5;
      auto bin_of = [&](int j) { return static_cast<int>((lo_bits + (static_cast<unsigned>(j) << sh)) >> 20); };
      long long c = 0;
      double lo = 0.0, hi = 0.0;
      for (int i = 0; i < per; ++i) {
        const int j = nsub - 1 - lane * per - i;
        if (j >= 0) {
          const unsigned cj = s_dcnt[j], qj = s_dfill[j];
          c += cj;
          lo += q_mass_lo(bin_of(j), qj);
          hi += (static_cast<double>(qj) + static_cast<double>(cj)) * q_scale(bin_of(j));
        }
      }
      long long ci = c;
      double loi = lo, hii = hi;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const long long yc = __shfl_up_sync(FULL, ci, o);
        const double yl = __shfl_up_sync(FULL, loi, o), yh = __shfl_up_sync(FULL, hii, o);
        if (lane >= o) {
          ci += yc;
          loi += yl;
          hii += yh;
        }
      }
      long long C = cnt_hi + ci - c;  // before this lane's sub-bins: an exact count, a mass in [Mlo, Mhi)
      double Mlo = mass_hi + (loi - lo), Mhi = mass_hi + (hii - hi);
      int jk = 0x7fffffff, jd = -1;  // the lowest sub-bin certainly kept, the highest certainly dropped
      for (int i = 0; i < per; ++i) {
        const int j = nsub - 1 - lane * per - i;
        if (j >= 0 && s_dcnt[j] > 0) {
          const unsigned cj = s_dcnt[j], qj = s_dfill[j];
          // its first token's mass before it lies in [Mlo, Mhi) (widened by 1e-12: fp64 rounding of the bounds)
          if (cond(C, Mhi + 1e-12 * Mhi)) jk = j;
          if (!cond(C, Mlo - 1e-12 * Mlo) && jd < 0) jd = j;
          C += cj;
          Mlo += q_mass_lo(bin_of(j), qj);
          Mhi += (static_cast<double>(qj) + static_cast<double>(cj)) * q_scale(bin_of(j));
        }
      }
      jk = -warp_reduce(-jk, Max<int>());
      jd = warp_reduce(jd, Max<int>());
      if (jk == 0x7fffffff) jk = nsub - 1;  // none certainly kept: the range's first entry is (the caller's test)
      int jn = 0x7fffffff;  // the lowest non-empty sub-bin above jd: the next range starts there
      for (int i = 0; i < per; ++i) {
        const int j = nsub - 1 - lane * per - i;
        if (j > jd && s_dcnt[j] > 0) jn = j;
      }
      jn = -warp_reduce(-jn, Max<int>());
      if (lane == 0) {
        s_sel = jk;
        s_sel2 = jd;
        s_sel3 = imin(jn, jk) - 1;
      }
    }
    __syncthreads();
    const int jk = s_sel, jd = s_sel2, jlo = s_sel3;  // the next range: sub-bins jlo + 1 .. jk
    MOECOMM_SAMPLE_CLOCK(23);  // ... scanned by warp 0
    MOECOMM_SAMPLE_VALUE(24, ++nlevels);
    if (jlo < 0 && jk == nsub - 1) break;  // nothing certain, no empty sub-bin to drop: no narrower range
    // the keys above jk: counted and summed exactly; those of (jd, jk]: compacted in place (reads
    // before writes a round); the rest dropped
    if (t == 0) s_n = 0;
    long long ac = 0;
    double am = 0.0;
    __syncthreads();
    for (int j0 = 0; j0 < m; j0 += T) {
      const int j = j0 + t;
      const u64 k = j < m ? W[j] : 0;
      const int sub = j < m ? static_cast<int>((static_cast<unsigned>(k >> 32) - lo_bits) >> sh) : -1;
      if (sub > jk) {
        ++ac;
        am += static_cast<double>(key_value(k));
      }
      const bool in = sub > jd && sub <= jk;
      __syncthreads();
      const int pos = warp_append(in ? 1 : 0, &s_n);
      if (in) W[pos] = k;
    }
    cnt_hi += block_reduce(ac, Sum<long long>(), 0LL);
    mass_hi += block_reduce(am, Sum<double>(), 0.0);
    m = s_n;  // complete: block_reduce synchronised after the last append
    __syncthreads();
    lo_bits += static_cast<unsigned>(jlo + 1) << sh;
    range = static_cast<unsigned>(jk - jlo) << sh;
    MOECOMM_SAMPLE_CLOCK(25);  // ... summed and compacted
    if (sh == 0) break;  // single values: ties, ordered by index in small_select
  }
  return small_select(W, X, m, cnt_hi, mass_hi, cond);
}

// The last entry satisfying cond among the n keys of A (distinct, unsorted), which are a contiguous
// stretch of the order with cnt_above tokens of mass mass_above before it. B: scratch of n keys.
// Radix select with 8-bit digits from the top; each level keeps only the bucket holding the answer.
__device__ Pick list_select(const u64* __restrict__ A, u64* __restrict__ B, int n, long long cnt_above,
                            double mass_above, const Cond cond) {
  if (n <= SMALL_MAX) return small_select(A, B, n, cnt_above, mass_above, cond);
  const int t = threadIdx.x, T = blockDim.x;
  const int per = digits_per_thread(NUM_DIGITS);
  const int top = NUM_DIGITS - 1 - t * per;
  u64 prefix = 0;
  int hs = 64;  // key bits at and above hs are fixed (equal to prefix's); 64: none yet
  for (int shift = 56;; shift -= 8) {
    for (int d = t; d < NUM_DIGITS; d += T) {
      s_dcnt[d] = 0;
      s_dfill[d] = 0;
    }
    if (t == 0) {
      s_sel = NUM_DIGITS;
      s_sel2 = -1;
    }
    __syncthreads();
    const u64 ph = hs >= 64 ? 0 : prefix >> hs;
    for (int j = t; j < n; j += T) {
      const u64 k = A[j];
      if (hs >= 64 || (k >> hs) == ph) atomicAdd(&s_dcnt[(k >> shift) & 255], 1u);
    }
    __syncthreads();
    // bucket offsets in descending digit order (the order of the keys)
    unsigned mine = 0;
    for (int j = 0; j < per; ++j)
      if (top - j >= 0) mine += s_dcnt[top - j];
    unsigned total = 0;
    unsigned ex = block_exclusive_scan<unsigned>(mine, &total);
    for (int j = 0; j < per; ++j) {
      const int d = top - j;
      if (d >= 0) {
        s_doff[d] = ex;
        ex += s_dcnt[d];
      }
    }
    __syncthreads();
    for (int j = t; j < n; j += T) {
      const u64 k = A[j];
      if (hs >= 64 || (k >> hs) == ph) {
        const int d = static_cast<int>((k >> shift) & 255);
        B[s_doff[d] + atomicAdd(&s_dfill[d], 1u)] = k;
      }
    }
    __syncthreads();
    // fp64 prefix sums of the values in bucket order: each bucket's mass before its first entry
    const int m = static_cast<int>(total);
    const int chunk = (m + T - 1) / T;
    const int lo = imin(t * chunk, m), hi = imin(lo + chunk, m);
    double part = 0.0;
    for (int j = lo; j < hi; ++j) part += static_cast<double>(key_value(B[j]));
    double run = block_exclusive_scan<double>(part, nullptr);
    for (int j = lo; j < hi; ++j) {
      const u64 k = B[j];
      const int d = static_cast<int>((k >> shift) & 255);
      if (static_cast<unsigned>(j) == s_doff[d]) s_dmass[d] = run;
      run += static_cast<double>(key_value(k));
    }
    __syncthreads();
    // the lowest non-empty digit whose first entry is kept holds the answer
    for (int j = 0; j < per; ++j) {
      const int d = top - j;
      if (d >= 0 && s_dcnt[d] > 0) {
        if (cond(cnt_above + s_doff[d], mass_above + s_dmass[d])) atomicMin(&s_sel, d);
        atomicMax(&s_sel2, d);
      }
    }
    __syncthreads();
    int d = s_sel;
    if (d == NUM_DIGITS) d = s_sel2;  // only by fp64 rounding against the level above: take the first
    const unsigned c = s_dcnt[d];
    cnt_above += s_doff[d];
    mass_above += s_dmass[d];
    prefix |= static_cast<u64>(d) << shift;
    hs = shift;
    if (c == 1 || shift == 0) {
      const Pick p{B[s_doff[d]], cnt_above, mass_above};
      __syncthreads();
      return p;
    }
    if (c <= SMALL_MAX) {  // the bucket, contiguous in B, finished by cuts in place
      const int off = static_cast<int>(s_doff[d]);
      __syncthreads();
      return small_select(B + off, B + off, static_cast<int>(c), cnt_above, mass_above, cond);
    }
    __syncthreads();
  }
}

// The UNROLL quads base + u * blockDim.x + threadIdx.x of pass B: zeros past the row and, with a
// sector map, for the sectors whose byte is below map_min (nothing there is listed: map_min_of).
__device__ __forceinline__ void load_listable_quads(const RowRef& row, int base, const unsigned char* map,
                                                    unsigned map_min, float4 (&x)[UNROLL]) {
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int q = base + u * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
    const bool need = q < row.nq && (map == nullptr || map[q >> 1] >= map_min);
    x[u] = need ? load_quad(row, q) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
}

// Appends to A every token with v > 0 and ka <= K < kb (the entries beyond cap are counted, not
// stored); returns how many there are. *cnt_above, *mass_above: the tokens with K >= kb, exactly.
// map (or nullptr): pass A's sector map; a sector whose byte is below map_min is not loaded (then
// kb must be 2^63 and ka's low 55 bits 0: the skipped tokens are all below ka).
__device__ int fill_range(const RowRef& row, u64* __restrict__ A, int cap, u64 ka, u64 kb, long long* cnt_above,
                          double* mass_above, const unsigned char* map = nullptr, unsigned map_min = 0) {
  if (threadIdx.x == 0) s_n = 0;
  __syncthreads();
  long long ac = 0;
  double am = 0.0;
  const int T = blockDim.x, t = threadIdx.x;
  // for_each_quad's loop, with one warp-aggregated append for the UNROLL quads of an iteration
  for (int base = row.q0; base < row.nq; base += UNROLL * T) {
    float4 x[UNROLL];
    load_listable_quads(row, base, map, map_min, x);
    int c = 0;
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const float v[4] = {x[u].x, x[u].y, x[u].z, x[u].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (v[j] > 0.0f) {
          const u64 k = make_key(v[j], 4 * (base + u * T + t) + j);
          if (k >= kb) {
            ++ac;
            am += static_cast<double>(v[j]);
          } else if (k >= ka) {
            ++c;
          }
        }
      }
    }
    int pos = warp_append(c, &s_n);
    if (c > 0) {
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const float v[4] = {x[u].x, x[u].y, x[u].z, x[u].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (v[j] > 0.0f) {
            const u64 k = make_key(v[j], 4 * (base + u * T + t) + j);
            if (k >= ka && k < kb) {
              if (pos < cap) A[pos] = k;
              ++pos;
            }
          }
        }
      }
    }
  }
  *cnt_above = block_reduce(ac, Sum<long long>(), 0LL);
  *mass_above = block_reduce(am, Sum<double>(), 0.0);
  const int n = s_n;  // complete: block_reduce synchronised after the last append
  __syncthreads();    // read by every thread before the next fill_range may reset it
  return n;
}

// Where a split row's pass B also puts its tokens (sample_row_split): the listed tokens below tw
// (top-p's uncertain bins, or all of them) go to rank 0's gather list, those at or above tw are only
// counted and summed (ac, am: this block's, after list_above). They are staged in this block's
// shared memory first (keys, at most cap, *counter: warp-aggregated local appends), then copied at
// the end (gather_flush: one remote atomic a block reserves their place in rank 0's list out, at
// most out_cap stored, *out_counter its length). Appending to rank 0's counter a warp at a time
// serialised ~256 remote atomics on one address: B1's pass B took 4 us for one round of loads.
struct Gather {
  u64* keys;
  int cap;
  int* counter;
  u64* out;
  int out_cap;
  int* out_counter;
  int tw;
  long long ac;
  double am;
};
__shared__ int s_gbase;  // gather_flush: this block's place in rank 0's list

// The staged keys into rank 0's gather list (every thread; after the last append). A staging
// overflow counts as an overflow of rank 0's list (its length then exceeds out_cap: not used).
__device__ void gather_flush(Gather* g) {
  __syncthreads();  // every staged key and the local count written
  if (threadIdx.x == 0) {
    const int n = *g->counter;
    s_gbase = atomicAdd(g->out_counter, n <= g->cap ? n : g->out_cap + 1);
  }
  __syncthreads();
  const int n = imin(*g->counter, g->cap), base = s_gbase;
  for (int j = threadIdx.x; j < n && base + j < g->out_cap; j += blockDim.x) g->out[base + j] = g->keys[j];
}

// One round of the list path's pass B in every thread: its UNROLL quads x (quad indices qi; zeros
// where nothing was loaded) appended to A where a token's fp32 bits are >= tbi (warp-aggregated, at
// most cap stored), GATHER as list_above's. Every lane of the warp calls it.
template <bool SPARSE, bool GATHER>
__device__ __forceinline__ void list_round(const float4 (&x)[UNROLL], const int (&qi)[UNROLL], int tbi,
                                           u64* __restrict__ A, int cap, Gather* g, long long& ac, double& am) {
  // SPARSE (top-k given: >99% of the quads hold no listed token for top-k 50): a quad's largest
  // bits first, and the quads without a listed token skip the per-token work. Not for top-p, whose
  // ~18% of quads with one make the branches cost more than they save (H200: pass B 17.3 -> 19.5
  // us at top-p B128, 7.7 -> 7.1 at top-k + top-p).
  int c = 0;
  unsigned qm = SPARSE ? 0u : (1u << UNROLL) - 1;
#pragma unroll
  for (int u = 0; u < UNROLL; ++u) {
    const int a = __float_as_int(x[u].x), b = __float_as_int(x[u].y), d = __float_as_int(x[u].z),
              e = __float_as_int(x[u].w);
    if (!SPARSE || imax(imax(a, b), imax(d, e)) >= tbi) {
      if (SPARSE) qm |= 1u << u;
      c += (a >= tbi) + (b >= tbi) + (d >= tbi) + (e >= tbi);
    }
  }
  int pos = warp_append(c, &s_n);
  int gc = 0;
  if (GATHER && c > 0) {  // of the listed: those below tw to the gather list, the others summed
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const float v[4] = {x[u].x, x[u].y, x[u].z, x[u].w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int bits = __float_as_int(v[j]);
        if (bits >= tbi) {
          if (bits < g->tw) {
            ++gc;
          } else {
            ++ac;
            am += static_cast<double>(v[j]);
          }
        }
      }
    }
  }
  int gpos = GATHER ? warp_append(gc, g->counter) : 0;
  if (c > 0) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      if (qm & (1u << u)) {
        const float v[4] = {x[u].x, x[u].y, x[u].z, x[u].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (__float_as_int(v[j]) >= tbi) {
            const u64 key = make_key(v[j], 4 * qi[u] + j);
            if (pos < cap) A[pos] = key;
            ++pos;
            if (GATHER && __float_as_int(v[j]) < g->tw) {
              if (gpos < g->cap) g->keys[gpos] = key;
              ++gpos;
            }
          }
        }
      }
    }
  }
}

// The list path's pass B: appends to A every token whose fp32 bits (as a signed int: -0.0 is not
// listed) are >= tb >= 1, i.e. v > 0 in bins >= tb >> 20 (the entries beyond cap are counted, not
// stored); returns how many there are. fill_range with kb = 2^63 and ka = tb << 32, on 32-bit
// compares: no key is built for a token that is not listed (~3x fewer instructions a token: the
// pass is bound by issue, not bytes). map as fill_range's. GATHER: each listed token also goes to g
// (see Gather).
// REV (F_PASS_B_REVERSE): the row's chunks from the last to the first. Pass A read them first to
// last, so the L2 (60 MB on the H200) still holds the row's tail when pass B starts, and pass B reads
// those lines before the misses of its head evict them. Which tokens are listed does not depend on
// the order, only where.
// slots (with a map; 2 * UNROLL ints a thread of free shared memory, or nullptr): the sectors to load
// are gathered first, so that every lane loads UNROLL quads a round. Pass B is bound by the rounds'
// memory latency, not by bytes: with the map's ~40% of the sectors spread over the row, the loop
// over fixed quads issues ~40% of its loads a round in as many rounds as pass A. Gathered, the warps
// take the row's chunks of 32 sectors (32 map bytes, one ballot) in turn, chunk c to warp c % warps,
// (REV: from the last chunk), and a warp's lanes write the needed sectors of its chunks into its 64
// slots (2 sectors, UNROLL quads, a lane) until they are full; the lanes then load them: ~40% of
// the rounds.
template <bool SPARSE, bool GATHER = false>
__device__ int list_above(const RowRef& row, u64* __restrict__ A, int cap, unsigned tb, const unsigned char* map,
                          unsigned map_min, bool rev, Gather* g = nullptr, int* slots = nullptr) {
  static_assert(UNROLL == 4 && NUM_BINS * 4 >= 32 * 64 * 4, "a round gathers 2 sectors (4 quads) a lane, 64 slots a warp in the bins");
  if (threadIdx.x == 0) s_n = 0;
  __syncthreads();
  const int T = blockDim.x, t = threadIdx.x;
  const int tbi = static_cast<int>(tb);
  long long ac = 0;
  double am = 0.0;
  if (map != nullptr && slots != nullptr) {
    const int lane = t & 31, W = T >> 5;
    const int sec0 = row.q0 >> 1, sec_end = (row.nq + 1) >> 1;  // row.q0 is even (a split row's slice too)
    const int nchunks = (sec_end - sec0 + 31) >> 5;
    int* my = slots + 64 * (t >> 5);
    int next = t >> 5;  // the warp's next chunk (warp-uniform, as are pend, cbase and got)
    unsigned pend = 0;  // the needed sectors of the current chunk not yet in a slot
    int cbase = 0;
    for (;;) {
      int got = 0;
      while (got < 64) {
        if (pend == 0) {
          if (next >= nchunks) break;
          cbase = sec0 + 32 * (rev ? nchunks - 1 - next : next);
          next += W;
          const int sec = cbase + lane;
          pend = __ballot_sync(FULL, sec < sec_end && map[sec] >= map_min);
          continue;
        }
        const int slot = got + __popc(pend & ((1u << lane) - 1u));
        const bool put = ((pend >> lane) & 1u) && slot < 64;
        if (put) my[slot] = cbase + lane;
        const unsigned taken = __ballot_sync(FULL, put);
        pend &= ~taken;
        got += __popc(taken);
      }
      if (got == 0) break;
      __syncwarp();
      const int s0 = lane < got ? my[lane] : -1, s1 = lane + 32 < got ? my[lane + 32] : -1;
      __syncwarp();  // every slot read before the next round writes them
      int qi[UNROLL] = {2 * s0, 2 * s0 + 1, 2 * s1, 2 * s1 + 1};
      float4 x[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const bool need = (u < 2 ? s0 : s1) >= 0 && qi[u] < row.nq;
        x[u] = need ? load_quad(row, qi[u]) : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      }
      list_round<SPARSE, GATHER>(x, qi, tbi, A, cap, g, ac, am);
    }
  } else {
    const int chunk = UNROLL * T;
    const int nit = row.nq > row.q0 ? (row.nq - row.q0 + chunk - 1) / chunk : 0;  // the same in every thread
    for (int it = 0; it < nit; ++it) {
      const int base = row.q0 + (rev ? nit - 1 - it : it) * chunk;
      float4 x[UNROLL];
      load_listable_quads(row, base, map, map_min, x);
      int qi[UNROLL];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) qi[u] = base + u * T + t;
      list_round<SPARSE, GATHER>(x, qi, tbi, A, cap, g, ac, am);
    }
  }
  MOECOMM_SAMPLE_CLOCK(20);  // pass B's loop done (thread 0)
  if (GATHER) {
    g->ac = block_reduce(ac, Sum<long long>(), 0LL);
    g->am = block_reduce(am, Sum<double>(), 0.0);
    gather_flush(g);
  }
  __syncthreads();  // every append done
  const int n = s_n;
  __syncthreads();  // read by every thread before the next fill_range / list_above may reset it
  MOECOMM_SAMPLE_CLOCK(21);  // ... and its sums
  return n;
}

// The entries of A (n keys) below kb, copied to W (warp-aggregated, at most wcap stored; returns how many), and the
// count and fp64 mass of those at or above it (*cnt_above, *mass_above). For top-p's list: the
// select then runs on the uncertain bins only, with the exact rank and mass above them.
__device__ int split_list(const u64* __restrict__ A, int n, u64 kb, u64* __restrict__ W, int wcap, long long* cnt_above,
                          double* mass_above) {
  if (threadIdx.x == 0) s_n = 0;
  __syncthreads();
  long long ac = 0;
  double am = 0.0;
  for (int j0 = 0; j0 < n; j0 += blockDim.x) {  // block-uniform trip count: every lane appends
    const int j = j0 + threadIdx.x;
    const u64 k = j < n ? A[j] : 0;
    const bool below = j < n && k < kb;
    if (j < n && !below) {
      ++ac;
      am += static_cast<double>(key_value(k));
    }
    const int pos = warp_append(below ? 1 : 0, &s_n);
    if (below && pos < wcap) W[pos] = k;  // beyond wcap: counted, not stored
  }
  *cnt_above = block_reduce(ac, Sum<long long>(), 0LL);
  *mass_above = block_reduce(am, Sum<double>(), 0.0);
  const int m = s_n;
  __syncthreads();
  return m;
}

// The last token satisfying cond over the whole row, from HBM: radix levels of 11-bit digits of the
// composite key (bits 62..52 = pass A's bins, 51..41, ..., 7..0), one pass a level counting (and for
// top-p summing in fp64) the tokens of the current bucket, until the bucket holding the answer fits
// the list; then that bucket is listed and list_select finishes. B: scratch (>= 24 KB).
__device__ Pick hbm_select(const RowRef& row, u64* A, u64* B, int cap, const Cond cond) {
  const int t = threadIdx.x, T = blockDim.x;
  unsigned* hcnt = reinterpret_cast<unsigned*>(B);
  double* hmass = reinterpret_cast<double*>(B) + NUM_BINS / 2;
  u64 prefix = 0;
  int hs = 63;  // bit 63 of every key is 0
  for (int lvl = 0;; ++lvl) {
    const int shift = lvl < 5 ? 52 - 11 * lvl : 0;
    const int nd = lvl < 5 ? 2048 : 256;
    for (int d = t; d < NUM_BINS; d += T) {
      hcnt[d] = 0;
      hmass[d] = 0.0;
    }
    if (t == 0) {
      s_sel = nd;
      s_sel2 = -1;
    }
    __syncthreads();
    const u64 ph = prefix >> hs;
    long long ac = 0;
    double am = 0.0;
    for_each_quad(row, [&](int q, float4 x) {
      const float v[4] = {x.x, x.y, x.z, x.w};
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        if (v[j] > 0.0f) {
          const u64 k = make_key(v[j], 4 * q + j);
          const u64 h = k >> hs;
          if (h > ph) {
            ++ac;
            am += static_cast<double>(v[j]);
          } else if (h == ph) {
            const int d = static_cast<int>((k >> shift) & static_cast<u64>(nd - 1));
            atomicAdd(&hcnt[d], 1u);
            if (cond.use_mass) atomicAdd(&hmass[d], static_cast<double>(v[j]));
          }
        }
      }
    });
    ac = block_reduce(ac, Sum<long long>(), 0LL);
    am = block_reduce(am, Sum<double>(), 0.0);
    const int per = digits_per_thread(nd);
    const int top = nd - 1 - t * per;
    long long mc = 0;
    double mm = 0.0;
    for (int j = 0; j < per; ++j)
      if (top - j >= 0) {
        mc += hcnt[top - j];
        mm += hmass[top - j];
      }
    long long ec = block_exclusive_scan<long long>(mc, nullptr);
    double em = block_exclusive_scan<double>(mm, nullptr);
    for (int j = 0; j < per; ++j) {
      const int d = top - j;
      if (d >= 0) {
        const unsigned c = hcnt[d];
        if (c > 0) {
          if (cond(ac + ec, am + em)) atomicMin(&s_sel, d);
          atomicMax(&s_sel2, d);
        }
        ec += c;
        em += hmass[d];
      }
    }
    __syncthreads();
    int d = s_sel;
    if (d == nd) d = s_sel2;
    const unsigned c = hcnt[d];
    prefix |= static_cast<u64>(d) << shift;
    hs = shift;
    __syncthreads();
    if (static_cast<long long>(c) <= cap || shift == 0) break;
  }
  long long c0 = 0;
  double m0 = 0.0;
  const int n = fill_range(row, A, cap, prefix, prefix + (1ull << hs), &c0, &m0);
  return list_select(A, B, imin(n, cap), c0, m0, cond);
}

// ----------------------------------------------------------------------------- one row

__device__ void write_row(void* out, unsigned char* valid, float* logprob, int flags, int pid, int token, bool ok,
                          float lp) {
  if (threadIdx.x != 0) return;
  if (flags & F_OUT64)
    static_cast<long long*>(out)[pid] = ok ? token : 0;
  else
    static_cast<int*>(out)[pid] = ok ? token : 0;
  valid[pid] = ok ? 1 : 0;
  if (flags & F_LOGPROB) logprob[pid] = ok ? lp : __int_as_float(0x7fc00000);
}

// top_p of output row pid (1 without top-p), read where it is used (not held in a register across
// the row: they are short at 1024 threads)
__device__ __forceinline__ double top_p_of(int flags, const float* p_ptr, double p_val, int pid) {
  return (flags & F_HAS_P) ? ((flags & F_P_TENSOR) ? static_cast<double>(p_ptr[pid]) : p_val) : 1.0;
}

struct RowArgs {
  long long in_row;  // the row of x
  long long k;       // top_k (V without)
  float min_p;       // 0 without
  bool ok;           // false: a bad index or a parameter out of range (an invalid row, never a fault)
};

__device__ __forceinline__ RowArgs row_args(int pid, const void* rowmap, const void* k_ptr, const float* p_ptr,
                                            const float* minp_ptr, int V, int num_in_rows, long long k_val,
                                            double p_val, float minp_val, int flags) {
  RowArgs a{pid, V, 0.0f, true};
  if (flags & F_ROWMAP) {
    a.in_row = (flags & F_ROWMAP64) ? static_cast<const long long*>(rowmap)[pid] : static_cast<const int*>(rowmap)[pid];
    a.ok = a.in_row >= 0 && a.in_row < num_in_rows;
  }
  if (flags & F_HAS_K) {
    a.k = !(flags & F_K_TENSOR) ? k_val
          : (flags & F_K64)     ? static_cast<const long long*>(k_ptr)[pid]
                                : static_cast<const int*>(k_ptr)[pid];
    a.ok = a.ok && a.k >= 1;
  }
  if (flags & F_HAS_P) {
    const double p = top_p_of(flags, p_ptr, p_val, pid);
    a.ok = a.ok && p > 0.0 && p <= 1.0;
  }
  if (flags & F_HAS_MINP) {
    a.min_p = (flags & F_MINP_TENSOR) ? minp_ptr[pid] : minp_val;
    a.ok = a.ok && a.min_p >= 0.0f && a.min_p <= 1.0f;
  }
  return a;
}

// One quad q (tokens x) of pass A into this thread's partials (pass_a, pass_a_list)
template <int HIST>
__device__ __forceinline__ void pass_a_quad(const RowRef& row, int q, float4 xq, unsigned* hist, unsigned char* map,
                                            bool use_map, int flags, double& s, float& mx, float& mn, int& npos_t) {
  const float v[4] = {xq.x, xq.y, xq.z, xq.w};
  if (use_map) {  // block-uniform: every lane shuffles
    unsigned mb = __float_as_uint(v[0]);
    mb = mb > __float_as_uint(v[1]) ? mb : __float_as_uint(v[1]);
    mb = mb > __float_as_uint(v[2]) ? mb : __float_as_uint(v[2]);
    mb = mb > __float_as_uint(v[3]) ? mb : __float_as_uint(v[3]);
    const unsigned other = __shfl_xor_sync(FULL, mb, 1);
    mb = mb > other ? mb : other;
    if ((q & 1) == 0 && q < row.nq) map[q >> 1] = static_cast<unsigned char>(map_byte(flags, mb));
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    s += static_cast<double>(v[j]);
    mx = fmaxf(mx, v[j]);
    mn = fminf(mn, v[j]);
    const unsigned bits = __float_as_uint(v[j]);
    const bool pos = static_cast<int>(bits) > 0;  // v > 0 (NaN and +inf too: their row is bad anyway)
    npos_t += pos ? 1 : 0;
    if (HIST != HIST_NONE && pos)
      atomicAdd(&hist[bits >> 20], HIST == HIST_COUNT ? 1u : q_of(bits));
  }
}

// Pass A over row (or a split row's slice) into this thread's partials: per token the fp64 sum, max,
// min, count of v > 0 and one native shared atomic (~12 instructions). The bad-row test needs no
// per-token branch: a negative value (-inf too) shows in the min, NaN and +inf in the fp64 sum
// (finite fp32 values cannot overflow it). The sector map (use_map): a byte per 8 tokens (32
// bytes, the two quads of lanes 2i and 2i + 1; row.q0 even), the largest fp32 exponent (or bin:
// F_MAP_BINS) among them, so that pass B skips the sectors that cannot hold a listed token (>99% of
// the row for top-k 50, ~55-68% for top-p 0.9).
// stash (F_SPLIT_SLICE; nullptr: none): every quad of the slice also written to stash[q - row.q0].
template <int HIST>
__device__ __forceinline__ void pass_a(const RowRef& row, unsigned* hist, unsigned char* map, bool use_map, int flags,
                                       double& s, float& mx, float& mn, int& npos_t, float4* stash = nullptr) {
  auto chunk = [&](int base, const auto& x) {
    constexpr int N = sizeof(x) / sizeof(float4);
#pragma unroll
    for (int u = 0; u < N; ++u) {
      const int q = base + u * static_cast<int>(blockDim.x) + static_cast<int>(threadIdx.x);
      pass_a_quad<HIST>(row, q, x[u], hist, map, use_map, flags, s, mx, mn, npos_t);
      if (stash != nullptr && q < row.nq) stash[q - row.q0] = x[u];
    }
  };
  if (flags & F_PASS_A_PIPE)
    for_each_chunk<true>(row, chunk);
  else
    for_each_chunk<false>(row, chunk);
}

// F_PASS_A_LIST (top-p without top-k: the q-sum entries): pass A also lists its candidates, every
// token whose fp32 bits are >= tau, so that pass B need not read the row again when the plan's b0
// lies at or above tau (tau <= b0 << 20: every token of bins >= b0 is in the list, which the list
// path then cuts down to them; else, or when the candidates overflowed, pass B as before). tau is
// set once, after the first iteration (UNROLL quads a thread: 1/8 of the row at B128 V128256, 1/19
// at paired V151936, a split block's whole slice), from that iteration's bins: the lowest bin edge
// whose tokens, counted from the top and projected over the row, stay within `budget` keys; every
// token of the row, the first iteration's too, is tested against that one tau, so the test above
// is exact. Why counts and not the running max (the first idea): at logits x 3 the gap from the
// row's max to b0 spreads over 88-110 bins (numpy, 200 rows), so a tau a fixed distance below the
// max that covers b0 always lists 17-27K keys; a count quantile over the first 8-16K tokens at a
// budget of ~9.8K keys covered b0 in 299-300 of 300 rows at V128256 and V151936 (pass B's lists
// there: mean 6.0K / 7.3K, max 7.8K / 10.4K). budget_q: the budget in the first iteration's q-sum
// units' tokens (warp 0 sets s_tau; a bin's count from its q-sum at its bin's mean q).
__device__ __noinline__ void pass_a_threshold(const unsigned* hist, float budget) {
  const int lane = threadIdx.x & 31;
  float run = 0.0f;
  int tau = 1;  // the whole first iteration fits: every positive token
  for (int top = NUM_BINS - 1; top >= 0; top -= 32) {  // warp-uniform
    const int b = top - lane;
    const unsigned h = hist[b];
    if (__ballot_sync(FULL, h != 0u) == 0u) continue;
    float incl = __fdividef(static_cast<float>(h), 4352.0f + 512.0f * static_cast<float>(b & 7));
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const float y = __shfl_up_sync(FULL, incl, o);
      if (lane >= o) incl += y;
    }
    const unsigned over = __ballot_sync(FULL, run + incl > budget);
    if (over) {  // the first bin past the budget: the list takes the bins above it
      const int bb = top - (__ffs(over) - 1);
      tau = bb == NUM_BINS - 1 ? 0x7fffffff : (bb + 1) << 20;
      break;
    }
    run += __shfl_sync(FULL, incl, 31);
  }
  if (lane == 0) s_tau = tau;
}

// pass_a with the candidates (see pass_a_threshold): position j of the candidate list is A[j] for
// j < cap, A2[j - cap] below cap + cap2 (the scratch past the bins: no sector map on this path),
// counted beyond (s_n, reset by the caller before its barrier, ends as the candidates' count).
// budget: candidate keys for the whole row (row_nq quads; a split block's slice projects its share).
template <int HIST>
__device__ __forceinline__ void pass_a_list(const RowRef& row, unsigned* hist, u64* A, int cap, u64* A2, int cap2,
                                            int budget, int row_nq, double& s, float& mx, float& mn, int& npos_t) {
  const int T = blockDim.x, t = threadIdx.x;
  int tau = 0x7fffffff;
  auto chunk = [&](int base, const auto& x) {  // block-uniform trip count
    constexpr int N = sizeof(x) / sizeof(float4);
#pragma unroll
    for (int u = 0; u < N; ++u) pass_a_quad<HIST>(row, base + u * T + t, x[u], hist, nullptr, false, 0, s, mx, mn, npos_t);
    if (base == row.q0) {  // the first iteration's bins give tau
      __syncthreads();
      if (t < 32) {
        const int sample_q = imin(N * T, row.nq - row.q0);
        pass_a_threshold(hist, static_cast<float>(budget) * static_cast<float>(sample_q) / static_cast<float>(row_nq));
      }
      __syncthreads();
      tau = s_tau;
    }
    int c = 0;
#pragma unroll
    for (int u = 0; u < N; ++u)
      c += (__float_as_int(x[u].x) >= tau) + (__float_as_int(x[u].y) >= tau) + (__float_as_int(x[u].z) >= tau) +
           (__float_as_int(x[u].w) >= tau);
    int pos = warp_append(c, &s_n);
    if (c > 0) {
#pragma unroll
      for (int u = 0; u < N; ++u) {
        const float v[4] = {x[u].x, x[u].y, x[u].z, x[u].w};
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (__float_as_int(v[j]) >= tau) {
            const u64 key = make_key(v[j], 4 * (base + u * T + t) + j);
            if (pos < cap)
              A[pos] = key;
            else if (pos - cap < cap2)
              A2[pos - cap] = key;
            ++pos;
          }
        }
      }
    }
  };
  for_each_chunk<false>(row, chunk);  // (pipelined: H200 B128 top-p 65.9 vs 63.5 us, B512 232.5 vs 218.0)
}

// The list path's pass B when pass A's candidates cover bins >= tb >> 20 (nc of them, stored as
// pass_a_list stores them): the candidates with fp32 bits >= tb compacted into A in place (at most
// cap stored; returns how many), i.e. list_above's list from shared memory instead of the row.
// GATHER: list_above's gather too. A chunk is read before any of its keys is written (the barrier):
// a write lands at a position below the chunk's end.
template <bool GATHER>
__device__ int take_candidates(u64* A, const u64* A2, int cap, int nc, unsigned tb, Gather* g = nullptr) {
  __syncthreads();  // every thread has read s_n (the caller's nc) before it is reset
  if (threadIdx.x == 0) s_n = 0;
  __syncthreads();
  const int T = blockDim.x, t = threadIdx.x;
  const int tbi = static_cast<int>(tb);
  long long ac = 0;
  double am = 0.0;
  for (int j0 = 0; j0 < nc; j0 += T) {  // block-uniform trip count: every lane appends
    const int j = j0 + t;
    const u64 k = j < nc ? (j < cap ? A[j] : A2[j - cap]) : 0;
    const int bits = static_cast<int>(k >> 32);
    const bool in = j < nc && bits >= tbi;
    bool gin = false;
    if (GATHER && in) {
      if (bits < g->tw) {
        gin = true;
      } else {
        ++ac;
        am += static_cast<double>(key_value(k));
      }
    }
    __syncthreads();
    const int pos = warp_append(in ? 1 : 0, &s_n);
    if (in && pos < cap) A[pos] = k;
    if (GATHER) {
      const int gpos = warp_append(gin ? 1 : 0, g->counter);
      if (gin && gpos < g->cap) g->keys[gpos] = k;
    }
  }
  if (GATHER) {
    g->ac = block_reduce(ac, Sum<long long>(), 0LL);
    g->am = block_reduce(am, Sum<double>(), 0.0);
    gather_flush(g);
  }
  __syncthreads();  // every append done
  const int n = s_n;
  __syncthreads();
  return n;
}

struct BinPlan {
  int b0;             // the lowest bin to list
  long long est;      // an upper bound of the list's size
  int wlo, whi;       // top-p's window of uncertain bins
  long long est_win;  // an upper bound of the window's size
};

// plan: the lowest bin b0 to list and an upper bound of the list's size, from pass A's bins
// (HIST_COUNT: exact counts; HIST_QSUM: mass bounds; P = top_p * S). Every thread calls it.
template <int HIST>
__device__ __forceinline__ BinPlan plan_bins(const unsigned* hist, long long k_eff, long long npos, int bthr,
                                             bool need_sk, bool p_all, double P) {
  BinPlan pl{bthr, npos, 0, NUM_BINS - 1, npos + 1};
  const int t = threadIdx.x;
  const int per = digits_per_thread(NUM_BINS);
  const int top = NUM_BINS - 1 - t * per;
  if (HIST == HIST_COUNT) {
    long long mine = 0;
    for (int j = 0; j < per; ++j)
      if (top - j >= 0) mine += hist[top - j];
    if (t == 0) s_sel = NUM_BINS;
    long long run = block_exclusive_scan<long long>(mine, nullptr);
    for (int j = 0; j < per; ++j) {
      const int b = top - j;
      if (b >= 0) {
        const unsigned c = hist[b];
        if (c > 0 && run < k_eff) atomicMin(&s_sel, b);  // the bin holding rank k_eff - 1
        run += c;
      }
    }
    __syncthreads();
    pl.b0 = need_sk ? s_sel : imax(s_sel, bthr);
    long long cnt = 0;
    for (int j = 0; j < per; ++j)
      if (top - j >= pl.b0) cnt += hist[top - j];
    pl.est = block_reduce(cnt, Sum<long long>(), 0LL);
  } else if (HIST == HIST_QSUM) {
    if (!p_all) {
      double lo_mine = 0.0, hi_mine = 0.0;
      for (int j = 0; j < per; ++j) {
        const int b = top - j;
        if (b >= 0) {
          const unsigned h = hist[b];
          lo_mine += q_mass_lo(b, h);
          hi_mine += q_mass_hi(b, h);
        }
      }
      if (t == 0) {
        s_sel = -1;
        s_sel2 = NUM_BINS;
      }
      double lo_run = block_exclusive_scan<double>(lo_mine, nullptr);
      double hi_run = block_exclusive_scan<double>(hi_mine, nullptr);
      for (int j = 0; j < per; ++j) {
        const int b = top - j;
        if (b >= 0) {
          const unsigned h = hist[b];
          if (h > 0 && lo_run >= P) atomicMax(&s_sel, b);   // first token certainly dropped
          if (h > 0 && hi_run < P) atomicMin(&s_sel2, b);   // first token certainly kept
          lo_run += q_mass_lo(b, h);
          hi_run += q_mass_hi(b, h);
        }
      }
      __syncthreads();
      pl.wlo = imax(s_sel, 0);
      pl.whi = s_sel2 < NUM_BINS ? s_sel2 : NUM_BINS - 1;
    }
    pl.b0 = imax(pl.wlo, bthr);
    long long cnt = 0, wcnt = 0;
    for (int j = 0; j < per; ++j) {
      const int b = top - j;
      if (b >= 0) {
        const long long c = q_count_bound(b, hist[b]);
        if (b >= pl.b0) cnt += c;
        if (b >= pl.wlo && b <= pl.whi) wcnt += c;
      }
    }
    pl.est = lmin(block_reduce(cnt, Sum<long long>(), 0LL), npos);
    pl.est_win = lmin(block_reduce(wcnt, Sum<long long>(), 0LL), npos);
  }
  return pl;
}

// The fallback (every input, slower): the boundary key K(l) from HBM over the whole row: top-p's
// window of uncertain bins, else radix levels. A: the list (cap keys), B: the scratch.
template <int HIST>
__device__ __forceinline__ u64 fallback_boundary(const RowRef& row, u64* A, u64* B, int flags, int cap,
                                                 const BinPlan& pl, const Cond& cond_pk, const Cond& cond_k,
                                                 bool need_sk, u64 kthr, long long npos, const float* p_ptr,
                                                 double p_val, int pid) {
  u64 kell = 0;
  bool got = false;
  const bool has_minp = flags & F_HAS_MINP;
  const int scap = select_cap_of(flags, cap);  // the fallback's lists are selected whole
  if (HIST == HIST_QSUM && pl.est_win <= scap) {
    long long c0 = 0;
    double m0 = 0.0;
    const u64 ka = static_cast<u64>(pl.wlo) << 52;
    const int nw = fill_range(row, A, scap, ka, static_cast<u64>(pl.whi + 1) << 52, &c0, &m0);
    if (nw > 0 && nw <= scap) {
      MOECOMM_SAMPLE_TRACE(PATH_WINDOW);
      const Pick pk = list_select(A, B, nw, c0, m0, cond_pk);
      // l is in the window: its first entry is kept (the bounds said so; checked exactly here, as
      // a q-sum bin can wrap past 2^32 at V > 2^19) and an entry after l is dropped (or none can be)
      got = cond_pk(c0, m0) && (pk.rank < c0 + nw - 1 || c0 + nw == npos || (has_minp && ka <= kthr));
      kell = pk.key;
    }
  }
  if (!got) {
    MOECOMM_SAMPLE_TRACE(PATH_LEVELS);
    Cond c = cond_pk;
    if (need_sk) {
      const Pick pk = hbm_select(row, A, B, scap, cond_k);
      c.P = top_p_of(flags, p_ptr, p_val, pid) * (pk.mass + static_cast<double>(key_value(pk.key)));
    }
    kell = hbm_select(row, A, B, scap, c).key;
  }
  return kell;
}

// The random stream of output row pid; read at the race, not at the start (registers are short at
// 1024 threads). Seeds and offsets in memory may come from the stream's previous kernel (api's
// torch.randint under capture), which a programmatic launch (_cuda.PDL) lets this kernel start
// before it completes: wait for it first (griddepcontrol.wait returns at once in a plain launch).
__device__ __forceinline__ Rng row_rng(int flags, const long long* seed_ptr, const long long* offset_ptr,
                                       long long seed_val, long long offset_val, int pid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (flags & (F_SEED_TENSOR | F_OFFSET_TENSOR)) asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
  const long long seed = (flags & F_SEED_TENSOR) ? seed_ptr[(flags & F_SEED_PER_ROW) ? pid : 0] : seed_val;
  const long long off = (flags & F_OFFSET_TENSOR) ? offset_ptr[(flags & F_OFFSET_PER_ROW) ? pid : 0] : offset_val;
  return Rng{static_cast<unsigned>(seed), static_cast<unsigned>(static_cast<u64>(seed) >> 32),
             (flags & F_SEED_PER_ROW) ? 0u : static_cast<unsigned>(pid), static_cast<unsigned>(off),
             static_cast<unsigned>(static_cast<u64>(off) >> 32)};
}

// The race over the list's kept entries (K >= klo), this thread's best so far
__device__ __forceinline__ void race_list(const u64* A, int n, u64 klo, const Rng& rng, float& best, int& best_i) {
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const u64 key = A[j];
    if (key >= klo) {
      const int i = key_index(key);
      unsigned r0, r1, r2, r3;
      philox(rng, static_cast<unsigned>(i) >> 2, r0, r1, r2, r3);
      const int lane = i & 3;
      race_update(key_value(key), lane == 0 ? r0 : lane == 1 ? r1 : lane == 2 ? r2 : r3, i, best, best_i);
    }
  }
}

// The race over the row's (slice's) kept tokens from HBM: v > 0 and K >= klo
__device__ __forceinline__ void race_row(const RowRef& row, u64 klo, const Rng& rng, float& best, int& best_i) {
  for_each_quad(row, [&](int q, float4 xq) {
    const float v[4] = {xq.x, xq.y, xq.z, xq.w};
    bool kp[4];
    bool any = false;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      kp[j] = v[j] > 0.0f && make_key(v[j], 4 * q + j) >= klo;
      any = any || kp[j];
    }
    if (any) {  // one Philox call for the quad's four tokens
      unsigned r[4];
      philox(rng, static_cast<unsigned>(q), r[0], r[1], r[2], r[3]);
#pragma unroll
      for (int j = 0; j < 4; ++j)
        if (kp[j]) race_update(v[j], r[j], 4 * q + j, best, best_i);
    }
  });
}

template <int HIST>
__device__ void sample_row(const float* __restrict__ x, const void* rowmap, void* out, unsigned char* valid,
                           float* logprob, const void* k_ptr, const float* p_ptr, const float* minp_ptr,
                           const long long* seed_ptr, const long long* offset_ptr, int V, int num_in_rows,
                           long long stride_x, long long k_val, double p_val, float minp_val, long long seed_val,
                           long long offset_val, int flags, int cap) {
  const int pid = blockIdx.x, t = threadIdx.x, T = blockDim.x;
  const RowArgs ra = row_args(pid, rowmap, k_ptr, p_ptr, minp_ptr, V, num_in_rows, k_val, p_val, minp_val, flags);
  if (!ra.ok) {
    write_row(out, valid, logprob, flags, pid, 0, false, 0.0f);
    return;
  }
  const bool has_k = flags & F_HAS_K, has_p = flags & F_HAS_P, has_minp = flags & F_HAS_MINP;
  auto top_p = [&]() { return top_p_of(flags, p_ptr, p_val, pid); };
  const float* row_ptr = x + ra.in_row * stride_x;
  const RowRef row{row_ptr, V, (V + 3) >> 2, (reinterpret_cast<u64>(row_ptr) & 15) == 0};

  u64* A = reinterpret_cast<u64*>(moecomm_sample_dyn);  // the list: cap keys
  u64* B = A + cap;                                      // scratch: scratch_bytes_of(flags, cap)
  unsigned* hist = reinterpret_cast<unsigned*>(B);       // pass A's bins live in the scratch until the list exists
  MOECOMM_SAMPLE_CLOCK(0);

  // pass A (F_PASS_A_LIST: with the candidates, in the list and the scratch past the bins, no map)
  // pa_list: F_PASS_A_LIST on the q-sum entries (a function of flags: not held in a register)
  auto pa_list = [&]() { return HIST == HIST_QSUM && (flags & F_PASS_A_LIST) != 0; };
  if (HIST != HIST_NONE) {
    for (int b = t; b < NUM_BINS; b += T) hist[b] = 0;
    if (t == 0) {
      s_n = 0;
      s_tau = 1;
    }
    __syncthreads();
  }
  unsigned char* map = reinterpret_cast<unsigned char*>(B) + MAP_OFFSET;  // the sector map, where the scratch has room
  const bool use_map = !pa_list() && (flags & F_SECTOR_MAP) && (row.nq + 1) / 2 <= scratch_bytes_of(flags, cap) - MAP_OFFSET;
  // the candidates' second part: the scratch past the bins (recomputed where used: registers)
  auto cap2_of = [&]() { return (scratch_bytes_of(flags, cap) - MAP_OFFSET) / 8; };
  double s = 0.0;
  float mx = 0.0f, mn = 0.0f;
  int npos_t = 0;
  if (pa_list())
    pass_a_list<HIST>(row, hist, A, cap, B + MAP_OFFSET / 8, cap2_of(), imin(PASS_A_BUDGET, 13 * (cap + cap2_of()) / 16),
                      row.nq, s, mx, mn, npos_t);
  else
    pass_a<HIST>(row, hist, map, use_map, flags, s, mx, mn, npos_t);
  const double S = block_reduce(s, Sum<double>(), 0.0);
  if (t == 0) s_row_sum = S;
  const float M = block_reduce(mx, Max<float>(), 0.0f);
  const float mnr = -block_reduce(-mn, Max<float>(), 0.0f);
  const long long npos = block_reduce(static_cast<long long>(npos_t), Sum<long long>(), 0LL);
  MOECOMM_SAMPLE_CLOCK(1);
  if (!(mnr >= 0.0f) || !(S > 0.0) || !(S < 1.0e300)) {  // a negative value, NaN or +inf, or a zero sum
    write_row(out, valid, logprob, flags, pid, 0, false, 0.0f);
    return;
  }
  // the rule's constants for this row
  const float thr = has_minp ? __fmul_rn(ra.min_p, M) : 0.0f;
  const u64 kthr = has_minp ? static_cast<u64>(__float_as_uint(thr)) << 32 : 0;
  const int bthr = has_minp ? static_cast<int>(__float_as_uint(thr) >> 20) : 0;
  const bool p_all = !has_p || top_p() >= 1.0;
  const long long k_eff = lmin(ra.k, npos);  // ranks of positive tokens run 0 .. npos - 1
  const bool need_sk = (flags & F_TOPK_FIRST) && has_k && !p_all;
  const bool trivial = p_all && k_eff >= npos;  // every positive token passes top-k and top-p
  const Cond cond_k{k_eff, 0.0, false};
  Cond cond_pk{k_eff, p_all ? 0.0 : top_p() * S, !p_all};

  const BinPlan pl = plan_bins<HIST>(hist, k_eff, npos, bthr, need_sk, p_all, cond_pk.P);
  // (the bins are dead from here: the scratch is free)
  const int b0 = pl.b0, whi = pl.whi;
  MOECOMM_SAMPLE_CLOCK(2);
  MOECOMM_SAMPLE_VALUE(12, pl.est);
  MOECOMM_SAMPLE_VALUE(13, b0);

  // the list path: every positive token of bins >= b0, the select, the sufficiency check
  u64 kell = 0;
  bool in_list = false;
  int n = 0;
  if (pl.est <= cap) {
    const u64 ka = static_cast<u64>(b0) << 52;
    const unsigned tb = b0 > 0 ? static_cast<unsigned>(b0) << 20 : 1u;
    const int nc = s_n;  // pass_a_list's candidates (complete: the block_reduce calls synchronised)
    if (pa_list() && s_tau <= static_cast<int>(tb) && nc <= cap + cap2_of()) {  // they hold bins >= b0
      MOECOMM_SAMPLE_TRACE(PATH_PASS_A);
      n = take_candidates<false>(A, B + MAP_OFFSET / 8, cap, nc, tb);
    } else {
      // F_PASS_B_GATHER: the sectors to load gathered into slots in the dead bins (8 KB: 64 ints a warp)
      n = list_above<HIST == HIST_COUNT>(row, A, cap, tb, use_map ? map : nullptr, map_min_of(flags, b0),
                                        (flags & F_PASS_B_REVERSE) != 0, nullptr,
                                        (flags & F_PASS_B_GATHER) ? reinterpret_cast<int*>(B) : nullptr);
    }
    MOECOMM_SAMPLE_CLOCK(3);
    MOECOMM_SAMPLE_VALUE(10, n);
    if (n > 0 && n <= cap) {
      // every token below the list is dropped: the list holds all of them, or only tokens below
      // min_p * max lie below it
      const bool below_dropped = n == npos || (has_minp && ka <= kthr);
      bool good = true;
      if (!trivial) {
        // a select over the whole list needs n keys of scratch: in the lean layout a longer list
        // is selected on its uncertain bins (top-p) or the row takes the fallback
        const int scap = select_cap_of(flags, cap);
        Cond c = cond_pk;
        if (need_sk) {  // top_k_first: top-p on the top-k set's mass
          if (n <= scap) {
            const Pick pk = list_select(A, B, n, 0, 0.0, cond_k);
            good = pk.rank < n - 1 || below_dropped || n >= k_eff;
            c.P = top_p() * (pk.mass + static_cast<double>(key_value(pk.key)));
          } else {
            good = false;
          }
        }
        Pick pk{0, 0, 0.0};
        bool done = false;
        if (HIST == HIST_QSUM && whi < NUM_BINS - 1) {
          // top-p: l lies in the uncertain bins (<= whi); the bins above are summed, not selected
          long long c0 = 0;
          double m0 = 0.0;
          const int nw = split_list(A, n, static_cast<u64>(whi + 1) << 52, B, scap, &c0, &m0);
          MOECOMM_SAMPLE_CLOCK(4);
          MOECOMM_SAMPLE_VALUE(11, nw);
          if (nw > 0 && 2 * nw <= scap && c(c0, m0)) {  // the window's first entry is kept: l is in it
            MOECOMM_SAMPLE_TRACE(PATH_SPLIT);
            pk = nw <= SMALL_MAX ? window_select(B, B + nw, nw, b0, whi - b0 + 1, c0, m0, c)
                                 : list_select(B, B + nw, nw, c0, m0, c);
            done = true;
          }
        }
        if (!done && good && n <= scap) {
          pk = list_select(A, B, n, 0, 0.0, c);
          done = true;
        }
        good = good && done && (pk.rank < n - 1 || below_dropped || n >= k_eff);
        kell = pk.key;
      } else {
        good = below_dropped;
      }
      in_list = good;
      MOECOMM_SAMPLE_CLOCK(5);
    }
  }

  // the fallback: the boundary from HBM (top-p's window of uncertain bins, else radix levels)
  if (!in_list && !trivial) kell = fallback_boundary<HIST>(row, A, B, flags, cap, pl, cond_pk, cond_k, need_sk, kthr, npos,
                                                           p_ptr, p_val, pid);
  if (!in_list && trivial) kell = 0;
  MOECOMM_SAMPLE_CLOCK(6);
  MOECOMM_SAMPLE_VALUE(14, in_list ? 1 : 0);

  // the race over the kept tokens: v > 0 and K >= max(K(l), K(min_p * max))
  const Rng rng = row_rng(flags, seed_ptr, offset_ptr, seed_val, offset_val, pid);
  const u64 klo = umax64(kell, kthr);
  MOECOMM_SAMPLE_BOUNDARY(klo);
  float best = -1.0f;
  int best_i = 0x7fffffff;
  MOECOMM_SAMPLE_TRACE(in_list ? PATH_LIST : PATH_HBM_RACE);
  if (in_list)
    race_list(A, n, klo, rng, best, best_i);
  else
    race_row(row, klo, rng, best, best_i);
  MOECOMM_SAMPLE_CLOCK(7);
  block_argmax(best, best_i);
  const bool found = best_i != 0x7fffffff;
  float lp = 0.0f;
  if (t == 0 && found && (flags & F_LOGPROB))
    lp = static_cast<float>(log(static_cast<double>(row_ptr[best_i])) - log(s_row_sum));
  write_row(out, valid, logprob, flags, pid, found ? best_i : 0, found, lp);
  MOECOMM_SAMPLE_CLOCK(8);
}

// ----------------------------------------------------------------------------- one row, split over a cluster
//
// A row over a thread-block cluster of C blocks (C <= 16 here; the _split8 entries: _cuda.split_blocks
// picks them for batches of at most 128 / C rows, where single blocks leave SMs idle: one block
// streams a 512 KB row at ~10 GB/s, so B1 took ~57 us). Block `rank` of the cluster owns quads
// [rank * chunk, (rank + 1) * chunk) of the row (chunk: a multiple of 32 quads). The algorithm and
// its random numbers are sample_row's, token for token; only who does what changes:
//   pass A   each block over its slice: partial S, max, min, count, its bins and its slice's
//            sector map. cluster barrier 1. Every block sums all blocks' partials (distributed
//            shared memory, in rank order: the same bits in every block) and bins, and runs the plan
//            itself (the same b0 / window everywhere, no further exchange).
//   pass B   each block lists its slice's tokens of bins >= b0 in its own list (for the race), and
//            appends those below top-p's window top (all of them without one) to rank 0's gather
//            list through distributed shared memory (one remote atomic a warp); the ones above are
//            counted and summed. cluster barrier 2.
//   select   rank 0 alone, on the gather list (top-p: its uncertain bins, ~0.5-1K keys), with the
//            count and mass above summed in rank order; where that does not settle the boundary
//            (a list overflow, an odd window), rank 0 runs the single block's fallback over the
//            whole row. cluster barrier 3.
//   race     every block over its own list (or its slice of the row, after a fallback), its winner
//            written into rank 0's shared memory; cluster barrier 4; rank 0 picks (ties to the lowest
//            index) and writes the row.
// Four cluster barriers for pass A and pass B C times shorter; the plan and the select are as long
// as a single block's. Measured (H200, profile_sampling, top-p 0.9 B1 V128256, C = 8, us): pass A
// 4.1, barrier 1 0.6, totals + bins + plan 6.9, pass B 4.7, barrier 2 0.6, rank 0's select of the
// ~680-key gather list 7.4 (the others wait at barrier 3), race 1.5, barrier 4 + write 0.6: 26.9 of
// the 33.4 us a launch; the plan and the select are now half of it. No global memory is shared, no
// spin: a cluster's blocks are co-scheduled by the hardware. A block's shared memory is read by the
// others only between barriers 1 and 2 (its partials), rank 0's until barrier 4, and no block exits
// before the last access to its shared memory (every block passes all four barriers).

constexpr int MAX_CLUSTER = 16;
constexpr int MAX_SPLIT_UNROLL = 8;  // the bins' remote loads in flight a thread

struct SplitShared {
  double sum;  // this block's pass-A partials
  float max, min;
  long long npos;
  int n;  // this block's pass-B list, and its tokens above the gather list's top
  long long ac;
  double am;
  int gn;  // rank 0: the gather list's length (every block appends to it)
  int gl;  // this block's staged gather keys (Gather)
  int nc, tau;  // F_PASS_A_LIST: this block's candidates and their threshold (INT_MAX: overflowed)
  int tot_tau;  // the cluster's largest tau (each block its own copy)
  int in_list;  // rank 0: the boundary, and whether the blocks' lists hold the kept set
  u64 kell;
  float best_key[MAX_CLUSTER];  // rank 0: each block's race winner
  int best_idx[MAX_CLUSTER];
  double tot_sum;  // the cluster's totals (each block its own copy)
  float tot_max, tot_min;
  long long tot_npos, tot_n, tot_ac;
  double tot_am;
  int over;
};
__shared__ SplitShared s_split;

// The split layout of a block's scratch B (scratch_bytes_of(flags, cap) bytes): [this block's pass-A
// bins, 8 KB | the sector map (the whole row's bytes at MAP_OFFSET; a block writes and reads its
// slice's) | the cluster's summed bins, 8 KB | the gather list (rank 0's is used)]; a select on the
// gather list takes [0, gather) as its scratch. The map only where >= 4 KB of gather list remain.
__device__ __forceinline__ int split_gather_offset(int flags, int cap, int nq, bool* use_map) {
  const int with_map = ((MAP_OFFSET + (nq + 1) / 2 + 15) & ~15) + NUM_BINS * 4;
  *use_map = (flags & F_SECTOR_MAP) && scratch_bytes_of(flags, cap) - with_map >= 4096;
  return *use_map ? with_map : MAP_OFFSET + NUM_BINS * 4;
}

// F_SPLIT_SLICE: this block's copy of its slice (chunk quads, 16 bytes each) after the scratch;
// _cuda.py sets the flag (and no sector map: pass B then reads shared memory) where it fits.
__device__ __forceinline__ float4* split_slice(u64* B, int flags, int cap) {
  return (flags & F_SPLIT_SLICE) ? reinterpret_cast<float4*>(reinterpret_cast<unsigned char*>(B) + scratch_bytes_of(flags, cap))
                                 : nullptr;
}

// The cluster's summed bins (8 KB below the gather list)
__device__ __forceinline__ unsigned* split_hsum(u64* B, int flags, int cap, int nq) {
  bool use_map = false;
  const int goff = split_gather_offset(flags, cap, nq, &use_map);
  return reinterpret_cast<unsigned*>(reinterpret_cast<unsigned char*>(B) + goff) - NUM_BINS;
}

template <int HIST>
__device__ __noinline__ void sample_row_split(const float* __restrict__ x, const void* rowmap, void* out,
                                              unsigned char* valid, float* logprob, const void* k_ptr,
                                              const float* p_ptr, const float* minp_ptr, const long long* seed_ptr,
                                              const long long* offset_ptr, int V, int num_in_rows, long long stride_x,
                                              long long k_val, double p_val, float minp_val, long long seed_val,
                                              long long offset_val, int flags, int cap) {
  const int C = static_cast<int>(cluster_size()), rank = static_cast<int>(cluster_rank());
  const int pid = blockIdx.x / C, t = threadIdx.x, T = blockDim.x, lane = t & 31, w = t >> 5;
  const RowArgs ra = row_args(pid, rowmap, k_ptr, p_ptr, minp_ptr, V, num_in_rows, k_val, p_val, minp_val, flags);
  if (!ra.ok) {  // the same answer in every block, before any block's shared memory is read
    if (rank == 0) write_row(out, valid, logprob, flags, pid, 0, false, 0.0f);
    return;
  }
  const bool has_k = flags & F_HAS_K, has_p = flags & F_HAS_P, has_minp = flags & F_HAS_MINP;
  auto top_p = [&]() { return top_p_of(flags, p_ptr, p_val, pid); };
  const float* row_ptr = x + ra.in_row * stride_x;
  const int nq = (V + 3) >> 2;
  const bool vec = (reinterpret_cast<u64>(row_ptr) & 15) == 0;
  const int chunk = ((nq + C - 1) / C + 31) & ~31;
  const int q0 = imin(rank * chunk, nq);
  const RowRef mine{row_ptr, V, imin(q0 + chunk, nq), vec, q0};  // this block's slice

  u64* A = reinterpret_cast<u64*>(moecomm_sample_dyn);  // this block's list: cap keys
  u64* B = A + cap;                                      // scratch (split layout above)
  unsigned* hist = reinterpret_cast<unsigned*>(B);
  unsigned char* map = reinterpret_cast<unsigned char*>(B) + MAP_OFFSET;
  bool use_map = false;
  // (the gather list G at goff, its capacity gcap; the summed bins just below it: recomputed where
  // used, from flags, cap and nq: registers are short at 1024 threads)
  split_gather_offset(flags, cap, nq, &use_map);
  MOECOMM_SAMPLE_CLOCK(0);  // profile_sampling.SPLIT_PHASES: slots 1-9 end its phases

  // pass A over the slice (F_PASS_A_LIST: with the slice's candidates in this block's list), the
  // cluster's totals and bins
  // pa_list: F_PASS_A_LIST on the q-sum entries (a function of flags: not held in a register)
  auto pa_list = [&]() { return HIST == HIST_QSUM && (flags & F_PASS_A_LIST) != 0; };
  if (pa_list()) use_map = false;
  if (HIST != HIST_NONE) {
    for (int b = t; b < NUM_BINS; b += T) hist[b] = 0;
    if (t == 0) {
      s_n = 0;
      s_tau = 1;
    }
    __syncthreads();
  }
  {
    double s = 0.0;
    float mx = 0.0f, mn = 0.0f;
    int npos_t = 0;
    if (pa_list())
      pass_a_list<HIST>(mine, hist, A, cap, nullptr, 0, PASS_A_BUDGET, nq, s, mx, mn, npos_t);
    else
      pass_a<HIST>(mine, hist, map, use_map, flags, s, mx, mn, npos_t, split_slice(B, flags, cap));
    s = block_reduce(s, Sum<double>(), 0.0);
    mx = block_reduce(mx, Max<float>(), 0.0f);
    mn = -block_reduce(-mn, Max<float>(), 0.0f);
    const long long np = block_reduce(static_cast<long long>(npos_t), Sum<long long>(), 0LL);
    if (t == 0) {
      s_split.sum = s;
      s_split.max = mx;
      s_split.min = mn;
      s_split.npos = np;
      s_split.gn = 0;  // rank 0's is the one used: reset before barrier 1, appended to after it
      s_split.nc = s_n;
      s_split.tau = s_n <= cap ? s_tau : 0x7fffffff;  // overflowed candidates cover nothing
    }
  }
  MOECOMM_SAMPLE_CLOCK(1);
  cluster_sync();  // 1: every block's partials and bins are written (and every block has started)
  MOECOMM_SAMPLE_CLOCK(2);
  if (w == 0) {  // the totals in rank order (a fixed tree: the same bits in every block)
    double s = 0.0;
    float mx = 0.0f, mn = 0.0f;
    long long np = 0;
    int tau = 0;
    if (lane < C) {
      const SplitShared* o = cluster_map(&s_split, lane);
      s = o->sum;
      mx = o->max;
      mn = o->min;
      np = o->npos;
      tau = o->tau;
    }
    tau = warp_reduce(tau, Max<int>());
    s = warp_reduce(s, Sum<double>());
    mx = warp_reduce(mx, Max<float>());
    mn = -warp_reduce(-mn, Max<float>());
    np = warp_reduce(np, Sum<long long>());
    if (lane == 0) {
      s_split.tot_sum = s;
      s_split.tot_max = mx;
      s_split.tot_min = mn;
      s_split.tot_npos = np;
      s_split.tot_tau = tau;
    }
  }
  if (HIST != HIST_NONE) {
    unsigned* hsum = split_hsum(B, flags, cap, nq);
    for (int b = t; b < NUM_BINS; b += T) {
      // the C remote loads issued back to back (one latency of distributed shared memory, not C);
      // integer sums: the single block's bins exactly
      unsigned v[MAX_SPLIT_UNROLL];
#pragma unroll
      for (int r = 0; r < MAX_SPLIT_UNROLL; ++r) v[r] = r < C ? cluster_map(hist, r)[b] : 0u;
      unsigned acc = 0;
#pragma unroll
      for (int r = 0; r < MAX_SPLIT_UNROLL; ++r) acc += v[r];
      for (int r = MAX_SPLIT_UNROLL; r < C; ++r) acc += cluster_map(hist, r)[b];
      hsum[b] = acc;
    }
  }
  __syncthreads();
  MOECOMM_SAMPLE_CLOCK(16);  // the totals and the summed bins (the plan follows)
  const double S = s_split.tot_sum;
  const float M = s_split.tot_max;
  const long long npos = s_split.tot_npos;
  if (!(s_split.tot_min >= 0.0f) || !(S > 0.0) || !(S < 1.0e300)) {  // a negative value, NaN or +inf, or a zero sum
    if (rank == 0) write_row(out, valid, logprob, flags, pid, 0, false, 0.0f);
    cluster_sync();  // the others have read this block's partials
    return;
  }
  const float thr = has_minp ? __fmul_rn(ra.min_p, M) : 0.0f;
  const u64 kthr = has_minp ? static_cast<u64>(__float_as_uint(thr)) << 32 : 0;
  const int bthr = has_minp ? static_cast<int>(__float_as_uint(thr) >> 20) : 0;
  const bool p_all = !has_p || top_p() >= 1.0;
  const long long k_eff = lmin(ra.k, npos);
  const bool need_sk = (flags & F_TOPK_FIRST) && has_k && !p_all;
  const bool trivial = p_all && k_eff >= npos;
  const Cond cond_k{k_eff, 0.0, false};
  const Cond cond_pk{k_eff, p_all ? 0.0 : top_p() * S, !p_all};
  const BinPlan pl = plan_bins<HIST>(split_hsum(B, flags, cap, nq), k_eff, npos, bthr, need_sk, p_all, cond_pk.P);
  // top-p's window top: the listed tokens of bins above whi are certainly kept (counted, summed);
  // not where min-p lists none of the window (b0 > whi: the whole list is gathered)
  const bool windowed = HIST == HIST_QSUM && !trivial && pl.whi < NUM_BINS - 1 && pl.b0 <= pl.whi;
  const bool try_list = pl.est <= cap;  // the same in every block
  MOECOMM_SAMPLE_CLOCK(3);
  MOECOMM_SAMPLE_VALUE(12, pl.est);
  MOECOMM_SAMPLE_VALUE(13, pl.b0);

  // pass B over the slice
  int n_mine = 0;
  if (try_list) {
    bool map_room = false;  // (use_map stays: off on the F_PASS_A_LIST path, whose pass A wrote no map)
    const int goff = split_gather_offset(flags, cap, nq, &map_room);
    // staged in this block's summed bins (dead after its plan: 1024 keys), then to rank 0's list
    if (t == 0) s_split.gl = 0;  // (list_above / take_candidates synchronise before appending)
    Gather g{reinterpret_cast<u64*>(split_hsum(B, flags, cap, nq)), NUM_BINS * 4 / 8, &s_split.gl,
             cluster_map(B + goff / 8, 0), (scratch_bytes_of(flags, cap) - goff) / 8, cluster_map(&s_split.gn, 0),
             windowed ? (pl.whi + 1) << 20 : 0x7fffffff, 0, 0.0};
    const unsigned tb = pl.b0 > 0 ? static_cast<unsigned>(pl.b0) << 20 : 1u;
    if (pa_list() && s_split.tot_tau <= static_cast<int>(tb)) {  // every block's candidates hold bins >= b0
      MOECOMM_SAMPLE_TRACE(PATH_PASS_A);
      n_mine = take_candidates<true>(A, nullptr, cap, s_split.nc, tb, &g);
    } else {
      RowRef listed = mine;  // F_SPLIT_SLICE: from this block's copy of the slice
      listed.s = split_slice(B, flags, cap);
      n_mine = list_above<HIST == HIST_COUNT, true>(listed, A, cap, tb, use_map ? map : nullptr, map_min_of(flags, pl.b0),
                                                   (flags & F_PASS_B_REVERSE) != 0, &g);
    }
    if (t == 0) {
      s_split.n = n_mine;
      s_split.ac = g.ac;
      s_split.am = g.am;
    }
  } else if (t == 0) {
    s_split.n = 0;
    s_split.ac = 0;
    s_split.am = 0.0;
  }
  MOECOMM_SAMPLE_CLOCK(4);
  MOECOMM_SAMPLE_VALUE(10, n_mine);
  cluster_sync();  // 2: every list and every append to rank 0's gather list done
  MOECOMM_SAMPLE_CLOCK(5);

  if (rank == 0) {
    MOECOMM_SAMPLE_TRACE(PATH_CLUSTER);
    if (w == 0) {  // the lists' totals in rank order
      long long n = 0, ac = 0;
      double am = 0.0;
      int over = 0;
      if (lane < C) {
        const SplitShared* o = cluster_map(&s_split, lane);
        n = o->n;
        ac = o->ac;
        am = o->am;
        over = o->n > cap ? 1 : 0;
      }
      n = warp_reduce(n, Sum<long long>());
      ac = warp_reduce(ac, Sum<long long>());
      am = warp_reduce(am, Sum<double>());
      over = __ballot_sync(FULL, over != 0) != 0u ? 1 : 0;
      if (lane == 0) {
        s_split.tot_n = n;
        s_split.tot_ac = ac;
        s_split.tot_am = am;
        s_split.over = over;
      }
    }
    __syncthreads();
    MOECOMM_SAMPLE_CLOCK(17);  // the lists' totals (the select follows)
    const long long n = s_split.tot_n;
    u64 kell = 0;
    bool in_list = false;
    if (try_list && n > 0 && !s_split.over) {
      const u64 ka = static_cast<u64>(pl.b0) << 52;
      const bool below_dropped = n == npos || (has_minp && ka <= kthr);
      if (!trivial) {
        const int ng = s_split.gn;
        bool use_map2 = false;
        const int goff = split_gather_offset(flags, cap, nq, &use_map2);
        u64* G = B + goff / 8;  // rank 0's gather list; a select on it takes B's front as its scratch
        bool good = ng > 0 && ng <= imin((scratch_bytes_of(flags, cap) - goff) / 8, goff / 8);
        Cond c = cond_pk;
        Pick pk{0, 0, 0.0};
        if (good && need_sk) {  // top_k_first: top-p on the top-k set's mass (the gather list is the whole list)
          const Pick pkk = list_select(G, B, ng, 0, 0.0, cond_k);
          good = pkk.rank < n - 1 || below_dropped || n >= k_eff;
          c.P = top_p() * (pkk.mass + static_cast<double>(key_value(pkk.key)));
        }
        const long long c0 = s_split.tot_ac;
        const double m0 = s_split.tot_am;
        good = good && c(c0, m0);  // the gather list's first entry is kept: l is in it
        if (good) {
          if (windowed) MOECOMM_SAMPLE_TRACE(PATH_SPLIT);
          pk = windowed && ng <= SMALL_MAX ? window_select(G, B, ng, pl.b0, pl.whi - pl.b0 + 1, c0, m0, c)
                                           : list_select(G, B, ng, c0, m0, c);
        }
        MOECOMM_SAMPLE_CLOCK(18);  // the select
        in_list = good && (pk.rank < n - 1 || below_dropped || n >= k_eff);
        kell = pk.key;
      } else {
        in_list = below_dropped;
      }
    }
    if (!in_list && !trivial) {
      const RowRef row{row_ptr, V, nq, vec};  // the whole row, by rank 0 alone
      kell = fallback_boundary<HIST>(row, A, B, flags, cap, pl, cond_pk, cond_k, need_sk, kthr, npos, p_ptr, p_val, pid);
    }
    if (!in_list && trivial) kell = 0;
    MOECOMM_SAMPLE_TRACE(in_list ? PATH_LIST : PATH_HBM_RACE);
    if (t == 0) {
      s_split.kell = kell;
      s_split.in_list = in_list ? 1 : 0;
    }
    MOECOMM_SAMPLE_CLOCK(6);
    MOECOMM_SAMPLE_VALUE(11, s_split.gn);
    MOECOMM_SAMPLE_VALUE(14, in_list ? 1 : 0);
  }
  cluster_sync();  // 3: rank 0's boundary written
  MOECOMM_SAMPLE_CLOCK(7);

  {
    const SplitShared* r0 = cluster_map(&s_split, 0);
    const u64 kell = r0->kell;
    const bool in_list = r0->in_list != 0;
    const Rng rng = row_rng(flags, seed_ptr, offset_ptr, seed_val, offset_val, pid);
    const u64 klo = umax64(kell, kthr);
    MOECOMM_SAMPLE_BOUNDARY(klo);
    float best = -1.0f;
    int best_i = 0x7fffffff;
    if (in_list) {
      race_list(A, n_mine, klo, rng, best, best_i);
    } else {
      RowRef raced = mine;
      raced.s = split_slice(B, flags, cap);
      race_row(raced, klo, rng, best, best_i);
    }
    block_argmax(best, best_i);
    MOECOMM_SAMPLE_CLOCK(8);
    if (t == 0) {
      SplitShared* d = cluster_map(&s_split, 0);
      d->best_key[rank] = best;
      d->best_idx[rank] = best_i;
    }
  }
  cluster_sync();  // 4: every block's winner in rank 0's shared memory
  if (rank == 0 && t == 0) {
    float best = -1.0f;
    int best_i = 0x7fffffff;
    for (int r = 0; r < C; ++r) {
      const float k = s_split.best_key[r];
      const int i = s_split.best_idx[r];
      if (k > best || (k == best && i < best_i)) {
        best = k;
        best_i = i;
      }
    }
    const bool found = best_i != 0x7fffffff;
    float lp = 0.0f;
    if (found && (flags & F_LOGPROB)) lp = static_cast<float>(log(static_cast<double>(row_ptr[best_i])) - log(s_split.tot_sum));
    write_row(out, valid, logprob, flags, pid, found ? best_i : 0, found, lp);
  }
  MOECOMM_SAMPLE_CLOCK(9);
}

}  // namespace sampling
}  // namespace moecomm

// Entry points, one per pass-A histogram (moecomm/sampling/_cuda.py picks): top-k given -> counts;
// top-p without top-k -> q-sums; min-p alone -> none. Arguments as sample_row's; grid = output rows,
// block = 1024 threads (the _paired entries: 512), dynamic shared memory = cap keys + the scratch
// (scratch_bytes_of: max(cap keys, 24 KB), or the lean layout's KB from the flags).
#define MOECOMM_SAMPLE_PARAMS                                                                               \
  const float *x, const void *rowmap, void *out, unsigned char *valid, float *logprob, const void *k_ptr, \
      const float *p_ptr, const float *minp_ptr, const long long *seed_ptr, const long long *offset_ptr, int V, \
      int num_in_rows, long long stride_x, long long k_val, double p_val, float minp_val, long long seed_val, \
      long long offset_val, int flags, int cap
#define MOECOMM_SAMPLE_ARGS                                                                                  \
  x, rowmap, out, valid, logprob, k_ptr, p_ptr, minp_ptr, seed_ptr, offset_ptr, V, num_in_rows, stride_x, k_val, \
      p_val, minp_val, seed_val, offset_val, flags, cap

// Each entry is its own translation unit when launched (_cuda.entry_flags: -DMOECOMM_SAMPLE_ONLY
// -DMOECOMM_SAMPLE_ONLY_<entry>): the front end then generates the code of one entry instead of
// eight (the whole file's PTX took ~5x one entry's on the 2-core CPU machine), and ptxas sees only
// that entry. Without MOECOMM_SAMPLE_ONLY: every entry (the tests' whole build).
#define MOECOMM_SAMPLE_ENTRY(name, hist, threads, blocks_per_sm)                                      \
  extern "C" __global__ void __launch_bounds__(threads, blocks_per_sm) name(MOECOMM_SAMPLE_PARAMS) { \
    moecomm::sampling::sample_row<moecomm::sampling::hist>(MOECOMM_SAMPLE_ARGS);                      \
  }

#if !defined(MOECOMM_SAMPLE_ONLY) || defined(MOECOMM_SAMPLE_ONLY_moecomm_sample_probs_count)
MOECOMM_SAMPLE_ENTRY(moecomm_sample_probs_count, HIST_COUNT, 1024, 1)
#endif
#if !defined(MOECOMM_SAMPLE_ONLY) || defined(MOECOMM_SAMPLE_ONLY_moecomm_sample_probs_qsum)
MOECOMM_SAMPLE_ENTRY(moecomm_sample_probs_qsum, HIST_QSUM, 1024, 1)
#endif
#if !defined(MOECOMM_SAMPLE_ONLY) || defined(MOECOMM_SAMPLE_ONLY_moecomm_sample_probs_none)
MOECOMM_SAMPLE_ENTRY(moecomm_sample_probs_none, HIST_NONE, 1024, 1)
#endif
// Paired: blocks of 512 threads, two an SM (the same 64 registers a thread; a list of at most
// PAIRED_CAPACITY keys so that both blocks' shared memory fits), for batches of at least half a
// row an SM (_cuda.PAIRED_MIN_ROWS_PER_SM): over many rows one block's memory-bound pass A overlaps
// the other's issue-bound list and select; at B128 on 132 SMs they won too (H200, top-p V128256:
// 82 us against 99 single; top-k 50 + top-p: 60 against 62), where most SMs hold one block.
#if !defined(MOECOMM_SAMPLE_ONLY) || defined(MOECOMM_SAMPLE_ONLY_moecomm_sample_probs_count_paired)
MOECOMM_SAMPLE_ENTRY(moecomm_sample_probs_count_paired, HIST_COUNT, 512, 2)
#endif
#if !defined(MOECOMM_SAMPLE_ONLY) || defined(MOECOMM_SAMPLE_ONLY_moecomm_sample_probs_qsum_paired)
MOECOMM_SAMPLE_ENTRY(moecomm_sample_probs_qsum_paired, HIST_QSUM, 512, 2)
#endif
#if !defined(MOECOMM_SAMPLE_ONLY) || defined(MOECOMM_SAMPLE_ONLY_moecomm_sample_probs_none_paired)
MOECOMM_SAMPLE_ENTRY(moecomm_sample_probs_none_paired, HIST_NONE, 512, 2)
#endif

// Split: a row over a cluster of 8 blocks of 1024 threads (sample_row_split; grid = rows x 8), for
// batches of at most 16 rows, which leave SMs idle (_cuda.split_blocks). The body reads the cluster
// size at run time, so clusters of 2 or 4 are one line each here (and one in _cuda.SPLIT_SIZES):
// each entry is its own build, compiled on its first launch (entry_flags), so an entry not launched
// costs nothing. No entry
// for min-p alone (nothing to select: one pass of the race).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define MOECOMM_CLUSTER_DIMS(c)
#else
#define MOECOMM_CLUSTER_DIMS(c) __cluster_dims__(c, 1, 1)
#endif
#define MOECOMM_SAMPLE_SPLIT_ENTRY(name, hist, cluster)                                                   \
  extern "C" __global__ void MOECOMM_CLUSTER_DIMS(cluster) __launch_bounds__(1024, 1) name(MOECOMM_SAMPLE_PARAMS) { \
    moecomm::sampling::sample_row_split<moecomm::sampling::hist>(MOECOMM_SAMPLE_ARGS);                    \
  }

#if !defined(MOECOMM_SAMPLE_ONLY) || defined(MOECOMM_SAMPLE_ONLY_moecomm_sample_probs_count_split8)
MOECOMM_SAMPLE_SPLIT_ENTRY(moecomm_sample_probs_count_split8, HIST_COUNT, 8)
#endif
#if !defined(MOECOMM_SAMPLE_ONLY) || defined(MOECOMM_SAMPLE_ONLY_moecomm_sample_probs_qsum_split8)
MOECOMM_SAMPLE_SPLIT_ENTRY(moecomm_sample_probs_qsum_split8, HIST_QSUM, 8)
#endif
