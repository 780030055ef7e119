// Low-latency expert-parallel dispatch and combine inside a node: one-sided stores through peer
// (CUDA IPC) pointers into the symmetric buffers of moecomm/ep/ipc/layout.py, a per-call epoch flag,
// a bounded spin. Launched by moecomm/ep/ipc/_cuda.py through moecomm.jit.cuda.
//
// T = tokens of this rank, H = hidden, k = top_k, E = experts, W = ranks, C = capacity (rows a rank
// sends one peer per call), G = blocks of this launch.
//
// Buffer of every rank (offsets in bytes; layout.py is the same table, tests check the two agree):
//   CTRL (512 B): disp_flag[32] @0, disp_cnt[32] @128, comb_flag[32] @256 (written by the PEERS:
//   slot s is rank s's), then this rank's own words: disp_epoch @384, comb_epoch @388, disp_ticket
//   @392, comb_ticket @396, error_mask @400, error_phase @404, overflow @408.
//   RECV @recv_off: [W][C] rows of row_bytes (token bytes, then k int32 local ids, k fp32 weights:
//   the NCCL path's RowLayout), row (s, slot) written by rank s.
//   BACK @back_off: [W][C] rows of H elements, row (r, slot) = rank r's partial sum of the slot-th
//   row this rank sent it.
//
// Dispatch, on every rank (one launch, G blocks):
//   1. every block computes the whole send plan (cheap: T*k ids): each token's destination mask
//      (the dedup: one row per destination rank) and, by a block-wide scan in 16-bit lanes, its
//      slot among the tokens going to each rank (token order: the NCCL static mode's row order);
//   2. block b copies tokens b, b+G, ... into slot (me, slot) of each destination's RECV (slots
//      >= C are dropped and the local overflow word set: never out of bounds), and writes home;
//   3. the LAST block to finish (a ticket) signals: for each peer d, disp_cnt[me] = rows sent, then
//      disp_flag[me] = epoch with st.release.sys. Each block's thread 0 did fence.sc.sys before its
//      ticket, so every row of every block is ordered before the release (the cooperative-groups
//      grid-barrier pattern, at system scope because the rows went to other GPUs);
//   4. that block spins (ld.acquire.sys) on its own disp_flag[s] for every s, bounded by
//      %globaltimer: a peer that does not arrive within timeout_ns sets bit s of error_mask (phase 1)
//      and its rows count as empty; then it marks the rows past each peer's count empty (ids -1) for
//      the expansion (moecomm.ep.nccl.plan.expand_received, a later kernel on the same stream).
// Only one block per rank ever spins, so with virtual ranks (one GPU, W launches on W streams) the
// other blocks always drain and no rank's grid can starve another's: no co-residency needed beyond
// one block per rank.
// Combine: the receiver sums each received row over its local experts (fp32, slot order, as
// gather_sum), stores it into (me, slot) of the source's BACK, signals comb_flag as above; the
// source's last block waits; the source's sum over its rows (rank order) is gather_sum afterwards.
//
// Epochs: each rank counts its calls in its own disp_epoch / comb_epoch (device words, so CUDA-graph
// replays advance them); the ranks call in lockstep, so their counts agree. A peer cannot be a call
// ahead: its next dispatch is ordered after its combine, which waits for ours. The flag test is
// (int)(flag - epoch) >= 0 so that wrap-around after 2^31 calls is harmless.
// Buffer reuse: a peer writes our RECV again only in its next dispatch, which follows its combine,
// which waited for OUR combine, which the stream ordered after our experts read RECV; the same chain
// protects BACK. So one set of regions suffices (no double buffering) when every dispatch is
// followed by its combine.

#include "../common/dtypes.cuh"
#include "../common/sys_scope.cuh"

