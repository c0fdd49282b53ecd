// test_hf_config.cpp — config.json parsing for mixtral / qwen2_moe / qwen3_moe / olmoe against the
// reference fixtures, the to_json round trip, per-family defaults and rules, and bad input.
#include <gtest/gtest.h>

#include <functional>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/hf_config.h"

using namespace moe;
using nlohmann::json;

namespace {

void expect_error(const std::function<void()>& fn, std::initializer_list<const char*> parts) {
  try {
    fn();
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "expected moe::Error";
}

std::string fixture_config(const char* arch) { return std::string(MOE_FIXTURES_DIR) + "/" + arch + "/config.json"; }

// A minimal valid qwen2_moe config, for tests that tweak one field.
json qwen2_base() {
  return json{{"model_type", "qwen2_moe"},
              {"vocab_size", 100},
              {"hidden_size", 32},
              {"intermediate_size", 64},
              {"num_hidden_layers", 6},
              {"num_attention_heads", 4},
              {"num_experts", 4},
              {"num_experts_per_tok", 2},
              {"moe_intermediate_size", 16},
              {"shared_expert_intermediate_size", 32}};
}

ModelConfig parse(const json& j) { return parse_hf_config(j.dump(), "cfg.json"); }

}  // namespace

// Expected values below are read off /work/shared/fixtures/*/config.json.
TEST(HfConfig, MixtralFixture) {
  ModelConfig c = load_hf_config(fixture_config("mixtral"));
  EXPECT_EQ(c.model_type, "mixtral");
  EXPECT_EQ(c.vocab_size, 256);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.n_layer, 2);
  EXPECT_EQ(c.n_head, 4);
  EXPECT_EQ(c.n_head_kv, 2);
  EXPECT_EQ(c.head_dim, 16);  // "head_dim": null -> hidden / heads
  EXPECT_EQ(c.intermediate_size, 128);
  EXPECT_EQ(c.moe_intermediate_size, 128);
  EXPECT_EQ(c.shared_expert_intermediate_size, 0);
  EXPECT_EQ(c.n_expert, 8);
  EXPECT_EQ(c.n_expert_used, 2);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_FALSE(c.attn_qkv_bias);
  EXPECT_FALSE(c.attn_o_bias);
  EXPECT_EQ(c.qk_norm, QkNormKind::None);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.02);
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_id, 2);
  EXPECT_EQ(c.torch_dtype, DType::F32);
  EXPECT_TRUE(c.layer_is_moe(0));
  EXPECT_TRUE(c.layer_is_moe(1));
}

TEST(HfConfig, Qwen2MoeFixture) {
  ModelConfig c = load_hf_config(fixture_config("qwen2_moe"));
  EXPECT_EQ(c.model_type, "qwen2_moe");
  EXPECT_EQ(c.vocab_size, 256);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.n_layer, 2);
  EXPECT_EQ(c.n_head, 4);
  EXPECT_EQ(c.n_head_kv, 2);
  EXPECT_EQ(c.head_dim, 16);
  EXPECT_EQ(c.intermediate_size, 128);
  EXPECT_EQ(c.moe_intermediate_size, 64);
  EXPECT_EQ(c.shared_expert_intermediate_size, 128);
  EXPECT_EQ(c.n_expert, 8);
  EXPECT_EQ(c.n_expert_used, 4);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_EQ(c.decoder_sparse_step, 1);
  EXPECT_TRUE(c.mlp_only_layers.empty());
  EXPECT_TRUE(c.attn_qkv_bias);
  EXPECT_FALSE(c.attn_o_bias);
  EXPECT_EQ(c.qk_norm, QkNormKind::None);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.02);
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_EQ(c.eos_token_id, -1);
  EXPECT_EQ(c.torch_dtype, DType::F32);
  EXPECT_TRUE(c.layer_is_moe(0));
  EXPECT_TRUE(c.layer_is_moe(1));
}

