// cpu_quant_kernels.h — the integer dot-product kernels of cpu_quant_gemm.h, written once and
// compiled three times. Include ONLY from cpu_quant_avx2.cpp / cpu_quant_avx512.cpp /
// cpu_quant_vnni.cpp, which first define
//   MOE_QK_NS    the namespace of this copy (every symbol lives in it: no copy compiled for one
//                instruction set can be picked by the linker for another),
//   MOE_QK_512   1: 512-bit loops for the K-quants (AVX512 F/BW/DQ/VL), 0: 256-bit only,
//   MOE_QK_VNNI  1: vpdpbusd / vpdpwssd instead of maddubs + madd,
// and switch the matching target on for every function (pragma), so the build itself needs
// no -mavx512f.
//
// Per format, a tile function dots RW weight rows with RX activation rows over all blocks:
//   q8_0  x·w = dw·da·Σ w_q·a_q           (signed x signed: the sign trick)
//   q4_0  x·w = dw·da·Σ (q-8)·a_q = dw·(da·Σ q·a_q − 8·da·Σ a_q)
//   q4_1, q5_1  x·w = dw·da·Σ q·a_q + mw·da·Σ a_q;   q5_0  x·w = dw·da·(Σ q·a_q − 16·Σ a_q)
//   q4_k  per 256: d·da·Σ_s sc_s Σ q·a_q − dmin·da·Σ_s m_s Σ a_q   (sub-blocks of 32)
//   q5_k  as q4_k with the fifth bit from qh
//   q6_k  per 256: d·da·(Σ_s sc_s Σ q·a_q − 32·Σ_s sc_s Σ a_q)   (sub-blocks of 16)
//   iq4_nl  as q8_0 with the values looked up from 16 levels;  iq4_xs  per 256: d·da·Σ_s (ls_s−32)·Σ w·a_q
//   q3_k  as q6_k with 3-bit q, offset 4, scales sc − 32;  q2_k  per 256: d·da·Σ_s sc_s Σ q·a_q −
//         dmin·da·Σ_s m_s Σ a_q   (sub-blocks of 16, 2-bit q)
// with q unsigned (u8) against the signed activations (|a_q| <= 127). Integer sums cannot
// overflow: a maddubs pair is at most 2·128·127 (q8_0's sign trick) or 2·63·127 (the unsigned
// formats of <= 6 bits) < 2^15; a 256-value super-block's int32 sums stay far below 2^31.
// Block layouts: core/quant.h (llama.cpp's ggml-common.h).

namespace moe {
namespace cpu {
namespace MOE_QK_NS {

inline float h2f(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return _cvtsh_ss(h);
}

inline int ld_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

inline __m256i load256(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }

// Software prefetch of the weight bytes the NEXT tile will read at this step. A tile's RW rows
// are contiguous, so the same block of the row RW rows further on lies `ahead` = RW · row_bytes
// bytes away: one tile of distance (8.7 KiB for an 8-row q8_0 tile of k 1024). The hardware
// prefetchers alone leave a decode GEMV at ~40% of the read bandwidth: the tile reads its rows
// interleaved (one block of each in turn, a 1-2 KiB stride), which they do not follow; a fixed
// distance within one row (the old scheme) landed in rows the tile was already reading.
// MOE_QK_PREFETCH=0 at compile time turns it off (to measure it).
#ifndef MOE_QK_PREFETCH
#define MOE_QK_PREFETCH 1
#endif
inline void prefetch_ahead(const uint8_t* p, int64_t ahead, int64_t bytes) {
  if constexpr (MOE_QK_PREFETCH != 0)
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(p + ahead + o), _MM_HINT_T0);
}

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

// acc + the int16 lane pairs of p times those of s (8 int32 lanes).
inline __m256i madd_acc(__m256i acc, __m256i p, __m256i s) {
#if MOE_QK_VNNI
  return _mm256_dpwssd_epi32(acc, p, s);
#else
  return _mm256_add_epi32(acc, _mm256_madd_epi16(p, s));
#endif
}

// acc + Σ over pairs of u8 · s8 (16 int16 lanes, no saturation for u8 <= 63), times the int16
// scales of each lane pair (8 int32 lanes).
inline __m256i dot_us_scaled(__m256i acc, __m256i u, __m256i s, __m256i scale16) {
  return madd_acc(acc, _mm256_maddubs_epi16(u, s), scale16);
}

#if MOE_QK_512
inline __m512i join(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }

// madd_acc on 16 int32 lanes.
inline __m512i madd_acc512(__m512i acc, __m512i p, __m512i s) {
#if MOE_QK_VNNI
  return _mm512_dpwssd_epi32(acc, p, s);
#else
  return _mm512_add_epi32(acc, _mm512_madd_epi16(p, s));
#endif
}

inline __m512i dot_us_scaled512(__m512i acc, __m512i u, __m512i s, __m512i scale16) {
  return madd_acc512(acc, _mm512_maddubs_epi16(u, s), scale16);
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
  const int16_t* bs[RX];
  ARows(const QActs& a, int64_t x0) {
    const int64_t nbk = a.k / a.blk;
    for (int i = 0; i < RX; ++i) {
      q[i] = a.qs + (x0 + i) * a.k;
      d[i] = a.d + (x0 + i) * nbk;
      bs[i] = a.bsum ? a.bsum + (x0 + i) * (a.k / 16) : nullptr;
    }
  }
};

// ---- q8_0 and q4_0: 32-value blocks, 256-bit loops in every variant (two blocks per 512-bit
// vector measured slower on AMD Zen 4: 512-bit ops are double-pumped there and the per-block
// scales need lane inserts); the VNNI variant uses the 256-bit vpdpbusd. --------------------

// q4_0: 18-byte blocks {f16 d; u8 qs[16]}: value j is the low nibble of byte j, value j+16 the
// high one.
inline __m256i unpack_q4_0(const uint8_t* qs) {
  const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qs));
  const __m128i m = _mm_set1_epi8(0x0F);
  return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(q, 4), m), _mm_and_si128(q, m));
}

// The 16 iq4 levels (kIq4NlValues) in both 128-bit lanes, for one pshufb per 32 values.
struct Iq4Table {
  alignas(32) int8_t v[32];
  constexpr Iq4Table() : v() {
    for (int j = 0; j < 32; ++j) v[j] = kIq4NlValues[j % 16];
  }
};
inline constexpr Iq4Table kIq4{};

// The 32-value formats of signed values with one f16 scale at the block's start: q8_0 (34-byte
// blocks {f16 d; int8 q[32]}) and iq4_nl (18 bytes {f16 d; u8 qs[16]}, the nibbles as q4_0's
// indexing kIq4NlValues). block_s8 returns the 32 int8 values of the block at p.
template <DType WT>
struct S8Block {
  static constexpr int64_t kBytes = WT == DType::Q8_0 ? 34 : 18;
};
template <DType WT>
inline __m256i block_s8(const uint8_t* p) {
  if constexpr (WT == DType::Q8_0) return load256(p + 2);
  else return _mm256_shuffle_epi8(load256(kIq4.v), unpack_q4_0(p + 2));
}

// q8_0 / iq4_nl: signed x signed through the sign trick.
template <DType WT, int RW, int RX>
void tile_s8(const uint8_t* const* wr, const QActs& a, int64_t x0, int64_t nb, float* res, int64_t ahead) {
  ARows<RX> ar(a, x0);
  __m256 acc[RW][RX];
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < RW; ++r) {
      const uint8_t* p = wr[r] + b * S8Block<WT>::kBytes;
      prefetch_ahead(p, ahead, 1);  // 18-34-byte steps < 64: every line is touched
      const float dw = h2f(p);
      const __m256i wq = block_s8<WT>(p);
      const __m256i wa = _mm256_sign_epi8(wq, wq);  // |w| (128 for -128: right as u8)
      for (int i = 0; i < RX; ++i) {
        const __m256i aq = load256(ar.q[i] + b * 32);
        const __m256i dot = dot_us(_mm256_setzero_si256(), wa, _mm256_sign_epi8(aq, wq));
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * ar.d[i][b]), acc[r][i]);
      }
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) res[r * RX + i] = hsum_ps(acc[r][i]);
}

// [Σ lanes 0-3 of d0, of d1, of d2, of d3 | Σ lanes 4-7 of each]: a 4x4 transpose-and-add in
// each 128-bit lane (the decode kernels' per-row reduction, done for 4 rows at once).
inline __m256i sum4_rows(__m256i d0, __m256i d1, __m256i d2, __m256i d3) {
  const __m256i s01 = _mm256_add_epi32(_mm256_unpacklo_epi32(d0, d1), _mm256_unpackhi_epi32(d0, d1));
  const __m256i s23 = _mm256_add_epi32(_mm256_unpacklo_epi32(d2, d3), _mm256_unpackhi_epi32(d2, d3));
  return _mm256_add_epi32(_mm256_unpacklo_epi64(s01, s23), _mm256_unpackhi_epi64(s01, s23));
}

// The f16 scales at p[r] + o0 (lanes 0-3) and p[r] + o1 (lanes 4-7) of 4 rows, as f32.
inline __m256 gather_h4x2(const uint8_t* const* p, int64_t o0, int64_t o1) {
  __m128i h = _mm_cvtsi32_si128(ld_u16(p[0] + o0));
  h = _mm_insert_epi16(h, ld_u16(p[1] + o0), 1);
  h = _mm_insert_epi16(h, ld_u16(p[2] + o0), 2);
  h = _mm_insert_epi16(h, ld_u16(p[3] + o0), 3);
  h = _mm_insert_epi16(h, ld_u16(p[0] + o1), 4);
  h = _mm_insert_epi16(h, ld_u16(p[1] + o1), 5);
  h = _mm_insert_epi16(h, ld_u16(p[2] + o1), 6);
  h = _mm_insert_epi16(h, ld_u16(p[3] + o1), 7);
  return _mm256_cvtph_ps(h);
}

// The 4-row decode kernels' shared steps (tile_s8_rows, tile_q8_0_rows512). Scale: the int32
// sums tot = [block b: rows 0-3 | block b+1: rows 0-3] times each row's and the activations'
// block scales, into acc. Finish: each row's two lanes summed into res, and an odd last block
// through the general tile.
template <DType WT>
inline __m256 s8_rows_scale(__m256 acc, __m256i tot, const uint8_t* const* p, const QActs& a, int64_t b) {
  const __m256 da = _mm256_set_m128(_mm_set1_ps(a.d[b + 1]), _mm_set1_ps(a.d[b]));
  const __m256 dd = _mm256_mul_ps(gather_h4x2(p, 0, S8Block<WT>::kBytes), da);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), dd, acc);
}
template <DType WT, int RW>
inline void s8_rows_finish(__m256 acc, const uint8_t* const* wr, const QActs& a, int64_t b, int64_t nb, float* res) {
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (int r = 0; r < RW; ++r) res[r] = lanes[r] + lanes[4 + r];
  if (b < nb) {
    for (int r = 0; r < RW; ++r) {
      const uint8_t* last[1] = {wr[r] + b * S8Block<WT>::kBytes};
      QActs a1 = a;
      a1.qs = a.qs + b * 32;
      a1.d = a.d + b;
      float one;
      tile_s8<WT, 1, 1>(last, a1, 0, 1, &one, 0);
      res[r] += one;
    }
  }
}

