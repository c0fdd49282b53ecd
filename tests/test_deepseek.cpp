// test_deepseek.cpp — the DeepSeek-V2/V3 families' own pieces, against values built from their
// definitions (the fixture-based checks are in the Reference / TrainReference / LoraReference
// suites):
//   - config.json: the fixtures' fields, DeepseekV2Config / DeepseekV3Config defaults, errors
//     naming the field;
//   - V2-Lite's YaRN frequencies for the fixture's rotary width (hand-derived correction range),
//     and V3's softmax factor mscale(40, 1)²;
//   - the MLA latent KV cache: (kv_lora_rank + qk_rope_head_dim) · layers · 4 bytes per token, as
//     the memory tracker measures it, contiguous and paged;
//   - aux-loss-free bias balancing on a skewed V3 router;
//   - `moe init` presets: the tiny ones name and shape every tensor as the HF-made fixtures do;
//   - FP8 e4m3 with 128×128 block scales: every code from the format's definition, bit-exact,
//     partial blocks, and a V3 checkpoint with an F8_E4M3 weight loading to its decoded values.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/fp8.h"
#include "core/memory.h"
#include "core/rope_scaling.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/ffn_block.h"
#include "model/mla_block.h"
#include "model/model.h"
#include "model/model_train.h"
#include "model/random_init.h"
#include "fixture_util.h"

namespace moe {
namespace {

using json = nlohmann::json;

using testutil::expect_error;

using testutil::fixture;

TEST(DeepseekConfig, V2Fixture) {
  if (!std::filesystem::exists(fixture("deepseek_v2"))) GTEST_SKIP() << "SKIPPED: no deepseek_v2 fixture";
  const ModelConfig c = load_hf_config(fixture("deepseek_v2") + "/config.json");
  EXPECT_EQ(c.model_type, "deepseek_v2");
  EXPECT_TRUE(c.is_mla());
  EXPECT_EQ(c.q_lora_rank, 0);  // null: one q_proj (V2-Lite)
  EXPECT_EQ(c.kv_lora_rank, 32);
  EXPECT_EQ(c.qk_nope_head_dim, 16);
  EXPECT_EQ(c.qk_rope_head_dim, 8);
  EXPECT_EQ(c.v_head_dim, 16);
  EXPECT_EQ(c.head_dim, 8);  // HF: head_dim = qk_rope_head_dim
  EXPECT_EQ(c.n_expert, 8);
  EXPECT_EQ(c.n_expert_used, 2);
  EXPECT_EQ(c.n_shared_experts, 2);
  EXPECT_EQ(c.shared_expert_intermediate_size, 64);  // 2 · moe_intermediate_size
  EXPECT_EQ(c.first_k_dense_replace, 1);
  EXPECT_FALSE(c.layer_is_moe(0));
  EXPECT_TRUE(c.layer_is_moe(1) && c.layer_is_moe(2));
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 1.5);
  EXPECT_EQ(c.topk_method, RouterTopk::Greedy);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_TRUE(c.rope_interleave);  // V2's complex-pair RoPE
  EXPECT_EQ(c.rope_scaling.kind, RopeScalingKind::Yarn);
  EXPECT_DOUBLE_EQ(c.rope_scaling.mscale, 0.707);
  EXPECT_DOUBLE_EQ(c.rope_scaling.mscale_all_dim, 0.707);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.0);  // no aux loss in HF's DeepSeek models
  EXPECT_EQ(parse_hf_config(hf_config_to_json(c), "round trip"), c);
  // V2 never applies the yarn mscale to its softmax: (Dn + Dr)^-1/2.
  EXPECT_NEAR(mla_softmax_scale(c), 1.0 / std::sqrt(24.0), 1e-7);
}

TEST(DeepseekConfig, V3Fixture) {
  if (!std::filesystem::exists(fixture("deepseek_v3"))) GTEST_SKIP() << "SKIPPED: no deepseek_v3 fixture";
  const ModelConfig c = load_hf_config(fixture("deepseek_v3") + "/config.json");
  EXPECT_EQ(c.model_type, "deepseek_v3");
  EXPECT_EQ(c.q_lora_rank, 48);
  EXPECT_EQ(c.kv_lora_rank, 32);
  EXPECT_EQ(c.n_shared_experts, 1);
  EXPECT_EQ(c.shared_expert_intermediate_size, 32);
  EXPECT_EQ(c.topk_method, RouterTopk::NoauxTc);
  EXPECT_EQ(c.n_group, 4);
  EXPECT_EQ(c.topk_group, 2);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.routed_scaling_factor, 2.5);
  EXPECT_TRUE(c.rope_interleave);
  EXPECT_EQ(parse_hf_config(hf_config_to_json(c), "round trip"), c);
  // V3: (Dn + Dr)^-1/2 · (0.1 · 1 · ln 40 + 1)^2 = 1.8739 / sqrt(24).
  const double m = 0.1 * std::log(40.0) + 1.0;
  EXPECT_NEAR(mla_softmax_scale(c), m * m / std::sqrt(24.0), 1e-7);
  EXPECT_NEAR(m * m, 1.8739, 1e-4);
}

