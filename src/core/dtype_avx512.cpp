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

#include "core/bf16_avx512.h"

namespace moe {

// bf16_bits16 a vector at a time; every lane is below 2^16, so the truncating narrowing
// (vpmovdw) is exact. From L2, 17.5 G elements/s on a Zen 5 core, where the eight-lane loop the
// compiler makes of the scalar rounding runs 7.8 (the bf16 products round their other factor
// with it per call).
void bf16_from_f32_avx512(uint16_t* dst, const float* src, size_t n) {
  size_t i = 0;
  for (; i + 16 <= n; i += 16) store_bf16x16(dst + i, _mm512_loadu_ps(src + i));
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
