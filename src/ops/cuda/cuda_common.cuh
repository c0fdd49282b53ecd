// cuda_common.cuh — shared helpers for the CUDA backend: error checks, the one stream and
// cuBLAS handle, bf16/f32 load/store helpers. Internal to src/ops/cuda.
//
// All kernels run on one stream (stream()); ops never synchronise the host unless stated.
#pragma once
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "core/error.h"
#include "core/tensor.h"

#define MOE_CUDA_CHECK(expr)                                                                         \
  do {                                                                                               \
    cudaError_t err_ = (expr);                                                                       \
    if (err_ != cudaSuccess)                                                                         \
      ::moe::throw_error(::moe::strformat("CUDA error %s (%s) at %s:%d", cudaGetErrorName(err_),      \
                                          cudaGetErrorString(err_), __FILE__, __LINE__));            \
  } while (0)

#define MOE_CUBLAS_CHECK(expr)                                                                     \
  do {                                                                                             \
    cublasStatus_t st_ = (expr);                                                                   \
    if (st_ != CUBLAS_STATUS_SUCCESS)                                                              \
      ::moe::throw_error(::moe::strformat("cuBLAS error %d at %s:%d", (int)st_, __FILE__, __LINE__)); \
  } while (0)

// Checks the last launch (cheap: no synchronisation).
#define MOE_CUDA_LAUNCH_CHECK() MOE_CUDA_CHECK(cudaGetLastError())

namespace moe {
namespace cuda {

cudaStream_t stream();
cublasHandle_t cublas();
// cuBLAS is loaded with dlopen when the first GPU is initialised, not linked: its libraries
// (libcublasLt alone is ~540 MB) cost ~0.9 s of start-up in every process otherwise, GPU or
// not — every CLI command and every test process paid it. The entry points the backend uses:
struct CublasApi {
  decltype(&cublasCreate_v2) create = nullptr;
  decltype(&cublasSetStream_v2) set_stream = nullptr;
  cublasStatus_t (*gemm_ex)(cublasHandle_t, cublasOperation_t, cublasOperation_t, int m, int n, int k,
                            const void* alpha, const void* a, cudaDataType a_type, int lda, const void* b,
                            cudaDataType b_type, int ldb, const void* beta, void* c, cudaDataType c_type, int ldc,
                            cublasComputeType_t compute, cublasGemmAlgo_t algo) = nullptr;  // (the C entry point)
};
const CublasApi& cublas_api();
// A device workspace of at least `bytes` owned by the backend (grown on demand, never shrunk);
// tagged Workspace in the memory tracker.
void* workspace(size_t bytes);
// Pinned host scratch of at least `bytes` (for small device->host reads such as expert counts).
void* pinned_scratch(size_t bytes);
int sm_count();

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_f32(__half x) { return __half2float(x); }
template <class T>
__device__ __forceinline__ T from_f32(float x);
template <>
__device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float x) { return __float2bfloat16(x); }
template <>
__device__ __forceinline__ __half from_f32<__half>(float x) { return __float2half(x); }

inline unsigned ceil_div(int64_t a, int64_t b) { return static_cast<unsigned>((a + b - 1) / b); }

}  // namespace cuda
}  // namespace moe

// Calls F<T>(args...) with T the CUDA element type of dtype `dt` (f32, bf16, f16).
#define MOE_CUDA_FLOAT_SWITCH(dt, T, ...)                                           \
  do {                                                                              \
    switch (dt) {                                                                   \
      case ::moe::DType::F32: { using T = float; __VA_ARGS__; break; }              \
      case ::moe::DType::BF16: { using T = __nv_bfloat16; __VA_ARGS__; break; }     \
      case ::moe::DType::F16: { using T = __half; __VA_ARGS__; break; }             \
      default: MOE_FAIL("CUDA: unsupported dtype %s", ::moe::dtype_name(dt));        \
    }                                                                               \
  } while (0)
