// plan_model.cpp — PlanModel from ModelConfig / HF config.json, and the exact parameter count.
#include "plan/plan_model.h"

#include <cmath>
#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_util.h"
#include "core/json_util.h"
#include "model/arch.h"

namespace moe {

using json = nlohmann::json;

int64_t PlanModel::n_moe_layers() const {
  int64_t n = 0;
  for (auto& l : layers) n += l.moe;
  return n;
}

int64_t PlanModel::n_decoder_layers() const {
  int64_t n = 0;
  for (auto& l : layers) n += !l.encoder;
  return n;
}

int64_t PlanModel::q_head_dim() const { return attn == AttnKind::MLA ? qk_nope_head_dim + qk_rope_head_dim : head_dim; }
int64_t PlanModel::v_dim_per_head() const { return attn == AttnKind::MLA ? v_head_dim : head_dim; }

namespace {

int64_t norm_params(const PlanModel& m, int64_t width) { return m.norm == NormKind::LayerNorm ? 2 * width : width; }
int64_t n_ffn_mats(const PlanModel& m) { return m.ffn == FfnKind::SwiGLU ? 3 : 2; }

// 2-D weights of one attention block.
int64_t attention_linear(const PlanModel& m) {
  const int64_t d = m.d_model, h = m.n_head;
  if (m.attn == AttnKind::MLA) {
    const int64_t qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
    int64_t n = m.q_lora_rank > 0 ? d * m.q_lora_rank + m.q_lora_rank * h * qk : d * h * qk;
    return n + d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim) +
           h * m.v_head_dim * d;
  }
  return 2 * h * m.head_dim * d + 2 * m.n_head_kv * m.head_dim * d;
}

// One attention block (self or cross) of layer `l`.
int64_t attention_params(const PlanModel& m, const PlanLayer& l, bool cross) {
  const int64_t d = m.d_model, h = m.n_head;
  int64_t n = 0;
  if (m.attn == AttnKind::MLA) {
    const int64_t qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
    if (m.q_lora_rank > 0) {
      n += d * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * h * qk;  // q_a_proj, q_a_layernorm, q_b_proj
    } else {
      n += d * h * qk;  // q_proj
    }
    n += d * (m.kv_lora_rank + m.qk_rope_head_dim) + m.kv_lora_rank;  // kv_a_proj_with_mqa, kv_a_layernorm
    n += m.kv_lora_rank * h * (m.qk_nope_head_dim + m.v_head_dim);   // kv_b_proj
    n += h * m.v_head_dim * d;                                        // o_proj
    return n;
  }
  const int64_t qd = h * m.head_dim, kvd = m.n_head_kv * m.head_dim;
  n += qd * d + 2 * kvd * d + d * qd;  // q, k, v, o
  if (m.qkv_bias) n += qd + 2 * kvd;
  if (m.o_bias) n += d;
  if (m.qk_norm == QkNormKind::PerHead) n += 2 * m.head_dim;
  if (m.qk_norm == QkNormKind::Full) n += qd + kvd;
  if (m.attn_sinks) n += h;
  if (l.rel_bias && !cross) n += m.rel_buckets * h;
  return n;
}

int64_t one_expert_params(const PlanModel& m) {
  int64_t n = n_ffn_mats(m) * m.d_model * m.expert_ffn;
  if (m.expert_bias) n += (m.ffn == FfnKind::SwiGLU ? 2 * m.expert_ffn : m.expert_ffn) + m.d_model;
  return n;
}

// Adds one block's parameters to `pc`.
void add_layer(const PlanModel& m, const PlanLayer& l, ParamCounts* pc) {
  const int64_t d = m.d_model;
  pc->attn += attention_params(m, l, false);
  pc->linear += attention_linear(m);
  pc->norms += 2 * norm_params(m, d);
  if (l.cross_attn) {
    pc->attn += attention_params(m, l, true);
    pc->linear += attention_linear(m);
    pc->norms += norm_params(m, d);
  }
  if (!l.moe) {
    pc->dense_ffn += n_ffn_mats(m) * d * m.dense_ffn;
    pc->linear += n_ffn_mats(m) * d * m.dense_ffn;
    return;
  }
  pc->router += m.n_expert * d + (m.router_bias ? m.n_expert : 0) + (m.router_score_bias ? m.n_expert : 0);
  pc->linear += m.n_expert * d;
  pc->experts += m.n_expert * one_expert_params(m);
  pc->expert_linear += m.n_expert * n_ffn_mats(m) * d * m.expert_ffn;
  pc->linear += m.n_expert * n_ffn_mats(m) * d * m.expert_ffn;
  if (m.shared_ffn > 0) {
    pc->shared_experts += n_ffn_mats(m) * d * m.shared_ffn + (m.shared_gate ? d : 0);
    pc->linear += n_ffn_mats(m) * d * m.shared_ffn + (m.shared_gate ? d : 0);
  }
}

}  // namespace

