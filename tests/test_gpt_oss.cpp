// test_gpt_oss.cpp — the gpt_oss family's own pieces, against values built from their
// definitions (the fixture-based checks are in the Reference / TrainReference / LoraReference
// suites):
//   - config.json: the fixture's fields, GptOssConfig's defaults, errors naming the field;
//   - YaRN (truncate false) frequencies for the fixture's head width, from the formula;
//   - the fused in×out interleaved expert tensors <-> the stacked experts, element by element;
//   - MXFP4 blocks: every e2m1 code, nibble order, scale extremes, bit-exact;
//   - an MXFP4 checkpoint loads to the same model as its dequantised twin;
//   - `moe init --arch gpt_oss` presets write a config that parses back to the same config.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/mxfp4.h"
#include "core/rope_scaling.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/fused_experts.h"
#include "model/model.h"
#include "model/random_init.h"
#include "fixture_util.h"

namespace moe {
namespace {

using json = nlohmann::json;

using testutil::expect_error;

const std::string kFixture = std::string(MOE_FIXTURES_DIR) + "/gpt_oss";

TEST(GptOssConfig, Fixture) {
  if (!std::filesystem::exists(kFixture)) GTEST_SKIP() << "SKIPPED: no gpt_oss fixture";
  const ModelConfig c = load_hf_config(kFixture + "/config.json");
  EXPECT_EQ(c.model_type, "gpt_oss");
  EXPECT_EQ(c.n_expert, 8);
  EXPECT_EQ(c.n_expert_used, 2);
  EXPECT_EQ(c.head_dim, 24);  // 4 · 24 != hidden 64
  EXPECT_EQ(c.moe_intermediate_size, 32);
  EXPECT_TRUE(c.norm_topk_prob);  // softmax over the selected K
  EXPECT_TRUE(c.attn_qkv_bias && c.attn_o_bias && c.attn_sinks && c.router_bias && c.expert_bias);
  EXPECT_EQ(c.sliding_window, 8);
  EXPECT_EQ(c.layer_window(0), 8);  // sliding_attention
  EXPECT_EQ(c.layer_window(1), 0);  // full_attention
  EXPECT_DOUBLE_EQ(c.swiglu_limit, 7.0);
  EXPECT_DOUBLE_EQ(c.swiglu_alpha, 1.702);
  EXPECT_EQ(c.rope_scaling.kind, RopeScalingKind::Yarn);
  EXPECT_DOUBLE_EQ(c.rope_scaling.factor, 32.0);
  EXPECT_FALSE(c.rope_scaling.truncate);
  EXPECT_EQ(c.rope_scaling.original_max_position_embeddings, 4096);
  EXPECT_DOUBLE_EQ(c.rope_theta, 150000.0);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.02);
  // What the engine writes parses back to the same config.
  EXPECT_EQ(parse_hf_config(hf_config_to_json(c), "round trip"), c);
}

// GptOssConfig's defaults for omitted fields (configuration_gpt_oss.py).
TEST(GptOssConfig, Defaults) {
  const json j = {{"model_type", "gpt_oss"}, {"vocab_size", 100},         {"hidden_size", 32},
                  {"intermediate_size", 16}, {"num_hidden_layers", 3},     {"num_attention_heads", 4},
                  {"num_key_value_heads", 2}, {"head_dim", 8},            {"num_local_experts", 4},
                  {"num_experts_per_tok", 2}};
  const ModelConfig c = parse_hf_config(j.dump(), "c.json");
  EXPECT_DOUBLE_EQ(c.rope_theta, 150000.0);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.9);
  EXPECT_EQ(c.max_position_embeddings, 131072);
  EXPECT_TRUE(c.attn_qkv_bias);  // attention_bias defaults to true
  EXPECT_EQ(c.sliding_window, 128);
  EXPECT_EQ(c.layer_window(0), 128);  // sliding, full, sliding
  EXPECT_EQ(c.layer_window(1), 0);
  EXPECT_EQ(c.layer_window(2), 128);
  EXPECT_DOUBLE_EQ(c.swiglu_limit, 7.0);
  EXPECT_EQ(c.rope_scaling.kind, RopeScalingKind::None);  // no rope_scaling given
  // experts_per_token (the original checkpoints' name) stands in for num_experts_per_tok.
  json j2 = j;
  j2.erase("num_experts_per_tok");
  j2["experts_per_token"] = 3;
  EXPECT_EQ(parse_hf_config(j2.dump(), "c.json").n_expert_used, 3);
}

