// Host harness of kernels/sampling/sample.cu (see cuda_host_shim.h): emu_sample runs one launch of
// an entry point over `grid` blocks of `threads` host threads, shared memory poisoned per block,
// and fails (3) when a block wrote past the launch's dynamic shared memory.
// Built by tests/sampling/_cuda_emulation.py with -DSAMPLE_CU="<path of sample.cu>".
#include "cuda_host_shim.h"

static int* g_paths = nullptr;  // per output row: the OR of sample.cu's PATH_* bits it took
#define MOECOMM_SAMPLE_TRACE(path) \
  if (threadIdx.x == 0 && g_paths != nullptr) g_paths[blockIdx.x] |= (path)

#include SAMPLE_CU

alignas(16) unsigned char moecomm_sample_dyn[1 << 22];
constexpr unsigned char GUARD = 0x5A;  // the bytes past the launch's dynamic shared memory: a write there is out of bounds

extern "C" int emu_sample(int* paths, int lag_us, const char* entry, int grid, int threads, long long dyn_bytes, const float* x,
                          const void* rowmap, void* out, unsigned char* valid, float* logprob, const void* k_ptr,
                          const float* p_ptr, const float* minp_ptr, const long long* seed_ptr,
                          const long long* offset_ptr, int V, int num_in_rows, long long stride_x, long long k_val,
                          double p_val, float minp_val, long long seed_val, long long offset_val, int flags, int cap) {
  if (dyn_bytes > static_cast<long long>(sizeof(moecomm_sample_dyn))) return 1;
  void (*fn)(MOECOMM_SAMPLE_PARAMS) = nullptr;
  if (!std::strcmp(entry, "moecomm_sample_probs_count")) fn = moecomm_sample_probs_count;
  if (!std::strcmp(entry, "moecomm_sample_probs_qsum")) fn = moecomm_sample_probs_qsum;
  if (!std::strcmp(entry, "moecomm_sample_probs_none")) fn = moecomm_sample_probs_none;
  if (!std::strcmp(entry, "moecomm_sample_probs_count_paired")) fn = moecomm_sample_probs_count_paired;
  if (!std::strcmp(entry, "moecomm_sample_probs_qsum_paired")) fn = moecomm_sample_probs_qsum_paired;
  if (!std::strcmp(entry, "moecomm_sample_probs_none_paired")) fn = moecomm_sample_probs_none_paired;
  if (fn == nullptr) return 2;
  g_paths = paths;
  shim::lag_us = lag_us;
  const size_t guard_end = sizeof(moecomm_sample_dyn);
  std::memset(moecomm_sample_dyn + dyn_bytes, GUARD, guard_end - static_cast<size_t>(dyn_bytes));
  shim::launch(
      grid, threads,
      [&] { fn(MOECOMM_SAMPLE_ARGS); },
      [&](unsigned) { std::memset(moecomm_sample_dyn, 0xA5, static_cast<size_t>(dyn_bytes)); });
  for (size_t i = static_cast<size_t>(dyn_bytes); i < guard_end; ++i)
    if (moecomm_sample_dyn[i] != GUARD) return 3;  // the kernel wrote past its dynamic shared memory
  return 0;
}
