// Runs a CUDA C++ kernel source as host C++ (g++ -std=c++20 -pthread): one std::thread per CUDA
// thread, __syncthreads a std::barrier of the block, warp shuffles through a per-warp exchange and
// a std::barrier of 32, shared-memory atomics as GCC __atomic builtins (compare-and-swap loops for
// floating point), __shared__ variables as globals (blocks run one after another). Enough of CUDA
// for kernels/sampling/sample.cu, whose collectives every lane of a warp reaches; a kernel that
// calls __syncthreads or a warp collective from divergent code deadlocks here (the tests run it
// under a timeout). Device math: logf / log from the C library (torch's CPU kernels may differ by
// an ulp from CUDA's; the tests allow for it).
#pragma once

#include <barrier>
#include <chrono>
#include <math.h>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __shared__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __cluster_dims__(...)
#define MOECOMM_CLUSTER_SHIM 1  // sample.cu takes the cluster primitives below instead of its PTX

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float a, float b, float c, float d) { return float4{a, b, c, d}; }

inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

namespace shim {
struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<unsigned long long> slots;  // 32 per warp
};
inline Block* block = nullptr;
// Race shaker: after every __syncthreads, threads other than 0 sleep this long, so thread 0 runs
// ahead; a shared variable it rewrites before the others have read it then shows as wrong tokens.
inline int lag_us = 0;

inline void warp_sync() { block->warp_bar[threadIdx.x >> 5]->arrive_and_wait(); }

template <typename T>
T exchange(T v, int src_lane) {
  static_assert(sizeof(T) <= 8, "8-byte values at most");
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  unsigned long long bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  block->slots[w * 32 + lane] = bits;
  warp_sync();
  bits = block->slots[w * 32 + (src_lane & 31)];
  warp_sync();
  T r;
  std::memcpy(&r, &bits, sizeof(T));
  return r;
}

// Runs fn on block b of a grid of `grid` (threads host threads); before_block(b) first.
inline void launch_block(unsigned grid, unsigned b, unsigned threads, const std::function<void()>& fn,
                         const std::function<void(unsigned)>& before_block = {});

// Runs fn on grid x block threads, one block after another; before_block(b) first for each block.
inline void launch(unsigned grid, unsigned threads, const std::function<void()>& fn,
                   const std::function<void(unsigned)>& before_block = {}) {
  for (unsigned b = 0; b < grid; ++b) launch_block(grid, b, threads, fn, before_block);
}

inline void launch_block(unsigned grid, unsigned b, unsigned threads, const std::function<void()>& fn,
                         const std::function<void(unsigned)>& before_block) {
  gridDim.x = grid;
  blockDim.x = threads;
  Block blk;
  blk.bar = std::make_unique<std::barrier<>>(threads);
  for (unsigned w = 0; w < threads / 32; ++w) blk.warp_bar.push_back(std::make_unique<std::barrier<>>(32));
  blk.slots.assign(threads, 0);
  block = &blk;
  if (before_block) before_block(b);
  std::vector<std::thread> ts;
  ts.reserve(threads);
  for (unsigned t = 0; t < threads; ++t)
    ts.emplace_back([=] {
      blockIdx.x = b;
      threadIdx.x = t;
      fn();
    });
  for (auto& th : ts) th.join();
  block = nullptr;
}
}  // namespace shim

inline void __syncthreads() {
  shim::block->bar->arrive_and_wait();
  if (shim::lag_us > 0 && threadIdx.x != 0) std::this_thread::sleep_for(std::chrono::microseconds(shim::lag_us));
}

