// test_gemm_onednn.cpp — the GEMMs that round x to bf16: oneDNN's matmul on the matrix units
// (ops/cpu/cpu_gemm_onednn.h) and the batched-decode bf16 dot kernel (cpu_gemm_bf16dot.h).
//
// The wrapper around oneDNN's matmul is the same for f32 and bf16 weights: the f32 path, which
// every CPU has, checks the layout here (weights read as [m, k] rows, out's row stride ldo,
// accumulation, row counts padded for the primitive cache) against a float64 product. The bf16
// path needs AMX or AVX512-BF16, the dot kernel AVX512-BF16: where the CPU has them they are
// checked against the float64 product of x rounded to bf16 (bf16 x bf16 products are exact in
// f32, so only f32 summation separates them: |y - r| <= 1e-5 · Σ|x̂|·|w| + 1e-30); elsewhere
// those tests say SKIPPED.
#include <gtest/gtest.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <random>
#include <vector>

#include "gemm_reference.h"

#include "core/dtype.h"
#include "core/error.h"
#include "core/nf4.h"
#include "ops/cpu/cpu_gemm.h"
#include "ops/cpu/cpu_gemm_bf16dot.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "ops/cpu/cpu_quant_gemm.h"

namespace moe {
namespace {

using Shape = test::GemmCase;

// Rows that pad to the next bucket (17, 300), exact buckets (32), m and k not multiples of any
// vector width, and out wider than m (ldo) with accumulation onto it.
const Shape kShapes[] = {{17, 33, 70, 33, false}, {32, 64, 128, 80, true}, {300, 48, 96, 48, false},
                         {21, 129, 257, 140, true}};

std::vector<uint16_t> to_bf16_bits(const std::vector<float>& v) {
  std::vector<uint16_t> r(v.size());
  for (size_t i = 0; i < v.size(); ++i) r[i] = f32_to_bf16(v[i]);
  return r;
}

TEST(OneDnnGemm, F32LayoutMatchesFloat64Product) {
  if (cpu::onednn_isa_name().rfind("none", 0) == 0) GTEST_SKIP() << "SKIPPED: built without oneDNN";
  uint32_t seed = 1;
  for (const Shape& s : kShapes) {
    auto x = test::random_floats(size_t(s.n * s.k), seed++), w = test::random_floats(size_t(s.m * s.k), seed++);
    auto out = test::random_floats(size_t(s.n * s.ldo), seed++);
    std::vector<double> r, bound;
    test::gemm_reference(x, w, out, s, &r, &bound);
    cpu::onednn_gemm_xwt(out.data(), s.ldo, x.data(), w.data(), DType::F32, s.n, s.m, s.k, s.accumulate);
    test::expect_gemm_within(out, r, bound, s);
  }
}

TEST(OneDnnGemm, RefusesOtherDtypes) {
  if (cpu::onednn_isa_name().rfind("none", 0) == 0) GTEST_SKIP() << "SKIPPED: built without oneDNN";
  std::vector<float> x(32 * 8, 1.0f), out(32 * 8);
  std::vector<uint16_t> w(8 * 8, 0);
  EXPECT_THROW(cpu::onednn_gemm_xwt(out.data(), 8, x.data(), w.data(), DType::F16, 32, 8, 8, false), Error);
  EXPECT_THROW(cpu::onednn_gemm_xw(out.data(), x.data(), 8, w.data(), DType::F16, 32, 8, 8, false), Error);
  EXPECT_THROW(cpu::onednn_gemm_atb(out.data(), 8, x.data(), 8, x.data(), 8, DType::F16, 32, 8, 8, true), Error);
}

// The backward's two products, on the f32 path (every CPU): out [n, k] (+)= x [n, m] · w [m, k]
// and dw [m, ldw] += dy [n, ldy]ᵀ · x [n, ldx] (first m / k columns; dw's columns past k and
// x's and dy's past their widths untouched / unread), against float64.
struct BackShape {
  int64_t n, m, k, ldw, ldy, ldx;
};
// (m 4500: dW in blocks of rows, dw_product, three of 1500, each reading dY from its column.)
const BackShape kBackShapes[] = {{17, 33, 70, 70, 33, 70}, {300, 48, 96, 100, 50, 97}, {5, 129, 40, 40, 129, 40},
                                 {64, 16, 16, 20, 16, 18},   {9, 4500, 24, 30, 4503, 25}};

// out0 + x·w (x [n, m], w [m, k]) in float64 with its summation bound.
void reference_xw(const std::vector<float>& x, const std::vector<float>& w, const std::vector<float>& out0,
                  bool accumulate, const BackShape& s, std::vector<double>* r, std::vector<double>* bound) {
  r->assign(size_t(s.n * s.k), 0.0);
  bound->assign(size_t(s.n * s.k), 0.0);
  for (int64_t i = 0; i < s.n; ++i)
    for (int64_t j = 0; j < s.k; ++j) {
      const size_t o = size_t(i * s.k + j);
      double acc = accumulate ? out0[o] : 0.0, mag = accumulate ? std::fabs(out0[o]) : 0.0;
      for (int64_t t = 0; t < s.m; ++t) {
        const double p = double(x[size_t(i * s.m + t)]) * double(w[size_t(t * s.k + j)]);
        acc += p;
        mag += std::fabs(p);
      }
      (*r)[o] = acc;
      (*bound)[o] = 1e-5 * mag + 1e-30;
    }
}

// dw0 + dyᵀ·x in float64 over dw's [m, ldw] (columns past k: dw0 as it was).
// dw0 then dW = dw0 + dYᵀ·X (accumulate) or dYᵀ·X (dw0's padding columns kept either way).
void reference_atb(const std::vector<float>& dy, const std::vector<float>& x, const std::vector<float>& dw0,
                   const BackShape& s, bool accumulate, std::vector<double>* r, std::vector<double>* bound) {
  r->assign(dw0.begin(), dw0.end());
  bound->assign(dw0.size(), 0.0);
  for (int64_t i = 0; i < s.m; ++i)
    for (int64_t j = 0; j < s.k; ++j) {
      const size_t o = size_t(i * s.ldw + j);
      double acc = accumulate ? dw0[o] : 0.0, mag = std::fabs(acc);
      for (int64_t t = 0; t < s.n; ++t) {
        const double p = double(dy[size_t(t * s.ldy + i)]) * double(x[size_t(t * s.ldx + j)]);
        acc += p;
        mag += std::fabs(p);
      }
      (*r)[o] = acc;
      (*bound)[o] = 1e-5 * mag + 1e-30;
    }
}

void expect_within_back(const std::vector<float>& out, const std::vector<double>& r, const std::vector<double>& bound,
                        const BackShape& s, const char* what) {
  int bad = 0;
  for (size_t o = 0; o < out.size(); ++o)
    if (!(std::fabs(double(out[o]) - r[o]) <= bound[o]) && bad++ < 5)
      ADD_FAILURE() << what << " n " << s.n << " m " << s.m << " k " << s.k << " at " << o << ": " << out[o] << " vs "
                    << r[o];
  EXPECT_EQ(bad, 0) << what;
}

TEST(OneDnnGemm, F32BackwardLayoutsMatchFloat64Products) {
  if (cpu::onednn_isa_name().rfind("none", 0) == 0) GTEST_SKIP() << "SKIPPED: built without oneDNN";
  uint32_t seed = 50;
  for (const BackShape& s : kBackShapes) {
    for (bool acc : {false, true}) {
      auto x = test::random_floats(size_t(s.n * s.m), seed++), w = test::random_floats(size_t(s.m * s.k), seed++);
      auto out = test::random_floats(size_t(s.n * s.k), seed++);
      std::vector<double> r, bound;
      reference_xw(x, w, out, acc, s, &r, &bound);
      cpu::onednn_gemm_xw(out.data(), x.data(), s.m, w.data(), DType::F32, s.n, s.m, s.k, acc);
      expect_within_back(out, r, bound, s, "xw");
    }
    for (bool acc : {false, true}) {
      auto dy = test::random_floats(size_t(s.n * s.ldy), seed++), x = test::random_floats(size_t(s.n * s.ldx), seed++);
      auto dw = test::random_floats(size_t(s.m * s.ldw), seed++);
      std::vector<double> r, bound;
      reference_atb(dy, x, dw, s, acc, &r, &bound);
      cpu::onednn_gemm_atb(dw.data(), s.ldw, dy.data(), s.ldy, x.data(), s.ldx, DType::F32, s.n, s.m, s.k, acc);
      expect_within_back(dw, r, bound, s, acc ? "atb accumulate" : "atb assign");
    }
  }
}

// Inside a parallel region (training's experts: each thread its own rows) every thread's call
// runs on that thread and gives the product the top-level call gives.
TEST(OneDnnGemm, InsideAParallelRegionEachThreadItsOwnProduct) {
  if (cpu::onednn_isa_name().rfind("none", 0) == 0) GTEST_SKIP() << "SKIPPED: built without oneDNN";
  const Shape s{300, 48, 96, 48, false};
  std::vector<DType> types = {DType::F32};
  if (cpu::bf16_matrix_available()) types.push_back(DType::BF16);
  for (DType dt : types) {
    auto x = test::random_floats(size_t(s.n * s.k), 70), wf = test::random_floats(size_t(s.m * s.k), 71);
    const std::vector<uint16_t> wb = to_bf16_bits(wf);
    const void* w = dt == DType::BF16 ? static_cast<const void*>(wb.data()) : wf.data();
    std::vector<float> top(size_t(s.n * s.ldo));
    cpu::onednn_gemm_xwt(top.data(), s.ldo, x.data(), w, dt, s.n, s.m, s.k, false);
    std::vector<std::vector<float>> per(4, std::vector<float>(top.size(), -1.0f));
#pragma omp parallel for num_threads(2) schedule(static, 1)
    for (int t = 0; t < 4; ++t) cpu::onednn_gemm_xwt(per[size_t(t)].data(), s.ldo, x.data(), w, dt, s.n, s.m, s.k, false);
    for (int t = 0; t < 4; ++t) {
      double worst = 0;
      for (size_t i = 0; i < top.size(); ++i)
        worst = std::max(worst, std::fabs(double(per[size_t(t)][i]) - top[i]) / (1.0 + std::fabs(top[i])));
      EXPECT_LE(worst, 1e-5) << dtype_name(dt) << " call " << t;
    }
  }
}

TEST(OneDnnGemm, ModeFollowsTheCpu) {
  // The library keeps x exact by default on every CPU; the inference commands opt in.
  if (std::getenv("MOE_BF16_GEMM")) GTEST_SKIP() << "SKIPPED: MOE_BF16_GEMM is set";
  EXPECT_EQ(cpu::bf16_gemm(), cpu::Bf16Gemm::Widen);
  cpu::use_bf16_matrix_where_available();
  EXPECT_EQ(cpu::bf16_gemm(), cpu::bf16_matrix_available() ? cpu::Bf16Gemm::Matrix : cpu::Bf16Gemm::Widen);
  cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
  if (!cpu::bf16_matrix_available()) {
    try {
      cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
      ADD_FAILURE() << "asking for matrix units on a CPU without them must fail";
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(cpu::onednn_isa_name()), std::string::npos) << e.what();
    }
  }
}

// x rounded to bf16 as the matrix path does (to nearest even).

// A product of shape s with x, w (stored bf16) and out random, and its float64 reference with x
// rounded to bf16 (r, bound).
struct RoundedCase {
  std::vector<float> x, out;
  std::vector<uint16_t> w;
  std::vector<double> r, bound;
};

RoundedCase rounded_case(const Shape& s, uint32_t seed) {
  RoundedCase c;
  c.x = test::random_floats(size_t(s.n * s.k), seed);
  const auto wf = test::random_floats(size_t(s.m * s.k), seed + 1);
  c.out = test::random_floats(size_t(s.n * s.ldo), seed + 2);
  c.w = to_bf16_bits(wf);
  test::gemm_reference(test::bf16_rounded(c.x), test::bf16_rounded(wf), c.out, s, &c.r, &c.bound);
  return c;
}

TEST(OneDnnGemm, Bf16MatchesFloat64ProductOfRoundedX) {
  if (!cpu::bf16_matrix_available())
    GTEST_SKIP() << "SKIPPED: no AMX / AVX512-BF16 here (oneDNN ISA " << cpu::onednn_isa_name() << ")";
  uint32_t seed = 100;
  for (const Shape& s : kShapes) {
    RoundedCase c = rounded_case(s, seed);
    seed += 3;
    // Through gemm_xwt, the way linear and expert ops reach it.
    cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
    cpu::gemm_xwt(c.out.data(), s.ldo, c.x.data(), c.w.data(), DType::BF16, s.n, s.m, s.k, s.accumulate);
    cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
    test::expect_gemm_within(c.out, c.r, c.bound, s);
  }
}

// Mixed-precision training's backward: dX = dY·W on bf16 weights and dW += dYᵀ·X for them,
// through gemm_xw / gemm_atb as the linear and expert backward reach them, both factors
// rounded to bf16 (the f32 path without Matrix mode keeps them exact: the default tests).
TEST(OneDnnGemm, Bf16BackwardMatchesFloat64ProductsOfRoundedFactors) {
  if (!cpu::bf16_matrix_available())
    GTEST_SKIP() << "SKIPPED: no AMX / AVX512-BF16 here (oneDNN ISA " << cpu::onednn_isa_name() << ")";
  uint32_t seed = 200;
  for (const BackShape& s : kBackShapes) {
    auto x = test::random_floats(size_t(s.n * s.m), seed++), wf = test::random_floats(size_t(s.m * s.k), seed++);
    auto out = test::random_floats(size_t(s.n * s.k), seed++);
    const std::vector<uint16_t> w = to_bf16_bits(wf);
    std::vector<double> r, bound;
    reference_xw(test::bf16_rounded(x), test::bf16_rounded(wf), out, true, s, &r, &bound);
    cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
    cpu::gemm_xw(out.data(), x.data(), w.data(), DType::BF16, s.n, s.m, s.k, true);
    cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
    expect_within_back(out, r, bound, s, "xw bf16");

    BackShape sa = s;  // gemm_atb reads x's rows densely
    sa.ldx = s.k;
    for (bool acc : {false, true}) {  // dW = / += dYᵀ·X
      auto dy = test::random_floats(size_t(s.n * s.ldy), seed++), xa = test::random_floats(size_t(s.n * s.k), seed++);
      auto dw = test::random_floats(size_t(s.m * s.ldw), seed++), dw_exact = dw;
      std::vector<double> ra, ba, re, be;
      reference_atb(test::bf16_rounded(dy), test::bf16_rounded(xa), dw, sa, acc, &ra, &ba);
      reference_atb(dy, xa, dw, sa, acc, &re, &be);
      cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
      cpu::gemm_atb(dw.data(), s.ldw, dy.data(), s.ldy, xa.data(), DType::BF16, s.n, s.m, s.k, acc);
      cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
      expect_within_back(dw, ra, ba, s, acc ? "atb bf16 accumulate" : "atb bf16 assign");
      // f32 weights' gradients stay exact under Matrix mode (only bf16 weights' products round).
      cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
      cpu::gemm_atb(dw_exact.data(), s.ldw, dy.data(), s.ldy, xa.data(), DType::F32, s.n, s.m, s.k, acc);
      cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
      expect_within_back(dw_exact, re, be, s, acc ? "atb f32 accumulate" : "atb f32 assign");
    }
  }
}

// gemm_xw_atb rounds dy once for both products of a linear backward: the same bits as
// gemm_xw then gemm_atb, under Matrix mode (one rounding) and Widen (the two calls), with
// and without accumulation onto dx, dw accumulated or assigned; under Matrix mode dy given in
// bf16 (the LM head's gradient) gives the same bits again.
TEST(OneDnnGemm, LinearBackwardBothProductsEqualTheTwoCalls) {
  std::vector<cpu::Bf16Gemm> modes = {cpu::Bf16Gemm::Widen};
  if (cpu::bf16_matrix_available()) modes.push_back(cpu::Bf16Gemm::Matrix);
  uint32_t seed = 300;
  for (cpu::Bf16Gemm mode : modes) {
    for (const BackShape& s : kBackShapes) {
      for (int variant = 0; variant < 4; ++variant) {
        const bool acc = variant & 1, assign = variant & 2;
        const int64_t n = s.n, m = s.m, k = s.k;
        const auto dy = test::random_floats(size_t(n * m), seed++), x = test::random_floats(size_t(n * k), seed++);
        const std::vector<uint16_t> w = to_bf16_bits(test::random_floats(size_t(m * k), seed++));
        const auto dx0 = test::random_floats(size_t(n * k), seed++), dw0 = test::random_floats(size_t(m * k), seed++);
        std::vector<float> dx_a = dx0, dw_a = dw0, dx_b = dx0, dw_b = dw0, dx_c = dx0, dw_c = dw0;
        cpu::set_bf16_gemm(mode);
        cpu::gemm_xw(dx_a.data(), dy.data(), w.data(), DType::BF16, n, m, k, acc);
        cpu::gemm_atb(dw_a.data(), k, dy.data(), m, x.data(), DType::BF16, n, m, k, !assign);
        cpu::gemm_xw_atb(dx_b.data(), dw_b.data(), dy.data(), x.data(), w.data(), DType::BF16, n, m, k, acc, assign);
        const std::vector<uint16_t> dy16 = to_bf16_bits(dy);
        cpu::gemm_xw_atb(dx_c.data(), dw_c.data(), dy16.data(), x.data(), w.data(), DType::BF16, n, m, k, acc, assign);
        cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
        const bool matrix = mode == cpu::Bf16Gemm::Matrix;
        EXPECT_EQ(dx_a, dx_b) << "dx, n " << n << " matrix " << matrix << " accumulate " << acc << " assign " << assign;
        EXPECT_EQ(dw_a, dw_b) << "dw, n " << n << " matrix " << matrix << " accumulate " << acc << " assign " << assign;
        EXPECT_NE(dw_b, dw0);
        if (matrix) {
          EXPECT_EQ(dx_a, dx_c) << "dx from bf16 dy, n " << n << " accumulate " << acc << " assign " << assign;
          EXPECT_EQ(dw_a, dw_c) << "dw from bf16 dy, n " << n << " accumulate " << acc << " assign " << assign;
        }
      }
    }
  }
}

// A QLoRA base (NF4, and NF4 with double-quantised absmax values) under bf16 products: each
// chunk of the weight's rows dequantized, rounded to bf16 and multiplied on the matrix units,
// forward (x·wᵀ) and backward (dY·w); k 8192 makes the chunks 128 rows, so m 300 takes three
// (the backward's later chunks accumulate, and read x's columns at an offset with x's full row
// stride).
TEST(OneDnnGemm, Nf4ChunksMatchFloat64ProductsOfRoundedFactors) {
  if (!cpu::bf16_matrix_available())
    GTEST_SKIP() << "SKIPPED: no AMX / AVX512-BF16 here (oneDNN ISA " << cpu::onednn_isa_name() << ")";
  for (DType qdt : {DType::NF4, DType::NF4DQ}) {
  SCOPED_TRACE(dtype_name(qdt));
  const int64_t n = 9, m = 300, k = 8192;
  const auto wf = test::random_floats(size_t(m * k), 400);
  std::vector<uint8_t> wq(dtype_nbytes(qdt, m * k));
  convert_from_f32(wq.data(), wf.data(), qdt, size_t(m * k));
  std::vector<float> wd(wf.size());
  convert_to_f32(wd.data(), wq.data(), qdt, size_t(m * k));
  const std::vector<float> wr = test::bf16_rounded(wd);
  // forward: out [n, m] += x [n, k] · wᵀ
  {
    const Shape s{n, m, k, m, true};
    auto x = test::random_floats(size_t(n * k), 401), out = test::random_floats(size_t(n * m), 402);
    std::vector<double> r, bound;
    test::gemm_reference(test::bf16_rounded(x), wr, out, s, &r, &bound);
    cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
    cpu::gemm_xwt(out.data(), m, x.data(), wq.data(), qdt, n, m, k, true);
    cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
    test::expect_gemm_within(out, r, bound, s);
  }
  // backward: out [n, k] = dy [n, m] · w
  {
    const BackShape s{n, m, k, k, m, k};
    auto dy = test::random_floats(size_t(n * m), 403), out = test::random_floats(size_t(n * k), 404);
    std::vector<double> r, bound;
    reference_xw(test::bf16_rounded(dy), wr, out, false, s, &r, &bound);
    cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
    cpu::gemm_xw(out.data(), dy.data(), wq.data(), qdt, n, m, k, false);
    cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
    expect_within_back(out, r, bound, s, "xw nf4");
  }
  }
}

TEST(OneDnnGemm, ExactPathKeepsXInF32) {
  if (!cpu::bf16_matrix_available())
    GTEST_SKIP() << "SKIPPED: no AMX / AVX512-BF16 here (oneDNN ISA " << cpu::onednn_isa_name() << ")";
  const Shape s{40, 24, 64, 24, false};
  auto x = test::random_floats(size_t(s.n * s.k), 7), wf = test::random_floats(size_t(s.m * s.k), 8);
  const std::vector<uint16_t> w = to_bf16_bits(wf);
  std::vector<float> out(size_t(s.n * s.ldo), 0.0f), out0 = out;
  std::vector<double> r, bound;
  test::gemm_reference(x, test::bf16_rounded(wf), out0, s, &r, &bound);  // x not rounded
  cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
  cpu::set_quant_exact(true);
  cpu::gemm_xwt(out.data(), s.ldo, x.data(), w.data(), DType::BF16, s.n, s.m, s.k, false);
  cpu::set_quant_exact(false);
  cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
  test::expect_gemm_within(out, r, bound, s);
}


// The dot kernel at the row counts serving's batched decode gives it (2-64; groups of up to 6
// rows of x, 4 weight rows per tile, each thread's rows cut in 4 parts), m below, at and past a
// tile and not a multiple of 4 or of the thread count, k with and without a partial 32-wide step;
// up to 16 rows of x with k past a 256-wide block of the sum (kKBlock: several groups' partial
// sums carried from block to block, the last block partial), and 17 rows past it (whole rows).
const Shape kDotShapes[] = {{2, 1, 32, 1, false},     {3, 5, 31, 7, true},       {5, 37, 70, 40, false},
                            {6, 130, 257, 130, true},  {7, 64, 1, 64, false},     {13, 9, 96, 9, true},
                            {16, 203, 100, 210, false}, {17, 33, 33, 33, true},   {32, 41, 160, 41, false},
                            {64, 19, 47, 19, true},    {16, 37, 600, 37, true},   {12, 9, 513, 9, false},
                            {17, 21, 700, 21, false}};

TEST(Bf16DotGemm, MatchesFloat64ProductOfRoundedX) {
  if (!cpu::bf16dot_available()) GTEST_SKIP() << "SKIPPED: no AVX512-BF16 here";
  uint32_t seed = 300;
  for (const Shape& s : kDotShapes) {
    RoundedCase c = rounded_case(s, seed);
    seed += 3;
    auto out_region = c.out;
    cpu::gemm_xwt_bf16dot(c.out.data(), s.ldo, c.x.data(), c.w.data(), s.n, s.m, s.k, s.accumulate);
    test::expect_gemm_within(c.out, c.r, c.bound, s);
    // Inside a parallel region (the experts' tasks): the calling thread alone, same result.
#pragma omp parallel num_threads(2)
    {
#pragma omp single
      cpu::gemm_xwt_bf16dot(out_region.data(), s.ldo, c.x.data(), c.w.data(), s.n, s.m, s.k, s.accumulate);
    }
    test::expect_gemm_within(out_region, c.r, c.bound, s);
  }
}

TEST(Bf16DotGemm, GemmTakesItOnlyWhereXMayBeRounded) {
  if (!cpu::bf16dot_available() || !cpu::bf16_matrix_available())
    GTEST_SKIP() << "SKIPPED: no AVX512-BF16 here (oneDNN ISA " << cpu::onednn_isa_name() << ")";
  // Default mode (x exact): the streaming f32 kernel, 16 rows at most; opted in: 64 rows, x rounded.
  EXPECT_EQ(cpu::gemm_stream_rows(DType::BF16), 16);
  const Shape s{9, 50, 90, 50, false};
  // Rounding x to bf16 moves each product by up to 2^-9 relative: over 90 terms the two paths
  // differ by far more than the 1e-5 summation bound, so each reference tells them apart.
  auto x = test::random_floats(size_t(s.n * s.k), 11), wf = test::random_floats(size_t(s.m * s.k), 12);
  const std::vector<uint16_t> w = to_bf16_bits(wf);
  std::vector<float> zero(size_t(s.n * s.ldo), 0.0f), exact = zero, rounded = zero;
  std::vector<double> r_exact, r_rounded, bound;
  test::gemm_reference(x, test::bf16_rounded(wf), zero, s, &r_exact, &bound);
  cpu::gemm_xwt(exact.data(), s.ldo, x.data(), w.data(), DType::BF16, s.n, s.m, s.k, false);
  test::expect_gemm_within(exact, r_exact, bound, s);
  cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
  EXPECT_EQ(cpu::gemm_stream_rows(DType::BF16), 64);
  EXPECT_EQ(cpu::gemm_stream_rows(DType::F32), 16);
  test::gemm_reference(test::bf16_rounded(x), test::bf16_rounded(wf), zero, s, &r_rounded, &bound);
  cpu::gemm_xwt(rounded.data(), s.ldo, x.data(), w.data(), DType::BF16, s.n, s.m, s.k, false);
  test::expect_gemm_within(rounded, r_rounded, bound, s);
  // The exact path (moe logits) keeps x in f32 even when the process opted in.
  cpu::set_quant_exact(true);
  EXPECT_EQ(cpu::gemm_stream_rows(DType::BF16), 16);
  std::fill(exact.begin(), exact.end(), 0.0f);
  cpu::gemm_xwt(exact.data(), s.ldo, x.data(), w.data(), DType::BF16, s.n, s.m, s.k, false);
  cpu::set_quant_exact(false);
  cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
  test::expect_gemm_within(exact, r_exact, bound, s);
}

}  // namespace
}  // namespace moe