namespace moecomm {

constexpr int LL_MAX_W = 32;     // the CTRL arrays' length (the host allows W <= 8: one node)
constexpr int LL_MAX_T = 1024;   // tokens per rank per call (the host checks max_tokens)
constexpr int LL_THREADS = 256;  // the kernels' block size (the host launches exactly this)

struct Ctrl {
  unsigned int disp_flag[LL_MAX_W];
  int disp_cnt[LL_MAX_W];
  unsigned int comb_flag[LL_MAX_W];
  unsigned int disp_epoch, comb_epoch, disp_ticket, comb_ticket;
  unsigned int error_mask, error_phase, overflow, pad_;
};
static_assert(sizeof(Ctrl) <= 512, "CTRL is 512 bytes");

__device__ __forceinline__ void st_relaxed_sys(int* p, int v) {
  asm volatile("st.relaxed.sys.global.s32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ Ctrl* ctrl_of(long long base) { return reinterpret_cast<Ctrl*>(base); }

// 8 counters of 16 bits in 4 words: lane d is bits 16*(d%2) of word d/2. T <= 1024 < 2^16, so
// packed adds never carry from one lane into the next.
struct Lanes {
  unsigned int w[4];
};
__device__ __forceinline__ unsigned int lane_of(const Lanes& l, int d) { return (l.w[d >> 1] >> (16 * (d & 1))) & 0xffffu; }

// The last block of the grid to get here returns true (after every block's thread 0 ordered its
// block's stores with a system-scope fence); all threads of a block get the same answer.
__device__ __forceinline__ bool last_block(unsigned int* ticket) {
  __shared__ bool s_last;
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence_system();
    s_last = atomicAdd(ticket, 1u) == gridDim.x - 1;
    if (s_last) __threadfence_system();
  }
  __syncthreads();
  return s_last;
}

// Thread s < W of the last block: wait until peer s's flag reaches epoch, or the timeout. Returns
// whether it arrived; a miss is recorded in error_mask / error_phase.
__device__ __forceinline__ bool wait_flag(Ctrl* me, const unsigned int* flag, unsigned int epoch, int s,
                                          long long timeout_ns, unsigned int phase) {
  const unsigned long long start = globaltimer();
  while (static_cast<int>(ld_acquire_sys(flag) - epoch) < 0) {
    if (static_cast<long long>(globaltimer() - start) > timeout_ns) {
      atomicOr(&me->error_mask, 1u << s);
      atomicExch(&me->error_phase, phase);
      return false;
    }
  }
  return true;
}

// fp8 payload (moecomm/ep/ipc/layout.py quantize_fp8_reference is the same arithmetic): per token and
// 128 columns, amax of |x| by a warp (4 columns a lane, a shuffle reduction), scale = amax / 448 (1 for
// an all-zero group), q = cvt.rn.satfinite.e4m3x2 of x / scale (IEEE fp32 division: no fast-math).
// The block stages a token's H bytes and H / 128 scales in shared memory once, then copies that row
// to each destination as the native path copies x. Wire bytes: H + H / 32 a row instead of 2H (bf16).
constexpr int LL_FP8_MAX_H = 16384;  // the staging row's size (the host checks hidden)

__device__ __forceinline__ unsigned short e4m3x2(float hi, float lo) {
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;  // lo in the low byte: little-endian, lo first in memory
}

__device__ __forceinline__ void quantize_token_fp8(const unsigned short* __restrict__ xr, int H, unsigned char* stage) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  for (int g = warp; g < H / 128; g += LL_THREADS / 32) {
    float v[4];
    float a = 0.0f;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      v[q] = __uint_as_float(static_cast<unsigned int>(xr[g * 128 + lane * 4 + q]) << 16);  // bf16 -> fp32: exact
      a = fmaxf(a, fabsf(v[q]));
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) a = fmaxf(a, __shfl_xor_sync(0xffffffffu, a, o));
    const float scale = a > 0.0f ? a / 448.0f : 1.0f;
    const unsigned int lo = e4m3x2(v[1] / scale, v[0] / scale), hi = e4m3x2(v[3] / scale, v[2] / scale);
    reinterpret_cast<unsigned int*>(stage)[g * 32 + lane] = lo | (hi << 16);
    if (lane == 0) reinterpret_cast<float*>(stage + H)[g] = scale;
  }
}