TEST(GptOssConfig, BadFieldsAreNamed) {
  json j = {{"model_type", "gpt_oss"}, {"vocab_size", 100},         {"hidden_size", 32},
            {"intermediate_size", 16}, {"num_hidden_layers", 2},     {"num_attention_heads", 4},
            {"head_dim", 8},           {"num_local_experts", 4},     {"num_experts_per_tok", 2}};
  json bad = j;
  bad["layer_types"] = {"sliding_attention", "local"};
  expect_error([&] { parse_hf_config(bad.dump(), "c.json"); }, {"c.json", "layer_types", "local"});
  bad = j;
  bad["layer_types"] = {"full_attention"};
  expect_error([&] { parse_hf_config(bad.dump(), "c.json"); }, {"c.json", "layer_types"});
  bad = j;
  bad["rope_scaling"] = {{"rope_type", "dynamic"}, {"factor", 2.0}};
  expect_error([&] { parse_hf_config(bad.dump(), "c.json"); }, {"c.json", "rope_scaling", "dynamic"});
  bad = j;
  bad["rope_scaling"] = {{"rope_type", "yarn"}, {"factor", -1.0}};
  expect_error([&] { parse_hf_config(bad.dump(), "c.json"); }, {"c.json", "rope_scaling.factor"});
  bad = j;
  bad["swiglu_limit"] = 0.0;
  expect_error([&] { parse_hf_config(bad.dump(), "c.json"); }, {"c.json", "swiglu_limit"});
  bad = j;
  bad["sliding_window"] = 0;
  expect_error([&] { parse_hf_config(bad.dump(), "c.json"); }, {"c.json", "sliding_window"});
}

// _compute_yarn_parameters for head width 24, base 150000, factor 32, beta 32/1 over 4096
// original positions, truncate false: correction range [3.0348, 6.5243] (unrounded), the
// frequencies below (evaluated from the formula in double, independently of the engine), and
// attention_factor 0.1 ln 32 + 1.
TEST(GptOssRope, YarnTableFromTheFormula) {
  RopeScaling rs;
  rs.kind = RopeScalingKind::Yarn;
  rs.factor = 32;
  rs.beta_fast = 32;
  rs.beta_slow = 1;
  rs.original_max_position_embeddings = 4096;
  rs.truncate = false;
  const RopeTable t = rope_table(150000.0, 24, rs, 131072);
  const double want[12] = {1.0,
                           0.37038983702530026,
                           0.1371886313716285,
                           0.050813274815461475,
                           0.013777479816473214,
                           0.0031677401543217095,
                           0.00045648391922324086,
                           2.9885701466738885e-05,
                           1.1069360095652204e-05,
                           4.0999784818029795e-06,
                           1.5185903616822431e-06,
                           5.624704365716783e-07};
  ASSERT_EQ(t.inv_freq.size(), 12u);
  for (size_t i = 0; i < 12; ++i) EXPECT_NEAR(t.inv_freq[i], want[i], 1e-14 * want[i]) << i;
  EXPECT_NEAR(t.attention_factor, 1.3465735902799727, 1e-15);
  // truncate (the default) rounds the range to [3, 7]: frequency 3 is then fully extrapolated.
  rs.truncate = true;
  EXPECT_NEAR(rope_table(150000.0, 24, rs, 131072).inv_freq[3], std::pow(150000.0, -6.0 / 24.0), 1e-18);
  // None: the plain table.
  EXPECT_TRUE(rope_table(1e4, 24, RopeScaling{}, 4096).plain());
}

