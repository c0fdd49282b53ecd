// linear.h — the model's one dense linear path (DESIGN.md invariant 8): y = x Wᵀ + b plus the
// LoRA adapters of the projection, each adding into its own columns of y (the stacked q/k/v
// projection carries three). Attention (q/k/v, o), the router, shared experts and dense MLPs
// go through it in training; the routed experts' split LoRA lives in the grouped expert ops
// (ops.h) over the same offsets. Inference reads merged weights (no adapters here).
#pragma once
#include <initializer_list>

#include "core/lora.h"
#include "core/tensor.h"

namespace moe {

// One adapter of a projection: its factors, their gradients (backward; nullptr or undefined
// tensors: not computed) and the first output column it adds into.
struct LinearLora {
  const Lora* w = nullptr;
  Lora* g = nullptr;
  int64_t col0 = 0;
};

// y = x wᵀ + b (+ every adapter that is on).  y [N,M], x [N,Kd], w [M,Kd], b [M] or undefined.
void linear(Tensor& y, const Tensor& x, const Tensor& w, const Tensor& b, std::initializer_list<LinearLora> lora = {});

// Backward of linear: dx (=, or += with accumulate; may be undefined), dw/db += (undefined:
// frozen, not computed), and each adapter's gradients += (its dx part added into dx).
void linear_backward(Tensor& dx, Tensor& dw, Tensor& db, const Tensor& dy, const Tensor& x, const Tensor& w,
                     bool accumulate, std::initializer_list<LinearLora> lora);

}  // namespace moe
