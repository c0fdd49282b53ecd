// cpu_simd_exp.h — e^x on four f64 lanes (AVX2 + FMA), for the CPU kernels whose time went to
// scalar exp: the experts' SwiGLU (f32 arguments); and on eight f32 lanes (exp8f, below) for
// the cross-entropy's softmax over the vocabulary; and a row's maximum (max_of, the shift of
// those softmaxes), on eight lanes.
//
// x = k·ln2 + r with |r| <= ln2/2 (r exact to f64 rounding: ln2 in two parts), e^r by its
// degree-10 Taylor polynomial (truncation below 3e-13 relative), 2^k in the exponent bits.
// Rounded to f32 this is e^x correctly rounded but for arguments very near a rounding boundary:
// it equals glibc's expf on all but 0.008% of the f32 arguments in range (1 ulp there), so the
// vector loops give the scalar loops' results almost everywhere (checked exhaustively).
// Arguments are clamped to [lo, hi] so that 2^k stays a normal number; NaN stays NaN (min/max
// return their second operand for a NaN).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

namespace moe {
namespace cpu {

// e^x for x in [lo, hi] (clamped), f64 in and out; lo >= -708, hi <= 709.
inline __m256d exp4d(__m256d x, double lo = -708.0, double hi = 709.0) {
  x = _mm256_max_pd(_mm256_set1_pd(lo), _mm256_min_pd(_mm256_set1_pd(hi), x));
  const __m256d k = _mm256_round_pd(_mm256_mul_pd(x, _mm256_set1_pd(1.4426950408889634)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256d r = _mm256_fnmadd_pd(k, _mm256_set1_pd(0.693147180559890330187), x);  // ln2 to 42 bits: k·hi is exact
  r = _mm256_fnmadd_pd(k, _mm256_set1_pd(5.4979230187083711552e-14), r);        // the rest of ln2
  static constexpr double kInvFact[] = {1.0 / 3628800, 1.0 / 362880, 1.0 / 40320, 1.0 / 5040, 1.0 / 720,
                                        1.0 / 120,     1.0 / 24,     1.0 / 6,     0.5,          1.0,  1.0};
  __m256d p = _mm256_set1_pd(kInvFact[0]);
  for (int i = 1; i < 11; ++i) p = _mm256_fmadd_pd(p, r, _mm256_set1_pd(kInvFact[i]));
  const __m256i e = _mm256_slli_epi64(
      _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_cvtpd_epi32(k)), _mm256_set1_epi64x(1023)), 52);
  return _mm256_mul_pd(p, _mm256_castsi256_pd(e));
}

// e^x of four f32 arguments, computed in f64 and rounded once (clamped to [-87.3, 88.3]: 2^k
// stays a normal float, a sigmoid saturates at 1 or ~1e-38 rather than 0).
inline __m128 exp4(__m128 xf) {
  return _mm256_cvtpd_ps(exp4d(_mm256_cvtps_pd(xf), -87.3, 88.3));
}

// e^x of eight f32 lanes in f32, for the long rows where exp4d's four f64 lanes cost too much
// (the cross-entropy's softmax over the vocabulary): x = k·ln2 + r with |r| <= ln2/2 (ln2 in
// two parts, Cephes': k·C1 is exact for |k| <= 127), e^r by its degree-7 Taylor polynomial
// (truncation below 5e-9 relative), 2^k in the exponent bits. Within a few f32 ulp of e^x
// (the test bounds it against f64); arguments clamped to [-87.3, 88.3] (2^k stays normal).
inline __m256 exp8f(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-87.3f), _mm256_min_ps(_mm256_set1_ps(88.3f), x));
  const __m256 k = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(k, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(k, _mm256_set1_ps(-2.12194440e-4f), r);
  static constexpr float kInvFact[] = {1.0f / 5040, 1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f};
  __m256 p = _mm256_set1_ps(kInvFact[0]);
  for (int i = 1; i < 8; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kInvFact[i]));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// Sum of the four f64 lanes.
inline double hsum4(__m256d v) {
  alignas(32) double l[4];
  _mm256_store_pd(l, v);
  return (l[0] + l[1]) + (l[2] + l[3]);
}

}  // namespace cpu
}  // namespace moe
#endif

namespace moe {
namespace cpu {

// The largest of init and x[0, n), eight lanes at a time where the build has AVX2 (a max is
// exact: the same value as the scalar loop's in any order; a NaN in x is not carried, as
// std::max(mx, x) does not carry it).
inline float max_of(const float* x, int64_t n, float init) {
  int64_t i = 0;
  float mx = init;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 mv = _mm256_set1_ps(init);
  for (; i + 8 <= n; i += 8) mv = _mm256_max_ps(_mm256_loadu_ps(x + i), mv);  // NaN in x: mv kept
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, mv);
  for (float l : lanes) mx = std::max(mx, l);
#endif
  for (; i < n; ++i) mx = std::max(mx, x[i]);
  return mx;
}

// Σ e^(l[i] - mx) over a row, each term also stored to o[i] when o is given (o may alias l).
// Eight f32 lanes compute the exponentials (exp8f: within a few ulp; the arguments l - max are
// <= 0, the terms <= 1) and f64 lanes sum them: summed in f32 lanes, the sum's relative error
// (~2e-7 at 32000 words) moved every value of the row's softmax the same way once it divided
// them. The cross-entropy's rows and training attention's (not prefill's: exp_shift_sum).
inline double row_exp_sum(float* o, const float* l, int64_t v, float mx) {
  double sum = 0;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 m = _mm256_set1_ps(mx);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  for (; i + 8 <= v; i += 8) {
    const __m256 e = exp8f(_mm256_sub_ps(_mm256_loadu_ps(l + i), m));
    if (o) _mm256_storeu_ps(o + i, e);
    acc0 = _mm256_add_pd(acc0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
    acc1 = _mm256_add_pd(acc1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
  }
  sum = hsum4(_mm256_add_pd(acc0, acc1));
#endif
  for (; i < v; ++i) {
    const double e = std::exp(double(l[i]) - mx);
    if (o) o[i] = static_cast<float>(e);
    sum += e;
  }
  return sum;
}

}  // namespace cpu
}  // namespace moe
