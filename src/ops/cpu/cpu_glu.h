// cpu_glu.h — the routed experts' gated activation per element and its derivatives (variants.h
// ExpertGlu), and expert bias rows, shared by the CPU inference and training expert kernels.
#pragma once
#include <algorithm>
#include <cmath>

#include "core/dtype.h"
#include "ops/variants.h"

namespace moe {
namespace cpu {

// act(h1, h3): silu(h1)·h3 (plain), or g·sigmoid(alpha·g)·(u + 1) with g = min(h1, limit),
// u = clamp(h3, -limit, limit).
inline float glu_act(float h1, float h3, const ExpertGlu& glu) {
  if (glu.plain()) return h1 / (1.0f + std::exp(-h1)) * h3;
  const float g = std::min(h1, glu.limit), u = std::clamp(h3, -glu.limit, glu.limit);
  return g / (1.0f + std::exp(-glu.alpha * g)) * (u + 1.0f);
}

// ∂act/∂h1 and ∂act/∂h3. A clamp passes the gradient where its input lies inside the closed
// range (torch.clamp's rule) and none where it binds.
inline void glu_grad(float h1, float h3, const ExpertGlu& glu, float* d1, float* d3) {
  if (glu.plain()) {
    const float sg = 1.0f / (1.0f + std::exp(-h1));
    *d1 = h3 * sg * (1.0f + h1 * (1.0f - sg));
    *d3 = h1 * sg;
    return;
  }
  const float g = std::min(h1, glu.limit), u = std::clamp(h3, -glu.limit, glu.limit);
  const float sg = 1.0f / (1.0f + std::exp(-glu.alpha * g));
  *d1 = h1 <= glu.limit ? sg * (1.0f + glu.alpha * g * (1.0f - sg)) * (u + 1.0f) : 0.0f;
  *d3 = h3 >= -glu.limit && h3 <= glu.limit ? g * sg : 0.0f;
}

// Row e of a bias [E, n] (any float dtype) as f32 into dst[n].
inline void bias_row(float* dst, const Tensor& b, int64_t e, int64_t n) {
  convert_to_f32(dst, static_cast<const char*>(b.raw()) + dtype_nbytes(b.dtype(), e * n), b.dtype(), size_t(n));
}

}  // namespace cpu
}  // namespace moe
