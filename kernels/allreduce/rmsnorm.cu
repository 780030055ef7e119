// All-reduce + residual add + RMSNorm in one kernel (one-shot reduction), the end of every attention
// and MoE block under tensor parallelism:
//
//     a        = sum over s of staging_s[row, :]             (rank order, fp32, rounded to dtype:
//                                                             exactly the all-reduce's output)
//     res_new  = round(float(a) + float(residual[row, :]))   (written to residual_out)
//     out      = round(float(res_new) * rsqrt(mean(float(res_new)^2) + eps) * float(weight))
//
// so the new residual is bit-exact against all-reduce followed by the add (the reference), and out
// differs from torch's RMSNorm only by the order of the row's sum of squares and rsqrtf (a test's
// tolerance table). Every rank computes the same rows in the same order: bit-identical across ranks.
//
// Work split: block b handles rows b, b + gridDim.x, ...; its threads walk the row in 16-byte packs
// (vec = 1: hidden % PACK == 0 and every pointer 16-byte aligned, the host checks) or elements
// (vec = 0). The row's sum of squares: per-thread partials, warp shuffles, then warp 0 adds the
// warps' sums in warp order (deterministic). Pass 2 re-reads res_new from residual_out: the thread
// that wrote an element reads it back (its own write, L1/L2 resident for hidden <= 16 K).
// residual_out may be residual (in place): each element is read, then written, by one thread.
//
// Synchronisation, layout, residency and blockIdx.y (the rank): as oneshot.cu. residual, residual_out
// and out of rank y are at + y * stride elements (the host lays virtual ranks out as [W, rows, hidden]).
// Napkin math: like one-shot (W * rows * hidden read) plus 2 reads and 2 writes of a row locally.
//
// Staging inside the kernel (x != nullptr; rank y's input at x + y * stride, aligned as the vector
// path needs): block b first copies the rows it will read from every rank (its rows b, b +
// gridDim.x, ...) into its staging; the start barrier publishes them (oneshot.cu's argument).
//
// Two-shot variant (moecomm_ar_rmsnorm_twoshot_*), for inputs past the one-shot threshold: the rows
// split in W shards of ceil(rows / W); rank r reduces shard r only (its block b: the shard's rows
// b, b + gridDim.x, ...), adds the residual, writes the new residual to residual_out AND over its
// own staging (in place: in this phase only rank r reads shard r of rank r's staging), normalises
// it (out), and stores the row's 1 / rms in its buffer's inv slots (sync.cuh: INV_OFFSET, one fp32
// per row of the shard, so at most MAX_NORM_ROWS rows a shard: the host checks). Mid barrier. Then
// rank r copies every other shard's new residual from its owner's staging into residual_out and
// computes out from it with the owner's 1 / rms, by the same expression the owner used: so out and
// the new residual are bit-identical on every rank, and equal to the one-shot variant's (same sum
// order, same row sum of squares: one block per row, the same thread mapping). Block b of the
// gathering rank reads exactly the rows block b of the owner wrote (the same rule on every rank).
// Staging copy (x != nullptr): block b copies, of every shard, the rows block b of its owner reads.
// A row's residual is read by its owner only: the variants agree when the residual is the same on
// every rank (replicated, as under tensor parallelism: what the op is for).
// Napkin math: each rank reads (W - 1) / W * rows * hidden * 2 over the links (one-shot: W - 1
// times rows * hidden), so at 8 ranks and T 128 x H 7168 bf16 (1.8 MB) 3.2 MB instead of 12.8 MB.

#include "../common/dtypes.cuh"
#include "sync.cuh"

namespace moecomm {
namespace ar {

__device__ __forceinline__ float block_sum(float v, float* s_warp) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, num_warps = (blockDim.x + 31) >> 5;
  if (lane == 0) s_warp[warp] = v;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.0f;
    for (int w = 0; w < num_warps; ++w) t += s_warp[w];
    s_warp[32] = t;
  }
  __syncthreads();
  const float total = s_warp[32];
  __syncthreads();  // s_warp is reused by the next row
  return total;
}

__device__ __forceinline__ float* inv_ptr(char* buf) { return reinterpret_cast<float*>(buf + INV_OFFSET); }

