// model_catalog.cpp — the catalog of well-known MoE models (config.json fields + sources).
//
// Each config below carries the size-determining fields of the model's HuggingFace config.json
// with their real names and values. Where a source is named "found in", the values were read
// from a public copy of that config.json (tests or tooling of other projects that embed it);
// every value also matches the model's published headline size, which tests/test_plan.cpp checks
// against hand-derived counts. Fields that do not change sizes (dropout, token ids, rope scaling)
// are left out.
#include "plan/model_catalog.h"

#include <tuple>

#include <algorithm>
#include <cctype>

#include "core/error.h"

namespace moe {

const std::vector<CatalogModel>& model_catalog() {
  static const std::vector<CatalogModel> kCatalog = {
      // Source: huggingface.co/mistralai/Mixtral-8x7B-v0.1/config.json (MixtralConfig dump of
      // "_name_or_path": "mistralai/Mixtral-8x7B-v0.1", found in a public notebook); 46.7B / 12.9B
      // per Mistral AI's announcement.
      {"Mixtral-8x7B", "mistralai/Mixtral-8x7B-v0.1", "46.7B total / 12.9B active", R"({
        "model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-05, "rope_theta": 1000000.0,
        "router_aux_loss_coef": 0.02, "tie_word_embeddings": false, "torch_dtype": "bfloat16"})"},
      // Source: huggingface.co/mistralai/Mixtral-8x22B-v0.1/config.json (found verbatim in a
      // public test's fake model_config); 141B / 39B per Mistral AI.
      {"Mixtral-8x22B", "mistralai/Mixtral-8x22B-v0.1", "141B total / 39B active", R"({
        "model_type": "mixtral", "hidden_size": 6144, "intermediate_size": 16384,
        "num_hidden_layers": 56, "num_attention_heads": 48, "num_key_value_heads": 8,
        "num_local_experts": 8, "num_experts_per_tok": 2, "vocab_size": 32000,
        "max_position_embeddings": 65536, "rms_norm_eps": 1e-05, "rope_theta": 1000000,
        "router_aux_loss_coef": 0.001, "torch_dtype": "bfloat16"})"},
      // Source: huggingface.co/Qwen/Qwen1.5-MoE-A2.7B/config.json (the Chat variant's fields found
      // in two public regression fixtures); 14.3B / 2.7B per the Qwen1.5-MoE blog.
      {"Qwen1.5-MoE-A2.7B", "Qwen/Qwen1.5-MoE-A2.7B", "14.3B total / 2.7B active", R"({
        "model_type": "qwen2_moe", "hidden_size": 2048, "intermediate_size": 5632,
        "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 60, "num_experts_per_tok": 4, "moe_intermediate_size": 1408,
        "shared_expert_intermediate_size": 5632, "norm_topk_prob": false, "decoder_sparse_step": 1,
        "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16"})"},
      // Source: huggingface.co/Qwen/Qwen2-57B-A14B/config.json (found verbatim as
      // QWEN2_57B_A14B_CONFIG in TensorRT-LLM's tests); 57B / 14B per the Qwen2 report.
      {"Qwen2-57B-A14B", "Qwen/Qwen2-57B-A14B", "57.4B total / 14.2B active", R"({
        "model_type": "qwen2_moe", "hidden_size": 3584, "intermediate_size": 18944,
        "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
        "num_experts": 64, "num_experts_per_tok": 8, "moe_intermediate_size": 2560,
        "shared_expert_intermediate_size": 20480, "norm_topk_prob": false, "decoder_sparse_step": 1,
        "vocab_size": 151936, "max_position_embeddings": 131072, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "tie_word_embeddings": false, "torch_dtype": "bfloat16"})"},
      // Source: huggingface.co/Qwen/Qwen3-30B-A3B/config.json (fields corroborated by slime's
      // qwen3-30B-A3B.sh: 48 layers, 2048 hidden, 32/4 heads, kv-channels 128, 128 experts top-8,
      // moe ffn 768, vocab 151936, untied); 30.5B / 3.3B per the Qwen3 model card.
      {"Qwen3-30B-A3B", "Qwen/Qwen3-30B-A3B", "30.5B total / 3.3B active", R"({
        "model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
        "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
        "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "attention_bias": false, "vocab_size": 151936, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16"})"},
      // Source: huggingface.co/Qwen/Qwen3-235B-A22B/config.json (fields found in public weight
      // converters and planners: 94 layers, 4096 hidden, 64/4 heads, head_dim 128, 128 experts
      // top-8, moe ffn 1536, vocab 151936); 235B / 22B per the Qwen3 model card.
      {"Qwen3-235B-A22B", "Qwen/Qwen3-235B-A22B", "235B total / 22B active", R"({
        "model_type": "qwen3_moe", "hidden_size": 4096, "intermediate_size": 12288,
        "num_hidden_layers": 94, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
        "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 1536,
        "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
        "attention_bias": false, "vocab_size": 151936, "max_position_embeddings": 40960,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": false,
        "torch_dtype": "bfloat16"})"},
      // Source: huggingface.co/allenai/OLMoE-1B-7B-0924/config.json (16 layers, 2048 hidden, 16
      // heads, 64 experts top-8, expert width 1024, vocab 50304; found in a public adapter test);
      // 6.9B / 1.3B per the OLMoE paper. q_norm/k_norm span all heads (OlmoeAttention).
      {"OLMoE-1B-7B", "allenai/OLMoE-1B-7B-0924", "6.9B total / 1.3B active", R"({
        "model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024,
        "num_hidden_layers": 16, "num_attention_heads": 16, "num_key_value_heads": 16,
        "num_experts": 64, "num_experts_per_tok": 8, "vocab_size": 50304,
        "max_position_embeddings": 4096, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
        "attention_bias": false, "tie_word_embeddings": false, "norm_topk_prob": false})"},
      // Source: huggingface.co/deepseek-ai/DeepSeek-V2-Lite/config.json (found in a public
      // architecture regression generator: q_lora_rank null, kv_lora_rank 512, 64 routed + 2
      // shared experts top-6, first_k_dense_replace 1); 15.7B / 2.4B per the DeepSeek-V2 paper.
      {"DeepSeek-V2-Lite", "deepseek-ai/DeepSeek-V2-Lite", "15.7B total / 2.4B active", R"({
        "model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
        "moe_intermediate_size": 1408, "num_hidden_layers": 27, "num_attention_heads": 16,
        "num_key_value_heads": 16, "n_routed_experts": 64, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "q_lora_rank": null, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
        "v_head_dim": 128, "vocab_size": 102400, "max_position_embeddings": 163840,
        "tie_word_embeddings": false, "attention_bias": false})"},
      // Source: huggingface.co/deepseek-ai/DeepSeek-V2/config.json (found verbatim as a sample
      // config in a public repo: 60 layers, 5120 hidden, 128 heads, q_lora 1536, 160 routed + 2
      // shared top-6); 236B / 21B per the DeepSeek-V2 paper.
      {"DeepSeek-V2", "deepseek-ai/DeepSeek-V2", "236B total / 21B active", R"({
        "model_type": "deepseek_v2", "hidden_size": 5120, "intermediate_size": 12288,
        "moe_intermediate_size": 1536, "num_hidden_layers": 60, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_routed_experts": 160, "n_shared_experts": 2,
        "num_experts_per_tok": 6, "first_k_dense_replace": 1, "moe_layer_freq": 1,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
        "v_head_dim": 128, "vocab_size": 102400, "max_position_embeddings": 163840,
        "tie_word_embeddings": false, "attention_bias": false})"},
      // Source: huggingface.co/deepseek-ai/DeepSeek-V3/config.json (fields found in public
      // annotated copies; README_WEIGHTS.md of the release: 671B main model, 36.6B activated
      // including the 0.9B output head, plus 1 MTP module); 671B / 37B per the V3 report.
      {"DeepSeek-V3", "deepseek-ai/DeepSeek-V3", "671B total / 37B active (+ MTP module)", R"({
        "model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
        "moe_intermediate_size": 2048, "num_hidden_layers": 61, "num_attention_heads": 128,
        "num_key_value_heads": 128, "n_routed_experts": 256, "n_shared_experts": 1,
        "num_experts_per_tok": 8, "first_k_dense_replace": 3, "moe_layer_freq": 1,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64, "qk_nope_head_dim": 128,
        "v_head_dim": 128, "topk_method": "noaux_tc", "num_nextn_predict_layers": 1,
        "vocab_size": 129280, "max_position_embeddings": 163840, "tie_word_embeddings": false})"},
      // Source: huggingface.co/openai/gpt-oss-20b/config.json (fields summarised in a public
      // architecture note: 24 layers alternating sliding(128)/full, 2880 hidden, 64/8 heads of 64,
      // 32 experts top-4, attention_bias true, vocab 201088, untied); 20.9B / 3.6B per the
      // gpt-oss model card. layer_types is the transformers default (even layers slide).
      {"gpt-oss-20b", "openai/gpt-oss-20b", "20.9B total / 3.6B active", R"({
        "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
        "num_hidden_layers": 24, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
        "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4,
        "sliding_window": 128, "attention_bias": true, "vocab_size": 201088,
        "max_position_embeddings": 131072, "rope_theta": 150000, "tie_word_embeddings": false})"},
      // Source: huggingface.co/openai/gpt-oss-120b/config.json (as 20b with 36 layers and 128
      // experts; GptOssConfig's defaults are this model); 116.8B / 5.1B per the model card.
      {"gpt-oss-120b", "openai/gpt-oss-120b", "116.8B total / 5.1B active", R"({
        "model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
        "num_hidden_layers": 36, "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
        "num_local_experts": 128, "num_experts_per_tok": 4, "experts_per_token": 4,
        "sliding_window": 128, "attention_bias": true, "vocab_size": 201088,
        "max_position_embeddings": 131072, "rope_theta": 150000, "tie_word_embeddings": false})"},
      // Source: huggingface.co/databricks/dbrx-base/config.json (found in a public MLX conversion
      // config: d_model 6144, 48 heads, 40 layers, kv_n_heads 8, ffn_hidden_size 10752, 16 experts
      // top-4, vocab 100352, untied); 132B / 36B per Databricks' announcement.
      {"DBRX", "databricks/dbrx-base", "132B total / 36B active", R"({
        "model_type": "dbrx", "d_model": 6144, "n_heads": 48, "n_layers": 40,
        "max_seq_len": 32768, "vocab_size": 100352,
        "attn_config": {"kv_n_heads": 8, "clip_qkv": 8, "rope_theta": 500000},
        "ffn_config": {"ffn_hidden_size": 10752, "moe_num_experts": 16, "moe_top_k": 4},
        "tie_word_embeddings": false})"},
      // Source: huggingface.co/google/switch-base-128/config.json (same fields as switch-base-64
      // and -256, whose config.json were read: d_model 768, d_ff 3072, d_kv 64, 12 heads, 12+12
      // layers, sparse step 2, vocab 32128, no tie_word_embeddings field = tied); ~7.4B total at
      // T5-Base compute per the Switch Transformers paper.
      {"Switch-Base-128", "google/switch-base-128", "7.4B total (T5-Base compute per token)", R"({
        "model_type": "switch_transformers", "d_model": 768, "d_ff": 3072, "d_kv": 64,
        "num_heads": 12, "num_layers": 12, "num_decoder_layers": 12, "num_experts": 128,
        "num_selected_experts": 1, "encoder_sparse_step": 2, "decoder_sparse_step": 2,
        "expert_capacity": 64, "relative_attention_num_buckets": 32, "router_bias": false,
        "is_gated_act": false, "vocab_size": 32128})"},
  };
  return kCatalog;
}