// q8_0 / iq4_nl decode (one activation row), 4 rows and 2 blocks at a time: each row's 8-lane integer
// dot is reduced across lanes (sum4_rows), the two blocks' halves joined, so one vector holds
// block b of rows 0-3 and block b+1 of rows 0-3, converted and scaled by one instruction each.
// The row-at-a-time tile converted, multiplied and broadcast each row's scale and ran one
// conversion and fma per row and block.
template <DType WT, int RW>
void tile_s8_rows(const uint8_t* const* wr, const QActs& a, int64_t nb, float* res, int64_t ahead) {
  static_assert(RW == 4, "sum4_rows and the scale gather take 4 rows");
  __m256 acc = _mm256_setzero_ps();
  __m256i sums[2];
  const uint8_t* p[RW];
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
#pragma GCC unroll 8
    for (int r = 0; r < RW; ++r) p[r] = wr[r] + b * S8Block<WT>::kBytes;
#pragma GCC unroll 2
    for (int e = 0; e < 2; ++e) {
      const __m256i aq = load256(a.qs + (b + e) * 32);
      __m256i dot[RW];
#pragma GCC unroll 8
      for (int r = 0; r < RW; ++r) {
        const uint8_t* q = p[r] + e * S8Block<WT>::kBytes;
        prefetch_ahead(q, ahead, 1);
        const __m256i wq = block_s8<WT>(q);
        dot[r] = dot_us(_mm256_setzero_si256(), _mm256_sign_epi8(wq, wq), _mm256_sign_epi8(aq, wq));
      }
      sums[e] = sum4_rows(dot[0], dot[1], dot[2], dot[3]);
    }
    // [block b: rows 0-3 | block b+1: rows 0-3], each the sum of its two 128-bit halves
    const __m256i tot = _mm256_add_epi32(_mm256_permute2x128_si256(sums[0], sums[1], 0x20),
                                         _mm256_permute2x128_si256(sums[0], sums[1], 0x31));
    acc = s8_rows_scale<WT>(acc, tot, p, a, b);
  }
  s8_rows_finish<WT, RW>(acc, wr, a, b, nb, res);
}


#if MOE_QK_VNNI
// q8_0 decode on 512-bit vectors: each row's blocks b and b+1 in one vector against the
// activations' 64 bytes of those blocks. AVX-512 has no vpsignb for the sign trick, so the
// weights go unsigned as w + 128 (one xor) and 128·Σa of each activation block
// (QActs::sum32) comes off the integer sums: the same int32 totals as tile_s8_rows, reduced
// and scaled in the same order, so the outputs are bit-identical to it. Half the dot and sign
// instructions of the 256-bit rows: on the 2-core Zen 5 VM the 256-bit kernel streamed
// L3-resident rows at 84-99 GB/s, about what its memory reads in fast minutes.
template <int RW>
void tile_q8_0_rows512(const uint8_t* const* wr, const QActs& a, int64_t nb, float* res, int64_t ahead) {
  static_assert(RW == 4, "sum4_rows and the scale gather take 4 rows");
  constexpr int64_t kB = S8Block<DType::Q8_0>::kBytes;
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  __m256 acc = _mm256_setzero_ps();
  const uint8_t* p[RW];
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    const __m512i aq = _mm512_loadu_si512(a.qs + b * 32);
    __m512i dot[RW];
#pragma GCC unroll 4
    for (int r = 0; r < RW; ++r) {
      p[r] = wr[r] + b * kB;
      prefetch_ahead(p[r], ahead, 1);
      prefetch_ahead(p[r] + kB, ahead, 1);
      const __m512i w = _mm512_xor_si512(join(load256(p[r] + 2), load256(p[r] + kB + 2)), flip);
      dot[r] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, aq);
    }
    // sum4_rows on 512 bits: 128-bit lanes 0-1 hold block b's partial sums of rows 0-3, 2-3 block b+1's.
    const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(dot[0], dot[1]), _mm512_unpackhi_epi32(dot[0], dot[1]));
    const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(dot[2], dot[3]), _mm512_unpackhi_epi32(dot[2], dot[3]));
    const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    const __m512i sl = _mm512_shuffle_i32x4(s, s, _MM_SHUFFLE(3, 1, 2, 0));  // lanes 0 2 1 3
    // [block b: rows 0-3 | block b+1: rows 0-3], less 128·Σa of each block
    __m256i tot = _mm256_add_epi32(_mm512_castsi512_si256(sl), _mm512_extracti64x4_epi64(sl, 1));
    tot = _mm256_sub_epi32(tot, _mm256_slli_epi32(_mm256_set_m128i(_mm_set1_epi32(a.sum32[b + 1]), _mm_set1_epi32(a.sum32[b])), 7));
    acc = s8_rows_scale<DType::Q8_0>(acc, tot, p, a, b);
  }
  s8_rows_finish<DType::Q8_0, RW>(acc, wr, a, b, nb, res);
}
#endif

// Two q4_0 blocks (b, b+1) starting at p0 as one 256-bit vector of nibbles [b | b+1] (their
// 16-byte runs joined): lo = values 0-15 of each, hi = values 16-31, against the pair-regrouped
// activations (QActs::qs for q4_0). Returns Σ(q-8)·a per 128-bit lane: 4 int32 lanes per block,
// the -8 offset taken off in integers with s4 (2·Σa in each lane).
struct Q4Pair {
  __m256i lo, hi;
};
inline Q4Pair q4_0_pair_load(const uint8_t* p0) {
  const __m256i raw = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + 2))),
                                              _mm_loadu_si128(reinterpret_cast<const __m128i*>(p0 + 20)), 1);
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  return {_mm256_and_si256(raw, m4), _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4)};
}
// Σq·a per 128-bit lane without the -8 offset.
inline __m256i q4_0_pair_sum(const Q4Pair& w, __m256i alo, __m256i ahi) {
#if MOE_QK_VNNI
  return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), w.lo, alo), w.hi, ahi);
#else
  // u8 <= 15 against |s8| <= 127: each maddubs lane <= 3810, the sum of two fits int16.
  return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(w.lo, alo), _mm256_maddubs_epi16(w.hi, ahi)),
                           _mm256_set1_epi16(1));
#endif
}
inline __m256i q4_0_pair_dot(const Q4Pair& w, const int8_t* qa, const int32_t* s4) {
  return _mm256_sub_epi32(q4_0_pair_sum(w, load256(qa), load256(qa + 32)), load256(s4));
}
// dw of blocks b and b+1, each in one 128-bit lane.
inline __m256 q4_0_pair_scales(const uint8_t* p0) {
  return _mm256_set_m128(_mm_set1_ps(h2f(p0 + 18)), _mm_set1_ps(h2f(p0)));
}

// acc + the lanes of one q4_0 block (p) against one activation block (qa, scale da, s4 = 2·Σq).
inline __m256 q4_0_last_block(const uint8_t* p, const int8_t* qa, float da, int32_t s4, __m256 acc) {
  // 8 int32 lanes cover the whole block: subtract 8·Σa as 1·Σa per lane.
  const __m256i dot = _mm256_sub_epi32(dot_us(_mm256_setzero_si256(), unpack_q4_0(p + 2), load256(qa)), _mm256_set1_epi32(s4 / 2));
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(h2f(p) * da), acc);
}

template <int RW, int RX>
void tile_q4_0(const uint8_t* const* wr, const QActs& a, int64_t x0, int64_t nb, float* res, int64_t ahead) {
  ARows<RX> ar(a, x0);
  const float* d4[RX];
  const int32_t* s4[RX];
  for (int i = 0; i < RX; ++i) d4[i] = a.d4 + (x0 + i) * nb * 4, s4[i] = a.s4 + (x0 + i) * nb * 4;
  __m256 acc[RW][RX];
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) acc[r][i] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    for (int r = 0; r < RW; ++r) {
      const uint8_t* p = wr[r] + b * 18;
      prefetch_ahead(p, ahead, 1);
      const Q4Pair w = q4_0_pair_load(p);
      const __m256 dw = q4_0_pair_scales(p);
      for (int i = 0; i < RX; ++i) {
        const __m256i dot = q4_0_pair_dot(w, ar.q[i] + b * 32, s4[i] + b * 4);
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(dw, _mm256_loadu_ps(d4[i] + b * 4)), acc[r][i]);
      }
    }
  }
  if (b < nb)  // odd block count: the last block alone (its activations are not regrouped)
    for (int r = 0; r < RW; ++r)
      for (int i = 0; i < RX; ++i)
        acc[r][i] = q4_0_last_block(wr[r] + b * 18, ar.q[i] + b * 32, ar.d[i][b], s4[i][b * 4], acc[r][i]);
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) res[r * RX + i] = hsum_ps(acc[r][i]);
}

// q4_0 decode (one activation row), 4 rows together. Per block pair the activations and their
// scales are loaded once for all rows; each row's integer dot (4 int32 lanes per block) is
// reduced across lanes by a 4x4 transpose-and-add, so one vector holds block b of the 4 rows
// (lanes 0-3) and block b+1 (lanes 4-7): the -8 offset, the int-to-float conversion and the
// scaling are then one instruction each for all 4 rows, not one per row. The 8 f16 weight
// scales are gathered in that lane order and converted by one vcvtph2ps. (Without any float
// work the row-at-a-time loop ran at 31.6 GB/s on one thread, with it 17-19: the conversion,
// scale and fma per row and block were the cost.)
template <int RW>
void tile_q4_0_rows(const uint8_t* const* wr, const QActs& a, int64_t nb, float* res, int64_t ahead) {
  static_assert(RW == 4, "the transpose and the scale gather below take 4 rows");
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    const __m256i alo = load256(a.qs + b * 32), ahi = load256(a.qs + b * 32 + 32);
    const uint8_t* p[RW];
    __m256i dot[RW];
#pragma GCC unroll 8
    for (int r = 0; r < RW; ++r) {
      p[r] = wr[r] + b * 18;
      prefetch_ahead(p[r], ahead, 1);
      dot[r] = q4_0_pair_sum(q4_0_pair_load(p[r]), alo, ahi);
    }
    // [Σ row 0, Σ row 1, Σ row 2, Σ row 3] of block b in the low lane, of block b+1 in the high
    const __m256i sum = sum4_rows(dot[0], dot[1], dot[2], dot[3]);
    // s4 holds 2·Σq in each of a block's 4 lanes: the -8 offset is 4 times that
    const __m256i tot = _mm256_sub_epi32(sum, _mm256_slli_epi32(load256(a.s4 + b * 4), 2));
    const __m256 dd = _mm256_mul_ps(gather_h4x2(p, 0, 18), _mm256_loadu_ps(a.d4 + b * 4));  // d4: [d_b x4 | d_b+1 x4]
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), dd, acc);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (int r = 0; r < RW; ++r) res[r] = lanes[r] + lanes[4 + r];
  if (b < nb)  // odd block count: the last block alone, as in tile_q4_0
    for (int r = 0; r < RW; ++r)
      res[r] += hsum_ps(q4_0_last_block(wr[r] + b * 18, a.qs + b * 32, a.d[b], a.s4[b * 4], _mm256_setzero_ps()));
}

