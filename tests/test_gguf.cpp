// test_gguf.cpp — ggml block formats (core/quant), the GGUF container (io/gguf) and the model
// mapping (io/gguf_model), and llama.cpp itself as the reference.
//
// Part 1 (always runs): dequantisation of blocks built by hand from the format definitions,
// llama.cpp's documented Q8_0/Q4_0 rounding on chosen values, quantise/dequantise error bounds,
// container round trips, rejection of corrupt files, and HF dir -> GGUF -> tensors/logits.
// Part 2 (GgufLlamaCpp.*): tests/gguf/setup.sh installs node-llama-cpp (prebuilt libllama) and
// builds tests/gguf/llama_ref.cpp into <build>/gguf-ref (or $MOE_GGUF_REF); then llama.cpp's
// own dequantisers/quantisers, loader and forward pass are compared with ours, and files written
// by llama.cpp's quantizer are read back. Without node/npm/g++ the tests are SKIPPED, loudly;
// under CI=true a failed set-up is a failure.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <mutex>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <sys/stat.h>
#include <vector>

#include "fixture_util.h"
#include "core/dtype.h"
#include "core/error.h"
#include "core/quant.h"
#include "io/gguf.h"
#include "io/gguf_model.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/model.h"
#include "model/random_init.h"
#include "tokenizer/gguf_vocab.h"
#include "tokenizer/tokenizer.h"

namespace moe {
namespace {

using testutil::greedy;
using testutil::ids_tensor;
using testutil::logits_of;
using testutil::max_rel;

const std::string kFixtures = MOE_FIXTURES_DIR;
const char* const kFamilies[] = {"mixtral", "qwen2_moe", "qwen3_moe"};

std::string temp_dir() {
  char tmpl[] = "/tmp/moe_gguf_XXXXXX";
  char* d = mkdtemp(tmpl);
  EXPECT_NE(d, nullptr);
  return d ? d : "/tmp";
}

uint16_t h(float f) { return f32_to_f16(f); }

template <class B>
std::vector<float> dequant_block(GgmlType t, const B& b, int64_t n) {
  std::vector<float> out(static_cast<size_t>(n));
  dequantize_row(t, &b, out.data(), n);
  return out;
}

// ---- Part 1a: block formats ---------------------------------------------------------------

TEST(QuantFormat, TypeTableMatchesGgml) {
  EXPECT_EQ(ggml_row_bytes(GgmlType::Q8_0, 64), 68u);
  EXPECT_EQ(ggml_row_bytes(GgmlType::Q4_0, 32), 18u);
  EXPECT_EQ(ggml_row_bytes(GgmlType::Q4_K, 512), 288u);
  EXPECT_EQ(ggml_row_bytes(GgmlType::Q5_K, 256), 176u);
  EXPECT_EQ(ggml_row_bytes(GgmlType::Q6_K, 256), 210u);
  EXPECT_EQ(ggml_row_bytes(GgmlType::BF16, 3), 6u);
  EXPECT_THROW(ggml_row_bytes(GgmlType::Q4_K, 128), Error);
  GgmlType t;
  EXPECT_TRUE(ggml_type_from_name("Q4_K", &t));
  EXPECT_EQ(t, GgmlType::Q4_K);
  EXPECT_FALSE(ggml_type_from_name("q4_k_m", &t));
  GgmlTypeInfo info;
  EXPECT_FALSE(ggml_type_info(4u, &info));  // Q4_2: removed from ggml
  EXPECT_FALSE(ggml_type_info(999u, &info));
}

TEST(QuantFormat, Q8_0Dequant) {
  BlockQ8_0 b;
  b.d = h(0.5f);
  for (int j = 0; j < 32; ++j) b.qs[j] = static_cast<int8_t>(j * 8 - 128);  // -128 .. 120
  auto y = dequant_block(GgmlType::Q8_0, b, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], (j * 8 - 128) * 0.5f) << j;
}

TEST(QuantFormat, Q4_0Dequant) {
  BlockQ4_0 b;
  b.d = h(-0.25f);
  // byte j: value j in the low nibble, value j + 16 in the high nibble; x = d * (q - 8).
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  auto y = dequant_block(GgmlType::Q4_0, b, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], (j - 8) * -0.25f) << j;
    EXPECT_EQ(y[j + 16], (15 - j - 8) * -0.25f) << j;
  }
}

// Q4_1: x = d * q + m; Q5_0: x = d * (q - 16) and Q5_1: x = d * q + m with q's bit 4 of value j
// in bit j of qh (little-endian). Chosen values: exact in f32, so the expectations are exact.
TEST(QuantFormat, Q4_1Q5_0Q5_1Dequant) {
  BlockQ4_1 a;
  a.d = h(0.5f), a.m = h(-3.0f);
  for (int j = 0; j < 16; ++j) a.qs[j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  auto y = dequant_block(GgmlType::Q4_1, a, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], j * 0.5f - 3.0f) << j;
    EXPECT_EQ(y[j + 16], (15 - j) * 0.5f - 3.0f) << j;
  }
  // Fifth bits: set for values 1, 3, 5, ... (0xAAAAAAAA) and for value 16 (bit 16).
  const uint32_t qh = 0xAAAAAAAAu | (1u << 16);
  int q[32];
  for (int j = 0; j < 32; ++j) q[j] = (j < 16 ? j : 31 - j) | static_cast<int>(((qh >> j) & 1u) << 4);
  BlockQ5_0 b;
  b.d = h(-0.25f);
  std::memcpy(b.qh, &qh, 4);
  for (int j = 0; j < 16; ++j) b.qs[j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  y = dequant_block(GgmlType::Q5_0, b, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], (q[j] - 16) * -0.25f) << j;
  BlockQ5_1 c;
  c.d = h(0.125f), c.m = h(1.5f);
  std::memcpy(c.qh, &qh, 4);
  std::memcpy(c.qs, b.qs, 16);
  y = dequant_block(GgmlType::Q5_1, c, 32);
  for (int j = 0; j < 32; ++j) EXPECT_EQ(y[j], q[j] * 0.125f + 1.5f) << j;
  // Quantising the decoded values gives the blocks back (they sit on the grid exactly).
  BlockQ5_1 back;
  quantize_row(GgmlType::Q5_1, y.data(), &back, 32);
  y = dequant_block(GgmlType::Q5_1, back, 32);
  for (int j = 0; j < 32; ++j) EXPECT_NEAR(y[j], q[j] * 0.125f + 1.5f, 1e-6) << j;
}

// Q2_K and Q3_K by value index v = 128n + 32j + l (sub-block s = v / 16): q = bits 2j, 2j+1 of
// qs[32n + l]; Q2_K x = d·(sc_s & 15)·q − dmin·(sc_s >> 4); Q3_K x = d·(sc_s − 32)·(q − 4·!h) with
// h = bit 4n + j of hmask[l] and the 6-bit sc_s packed as low nibbles in bytes 0-7 (s < 8 low
// halves, s >= 8 high halves) and top bits in byte 8 + s % 4 at bit 2·(s / 4).
TEST(QuantFormat, Q2_KQ3_KDequant) {
  BlockQ2_K a;
  for (int s = 0; s < 16; ++s) a.scales[s] = static_cast<uint8_t>((s % 13 + 1) | ((15 - s) << 4));
  for (int i = 0; i < 64; ++i) a.qs[i] = static_cast<uint8_t>(i * 37 + 11);
  a.d = h(0.5f), a.dmin = h(0.25f);
  auto y = dequant_block(GgmlType::Q2_K, a, 256);
  for (int v = 0; v < 256; ++v) {
    const int n = v / 128, j = v % 128 / 32, l = v % 32, s = v / 16;
    const int q = (a.qs[32 * n + l] >> (2 * j)) & 3;
    EXPECT_EQ(y[v], 0.5f * (a.scales[s] & 15) * q - 0.25f * (a.scales[s] >> 4)) << v;
  }
  BlockQ3_K b;
  int sc[16];
  for (int s = 0; s < 16; ++s) sc[s] = (s * 23 + 5) % 64;
  std::memset(b.scales, 0, 12);
  for (int s = 0; s < 16; ++s) {
    b.scales[s % 8] |= static_cast<uint8_t>((sc[s] & 15) << (s < 8 ? 0 : 4));
    b.scales[8 + s % 4] |= static_cast<uint8_t>((sc[s] >> 4) << (2 * (s / 4)));
  }
  for (int i = 0; i < 64; ++i) b.qs[i] = static_cast<uint8_t>(i * 53 + 7);
  for (int i = 0; i < 32; ++i) b.hmask[i] = static_cast<uint8_t>(i * 71 + 3);
  b.d = h(-0.125f);
  int8_t got_sc[16];
  q3_k_scales(b.scales, got_sc);
  for (int s = 0; s < 16; ++s) EXPECT_EQ(got_sc[s], sc[s]) << s;
  y = dequant_block(GgmlType::Q3_K, b, 256);
  for (int v = 0; v < 256; ++v) {
    const int n = v / 128, j = v % 128 / 32, l = v % 32, s = v / 16;
    const int q = ((b.qs[32 * n + l] >> (2 * j)) & 3) - ((b.hmask[l] >> (4 * n + j)) & 1 ? 0 : 4);
    EXPECT_EQ(y[v], -0.125f * (sc[s] - 32) * q) << v;
  }
}