json minimal(const char* type) {
  return {{"model_type", type},     {"vocab_size", 100},          {"hidden_size", 32},       {"intermediate_size", 64},
          {"num_hidden_layers", 3}, {"num_attention_heads", 4},   {"n_routed_experts", 8},   {"num_experts_per_tok", 2},
          {"kv_lora_rank", 16},     {"qk_nope_head_dim", 8},      {"qk_rope_head_dim", 4},   {"v_head_dim", 8},
          {"moe_intermediate_size", 16}};
}

// DeepseekV2Config / DeepseekV3Config defaults for what a config omits.
TEST(DeepseekConfig, Defaults) {
  const ModelConfig v2 = parse_hf_config(minimal("deepseek_v2").dump(), "c.json");
  EXPECT_EQ(v2.q_lora_rank, 1536);  // absent (not null): the class default
  EXPECT_EQ(v2.n_head_kv, 4);
  EXPECT_EQ(v2.first_k_dense_replace, 0);
  EXPECT_EQ(v2.n_shared_experts, 0);
  EXPECT_DOUBLE_EQ(v2.routed_scaling_factor, 1.0);
  EXPECT_EQ(v2.topk_method, RouterTopk::Greedy);
  EXPECT_EQ(v2.bos_token_id, 100000);
  EXPECT_EQ(v2.eos_token_id, 100001);
  EXPECT_DOUBLE_EQ(v2.rms_norm_eps, 1e-6);
  json j = minimal("deepseek_v3");
  j.erase("n_routed_experts");
  j.erase("num_experts_per_tok");
  j["num_hidden_layers"] = 4;
  const ModelConfig v3 = parse_hf_config(j.dump(), "c.json");
  EXPECT_EQ(v3.n_expert, 256);
  EXPECT_EQ(v3.n_expert_used, 8);
  EXPECT_EQ(v3.n_shared_experts, 1);
  EXPECT_EQ(v3.first_k_dense_replace, 3);
  EXPECT_DOUBLE_EQ(v3.routed_scaling_factor, 2.5);
  EXPECT_EQ(v3.topk_method, RouterTopk::NoauxTc);
  EXPECT_EQ(v3.n_group, 8);
  EXPECT_EQ(v3.topk_group, 4);
  EXPECT_TRUE(v3.norm_topk_prob);
  EXPECT_TRUE(v3.rope_interleave);
  // V2 ignores norm_topk_prob (its gate never renormalises).
  json v2r = minimal("deepseek_v2");
  v2r["norm_topk_prob"] = true;
  EXPECT_FALSE(parse_hf_config(v2r.dump(), "c.json").norm_topk_prob);
}

TEST(DeepseekConfig, BadFieldsAreNamed) {
  const json j = minimal("deepseek_v2");
  auto bad = [&](const char* key, json v, std::initializer_list<const char*> parts) {
    json b = j;
    b[key] = v;
    expect_error([&] { parse_hf_config(b.dump(), "c.json"); }, parts);
  };
  bad("topk_method", "noaux_tc", {"c.json", "topk_method", "noaux_tc"});
  bad("kv_lora_rank", 0, {"c.json", "kv_lora_rank"});
  bad("qk_rope_head_dim", 5, {"c.json", "qk_rope_head_dim", "even"});
  bad("num_key_value_heads", 2, {"c.json", "num_key_value_heads"});
  bad("head_dim", 16, {"c.json", "head_dim", "qk_rope_head_dim"});
  bad("first_k_dense_replace", 7, {"c.json", "first_k_dense_replace"});
  bad("routed_scaling_factor", -1.0, {"c.json", "routed_scaling_factor"});
  bad("scoring_func", "relu", {"c.json", "scoring_func", "relu"});
  bad("q_lora_rank", "big", {"c.json", "q_lora_rank"});
  bad("attention_bias", true, {"c.json", "attention_bias"});
  bad("rope_scaling", json{{"type", "dynamic"}, {"factor", 2.0}}, {"c.json", "rope_scaling", "dynamic"});
  json g = j;
  g["topk_method"] = "group_limited_greedy";
  g["n_group"] = 3;  // 8 experts do not split into 3 groups
  expect_error([&] { parse_hf_config(g.dump(), "c.json"); }, {"c.json", "n_group"});
  g["n_group"] = 4;
  g["topk_group"] = 5;
  expect_error([&] { parse_hf_config(g.dump(), "c.json"); }, {"c.json", "topk_group"});
  json v3 = minimal("deepseek_v3");
  v3["topk_method"] = "greedy";
  expect_error([&] { parse_hf_config(v3.dump(), "c.json"); }, {"c.json", "topk_method", "noaux_tc"});
}

