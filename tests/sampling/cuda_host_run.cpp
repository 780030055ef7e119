// Host harness of kernels/sampling/sample.cu (see cuda_host_shim.h): emu_sample runs one launch of
// an entry point over `grid` blocks of `threads` host threads, shared memory poisoned per block,
// and fails (3) when a block wrote past the launch's dynamic shared memory.
// Built by tests/sampling/_cuda_emulation.py with -DSAMPLE_CU="<path of sample.cu>".
#include "cuda_host_shim.h"

static int* g_paths = nullptr;  // per output row: the OR of sample.cu's PATH_* bits it took
#define MOECOMM_SAMPLE_TRACE(path) \
  if (threadIdx.x == 0 && g_paths != nullptr) g_paths[blockIdx.x / cluster_size()] |= (path)

static long long* g_bounds = nullptr;  // per output row: the race's threshold key (emu_record_bounds)
#define MOECOMM_SAMPLE_BOUNDARY(klo)                                                 \
  if (threadIdx.x == 0 && cluster_rank() == 0 && g_bounds != nullptr) \
  g_bounds[blockIdx.x / cluster_size()] = static_cast<long long>(klo)

#include SAMPLE_CU

alignas(16) unsigned char moecomm_sample_dyn[1 << 22];
constexpr unsigned char GUARD = 0x5A;  // the bytes past the launch's dynamic shared memory: a write there is out of bounds

#define EMU_EXPORT extern "C" __attribute__((visibility("default")))

// Where the next launches record each row's race threshold (nullptr: nowhere).
EMU_EXPORT void emu_record_bounds(long long* bounds) { g_bounds = bounds; }

typedef void (*EntryFn)(MOECOMM_SAMPLE_PARAMS);

static EntryFn find_entry(const char* entry) {
  static const struct {
    const char* name;
    EntryFn fn;
  } table[] = {
      {"moecomm_sample_probs_count", moecomm_sample_probs_count},
      {"moecomm_sample_probs_qsum", moecomm_sample_probs_qsum},
      {"moecomm_sample_probs_none", moecomm_sample_probs_none},
      {"moecomm_sample_probs_count_paired", moecomm_sample_probs_count_paired},
      {"moecomm_sample_probs_qsum_paired", moecomm_sample_probs_qsum_paired},
      {"moecomm_sample_probs_none_paired", moecomm_sample_probs_none_paired},
      {"moecomm_sample_probs_count_split8", moecomm_sample_probs_count_split8},
      {"moecomm_sample_probs_qsum_split8", moecomm_sample_probs_qsum_split8},
  };
  for (const auto& e : table)
    if (!std::strcmp(entry, e.name)) return e.fn;
  return nullptr;
}

// A cluster of `size` blocks of `threads` threads: its barrier and each rank's anchor (emu_sample_block).
EMU_EXPORT void* emu_cluster_new(int size, int threads) {
  auto* c = new shim::Cluster{new std::barrier<>(static_cast<std::ptrdiff_t>(size) * threads),
                              [](std::barrier<>* b) { b->arrive_and_wait(); }, {}, size};
  return c;
}
EMU_EXPORT void emu_cluster_free(void* p) {
  auto* c = static_cast<shim::Cluster*>(p);
  delete c->bar;
  delete c;
}

// Block `block` of a cluster launch, as rank `rank` of `cluster` (every rank in its own copy of this
// library, all at once: tests/sampling/_cuda_emulation.py); returns as emu_sample.
EMU_EXPORT int emu_sample_block(void* cluster, int rank, int block, int* paths, int lag_us, const char* entry, int grid,
                                int threads, long long dyn_bytes, const float* x, const void* rowmap, void* out,
                                unsigned char* valid, float* logprob, const void* k_ptr, const float* p_ptr,
                                const float* minp_ptr, const long long* seed_ptr, const long long* offset_ptr, int V,
                                int num_in_rows, long long stride_x, long long k_val, double p_val, float minp_val,
                                long long seed_val, long long offset_val, int flags, int cap) {
  if (dyn_bytes > static_cast<long long>(sizeof(moecomm_sample_dyn))) return 1;
  EntryFn fn = find_entry(entry);
  if (fn == nullptr) return 2;
  g_paths = paths;
  shim::lag_us = lag_us;
  shim::cluster = static_cast<shim::Cluster*>(cluster);
  shim::cluster_rank_ = rank;
  shim::cluster->anchor[rank] = &shim::anchor_byte;  // before this block's threads start: read after barrier 1
  const size_t guard_end = sizeof(moecomm_sample_dyn);
  std::memset(moecomm_sample_dyn, 0xA5, static_cast<size_t>(dyn_bytes));
  std::memset(moecomm_sample_dyn + dyn_bytes, GUARD, guard_end - static_cast<size_t>(dyn_bytes));
  shim::launch_block(static_cast<unsigned>(grid), static_cast<unsigned>(block), static_cast<unsigned>(threads),
                     [&] { fn(MOECOMM_SAMPLE_ARGS); });
  shim::cluster = nullptr;
  for (size_t i = static_cast<size_t>(dyn_bytes); i < guard_end; ++i)
    if (moecomm_sample_dyn[i] != GUARD) return 3;
  return 0;
}

EMU_EXPORT int emu_sample(int* paths, int lag_us, const char* entry, int grid, int threads, long long dyn_bytes, const float* x,
                          const void* rowmap, void* out, unsigned char* valid, float* logprob, const void* k_ptr,
                          const float* p_ptr, const float* minp_ptr, const long long* seed_ptr,
                          const long long* offset_ptr, int V, int num_in_rows, long long stride_x, long long k_val,
                          double p_val, float minp_val, long long seed_val, long long offset_val, int flags, int cap) {
  if (dyn_bytes > static_cast<long long>(sizeof(moecomm_sample_dyn))) return 1;
  EntryFn fn = find_entry(entry);
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
