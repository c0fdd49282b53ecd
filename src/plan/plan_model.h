// plan_model.h — the planner's description of an MoE architecture, more general than ModelConfig.
//
// ModelConfig describes what the engine can run (mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss,
// deepseek_v2, deepseek_v3). The planner also sizes what the engine cannot run, or not in full:
// DeepSeek-V3's multi-token-prediction module (counted apart), DBRX (fused Wqkv, LayerNorm without
// bias) and Switch Transformers (encoder-decoder, ReLU experts, top-1 on every other layer), and
// the catalog's gpt-oss / DeepSeek entries (their config.json has fields the planner reads itself:
// sliding layers, MTP). A
// PlanModel is built from a ModelConfig, from any supported HF config.json, or from a catalog
// entry (model_catalog.h), and every parameter count is derived from it by
// plan_params(), which enumerates the tensors the config implies (the same arithmetic as
// expected_tensors() for the engine's own families; a test checks they agree).
//
// Dimension letters: V vocab, D model width, H query heads, Hkv key/value heads, Dh head width,
// F expert FFN width, Fd dense FFN width, Fs shared-expert width (all shared experts together),
// E routed experts, K experts per token, L layers.
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "io/hf_config.h"

namespace moe {

enum class AttnKind : uint8_t { GQA, MLA };
enum class NormKind : uint8_t { RMS, LayerNormNoBias, LayerNorm };  // params per norm: D, D, 2D
enum class FfnKind : uint8_t { SwiGLU, Relu };                       // 3 or 2 matrices per FFN
// QkNormKind (io/hf_config.h): none, [Dh] per head (qwen3_moe) or [H*Dh] / [Hkv*Dh] (olmoe).

// One transformer block of the stack, in order (encoder blocks first for encoder-decoders).
struct PlanLayer {
  bool moe = false;         // routed-expert FFN (else the dense FFN of width Fd)
  bool encoder = false;     // an encoder block (no KV cache at inference; bidirectional)
  bool cross_attn = false;  // decoder block of an encoder-decoder: a second attention + norm
  bool sliding = false;     // sliding-window attention (KV capped at sliding_window positions)
  bool rel_bias = false;    // owns a relative-position bias table [buckets, H] (T5 first blocks)
};

struct PlanModel {
  std::string name;    // "Mixtral-8x7B", or the directory it came from
  std::string family;  // HF model_type
  std::string source;  // where the config values come from (catalog entries)

  int64_t vocab = 0;  // V
  int64_t d_model = 0;  // D
  std::vector<PlanLayer> layers;

  // --- attention ---
  AttnKind attn = AttnKind::GQA;
  int64_t n_head = 0;     // H
  int64_t n_head_kv = 0;  // Hkv (GQA)
  int64_t head_dim = 0;   // Dh (GQA)
  bool qkv_bias = false, o_bias = false;
  bool fused_qkv = false;        // one Wqkv [(H+2Hkv)Dh, D] (same parameter count)
  QkNormKind qk_norm = QkNormKind::None;
  bool attn_sinks = false;       // one learned sink logit per head [H] (gpt-oss)
  int64_t sliding_window = 0;    // window of the layers marked sliding
  int64_t rel_buckets = 0;       // T5 relative attention buckets
  // MLA (DeepSeek-V2/V3): q_lora_rank 0 = a full q_proj.
  int64_t q_lora_rank = 0, kv_lora_rank = 0, qk_rope_head_dim = 0, qk_nope_head_dim = 0, v_head_dim = 0;

  // --- feed-forward ---
  FfnKind ffn = FfnKind::SwiGLU;
  int64_t dense_ffn = 0;     // Fd, width of the dense FFN layers
  int64_t expert_ffn = 0;    // F, width of one routed expert
  int64_t n_expert = 0;      // E
  int64_t n_expert_used = 0; // K
  int64_t shared_ffn = 0;    // Fs: width of the shared expert(s) together (0 = none)
  bool shared_gate = false;  // a [1,D] sigmoid gate on the shared expert (qwen2_moe)
  bool router_bias = false;  // router linear has a bias [E] (gpt-oss)
  bool router_score_bias = false;  // selection-only bias [E] (DeepSeek-V3 e_score_correction_bias)
  bool expert_bias = false;  // expert linears have biases (gpt-oss)

  NormKind norm = NormKind::RMS;
  bool tie_embeddings = false;
  bool final_norm_per_stack = false;  // encoder and decoder each end with a norm (T5)
  int64_t n_mtp_layers = 0;  // DeepSeek-V3 multi-token-prediction modules (counted apart)
  int64_t max_position = 0;

  // The engine's own config, for the families the engine runs (set by plan_model_from_config,
  // so also for their config.json and catalog entries): the CPU engine plan reads the engine's
  // activation layout from it (engine_train_plan in planner.h). Empty for other families.
  std::optional<ModelConfig> engine;

  int64_t n_moe_layers() const;
  int64_t n_decoder_layers() const;
  // Width of the queries and keys per head and of the values per head (GQA: Dh; MLA: nope+rope, v).
  int64_t q_head_dim() const;
  int64_t v_dim_per_head() const;
};

// Parameter counts by role. Every field is exact for the config (no rounding).
struct ParamCounts {
  int64_t embed = 0;          // input embedding [V,D]
  int64_t lm_head = 0;        // output projection [V,D] (0 when tied)
  int64_t attn = 0;           // all attention tensors (projections, biases, q/k norms, sinks, MLA norms, rel bias)
  int64_t norms = 0;          // block and final norms
  int64_t dense_ffn = 0;      // dense FFN layers
  int64_t router = 0;         // routers (weights, biases, score-correction biases)
  int64_t experts = 0;        // all routed experts of all MoE layers
  int64_t shared_experts = 0; // shared experts (+ their gates)
  int64_t one_expert = 0;     // one routed expert of one layer (weights + biases)
  // 2-D linear weights other than the embedding and LM head: what weight quantisation applies
  // to (norms, biases, sinks, embeddings stay 16-bit). expert_linear: those of routed experts.
  int64_t linear = 0;
  int64_t expert_linear = 0;
  int64_t mtp = 0;            // multi-token-prediction modules (not in total: headline convention)
  int64_t total = 0;          // everything but mtp
  int64_t active = 0;         // per token: total - experts + K * one_expert per MoE layer
  // Per token without the input embedding (a lookup, not a matmul): the convention of the
  // DeepSeek and gpt-oss papers, and the N of the 6·N·tokens training-FLOPs rule.
  int64_t active_no_embed = 0;
  int64_t non_expert() const { return total - experts; }
};

ParamCounts plan_params(const PlanModel& m);

// The engine's own families, exactly as the engine builds them.
PlanModel plan_model_from_config(const ModelConfig& c, const std::string& name = "");
// Any supported HF config.json text: mixtral, qwen2_moe, qwen3_moe, olmoe (through
// parse_hf_config), deepseek_v2, deepseek_v3, gpt_oss, dbrx, switch_transformers. `what` names
// the source in errors. Throws moe::Error for unsupported model_type or missing fields.
PlanModel plan_model_from_hf_json(const std::string& json_text, const std::string& what);
// A directory holding config.json, or a config.json path.
PlanModel plan_model_from_path(const std::string& path);

// Validates shapes (positive sizes, K <= E, ...); throws moe::Error naming the field.
void validate_plan_model(const PlanModel& m);

}  // namespace moe
