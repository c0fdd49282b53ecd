// mma_util.cuh — the inline-PTX building blocks shared by the tensor-core kernels (grouped
// expert GEMM, flash attention): cp.async 16-byte copies, ldmatrix, and the m16n8k16 mma with
// f32 accumulation. They need sm_80+; older targets compile a trap, and the host never selects
// a tensor-core path on such a GPU.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define MOE_PTX_UNSUPPORTED 1
#endif

namespace moe {
namespace cuda {
namespace ptx {

// Copies 16 bytes global -> shared asynchronously; zero-fills the destination when !valid.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
#ifdef MOE_PTX_UNSUPPORTED
  __trap();
#else
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  int sz = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(sz));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifndef MOE_PTX_UNSUPPORTED
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most N committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifndef MOE_PTX_UNSUPPORTED
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
#ifdef MOE_PTX_UNSUPPORTED
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();
#else
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem) {
#ifdef MOE_PTX_UNSUPPORTED
  r[0] = r[1] = r[2] = r[3] = 0;
  __trap();
#else
  unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
#endif
}

// d += a * b for one m16n8k16 tile; T is the 16-bit input type (bf16 or f16).
template <class T>
__device__ __forceinline__ void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);

template <>
__device__ __forceinline__ void mma16816<__nv_bfloat16>(float (&d)[4], const unsigned (&a)[4], unsigned b0,
                                                        unsigned b1) {
#ifdef MOE_PTX_UNSUPPORTED
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma16816<__half>(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#ifdef MOE_PTX_UNSUPPORTED
  __trap();
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

}  // namespace ptx
}  // namespace cuda
}  // namespace moe
