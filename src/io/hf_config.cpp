// hf_config.cpp — HuggingFace config.json <-> ModelConfig for mixtral, qwen2_moe, qwen3_moe,
// olmoe, gpt_oss, deepseek_v2 and deepseek_v3.
//
// Each family has its own field names and defaults in transformers (MixtralConfig,
// Qwen2MoeConfig, Qwen3MoeConfig, OlmoeConfig); a field absent from the file takes that class's
// default, so a config that loads in transformers means the same thing here. JSON null counts as
// absent (transformers writes "head_dim": null, "bos_token_id": null). Settings the engine cannot
// honour (another activation, RoPE scaling, OLMoE's clip_qkv) are errors rather than silently
// wrong models.
#include "io/hf_config.h"

#include <algorithm>
#include <cmath>
#include <nlohmann/json.hpp>

#include "core/file_util.h"
#include "core/json_util.h"

#include "core/error.h"

namespace moe {

namespace {

using json = nlohmann::json;

// transformers' defaults for fields a config may omit.
struct FamilyDefaults {
  double rope_theta;
  double rms_norm_eps;
  int64_t max_position_embeddings;
  double router_aux_loss_coef;
  int64_t bos_token_id;
  int64_t eos_token_id;
  int64_t pad_token_id;  // the embedding's padding_idx (its row gets no gradient)
};

FamilyDefaults family_defaults(const std::string& model_type) {
  if (model_type == "mixtral") return {1e6, 1e-5, 4096 * 32, 0.001, 1, 2, -1};
  if (model_type == "olmoe") return {10000.0, 1e-5, 4096, 0.01, -1, 50279, 1};
  if (model_type == "gpt_oss") return {150000.0, 1e-5, 131072, 0.9, -1, -1, -1};  // GptOssConfig
  // DeepseekV2Config / DeepseekV3Config (their router_aux_loss_coef is unused: no aux loss).
  if (model_type == "deepseek_v2") return {10000.0, 1e-6, 2048, 0.0, 100000, 100001, -1};
  if (model_type == "deepseek_v3") return {10000.0, 1e-6, 4096, 0.0, 0, 1, -1};
  return {10000.0, 1e-6, 32768, 0.001, -1, -1, -1};  // qwen2_moe, qwen3_moe
}

const char* architecture_name(const std::string& model_type) {
  if (model_type == "mixtral") return "MixtralForCausalLM";
  if (model_type == "qwen2_moe") return "Qwen2MoeForCausalLM";
  if (model_type == "qwen3_moe") return "Qwen3MoeForCausalLM";
  if (model_type == "olmoe") return "OlmoeForCausalLM";
  if (model_type == "gpt_oss") return "GptOssForCausalLM";
  if (model_type == "deepseek_v2") return "DeepseekV2ForCausalLM";
  if (model_type == "deepseek_v3") return "DeepseekV3ForCausalLM";
  return nullptr;
}

// The q/k norm each family's attention builds: Qwen3MoeAttention per head ([Dh]),
// OlmoeAttention over the whole q and k projections ([H*Dh], [Hkv*Dh]).
QkNormKind family_qk_norm(const std::string& model_type) {
  if (model_type == "qwen3_moe") return QkNormKind::PerHead;
  if (model_type == "olmoe") return QkNormKind::Full;
  return QkNormKind::None;
}

// Typed access to one config object; every error names the source and the field.
class Fields {
 public:
  Fields(const json& j, const std::string& what) : j_(j), what_(what) {}

  // The field's value, or nullptr when it is absent or null.
  const json* get(const char* key) const {
    auto it = j_.find(key);
    return it == j_.end() || it->is_null() ? nullptr : &*it;
  }

  // Whether the key is in the object at all (null included).
  bool present(const char* key) const { return j_.find(key) != j_.end(); }

  int64_t integer(const char* key) const {
    const json* v = get(key);
    MOE_CHECK(v, "%s: missing field '%s'", what_.c_str(), key);
    return as_integer(*v, key);
  }
  int64_t integer(const char* key, int64_t def) const {
    const json* v = get(key);
    return v ? as_integer(*v, key) : def;
  }
  double number(const char* key, double def) const {
    const json* v = get(key);
    if (!v) return def;
    MOE_CHECK(v->is_number(), "%s: field '%s' must be a number, got %s", what_.c_str(), key, json_brief(*v).c_str());
    return v->get<double>();
  }
  bool boolean(const char* key, bool def) const {
    const json* v = get(key);
    if (!v) return def;
    MOE_CHECK(v->is_boolean(), "%s: field '%s' must be true or false, got %s", what_.c_str(), key,
              json_brief(*v).c_str());
    return v->get<bool>();
  }
  std::vector<int64_t> integer_list(const char* key) const {
    std::vector<int64_t> out;
    const json* v = get(key);
    if (!v) return out;
    MOE_CHECK(v->is_array(), "%s: field '%s' must be a list of integers, got %s", what_.c_str(), key,
              json_brief(*v).c_str());
    for (const json& e : *v) out.push_back(as_integer(e, key));
    return out;
  }
  // bos/eos: null (none), an integer, or a list of integers of which the first is taken.
  int64_t token_id(const char* key, int64_t def) const {
    auto it = j_.find(key);
    if (it == j_.end()) return def;
    const json& v = *it;
    if (v.is_null()) return -1;
    int64_t id = -1;
    if (v.is_array()) {
      if (v.empty()) return -1;
      id = as_integer(v[0], key);
    } else {
      id = as_integer(v, key);
    }
    MOE_CHECK(id >= 0 && id < kMaxConfigVocab, "%s: field '%s' must be a token id in [0, %lld), got %lld",
              what_.c_str(), key, static_cast<long long>(kMaxConfigVocab), static_cast<long long>(id));
    return id;
  }

