// adamw_lanes.h — the AdamW element loops (adamw_rule.h's ParamUpdate), written once and
// compiled twice. Include ONLY from optimizer.cpp and adamw_avx512.cpp, which first define
//   MOE_ADAMW_NS   the namespace of this copy (every symbol lives in it: no copy compiled for
//                  one instruction set can be picked by the linker for the other),
//   MOE_ADAMW_512  1: a sixteen-lane loop (AVX-512 F/DQ/VL/BW) before the eight-lane one
//                  (then the includer has that target in force and core/bf16_avx512.h included).
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

// Moment storage: f32 as is, bf16 widened on load and rounded to nearest-even on store.
// round_store returns the stored value widened: the update uses the moment as stored.
inline float widen(float x) { return x; }
inline float widen(uint16_t h) { return bf16_to_f32(h); }
inline float round_store(float x, float* at) {
  *at = x;
  return x;
}
inline float round_store(float x, uint16_t* at) {
  *at = f32_to_bf16(x);
  return bf16_to_f32(*at);
}

// Weight storage: f32, or a split master weight (its two halves, model_train.h).
struct SplitRef {
  uint16_t* hi;
  uint16_t* lo;
};
inline float load_weight(const float* w, int64_t j) { return w[j]; }
inline float load_weight(const SplitRef& w, int64_t j) { return std::bit_cast<float>(master_bits(w.hi[j], w.lo[j])); }
inline void store_weight(float* w, int64_t j, float x) { w[j] = x; }
inline void store_weight(const SplitRef& w, int64_t j, float x) {
  const uint32_t b = std::bit_cast<uint32_t>(x);
  w.hi[j] = master_high(b);
  w.lo[j] = static_cast<uint16_t>(b);
}

#if defined(__AVX2__) && defined(__FMA__)
// Eight elements at a time (AVX2 holds eight f32 values).
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
// Eight 32-bit lanes below 2^16 each to eight 16-bit values: the unsigned-saturating pack is
// exact, and it interleaves the two 128-bit halves, which the permutation undoes.
inline __m128i narrow8(__m256i x) {
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(x, x), 0x08));
}
inline __m256 round_store8(__m256 x, float* at) {
  _mm256_storeu_ps(at, x);
  return x;
}
// f32_to_bf16 on eight lanes: a NaN keeps its top half and is made quiet, everything else
// rounds to nearest-even.
inline __m256 round_store8(__m256 x, uint16_t* at) {
  const __m256i u = _mm256_castps_si256(x);
  const __m256i hi = _mm256_srli_epi32(u, 16);
  const __m256i nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  const __m256i bias = _mm256_add_epi32(_mm256_set1_epi32(0x7fff), _mm256_and_si256(hi, _mm256_set1_epi32(1)));
  const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i h = _mm256_blendv_epi8(rounded, _mm256_or_si256(hi, _mm256_set1_epi32(0x40)), nan);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(at), narrow8(h));
  return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}
inline __m256 load_weight8(const float* w, int64_t j) { return load8(w + j); }
// master_bits on eight lanes (the upper half's wrap below zero is the same modulo 2^16).
inline __m256 load_weight8(const SplitRef& w, int64_t j) {
  const __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.hi + j)));
  const __m256i l = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w.lo + j)));
  return _mm256_castsi256_ps(_mm256_or_si256(_mm256_slli_epi32(_mm256_sub_epi32(h, _mm256_srli_epi32(l, 15)), 16), l));
}
inline void store_weight8(float* w, int64_t j, __m256 x) { _mm256_storeu_ps(w + j, x); }
// master_high and the lower half on eight lanes.
inline void store_weight8(const SplitRef& w, int64_t j, __m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  const __m256i h = _mm256_srli_epi32(_mm256_add_epi32(b, _mm256_set1_epi32(0x8000)), 16);
  const __m256i l = _mm256_and_si256(b, _mm256_set1_epi32(0xFFFF));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(w.hi + j), narrow8(h));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(w.lo + j), narrow8(l));
}
// The gradient's squares of eight elements into the four f64 lanes of ss, the lower four
// first: lane i takes the elements j ≡ i (mod 4), in order, in every copy of the loop.
inline __m256d add_squares8(__m256d ss, __m256 g) {
  const __m256d a = _mm256_cvtps_pd(_mm256_castps256_ps128(g)), b = _mm256_cvtps_pd(_mm256_extractf128_ps(g, 1));
  return _mm256_add_pd(_mm256_add_pd(ss, _mm256_mul_pd(a, a)), _mm256_mul_pd(b, b));
}
#endif

