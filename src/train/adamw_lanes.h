// adamw_lanes.h — the AdamW element loops (adamw_rule.h's ParamUpdate), written once and
// compiled twice. Include ONLY from optimizer.cpp and adamw_avx512.cpp, which first define
//   MOE_ADAMW_NS   the namespace of this copy (every symbol lives in it: no copy compiled for
//                  one instruction set can be picked by the linker for the other),
//   MOE_ADAMW_512  1: an eight-lane loop (AVX-512 F/DQ/VL/BW) before the four-lane one.
// Both copies do each element's operations in the same order, so they give the same bits.
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <bit>
#include <cmath>
#include <cstdint>

#include "core/dtype.h"
#include "model/model_train.h"
#include "train/adamw_rule.h"

namespace moe {
namespace adamw {
namespace MOE_ADAMW_NS {

// Moment storage: f32 as is, bf16 widened on load and rounded to nearest-even on store (the
// f64 value rounded to f32 first, then to bf16). round_store returns the stored value widened:
// the update uses the moment as stored.
inline float widen(float x) { return x; }
inline float widen(uint16_t h) { return bf16_to_f32(h); }
inline float round_store(double x, float* at) {
  *at = static_cast<float>(x);
  return *at;
}
inline float round_store(double x, uint16_t* at) {
  *at = f32_to_bf16(static_cast<float>(x));
  return bf16_to_f32(*at);
}

// Weight storage: f32, or a split master weight (its two halves, model_train.h).
struct SplitRef {
  uint16_t* hi;
  uint16_t* lo;
};
inline double load_weight(const float* w, int64_t j) { return w[j]; }
inline double load_weight(const SplitRef& w, int64_t j) {
  return std::bit_cast<float>(master_bits(w.hi[j], w.lo[j]));
}
inline void store_weight(float* w, int64_t j, float x) { w[j] = x; }
inline void store_weight(const SplitRef& w, int64_t j, float x) {
  const uint32_t b = std::bit_cast<uint32_t>(x);
  w.hi[j] = master_high(b);
  w.lo[j] = static_cast<uint16_t>(b);
}

#if defined(__AVX2__) && defined(__FMA__)
// Four elements at a time in f64 (the rule is computed in f64; AVX2 holds four).
inline __m256d load4(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
inline __m256d load4(const uint16_t* p) {
  const __m128i u = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(u, 16)));
}
inline __m128 round_store4(__m256d x, float* at) {
  const __m128 f = _mm256_cvtpd_ps(x);
  _mm_storeu_ps(at, f);
  return f;
}
// f32_to_bf16 on four lanes: a NaN keeps its top half and is made quiet, everything else
// rounds to nearest-even; every lane is below 2^16, so the unsigned-saturating pack is exact.
inline __m128 round_store4(__m256d x, uint16_t* at) {
  const __m128i u = _mm_castps_si128(_mm256_cvtpd_ps(x));
  const __m128i hi = _mm_srli_epi32(u, 16);
  const __m128i nan = _mm_cmpgt_epi32(_mm_and_si128(u, _mm_set1_epi32(0x7fffffff)), _mm_set1_epi32(0x7f800000));
  const __m128i bias = _mm_add_epi32(_mm_set1_epi32(0x7fff), _mm_and_si128(hi, _mm_set1_epi32(1)));
  const __m128i rounded = _mm_srli_epi32(_mm_add_epi32(u, bias), 16);
  const __m128i h = _mm_blendv_epi8(rounded, _mm_or_si128(hi, _mm_set1_epi32(0x40)), nan);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(at), _mm_packus_epi32(h, h));
  return _mm_castsi128_ps(_mm_slli_epi32(h, 16));
}
inline __m256d load_weight4(const float* w, int64_t j) { return load4(w + j); }
// master_bits on four lanes (the upper half's wrap below zero is the same modulo 2^16).
inline __m256d load_weight4(const SplitRef& w, int64_t j) {
  const __m128i h = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.hi + j)));
  const __m128i l = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.lo + j)));
  const __m128i b = _mm_or_si128(_mm_slli_epi32(_mm_sub_epi32(h, _mm_srli_epi32(l, 15)), 16), l);
  return _mm256_cvtps_pd(_mm_castsi128_ps(b));
}
inline void store_weight4(float* w, int64_t j, __m256d x) { _mm_storeu_ps(w + j, _mm256_cvtpd_ps(x)); }
// master_high and the lower half on four lanes; both are below 2^16, so the packs are exact.
inline void store_weight4(const SplitRef& w, int64_t j, __m256d x) {
  const __m128i b = _mm_castps_si128(_mm256_cvtpd_ps(x));
  const __m128i h = _mm_srli_epi32(_mm_add_epi32(b, _mm_set1_epi32(0x8000)), 16);
  const __m128i l = _mm_and_si128(b, _mm_set1_epi32(0xFFFF));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(w.hi + j), _mm_packus_epi32(h, h));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(w.lo + j), _mm_packus_epi32(l, l));
}
#endif