  // The "type"/"rope_type" of a RoPE settings object must be the plain default: scaled variants
  // (linear, dynamic, yarn, llama3, …) change the positions the model was trained with.
  void require_default_rope(const char* key) const {
    const json* v = get(key);
    if (!v) return;
    MOE_CHECK(v->is_object(), "%s: field '%s' must be an object, got %s", what_.c_str(), key, json_brief(*v).c_str());
    for (const char* tk : {"rope_type", "type"}) {
      auto t = v->find(tk);
      if (t == v->end() || t->is_null()) continue;
      MOE_CHECK(t->is_string() && t->get<std::string>() == "default",
                "%s: field '%s' asks for RoPE scaling %s; only unscaled RoPE is supported", what_.c_str(), key,
                json_brief(*t).c_str());
    }
  }

 private:
  int64_t as_integer(const json& v, const char* key) const {
    bool ok = v.is_number_integer() &&
              (!v.is_number_unsigned() || v.get<uint64_t>() <= static_cast<uint64_t>(INT64_MAX));
    MOE_CHECK(ok, "%s: field '%s' must be an integer, got %s", what_.c_str(), key, json_brief(v).c_str());
    return v.get<int64_t>();
  }

  const json& j_;
  const std::string& what_;
};

DType parse_torch_dtype(const Fields& f, const std::string& what) {
  // transformers >= 4.56 writes "dtype"; older versions "torch_dtype".
  const char* key = f.get("dtype") ? "dtype" : "torch_dtype";
  const json* v = f.get(key);
  if (!v) return DType::F32;
  MOE_CHECK(v->is_string(), "%s: field '%s' must be a string, got %s", what.c_str(), key, json_brief(*v).c_str());
  std::string s = v->get<std::string>();
  if (s == "float32") return DType::F32;
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16") return DType::F16;
  MOE_FAIL("%s: field '%s': unsupported dtype '%s' (expected float32, bfloat16 or float16)", what.c_str(), key,
           s.c_str());
}

const char* torch_dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "float32";
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    default: return nullptr;
  }
}

void check_positive(const std::string& what, const char* field, int64_t v) {
  MOE_CHECK(v > 0, "%s: field '%s' must be positive, got %lld", what.c_str(), field, static_cast<long long>(v));
}

void check_at_most(const std::string& what, const char* field, int64_t v, int64_t limit) {
  MOE_CHECK(v <= limit, "%s: field '%s' is %lld, above the limit of %lld", what.c_str(), field,
            static_cast<long long>(v), static_cast<long long>(limit));
}

// 1 <= v <= limit.
void check_size(const std::string& what, const char* field, int64_t v, int64_t limit) {
  check_positive(what, field, v);
  check_at_most(what, field, v, limit);
}

// rope_scaling (or v5's rope_parameters): absent or "default" = none, "yarn" with its fields
// (_compute_yarn_parameters); any other scaling is refused, naming it.
RopeScaling parse_rope_scaling(const Fields& f, const std::string& what) {
  const char* w = what.c_str();
  RopeScaling rs;
  const char* key = f.get("rope_scaling") ? "rope_scaling" : "rope_parameters";
  const json* v = f.get(key);
  if (!v) return rs;
  MOE_CHECK(v->is_object(), "%s: field '%s' must be an object, got %s", w, key, json_brief(*v).c_str());
  std::string type = "default";
  for (const char* tk : {"rope_type", "type"}) {
    auto t = v->find(tk);
    if (t == v->end() || t->is_null()) continue;
    MOE_CHECK(t->is_string(), "%s: field '%s.%s' must be a string, got %s", w, key, tk, json_brief(*t).c_str());
    type = t->get<std::string>();
    break;
  }
  if (type == "default") return rs;
  MOE_CHECK(type == "yarn", "%s: field '%s' asks for RoPE scaling \"%s\"; only \"yarn\" (or none) is supported", w,
            key, type.c_str());
  Fields rf(*v, what);
  rs.kind = RopeScalingKind::Yarn;
  rs.factor = rf.number("factor", 0);
  MOE_CHECK(rs.factor >= 1 && std::isfinite(rs.factor), "%s: field '%s.factor' must be >= 1, got %g", w, key,
            rs.factor);
  rs.beta_fast = rf.number("beta_fast", 32);
  rs.beta_slow = rf.number("beta_slow", 1);
  MOE_CHECK(rs.beta_fast > 0 && rs.beta_slow > 0 && std::isfinite(rs.beta_fast) && std::isfinite(rs.beta_slow),
            "%s: fields '%s.beta_fast' and 'beta_slow' must be positive, got %g and %g", w, key, rs.beta_fast,
            rs.beta_slow);
  rs.original_max_position_embeddings = rf.integer("original_max_position_embeddings", 0);
  MOE_CHECK(rs.original_max_position_embeddings >= 0 && rs.original_max_position_embeddings <= kMaxConfigPositions,
            "%s: field '%s.original_max_position_embeddings' is out of range (%lld)", w, key,
            static_cast<long long>(rs.original_max_position_embeddings));
  rs.truncate = rf.boolean("truncate", true);
  rs.attention_factor = rf.number("attention_factor", 0);
  rs.mscale = rf.number("mscale", 0);
  rs.mscale_all_dim = rf.number("mscale_all_dim", 0);
  for (auto [name, val] : {std::pair{"attention_factor", rs.attention_factor}, {"mscale", rs.mscale},
                           {"mscale_all_dim", rs.mscale_all_dim}})
    MOE_CHECK(val >= 0 && std::isfinite(val), "%s: field '%s.%s' must be >= 0, got %g", w, key, name, val);
  return rs;
}

