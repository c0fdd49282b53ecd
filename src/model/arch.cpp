// arch.cpp — the ArchSpec table: HF tensor names of each supported family.
#include "model/arch.h"

#include "core/error.h"

namespace moe {
namespace {

#define L "model.layers.{l}."
const ArchSpec kArchs[] = {
    {"mixtral", "MixtralForCausalLM", "model.embed_tokens", "model.norm", "lm_head", L "input_layernorm",
     L "post_attention_layernorm", L "self_attn.q_proj", L "self_attn.k_proj", L "self_attn.v_proj",
     L "self_attn.o_proj", nullptr, nullptr, L "block_sparse_moe.gate", L "block_sparse_moe.experts.{e}.w1",
     L "block_sparse_moe.experts.{e}.w3", L "block_sparse_moe.experts.{e}.w2", nullptr, nullptr, nullptr, nullptr,
     nullptr, nullptr, nullptr},
    {"qwen2_moe", "Qwen2MoeForCausalLM", "model.embed_tokens", "model.norm", "lm_head", L "input_layernorm",
     L "post_attention_layernorm", L "self_attn.q_proj", L "self_attn.k_proj", L "self_attn.v_proj",
     L "self_attn.o_proj", nullptr, nullptr, L "mlp.gate", L "mlp.experts.{e}.gate_proj", L "mlp.experts.{e}.up_proj",
     L "mlp.experts.{e}.down_proj", L "mlp.shared_expert.gate_proj", L "mlp.shared_expert.up_proj",
     L "mlp.shared_expert.down_proj", L "mlp.shared_expert_gate", L "mlp.gate_proj", L "mlp.up_proj",
     L "mlp.down_proj"},
    {"qwen3_moe", "Qwen3MoeForCausalLM", "model.embed_tokens", "model.norm", "lm_head", L "input_layernorm",
     L "post_attention_layernorm", L "self_attn.q_proj", L "self_attn.k_proj", L "self_attn.v_proj",
     L "self_attn.o_proj", L "self_attn.q_norm", L "self_attn.k_norm", L "mlp.gate", L "mlp.experts.{e}.gate_proj",
     L "mlp.experts.{e}.up_proj", L "mlp.experts.{e}.down_proj", nullptr, nullptr, nullptr, nullptr,
     L "mlp.gate_proj", L "mlp.up_proj", L "mlp.down_proj"},
    // q_norm/k_norm span the whole projection (config: QkNormKind::Full); every layer is MoE.
    {"olmoe", "OlmoeForCausalLM", "model.embed_tokens", "model.norm", "lm_head", L "input_layernorm",
     L "post_attention_layernorm", L "self_attn.q_proj", L "self_attn.k_proj", L "self_attn.v_proj",
     L "self_attn.o_proj", L "self_attn.q_norm", L "self_attn.k_norm", L "mlp.gate", L "mlp.experts.{e}.gate_proj",
     L "mlp.experts.{e}.up_proj", L "mlp.experts.{e}.down_proj", nullptr, nullptr, nullptr, nullptr, nullptr,
     nullptr, nullptr},
    // Experts are fused 3-D tensors in the files (experts_gate_up / experts_down); the per-expert
    // names are the engine's own views. Router and q/k/v/o have biases; sinks per head.
    {"gpt_oss", "GptOssForCausalLM", "model.embed_tokens", "model.norm", "lm_head", L "input_layernorm",
     L "post_attention_layernorm", L "self_attn.q_proj", L "self_attn.k_proj", L "self_attn.v_proj",
     L "self_attn.o_proj", nullptr, nullptr, L "mlp.router", L "mlp.experts.{e}.gate_proj",
     L "mlp.experts.{e}.up_proj", L "mlp.experts.{e}.down_proj", nullptr, nullptr, nullptr, nullptr, nullptr,
     nullptr, nullptr, L "mlp.experts.gate_up_proj", L "mlp.experts.down_proj", L "self_attn.sinks"},
    // MLA attention; layers < first_k_dense_replace are dense (mlp.*_proj); shared experts are
    // ungated; e_score_correction_bias (V3) is the router's selection bias (router_bias_name).
    {.model_type = "deepseek_v2", .hf_architecture = "DeepseekV2ForCausalLM", .embed = "model.embed_tokens",
     .final_norm = "model.norm", .lm_head = "lm_head", .attn_norm = L "input_layernorm",
     .ffn_norm = L "post_attention_layernorm", .q_proj = L "self_attn.q_proj", .k_proj = nullptr, .v_proj = nullptr,
     .o_proj = L "self_attn.o_proj", .q_norm = nullptr, .k_norm = nullptr, .router = L "mlp.gate",
     .expert_gate = L "mlp.experts.{e}.gate_proj", .expert_up = L "mlp.experts.{e}.up_proj",
     .expert_down = L "mlp.experts.{e}.down_proj", .shared_gate = L "mlp.shared_experts.gate_proj",
     .shared_up = L "mlp.shared_experts.up_proj", .shared_down = L "mlp.shared_experts.down_proj",
     .shared_expert_gate = nullptr, .dense_gate = L "mlp.gate_proj", .dense_up = L "mlp.up_proj",
     .dense_down = L "mlp.down_proj", .q_a_proj = L "self_attn.q_a_proj", .q_a_norm = L "self_attn.q_a_layernorm",
     .q_b_proj = L "self_attn.q_b_proj", .kv_a_proj = L "self_attn.kv_a_proj_with_mqa",
     .kv_a_norm = L "self_attn.kv_a_layernorm", .kv_b_proj = L "self_attn.kv_b_proj", .aux_loss = false},
    {.model_type = "deepseek_v3", .hf_architecture = "DeepseekV3ForCausalLM", .embed = "model.embed_tokens",
     .final_norm = "model.norm", .lm_head = "lm_head", .attn_norm = L "input_layernorm",
     .ffn_norm = L "post_attention_layernorm", .q_proj = L "self_attn.q_proj", .k_proj = nullptr, .v_proj = nullptr,
     .o_proj = L "self_attn.o_proj", .q_norm = nullptr, .k_norm = nullptr, .router = L "mlp.gate",
     .expert_gate = L "mlp.experts.{e}.gate_proj", .expert_up = L "mlp.experts.{e}.up_proj",
     .expert_down = L "mlp.experts.{e}.down_proj", .shared_gate = L "mlp.shared_experts.gate_proj",
     .shared_up = L "mlp.shared_experts.up_proj", .shared_down = L "mlp.shared_experts.down_proj",
     .shared_expert_gate = nullptr, .dense_gate = L "mlp.gate_proj", .dense_up = L "mlp.up_proj",
     .dense_down = L "mlp.down_proj", .q_a_proj = L "self_attn.q_a_proj", .q_a_norm = L "self_attn.q_a_layernorm",
     .q_b_proj = L "self_attn.q_b_proj", .kv_a_proj = L "self_attn.kv_a_proj_with_mqa",
     .kv_a_norm = L "self_attn.kv_a_layernorm", .kv_b_proj = L "self_attn.kv_b_proj", .yarn_softmax_mscale = true,
     .router_sigmoid = true, .router_renorm_eps = 1e-20, .router_select_bias = true, .aux_loss = false},
};
#undef L

}  // namespace

const ArchSpec& arch_spec(const std::string& model_type) {
  for (const ArchSpec& a : kArchs)
    if (model_type == a.model_type) return a;
  MOE_FAIL("unsupported model_type '%s' (supported: mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v2, deepseek_v3)",
            model_type.c_str());
}

std::string tensor_name(const char* tmpl, long layer, long expert, const char* suffix) {
  MOE_ASSERT(tmpl != nullptr);
  std::string out;
  for (const char* p = tmpl; *p; ++p) {
    if (p[0] == '{' && p[1] == 'l' && p[2] == '}') {
      out += std::to_string(layer);
      p += 2;
    } else if (p[0] == '{' && p[1] == 'e' && p[2] == '}') {
      out += std::to_string(expert);
      p += 2;
    } else {
      out += *p;
    }
  }
  return out + suffix;
}

}  // namespace moe
