// nf4.cpp — NF4 blocks (see nf4.h).
#include "core/nf4.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "core/dtype.h"
#include "core/error.h"

namespace moe {

const float kNf4Codes[16] = {-1.0f,
                             -0.6961928009986877f,
                             -0.5250730514526367f,
                             -0.39491748809814453f,
                             -0.28444138169288635f,
                             -0.18477343022823334f,
                             -0.09105003625154495f,
                             0.0f,
                             0.07958029955625534f,
                             0.16093020141124725f,
                             0.24611230194568634f,
                             0.33791524171829224f,
                             0.44070982933044434f,
                             0.5626170039176941f,
                             0.7229568362236023f,
                             1.0f};

float nf4_max_error_per_absmax() {
  float m = 0;
  for (int i = 0; i + 1 < 16; ++i) m = std::max(m, (kNf4Codes[i + 1] - kNf4Codes[i]) / 2);
  return m;
}

namespace {

// Index of the nearest code to v in [-1, 1] (ties: the lower code), by the midpoints.
uint8_t nearest_code(float v) {
  uint8_t lo = 0;
  for (uint8_t i = 0; i + 1 < 16; ++i)
    if (v > 0.5f * (kNf4Codes[i] + kNf4Codes[i + 1])) lo = uint8_t(i + 1);
  return lo;
}

}  // namespace

namespace {

// One block's 32 bytes of nibbles: the nearest codes to x / absmax (all of |x| <= absmax).
void encode_nibbles(const float* x, float absmax, uint8_t* out) {
  for (int64_t i = 0; i < kNf4Block; i += 2) {
    // x / absmax computed as a division so that x = code · absmax maps back to code exactly.
    const float v0 = absmax > 0 ? x[i] / absmax : 0.0f, v1 = absmax > 0 ? x[i + 1] / absmax : 0.0f;
    out[i / 2] = uint8_t(nearest_code(v0) << 4 | nearest_code(v1));
  }
}

float block_max_abs(const float* x, int64_t first) {
  float absmax = 0;
  for (int64_t i = 0; i < kNf4Block; ++i) {
    MOE_CHECK(std::isfinite(x[i]), "cannot quantize to nf4: value %lld is %g", (long long)(first + i), double(x[i]));
    absmax = std::max(absmax, std::fabs(x[i]));
  }
  return absmax;
}

void decode_nibbles(const uint8_t* in, float absmax, float* y) {
  for (int64_t i = 0; i < kNf4Block; i += 2) {
    y[i] = kNf4Codes[in[i / 2] >> 4] * absmax;
    y[i + 1] = kNf4Codes[in[i / 2] & 15] * absmax;
  }
}

// decode_nibbles rounded to bf16 to nearest even, bit for bit.
void decode_nibbles_bf16(const uint8_t* in, float absmax, uint16_t* y) {
  int64_t i = 0;
#if defined(__AVX2__)
  // 16 weights per pass: 8 bytes' high nibbles (even elements) and low nibbles (odd), each
  // looked up in the 16 codes as two 8-entry tables (bit 3 picks the table), interleaved back
  // into element order, scaled, and rounded to bf16 to nearest even as f32_to_bf16 does (the
  // products are finite or quiet NaNs, where its integer rounding and this one agree).
  const __m256 t_lo = _mm256_loadu_ps(kNf4Codes), t_hi = _mm256_loadu_ps(kNf4Codes + 8);
  const __m256 am = _mm256_set1_ps(absmax);
  const __m256i fifteen = _mm256_set1_epi32(15), one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
  auto lookup = [&](__m256i idx) {
    const __m256 mask = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));
    return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t_lo, idx), _mm256_permutevar8x32_ps(t_hi, idx), mask);
  };
  auto round_bf16 = [&](__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), one);
    return _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(bias, lsb)), 16);
  };
  for (; i + 16 <= kNf4Block; i += 16) {
    const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(in + i / 2)));
    const __m256 hi = lookup(_mm256_srli_epi32(bytes, 4)), lo = lookup(_mm256_and_si256(bytes, fifteen));
    const __m256 a = _mm256_unpacklo_ps(hi, lo), c = _mm256_unpackhi_ps(hi, lo);
    const __m256 y0 = _mm256_mul_ps(_mm256_permute2f128_ps(a, c, 0x20), am);
    const __m256 y1 = _mm256_mul_ps(_mm256_permute2f128_ps(a, c, 0x31), am);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(round_bf16(y0), round_bf16(y1)), 0xd8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), packed);
  }
#endif
  for (; i < kNf4Block; i += 2) {
    y[i] = f32_to_bf16(kNf4Codes[in[i / 2] >> 4] * absmax);
    y[i + 1] = f32_to_bf16(kNf4Codes[in[i / 2] & 15] * absmax);
  }
}

// A block's absmax (its first 4 bytes, f32).
float block_absmax(const uint8_t* in) {
  float absmax;
  std::memcpy(&absmax, in, 4);
  return absmax;
}

