// The reduction step of the one-shot all-reduce: every rank reads the same n elements from all W
// peers' buffers and writes their sum to its own output,
//
//     out[i] = sum over r = 0..W-1 of peers[r][i]
//
// summed in rank order (r = 0 first) in fp32 and rounded once to the storage dtype. The order is
// fixed and the same on every rank, so every rank produces bit-identical results (an all-reduce must:
// ranks that disagree by one ulp drift apart over a decode). The accumulator starts from peers[0]
// (not from 0.0f, which would turn a -0.0 into +0.0), so W = 1 is a copy.
//
// Memory: the peers' pointers come from a device array (for the IPC all-reduce, pointers into the
// other GPUs' buffers, opened once). Each thread moves 16-byte packs (8 bf16/fp16 or 4 fp32): one
// 128-bit load per peer per pack, the widest a thread issues, so W loads are in flight per pack.
// Napkin math: the kernel reads W * n and writes n elements; at 8 ranks and 64 KB per rank it moves
// 576 KB, a few microseconds at HBM speed; the launch dominates below that, as for any one-shot.
// The vector path needs every pointer 16-byte aligned (the host checks and passes vec = 0
// otherwise); the n % PACK tail elements are done one by one by the first threads.
//
// No synchronisation here: the caller (issue 13's all-reduce) signals the peers' readiness before
// this step and after it. This file is the step that the later kernels share.

#include "../common/dtypes.cuh"

namespace moecomm {

// The most peers one launch reads; the host checks. 8 GPUs per node today, room for 32.
constexpr int MAX_PEERS = 32;

struct alignas(16) Pack16 {
  unsigned int w[4];
};

template <typename T>
__device__ __forceinline__ void reduce_impl(const void* const* __restrict__ peers, void* __restrict__ out,
                                            int world_size, long long n, int vec) {
  using raw = typename T::raw;
  constexpr int PACK = 16 / sizeof(raw);
  const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long num_packs = vec ? n / PACK : 0;
  raw* dst = static_cast<raw*>(out);

  // The W pointers once per block into shared memory: read from the device array inside the loop,
  // they would be loaded again for every pack (the compiler cannot keep a runtime-sized list in
  // registers).
  __shared__ const void* s_peers[MAX_PEERS];
  for (int r = threadIdx.x; r < world_size; r += blockDim.x) s_peers[r] = peers[r];
  __syncthreads();

  for (long long p = tid; p < num_packs; p += stride) {
    float acc[PACK];
    {
      Pack16 v = static_cast<const Pack16*>(s_peers[0])[p];
      const raw* e = reinterpret_cast<const raw*>(&v);
#pragma unroll
      for (int j = 0; j < PACK; ++j) acc[j] = T::load(e[j]);
    }
    for (int r = 1; r < world_size; ++r) {
      Pack16 v = static_cast<const Pack16*>(s_peers[r])[p];
      const raw* e = reinterpret_cast<const raw*>(&v);
#pragma unroll
      for (int j = 0; j < PACK; ++j) acc[j] += T::load(e[j]);
    }
    Pack16 o;
    raw* oe = reinterpret_cast<raw*>(&o);
#pragma unroll
    for (int j = 0; j < PACK; ++j) oe[j] = T::store(acc[j]);
    reinterpret_cast<Pack16*>(dst)[p] = o;
  }

  // Elements past the last full pack (all of them when vec == 0), one per thread, grid-strided.
  for (long long i = num_packs * PACK + tid; i < n; i += stride) {
    float acc = T::load(static_cast<const raw*>(s_peers[0])[i]);
    for (int r = 1; r < world_size; ++r) acc += T::load(static_cast<const raw*>(s_peers[r])[i]);
    dst[i] = T::store(acc);
  }
}

}  // namespace moecomm

// One entry point per dtype, unmangled so that the host finds them by name.
extern "C" __global__ void moecomm_reduce_bf16(const void* const* peers, void* out, int world_size, long long n,
                                                int vec) {
  moecomm::reduce_impl<moecomm::Bf16>(peers, out, world_size, n, vec);
}

extern "C" __global__ void moecomm_reduce_fp16(const void* const* peers, void* out, int world_size, long long n,
                                                int vec) {
  moecomm::reduce_impl<moecomm::Fp16>(peers, out, world_size, n, vec);
}

extern "C" __global__ void moecomm_reduce_fp32(const void* const* peers, void* out, int world_size, long long n,
                                                int vec) {
  moecomm::reduce_impl<moecomm::Fp32>(peers, out, world_size, n, vec);
}
