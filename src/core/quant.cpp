// quant.cpp — ggml block formats: type table, dequantisation and quantisation (see quant.h).
//
// Blocks are read and written through memcpy of the block structs, so source and destination
// pointers need no alignment (GGUF data of an odd-sized block type is only byte-aligned).
#include "core/quant.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>

#include "core/dtype.h"
#include "core/error.h"

namespace moe {
namespace {

struct TypeRow {
  GgmlType type;
  GgmlTypeInfo info;
};

// Sizes from ggml.c's type_traits; dequantizable/quantizable say what this engine implements.
const TypeRow kTypes[] = {
    {GgmlType::F32, {"f32", 1, 4, true, true}},
    {GgmlType::F16, {"f16", 1, 2, true, true}},
    {GgmlType::Q4_0, {"q4_0", 32, 18, true, true}},
    {GgmlType::Q4_1, {"q4_1", 32, 20, true, true}},
    {GgmlType::Q5_0, {"q5_0", 32, 22, true, true}},
    {GgmlType::Q5_1, {"q5_1", 32, 24, true, true}},
    {GgmlType::Q8_0, {"q8_0", 32, 34, true, true}},
    {GgmlType::Q8_1, {"q8_1", 32, 36, false, false}},
    {GgmlType::Q2_K, {"q2_K", 256, 84, true, false}},
    {GgmlType::Q3_K, {"q3_K", 256, 110, true, false}},
    {GgmlType::Q4_K, {"q4_K", 256, 144, true, true}},
    {GgmlType::Q5_K, {"q5_K", 256, 176, true, true}},
    {GgmlType::Q6_K, {"q6_K", 256, 210, true, true}},
    {GgmlType::Q8_K, {"q8_K", 256, 292, false, false}},
    {GgmlType::IQ2_XXS, {"iq2_xxs", 256, 66, false, false}},
    {GgmlType::IQ2_XS, {"iq2_xs", 256, 74, false, false}},
    {GgmlType::IQ3_XXS, {"iq3_xxs", 256, 98, false, false}},
    {GgmlType::IQ1_S, {"iq1_s", 256, 50, false, false}},
    {GgmlType::IQ4_NL, {"iq4_nl", 32, 18, true, false}},
    {GgmlType::IQ3_S, {"iq3_s", 256, 110, false, false}},
    {GgmlType::IQ2_S, {"iq2_s", 256, 82, false, false}},
    {GgmlType::IQ4_XS, {"iq4_xs", 256, 136, true, false}},
    {GgmlType::I8, {"i8", 1, 1, false, false}},
    {GgmlType::I16, {"i16", 1, 2, false, false}},
    {GgmlType::I32, {"i32", 1, 4, false, false}},
    {GgmlType::I64, {"i64", 1, 8, false, false}},
    {GgmlType::F64, {"f64", 1, 8, false, false}},
    {GgmlType::IQ1_M, {"iq1_m", 256, 56, false, false}},
    {GgmlType::BF16, {"bf16", 1, 2, true, true}},
    {GgmlType::TQ1_0, {"tq1_0", 256, 54, false, false}},
    {GgmlType::TQ2_0, {"tq2_0", 256, 66, false, false}},
    {GgmlType::MXFP4, {"mxfp4", 32, 17, false, false}},
};

inline float h2f(uint16_t h) { return f16_to_f32(h); }

// The 6-bit scale and min of sub-block j (0..7) of a Q4_K/Q5_K block (ggml's get_scale_min_k4):
// bytes 0-3 hold sc[0..3] (low 6 bits) and the top 2 bits of sc[4..7]; bytes 4-7 likewise
// m[0..3] and the top bits of m[4..7]; bytes 8-11 the low 4 bits of sc[4..7] | m[4..7] << 4.
inline void get_scale_min_k4(int j, const uint8_t* q, uint8_t* d, uint8_t* m) {
  if (j < 4) {
    *d = q[j] & 63;
    *m = q[j + 4] & 63;
  } else {
    *d = static_cast<uint8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    *m = static_cast<uint8_t>((q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4));
  }
}

inline void put_scale_min_k4(const uint8_t sc[8], const uint8_t mn[8], uint8_t* q) {
  for (int j = 0; j < 4; ++j) {
    q[j] = static_cast<uint8_t>((sc[j] & 63) | ((sc[j + 4] >> 4) << 6));
    q[j + 4] = static_cast<uint8_t>((mn[j] & 63) | ((mn[j + 4] >> 4) << 6));
    q[j + 8] = static_cast<uint8_t>((sc[j + 4] & 0xF) | ((mn[j + 4] & 0xF) << 4));
  }
}

// ---- dequantisation (llama.cpp's dequantize_row_* definitions) ----------------------------

void dequant_q8_0(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockQ8_0 b;
    std::memcpy(&b, src + i * sizeof(BlockQ8_0), sizeof b);
    const float d = h2f(b.d);
    for (int j = 0; j < 32; ++j) y[i * 32 + j] = b.qs[j] * d;
  }
}

void dequant_q4_0(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockQ4_0 b;
    std::memcpy(&b, src + i * sizeof(BlockQ4_0), sizeof b);
    const float d = h2f(b.d);
    for (int j = 0; j < 16; ++j) {
      const int x0 = (b.qs[j] & 0x0F) - 8;
      const int x1 = (b.qs[j] >> 4) - 8;
      y[i * 32 + j] = x0 * d;
      y[i * 32 + j + 16] = x1 * d;
    }
  }
}

