// Scalar conversions between the storage dtypes and fp32, in inline PTX so that the kernels need no
// CUDA header (cuda_bf16.h / cuda_fp16.h): the same source compiles with nvcc and with NVRTC, which
// finds no system include path by default. No torch headers either: kernels see raw pointers.
#pragma once

namespace moecomm {

// bf16 is the top half of an fp32: widening is a shift, exact.
__device__ __forceinline__ float bf16_to_float(unsigned short h) {
  return __uint_as_float(static_cast<unsigned int>(h) << 16);
}

// Round to nearest even, NaN kept NaN: the rounding torch uses for .to(torch.bfloat16) (sm_80+).
__device__ __forceinline__ unsigned short float_to_bf16(float f) {
  unsigned short h;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

__device__ __forceinline__ float fp16_to_float(unsigned short h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}

__device__ __forceinline__ unsigned short float_to_fp16(float f) {
  unsigned short h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}

// Storage type -> (raw bits, fp32) conversions, one specialisation per dtype the kernels take.
struct Bf16 {
  using raw = unsigned short;
  static __device__ __forceinline__ float load(raw v) { return bf16_to_float(v); }
  static __device__ __forceinline__ raw store(float f) { return float_to_bf16(f); }
};

struct Fp16 {
  using raw = unsigned short;
  static __device__ __forceinline__ float load(raw v) { return fp16_to_float(v); }
  static __device__ __forceinline__ raw store(float f) { return float_to_fp16(f); }
};

struct Fp32 {
  using raw = float;
  static __device__ __forceinline__ float load(raw v) { return v; }
  static __device__ __forceinline__ raw store(float f) { return f; }
};

}  // namespace moecomm
