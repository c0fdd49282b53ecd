// test_head_rows.cpp — the training head computes logits only for rows that have a target
// (model_train.cpp: when the rows whose label is -100 free whole logits chunks, the rest are
// compacted and the head runs on those alone). The loss over any mask must equal the
// cross-entropy of independent logits over the same positions — PyTorch's own (the fixture's
// golden file) for the fixture batch, the inference forward's for batches long enough to
// compact — the gradient must be the derivative of that loss, and a batch with no target at
// all must give a zero loss and no head gradient.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <tuple>

#include "io/safetensors.h"
#include "model/activations.h"
#include "model/model.h"
#include "model/model_train.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "fixture_util.h"

namespace moe {
namespace {

namespace fs = std::filesystem;

const std::string kDir = std::string(MOE_FIXTURES_DIR) + "/mixtral";

// Labels [B,S] i64: `labels`, with positions [0, first) of every row also set to -100 (a prompt
// that carries no loss).
Tensor masked_labels(const Tensor& labels, int64_t first) {
  Tensor l = Tensor::empty(labels.shape(), DType::I64, MemCategory::Workspace);
  for (int64_t i = 0; i < labels.numel(); ++i) {
    const int64_t pos = i % labels.dim(1);
    l.data<int64_t>()[i] = pos < first ? -100 : labels.data<int64_t>()[i];
  }
  return l;
}

// Mean cross-entropy in f64 of logits [B,S,V] (f32 or f64) against labels shifted by one (HF).
double ce_of(const Tensor& logits, const Tensor& labels) {
  const int64_t b_n = labels.dim(0), s_n = labels.dim(1), v = logits.dim(2);
  auto z = [&](int64_t row, int64_t j) {
    return logits.dtype() == DType::F64 ? logits.data<double>()[row * v + j] : double(logits.data<float>()[row * v + j]);
  };
  double sum = 0;
  int64_t n = 0;
  for (int64_t b = 0; b < b_n; ++b)
    for (int64_t s = 0; s + 1 < s_n; ++s) {
      const int64_t tg = labels.data<int64_t>()[b * s_n + s + 1];
      if (tg == -100) continue;
      const int64_t row = b * s_n + s;
      double mx = z(row, 0);
      for (int64_t j = 1; j < v; ++j) mx = std::max(mx, z(row, j));
      double se = 0;
      for (int64_t j = 0; j < v; ++j) se += std::exp(z(row, j) - mx);
      sum += std::log(se) + mx - z(row, tg);
      ++n;
    }
  return n ? sum / double(n) : 0.0;
}

// Deterministic token ids [B,S] i64 in [0, vocab).
Tensor token_ids(int64_t b, int64_t s, int64_t vocab) {
  Tensor t = Tensor::empty({b, s}, DType::I64, MemCategory::Workspace);
  for (int64_t i = 0; i < b * s; ++i) t.data<int64_t>()[i] = (i * 7919 + 13) % vocab;
  return t;
}

class HeadRows : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(kDir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << kDir;
    m = testutil::load_f32(kDir);
    // Two sequences of 300: 600 rows, five logits chunks of 128 — a prompt of 100 leaves 400
    // targets (four chunks), one of 200 leaves 198 (two), one of 290 leaves 18 (one).
    ids = token_ids(2, 300, m.config().vocab_size);
    KVCache kv = m.make_cache(2, 300);
    logits = m.forward(ids, kv).logits;
  }
  Model m;
  Tensor ids, logits;
};

TEST_F(HeadRows, LossOverAnyMaskEqualsTheCrossEntropyOfIndependentLogits) {
  ASSERT_EQ(activation_layout(m.config(), 2, 300, ActMode::Training).logits_chunk, 128)
      << "the prompts below are sized for chunks of 128 rows";
  // 0: every row has a target; 100, 200, 290: the head runs on four, two and one chunk(s).
  for (int64_t first : {0, 100, 200, 290}) {
    const Tensor l = masked_labels(ids, first);
    ModelWeights g = zeros_like(m.config(), m.weights(), MemCategory::Grads);
    const StepLosses r = forward_backward(m, ids, l, &g, LossOptions{});
    const double want = ce_of(logits, l);
    EXPECT_NEAR(r.loss_ce, want, 2e-6 * std::fabs(want)) << "prompt of " << first << " positions";
    EXPECT_EQ(r.n_targets, 2 * (300 - std::max<int64_t>(first, 1)));
    const StepLosses r_eval = forward_backward(m, ids, l, nullptr, LossOptions{});
    EXPECT_EQ(r_eval.loss_ce, r.loss_ce) << "evaluation and training see the same rows";
  }
  // The fixture batch (labels[1,:4] = -100, 32 rows: one chunk, nothing moved) against
  // PyTorch's logits.
  auto batch = SafetensorsFile::open(kDir + "/batch.safetensors");
  const Tensor fids = batch->tensor("input_ids", MemCategory::Workspace);
  const Tensor flabels = batch->tensor("labels", MemCategory::Workspace);
  const Tensor golden = SafetensorsFile::open(kDir + "/golden.safetensors")->tensor("logits", MemCategory::Workspace);
  const double want = ce_of(golden, flabels);
  EXPECT_NEAR(forward_backward(m, fids, flabels, nullptr, LossOptions{}).loss_ce, want, 1e-5 * want);
}

// The gradient with a prompt long enough to compact is the derivative of the loss: a central
// difference along a random direction in the LM head (its gradient reads the compacted rows)
// and the final norm's weight (its gradient reads the head's input gradient spread back to
// the tokens' rows); both lie after the last router, so no routing flips under the step.
// (f64 sums of f32 losses; the step is large enough that f32 rounding stays ~1e-4 of the
// difference.)
TEST_F(HeadRows, GradientIsTheDerivativeOfTheMaskedLoss) {
  const Tensor l = masked_labels(ids, 200);
  const ModelConfig& c = m.config();
  ModelWeights g = zeros_like(c, m.weights(), MemCategory::Grads);
  forward_backward(m, ids, l, &g, LossOptions{});
  ModelWeights& w = m.mutable_weights();
  uint64_t seed = 7;
  for (const auto& param : {std::tuple{&w.lm_head, &g.lm_head, "lm_head"}, {&w.final_norm, &g.final_norm, "final_norm"}}) {
    // (plain names, not a structured binding: clang 14 cannot capture those in the lambda below)
    Tensor* p = std::get<0>(param);
    const Tensor* gp = std::get<1>(param);
    const char* name = std::get<2>(param);
    std::vector<float> dir(size_t(p->numel()));
    double analytic = 0;
    for (size_t i = 0; i < dir.size(); ++i) {
      seed = seed * 6364136223846793005ull + 1442695040888963407ull;
      dir[i] = float(int64_t(seed >> 40) % 2001 - 1000) / 1000.0f;
      analytic += double(dir[i]) * gp->data<float>()[i];
    }
    const std::vector<float> saved(p->data<float>(), p->data<float>() + p->numel());
    auto loss_at = [&](double eps) {
      for (size_t i = 0; i < dir.size(); ++i) p->data<float>()[i] = saved[i] + float(eps) * dir[i];
      const double loss = forward_backward(m, ids, l, nullptr, LossOptions{}).loss_ce;
      std::copy(saved.begin(), saved.end(), p->data<float>());
      return loss;
    };
    const double eps = 1e-3;
    const double numeric = (loss_at(eps) - loss_at(-eps)) / (2 * eps);
    EXPECT_NEAR(analytic, numeric, 2e-3 * std::fabs(numeric)) << name << ": analytic " << analytic << " numeric " << numeric;
    EXPECT_GT(std::fabs(numeric), 1e-3) << name << ": the direction should move the loss";
  }
}

// bf16 weights on the matrix units (HeadGrad::TrainsBf16): each 256-row chunk's gradient is
// rounded to bf16 in its own bytes for the head's products. 598 targets are two whole chunks and
// a partial one (86 rows), and, with a prompt of 100, 398 (a whole chunk and 142 rows). The head's
// and the final norm's gradients equal the f32 step's within the bf16 roundings (a chunk left out
// of dW moves the head's by ~0.2), and the step's activation peak is the layout's to the byte.
TEST_F(HeadRows, Bf16HeadGradientFromChunksRoundedInPlace) {
  if (!cpu::bf16_matrix_available()) GTEST_SKIP() << "SKIPPED: no AVX512-BF16 / AMX here: no bf16 head products";
  const ModelConfig& c = m.config();
  Model mb = testutil::load_f32(kDir);
  const MasterLowHalves low = split_master(c, mb.mutable_weights());
  for (int64_t first : {0, 100}) {
    SCOPED_TRACE(first);
    const Tensor l = masked_labels(ids, first);
    ModelWeights g32 = zeros_like(c, m.weights(), MemCategory::Grads);
    forward_backward(m, ids, l, &g32, LossOptions{});
    cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
    EXPECT_EQ(head_grad(mb.weights()), HeadGrad::TrainsBf16);
    ModelWeights gb = zeros_like(c, mb.weights(), MemCategory::Grads);
    constexpr int kCpu = static_cast<int>(Device::CPU), kAct = static_cast<int>(MemCategory::Activations);
    const int64_t before = mem_stats().current[kCpu][kAct];
    mem_reset_peaks();
    forward_backward(mb, ids, l, &gb, LossOptions{});
    const int64_t peak = mem_stats().peak[kCpu][kAct] - before;
    cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
    EXPECT_EQ(peak, activation_layout(c, 2, 300, ActMode::Training, expert_h_dtype(c, mb.weights()),
                                      HeadGrad::TrainsBf16)
                        .total_bytes(c));
    EXPECT_LE(testutil::rel_err(gb.lm_head.to_f32_vector(), g32.lm_head.to_f32_vector()), 2e-2);
    EXPECT_LE(testutil::rel_err(gb.final_norm.to_f32_vector(), g32.final_norm.to_f32_vector()), 2e-2);
  }
}

TEST_F(HeadRows, NoTargetsGiveZeroLossAndNoHeadGradient) {
  const Tensor l = masked_labels(ids, 300);
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
