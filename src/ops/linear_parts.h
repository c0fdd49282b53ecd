// linear_parts.h — one part of a product whose output is several linear layers side by side
// (linear_forward_cat, ops.h): attention's q, k and v where a GGUF mix stores them in different
// types and the model cannot stack them into one weight.
#pragma once
#include "core/tensor.h"

namespace moe {

struct LinearPart {
  const Tensor* w = nullptr;     // [M_i, Kd]
  const Tensor* bias = nullptr;  // [M_i], or nullptr / undefined: none
};

}  // namespace moe
