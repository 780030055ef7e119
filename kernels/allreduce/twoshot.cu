// Two-shot all-reduce over symmetric IPC buffers: reduce-scatter, then all-gather, through the
// staging buffers themselves.
//
//   shards: the n / PACK full 16-byte packs split in W contiguous shards of ceil(packs / W) packs
//           (the last ones may be short or empty); the n % PACK tail elements belong to shard W-1.
//   reduce-scatter: rank r sums shard r over all W ranks' staging (rank order, fp32, rounded once),
//           writes it to its output and over its OWN staging's shard r. In place is safe: in this
//           phase, rank r's shard r is read by rank r alone (peer s reads shard s of everyone).
//   mid barrier: every rank's reduced shard is in its staging.
//   all-gather: rank r copies shard s from rank s's staging into its output, for every s != r.
//   end barrier: no peer still reads our staging when the next call's copy overwrites it.
//
// Every element is summed once, by one rank, in rank order: outputs are bit-identical across ranks
// and equal to the one-shot's. Per-block barriers suffice (sync.cuh): both phases walk a shard
// with the same index rule (j = tid, tid + stride, ...), so the pieces block b of rank r reads from
// shard s in the all-gather are exactly those block b of rank s wrote before its mid signal.
//
// Napkin math: each rank reads 2 (W - 1) / W * n elements over NVLink and writes 2 n locally,
// against (W - 1) n read by one-shot: at 8 ranks 1.75 n instead of 7 n, which pays for the third
// barrier once n is past a few hundred KB (the thresholds in moecomm/allreduce/layout.py).
// Launch, rank selection (blockIdx.y) and residency: as oneshot.cu.
//
// Staging inside the kernel (stage_src != nullptr, as oneshot.cu): block b copies, of every shard,
// the packs that block b of the shard's owner reads in the reduce-scatter (the same j = begin +
// tid, + stride, ... rule per shard), and the tail; then the start barrier publishes them.

#include "../common/dtypes.cuh"
#include "sync.cuh"

namespace moecomm {
namespace ar {

template <typename T>
__device__ __forceinline__ void twoshot_impl(const unsigned long long* peer_ptrs, int world_size, int rank_base,
                                             void* out_base, long long out_stride, long long n, int* err_base,
                                             long long timeout_ns, const void* stage_src, long long stage_stride) {
  using raw = typename T::raw;
  constexpr int PACK = 16 / sizeof(raw);
  const int rank = rank_base + blockIdx.y;
  raw* out = static_cast<raw*>(out_base) + blockIdx.y * out_stride;
  int* err = err_base + blockIdx.y * ERR_WORDS;
  __shared__ Block s;
  if (!prologue(s, peer_ptrs, world_size, rank, err)) return;

  const long long tid = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  const long long num_packs = n / PACK;
  const long long shard_packs = (num_packs + world_size - 1) / world_size;
  const long long tail_start = num_packs * PACK;
  if (stage_src != nullptr) {  // this rank's input -> its staging, in the reduce-scatter's partition
    const raw* x = static_cast<const raw*>(stage_src) + blockIdx.y * stage_stride;
    raw* mine = staging<raw>(s.bufs[rank]);
    for (int q = 0; q < world_size; ++q) {
      const long long begin = min(static_cast<long long>(q) * shard_packs, num_packs);
      const long long end = min(begin + shard_packs, num_packs);
      for (long long p = begin + tid; p < end; p += stride)
        reinterpret_cast<Pack16*>(mine)[p] = reinterpret_cast<const Pack16*>(x)[p];
    }
    for (long long i = tail_start + tid; i < n; i += stride) mine[i] = x[i];
  }
  if (!barrier(s, PHASE_START, world_size, rank, err, timeout_ns)) return;

  // reduce-scatter of shard `rank`
  {
    const long long begin = min(static_cast<long long>(rank) * shard_packs, num_packs);
    const long long end = min(begin + shard_packs, num_packs);
    raw* mine = staging<raw>(s.bufs[rank]);
    for (long long p = begin + tid; p < end; p += stride) {
      float acc[PACK];
      {
        Pack16 v = ld_volatile16(staging<raw>(s.bufs[0]) + p * PACK);
        const raw* e = reinterpret_cast<const raw*>(&v);
#pragma unroll
        for (int j = 0; j < PACK; ++j) acc[j] = T::load(e[j]);
      }
      for (int r = 1; r < world_size; ++r) {
        Pack16 v = ld_volatile16(staging<raw>(s.bufs[r]) + p * PACK);
        const raw* e = reinterpret_cast<const raw*>(&v);
#pragma unroll
        for (int j = 0; j < PACK; ++j) acc[j] += T::load(e[j]);
      }
      Pack16 o;
      raw* oe = reinterpret_cast<raw*>(&o);
#pragma unroll
      for (int j = 0; j < PACK; ++j) oe[j] = T::store(acc[j]);
      reinterpret_cast<Pack16*>(mine)[p] = o;
      reinterpret_cast<Pack16*>(out)[p] = o;
    }
    if (rank == world_size - 1) {
      for (long long i = tail_start + tid; i < n; i += stride) {
        float acc = T::load(ld_volatile(staging<raw>(s.bufs[0]) + i));
        for (int r = 1; r < world_size; ++r) acc += T::load(ld_volatile(staging<raw>(s.bufs[r]) + i));
        const raw o = T::store(acc);
        mine[i] = o;
        out[i] = o;
      }
    }
  }

  if (!barrier(s, PHASE_MID, world_size, rank, err, timeout_ns)) return;

  // all-gather: the other shards, starting after our own so that the ranks read different peers
  for (int k = 1; k < world_size; ++k) {
    const int src = (rank + k) % world_size;
    const long long begin = min(static_cast<long long>(src) * shard_packs, num_packs);
    const long long end = min(begin + shard_packs, num_packs);
    const raw* theirs = staging<raw>(s.bufs[src]);
    for (long long p = begin + tid; p < end; p += stride)
      reinterpret_cast<Pack16*>(out)[p] = ld_volatile16(theirs + p * PACK);
    if (src == world_size - 1) {
      for (long long i = tail_start + tid; i < n; i += stride) out[i] = ld_volatile(theirs + i);
    }
  }

  if (!barrier(s, PHASE_END, world_size, rank, err, timeout_ns)) return;
  epilogue(s, rank);
}

}  // namespace ar
}  // namespace moecomm

#define MOECOMM_TWOSHOT(NAME, TYPE)                                                                        \
  extern "C" __global__ void __launch_bounds__(moecomm::ar::THREADS)                                     \
      NAME(const unsigned long long* peer_ptrs, int world_size, int rank_base, void* out, long long out_stride, \
           long long n, int* err, long long timeout_ns, const void* stage_src, long long stage_stride) {    \
    moecomm::ar::twoshot_impl<TYPE>(peer_ptrs, world_size, rank_base, out, out_stride, n, err, timeout_ns,    \
                                    stage_src, stage_stride);                                              \
  }

MOECOMM_TWOSHOT(moecomm_ar_twoshot_bf16, moecomm::Bf16)
MOECOMM_TWOSHOT(moecomm_ar_twoshot_fp16, moecomm::Fp16)
MOECOMM_TWOSHOT(moecomm_ar_twoshot_fp32, moecomm::Fp32)