// gpt_oss's attention and expert settings (GptOssConfig): sinks, router and expert biases and
// the clamped SwiGLU are always there; sliding_window with layer_types (default: sliding,
// full, sliding, ... from layer 0).
void parse_gpt_oss(const Fields& f, const std::string& what, ModelConfig* c) {
  const char* w = what.c_str();
  c->attn_sinks = c->router_bias = c->expert_bias = true;
  c->swiglu_alpha = 1.702;  // hard-coded in GptOssExperts
  c->swiglu_limit = f.number("swiglu_limit", 7.0);
  MOE_CHECK(c->swiglu_limit > 0 && std::isfinite(c->swiglu_limit), "%s: field 'swiglu_limit' must be positive, got %g",
            w, c->swiglu_limit);
  c->sliding_window = f.integer("sliding_window", 128);
  check_size(what, "sliding_window", c->sliding_window, kMaxConfigPositions);
  c->layer_sliding.assign(static_cast<size_t>(c->n_layer), false);
  const json* lt = f.get("layer_types");
  if (!lt) {
    for (int64_t l = 0; l < c->n_layer; ++l) c->layer_sliding[size_t(l)] = (l + 1) % 2 != 0;
    return;
  }
  MOE_CHECK(lt->is_array() && int64_t(lt->size()) == c->n_layer,
            "%s: field 'layer_types' must be a list of %lld layer types, got %s", w, static_cast<long long>(c->n_layer),
            json_brief(*lt).c_str());
  for (int64_t l = 0; l < c->n_layer; ++l) {
    const json& e = (*lt)[size_t(l)];
    const std::string t = e.is_string() ? e.get<std::string>() : "";
    MOE_CHECK(t == "sliding_attention" || t == "full_attention",
              "%s: field 'layer_types' entry %lld is %s; expected \"sliding_attention\" or \"full_attention\"", w,
              static_cast<long long>(l), json_brief(e).c_str());
    c->layer_sliding[size_t(l)] = t == "sliding_attention";
  }
}