// The block copies row `row` of this rank's input into its staging (plain loads: the input was
// written by earlier work on this stream).
template <typename raw, int PACK>
__device__ __forceinline__ void copy_row(const raw* x, raw* mine, long long row, long long hidden) {
  const long long base = row * hidden, groups = hidden / PACK;
  for (long long g = threadIdx.x; g < groups; g += blockDim.x) {
    if constexpr (PACK > 1) {
      reinterpret_cast<Pack16*>(mine + base)[g] = reinterpret_cast<const Pack16*>(x + base)[g];
    } else {
      mine[base + g] = x[base + g];
    }
  }
}

// Row `row` summed over the W ranks' staging (rank order, fp32, rounded: the all-reduce's output),
// plus the residual: the new residual goes to residual_out (and over `keep`, this rank's staging, in
// the two-shot variant). Returns the block's sum of squares of the new residual row (block_sum).
template <typename T, int PACK>
__device__ __forceinline__ float add_row(const Block& s, int world_size, const typename T::raw* residual,
                                         typename T::raw* residual_out, typename T::raw* keep, long long row,
                                         long long hidden, float* s_warp) {
  using raw = typename T::raw;
  const long long base = row * hidden, groups = hidden / PACK;  // PACK elements per thread step
  float ss = 0.0f;
  for (long long g = threadIdx.x; g < groups; g += blockDim.x) {
    const long long i = base + g * PACK;
    float acc[PACK];
    alignas(16) raw res[PACK];
    if constexpr (PACK > 1) {
      for (int r = 0; r < world_size; ++r) {
        Pack16 v = ld_volatile16(staging<raw>(s.bufs[r]) + i);
        const raw* e = reinterpret_cast<const raw*>(&v);
#pragma unroll
        for (int j = 0; j < PACK; ++j) acc[j] = r == 0 ? T::load(e[j]) : acc[j] + T::load(e[j]);
      }
      *reinterpret_cast<Pack16*>(res) = *reinterpret_cast<const Pack16*>(residual + i);
    } else {
      acc[0] = T::load(ld_volatile(staging<raw>(s.bufs[0]) + i));
      for (int r = 1; r < world_size; ++r) acc[0] += T::load(ld_volatile(staging<raw>(s.bufs[r]) + i));
      res[0] = residual[i];
    }
    alignas(16) raw nr[PACK];
#pragma unroll
    for (int j = 0; j < PACK; ++j) {
      const float a = T::load(T::store(acc[j]));  // the all-reduce's rounded output
      nr[j] = T::store(a + T::load(res[j]));
      const float f = T::load(nr[j]);
      ss += f * f;
    }
    if constexpr (PACK > 1) {
      *reinterpret_cast<Pack16*>(residual_out + i) = *reinterpret_cast<const Pack16*>(nr);
      if (keep != nullptr) *reinterpret_cast<Pack16*>(keep + i) = *reinterpret_cast<const Pack16*>(nr);
    } else {
      residual_out[i] = nr[0];
      if (keep != nullptr) keep[i] = nr[0];
    }
  }
  return block_sum(ss, s_warp);
}

// out[row] = new residual * inv * weight. `from` holds the new residual row: residual_out (this
// thread's own writes) or, in the two-shot gather, the owner's staging (peer memory: volatile
// loads), then also copied to copy_to (residual_out). The expression is the same in every use, so
// the owner and the gatherers round alike.
template <typename T, int PACK>
__device__ __forceinline__ void norm_row(const typename T::raw* from, bool peer, typename T::raw* copy_to,
                                         typename T::raw* out, const typename T::raw* weight, long long row,
                                         long long hidden, float inv) {
  using raw = typename T::raw;
  const long long base = row * hidden, groups = hidden / PACK;
  for (long long g = threadIdx.x; g < groups; g += blockDim.x) {
    const long long i = base + g * PACK;
    alignas(16) raw nr[PACK];
    alignas(16) raw w[PACK];
    alignas(16) raw o[PACK];
    if constexpr (PACK > 1) {
      *reinterpret_cast<Pack16*>(nr) = peer ? ld_volatile16(from + i) : *reinterpret_cast<const Pack16*>(from + i);
      *reinterpret_cast<Pack16*>(w) = *reinterpret_cast<const Pack16*>(weight + g * PACK);
      if (copy_to != nullptr) *reinterpret_cast<Pack16*>(copy_to + i) = *reinterpret_cast<const Pack16*>(nr);
    } else {
      nr[0] = peer ? ld_volatile(from + i) : from[i];
      w[0] = weight[g];
      if (copy_to != nullptr) copy_to[i] = nr[0];
    }
#pragma unroll
    for (int j = 0; j < PACK; ++j) o[j] = T::store(T::load(nr[j]) * inv * T::load(w[j]));
    if constexpr (PACK > 1) {
      *reinterpret_cast<Pack16*>(out + i) = *reinterpret_cast<const Pack16*>(o);
    } else {
      out[i] = o[0];
    }
  }
}