void dequant_q4_1(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockQ4_1 b;
    std::memcpy(&b, src + i * sizeof(BlockQ4_1), sizeof b);
    const float d = h2f(b.d), m = h2f(b.m);
    for (int j = 0; j < 16; ++j) {
      y[i * 32 + j] = (b.qs[j] & 0x0F) * d + m;
      y[i * 32 + j + 16] = (b.qs[j] >> 4) * d + m;
    }
  }
}

// The 5-bit values of a Q5_0/Q5_1 block: low nibbles from qs, bit 4 of value j from bit j of qh.
inline void q5_values(const uint8_t qs[16], const uint8_t qh_bytes[4], int q[32]) {
  uint32_t qh;
  std::memcpy(&qh, qh_bytes, 4);
  for (int j = 0; j < 16; ++j) {
    q[j] = (qs[j] & 0x0F) | static_cast<int>(((qh >> j) & 1u) << 4);
    q[j + 16] = (qs[j] >> 4) | static_cast<int>(((qh >> (j + 16)) & 1u) << 4);
  }
}

void dequant_q5_0(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockQ5_0 b;
    std::memcpy(&b, src + i * sizeof(BlockQ5_0), sizeof b);
    const float d = h2f(b.d);
    int q[32];
    q5_values(b.qs, b.qh, q);
    for (int j = 0; j < 32; ++j) y[i * 32 + j] = (q[j] - 16) * d;
  }
}

void dequant_q5_1(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockQ5_1 b;
    std::memcpy(&b, src + i * sizeof(BlockQ5_1), sizeof b);
    const float d = h2f(b.d), m = h2f(b.m);
    int q[32];
    q5_values(b.qs, b.qh, q);
    for (int j = 0; j < 32; ++j) y[i * 32 + j] = q[j] * d + m;
  }
}

void dequant_q4_k(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockQ4_K b;
    std::memcpy(&b, src + i * sizeof(BlockQ4_K), sizeof b);
    const float d = h2f(b.d);
    const float min = h2f(b.dmin);
    const uint8_t* q = b.qs;
    int is = 0;
    uint8_t sc, m;
    for (int j = 0; j < 256; j += 64) {
      get_scale_min_k4(is + 0, b.scales, &sc, &m);
      const float d1 = d * sc, m1 = min * m;
      get_scale_min_k4(is + 1, b.scales, &sc, &m);
      const float d2 = d * sc, m2 = min * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * (q[l] & 0xF) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * (q[l] >> 4) - m2;
      q += 32;
      is += 2;
    }
  }
}

