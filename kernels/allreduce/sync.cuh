// What the IPC all-reduce kernels share: the layout of a rank's symmetric buffer, the bounded
// flag barrier between the ranks' blocks, and the loads of peer memory.
//
// Shape legend: W = world_size, n = elements per rank, b = blockIdx.x, y = blockIdx.y.
//
// Layout of every rank's buffer (moecomm/allreduce/layout.py holds the same numbers; a CPU test
// checks they agree):
//
//   [COUNTERS_OFFSET, +4*MAX_BLOCKS)   uint32 epoch[b]: calls block b of this rank has completed
//   [FLAGS_OFFSET, +4*3*MAX_BLOCKS*MAX_PEERS)  uint32 flag[phase][b][src]: written by rank src
//   [INV_OFFSET, +4*MAX_NORM_ROWS)     fp32 1/rms of the rows of this rank's shard (two-shot RMSNorm)
//   [HEADER_BYTES, +max_size)          staging: this rank's input (copied in before the kernel);
//                                      two-shot overwrites its own shard with the reduced shard
//
// Barrier (per block, no grid-wide sync): block b of rank r meets block b of every peer. Every
// rank launches the same grid for the same call (the host makes the sizes agree), so block b
// covers the same elements on every rank, and synchronising block b with block b is enough: the
// data block b reads from a peer in a phase was written by that peer's block b before its signal
// (two-shot), or before the kernel started (staging, stream-ordered before the launch).
//
// Epochs instead of resets: each block keeps its count of completed calls in its own buffer
// (epoch[b], read at the start, written at the end). Call number e signals the value e; a waiter
// waits for flag >= e (in wrapping arithmetic). No flag is ever reset, so no extra barrier or
// memset is needed, and CUDA-graph replays advance the epochs on the device by themselves. Ranks
// are at most one call apart (to pass call e+1's start barrier, every peer must have started e+1,
// so finished e), so >= cannot be fooled by an older value.
//
// Memory ordering (PTX memory model, system scope because peers are other GPUs over NVLink):
//   signaller: __syncthreads() (every thread of the block has done its writes: they are ordered
//     before the barrier at CTA scope), then thread t does st.release.sys to peer t's flag. The
//     release is cumulative: it orders, for an observer, every write the signalling thread has
//     observed, including the block's writes made visible to it by bar.sync.
//   waiter: thread t spins with ld.acquire.sys on its own copy of flag[phase][b][t], then
//     __syncthreads(): the acquire synchronises with peer t's release, and bar.sync extends that
//     to every thread of the block (causality order is transitive through the CTA barrier).
//   data: every read of peer memory is ld.volatile (not cached in L1, which is not coherent with
//     peers: a line of last call's staging must not be served), issued after the acquire.
//
// Bounded waits: a waiter gives up after timeout_ns of %globaltimer (nanoseconds), writes
// err[0] = 1 + the rank it waited for (the first writer wins, atomicCAS), err[1] = phase,
// err[2] = block, err[3] = this rank; the block exits. A later kernel finding err[0] != 0 exits at
// once (the buffer is poisoned: the host raises at its next check()).
#pragma once

#include "../common/sys_scope.cuh"

namespace moecomm {
namespace ar {

constexpr int MAX_PEERS = 32;
constexpr int MAX_BLOCKS = 256;
constexpr long long COUNTERS_OFFSET = 0;
constexpr long long FLAGS_OFFSET = 4096;
constexpr long long HEADER_BYTES = 131072;  // >= FLAGS_OFFSET + 4 * 3 * MAX_BLOCKS * MAX_PEERS (102400)
constexpr long long INV_OFFSET = 102400;    // the flags' end; up to HEADER_BYTES: 28672 bytes of fp32
constexpr long long MAX_NORM_ROWS = 7168;
constexpr int PHASE_START = 0, PHASE_MID = 1, PHASE_END = 2;
constexpr int ERR_WORDS = 4;
constexpr int THREADS = 512;

__device__ __forceinline__ Pack16 ld_volatile16(const void* p) {
  Pack16 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.w[0]), "=r"(v.w[1]), "=r"(v.w[2]), "=r"(v.w[3])
               : "l"(p)
               : "memory");
  return v;
}

__device__ __forceinline__ unsigned short ld_volatile(const unsigned short* p) {
  unsigned short v;
  asm volatile("ld.volatile.global.u16 %0, [%1];" : "=h"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ float ld_volatile(const float* p) {
  unsigned int v;
  asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return __uint_as_float(v);
}

__device__ __forceinline__ int ld_volatile_int(const int* p) {
  int v;
  asm volatile("ld.volatile.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ unsigned int* flag_ptr(char* buf, int phase, int block, int src) {
  return reinterpret_cast<unsigned int*>(buf + FLAGS_OFFSET) + (phase * MAX_BLOCKS + block) * MAX_PEERS + src;
}

__device__ __forceinline__ unsigned int* epoch_ptr(char* buf, int block) {
  return reinterpret_cast<unsigned int*>(buf + COUNTERS_OFFSET) + block;
}

template <typename raw>
__device__ __forceinline__ raw* staging(char* buf) {
  return reinterpret_cast<raw*>(buf + HEADER_BYTES);
}

// The per-block state every kernel keeps in shared memory.
struct Block {
  char* bufs[MAX_PEERS];  // every rank's buffer base, as mapped here
  unsigned int epoch;     // this call's number (the value signalled)
  int abort;              // set by a thread that timed out, or when the buffer was poisoned
};

// All threads: load the peers' bases, this call's epoch, and whether an earlier call timed out.
// Returns false when the block must exit.
__device__ __forceinline__ bool prologue(Block& s, const unsigned long long* peer_ptrs, int world_size, int rank,
                                         const int* err) {
  if (threadIdx.x < world_size) s.bufs[threadIdx.x] = reinterpret_cast<char*>(peer_ptrs[threadIdx.x]);
  if (threadIdx.x == 0) {
    s.abort = ld_volatile_int(err) != 0;
    s.epoch = *epoch_ptr(reinterpret_cast<char*>(peer_ptrs[rank]), blockIdx.x) + 1u;
  }
  __syncthreads();
  return !s.abort;
}

// All threads: block b of this rank meets block b of every rank (see the ordering argument above).
// Returns false (the block must exit) when a peer did not arrive within timeout_ns.
__device__ __forceinline__ bool barrier(Block& s, int phase, int world_size, int rank, int* err,
                                        long long timeout_ns) {
  __syncthreads();  // the block's writes of this phase are done before any thread signals
  const int t = threadIdx.x;
  if (t < world_size) {
    st_release_sys(flag_ptr(s.bufs[t], phase, blockIdx.x, rank), s.epoch);
    const unsigned int* mine = flag_ptr(s.bufs[rank], phase, blockIdx.x, t);
    const unsigned long long start = globaltimer();
    while (static_cast<int>(ld_acquire_sys(mine) - s.epoch) < 0) {
      if (static_cast<long long>(globaltimer() - start) > timeout_ns) {
        if (atomicCAS(err, 0, t + 1) == 0) {
          err[1] = phase;
          err[2] = blockIdx.x;
          err[3] = rank;
          __threadfence_system();
        }
        s.abort = 1;
        break;
      }
    }
  }
  __syncthreads();
  return !s.abort;
}

// Thread 0, after the last barrier: this block has completed call number epoch.
__device__ __forceinline__ void epilogue(Block& s, int rank) {
  if (threadIdx.x == 0) *epoch_ptr(s.bufs[rank], blockIdx.x) = s.epoch;
}

}  // namespace ar
}  // namespace moecomm