// Rows of at most CACHE * blockDim.x packs (hidden <= 8192 bf16 / 4096 fp32 at 512 threads: every
// model shape of the benchmark), vector path: the fused row in registers. Each thread loads its
// residual and weight packs first, then the W ranks' packs 4 ranks x CACHE packs at a time (8
// independent 16-byte loads in flight per thread, instead of one load then its add), keeps the new
// residual in registers for the norm (no read-back of residual_out), and stores out. The sums run in
// the same order as add_row + norm_row (rank order per element; the thread's packs in g order for
// the sum of squares), so a row gives the same bits on either path. Returns the row's 1 / rms.
constexpr int CACHE = 2;

template <typename T, int PACK>
__device__ __forceinline__ float fused_row_cached(const Block& s, int world_size, const typename T::raw* residual,
                                                  typename T::raw* residual_out, typename T::raw* keep,
                                                  typename T::raw* out, const typename T::raw* weight, long long row,
                                                  long long hidden, float eps, float* s_warp) {
  using raw = typename T::raw;
  constexpr int PEERS_AT_ONCE = 4;
  const long long base = row * hidden, groups = hidden / PACK;
  long long g[CACHE];
  bool on[CACHE];
  Pack16 res[CACHE], w[CACHE];
  float acc[CACHE][PACK];
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    g[c] = threadIdx.x + static_cast<long long>(c) * blockDim.x;
    on[c] = g[c] < groups;
    if (on[c]) {
      res[c] = reinterpret_cast<const Pack16*>(residual + base)[g[c]];
      w[c] = reinterpret_cast<const Pack16*>(weight)[g[c]];
    }
  }
  for (int r0 = 0; r0 < world_size; r0 += PEERS_AT_ONCE) {
    Pack16 v[PEERS_AT_ONCE][CACHE];
#pragma unroll
    for (int k = 0; k < PEERS_AT_ONCE; ++k)
#pragma unroll
      for (int c = 0; c < CACHE; ++c)
        if (r0 + k < world_size && on[c]) v[k][c] = ld_volatile16(staging<raw>(s.bufs[r0 + k]) + base + g[c] * PACK);
#pragma unroll
    for (int k = 0; k < PEERS_AT_ONCE; ++k)
#pragma unroll
      for (int c = 0; c < CACHE; ++c)
        if (r0 + k < world_size && on[c]) {
          const raw* e = reinterpret_cast<const raw*>(&v[k][c]);
#pragma unroll
          for (int j = 0; j < PACK; ++j) acc[c][j] = r0 + k == 0 ? T::load(e[j]) : acc[c][j] + T::load(e[j]);
        }
  }
  float ss = 0.0f;
  alignas(16) raw nr[CACHE][PACK];
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    if (!on[c]) continue;
    const raw* re = reinterpret_cast<const raw*>(&res[c]);
#pragma unroll
    for (int j = 0; j < PACK; ++j) {
      const float a = T::load(T::store(acc[c][j]));  // the all-reduce's rounded output
      nr[c][j] = T::store(a + T::load(re[j]));
      const float f = T::load(nr[c][j]);
      ss += f * f;
    }
    reinterpret_cast<Pack16*>(residual_out + base)[g[c]] = *reinterpret_cast<const Pack16*>(nr[c]);
    if (keep != nullptr) reinterpret_cast<Pack16*>(keep + base)[g[c]] = *reinterpret_cast<const Pack16*>(nr[c]);
  }
  const float inv = rsqrtf(block_sum(ss, s_warp) / static_cast<float>(hidden) + eps);
