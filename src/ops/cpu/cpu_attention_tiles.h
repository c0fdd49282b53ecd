// cpu_attention_tiles.h — the register-tiled attention kernels of prefill and training on the
// CPU (cpu_attention.cpp, cpu_train_attention.cpp): a block of query rows of one head against the
// keys any of them sees, scores and values each by 4-row tiles of 256-bit FMAs. The training
// backward (cpu_train_attention.cpp) uses them for S, dP, dQ and dVᵀ (its dKᵀ is an f64 tile).
#pragma once
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "ops/cpu/cpu_simd_exp.h"
#include "ops/variants.h"

namespace moe {
namespace cpu {

// Prefill takes queries in blocks of this many rows (from kAttnBlockMin new tokens on, head
// dims a multiple of 8): the block's scores against every key any of its rows sees, then its
// output, each by a register-tiled kernel (4 query rows x 16 keys or head dims). One query row at
// a time (dot products of Dh values, then a scalar pass over the values per key) was ~14% of a
// medium-model prefill of 512 tokens; OpenBLAS on these thin products (K = Dh = 64) was no faster.
constexpr int64_t kAttnQBlock = 32;
constexpr int64_t kAttnBlockMin = 8;

// out[x, 0..16) (+)= scale · Σ_{s in [s0, s1)} a[x·lax + s·las] · b[s·ldb + 0..16) for RX values of
// x (rows of out at stride ldo; Acc: added to out). Scores are x = query rows, s = head dims,
// b = the keys transposed (scores_tile); the training backward's dVᵀ and dKᵀ are x = head dims,
// s = query rows, b = the rows of P or dS.
template <int RX, bool Acc = false>
inline void outer_tile(const float* a, int64_t lax, int64_t las, const float* b, int64_t ldb, int64_t s0, int64_t s1,
                       float scale, float* out, int64_t ldo) {
  __m256 acc[RX][2];
  for (int r = 0; r < RX; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
  for (int64_t s = s0; s < s1; ++s) {
    const __m256 b0 = _mm256_loadu_ps(b + s * ldb), b1 = _mm256_loadu_ps(b + s * ldb + 8);
    for (int r = 0; r < RX; ++r) {
      const __m256 av = _mm256_broadcast_ss(a + r * lax + s * las);
      acc[r][0] = _mm256_fmadd_ps(av, b0, acc[r][0]);
      acc[r][1] = _mm256_fmadd_ps(av, b1, acc[r][1]);
    }
  }
  const __m256 sc = _mm256_set1_ps(scale);
  for (int r = 0; r < RX; ++r)
    for (int h = 0; h < 2; ++h) {
      __m256 y = _mm256_mul_ps(acc[r][h], sc);
      if constexpr (Acc) y = _mm256_add_ps(y, _mm256_loadu_ps(out + r * ldo + 8 * h));
      _mm256_storeu_ps(out + r * ldo + 8 * h, y);
    }
}

// S[r, j] (row stride lds) = scale · Σ_d q[r, d] · kt[d, j] for RX rows and 16 keys j0..j0+15,
// kt the block's keys transposed (row stride ldk).
template <int RX>
inline void scores_tile(const float* q, int64_t ldq, const float* kt, int64_t ldk, int64_t dh, float scale, float* S,
                        int64_t lds) {
  outer_tile<RX>(q, ldq, 1, kt, ldk, 0, dh, scale, S, lds);
}

// o[r, d0..d0+8·W) = Σ_{j in [j0, j1)} p[r, j] · v[j, d0..] for RX rows (v rows at stride ldv).
template <int RX, int W>
inline void values_tile(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t j0, int64_t j1, float* o,
                        int64_t ldo) {
  __m256 acc[RX][W];
  for (int r = 0; r < RX; ++r)
    for (int w = 0; w < W; ++w) acc[r][w] = _mm256_setzero_ps();
  for (int64_t j = j0; j < j1; ++j) {
    __m256 vv[W];
    for (int w = 0; w < W; ++w) vv[w] = _mm256_loadu_ps(v + j * ldv + 8 * w);
    for (int r = 0; r < RX; ++r) {
      const __m256 pv = _mm256_broadcast_ss(p + r * ldp + j);
      for (int w = 0; w < W; ++w) acc[r][w] = _mm256_fmadd_ps(pv, vv[w], acc[r][w]);
    }
  }
  for (int r = 0; r < RX; ++r)
    for (int w = 0; w < W; ++w) _mm256_storeu_ps(o + r * ldo + 8 * w, acc[r][w]);
}

// o[r, 0..dh) = Σ_{j in [j0, j1)} p[r, j] · v[j, 0..dh) for RX rows, dh a multiple of 8: values
// tiles 16 dims wide, the last 8 alone.
template <int RX>
inline void values_rows(const float* p, int64_t ldp, const float* v, int64_t ldv, int64_t j0, int64_t j1, float* o,
                        int64_t ldo, int64_t dh) {
  int64_t d = 0;
  for (; d + 16 <= dh; d += 16) values_tile<RX, 2>(p, ldp, v + d, ldv, j0, j1, o + d, ldo);
  if (d < dh) values_tile<RX, 1>(p, ldp, v + d, ldv, j0, j1, o + d, ldo);
}

// p[i] = e^(x[i] - mx) over a row, in place; returns Σ p in f64. Four lanes at a time through
// exp4 (f64 inside, rounded once: glibc's expf but for 0.008% of arguments, 1 ulp there).
inline double exp_shift_sum(float* x, int64_t n, float mx) {
  int64_t i = 0;
  double sum = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m128 m = _mm_set1_ps(mx);
  __m256d acc = _mm256_setzero_pd();
  for (; i + 4 <= n; i += 4) {
    const __m128 e = exp4(_mm_sub_ps(_mm_loadu_ps(x + i), m));
    _mm_storeu_ps(x + i, e);
    acc = _mm256_add_pd(acc, _mm256_cvtps_pd(e));
  }
  sum = hsum4(acc);
#endif
  for (; i < n; ++i) sum += (x[i] = std::exp(x[i] - mx));
  return sum;
}

// kt[d·ldt + j] = k[j·ldk + d] for keys j < nk and head dims d < dh (a multiple of 8): blocks of
// 8 keys by 8 dims through registers, the last keys one at a time. (Element by element, the
// strided stores were ~15% of the training forward's attention at Dh 32.)
inline void transpose_keys(const float* k, int64_t ldk, int64_t nk, int64_t dh, float* kt, int64_t ldt) {
  int64_t j = 0;
  for (; j + 8 <= nk; j += 8)
    for (int64_t d = 0; d < dh; d += 8) {
      __m256 r[8], t[8], u[8];
      for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(k + (j + i) * ldk + d);
      for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);  // keys i, i+1 at dims 0, 1 | 4, 5
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);  // at dims 2, 3 | 6, 7
      }
      for (int i = 0; i < 8; i += 4) {
        u[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);      // keys i..i+3 at dim 0 | 4
        u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xEE);  // dim 1 | 5
        u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);  // dim 2 | 6
        u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xEE);  // dim 3 | 7
      }
      for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(kt + (d + i) * ldt + j, _mm256_permute2f128_ps(u[i], u[i + 4], 0x20));
        _mm256_storeu_ps(kt + (d + i + 4) * ldt + j, _mm256_permute2f128_ps(u[i], u[i + 4], 0x31));
      }
    }
  for (; j < nk; ++j)
    for (int64_t d = 0; d < dh; ++d) kt[d * ldt + j] = k[j * ldk + d];
}

