// bf16_avx512.h — f32_to_bf16 (dtype.h) on sixteen lanes, for code compiled for AVX-512 F/BW:
// include it only after that target is in force (the including file's pragma), as
// dtype_avx512.cpp and adamw_lanes.h's sixteen-lane copy do.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace moe {

// The bf16 bits of sixteen f32 values (as 32-bit lanes, each below 2^16): rounded to
// nearest-even, or for a NaN its top half with the quiet bit set.
inline __m512i bf16_bits16(__m512i u) {
  const __m512i hi = _mm512_srli_epi32(u, 16);
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(hi, _mm512_set1_epi32(1)));
  const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  const __mmask16 nan =
      _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  return _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(hi, _mm512_set1_epi32(0x40)));
}

// Stores sixteen f32 values rounded to bf16 at `at`; returns their bf16 bits (as bf16_bits16).
// Every lane is below 2^16, so the truncating 32 -> 16 bit narrowing (vpmovdw) is exact.
inline __m512i store_bf16x16(uint16_t* at, __m512 x) {
  const __m512i h = bf16_bits16(_mm512_castps_si512(x));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(at), _mm512_cvtepi32_epi16(h));
  return h;
}

}  // namespace moe