// V2-Lite's yarn over the fixture's rotary width 8 (theta 1e4, factor 40, beta 32/1 over 4096
// positions): correction dims 8·ln(4096/(2π·32))/(2 ln 1e4) = 1.31 -> floor 1 and
// 8·ln(4096/2π)/(2 ln 1e4) = 2.81 -> ceil 3, so frequency 0 and 1 extrapolate, 2 is the half-half
// mix and 3 interpolates (÷ 40). attention_factor mscale(40, .707) / mscale(40, .707) = 1.
TEST(DeepseekRope, V2LiteYarnTable) {
  RopeScaling rs;
  rs.kind = RopeScalingKind::Yarn;
  rs.factor = 40;
  rs.original_max_position_embeddings = 4096;
  rs.mscale = rs.mscale_all_dim = 0.707;
  const RopeTable t = rope_table(1e4, 8, rs, 163840);
  const double f[4] = {1.0, std::pow(1e4, -0.25), std::pow(1e4, -0.5), std::pow(1e4, -0.75)};
  ASSERT_EQ(t.inv_freq.size(), 4u);
  EXPECT_NEAR(t.inv_freq[0], f[0], 1e-15);
  EXPECT_NEAR(t.inv_freq[1], f[1], 1e-15);
  EXPECT_NEAR(t.inv_freq[2], 0.5 * f[2] + 0.5 * f[2] / 40.0, 1e-15);
  EXPECT_NEAR(t.inv_freq[3], f[3] / 40.0, 1e-15);
  EXPECT_DOUBLE_EQ(t.attention_factor, 1.0);
  EXPECT_DOUBLE_EQ(yarn_softmax_factor(rs), std::pow(0.1 * 0.707 * std::log(40.0) + 1.0, 2));
  EXPECT_DOUBLE_EQ(yarn_softmax_factor(RopeScaling{}), 1.0);
}

// The latent cache: what make_cache / make_paged_cache allocate under KvCache is exactly
// (kv_lora_rank + qk_rope_head_dim) · layers · 4 bytes per position (480 for the fixtures), not
// the 2 · H · (Dn+Dr) · layers · 4 = 2304 per-head keys and values would take.
TEST(DeepseekKvCache, LatentBytesPerToken) {
  for (const char* fam : {"deepseek_v2", "deepseek_v3"}) {
    if (!std::filesystem::exists(fixture(fam))) GTEST_SKIP() << "SKIPPED: no fixture";
    Model m = Model::load(fixture(fam));
    const ModelConfig& c = m.config();
    const int64_t want = (c.kv_lora_rank + c.qk_rope_head_dim) * c.n_layer * 4;
    EXPECT_EQ(want, 480) << fam;
    EXPECT_EQ(m.kv_bytes_per_token(), want) << fam;
    const int64_t before = mem_stats().current[int(Device::CPU)][int(MemCategory::KvCache)];
    {
      KVCache kv = m.make_cache(3, 17);
      EXPECT_EQ(mem_stats().current[int(Device::CPU)][int(MemCategory::KvCache)] - before, 3 * 17 * want) << fam;
      KVCache paged = m.make_paged_cache(2, 5, 16);
      EXPECT_EQ(mem_stats().current[int(Device::CPU)][int(MemCategory::KvCache)] - before, (3 * 17 + 5 * 16) * want)
          << fam;
    }
    EXPECT_EQ(mem_stats().current[int(Device::CPU)][int(MemCategory::KvCache)], before);
  }
}