// deepseek_v2 / deepseek_v3 (DeepseekV2Config, DeepseekV3Config of transformers 4.57): MLA ranks
// and head widths, dense first layers, shared and routed experts, the router's rules. The
// defaults are those classes' (V3's are the released model's). Fields HF accepts but never reads
// (aux_loss_alpha, seq_aux, moe_layer_freq, ep_size) are ignored as it ignores them.
void parse_deepseek(const Fields& f, const std::string& what, ModelConfig* c) {
  const char* w = what.c_str();
  const bool v3 = c->model_type == "deepseek_v3";
  // null means a full-rank q_proj (V2-Lite); an absent field takes the class default 1536.
  c->q_lora_rank = f.present("q_lora_rank") ? f.integer("q_lora_rank", 0) : 1536;
  if (c->q_lora_rank != 0) check_size(what, "q_lora_rank", c->q_lora_rank, kMaxConfigRank);
  c->kv_lora_rank = f.integer("kv_lora_rank", 512);
  c->qk_nope_head_dim = f.integer("qk_nope_head_dim", 128);
  c->qk_rope_head_dim = f.integer("qk_rope_head_dim", 64);
  c->v_head_dim = f.integer("v_head_dim", 128);
  check_size(what, "kv_lora_rank", c->kv_lora_rank, kMaxConfigRank);
  check_size(what, "qk_nope_head_dim", c->qk_nope_head_dim, kMaxConfigHeadDim);
  check_size(what, "qk_rope_head_dim", c->qk_rope_head_dim, kMaxConfigHeadDim);
  check_size(what, "v_head_dim", c->v_head_dim, kMaxConfigHeadDim);
  MOE_CHECK(c->qk_rope_head_dim % 2 == 0, "%s: field 'qk_rope_head_dim' must be even, got %lld", w,
            static_cast<long long>(c->qk_rope_head_dim));
  // HF sets head_dim = qk_rope_head_dim (the rotary width); a different head_dim in the file
  // would resize the rotary tables of the HF model, so it is refused rather than guessed.
  if (f.get("head_dim")) {
    const int64_t hd = f.integer("head_dim");
    MOE_CHECK(hd == c->qk_rope_head_dim,
              "%s: field 'head_dim' is %lld; %s sets it to qk_rope_head_dim (%lld) (omit it)", w,
              static_cast<long long>(hd), c->model_type.c_str(), static_cast<long long>(c->qk_rope_head_dim));
  }
  c->head_dim = c->qk_rope_head_dim;
  // MLA makes one key per head: grouped kv heads would duplicate heads in HF (repeat_kv).
  MOE_CHECK(c->n_head_kv == c->n_head, "%s: field 'num_key_value_heads' (%lld) must equal num_attention_heads (%lld) for MLA",
            w, static_cast<long long>(c->n_head_kv), static_cast<long long>(c->n_head));
  c->rope_interleave = v3 ? f.boolean("rope_interleave", true) : true;  // V2 always rotates complex pairs

  c->n_expert = f.integer("n_routed_experts", v3 ? 256 : 0);
  MOE_CHECK(c->n_expert >= 0, "%s: field 'n_routed_experts' must be >= 0, got %lld", w,
            static_cast<long long>(c->n_expert));
  check_at_most(what, "n_routed_experts", c->n_expert, kMaxConfigExperts);
  c->moe_intermediate_size = f.integer("moe_intermediate_size", v3 ? 2048 : 1407);
  check_size(what, "moe_intermediate_size", c->moe_intermediate_size, kMaxConfigFfn);
  c->n_shared_experts = f.integer("n_shared_experts", v3 ? 1 : 0);
  MOE_CHECK(c->n_shared_experts >= 0, "%s: field 'n_shared_experts' must be >= 0, got %lld", w,
            static_cast<long long>(c->n_shared_experts));
  check_at_most(what, "n_shared_experts", c->n_shared_experts, kMaxConfigExperts);
  c->shared_expert_intermediate_size = c->n_shared_experts * c->moe_intermediate_size;
  check_at_most(what, "n_shared_experts * moe_intermediate_size", c->shared_expert_intermediate_size, kMaxConfigFfn);
  c->first_k_dense_replace = f.integer("first_k_dense_replace", v3 ? 3 : 0);
  MOE_CHECK(c->first_k_dense_replace >= 0 && c->first_k_dense_replace <= c->n_layer,
            "%s: field 'first_k_dense_replace' must be in [0, num_hidden_layers=%lld], got %lld", w,
            static_cast<long long>(c->n_layer), static_cast<long long>(c->first_k_dense_replace));
  c->routed_scaling_factor = f.number("routed_scaling_factor", v3 ? 2.5 : 1.0);
  MOE_CHECK(c->routed_scaling_factor > 0 && std::isfinite(c->routed_scaling_factor),
            "%s: field 'routed_scaling_factor' must be positive, got %g", w, c->routed_scaling_factor);
  // DeepseekV2MoEGate never renormalises (norm_topk_prob is stored, not read); V3 does as told.
  c->norm_topk_prob = v3 ? f.boolean("norm_topk_prob", true) : false;
  if (const json* sf = f.get("scoring_func")) {
    // V2 always takes a softmax and V3 a sigmoid whatever this says (HF reads neither); only
    // the two names HF knows are accepted.
    const std::string v = sf->is_string() ? sf->get<std::string>() : "";
    MOE_CHECK(v == "softmax" || v == "sigmoid", "%s: field 'scoring_func' is %s; expected \"softmax\" or \"sigmoid\"",
              w, json_brief(*sf).c_str());
  }
  std::string method = v3 ? "noaux_tc" : "greedy";
  if (const json* tm = f.get("topk_method")) {
    MOE_CHECK(tm->is_string(), "%s: field 'topk_method' must be a string, got %s", w, json_brief(*tm).c_str());
    method = tm->get<std::string>();
  }
  if (v3) {
    MOE_CHECK(method == "noaux_tc", "%s: field 'topk_method' is \"%s\"; deepseek_v3 routes with \"noaux_tc\" only", w,
              method.c_str());
    c->topk_method = RouterTopk::NoauxTc;
  } else if (method == "greedy") {
    c->topk_method = RouterTopk::Greedy;
  } else {
    MOE_CHECK(method == "group_limited_greedy",
              "%s: field 'topk_method' is \"%s\"; deepseek_v2 supports \"greedy\" and \"group_limited_greedy\"", w,
              method.c_str());
    c->topk_method = RouterTopk::GroupLimitedGreedy;
  }
  c->n_group = f.integer("n_group", v3 ? 8 : 1);
  c->topk_group = f.integer("topk_group", v3 ? 4 : 1);
  check_size(what, "n_group", c->n_group, kMaxConfigExperts);
  check_size(what, "topk_group", c->topk_group, kMaxConfigExperts);
  if (c->topk_method != RouterTopk::Greedy && c->n_expert > 0) {
    MOE_CHECK(c->n_expert % c->n_group == 0, "%s: field 'n_group' (%lld) must divide n_routed_experts (%lld)", w,
              static_cast<long long>(c->n_group), static_cast<long long>(c->n_expert));
    MOE_CHECK(c->topk_group <= c->n_group, "%s: field 'topk_group' (%lld) exceeds n_group (%lld)", w,
              static_cast<long long>(c->topk_group), static_cast<long long>(c->n_group));
    MOE_CHECK(c->topk_group * (c->n_expert / c->n_group) >= c->n_expert_used,
              "%s: topk_group %lld groups of %lld experts hold fewer than num_experts_per_tok %lld", w,
              static_cast<long long>(c->topk_group), static_cast<long long>(c->n_expert / c->n_group),
              static_cast<long long>(c->n_expert_used));
    MOE_CHECK(c->topk_method != RouterTopk::NoauxTc || c->n_expert / c->n_group >= 2,
              "%s: noaux_tc scores a group by its two best experts; groups of %lld are too small", w,
              static_cast<long long>(c->n_expert / c->n_group));
  }
  c->decoder_sparse_step = 1;
  c->router_aux_loss_coef = 0;  // HF's DeepSeek models return no load-balancing loss
  for (const char* key : {"attention_bias", "mlp_bias"})
    MOE_CHECK(!f.boolean(key, false), "%s: field '%s' is true; DeepSeek layers with biases are not supported", w, key);
}

// rope_scaling as config.json writes it: null, or the YaRN object with the fields that are set.
json rope_scaling_json(const RopeScaling& r) {
  if (r.kind != RopeScalingKind::Yarn) return nullptr;
  json rs = {{"rope_type", "yarn"}, {"factor", r.factor}, {"beta_fast", r.beta_fast},
             {"beta_slow", r.beta_slow}, {"truncate", r.truncate}};
  if (r.original_max_position_embeddings > 0) rs["original_max_position_embeddings"] = r.original_max_position_embeddings;
  if (r.attention_factor > 0) rs["attention_factor"] = r.attention_factor;
  if (r.mscale > 0) rs["mscale"] = r.mscale;
  if (r.mscale_all_dim > 0) rs["mscale_all_dim"] = r.mscale_all_dim;
  return rs;
}

}  // namespace

