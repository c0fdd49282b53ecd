// cpu_quant_kernels.h — the integer dot-product kernels of cpu_quant_gemm.h, written once and
// compiled three times. Include ONLY from cpu_quant_avx2.cpp / cpu_quant_avx512.cpp /
// cpu_quant_vnni.cpp, which first define
//   MOE_QK_NS    the namespace of this copy (every symbol lives in it: no copy compiled for one
//                instruction set can be picked by the linker for another),
//   MOE_QK_512   1: 512-bit loops (AVX512 F/BW/DQ/VL), 0: 256-bit only,
//   MOE_QK_VNNI  1: vpdpbusd / vpdpwssd instead of maddubs + madd,
// and switch the matching target on for every function (pragma), so the build itself needs
// no -mavx512f.
//
// Per format, a tile function dots RW weight rows with RX activation rows over all blocks:
//   q8_0  x·w = dw·da·Σ w_q·a_q           (signed x signed: sign trick, or w+128 with VNNI)
//   q4_0  x·w = dw·da·Σ (q-8)·a_q = dw·(da·Σ q·a_q − 8·da·Σ a_q)
//   q4_k  per 256: d·da·Σ_s sc_s Σ q·a_q − dmin·da·Σ_s m_s Σ a_q   (sub-blocks of 32)
//   q5_k  as q4_k with the fifth bit from qh
//   q6_k  per 256: d·da·(Σ_s sc_s Σ q·a_q − 32·Σ_s sc_s Σ a_q)   (sub-blocks of 16)
// with q unsigned (u8) against the signed activations. Integer sums cannot overflow: at most
// 2·255·127 per maddubs pair for q8_0's offset form (VNNI only, which does not saturate), 2·63·127
// otherwise; a 256-value super-block stays below 2^31 with 8-bit scales.
// Block layouts: core/quant.h (llama.cpp's ggml-common.h).