TEST(HfConfig, Qwen3MoeFixture) {
  ModelConfig c = load_hf_config(fixture_config("qwen3_moe"));
  EXPECT_EQ(c.model_type, "qwen3_moe");
  EXPECT_EQ(c.vocab_size, 256);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.n_layer, 2);
  EXPECT_EQ(c.n_head, 4);
  EXPECT_EQ(c.n_head_kv, 2);
  EXPECT_EQ(c.head_dim, 32);  // explicit, != hidden / heads
  EXPECT_EQ(c.intermediate_size, 128);
  EXPECT_EQ(c.moe_intermediate_size, 64);
  EXPECT_EQ(c.shared_expert_intermediate_size, 0);
  EXPECT_EQ(c.n_expert, 8);
  EXPECT_EQ(c.n_expert_used, 2);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_EQ(c.qk_norm, QkNormKind::PerHead);
  EXPECT_FALSE(c.attn_qkv_bias);
  EXPECT_FALSE(c.attn_o_bias);
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-6);
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_EQ(c.eos_token_id, -1);
  EXPECT_TRUE(c.layer_is_moe(0));
  EXPECT_TRUE(c.layer_is_moe(1));
}

TEST(HfConfig, OlmoeFixture) {
  ModelConfig c = load_hf_config(fixture_config("olmoe"));
  EXPECT_EQ(c.model_type, "olmoe");
  EXPECT_EQ(c.vocab_size, 256);
  EXPECT_EQ(c.hidden_size, 64);
  EXPECT_EQ(c.n_layer, 2);
  EXPECT_EQ(c.n_head, 4);
  EXPECT_EQ(c.n_head_kv, 4);
  EXPECT_EQ(c.head_dim, 16);             // always hidden / heads
  EXPECT_EQ(c.intermediate_size, 32);    // the expert width
  EXPECT_EQ(c.moe_intermediate_size, 32);
  EXPECT_EQ(c.shared_expert_intermediate_size, 0);
  EXPECT_EQ(c.n_expert, 8);
  EXPECT_EQ(c.n_expert_used, 2);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_EQ(c.qk_norm, QkNormKind::Full);
  EXPECT_EQ(c.q_norm_dim(), 64);         // q_norm [H*Dh] = hidden_size
  EXPECT_EQ(c.k_norm_dim(), 64);         // k_norm [Hkv*Dh]
  EXPECT_FALSE(c.attn_qkv_bias);
  EXPECT_FALSE(c.attn_o_bias);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.02);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_EQ(c.bos_token_id, -1);  // null
  EXPECT_EQ(c.eos_token_id, 2);
  EXPECT_EQ(c.pad_token_id, 1);   // HF's padding_idx
  EXPECT_FALSE(c.tie_word_embeddings);
  EXPECT_TRUE(c.layer_is_moe(0));
  EXPECT_TRUE(c.layer_is_moe(1));
}

