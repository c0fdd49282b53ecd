// rope_scaling.cpp — RoPE frequency tables, default and YaRN (see rope_scaling.h).
#include "core/rope_scaling.h"

#include <algorithm>
#include <cmath>

#include "core/error.h"

namespace moe {

double yarn_mscale(double scale, double m) { return scale <= 1 ? 1.0 : 0.1 * m * std::log(scale) + 1.0; }

double yarn_softmax_factor(const RopeScaling& s) {
  if (s.kind != RopeScalingKind::Yarn || s.mscale_all_dim == 0) return 1.0;
  const double m = yarn_mscale(s.factor, s.mscale_all_dim);
  return m * m;
}

RopeTable rope_table(double theta, int64_t dim, const RopeScaling& s, int64_t max_position_embeddings) {
  MOE_CHECK(dim > 0 && dim % 2 == 0, "rope: head width %lld must be positive and even", (long long)dim);
  RopeTable t;
  t.theta = static_cast<float>(theta);
  if (s.kind == RopeScalingKind::None) return t;
  const int64_t half = dim / 2;
  const double f = s.factor;
  MOE_CHECK(f > 0, "rope_scaling: factor must be positive, got %g", f);
  // attention_factor: given, else mscale(f, mscale) / mscale(f, mscale_all_dim) when both are
  // set, else mscale(f).
  if (s.attention_factor > 0) {
    t.attention_factor = s.attention_factor;
  } else if (s.mscale != 0 && s.mscale_all_dim != 0) {
    t.attention_factor = yarn_mscale(f, s.mscale) / yarn_mscale(f, s.mscale_all_dim);
  } else {
    t.attention_factor = yarn_mscale(f);
  }
  const double orig = double(s.original_max_position_embeddings > 0 ? s.original_max_position_embeddings
                                                                     : max_position_embeddings);
  // The dimension index at which a frequency completes `rot` rotations over the original context.
  auto correction_dim = [&](double rot) {
    return double(dim) * std::log(orig / (rot * 2.0 * M_PI)) / (2.0 * std::log(theta));
  };
  double lo = correction_dim(s.beta_fast), hi = correction_dim(s.beta_slow);
  if (s.truncate) {
    lo = std::floor(lo);
    hi = std::ceil(hi);
  }
  lo = std::max(lo, 0.0);
  hi = std::min(hi, double(dim - 1));
  if (lo == hi) hi += 0.001;  // linear_ramp_factor's guard against a zero-width ramp
  t.inv_freq.resize(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) {
    const double pos_freq = std::pow(theta, double(2 * i) / double(dim));
    const double extrap = 1.0 / pos_freq, interp = 1.0 / (f * pos_freq);
    // extrapolation weight = 1 - clamp((i - lo) / (hi - lo), 0, 1)
    const double ramp = std::clamp((double(i) - lo) / (hi - lo), 0.0, 1.0);
    const double w = 1.0 - ramp;
    t.inv_freq[static_cast<size_t>(i)] = interp * (1.0 - w) + extrap * w;
  }
  return t;
}

}  // namespace moe