namespace moe {
namespace cpu {
namespace MOE_QK_NS {

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

inline float hsum_ps(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// acc + Σ over groups of 4 of u8 · s8 (8 int32 lanes).
inline __m256i dot_us(__m256i acc, __m256i u, __m256i s) {
#if MOE_QK_VNNI
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// acc + Σ over pairs of u8 · s8 (16 int16 lanes, no saturation for u8 <= 63), times the int16
// scales of each lane pair (8 int32 lanes).
inline __m256i dot_us_scaled(__m256i acc, __m256i u, __m256i s, __m256i scale16) {
  const __m256i p = _mm256_maddubs_epi16(u, s);
#if MOE_QK_VNNI
  return _mm256_dpwssd_epi32(acc, p, scale16);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, scale16));
#endif
}

#if MOE_QK_512
inline __m512i join(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }

inline __m512i dot_us_scaled512(__m512i acc, __m512i u, __m512i s, __m512i scale16) {
  const __m512i p = _mm512_maddubs_epi16(u, s);
#if MOE_QK_VNNI
  return _mm512_dpwssd_epi32(acc, p, scale16);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(p, scale16));
#endif
}

inline int32_t hsum512_epi32(__m512i v) {
  return hsum_epi32(_mm256_add_epi32(_mm512_castsi512_si256(v), _mm512_extracti64x4_epi64(v, 1)));
}
#endif

// Activation row pointers of one tile.
template <int RX>
struct ARows {
  const int8_t* q[RX];
  const float* d[RX];
  const float* ds[RX];
  const int16_t* bs[RX];
  ARows(const QActs& a, int64_t x0) {
    const int64_t nbk = a.k / a.blk;
    for (int i = 0; i < RX; ++i) {
      q[i] = a.qs + (x0 + i) * a.k;
      d[i] = a.d + (x0 + i) * nbk;
      ds[i] = a.ds ? a.ds + (x0 + i) * (a.k / 32) : nullptr;
      bs[i] = a.bsum ? a.bsum + (x0 + i) * (a.k / 16) : nullptr;
    }
  }
};

// ---- q8_0: 34-byte blocks {f16 d; int8 q[32]} ----------------------------------------------

template <int RW, int RX>
void tile_q8_0(const uint8_t* const* wr, const QActs& a, int64_t x0, int64_t nb, float* res) {
  ARows<RX> ar(a, x0);
  float out[RW][RX] = {};
  int64_t b = 0;
#if MOE_QK_512
  {
    __m512 acc[RW][RX];
    for (int r = 0; r < RW; ++r)
      for (int i = 0; i < RX; ++i) acc[r][i] = _mm512_setzero_ps();
#if MOE_QK_VNNI
    float corr[RW][RX] = {};
#endif
    for (; b + 2 <= nb; b += 2) {
      for (int r = 0; r < RW; ++r) {
        const uint8_t* p = wr[r] + b * 34;
        const float dw0 = h2f(p), dw1 = h2f(p + 34);
        const __m512i wq = join(load256(p + 2), load256(p + 36));
#if MOE_QK_VNNI
        const __m512i wu = _mm512_xor_si512(wq, _mm512_set1_epi8(static_cast<char>(0x80)));  // w + 128
#else
        const __m512i wa = _mm512_abs_epi8(wq);
        const __mmask64 neg = _mm512_movepi8_mask(wq);
#endif
        for (int i = 0; i < RX; ++i) {
          const __m512i aq = _mm512_loadu_si512(ar.q[i] + b * 32);
#if MOE_QK_VNNI
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wu, aq);
          corr[r][i] += 128.0f * (dw0 * ar.ds[i][b] + dw1 * ar.ds[i][b + 1]);
#else
          const __m512i sa = _mm512_mask_sub_epi8(aq, neg, _mm512_setzero_si512(), aq);
          const __m512i dot = _mm512_madd_epi16(_mm512_maddubs_epi16(wa, sa), _mm512_set1_epi16(1));
#endif
          const __m512 sc = _mm512_insertf32x8(_mm512_set1_ps(dw0 * ar.d[i][b]), _mm256_set1_ps(dw1 * ar.d[i][b + 1]), 1);
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc[r][i]);
        }
      }
    }
    for (int r = 0; r < RW; ++r)
      for (int i = 0; i < RX; ++i) {
        out[r][i] = _mm512_reduce_add_ps(acc[r][i]);
#if MOE_QK_VNNI
        out[r][i] -= corr[r][i];
#endif
      }
  }
#endif
  if (b < nb) {
    __m256 acc[RW][RX];
    for (int r = 0; r < RW; ++r)
      for (int i = 0; i < RX; ++i) acc[r][i] = _mm256_setzero_ps();
    for (; b < nb; ++b) {
      for (int r = 0; r < RW; ++r) {
        const uint8_t* p = wr[r] + b * 34;
        const float dw = h2f(p);
        const __m256i wq = load256(p + 2);
        const __m256i wa = _mm256_sign_epi8(wq, wq);
        for (int i = 0; i < RX; ++i) {
          const __m256i aq = load256(ar.q[i] + b * 32);
          const __m256i dot = dot_us(_mm256_setzero_si256(), wa, _mm256_sign_epi8(aq, wq));
          acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * ar.d[i][b]), acc[r][i]);
        }
      }
    }
    for (int r = 0; r < RW; ++r)
      for (int i = 0; i < RX; ++i) out[r][i] += hsum_ps(acc[r][i]);
  }
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) res[r * RX + i] = out[r][i];
}

// ---- q4_0: 18-byte blocks {f16 d; u8 qs[16]}: value j low nibble of byte j, value j+16 high ----

inline __m256i unpack_q4_0(const uint8_t* qs) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

template <int RW, int RX>
void tile_q4_0(const uint8_t* const* wr, const QActs& a, int64_t x0, int64_t nb, float* res) {
  ARows<RX> ar(a, x0);
  float out[RW][RX] = {};
  float corr[RW][RX] = {};  // Σ_b dw · 8 · da·Σa
  int64_t b = 0;
#if MOE_QK_512
  {
    __m512 acc[RW][RX];
    for (int r = 0; r < RW; ++r)
      for (int i = 0; i < RX; ++i) acc[r][i] = _mm512_setzero_ps();
    for (; b + 2 <= nb; b += 2) {
      for (int r = 0; r < RW; ++r) {
        const uint8_t* p = wr[r] + b * 18;
        const float dw0 = h2f(p), dw1 = h2f(p + 18);
        const __m512i wq = join(unpack_q4_0(p + 2), unpack_q4_0(p + 20));
        for (int i = 0; i < RX; ++i) {
          const __m512i aq = _mm512_loadu_si512(ar.q[i] + b * 32);
#if MOE_QK_VNNI
          const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), wq, aq);
#else
          const __m512i dot = _mm512_madd_epi16(_mm512_maddubs_epi16(wq, aq), _mm512_set1_epi16(1));
#endif
          const __m512 sc = _mm512_insertf32x8(_mm512_set1_ps(dw0 * ar.d[i][b]), _mm256_set1_ps(dw1 * ar.d[i][b + 1]), 1);
          acc[r][i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), sc, acc[r][i]);
          corr[r][i] += dw0 * ar.ds[i][b] + dw1 * ar.ds[i][b + 1];
        }
      }
    }
    for (int r = 0; r < RW; ++r)
      for (int i = 0; i < RX; ++i) out[r][i] = _mm512_reduce_add_ps(acc[r][i]);
  }