// ---- q4_1, q5_0, q5_1: 32-value blocks {f16 d; [f16 m]; [u8 qh[4]]; u8 qs[16]} -------------
// The nibbles as q4_0's (value j low nibble of byte j, value j+16 the high one); the fifth bit
// of value j is bit j of qh. Unsigned q (<= 31) against the int8 activations; per block the
// minimum (q4_1, q5_1) or the -16 offset (q5_0) enters through Σa_q (QActs::sum32).
template <DType WT>
struct LegacyBlock {
  static constexpr int64_t kBytes = WT == DType::Q4_1 ? 20 : WT == DType::Q5_0 ? 22 : 24;
  static constexpr bool kMin = WT != DType::Q5_0, kFifth = WT != DType::Q4_1;
  static constexpr int64_t kQh = WT == DType::Q5_0 ? 2 : 4, kQs = kBytes - 16;
};

// Byte j (0..31) = 0x10 where bit j of the 32 bits at qh is set.
struct QhTable {
  alignas(32) uint8_t spread[32], bit[32];
  constexpr QhTable() : spread(), bit() {
    for (int j = 0; j < 32; ++j) spread[j] = static_cast<uint8_t>(j / 8), bit[j] = static_cast<uint8_t>(1 << (j % 8));
  }
};
inline constexpr QhTable kQh{};
inline __m256i fifth_bits(const uint8_t* qh) {
  int32_t h;
  std::memcpy(&h, qh, 4);
  const __m256i bit = load256(kQh.bit);
  const __m256i b = _mm256_and_si256(_mm256_shuffle_epi8(_mm256_set1_epi32(h), load256(kQh.spread)), bit);
  return _mm256_and_si256(_mm256_cmpeq_epi8(b, bit), _mm256_set1_epi8(0x10));
}

template <DType WT, int RW, int RX>
void tile_legacy(const uint8_t* const* wr, const QActs& a, int64_t x0, int64_t nb, float* res, int64_t ahead) {
  using F = LegacyBlock<WT>;
  ARows<RX> ar(a, x0);
  const int32_t* s32[RX];
  for (int i = 0; i < RX; ++i) s32[i] = a.sum32 + (x0 + i) * nb;
  __m256 acc[RW][RX];
  float macc[RW][RX] = {};
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < RW; ++r) {
      const uint8_t* p = wr[r] + b * F::kBytes;
      prefetch_ahead(p, ahead, 1);
      const float dw = h2f(p);
      __m256i wq = unpack_q4_0(p + F::kQs);
      if constexpr (F::kFifth) wq = _mm256_or_si256(wq, fifth_bits(p + F::kQh));
      for (int i = 0; i < RX; ++i) {
        __m256i dot = dot_us(_mm256_setzero_si256(), wq, load256(ar.q[i] + b * 32));
        const float da = ar.d[i][b];
        if constexpr (WT == DType::Q5_0) dot = _mm256_sub_epi32(dot, _mm256_setr_epi32(16 * s32[i][b], 0, 0, 0, 0, 0, 0, 0));
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(dw * da), acc[r][i]);
        if constexpr (F::kMin) macc[r][i] += h2f(p + 2) * (da * static_cast<float>(s32[i][b]));
      }
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) res[r * RX + i] = hsum_ps(acc[r][i]) + macc[r][i];
}

// The fifth bits of two blocks (qh words h0 of block b, h1 of b+1) in the order of q4_0's pair
// load (q4_0_pair_load): lo = [b values 0-15 | b+1 values 0-15], hi = values 16-31; 0x10 where set.
struct QhPairTable {
  alignas(32) uint8_t lo[32], hi[32];
  constexpr QhPairTable() : lo(), hi() {
    for (int j = 0; j < 32; ++j) lo[j] = static_cast<uint8_t>(j % 16 / 8), hi[j] = static_cast<uint8_t>(2 + j % 16 / 8);
  }
};
inline constexpr QhPairTable kQhPair{};
inline Q4Pair fifth_bits_pair(const uint8_t* qh0, const uint8_t* qh1) {
  int32_t h0, h1;
  std::memcpy(&h0, qh0, 4);
  std::memcpy(&h1, qh1, 4);
  const __m256i v = _mm256_set_m128i(_mm_set1_epi32(h1), _mm_set1_epi32(h0));
  const __m256i bit = load256(kQh.bit), b4 = _mm256_set1_epi8(0x10);
  const __m256i lo = _mm256_and_si256(_mm256_shuffle_epi8(v, load256(kQhPair.lo)), bit);
  const __m256i hi = _mm256_and_si256(_mm256_shuffle_epi8(v, load256(kQhPair.hi)), bit);
  return {_mm256_and_si256(_mm256_cmpeq_epi8(lo, bit), b4), _mm256_and_si256(_mm256_cmpeq_epi8(hi, bit), b4)};
}

// Decode of the same formats as tile_q4_0_rows: two blocks per 256-bit vector against the
// pair-regrouped activations (QActs::qs, d4, s4), 4 rows' integer dots reduced across lanes by
// sum4_rows, so the offset (q5_0), the scaling and the minimum (q4_1, q5_1) run once per 4 rows.
template <DType WT, int RW>
void tile_legacy_rows(const uint8_t* const* wr, const QActs& a, int64_t nb, float* res, int64_t ahead) {
  static_assert(RW == 4, "sum4_rows and the scale gather take 4 rows");
  using F = LegacyBlock<WT>;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  __m256 acc = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 2 <= nb; b += 2) {
    const __m256i alo = load256(a.qs + b * 32), ahi = load256(a.qs + b * 32 + 32);
    const uint8_t* p[RW];
    __m256i dot[RW];
#pragma GCC unroll 8
    for (int r = 0; r < RW; ++r) {
      p[r] = wr[r] + b * F::kBytes;
      prefetch_ahead(p[r], ahead, 1);
      const __m256i raw = _mm256_inserti128_si256(
          _mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + F::kQs))),
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + F::kBytes + F::kQs)), 1);
      Q4Pair w{_mm256_and_si256(raw, m4), _mm256_and_si256(_mm256_srli_epi16(raw, 4), m4)};
      if constexpr (F::kFifth) {
        const Q4Pair h = fifth_bits_pair(p[r] + F::kQh, p[r] + F::kBytes + F::kQh);
        w.lo = _mm256_or_si256(w.lo, h.lo);
        w.hi = _mm256_or_si256(w.hi, h.hi);
      }
      dot[r] = q4_0_pair_sum(w, alo, ahi);
    }
    // [Σ rows 0-3 of block b | of block b+1]; s4 holds 2·Σa in each of a block's 4 lanes
    __m256i tot = sum4_rows(dot[0], dot[1], dot[2], dot[3]);
    const __m256i s4 = load256(a.s4 + b * 4);
    if constexpr (WT == DType::Q5_0) tot = _mm256_sub_epi32(tot, _mm256_slli_epi32(s4, 3));
    const __m256 d4 = _mm256_loadu_ps(a.d4 + b * 4);
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(tot), _mm256_mul_ps(gather_h4x2(p, 0, F::kBytes), d4), acc);
    if constexpr (F::kMin) {
      const __m256 das = _mm256_mul_ps(d4, _mm256_mul_ps(_mm256_cvtepi32_ps(s4), _mm256_set1_ps(0.5f)));
      acc = _mm256_fmadd_ps(gather_h4x2(p, 2, F::kBytes + 2), das, acc);
    }
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (int r = 0; r < RW; ++r) res[r] = lanes[r] + lanes[4 + r];
  if (b < nb) {  // odd block count: the last block (not regrouped) through the general tile
    QActs a1 = a;
    a1.qs = a.qs + b * 32;
    a1.d = a.d + b;
    a1.sum32 = a.sum32 + b;
    for (int r = 0; r < RW; ++r) {
      const uint8_t* last[1] = {wr[r] + b * F::kBytes};
      float one;
      tile_legacy<WT, 1, 1>(last, a1, 0, 1, &one, 0);
      res[r] += one;
    }
  }
}

// Software prefetch distance of the decode kernels (run_decode): within each row, past its end
// into the next row of the same stream. 1024 was measured on an AVX2 EPYC VM; on the 2-core Zen 5
// VM (AVX-512), in its fast-memory minutes (read bandwidth 84-88 GB/s), 1024 left q8_0 decode
// of the medium preset at 62-68% of the read bandwidth and 4096 reached 71-75% (q4_K 56-58% ->
// 63%); in its slow minutes (~52 GB/s) both sit at 81-89%. A q8_0 GEMV of 3072-wide rows from
// memory, alternated in one minute: 512 53-55 GB/s, 1024 59-60, 2048 74-75, 4096 78-82 (the
// plain two-stream read 74-80).
#ifndef MOE_QK_ROW_AHEAD
#define MOE_QK_ROW_AHEAD 4096
#endif
constexpr int64_t kRowAhead = MOE_QK_ROW_AHEAD;

// ---- K-quants: 256-value super-blocks against q8_K-style activations (d, q[256], bsum[16]) ----

// The 6-bit scales (bytes 0-7) and mins (bytes 8-15) of the 8 sub-blocks of a q4_K/q5_K block
// (ggml's get_scale_min_k4), unpacked in vector registers: with A = q[0..3] q[8..11] q[4..7]
// q[8..11] and B = the bytes whose top 2 bits complete sc[4..7] / m[4..7],
//   sc[0..3] = A & 63, sc[4..7] = (A & 15) | (B >> 6) << 4, m[0..3] = A & 63,
//   m[4..7] = (A >> 4) | (B >> 6) << 4.
// Each 128-bit lane of v holds one block's 12 scale bytes (+ 4 ignored): two blocks at once.
// The per-128-bit-lane constants of the unpacking (k4_scales_mins2 / k4_scales_mins4 broadcast
// them to their width).
alignas(16) inline constexpr int8_t kK4A[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 8, 9, 10, 11};
alignas(16) inline constexpr int8_t kK4B[16] = {-1, -1, -1, -1, 0, 1, 2, 3, -1, -1, -1, -1, 4, 5, 6, 7};
alignas(16) inline constexpr int8_t kK4Lo[16] = {63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63, 0, 0, 0, 0};
alignas(16) inline constexpr int8_t kK4Hi[16] = {0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 15, 15, 15, 15};
// 16 bytes at p in both 128-bit lanes.
inline __m256i bcast_128(const void* p) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
inline __m256i k4_scales_mins2(__m256i v) {
  const __m256i A = _mm256_shuffle_epi8(v, bcast_128(kK4A)), B = _mm256_shuffle_epi8(v, bcast_128(kK4B));
  const __m256i lo = _mm256_or_si256(_mm256_and_si256(A, bcast_128(kK4Lo)),
                                     _mm256_and_si256(_mm256_srli_epi16(A, 4), bcast_128(kK4Hi)));
  const __m256i hi = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(B, 6), _mm256_set1_epi8(3)), 4);
  return _mm256_or_si256(lo, hi);
}
inline __m128i k4_scales_mins(const uint8_t* q) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  return _mm256_castsi256_si128(k4_scales_mins2(_mm256_castsi128_si256(v)));
}

// pshufb controls that broadcast int16 element e (lo 128 bits) and f (hi 128 bits) of a
// vector holding 8 int16 in each half.
// The controls are read from a table: built in registers (movd + pshufd + inserti128 each) they
// cost three shuffle-port uops per use in the K-quant inner loops, more than the pshufb itself.
struct Shuf16Table {
  alignas(32) int8_t c[8][8][32];
  constexpr Shuf16Table() : c{} {
    for (int e = 0; e < 8; ++e)
      for (int f = 0; f < 8; ++f)
        for (int i = 0; i < 16; ++i) {
          c[e][f][i] = static_cast<int8_t>(2 * e + (i & 1));
          c[e][f][16 + i] = static_cast<int8_t>(2 * f + (i & 1));
        }
  }
};
inline constexpr Shuf16Table kShuf16{};
inline __m256i shuf16(int e, int f) { return load256(kShuf16.c[e][f]); }

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