void dequant_q5_k(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockQ5_K b;
    std::memcpy(&b, src + i * sizeof(BlockQ5_K), sizeof b);
    const float d = h2f(b.d);
    const float min = h2f(b.dmin);
    const uint8_t* ql = b.qs;
    int is = 0;
    uint8_t sc, m;
    uint8_t u1 = 1, u2 = 2;
    for (int j = 0; j < 256; j += 64) {
      get_scale_min_k4(is + 0, b.scales, &sc, &m);
      const float d1 = d * sc, m1 = min * m;
      get_scale_min_k4(is + 1, b.scales, &sc, &m);
      const float d2 = d * sc, m2 = min * m;
      for (int l = 0; l < 32; ++l) *y++ = d1 * ((ql[l] & 0xF) + (b.qh[l] & u1 ? 16 : 0)) - m1;
      for (int l = 0; l < 32; ++l) *y++ = d2 * ((ql[l] >> 4) + (b.qh[l] & u2 ? 16 : 0)) - m2;
      ql += 32;
      is += 2;
      u1 = static_cast<uint8_t>(u1 << 2);
      u2 = static_cast<uint8_t>(u2 << 2);
    }
  }
}

void dequant_q2_k(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockQ2_K b;
    std::memcpy(&b, src + i * sizeof(BlockQ2_K), sizeof b);
    const float d = h2f(b.d), min = h2f(b.dmin);
    int is = 0;
    for (int n = 0; n < 2; ++n)
      for (int j = 0; j < 4; ++j)
        for (int half = 0; half < 2; ++half) {
          const uint8_t sc = b.scales[is++];
          const float dl = d * (sc & 0xF), ml = min * (sc >> 4);
          for (int l = 0; l < 16; ++l) *y++ = dl * ((b.qs[32 * n + 16 * half + l] >> (2 * j)) & 3) - ml;
        }
  }
}

void dequant_q3_k(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockQ3_K b;
    std::memcpy(&b, src + i * sizeof(BlockQ3_K), sizeof b);
    const float d = h2f(b.d);
    int8_t sc[16];
    q3_k_scales(b.scales, sc);
    int is = 0;
    for (int n = 0; n < 2; ++n)
      for (int j = 0; j < 4; ++j)
        for (int half = 0; half < 2; ++half) {
          const float dl = d * (sc[is++] - 32);
          for (int l = 16 * half; l < 16 * half + 16; ++l) {
            const int q = ((b.qs[32 * n + l] >> (2 * j)) & 3) - ((b.hmask[l] >> (4 * n + j)) & 1 ? 0 : 4);
            *y++ = dl * q;
          }
        }
  }
}

void dequant_iq4_nl(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockIQ4_NL b;
    std::memcpy(&b, src + i * sizeof(BlockIQ4_NL), sizeof b);
    const float d = h2f(b.d);
    for (int j = 0; j < 16; ++j) {
      y[i * 32 + j] = d * kIq4NlValues[b.qs[j] & 0xF];
      y[i * 32 + j + 16] = d * kIq4NlValues[b.qs[j] >> 4];
    }
  }
}

void dequant_iq4_xs(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockIQ4_XS b;
    std::memcpy(&b, src + i * sizeof(BlockIQ4_XS), sizeof b);
    const float d = h2f(b.d);
    for (int s = 0; s < 8; ++s) {
      const float dl = d * iq4_xs_scale(src + i * sizeof(BlockIQ4_XS), s);
      for (int j = 0; j < 16; ++j) {
        y[j] = dl * kIq4NlValues[b.qs[16 * s + j] & 0xF];
        y[j + 16] = dl * kIq4NlValues[b.qs[16 * s + j] >> 4];
      }
      y += 32;
    }
  }
}