// nf4dq: the absmax value of code c under super-block scale s, the one rule for both directions.
float dq_absmax(float s, int c) { return s * (float(c) / 255.0f); }

// A super-block's four absmax values (decoded) from its first 6 bytes.
void dq_absmaxes(const uint8_t* in, float* am) {
  uint16_t sb;
  std::memcpy(&sb, in, 2);
  const float s = bf16_to_f32(sb);
  for (int j = 0; j < kNf4DqBlocks; ++j) am[j] = dq_absmax(s, in[2 + j]);
}

}  // namespace

void nf4_quantize(const float* src, uint8_t* dst, int64_t n) {
  MOE_CHECK(n % kNf4Block == 0, "nf4: %lld values are not whole blocks of %lld", (long long)n, (long long)kNf4Block);
  for (int64_t b = 0; b < n / kNf4Block; ++b) {
    const float* x = src + b * kNf4Block;
    uint8_t* out = dst + b * kNf4BlockBytes;
    const float absmax = block_max_abs(x, b * kNf4Block);
    std::memcpy(out, &absmax, 4);
    encode_nibbles(x, absmax, out + 4);
  }
}

// The NF4 blocks' values (f32, or bf16 rounded to nearest even) by the block decoder `decode`.
template <class T, void (*decode)(const uint8_t*, float, T*)>
void nf4_decode(const uint8_t* src, T* dst, int64_t n) {
  for (int64_t b = 0; b < n / kNf4Block; ++b) {
    const uint8_t* in = src + b * kNf4BlockBytes;
    decode(in + 4, block_absmax(in), dst + b * kNf4Block);
  }
}

void nf4_dequantize(const uint8_t* src, float* dst, int64_t n) { nf4_decode<float, decode_nibbles>(src, dst, n); }

void nf4_dequantize_bf16(const uint8_t* src, uint16_t* dst, int64_t n) {
  nf4_decode<uint16_t, decode_nibbles_bf16>(src, dst, n);
}

void nf4dq_quantize(const float* src, uint8_t* dst, int64_t n) {
  MOE_CHECK(n % kNf4DqBlock == 0, "nf4dq: %lld values are not whole super-blocks of %lld", (long long)n,
            (long long)kNf4DqBlock);
  for (int64_t b = 0; b < n / kNf4DqBlock; ++b) {
    const float* x = src + b * kNf4DqBlock;
    uint8_t* out = dst + b * kNf4DqBlockBytes;
    float am[kNf4DqBlocks], top = 0;
    for (int j = 0; j < kNf4DqBlocks; ++j) {
      am[j] = block_max_abs(x + j * kNf4Block, b * kNf4DqBlock + j * kNf4Block);
      top = std::max(top, am[j]);
    }
    // The scale: the largest absmax rounded up to bf16, so that code 255 covers every block.
    uint32_t u;
    std::memcpy(&u, &top, 4);
    uint16_t sb = uint16_t(u >> 16);
    if (u & 0xffffu) ++sb;
    const float s = bf16_to_f32(sb);
    MOE_CHECK(std::isfinite(s), "cannot quantize to nf4dq: absmax %g of values %lld.. exceeds bf16's range", double(top),
              (long long)(b * kNf4DqBlock));
    std::memcpy(out, &sb, 2);
    for (int j = 0; j < kNf4DqBlocks; ++j) {
      // The smallest code whose absmax covers the block's (the estimate, then corrected both ways).
      int c = s > 0 ? std::min(255, int(std::ceil(double(am[j]) / double(s) * 255.0))) : 0;
      while (c < 255 && dq_absmax(s, c) < am[j]) ++c;
      while (c > 0 && dq_absmax(s, c - 1) >= am[j]) --c;
      out[2 + j] = uint8_t(c);
      encode_nibbles(x + j * kNf4Block, dq_absmax(s, c), out + 2 + kNf4DqBlocks + j * kNf4Block / 2);
    }
  }
}

// The NF4DQ super-blocks' values by the block decoder `decode`, each block under its decoded absmax.
template <class T, void (*decode)(const uint8_t*, float, T*)>
void nf4dq_decode(const uint8_t* src, T* dst, int64_t n) {
  for (int64_t b = 0; b < n / kNf4DqBlock; ++b) {
    const uint8_t* in = src + b * kNf4DqBlockBytes;
    float am[kNf4DqBlocks];
    dq_absmaxes(in, am);
    for (int j = 0; j < kNf4DqBlocks; ++j)
      decode(in + 2 + kNf4DqBlocks + j * kNf4Block / 2, am[j], dst + b * kNf4DqBlock + j * kNf4Block);
  }
}

void nf4dq_dequantize(const uint8_t* src, float* dst, int64_t n) { nf4dq_decode<float, decode_nibbles>(src, dst, n); }

void nf4dq_dequantize_bf16(const uint8_t* src, uint16_t* dst, int64_t n) {
  nf4dq_decode<uint16_t, decode_nibbles_bf16>(src, dst, n);
}

}  // namespace moe
