// cpu_gemm.h — the CPU matrix products behind linear and expert ops.
//
// out[n, m] (+)= sum_k x[n, k] * w[m, k]  — "x times w transposed", w in its stored dtype
// (f32, bf16, f16). Large n goes through BLAS sgemm (bf16/f16 weights converted to f32 in
// row chunks); small n (decode) through a bandwidth-bound kernel that reads each weight row
// once for all n rows of x, converting on the fly. Threaded with OpenMP / OpenBLAS.
// gemm_xwt also takes the quantized block dtypes (inference): it hands them to
// quant_gemm_xwt (cpu_quant_gemm.h), which rounds x to int8 blocks; and bf16 weights with more
// rows than decode streams to oneDNN's bf16 matmul where the CPU has AMX or AVX512-BF16
// (cpu_gemm_onednn.h), which rounds x to bf16 — where the process chose that (Bf16Gemm::Matrix:
// inference, and training whose weights are bf16), in the backward's products too. Panel-packed
// bf16 weights (DType::BF16P, the inference commands' layout on AVX512-BF16) go to their own
// kernel at every row count (cpu_gemm_bf16dot.h; AMX tiles from 2 rows, cpu_gemm_amx.h); under Bf16Gemm::Matrix weights of fewer than
// 16 rows (routers) are multiplied row by row in f32, the same bits at every row count.
#pragma once
#include <cstdint>

#include "core/dtype.h"

namespace moe {
namespace cpu {

// out [n, ldo] (first m columns written), x [n, k] dense, w [m, k] dense in dtype wdt.
void gemm_xwt(float* out, int64_t ldo, const float* x, const void* w, DType wdt, int64_t n, int64_t m, int64_t k,
              bool accumulate);

// The two products of a linear layer's backward.
// out [n, k] (+)= x [n, m] · w [m, k], w dense in dtype wdt (dX = dY·W).
void gemm_xw(float* out, const float* x, const void* w, DType wdt, int64_t n, int64_t m, int64_t k, bool accumulate);
// dw [m, ldw] (+)= dy [n, ldy]ᵀ · x [n, k]  (dW += dYᵀ·X, or dW = dYᵀ·X when not accumulate — dw's
// old values then never read; dy's first m columns), in f32. wdt is the weight's dtype in the
// forward: bf16 weights whose products run on the matrix units (mixed-precision training,
// Bf16Gemm::Matrix) round dy and x to bf16 here too, as the forward did x.
void gemm_atb(float* dw, int64_t ldw, const float* dy, int64_t ldy, const float* x, DType wdt, int64_t n, int64_t m,
              int64_t k, bool accumulate);
// Both: dx [n, k] (+)= dy [n, m] · w (accumulate) and dw [m, k] += dyᵀ · x [n, k] (= under
// assign_dw) — the values of gemm_xw then gemm_atb, with dy rounded to bf16 once for the two on
// the matrix units.
void gemm_xw_atb(float* dx, float* dw, const float* dy, const float* x, const void* w, DType wdt, int64_t n, int64_t m,
                 int64_t k, bool accumulate, bool assign_dw);
// The same from dy given in bf16 (already rounded: the LM head rounds its gradient so, in place);
// dx or dw null: that product is not wanted. Off the matrix units dy is widened to f32.
void gemm_xw_atb(float* dx, float* dw, const uint16_t* dy, const float* x, const void* w, DType wdt, int64_t n,
                 int64_t m, int64_t k, bool accumulate, bool assign_dw);

// Whether products on weights of dtype wdt run on the matrix units, their other factor rounded
// to bf16 (bf16 weights under Bf16Gemm::Matrix, off the exact path).
bool bf16_matrix_applies(DType wdt);

// sum_i a[i] * b[i] with AVX2 FMA (8 lanes x 2 accumulators).
float dot_f32(const float* a, const float* b, int64_t n);

// Rows at or below this count take the streaming (GEMV-like) path.
constexpr int64_t kGemvMaxRows = 8;

// Rows of x up to which gemm_xwt on weights of dtype wdt reads each weight row from memory once
// for all of them and runs on the calling thread alone inside a parallel region (the batched
// decode's experts, cpu_moe.cpp): 64 where bf16 weights take the bf16 dot kernel
// (cpu_gemm_bf16dot.h), 16 otherwise.
int64_t gemm_stream_rows(DType wdt);

}  // namespace cpu
}  // namespace moe
