// dtype_avx512.cpp — dtype_avx512.h's rounding, the only function here, compiled for AVX-512
// F/BW (pragma below); dtype.cpp calls it only when the CPU has those.
#if !defined(__clang__)
// GCC 12's AVX-512 intrinsics build vectors from deliberately undefined registers, which
// -Wuninitialized reports once inlined (as in cpu_quant_avx512.cpp).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "core/dtype_avx512.h"

#include "core/dtype.h"

#if defined(__x86_64__)
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw")
#endif

namespace moe {

// f32_to_bf16 on sixteen lanes: (u + 0x7fff + bit 16 of u) >> 16, or for a NaN its top half
// with the quiet bit; every lane is below 2^16, so the truncating narrowing (vpmovdw) is exact.
// From L2, 17.5 G elements/s on a Zen 5 core where the eight-lane loop the compiler makes of
// the scalar rounding runs 7.8 (the bf16 products round their other factor with it per call).
void bf16_from_f32_avx512(uint16_t* dst, const float* src, size_t n) {
  const __m512i one = _mm512_set1_epi32(1), half = _mm512_set1_epi32(0x7fff);
  const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff), inf = _mm512_set1_epi32(0x7f800000);
  const __m512i quiet = _mm512_set1_epi32(0x40);
  size_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512i u = _mm512_loadu_si512(src + i);
    const __m512i hi = _mm512_srli_epi32(u, 16);
    const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(hi, one))), 16);
    const __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, abs_mask), inf);
    const __m512i h = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(hi, quiet));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm512_cvtepi32_epi16(h));
  }
  for (; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}

}  // namespace moe

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else  // not x86-64: never called (cpu_has_avx512() is false)

namespace moe {
void bf16_from_f32_avx512(uint16_t* dst, const float* src, size_t n) {
  for (size_t i = 0; i < n; ++i) dst[i] = f32_to_bf16(src[i]);
}
}  // namespace moe

#endif
