// test_deepseek.cpp — the DeepSeek-V2/V3 families' own pieces, against values built from their
// definitions (the fixture-based checks are in the Reference / TrainReference / LoraReference
// suites):
//   - config.json: the fixtures' fields, DeepseekV2Config / DeepseekV3Config defaults, errors
//     naming the field;
//   - V2-Lite's YaRN frequencies for the fixture's rotary width (hand-derived correction range),
//     and V3's softmax factor mscale(40, 1)²;
//   - the MLA latent KV cache: (kv_lora_rank + qk_rope_head_dim) · layers · 4 bytes per token, as
//     the memory tracker measures it, contiguous and paged.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <functional>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/memory.h"
#include "core/rope_scaling.h"
#include "io/hf_config.h"
#include "model/mla_block.h"
#include "model/model.h"

namespace moe {
namespace {

using json = nlohmann::json;

void expect_error(const std::function<void()>& fn, std::initializer_list<const char*> parts) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "expected moe::Error";
}

std::string fixture(const std::string& fam) { return std::string(MOE_FIXTURES_DIR) + "/" + fam; }

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

}  // namespace
}  // namespace moe
