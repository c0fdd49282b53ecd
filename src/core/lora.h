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
  // LoRA dropout (training only): the adapter reads x ⊙ m / (1 − dropout) with m a Bernoulli
  // keep mask drawn from (seed, element index) by lora_keep — the same mask in forward, backward
  // and recompute, a new one each step (the trainer sets seed). 0: off.
  float dropout = 0;
  uint64_t seed = 0;
  bool on() const { return a.defined(); }
};

// Whether element `index` of the adapter's input is kept under dropout p with this seed
// (a counter-based hash: any thread, backend or pass computes the same mask).
inline bool lora_keep(uint64_t seed, uint64_t index, float p) {
  uint64_t z = seed ^ (index * 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  z ^= z >> 31;
  return double(z >> 11) * (1.0 / 9007199254740992.0) >= double(p);
}

// The adapters of the grouped experts' three projections (each may be off). Gradients use the
// same struct (their scale is unused).
struct ExpertLora {
  Lora w1, w3, w2;
  bool any() const { return w1.on() || w3.on() || w2.on(); }
};

}  // namespace moe
