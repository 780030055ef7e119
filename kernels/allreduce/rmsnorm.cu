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

template <typename T, int PACK>
__device__ __forceinline__ void rows_impl(Block& s, int world_size, const typename T::raw* residual,
                                          typename T::raw* residual_out, typename T::raw* out,
                                          const typename T::raw* weight, long long rows, long long hidden, float eps,
                                          float* s_warp) {
  using raw = typename T::raw;
  const long long groups = hidden / PACK;  // PACK elements per thread step
  for (long long row = blockIdx.x; row < rows; row += gridDim.x) {
    const long long base = row * hidden;
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
      } else {
        residual_out[i] = nr[0];
      }
    }
    const float inv = rsqrtf(block_sum(ss, s_warp) / static_cast<float>(hidden) + eps);
    for (long long g = threadIdx.x; g < groups; g += blockDim.x) {
      const long long i = base + g * PACK;
      alignas(16) raw nr[PACK];
      alignas(16) raw w[PACK];
      alignas(16) raw o[PACK];
      if constexpr (PACK > 1) {
        *reinterpret_cast<Pack16*>(nr) = *reinterpret_cast<const Pack16*>(residual_out + i);
        *reinterpret_cast<Pack16*>(w) = *reinterpret_cast<const Pack16*>(weight + g * PACK);
      } else {
        nr[0] = residual_out[i];
        w[0] = weight[g];
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
}

template <typename T>
__device__ __forceinline__ void rmsnorm_impl(const unsigned long long* peer_ptrs, int world_size, int rank_base,
                                             const void* residual, void* residual_out, void* out, long long stride,
                                             const void* weight, long long rows, long long hidden, float eps, int vec,
                                             int* err_base, long long timeout_ns) {
  using raw = typename T::raw;
  constexpr int PACK = 16 / sizeof(raw);
  const int rank = rank_base + blockIdx.y;
  const long long off = blockIdx.y * stride;
  int* err = err_base + blockIdx.y * ERR_WORDS;
  __shared__ Block s;
  __shared__ float s_warp[33];
  if (!prologue(s, peer_ptrs, world_size, rank, err)) return;
  if (!barrier(s, PHASE_START, world_size, rank, err, timeout_ns)) return;
  const raw* res = static_cast<const raw*>(residual) + off;
  raw* res_out = static_cast<raw*>(residual_out) + off;
  raw* o = static_cast<raw*>(out) + off;
  const raw* w = static_cast<const raw*>(weight);
  if (vec)
    rows_impl<T, PACK>(s, world_size, res, res_out, o, w, rows, hidden, eps, s_warp);
  else
    rows_impl<T, 1>(s, world_size, res, res_out, o, w, rows, hidden, eps, s_warp);
  if (!barrier(s, PHASE_END, world_size, rank, err, timeout_ns)) return;
  epilogue(s, rank);
}

}  // namespace ar
}  // namespace moecomm

#define MOECOMM_RMSNORM(NAME, TYPE)                                                                           \
  extern "C" __global__ void __launch_bounds__(moecomm::ar::THREADS)                                        \
      NAME(const unsigned long long* peer_ptrs, int world_size, int rank_base, const void* residual,          \
           void* residual_out, void* out, long long stride, const void* weight, long long rows, long long hidden, \
           float eps, int vec, int* err, long long timeout_ns) {                                              \
    moecomm::ar::rmsnorm_impl<TYPE>(peer_ptrs, world_size, rank_base, residual, residual_out, out, stride, weight, \
                                    rows, hidden, eps, vec, err, timeout_ns);                                 \
  }

MOECOMM_RMSNORM(moecomm_ar_rmsnorm_bf16, moecomm::Bf16)
MOECOMM_RMSNORM(moecomm_ar_rmsnorm_fp16, moecomm::Fp16)
MOECOMM_RMSNORM(moecomm_ar_rmsnorm_fp32, moecomm::Fp32)