template <bool FP8>
__device__ void ll_dispatch_impl(const unsigned char* __restrict__ x, const int* __restrict__ ids,
                                 const float* __restrict__ weights, const int* __restrict__ e2r,
                                 const int* __restrict__ e2l, const long long* __restrict__ peers, int* __restrict__ home,
                                 int rank, int W, int T, int k, int E, int C, int token_bytes, int row_bytes,
                                 int meta_off, long long recv_off, long long timeout_ns, int vec, int hidden) {
  __shared__ unsigned int s_mask[LL_MAX_T];
  __shared__ Lanes s_pref[LL_MAX_T];  // exclusive prefix: slot of token t among the tokens to rank d
  __shared__ Lanes s_warp[LL_THREADS / 32];
  __shared__ Lanes s_carry;
  __shared__ long long s_peers[LL_MAX_W];
  __shared__ int s_cnt[LL_MAX_W];
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  Ctrl* me = ctrl_of(peers[rank]);
  const unsigned int epoch = *reinterpret_cast<volatile unsigned int*>(&me->disp_epoch) + 1u;
  if (tid < W) s_peers[tid] = peers[tid];
  if (tid == 0) s_carry = Lanes{{0u, 0u, 0u, 0u}};
  __syncthreads();

  // 1. the plan: masks and slots, in chunks of LL_THREADS tokens
  for (int c0 = 0; c0 < T; c0 += LL_THREADS) {
    const int t = c0 + tid;
    unsigned int mask = 0;
    if (t < T) {
      for (int j = 0; j < k; ++j) {
        int e = ids[t * k + j];
        e = e < 0 ? 0 : (e >= E ? E - 1 : e);  // clamped as the NCCL path's plan: never out of bounds
        mask |= 1u << e2r[e];
      }
      s_mask[t] = mask;
    }
    Lanes v{{0u, 0u, 0u, 0u}};
    for (int d = 0; d < W; ++d)
      if (mask >> d & 1u) v.w[d >> 1] += 1u << (16 * (d & 1));
    Lanes inc = v;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        unsigned int u = __shfl_up_sync(0xffffffffu, inc.w[q], o);
        if (lane >= o) inc.w[q] += u;
      }
    }
    if (lane == 31) s_warp[warp] = inc;
    __syncthreads();
    if (tid == 0) {
      Lanes run = s_carry;
      for (int i = 0; i < LL_THREADS / 32; ++i) {
        Lanes tmp = s_warp[i];
        s_warp[i] = run;
#pragma unroll
        for (int q = 0; q < 4; ++q) run.w[q] += tmp.w[q];
      }
      s_carry = run;
    }
    __syncthreads();
    if (t < T) {
      Lanes p;
#pragma unroll
      for (int q = 0; q < 4; ++q) p.w[q] = s_warp[warp].w[q] + inc.w[q] - v.w[q];
      s_pref[t] = p;
    }
    __syncthreads();
  }
  const Lanes total = s_carry;  // rows wanted by each rank
  if (blockIdx.x == 0 && tid < W && static_cast<int>(lane_of(total, tid)) > C) atomicOr(&me->overflow, 1u);

  // 2. rows and home, block b taking tokens b, b + G, ...
  for (int t = blockIdx.x; t < T; t += gridDim.x) {
    const unsigned int mask = s_mask[t];
    const Lanes pref = s_pref[t];
    if (tid < k) {  // home[t, j]: the row (d * C + slot) of the token's first slot on each rank d
      int e = ids[t * k + tid];
      e = e < 0 ? 0 : (e >= E ? E - 1 : e);
      const int d = e2r[e];
      bool owner = true;
      for (int j = 0; j < tid; ++j) {
        int ej = ids[t * k + j];
        ej = ej < 0 ? 0 : (ej >= E ? E - 1 : ej);
        owner = owner && e2r[ej] != d;
      }
      const int slot = static_cast<int>(lane_of(pref, d));
      home[t * k + tid] = owner && slot < C ? d * C + slot : -1;
    }
    const unsigned char* src = x + static_cast<long long>(t) * token_bytes;
    if constexpr (FP8) {
      __shared__ __align__(16) unsigned char s_stage[LL_FP8_MAX_H + LL_FP8_MAX_H / 32];
      __syncthreads();  // the previous token's copies have read the staging row
      quantize_token_fp8(reinterpret_cast<const unsigned short*>(x) + static_cast<long long>(t) * hidden, hidden, s_stage);
      __syncthreads();
      src = s_stage;
    }
    for (int d = 0; d < W; ++d) {
      if (!(mask >> d & 1u)) continue;
      const int slot = static_cast<int>(lane_of(pref, d));
      if (slot >= C) continue;  // dropped, flagged above
      unsigned char* row = reinterpret_cast<unsigned char*>(s_peers[d]) + recv_off +
                           (static_cast<long long>(rank) * C + slot) * row_bytes;
      if (vec) {
        const int n16 = token_bytes >> 4;
        for (int i = tid; i < n16; i += LL_THREADS)
          reinterpret_cast<uint4*>(row)[i] = reinterpret_cast<const uint4*>(src)[i];
      } else {  // 2-byte units: every dtype's rows are a whole number of them
        const int n2 = token_bytes >> 1;
        for (int i = tid; i < n2; i += LL_THREADS)
          reinterpret_cast<unsigned short*>(row)[i] = reinterpret_cast<const unsigned short*>(src)[i];
      }
      if (tid < k) {  // metadata: the local expert ids on rank d (-1: a slot of another rank), weights
        int e = ids[t * k + tid];
        e = e < 0 ? 0 : (e >= E ? E - 1 : e);
        const bool mine = e2r[e] == d;
        int* meta = reinterpret_cast<int*>(row + meta_off);
        meta[tid] = mine ? e2l[e] : -1;
        meta[k + tid] = mine ? __float_as_int(weights[t * k + tid]) : 0;
      }
    }
  }

  // 3. the last block signals every peer, 4. then waits for every peer's rows
  if (!last_block(&me->disp_ticket)) return;
  if (tid < W) {
    Ctrl* peer = ctrl_of(s_peers[tid]);
    const int sent = min(static_cast<int>(lane_of(total, tid)), C);
    st_relaxed_sys(&peer->disp_cnt[rank], sent);
    // this thread's own fence after the barrier: the other threads' rows (ordered before the barrier)
    // and the other blocks' (their fences, our thread 0's) are cumulative into the release below
    __threadfence_system();
    st_release_sys(&peer->disp_flag[rank], epoch);  // orders the count and (through the fences) the rows
  }
  if (tid < W) {
    const bool ok = wait_flag(me, &me->disp_flag[tid], epoch, tid, timeout_ns, 1u);
    // the count was stored before the flag we acquired; a peer that never arrived sent nothing usable:
    // its count is 0 here AND in the word combine reads (a late peer may still overwrite that word:
    // combine clamps it to [0, C], so no count, stale or late, ever indexes past a region)
    const int cnt = ok ? *reinterpret_cast<volatile int*>(&me->disp_cnt[tid]) : 0;
    if (!ok) st_relaxed_sys(&me->disp_cnt[tid], 0);
    s_cnt[tid] = cnt < 0 ? 0 : (cnt > C ? C : cnt);
  }
  __syncthreads();
  // rows past a peer's count are left from earlier calls: their ids -1, so the expansion skips them
  unsigned char* recv = reinterpret_cast<unsigned char*>(s_peers[rank]) + recv_off;
  for (int i = tid; i < W * C * k; i += LL_THREADS) {
    const int row = i / k, j = i - row * k;
    if (row % C >= s_cnt[row / C]) reinterpret_cast<int*>(recv + static_cast<long long>(row) * row_bytes + meta_off)[j] = -1;
  }
  __syncthreads();
  if (tid == 0) {
    me->disp_ticket = 0u;
    me->disp_epoch = epoch;
  }
}