#if MOE_QK_512
using AccK = __m512;
inline AccK acc_zero() { return _mm512_setzero_ps(); }
inline float acc_sum(AccK a) { return _mm512_reduce_add_ps(a); }
#else
using AccK = __m256;
inline AccK acc_zero() { return _mm256_setzero_ps(); }
inline float acc_sum(AccK a) { return hsum_ps(a); }
#endif

// q4_K (144 bytes: d, dmin, scales[12], qs[128]) and q5_K (176: d, dmin, scales[12], qh[32],
// qs[128]). Per super-block and row pair (r, i): the int32 lanes of Σ_s sc_s·Σ q·a (no
// horizontal sum), scaled into a float vector accumulator once; the mins term Σ_s m_s·Σ a
// (from the activation sums per 32) is subtracted from the same accumulator.
template <bool Q5, int RW, int RX>
void tile_qk45(const uint8_t* const* wr, const QActs& a, int64_t x0, int64_t nb, float* res, int64_t ahead) {
  constexpr int64_t kBytes = Q5 ? 176 : 144;
  constexpr int kQs = Q5 ? 48 : 16;
  ARows<RX> ar(a, x0);
  const int16_t* bs32[RX];
  for (int i = 0; i < RX; ++i) bs32[i] = a.bsum32 + (x0 + i) * (a.k / 32);
  AccK acc[RW][RX];
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) acc[r][i] = acc_zero();
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < RW; ++r) {
      const uint8_t* p = wr[r] + b * kBytes;
      prefetch_ahead(p, ahead, kBytes);
      const float dw = h2f(p), dmin = h2f(p + 2);
      const __m128i sm = k4_scales_mins(p + 4);
      const __m128i mins16 = _mm_cvtepu8_epi16(_mm_srli_si128(sm, 8));
      const __m256i sc16 = _mm256_broadcastsi128_si256(_mm_cvtepu8_epi16(sm));
      const uint8_t* qs = p + kQs;
      const uint8_t* qh = p + 16;
#if MOE_QK_512
      __m512i sumi[RX];
      for (int i = 0; i < RX; ++i) sumi[i] = _mm512_setzero_si512();
      for (int j = 0; j < 4; ++j) {
        __m256i lo, hi;
        k_unpack<Q5>(qs, qh, j, &lo, &hi);
        const __m512i wq = join(lo, hi);
        const __m512i s16 = join(_mm256_shuffle_epi8(sc16, shuf16(2 * j, 2 * j)),
                                 _mm256_shuffle_epi8(sc16, shuf16(2 * j + 1, 2 * j + 1)));
        for (int i = 0; i < RX; ++i)
          sumi[i] = dot_us_scaled512(sumi[i], wq, _mm512_loadu_si512(ar.q[i] + b * 256 + 64 * j), s16);
      }
      for (int i = 0; i < RX; ++i) {
        const float da = ar.d[i][b];
        const __m128i mp = _mm_madd_epi16(mins16, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bs32[i] + b * 8)));
        acc[r][i] = _mm512_fmadd_ps(_mm512_set1_ps(dw * da), _mm512_cvtepi32_ps(sumi[i]), acc[r][i]);
        acc[r][i] = _mm512_fnmadd_ps(_mm512_set1_ps(dmin * da), _mm512_cvtepi32_ps(_mm512_zextsi128_si512(mp)), acc[r][i]);
      }
#else
      __m256i sumi[RX];
      for (int i = 0; i < RX; ++i) sumi[i] = _mm256_setzero_si256();
      for (int j = 0; j < 4; ++j) {
        __m256i lo, hi;
        k_unpack<Q5>(qs, qh, j, &lo, &hi);
        const __m256i s_lo = _mm256_shuffle_epi8(sc16, shuf16(2 * j, 2 * j));
        const __m256i s_hi = _mm256_shuffle_epi8(sc16, shuf16(2 * j + 1, 2 * j + 1));
        for (int i = 0; i < RX; ++i) {
          const int8_t* aq = ar.q[i] + b * 256 + 64 * j;
          sumi[i] = dot_us_scaled(sumi[i], lo, load256(aq), s_lo);
          sumi[i] = dot_us_scaled(sumi[i], hi, load256(aq + 32), s_hi);
        }
      }
      for (int i = 0; i < RX; ++i) {
        const float da = ar.d[i][b];
        const __m128i mp = _mm_madd_epi16(mins16, _mm_loadu_si128(reinterpret_cast<const __m128i*>(bs32[i] + b * 8)));
        acc[r][i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * da), _mm256_cvtepi32_ps(sumi[i]), acc[r][i]);
        acc[r][i] = _mm256_fnmadd_ps(_mm256_set1_ps(dmin * da), _mm256_cvtepi32_ps(_mm256_zextsi128_si256(mp)), acc[r][i]);
      }
#endif
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) res[r * RX + i] = acc_sum(acc[r][i]);
}

// pshufb controls over k4_scales_mins2's output that widen byte e of each 128-bit lane to all
// 8 int16 of that lane (e 0-7 the scales, 8-15 the mins: kZx16[8] widens all 8 mins instead).
struct Zx16Table {
  alignas(32) int8_t c[9][32];
  constexpr Zx16Table() : c{} {
    for (int e = 0; e < 8; ++e)
      for (int i = 0; i < 32; ++i) c[e][i] = static_cast<int8_t>(i % 2 ? -1 : e);
    for (int i = 0; i < 32; ++i) c[8][i] = static_cast<int8_t>(i % 2 ? -1 : 8 + (i % 16) / 2);
  }
};
inline constexpr Zx16Table kZx16{};

inline __m256i load_2x128(const uint8_t* lo, const uint8_t* hi) {
  return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo))),
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(hi)), 1);
}

// 16 where a byte of h has all the bits of m set, else 0 (q5_K's fifth bit as a value).
inline __m256i q5_bit16(__m256i h, __m256i m) {
  return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(h, m), m), _mm256_set1_epi8(16));
}

// The row-pair decode kernels' pieces: block b of each of the RW rows (its bytes prefetched
// `ahead` on), and each pair accumulator's two row sums (lanes 0-3 row 2q, 4-7 row 2q+1).
template <int RW>
inline void block_rows(const uint8_t* const* wr, int64_t b, int64_t bytes, int64_t ahead, const uint8_t** p) {
#pragma GCC unroll 8
  for (int r = 0; r < RW; ++r) {
    p[r] = wr[r] + b * bytes;
    prefetch_ahead(p[r], ahead, bytes);
  }
}
template <int P>
inline void pair_sums(const __m256* acc, float* res) {
#pragma GCC unroll 8
  for (int q = 0; q < P; ++q) {
    const __m128 l0 = _mm256_castps256_ps128(acc[q]), l1 = _mm256_extractf128_ps(acc[q], 1);
    const __m128 s = _mm_hadd_ps(_mm_hadd_ps(l0, l1), _mm_setzero_ps());  // [Σl0, Σl1, 0, 0]
    res[2 * q] = _mm_cvtss_f32(s);
    res[2 * q + 1] = _mm_cvtss_f32(_mm_movehdup_ps(s));
  }
}

// q4_K / q5_K decode (one activation row), two weight rows per 256-bit vector: lane 0 holds 16 values
// of row r, lane 1 the same 16 of row r+1, against the activations broadcast to both lanes. So
// the per-block work — unpacking the 6-bit scales and mins, converting d and dmin — is done for
// two rows by one set of instructions, and each sub-block scale vector is one pshufb straight
// from the packed bytes (no widening, no lane broadcast); the broadcast activations and the
// controls are loaded once per block for all the pairs. One thread, 4 rows at a time over k
// 4096: 14-17 GB/s with tile_qk45, 22-24 GB/s with this (rows in L2 / L3).
// q5_K adds the fifth bit from qh (bytes 16-47: bit 2j / 2j+1 of byte l for value l of
// sub-block 2j / 2j+1), loaded the same way, two rows per vector.
// RW even; the int32 lanes 0-3 of each sum belong to row r, 4-7 to row r+1.
template <bool Q5, int RW>
void tile_qk45_pairs(const uint8_t* const* wr, const QActs& a, int64_t nb, float* res, int64_t ahead) {
  static_assert(RW % 2 == 0, "rows are taken in pairs");
  constexpr int P = RW / 2;
  constexpr int64_t kBytes = Q5 ? 176 : 144;
  constexpr int kQs = Q5 ? 48 : 16;
  const __m256i m4 = _mm256_set1_epi8(0x0F);
  const __m256i d_lanes = _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2), m_lanes = _mm256_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3);
  __m256 acc[P];
#pragma GCC unroll 8
  for (int q = 0; q < P; ++q) acc[q] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* aq = a.qs + b * 256;
    const uint8_t* p[RW];
    block_rows<RW>(wr, b, kBytes, ahead, p);
    __m256i sm[P], sumi[P];
#pragma GCC unroll 8
    for (int q = 0; q < P; ++q) {
      sm[q] = k4_scales_mins2(load_2x128(p[2 * q] + 4, p[2 * q + 1] + 4));
      sumi[q] = _mm256_setzero_si256();
    }
    // j outer, row pairs inner: the broadcast activations and the scale controls are loaded
    // once for all pairs. The pragma: GCC left this loop rolled in the library build.
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m256i a0 = bcast_128(aq + 64 * j), a1 = bcast_128(aq + 64 * j + 16);
      const __m256i a2 = bcast_128(aq + 64 * j + 32), a3 = bcast_128(aq + 64 * j + 48);
      const __m256i c_lo = load256(kZx16.c[2 * j]), c_hi = load256(kZx16.c[2 * j + 1]);
#pragma GCC unroll 4
      for (int q = 0; q < P; ++q) {
        const uint8_t* p0 = p[2 * q] + kQs + 32 * j;
        const uint8_t* p1 = p[2 * q + 1] + kQs + 32 * j;
        const __m256i v0 = load_2x128(p0, p1);            // bytes 0-15 of the pair
        const __m256i v1 = load_2x128(p0 + 16, p1 + 16);  // bytes 16-31
        __m256i w00 = _mm256_and_si256(v0, m4), w10 = _mm256_and_si256(v1, m4);
        __m256i w01 = _mm256_and_si256(_mm256_srli_epi16(v0, 4), m4), w11 = _mm256_and_si256(_mm256_srli_epi16(v1, 4), m4);
        if constexpr (Q5) {
          const __m256i h0 = load_2x128(p[2 * q] + 16, p[2 * q + 1] + 16), h1 = load_2x128(p[2 * q] + 32, p[2 * q + 1] + 32);
          const __m256i b0 = _mm256_set1_epi8(static_cast<char>(1 << (2 * j)));
          const __m256i b1 = _mm256_set1_epi8(static_cast<char>(1 << (2 * j + 1)));
          w00 = _mm256_or_si256(w00, q5_bit16(h0, b0));
          w10 = _mm256_or_si256(w10, q5_bit16(h1, b0));
          w01 = _mm256_or_si256(w01, q5_bit16(h0, b1));
          w11 = _mm256_or_si256(w11, q5_bit16(h1, b1));
        }
        const __m256i s_lo = _mm256_shuffle_epi8(sm[q], c_lo), s_hi = _mm256_shuffle_epi8(sm[q], c_hi);
        // The two halves of a sub-block share its scale: their int16 products add before the
        // scaling multiply-add (each <= 2·31·127, the sum < 2^15).
        sumi[q] = madd_acc(sumi[q], _mm256_add_epi16(_mm256_maddubs_epi16(w00, a0), _mm256_maddubs_epi16(w10, a1)), s_lo);
        sumi[q] = madd_acc(sumi[q], _mm256_add_epi16(_mm256_maddubs_epi16(w01, a2), _mm256_maddubs_epi16(w11, a3)), s_hi);
        // Keeps the sum a chain: GCC otherwise reassociates the 16 integer adds of a block
        // into a tree with all 16 products live at once, and spills them (74 stack accesses
        // in the function against 22; 2-thread q4_K decode of L3-resident rows 38 -> 41 GB/s).
        __asm__("" : "+x"(sumi[q]));
      }
    }
    const __m256i bs = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(a.bsum32 + b * 8)));
    const __m128 da = _mm_set1_ps(a.d[b]);