void dequant_q6_k(const uint8_t* src, float* y, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockQ6_K b;
    std::memcpy(&b, src + i * sizeof(BlockQ6_K), sizeof b);
    const float d = h2f(b.d);
    const uint8_t* ql = b.ql;
    const uint8_t* qh = b.qh;
    const int8_t* sc = b.scales;
    for (int n = 0; n < 256; n += 128) {
      for (int l = 0; l < 32; ++l) {
        const int is = l / 16;
        const int8_t q1 = static_cast<int8_t>((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
        const int8_t q2 = static_cast<int8_t>((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
        const int8_t q3 = static_cast<int8_t>((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
        const int8_t q4 = static_cast<int8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
        y[l + 0] = d * sc[is + 0] * q1;
        y[l + 32] = d * sc[is + 2] * q2;
        y[l + 64] = d * sc[is + 4] * q3;
        y[l + 96] = d * sc[is + 6] * q4;
      }
      y += 128;
      ql += 64;
      qh += 32;
      sc += 8;
    }
  }
}

// ---- quantisation ------------------------------------------------------------------------

// llama.cpp quantize_row_q8_0_ref: d = amax/127 stored as f16; q = roundf(x / d) with the
// unrounded d (roundf: halves away from zero).
void quant_q8_0(const float* x, uint8_t* dst, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    float amax = 0.0f;
    for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[i * 32 + j]));
    const float d = amax / ((1 << 7) - 1);
    const float id = d ? 1.0f / d : 0.0f;
    BlockQ8_0 b;
    b.d = f32_to_f16(d);
    for (int j = 0; j < 32; ++j) b.qs[j] = static_cast<int8_t>(std::roundf(x[i * 32 + j] * id));
    std::memcpy(dst + i * sizeof b, &b, sizeof b);
  }
}

// llama.cpp quantize_row_q4_0_ref / q5_0_ref: d = (the value of largest magnitude) / -2^(bits-1),
// so that value maps to q = 0; q = min(2^bits - 1, trunc(x/d + 2^(bits-1) + 0.5)).
void quant_offset_scaled(const float* x, uint8_t* dst, int64_t nb, bool five) {
  const int half = five ? 16 : 8, top = 2 * half - 1;
  for (int64_t i = 0; i < nb; ++i) {
    const float* v = x + i * 32;
    float amax = 0.0f, max = 0.0f;
    for (int j = 0; j < 32; ++j)
      if (amax < std::fabs(v[j])) {
        amax = std::fabs(v[j]);
        max = v[j];
      }
    const float d = max / -half;
    const float id = d ? 1.0f / d : 0.0f;
    uint8_t qs[16];
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const float x0 = v[j] * id, x1 = v[16 + j] * id;
      const int q0 = std::min<int>(top, static_cast<int8_t>(x0 + (half + 0.5f)));
      const int q1 = std::min<int>(top, static_cast<int8_t>(x1 + (half + 0.5f)));
      qs[j] = static_cast<uint8_t>((q0 & 0x0F) | ((q1 & 0x0F) << 4));
      qh |= static_cast<uint32_t>((q0 & 0x10) >> 4) << j;
      qh |= static_cast<uint32_t>((q1 & 0x10) >> 4) << (j + 16);
    }
    if (five) {
      BlockQ5_0 b;
      b.d = f32_to_f16(d);
      std::memcpy(b.qh, &qh, 4);
      std::memcpy(b.qs, qs, 16);
      std::memcpy(dst + i * sizeof b, &b, sizeof b);
    } else {
      BlockQ4_0 b;
      b.d = f32_to_f16(d);
      std::memcpy(b.qs, qs, 16);
      std::memcpy(dst + i * sizeof b, &b, sizeof b);
    }
  }
}

// llama.cpp quantize_row_q4_1_ref / q5_1_ref: d = (max - min) / (2^bits - 1), m = min, and
// q = min(2^bits - 1, trunc((x - min)/d + 0.5)) (q5_1: the 5-bit value as computed, no clamp).
void quant_min_scaled(const float* x, uint8_t* dst, int64_t nb, bool five) {
  const int top = five ? 31 : 15;
  for (int64_t i = 0; i < nb; ++i) {
    const float* v = x + i * 32;
    float mn = v[0], mx = v[0];
    for (int j = 1; j < 32; ++j) mn = std::min(mn, v[j]), mx = std::max(mx, v[j]);
    const float d = (mx - mn) / top;
    const float id = d ? 1.0f / d : 0.0f;
    uint8_t qs[16];
    uint32_t qh = 0;
    for (int j = 0; j < 16; ++j) {
      const float x0 = (v[j] - mn) * id, x1 = (v[16 + j] - mn) * id;
      int q0, q1;
      if (five) {
        q0 = static_cast<uint8_t>(x0 + 0.5f), q1 = static_cast<uint8_t>(x1 + 0.5f);
      } else {
        q0 = std::min<int>(15, static_cast<int8_t>(x0 + 0.5f)), q1 = std::min<int>(15, static_cast<int8_t>(x1 + 0.5f));
      }
      qs[j] = static_cast<uint8_t>((q0 & 0x0F) | ((q1 & 0x0F) << 4));
      qh |= static_cast<uint32_t>((q0 & 0x10) >> 4) << j;
      qh |= static_cast<uint32_t>((q1 & 0x10) >> 4) << (j + 16);
    }
    if (five) {
      BlockQ5_1 b;
      b.d = f32_to_f16(d), b.m = f32_to_f16(mn);
      std::memcpy(b.qh, &qh, 4);
      std::memcpy(b.qs, qs, 16);
      std::memcpy(dst + i * sizeof b, &b, sizeof b);
    } else {
      BlockQ4_1 b;
      b.d = f32_to_f16(d), b.m = f32_to_f16(mn);
      std::memcpy(b.qs, qs, 16);
      std::memcpy(dst + i * sizeof b, &b, sizeof b);
    }
  }
}

inline int nearest_int(float v) { return static_cast<int>(std::lrintf(v)); }

// Asymmetric fit of n values to x ≈ scale * q - mn with q in 0..nmax and mn >= 0: tries a range
// of step sizes around (max - min) / nmax and, for each rounding, the least-squares scale and
// min; keeps the lowest squared error. Returns scale, writes *mn.
float fit_scale_min(const float* x, int n, int nmax, float* mn) {
  float lo = x[0], hi = x[0];
  for (int i = 1; i < n; ++i) {
    lo = std::min(lo, x[i]);
    hi = std::max(hi, x[i]);
  }
  if (lo > 0) lo = 0;  // the min term only subtracts (m >= 0), so offsets above 0 are not used
  if (hi <= lo) {
    *mn = -lo;
    return 0.0f;
  }
  float best_scale = (hi - lo) / nmax, best_min = lo, best_err = INFINITY;
  for (int step = -8; step <= 8; ++step) {
    const float iscale = (nmax + 0.1f * step) / (hi - lo);
    double sl = 0, sl2 = 0, sx = 0, slx = 0;
    int q[256];
    for (int i = 0; i < n; ++i) {
      q[i] = std::clamp(nearest_int(iscale * (x[i] - lo)), 0, nmax);
      sl += q[i];
      sl2 += double(q[i]) * q[i];
      sx += x[i];
      slx += double(q[i]) * x[i];
    }
    const double det = n * sl2 - sl * sl;
    if (det <= 0) continue;
    double a = (n * slx - sl * sx) / det;
    double b = (sl2 * sx - sl * slx) / det;
    if (b > 0) {  // min must be <= 0: refit the scale alone with b = 0
      b = 0;
      a = sl2 > 0 ? slx / sl2 : 0;
    }
    if (a <= 0) continue;
    double err = 0;
    for (int i = 0; i < n; ++i) {
      const double e = a * q[i] + b - x[i];
      err += e * e;
    }
    if (err < best_err) {
      best_err = err;
      best_scale = static_cast<float>(a);
      best_min = static_cast<float>(b);
    }
  }
  *mn = -best_min;
  return best_scale;
}

// Q4_K (nbits 4) and Q5_K (nbits 5) share the scale layout: fits each 32-value sub-block, then
// quantises the 8 scales and 8 mins to 6 bits against f16 super-scales d and dmin, then
// rounds the values against the decoded scales.
void quant_kx(const float* x, int nbits, float* d_out, float* dmin_out, uint8_t scales[12], uint8_t q_out[256]) {
  const int nmax = (1 << nbits) - 1;
  float sc[8], mn[8];
  float max_sc = 0, max_mn = 0;
  for (int s = 0; s < 8; ++s) {
    sc[s] = fit_scale_min(x + 32 * s, 32, nmax, &mn[s]);
    max_sc = std::max(max_sc, sc[s]);
    max_mn = std::max(max_mn, mn[s]);
  }
  const float d = f16_to_f32(f32_to_f16(max_sc / 63.0f));
  const float dmin = f16_to_f32(f32_to_f16(max_mn / 63.0f));
  uint8_t ls[8], lm[8];
  for (int s = 0; s < 8; ++s) {
    ls[s] = static_cast<uint8_t>(d > 0 ? std::clamp(nearest_int(sc[s] / d), 0, 63) : 0);
    lm[s] = static_cast<uint8_t>(dmin > 0 ? std::clamp(nearest_int(mn[s] / dmin), 0, 63) : 0);
  }
  put_scale_min_k4(ls, lm, scales);
  for (int s = 0; s < 8; ++s) {
    const float ds = d * ls[s];
    const float ms = dmin * lm[s];
    for (int i = 0; i < 32; ++i) {
      q_out[32 * s + i] = static_cast<uint8_t>(ds > 0 ? std::clamp(nearest_int((x[32 * s + i] + ms) / ds), 0, nmax) : 0);
    }
  }
  *d_out = d;
  *dmin_out = dmin;
}

void quant_q4_k(const float* x, uint8_t* dst, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockQ4_K b;
    float d, dmin;
    uint8_t q[256];
    quant_kx(x + i * 256, 4, &d, &dmin, b.scales, q);
    b.d = f32_to_f16(d);
    b.dmin = f32_to_f16(dmin);
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) b.qs[32 * j + l] = static_cast<uint8_t>(q[64 * j + l] | (q[64 * j + 32 + l] << 4));
    std::memcpy(dst + i * sizeof b, &b, sizeof b);
  }
}