template <typename D>
__device__ void ll_combine_impl(const typename D::raw* __restrict__ expert_out, const int* __restrict__ slot_pos,
                                const long long* __restrict__ peers, int rank, int W, int C, int k, int H, int N,
                                long long back_off, long long timeout_ns, int vec) {
  using raw = typename D::raw;
  constexpr int PACK = 16 / sizeof(raw);
  __shared__ long long s_peers[LL_MAX_W];
  __shared__ int s_cnt[LL_MAX_W];
  __shared__ int s_idx[32];  // this row's expanded rows (k <= 32)
  const int tid = threadIdx.x;
  Ctrl* me = ctrl_of(peers[rank]);
  const unsigned int epoch = *reinterpret_cast<volatile unsigned int*>(&me->comb_epoch) + 1u;
  if (tid < W) {
    s_peers[tid] = peers[tid];
    // the rows each peer sent in the matching dispatch (that dispatch's own wait stored them; a
    // peer writes them again only in its next dispatch, after this combine)
    const int cnt = *reinterpret_cast<volatile int*>(&me->disp_cnt[tid]);
    s_cnt[tid] = cnt < 0 ? 0 : (cnt > C ? C : cnt);  // bounded whatever a timed-out exchange left there
  }
  __syncthreads();
  for (int row = blockIdx.x; row < W * C; row += gridDim.x) {
    const int s = row / C, slot = row - s * C;
    if (slot >= s_cnt[s]) continue;  // not sent this call: the source never reads it
    __syncthreads();
    if (tid < k) {
      const int p = slot_pos[row * k + tid];
      s_idx[tid] = p >= 0 && p < N ? p : -1;
    }
    __syncthreads();
    raw* dst = reinterpret_cast<raw*>(reinterpret_cast<unsigned char*>(s_peers[s]) + back_off) +
               (static_cast<long long>(rank) * C + slot) * H;
    if (vec) {
      for (int c = tid; c < H / PACK; c += LL_THREADS) {
        float acc[PACK];
#pragma unroll
        for (int q = 0; q < PACK; ++q) acc[q] = 0.0f;
        for (int j = 0; j < k; ++j) {  // slot order, as gather_sum
          const int p = s_idx[j];
          if (p < 0) continue;
          Pack16 v = reinterpret_cast<const Pack16*>(expert_out + static_cast<long long>(p) * H)[c];
          const raw* e = reinterpret_cast<const raw*>(&v);
#pragma unroll
          for (int q = 0; q < PACK; ++q) acc[q] += D::load(e[q]);
        }
        Pack16 o;
        raw* oe = reinterpret_cast<raw*>(&o);
#pragma unroll
        for (int q = 0; q < PACK; ++q) oe[q] = D::store(acc[q]);
        reinterpret_cast<Pack16*>(dst)[c] = o;
      }
    } else {
      for (int c = tid; c < H; c += LL_THREADS) {
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) {
          const int p = s_idx[j];
          if (p >= 0) acc += D::load(expert_out[static_cast<long long>(p) * H + c]);
        }
        dst[c] = D::store(acc);
      }
    }
  }
  if (!last_block(&me->comb_ticket)) return;
  if (tid < W) {
    __threadfence_system();  // as in dispatch: every block's partial sums before the flag
    st_release_sys(&ctrl_of(s_peers[tid])->comb_flag[rank], epoch);
  }
  __shared__ bool s_ok[LL_MAX_W];
  if (tid < W) s_ok[tid] = wait_flag(me, &me->comb_flag[tid], epoch, tid, timeout_ns, 2u);
  __syncthreads();
  // a peer that did not arrive contributes 0, not what an earlier call left in its BACK rows (the
  // source's gather_sum reads them next, on this stream): rare, so the cost of zeroing C rows is moot
  for (int s = 0; s < W; ++s) {
    if (s_ok[s]) continue;
    unsigned short* back = reinterpret_cast<unsigned short*>(reinterpret_cast<unsigned char*>(s_peers[rank]) + back_off +
                                                             static_cast<long long>(s) * C * H * sizeof(raw));
    const long long n2 = static_cast<long long>(C) * H * sizeof(raw) / 2;  // every dtype's rows are whole 2-byte units
    for (long long i = tid; i < n2; i += LL_THREADS) back[i] = 0;
  }
  __syncthreads();
  if (tid == 0) {
    me->comb_ticket = 0u;
    me->comb_epoch = epoch;
  }
}

}  // namespace moecomm