ParamCounts plan_params(const PlanModel& m) {
  ParamCounts pc;
  const int64_t d = m.d_model;
  pc.embed = m.vocab * d;
  pc.lm_head = m.tie_embeddings ? 0 : m.vocab * d;
  for (auto& l : m.layers) add_layer(m, l, &pc);
  pc.norms += norm_params(m, d) * (m.final_norm_per_stack ? 2 : 1);
  pc.one_expert = one_expert_params(m);
  pc.total = pc.embed + pc.lm_head + pc.attn + pc.norms + pc.dense_ffn + pc.router + pc.experts + pc.shared_experts;
  pc.active = pc.total - pc.experts + m.n_moe_layers() * m.n_expert_used * pc.one_expert;
  // Without the lookup table; a tied table is also the LM head's matmul, so it stays.
  pc.active_no_embed = pc.active - (m.tie_embeddings ? 0 : pc.embed);
  if (m.n_mtp_layers > 0) {
    // DeepSeek-V3 MTP module: enorm + hnorm [D], eh_proj [D,2D], one MoE block, shared_head.norm
    // [D]; its embedding and head are the main model's.
    ParamCounts blk;
    PlanLayer moe_layer;
    moe_layer.moe = true;
    add_layer(m, moe_layer, &blk);
    const int64_t block = blk.attn + blk.norms + blk.router + blk.experts + blk.shared_experts;
    pc.mtp = m.n_mtp_layers * (3 * norm_params(m, d) + 2 * d * d + block);
  }
  return pc;
}

