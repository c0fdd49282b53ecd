// gemm_reference.h — the float64 reference of the x·wᵀ products the GEMM tests check
// (test_gemm_onednn.cpp: oneDNN and the dot kernel; test_bf16_panels.cpp: the panel kernel).
//
// bf16 x bf16 products are exact in f32, so a kernel that rounds x (and stores w) in bf16 differs
// from the float64 product of the rounded values only by its f32 summation:
// |y - r| <= 1e-5 · Σ|x̂|·|w| + 1e-30 per output.
#pragma once
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "core/dtype.h"

namespace moe {
namespace test {

// A product out [n, ldo] (+)= x [n, k] · w [m, k]ᵀ (the first m columns of out).
struct GemmCase {
  int64_t n, m, k, ldo;
  bool accumulate;
};

// n values uniform in [-1, 1) from seed.
inline std::vector<float> random_floats(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (auto& x : v) x = u(g);
  return v;
}

// v with each value rounded to bf16 (to nearest even) and back.
inline std::vector<float> bf16_rounded(const std::vector<float>& v) {
  std::vector<float> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = bf16_to_f32(f32_to_bf16(v[i]));
  return r;
}

// out0 + x·wᵀ in float64 (x, w as given), and the bound on f32 summation error per output.
inline void gemm_reference(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& out0,
                           const GemmCase& s, std::vector<double>* r, std::vector<double>* bound) {
  r->assign(size_t(s.n * s.ldo), 0.0);
  bound->assign(size_t(s.n * s.ldo), 0.0);
  for (int64_t i = 0; i < s.n; ++i)
    for (int64_t j = 0; j < s.ldo; ++j) {
      const size_t o = size_t(i * s.ldo + j);
      if (j >= s.m) {
        (*r)[o] = out0[o];  // past the first m columns: untouched
        continue;
      }
      double acc = s.accumulate ? out0[o] : 0.0, mag = s.accumulate ? std::fabs(out0[o]) : 0.0;
      for (int64_t t = 0; t < s.k; ++t) {
        acc += double(x[size_t(i * s.k + t)]) * double(w[size_t(j * s.k + t)]);
        mag += std::fabs(double(x[size_t(i * s.k + t)]) * double(w[size_t(j * s.k + t)]));
      }
      (*r)[o] = acc;
      (*bound)[o] = 1e-5 * mag + 1e-30;
    }
}

// out within bound of r, naming the first few outputs that are not.
inline void expect_gemm_within(const std::vector<float>& out, const std::vector<double>& r,
                               const std::vector<double>& bound, const GemmCase& s) {
  int bad = 0;
  for (size_t o = 0; o < out.size(); ++o)
    if (!(std::fabs(double(out[o]) - r[o]) <= bound[o]) && bad++ < 5)
      ADD_FAILURE() << "n " << s.n << " m " << s.m << " k " << s.k << " ldo " << s.ldo << " at " << o << ": "
                    << out[o] << " vs " << r[o];
  EXPECT_EQ(bad, 0);
}

}  // namespace test
}  // namespace moe
