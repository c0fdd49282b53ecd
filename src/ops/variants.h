// variants.h — optional variants of the attention, RoPE, router and grouped-expert ops that some
// families need (gpt-oss: attention sinks and sliding windows, YaRN tables, clamped SwiGLU with
// expert biases; DeepSeek-V2/V3: a softmax scale other than 1/sqrt(Dh), interleaved RoPE pairs,
// sigmoid or group-limited routing with a scaling factor). Each default-constructed value is the
// plain op, so the common path reads the same code; ops.h documents the maths where each is taken.
#pragma once
#include <cstdint>

#include "core/rope_scaling.h"
#include "core/tensor.h"

namespace moe {

// Attention: a learned sink logit per head joins every softmax row as one more key without a
// value (its probability is dropped, so a row sums to < 1; the sink is not scaled), and/or a
// sliding window: query at position i sees keys j with i - window < j <= i.
// `scale` replaces the softmax scale 1/sqrt(Dh) when non-zero (MLA: 1/sqrt(Dn+Dr) · mscale² while
// the absorbed keys are Rkv+Dr wide, or with the value part padded).
struct AttnVariant {
  Tensor sinks;        // [H] float, undefined: none
  int64_t window = 0;  // 0: full causal
  float scale = 0;     // 0: 1/sqrt(Dh)
  bool plain() const { return !sinks.defined() && window == 0 && scale == 0; }
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

// Router (the MoE block's step 1), per token over logits l [E]:
//   scores      s = softmax(l) (plain) or sigmoid(l) (DeepSeek-V3)
//   selection   u = s + select_bias (the bias only selects); with n_group > 1 the E experts form
//               n_group consecutive groups, each scored by its largest u (group_top2: the sum of
//               its two largest, V3), the topk_group best groups are kept and the other experts'
//               u set to 0 (HF's masked_fill value, not -inf), then the K largest u are taken
//               (ties: lower index first)
//   weights     w_j = s[idx_j] / (renorm ? Σ_j s[idx_j] + renorm_eps : 1) · scale
// The default value is the plain op (softmax, one group, no scale).
struct RouterVariant {
  bool sigmoid = false;
  bool renorm = false;
  double renorm_eps = 0;    // added to the renormalising sum (DeepSeek-V3: 1e-20)
  int64_t n_group = 1, topk_group = 1;
  bool group_top2 = false;  // group score: sum of the two largest (V3), else the largest (V2)
  double scale = 1;         // routed_scaling_factor
  bool plain() const { return !sigmoid && n_group <= 1 && scale == 1 && renorm_eps == 0; }
};

}  // namespace moe