// f.template operator()<RX>(r) for the row groups r = 0, 4, 8, ... of nq rows, RX = min(4, nq - r).
template <class F>
inline void for_row_groups(int64_t nq, F&& f) {
  for (int64_t r = 0; r < nq; r += 4) {
    switch (std::min<int64_t>(4, nq - r)) {
      case 4: f.template operator()<4>(r); break;
      case 3: f.template operator()<3>(r); break;
      case 2: f.template operator()<2>(r); break;
      default: f.template operator()<1>(r); break;
    }
  }
}

// One (sequence, head) block of nq query rows at positions pos0 .. pos0+nq-1 (rows of q at
// stride ldq) against keys [ja, ja + nk) (rows of k, v at stride ldkv, the first being key ja):
// scores scale·q·kᵀ, each row's stable softmax over its visible keys (the sink in the
// denominator, the invisible keys' probabilities 0), then o = p·v (rows at stride ldo).
// kt: dh·nkp floats, S: nq·nkp floats, nkp = nk rounded up to 16. lse (training), when given:
// each row's log Σ e^score (the sink included) at lse[r].
inline void attend_block(const float* q, int64_t ldq, const float* k, const float* v, int64_t ldkv, int64_t nq,
                         int64_t ja, int64_t nk, int64_t pos0, int64_t dh, float scale, float sink, bool has_sink,
                         const AttnVariant& av, float* kt, float* S, float* o, int64_t ldo, float* lse = nullptr) {
  const int64_t nkp = (nk + 15) / 16 * 16;
  transpose_keys(k, ldkv, nk, dh, kt, nkp);
  for (int64_t d = 0; d < dh; ++d)
    for (int64_t j = nk; j < nkp; ++j) kt[d * nkp + j] = 0.0f;
  int64_t lo[kAttnQBlock], hi[kAttnQBlock];
  for (int64_t r = 0; r < nq; ++r) lo[r] = av.first_key(pos0 + r) - ja, hi[r] = pos0 + r + 1 - ja;
  for_row_groups(nq, [&]<int RX>(int64_t r) {
    for (int64_t j = 0; j < nkp; j += 16) scores_tile<RX>(q + r * ldq, ldq, kt + j, nkp, dh, scale, S + r * nkp + j, nkp);
  });
  for (int64_t r = 0; r < nq; ++r) {
    float* row = S + r * nkp;
    const float mx = max_of(row + lo[r], hi[r] - lo[r], sink);
    // Training (lse wanted) takes the exponentials on eight f32 lanes (row_exp_sum); prefill keeps
    // exp_shift_sum's, which decode's rows share (cpu_attention.cpp).
    const int64_t n = hi[r] - lo[r];
    const double sum = (has_sink ? std::exp(double(sink) - mx) : 0.0) +
                       (lse ? row_exp_sum(row + lo[r], row + lo[r], n, mx) : exp_shift_sum(row + lo[r], n, mx));
    const float inv = static_cast<float>(1.0 / sum);
    if (lse) lse[r] = static_cast<float>(mx + std::log(sum));
    std::fill(row, row + lo[r], 0.0f);
    for (int64_t j = lo[r]; j < hi[r]; ++j) row[j] *= inv;
    std::fill(row + hi[r], row + nkp, 0.0f);
  }
  for_row_groups(nq, [&]<int RX>(int64_t r) {
    int64_t j0 = lo[r], j1 = hi[r];  // the keys any of the RX rows sees
    for (int i = 1; i < RX; ++i) j0 = std::min(j0, lo[r + i]), j1 = std::max(j1, hi[r + i]);
    values_rows<RX>(S + r * nkp, nkp, v, ldkv, j0, j1, o + r * ldo, ldo, dh);
  });
}

}  // namespace cpu
}  // namespace moe