void quant_q5_k(const float* x, uint8_t* dst, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    BlockQ5_K b;
    float d, dmin;
    uint8_t q[256];
    quant_kx(x + i * 256, 5, &d, &dmin, b.scales, q);
    b.d = f32_to_f16(d);
    b.dmin = f32_to_f16(dmin);
    std::memset(b.qh, 0, sizeof b.qh);
    for (int j = 0; j < 4; ++j) {
      for (int l = 0; l < 32; ++l) {
        const uint8_t lo = q[64 * j + l], hi = q[64 * j + 32 + l];
        b.qs[32 * j + l] = static_cast<uint8_t>((lo & 0xF) | ((hi & 0xF) << 4));
        if (lo & 16) b.qh[l] |= static_cast<uint8_t>(1u << (2 * j));
        if (hi & 16) b.qh[l] |= static_cast<uint8_t>(1u << (2 * j + 1));
      }
    }
    std::memcpy(dst + i * sizeof b, &b, sizeof b);
  }
}

// Q6_K: symmetric per 16-value sub-block; the scale with the least squared error among steps
// around amax/32 (q in -32..31), the 16 scales then quantised to int8 against f16 d.
void quant_q6_k(const float* x, uint8_t* dst, int64_t nb) {
  for (int64_t i = 0; i < nb; ++i) {
    const float* xb = x + i * 256;
    float sc[16];
    float max_sc = 0;
    for (int s = 0; s < 16; ++s) {
      float amax = 0;
      for (int k = 0; k < 16; ++k) amax = std::max(amax, std::fabs(xb[16 * s + k]));
      float best = amax / 31.0f, best_err = INFINITY;
      if (amax > 0) {
        for (int step = -6; step <= 6; ++step) {
          const float scale = amax / (31.0f + 0.25f * step);
          double err = 0;
          for (int k = 0; k < 16; ++k) {
            const int q = std::clamp(nearest_int(xb[16 * s + k] / scale), -32, 31);
            const double e = double(q) * scale - xb[16 * s + k];
            err += e * e;
          }
          if (err < best_err) {
            best_err = err;
            best = scale;
          }
        }
      }
      sc[s] = best;
      max_sc = std::max(max_sc, best);
    }
    BlockQ6_K b;
    const float d = f16_to_f32(f32_to_f16(max_sc / 127.0f));
    b.d = f32_to_f16(d);
    uint8_t q[256];
    for (int s = 0; s < 16; ++s) {
      const int ls = d > 0 ? std::clamp(nearest_int(sc[s] / d), 0, 127) : 0;
      b.scales[s] = static_cast<int8_t>(ls);
      const float ds = d * ls;
      for (int k = 0; k < 16; ++k) {
        const int v = ds > 0 ? std::clamp(nearest_int(xb[16 * s + k] / ds), -32, 31) : 0;
        q[16 * s + k] = static_cast<uint8_t>(v + 32);
      }
    }
    for (int n = 0; n < 2; ++n) {
      const uint8_t* qq = q + 128 * n;
      uint8_t* ql = b.ql + 64 * n;
      uint8_t* qh = b.qh + 32 * n;
      for (int l = 0; l < 32; ++l) {
        ql[l] = static_cast<uint8_t>((qq[l] & 0xF) | ((qq[l + 64] & 0xF) << 4));
        ql[l + 32] = static_cast<uint8_t>((qq[l + 32] & 0xF) | ((qq[l + 96] & 0xF) << 4));
        qh[l] = static_cast<uint8_t>((qq[l] >> 4) | ((qq[l + 32] >> 4) << 2) | ((qq[l + 64] >> 4) << 4) |
                                     ((qq[l + 96] >> 4) << 6));
      }
    }
    std::memcpy(dst + i * sizeof b, &b, sizeof b);
  }
}