int64_t ModelConfig::q_norm_dim() const {
  return qk_norm == QkNormKind::PerHead ? head_dim : qk_norm == QkNormKind::Full ? n_head * head_dim : 0;
}

int64_t ModelConfig::k_norm_dim() const {
  return qk_norm == QkNormKind::PerHead ? head_dim : qk_norm == QkNormKind::Full ? n_head_kv * head_dim : 0;
}

bool ModelConfig::layer_is_moe(int64_t l) const {
  if (n_expert <= 0 || l < first_k_dense_replace) return false;
  if (model_type == "mixtral") return true;  // every Mixtral layer is sparse
  if (std::find(mlp_only_layers.begin(), mlp_only_layers.end(), l) != mlp_only_layers.end()) return false;
  return decoder_sparse_step > 0 && (l + 1) % decoder_sparse_step == 0;
}

ModelConfig parse_hf_config(const std::string& json_text, const std::string& what) {
  const char* w = what.c_str();
  json j = parse_json_object(json_text, what);
  Fields f(j, what);

  ModelConfig c;
  const json* mt = f.get("model_type");
  MOE_CHECK(mt, "%s: missing field 'model_type'", w);
  MOE_CHECK(mt->is_string(), "%s: field 'model_type' must be a string, got %s", w, json_brief(*mt).c_str());
  c.model_type = mt->get<std::string>();
  MOE_CHECK(architecture_name(c.model_type),
            "%s: unsupported model_type '%s' (supported: mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v2, "
            "deepseek_v3)", w,
            c.model_type.c_str());
  const bool mixtral = c.model_type == "mixtral";
  const bool qwen2 = c.model_type == "qwen2_moe";
  const bool olmoe = c.model_type == "olmoe";
  const bool gpt_oss = c.model_type == "gpt_oss";
  const bool deepseek = c.model_type == "deepseek_v2" || c.model_type == "deepseek_v3";
  const FamilyDefaults def = family_defaults(c.model_type);

  if (const json* act = f.get("hidden_act")) {
    MOE_CHECK(act->is_string() && act->get<std::string>() == "silu",
              "%s: field 'hidden_act' is %s; only \"silu\" (SwiGLU experts) is supported", w, json_brief(*act).c_str());
  }
  if (gpt_oss || deepseek) {
    c.rope_scaling = parse_rope_scaling(f, what);
  } else {
    f.require_default_rope("rope_scaling");
    f.require_default_rope("rope_parameters");
  }

  // Shared transformer fields.
  c.vocab_size = f.integer("vocab_size");
  c.hidden_size = f.integer("hidden_size");
  c.n_layer = f.integer("num_hidden_layers");
  c.n_head = f.integer("num_attention_heads");
  c.intermediate_size = f.integer("intermediate_size");
  check_size(what, "vocab_size", c.vocab_size, kMaxConfigVocab);
  check_size(what, "hidden_size", c.hidden_size, kMaxConfigHidden);
  check_size(what, "num_hidden_layers", c.n_layer, kMaxConfigLayers);
  check_size(what, "num_attention_heads", c.n_head, kMaxConfigHeads);
  check_size(what, "intermediate_size", c.intermediate_size, kMaxConfigFfn);
  c.n_head_kv = f.integer("num_key_value_heads", c.n_head);
  check_size(what, "num_key_value_heads", c.n_head_kv, kMaxConfigHeads);
  MOE_CHECK(c.n_head % c.n_head_kv == 0, "%s: num_attention_heads %lld is not a multiple of num_key_value_heads %lld",
            w, static_cast<long long>(c.n_head), static_cast<long long>(c.n_head_kv));
  if (deepseek) {
    // MLA head widths are their own fields (parse_deepseek sets head_dim to the rotary width).
  } else if (f.get("head_dim") && !olmoe) {
    c.head_dim = f.integer("head_dim");
    check_size(what, "head_dim", c.head_dim, kMaxConfigHeadDim);
  } else {
    MOE_CHECK(c.hidden_size % c.n_head == 0,
              "%s: hidden_size %lld is not divisible by num_attention_heads %lld (and no head_dim is given)", w,
              static_cast<long long>(c.hidden_size), static_cast<long long>(c.n_head));
    c.head_dim = c.hidden_size / c.n_head;
    check_at_most(what, "hidden_size / num_attention_heads", c.head_dim, kMaxConfigHeadDim);
  }
  if (olmoe && f.get("head_dim")) {
    // OlmoeAttention's q_norm spans hidden_size, so its heads are hidden / heads wide; another
    // head_dim would give q_norm a width the weights do not have.
    const int64_t hd = f.integer("head_dim");
    MOE_CHECK(hd == c.head_dim,
              "%s: field 'head_dim' is %lld, but olmoe heads are hidden_size / num_attention_heads = %lld wide", w,
              static_cast<long long>(hd), static_cast<long long>(c.head_dim));
  }

  // transformers v5 moves rope_theta into rope_parameters.
  c.rope_theta = def.rope_theta;
  if (f.get("rope_theta")) {
    c.rope_theta = f.number("rope_theta", def.rope_theta);
  } else if (const json* rp = f.get("rope_parameters")) {
    Fields rpf(*rp, what);
    c.rope_theta = rpf.number("rope_theta", def.rope_theta);
  }
  MOE_CHECK(c.rope_theta > 0 && std::isfinite(c.rope_theta), "%s: field 'rope_theta' must be positive, got %g", w, c.rope_theta);
  c.rms_norm_eps = f.number("rms_norm_eps", def.rms_norm_eps);
  MOE_CHECK(c.rms_norm_eps > 0 && std::isfinite(c.rms_norm_eps), "%s: field 'rms_norm_eps' must be positive, got %g", w, c.rms_norm_eps);
  c.tie_word_embeddings = f.boolean("tie_word_embeddings", false);
  c.max_position_embeddings = f.integer("max_position_embeddings", def.max_position_embeddings);
  check_size(what, "max_position_embeddings", c.max_position_embeddings, kMaxConfigPositions);
  c.bos_token_id = f.token_id("bos_token_id", def.bos_token_id);
  c.eos_token_id = f.token_id("eos_token_id", def.eos_token_id);
  c.pad_token_id = f.token_id("pad_token_id", def.pad_token_id);
  c.router_aux_loss_coef = f.number("router_aux_loss_coef", def.router_aux_loss_coef);
  MOE_CHECK(c.router_aux_loss_coef >= 0 && std::isfinite(c.router_aux_loss_coef), "%s: field 'router_aux_loss_coef' must be >= 0, got %g", w,
            c.router_aux_loss_coef);
  c.torch_dtype = parse_torch_dtype(f, what);

  // MoE fields, by family.
  const char* experts_key = mixtral || gpt_oss ? "num_local_experts" : deepseek ? "n_routed_experts" : "num_experts";
  if (deepseek) {
    c.n_expert_used = f.integer("num_experts_per_tok", c.model_type == "deepseek_v3" ? 8 : 0);
    parse_deepseek(f, what, &c);
  } else {
    c.n_expert = f.integer(experts_key);
    // GptOssConfig also knows experts_per_token (the original checkpoint's name).
    c.n_expert_used = gpt_oss && !f.get("num_experts_per_tok") ? f.integer("experts_per_token")
                                                                : f.integer("num_experts_per_tok");
  }
  if (deepseek) {
    // parsed above
  } else if (mixtral || olmoe || gpt_oss) {
    // Every layer is sparse and intermediate_size is the expert width (neither has a dense MLP).
    check_size(what, experts_key, c.n_expert, kMaxConfigExperts);
    c.moe_intermediate_size = c.intermediate_size;
    // MixtralSparseMoeBlock always renormalises; OlmoeSparseMoeBlock as the config says;
    // GptOssTopKRouter takes a softmax over the K selected logits, which is the renormalised
    // top-K of the softmax over all E.
    c.norm_topk_prob = mixtral || gpt_oss ? true : f.boolean("norm_topk_prob", false);
    c.decoder_sparse_step = 1;
  } else {
    MOE_CHECK(c.n_expert >= 0, "%s: field 'num_experts' must be >= 0, got %lld", w,
              static_cast<long long>(c.n_expert));
    check_at_most(what, "num_experts", c.n_expert, kMaxConfigExperts);
    c.moe_intermediate_size = f.integer("moe_intermediate_size");
    if (c.n_expert > 0) check_size(what, "moe_intermediate_size", c.moe_intermediate_size, kMaxConfigFfn);
    MOE_CHECK(c.moe_intermediate_size >= 0, "%s: field 'moe_intermediate_size' must be >= 0", w);
    check_at_most(what, "moe_intermediate_size", c.moe_intermediate_size, kMaxConfigFfn);
    c.norm_topk_prob = f.boolean("norm_topk_prob", false);
    c.decoder_sparse_step = f.integer("decoder_sparse_step", 1);
    check_positive(what, "decoder_sparse_step", c.decoder_sparse_step);
    MOE_CHECK(f.get("mlp_only_layers") == nullptr || f.get("mlp_only_layers")->size() <= size_t(c.n_layer),
              "%s: mlp_only_layers lists more entries than the model's %lld layers", w,
              static_cast<long long>(c.n_layer));
    c.mlp_only_layers = f.integer_list("mlp_only_layers");
    for (int64_t l : c.mlp_only_layers) {
      MOE_CHECK(l >= 0 && l < c.n_layer, "%s: mlp_only_layers names layer %lld, but the model has %lld layers", w,
                static_cast<long long>(l), static_cast<long long>(c.n_layer));
    }
  }
  if (c.n_expert > 0) {
    MOE_CHECK(c.n_expert_used >= 1 && c.n_expert_used <= c.n_expert,
              "%s: num_experts_per_tok %lld must be between 1 and %s %lld", w,
              static_cast<long long>(c.n_expert_used), experts_key, static_cast<long long>(c.n_expert));
  }

  if (qwen2) {
    // Qwen2-MoE always has a shared expert; its size has no sensible default, so it is required
    // (0 is accepted and means none).
    c.shared_expert_intermediate_size = f.integer("shared_expert_intermediate_size");
    MOE_CHECK(c.shared_expert_intermediate_size >= 0, "%s: field 'shared_expert_intermediate_size' must be >= 0", w);
    check_at_most(what, "shared_expert_intermediate_size", c.shared_expert_intermediate_size, kMaxConfigFfn);
    c.attn_qkv_bias = f.boolean("qkv_bias", true);  // Qwen2 attention has q/k/v biases
    c.attn_o_bias = false;
  } else if (gpt_oss) {
    c.attn_qkv_bias = c.attn_o_bias = f.boolean("attention_bias", true);  // GptOssConfig's default
  } else if (!mixtral && !deepseek) {  // qwen3_moe, olmoe
    c.attn_qkv_bias = c.attn_o_bias = f.boolean("attention_bias", false);
  }
  if (gpt_oss) parse_gpt_oss(f, what, &c);
  if (olmoe) {
    // OLMoE clamps q, k (after their norms) and v to +-clip_qkv before RoPE. The engine's
    // attention has no clamp (forward or backward), so a value is refused rather than ignored;
    // null, as in every released OLMoE, is the unclamped model.
    if (const json* v = f.get("clip_qkv"))
      MOE_FAIL("%s: field 'clip_qkv' is %s; clamping q/k/v is not supported (only null)", w, json_brief(*v).c_str());
  }
  c.qk_norm = family_qk_norm(c.model_type);
  return c;
}

