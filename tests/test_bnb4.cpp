// test_bnb4.cpp — bitsandbytes' 4-bit serialization (core/bnb4.h) against values constructed
// from the format's definition: nibble order, code lookup, double-quantised absmax decoding, the
// dynamic 8-bit map's structure, the quant_state JSON, and the exact correspondence with the
// engine's NF4 blocks.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <vector>

#include "fixture_util.h"
#include "core/bnb4.h"
#include "core/error.h"
#include "core/file_util.h"
#include "core/json_util.h"
#include "core/nf4.h"
#include "io/bnb_checkpoint.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/model.h"

namespace moe {
namespace {

TEST(Bnb4, NibbleOrderAndCodeLookup) {
  // Two blocks of 4 values (blocksize 4): bytes 0x3C, 0xF0 | 0x07, 0x81.
  const uint8_t packed[4] = {0x3C, 0xF0, 0x07, 0x81};
  const float absmax[2] = {2.0f, 0.5f};
  std::vector<float> out(8);
  bnb4_dequantize(out.data(), packed, 8, absmax, kNf4Codes, 4);
  const int codes[8] = {3, 12, 15, 0, 0, 7, 8, 1};  // first value of a byte in the high nibble
  for (int i = 0; i < 8; ++i) EXPECT_EQ(out[i], kNf4Codes[codes[i]] * absmax[i / 4]) << i;
}

TEST(Bnb4, DoubleQuantisedAbsmaxDecoding) {
  // absmax[b] = map[code_b] * nested_absmax[b / 2] + offset, with nested blocks of 2.
  const float map[4] = {-1.0f, -0.25f, 0.5f, 1.0f};
  const uint8_t codes[3] = {3, 1, 2};
  const float nested[2] = {0.2f, 0.4f};
  float out[3];
  bnb4_decode_absmax(out, codes, 3, nested, map, 2, 0.75f);
  EXPECT_EQ(out[0], 1.0f * 0.2f + 0.75f);
  EXPECT_EQ(out[1], -0.25f * 0.2f + 0.75f);
  EXPECT_EQ(out[2], 0.5f * 0.4f + 0.75f);
}

// create_dynamic_map(signed=True): decade d = 0..6 holds 2^d magnitudes in [0.1, 1) * 10^(d-6),
// the midpoints of linspace(0.1, 1, 2^d + 1), with both signs; plus 0 and 1.
TEST(Bnb4, DynamicMapStructure) {
  const auto& m = bnb_dynamic_map();
  for (size_t i = 1; i < m.size(); ++i) EXPECT_LT(m[i - 1], m[i]) << i;
  EXPECT_EQ(m[255], 1.0f);
  int neg = 0, zero = 0, pos = 0;
  for (float v : m) (v < 0 ? neg : v == 0 ? zero : pos) += 1;
  EXPECT_EQ(neg, 127);
  EXPECT_EQ(zero, 1);
  EXPECT_EQ(pos, 128);
  for (int i = 0; i < 127; ++i) EXPECT_EQ(m[i], -m[254 - i]) << i;  // symmetric apart from +1
  EXPECT_FLOAT_EQ(m[128], 0.55e-6f);                                  // decade 0: the midpoint of [0.1, 1]
  EXPECT_FLOAT_EQ(m[254], (1.0f + (1.0f - 0.9f / 64)) / 2);           // decade 6: the last midpoint
  for (int d = 0; d < 7; ++d) {
    int in_decade = 0;
    for (float v : m)
      if (v >= 0.1 * std::pow(10.0, d - 6) * 0.999999 && v < std::pow(10.0, d - 6)) ++in_decade;
    EXPECT_EQ(in_decade, 1 << d) << "decade " << d;
  }
}

TEST(Bnb4, QuantStateJson) {
  Bnb4State s;
  s.shape = {128, 64};
  s.nested = true;
  s.nested_offset = 0.0123;
  const Bnb4State r = parse_bnb4_state(bnb4_state_json(s), "w");
  EXPECT_EQ(r.quant_type, "nf4");
  EXPECT_EQ(r.blocksize, 64);
  EXPECT_EQ(r.dtype, "bfloat16");
  EXPECT_EQ(r.shape, (std::vector<int64_t>{128, 64}));
  EXPECT_TRUE(r.nested);
  EXPECT_EQ(r.nested_blocksize, 256);
  EXPECT_EQ(r.nested_offset, 0.0123);
  // As bitsandbytes writes it (json.dumps of the non-tensor items), without double quant.
  const Bnb4State p = parse_bnb4_state(
      R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float16", "shape": [32, 128]})", "layer.weight");
  EXPECT_FALSE(p.nested);
  EXPECT_EQ(p.dtype, "float16");
  for (const char* bad : {R"({"blocksize": 64, "shape": [2]})", R"({"quant_type": "nf4", "blocksize": 0, "shape": [2]})",
                          R"({"quant_type": "nf4", "blocksize": 64, "shape": "2x2"})",
                          R"({"quant_type": "nf4", "blocksize": 64, "shape": [2], "nested_blocksize": 256})", "[1"}) {
    try {
      parse_bnb4_state(bad, "q.weight.quant_state");
      ADD_FAILURE() << "accepted " << bad;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find("q.weight.quant_state"), std::string::npos) << e.what();
    }
  }
}

TEST(Bnb4, QuantizeMatchesNf4BlocksAndBoundsDoubleQuant) {
  const int64_t n = 64 * 300;  // 300 blocks: two nested blocks of 256 and 44
  std::vector<float> w(n);
  std::mt19937 rng(7);
  std::normal_distribution<float> g(0.0f, 0.02f);
  for (int64_t i = 0; i < n; ++i) w[i] = g(rng) * (1.0f + static_cast<float>(i / 64 % 7));
  std::vector<uint8_t> nf4(n / 64 * kNf4BlockBytes), conv(nf4.size());
  nf4_quantize(w.data(), nf4.data(), n);
  const Bnb4Tensors plain = bnb4_quantize(w.data(), n, false);
  ASSERT_EQ(plain.packed.size(), size_t(n / 2));
  ASSERT_EQ(plain.absmax.size(), size_t(n / 64));
  bnb4_to_nf4_blocks(conv.data(), plain.packed.data(), plain.absmax.data(), n);
  EXPECT_EQ(conv, nf4);  // the same codes and absmax, byte for byte
  std::vector<float> a(n), b(n);
  bnb4_dequantize(a.data(), plain.packed.data(), n, plain.absmax.data(), kNf4Codes, 64);
  nf4_dequantize(nf4.data(), b.data(), n);
  EXPECT_EQ(a, b);

  const Bnb4Tensors dq = bnb4_quantize(w.data(), n, true);
  EXPECT_EQ(dq.packed, plain.packed);  // the 4-bit codes come from the exact absmax
  ASSERT_EQ(dq.absmax_codes.size(), size_t(n / 64));
  ASSERT_EQ(dq.nested_absmax.size(), 2u);
  double mean = 0;
  for (float x : plain.absmax) mean += x;
  EXPECT_FLOAT_EQ(dq.offset, static_cast<float>(mean / plain.absmax.size()));
  std::vector<float> decoded(n / 64);
  bnb4_decode_absmax(decoded.data(), dq.absmax_codes.data(), n / 64, dq.nested_absmax.data(), bnb_dynamic_map().data(),
                     kBnbNestedBlock, dq.offset);
  // The map's widest gap is its top decade's step, 0.9/64: half of it bounds the error relative
  // to the nested block's absmax.
  const double bound = 0.9 / 64 / 2 * 1.0001;
  for (int64_t blk = 0; blk < n / 64; ++blk)
    EXPECT_LE(std::fabs(decoded[blk] - plain.absmax[blk]), bound * dq.nested_absmax[blk / 256] + 1e-7) << blk;
}

// A model directory written as a bitsandbytes checkpoint and read back tensor by tensor: every
// linear weight is stored NF4 and decodes (plain absmax) to exactly the engine's own NF4 blocks
// of the original weight, or (double quantisation) to those codes with absmax values within the
// 8-bit map's bound; routers, norms and embeddings are untouched; config.json says how.
TEST(Bnb4, ModelDirectoryRoundTrip) {
  const std::string src = std::string(MOE_FIXTURES_DIR) + "/qwen3_moe";
  if (!std::filesystem::exists(src)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << src;
  char tmpl[] = "/tmp/moe-bnb4-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const Checkpoint orig = Checkpoint::open_dir(src);
  for (bool dq : {false, true}) {
    const std::string out = std::string(tmpl) + (dq ? "/dq" : "/plain");
    const Bnb4DirStats st = write_bnb4_dir(src, out, dq);
    EXPECT_GT(st.quantized, 0u);
    EXPECT_THROW(write_bnb4_dir(src, out, dq), Error);  // never over an existing directory
    const nlohmann::json cfg = parse_json_object(read_file(out + "/config.json"), "config.json");
    EXPECT_EQ(cfg["quantization_config"]["quant_method"], "bitsandbytes");
    EXPECT_EQ(cfg["quantization_config"]["bnb_4bit_use_double_quant"], dq);
    const Checkpoint ck = Checkpoint::open_dir(out);
    size_t quantized = 0;
    for (const std::string& name : orig.names()) {
      const Tensor w = orig.get(name);
      if (!is_bnb4_weight(ck, name)) {
        ASSERT_TRUE(ck.has(name)) << name;
        EXPECT_EQ(ck.info(name).shape, w.shape()) << name;
        EXPECT_TRUE(name.find("proj") == std::string::npos || w.ndim() != 2) << name << " left unquantized";
        continue;
      }
      ++quantized;
      EXPECT_EQ(name.find(".mlp.gate."), std::string::npos) << "router quantized: " << name;
      const Tensor t = read_bnb4_weight(ck, name);
      ASSERT_EQ(t.dtype(), DType::NF4) << name;
      ASSERT_EQ(t.shape(), w.shape()) << name;
      const Tensor f = w.to_dtype(DType::F32);
      std::vector<uint8_t> want(static_cast<size_t>(w.numel() / 64) * kNf4BlockBytes);
      nf4_quantize(f.data<float>(), want.data(), w.numel());
      const uint8_t* got = t.data<uint8_t>();
      // Double quantisation: the decoded absmax is within half the 8-bit map's widest gap (0.9/64)
      // of its nested block's largest |absmax - mean|, itself at most the tensor's largest absmax.
      float max_absmax = 0;
      for (int64_t b = 0; b < w.numel() / 64; ++b) {
        float ea;
        std::memcpy(&ea, want.data() + b * kNf4BlockBytes, 4);
        max_absmax = std::max(max_absmax, ea);
      }
      for (int64_t b = 0; b < w.numel() / 64; ++b) {
        const uint8_t* g = got + b * kNf4BlockBytes;
        const uint8_t* e = want.data() + b * kNf4BlockBytes;
        EXPECT_EQ(std::memcmp(g + 4, e + 4, 32), 0) << name << " block " << b << ": codes differ";
        float ga, ea;
        std::memcpy(&ga, g, 4);
        std::memcpy(&ea, e, 4);
        if (!dq) EXPECT_EQ(ga, ea) << name << " block " << b;
        else EXPECT_NEAR(ga, ea, 0.9 / 64 / 2 * 1.0001 * max_absmax + 1e-7) << name << " block " << b;
      }
    }
    EXPECT_EQ(quantized, st.quantized);
    // The engine loads the directory with those NF4 weights in place: its logits equal a float
    // model holding the same dequantized values (the NF4 GEMMs widen rows exactly).
    const Model m = Model::load(out);
    EXPECT_EQ(m.weights().layers[0].wqkv.dtype(), DType::NF4);
    EXPECT_EQ(m.weights().layers[0].router.dtype(), DType::F32);
    std::vector<std::pair<std::string, Tensor>> named;
    for (const std::string& name : orig.names())
      named.emplace_back(name, is_bnb4_weight(ck, name) ? read_bnb4_weight(ck, name).to_dtype(DType::F32)
                                                         : orig.get(name).to_dtype(DType::F32));
    const Model f = Model::from_tensors(load_hf_config(src + "/config.json"), named);
    const std::vector<int32_t> ids = {1, 5, 9, 200, 3, 77, 12};
    EXPECT_LE(testutil::max_rel(testutil::logits_of(m, ids), testutil::logits_of(f, ids)), 1e-5);
  }
  std::filesystem::remove_all(tmpl);
}

}  // namespace
}  // namespace moe
