// cpu_norm_rows.h — the sum of squares both CPU RMSNorm forwards (inference and training) take
// per row, so they produce the same bits.
#pragma once
#include <immintrin.h>

#include <cstdint>

namespace moe {
namespace cpu {

// Σ x[i]² in f64 (each square exact in f64): four chains of four lanes where the build has AVX2.
// One scalar chain waited on every add: ~1 µs of a 1024-wide decode row, two norms a layer.
inline double sum_squares_f64(const float* x, int64_t n) {
  int64_t i = 0;
  double ss = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256d a[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
  for (; i + 16 <= n; i += 16)
    for (int c = 0; c < 4; ++c) {
      const __m256d v = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4 * c));
      a[c] = _mm256_fmadd_pd(v, v, a[c]);
    }
  const __m256d s = _mm256_add_pd(_mm256_add_pd(a[0], a[1]), _mm256_add_pd(a[2], a[3]));
  alignas(32) double t[4];
  _mm256_store_pd(t, s);
  ss = (t[0] + t[1]) + (t[2] + t[3]);
#endif
  for (; i < n; ++i) ss += double(x[i]) * x[i];
  return ss;
}

}  // namespace cpu
}  // namespace moe