int64_t blocks_of(GgmlType type, int64_t n) {
  const GgmlTypeInfo& ti = ggml_type_info(type);
  MOE_CHECK(n >= 0 && n % ti.block_elems == 0, "%s: %lld values are not a whole number of %lld-value blocks", ti.name,
            static_cast<long long>(n), static_cast<long long>(ti.block_elems));
  return n / ti.block_elems;
}

}  // namespace

bool ggml_type_info(uint32_t type, GgmlTypeInfo* out) {
  for (const TypeRow& r : kTypes) {
    if (static_cast<uint32_t>(r.type) == type) {
      *out = r.info;
      return true;
    }
  }
  return false;
}

const GgmlTypeInfo& ggml_type_info(GgmlType type) {
  for (const TypeRow& r : kTypes)
    if (r.type == type) return r.info;
  MOE_FAIL("unknown ggml type %u", static_cast<unsigned>(type));
}

const char* ggml_type_name(GgmlType type) { return ggml_type_info(type).name; }

bool ggml_type_from_name(const std::string& s, GgmlType* out) {
  std::string lower = s;
  for (char& c : lower) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  for (const TypeRow& r : kTypes) {
    std::string n = r.info.name;
    for (char& c : n) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    if (n == lower) {
      *out = r.type;
      return true;
    }
  }
  return false;
}

