// cpu_gemm_bf16dot.h — batched-decode products of bf16 weights on AVX512-BF16 (vdpbf16ps).
//
// Serving's batched decode multiplies 2-16 rows of x against each bf16 weight matrix: too few
// rows for a GEMM library, too many for the f32 streaming kernel (cpu_gemm.cpp) to keep up with
// memory — it widens every weight to f32 and runs 8-wide FMAs, and at 16 rows a step's GEMVs
// measured compute-bound (about 110 GFLOP/s on two Zen 4 cores, where memory alone would allow
// twice the tokens). vdpbf16ps multiplies 32 bf16 pairs per instruction straight from the
// stored weights, so the product runs at the speed of memory again.
//
// Numerics as the oneDNN matrix path (cpu_gemm_onednn.h): x rounded to bf16 (to nearest even),
// bf16 x bf16 products exact, accumulated in f32. So gemm_xwt takes this kernel only where the
// process opted into bf16 rounding (Bf16Gemm::Matrix: the inference commands) and never on the
// exact path. The reference is the float64 product of the rounded x (tests/test_gemm_onednn.cpp,
// tests/test_bf16_panels.cpp).
//
// Row-order weights need a horizontal sum per output (a quarter of the dot kernel's
// instructions at 16 rows); weights the inference commands rearranged into 16-row panels
// (core/bf16_panels.h) keep 16 outputs in a register and run at every row count, prefill too.
#pragma once
#include <cstdint>

namespace moe {
namespace cpu {

// True when the CPU has AVX512-BF16 (with AVX512F/BW/VL), which the kernel needs.
bool bf16dot_available();

// out [n, ldo] (+)= bf16(x) [n, k] · w [m, k]ᵀ, w bf16. Any n (the kernel is built for 2-16),
// m, k. Threads: OpenMP over the rows of w, or the calling thread alone inside a parallel
// region. Requires bf16dot_available().
void gemm_xwt_bf16dot(float* out, int64_t ldo, const float* x, const uint16_t* w, int64_t n, int64_t m, int64_t k,
                      bool accumulate);

// out [n, ldo] (+)= bf16(x) [n, k] · w [m, k]ᵀ, w in 16-row panels (DType::BF16P,
// core/bf16_panels.h: m a multiple of 16, k even). Any n: up to 16 rows of x in one group, a
// register a row against each panel in turn (decode); more rows in groups of up to 12 against
// pairs of panels (prefill); 4 groups per pass over the weight. Where the CPU has AMX, 2 rows
// and more with k a multiple of 32 go to its tiles instead (cpu_gemm_amx.h). Threads as
// gemm_xwt_bf16dot (over panels). Numerics as gemm_xwt_bf16dot; each output's sum runs in the
// same order at every n (on AMX: at every n from 2), so a row's result is the same bits whatever
// rows come with it (batch-invariant; a lone row on an AMX CPU agrees to f32 rounding).
// Requires bf16dot_available().
void gemm_xwt_bf16panels(float* out, int64_t ldo, const float* x, const uint16_t* wp, int64_t n, int64_t m, int64_t k,
                         bool accumulate);

// What runs gemm_xwt_bf16panels on this CPU, for messages: "AVX512-BF16", or "AVX512-BF16 for one
// row, AMX tiles from 2 rows".
const char* bf16panels_kernels();

}  // namespace cpu
}  // namespace moe
