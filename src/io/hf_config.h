// hf_config.h — HuggingFace config.json <-> ModelConfig, the engine's model description.
//
// Supported model_type values: "mixtral", "qwen2_moe", "qwen3_moe", "olmoe" (their real field
// names: num_local_experts / num_experts, num_experts_per_tok, intermediate_size vs
// moe_intermediate_size, shared_expert_intermediate_size, norm_topk_prob, decoder_sparse_step,
// mlp_only_layers, head_dim, rope_theta, rms_norm_eps, tie_word_embeddings, qkv bias for
// qwen2_moe, attention_bias and per-head q/k norm for qwen3_moe, attention_bias, full-width q/k
// norm and clip_qkv for olmoe; for gpt_oss num_local_experts, experts_per_token, head_dim,
// sliding_window, layer_types, attention_bias, rope_scaling yarn, swiglu_limit; for deepseek_v2 /
// deepseek_v3 the MLA ranks and head widths, first_k_dense_replace, n_shared_experts,
// n_routed_experts, routed_scaling_factor, topk_method, n_group, topk_group, norm_topk_prob,
// rope_scaling yarn with mscale / mscale_all_dim, rope_interleave). Anything else is an error
// naming it.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/rope_scaling.h"

namespace moe {

// Upper bounds on config.json sizes (the engine and the planner refuse anything larger, naming the
// field and the limit). Each is far above every real model (largest today: vocab 262k, hidden
// 16k, 128 layers, 384 experts, expert/dense width 53k, 10M positions) and small enough that every
// parameter-count product of them fits in int64 with room for bytes-per-parameter factors.
constexpr int64_t kMaxConfigVocab = int64_t(1) << 22;          // vocab_size
constexpr int64_t kMaxConfigHidden = int64_t(1) << 16;         // hidden_size / d_model
constexpr int64_t kMaxConfigLayers = int64_t(1) << 10;         // num_hidden_layers (each stack)
constexpr int64_t kMaxConfigHeads = int64_t(1) << 10;          // attention / key-value heads
constexpr int64_t kMaxConfigHeadDim = int64_t(1) << 12;        // head_dim (and MLA head widths)
constexpr int64_t kMaxConfigFfn = int64_t(1) << 18;            // intermediate sizes (one FFN/expert)
constexpr int64_t kMaxConfigExperts = int64_t(1) << 14;        // routed (and shared) experts
constexpr int64_t kMaxConfigRank = int64_t(1) << 16;           // MLA q/kv LoRA ranks
constexpr int64_t kMaxConfigPositions = int64_t(1) << 28;      // max_position_embeddings, windows
// Planner: total parameters of one model (2.8e14, 100x the largest model); keeps every byte
// count the planner derives (params x bytes/param x optimizer states) far inside int64.
constexpr int64_t kMaxPlanParams = int64_t(1) << 48;

// Where a family RMS-normalises q and k (after the projection, before RoPE): not at all, over
// each head ([Dh] weights: qwen3_moe), or over the whole projection ([H*Dh] and [Hkv*Dh]
// weights: olmoe). The planner sizes the same three kinds.
enum class QkNormKind : uint8_t { None, PerHead, Full };

// How a router picks its K experts (DeepSeek's topk_method): from all E (greedy), or only from
// the topk_group best of n_group expert groups, a group scored by its best expert
// (group_limited_greedy, V2) or by its two best biased sigmoid scores (noaux_tc, V3).
enum class RouterTopk : uint8_t { Greedy, GroupLimitedGreedy, NoauxTc };

struct ModelConfig {
  std::string model_type;            // "mixtral" | "qwen2_moe" | "qwen3_moe" | "olmoe" | "gpt_oss" | "deepseek_v2" | "deepseek_v3"
  int64_t vocab_size = 0;            // V
  int64_t hidden_size = 0;           // D
  int64_t n_layer = 0;
  int64_t n_head = 0;                // H
  int64_t n_head_kv = 0;             // Hkv
  int64_t head_dim = 0;              // Dh (config head_dim, else D / H)
  int64_t intermediate_size = 0;     // dense MLP width (mixtral, olmoe: the expert width too)
  int64_t moe_intermediate_size = 0; // F, expert width
  int64_t shared_expert_intermediate_size = 0;  // 0 = no shared expert
  int64_t n_expert = 0;              // E
  int64_t n_expert_used = 0;         // K
  bool norm_topk_prob = true;        // renormalise the K routing weights
  int64_t decoder_sparse_step = 1;
  std::vector<int64_t> mlp_only_layers;
  bool attn_qkv_bias = false;        // q/k/v projections have biases (qwen2_moe)
  bool attn_o_bias = false;
  QkNormKind qk_norm = QkNormKind::None;  // RMSNorm on q and k, and over what
  double rope_theta = 10000.0;
  double rms_norm_eps = 1e-6;
  bool tie_word_embeddings = false;
  int64_t max_position_embeddings = 4096;
  int64_t bos_token_id = -1;         // -1: none
  int64_t eos_token_id = -1;
  int64_t pad_token_id = -1;         // -1: none (its embedding row gets no gradient, as HF's padding_idx)
  double router_aux_loss_coef = 0.0;
  DType torch_dtype = DType::F32;

