// fused_experts.h — fused 3-D expert tensors (gpt-oss; ArchSpec::experts_gate_up) to and from
// the engine's stacked experts, for weights, their gradients and LoRA adapters.
//
// The file layout (HF GptOssExperts, applied as x @ W + b, in×out):
//   gate_up_proj [E, D, 2F]: gate = even columns, up = odd columns (interleaved, not halves)
//   gate_up_proj_bias [E, 2F] (same interleave), down_proj [E, F, D], down_proj_bias [E, D].
// The engine's (model.h): w1, w3 [E, F, D] and w2 [E, D, F] (out×in), b1, b3 [E, F], b2 [E, D]:
//   w1[e,f,d] = gate_up[e,d,2f]   w3[e,f,d] = gate_up[e,d,2f+1]   w2[e,d,f] = down[e,f,d].
// The conversion is a permutation: exact in every dtype.
//
// LoRA on the fused parameters is train/lora_fused.h's; writing a model in the file layout is
// train/hf_export.h's.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "model/model.h"

namespace moe {

// Whether the family stores its routed experts fused (ArchSpec::experts_gate_up).
bool fused_experts(const ModelConfig& c);

// Experts [e0, e0+n) of the fused file tensors as f32 host tensors in the engine's layout
// (category `cat`): w1, w3 [n,F,D], w2 [n,D,F]. gate_up [E,D,2F], down [E,F,D], any float dtype.
void unfuse_expert_weights(const Tensor& gate_up, const Tensor& down, int64_t e0, int64_t n, Tensor* w1, Tensor* w3,
                           Tensor* w2, MemCategory cat);
// The biases: gate_up_bias [E,2F], down_bias [E,D] -> b1, b3 [n,F], b2 [n,D] (f32).
void unfuse_expert_biases(const Tensor& gate_up_bias, const Tensor& down_bias, int64_t e0, int64_t n, Tensor* b1,
                          Tensor* b3, Tensor* b2, MemCategory cat);

// The inverse, f32: w1, w3 [E,F,D] -> gate_up [E,D,2F]; w2 [E,D,F] -> down [E,F,D];
// b1, b3 [E,F] -> gate_up_bias [E,2F].
Tensor fuse_gate_up(const Tensor& w1, const Tensor& w3);
Tensor fuse_down(const Tensor& w2);
Tensor fuse_gate_up_bias(const Tensor& b1, const Tensor& b3);

}  // namespace moe
