// test_simd_exp.cpp — the vector e^x kernels of ops/cpu/cpu_simd_exp.h against f64 std::exp.
//
// exp8f (eight f32 lanes) runs the cross-entropy's softmax over the vocabulary: its error
// reaches the loss and every logit's gradient, so it is bounded here at 4 f32 ulp relative
// (2.4e-7) over the arguments the softmax gives it (l - max <= 0, down to where e^x underflows
// f32's normal range) and a positive range. The op tests compare the whole cross-entropy with the
// reference at 1e-5, which a coefficient error of 1e-5 in the polynomial would pass.
#include <gtest/gtest.h>

#include <cmath>

#include "ops/cpu/cpu_simd_exp.h"

namespace moe {
namespace {

#if defined(__AVX2__) && defined(__FMA__)
TEST(SimdExp, Exp8fWithinFourUlpOfExp) {
  double worst = 0, at = 0;
  alignas(32) float in[8], out[8];
  // A dense sweep of [-87, 30] (steps of ~1e-4 plus an irrational offset, so the arguments do
  // not sit on the reduction's k·ln2 grid).
  const double lo = -87.0, hi = 30.0, step = 1.0e-4 * 1.0000001;
  for (double x0 = lo; x0 < hi; x0 += 8 * step) {
    for (int i = 0; i < 8; ++i) in[i] = static_cast<float>(x0 + i * step);
    _mm256_store_ps(out, cpu::exp8f(_mm256_load_ps(in)));
    for (int i = 0; i < 8; ++i) {
      const double want = std::exp(double(in[i]));
      const double rel = std::fabs(double(out[i]) - want) / want;
      if (rel > worst) worst = rel, at = in[i];
    }
  }
  EXPECT_LE(worst, 4 * 5.96e-8) << "worst relative error at x = " << at;
  // Clamped ends: far below gives a tiny normal number, not 0 or a denormal; NaN stays NaN.
  for (int i = 0; i < 8; ++i) in[i] = i < 4 ? -1000.0f : NAN;
  _mm256_store_ps(out, cpu::exp8f(_mm256_load_ps(in)));
  for (int i = 0; i < 4; ++i) {
    EXPECT_GT(out[i], 0.0f);
    EXPECT_TRUE(std::isnormal(out[i])) << out[i];
  }
  for (int i = 4; i < 8; ++i) EXPECT_TRUE(std::isnan(out[i])) << out[i];
}
#endif

}  // namespace
}  // namespace moe
