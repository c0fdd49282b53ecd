// cpu_gemm_onednn.h — bf16 GEMMs on the CPU's matrix units (AMX, AVX512-BF16) through oneDNN.
//
// Prefill-sized products with bf16 weights (more rows of x than the streaming kernel takes) can
// run in bf16 where the CPU multiplies bf16 natively: x rounded to bf16 (round to nearest even),
// products accumulated in f32. Training with bf16 weights (mixed precision, a bf16 frozen base)
// runs its backward's products the same way: dX = dY·W with dY rounded, and dW += dYᵀ·X with
// both rounded, as torch's bf16 autocast does. oneDNN (Debian's libdnnl-dev) picks its AMX or
// AVX512-BF16 kernel
// at run time; where neither exists (AVX2), or oneDNN is not built in, gemm_xwt keeps its f32
// path (the weights widened to f32 in cache, then sgemm). The exact path (`moe logits` without
// --fast, cpu::set_quant_exact(true)) never rounds x: there the f32 path runs on every CPU.
//
// The same wrapper runs f32 weights with f32 x (an f32 matmul), which every CPU has: the tests
// check the layout (strides, ldo, accumulation, padded row counts) on this path everywhere, and
// the bf16 path itself where the CPU has it.
#pragma once
#include <cstdint>
#include <string>

#include "core/dtype.h"

namespace moe {
namespace cpu {

// Which product gemm_xwt gives prefill-sized bf16-weight GEMMs.
enum class Bf16Gemm {
  Widen,   // bf16 weights widened to f32 in cache, f32 sgemm (x exact)
  Matrix,  // x rounded to bf16, oneDNN's bf16 matmul on the matrix units
};

// True when oneDNN is built in and its effective ISA multiplies bf16 natively.
bool bf16_matrix_available();
// oneDNN's effective ISA in words ("avx512_core_amx", "avx2", ... or "none: built without oneDNN").
std::string onednn_isa_name();

// The mode for the process. The library's default is Widen (x exact, as the tests' bounds
// assume on every CPU), or Matrix with MOE_BF16_GEMM=matrix in the environment; asking for
// Matrix where it is not available is an error.
void set_bf16_gemm(Bf16Gemm mode);
Bf16Gemm bf16_gemm();
// The inference commands (generate, serve, perplexity, logits --fast, bench): Matrix where
// available, unless MOE_BF16_GEMM=widen.
void use_bf16_matrix_where_available();

// The products of a linear layer through oneDNN's matmul, w bf16 (the f32 factors rounded to
// bf16, to nearest even) or f32 (factors as they are), accumulated in f32. Threads: oneDNN's
// own (OpenMP) at the top level; inside a parallel region the calling thread alone (training's
// experts, each thread its own rows).
// out [n, ldo] (+)= x [n, k] · w [m, k]ᵀ  (forward)
void onednn_gemm_xwt(float* out, int64_t ldo, const float* x, const void* w, DType wdt, int64_t n, int64_t m,
                     int64_t k, bool accumulate);
// out [n, k] (+)= x [n, ldx] · w [m, k]: x's first m columns  (dX = dY·W)
void onednn_gemm_xw(float* out, const float* x, int64_t ldx, const void* w, DType wdt, int64_t n, int64_t m,
                    int64_t k, bool accumulate);
// dw [m, ldw] (+)= dy [n, ldy]ᵀ · x [n, ldx]: dy's first m and x's first k columns (dW += dYᵀ·X,
// or dW = dYᵀ·X when not accumulate), both rounded to dt (bf16 or f32).
void onednn_gemm_atb(float* dw, int64_t ldw, const float* dy, int64_t ldy, const float* x, int64_t ldx, DType dt,
                     int64_t n, int64_t m, int64_t k, bool accumulate);
// Both products of a linear layer's backward on bf16 weights w [m, k], dy [n, m] rounded to
// bf16 once for the two (as each of the two calls above would round it), or given in bf16:
//   dx [n, k] (+)= dy · w (accumulate);   dw [m, k] += dyᵀ · x [n, k] (= under assign_dw)
// dx or dw null: that product is not wanted.
void onednn_linear_backward_bf16(float* dx, float* dw, const float* dy, const float* x, const void* w, int64_t n,
                                 int64_t m, int64_t k, bool accumulate, bool assign_dw);
void onednn_linear_backward_bf16(float* dx, float* dw, const uint16_t* dy, const float* x, const void* w, int64_t n,
                                 int64_t m, int64_t k, bool accumulate, bool assign_dw);

}  // namespace cpu
}  // namespace moe