#pragma GCC unroll 8
    for (int q = 0; q < P; ++q) {
      const __m256i mins = _mm256_madd_epi16(_mm256_shuffle_epi8(sm[q], load256(kZx16.c[8])), bs);
      // [d, dmin] of row r then of row r+1, times the activation scale.
      uint32_t h0, h1;
      std::memcpy(&h0, p[2 * q], 4);
      std::memcpy(&h1, p[2 * q + 1], 4);
      const __m256 dd = _mm256_castps128_ps256(_mm_mul_ps(_mm_cvtph_ps(_mm_setr_epi32(h0, h1, 0, 0)), da));
      acc[q] = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(dd, d_lanes), _mm256_cvtepi32_ps(sumi[q]), acc[q]);
      acc[q] = _mm256_fnmadd_ps(_mm256_permutevar8x32_ps(dd, m_lanes), _mm256_cvtepi32_ps(mins), acc[q]);
    }
  }
  pair_sums<P>(acc, res);
}

#if MOE_QK_512
// tile_qk45_pairs on 512-bit vectors, four rows per vector: 128-bit lane r holds 16 values of
// row r (the same instructions per block as a row pair takes at 256 bits, for twice the rows).
// On the 2-core Zen 5 VM (full-width AVX-512) q4_K decode of L3-resident rows was bound by the
// pairs' instruction count at ~60 GB/s, under the 84-88 GB/s its memory reads in fast minutes.
inline __m512i load_4x128(const uint8_t* const* p, int64_t off) {
  const auto ld = [&](int r) { return _mm_loadu_si128(reinterpret_cast<const __m128i*>(p[r] + off)); };
  const __m512i lo = _mm512_castsi256_si512(_mm256_inserti128_si256(_mm256_castsi128_si256(ld(0)), ld(1), 1));
  return _mm512_inserti64x4(lo, _mm256_inserti128_si256(_mm256_castsi128_si256(ld(2)), ld(3), 1), 1);
}
inline __m512i bcast4_128(const void* p) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
// k4_scales_mins2 on four blocks (one per 128-bit lane), from the same per-lane constants.
inline __m512i k4_scales_mins4(__m512i v) {
  const __m512i A = _mm512_shuffle_epi8(v, bcast4_128(kK4A)), B = _mm512_shuffle_epi8(v, bcast4_128(kK4B));
  const __m512i lo = _mm512_or_si512(_mm512_and_si512(A, bcast4_128(kK4Lo)),
                                     _mm512_and_si512(_mm512_srli_epi16(A, 4), bcast4_128(kK4Hi)));
  const __m512i hi = _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(B, 6), _mm512_set1_epi8(3)), 4);
  return _mm512_or_si512(lo, hi);
}
inline __m512i q5_bit16_512(__m512i h, __m512i m) {
  return _mm512_maskz_mov_epi8(_mm512_cmpeq_epi8_mask(_mm512_and_si512(h, m), m), _mm512_set1_epi8(16));
}

// A q4_K/q5_K block of four rows (p[r]: row r's block; sm: k4_scales_mins4 of their scale bytes):
// Σ_s m_s·Σa_s of row r as the four int32 of 128-bit lane r, and [d, dmin] of row r at lanes
// 2r, 2r+1 times the activations' scale da.
inline __m512i k4_mins4(__m512i sm, const QActs& a, int64_t b) {
  return _mm512_madd_epi16(_mm512_shuffle_epi8(sm, bcast4_128(kZx16.c[8])), bcast4_128(a.bsum32 + b * 8));
}
inline __m512 k4_d_dmin4(const uint8_t* const* p, float da) {
  uint32_t h[4];
#pragma GCC unroll 4  // (rolled, h went through the stack: the q4_K kernels 45% slower)
  for (int r = 0; r < 4; ++r) std::memcpy(&h[r], p[r], 4);
  const __m256 dd = _mm256_mul_ps(_mm256_cvtph_ps(_mm_setr_epi32(int(h[0]), int(h[1]), int(h[2]), int(h[3]))), _mm256_set1_ps(da));
  return _mm512_castps256_ps512(dd);
}

// Row r's sum is 128-bit lane r's four floats: hadd works within 128-bit lanes, so
// s8 = [r0 r0 r2 r2 | r1 r1 r3 r3] (partial sums) and s4 = [r0 r2 . . | r1 r3 . .].
inline void quad_sums(__m512 acc, float* res) {
  const __m256 s8 = _mm256_hadd_ps(_mm512_castps512_ps256(acc), _mm512_extractf32x8_ps(acc, 1));
  const __m256 s4 = _mm256_hadd_ps(s8, s8);
  const __m128 lo = _mm256_castps256_ps128(s4), hi = _mm256_extractf128_ps(s4, 1);
  res[0] = _mm_cvtss_f32(lo);
  res[1] = _mm_cvtss_f32(hi);
  res[2] = _mm_cvtss_f32(_mm_movehdup_ps(lo));
  res[3] = _mm_cvtss_f32(_mm_movehdup_ps(hi));
}

template <bool Q5, int RW>
void tile_qk45_quads(const uint8_t* const* wr, const QActs& a, int64_t nb, float* res, int64_t ahead) {
  static_assert(RW == 4, "one row per 128-bit lane");
  constexpr int64_t kBytes = Q5 ? 176 : 144;
  constexpr int kQs = Q5 ? 48 : 16;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  // [d, dmin] of rows 0-3 in lanes 0-7 -> each row's d (dmin) over its four int32 lanes.
  const __m512i d_lanes = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
  const __m512i m_lanes = _mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* aq = a.qs + b * 256;
    const uint8_t* p[RW];
    block_rows<RW>(wr, b, kBytes, ahead, p);
    const __m512i sm = k4_scales_mins4(load_4x128(p, 4));
    __m512i sumi = _mm512_setzero_si512();
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512i a0 = bcast4_128(aq + 64 * j), a1 = bcast4_128(aq + 64 * j + 16);
      const __m512i a2 = bcast4_128(aq + 64 * j + 32), a3 = bcast4_128(aq + 64 * j + 48);
      const __m512i v0 = load_4x128(p, kQs + 32 * j), v1 = load_4x128(p, kQs + 32 * j + 16);
      __m512i w00 = _mm512_and_si512(v0, m4), w10 = _mm512_and_si512(v1, m4);
      __m512i w01 = _mm512_and_si512(_mm512_srli_epi16(v0, 4), m4), w11 = _mm512_and_si512(_mm512_srli_epi16(v1, 4), m4);
      if constexpr (Q5) {
        const __m512i h0 = load_4x128(p, 16), h1 = load_4x128(p, 32);
        const __m512i b0 = _mm512_set1_epi8(static_cast<char>(1 << (2 * j)));
        const __m512i b1 = _mm512_set1_epi8(static_cast<char>(1 << (2 * j + 1)));
        w00 = _mm512_or_si512(w00, q5_bit16_512(h0, b0));
        w10 = _mm512_or_si512(w10, q5_bit16_512(h1, b0));
        w01 = _mm512_or_si512(w01, q5_bit16_512(h0, b1));
        w11 = _mm512_or_si512(w11, q5_bit16_512(h1, b1));
      }
      const __m512i s_lo = _mm512_shuffle_epi8(sm, bcast4_128(kZx16.c[2 * j]));
      const __m512i s_hi = _mm512_shuffle_epi8(sm, bcast4_128(kZx16.c[2 * j + 1]));
      // As the pairs: a sub-block's two halves add as int16 before its scale (sum < 2^15).
      sumi = madd_acc512(sumi, _mm512_add_epi16(_mm512_maddubs_epi16(w00, a0), _mm512_maddubs_epi16(w10, a1)), s_lo);
      sumi = madd_acc512(sumi, _mm512_add_epi16(_mm512_maddubs_epi16(w01, a2), _mm512_maddubs_epi16(w11, a3)), s_hi);
      __asm__("" : "+v"(sumi));  // a chain, as the pairs' (no reassociated tree of products)
    }
    const __m512i mins = k4_mins4(sm, a, b);
    const __m512 dd16 = k4_d_dmin4(p, a.d[b]);
    acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(d_lanes, dd16), _mm512_cvtepi32_ps(sumi), acc);
    acc = _mm512_fnmadd_ps(_mm512_permutexvar_ps(m_lanes, dd16), _mm512_cvtepi32_ps(mins), acc);
  }
  quad_sums(acc, res);
}

// q4_K decode with whole 64-byte loads: tile_qk45_quads builds each vector from four 16-byte
// loads (three inserts) and, per block of four rows, issues ~200 instructions, ~70 of them loads
// — on the Zen 5 VM (two vector loads and two multiplies a cycle) 46 cycles a block, 53 GB/s a
// core from L2, under the 46 GB/s a core the memory feeds in fast minutes once the stalls mix in.
// Here a row pair's 64 bytes at chunk pair jp (values 128jp..128jp+127 of the block) are loaded
// whole and two 2-source permutes regroup them as
//   x = [A c0 0-15 | B c0 0-15 | A c1 0-15 | B c1 0-15],  y = the same with bytes 16-31,
// (A, B the pair's rows, c0/c1 the two 32-byte chunks), so x's and y's nibbles at one lane
// belong to one sub-block and their int16 products add before its scale, as in the quads.
// ~150 instructions a block: 9.5 ns against 10.7 ns (L2-resident rows, one core).
// Sub-block scales: lane l's scale byte is 2c + (0 lo, 1 hi nibbles) of its row (kPairCtl).
struct PairCtlTable {
  // c[e]: 128-bit lanes 0, 1 pick byte e, lanes 2, 3 byte e + 2, each zero-extended to int16.
  alignas(64) int8_t c[6][64];
  constexpr PairCtlTable() : c{} {
    for (int e = 0; e < 6; ++e)
      for (int i = 0; i < 64; ++i) c[e][i] = static_cast<int8_t>(i % 2 ? -1 : (i < 32 ? e : e + 2));
  }
};
inline constexpr PairCtlTable kPairCtl{};