// IQ4_NL: x = d·level[q]; IQ4_XS: x = d·(ls_s − 32)·level[q], ls_s = low nibble s % 2 of
// scales_l[s / 2] | bits 2s, 2s+1 of scales_h << 4; the nibbles of each 32 as Q4_0's.
TEST(QuantFormat, Iq4Dequant) {
  const int levels[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
  BlockIQ4_NL a;
  a.d = h(0.5f);
  for (int j = 0; j < 16; ++j) a.qs[j] = static_cast<uint8_t>(j | ((15 - j) << 4));
  auto y = dequant_block(GgmlType::IQ4_NL, a, 32);
  for (int j = 0; j < 16; ++j) {
    EXPECT_EQ(y[j], 0.5f * levels[j]) << j;
    EXPECT_EQ(y[j + 16], 0.5f * levels[15 - j]) << j;
  }
  BlockIQ4_XS b;
  int ls[8];
  b.scales_h = 0;
  std::memset(b.scales_l, 0, 4);
  for (int s = 0; s < 8; ++s) {
    ls[s] = (s * 19 + 3) % 64;
    b.scales_l[s / 2] |= static_cast<uint8_t>((ls[s] & 15) << (4 * (s % 2)));
    b.scales_h |= static_cast<uint16_t>((ls[s] >> 4) << (2 * s));
  }
  for (int i = 0; i < 128; ++i) b.qs[i] = static_cast<uint8_t>(i * 29 + 5);
  b.d = h(0.25f);
  y = dequant_block(GgmlType::IQ4_XS, b, 256);
  for (int v = 0; v < 256; ++v) {
    const int s = v / 32, j = v % 32;
    const uint8_t byte = b.qs[16 * s + j % 16];
    const int q = j < 16 ? byte & 15 : byte >> 4;
    EXPECT_EQ(y[v], 0.25f * (ls[s] - 32) * levels[q]) << v;
  }
}

// 6-bit scales/mins of the 8 sub-blocks packed as ggml-common.h describes: bytes 0-3 = sc[0..3]
// | (sc[4..7] >> 4) << 6, bytes 4-7 = m[0..3] | (m[4..7] >> 4) << 6, bytes 8-11 =
// (sc[4..7] & 15) | (m[4..7] & 15) << 4.
void pack_k_scales(const int sc[8], const int m[8], uint8_t out[12]) {
  for (int j = 0; j < 4; ++j) {
    out[j] = static_cast<uint8_t>(sc[j] | ((sc[j + 4] >> 4) << 6));
    out[j + 4] = static_cast<uint8_t>(m[j] | ((m[j + 4] >> 4) << 6));
    out[j + 8] = static_cast<uint8_t>((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
  }
}

const int kSc[8] = {1, 2, 17, 63, 16, 33, 48, 63};
const int kMn[8] = {0, 5, 31, 63, 62, 1, 16, 47};

TEST(QuantFormat, Q4_KDequant) {
  BlockQ4_K b;
  const float d = 0.125f, dmin = 0.0625f;
  b.d = h(d);
  b.dmin = h(dmin);
  pack_k_scales(kSc, kMn, b.scales);
  // value i (0..255): chunk c = i / 64; within it, the first 32 values are the low nibbles of
  // qs[32c .. 32c+31], the next 32 the high nibbles; sub-block s = i / 32.
  int q[256];
  for (int i = 0; i < 256; ++i) q[i] = (i * 7 + 3) % 16;
  for (int c = 0; c < 4; ++c)
    for (int l = 0; l < 32; ++l) b.qs[32 * c + l] = static_cast<uint8_t>(q[64 * c + l] | (q[64 * c + 32 + l] << 4));
  auto y = dequant_block(GgmlType::Q4_K, b, 256);
  for (int i = 0; i < 256; ++i) {
    const int s = i / 32;
    EXPECT_EQ(y[i], (d * kSc[s]) * q[i] - dmin * kMn[s]) << i;
  }
}

TEST(QuantFormat, Q5_KDequant) {
  BlockQ5_K b;
  const float d = 0.25f, dmin = 0.5f;
  b.d = h(d);
  b.dmin = h(dmin);
  pack_k_scales(kSc, kMn, b.scales);
  // As Q4_K, plus bit 2c (first 32 of chunk c) or 2c+1 (second 32) of qh[l] as the 5th bit.
  int q[256];
  for (int i = 0; i < 256; ++i) q[i] = (i * 11 + 5) % 32;
  std::memset(b.qh, 0, sizeof b.qh);
  for (int c = 0; c < 4; ++c) {
    for (int l = 0; l < 32; ++l) {
      const int lo = q[64 * c + l], hi = q[64 * c + 32 + l];
      b.qs[32 * c + l] = static_cast<uint8_t>((lo & 15) | ((hi & 15) << 4));
      b.qh[l] |= static_cast<uint8_t>(((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1)));
    }
  }
  auto y = dequant_block(GgmlType::Q5_K, b, 256);
  for (int i = 0; i < 256; ++i) {
    const int s = i / 32;
    EXPECT_EQ(y[i], (d * kSc[s]) * q[i] - dmin * kMn[s]) << i;
  }
}

TEST(QuantFormat, Q6_KDequant) {
  BlockQ6_K b;
  const float d = 0.03125f;
  b.d = h(d);
  const int8_t sc[16] = {1, -1, 127, -128, 5, 17, -33, 64, 2, 3, -4, 100, -100, 7, 9, 11};
  std::memcpy(b.scales, sc, 16);
  // 128-value halves n: value n*128 + 32k + l (k = 0..3) has low 4 bits in ql[64n + l] (k = 0),
  // ql[64n + 32 + l] (k = 1), the high nibbles of those (k = 2, 3), and bits 2k..2k+1 of
  // qh[32n + l] as bits 4-5; x = d * sc[(index within half) / 16 + 8n] * (q - 32).
  int q[256];
  for (int i = 0; i < 256; ++i) q[i] = (i * 13 + 7) % 64;
  std::memset(b.ql, 0, sizeof b.ql);
  std::memset(b.qh, 0, sizeof b.qh);
  for (int n = 0; n < 2; ++n) {
    for (int k = 0; k < 4; ++k) {
      for (int l = 0; l < 32; ++l) {
        const int v = q[128 * n + 32 * k + l];
        uint8_t& lo = b.ql[64 * n + (k & 1) * 32 + l];
        lo = static_cast<uint8_t>(lo | ((v & 15) << (k >= 2 ? 4 : 0)));
        b.qh[32 * n + l] = static_cast<uint8_t>(b.qh[32 * n + l] | ((v >> 4) << (2 * k)));
      }
    }
  }
  auto y = dequant_block(GgmlType::Q6_K, b, 256);
  for (int i = 0; i < 256; ++i) {
    const int n = i / 128, s = (i % 128) / 16 + 8 * n;
    EXPECT_EQ(y[i], d * sc[s] * (q[i] - 32)) << i;
  }
}

TEST(QuantFormat, PlainTypes) {
  const uint16_t f16[4] = {0x3C00, 0xC000, 0x0001, 0x7BFF};  // 1, -2, 2^-24, 65504
  std::vector<float> y(4);
  dequantize_row(GgmlType::F16, f16, y.data(), 4);
  EXPECT_EQ(y, (std::vector<float>{1.0f, -2.0f, std::ldexp(1.0f, -24), 65504.0f}));
  const uint16_t bf[2] = {0x3F80, 0xC040};  // 1, -3
  dequantize_row(GgmlType::BF16, bf, y.data(), 2);
  EXPECT_EQ(y[0], 1.0f);
  EXPECT_EQ(y[1], -3.0f);
}

// llama.cpp's Q8_0 reference: d = amax / 127 and q = roundf(x / d), halves away from zero.
TEST(QuantFormat, Q8_0RoundsLikeLlamaCpp) {
  std::vector<float> x(32, 0.0f);
  x[0] = 127.0f;  // d = 1
  x[1] = 2.5f;    // -> 3 (roundf; round-to-even would give 2)
  x[2] = -2.5f;   // -> -3
  x[3] = 0.49f;   // -> 0
  x[4] = -126.5f; // -> -127
  BlockQ8_0 b;
  quantize_row(GgmlType::Q8_0, x.data(), &b, 32);
  EXPECT_EQ(b.d, 0x3C00);
  EXPECT_EQ(b.qs[0], 127);
  EXPECT_EQ(b.qs[1], 3);
  EXPECT_EQ(b.qs[2], -3);
  EXPECT_EQ(b.qs[3], 0);
  EXPECT_EQ(b.qs[4], -127);
  EXPECT_EQ(b.qs[5], 0);
}

// llama.cpp's Q4_0 reference: d = (value of largest magnitude) / -8, q = min(15, (int)(x/d + 8.5)).
TEST(QuantFormat, Q4_0RoundsLikeLlamaCpp) {
  std::vector<float> x(32, 0.0f);
  x[0] = -8.0f;  // largest magnitude, negative: d = 1, q = 0
  x[1] = 0.5f;   // 9.0 -> 9 (x/d + 8.5 truncated: halves round up)
  x[2] = -0.5f;  // 8.0 -> 8
  x[3] = 7.9f;   // 16.4 -> 16 -> clamped to 15
  x[4] = 3.49f;  // 11.99 -> 11
  x[17] = -1.0f; // high nibble of byte 1: 7.5 -> 7
  BlockQ4_0 b;
  quantize_row(GgmlType::Q4_0, x.data(), &b, 32);
  EXPECT_EQ(b.d, 0x3C00);
  EXPECT_EQ(b.qs[0] & 15, 0);
  EXPECT_EQ(b.qs[1] & 15, 9);
  EXPECT_EQ(b.qs[2] & 15, 8);
  EXPECT_EQ(b.qs[3] & 15, 15);
  EXPECT_EQ(b.qs[4] & 15, 11);
  EXPECT_EQ(b.qs[1] >> 4, 7);
  EXPECT_EQ(b.qs[5] & 15, 8);  // zeros -> 8
  // The positive extreme gets the sign flipped: max = +8 -> d = -1, q(8) = 0.
  std::vector<float> y(32, 1.0f);
  y[7] = 8.0f;
  quantize_row(GgmlType::Q4_0, y.data(), &b, 32);
  EXPECT_EQ(b.d, h(-1.0f));
  EXPECT_EQ(b.qs[7] & 15, 0);
  EXPECT_EQ(b.qs[0] & 15, 7);  // 1 / -1 + 8.5 = 7.5 -> 7
}

TEST(QuantFormat, AllZeroAndNonFinite) {
  std::vector<float> z(256, 0.0f), out(256, 1.0f);
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K}) {
    std::vector<uint8_t> buf(ggml_row_bytes(t, 256));
    quantize_row(t, z.data(), buf.data(), 256);
    dequantize_row(t, buf.data(), out.data(), 256);
    for (float v : out) EXPECT_EQ(v, 0.0f) << ggml_type_name(t);
    std::vector<float> bad = z;
    bad[100] = NAN;
    EXPECT_THROW(quantize_row(t, bad.data(), buf.data(), 256), Error) << ggml_type_name(t);
  }
}

// Quantise then dequantise random rows: the error of each value is bounded by the step of its
// (sub-)block, which we derive from the format (not from the quantiser's choices).
TEST(QuantFormat, RoundTripErrorBounds) {
  std::mt19937 rng(7);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t n = 1024;
  for (int dist = 0; dist < 3; ++dist) {
    std::vector<float> x(n);
    for (int64_t i = 0; i < n; ++i) {
      float v = nd(rng);
      if (dist == 1) v = std::fabs(v) + 0.5f;   // all positive (exercises the K-quant mins)
      if (dist == 2) v = v * v * v * 0.01f;     // heavy tails, tiny values
      x[i] = v;
    }
    struct Case { GgmlType t; int64_t block; double levels; };
    for (Case c : {Case{GgmlType::Q8_0, 32, 127}, Case{GgmlType::Q4_0, 32, 7}, Case{GgmlType::Q4_K, 32, 15},
                   Case{GgmlType::Q5_K, 32, 31}, Case{GgmlType::Q6_K, 16, 31}, Case{GgmlType::F16, 1, 0},
                   Case{GgmlType::BF16, 1, 0}}) {
      std::vector<uint8_t> buf(ggml_row_bytes(c.t, n));
      std::vector<float> y(n);
      quantize_row(c.t, x.data(), buf.data(), n);
      dequantize_row(c.t, buf.data(), y.data(), n);
      double sq = 0, sx = 0;
      auto range_of = [&](int64_t b0, int64_t len, double* lo, double* hi, double* amax) {
        *lo = 0, *hi = 0, *amax = 0;  // lo <= 0: the K-quant min only subtracts
        for (int64_t i = b0; i < b0 + len; ++i) {
          *lo = std::min<double>(*lo, x[i]);
          *hi = std::max<double>(*hi, x[i]);
          *amax = std::max<double>(*amax, std::fabs(x[i]));
        }
      };
      for (int64_t b0 = 0; b0 < n; b0 += c.block) {
        double lo, hi, amax;
        range_of(b0, c.block, &lo, &hi, &amax);
        // K-quants: the sub-block scales (and mins) are themselves quantised against the
        // super-block's largest one, 6 bits (Q4_K/Q5_K: error <= levels * max_scale / 126 per
        // value) or 8 bits (Q6_K: <= 32 * max_scale / 254).
        double sb_range = 0, sb_amax = 0;
        for (int64_t s0 = b0 / 256 * 256; s0 < b0 / 256 * 256 + 256; s0 += c.block) {
          double l2, h2, a2;
          range_of(s0, c.block, &l2, &h2, &a2);
          sb_range = std::max(sb_range, h2 - l2);
          sb_amax = std::max(sb_amax, a2);
        }
        for (int64_t i = b0; i < b0 + c.block; ++i) {
          double bound;
          if (c.levels == 0) {
            bound = std::fabs(x[i]) * (c.t == GgmlType::BF16 ? 1.0 / 256 : 1.0 / 2048) + 1e-7;
          } else if (c.t == GgmlType::Q4_K || c.t == GgmlType::Q5_K) {
            bound = (hi - lo) / c.levels + sb_range / 63.0 + 1e-6;
          } else if (c.t == GgmlType::Q6_K) {
            bound = amax / c.levels * 0.55 + sb_amax / 200.0 + 1e-6;
          } else {
            // Q8_0: step d = amax/127, error <= d/2 (+ the f16 rounding of d); Q4_0: step
            // amax/8, and the largest positive value may clamp, error <= one step.
            bound = c.t == GgmlType::Q4_0 ? amax / 8.0 * 1.01 + 1e-6 : amax / 127.0 * 0.5 * 1.01 + amax * 1e-3 + 1e-7;
          }
          EXPECT_LE(std::fabs(y[i] - x[i]), bound) << ggml_type_name(c.t) << " dist " << dist << " i " << i;
          sq += (y[i] - x[i]) * (y[i] - x[i]);
          sx += double(x[i]) * x[i];
        }
      }
      // Relative RMS error well below what the format's bits allow.
      const double rel = std::sqrt(sq / sx);
      const double limit = c.t == GgmlType::Q4_0 ? 0.2 : c.t == GgmlType::Q4_K ? 0.12 : c.t == GgmlType::Q5_K ? 0.06
                          : c.t == GgmlType::Q6_K ? 0.03 : 0.01;
      EXPECT_LT(rel, limit) << ggml_type_name(c.t) << " dist " << dist;
    }
  }
}

// ---- Part 1b: the container ---------------------------------------------------------------

std::vector<uint8_t> read_bytes(const std::string& p) {
  std::ifstream f(p, std::ios::binary);
  return std::vector<uint8_t>(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& p, const std::vector<uint8_t>& b) {
  std::ofstream f(p, std::ios::binary);
  f.write(reinterpret_cast<const char*>(b.data()), static_cast<std::streamsize>(b.size()));
}

// A small file with every metadata kind and three tensor types.
std::string write_sample(const std::string& dir, uint64_t alignment = 32) {
  GgufWriter w(alignment);
  w.set("general.architecture", GgufValue::str("test"));
  w.set("k.u8", [] { GgufValue v; v.type = GgufType::U8; v.u = 200; return v; }());
  w.set("k.i8", [] { GgufValue v; v.type = GgufType::I8; v.i = -100; return v; }());
  w.set("k.u16", [] { GgufValue v; v.type = GgufType::U16; v.u = 60000; return v; }());
  w.set("k.i16", [] { GgufValue v; v.type = GgufType::I16; v.i = -30000; return v; }());
  w.set("k.u32", GgufValue::u32(4000000000u));
  w.set("k.i32", GgufValue::i32(-2000000000));
  w.set("k.u64", GgufValue::u64(1ull << 40));
  w.set("k.i64", [] { GgufValue v; v.type = GgufType::I64; v.i = -(1ll << 40); return v; }());
  w.set("k.f32", GgufValue::f32(1.5f));
  w.set("k.f64", GgufValue::f64(0.1));
  w.set("k.bool", GgufValue::boolean(true));
  w.set("k.str", GgufValue::str("h\xC3\xA9llo"));
  w.set("k.arr", GgufValue::array(GgufType::STRING, {GgufValue::str("a"), GgufValue::str(""), GgufValue::str("ccc")}));
  w.set("k.arr_i32", GgufValue::array(GgufType::I32, {GgufValue::i32(-1), GgufValue::i32(2)}));
  std::vector<float> a(2 * 64);
  for (size_t i = 0; i < a.size(); ++i) a[i] = std::sin(static_cast<float>(i));
  w.add_tensor("a", GgmlType::F32, {64, 2}, [a](uint8_t* d) { std::memcpy(d, a.data(), a.size() * 4); });
  w.add_tensor("b", GgmlType::Q8_0, {64, 2}, [a](uint8_t* d) {
    quantize_row(GgmlType::Q8_0, a.data(), d, 64);
    quantize_row(GgmlType::Q8_0, a.data() + 64, d + 68, 64);
  });
  w.add_tensor("c", GgmlType::F16, {3}, [](uint8_t* d) {
    const uint16_t v[3] = {0x3C00, 0x4000, 0x4200};
    std::memcpy(d, v, 6);
  });
  const std::string p = dir + "/sample.gguf";
  w.write(p);
  return p;
}

TEST(GgufFile, WriteReadRoundTrip) {
  const std::string dir = temp_dir();
  const std::string p = write_sample(dir);
  auto f = GgufFile::open(p);
  EXPECT_EQ(f->header().version, 3u);
  EXPECT_EQ(f->header().data_start % 32, 0u);
  EXPECT_EQ(f->get_string("general.architecture"), "test");
  EXPECT_EQ(f->find("k.u8")->u, 200u);
  EXPECT_EQ(f->find("k.i8")->i, -100);
  EXPECT_EQ(f->find("k.u16")->u, 60000u);
  EXPECT_EQ(f->find("k.i16")->i, -30000);
  EXPECT_EQ(f->get_int("k.u32"), 4000000000ll);
  EXPECT_EQ(f->get_int("k.i32"), -2000000000ll);
  EXPECT_EQ(f->get_int("k.u64"), 1ll << 40);
  EXPECT_EQ(f->get_int("k.i64"), -(1ll << 40));
  EXPECT_EQ(f->get_float("k.f32", 0), 1.5);
  EXPECT_EQ(f->get_float("k.f64", 0), 0.1);
  EXPECT_TRUE(f->get_bool("k.bool", false));
  EXPECT_EQ(f->get_string("k.str"), "h\xC3\xA9llo");
  const GgufValue* arr = f->find("k.arr");
  ASSERT_TRUE(arr);
  EXPECT_EQ(arr->elem, GgufType::STRING);
  ASSERT_EQ(arr->arr.size(), 3u);
  EXPECT_EQ(arr->arr[2].s, "ccc");
  EXPECT_EQ(f->find("k.arr_i32")->arr[0].i, -1);
  EXPECT_THROW(f->get_string("k.u32"), Error);
  EXPECT_THROW(f->get_int("missing"), Error);
  ASSERT_EQ(f->tensors().size(), 3u);
  for (const GgufTensorInfo& t : f->tensors()) EXPECT_EQ(t.offset % 32, 0u) << t.name;
  Tensor a = f->dequantize("a");
  EXPECT_EQ(a.shape(), (Shape{2, 64}));
  for (int i = 0; i < 128; ++i) EXPECT_EQ(a.data<float>()[i], std::sin(static_cast<float>(i)));
  Tensor b = f->dequantize("b");
  for (int i = 0; i < 128; ++i) EXPECT_NEAR(b.data<float>()[i], std::sin(static_cast<float>(i)), 1.0 / 127);
  Tensor c = f->dequantize("c");
  EXPECT_EQ(c.shape(), (Shape{3}));
  EXPECT_EQ(c.data<float>()[2], 3.0f);
  std::filesystem::remove_all(dir);
}

TEST(GgufFile, CustomAlignment) {
  const std::string dir = temp_dir();
  const std::string p = write_sample(dir, 64);
  auto f = GgufFile::open(p);
  EXPECT_EQ(f->header().alignment, 64u);
  EXPECT_EQ(f->header().data_start % 64, 0u);
  for (const GgufTensorInfo& t : f->tensors()) EXPECT_EQ(t.offset % 64, 0u);
  std::filesystem::remove_all(dir);
}

// Expects parse_gguf to throw a moe::Error whose message contains `needle`.
void expect_reject(const std::vector<uint8_t>& bytes, const std::string& needle) {
  try {
    parse_gguf(bytes.data(), bytes.size(), "bad.gguf");
    ADD_FAILURE() << "accepted; expected an error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("bad.gguf"), std::string::npos) << e.what();
  }
}

// Offset of the first occurrence of `s` in the bytes.
size_t find_bytes(const std::vector<uint8_t>& b, const std::string& s) {
  auto it = std::search(b.begin(), b.end(), s.begin(), s.end());
  EXPECT_NE(it, b.end()) << s;
  return static_cast<size_t>(it - b.begin());
}

template <class T>
void poke(std::vector<uint8_t>& b, size_t at, T v) {
  std::memcpy(b.data() + at, &v, sizeof v);
}

TEST(GgufFile, RejectsCorruptFiles) {
  const std::string dir = temp_dir();
  const std::vector<uint8_t> good = read_bytes(write_sample(dir));
  EXPECT_NO_THROW(parse_gguf(good.data(), good.size(), "good.gguf"));

  // Every truncation before the end of the last tensor's bytes is an error, never a crash or an
  // out-of-bounds read (ASan checks that); the trailing alignment padding may go.
  const GgufHeader gh = parse_gguf(good.data(), good.size(), "good.gguf");
  size_t end = gh.data_start;
  for (const GgufTensorInfo& t : gh.tensors) end = std::max<size_t>(end, gh.data_start + t.offset + t.nbytes);
  EXPECT_NO_THROW(parse_gguf(good.data(), end, "good.gguf"));
  for (size_t n = 0; n < end; ++n) {
    std::vector<uint8_t> t(good.begin(), good.begin() + static_cast<std::ptrdiff_t>(n));
    EXPECT_THROW(parse_gguf(t.data(), t.size(), "trunc.gguf"), Error) << n;
  }

  auto b = good;
  b[0] = 'X';
  expect_reject(b, "bad magic");
  b = good;
  poke<uint32_t>(b, 4, 7);
  expect_reject(b, "version 7");
  b = good;
  poke<uint64_t>(b, 8, uint64_t(1) << 40);
  expect_reject(b, "tensor count");
  b = good;
  poke<uint64_t>(b, 16, uint64_t(1) << 40);
  expect_reject(b, "metadata count");

  // Key string length past the end of the file (the first key's length is at 24).
  b = good;
  poke<uint64_t>(b, 24, uint64_t(1) << 27);
  expect_reject(b, "truncated");
  // A string value's length past the end ("k.str" value length follows key + type).
  b = good;
  {
    const size_t at = find_bytes(b, "k.str") + 5 + 4;
    poke<uint64_t>(b, at, 1ull << 26);
    expect_reject(b, "k.str");
  }
  // Unknown value type, nested array, array count past EOF, bad bool.
  b = good;
  poke<uint32_t>(b, find_bytes(b, "k.u32") + 5, 13);
  expect_reject(b, "unknown value type 13");
  b = good;
  poke<uint32_t>(b, find_bytes(b, "k.arr_i32") + 9 + 4, 9);
  expect_reject(b, "nested arrays");
  b = good;
  poke<uint64_t>(b, find_bytes(b, "k.arr_i32") + 9 + 8, 1ull << 50);
  expect_reject(b, "runs past the end");
  b = good;
  b[find_bytes(b, "k.bool") + 6 + 4] = 2;
  expect_reject(b, "bool value is 2");
  // Duplicate key: rename k.i8 to k.u8.
  b = good;
  b[find_bytes(b, "k.i8") + 2] = 'u';
  expect_reject(b, "appears twice");

  // Tensor infos: name "b" (len 1) follows its u64 length; then n_dims, ne[], type, offset.
  const size_t tb = find_bytes(good, std::string("\x01\0\0\0\0\0\0\0b", 9)) + 9;
  b = good;
  poke<uint32_t>(b, tb, 5);
  expect_reject(b, "5 dimensions");
  b = good;
  poke<int64_t>(b, tb + 4, -64);
  expect_reject(b, "negative");
  b = good;
  poke<int64_t>(b, tb + 4, 48);  // Q8_0 rows must be a multiple of 32
  expect_reject(b, "not a multiple of q8_0's block");
  b = good;
  poke<uint32_t>(b, tb + 4 + 16, 4);  // removed Q4_2
  expect_reject(b, "unknown ggml type 4");
  b = good;
  poke<uint64_t>(b, tb + 4 + 16 + 4, 520);  // misaligned
  expect_reject(b, "not a multiple of the alignment");
  b = good;
  poke<uint64_t>(b, tb + 4 + 16 + 4, 0);  // on top of tensor "a"
  expect_reject(b, "overlap");
  b = good;
  poke<uint64_t>(b, tb + 4 + 16 + 4, 1u << 20);
  expect_reject(b, "exceed the data section");
  b = good;
  poke<int64_t>(b, tb + 4 + 8, int64_t(1) << 40);  // rows: byte size beyond the file
  expect_reject(b, "exceed");
  std::filesystem::remove_all(dir);
}

TEST(GgufFile, OpenErrorsNameTheFile) {
  const std::string dir = temp_dir();
  try {
    GgufFile::open(dir + "/nope.gguf");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("nope.gguf"), std::string::npos);
  }
  write_bytes(dir + "/empty.gguf", {});
  EXPECT_THROW(GgufFile::open(dir + "/empty.gguf"), Error);
  // A type the engine cannot dequantise is readable as a container but refused by name.
  GgufWriter w;
  w.add_tensor("x", GgmlType::IQ2_XXS, {256}, [](uint8_t* d) { std::memset(d, 0, 66); });
  w.write(dir + "/iq2.gguf");
  auto f = GgufFile::open(dir + "/iq2.gguf");
  try {
    f->dequantize("x");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("iq2_xxs"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("'x'"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

// ---- Part 1c: the model mapping -----------------------------------------------------------

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

Model model_from_gguf(const std::string& path) {
  GgufModel g = load_gguf_model(path);
  return Model::from_tensors(g.config, g.tensors);
}

class GgufModelIo : public ::testing::TestWithParam<std::string> {};

// HF dir -> f32 GGUF -> tensors: bit-identical (the q/k permutation undone exactly), the same
// config, and the same logits as the model loaded from the directory.
TEST_P(GgufModelIo, F32RoundTripIsExact) {
  const std::string src = kFixtures + "/" + GetParam();
  const std::string dir = temp_dir();
  GgufWriteOptions opt;
  opt.type = GgufFileType::F32;
  write_gguf(src, dir + "/m.gguf", opt);
  GgufModel g = load_gguf_model(dir + "/m.gguf");
  ModelConfig want = load_hf_config(src + "/config.json");
  ModelConfig got = g.config;
  got.router_aux_loss_coef = want.router_aux_loss_coef;  // training-only; GGUF has no key for it
  EXPECT_TRUE(got == want) << hf_config_to_json(got) << "\nvs\n" << hf_config_to_json(want);
  Checkpoint ck = Checkpoint::open_dir(src);
  EXPECT_EQ(g.tensors.size(), ck.names().size());
  for (auto& [name, t] : g.tensors) {
    ASSERT_TRUE(ck.has(name)) << name;
    EXPECT_TRUE(same_bytes(t, ck.get(name).to_dtype(DType::F32))) << name;
  }
  const std::vector<int32_t> ids = {1, 5, 9, 200, 3, 77};
  Model a = Model::load(src);
  Model b = Model::from_tensors(g.config, g.tensors);
  EXPECT_EQ(logits_of(a, ids), logits_of(b, ids));
  std::filesystem::remove_all(dir);
}

// Q8_0 and Q4_0 files hold exactly the blocks quantize_row makes of each HF row (the llama q/k
// permutation moves whole rows, so it commutes with the row-wise quantisation).
TEST_P(GgufModelIo, QuantizedTensorsAreRowwiseBlocks) {
  const std::string src = kFixtures + "/" + GetParam();
  const std::string dir = temp_dir();
  Checkpoint ck = Checkpoint::open_dir(src);
  for (GgufFileType ft : {GgufFileType::Q8_0, GgufFileType::Q4_0}) {
    GgufWriteOptions opt;
    opt.type = ft;
    write_gguf(src, dir + "/m.gguf", opt);
    auto f = GgufFile::open(dir + "/m.gguf");
    GgufModel g = load_gguf_model(dir + "/m.gguf");
    int quantized = 0;
    for (const GgufTensorInfo& t : f->tensors()) quantized += t.type == GgmlType::Q8_0 || t.type == GgmlType::Q4_0;
    EXPECT_GT(quantized, 5);
    for (auto& [name, t] : g.tensors) {
      Tensor hf = ck.get(name).to_dtype(DType::F32);
      std::vector<float> x = hf.to_f32_vector();
      const bool is_1d = hf.ndim() == 1 || name.find("shared_expert_gate") != std::string::npos;
      const bool router = name.find(".gate.weight") != std::string::npos && name.find("experts") == std::string::npos;
      if (is_1d || router) {
        EXPECT_TRUE(same_bytes(t, hf)) << name;  // kept f32
        continue;
      }
      const int64_t row = hf.dim(-1);
      // lm_head of a q4_0 file is q6_K, or q8_0 when rows are not multiples of 256.
      GgmlType want = ft == GgufFileType::Q8_0 ? GgmlType::Q8_0 : GgmlType::Q4_0;
      if (name == "lm_head.weight" && ft == GgufFileType::Q4_0) want = row % 256 ? GgmlType::Q8_0 : GgmlType::Q6_K;
      std::vector<uint8_t> buf(ggml_row_bytes(want, row));
      std::vector<float> y(static_cast<size_t>(row));
      const float* got = t.data<float>();
      bool same = true;
      for (int64_t r = 0; r < hf.numel() / row && same; ++r) {
        quantize_row(want, x.data() + r * row, buf.data(), row);
        dequantize_row(want, buf.data(), y.data(), row);
        same = std::memcmp(y.data(), got + r * row, static_cast<size_t>(row) * 4) == 0;
      }
      EXPECT_TRUE(same) << name << " " << gguf_file_type_name(ft);
    }
  }
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Families, GgufModelIo, ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe"));

// A random model whose widths are multiples of 256, so every K-quant type is really used.
std::string make_k_model(const std::string& root, const std::string& arch) {
  ModelConfig c = preset_config(arch, "tiny");
  c.hidden_size = 256;
  c.intermediate_size = 256;
  c.moe_intermediate_size = 256;
  if (c.shared_expert_intermediate_size) c.shared_expert_intermediate_size = 512;
  c.head_dim = 256 / c.n_head;
  c.vocab_size = 512;
  c.n_layer = 2;
  auto w = random_weights(c, 3, DType::F32);
  // Make the logits decisive: random init gives near-uniform ones, where greedy ties flip.
  for (auto& [name, t] : w)
    if (name == "lm_head.weight" || name == "model.embed_tokens.weight")
      for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] *= 40.0f;
  const std::string d = root + "/" + arch + "-k";
  write_model_dir(d, c, w);
  return d;
}

TEST(GgufModel, KQuantMixesAndBounds) {
  const std::string dir = temp_dir();
  const std::string src = make_k_model(dir, "qwen2_moe");
  Checkpoint ck = Checkpoint::open_dir(src);
  for (GgufFileType ft : {GgufFileType::Q4_K_M, GgufFileType::Q5_K_M, GgufFileType::Q6_K}) {
    GgufWriteOptions opt;
    opt.type = ft;
    write_gguf(src, dir + "/k.gguf", opt);
    auto f = GgufFile::open(dir + "/k.gguf");
    std::map<GgmlType, int> count;
    for (const GgufTensorInfo& t : f->tensors()) count[t.type]++;
    EXPECT_EQ(f->find_tensor("output.weight")->type, GgmlType::Q6_K);
    if (ft == GgufFileType::Q4_K_M) {
      EXPECT_GT(count[GgmlType::Q4_K], 5);
    }
    if (ft == GgufFileType::Q5_K_M) {
      EXPECT_GT(count[GgmlType::Q5_K], 5);
    }
    GgufModel g = load_gguf_model(dir + "/k.gguf");
    double sq = 0, sx = 0;
    for (auto& [name, t] : g.tensors) {
      std::vector<float> x = ck.get(name).to_f32_vector(), y = t.to_f32_vector();
      for (size_t i = 0; i < x.size(); ++i) {
        sq += (x[i] - y[i]) * double(x[i] - y[i]);
        sx += double(x[i]) * x[i];
      }
    }
    const double rel = std::sqrt(sq / sx);
    EXPECT_LT(rel, ft == GgufFileType::Q4_K_M ? 0.1 : ft == GgufFileType::Q5_K_M ? 0.05 : 0.025)
        << gguf_file_type_name(ft);
    std::printf("[ info ] %s: relative RMS weight error %.4f\n", gguf_file_type_name(ft), rel);
  }
  std::filesystem::remove_all(dir);
}

TEST(GgufModel, WriterErrors) {
  const std::string dir = temp_dir();
  EXPECT_THROW(write_gguf(dir + "/missing", dir + "/x.gguf"), Error);
  // A failed write leaves nothing behind.
  EXPECT_FALSE(std::filesystem::exists(dir + "/x.gguf"));
  GgufFileType t;
  EXPECT_TRUE(gguf_file_type_from_name("Q4_K_M", &t));
  EXPECT_EQ(t, GgufFileType::Q4_K_M);
  EXPECT_FALSE(gguf_file_type_from_name("q3_k", &t));
  std::filesystem::remove_all(dir);
}

// Our stacked file rewritten in the per-expert layout of the Mixtral GGUF files llama.cpp's
// converter wrote before ffn_*_exps (blk.N.ffn_gate.E.weight, one 2-D matrix per expert);
// `drop` leaves one tensor out and `twice` adds a stacked duplicate (error cases).
void write_per_expert(const std::string& in, const std::string& out, const std::string& drop = "",
                      bool twice = false) {
  auto f = GgufFile::open(in);
  GgufWriter wr(f->header().alignment);
  for (const auto& [k, v] : f->header().kv) wr.set(k, v);
  for (const GgufTensorInfo& t : f->tensors()) {
    const size_t at = t.name.find("_exps.");
    const uint8_t* src = f->data(t);
    if (at == std::string::npos || twice) {
      wr.add_tensor(t.name, t.type, t.ne, [src, n = t.nbytes](uint8_t* d) { std::memcpy(d, src, n); });
      if (at == std::string::npos) continue;
    }
    const std::string base = t.name.substr(0, at);  // blk.N.ffn_gate
    const uint64_t per = t.nbytes / static_cast<uint64_t>(t.ne[2]);
    for (int64_t e = 0; e < t.ne[2]; ++e) {
      const std::string name = base + "." + std::to_string(e) + ".weight";
      if (name == drop) continue;
      wr.add_tensor(name, t.type, {t.ne[0], t.ne[1]}, [src, per, e](uint8_t* d) { std::memcpy(d, src + e * per, per); });
    }
  }
  wr.write(out);
}

TEST(GgufModel, ReadsPerExpertMixtralLayout) {
  const std::string dir = temp_dir();
  const std::string src = kFixtures + "/mixtral";
  const std::vector<int32_t> ids = {1, 5, 9, 200, 3, 77};
  for (GgufFileType ft : {GgufFileType::F32, GgufFileType::Q8_0}) {
    GgufWriteOptions opt;
    opt.type = ft;
    write_gguf(src, dir + "/stacked.gguf", opt);
    write_per_expert(dir + "/stacked.gguf", dir + "/split.gguf");
    GgufModel a = load_gguf_model(dir + "/stacked.gguf"), b = load_gguf_model(dir + "/split.gguf");
    ASSERT_EQ(a.tensors.size(), b.tensors.size());
    std::map<std::string, Tensor> bt(b.tensors.begin(), b.tensors.end());
    for (auto& [name, t] : a.tensors) {
      ASSERT_TRUE(bt.count(name)) << name;
      EXPECT_TRUE(same_bytes(t, bt[name])) << name;
    }
    EXPECT_EQ(logits_of(Model::from_tensors(a.config, a.tensors), ids), logits_of(Model::from_tensors(b.config, b.tensors), ids));
  }
  // A missing expert matrix, an expert index past expert_count, or both layouts at once: errors
  // that name the tensor.
  write_per_expert(dir + "/stacked.gguf", dir + "/missing.gguf", "blk.1.ffn_up.3.weight");
  EXPECT_THROW(Model::from_tensors(load_gguf_model(dir + "/missing.gguf").config, load_gguf_model(dir + "/missing.gguf").tensors), Error);
  write_per_expert(dir + "/stacked.gguf", dir + "/both.gguf", "", true);
  try {
    load_gguf_model(dir + "/both.gguf");
    ADD_FAILURE() << "stacked and per-expert tensors of one layer were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("given twice"), std::string::npos) << e.what();
  }
  {
    auto f = GgufFile::open(dir + "/stacked.gguf");
    GgufWriter wr(f->header().alignment);
    for (const auto& [k, v] : f->header().kv) wr.set(k, v);
    for (const GgufTensorInfo& t : f->tensors()) {
      if (t.name.find("_exps.") != std::string::npos) continue;
      const uint8_t* p = f->data(t);
      wr.add_tensor(t.name, t.type, t.ne, [p, n = t.nbytes](uint8_t* d) { std::memcpy(d, p, n); });
    }
    const int64_t cols = 64;
    wr.add_tensor("blk.0.ffn_gate.99.weight", GgmlType::F32, {cols, 2}, [](uint8_t* d) { std::memset(d, 0, 2 * 64 * 4); });
    wr.write(dir + "/far.gguf");
    try {
      load_gguf_model(dir + "/far.gguf");
      ADD_FAILURE() << "expert 99 of 8 was accepted";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("blk.0.ffn_gate.99.weight"), std::string::npos) << e.what();
    }
  }
  std::filesystem::remove_all(dir);
}

TEST(GgufModel, ReaderRejectsForeignArchitectures) {
  const std::string dir = temp_dir();
  GgufWriter w;
  w.set("general.architecture", GgufValue::str("gpt2"));
  w.write(dir + "/g.gguf");
  try {
    load_gguf_model(dir + "/g.gguf");
    ADD_FAILURE();
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("'gpt2' is not supported"), std::string::npos) << e.what();
  }
  // A llama file without experts is a dense model.
  GgufWriter w2;
  w2.set("general.architecture", GgufValue::str("llama"));
  w2.set("llama.block_count", GgufValue::u32(1));
  w2.set("llama.embedding_length", GgufValue::u32(64));
  w2.set("llama.attention.head_count", GgufValue::u32(4));
  w2.write(dir + "/d.gguf");
  EXPECT_THROW(load_gguf_model(dir + "/d.gguf"), Error);
  std::filesystem::remove_all(dir);
}

// ---- Part 2: llama.cpp as the reference ---------------------------------------------------

std::string source_dir() {
  std::string f = __FILE__;
  return f.substr(0, f.rfind('/'));
}

struct Ref {
  std::string bin, libdir;
};

const Ref* reference(std::string* why) {
  static std::once_flag once;
  static Ref ref;
  static std::string reason;
  static bool ok = false;
  std::call_once(once, [] {
    const char* env = std::getenv("MOE_GGUF_REF");
    const std::string d = env && *env ? env : std::string(MOE_BINARY_DIR) + "/gguf-ref";
    const std::string cmd = "bash '" + source_dir() + "/gguf/setup.sh' '" + d + "' 1>&2";
    const int rc = std::system(cmd.c_str());
    std::ifstream envf(d + "/env");
    std::string line;
    while (std::getline(envf, line)) {
      if (line.rfind("LLAMA_REF=", 0) == 0) ref.bin = line.substr(10);
      if (line.rfind("LLAMA_REF_LIBDIR=", 0) == 0) ref.libdir = line.substr(17);
    }
    if (rc != 0 || ref.bin.empty()) {
      reason = "llama.cpp reference unavailable (" + cmd + " exited " + std::to_string(rc) +
               "): npm registry, node, git or g++ unreachable";
      return;
    }
    ok = true;
  });
  *why = reason;
  return ok ? &ref : nullptr;
}

#define REQUIRE_LLAMA(ref)                                                                    \
  std::string why_;                                                                           \
  const Ref* ref = reference(&why_);                                                          \
  if (!ref) {                                                                                 \
    const char* ci = std::getenv("CI");                                                       \
    if (ci && std::string(ci) == "true") FAIL() << "CI=true but " << why_;                    \
    std::fprintf(stderr, "\n*** SKIPPED: %s ***\n\n", why_.c_str());                          \
    GTEST_SKIP() << "SKIPPED: " << why_;                                                      \
  }

// Runs llama_ref with `args`; returns stdout, sets *rc.
std::string run_ref(const Ref& r, const std::string& args, int* rc) {
  const std::string cmd = "LLAMA_REF_LIBDIR='" + r.libdir + "' '" + r.bin + "' " + args;
  FILE* p = popen(cmd.c_str(), "r");
  std::string out;
  if (!p) {
    *rc = -1;
    return out;
  }
  char buf[4096];
  size_t n;
  while ((n = fread(buf, 1, sizeof buf, p)) > 0) out.append(buf, n);
  *rc = pclose(p);
  return out;
}

std::string ids_arg(const std::vector<int32_t>& ids) {
  std::string s;
  for (int32_t i : ids) {
    if (!s.empty()) s += ',';
    s += std::to_string(i);
  }
  return s;
}

struct RefResult {
  std::vector<int32_t> tokens;  // greedy continuation
  std::vector<float> logits;    // [S, V] of the prompt
};

// llama.cpp on several files in one process (its backend start-up costs ~1 s per process).
std::vector<RefResult> ref_run(const Ref& r, const std::vector<std::string>& files, const std::vector<int32_t>& prompt,
                               int n, const std::string& tmpdir) {
  std::string args = "run " + std::to_string(n) + " " + ids_arg(prompt) + " '" + tmpdir + "'";
  for (const std::string& f : files) args += " '" + f + "'";
  int rc = 0;
  const std::string out = run_ref(r, args, &rc);
  EXPECT_EQ(rc, 0) << "llama.cpp failed on " << args;
  std::vector<RefResult> res(files.size());
  std::istringstream in(out);
  std::string line;
  while (std::getline(in, line)) {
    const size_t colon = line.find(':');
    if (colon == std::string::npos) continue;
    const size_t i = static_cast<size_t>(std::stoul(line.substr(0, colon)));
    if (i >= res.size()) continue;
    std::istringstream toks(line.substr(colon + 1));
    int32_t v;
    while (toks >> v) res[i].tokens.push_back(v);
    std::vector<uint8_t> b = read_bytes(tmpdir + "/" + std::to_string(i) + ".f32");
    res[i].logits.resize(b.size() / 4);
    std::memcpy(res[i].logits.data(), b.data(), res[i].logits.size() * 4);
  }
  return res;
}

// Random blocks with finite scales: our dequantisation equals ggml's, bit for bit.
TEST(GgufLlamaCpp, DequantizeBitExact) {
  REQUIRE_LLAMA(ref);
  const std::string dir = temp_dir();
  std::mt19937 rng(11);
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1, GgmlType::Q2_K,
                     GgmlType::Q3_K, GgmlType::Q4_K, GgmlType::Q5_K, GgmlType::Q6_K, GgmlType::IQ4_NL,
                     GgmlType::IQ4_XS, GgmlType::F16, GgmlType::BF16}) {
    const int64_t n = 256 * 64;
    std::vector<uint8_t> bytes(ggml_row_bytes(t, n));
    for (uint8_t& x : bytes) x = static_cast<uint8_t>(rng());
    // Replace the f16 scales (and f16/bf16 values) by finite ones: NaN payloads are not part of
    // the comparison.
    auto finite_h = [&](size_t at) {
      const uint16_t v = h(std::ldexp(static_cast<float>(rng() % 2000) - 1000.0f, -(int)(rng() % 20)));
      std::memcpy(bytes.data() + at, &v, 2);
    };
    const GgmlTypeInfo& ti = ggml_type_info(t);
    for (size_t b = 0; b < bytes.size() / ti.block_bytes; ++b) {
      const size_t base = b * ti.block_bytes;
      switch (t) {
        case GgmlType::Q8_0: case GgmlType::Q4_0: finite_h(base); break;
        case GgmlType::Q4_K: case GgmlType::Q5_K: case GgmlType::Q4_1: case GgmlType::Q5_1:
          finite_h(base);
          finite_h(base + 2);
          break;
        case GgmlType::Q6_K: finite_h(base + 208); break;
        case GgmlType::Q3_K: finite_h(base + 108); break;
        case GgmlType::Q2_K: finite_h(base + 80); finite_h(base + 82); break;
        default: finite_h(base); break;
      }
    }
    if (t == GgmlType::BF16) {  // bf16 from finite floats
      for (size_t i = 0; i < bytes.size(); i += 2) {
        const uint16_t v = f32_to_bf16(static_cast<float>(static_cast<int>(rng() % 20001) - 10000) / 77.0f);
        std::memcpy(bytes.data() + i, &v, 2);
      }
    }
    write_bytes(dir + "/in.bin", bytes);
    int rc = 0;
    run_ref(*ref, "dequant " + std::to_string(static_cast<unsigned>(t)) + " '" + dir + "/in.bin' '" + dir +
                      "/out.f32' " + std::to_string(n),
            &rc);
    ASSERT_EQ(rc, 0);
    std::vector<uint8_t> theirs = read_bytes(dir + "/out.f32");
    std::vector<float> ours(static_cast<size_t>(n));
    dequantize_row(t, bytes.data(), ours.data(), n);
    ASSERT_EQ(theirs.size(), ours.size() * 4);
    EXPECT_EQ(std::memcmp(theirs.data(), ours.data(), theirs.size()), 0) << ggml_type_name(t);
  }
  std::filesystem::remove_all(dir);
}

// Our quantisation of the 32-value types equals ggml_quantize_chunk's, byte for byte, including
// values on rounding boundaries.
TEST(GgufLlamaCpp, QuantizeBlock32TypesBitExact) {
  REQUIRE_LLAMA(ref);
  const std::string dir = temp_dir();
  std::mt19937 rng(5);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  const int64_t row = 256, rows = 64;
  std::vector<float> x(static_cast<size_t>(row * rows));
  for (size_t i = 0; i < x.size(); ++i) {
    const size_t r = i / row;
    if (r % 4 == 0) x[i] = nd(rng);
    if (r % 4 == 1) x[i] = static_cast<float>(static_cast<int>(rng() % 17) - 8) * 0.5f;  // exact halves
    if (r % 4 == 2) x[i] = nd(rng) * 1e-3f;
    if (r % 4 == 3) x[i] = (i % 32 == 0) ? 127.0f : static_cast<float>(static_cast<int>(rng() % 255) - 127) + 0.5f;
  }
  std::vector<uint8_t> xb(x.size() * 4);
  std::memcpy(xb.data(), x.data(), xb.size());
  write_bytes(dir + "/x.f32", xb);
  for (GgmlType t : {GgmlType::Q8_0, GgmlType::Q4_0, GgmlType::Q4_1, GgmlType::Q5_0, GgmlType::Q5_1}) {
    int rc = 0;
    run_ref(*ref, "quant " + std::to_string(static_cast<unsigned>(t)) + " '" + dir + "/x.f32' '" + dir + "/q.bin' " +
                      std::to_string(row),
            &rc);
    ASSERT_EQ(rc, 0);
    std::vector<uint8_t> theirs = read_bytes(dir + "/q.bin");
    std::vector<uint8_t> ours(ggml_row_bytes(t, row) * rows);
    for (int64_t r = 0; r < rows; ++r)
      quantize_row(t, x.data() + r * row, ours.data() + r * ggml_row_bytes(t, row), row);
    ASSERT_EQ(theirs.size(), ours.size());
    EXPECT_TRUE(theirs == ours) << ggml_type_name(t);
  }
  std::filesystem::remove_all(dir);
}

// Files of each type we write load in llama.cpp, and its greedy tokens equal ours on the same
// file; for f32 its logits equal ours within 1e-4 relative. (Every type on every family would
// cost ~1 s of llama.cpp start-up per file; the fixture shapes (D = 64) take the block-32 types,
// the 256-wide models the K-quants.)
void check_llama_loads_ours(const Ref& ref, const std::string& src, const std::string& dir,
                            const std::vector<GgufFileType>& types) {
  const std::vector<int32_t> prompt = {1, 2, 3, 4, 5};
  std::vector<std::string> files;
  for (GgufFileType ft : types) {
    files.push_back(dir + "/m-" + gguf_file_type_name(ft) + ".gguf");
    GgufWriteOptions opt;
    opt.type = ft;
    write_gguf(src, files.back(), opt);
  }
  const std::vector<RefResult> theirs = ref_run(ref, files, prompt, 8, dir);
  for (size_t i = 0; i < types.size(); ++i) {
    const char* tn = gguf_file_type_name(types[i]);
    Model m = model_from_gguf(files[i]);
    EXPECT_EQ(greedy(m, prompt, 8), theirs[i].tokens) << src << " " << tn;
    const std::vector<float> exact = logits_of(m, prompt);
    const double rel = max_rel(theirs[i].logits, exact);
    std::printf("[ info ] %s %s: llama.cpp vs ours, max relative logit difference %.2e\n", src.c_str(), tn, rel);
    // f32: the same arithmetic up to summation order. Quantised: llama.cpp also rounds the
    // activations (to int8 for q8_0/q4_0 dot products, q8_K for the K-quants); we do not.
    EXPECT_LT(rel, types[i] == GgufFileType::F32 ? 1e-4 : 5e-2) << src << " " << tn;
    // Our fast path (the file's blocks kept, activations rounded to int8 as llama.cpp does: what
    // generate / serve / `moe logits --fast` run) is at most twice as far from the exact logits
    // as llama.cpp is.
    GgufLoadOptions keep;
    keep.keep_quantized = true;
    GgufModel gq = load_gguf_model(files[i], keep);
    if (!dtype_is_quant(Model::from_tensors(gq.config, gq.tensors).weights().layers[0].w1.dtype())) continue;
    const double fast = max_rel(logits_of(Model::from_tensors(gq.config, gq.tensors), prompt), exact);
    std::printf("[ info ] %s %s: vs the exact logits: ours fast %.2e, llama.cpp %.2e\n", src.c_str(), tn, fast, rel);
    EXPECT_LE(fast, 2 * rel) << src << " " << tn;
  }
}

TEST(GgufLlamaCpp, LoadsOurFilesFixtures) {
  REQUIRE_LLAMA(ref);
  for (const char* fam : kFamilies) {
    const std::string dir = temp_dir();
    check_llama_loads_ours(*ref, kFixtures + "/" + fam, dir,
                           {GgufFileType::F32, GgufFileType::BF16, GgufFileType::Q8_0, GgufFileType::Q4_0});
    std::filesystem::remove_all(dir);
  }
}

TEST(GgufLlamaCpp, LoadsOurFilesKQuants) {
  REQUIRE_LLAMA(ref);
  for (const char* fam : kFamilies) {
    const std::string dir = temp_dir();
    check_llama_loads_ours(*ref, make_k_model(dir, fam), dir,
                           {GgufFileType::F16, GgufFileType::Q4_K_M, GgufFileType::Q5_K_M, GgufFileType::Q6_K});
    std::filesystem::remove_all(dir);
  }
}

// Files llama.cpp's quantizer writes (from our f32 file): we read them; where its tensor type is
// Q8_0 or Q4_0 the blocks equal ours byte for byte; every tensor dequantises close to the f32
// weights; our greedy tokens on its file equal its own (on two of the five types per family).
TEST(GgufLlamaCpp, ReadsLlamaCppQuantizedFiles) {
  REQUIRE_LLAMA(ref);
  const std::vector<int32_t> prompt = {7, 1, 8, 2};
  const GgufFileType types[] = {GgufFileType::Q8_0, GgufFileType::Q4_0, GgufFileType::Q4_K_M, GgufFileType::Q5_K_M,
                                GgufFileType::Q6_K};
  int fam_i = 0;
  for (const char* fam : kFamilies) {
    const std::string dir = temp_dir();
    const std::string src = make_k_model(dir, fam);
    GgufWriteOptions opt;
    opt.type = GgufFileType::F32;
    write_gguf(src, dir + "/f32.gguf", opt);
    Checkpoint ck = Checkpoint::open_dir(src);
    std::string args = "quantize '" + dir + "/f32.gguf'";
    for (GgufFileType ft : types)
      args += " '" + dir + "/llama-" + gguf_file_type_name(ft) + ".gguf' " + std::to_string(gguf_llama_ftype(ft));
    int rc = 0;
    run_ref(*ref, args, &rc);
    ASSERT_EQ(rc, 0) << fam;
    std::vector<std::string> run_files;
    std::vector<std::vector<int32_t>> ours_tokens;
    int k = 0;
    for (GgufFileType ft : types) {
      const char* tn = gguf_file_type_name(ft);
      const std::string theirs_p = dir + "/llama-" + tn + ".gguf";
      const std::string ours_p = dir + "/ours.gguf";
      opt.type = ft;
      write_gguf(src, ours_p, opt);
      auto theirs = GgufFile::open(theirs_p);
      auto ours = GgufFile::open(ours_p);
      int compared = 0;
      for (const GgufTensorInfo& t : theirs->tensors()) {
        const GgufTensorInfo* o = ours->find_tensor(t.name);
        ASSERT_TRUE(o) << t.name;
        if (t.type == o->type && (t.type == GgmlType::Q8_0 || t.type == GgmlType::Q4_0)) {
          ASSERT_EQ(t.nbytes, o->nbytes);
          EXPECT_EQ(std::memcmp(theirs->data(t), ours->data(*o), t.nbytes), 0) << fam << " " << t.name;
          ++compared;
        }
      }
      if (ft == GgufFileType::Q8_0 || ft == GgufFileType::Q4_0) {
        EXPECT_GT(compared, 5) << fam << " " << tn;
      }
      GgufModel g = load_gguf_model(theirs_p);
      double sq = 0, sx = 0;
      for (auto& [name, t] : g.tensors) {
        std::vector<float> x = ck.get(name).to_f32_vector(), y = t.to_f32_vector();
        ASSERT_EQ(x.size(), y.size()) << name;
        for (size_t i = 0; i < x.size(); ++i) {
          sq += (x[i] - y[i]) * double(x[i] - y[i]);
          sx += double(x[i]) * x[i];
        }
      }
      EXPECT_LT(std::sqrt(sq / sx), 0.1) << fam << " " << tn;
      if ((k++ + 2 * fam_i) % 5 < 2) {  // each type on one family
        run_files.push_back(theirs_p);
        ours_tokens.push_back(greedy(Model::from_tensors(g.config, g.tensors), prompt, 6));
      }
    }
    const std::vector<RefResult> res = ref_run(*ref, run_files, prompt, 6, dir);
    for (size_t i = 0; i < run_files.size(); ++i) EXPECT_EQ(ours_tokens[i], res[i].tokens) << run_files[i];
    ++fam_i;
    std::filesystem::remove_all(dir);
  }
}

// llama.cpp's Q2_K, Q3_K_M, IQ4_NL and IQ4_XS files (of the 256-wide models: llama.cpp gives rows
// that are not whole super-blocks other types): we read them with the blocks kept; our exact
// logits are within 5e-2 of llama.cpp's, our fast path's greedy tokens equal its own, and the
// fast path is within twice llama.cpp's distance from the exact logits.
TEST(GgufLlamaCpp, ReadsLlamaCppQ2KQ3KIq4Files) {
  REQUIRE_LLAMA(ref);
  const std::vector<int32_t> prompt = {7, 1, 8, 2, 5};
  const std::pair<const char*, int> ftypes[] = {{"q2_k", 10}, {"q3_k_m", 12}, {"iq4_nl", 25}, {"iq4_xs", 30}};  // LLAMA_FTYPE_MOSTLY_*
  for (const char* fam : kFamilies) {
    const std::string dir = temp_dir();
    const std::string src = make_k_model(dir, fam);
    GgufWriteOptions opt;
    opt.type = GgufFileType::F32;
    write_gguf(src, dir + "/f32.gguf", opt);
    std::string args = "quantize '" + dir + "/f32.gguf'";
    std::vector<std::string> files;
    for (auto [name, ft] : ftypes) {
      files.push_back(dir + "/llama-" + name + ".gguf");
      args += " '" + files.back() + "' " + std::to_string(ft);
    }
    int rc = 0;
    run_ref(*ref, args, &rc);
    ASSERT_EQ(rc, 0) << fam;
    const std::vector<RefResult> theirs = ref_run(*ref, files, prompt, 6, dir);
    ASSERT_EQ(theirs.size(), files.size());
    for (size_t i = 0; i < files.size(); ++i) {
      const std::string what = std::string(fam) + " " + ftypes[i].first;
      auto f = GgufFile::open(files[i]);
      int low = 0;
      for (const GgufTensorInfo& t : f->tensors())
        low += t.type == GgmlType::Q2_K || t.type == GgmlType::Q3_K || t.type == GgmlType::IQ4_NL || t.type == GgmlType::IQ4_XS;
      EXPECT_GT(low, 0) << what << ": llama.cpp wrote no q2_K/q3_K/iq4 tensor";
      Model m = model_from_gguf(files[i]);
      const std::vector<float> exact = logits_of(m, prompt);
      const double rel = max_rel(theirs[i].logits, exact);
      GgufLoadOptions keep;
      keep.keep_quantized = true;
      GgufModel gq = load_gguf_model(files[i], keep);
      Model fast_m = Model::from_tensors(gq.config, gq.tensors);
      // Greedy tokens against our fast path, which rounds the activations as llama.cpp does: at
      // 2-3 bits the exact path can break a near-tie the other way (qwen3_moe q2_k, token 2).
      EXPECT_EQ(greedy(fast_m, prompt, 6), theirs[i].tokens) << what;
      EXPECT_LT(rel, 5e-2) << what;
      const DType w1 = fast_m.weights().layers[0].w1.dtype();
      EXPECT_TRUE(w1 == DType::Q2_K || w1 == DType::Q3_K || w1 == DType::IQ4_NL || w1 == DType::IQ4_XS)
          << what << ": experts kept as " << dtype_name(w1);
      const double fast = max_rel(logits_of(fast_m, prompt), exact);
      std::printf("[ info ] %s: llama.cpp vs exact %.2e, ours fast vs exact %.2e (experts %s)\n", what.c_str(), rel, fast,
                  dtype_name(w1));
      EXPECT_LE(fast, 2 * rel) << what;
    }
    std::filesystem::remove_all(dir);
  }
}

// Rows that are not whole 256-value super-blocks (the fixtures' widths of 64, as Qwen1.5-MoE's
// 1408 and DeepSeek-V2-Lite's expert widths): llama.cpp's Q4_K_M / Q5_K_M files fall back to
// Q5_0 / Q5_1 there, and its Q4_1 / Q5_0 / Q5_1 files use those types throughout. We read every
// such file; where a tensor's type matches ours, the blocks are byte-identical (our rounding is
// llama.cpp's); our greedy tokens equal its own; our fast path (int8 activations) stays within
// twice llama.cpp's distance from the exact logits.
TEST(GgufLlamaCpp, ReadsLlamaCppBlock32Fallbacks) {
  REQUIRE_LLAMA(ref);
  const std::vector<int32_t> prompt = {7, 1, 8, 2, 5};
  const GgufFileType types[] = {GgufFileType::Q4_K_M, GgufFileType::Q5_K_M, GgufFileType::Q4_1, GgufFileType::Q5_0,
                                GgufFileType::Q5_1};
  for (const char* fam : kFamilies) {
    const std::string dir = temp_dir();
    const std::string src = kFixtures + "/" + fam;
    GgufWriteOptions opt;
    opt.type = GgufFileType::F32;
    write_gguf(src, dir + "/f32.gguf", opt);
    std::string args = "quantize '" + dir + "/f32.gguf'";
    std::vector<std::string> files;
    for (GgufFileType ft : types) {
      files.push_back(dir + "/llama-" + gguf_file_type_name(ft) + ".gguf");
      args += " '" + files.back() + "' " + std::to_string(gguf_llama_ftype(ft));
    }
    int rc = 0;
    run_ref(*ref, args, &rc);
    ASSERT_EQ(rc, 0) << fam;
    const std::vector<RefResult> theirs = ref_run(*ref, files, prompt, 6, dir);
    ASSERT_EQ(theirs.size(), files.size());
    for (size_t i = 0; i < files.size(); ++i) {
      const std::string what = std::string(fam) + " " + gguf_file_type_name(types[i]);
      opt.type = types[i];
      write_gguf(src, dir + "/ours.gguf", opt);
      auto lf = GgufFile::open(files[i]);
      auto of = GgufFile::open(dir + "/ours.gguf");
      int legacy = 0, same = 0;
      for (const GgufTensorInfo& t : lf->tensors()) {
        const bool is_legacy = t.type == GgmlType::Q4_1 || t.type == GgmlType::Q5_0 || t.type == GgmlType::Q5_1;
        legacy += is_legacy;
        const GgufTensorInfo* o = of->find_tensor(t.name);
        ASSERT_TRUE(o) << what << " " << t.name;
        if (is_legacy && o->type == t.type) {
          ASSERT_EQ(t.nbytes, o->nbytes) << what << " " << t.name;
          EXPECT_EQ(std::memcmp(lf->data(t), of->data(*o), t.nbytes), 0) << what << " " << t.name;
          ++same;
        }
      }
      EXPECT_GT(legacy, 0) << what << ": llama.cpp wrote no q4_1/q5_0/q5_1 tensor";
      EXPECT_GT(same, 0) << what << ": no tensor of a q4_1/q5_0/q5_1 type in both files";
      // Exact path (dequantized weights): llama.cpp's greedy tokens; fast path: within 2x its error.
      Model m = model_from_gguf(files[i]);
      EXPECT_EQ(greedy(m, prompt, 6), theirs[i].tokens) << what;
      const std::vector<float> exact = logits_of(m, prompt);
      const double rel = max_rel(theirs[i].logits, exact);
      GgufLoadOptions keep;
      keep.keep_quantized = true;
      GgufModel gq = load_gguf_model(files[i], keep);
      Model fast_m = Model::from_tensors(gq.config, gq.tensors);
      const DType w2 = fast_m.weights().layers[0].w2.dtype();
      EXPECT_TRUE(dtype_is_quant(w2)) << what << ": ffn_down kept as " << dtype_name(w2);
      const double fast = max_rel(logits_of(fast_m, prompt), exact);
      std::printf("[ info ] %s: llama.cpp vs exact %.2e, ours fast vs exact %.2e (ffn_down %s)\n", what.c_str(), rel,
                  fast, dtype_name(w2));
      EXPECT_LE(fast, 2 * rel) << what;
    }
    std::filesystem::remove_all(dir);
  }
}

}  // namespace
// The tokenizers we write into GGUF files, tokenized by llama.cpp itself (vocab_only): the same
// ids as ours for every string. The real tokenizer files come from the tokenizer tests' npm data
// (tests/tokenizer/setup.sh); the model metadata around them from a fixture.
TEST(GgufLlamaCpp, TokenizesOurVocabulariesAsWeDo) {
  REQUIRE_LLAMA(ref);
  const std::string tref = std::string(MOE_BINARY_DIR) + "/tokenizer-ref";
  const int setup_rc = std::system(("bash '" + source_dir() + "/tokenizer/setup.sh' '" + tref + "' 1>&2").c_str());
  if (setup_rc != 0) {
    const char* ci = std::getenv("CI");
    if (ci && std::string(ci) == "true") FAIL() << "CI=true but the tokenizer npm data is unavailable";
    GTEST_SKIP() << "SKIPPED: tokenizer npm data unavailable (tests/tokenizer/setup.sh)";
  }
  const std::string dir = temp_dir();
  write_gguf(kFixtures + "/qwen3_moe", dir + "/base.gguf");
  const auto base = GgufFile::open(dir + "/base.gguf");
  // NFC text (llama.cpp does not normalize; Qwen's tokenizer.json does), with special tokens.
  const std::vector<std::string> texts = {
      "Hello world", "It's 2026, isn't it? I'LL SEE YOU'RE DONE", "<|im_start|>user\nWhat is 12 + 7?<|im_end|>\n",
      "  leading, trailing   ", "tabs\tand\nnewlines\r\n\n\nend", "数字 12345678 和中文混合text", "日本語のテキストとカタカナ",
      "emoji 🎉🦄 family 👨\u200d👩\u200d👧", "code: for (int i = 0; i < n; ++i) { sum += a[i]; }",
      "url https://example.com/path?q=1&r=2#frag", "ελληνικά και русский", "Straße Mädchen schön über",
      "!!!???...,,,;;;", "x", " ", "a<think>b</think>c", "0x1F 3.14159 -2.5e+10 1_000_000",
      "def f(x):\n    return x ** 2\n", "ALL CAPS 123 MixedCase camelCaseWord snake_case_word"};
  std::string blob;
  for (const std::string& t : texts) blob += t + std::string(1, '\0');
  const std::string strings_path = dir + "/strings.bin";
  std::ofstream(strings_path, std::ios::binary) << blob;
  for (const char* name : {"qwen3", "deepseek_v3", "gptoss"}) {
    std::string why;
    const std::optional<GgufVocab> v = gguf_vocab_from_dir(tref + "/tokenizers/" + name, 0, &why);
    ASSERT_TRUE(v.has_value()) << why;
    GgufWriter w;
    for (const auto& [key, value] : base->header().kv)
      if (key.rfind("tokenizer.", 0) != 0 && key.find(".vocab_size") == std::string::npos) w.set(key, value);
    write_gguf_vocab(w, *v);
    const std::string path = dir + "/" + name + ".gguf";
    w.write(path);
    int rc = 0;
    const std::string out = run_ref(*ref, "tokenize '" + path + "' '" + strings_path + "'", &rc);
    ASSERT_EQ(rc, 0) << out;
    const Tokenizer tok = Tokenizer::from_dir(path);
    std::istringstream lines(out);
    std::string line;
    size_t same = 0, n = 0;
    while (std::getline(lines, line)) {
      const size_t colon = line.find(':');
      ASSERT_NE(colon, std::string::npos) << line;
      const size_t i = std::stoul(line.substr(0, colon));
      ASSERT_LT(i, texts.size());
      std::vector<int32_t> theirs;
      std::istringstream ids(line.substr(colon + 1));
      int32_t id;
      while (ids >> id) theirs.push_back(id);
      const std::vector<int32_t> ours = tok.encode(texts[i], true);
      same += ours == theirs;
      ++n;
      EXPECT_EQ(ours, theirs) << name << " text #" << i;
    }
    EXPECT_EQ(n, texts.size()) << name;
    std::printf("[%s, pre %s] llama.cpp tokenizes %zu/%zu texts as we do\n", name, v->pre.c_str(), same, n);
  }
  std::filesystem::remove_all(dir);
}

}  // namespace moe
