// One-shot all-reduce over symmetric IPC buffers: every rank reads all W ranks' staged inputs and
// writes the full sum to its own output.
//
//     out_r[i] = sum over s = 0..W-1 of staging_s[i]     (rank order, fp32, rounded once)
//
// Same order on every rank: bit-identical outputs (kernels/allreduce/reduce.cu's rule).
// Synchronisation, layout and memory ordering: sync.cuh. Staging (the kernel copies its rank's
// input into its staging, see below; or the host did before the launch), start barrier (every peer
// has staged its input), the reduction, end barrier (no peer still reads our staging when the next
// call's copy overwrites it).
//
// Staging inside the kernel (stage_src != nullptr): rank y's input is at stage_src + y *
// stage_stride (16-byte aligned, stage_stride a multiple of 16 bytes: the host checks). Each thread
// first copies exactly the packs (and tail elements) it will later read from every rank, then the
// start barrier's __syncthreads + st.release.sys publishes the block's copies to the peers' block b
// (sync.cuh's argument: block b of every rank reads exactly what block b of the writer copied, since
// every rank walks the same grid-stride partition). So an eager call is ONE launch: the separate
// copy kernel it replaces cost a launch (~1-2 us on a real rank; W serialized copy kernels, ~8 us,
// with W virtual ranks on one stream) for what is here n bytes read and written inside the kernel.
// Safe against the previous call's readers: this kernel starts after this rank's previous kernel
// ended (stream order), which passed its end barrier in every block, so every peer had finished
// reading our staging then.
//
// Launch: grid (blocks, ranks_in_launch), block (THREADS). blockIdx.y selects the rank this block
// works for, rank_base + y: one launch covers one rank on a real GPU (ranks_in_launch = 1), or all
// W virtual ranks on one GPU (blocks * W <= SMs, so every block of every rank is resident at once:
// a block spinning on a block that is not scheduled would deadlock). out and err of rank y are at
// out + y * out_stride elements and err + y * ERR_WORDS.
//
// Napkin math: each rank reads W * n elements (W - 1 over NVLink) and writes n; at 8 ranks and
// 64 KB per rank it moves 576 KB, ~1-2 us at NVLink/HBM speed, so the two barriers (a few us of
// flag round trips) and the launch dominate: the point of one-shot for small messages.
// Vector path: 16-byte packs (staging is 128-byte aligned, out 16-byte aligned: the host checks);
// the n % PACK tail one element per thread.
//
// Registered inputs (CUDA graphs): in_ptrs == nullptr reads every rank's staging; otherwise
// in_ptrs[r] is rank r's input itself as mapped here (16-byte aligned: the host checks), so a
// captured graph copies nothing. Same barriers: the start barrier says a peer's input is written
// (by work before its kernel), the end barrier that no peer still reads ours (the caller may then
// overwrite it).

#include "../common/dtypes.cuh"
#include "sync.cuh"

namespace moecomm {
namespace ar {

template <typename T>
__device__ __forceinline__ void oneshot_impl(const unsigned long long* peer_ptrs, int world_size, int rank_base,
                                             void* out_base, long long out_stride, long long n, int* err_base,
                                             long long timeout_ns, const unsigned long long* in_ptrs,
                                             const void* stage_src, long long stage_stride) {
  using raw = typename T::raw;
  constexpr int PACK = 16 / sizeof(raw);
  const int rank = rank_base + blockIdx.y;
  raw* out = static_cast<raw*>(out_base) + blockIdx.y * out_stride;
  int* err = err_base + blockIdx.y * ERR_WORDS;
  __shared__ Block s;
  __shared__ const raw* src[MAX_PEERS];  // rank r's input: its staging, or its registered buffer
  if (!prologue(s, peer_ptrs, world_size, rank, err)) return;
  if (threadIdx.x < world_size)
    src[threadIdx.x] = in_ptrs ? reinterpret_cast<const raw*>(in_ptrs[threadIdx.x]) : staging<raw>(s.bufs[threadIdx.x]);

  const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long num_packs = n / PACK;
  if (stage_src != nullptr && in_ptrs == nullptr) {  // this rank's input -> its staging, same partition as the reads
    const raw* x = static_cast<const raw*>(stage_src) + blockIdx.y * stage_stride;
    raw* mine = staging<raw>(s.bufs[rank]);
    for (long long p = tid; p < num_packs; p += stride)
      reinterpret_cast<Pack16*>(mine)[p] = reinterpret_cast<const Pack16*>(x)[p];
    for (long long i = num_packs * PACK + tid; i < n; i += stride) mine[i] = x[i];
  }
  // (the barrier's leading __syncthreads publishes src and the block's staging copies)
  if (!barrier(s, PHASE_START, world_size, rank, err, timeout_ns)) return;

  for (long long p = tid; p < num_packs; p += stride) {
    float acc[PACK];
    {
      Pack16 v = ld_volatile16(src[0] + p * PACK);
      const raw* e = reinterpret_cast<const raw*>(&v);
#pragma unroll
      for (int j = 0; j < PACK; ++j) acc[j] = T::load(e[j]);
    }
    for (int r = 1; r < world_size; ++r) {
      Pack16 v = ld_volatile16(src[r] + p * PACK);
      const raw* e = reinterpret_cast<const raw*>(&v);
#pragma unroll
      for (int j = 0; j < PACK; ++j) acc[j] += T::load(e[j]);
    }
    Pack16 o;
    raw* oe = reinterpret_cast<raw*>(&o);
#pragma unroll
    for (int j = 0; j < PACK; ++j) oe[j] = T::store(acc[j]);
    reinterpret_cast<Pack16*>(out)[p] = o;
  }
  for (long long i = num_packs * PACK + tid; i < n; i += stride) {
    float acc = T::load(ld_volatile(src[0] + i));
    for (int r = 1; r < world_size; ++r) acc += T::load(ld_volatile(src[r] + i));
    out[i] = T::store(acc);
  }

  if (!barrier(s, PHASE_END, world_size, rank, err, timeout_ns)) return;
  epilogue(s, rank);
}

}  // namespace ar
}  // namespace moecomm

#define MOECOMM_ONESHOT(NAME, TYPE)                                                                        \
  extern "C" __global__ void __launch_bounds__(moecomm::ar::THREADS)                                     \
      NAME(const unsigned long long* peer_ptrs, int world_size, int rank_base, void* out, long long out_stride, \
           long long n, int* err, long long timeout_ns, const unsigned long long* in_ptrs,                 \
           const void* stage_src, long long stage_stride) {                                                \
    moecomm::ar::oneshot_impl<TYPE>(peer_ptrs, world_size, rank_base, out, out_stride, n, err, timeout_ns,    \
                                    in_ptrs, stage_src, stage_stride);                                     \
  }

MOECOMM_ONESHOT(moecomm_ar_oneshot_bf16, moecomm::Bf16)
MOECOMM_ONESHOT(moecomm_ar_oneshot_fp16, moecomm::Fp16)
MOECOMM_ONESHOT(moecomm_ar_oneshot_fp32, moecomm::Fp32)