// Fused gate_up [E, D, 2F] (gate even columns, up odd) and down [E, F, D] -> w1, w3 [E, F, D],
// w2 [E, D, F], checked element by element against values that encode their own position.
TEST(GptOssExperts, FusedLayoutMapsElementByElement) {
  const int64_t e_n = 3, d = 5, f = 4;
  Tensor gu = Tensor::empty({e_n, d, 2 * f}, DType::F32, MemCategory::Workspace);
  Tensor dn = Tensor::empty({e_n, f, d}, DType::F32, MemCategory::Workspace);
  Tensor gub = Tensor::empty({e_n, 2 * f}, DType::F32, MemCategory::Workspace);
  Tensor dnb = Tensor::empty({e_n, d}, DType::F32, MemCategory::Workspace);
  auto code = [](int64_t e, int64_t a, int64_t b) { return float(1000 * e + 10 * a + b); };
  for (int64_t e = 0; e < e_n; ++e) {
    for (int64_t i = 0; i < d; ++i)
      for (int64_t c = 0; c < 2 * f; ++c) gu.data<float>()[(e * d + i) * 2 * f + c] = code(e, i, c);
    for (int64_t j = 0; j < f; ++j)
      for (int64_t i = 0; i < d; ++i) dn.data<float>()[(e * f + j) * d + i] = -code(e, j, i);
    for (int64_t c = 0; c < 2 * f; ++c) gub.data<float>()[e * 2 * f + c] = 0.5f + code(e, 0, c);
    for (int64_t i = 0; i < d; ++i) dnb.data<float>()[e * d + i] = 0.25f + code(e, 0, i);
  }
  Tensor w1, w3, w2, b1, b3, b2;
  unfuse_expert_weights(gu, dn, 1, 2, &w1, &w3, &w2, MemCategory::Workspace);  // experts 1 and 2
  unfuse_expert_biases(gub, dnb, 1, 2, &b1, &b3, &b2, MemCategory::Workspace);
  ASSERT_EQ(w1.shape(), Shape({2, f, d}));
  ASSERT_EQ(w2.shape(), Shape({2, d, f}));
  for (int64_t e = 0; e < 2; ++e)
    for (int64_t j = 0; j < f; ++j)
      for (int64_t i = 0; i < d; ++i) {
        EXPECT_EQ(w1.data<float>()[(e * f + j) * d + i], code(e + 1, i, 2 * j));      // gate: even column
        EXPECT_EQ(w3.data<float>()[(e * f + j) * d + i], code(e + 1, i, 2 * j + 1));  // up: odd column
        EXPECT_EQ(w2.data<float>()[(e * d + i) * f + j], -code(e + 1, j, i));
        EXPECT_EQ(b1.data<float>()[e * f + j], 0.5f + code(e + 1, 0, 2 * j));
        EXPECT_EQ(b3.data<float>()[e * f + j], 0.5f + code(e + 1, 0, 2 * j + 1));
        EXPECT_EQ(b2.data<float>()[e * d + i], 0.25f + code(e + 1, 0, i));
      }
  // And back: all experts, bit for bit.
  unfuse_expert_weights(gu, dn, 0, e_n, &w1, &w3, &w2, MemCategory::Workspace);
  unfuse_expert_biases(gub, dnb, 0, e_n, &b1, &b3, &b2, MemCategory::Workspace);
  EXPECT_EQ(fuse_gate_up(w1, w3).to_f32_vector(), gu.to_f32_vector());
  EXPECT_EQ(fuse_down(w2).to_f32_vector(), dn.to_f32_vector());
  EXPECT_EQ(fuse_gate_up_bias(b1, b3).to_f32_vector(), gub.to_f32_vector());
}

