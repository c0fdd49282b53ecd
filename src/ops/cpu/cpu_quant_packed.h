// cpu_quant_packed.h — the prefill kernels of cpu_quant_gemm.h (many activation rows): each
// thread takes 8 weight rows at a time, repacks them into an interleaved tile of unpacked
// integer values, and runs every activation row against that tile. Part of cpu_quant_kernels.h
// (compiled once per instruction-set variant, inside MOE_QK_NS); include from there only.
//
// Why: the row-major kernels (tile_* in cpu_quant_kernels.h) reduce each weight row against
// each activation row to one value, so every 32 products end in a horizontal step and a scale
// of their own (~7 vector ops per 32 multiply-adds on AVX2). In the packed tile one 256-bit
// vector holds 4 consecutive values of each of the 8 rows; an activation's 4 matching int8
// values are broadcast against it, so the 8 lanes of the int32 result are the 8 rows' sums: no
// horizontal step, and the block scales are applied once per block for 8 rows at a time (~4
// ops per 32 for q8_0, ~2.3 for the unsigned formats, which add up to 8 maddubs in int16).
// The repack costs about one activation row's work per tile, so it is taken from
// kPackedMinRows rows on (cpu_quant_impl.h); decode keeps the row kernels.
//
// Tile layout, per super-block of SB values (quant_packed_layout in cpu_quant_impl.h):
//   values  SB/32 chunks of 256 bytes: chunk c, group g (0..7), row r at byte 256c + 32g + 4r
//           holds the row's values 32c + 4g .. +3 (q8_0 signed, then the same as |w|; the
//           other formats unsigned: q4 0..15, q5 0..31, q6 0..63)
//   q8_0, iq4_nl + f32 d[8]            (iq4_nl's levels looked up: signed as q8_0's)
//   q4_0, q5_0   + f32 d[8]            (the -8 / -16 offset: 8·Σa / 16·Σa per block, QActs::sum32)
//   q4_1, q5_1   + f32 d[8], m[8]      (the minimum: m·da·Σa per block, in float)
//   q4_K/q5_K + int16 sc[8 sub][8 rows][2] (each scale twice: one madd lane pair per row)
//           + int16 m[4 pairs][8 rows][2] (m of sub-blocks 2p, 2p+1 against QActs::bsum32)
//           + f32 d[8], dmin[8]
//   q6_K, q3_K + int16 sc[16 sub][8 rows][2] + int16 sp[8 pairs][8 rows][2] (the -32 / -4
//           offset against QActs::bsum) + f32 d[8] (values q6 0..63, q3 0..7, as k16_unpack)
//   q2_K    as q3_K with values 0..3, sp the sub-block minima, + f32 dmin[8]
//   iq4_xs  8 chunks of 512 (the signed levels, then their absolute values, as q8_0's block)
//           + int16 sc[8 sub][8 rows][2] (ls - 32) + f32 d[8]
// Integer bounds: an unsigned maddubs lane is at most 2·63·127 (q6), 2·31·127 (q5), 2·15·127
// (q4), so 2, 4 and 8 of them add up in int16 without saturating; q8_0's sign-trick lanes
// (<= 2·128·127) are widened after each one.

// The 8 rows' 32-byte vectors v[r] stored as groups: out[32g + 4r + j] = v[r][4g + j] (a
// transpose of the 8x8 matrix of 4-byte groups).
inline void store_groups(const __m256i v[8], uint8_t* out) {
  const __m256i t0 = _mm256_unpacklo_epi32(v[0], v[1]), t1 = _mm256_unpackhi_epi32(v[0], v[1]);
  const __m256i t2 = _mm256_unpacklo_epi32(v[2], v[3]), t3 = _mm256_unpackhi_epi32(v[2], v[3]);
  const __m256i t4 = _mm256_unpacklo_epi32(v[4], v[5]), t5 = _mm256_unpackhi_epi32(v[4], v[5]);
  const __m256i t6 = _mm256_unpacklo_epi32(v[6], v[7]), t7 = _mm256_unpackhi_epi32(v[6], v[7]);
  // u*: rows 0-3 (u0-u3) or 4-7 (u4-u7) of groups (g, g+4) in the two 128-bit lanes.
  const __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
  const __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
  const __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
  const __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
  const __m256i lo[4] = {u0, u1, u2, u3}, hi[4] = {u4, u5, u6, u7};
  for (int g = 0; g < 4; ++g) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * g), _mm256_permute2x128_si256(lo[g], hi[g], 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 32 * (g + 4)), _mm256_permute2x128_si256(lo[g], hi[g], 0x31));
  }
}

