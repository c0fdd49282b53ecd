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
};

// Throws moe::Error for an unknown model_type.
const ArchSpec& arch_spec(const std::string& model_type);

// Expands a template: "{l}" -> layer, "{e}" -> expert. `suffix` is appended (".weight").
std::string tensor_name(const char* tmpl, long layer = -1, long expert = -1, const char* suffix = ".weight");

}  // namespace moe