// DeepSeek-V3's aux-loss-free balancing: with the router skewed towards experts 0 and 1 (a
// selection bias of +0.3 on sigmoid scores of ~0.5), repeated updates b_e += γ·sign(mean − load_e)
// (the weights untouched) spread the fixture batch's tokens over the experts again.
TEST(DeepseekBiasBalance, SkewedRouterGetsMoreBalanced) {
  if (!std::filesystem::exists(fixture("deepseek_v3"))) GTEST_SKIP() << "SKIPPED: no fixture";
  Model m = Model::load(fixture("deepseek_v3"));
  const ModelConfig& c = m.config();
  for (int64_t l = 0; l < c.n_layer; ++l) {
    LayerWeights& lw = m.mutable_weights().layers[size_t(l)];
    if (!lw.is_moe) continue;
    Tensor b = Tensor::zeros({c.n_expert}, DType::F32, MemCategory::Weights);
    b.data<float>()[0] = b.data<float>()[1] = 0.3f;
    lw.router_bias = b;
  }
  auto batch = SafetensorsFile::open(fixture("deepseek_v3") + "/batch.safetensors");
  const Tensor ids = batch->tensor("input_ids", MemCategory::Workspace);
  // max load / mean load over the MoE layers (1 = perfectly balanced; K·T / mean = E at worst).
  auto imbalance = [&](std::vector<std::vector<double>>* load) {
    const StepLosses r = forward_backward(m, ids, ids, nullptr, LossOptions{});
    double worst = 0;
    load->clear();
    for (const RouterStats& st : r.router) {
      std::vector<double> n(st.count.begin(), st.count.end());
      double mean = 0, mx = 0;
      for (double v : n) mean += v / double(n.size()), mx = std::max(mx, v);
      worst = std::max(worst, mx / mean);
      load->push_back(n);
    }
    return worst;
  };
  std::vector<std::vector<double>> load;
  const double before = imbalance(&load);
  EXPECT_GT(before, 3.0) << "the skew should pile tokens onto experts 0 and 1";
  // One update moves each bias by exactly ±γ (or 0 at the mean) against its load.
  const double gamma = 0.01;
  std::vector<float> b0 = m.weights().layers[1].router_bias.to_f32_vector();
  update_router_bias(c, m.mutable_weights(), load, gamma);
  std::vector<float> b1 = m.weights().layers[1].router_bias.to_f32_vector();
  double mean = 0;
  for (double v : load[0]) mean += v / double(load[0].size());
  for (int64_t e = 0; e < c.n_expert; ++e) {
    const double want = load[0][size_t(e)] < mean ? gamma : load[0][size_t(e)] > mean ? -gamma : 0.0;
    EXPECT_NEAR(double(b1[size_t(e)]) - double(b0[size_t(e)]), want, 1e-7) << "expert " << e;
  }
  for (int step = 0; step < 60; ++step) {
    imbalance(&load);
    update_router_bias(c, m.mutable_weights(), load, gamma);
  }
  const double after = imbalance(&load);
  std::printf("deepseek_v3 bias balancing: max/mean load %.2f -> %.2f\n", before, after);
  EXPECT_LT(after, before / 2);
  EXPECT_LT(after, 2.0);
}

// The tiny presets are the fixtures' shapes: every tensor HF wrote for them, by name and shape,
// and nothing else; the config round-trips through config.json.
TEST(DeepseekInit, TinyPresetsNameTheFixturesTensors) {
  for (const char* fam : {"deepseek_v2", "deepseek_v3"}) {
    if (!std::filesystem::exists(fixture(fam))) GTEST_SKIP() << "SKIPPED: no fixture";
    const ModelConfig c = preset_config(fam, "tiny");
    EXPECT_EQ(parse_hf_config(hf_config_to_json(c), "preset"), c) << fam;
    const ModelConfig fx = load_hf_config(fixture(fam) + "/config.json");
    EXPECT_EQ(c.q_lora_rank, fx.q_lora_rank);
    EXPECT_EQ(c.topk_method, fx.topk_method);
    EXPECT_EQ(c.n_shared_experts, fx.n_shared_experts);
    auto file = SafetensorsFile::open(fixture(fam) + "/model.safetensors");
    std::map<std::string, Shape> want;
    for (const SafetensorsInfo& info : file->tensors()) want[info.name] = info.shape;
    std::map<std::string, Shape> got;
    for (auto& [name, t] : random_weights(c, 1, DType::F32)) {
      got[name] = t.shape();
      if (name.ends_with("e_score_correction_bias")) {
        EXPECT_EQ(t.to_f32_vector(), std::vector<float>(8, 0.0f));
      }
    }
    EXPECT_EQ(got, want) << fam;
  }
  for (const char* preset : {"small", "medium"})
    for (const char* fam : {"deepseek_v2", "deepseek_v3"}) {
      const ModelConfig c = preset_config(fam, preset);
      EXPECT_EQ(parse_hf_config(hf_config_to_json(c), "preset"), c) << fam << "/" << preset;
    }
  expect_error([] { preset_config("deepseek_v3", "8x7b"); }, {"8x7b", "deepseek_v3"});
}