inline __m256i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// The signed values' 256 bytes at o copied as their absolute values to o + 256 (the sign
// trick's unsigned operand, made once per tile instead of once per activation row).
inline void store_abs(uint8_t* o) {
  for (int g = 0; g < 8; ++g) {
    const __m256i w = load256(o + 32 * g);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + 256 + 32 * g), _mm256_sign_epi8(w, w));
  }
}

// ---- repacking one tile (8 weight rows wr[], nsb super-blocks) ----

template <DType WT>
void pack_tile(const uint8_t* const* wr, int64_t nsb, uint8_t* out) {
  constexpr QuantPackedLayout L = quant_packed_layout(WT);
  for (int64_t b = 0; b < nsb; ++b) {
    uint8_t* o = out + b * L.sb_bytes;
    float* dv = reinterpret_cast<float*>(o + L.d_off);
    __m256i v[8];
    if constexpr (WT == DType::Q8_0 || WT == DType::IQ4_NL || WT == DType::Q4_0) {
      constexpr int64_t kB = WT == DType::Q8_0 ? 34 : 18;
      for (int r = 0; r < 8; ++r) {
        const uint8_t* p = wr[r] + b * kB;
        v[r] = WT == DType::Q4_0 ? unpack_q4_0(p + 2) : block_s8<WT>(p);
        dv[r] = h2f(p);
      }
      store_groups(v, o);
      if constexpr (WT != DType::Q4_0) store_abs(o);
    } else if constexpr (quant_is_legacy(WT)) {
      using F = LegacyBlock<WT>;
      for (int r = 0; r < 8; ++r) {
        const uint8_t* p = wr[r] + b * F::kBytes;
        v[r] = unpack_q4_0(p + F::kQs);
        if constexpr (F::kFifth) v[r] = _mm256_or_si256(v[r], fifth_bits(p + F::kQh));
        dv[r] = h2f(p);
        if constexpr (F::kMin) dv[8 + r] = h2f(p + 2);
      }
      store_groups(v, o);
    } else if constexpr (WT == DType::IQ4_XS) {
      int16_t* sc = reinterpret_cast<int16_t*>(o + 4096);
      for (int s = 0; s < 8; ++s) {
        for (int r = 0; r < 8; ++r) v[r] = _mm256_shuffle_epi8(load256(kIq4.v), unpack_q4_0(wr[r] + b * 136 + 8 + 16 * s));
        store_groups(v, o + 512 * s);
        store_abs(o + 512 * s);
      }
      for (int r = 0; r < 8; ++r) {
        const uint8_t* p = wr[r] + b * 136;
        for (int s = 0; s < 8; ++s)
          sc[s * 16 + 2 * r] = sc[s * 16 + 2 * r + 1] = static_cast<int16_t>(iq4_xs_scale(p, s));
        dv[r] = h2f(p);
      }
    } else if constexpr (WT == DType::Q4_K || WT == DType::Q5_K) {
      constexpr bool kQ5 = WT == DType::Q5_K;
      constexpr int64_t kB = kQ5 ? 176 : 144;
      int16_t* sc = reinterpret_cast<int16_t*>(o + 2048);
      int16_t* mn = sc + 8 * 16;
      for (int j = 0; j < 4; ++j) {
        __m256i hi[8];
        for (int r = 0; r < 8; ++r) {
          const uint8_t* p = wr[r] + b * kB;
          k_unpack<kQ5>(p + (kQ5 ? 48 : 16), p + 16, j, &v[r], &hi[r]);
        }
        store_groups(v, o + 256 * (2 * j));
        store_groups(hi, o + 256 * (2 * j + 1));
      }
      for (int r = 0; r < 8; ++r) {
        const uint8_t* p = wr[r] + b * kB;
        alignas(16) uint8_t sm[16];
        _mm_store_si128(reinterpret_cast<__m128i*>(sm), k4_scales_mins(p + 4));
        for (int s = 0; s < 8; ++s) sc[s * 16 + 2 * r] = sc[s * 16 + 2 * r + 1] = sm[s];
        for (int q = 0; q < 4; ++q) mn[q * 16 + 2 * r] = sm[8 + 2 * q], mn[q * 16 + 2 * r + 1] = sm[9 + 2 * q];
        dv[r] = h2f(p);
        dv[8 + r] = h2f(p + 2);
      }
    } else {  // Q6_K, Q3_K, Q2_K: 16 sub-blocks of 16
      using F = K16Block<WT>;
      int16_t* sc = reinterpret_cast<int16_t*>(o + 2048);
      int16_t* sp = sc + 16 * 16;
      for (int n = 0; n < 2; ++n) {
        __m256i q[8][4];
        for (int r = 0; r < 8; ++r) k16_unpack<WT>(wr[r] + b * F::kBytes, n, q[r]);
        for (int c = 0; c < 4; ++c) {
          for (int r = 0; r < 8; ++r) v[r] = q[r][c];
          store_groups(v, o + 256 * (4 * n + c));
        }
      }
      for (int r = 0; r < 8; ++r) {
        const uint8_t* p = wr[r] + b * F::kBytes;
        int16_t s16[16], m16[16];  // the scales, and what multiplies the pair sums (offset or minimum)
        if constexpr (WT == DType::Q6_K) {
          for (int s = 0; s < 16; ++s) s16[s] = static_cast<int8_t>(p[192 + s]);
        } else if constexpr (WT == DType::Q3_K) {
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(s16), q3_k_scales16(p + 96));
        } else {
          for (int s = 0; s < 16; ++s) s16[s] = p[s] & 0x0F, m16[s] = p[s] >> 4;
          dv[8 + r] = h2f(p + 82);
        }
        const int16_t* pv = WT == DType::Q2_K ? m16 : s16;
        for (int s = 0; s < 16; ++s) sc[s * 16 + 2 * r] = sc[s * 16 + 2 * r + 1] = s16[s];
        for (int q = 0; q < 8; ++q) sp[q * 16 + 2 * r] = pv[2 * q], sp[q * 16 + 2 * r + 1] = pv[2 * q + 1];
        dv[r] = h2f(p + F::kD);
      }
    }
  }
}