#if MOE_ADAMW_512
// The eight-lane helpers above on sixteen lanes.
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const uint16_t* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
inline __m512 round_store16(__m512 x, float* at) {
  _mm512_storeu_ps(at, x);
  return x;
}
inline __m512 round_store16(__m512 x, uint16_t* at) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(store_bf16x16(at, x), 16));
}
inline __m512 load_weight16(const float* w, int64_t j) { return load16(w + j); }
inline __m512 load_weight16(const SplitRef& w, int64_t j) {
  const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.hi + j)));
  const __m512i l = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.lo + j)));
  return _mm512_castsi512_ps(_mm512_or_si512(_mm512_slli_epi32(_mm512_sub_epi32(h, _mm512_srli_epi32(l, 15)), 16), l));
}
inline void store_weight16(float* w, int64_t j, __m512 x) { _mm512_storeu_ps(w + j, x); }
inline void store_weight16(const SplitRef& w, int64_t j, __m512 x) {
  const __m512i b = _mm512_castps_si512(x);
  const __m512i h = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_set1_epi32(0x8000)), 16);
  const __m512i l = _mm512_and_si512(b, _mm512_set1_epi32(0xFFFF));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.hi + j), _mm512_cvtepi32_epi16(h));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(w.lo + j), _mm512_cvtepi32_epi16(l));
}
#endif

// Elements [j0, j1) of one parameter: the update (unless skipped), and the sum of squares of
// the gradient there (the gradient norm's terms, read in the same pass).
template <typename M, typename W>
double update_range(const Betas& bt, const ParamUpdate& u, W w, int64_t j0, int64_t j1) {
  const float* g = u.g;
  double ss = 0;
  // In f32, as torch.optim.AdamW updates an f32 parameter (its python-float constants rounded
  // to f32): m = fma(m, β1, (1-β1)·g), v = fma(v, β2, ((1-β2)·g)·g), the step
  // (step·bc2·m) / (sqrt(v) + eps·bc2) — step·m/(sqrt(v)/bc2 + eps) with one division — and
  // w = fma(w, decay, -step). The moments enter as stored (f32 or bf16). f64 lanes ran this
  // loop at 2.1 G elements/s on two Zen 5 cores whether its data came from L2 or from memory;
  // f32 lanes run it at the memory's pace (3.4 G/s), with a step error of a few f32 ulps.
  const float b1 = float(bt.b1), c1 = float(1.0 - bt.b1), b2 = float(bt.b2), c2 = float(1.0 - bt.b2);
  const float decay = float(u.decay);
  const float eps_bc2 = float(bt.eps * u.bc2), step_bc2 = float(u.step_size * u.bc2);
  M* m = static_cast<M*>(u.m);
  M* v = static_cast<M*>(u.v);
  int64_t j = j0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256d ssv = _mm256_setzero_pd();
#if MOE_ADAMW_512
  {
    const __m512 b1w = _mm512_set1_ps(b1), c1w = _mm512_set1_ps(c1), b2w = _mm512_set1_ps(b2), c2w = _mm512_set1_ps(c2);
    const __m512 epsw = _mm512_set1_ps(eps_bc2), stepw = _mm512_set1_ps(step_bc2), decayw = _mm512_set1_ps(decay);
    for (; j + 16 <= j1; j += 16) {
      const __m512 gj = load16(g + j);
      ssv = add_squares8(ssv, _mm512_castps512_ps256(gj));
      ssv = add_squares8(ssv, _mm512_extractf32x8_ps(gj, 1));
      const __m512 mj = round_store16(_mm512_fmadd_ps(load16(m + j), b1w, _mm512_mul_ps(c1w, gj)), m + j);
      const __m512 vj =
          round_store16(_mm512_fmadd_ps(load16(v + j), b2w, _mm512_mul_ps(_mm512_mul_ps(c2w, gj), gj)), v + j);
      const __m512 step = _mm512_div_ps(_mm512_mul_ps(stepw, mj), _mm512_add_ps(_mm512_sqrt_ps(vj), epsw));
      store_weight16(w, j, _mm512_fmsub_ps(load_weight16(w, j), decayw, step));
    }
  }
#endif
  {
    const __m256 b1v = _mm256_set1_ps(b1), c1v = _mm256_set1_ps(c1), b2v = _mm256_set1_ps(b2), c2v = _mm256_set1_ps(c2);
    const __m256 epsv = _mm256_set1_ps(eps_bc2), stepv = _mm256_set1_ps(step_bc2), decayv = _mm256_set1_ps(decay);
    for (; j + 8 <= j1; j += 8) {
      const __m256 gj = load8(g + j);
      ssv = add_squares8(ssv, gj);
      const __m256 mj = round_store8(_mm256_fmadd_ps(load8(m + j), b1v, _mm256_mul_ps(c1v, gj)), m + j);
      const __m256 vj =
          round_store8(_mm256_fmadd_ps(load8(v + j), b2v, _mm256_mul_ps(_mm256_mul_ps(c2v, gj), gj)), v + j);
      const __m256 step = _mm256_div_ps(_mm256_mul_ps(stepv, mj), _mm256_add_ps(_mm256_sqrt_ps(vj), epsv));
      store_weight8(w, j, _mm256_fmsub_ps(load_weight8(w, j), decayv, step));
    }
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, ssv);
  ss = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  for (; j < j1; ++j) {
    const float gj = g[j];
    ss += double(gj) * gj;
    const float mj = round_store(std::fma(widen(m[j]), b1, c1 * gj), m + j);
    const float vj = round_store(std::fma(widen(v[j]), b2, (c2 * gj) * gj), v + j);
    const float step = (step_bc2 * mj) / (std::sqrt(vj) + eps_bc2);
    store_weight(w, j, std::fma(load_weight(w, j), decay, -step));
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
