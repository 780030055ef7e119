// Block-wide primitives of the one-block-per-row kernels (kernels/sampling/sample.cu): reductions,
// an exclusive scan, an argmax with ties to the lowest index, warp-aggregated appends. Every thread
// of the block must call the block_* ones (they synchronise the block, and each ends with a barrier
// so that its shared scratch can be reused at once), every lane of a warp warp_append;
// blockDim.x a multiple of 32, at most 1024. No CUDA header (see dtypes.cuh).
#pragma once

namespace moecomm {

constexpr unsigned FULL = 0xffffffffu;

__shared__ __align__(16) unsigned char block_scratch[34 * 8];  // 33 slots of up to 8 bytes
__shared__ float block_best_key[32];
__shared__ int block_best_idx[32];

template <typename T>
struct Sum {
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
template <typename T>
struct Max {
  __device__ __forceinline__ T operator()(T a, T b) const { return a > b ? a : b; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(FULL, v, o));
  return v;
}

// The reduction of v over the block, returned to every thread. Every thread must call it.
template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity) {
  T* sc = reinterpret_cast<T*>(block_scratch);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  v = warp_reduce(v, op);
  if (lane == 0) sc[w] = v;
  __syncthreads();
  if (w == 0) {
    T x = lane < static_cast<int>(blockDim.x >> 5) ? sc[lane] : identity;
    x = warp_reduce(x, op);
    if (lane == 0) sc[32] = x;
  }
  __syncthreads();
  const T r = sc[32];
  __syncthreads();
  return r;
}

// Exclusive prefix sum of v in thread order (thread 0 gets 0); *total (if given) the sum of all.
template <typename T>
__device__ T block_exclusive_scan(T v, T* total) {
  T* sc = reinterpret_cast<T*>(block_scratch);
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
  T incl = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const T y = __shfl_up_sync(FULL, incl, o);
    if (lane >= o) incl = incl + y;
  }
  T excl = __shfl_up_sync(FULL, incl, 1);
  if (lane == 0) excl = T(0);
  if (lane == 31) sc[w] = incl;
  __syncthreads();
  if (w == 0) {
    const T x = lane < static_cast<int>(blockDim.x >> 5) ? sc[lane] : T(0);
    T xi = x;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const T y = __shfl_up_sync(FULL, xi, o);
      if (lane >= o) xi = xi + y;
    }
    T xe = __shfl_up_sync(FULL, xi, 1);
    if (lane == 0) xe = T(0);
    sc[lane] = xe;
    if (lane == 31) sc[32] = xi;
  }
  __syncthreads();
  const T r = sc[w] + excl;
  if (total != nullptr) *total = sc[32];
  __syncthreads();
  return r;
}

// The block's best (key, idx): the largest key, ties to the lowest idx. Every thread gets it.
__device__ void block_argmax(float& key, int& idx) {
  const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const float k2 = __shfl_xor_sync(FULL, key, o);
    const int i2 = __shfl_xor_sync(FULL, idx, o);
    if (k2 > key || (k2 == key && i2 < idx)) {
      key = k2;
      idx = i2;
    }
  }
  if (lane == 0) {
    block_best_key[w] = key;
    block_best_idx[w] = idx;
  }
  __syncthreads();
  if (w == 0) {
    const bool in = lane < static_cast<int>(blockDim.x >> 5);
    float k = in ? block_best_key[lane] : -1.0f;
    int i = in ? block_best_idx[lane] : 0x7fffffff;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      const float k2 = __shfl_xor_sync(FULL, k, o);
      const int i2 = __shfl_xor_sync(FULL, i, o);
      if (k2 > k || (k2 == k && i2 < i)) {
        k = k2;
        i = i2;
      }
    }
    if (lane == 0) {
      block_best_key[0] = k;
      block_best_idx[0] = i;
    }
  }
  __syncthreads();
  key = block_best_key[0];
  idx = block_best_idx[0];
  __syncthreads();
}

// The position of this lane's first item among the warp's, after one atomicAdd on *counter for
// the whole warp (every lane of the warp must call it; cnt may be 0).
__device__ __forceinline__ int warp_append(int cnt, int* counter) {
  const int lane = threadIdx.x & 31;
  int incl = cnt;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const int y = __shfl_up_sync(FULL, incl, o);
    if (lane >= o) incl += y;
  }
  int base = 0;
  if (lane == 31 && incl > 0) base = atomicAdd(counter, incl);
  base = __shfl_sync(FULL, base, 31);
  return base + incl - cnt;
}

}  // namespace moecomm