#if MOE_ADAMW_512
// The four-lane helpers above on eight lanes: f64 in a zmm register, the f32 values in a ymm.
inline __m512d load8(const float* p) { return _mm512_cvtps_pd(_mm256_loadu_ps(p)); }
inline __m512d load8(const uint16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm512_cvtps_pd(_mm256_castsi256_ps(_mm256_slli_epi32(u, 16)));
}
inline __m256 round_store8(__m512d x, float* at) {
  const __m256 f = _mm512_cvtpd_ps(x);
  _mm256_storeu_ps(at, f);
  return f;
}
// Every lane is below 2^16, so the truncating 32 -> 16 bit narrowing (vpmovdw) is exact.
inline __m256 round_store8(__m512d x, uint16_t* at) {
  const __m256i u = _mm256_castps_si256(_mm512_cvtpd_ps(x));
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(hi, _mm256_set1_epi32(1)));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i h = _mm256_blendv_epi8(rounded, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(at), _mm256_cvtepi32_epi16(h));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
inline __m512d load_weight8(const float* w, int64_t j) { return load8(w + j); }
inline __m512d load_weight8(const SplitRef& w, int64_t j) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.hi + j)));
  const __m256i l = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.lo + j)));
  const __m256i b = _mm256_or_si256(_mm256_slli_epi32(_mm256_sub_epi32(h, _mm256_srli_epi32(l, 15)), 16), l);
  return _mm512_cvtps_pd(_mm256_castsi256_ps(b));
}
inline void store_weight8(float* w, int64_t j, __m512d x) { _mm256_storeu_ps(w + j, _mm512_cvtpd_ps(x)); }
inline void store_weight8(const SplitRef& w, int64_t j, __m512d x) {
  const __m256i b = _mm256_castps_si256(_mm512_cvtpd_ps(x));
  const __m256i h = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x8000)), 16);
  const __m256i l = _mm256_and_si256(b, _mm256_set1_epi32(0xFFFF));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(w.hi + j), _mm256_cvtepi32_epi16(h));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(w.lo + j), _mm256_cvtepi32_epi16(l));
}
#endif

