// lora_slots.h — where LoRA adapters can attach in a model, under PEFT's module names.
//
// One slot per adaptable projection: q/k/v/o, the router, each routed expert's gate/up/down
// (w1/w3/w2 in Mixtral naming), the shared expert's and the dense MLPs'. The module name is
// the HF module path ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.experts.5.up_proj")
// that PEFT matches target_modules against and names adapter tensors after
// ("base_model.model.<module>.lora_A.weight"). Routed experts share one stacked Lora per
// projection and layer ([E,r,in], [E,out,r]); their slots say which expert is theirs.
// named_parameters, adapter files, merging and the trainable-parameter audit all walk this list,
// so the names and the expert order exist in one place.
#pragma once
#include <string>
#include <vector>

#include "model/model.h"

namespace moe {

enum class LoraKind { Attention, Router, Expert, SharedExpert, DenseMlp };

struct LoraSlot {
  std::string module;     // PEFT module path
  LoraKind kind;
  int64_t layer = -1;
  int64_t expert = -1;    // routed expert (index into the stacked factors), -1 otherwise
  int64_t in = 0, out = 0;  // the projection's input and output widths
  Lora* lora = nullptr;   // the field in the LayerWeights the list was made from
  Tensor* base = nullptr;  // its base weight: [out,in], or the stacked [E,out,in] of a routed expert
  int64_t base_row0 = 0;  // q/k/v: first row of the part in the stacked wqkv
  // Fused-expert families (model/fused_experts.h): the template of the fused parameter a routed
  // expert slot belongs to (ArchSpec::experts_gate_up / experts_down), nullptr otherwise.
  const char* fused_param = nullptr;
};

// Every slot of the model's layers, in layer order (attention q, k, v, o; router; experts by
// index, gate/up/down each; shared expert; dense MLP). Dimensions come from the config, so `w`
// may also be a gradient ModelWeights (its Lora fields; its base tensors may be undefined).
std::vector<LoraSlot> lora_slots(const ModelConfig& c, ModelWeights& w);

// PEFT's tensor names of a slot's factors.
std::string lora_a_name(const LoraSlot& s);
std::string lora_b_name(const LoraSlot& s);

// The slot's factors as 2-D tensors (a [r,in], b [out,r]): the expert's slice of stacked ones.
Tensor slot_a(const LoraSlot& s);
Tensor slot_b(const LoraSlot& s);

// PEFT's target_modules rule: a module matches a target when its name equals it or ends with
// "." + target.
bool lora_target_matches(const std::string& module, const std::string& target);

}  // namespace moe