void validate_plan_model(const PlanModel& m) {
  auto pos = [&](int64_t v, const char* field) {
    MOE_CHECK(v > 0, "model %s: %s must be positive, got %lld", m.name.c_str(), field, (long long)v);
  };
  // Upper bounds first (hf_config.h): with every size below its limit, no product that
  // plan_params() forms can overflow int64, which the checks on the totals below rely on.
  auto at_most = [&](int64_t v, int64_t limit, const char* field) {
    MOE_CHECK(v >= 0 && v <= limit, "model %s: %s is %lld, outside [0, %lld]", m.name.c_str(), field, (long long)v,
              (long long)limit);
  };
  at_most(m.vocab, kMaxConfigVocab, "vocab_size");
  at_most(m.d_model, kMaxConfigHidden, "hidden_size");
  at_most(static_cast<int64_t>(m.layers.size()), 2 * kMaxConfigLayers, "number of layers");
  at_most(m.n_head, kMaxConfigHeads, "num_attention_heads");
  at_most(m.n_head_kv, kMaxConfigHeads, "num_key_value_heads");
  at_most(m.head_dim, kMaxConfigHeadDim, "head_dim");
  at_most(m.q_lora_rank, kMaxConfigRank, "q_lora_rank");
  at_most(m.kv_lora_rank, kMaxConfigRank, "kv_lora_rank");
  at_most(m.qk_rope_head_dim, kMaxConfigHeadDim, "qk_rope_head_dim");
  at_most(m.qk_nope_head_dim, kMaxConfigHeadDim, "qk_nope_head_dim");
  at_most(m.v_head_dim, kMaxConfigHeadDim, "v_head_dim");
  at_most(m.dense_ffn, kMaxConfigFfn, "dense intermediate size");
  at_most(m.expert_ffn, kMaxConfigFfn, "expert intermediate size");
  at_most(m.shared_ffn, kMaxConfigFfn * 64, "shared expert intermediate size (all shared experts)");
  at_most(m.n_expert, kMaxConfigExperts, "number of experts");
  at_most(m.n_expert_used, kMaxConfigExperts, "experts per token");
  at_most(m.sliding_window, kMaxConfigPositions, "sliding_window");
  at_most(m.rel_buckets, kMaxConfigPositions, "relative_attention_num_buckets");
  at_most(m.n_mtp_layers, kMaxConfigLayers, "num_nextn_predict_layers");
  at_most(m.max_position, kMaxConfigPositions, "max_position_embeddings");
  pos(m.vocab, "vocab_size");
  pos(m.d_model, "hidden_size");
  pos(static_cast<int64_t>(m.layers.size()), "number of layers");
  pos(m.n_head, "num_attention_heads");
  if (m.attn == AttnKind::GQA) {
    pos(m.n_head_kv, "num_key_value_heads");
    pos(m.head_dim, "head_dim");
    MOE_CHECK(m.n_head % m.n_head_kv == 0, "model %s: num_attention_heads %lld is not a multiple of num_key_value_heads %lld",
              m.name.c_str(), (long long)m.n_head, (long long)m.n_head_kv);
  } else {
    pos(m.kv_lora_rank, "kv_lora_rank");
    pos(m.qk_nope_head_dim + m.qk_rope_head_dim, "qk_nope_head_dim + qk_rope_head_dim");
    pos(m.v_head_dim, "v_head_dim");
  }
  if (m.n_moe_layers() > 0) {
    pos(m.n_expert, "number of experts");
    pos(m.expert_ffn, "expert intermediate size");
    MOE_CHECK(m.n_expert_used >= 1 && m.n_expert_used <= m.n_expert,
              "model %s: experts per token must be in [1, %lld], got %lld", m.name.c_str(), (long long)m.n_expert,
              (long long)m.n_expert_used);
  }
  if (m.n_moe_layers() < static_cast<int64_t>(m.layers.size())) pos(m.dense_ffn, "dense intermediate size");
  // The largest terms are below 2^61 (E*3*D*F*L = 2^14*3*2^16*2^18*2^11), so plan_params cannot
  // overflow; the totals must still leave room for the planner's bytes-per-parameter factors.
  const ParamCounts pc = plan_params(m);
  MOE_CHECK(pc.total <= kMaxPlanParams && pc.mtp <= kMaxPlanParams,
            "model %s: %lld parameters, above the planner's limit of %lld", m.name.c_str(), (long long)pc.total,
            (long long)kMaxPlanParams);
}

PlanModel plan_model_from_config(const ModelConfig& c, const std::string& name) {
  PlanModel m;
  m.name = name.empty() ? c.model_type : name;
  m.family = c.model_type;
  m.vocab = c.vocab_size;
  m.d_model = c.hidden_size;
  m.n_head = c.n_head;
  m.n_head_kv = c.n_head_kv;
  m.head_dim = c.head_dim;
  m.qkv_bias = c.attn_qkv_bias;
  m.o_bias = c.attn_o_bias;
  m.qk_norm = c.qk_norm;
  m.dense_ffn = c.intermediate_size;
  m.expert_ffn = c.moe_intermediate_size;
  m.n_expert = c.n_expert;
  m.n_expert_used = c.n_expert_used;
  m.shared_ffn = c.shared_expert_intermediate_size;
  m.shared_gate = c.shared_expert_intermediate_size > 0;
  m.tie_embeddings = c.tie_word_embeddings;
  m.max_position = c.max_position_embeddings;
  // gpt_oss: sinks and router/expert biases count as parameters. Its sliding layers are NOT
  // marked: the engine's KV cache keeps every position of every layer (no ring buffer yet), and
  // this plan is the engine's.
  m.attn_sinks = c.attn_sinks;
  m.router_bias = c.router_bias;
  m.expert_bias = c.expert_bias;
  if (c.is_mla()) {
    // DeepSeek: MLA attention (the engine's KV cache is the latent), ungated shared experts, V3's
    // selection bias buffer.
    m.attn = AttnKind::MLA;
    m.q_lora_rank = c.q_lora_rank;
    m.kv_lora_rank = c.kv_lora_rank;
    m.qk_rope_head_dim = c.qk_rope_head_dim;
    m.qk_nope_head_dim = c.qk_nope_head_dim;
    m.v_head_dim = c.v_head_dim;
  }
  const ArchSpec& a = arch_spec(c.model_type);
  m.shared_gate = c.shared_expert_intermediate_size > 0 && a.shared_expert_gate != nullptr;
  m.router_score_bias = a.router_select_bias;
  m.engine = c;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    PlanLayer pl;
    pl.moe = c.layer_is_moe(l);
    m.layers.push_back(pl);
  }
  validate_plan_model(m);
  return m;
}

