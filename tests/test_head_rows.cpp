// test_head_rows.cpp — the training head computes logits only for rows that have a target
// (model_train.cpp: rows whose label is -100 are left out of the LM head and the loss). The
// loss over any mask must equal the cross-entropy of PyTorch's own logits (the fixture's golden
// file) over the same positions, the gradient must be the derivative of that loss, and a batch
// with no target at all must give a zero loss and no head gradient.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>

#include "io/safetensors.h"
#include "model/model.h"
#include "model/model_train.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

const std::string kDir = std::string(MOE_FIXTURES_DIR) + "/mixtral";

Model load_f32() {
  LoadOptions lo;
  lo.keep_dtype = false;
  lo.weight_dtype = DType::F32;
  return Model::load(kDir, lo);
}

// Labels [2,16] i64: the fixture's, with positions [0, first) of every row also set to -100
// (a prompt that carries no loss).
Tensor masked_labels(const Tensor& labels, int64_t first) {
  Tensor l = Tensor::empty(labels.shape(), DType::I64, MemCategory::Workspace);
  for (int64_t i = 0; i < labels.numel(); ++i) {
    const int64_t pos = i % labels.dim(1);
    l.data<int64_t>()[i] = pos < first ? -100 : labels.data<int64_t>()[i];
  }
  return l;
}

// Mean cross-entropy in f64 of the golden logits [B,S,V] (f64) against labels shifted by one (HF).
double golden_ce(const Tensor& logits, const Tensor& labels) {
  const int64_t b_n = labels.dim(0), s_n = labels.dim(1), v = logits.dim(2);
  EXPECT_EQ(logits.dtype(), DType::F64);
  double sum = 0;
  int64_t n = 0;
  for (int64_t b = 0; b < b_n; ++b)
    for (int64_t s = 0; s + 1 < s_n; ++s) {
      const int64_t tg = labels.data<int64_t>()[b * s_n + s + 1];
      if (tg == -100) continue;
      const double* z = logits.data<double>() + (b * s_n + s) * v;
      double mx = z[0];
      for (int64_t j = 1; j < v; ++j) mx = std::max(mx, z[j]);
      double se = 0;
      for (int64_t j = 0; j < v; ++j) se += std::exp(z[j] - mx);
      sum += std::log(se) + mx - z[tg];
      ++n;
    }
  return n ? sum / double(n) : 0.0;
}

class HeadRows : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kDir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << kDir;
    m = load_f32();
    auto batch = SafetensorsFile::open(kDir + "/batch.safetensors");
    ids = batch->tensor("input_ids", MemCategory::Workspace);
    labels = batch->tensor("labels", MemCategory::Workspace);
    golden_logits = SafetensorsFile::open(kDir + "/golden.safetensors")->tensor("logits", MemCategory::Workspace);
  }
  Model m;
  Tensor ids, labels, golden_logits;
};

TEST_F(HeadRows, LossOverAnyMaskEqualsTheGoldenLogitsCrossEntropy) {
  for (int64_t first : {0, 5, 9, 14}) {
    const Tensor l = masked_labels(labels, first);
    ModelWeights g = zeros_like(m.config(), m.weights(), MemCategory::Grads);
    const StepLosses r = forward_backward(m, ids, l, &g, LossOptions{});
    const double want = golden_ce(golden_logits, l);
    EXPECT_NEAR(r.loss_ce, want, 1e-5 * std::fabs(want)) << "prompt of " << first << " positions";
    const StepLosses r_eval = forward_backward(m, ids, l, nullptr, LossOptions{});
    EXPECT_EQ(r_eval.loss_ce, r.loss_ce) << "evaluation and training see the same rows";
  }
}

// The gradient with a long masked prompt is the derivative of the loss: a central difference
// along a random direction in the LM head and the last layer's attention output (f64 sums of
// f32 losses; the step is large enough that f32 rounding stays ~1e-4 of the difference).
TEST_F(HeadRows, GradientIsTheDerivativeOfTheMaskedLoss) {
  const Tensor l = masked_labels(labels, 9);
  const ModelConfig& c = m.config();
  ModelWeights g = zeros_like(c, m.weights(), MemCategory::Grads);
  forward_backward(m, ids, l, &g, LossOptions{});
  ModelWeights& w = m.mutable_weights();
  std::vector<std::pair<Tensor*, Tensor*>> params = {{&w.lm_head, &g.lm_head}, {&w.layers.back().wo, &g.layers.back().wo}};
  std::vector<std::vector<float>> dir;
  double analytic = 0;
  uint64_t seed = 7;
  for (auto [p, gp] : params) {
    std::vector<float> d(size_t(p->numel()));
    for (float& x : d) {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      x = float(int64_t(seed >> 40) % 2001 - 1000) / 1000.0f;
    }
    for (int64_t i = 0; i < p->numel(); ++i) analytic += double(d[size_t(i)]) * gp->data<float>()[i];
    dir.push_back(std::move(d));
  }
  auto loss_at = [&](double eps) {
    std::vector<std::vector<float>> saved;
    for (size_t k = 0; k < params.size(); ++k) {
      Tensor* p = params[k].first;
      saved.emplace_back(p->data<float>(), p->data<float>() + p->numel());
      for (int64_t i = 0; i < p->numel(); ++i) p->data<float>()[i] += float(eps) * dir[k][size_t(i)];
    }
    const double loss = forward_backward(m, ids, l, nullptr, LossOptions{}).loss_ce;
    for (size_t k = 0; k < params.size(); ++k) std::copy(saved[k].begin(), saved[k].end(), params[k].first->data<float>());
    return loss;
  };
  const double eps = 1e-3;
  const double numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps);
  EXPECT_NEAR(analytic, numeric, 2e-3 * std::fabs(numeric)) << "analytic " << analytic << " numeric " << numeric;
  EXPECT_GT(std::fabs(numeric), 1e-3) << "the direction should move the loss";
}

TEST_F(HeadRows, NoTargetsGiveZeroLossAndNoHeadGradient) {
  const Tensor l = masked_labels(labels, labels.dim(1));
  ModelWeights g = zeros_like(m.config(), m.weights(), MemCategory::Grads);
  const StepLosses r = forward_backward(m, ids, l, &g, LossOptions{});
  EXPECT_EQ(r.n_targets, 0);
  EXPECT_EQ(r.loss_ce, 0.0);
  for (float v : g.lm_head.to_f32_vector()) ASSERT_EQ(v, 0.0f);
  for (const NamedParam& p : named_parameters(m.config(), g))
    for (float v : p.value.to_f32_vector()) ASSERT_TRUE(std::isfinite(v)) << p.name;
}

}  // namespace
}  // namespace moe
