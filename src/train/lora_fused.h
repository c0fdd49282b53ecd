// lora_fused.h — PEFT's adapter layout for fused 3-D expert parameters (`target_parameters`,
// as Transformers 5 and gpt-oss checkpoints use: one [E, …] tensor for all experts), converted
// to and from the engine's per-expert factors.
//
// PEFT's ParamWrapper keeps ONE lora_A of [r·E, in] and ONE lora_B of [out, r·E] per fused
// parameter. Expert e's factors are A's rows e·r … e·r+r−1 (blocked) and B's columns
// e, e+E, …, e+(r−1)·E (strided): the two sides are sliced differently, which is exactly the
// mistake that silently scrambles experts when an adapter is read as if both were blocked.
// (For gpt-oss, gate_up_proj's tensors are under `…mlp.experts.base_layer.lora_*` and
// down_proj's under `…mlp.experts.lora_*`; "in" is the parameter's input width: hidden for
// gate_up_proj, the expert width for down_proj.)
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "model/model.h"

namespace moe {

// fused_a [r·E, in], fused_b [out, r·E] -> a [E, r, in], b [E, out, r] (new f32 tensors).
void split_fused_lora(const Tensor& fused_a, const Tensor& fused_b, int64_t n_expert, Tensor* a, Tensor* b);

// The inverse: a [E, r, in], b [E, out, r] -> fused_a [r·E, in], fused_b [out, r·E].
void join_fused_lora(const Tensor& a, const Tensor& b, Tensor* fused_a, Tensor* fused_b);

// ---- Families whose checkpoints fuse the experts (model/fused_experts.h: gpt_oss) ----
// gate_up_proj has ONE adapter: an expert's gate and up projections share its A [r, D] (the
// engine's lexp.w1.a and lexp.w3.a are the same tensor, and so are their gradients) and split its
// B [2F, r] by rows (even rows: gate, odd: up, as the weight's columns).

// PEFT's tensor name of one MoE layer's fused adapter: `ab` "A" or "B"; `nested`: both
// parameters are adapted, and gate_up_proj's wrapper (the inner one) then lives under
// ".base_layer": base_model.model.<layer>.mlp.experts[.base_layer].lora_{A,B}.weight.
std::string fused_lora_name(const ModelConfig& c, int64_t layer, bool gate_up, bool nested, const char* ab);

// The layer's expert adapters that are on (weights or gradients: the same layout) as PEFT's
// fused tensors (name, new f32 tensor): gate_up_proj's, then down_proj's. Throws when gate and up
// are not adapted together through one A (PEFT cannot express that).
std::vector<std::pair<std::string, Tensor>> fused_lora_tensors(const ModelConfig& c, int64_t layer,
                                                               const ExpertLora& l);

// Sets one fused adapter (fused_a [r·E, in], fused_b [out, r·E], checked by the caller) on the
// layer's experts: gate_up -> w1, w3 (shared A, B split by rows), else -> w2.
void set_fused_lora(const Tensor& fused_a, const Tensor& fused_b, int64_t n_expert, bool gate_up, float scale,
                    ExpertLora* l);

}  // namespace moe