namespace {

// Typed, null-tolerant field access with errors naming the source and field.
struct Fields {
  const json& j;
  std::string what;
  const json* get(const char* key) const {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) return nullptr;
    return &*it;
  }
  int64_t integer(const char* key) const {
    const json* v = get(key);
    MOE_CHECK(v, "%s: missing field '%s'", what.c_str(), key);
    // Integers, or floats with an integral value in range (no float->int conversion out of range).
    const bool is_int = v->is_number_integer() && !(v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(INT64_MAX));
    const bool is_integral_float = v->is_number_float() && std::isfinite(v->get<double>()) &&
                                   std::trunc(v->get<double>()) == v->get<double>() &&
                                   std::fabs(v->get<double>()) < 9.0e18;
    MOE_CHECK(is_int || is_integral_float, "%s: field '%s' must be an integer, got %s", what.c_str(), key,
              json_brief(*v).c_str());
    return is_int ? v->get<int64_t>() : static_cast<int64_t>(v->get<double>());
  }
  int64_t integer(const char* key, int64_t def) const { return get(key) ? integer(key) : def; }
  // An integer in [lo, hi] (sizes that loops or products use before validate_plan_model runs).
  int64_t bounded(const char* key, int64_t lo, int64_t hi) const { return check_bounds(key, integer(key), lo, hi); }
  int64_t bounded(const char* key, int64_t def, int64_t lo, int64_t hi) const {
    return check_bounds(key, integer(key, def), lo, hi);
  }
  int64_t check_bounds(const char* key, int64_t v, int64_t lo, int64_t hi) const {
    MOE_CHECK(v >= lo && v <= hi, "%s: field '%s' is %lld, outside [%lld, %lld]", what.c_str(), key, (long long)v,
              (long long)lo, (long long)hi);
    return v;
  }
  bool boolean(const char* key, bool def) const {
    const json* v = get(key);
    if (!v) return def;
    MOE_CHECK(v->is_boolean(), "%s: field '%s' must be true or false, got %s", what.c_str(), key,
              json_brief(*v).c_str());
    return v->get<bool>();
  }
  Fields sub(const char* key) const {
    const json* v = get(key);
    static const json kEmpty = json::object();
    if (!v) return Fields{kEmpty, what + ":" + key};
    MOE_CHECK(v->is_object(), "%s: field '%s' must be an object", what.c_str(), key);
    return Fields{*v, what + ":" + key};
  }
};

PlanModel from_deepseek(const Fields& f, bool v3) {
  PlanModel m;
  m.family = v3 ? "deepseek_v3" : "deepseek_v2";
  m.attn = AttnKind::MLA;
  m.vocab = f.integer("vocab_size");
  m.d_model = f.integer("hidden_size");
  m.n_head = f.integer("num_attention_heads");
  m.n_head_kv = f.integer("num_key_value_heads", m.n_head);
  m.q_lora_rank = f.integer("q_lora_rank", 0);
  m.kv_lora_rank = f.integer("kv_lora_rank");
  m.qk_rope_head_dim = f.integer("qk_rope_head_dim");
  m.qk_nope_head_dim = f.integer("qk_nope_head_dim");
  m.v_head_dim = f.integer("v_head_dim");
  m.qkv_bias = m.o_bias = f.boolean("attention_bias", false);
  MOE_CHECK(!m.qkv_bias, "%s: attention_bias=true is not modelled for MLA", f.what.c_str());
  m.dense_ffn = f.integer("intermediate_size");
  m.n_expert = f.integer("n_routed_experts", 0);
  m.n_expert_used = f.integer("num_experts_per_tok", 0);
  m.expert_ffn = f.bounded("moe_intermediate_size", 0, kMaxConfigFfn);
  m.shared_ffn = f.bounded("n_shared_experts", 0, 0, 64) * m.expert_ffn;
  // V3 selects with sigmoid scores plus a learned per-expert bias (topk_method "noaux_tc").
  const json* tm = f.get("topk_method");
  m.router_score_bias = v3 && (!tm || (tm->is_string() && tm->get<std::string>() == "noaux_tc"));
  m.tie_embeddings = f.boolean("tie_word_embeddings", false);
  m.max_position = f.integer("max_position_embeddings", 0);
  m.n_mtp_layers = v3 ? f.integer("num_nextn_predict_layers", 0) : 0;
  const int64_t n_layer = f.bounded("num_hidden_layers", 1, kMaxConfigLayers),
                first_dense = f.integer("first_k_dense_replace", 0),
                freq = f.integer("moe_layer_freq", 1);
  MOE_CHECK(freq > 0, "%s: moe_layer_freq must be positive", f.what.c_str());
  for (int64_t l = 0; l < n_layer; ++l) {
    PlanLayer pl;
    // modeling_deepseek: an MoE block iff n_routed_experts and l >= first_k_dense_replace and l % freq == 0.
    pl.moe = m.n_expert > 0 && l >= first_dense && l % freq == 0;
    m.layers.push_back(pl);
  }
  return m;
}