// ---- the tile kernels: RX activation rows from x0 against a packed tile; res[i][r] ----

// Σ over G groups of one sub-block of the unsigned values q (groups of 32 bytes) times the
// activations a (int8, the sub-block's first value), per row, scaled by the int16 pairs scv:
// int16 partial sums of A maddubs at a time (the bounds above).
template <int G, int A, int RX>
inline void sub_dot(const uint8_t* q, const int8_t* const* a, int64_t off, __m256i scv, __m256i* isum) {
  for (int g0 = 0; g0 < G; g0 += A) {
    __m256i s16[RX];
    const __m256i w0 = load256(q + 32 * g0);
    for (int i = 0; i < RX; ++i) s16[i] = _mm256_maddubs_epi16(w0, bcast4(a[i] + off + 4 * g0));
    for (int g = g0 + 1; g < g0 + A; ++g) {
      const __m256i w = load256(q + 32 * g);
      for (int i = 0; i < RX; ++i) s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(w, bcast4(a[i] + off + 4 * g)));
    }
    for (int i = 0; i < RX; ++i) isum[i] = madd_acc(isum[i], s16[i], scv);
  }
}

// out[i] = Σ over P pairs q of the per-row int16 pairs pv[q] (8 rows x 2) times activation row
// x0+i's int16 sums bs[c0 + 2q], bs[c0 + 2q + 1] (rows of bs_len): the mins (q4_K/q5_K) or
// offset (q6_K) term of a super-block.
template <int P, int RX>
inline void pair_sums(const int16_t* pv, const int16_t* bs, int64_t bs_len, int64_t x0, int64_t c0, __m256i* out) {
  for (int i = 0; i < RX; ++i) out[i] = _mm256_setzero_si256();
  for (int q = 0; q < P; ++q) {
    const __m256i v = load256(pv + 16 * q);
    for (int i = 0; i < RX; ++i)
      out[i] = madd_acc(out[i], v, bcast4(reinterpret_cast<const int8_t*>(bs + (x0 + i) * bs_len + c0 + 2 * q)));
  }
}