// Elements [j0, j1) of one parameter: the update (unless skipped), and the sum of squares of
// the gradient there (the gradient norm's terms, read in the same pass).
template <typename M, typename W>
double update_range(const Betas& bt, const ParamUpdate& u, W w, int64_t j0, int64_t j1) {
  const float* g = u.g;
  double ss = 0;
  const double b1 = bt.b1, b2 = bt.b2, decay = u.decay;
  // step·m / (sqrt(v)/bc2 + eps) as (step·bc2)·m / (sqrt(v) + eps·bc2): the same value with one
  // division a weight instead of two, and that division and the square root in f32 (torch's
  // own precision for f32 parameters) on the moments as stored (f32 or bf16 values, exact in
  // f32): in f64 they bound this loop.
  const float eps_bc2 = float(bt.eps * u.bc2), step_bc2 = float(u.step_size * u.bc2);
  M* m = static_cast<M*>(u.m);
  M* v = static_cast<M*>(u.v);
  int64_t j = j0;
#if defined(__AVX2__) && defined(__FMA__)
  // The scalar loop below, four lanes at a time, with the fused multiply-adds GCC forms for it:
  // m = fma(m, β1, (1-β1)·g), v = fma(v, β2, ((1-β2)·g)·g) in f64, the step (step·bc2·m)/denom
  // in f32, w = fma(w, decay, -step) in f64.
  const __m256d b1v = _mm256_set1_pd(b1), c1v = _mm256_set1_pd(1.0 - b1);
  const __m256d b2v = _mm256_set1_pd(b2), c2v = _mm256_set1_pd(1.0 - b2);
  const __m128 epsv = _mm_set1_ps(eps_bc2), stepv = _mm_set1_ps(step_bc2);
  const __m256d decayv = _mm256_set1_pd(decay);
  __m256d ssv = _mm256_setzero_pd();
#if MOE_ADAMW_512
  // Eight lanes at a time; lane i of the sum of squares still takes elements j ≡ i (mod 4) in
  // order (each half of the eight added in turn), so the sum is the four-lane loop's too.
  {
    const __m512d b1w = _mm512_set1_pd(b1), c1w = _mm512_set1_pd(1.0 - b1);
    const __m512d b2w = _mm512_set1_pd(b2), c2w = _mm512_set1_pd(1.0 - b2);
    const __m256 epsw = _mm256_set1_ps(eps_bc2), stepw = _mm256_set1_ps(step_bc2);
    const __m512d decayw = _mm512_set1_pd(decay);
    for (; j + 8 <= j1; j += 8) {
      const __m512d gj = load8(g + j);
      const __m512d g2 = _mm512_mul_pd(gj, gj);
      ssv = _mm256_add_pd(ssv, _mm512_castpd512_pd256(g2));
      ssv = _mm256_add_pd(ssv, _mm512_extractf64x4_pd(g2, 1));
      const __m256 mj = round_store8(_mm512_fmadd_pd(load8(m + j), b1w, _mm512_mul_pd(c1w, gj)), m + j);
      const __m256 vj =
          round_store8(_mm512_fmadd_pd(load8(v + j), b2w, _mm512_mul_pd(_mm512_mul_pd(c2w, gj), gj)), v + j);
      const __m256 step = _mm256_div_ps(_mm256_mul_ps(stepw, mj), _mm256_add_ps(_mm256_sqrt_ps(vj), epsw));
      const __m512d wj = _mm512_fmsub_pd(load_weight8(w, j), decayw, _mm512_cvtps_pd(step));
      store_weight8(w, j, wj);
    }
  }
#endif
  for (; j + 4 <= j1; j += 4) {
    const __m256d gj = load4(g + j);
    ssv = _mm256_add_pd(ssv, _mm256_mul_pd(gj, gj));
    const __m128 mj = round_store4(_mm256_fmadd_pd(load4(m + j), b1v, _mm256_mul_pd(c1v, gj)), m + j);
    const __m128 vj =
        round_store4(_mm256_fmadd_pd(load4(v + j), b2v, _mm256_mul_pd(_mm256_mul_pd(c2v, gj), gj)), v + j);
    const __m128 step = _mm_div_ps(_mm_mul_ps(stepv, mj), _mm_add_ps(_mm_sqrt_ps(vj), epsv));
    const __m256d wj = _mm256_fmsub_pd(load_weight4(w, j), decayv, _mm256_cvtps_pd(step));
    store_weight4(w, j, wj);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, ssv);
  ss = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  for (; j < j1; ++j) {
    const double gj = g[j];
    ss += gj * gj;
    const float mj = round_store(b1 * widen(m[j]) + (1.0 - b1) * gj, m + j);
    const float vj = round_store(b2 * widen(v[j]) + (1.0 - b2) * gj * gj, v + j);
    const float step = (step_bc2 * mj) / (std::sqrt(vj) + eps_bc2);
    store_weight(w, j, static_cast<float>(load_weight(w, j) * decay - double(step)));
  }
  return ss;
}


// update_range on the parameter's storage; a skipped expert only sums its squares.
template <typename M>
double update_range(const Betas& bt, const ParamUpdate& u, int64_t j0, int64_t j1) {
  if (u.w) return update_range<M>(bt, u, u.w, j0, j1);
  if (u.hi) return update_range<M>(bt, u, SplitRef{u.hi, u.lo}, j0, j1);
  double ss = 0;
  for (int64_t j = j0; j < j1; ++j) ss += double(u.g[j]) * u.g[j];
  return ss;
}

}  // namespace MOE_ADAMW_NS
}  // namespace adamw
}  // namespace moe