#endif
  if (b < nb) {
    __m256 acc[RW][RX];
    for (int r = 0; r < RW; ++r)
      for (int i = 0; i < RX; ++i) acc[r][i] = _mm256_setzero_ps();
    for (; b < nb; ++b) {
      for (int r = 0; r < RW; ++r) {
        const uint8_t* p = wr[r] + b * 18;
        const float dw = h2f(p);
        const __m256i wq = unpack_q4_0(p + 2);
        for (int i = 0; i < RX; ++i) {
          const __m256i dot = dot_us(_mm256_setzero_si256(), wq, load256(ar.q[i] + b * 32));
          acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * ar.d[i][b]), acc[r][i]);
          corr[r][i] += dw * ar.ds[i][b];
        }
      }
    }
    for (int r = 0; r < RW; ++r)
      for (int i = 0; i < RX; ++i) out[r][i] += hsum_ps(acc[r][i]);
  }
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) res[r * RX + i] = out[r][i] - 8.0f * corr[r][i];
}

// ---- K-quants: 256-value super-blocks against q8_K-style activations (d, q[256], bsum[16]) ----

// The 6-bit scales and mins of the 8 sub-blocks of a q4_K/q5_K block (ggml's get_scale_min_k4).
inline void k4_scales(const uint8_t* q, uint8_t sc[8], uint8_t mn[8]) {
  for (int j = 0; j < 4; ++j) {
    sc[j] = q[j] & 63;
    mn[j] = q[j + 4] & 63;
    sc[j + 4] = static_cast<uint8_t>((q[j + 8] & 0xF) | ((q[j] >> 6) << 4));
    mn[j + 4] = static_cast<uint8_t>((q[j + 8] >> 4) | ((q[j + 4] >> 6) << 4));
  }
}

// Σ_s mn[s] · (bsum[2s] + bsum[2s+1]) over the 8 sub-blocks of 32.
inline int32_t k4_min_dot(const uint8_t mn[8], const int16_t* bs) {
  const __m256i b = load256(bs);
  const __m128i m8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(mn));
  const __m256i m16 = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));  // each min twice
  return hsum_epi32(_mm256_madd_epi16(b, m16));
}

// Unpacks 32 bytes of q4_K/q5_K nibbles: lo = values of sub-block 2j, hi = of 2j+1 (q5: plus
// bit 2j / 2j+1 of qh as 16).
template <bool Q5>
inline void k_unpack(const uint8_t* qs, const uint8_t* qh, int j, __m256i* lo, __m256i* hi) {
  const __m256i q = load256(qs + 32 * j);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  *lo = _mm256_and_si256(q, m4);
  *hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
  if constexpr (Q5) {
    const __m256i h = load256(qh);
    const __m256i b0 = _mm256_set1_epi8(static_cast<char>(1 << (2 * j)));
    const __m256i b1 = _mm256_set1_epi8(static_cast<char>(1 << (2 * j + 1)));
    const __m256i sixteen = _mm256_set1_epi8(16);
    *lo = _mm256_or_si256(*lo, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, b0), b0), sixteen));
    *hi = _mm256_or_si256(*hi, _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, b1), b1), sixteen));
  }
}

// q4_K (144 bytes: d, dmin, scales[12], qs[128]) and q5_K (176: d, dmin, scales[12], qh[32], qs[128]).
template <bool Q5, int RW, int RX>
void tile_qk45(const uint8_t* const* wr, const QActs& a, int64_t x0, int64_t nb, float* res) {
  constexpr int64_t kBytes = Q5 ? 176 : 144;
  constexpr int kQs = Q5 ? 48 : 16;
  ARows<RX> ar(a, x0);
  float out[RW][RX] = {};
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < RW; ++r) {
      const uint8_t* p = wr[r] + b * kBytes;
      const float dw = h2f(p), dmin = h2f(p + 2);
      uint8_t sc[8], mn[8];
      k4_scales(p + 4, sc, mn);
      const uint8_t* qs = p + kQs;
      const uint8_t* qh = p + 16;
#if MOE_QK_512
      __m512i sumi[RX];
      for (int i = 0; i < RX; ++i) sumi[i] = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        __m256i lo, hi;
        k_unpack<Q5>(qs, qh, j, &lo, &hi);
        const __m512i wq = join(lo, hi);
        const __m512i s16 = join(_mm256_set1_epi16(sc[2 * j]), _mm256_set1_epi16(sc[2 * j + 1]));
        for (int i = 0; i < RX; ++i)
          sumi[i] = dot_us_scaled512(sumi[i], wq, _mm512_loadu_si512(ar.q[i] + b * 256 + 64 * j), s16);
      }
      for (int i = 0; i < RX; ++i) {
        const float da = ar.d[i][b];
        out[r][i] += dw * da * static_cast<float>(hsum512_epi32(sumi[i])) -
                     dmin * da * static_cast<float>(k4_min_dot(mn, ar.bs[i] + b * 16));
      }