PlanModel from_gpt_oss(const Fields& f) {
  PlanModel m;
  m.family = "gpt_oss";
  m.vocab = f.integer("vocab_size");
  m.d_model = f.integer("hidden_size");
  m.n_head = f.integer("num_attention_heads");
  m.n_head_kv = f.integer("num_key_value_heads", m.n_head);
  MOE_CHECK(m.n_head > 0, "%s: num_attention_heads must be positive", f.what.c_str());
  m.head_dim = f.integer("head_dim", m.d_model / m.n_head);
  m.qkv_bias = m.o_bias = f.boolean("attention_bias", true);
  m.attn_sinks = true;
  m.sliding_window = f.integer("sliding_window", 0);
  m.expert_ffn = f.integer("intermediate_size");
  m.n_expert = f.integer("num_local_experts");
  m.n_expert_used = f.get("num_experts_per_tok") ? f.integer("num_experts_per_tok") : f.integer("experts_per_token");
  m.router_bias = m.expert_bias = true;
  m.tie_embeddings = f.boolean("tie_word_embeddings", false);
  m.max_position = f.integer("max_position_embeddings", 0);
  const int64_t n_layer = f.bounded("num_hidden_layers", 1, kMaxConfigLayers);
  const json* lt = f.get("layer_types");
  MOE_CHECK(!lt || (lt->is_array() && static_cast<int64_t>(lt->size()) == n_layer),
            "%s: layer_types must list %lld entries", f.what.c_str(), (long long)n_layer);
  for (int64_t l = 0; l < n_layer; ++l) {
    PlanLayer pl;
    pl.moe = true;
    // transformers' default: even layers slide, odd layers attend to everything.
    pl.sliding = lt ? (*lt)[static_cast<size_t>(l)] == "sliding_attention" : l % 2 == 0;
    m.layers.push_back(pl);
  }
  return m;
}

PlanModel from_dbrx(const Fields& f) {
  PlanModel m;
  m.family = "dbrx";
  Fields attn = f.sub("attn_config"), ffn = f.sub("ffn_config");
  m.vocab = f.integer("vocab_size");
  m.d_model = f.integer("d_model");
  m.n_head = f.integer("n_heads");
  m.n_head_kv = attn.integer("kv_n_heads", 1);
  MOE_CHECK(m.n_head > 0 && m.d_model % m.n_head == 0, "%s: d_model must be a multiple of n_heads", f.what.c_str());
  m.head_dim = m.d_model / m.n_head;
  m.fused_qkv = true;
  m.norm = NormKind::LayerNormNoBias;
  m.expert_ffn = ffn.integer("ffn_hidden_size");
  m.n_expert = ffn.integer("moe_num_experts");
  m.n_expert_used = ffn.integer("moe_top_k");
  m.tie_embeddings = f.boolean("tie_word_embeddings", false);
  m.max_position = f.integer("max_seq_len", 0);
  const int64_t n_layer = f.bounded("n_layers", 1, kMaxConfigLayers);
  for (int64_t l = 0; l < n_layer; ++l) m.layers.push_back(PlanLayer{true});
  return m;
}

