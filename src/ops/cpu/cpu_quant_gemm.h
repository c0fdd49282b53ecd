// cpu_quant_gemm.h — y = x·Wᵀ on the CPU for quantized weights (the block dtypes of core/dtype.h:
// q8_0 q4_0 q4_1 q5_0 q5_1 q2_k q3_k q4_k q5_k q6_k iq4_nl iq4_xs), f32 activations and output.
// Inference only.
//
// The fast path, as llama.cpp's: each activation row is rounded to int8 in blocks — 32 values
// per f32 scale for the 32-value formats (llama.cpp's q8_0 activations), 256 per scale with
// per-16 sums for the K-quants (its q8_K) — with d = amax/127 and q = round-half-even(x/d)
// (computed as x * (1/d)); then every weight block is dotted with the activation block in
// integers (u8 x s8 multiply-adds) and scaled once per block in f32. The only error beyond
// f32 summation is that activation rounding: |x - d*q| <= d/2 per value, so an output differs
// from the exact product with the dequantized weights by at most sum_blocks (d_b/2) sum|w|.
// ops/ref/ref_quant.h emulates this path exactly in double for the tests.
//
// Variants, chosen at run time from the CPU (__builtin_cpu_supports), each compiled with its
// own target attributes so the build needs no global -mavx512f:
//   avx2         256-bit maddubs/madd (the baseline the build targets, x86-64-v3)
//   avx512       AVX512 F+BW+DQ+VL: 512-bit maddubs/madd for the K-quants, 256-bit (with 32
//                vector registers) for q8_0/q4_0, whose 32-value blocks measured faster so
//   avx512vnni   as avx512 with vpdpbusd / vpdpwssd (plus AVX512_VNNI)
// Threaded with OpenMP, three paths by the number of activation rows n:
//   n = 1 (decode)  each thread's range of weight rows read as 4 far-apart sequential streams,
//                   4 rows at a time (decode_tile in cpu_quant_kernels.h): q4_K/q5_K two rows
//                   per 256-bit vector (AVX2 variant); q8_0/iq4_nl, q4_0 and q4_1/q5_0/q5_1 with
//                   the 4 rows' integer sums reduced across lanes before the float scaling (q4_0
//                   and the latter two blocks per vector against activations regrouped per block
//                   pair, QActs::d4/s4 in cpu_quant_impl.h); the others row by row;
//   n = 2-7         tiles of 2 weight rows against 1-4 activation rows at a time, so each weight
//                   block is unpacked once for them, prefetched one tile ahead;
//   n >= 8          (prefill) packed 8-row tiles (cpu_quant_packed.h).
#pragma once
#include <cstdint>

#include "core/dtype.h"

namespace moe {
namespace cpu {

enum class QuantIsa : uint8_t { Auto, Avx2, Avx512, Avx512Vnni };
const char* quant_isa_name(QuantIsa isa);  // "auto", "avx2", "avx512", "avx512vnni"
bool quant_isa_from_name(const char* s, QuantIsa* out);
// Whether this CPU can run `isa` (Auto: always).
bool quant_isa_supported(QuantIsa isa);
// Forces a variant for the process (tests; benchmarks); Auto = the best this CPU has, which is
// also the default (the environment variable MOE_QUANT_ISA=avx2|avx512|avx512vnni overrides it).
// Throws moe::Error if the CPU lacks it.
void set_quant_isa(QuantIsa isa);
// The variant in use (never Auto).
QuantIsa quant_isa();

// The exact path, for the process (`moe logits`, the reference-test contract; default off): block
// weights are dequantized one chunk of rows at a time and multiplied in f32 by BLAS, so a product
// equals the one with the dequantized weights up to f32 summation — no int8 activation rounding,
// and never the whole matrix in f32. gemm_xwt (cpu_gemm.h) takes it instead of quant_gemm_xwt.
void set_quant_exact(bool exact);
bool quant_exact();

// out [n, ldo] (first m columns written, or added to when accumulate) = x [n, k] · w [m, k]ᵀ,
// w rows of `wdt` blocks (k a multiple of the block size). Activation scratch comes from the
// tracked allocator (Workspace).
void quant_gemm_xwt(float* out, int64_t ldo, const float* x, const void* w, DType wdt, int64_t n, int64_t m,
                    int64_t k, bool accumulate);

// One token's products with several weights of the same row length, out_i [m_i] = x·W_iᵀ:
// attention's q, k and v (which a GGUF mix such as Q4_K_M stores in different types), an
// expert's gate and up. Where the parts' kernels read the activations in one layout (all
// K-quants do), x is rounded once and one parallel region (none inside another) runs every part,
// each thread its share of each part's rows, and consecutive parts of one dtype (up to
// 1 + kQuantMaxSegs, cpu_quant_impl.h) as one set of decode streams; else one quant_gemm_xwt
// per part. The values are those of the separate products.
struct QuantPart {
  const void* w;  // [m, k] rows of wdt blocks
  DType wdt;
  int64_t m;
  float* out;  // [m]
};
void quant_gemv_parts(const float* x, int64_t k, const QuantPart* parts, int n_parts);

// Activation block length the kernels use for weights of `wdt`: 32 (q8_0, q4_0) or 256.
int64_t quant_act_block(DType wdt);

}  // namespace cpu
}  // namespace moe
