// ref_quant.h — naive references for the quantized CPU kernels (ops/cpu/cpu_quant_gemm.h),
// plain loops in double. Internal to src/ops and the op tests.
//
// Two products of x [n,k] (f32) and a quantized weight w [m,k] (block dtype, core/dtype.h):
//   exact:  out = x · dequant(w)ᵀ — the weights dequantized as the format defines them
//           (core/quant.h), every product and sum in double. This is what linear_forward /
//           expert_ffn_forward compute on the reference backend (moe --reference).
//   int8:   out = x̂ · dequant(w)ᵀ with x̂ the activations as the fast kernels round them: per
//           block of B values (B = 32 for q8_0/q4_0 weights, 256 for the K-quants),
//           d = amax/127 (f32), q = round-half-even(x · (1/d)) (f32 product), x̂ = d·q.
//           The fast kernels equal it up to f32 summation.
// The difference of the two is bounded per output by act_rounding_bound: Σ_blocks (d_b/2)·Σ|w|.
#pragma once
#include <cstdint>
#include <vector>

#include "core/dtype.h"

namespace moe {
namespace ref {

// Rounds one activation row of k values (k a multiple of blk) as the fast kernels do:
// q [k] int8, d [k/blk] scales.
void quantize_act_row(const float* x, int64_t k, int64_t blk, int8_t* q, float* d);

// out [n,m] = x [n,k] · dequant(w [m,k])ᵀ in double (exact), or with x rounded as above (int8).
void quant_gemm_xwt_exact(double* out, const float* x, const void* w, DType wdt, int64_t n, int64_t m, int64_t k);
void quant_gemm_xwt_int8(double* out, const float* x, const void* w, DType wdt, int64_t n, int64_t m, int64_t k);

// bound [n,m]: Σ_blocks (d_b/2) · Σ_{j in block} |dequant(w)[m,j]| — the largest difference the
// activation rounding can make to each output.
void act_rounding_bound(double* bound, const float* x, const void* w, DType wdt, int64_t n, int64_t m, int64_t k);

}  // namespace ref
}  // namespace moe
