// kernel_util.cuh — device helpers shared by the CUDA op files: warp reductions, loads/stores
// whose element type is chosen at run time (for secondary operands of memory-bound kernels,
// where a uniform branch costs nothing next to the memory traffic), 16-byte vector loads
// converted to f32, and the dtype -> cudaDataType map for cuBLAS. Internal to src/ops/cuda.
#pragma once
#include <cstdint>

#include "ops/cuda/cuda_common.cuh"

namespace moe {
namespace cuda {

// Element type codes passed to kernels when the type is a run-time choice.
enum class Elt : int { F32 = 0, BF16 = 1, F16 = 2 };

inline Elt elt_of(DType dt) {
  switch (dt) {
    case DType::F32: return Elt::F32;
    case DType::BF16: return Elt::BF16;
    case DType::F16: return Elt::F16;
    default: MOE_FAIL("CUDA: unsupported float dtype %s", dtype_name(dt));
  }
}

inline cudaDataType_t cuda_dtype(DType dt) {
  switch (dt) {
    case DType::F32: return CUDA_R_32F;
    case DType::BF16: return CUDA_R_16BF;
    case DType::F16: return CUDA_R_16F;
    default: MOE_FAIL("CUDA: unsupported float dtype %s for cuBLAS", dtype_name(dt));
  }
}

__device__ __forceinline__ float load_rt(const void* p, Elt t, int64_t i) {
  switch (t) {
    case Elt::BF16: return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    case Elt::F16: return __half2float(static_cast<const __half*>(p)[i]);
    default: return static_cast<const float*>(p)[i];
  }
}

__device__ __forceinline__ void store_rt(void* p, Elt t, int64_t i, float v) {
  switch (t) {
    case Elt::BF16: static_cast<__nv_bfloat16*>(p)[i] = __float2bfloat16(v); break;
    case Elt::F16: static_cast<__half*>(p)[i] = __float2half(v); break;
    default: static_cast<float*>(p)[i] = v; break;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Loads N consecutive elements of T at p (which must be aligned to N*sizeof(T) bytes when
// N*sizeof(T) is 8 or 16, or a multiple of 16) and converts them to f32.
template <class T, int N>
__device__ __forceinline__ void load_vec(const T* p, float* out) {
  constexpr int kBytes = N * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < N / kPer; ++c) {
      uint4 u = __ldg(reinterpret_cast<const uint4*>(p) + c);
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int i = 0; i < kPer; ++i) out[c * kPer + i] = to_f32(e[i]);
    }
  } else if constexpr (kBytes == 8) {
    uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f32(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < N; ++i) out[i] = to_f32(p[i]);
  }
}

__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

}  // namespace cuda
}  // namespace moe

// Calls the body with T the CUDA element type of `dt`, restricted to f32 and bf16 (plus f16),
// nested twice: for kernels templated on an input type and an output type.
#define MOE_CUDA_FLOAT_SWITCH2(dt1, T1, dt2, T2, ...) \
  MOE_CUDA_FLOAT_SWITCH(dt1, T1, MOE_CUDA_FLOAT_SWITCH(dt2, T2, __VA_ARGS__))