#else
      __m256i sumi[RX];
      for (int i = 0; i < RX; ++i) sumi[i] = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        __m256i lo, hi;
        k_unpack<Q5>(qs, qh, j, &lo, &hi);
        const __m256i s_lo = _mm256_set1_epi16(sc[2 * j]), s_hi = _mm256_set1_epi16(sc[2 * j + 1]);
        for (int i = 0; i < RX; ++i) {
          const int8_t* aq = ar.q[i] + b * 256 + 64 * j;
          sumi[i] = dot_us_scaled(sumi[i], lo, load256(aq), s_lo);
          sumi[i] = dot_us_scaled(sumi[i], hi, load256(aq + 32), s_hi);
        }
      }
      for (int i = 0; i < RX; ++i) {
        const float da = ar.d[i][b];
        out[r][i] += dw * da * static_cast<float>(hsum_epi32(sumi[i])) -
                     dmin * da * static_cast<float>(k4_min_dot(mn, ar.bs[i] + b * 16));
      }
#endif
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) res[r * RX + i] = out[r][i];
}

// q6_K (210 bytes: ql[128], qh[64], int8 scales[16], f16 d). For half n (128 values), 32-byte
// vectors of the 6-bit values l = 0..31 of its four quarters; sub-block scale index
// 8n + 2·quarter + l/16.
inline void q6_unpack(const uint8_t* p, int n, __m256i q[4]) {
  const __m256i ql0 = load256(p + 64 * n), ql1 = load256(p + 64 * n + 32), qh = load256(p + 128 + 32 * n);
  const __m256i m4 = _mm256_set1_epi8(0x0F), m2 = _mm256_set1_epi8(0x03), m2s = _mm256_set1_epi8(0x0C);
  const __m256i m30 = _mm256_set1_epi8(0x30);
  q[0] = _mm256_or_si256(_mm256_and_si256(ql0, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2), 4));
  q[1] = _mm256_or_si256(_mm256_and_si256(ql1, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m2s), 2));
  q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql0, 4), m4), _mm256_and_si256(qh, m30));
  q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(ql1, 4), m4),
                         _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
}

// Σ_s sc[s] · bsum[s] over the 16 sub-blocks of 16.
inline int32_t q6_scale_dot(const int8_t* sc, const int16_t* bs) {
  const __m256i s16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(sc)));
  return hsum_epi32(_mm256_madd_epi16(load256(bs), s16));
}

inline __m256i pair16(int8_t lo, int8_t hi) { return _mm256_set_m128i(_mm_set1_epi16(hi), _mm_set1_epi16(lo)); }

template <int RW, int RX>
void tile_q6_k(const uint8_t* const* wr, const QActs& a, int64_t x0, int64_t nb, float* res) {
  ARows<RX> ar(a, x0);
  float out[RW][RX] = {};
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < RW; ++r) {
      const uint8_t* p = wr[r] + b * 210;
      const int8_t* sc = reinterpret_cast<const int8_t*>(p + 192);
      const float dw = h2f(p + 208);
#if MOE_QK_512
      __m512i sumi[RX];
      for (int i = 0; i < RX; ++i) sumi[i] = _mm512_setzero_si512();
#else
      __m256i sumi[RX];
      for (int i = 0; i < RX; ++i) sumi[i] = _mm256_setzero_si256();
#endif
      for (int n = 0; n < 2; ++n) {
        __m256i q[4];
        q6_unpack(p, n, q);
        const int8_t* s = sc + 8 * n;
#if MOE_QK_512
        const __m512i w01 = join(q[0], q[1]), w23 = join(q[2], q[3]);
        const __m512i s01 = join(pair16(s[0], s[1]), pair16(s[2], s[3]));
        const __m512i s23 = join(pair16(s[4], s[5]), pair16(s[6], s[7]));
        for (int i = 0; i < RX; ++i) {
          const int8_t* aq = ar.q[i] + b * 256 + 128 * n;
          sumi[i] = dot_us_scaled512(sumi[i], w01, _mm512_loadu_si512(aq), s01);
          sumi[i] = dot_us_scaled512(sumi[i], w23, _mm512_loadu_si512(aq + 64), s23);
        }
#else
        for (int qq = 0; qq < 4; ++qq) {
          const __m256i s16 = pair16(s[2 * qq], s[2 * qq + 1]);
          for (int i = 0; i < RX; ++i)
            sumi[i] = dot_us_scaled(sumi[i], q[qq], load256(ar.q[i] + b * 256 + 128 * n + 32 * qq), s16);
        }
#endif
      }
      for (int i = 0; i < RX; ++i) {
#if MOE_QK_512
        const int32_t dot = hsum512_epi32(sumi[i]);
#else
        const int32_t dot = hsum_epi32(sumi[i]);
#endif
        out[r][i] += dw * ar.d[i][b] * static_cast<float>(dot - 32 * q6_scale_dot(sc, ar.bs[i] + b * 16));
      }
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) res[r * RX + i] = out[r][i];
}