PlanModel from_switch(const Fields& f) {
  PlanModel m;
  m.family = "switch_transformers";
  m.vocab = f.integer("vocab_size");
  m.d_model = f.integer("d_model");
  m.n_head = f.integer("num_heads");
  m.n_head_kv = m.n_head;
  m.head_dim = f.integer("d_kv");
  m.rel_buckets = f.integer("relative_attention_num_buckets", 32);
  m.ffn = FfnKind::Relu;
  MOE_CHECK(!f.boolean("is_gated_act", false), "%s: gated Switch FFNs are not modelled", f.what.c_str());
  m.dense_ffn = m.expert_ffn = f.integer("d_ff");
  m.n_expert = f.integer("num_experts");
  m.n_expert_used = f.integer("num_selected_experts", 1);
  m.router_bias = f.boolean("router_bias", false);
  m.tie_embeddings = f.boolean("tie_word_embeddings", true);  // PretrainedConfig's default
  m.final_norm_per_stack = true;
  const int64_t n_enc = f.bounded("num_layers", 1, kMaxConfigLayers);
  const int64_t n_dec = f.bounded("num_decoder_layers", n_enc, 0, kMaxConfigLayers);
  const int64_t enc_step = f.integer("encoder_sparse_step", 1), dec_step = f.integer("decoder_sparse_step", 1);
  // modeling_switch_transformers: sparse iff (i % step == 1 or step == 1) when step > 0.
  auto sparse = [](int64_t i, int64_t step) { return step > 0 && (step == 1 || i % step == 1); };
  for (int64_t l = 0; l < n_enc; ++l) {
    PlanLayer pl;
    pl.encoder = true;
    pl.moe = sparse(l, enc_step);
    pl.rel_bias = l == 0;
    m.layers.push_back(pl);
  }
  for (int64_t l = 0; l < n_dec; ++l) {
    PlanLayer pl;
    pl.cross_attn = true;
    pl.moe = sparse(l, dec_step);
    pl.rel_bias = l == 0;
    m.layers.push_back(pl);
  }
  return m;
}

}  // namespace

PlanModel plan_model_from_hf_json(const std::string& text, const std::string& what) {
  json j = parse_json_object(text, what);
  Fields f{j, what};
  const json* mt = f.get("model_type");
  MOE_CHECK(mt && mt->is_string(), "%s: missing or non-string field 'model_type'", what.c_str());
  const std::string type = mt->get<std::string>();
  PlanModel m;
  if (type == "mixtral" || type == "qwen2_moe" || type == "qwen3_moe" || type == "olmoe") {
    // The engine's own parser, so the planner and the engine agree on every field. RoPE scaling,
    // the activation and OLMoE's q/k/v clamp do not change any size, so they are dropped rather
    // than refused.
    json k = j;
    for (const char* key : {"rope_scaling", "rope_parameters", "hidden_act", "clip_qkv"}) k.erase(key);
    m = plan_model_from_config(parse_hf_config(k.dump(), what));
  } else if (type == "deepseek_v2" || type == "deepseek_v3") {
    m = from_deepseek(f, type == "deepseek_v3");
    // The engine runs what its own parser accepts (the MTP module, counted apart here, it does
    // not run); anything else is planned for GPUs only.
    try {
      m.engine = parse_hf_config(text, what);
    } catch (const Error&) {
      m.engine.reset();
    }
  } else if (type == "gpt_oss") {
    m = from_gpt_oss(f);
  } else if (type == "dbrx") {
    m = from_dbrx(f);
  } else if (type == "switch_transformers") {
    m = from_switch(f);
  } else {
    MOE_FAIL("%s: the planner does not know model_type '%s' (supported: mixtral, qwen2_moe, qwen3_moe, deepseek_v2, "
             "deepseek_v3, gpt_oss, dbrx, olmoe, switch_transformers)",
             what.c_str(), type.c_str());
  }
  m.name = what;
  validate_plan_model(m);
  return m;
}

PlanModel plan_model_from_path(const std::string& path) {
  std::string file = path;
  if (is_directory(path)) file = path + "/config.json";
  PlanModel m = plan_model_from_hf_json(read_file(file), file);
  m.name = path;
  return m;
}

}  // namespace moe
