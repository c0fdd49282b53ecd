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
#include "core/tensor.h"

namespace moe {

// fused_a [r·E, in], fused_b [out, r·E] -> a [E, r, in], b [E, out, r] (new f32 tensors).
void split_fused_lora(const Tensor& fused_a, const Tensor& fused_b, int64_t n_expert, Tensor* a, Tensor* b);

// The inverse: a [E, r, in], b [E, out, r] -> fused_a [r·E, in], fused_b [out, r·E].
void join_fused_lora(const Tensor& a, const Tensor& b, Tensor* fused_a, Tensor* fused_b);

}  // namespace moe