namespace {

std::string lower(const std::string& s) {
  std::string out = s;
  for (char& ch : out) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return out;
}

std::string repo_base(const std::string& repo) {
  auto p = repo.rfind('/');
  return p == std::string::npos ? repo : repo.substr(p + 1);
}

}  // namespace

int edit_distance(const std::string& a_in, const std::string& b_in) {
  const std::string a = lower(a_in), b = lower(b_in);
  std::vector<int> prev(b.size() + 1), cur(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) prev[j] = static_cast<int>(j);
  for (size_t i = 1; i <= a.size(); ++i) {
    cur[0] = static_cast<int>(i);
    for (size_t j = 1; j <= b.size(); ++j)
      cur[j] = std::min({prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (a[i - 1] == b[j - 1] ? 0 : 1)});
    std::swap(prev, cur);
  }
  return prev[b.size()];
}

std::string name_key(const std::string& s) {
  std::string k;
  for (char c : s)
    if (std::isalnum(static_cast<unsigned char>(c))) k += static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  return k;
}

std::vector<std::string> closest_names(const std::string& query, const std::vector<std::string>& candidates,
                                       size_t n) {
  // Compare on letters and digits only ("RTX-4090" ~ "RTX4090-24GB"); a candidate that contains
  // the query's key ranks before any that does not, then by edit distance.
  const std::string qk = name_key(query);
  std::vector<std::tuple<int, int, size_t>> scored;
  for (size_t i = 0; i < candidates.size(); ++i) {
    const std::string ck = name_key(candidates[i]);
    const bool contains = !qk.empty() && ck.find(qk) != std::string::npos;
    scored.push_back({contains ? 0 : 1, edit_distance(qk, ck), i});
  }
  std::stable_sort(scored.begin(), scored.end());
  std::vector<std::string> out;
  for (size_t i = 0; i < scored.size() && out.size() < n; ++i) out.push_back(candidates[std::get<2>(scored[i])]);
  return out;
}

const CatalogModel* find_catalog_model(const std::string& name) {
  const std::string q = lower(name);
  for (auto& e : model_catalog())
    if (q == lower(e.name) || q == lower(e.hf_repo) || q == lower(repo_base(e.hf_repo))) return &e;
  return nullptr;
}

PlanModel catalog_model(const std::string& name) {
  const CatalogModel* e = find_catalog_model(name);
  if (!e) {
    std::vector<std::string> names;
    for (auto& c : model_catalog()) names.push_back(c.name);
    auto best = closest_names(name, names, 3);
    std::string all;
    for (auto& n : names) all += (all.empty() ? "" : ", ") + n;
    MOE_FAIL("unknown model '%s': not a directory with config.json nor a catalog name. Did you mean %s? "
             "(catalog: %s)",
             name.c_str(), (best[0] + (best.size() > 1 ? " or " + best[1] : "")).c_str(), all.c_str());
  }
  PlanModel m = plan_model_from_hf_json(e->config_json, std::string("catalog:") + e->name);
  m.name = e->name;
  m.source = std::string("huggingface.co/") + e->hf_repo + "/config.json";
  return m;
}

}  // namespace moe