  // gpt_oss (fields other families leave at their defaults).
  RopeScaling rope_scaling;          // RoPE frequency scaling (YaRN); none by default
  int64_t sliding_window = 0;        // keys a sliding layer attends, the current one included (0: none)
  std::vector<bool> layer_sliding;   // per layer, from layer_types: sliding_attention (empty: all full)
  bool attn_sinks = false;           // one learned sink logit per head joins every softmax row
  bool router_bias = false;          // the router linear has a bias ("<router>.bias")
  bool expert_bias = false;          // routed experts' projections have biases
  // Clamped SwiGLU of the routed experts: g = min(gate, limit), u = clamp(up, -limit, limit),
  // act = g·sigmoid(alpha·g)·(u + 1). limit 0: plain SwiGLU silu(gate)·up.
  double swiglu_alpha = 0, swiglu_limit = 0;

  // deepseek_v2 / deepseek_v3 (fields other families leave at their defaults). Multi-head Latent
  // Attention when kv_lora_rank > 0: per head a query and key of Dn + Dr (nope part first, the
  // rope part last) and a value of Dv; head_dim is Dr (the rotary width), as HF sets it.
  int64_t q_lora_rank = 0;           // Rq: q_a_proj -> q_a_layernorm -> q_b_proj; 0: one q_proj
  int64_t kv_lora_rank = 0;          // Rkv: the cached latent's width (0: not MLA)
  int64_t qk_nope_head_dim = 0;      // Dn
  int64_t qk_rope_head_dim = 0;      // Dr
  int64_t v_head_dim = 0;            // Dv
  bool rope_interleave = false;      // RoPE rotates pairs (x[2i], x[2i+1]) (V2's complex form, V3's default)
  int64_t first_k_dense_replace = 0; // layers [0, k) are dense MLPs
  int64_t n_shared_experts = 0;      // shared experts (their MLP is n_shared · F wide, ungated)
  double routed_scaling_factor = 1;  // multiplies the routing weights
  RouterTopk topk_method = RouterTopk::Greedy;
  int64_t n_group = 1, topk_group = 1;

  bool is_mla() const { return kv_lora_rank > 0; }

  // Layer l uses the MoE block (else a dense SwiGLU MLP of intermediate_size).
  bool layer_is_moe(int64_t l) const;
  // Width of one q / k norm row, which is also the length of its weight: Dh per head, H*Dh /
  // Hkv*Dh over the whole projection, 0 without q/k norm. Rows per token = H*Dh / q_norm_dim().
  int64_t q_norm_dim() const;
  int64_t k_norm_dim() const;
  // The attention window of layer l: sliding_window for a sliding layer, 0 (full causal) otherwise.
  int64_t layer_window(int64_t l) const;

  // Field-wise equality (doubles compared exactly: parse(to_json(c)) reproduces them bit for bit).
  bool operator==(const ModelConfig&) const = default;
};

// Parses config.json text; `what` names the source in errors ("DIR/config.json").
// Throws moe::Error for malformed JSON, unknown model_type, missing or invalid fields.
ModelConfig parse_hf_config(const std::string& json_text, const std::string& what);
ModelConfig load_hf_config(const std::string& path);
// Serialises to HF config.json text for the model's family (what `moe init` writes), with the
// architectures field HF expects (e.g. "MixtralForCausalLM").
std::string hf_config_to_json(const ModelConfig& c);

}  // namespace moe
