// The primitives the kernels that talk to their peers share: a 16-byte pack (the widest load or
// store one thread issues), the global nanosecond timer that bounds every spin-wait, and the
// system-scope release store / acquire load of a flag (system scope: the peer's writes reach us over
// NVLink / PCIe from another GPU, so the GPU scope's ordering is not enough). Inline PTX, no CUDA
// header (see dtypes.cuh).
#pragma once

namespace moecomm {

struct alignas(16) Pack16 {
  unsigned int w[4];
};

__device__ __forceinline__ unsigned long long globaltimer() {
  unsigned long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ void st_release_sys(unsigned int* p, unsigned int v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ unsigned int ld_acquire_sys(const unsigned int* p) {
  unsigned int v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

}  // namespace moecomm
