// cpu_dot_f64.h — dot products of float rows accumulated in f64: the training attention's
// backward, and the sum of squares both CPU RMSNorm forwards (inference and training) take per
// row, so those two produce the same bits.
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "ops/cpu/cpu_simd_exp.h"

namespace moe {
namespace cpu {

// Σ a[i]·b[i] over n floats, accumulated in f64: four chains of four lanes (one chain waited on
// each FMA's latency: ~5% of the training attention's backward; a 1024-wide RMSNorm row's sum of
// squares ~1 µs of decode, two norms a layer).
inline double dot_f64(const float* a, const float* b, int64_t n) {
  int64_t i = 0;
  double sum = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  for (; i + 16 <= n; i += 16)
    for (int c = 0; c < 4; ++c) {
      const __m256d ac = _mm256_cvtps_pd(_mm_loadu_ps(a + i + 4 * c)), bc = _mm256_cvtps_pd(_mm_loadu_ps(b + i + 4 * c));
      acc[c] = _mm256_fmadd_pd(ac, bc, acc[c]);
    }
  for (; i + 4 <= n; i += 4)
    acc[0] = _mm256_fmadd_pd(_mm256_cvtps_pd(_mm_loadu_ps(a + i)), _mm256_cvtps_pd(_mm_loadu_ps(b + i)), acc[0]);
  sum = hsum4(_mm256_add_pd(_mm256_add_pd(acc[0], acc[1]), _mm256_add_pd(acc[2], acc[3])));
#endif
  for (; i < n; ++i) sum += double(a[i]) * b[i];
  return sum;
}

}  // namespace cpu
}  // namespace moe
