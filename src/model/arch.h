// arch.h — model families as data (DESIGN.md invariant 4).
//
// An ArchSpec names every tensor of a family with templates ("{l}" = layer, "{e}" = expert)
// and says which optional pieces exist. Adding a family = one table entry + its config
// parsing in io/hf_config + tests; the Model code is shared.
#pragma once
#include <string>

namespace moe {

struct ArchSpec {
  const char* model_type;
  const char* hf_architecture;  // "MixtralForCausalLM"
  const char* embed;
  const char* final_norm;
  const char* lm_head;
  const char* attn_norm;
  const char* ffn_norm;
  const char* q_proj;
  const char* k_proj;
  const char* v_proj;
  const char* o_proj;
  const char* q_norm;  // nullptr if none
  const char* k_norm;
  const char* router;
  const char* expert_gate;  // w1 [F,D]
  const char* expert_up;    // w3 [F,D]
  const char* expert_down;  // w2 [D,F]
  const char* shared_gate;  // nullptr if the family has no shared expert
  const char* shared_up;
  const char* shared_down;
  const char* shared_expert_gate;  // [1,D]
  const char* dense_gate;  // dense MLP layers (mlp_only_layers / decoder_sparse_step)
  const char* dense_up;
  const char* dense_down;
  // Fused 3-D routed experts (gpt_oss), nullptr for per-expert tensors: gate_up [E, D, 2F]
  // applied in×out (x @ W) with the gate in its even columns and up in its odd ones, down
  // [E, F, D]; their biases are the same names + "_bias" ([E, 2F], [E, D]). They are file
  // formats: the engine holds them as its stacked w1/w3/w2 (+ b1/b3/b2) and converts at load
  // and write (model/fused_experts.h); expert_gate/up/down then name the engine's per-expert
  // views (optimizer state, never a file).
  const char* experts_gate_up = nullptr;
  const char* experts_down = nullptr;
  const char* attn_sinks = nullptr;  // [H] per-head sink logits, nullptr if none
  // Multi-head Latent Attention (DeepSeek, ModelConfig::is_mla), nullptr elsewhere: q_proj names
  // the full-rank query when q_lora_rank is 0, else q_a_proj -> q_a_norm -> q_b_proj;
  // kv_a_proj [Rkv+Dr, D] -> kv_a_norm on the latent -> kv_b_proj [H(Dn+Dv), Rkv].
  const char* q_a_proj = nullptr;
  const char* q_a_norm = nullptr;
  const char* q_b_proj = nullptr;
  const char* kv_a_proj = nullptr;
  const char* kv_a_norm = nullptr;
  const char* kv_b_proj = nullptr;
  // Family rules of attention and routing:
  bool yarn_softmax_mscale = false;  // the softmax scale × yarn_softmax_factor (DeepSeek-V3)
  bool router_sigmoid = false;       // sigmoid router scores (DeepSeek-V3), else softmax
  double router_renorm_eps = 0;      // added to the renormalising sum (DeepSeek-V3: 1e-20)
  bool router_select_bias = false;   // the router has a selection bias buffer "<router>.e_score_correction_bias" (V3)
  bool aux_loss = true;               // the HF model returns a load-balancing loss (DeepSeek: none, reported 0)
  // A shared expert without shared_expert_gate (DeepSeek) is added unweighted.
};

// Throws moe::Error for an unknown model_type.
const ArchSpec& arch_spec(const std::string& model_type);

// Expands a template: "{l}" -> layer, "{e}" -> expert. `suffix` is appended (".weight").
std::string tensor_name(const char* tmpl, long layer = -1, long expert = -1, const char* suffix = ".weight");

}  // namespace moe
