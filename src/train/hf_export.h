// hf_export.h — a model's parameters (or their gradients) as HuggingFace / PEFT write them.
//
// named_parameters (model/model_train.h) lists every parameter as the engine holds it: for most
// families those are the HF tensors themselves (views). Families whose checkpoints fuse the
// routed experts (model/fused_experts.h: gpt_oss) are held per expert in the engine's layout, so
// everything that writes a file — checkpoints, merged models, `moe grad` — goes through here and
// gets the fused tensors (and PEFT's fused adapters) instead.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "model/model.h"

namespace moe {

// named_parameters(c, w, trainable_only) under HF names in the file layout: a fused family's
// per-expert entries of a layer (weights, biases, adapter factors) become its fused tensors
// (new f32 copies) at the place of the layer's first expert entry; every other entry is the
// parameter itself.
std::vector<std::pair<std::string, Tensor>> hf_parameters(const ModelConfig& c, const ModelWeights& w,
                                                          bool trainable_only = false);

}  // namespace moe