// ---- the driver --------------------------------------------------------------------------

template <DType WT, int RW, int RX>
inline void tile(const uint8_t* const* wr, const QActs& a, int64_t x0, int64_t nb, float* res) {
  if constexpr (WT == DType::Q8_0) tile_q8_0<RW, RX>(wr, a, x0, nb, res);
  else if constexpr (WT == DType::Q4_0) tile_q4_0<RW, RX>(wr, a, x0, nb, res);
  else if constexpr (WT == DType::Q4_K) tile_qk45<false, RW, RX>(wr, a, x0, nb, res);
  else if constexpr (WT == DType::Q5_K) tile_qk45<true, RW, RX>(wr, a, x0, nb, res);
  else tile_q6_k<RW, RX>(wr, a, x0, nb, res);
}

// Activation rows are taken in chunks of kXChunk (their int8 copy stays in L2 while the weight
// tiles stream past); inside a tile, 4 at a time, then the rest.
constexpr int64_t kXChunk = 64;

template <DType WT, int RW>
void run_fmt(const QuantJob& jb) {
  const QActs& a = *jb.a;
  const int64_t n = a.n, m = jb.m;
  const int64_t nb = jb.k / dtype_block_elems(WT);
  const int64_t tiles = (m + RW - 1) / RW;
  const bool par = m * jb.k * std::min<int64_t>(n, 4) > 65536 && tiles > 1;
#pragma omp parallel if(par)
  for (int64_t xc = 0; xc < n; xc += kXChunk) {
    const int64_t xe = std::min(n, xc + kXChunk);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = t * RW;
      const int rr = static_cast<int>(std::min<int64_t>(RW, m - r0));
      const uint8_t* wr[RW];
      for (int j = 0; j < RW; ++j) wr[j] = jb.w + static_cast<size_t>(r0 + std::min(j, rr - 1)) * jb.row_bytes;
      float res[RW * 4];
      int64_t x0 = xc;
      auto store = [&](int rx) {
        for (int i = 0; i < rx; ++i) {
          float* o = jb.out + (x0 + i) * jb.ldo + r0;
          for (int j = 0; j < rr; ++j) o[j] = jb.accumulate ? o[j] + res[j * rx + i] : res[j * rx + i];
        }
        x0 += rx;
      };
      for (; x0 + 4 <= xe;) {
        tile<WT, RW, 4>(wr, a, x0, nb, res);
        store(4);
      }
      switch (xe - x0) {
        case 3: tile<WT, RW, 3>(wr, a, x0, nb, res); store(3); break;
        case 2: tile<WT, RW, 2>(wr, a, x0, nb, res); store(2); break;
        case 1: tile<WT, RW, 1>(wr, a, x0, nb, res); store(1); break;
        default: break;
      }
    }
  }
}

template <DType WT>
void run_type(const QuantJob& jb) {
  // One activation row (decode): 4 weight rows per tile keep 4 independent chains in flight;
  // more rows: 2, as the RX = 4 activation rows already give 8.
  if (jb.a->n == 1) run_fmt<WT, 4>(jb);
  else run_fmt<WT, 2>(jb);
}

void run(const QuantJob& jb) {
  switch (jb.wdt) {
    case DType::Q8_0: run_type<DType::Q8_0>(jb); return;
    case DType::Q4_0: run_type<DType::Q4_0>(jb); return;
    case DType::Q4_K: run_type<DType::Q4_K>(jb); return;
    case DType::Q5_K: run_type<DType::Q5_K>(jb); return;
    case DType::Q6_K: run_type<DType::Q6_K>(jb); return;
    default: MOE_FAIL("quantized gemm: %s is not a quantized weight dtype (this is a bug)", dtype_name(jb.wdt));
  }
}

}  // namespace MOE_QK_NS
}  // namespace cpu
}  // namespace moe