extern "C" __global__ void __launch_bounds__(moecomm::LL_THREADS)
moecomm_ll_dispatch(const unsigned char* x, const int* ids, const float* weights, const int* e2r, const int* e2l,
                    const long long* peers, int* home, int rank, int W, int T, int k, int E, int C, int token_bytes,
                    int row_bytes, int meta_off, long long recv_off, long long timeout_ns, int vec) {
  moecomm::ll_dispatch_impl<false>(x, ids, weights, e2r, e2l, peers, home, rank, W, T, k, E, C, token_bytes, row_bytes,
                                   meta_off, recv_off, timeout_ns, vec, 0);
}

// x bf16 [T, hidden], hidden % 128 == 0 and <= LL_FP8_MAX_H; token_bytes = hidden + hidden / 32 (the wire row)
extern "C" __global__ void __launch_bounds__(moecomm::LL_THREADS)
moecomm_ll_dispatch_fp8(const unsigned char* x, const int* ids, const float* weights, const int* e2r, const int* e2l,
                        const long long* peers, int* home, int rank, int W, int T, int k, int E, int C, int token_bytes,
                        int row_bytes, int meta_off, long long recv_off, long long timeout_ns, int vec, int hidden) {
  moecomm::ll_dispatch_impl<true>(x, ids, weights, e2r, e2l, peers, home, rank, W, T, k, E, C, token_bytes, row_bytes,
                                  meta_off, recv_off, timeout_ns, vec, hidden);
}

#define MOECOMM_LL_COMBINE(NAME, D)                                                                          \
  extern "C" __global__ void __launch_bounds__(moecomm::LL_THREADS)                                         \
  NAME(const D::raw* expert_out, const int* slot_pos, const long long* peers, int rank, int W, int C, int k, \
       int H, int N, long long back_off, long long timeout_ns, int vec) {                                    \
    moecomm::ll_combine_impl<D>(expert_out, slot_pos, peers, rank, W, C, k, H, N, back_off, timeout_ns, vec); \
  }

MOECOMM_LL_COMBINE(moecomm_ll_combine_bf16, moecomm::Bf16)
MOECOMM_LL_COMBINE(moecomm_ll_combine_fp16, moecomm::Fp16)
MOECOMM_LL_COMBINE(moecomm_ll_combine_fp32, moecomm::Fp32)