int64_t ModelConfig::layer_window(int64_t l) const {
  return l >= 0 && l < int64_t(layer_sliding.size()) && layer_sliding[size_t(l)] ? sliding_window : 0;
}

ModelConfig load_hf_config(const std::string& path) { return parse_hf_config(read_file(path), path); }

std::string hf_config_to_json(const ModelConfig& c) {
  const char* arch = architecture_name(c.model_type);
  MOE_CHECK(arch, "hf_config_to_json: unsupported model_type '%s' (supported: mixtral, qwen2_moe, qwen3_moe, olmoe, "
            "gpt_oss, deepseek_v2, deepseek_v3)",
            c.model_type.c_str());
  const char* dt = torch_dtype_name(c.torch_dtype);
  MOE_CHECK(dt, "hf_config_to_json: torch_dtype %s has no HF spelling (expected f32, bf16 or f16)",
            dtype_name(c.torch_dtype));
  const bool mixtral = c.model_type == "mixtral";
  const bool qwen2 = c.model_type == "qwen2_moe";
  const bool olmoe = c.model_type == "olmoe";
  const bool gpt_oss = c.model_type == "gpt_oss";
  const bool deepseek = c.model_type == "deepseek_v2" || c.model_type == "deepseek_v3";
  const char* mt = c.model_type.c_str();
  // Settings a family's config cannot express would be lost on the way out; refuse them instead.
  MOE_CHECK(c.qk_norm == family_qk_norm(c.model_type), "hf_config_to_json: %s cannot express qk_norm=%d", mt,
            static_cast<int>(c.qk_norm));
  if (mixtral) {
    MOE_CHECK(!c.attn_qkv_bias && !c.attn_o_bias && c.shared_expert_intermediate_size == 0 && c.norm_topk_prob &&
                  c.mlp_only_layers.empty() && c.decoder_sparse_step == 1 &&
                  c.moe_intermediate_size == c.intermediate_size,
              "hf_config_to_json: mixtral has no attention biases, no shared expert, always renormalised top-k, "
              "every layer MoE and moe_intermediate_size == intermediate_size");
  } else if (qwen2) {
    MOE_CHECK(!c.attn_o_bias, "hf_config_to_json: qwen2_moe cannot express an o_proj bias");
  } else if (olmoe) {
    MOE_CHECK(c.attn_qkv_bias == c.attn_o_bias && c.shared_expert_intermediate_size == 0 && c.mlp_only_layers.empty() &&
                  c.decoder_sparse_step == 1 && c.moe_intermediate_size == c.intermediate_size &&
                  c.head_dim * c.n_head == c.hidden_size,
              "hf_config_to_json: olmoe has one attention_bias flag for q/k/v/o, no shared expert, every layer MoE, "
              "moe_intermediate_size == intermediate_size and head_dim == hidden_size / num_attention_heads");
  } else if (gpt_oss) {
    MOE_CHECK(c.attn_qkv_bias == c.attn_o_bias && c.shared_expert_intermediate_size == 0 && c.mlp_only_layers.empty() &&
                  c.decoder_sparse_step == 1 && c.moe_intermediate_size == c.intermediate_size && c.norm_topk_prob &&
                  c.attn_sinks && c.router_bias && c.expert_bias && c.swiglu_alpha == 1.702 &&
                  int64_t(c.layer_sliding.size()) == c.n_layer,
              "hf_config_to_json: gpt_oss has one attention_bias flag for q/k/v/o, sinks, router and expert biases, "
              "the clamped SwiGLU (alpha 1.702), no shared expert, every layer MoE, moe_intermediate_size == "
              "intermediate_size and one layer_types entry per layer");
  } else if (deepseek) {
    MOE_CHECK(c.is_mla() && !c.attn_qkv_bias && !c.attn_o_bias && c.n_head_kv == c.n_head &&
                  c.head_dim == c.qk_rope_head_dim && c.mlp_only_layers.empty() && c.decoder_sparse_step == 1 &&
                  c.shared_expert_intermediate_size == c.n_shared_experts * c.moe_intermediate_size &&
                  c.sliding_window == 0 && !c.attn_sinks && !c.router_bias && !c.expert_bias && c.swiglu_limit == 0 &&
                  c.router_aux_loss_coef == 0 && (c.model_type == "deepseek_v3" || (!c.norm_topk_prob && c.rope_interleave)),
              "hf_config_to_json: %s is MLA (kv_lora_rank > 0, head_dim = qk_rope_head_dim, one kv head per head) "
              "without biases, sliding windows or sinks, with n_shared_experts ungated shared experts, no aux loss "
              "(V2: no renormalisation, interleaved RoPE)",
              mt);
  } else {
    MOE_CHECK(c.attn_qkv_bias == c.attn_o_bias && c.shared_expert_intermediate_size == 0,
              "hf_config_to_json: qwen3_moe has one attention_bias flag for q/k/v/o and no shared expert");
  }
  if (!deepseek)
    MOE_CHECK(!c.is_mla() && c.first_k_dense_replace == 0 && c.routed_scaling_factor == 1 &&
                  c.topk_method == RouterTopk::Greedy && !c.rope_interleave,
              "hf_config_to_json: %s cannot express MLA, first_k_dense_replace, routed_scaling_factor, grouped "
              "routing or interleaved RoPE",
              mt);
  if (!gpt_oss && !deepseek)
    MOE_CHECK(c.rope_scaling.kind == RopeScalingKind::None && c.sliding_window == 0 && !c.attn_sinks &&
                  !c.router_bias && !c.expert_bias && c.swiglu_limit == 0,
              "hf_config_to_json: %s cannot express RoPE scaling, sliding windows, sinks, router/expert biases or a "
              "clamped SwiGLU",
              mt);

  json j = json::object();  // std::map-backed: keys come out sorted, as transformers writes them
  auto token = [](int64_t id) { return id < 0 ? json(nullptr) : json(id); };
  j["architectures"] = json::array({arch});
  j["model_type"] = c.model_type;
  j["vocab_size"] = c.vocab_size;
  j["hidden_size"] = c.hidden_size;
  j["intermediate_size"] = c.intermediate_size;
  j["num_hidden_layers"] = c.n_layer;
  j["num_attention_heads"] = c.n_head;
  j["num_key_value_heads"] = c.n_head_kv;
  // OlmoeConfig has none (heads are hidden / heads wide); DeepSeek's configs set it themselves.
  if (!olmoe && !deepseek) j["head_dim"] = c.head_dim;
  j["hidden_act"] = "silu";
  j["rope_theta"] = c.rope_theta;
  j["rms_norm_eps"] = c.rms_norm_eps;
  j["tie_word_embeddings"] = c.tie_word_embeddings;
  j["max_position_embeddings"] = c.max_position_embeddings;
  j["bos_token_id"] = token(c.bos_token_id);
  j["eos_token_id"] = token(c.eos_token_id);
  j["pad_token_id"] = token(c.pad_token_id);
  j["router_aux_loss_coef"] = c.router_aux_loss_coef;
  j["torch_dtype"] = dt;
  j["num_experts_per_tok"] = c.n_expert_used;
  if (mixtral) {
    j["num_local_experts"] = c.n_expert;
  } else if (gpt_oss) {
    j["num_local_experts"] = c.n_expert;
    j["experts_per_token"] = c.n_expert_used;
    j["attention_bias"] = c.attn_qkv_bias;
    j["sliding_window"] = c.sliding_window;
    json types = json::array();
    for (bool sl : c.layer_sliding) types.push_back(sl ? "sliding_attention" : "full_attention");
    j["layer_types"] = types;
    j["swiglu_limit"] = c.swiglu_limit;
    j["attention_dropout"] = 0.0;
    j["output_router_logits"] = false;
    j["rope_scaling"] = rope_scaling_json(c.rope_scaling);
    if (c.rope_scaling.kind == RopeScalingKind::Yarn && c.rope_scaling.original_max_position_embeddings > 0)
      j["initial_context_length"] = c.rope_scaling.original_max_position_embeddings;
  } else if (deepseek) {
    const bool v3 = c.model_type == "deepseek_v3";
    j["q_lora_rank"] = c.q_lora_rank > 0 ? json(c.q_lora_rank) : json(nullptr);
    j["kv_lora_rank"] = c.kv_lora_rank;
    j["qk_nope_head_dim"] = c.qk_nope_head_dim;
    j["qk_rope_head_dim"] = c.qk_rope_head_dim;
    j["v_head_dim"] = c.v_head_dim;
    j["n_routed_experts"] = c.n_expert;
    j["n_shared_experts"] = c.n_shared_experts;
    j["moe_intermediate_size"] = c.moe_intermediate_size;
    j["first_k_dense_replace"] = c.first_k_dense_replace;
    j["moe_layer_freq"] = 1;
    j["routed_scaling_factor"] = c.routed_scaling_factor;
    j["norm_topk_prob"] = c.norm_topk_prob;
    j["topk_method"] = c.topk_method == RouterTopk::NoauxTc              ? "noaux_tc"
                       : c.topk_method == RouterTopk::GroupLimitedGreedy ? "group_limited_greedy"
                                                                         : "greedy";
    j["n_group"] = c.n_group;
    j["topk_group"] = c.topk_group;
    j["scoring_func"] = v3 ? "sigmoid" : "softmax";
    if (v3) j["rope_interleave"] = c.rope_interleave;
    j["attention_bias"] = false;
    j["attention_dropout"] = 0.0;
    j["rope_scaling"] = rope_scaling_json(c.rope_scaling);
  } else if (olmoe) {
    j["num_experts"] = c.n_expert;
    j["norm_topk_prob"] = c.norm_topk_prob;
    j["attention_bias"] = c.attn_qkv_bias;
    j["clip_qkv"] = nullptr;
  } else {
    j["num_experts"] = c.n_expert;
    j["moe_intermediate_size"] = c.moe_intermediate_size;
    j["norm_topk_prob"] = c.norm_topk_prob;
    j["decoder_sparse_step"] = c.decoder_sparse_step;
    j["mlp_only_layers"] = c.mlp_only_layers;
    if (qwen2) {
      j["shared_expert_intermediate_size"] = c.shared_expert_intermediate_size;
      j["qkv_bias"] = c.attn_qkv_bias;
    } else {
      j["attention_bias"] = c.attn_qkv_bias;
    }
  }
  return j.dump(2) + "\n";
}

}  // namespace moe