template <int RW>
void tile_q4k_pairs512(const uint8_t* const* wr, const QActs& a, int64_t nb, float* res, int64_t ahead) {
  static_assert(RW == 4, "two row pairs");
  constexpr int64_t kBytes = 144;
  const __m512i m4 = _mm512_set1_epi8(0x0F);
  // dd = [d, dmin] of rows 0-3 (lanes 0-7): each lane's d for pair 0 (rows 0 1 0 1 by 128-bit
  // lane), pair 1 (rows 2 3 2 3), and each row's dmin for the quad-layout mins.
  const __m512i d_pair0 = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 0, 0, 0, 0, 2, 2, 2, 2);
  const __m512i d_pair1 = _mm512_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6, 4, 4, 4, 4, 6, 6, 6, 6);
  const __m512i m_lanes = _mm512_setr_epi32(1, 1, 1, 1, 3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7);
  const __m512i first = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13), second = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()}, accm = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* aq = a.qs + b * 256;
    const uint8_t* p[RW];
    block_rows<RW>(wr, b, kBytes, ahead, p);
    const __m512i sm = k4_scales_mins4(load_4x128(p, 4));  // 128-bit lane r: row r's sc[8], m[8]
    const __m512i sp[2] = {_mm512_shuffle_i64x2(sm, sm, 0x44), _mm512_shuffle_i64x2(sm, sm, 0xEE)};  // A B A B
    __m512i sumi[2] = {_mm512_setzero_si512(), _mm512_setzero_si512()};
#pragma GCC unroll 2
    for (int jp = 0; jp < 2; ++jp) {
      // Activations matching x / y: values 128jp + o .. +15 in lanes 0, 1 and 128jp + 64 + o in 2, 3.
      const int8_t* a0 = aq + 128 * jp;
      const auto act = [&](int o) {
        return _mm512_mask_broadcast_i32x4(bcast4_128(a0 + o), 0xFF00, _mm_loadu_si128(reinterpret_cast<const __m128i*>(a0 + 64 + o)));
      };
      const __m512i axl = act(0), ayl = act(16), axh = act(32), ayh = act(48);
      const __m512i c_lo = _mm512_load_si512(kPairCtl.c[4 * jp]), c_hi = _mm512_load_si512(kPairCtl.c[4 * jp + 1]);
#pragma GCC unroll 2
      for (int q = 0; q < 2; ++q) {
        const __m512i la = _mm512_loadu_si512(p[2 * q] + 16 + 64 * jp), lb = _mm512_loadu_si512(p[2 * q + 1] + 16 + 64 * jp);
        const __m512i x = _mm512_permutex2var_epi64(la, first, lb), y = _mm512_permutex2var_epi64(la, second, lb);
        // As the quads: a sub-block's two halves add as int16 before its scale (sum < 2^15).
        const __m512i lo = _mm512_add_epi16(_mm512_maddubs_epi16(_mm512_and_si512(x, m4), axl),
                                            _mm512_maddubs_epi16(_mm512_and_si512(y, m4), ayl));
        const __m512i hi = _mm512_add_epi16(_mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(x, 4), m4), axh),
                                            _mm512_maddubs_epi16(_mm512_and_si512(_mm512_srli_epi16(y, 4), m4), ayh));
        sumi[q] = madd_acc512(sumi[q], lo, _mm512_shuffle_epi8(sp[q], c_lo));
        sumi[q] = madd_acc512(sumi[q], hi, _mm512_shuffle_epi8(sp[q], c_hi));
      }
    }
    const __m512i mins = k4_mins4(sm, a, b);
    const __m512 dd16 = k4_d_dmin4(p, a.d[b]);
    acc[0] = _mm512_fmadd_ps(_mm512_permutexvar_ps(d_pair0, dd16), _mm512_cvtepi32_ps(sumi[0]), acc[0]);
    acc[1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(d_pair1, dd16), _mm512_cvtepi32_ps(sumi[1]), acc[1]);
    accm = _mm512_fmadd_ps(_mm512_permutexvar_ps(m_lanes, dd16), _mm512_cvtepi32_ps(mins), accm);
  }
  // quad_sums gives each 128-bit lane's sum: lanes 0, 2 of a pair are its first row, 1, 3 its second.
  float m[4], s0[4], s1[4];
  quad_sums(accm, m);
  quad_sums(acc[0], s0);
  quad_sums(acc[1], s1);
  res[0] = s0[0] + s0[2] - m[0];
  res[1] = s0[1] + s0[3] - m[1];
  res[2] = s1[0] + s1[2] - m[2];
  res[3] = s1[1] + s1[3] - m[3];
}
#endif

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

// q2_K / q3_K: value 128n + 32j + l (l 0-31) is bits 2j, 2j+1 of qs[32n + l] (q3_K: plus bit 2
// from bit 4n + j of hmask[l]), so q[j] of half n holds values 128n + 32j ... +31 as q6_unpack's.
template <DType WT>
inline void k16_unpack(const uint8_t* p, int n, __m256i q[4]) {
  if constexpr (WT == DType::Q6_K) {
    q6_unpack(p, n, q);
  } else {
    const __m256i v = load256(p + (WT == DType::Q3_K ? 32 : 16) + 32 * n), m2 = _mm256_set1_epi8(0x03);
    q[0] = _mm256_and_si256(v, m2);
    q[1] = _mm256_and_si256(_mm256_srli_epi16(v, 2), m2);
    q[2] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m2);
    q[3] = _mm256_and_si256(_mm256_srli_epi16(v, 6), m2);
    if constexpr (WT == DType::Q3_K) {
      // Bit b = 4n + j of each hmask byte moved to bit 2 (the only bit left in each byte after
      // the mask, so the 16-bit shift carries nothing across bytes).
      const __m256i hm = load256(p);
      for (int j = 0; j < 4; ++j) {
        const int b = 4 * n + j;
        const __m256i h = _mm256_and_si256(hm, _mm256_set1_epi8(static_cast<char>(1 << b)));
        q[j] = _mm256_or_si256(q[j], b >= 2 ? _mm256_srli_epi16(h, b - 2) : _mm256_slli_epi16(h, 2 - b));
      }
    }
  }
}

// q3_k_scales (core/quant.h) in SSE: the low nibbles of bytes 0-7 are scales 0-7 and the high
// ones 8-15; byte 8 + s % 4 holds the top bits of scale s at bit 2·(s / 4), so the four copies of
// bytes 8-11 shifted right by 0, 2, 4, 6 put them in scale order. Returns sc - 32 as int16.
inline __m256i q3_k_scales16(const uint8_t* p) {
  const __m128i m4 = _mm_set1_epi8(0x0F);
  const __m128i v = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  const __m128i low = _mm_unpacklo_epi64(_mm_and_si128(v, m4), _mm_and_si128(_mm_srli_epi16(v, 4), m4));
  int32_t t;
  std::memcpy(&t, p + 8, 4);
  const __m128i top = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(t), _mm_setr_epi32(0, 2, 4, 6)), _mm_set1_epi8(0x03));
  const __m128i sc = _mm_or_si128(low, _mm_slli_epi16(top, 4));
  return _mm256_sub_epi16(_mm256_cvtepu8_epi16(sc), _mm256_set1_epi16(32));
}

// Layout of the formats with 16 sub-blocks of 16 per super-block: bytes, the f16 d (and q2_K's
// dmin), and the unsigned offset of q (q6_K 32, q3_K 4; q2_K has a minimum per sub-block instead).
template <DType WT>
struct K16Block {
  static constexpr int64_t kBytes = WT == DType::Q6_K ? 210 : WT == DType::Q3_K ? 110 : 84;
  static constexpr int64_t kD = WT == DType::Q6_K ? 208 : WT == DType::Q3_K ? 108 : 80;
  static constexpr int kOffsetShift = WT == DType::Q6_K ? 5 : 2;  // offset 32 or 4
};

// q6_K, q3_K, q2_K. Per super-block: the int32 lanes of Σ_s sc_s·Σ q·a − off·Σ_s sc_s·Σ a (all
// integer; q2_K: − dmin/d·Σ_s m_s·Σ a, in float), scaled into the float accumulator once.
template <DType WT, int RW, int RX>
void tile_k16(const uint8_t* const* wr, const QActs& a, int64_t x0, int64_t nb, float* res, int64_t ahead) {
  using F = K16Block<WT>;
  ARows<RX> ar(a, x0);
  AccK acc[RW][RX];
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) acc[r][i] = acc_zero();
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < RW; ++r) {
      const uint8_t* p = wr[r] + b * F::kBytes;
      prefetch_ahead(p, ahead, F::kBytes);
      __m256i sc16, mn16 = _mm256_setzero_si256();  // the 16 sub-block scales (and q2_K minima), int16
      if constexpr (WT == DType::Q6_K) {
        sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192)));
      } else if constexpr (WT == DType::Q3_K) {
        sc16 = q3_k_scales16(p + 96);
      } else {
        const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p)), m4 = _mm_set1_epi8(0x0F);
        sc16 = _mm256_cvtepu8_epi16(_mm_and_si128(v, m4));
        mn16 = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(v, 4), m4));
      }
      const float dw = h2f(p + F::kD);
      __m256i corr[RX];  // Σ_s sc_s · bsum_s (q2_K: Σ_s m_s · bsum_s), 8 lanes
      for (int i = 0; i < RX; ++i)
        corr[i] = _mm256_madd_epi16(load256(ar.bs[i] + b * 16), WT == DType::Q2_K ? mn16 : sc16);
#if MOE_QK_512
      __m512i sumi[RX];
      for (int i = 0; i < RX; ++i) sumi[i] = _mm512_setzero_si512();
#else
      __m256i sumi[RX];
      for (int i = 0; i < RX; ++i) sumi[i] = _mm256_setzero_si256();
#endif
      for (int n = 0; n < 2; ++n) {
        __m256i q[4];
        k16_unpack<WT>(p, n, q);
        // The 8 scales of this half, as int16 in both 128-bit lanes.
        const __m256i sh = n == 0 ? _mm256_permute2x128_si256(sc16, sc16, 0x00) : _mm256_permute2x128_si256(sc16, sc16, 0x11);
        const __m256i s0 = _mm256_shuffle_epi8(sh, shuf16(0, 1)), s1 = _mm256_shuffle_epi8(sh, shuf16(2, 3));
        const __m256i s2 = _mm256_shuffle_epi8(sh, shuf16(4, 5)), s3 = _mm256_shuffle_epi8(sh, shuf16(6, 7));
#if MOE_QK_512
        const __m512i w01 = join(q[0], q[1]), w23 = join(q[2], q[3]);
        const __m512i s01 = join(s0, s1), s23 = join(s2, s3);
        for (int i = 0; i < RX; ++i) {
          const int8_t* aq = ar.q[i] + b * 256 + 128 * n;
          sumi[i] = dot_us_scaled512(sumi[i], w01, _mm512_loadu_si512(aq), s01);
          sumi[i] = dot_us_scaled512(sumi[i], w23, _mm512_loadu_si512(aq + 64), s23);
        }
#else
        for (int i = 0; i < RX; ++i) {
          const int8_t* aq = ar.q[i] + b * 256 + 128 * n;
          sumi[i] = dot_us_scaled(sumi[i], q[0], load256(aq), s0);
          sumi[i] = dot_us_scaled(sumi[i], q[1], load256(aq + 32), s1);
          sumi[i] = dot_us_scaled(sumi[i], q[2], load256(aq + 64), s2);
          sumi[i] = dot_us_scaled(sumi[i], q[3], load256(aq + 96), s3);
        }
#endif
      }
      for (int i = 0; i < RX; ++i) {
        const float dd = dw * ar.d[i][b];
#if MOE_QK_512
        if constexpr (WT == DType::Q2_K) {
          acc[r][i] = _mm512_fmadd_ps(_mm512_set1_ps(dd), _mm512_cvtepi32_ps(sumi[i]), acc[r][i]);
          acc[r][i] = _mm512_fnmadd_ps(_mm512_set1_ps(h2f(p + 82) * ar.d[i][b]),
                                       _mm512_cvtepi32_ps(_mm512_zextsi256_si512(corr[i])), acc[r][i]);
        } else {
          const __m512i tot = _mm512_sub_epi32(sumi[i], _mm512_zextsi256_si512(_mm256_slli_epi32(corr[i], F::kOffsetShift)));
          acc[r][i] = _mm512_fmadd_ps(_mm512_set1_ps(dd), _mm512_cvtepi32_ps(tot), acc[r][i]);
        }
#else
        if constexpr (WT == DType::Q2_K) {
          acc[r][i] = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(sumi[i]), acc[r][i]);
          acc[r][i] = _mm256_fnmadd_ps(_mm256_set1_ps(h2f(p + 82) * ar.d[i][b]), _mm256_cvtepi32_ps(corr[i]), acc[r][i]);
        } else {
          const __m256i tot = _mm256_sub_epi32(sumi[i], _mm256_slli_epi32(corr[i], F::kOffsetShift));
          acc[r][i] = _mm256_fmadd_ps(_mm256_set1_ps(dd), _mm256_cvtepi32_ps(tot), acc[r][i]);
        }
