// cpu_glu.h — the routed experts' gated activation per element and its derivatives (variants.h
// ExpertGlu), and expert bias rows, shared by the CPU inference and training expert kernels.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "core/dtype.h"
#include "ops/cpu/cpu_simd_exp.h"
#include "ops/variants.h"

namespace moe {
namespace cpu {

// act(h1, h3): silu(h1)·h3 (plain), or g·sigmoid(alpha·g)·(u + 1) with g = min(h1, limit),
// u = clamp(h3, -limit, limit).
inline float glu_act(float h1, float h3, const ExpertGlu& glu) {
  if (glu.plain()) return h1 / (1.0f + std::exp(-h1)) * h3;
  const float g = std::min(h1, glu.limit), u = std::clamp(h3, -glu.limit, glu.limit);
  return g / (1.0f + std::exp(-glu.alpha * g)) * (u + 1.0f);
}

// ∂act/∂h1 and ∂act/∂h3. A clamp passes the gradient where its input lies inside the closed
// range (torch.clamp's rule) and none where it binds.
inline void glu_grad(float h1, float h3, const ExpertGlu& glu, float* d1, float* d3) {
  if (glu.plain()) {
    const float sg = 1.0f / (1.0f + std::exp(-h1));
    *d1 = h3 * sg * (1.0f + h1 * (1.0f - sg));
    *d3 = h1 * sg;
    return;
  }
  const float g = std::min(h1, glu.limit), u = std::clamp(h3, -glu.limit, glu.limit);
  const float sg = 1.0f / (1.0f + std::exp(-glu.alpha * g));
  *d1 = h1 <= glu.limit ? sg * (1.0f + glu.alpha * g * (1.0f - sg)) * (u + 1.0f) : 0.0f;
  *d3 = h3 >= -glu.limit && h3 <= glu.limit ? g * sg : 0.0f;
}

inline float sigmoid(float a) { return 1.0f / (1.0f + std::exp(-a)); }

#if defined(__AVX2__) && defined(__FMA__)
inline __m256 exp8(__m256 x) {
  return _mm256_set_m128(exp4(_mm256_extractf128_ps(x, 1)), exp4(_mm256_castps256_ps128(x)));
}

inline __m256 sigmoid8(__m256 a) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_xor_ps(a, _mm256_set1_ps(-0.0f)))));
}

// The same from exp8f's f32 lanes (within a few ulp; no expf rounding): training's expert
// rows, forward and backward; inference keeps sigmoid8.
inline __m256 sigmoid8f(__m256 a) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8f(_mm256_xor_ps(a, _mm256_set1_ps(-0.0f)))));
}

#endif

// One row of F: a = silu(h1) · h3 · s (the down projection's input), eight lanes at a time
// with the e^x of cpu_simd_exp.h: expf's rounding but for 0.008% of arguments (inference), or
// exp8f's f32 lanes (ExpfRounding false: training's rows, whose backward uses sigmoid8f too).
template <bool ExpfRounding = true>
inline void swiglu_row(float* a, const float* h1, const float* h3, float s, int64_t f) {
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 sv = _mm256_set1_ps(s);
  for (; i + 8 <= f; i += 8) {
    const __m256 v = _mm256_loadu_ps(h1 + i), sg = ExpfRounding ? sigmoid8(v) : sigmoid8f(v);
    _mm256_storeu_ps(a + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(v, sg), _mm256_loadu_ps(h3 + i)), sv));
  }
#endif
  for (; i < f; ++i) a[i] = h1[i] * sigmoid(h1[i]) * h3[i] * s;
}

// Row e of a bias [E, n] (any float dtype) as f32 into dst[n].
inline void bias_row(float* dst, const Tensor& b, int64_t e, int64_t n) {
  convert_to_f32(dst, static_cast<const char*>(b.raw()) + dtype_nbytes(b.dtype(), e * n), b.dtype(), size_t(n));
}

}  // namespace cpu
}  // namespace moe
