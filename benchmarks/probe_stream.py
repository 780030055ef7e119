"""How fast one thread block streams one row: sample.cu's pass A loop (fp64 sum, max, one shared
histogram atomic a token) at its UNROLL, with more loads in flight, and with the next loads issued
before the current ones are used (software pipelining), on one GPU.

    python -m benchmarks.probe_stream          # B128 V128256 (one 1024-thread block a row) and B1

# B = rows, V = vocab, U = 16-byte loads a thread issues at once, PIPE = loads issued one step ahead

sample.cu's pass A is ~22 us at B128 V128256 (23 GB/s an SM, 2.9 TB/s in all) where a copy of the
same bytes at HBM speed takes ~15 us; this probe says whether more bytes in flight an SM would
close that gap (CUDA-graph replay of 20 launches, three input sets rotated past the L2; a control
row times the current loop twice). Compiled by cupy (NVRTC): a probe, not a part of the library.
"""

from __future__ import annotations

import torch

SRC = r"""
template <int U, int PIPE>
__device__ __forceinline__ void stream(const float4* __restrict__ x, int nq, double* out, unsigned* hist) {
  const int T = blockDim.x, t = threadIdx.x;
  double s = 0.0;
  float mx = 0.0f;
  auto body = [&](float4 q) {
    const float v[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      s += static_cast<double>(v[j]);
      mx = fmaxf(mx, v[j]);
      if (v[j] > 0.0f) atomicAdd(&hist[__float_as_uint(v[j]) >> 20], 1u);
    }
  };
  if (PIPE == 0) {
    for (int base = 0; base < nq; base += U * T) {
      float4 a[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int q = base + u * T + t;
        a[u] = q < nq ? __ldg(x + q) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) body(a[u]);
    }
  } else {
    float4 a[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int q = u * T + t;
      a[u] = q < nq ? __ldg(x + q) : make_float4(0.f, 0.f, 0.f, 0.f);
    }
    for (int base = 0; base < nq; base += U * T) {
      float4 b[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int q = base + U * T + u * T + t;
        b[u] = q < nq ? __ldg(x + q) : make_float4(0.f, 0.f, 0.f, 0.f);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) body(a[u]);
#pragma unroll
      for (int u = 0; u < U; ++u) a[u] = b[u];
    }
  }
  __shared__ double red[32];
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if ((t & 31) == 0) red[t >> 5] = s + mx;
  __syncthreads();
  if (t == 0) {
    double r = 0.0;
    for (int w = 0; w < T / 32; ++w) r += red[w];
    out[blockIdx.x] = r + hist[t];
  }
}

#define PROBE(U, P)                                                                               \
  extern "C" __global__ void __launch_bounds__(1024, 1) stream_u##U##_p##P(const float4* x, int nq, \
                                                                          long long rs, double* out) { \
    __shared__ unsigned hist[2048];                                                               \
    for (int b = threadIdx.x; b < 2048; b += blockDim.x) hist[b] = 0;                             \
    __syncthreads();                                                                              \
    stream<U, P>(x + blockIdx.x * rs, nq, out, hist);                                             \
  }
PROBE(4, 0)
PROBE(8, 0)
PROBE(16, 0)
PROBE(2, 1)
PROBE(4, 1)
"""

VARIANTS = ["stream_u4_p0", "stream_u8_p0", "stream_u16_p0", "stream_u2_p1", "stream_u4_p1", "stream_u4_p0"]


def main() -> int:
    if not torch.cuda.is_available():
        print("probe_stream times GPU kernels: it needs a CUDA GPU (none is visible here)")
        return 2
    import cupy as cp

    from moecomm.testing import graph_bench

    mod = cp.RawModule(code=SRC, options=("-std=c++17", "--use_fast_math"), name_expressions=None)
    dev = torch.device("cuda")
    for batch, vocab in ((128, 128256), (1, 128256), (132, 128256)):
        sets = [(torch.softmax(torch.randn(batch, vocab, device=dev) * 3, -1),) for _ in range(3)]
        out = torch.empty(batch, dtype=torch.float64, device=dev)
        nq = vocab // 4
        copy_src = torch.empty(batch * vocab, device=dev)
        copy_dst = torch.empty_like(copy_src)
        t_copy = graph_bench(lambda: copy_dst.copy_(copy_src), [()], replays=30).median_ms * 1e3
        print(f"B{batch} V{vocab}: {batch * vocab * 4 / 1e6:.1f} MB a pass; a device copy of it {t_copy:.1f} us "
              f"(read + write)")
        for name in VARIANTS:
            fn = mod.get_function(name)

            def launch(x, fn=fn):  # on torch's current stream (graph_bench's side and capture streams)
                with cp.cuda.ExternalStream(torch.cuda.current_stream().cuda_stream):
                    fn((batch,), (1024,), (cp.uint64(x.data_ptr()), cp.int32(nq), cp.int64(vocab // 4),
                                          cp.uint64(out.data_ptr())))

            t = graph_bench(launch, sets, replays=30, calls=20).median_ms * 1e3
            print(f"  {name}: {t:6.1f} us ({batch * vocab * 4 / t / 1e3:6.0f} GB/s, "
                  f"{vocab * 4 / t / 1e3:5.1f} GB/s a block)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