// e4m3 from its definition (OCP FP8 E4M3, the "fn" variant torch.float8_e4m3fn is): sign bit 7,
// exponent bits 6..3 with bias 7, mantissa bits 2..0; exponent 0 is subnormal (m/8 · 2^-6);
// S.1111.111 is NaN and there is no infinity.
double e4m3_definition(int code) {
  const int s = code >> 7, e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::nan("");
  const double mag = e == 0 ? (m / 8.0) * std::pow(2.0, -6) : (1.0 + m / 8.0) * std::pow(2.0, e - 7);
  return s ? -mag : mag;
}

TEST(Fp8, AllCodesFromTheDefinition) {
  int nans = 0;
  for (int c = 0; c < 256; ++c) {
    const float got = e4m3_value(uint8_t(c));
    const double want = e4m3_definition(c);
    if (std::isnan(want)) {
      EXPECT_TRUE(std::isnan(got)) << "code " << c;
      ++nans;
      continue;
    }
    const float wf = static_cast<float>(want);
    EXPECT_EQ(double(wf), want) << "every e4m3 value is exact in f32";
    EXPECT_EQ(std::memcmp(&got, &wf, sizeof got), 0) << "code " << c << ": " << got << " vs " << want;
  }
  EXPECT_EQ(nans, 2);  // 0x7F and 0xFF only
  EXPECT_EQ(e4m3_value(0x38), 1.0f);
  EXPECT_EQ(e4m3_value(0x7E), 448.0f);  // the largest finite value
  EXPECT_EQ(e4m3_value(0xFE), -448.0f);
  EXPECT_EQ(e4m3_value(0x01), std::ldexp(1.0f, -9));  // the smallest subnormal
  EXPECT_EQ(e4m3_value(0x07), 7 * std::ldexp(1.0f, -9));
  EXPECT_EQ(e4m3_value(0x08), std::ldexp(1.0f, -6));  // the smallest normal
  EXPECT_TRUE(std::signbit(e4m3_value(0x80)) && e4m3_value(0x80) == 0.0f);
  EXPECT_TRUE(std::isnan(e4m3_value(0x7F)) && std::isnan(e4m3_value(0xFF)));
}

// 128×128 blocks over a [130, 260] weight: 2 × 3 blocks, the last row and column partial. Each
// element is its code's value times its block's factor, rounded once to f32.
TEST(Fp8, BlockScalesTileTheWeight) {
  const int64_t out = 130, in = 260;
  Tensor w = Tensor::empty({out, in}, DType::U8, MemCategory::Workspace);
  uint8_t* p = static_cast<uint8_t*>(w.raw());
  for (int64_t i = 0; i < out; ++i)
    for (int64_t j = 0; j < in; ++j) p[i * in + j] = uint8_t((i * 7 + j * 3) % 256);
  const std::vector<float> scales = {0.5f, 2.0f, 0.37f, 4.0f, 1.0f, 1.0f / 3.0f};
  Tensor s = Tensor::from_f32({2, 3}, scales, MemCategory::Workspace);
  Tensor d = fp8_block_dequantize(w, s, "test");
  ASSERT_EQ(d.shape(), Shape({out, in}));
  for (int64_t i = 0; i < out; ++i)
    for (int64_t j = 0; j < in; ++j) {
      const int code = (i * 7 + j * 3) % 256;
      const float got = d.data<float>()[i * in + j];
      const double want = e4m3_definition(code) * double(scales[size_t((i / 128) * 3 + j / 128)]);
      if (std::isnan(want)) {
        ASSERT_TRUE(std::isnan(got));
        continue;
      }
      ASSERT_EQ(got, static_cast<float>(want)) << i << "," << j;
    }
  // bf16 factors too (they widen exactly); a scale that does not tile the weight is named.
  Tensor sb = s.to_dtype(DType::BF16, MemCategory::Workspace);
  EXPECT_EQ(fp8_block_dequantize(w, sb, "test").data<float>()[0], e4m3_value(0) * 0.5f);
  expect_error([&] { fp8_block_dequantize(w, Tensor::from_f32({2, 2}, {1, 1, 1, 1}), "q_b_proj"); },
               {"q_b_proj", "weight_scale_inv", "[2, 3]"});
  expect_error([&] { fp8_block_dequantize(s, s, "x"); }, {"x", "e4m3"});
}