#endif
      }
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) res[r * RX + i] = acc_sum(acc[r][i]);
}

// iq4_xs: 136-byte super-blocks {f16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}: 8 sub-blocks
// of 32 iq4 levels (nibbles as q4_0's) with 6-bit scales ls, x = d·(ls−32)·level, against the
// q8_K-style activations; per sub-block the sign-trick products times ls−32 in int32 (each
// maddubs pair <= 2·127·127, times |ls−32| <= 32: far below 2^31 over a super-block).
template <int RW, int RX>
void tile_iq4xs(const uint8_t* const* wr, const QActs& a, int64_t x0, int64_t nb, float* res, int64_t ahead) {
  ARows<RX> ar(a, x0);
  __m256 acc[RW][RX];
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) acc[r][i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int r = 0; r < RW; ++r) {
      const uint8_t* p = wr[r] + b * 136;
      prefetch_ahead(p, ahead, 136);
      __m256i sumi[RX];
      for (int i = 0; i < RX; ++i) sumi[i] = _mm256_setzero_si256();
      for (int s = 0; s < 8; ++s) {
        const __m256i wq = _mm256_shuffle_epi8(load256(kIq4.v), unpack_q4_0(p + 8 + 16 * s));
        const __m256i wa = _mm256_sign_epi8(wq, wq), sc = _mm256_set1_epi16(static_cast<int16_t>(iq4_xs_scale(p, s)));
        for (int i = 0; i < RX; ++i) {
          const __m256i aq = load256(ar.q[i] + b * 256 + 32 * s);
          sumi[i] = madd_acc(sumi[i], _mm256_maddubs_epi16(wa, _mm256_sign_epi8(aq, wq)), sc);
        }
      }
      const float dw = h2f(p);
      for (int i = 0; i < RX; ++i)
        acc[r][i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sumi[i]), _mm256_set1_ps(dw * ar.d[i][b]), acc[r][i]);
    }
  }
  for (int r = 0; r < RW; ++r)
    for (int i = 0; i < RX; ++i) res[r * RX + i] = hsum_ps(acc[r][i]);
}

// q6_K decode (one activation row), two weight rows per 256-bit vector, as tile_qk45_pairs: lane
// 0 holds 16 values of row r, lane 1 the same 16 of row r+1, against the activations broadcast
// to both lanes, so the broadcast activations and the scale controls are loaded once per block
// for all the pairs. Values 128n + 32j + 16h + i (i 0-15) of a block come from bytes 16h + i of
// ql[64n..] (j 0, 2: low, high nibble) or ql[64n + 32..] (j 1, 3), plus bits 2j, 2j+1 of
// qh[32n + 16h + i] as bits 4-5; their scale is sub-block 8n + 2j + h. Per block and pair: the
// int32 lanes of Σ_s sc_s·Σ q·a − 32·Σ_s sc_s·Σ a (lanes 0-3 row r, 4-7 row r+1), scaled into
// a float accumulator once. Zen 5, 2 threads, 64 [3072 x 1024] matrices from memory: 35 GB/s
// with the general tile (tile_k16, 512-bit) -> 46.5 GB/s, q4_K's rate; Q4_K_M medium-model
// decode (q6_K is a quarter of its bytes) 203 -> 255 tokens/s, llama.cpp 173 on the same file.
// RW even.
template <int RW>
void tile_q6k_pairs(const uint8_t* const* wr, const QActs& a, int64_t nb, float* res, int64_t ahead) {
  static_assert(RW % 2 == 0, "rows are taken in pairs");
  constexpr int P = RW / 2;
  constexpr int64_t kBytes = 210;
  const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(0x03), mc = _mm256_set1_epi8(0x0C);
  const __m256i m30 = _mm256_set1_epi8(0x30);
  __m256 acc[P];
#pragma GCC unroll 8
  for (int q = 0; q < P; ++q) acc[q] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* aq = a.qs + b * 256;
    const uint8_t* p[RW];
    block_rows<RW>(wr, b, kBytes, ahead, p);
    // The activations' sums per 16, sub-blocks 0-7 and 8-15, in both lanes.
    const __m256i bs0 = bcast_128(reinterpret_cast<const int8_t*>(a.bsum + b * 16));
    const __m256i bs1 = bcast_128(reinterpret_cast<const int8_t*>(a.bsum + b * 16 + 8));
    __m256i sumi[P], corr[P];
#pragma GCC unroll 8
    for (int q = 0; q < P; ++q) sumi[q] = corr[q] = _mm256_setzero_si256();
#pragma GCC unroll 2
    for (int n = 0; n < 2; ++n) {
      // The 8 scales of half n as int16: row r's in lane 0, row r+1's in lane 1.
      __m256i sc[P];
#pragma GCC unroll 8
      for (int q = 0; q < P; ++q) {
        sc[q] = _mm256_cvtepi8_epi16(
            _mm_unpacklo_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p[2 * q] + 192 + 8 * n)),
                               _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p[2 * q + 1] + 192 + 8 * n))));
        corr[q] = _mm256_add_epi32(corr[q], _mm256_madd_epi16(sc[q], n == 0 ? bs0 : bs1));
      }
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int8_t* ah = aq + 128 * n + 16 * h;
        const __m256i a0 = bcast_128(ah), a1 = bcast_128(ah + 32), a2 = bcast_128(ah + 64), a3 = bcast_128(ah + 96);
        const __m256i c0 = shuf16(h, h), c1 = shuf16(2 + h, 2 + h), c2 = shuf16(4 + h, 4 + h), c3 = shuf16(6 + h, 6 + h);
#pragma GCC unroll 4
        for (int q = 0; q < P; ++q) {
          const uint8_t* p0 = p[2 * q];
          const uint8_t* p1 = p[2 * q + 1];
          const __m256i la = load_2x128(p0 + 64 * n + 16 * h, p1 + 64 * n + 16 * h);
          const __m256i lb = load_2x128(p0 + 64 * n + 32 + 16 * h, p1 + 64 * n + 32 + 16 * h);
          const __m256i hb = load_2x128(p0 + 128 + 32 * n + 16 * h, p1 + 128 + 32 * n + 16 * h);
          // (16-bit shifts: every shifted field is masked to its own byte first or after.)
          const __m256i w0 = _mm256_or_si256(_mm256_and_si256(la, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4));
          const __m256i w1 = _mm256_or_si256(_mm256_and_si256(lb, m4), _mm256_slli_epi16(_mm256_and_si256(hb, mc), 2));
          const __m256i w2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(la, 4), m4), _mm256_and_si256(hb, m30));
          const __m256i w3 =
              _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(lb, 4), m4), _mm256_and_si256(_mm256_srli_epi16(hb, 2), m30));
          sumi[q] = madd_acc(sumi[q], _mm256_maddubs_epi16(w0, a0), _mm256_shuffle_epi8(sc[q], c0));
          sumi[q] = madd_acc(sumi[q], _mm256_maddubs_epi16(w1, a1), _mm256_shuffle_epi8(sc[q], c1));
          sumi[q] = madd_acc(sumi[q], _mm256_maddubs_epi16(w2, a2), _mm256_shuffle_epi8(sc[q], c2));
          sumi[q] = madd_acc(sumi[q], _mm256_maddubs_epi16(w3, a3), _mm256_shuffle_epi8(sc[q], c3));
          __asm__("" : "+x"(sumi[q]));  // a chain, as in tile_qk45_pairs (no spilled tree)
        }
      }
    }
    const __m128 da = _mm_set1_ps(a.d[b]);
#pragma GCC unroll 8
    for (int q = 0; q < P; ++q) {
      uint16_t h0, h1;
      std::memcpy(&h0, p[2 * q] + 208, 2);
      std::memcpy(&h1, p[2 * q + 1] + 208, 2);
      const __m128 d2 = _mm_mul_ps(_mm_cvtph_ps(_mm_setr_epi16(static_cast<short>(h0), static_cast<short>(h1), 0, 0, 0, 0, 0, 0)), da);
      const __m256 dd = _mm256_setr_m128(_mm_shuffle_ps(d2, d2, 0x00), _mm_shuffle_ps(d2, d2, 0x55));
      const __m256i tot = _mm256_sub_epi32(sumi[q], _mm256_slli_epi32(corr[q], 5));
      acc[q] = _mm256_fmadd_ps(dd, _mm256_cvtepi32_ps(tot), acc[q]);
    }
  }
  pair_sums<P>(acc, res);
}