GgmlType dtype_ggml_type(DType t) {
  switch (t) {
    case DType::Q8_0: return GgmlType::Q8_0;
    case DType::Q4_0: return GgmlType::Q4_0;
    case DType::Q4_1: return GgmlType::Q4_1;
    case DType::Q5_0: return GgmlType::Q5_0;
    case DType::Q5_1: return GgmlType::Q5_1;
    case DType::Q4_K: return GgmlType::Q4_K;
    case DType::Q5_K: return GgmlType::Q5_K;
    case DType::Q6_K: return GgmlType::Q6_K;
    case DType::Q2_K: return GgmlType::Q2_K;
    case DType::Q3_K: return GgmlType::Q3_K;
    case DType::IQ4_NL: return GgmlType::IQ4_NL;
    case DType::IQ4_XS: return GgmlType::IQ4_XS;
    default: break;
  }
  MOE_FAIL("%s is not a quantized block dtype (this is a bug)", dtype_name(t));
}

bool dtype_from_ggml_type(GgmlType g, DType* out) {
  switch (g) {
    case GgmlType::Q8_0: *out = DType::Q8_0; return true;
    case GgmlType::Q4_0: *out = DType::Q4_0; return true;
    case GgmlType::Q4_1: *out = DType::Q4_1; return true;
    case GgmlType::Q5_0: *out = DType::Q5_0; return true;
    case GgmlType::Q5_1: *out = DType::Q5_1; return true;
    case GgmlType::Q4_K: *out = DType::Q4_K; return true;
    case GgmlType::Q5_K: *out = DType::Q5_K; return true;
    case GgmlType::Q6_K: *out = DType::Q6_K; return true;
    case GgmlType::Q2_K: *out = DType::Q2_K; return true;
    case GgmlType::Q3_K: *out = DType::Q3_K; return true;
    case GgmlType::IQ4_NL: *out = DType::IQ4_NL; return true;
    case GgmlType::IQ4_XS: *out = DType::IQ4_XS; return true;
    default: return false;
  }
}