// Thread-block clusters: a cluster's blocks run at the same time, each in its own copy of the
// library (tests/sampling/_cuda_emulation.py loads one copy a rank, so each block has its own
// __shared__ globals; built with -fvisibility=hidden -fno-gnu-unique so that no copy binds to
// another's). cluster_sync is one std::barrier over every thread of the cluster; cluster_map moves
// an address of this copy's globals (static __shared__ variables, the dynamic shared memory) to the
// same offset in rank r's copy, from each copy's anchor.
namespace shim {
struct Cluster {
  std::barrier<>* bar;
  // the barrier's wait, in the copy that made it (each copy has its own libstdc++ waiter pool for
  // std::atomic waits: a wait in one copy would never see the notify of another)
  void (*arrive_and_wait)(std::barrier<>*);
  unsigned char* anchor[16];
  int size;
};
inline Cluster* cluster = nullptr;  // this copy's block's cluster (nullptr: not a cluster launch)
inline int cluster_rank_ = 0;
inline unsigned char anchor_byte = 0;
}  // namespace shim
inline unsigned cluster_rank() { return shim::cluster ? static_cast<unsigned>(shim::cluster_rank_) : 0u; }
inline unsigned cluster_size() { return shim::cluster ? static_cast<unsigned>(shim::cluster->size) : 1u; }
inline void cluster_sync() {
  if (shim::cluster == nullptr) {
    __syncthreads();
    return;
  }
  shim::cluster->arrive_and_wait(shim::cluster->bar);
  if (shim::lag_us > 0 && threadIdx.x != 0) std::this_thread::sleep_for(std::chrono::microseconds(shim::lag_us));
}
template <typename T>
T* cluster_map(T* p, int rank) {
  if (shim::cluster == nullptr) return p;
  unsigned char* b = reinterpret_cast<unsigned char*>(const_cast<std::remove_cv_t<T>*>(p));
  return reinterpret_cast<T*>(shim::cluster->anchor[rank] + (b - &shim::anchor_byte));
}
inline void __syncwarp(unsigned = 0xffffffffu) { shim::warp_sync(); }

template <typename T>
T __shfl_sync(unsigned, T v, int src) { return shim::exchange(v, src); }
template <typename T>
T __shfl_xor_sync(unsigned, T v, int m) { return shim::exchange(v, (threadIdx.x & 31) ^ m); }
template <typename T>
T __shfl_up_sync(unsigned, T v, unsigned d) {
  const int lane = threadIdx.x & 31;
  return shim::exchange(v, lane >= static_cast<int>(d) ? lane - static_cast<int>(d) : lane);
}

inline unsigned __ballot_sync(unsigned, bool pred) {
  const int w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  shim::block->slots[w * 32 + lane] = pred ? 1 : 0;
  shim::warp_sync();
  unsigned r = 0;
  for (int i = 0; i < 32; ++i)
    if (shim::block->slots[w * 32 + i]) r |= 1u << i;
  shim::warp_sync();
  return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return x ? __builtin_ctz(static_cast<unsigned>(x)) + 1 : 0; }
inline int __clz(int x) { return x ? __builtin_clz(static_cast<unsigned>(x)) : 32; }

inline unsigned atomicAdd(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }
inline double atomicAdd(double* p, double v) {
  double old;
  __atomic_load(p, &old, __ATOMIC_SEQ_CST);
  for (;;) {
    double want = old + v;
    if (__atomic_compare_exchange(p, &old, &want, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) return old;
  }
}
inline int atomicMin(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v < old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}
inline int atomicMax(int* p, int v) {
  int old = __atomic_load_n(p, __ATOMIC_SEQ_CST);
  while (v > old && !__atomic_compare_exchange_n(p, &old, v, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
  }
  return old;
}

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline int __float_as_int(float f) {
  int i;
  std::memcpy(&i, &f, 4);
  return i;
}
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline double __longlong_as_double(long long i) {
  double d;
  std::memcpy(&d, &i, 8);
  return d;
}
inline unsigned __umulhi(unsigned a, unsigned b) {
  return static_cast<unsigned>((static_cast<unsigned long long>(a) * b) >> 32);
}
// one IEEE operation each (x86-64 without -mfma never contracts)
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint2float_rn(unsigned u) { return static_cast<float>(u); }
template <typename T>
T __ldg(const T* p) { return *p; }



