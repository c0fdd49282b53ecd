// lora.h — the LoRA factors of one projection, shared by the ops (ops.h) and the model's
// weights (model.h). Fine-tuning (src/train/lora.h) creates and names them.
//
// For a projection W [M,Kd] (y = x Wᵀ), the adapter adds scale · (x aᵀ) bᵀ with a [r,Kd] and
// b [M,r] (PEFT's lora_A / lora_B weights), scale = alpha/r (rsLoRA: alpha/sqrt(r)). The
// product b·a (a dense ΔW) is never formed. Routed experts stack one pair per expert:
// a [E,r,Kd], b [E,M,r]. Factors are f32 (they are what the optimizer trains).
#pragma once
#include "core/tensor.h"

namespace moe {

struct Lora {
  Tensor a, b;
  float scale = 0;
  bool on() const { return a.defined(); }
};

// The adapters of the grouped experts' three projections (each may be off). Gradients use the
// same struct (their scale is unused).
struct ExpertLora {
  Lora w1, w3, w2;
  bool any() const { return w1.on() || w3.on() || w2.on(); }
};

}  // namespace moe