#pragma unroll
  for (int c = 0; c < CACHE; ++c) {
    if (!on[c]) continue;
    const raw* we = reinterpret_cast<const raw*>(&w[c]);
    alignas(16) raw o[PACK];
#pragma unroll
    for (int j = 0; j < PACK; ++j) o[j] = T::store(T::load(nr[c][j]) * inv * T::load(we[j]));
    reinterpret_cast<Pack16*>(out + base)[g[c]] = *reinterpret_cast<const Pack16*>(o);
  }
  return inv;
}

// One row, owner's side: the register path when it fits, else add_row then norm_row (same bits).
template <typename T, int PACK>
__device__ __forceinline__ float fused_row(const Block& s, int world_size, const typename T::raw* residual,
                                           typename T::raw* residual_out, typename T::raw* keep, typename T::raw* out,
                                           const typename T::raw* weight, long long row, long long hidden, float eps,
                                           float* s_warp) {
  if constexpr (PACK > 1) {
    if (hidden / PACK <= static_cast<long long>(CACHE) * blockDim.x)
      return fused_row_cached<T, PACK>(s, world_size, residual, residual_out, keep, out, weight, row, hidden, eps,
                                       s_warp);
  }
  const float ss = add_row<T, PACK>(s, world_size, residual, residual_out, keep, row, hidden, s_warp);
  const float inv = rsqrtf(ss / static_cast<float>(hidden) + eps);
  norm_row<T, PACK>(residual_out, false, nullptr, out, weight, row, hidden, inv);
  return inv;
}

template <typename T, int PACK>
__device__ __forceinline__ void oneshot_rows(Block& s, int world_size, int rank, const typename T::raw* x,
                                             const typename T::raw* residual, typename T::raw* residual_out,
                                             typename T::raw* out, const typename T::raw* weight, long long rows,
                                             long long hidden, float eps, float* s_warp, int* err,
                                             long long timeout_ns) {
  using raw = typename T::raw;
  if (x != nullptr)
    for (long long row = blockIdx.x; row < rows; row += gridDim.x) copy_row<raw, PACK>(x, staging<raw>(s.bufs[rank]), row, hidden);
  if (!barrier(s, PHASE_START, world_size, rank, err, timeout_ns)) return;
  for (long long row = blockIdx.x; row < rows; row += gridDim.x)
    fused_row<T, PACK>(s, world_size, residual, residual_out, nullptr, out, weight, row, hidden, eps, s_warp);
  if (!barrier(s, PHASE_END, world_size, rank, err, timeout_ns)) return;
  epilogue(s, rank);
}

template <typename T, int PACK>
__device__ __forceinline__ void twoshot_rows(Block& s, int world_size, int rank, const typename T::raw* x,
                                             const typename T::raw* residual, typename T::raw* residual_out,
                                             typename T::raw* out, const typename T::raw* weight, long long rows,
                                             long long hidden, float eps, float* s_warp, int* err,
                                             long long timeout_ns) {
  using raw = typename T::raw;
  const long long shard = (rows + world_size - 1) / world_size;  // rows per shard
  if (x != nullptr) {
    for (int q = 0; q < world_size; ++q) {
      const long long r0 = q * shard, r1 = min(rows, r0 + shard);
      for (long long row = r0 + blockIdx.x; row < r1; row += gridDim.x)
        copy_row<raw, PACK>(x, staging<raw>(s.bufs[rank]), row, hidden);
    }
  }
  if (!barrier(s, PHASE_START, world_size, rank, err, timeout_ns)) return;
  {  // reduce our shard, normalise it, keep the new residual and 1 / rms for the peers
    const long long r0 = rank * shard, r1 = min(rows, r0 + shard);
    raw* mine = staging<raw>(s.bufs[rank]);
    for (long long row = r0 + blockIdx.x; row < r1; row += gridDim.x) {
      const float inv = fused_row<T, PACK>(s, world_size, residual, residual_out, mine, out, weight, row, hidden, eps,
                                           s_warp);
      if (threadIdx.x == 0) inv_ptr(s.bufs[rank])[row - r0] = inv;
    }
  }
  if (!barrier(s, PHASE_MID, world_size, rank, err, timeout_ns)) return;
  for (int k = 1; k < world_size; ++k) {  // the other shards, starting after ours (ranks read different peers)
    const int q = (rank + k) % world_size;
    const long long r0 = q * shard, r1 = min(rows, r0 + shard);
    const raw* theirs = staging<raw>(s.bufs[q]);
    for (long long row = r0 + blockIdx.x; row < r1; row += gridDim.x) {
      const float inv = ld_volatile(inv_ptr(s.bufs[q]) + (row - r0));
      norm_row<T, PACK>(theirs, true, residual_out, out, weight, row, hidden, inv);
    }
  }
  if (!barrier(s, PHASE_END, world_size, rank, err, timeout_ns)) return;
  epilogue(s, rank);
}