// e2m1 from its definition: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0; exponent 0
// is subnormal (0 or 0.5).
TEST(Mxfp4, AllSixteenCodes) {
  const float want[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                          -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  for (int c = 0; c < 16; ++c) {
    EXPECT_EQ(e2m1_value(uint8_t(c)), want[c]) << "code " << c;
    EXPECT_EQ(std::signbit(e2m1_value(uint8_t(c))), c >= 8) << "code " << c;
  }
}

// Blocks built by hand: byte i of a block holds value 2i in its low nibble and value 2i+1 in its
// high nibble; the scale byte s gives 2^(s-127). Every code appears in both nibbles; scales 127
// (1), 0 (2^-127: subnormal in f32 but exact), 254 (2^127) and 130 (8).
TEST(Mxfp4, BlocksDecodeBitExact) {
  const int64_t rows = 2, groups = 2;
  Tensor blocks = Tensor::empty({rows, groups, 16}, DType::U8, MemCategory::Workspace);
  Tensor scales = Tensor::empty({rows, groups}, DType::U8, MemCategory::Workspace);
  const uint8_t sc[4] = {127, 0, 254, 130};
  for (int64_t g = 0; g < rows * groups; ++g) {
    scales.data<uint8_t>()[g] = sc[g];
    for (int i = 0; i < 16; ++i) {
      const uint8_t lo = uint8_t(i), hi = uint8_t((i + 5 + g) % 16);
      blocks.data<uint8_t>()[g * 16 + i] = uint8_t(lo | (hi << 4));
    }
  }
  const Tensor out = mxfp4_dequantize(blocks, scales, "test");
  ASSERT_EQ(out.shape(), Shape({rows, groups * 32}));
  const float lut[16] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                         -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
  for (int64_t g = 0; g < rows * groups; ++g) {
    const double scale = std::ldexp(1.0, int(sc[g]) - 127);
    for (int i = 0; i < 16; ++i) {
      const float want_lo = float(double(lut[i]) * scale), want_hi = float(double(lut[(i + 5 + g) % 16]) * scale);
      const float got_lo = out.data<float>()[g * 32 + 2 * i], got_hi = out.data<float>()[g * 32 + 2 * i + 1];
      EXPECT_EQ(std::memcmp(&got_lo, &want_lo, 4), 0) << "block " << g << " value " << 2 * i;
      EXPECT_EQ(std::memcmp(&got_hi, &want_hi, 4), 0) << "block " << g << " value " << 2 * i + 1;
    }
  }
  EXPECT_EQ(out.data<float>()[32 + 2 * 7], 6.0f * std::ldexp(1.0f, -127));  // smallest scale, largest code
  EXPECT_EQ(out.data<float>()[64 + 2 * 15], -6.0f * std::ldexp(1.0f, 127));
  // Wrong shapes and dtypes are errors naming the tensor.
  expect_error([&] { mxfp4_dequantize(blocks, blocks, "w_blocks"); }, {"w_blocks"});
  expect_error([&] { mxfp4_dequantize(scales, scales, "w_blocks"); }, {"w_blocks"});
}

// A gpt_oss checkpoint whose experts are MXFP4 (`*_blocks`, `*_scales` [E, out, in/32, 16] as
// the Hub's) loads to the model of the dequantised weights (in×out, HF's transpose) exactly.
TEST(Mxfp4, CheckpointLoadsLikeItsDequantisedTwin) {
  ModelConfig c = preset_config("gpt_oss", "tiny");
  c.n_layer = 1;
  c.layer_sliding = {true};
  const int64_t e_n = c.n_expert, d = c.hidden_size, f = c.moe_intermediate_size;
  ASSERT_EQ(d % 32, 0);
  ASSERT_EQ(f % 32, 0);
  std::vector<std::pair<std::string, Tensor>> named = random_weights(c, 7, DType::F32), packed;
  uint32_t state = 12345;
  auto next = [&] { return state = state * 1664525u + 1013904223u; };
  for (auto& [name, t] : named) {
    const bool gu = name.ends_with("experts.gate_up_proj"), dn = name.ends_with("experts.down_proj");
    if (!gu && !dn) {
      packed.emplace_back(name, t);
      continue;
    }
    const int64_t in = gu ? d : f, out = gu ? 2 * f : d;
    Tensor blocks = Tensor::empty({e_n, out, in / 32, 16}, DType::U8, MemCategory::Workspace);
    Tensor scales = Tensor::empty({e_n, out, in / 32}, DType::U8, MemCategory::Workspace);
    for (int64_t i = 0; i < blocks.numel(); ++i) blocks.data<uint8_t>()[i] = uint8_t(next() >> 24);
    for (int64_t i = 0; i < scales.numel(); ++i) scales.data<uint8_t>()[i] = uint8_t(120 + (next() >> 29));
    // The dequantised twin, in×out: W[e, i, o] = value (e, o, i) of the blocks.
    const Tensor deq = mxfp4_dequantize(blocks, scales, name);
    for (int64_t e = 0; e < e_n; ++e)
      for (int64_t o = 0; o < out; ++o)
        for (int64_t i = 0; i < in; ++i) t.data<float>()[(e * in + i) * out + o] = deq.data<float>()[(e * out + o) * in + i];
    packed.emplace_back(name + "_blocks", blocks);
    packed.emplace_back(name + "_scales", scales);
  }
  const Model a = Model::from_tensors(c, named), b = Model::from_tensors(c, packed);
  for (auto [x, y] : {std::pair{&a.weights().layers[0].w1, &b.weights().layers[0].w1},
                      {&a.weights().layers[0].w3, &b.weights().layers[0].w3},
                      {&a.weights().layers[0].w2, &b.weights().layers[0].w2}})
    EXPECT_EQ(x->to_f32_vector(), y->to_f32_vector());
}

// Incremental decode with the KV cache equals the full forward far past the fixture's sliding
// window (8): 40 tokens, prefill 5 then one token at a time, both sequences of the batch.
TEST(GptOssDecode, PastTheSlidingWindowEqualsFullForward) {
  if (!std::filesystem::exists(kFixture)) GTEST_SKIP() << "SKIPPED: no gpt_oss fixture";
  const Model m = Model::load(kFixture);
  ASSERT_EQ(m.config().layer_window(0), 8);
  const int64_t b_n = 2, s_n = 40, v = m.config().vocab_size, pre = 5;
  Tensor ids = Tensor::empty({b_n, s_n}, DType::I32, MemCategory::Activations);
  for (int64_t i = 0; i < b_n * s_n; ++i) ids.data<int32_t>()[i] = int32_t((i * 37 + 11) % v);
  KVCache full_kv = m.make_cache(b_n, s_n);
  const std::vector<float> full = m.forward(ids, full_kv).logits.to_f32_vector();
  KVCache kv = m.make_cache(b_n, s_n);
  std::vector<float> got(size_t(b_n * s_n * v));
  auto run = [&](int64_t s0, int64_t s1) {
    Tensor part = Tensor::empty({b_n, s1 - s0}, DType::I32, MemCategory::Activations);
    for (int64_t b = 0; b < b_n; ++b)
      for (int64_t s = s0; s < s1; ++s) part.data<int32_t>()[b * (s1 - s0) + s - s0] = ids.data<int32_t>()[b * s_n + s];
    const std::vector<float> lg = m.forward(part, kv).logits.to_f32_vector();
    for (int64_t b = 0; b < b_n; ++b)
      for (int64_t s = s0; s < s1; ++s)
        std::copy_n(lg.begin() + (b * (s1 - s0) + s - s0) * v, v, got.begin() + (b * s_n + s) * v);
  };
  run(0, pre);
  for (int64_t s = pre; s < s_n; ++s) run(s, s + 1);
  double num = 0, den = 0, mx = 0, mref = 0;
  for (size_t i = 0; i < got.size(); ++i) {
    const double d = double(got[i]) - full[i];
    num += d * d;
    den += double(full[i]) * full[i];
    mx = std::max(mx, std::fabs(d));
    mref = std::max(mref, std::fabs(double(full[i])));
  }
  std::printf("gpt_oss decode (40 tokens, window 8) vs full forward: rel_fro %.3g rel_max %.3g\n",
              std::sqrt(num / den), mx / mref);
  EXPECT_LE(std::sqrt(num / den), 1e-5);
  EXPECT_LE(mx / mref, 1e-5);
}

// `moe init --arch gpt_oss`: each preset's config.json parses back to the same config, with the
// fields GptOssConfig reads.
TEST(GptOssPresets, ConfigRoundTrips) {
  for (const char* preset : {"tiny", "small", "medium"}) {
    const ModelConfig c = preset_config("gpt_oss", preset);
    const std::string text = hf_config_to_json(c);
    EXPECT_EQ(parse_hf_config(text, preset), c) << preset;
    const json j = json::parse(text);
    EXPECT_EQ(j["architectures"][0], "GptOssForCausalLM");
    for (const char* k : {"num_local_experts", "num_experts_per_tok", "head_dim", "sliding_window", "layer_types",
                          "rope_scaling", "swiglu_limit", "attention_bias", "intermediate_size"})
      EXPECT_TRUE(j.contains(k)) << preset << ": " << k;
    EXPECT_EQ(j["rope_scaling"]["rope_type"], "yarn");
    EXPECT_EQ(j["layer_types"].size(), size_t(c.n_layer));
  }
}

}  // namespace
}  // namespace moe