// OlmoeConfig's defaults (transformers configuration_olmoe.py) for the fields a config may omit,
// GQA (k_norm spans Hkv*Dh), and what to_json writes for HF.
TEST(HfConfig, OlmoeDefaultsAndJson) {
  json j = {{"model_type", "olmoe"},        {"vocab_size", 100},       {"hidden_size", 32},
            {"intermediate_size", 16},      {"num_hidden_layers", 3},  {"num_attention_heads", 4},
            {"num_key_value_heads", 2},     {"num_experts", 4},        {"num_experts_per_tok", 2}};
  ModelConfig c = parse(j);
  EXPECT_EQ(c.head_dim, 8);
  EXPECT_EQ(c.q_norm_dim(), 32);
  EXPECT_EQ(c.k_norm_dim(), 16);
  EXPECT_EQ(c.moe_intermediate_size, 16);
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_DOUBLE_EQ(c.rms_norm_eps, 1e-5);
  EXPECT_DOUBLE_EQ(c.router_aux_loss_coef, 0.01);
  EXPECT_EQ(c.max_position_embeddings, 4096);
  EXPECT_EQ(c.bos_token_id, -1);
  EXPECT_EQ(c.eos_token_id, 50279);
  EXPECT_EQ(c.pad_token_id, 1);
  for (int64_t l = 0; l < 3; ++l) EXPECT_TRUE(c.layer_is_moe(l));
  // null pad_token_id: no padding_idx (nn.Embedding(..., None)); renormalisation when asked.
  j["pad_token_id"] = nullptr;
  j["norm_topk_prob"] = true;
  j["attention_bias"] = true;
  j["head_dim"] = 8;  // allowed when it agrees with hidden / heads
  c = parse(j);
  EXPECT_EQ(c.pad_token_id, -1);
  EXPECT_TRUE(c.norm_topk_prob);
  EXPECT_TRUE(c.attn_qkv_bias);
  EXPECT_TRUE(c.attn_o_bias);
  const std::string text = hf_config_to_json(c);
  EXPECT_EQ(parse_hf_config(text, "rt"), c);
  const json out = json::parse(text);
  EXPECT_EQ(out["architectures"][0], "OlmoeForCausalLM");
  EXPECT_EQ(out["num_experts"], 4);
  EXPECT_EQ(out["intermediate_size"], 16);
  EXPECT_EQ(out["attention_bias"], true);
  EXPECT_EQ(out["norm_topk_prob"], true);
  EXPECT_TRUE(out.contains("clip_qkv") && out["clip_qkv"].is_null());
  EXPECT_TRUE(out["pad_token_id"].is_null());
  // Fields OlmoeConfig does not have are not written.
  for (const char* k : {"head_dim", "moe_intermediate_size", "mlp_only_layers", "decoder_sparse_step",
                        "num_local_experts", "qkv_bias", "shared_expert_intermediate_size"})
    EXPECT_FALSE(out.contains(k)) << k;
  // What an olmoe config cannot say is refused rather than lost.
  ModelConfig bad = c;
  bad.qk_norm = QkNormKind::PerHead;
  expect_error([&] { hf_config_to_json(bad); }, {"olmoe cannot express qk_norm"});
  bad = c;
  bad.moe_intermediate_size = 8;
  expect_error([&] { hf_config_to_json(bad); }, {"olmoe", "moe_intermediate_size == intermediate_size"});
}

// clip_qkv: null (every released OLMoE) loads; a value is refused naming the field, since the
// engine's attention does not clamp q/k/v.
TEST(HfConfig, OlmoeClipQkv) {
  json j = {{"model_type", "olmoe"},   {"vocab_size", 100},      {"hidden_size", 32}, {"intermediate_size", 16},
            {"num_hidden_layers", 1},  {"num_attention_heads", 4}, {"num_experts", 4}, {"num_experts_per_tok", 2},
            {"clip_qkv", nullptr}};
  EXPECT_EQ(parse(j).qk_norm, QkNormKind::Full);
  j["clip_qkv"] = 8.0;
  expect_error([&] { parse(j); }, {"cfg.json", "field 'clip_qkv' is 8", "not supported"});
  j["clip_qkv"] = 1;
  expect_error([&] { parse(j); }, {"field 'clip_qkv'"});
  // A head_dim other than hidden / heads would not fit q_norm [hidden_size].
  j["clip_qkv"] = nullptr;
  j["head_dim"] = 16;
  expect_error([&] { parse(j); }, {"cfg.json", "field 'head_dim' is 16", "= 8 wide"});
}

