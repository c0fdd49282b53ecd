// linear_gemv.cuh — the bandwidth-bound GEMV core shared by linear_forward (decode) and the
// grouped expert GEMV of expert_ffn_forward. Internal to src/ops/cuda.
//
// One warp computes the dot products of one weight row (or of NW weight rows that share x,
// e.g. w1[e,f,:] and w3[e,f,:]) with up to R rows of x. Weights are read exactly once, 16
// bytes per lane per step, coalesced across the warp; x rows are re-read from L1/L2.
#pragma once
#include "ops/cuda/kernel_util.cuh"

namespace moe {
namespace cuda {

constexpr int64_t kGemvMaxRows = 8;

// acc[j][r] = dot(w[j][0:kd], x[r*ldx + 0:kd]) for j < NW, r < nrows (<= R), reduced over the
// warp (every lane holds the result). `vec` says w rows, x and ldx are 16-byte aligned and kd
// is a multiple of 16/sizeof(TW).
template <class TW, class TX, int R, int NW>
__device__ __forceinline__ void warp_dot_rows(float (&acc)[NW][R], const TW* const (&w)[NW], const TX* x,
                                              int64_t ldx, int nrows, int64_t kd, bool vec) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int j = 0; j < NW; ++j)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[j][r] = 0.f;
  if (vec) {
    constexpr int kVec = 16 / sizeof(TW);
    const int64_t chunks = kd / kVec;
#pragma unroll 2
    for (int64_t c = lane; c < chunks; c += 32) {
      float wv[NW][kVec];
#pragma unroll
      for (int j = 0; j < NW; ++j) load_vec<TW, kVec>(w[j] + c * kVec, wv[j]);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        if (r < nrows) {
          float xv[kVec];
          load_vec<TX, kVec>(x + r * ldx + c * kVec, xv);
#pragma unroll
          for (int j = 0; j < NW; ++j)
#pragma unroll
            for (int i = 0; i < kVec; ++i) acc[j][r] = fmaf(wv[j][i], xv[i], acc[j][r]);
        }
      }
    }
  } else {
    for (int64_t k = lane; k < kd; k += 32) {
      float wv[NW];
#pragma unroll
      for (int j = 0; j < NW; ++j) wv[j] = to_f32(w[j][k]);
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (r < nrows) {
          float xv = to_f32(x[r * ldx + k]);
#pragma unroll
          for (int j = 0; j < NW; ++j) acc[j][r] = fmaf(wv[j], xv, acc[j][r]);
        }
    }
  }
#pragma unroll
  for (int j = 0; j < NW; ++j)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[j][r] = warp_sum(acc[j][r]);
}

inline bool gemv_vec_ok(const void* w, size_t ldw_bytes, const void* x, size_t ldx_bytes) {
  return reinterpret_cast<uintptr_t>(w) % 16 == 0 && ldw_bytes % 16 == 0 &&
         reinterpret_cast<uintptr_t>(x) % 16 == 0 && ldx_bytes % 16 == 0;
}

// out [rows, m] = x [rows, kd] w [m, kd]^T + bias; rows <= kGemvMaxRows. (linear.cu / gemv.cu)
void gemv_forward(void* out, DType to, const void* x, DType tx, const void* w, DType tw, const void* bias, DType tb,
                  int64_t rows, int64_t m, int64_t kd);

// out [rows, m] = x w^T on cuBLAS, x and w of dtype tw; leading dimensions in elements. (linear.cu)
void gemm_nt(void* out, DType to, const void* x, const void* w, DType tw, int64_t rows, int64_t m, int64_t kd,
             int64_t ldx, int64_t ldw, int64_t ldo, float beta);

}  // namespace cuda
}  // namespace moe