// A V3 checkpoint whose q_a_proj weights are stored as F8_E4M3 codes with a weight_scale_inv
// (the layout of the released DeepSeek-V3 files) loads to the decoded values; everything else is
// the fixture's.
TEST(Fp8, CheckpointWeightsDecodeAtLoad) {
  if (!std::filesystem::exists(fixture("deepseek_v3"))) GTEST_SKIP() << "SKIPPED: no fixture";
  auto src = SafetensorsFile::open(fixture("deepseek_v3") + "/model.safetensors");
  std::vector<std::pair<std::string, Tensor>> named;
  std::vector<std::string> fp8_names;
  Tensor codes;  // every layer's q_a_proj gets the same codes
  for (const SafetensorsInfo& info : src->tensors()) {
    if (info.name.ends_with("q_a_proj.weight")) {
      if (!codes.defined()) {
        codes = Tensor::empty(info.shape, DType::U8, MemCategory::Workspace);
        uint8_t* cp = static_cast<uint8_t*>(codes.raw());
        // Codes below 120 are finite (NaN is 0x7F / 0xFF only); every third one negative.
        for (int64_t i = 0; i < codes.numel(); ++i) cp[i] = uint8_t((i * 37 + 11) % 120 | (i % 3 == 0 ? 0x80 : 0));
      }
      named.emplace_back(info.name, codes);
      named.emplace_back(info.name + "_scale_inv", Tensor::from_f32({1, 1}, {0.0078125f}, MemCategory::Workspace));
      fp8_names.push_back(info.name);
    } else {
      named.emplace_back(info.name, src->tensor(info.name, MemCategory::Workspace));
    }
  }
  ASSERT_EQ(fp8_names.size(), 3u);
  const std::string dir = std::string(MOE_BINARY_DIR) + "/deepseek-fp8-test";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(dir);
  std::filesystem::copy_file(fixture("deepseek_v3") + "/config.json", dir + "/config.json");
  write_safetensors(dir + "/model.safetensors", named);
  // Re-label the codes' dtype U8 -> F8_E4M3 in the header (the data section is unchanged).
  {
    std::ifstream in(dir + "/model.safetensors", std::ios::binary);
    std::string bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    uint64_t n = 0;
    std::memcpy(&n, bytes.data(), 8);
    nlohmann::json h = nlohmann::json::parse(bytes.substr(8, n));
    for (const std::string& name : fp8_names) h[name]["dtype"] = "F8_E4M3";
    std::string hs = h.dump();
    while (hs.size() % 8) hs += ' ';
    const uint64_t m = hs.size();
    std::ofstream out(dir + "/model.safetensors", std::ios::binary | std::ios::trunc);
    out.write(reinterpret_cast<const char*>(&m), 8);
    out.write(hs.data(), std::streamsize(hs.size()));
    out.write(bytes.data() + 8 + n, std::streamsize(bytes.size() - 8 - n));
  }
  auto file = SafetensorsFile::open(dir + "/model.safetensors");
  EXPECT_TRUE(file->find(fp8_names[0])->fp8_e4m3);
  Model m = Model::load(dir);
  for (size_t l = 0; l < 3; ++l) {
    const std::vector<float> got = m.weights().layers[l].wq_a.to_f32_vector();
    ASSERT_EQ(int64_t(got.size()), codes.numel());
    for (int64_t i = 0; i < codes.numel(); ++i)
      ASSERT_EQ(got[size_t(i)], float(e4m3_definition(static_cast<const uint8_t*>(codes.raw())[i]) * 0.0078125))
          << "layer " << l << " element " << i;
  }
  // And it runs.
  KVCache kv = m.make_cache(1, 4);
  Tensor ids = Tensor::empty({1, 4}, DType::I32, MemCategory::Workspace);
  for (int i = 0; i < 4; ++i) ids.data<int32_t>()[i] = i + 3;
  for (float v : m.forward(ids, kv).logits.to_f32_vector()) ASSERT_TRUE(std::isfinite(v));
}

}  // namespace
}  // namespace moe