TEST(HfConfig, RoundTripThroughJson) {
  for (const char* arch : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}) {
    SCOPED_TRACE(arch);
    ModelConfig c = load_hf_config(fixture_config(arch));
    std::string text = hf_config_to_json(c);
    EXPECT_EQ(parse_hf_config(text, "roundtrip"), c);
    json j = json::parse(text);
    EXPECT_EQ(j["model_type"], arch);
    EXPECT_EQ(text.substr(0, 4), "{\n  ");  // pretty-printed, 2-space indent
  }
  EXPECT_EQ(json::parse(hf_config_to_json(load_hf_config(fixture_config("mixtral"))))["architectures"][0],
            "MixtralForCausalLM");
  EXPECT_EQ(json::parse(hf_config_to_json(load_hf_config(fixture_config("qwen2_moe"))))["architectures"][0],
            "Qwen2MoeForCausalLM");
  EXPECT_EQ(json::parse(hf_config_to_json(load_hf_config(fixture_config("qwen3_moe"))))["architectures"][0],
            "Qwen3MoeForCausalLM");
  EXPECT_EQ(json::parse(hf_config_to_json(load_hf_config(fixture_config("olmoe"))))["architectures"][0],
            "OlmoeForCausalLM");

  // Non-default values survive too.
  json j = qwen2_base();
  j["mlp_only_layers"] = {0, 4};
  j["decoder_sparse_step"] = 2;
  j["norm_topk_prob"] = true;
  j["qkv_bias"] = false;
  j["bos_token_id"] = 7;
  j["eos_token_id"] = json::array({9, 10});
  j["torch_dtype"] = "bfloat16";
  j["rms_norm_eps"] = 1e-5;
  j["rope_theta"] = 123456.5;
  j["tie_word_embeddings"] = true;
  ModelConfig c = parse(j);
  EXPECT_EQ(parse_hf_config(hf_config_to_json(c), "rt"), c);
  EXPECT_EQ(c.eos_token_id, 9);
  EXPECT_EQ(c.torch_dtype, DType::BF16);
}

TEST(HfConfig, Qwen2LayerIsMoe) {
  json j = qwen2_base();  // 6 layers
  j["decoder_sparse_step"] = 2;
  j["mlp_only_layers"] = {3};
  ModelConfig c = parse(j);
  // (l+1) % 2 == 0 -> layers 1, 3, 5; layer 3 is forced dense.
  std::vector<bool> expect = {false, true, false, false, false, true};
  for (int64_t l = 0; l < 6; ++l) EXPECT_EQ(c.layer_is_moe(l), expect[static_cast<size_t>(l)]) << "layer " << l;

  j = qwen2_base();
  j["mlp_only_layers"] = {0, 5};
  c = parse(j);
  for (int64_t l = 0; l < 6; ++l) EXPECT_EQ(c.layer_is_moe(l), l != 0 && l != 5) << "layer " << l;

  j = qwen2_base();
  j["num_experts"] = 0;  // a dense model
  c = parse(j);
  for (int64_t l = 0; l < 6; ++l) EXPECT_FALSE(c.layer_is_moe(l));
}

TEST(HfConfig, FamilyDefaultsAndVariants) {
  json j = qwen2_base();
  ModelConfig c = parse(j);
  EXPECT_EQ(c.n_head_kv, 4);  // defaults to num_attention_heads
  EXPECT_FALSE(c.norm_topk_prob);
  EXPECT_EQ(c.decoder_sparse_step, 1);
  EXPECT_TRUE(c.attn_qkv_bias);  // Qwen2 always has q/k/v biases
  EXPECT_DOUBLE_EQ(c.rope_theta, 10000.0);
  EXPECT_EQ(c.bos_token_id, -1);

  j["model_type"] = "qwen3_moe";
  j.erase("shared_expert_intermediate_size");
  j["attention_bias"] = true;
  j["dtype"] = "float16";  // newer transformers spelling
  c = parse(j);
  EXPECT_EQ(c.qk_norm, QkNormKind::PerHead);
  EXPECT_TRUE(c.attn_qkv_bias);
  EXPECT_TRUE(c.attn_o_bias);
  EXPECT_FALSE(c.norm_topk_prob);  // Qwen3MoeConfig default
  EXPECT_EQ(c.torch_dtype, DType::F16);

  j.erase("rope_theta");
  j["rope_parameters"] = {{"rope_type", "default"}, {"rope_theta", 5e5}};
  EXPECT_DOUBLE_EQ(parse(j).rope_theta, 5e5);

  json m = {{"model_type", "mixtral"},     {"vocab_size", 10},          {"hidden_size", 8},
            {"intermediate_size", 16},     {"num_hidden_layers", 1},    {"num_attention_heads", 2},
            {"num_local_experts", 4},      {"num_experts_per_tok", 2},  {"norm_topk_prob", false}};
  c = parse(m);
  EXPECT_TRUE(c.norm_topk_prob);  // Mixtral always renormalises, whatever the file says
  EXPECT_DOUBLE_EQ(c.rope_theta, 1e6);
  EXPECT_EQ(c.bos_token_id, 1);
  EXPECT_EQ(c.eos_token_id, 2);
  EXPECT_EQ(c.moe_intermediate_size, 16);
}

