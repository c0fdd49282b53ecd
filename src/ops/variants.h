// variants.h — optional variants of the attention, RoPE and grouped-expert ops that some
// families need (gpt-oss: attention sinks and sliding windows, YaRN tables, clamped SwiGLU with
// expert biases). Each default-constructed value is the plain op, so the common path reads the
// same code; ops.h documents the maths where each is taken.
#pragma once
#include <cstdint>

#include "core/rope_scaling.h"
#include "core/tensor.h"

namespace moe {

// Attention: a learned sink logit per head joins every softmax row as one more key without a
// value (its probability is dropped, so a row sums to < 1; the sink is not scaled), and/or a
// sliding window: query at position i sees keys j with i - window < j <= i.
struct AttnVariant {
  Tensor sinks;        // [H] float, undefined: none
  int64_t window = 0;  // 0: full causal
  bool plain() const { return !sinks.defined() && window == 0; }
  // Keys [first, pos] are visible from position pos.
  int64_t first_key(int64_t pos) const { return window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0; }
};

// The routed experts' gated activation, per element with h1 = gate and h3 = up pre-activations:
//   g = min(h1, limit), u = clamp(h3, -limit, limit), act = g · sigmoid(alpha · g) · (u + 1)
// (gpt-oss, no lower clamp on the gate); limit 0 is the plain SwiGLU silu(h1) · h3.
// The clamps pass no gradient where they bind.
struct ExpertGlu {
  float alpha = 1;
  float limit = 0;
  bool plain() const { return limit == 0; }
};

// Routed experts' biases, each optional: b1, b3 [E,F] add to the gate/up pre-activations, b2
// [E,D] to the down projection's output (before the routing weight scales the row, as HF
// multiplies the whole expert output).
struct ExpertBias {
  Tensor b1, b3, b2;
  bool any() const { return b1.defined() || b3.defined() || b2.defined(); }
};

}  // namespace moe