template <DType WT, int RX>
void ptile(const uint8_t* pk, const QActs& a, int64_t x0, int64_t nsb, float (*res)[8]) {
  constexpr QuantPackedLayout L = quant_packed_layout(WT);
  const int8_t* aq[RX];
  const float* ad[RX];
  for (int i = 0; i < RX; ++i) aq[i] = a.qs + (x0 + i) * a.k, ad[i] = a.d + (x0 + i) * (a.k / L.sb_values);
  __m256 acc[RX];
  for (int i = 0; i < RX; ++i) acc[i] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nsb; ++b) {
    const uint8_t* o = pk + b * L.sb_bytes;
    const __m256 dv = _mm256_loadu_ps(reinterpret_cast<const float*>(o + L.d_off));
    const int64_t off = b * L.sb_values;
    __m256i isum[RX];
    for (int i = 0; i < RX; ++i) isum[i] = _mm256_setzero_si256();
    if constexpr (WT == DType::Q8_0 || WT == DType::IQ4_NL) {
      for (int g = 0; g < 8; ++g) {
        const __m256i w = load256(o + 32 * g), aw = load256(o + 256 + 32 * g);
        for (int i = 0; i < RX; ++i) isum[i] = dot_us(isum[i], aw, _mm256_sign_epi8(bcast4(aq[i] + off + 4 * g), w));
      }
    } else if constexpr (WT == DType::Q4_0 || WT == DType::Q5_0) {
      constexpr int kOff = WT == DType::Q4_0 ? 8 : 16;
      sub_dot<8, WT == DType::Q4_0 ? 8 : 4, RX>(o, aq, off, _mm256_set1_epi16(1), isum);
      for (int i = 0; i < RX; ++i)
        isum[i] = _mm256_sub_epi32(isum[i], _mm256_set1_epi32(kOff * a.sum32[(x0 + i) * nsb + b]));
    } else if constexpr (WT == DType::Q4_1 || WT == DType::Q5_1) {
      sub_dot<8, WT == DType::Q4_1 ? 8 : 4, RX>(o, aq, off, _mm256_set1_epi16(1), isum);
      const __m256 mv = _mm256_loadu_ps(reinterpret_cast<const float*>(o + L.d_off) + 8);
      for (int i = 0; i < RX; ++i)
        acc[i] = _mm256_fmadd_ps(mv, _mm256_set1_ps(ad[i][b] * static_cast<float>(a.sum32[(x0 + i) * nsb + b])), acc[i]);
    } else if constexpr (WT == DType::IQ4_XS) {
      const int16_t* sc = reinterpret_cast<const int16_t*>(o + 4096);
      for (int s = 0; s < 8; ++s) {
        const __m256i scv = load256(sc + 16 * s);
        for (int g = 0; g < 8; ++g) {
          const __m256i w = load256(o + 512 * s + 32 * g), aw = load256(o + 512 * s + 256 + 32 * g);
          for (int i = 0; i < RX; ++i)
            isum[i] = madd_acc(isum[i], _mm256_maddubs_epi16(aw, _mm256_sign_epi8(bcast4(aq[i] + off + 32 * s + 4 * g), w)), scv);
        }
      }
    } else if constexpr (WT == DType::Q4_K || WT == DType::Q5_K) {
      const int16_t* sc = reinterpret_cast<const int16_t*>(o + 2048);
      for (int s = 0; s < 8; ++s)
        sub_dot<8, WT == DType::Q4_K ? 8 : 4, RX>(o + 256 * s, aq, off + 32 * s, load256(sc + 16 * s), isum);
      __m256i imin[RX];
      pair_sums<4, RX>(sc + 128, a.bsum32, a.k / 32, x0, b * 8, imin);
      const __m256 dmin = _mm256_loadu_ps(reinterpret_cast<const float*>(o + L.d_off) + 8);
      for (int i = 0; i < RX; ++i)
        acc[i] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(imin[i]), _mm256_mul_ps(dmin, _mm256_set1_ps(ad[i][b])), acc[i]);
    } else {  // Q6_K, Q3_K, Q2_K: sub-blocks of 16 (4 groups), two per chunk
      const int16_t* sc = reinterpret_cast<const int16_t*>(o + 2048);
      for (int s = 0; s < 16; ++s)
        sub_dot<4, 2, RX>(o + 256 * (s / 2) + 128 * (s % 2), aq, off + 16 * s, load256(sc + 16 * s), isum);
      __m256i corr[RX];
      pair_sums<8, RX>(sc + 256, a.bsum, a.k / 16, x0, b * 16, corr);
      if constexpr (WT == DType::Q2_K) {  // the minima: dmin · Σ_s m_s · Σa, in float
        const __m256 dmin = _mm256_loadu_ps(reinterpret_cast<const float*>(o + L.d_off) + 8);
        for (int i = 0; i < RX; ++i)
          acc[i] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(corr[i]), _mm256_mul_ps(dmin, _mm256_set1_ps(ad[i][b])), acc[i]);
      } else {  // the unsigned offset (q6_K 32, q3_K 4) times Σ_s sc_s · Σa
        for (int i = 0; i < RX; ++i)
          isum[i] = _mm256_sub_epi32(isum[i], _mm256_slli_epi32(corr[i], K16Block<WT>::kOffsetShift));
      }
    }
    for (int i = 0; i < RX; ++i)
      acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[i]), _mm256_mul_ps(dv, _mm256_set1_ps(ad[i][b])), acc[i]);
  }
  for (int i = 0; i < RX; ++i) _mm256_storeu_ps(res[i], acc[i]);
}