TEST(HfConfig, Errors) {
  expect_error([] { parse_hf_config("{\"model_type\": ", "bad.json"); }, {"bad.json: malformed JSON:"});
  expect_error([] { parse_hf_config("[1]", "arr.json"); }, {"arr.json", "object"});
  expect_error([] { parse_hf_config(R"({"model_type": "llama"})", "c.json"); },
               {"c.json: unsupported model_type 'llama' (supported: mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v2, deepseek_v3)"});
  expect_error([] { parse_hf_config(R"({"hidden_size": 4})", "c.json"); }, {"missing field 'model_type'"});
  expect_error([] { load_hf_config("/nonexistent/config.json"); }, {"/nonexistent/config.json", "cannot open"});

  auto without = [](const char* key) {
    json j = qwen2_base();
    j.erase(key);
    return j;
  };
  expect_error([&] { parse(without("hidden_size")); }, {"cfg.json", "missing field 'hidden_size'"});
  expect_error([&] { parse(without("num_experts")); }, {"missing field 'num_experts'"});
  expect_error([&] { parse(without("moe_intermediate_size")); }, {"missing field 'moe_intermediate_size'"});

  auto with = [](const char* key, json v) {
    json j = qwen2_base();
    j[key] = std::move(v);
    return j;
  };
  expect_error([&] { parse(with("hidden_size", "64")); }, {"'hidden_size' must be an integer"});
  expect_error([&] { parse(with("hidden_size", 0)); }, {"'hidden_size' must be positive"});
  expect_error([&] { parse(with("num_key_value_heads", 3)); }, {"not a multiple of num_key_value_heads 3"});
  expect_error([&] { parse(with("hidden_size", 30)); }, {"not divisible by num_attention_heads"});
  expect_error([&] { parse(with("num_experts_per_tok", 5)); }, {"num_experts_per_tok 5", "between 1 and"});
  expect_error([&] { parse(with("num_experts_per_tok", 0)); }, {"num_experts_per_tok 0"});
  expect_error([&] { parse(with("mlp_only_layers", json::array({6}))); }, {"mlp_only_layers", "layer 6"});
  expect_error([&] { parse(with("decoder_sparse_step", 0)); }, {"'decoder_sparse_step' must be positive"});
  expect_error([&] { parse(with("norm_topk_prob", 1)); }, {"'norm_topk_prob' must be true or false"});
  expect_error([&] { parse(with("torch_dtype", "int8")); }, {"torch_dtype", "unsupported dtype 'int8'"});
  expect_error([&] { parse(with("hidden_act", "gelu")); }, {"hidden_act"});
  expect_error([&] { parse(with("rope_scaling", json{{"type", "yarn"}, {"factor", 4.0}})); },
               {"rope_scaling", "yarn"});
  expect_error([&] { parse(with("bos_token_id", -3)); }, {"bos_token_id"});
}