#if MOE_QK_512
// tile_q6k_pairs on 512-bit vectors, four rows per vector (128-bit lane r: row r), as
// tile_qk45_quads is to tile_qk45_pairs.
template <int RW>
void tile_q6k_quads(const uint8_t* const* wr, const QActs& a, int64_t nb, float* res, int64_t ahead) {
  static_assert(RW == 4, "one row per 128-bit lane");
  constexpr int64_t kBytes = 210;
  const __m512i m4 = _mm512_set1_epi8(0x0F), m3 = _mm512_set1_epi8(0x03), mc = _mm512_set1_epi8(0x0C);
  const __m512i m30 = _mm512_set1_epi8(0x30);
  const __m512i d_lanes = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  __m512 acc = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const int8_t* aq = a.qs + b * 256;
    const uint8_t* p[RW];
    block_rows<RW>(wr, b, kBytes, ahead, p);
    __m512i sumi = _mm512_setzero_si512(), corr = _mm512_setzero_si512();
#pragma GCC unroll 2
    for (int n = 0; n < 2; ++n) {
      // The 8 scales of half n as int16, row r's in lane r.
      int64_t s8[RW];
#pragma GCC unroll 4
      for (int r = 0; r < RW; ++r) std::memcpy(&s8[r], p[r] + 192 + 8 * n, 8);
      const __m512i sc = _mm512_cvtepi8_epi16(_mm256_setr_epi64x(s8[0], s8[1], s8[2], s8[3]));
      corr = _mm512_add_epi32(corr, _mm512_madd_epi16(sc, bcast4_128(a.bsum + b * 16 + 8 * n)));
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const int8_t* ah = aq + 128 * n + 16 * h;
        const __m512i a0 = bcast4_128(ah), a1 = bcast4_128(ah + 32), a2 = bcast4_128(ah + 64), a3 = bcast4_128(ah + 96);
        const __m512i la = load_4x128(p, 64 * n + 16 * h), lb = load_4x128(p, 64 * n + 32 + 16 * h);
        const __m512i hb = load_4x128(p, 128 + 32 * n + 16 * h);
        const __m512i w0 = _mm512_or_si512(_mm512_and_si512(la, m4), _mm512_slli_epi16(_mm512_and_si512(hb, m3), 4));
        const __m512i w1 = _mm512_or_si512(_mm512_and_si512(lb, m4), _mm512_slli_epi16(_mm512_and_si512(hb, mc), 2));
        const __m512i w2 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(la, 4), m4), _mm512_and_si512(hb, m30));
        const __m512i w3 =
            _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(lb, 4), m4), _mm512_and_si512(_mm512_srli_epi16(hb, 2), m30));
        sumi = madd_acc512(sumi, _mm512_maddubs_epi16(w0, a0), _mm512_shuffle_epi8(sc, bcast4_128(kShuf16.c[h][h])));
        sumi = madd_acc512(sumi, _mm512_maddubs_epi16(w1, a1), _mm512_shuffle_epi8(sc, bcast4_128(kShuf16.c[2 + h][2 + h])));
        sumi = madd_acc512(sumi, _mm512_maddubs_epi16(w2, a2), _mm512_shuffle_epi8(sc, bcast4_128(kShuf16.c[4 + h][4 + h])));
        sumi = madd_acc512(sumi, _mm512_maddubs_epi16(w3, a3), _mm512_shuffle_epi8(sc, bcast4_128(kShuf16.c[6 + h][6 + h])));
        __asm__("" : "+v"(sumi));  // a chain, as in tile_qk45_pairs (no spilled tree)
      }
    }
    uint16_t h16[RW];
#pragma GCC unroll 4
    for (int r = 0; r < RW; ++r) std::memcpy(&h16[r], p[r] + 208, 2);
    const __m128 d4 = _mm_mul_ps(_mm_cvtph_ps(_mm_setr_epi16(static_cast<short>(h16[0]), static_cast<short>(h16[1]),
                                                            static_cast<short>(h16[2]), static_cast<short>(h16[3]), 0, 0, 0, 0)),
                                 _mm_set1_ps(a.d[b]));
    const __m512i tot = _mm512_sub_epi32(sumi, _mm512_slli_epi32(corr, 5));
    acc = _mm512_fmadd_ps(_mm512_permutexvar_ps(d_lanes, _mm512_castps128_ps512(d4)), _mm512_cvtepi32_ps(tot), acc);
  }
  quad_sums(acc, res);
}
#endif

#include "ops/cpu/cpu_quant_packed.h"  // NOLINT(build/include): part of this file, per variant

// ---- the driver --------------------------------------------------------------------------

template <DType WT, int RW, int RX>
inline void tile(const uint8_t* const* wr, const QActs& a, int64_t x0, int64_t nb, float* res, int64_t ahead) {
  if constexpr (WT == DType::Q8_0 || WT == DType::IQ4_NL) tile_s8<WT, RW, RX>(wr, a, x0, nb, res, ahead);
  else if constexpr (WT == DType::Q4_0) tile_q4_0<RW, RX>(wr, a, x0, nb, res, ahead);
  else if constexpr (WT == DType::Q4_K) tile_qk45<false, RW, RX>(wr, a, x0, nb, res, ahead);
  else if constexpr (WT == DType::Q5_K) tile_qk45<true, RW, RX>(wr, a, x0, nb, res, ahead);
  else if constexpr (WT == DType::Q6_K || WT == DType::Q3_K || WT == DType::Q2_K) tile_k16<WT, RW, RX>(wr, a, x0, nb, res, ahead);
  else if constexpr (WT == DType::IQ4_XS) tile_iq4xs<RW, RX>(wr, a, x0, nb, res, ahead);
  else tile_legacy<WT, RW, RX>(wr, a, x0, nb, res, ahead);
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
  const int64_t ahead = RW * static_cast<int64_t>(jb.row_bytes);  // the next tile's rows
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
      while (x0 + 4 <= xe) {  // store() advances x0
        tile<WT, RW, 4>(wr, a, x0, nb, res, ahead);
        store(4);
      }
      switch (xe - x0) {
        case 3: tile<WT, RW, 3>(wr, a, x0, nb, res, ahead); store(3); break;
        case 2: tile<WT, RW, 2>(wr, a, x0, nb, res, ahead); store(2); break;
        case 1: tile<WT, RW, 1>(wr, a, x0, nb, res, ahead); store(1); break;
        default: break;
      }
    }
  }
}

// Decode (one activation row), R rows at a time taken far apart: each thread's range of rows
// cut into R parts, row i of every part together, so the thread reads R sequential streams,
// each prefetched kRowAhead bytes ahead within its row. On the 2-core AMD EPYC VM (AVX2) a
// plain read reaches 31-34 GB/s with one stream per thread and 37-50 GB/s with four or eight
// far apart; medium-model decode, R 4 against one row at a time: q8_0 88-90 -> 104-115 tok/s,
// q4_0 141-144 -> 152-155, q6_k 86-95 -> 117-124, q4_k 131-134 -> 134-139; R 8 was slower than
// 4 for every type. Rows taken together from ADJACENT rows (the old 8-row K-quant tiles, or
// 4 neighbours) interleave 34-210-byte steps of one region, which the prefetchers do not follow:
// q8_0 dropped to 61 tok/s that way.
constexpr int kDecodeStreams = 4;

// R rows against the one activation row: the per-format decode kernels where there is one (the
// K-quant row pairs are 256-bit code in every variant), else the general tile.
template <DType WT, int R>
inline void decode_tile(const uint8_t* const* wr, const QActs& a, int64_t nb, float* res) {
  if constexpr (WT == DType::Q8_0 || WT == DType::IQ4_NL) {
#if MOE_QK_VNNI
    if constexpr (WT == DType::Q8_0) return tile_q8_0_rows512<R>(wr, a, nb, res, kRowAhead);
#endif
    tile_s8_rows<WT, R>(wr, a, nb, res, kRowAhead);
  } else if constexpr (WT == DType::Q4_0) tile_q4_0_rows<R>(wr, a, nb, res, kRowAhead);
  else if constexpr (WT == DType::Q4_K || WT == DType::Q5_K) {
#if MOE_QK_512
    if constexpr (WT == DType::Q4_K && R == 4) return tile_q4k_pairs512<R>(wr, a, nb, res, kRowAhead);
    tile_qk45_quads<WT == DType::Q5_K, R>(wr, a, nb, res, kRowAhead);
#else
    tile_qk45_pairs<WT == DType::Q5_K, R>(wr, a, nb, res, kRowAhead);
#endif
  } else if constexpr (WT == DType::Q6_K) {
#if MOE_QK_512
    tile_q6k_quads<R>(wr, a, nb, res, kRowAhead);
#else
    tile_q6k_pairs<R>(wr, a, nb, res, kRowAhead);
#endif
  } else if constexpr (quant_is_legacy(WT)) tile_legacy_rows<WT, R>(wr, a, nb, res, kRowAhead);
  else tile<WT, R, 1>(wr, a, 0, nb, res, kRowAhead);
}
template <DType WT, int R>
void run_decode(const QuantJob& jb) {
  const QActs& a = *jb.a;
  const int64_t nb = jb.k / dtype_block_elems(WT);
  int64_t total = jb.m;
  for (int s = 0; s < jb.n_more; ++s) total += jb.more[s].m;
  // Row r of the job's rows followed by its further matrices' (QuantJob::more): its bytes and output.
  auto row = [&](int64_t r, float** out) {
    if (r < jb.m) return *out = jb.out + r, jb.w + static_cast<size_t>(r) * jb.row_bytes;
    r -= jb.m;
    int s = 0;
    while (r >= jb.more[s].m) r -= jb.more[s++].m;
    return *out = jb.more[s].out + r, jb.more[s].w + static_cast<size_t>(r) * jb.row_bytes;
  };
  parallel_threads(total * jb.k > 65536, [&](int64_t nt, int64_t id) {
    const int64_t lo = total * id / nt, hi = total * (id + 1) / nt;
    const int64_t part = (hi - lo) / R;
    const uint8_t* wr[R];
    float* outs[R];
    float res[R];
    for (int64_t i = 0; i < part; ++i) {
      for (int j = 0; j < R; ++j) wr[j] = row(lo + j * part + i, &outs[j]);
      decode_tile<WT, R>(wr, a, nb, res);
      for (int j = 0; j < R; ++j) *outs[j] = jb.accumulate ? *outs[j] + res[j] : res[j];
    }
    // The last (hi - lo) % R rows: one more tile, its unused rows repeating the last one (the
    // decode kernels may take the activations in their own layout: q4_0's block pairs).
    if (const int64_t r0 = lo + part * R; r0 < hi) {
      for (int j = 0; j < R; ++j) wr[j] = row(std::min(r0 + j, hi - 1), &outs[j]);
      decode_tile<WT, R>(wr, a, nb, res);
      for (int64_t r = r0; r < hi; ++r) *outs[r - r0] = jb.accumulate ? *outs[r - r0] + res[r - r0] : res[r - r0];
    }
  });
}

template <DType WT>
void run_type(const QuantJob& jb) {
  if (jb.a->n == 1) return run_decode<WT, kDecodeStreams>(jb);
  if constexpr (quant_has_packed(WT))
    if (jb.pack) return run_packed<WT>(jb);
  // 2-7 activation rows: 2 weight rows per tile, as the RX = 4 activation rows already give
  // 8 independent chains.
  run_fmt<WT, 2>(jb);
}

void run(const QuantJob& jb) {
  switch (jb.wdt) {
    case DType::Q8_0: run_type<DType::Q8_0>(jb); return;
    case DType::Q4_0: run_type<DType::Q4_0>(jb); return;
    case DType::Q4_K: run_type<DType::Q4_K>(jb); return;
    case DType::Q5_K: run_type<DType::Q5_K>(jb); return;
    case DType::Q6_K: run_type<DType::Q6_K>(jb); return;
    case DType::Q4_1: run_type<DType::Q4_1>(jb); return;
    case DType::Q5_0: run_type<DType::Q5_0>(jb); return;
    case DType::Q5_1: run_type<DType::Q5_1>(jb); return;
    case DType::Q2_K: run_type<DType::Q2_K>(jb); return;
    case DType::Q3_K: run_type<DType::Q3_K>(jb); return;
    case DType::IQ4_NL: run_type<DType::IQ4_NL>(jb); return;
    case DType::IQ4_XS: run_type<DType::IQ4_XS>(jb); return;
    default: MOE_FAIL("quantized gemm: %s is not a quantized weight dtype (this is a bug)", dtype_name(jb.wdt));
  }
}

}  // namespace MOE_QK_NS
}  // namespace cpu
}  // namespace moe