// The driver: 8-row tiles split over the threads, each repacked once into the thread's part of
// jb.pack and run against all n activation rows, 4 at a time.
template <DType WT>
void run_packed(const QuantJob& jb) {
  constexpr QuantPackedLayout L = quant_packed_layout(WT);
  const QActs& a = *jb.a;
  const int64_t n = a.n, m = jb.m, nsb = jb.k / L.sb_values;
  const int64_t tiles = (m + 7) / 8;
  const bool par = tiles > 1 && m * jb.k * n > 65536;
#pragma omp parallel if(par)
  {
    uint8_t* pk = jb.pack + static_cast<size_t>(omp_get_thread_num()) * jb.pack_stride;
#pragma omp for schedule(static)
    for (int64_t t = 0; t < tiles; ++t) {
      const int64_t r0 = t * 8;
      const int rr = static_cast<int>(std::min<int64_t>(8, m - r0));
      const uint8_t* wr[8];
      for (int j = 0; j < 8; ++j) wr[j] = jb.w + static_cast<size_t>(r0 + std::min(j, rr - 1)) * jb.row_bytes;
      pack_tile<WT>(wr, nsb, pk);
      float res[4][8];
      for (int64_t x0 = 0; x0 < n;) {
        const int rx = static_cast<int>(std::min<int64_t>(4, n - x0));
        switch (rx) {
          case 4: ptile<WT, 4>(pk, a, x0, nsb, res); break;
          case 3: ptile<WT, 3>(pk, a, x0, nsb, res); break;
          case 2: ptile<WT, 2>(pk, a, x0, nsb, res); break;
          default: ptile<WT, 1>(pk, a, x0, nsb, res); break;
        }
        for (int i = 0; i < rx; ++i) {
          float* o = jb.out + (x0 + i) * jb.ldo + r0;
          if (rr == 8 && !jb.accumulate) {
            _mm256_storeu_ps(o, _mm256_loadu_ps(res[i]));
          } else {
            for (int j = 0; j < rr; ++j) o[j] = jb.accumulate ? o[j] + res[i][j] : res[i][j];
          }
        }
        x0 += rx;
      }
    }
  }
}