size_t ggml_row_bytes(GgmlType type, int64_t n) {
  return static_cast<size_t>(blocks_of(type, n)) * ggml_type_info(type).block_bytes;
}

void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n) {
  const int64_t nb = blocks_of(type, n);
  const auto* s = static_cast<const uint8_t*>(src);
  switch (type) {
    case GgmlType::F32: std::memcpy(dst, s, static_cast<size_t>(n) * 4); return;
    case GgmlType::F16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, s + 2 * i, 2);
        dst[i] = f16_to_f32(h);
      }
      return;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t h;
        std::memcpy(&h, s + 2 * i, 2);
        dst[i] = bf16_to_f32(h);
      }
      return;
    case GgmlType::Q8_0: dequant_q8_0(s, dst, nb); return;
    case GgmlType::Q4_0: dequant_q4_0(s, dst, nb); return;
    case GgmlType::Q4_1: dequant_q4_1(s, dst, nb); return;
    case GgmlType::Q5_0: dequant_q5_0(s, dst, nb); return;
    case GgmlType::Q5_1: dequant_q5_1(s, dst, nb); return;
    case GgmlType::Q4_K: dequant_q4_k(s, dst, nb); return;
    case GgmlType::Q5_K: dequant_q5_k(s, dst, nb); return;
    case GgmlType::Q6_K: dequant_q6_k(s, dst, nb); return;
    case GgmlType::Q2_K: dequant_q2_k(s, dst, nb); return;
    case GgmlType::Q3_K: dequant_q3_k(s, dst, nb); return;
    case GgmlType::IQ4_NL: dequant_iq4_nl(s, dst, nb); return;
    case GgmlType::IQ4_XS: dequant_iq4_xs(s, dst, nb); return;
    default: break;
  }
  MOE_FAIL("cannot dequantize ggml type %s (supported: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_K q3_K q4_K q5_K q6_K iq4_nl iq4_xs)", ggml_type_name(type));
}

void quantize_row(GgmlType type, const float* src, void* dst, int64_t n) {
  const int64_t nb = blocks_of(type, n);
  auto* d = static_cast<uint8_t*>(dst);
  if (ggml_type_info(type).block_elems > 1) {
    // The block scales of a NaN or infinite value are meaningless (and its integer conversion
    // undefined): refuse it, naming the position.
    for (int64_t i = 0; i < n; ++i)
      MOE_CHECK(std::isfinite(src[i]), "cannot quantize to %s: value %lld is %g", ggml_type_name(type),
                static_cast<long long>(i), static_cast<double>(src[i]));
  }
  switch (type) {
    case GgmlType::F32: std::memcpy(d, src, static_cast<size_t>(n) * 4); return;
    case GgmlType::F16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = f32_to_f16(src[i]);
        std::memcpy(d + 2 * i, &h, 2);
      }
      return;
    case GgmlType::BF16:
      for (int64_t i = 0; i < n; ++i) {
        const uint16_t h = f32_to_bf16(src[i]);
        std::memcpy(d + 2 * i, &h, 2);
      }
      return;
    case GgmlType::Q8_0: quant_q8_0(src, d, nb); return;
    case GgmlType::Q4_0: quant_offset_scaled(src, d, nb, false); return;
    case GgmlType::Q4_1: quant_min_scaled(src, d, nb, false); return;
    case GgmlType::Q5_0: quant_offset_scaled(src, d, nb, true); return;
    case GgmlType::Q5_1: quant_min_scaled(src, d, nb, true); return;
    case GgmlType::Q4_K: quant_q4_k(src, d, nb); return;
    case GgmlType::Q5_K: quant_q5_k(src, d, nb); return;
    case GgmlType::Q6_K: quant_q6_k(src, d, nb); return;
    default: break;
  }
  MOE_FAIL("cannot quantize to ggml type %s (supported: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q4_K q5_K q6_K)", ggml_type_name(type));
}

}  // namespace moe