template <typename T, bool TWOSHOT>
__device__ __forceinline__ void rmsnorm_impl(const unsigned long long* peer_ptrs, int world_size, int rank_base,
                                             const void* x_base, const void* residual, void* residual_out, void* out,
                                             long long stride, const void* weight, long long rows, long long hidden,
                                             float eps, int vec, int* err_base, long long timeout_ns) {
  using raw = typename T::raw;
  constexpr int PACK = 16 / sizeof(raw);
  const int rank = rank_base + blockIdx.y;
  const long long off = blockIdx.y * stride;
  int* err = err_base + blockIdx.y * ERR_WORDS;
  __shared__ Block s;
  __shared__ float s_warp[33];
  if (!prologue(s, peer_ptrs, world_size, rank, err)) return;
  const raw* x = x_base != nullptr ? static_cast<const raw*>(x_base) + off : nullptr;
  const raw* res = static_cast<const raw*>(residual) + off;
  raw* res_out = static_cast<raw*>(residual_out) + off;
  raw* o = static_cast<raw*>(out) + off;
  const raw* w = static_cast<const raw*>(weight);
  if constexpr (TWOSHOT) {
    if (vec)
      twoshot_rows<T, PACK>(s, world_size, rank, x, res, res_out, o, w, rows, hidden, eps, s_warp, err, timeout_ns);
    else
      twoshot_rows<T, 1>(s, world_size, rank, x, res, res_out, o, w, rows, hidden, eps, s_warp, err, timeout_ns);
  } else {
    if (vec)
      oneshot_rows<T, PACK>(s, world_size, rank, x, res, res_out, o, w, rows, hidden, eps, s_warp, err, timeout_ns);
    else
      oneshot_rows<T, 1>(s, world_size, rank, x, res, res_out, o, w, rows, hidden, eps, s_warp, err, timeout_ns);
  }
}

}  // namespace ar
}  // namespace moecomm

#define MOECOMM_RMSNORM(NAME, TYPE, TWOSHOT)                                                                  \
  extern "C" __global__ void __launch_bounds__(moecomm::ar::THREADS)                                        \
      NAME(const unsigned long long* peer_ptrs, int world_size, int rank_base, const void* x,                \
           const void* residual, void* residual_out, void* out, long long stride, const void* weight,        \
           long long rows, long long hidden, float eps, int vec, int* err, long long timeout_ns) {            \
    moecomm::ar::rmsnorm_impl<TYPE, TWOSHOT>(peer_ptrs, world_size, rank_base, x, residual, residual_out, out, \
                                             stride, weight, rows, hidden, eps, vec, err, timeout_ns);        \
  }

MOECOMM_RMSNORM(moecomm_ar_rmsnorm_bf16, moecomm::Bf16, false)
MOECOMM_RMSNORM(moecomm_ar_rmsnorm_fp16, moecomm::Fp16, false)
MOECOMM_RMSNORM(moecomm_ar_rmsnorm_fp32, moecomm::Fp32, false)
MOECOMM_RMSNORM(moecomm_ar_rmsnorm_twoshot_bf16, moecomm::Bf16, true)
MOECOMM_RMSNORM(moecomm_ar_rmsnorm_twoshot_fp16, moecomm::Fp16, true)
MOECOMM_RMSNORM(moecomm_ar_rmsnorm_twoshot_fp32, moecomm::Fp32, true)
