// test_bf16_panels.cpp — bf16 weights in 16-row panels (core/bf16_panels.h, DType::BF16P), the
// kernel that reads them (gemm_xwt_bf16panels, cpu_gemm_bf16dot.h) and serving's packing of a
// model (model/panel_weights.h).
//
// The layout is checked element by element against its definition (line j of panel p holds the
// pair (2j, 2j+1) of rows 16p..16p+15); the kernel against the float64 product of x rounded to
// bf16 (gemm_reference.h), and each row's result against the same row computed alone, bit for
// bit. The kernel needs AVX512-BF16: elsewhere those tests say SKIPPED.
#include <gtest/gtest.h>

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "gemm_reference.h"

#include "core/bf16_panels.h"
#include "core/error.h"
#include "core/tensor.h"
#include "model/model.h"
#include "model/panel_weights.h"
#include "model/random_init.h"
#include "ops/cpu/cpu_gemm.h"
#include "ops/cpu/cpu_gemm_amx.h"
#include "ops/cpu/cpu_gemm_bf16dot.h"
#include "ops/cpu/cpu_gemm_onednn.h"

namespace moe {
namespace {

std::vector<uint16_t> random_bits(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::vector<uint16_t> v(n);
  for (auto& b : v) b = static_cast<uint16_t>(g());
  return v;
}

// bf16 bits of values in [-1, 1] (finite: the kernel's products are compared as numbers).
std::vector<uint16_t> random_bf16(size_t n, uint32_t seed) {
  std::mt19937 g(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<uint16_t> v(n);
  for (auto& b : v) b = f32_to_bf16(u(g));
  return v;
}

TEST(Bf16Panels, PackedValuesSitWhereTheLayoutSays) {
  for (auto [rows, k] : {std::pair<int64_t, int64_t>{16, 2}, {48, 6}, {32, 130}}) {
    const auto src = random_bits(size_t(rows * k), uint32_t(rows + k));
    std::vector<uint16_t> packed(src.size()), back(src.size());
    pack_bf16_panels(packed.data(), src.data(), rows, k);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < k; ++c) {
        const int64_t p = r / 16, line = c / 2;
        ASSERT_EQ(packed[size_t(p * 16 * k + line * 32 + (r % 16) * 2 + c % 2)], src[size_t(r * k + c)])
            << rows << "x" << k << " at row " << r << " col " << c;
      }
    unpack_bf16_panels(back.data(), packed.data(), rows, k);
    EXPECT_EQ(back, src);
  }
}

TEST(Bf16Panels, ShapesThatAreNotWholePanelsAreRefused) {
  std::vector<uint16_t> a(64 * 3), b(64 * 3);
  EXPECT_THROW(pack_bf16_panels(b.data(), a.data(), 8, 8), Error);   // half a panel
  EXPECT_THROW(pack_bf16_panels(b.data(), a.data(), 16, 3), Error);  // k odd
  EXPECT_FALSE(bf16_panels_fit(24, 8));
  EXPECT_TRUE(bf16_panels_fit(32, 8));
}

TEST(Bf16Panels, TensorConversionsKeepValuesAndRowViewsStartOnPanels) {
  // [3, 32, 6]: rows of the last dimension, as stacked experts are.
  const Tensor f = Tensor::from_f32({3, 32, 6}, test::random_floats(3 * 32 * 6, 7));
  const Tensor b = f.to_dtype(DType::BF16);
  const Tensor p = b.to_dtype(DType::BF16P);
  ASSERT_EQ(p.dtype(), DType::BF16P);
  EXPECT_EQ(p.nbytes(), b.nbytes());
  EXPECT_EQ(p.to_dtype(DType::F32).to_f32_vector(), b.to_dtype(DType::F32).to_f32_vector());
  EXPECT_EQ(p.to_dtype(DType::BF16).to_f32_vector(), b.to_f32_vector());
  // Expert 1 of the packed tensor is the packing of expert 1.
  EXPECT_EQ(p.select(1).to_dtype(DType::F32).to_f32_vector(), b.select(1).to_dtype(DType::F32).to_f32_vector());
  EXPECT_THROW(Tensor::from_f32({8, 6}, test::random_floats(8 * 6, 1)).to_dtype(DType::BF16P), Error);
  std::vector<float> dst(6);
  EXPECT_THROW(convert_to_f32(dst.data(), p.raw(), DType::BF16P, 6), Error);  // values not in row order
}

// Rows of x from one to past four groups of 16, k from one pair up to a few K-lines past 512,
// out wider than m with accumulation onto it.
const test::GemmCase kCases[] = {{1, 16, 2, 16, false},  {2, 32, 34, 40, true},   {5, 48, 64, 48, false},
                       {16, 96, 130, 96, true}, {17, 16, 514, 20, false}, {40, 64, 70, 64, true},
                       {64, 32, 96, 32, false}, {70, 48, 38, 50, true},
                       // k a multiple of 32 (the tile unit where the CPU has AMX, from 2 rows):
                       // an odd count of 16-row groups and of panels, a single k step, ldo > m.
                       {40, 48, 64, 50, true},  {3, 80, 32, 80, false}, {33, 16, 160, 16, true},
                       {1, 32, 64, 32, true}};

TEST(Bf16Panels, KernelMatchesFloat64ProductOfRoundedX) {
  if (!cpu::bf16dot_available()) GTEST_SKIP() << "SKIPPED: this CPU has no AVX512-BF16";
  uint32_t seed = 11;
  for (const test::GemmCase& s : kCases) {
    const auto x = test::random_floats(size_t(s.n * s.k), seed++);
    const auto w = random_bf16(size_t(s.m * s.k), seed++);
    auto out = test::random_floats(size_t(s.n * s.ldo), seed++);
    std::vector<float> wf(w.size());
    for (size_t i = 0; i < w.size(); ++i) wf[i] = bf16_to_f32(w[i]);
    std::vector<double> r, bound;
    test::gemm_reference(test::bf16_rounded(x), wf, out, s, &r, &bound);
    std::vector<uint16_t> wp(w.size());
    pack_bf16_panels(wp.data(), w.data(), s.m, s.k);
    cpu::gemm_xwt(out.data(), s.ldo, x.data(), wp.data(), DType::BF16P, s.n, s.m, s.k, s.accumulate);
    test::expect_gemm_within(out, r, bound, s);
  }
}

// Serving batches whatever requests are running: a request's logits must not depend on them.
// k 1030 runs the AVX512-BF16 kernel at every row count: every row the same bits. k 1024 runs the
// AMX tile unit from 2 rows on where the CPU has it (cpu_gemm_amx.h): the same bits at every
// count from 2; a row alone takes vdpbf16ps, whose sums agree to f32 rounding (the float64
// bound of KernelMatchesFloat64ProductOfRoundedX), not bit for bit.
void expect_batch_invariant(int64_t k) {
  const int64_t n = 53, m = 64;
  const auto x = test::random_floats(size_t(n * k), 3);
  const auto w = random_bf16(size_t(m * k), 4);
  std::vector<uint16_t> wp(w.size());
  pack_bf16_panels(wp.data(), w.data(), m, k);
  std::vector<float> all(size_t(n * m));
  cpu::gemm_xwt(all.data(), m, x.data(), wp.data(), DType::BF16P, n, m, k, false);
  std::vector<float> wf(w.size());
  for (size_t i = 0; i < w.size(); ++i) wf[i] = bf16_to_f32(w[i]);
  const bool tiles = cpu::amx_panels_apply(n, k);
  for (int64_t sub : {1, 2, 5, 16, 17}) {
    for (int64_t r0 = 0; r0 + sub <= n; r0 += 7) {
      std::vector<float> part(size_t(sub * m));
      cpu::gemm_xwt(part.data(), m, x.data() + r0 * k, wp.data(), DType::BF16P, sub, m, k, false);
      if (sub > 1 || !tiles) {
        for (int64_t i = 0; i < sub * m; ++i)
          ASSERT_EQ(part[size_t(i)], all[size_t(r0 * m + i)]) << "k " << k << " rows " << r0 << "+" << sub << " at " << i;
        continue;
      }
      const test::GemmCase c{1, m, k, m, false};
      const std::vector<float> xr(x.begin() + r0 * k, x.begin() + (r0 + 1) * k);
      std::vector<double> r, bound;
      test::gemm_reference(test::bf16_rounded(xr), wf, std::vector<float>(size_t(m)), c, &r, &bound);
      test::expect_gemm_within(part, r, bound, c);  // the lone row: vdpbf16ps
      std::vector<float> batched(all.begin() + r0 * m, all.begin() + (r0 + 1) * m);
      test::expect_gemm_within(batched, r, bound, c);  // the same row in the batch: the tile unit
    }
  }
  // Inside a parallel region (serving's experts: each thread its slice of the panels) too.
  std::vector<float> sliced(size_t(n * m));
#pragma omp parallel num_threads(2)
  {
    const int64_t id = omp_get_thread_num(), p0 = id * 32;
    cpu::gemm_xwt(sliced.data() + p0, m, x.data(), wp.data() + p0 * k, DType::BF16P, n, 32, k, false);
  }
  EXPECT_EQ(sliced, all) << "k " << k;
}

TEST(Bf16Panels, EachRowIsTheSameBitsAtEveryBatchSize) {
  if (!cpu::bf16dot_available()) GTEST_SKIP() << "SKIPPED: this CPU has no AVX512-BF16";
  expect_batch_invariant(1030);
  expect_batch_invariant(1024);
}

// Which products the tile unit takes: by shape and row count only, never by the data.
TEST(Bf16Panels, TileUnitTakesTwoRowsAndMoreOfWholeSteps) {
  EXPECT_FALSE(cpu::amx_panels_apply(1, 1024));
  EXPECT_FALSE(cpu::amx_panels_apply(64, 1030));
  EXPECT_EQ(cpu::amx_panels_apply(2, 1024), cpu::amx_bf16_ready());
  EXPECT_EQ(cpu::amx_panels_apply(512, 32), cpu::amx_bf16_ready());
}

TEST(Bf16Panels, TrainingProductsRefusePanels) {
  std::vector<float> x(16 * 4, 1.0f), out(16 * 4);
  std::vector<uint16_t> w(16 * 4, 0);
  EXPECT_THROW(cpu::gemm_xw(out.data(), x.data(), w.data(), DType::BF16P, 4, 16, 4, false), Error);
}

// Relative 2-norm distance of b from a.
double rel_dist(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    num += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
    den += double(a[i]) * a[i];
  }
  return std::sqrt(num / den);
}

// A packed model computes what the unpacked one does on the same products (x rounded to bf16):
// its logits are as close to the unpacked model's as those are to exact-x products (rounding x
// to bf16 flips a few activations' roundings either way; a wrong kernel is off by far more).
TEST(Bf16Panels, PackedModelGivesTheUnpackedModelsLogits) {
  if (!cpu::bf16dot_available() || !cpu::bf16_matrix_available())
    GTEST_SKIP() << "SKIPPED: this CPU has no AVX512-BF16";
  ModelConfig cfg = preset_config("mixtral", "tiny");
  LoadOptions lo;
  lo.keep_dtype = true;
  Model plain = Model::from_tensors(cfg, random_weights(cfg, 5, DType::BF16), lo);
  std::vector<int32_t> ids = {1, 5, 9, 2, 7, 3};
  Tensor t = Tensor::empty({1, int64_t(ids.size())}, DType::I32, MemCategory::Activations);
  std::copy(ids.begin(), ids.end(), t.data<int32_t>());
  auto logits = [&](const Model& m) {
    KVCache c = m.make_cache(1, 16);
    return m.forward(t, c).logits.to_f32_vector();
  };
  cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
  const std::vector<float> exact = logits(plain);
  cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
  const std::vector<float> rounded = logits(plain);
  Model packed = Model::from_tensors(cfg, random_weights(cfg, 5, DType::BF16), lo);
  EXPECT_GT(pack_bf16_panels(packed), 0);
  EXPECT_EQ(packed.weights().layers[0].w1.dtype(), DType::BF16P);
  EXPECT_EQ(packed.weights().layers[0].wq.dtype(), DType::BF16P);  // views of the packed stack
  const std::vector<float> panels = logits(packed);
  cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
  ASSERT_EQ(panels.size(), rounded.size());
  const double scale = rel_dist(exact, rounded);
  EXPECT_GT(scale, 0.0);
  EXPECT_LT(rel_dist(rounded, panels), 2 * scale) << "rounding x alone moved the logits by " << scale;
}

}  // namespace
}  // namespace moe
