// test_routing.cpp — the routing options of training beside the default dropless top-k:
//   Switch-style capacity (moe_capacity_drop through the MoE block): dropped tokens pass through
//     the residual, kept tokens are unchanged, gradients match finite differences of the loss;
//   aux-loss-free bias balancing (DeepSeek-V3): the selection uses probability + bias while
//     the weights stay unbiased; the update rule; the bias is saved with a checkpoint and loads.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <random>

#include <nlohmann/json.hpp>

#include "io/safetensors.h"
#include "model/activations.h"
#include "model/ffn_block.h"
#include "model/model.h"
#include "model/model_train.h"
#include "train/trainer.h"
#include "fixture_util.h"

namespace moe {
namespace {
namespace fs = std::filesystem;

std::string fixture(const std::string& fam) { return std::string(MOE_FIXTURES_DIR) + "/" + fam; }
using testutil::load_f32;

std::vector<float> row(const Tensor& t, int64_t r) {
  const int64_t n = t.numel() / t.dim(0);
  const float* p = t.data<float>() + r * n;
  return std::vector<float>(p, p + n);
}

// The mixtral fixture's batch (input_ids, labels).
struct Batch {
  Tensor ids, labels;
};
Batch fixture_batch(const std::string& dir) {
  auto f = SafetensorsFile::open(dir + "/batch.safetensors");
  return {f->tensor("input_ids", MemCategory::Workspace), f->tensor("labels", MemCategory::Workspace)};
}

// One MoE layer's training forward on random inputs, with the given routing options.
struct BlockRun {
  LayerActs a;
  Tensor out;
  RouterStats st;
};
BlockRun run_block(const Model& m, const std::vector<float>& x, int64_t b, int64_t s, const RouteOptions& ro) {
  const ModelConfig& c = m.config();
  BlockRun r;
  alloc_acts(activation_layout(c, b, s, ActMode::Training), true, true, &r.a);
  std::copy(x.begin(), x.end(), r.a.x_mid.data<float>());
  r.out = Tensor::empty({b * s, c.hidden_size}, DType::F32, MemCategory::Activations);
  ffn_block_forward(c, m.weights().layers[0], r.a, r.out, &r.st, ro);
  return r;
}

TEST(Capacity, DroppedTokensPassThroughAndKeptOnesAreUnchanged) {
  const std::string dir = fixture("mixtral");
  if (!fs::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  Model m = load_f32(dir);
  const ModelConfig& c = m.config();
  ASSERT_TRUE(c.layer_is_moe(0));
  const int64_t b = 2, s = 16, t_n = b * s, k = c.n_expert_used, e_n = c.n_expert, p_n = t_n * k;
  std::mt19937 rng(7);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<size_t>(t_n * c.hidden_size));
  for (float& v : x) v = nd(rng);

  BlockRun full = run_block(m, x, b, s, RouteOptions{});
  BlockRun cap = run_block(m, x, b, s, RouteOptions{0.5});
  EXPECT_EQ(full.st.dropped, 0);
  const int64_t capacity = expert_capacity(0.5, t_n, k, e_n);
  const int32_t* off = cap.a.offsets.data<int32_t>();
  for (int64_t e = 0; e < e_n; ++e) EXPECT_LE(off[e + 1] - off[e], capacity) << "expert " << e;
  const int64_t kept = off[e_n];
  EXPECT_EQ(cap.st.dropped, p_n - kept);
  ASSERT_GT(cap.st.dropped, 0) << "capacity factor 0.5 must drop assignments";
  // Router statistics count routed assignments (before the drop): the aux loss sees them all.
  EXPECT_EQ(cap.st.count, full.st.count);

  std::vector<int> n_dropped(static_cast<size_t>(t_n), 0);
  for (int64_t p = kept; p < p_n; ++p) n_dropped[cap.a.perm.data<int32_t>()[p] / k]++;
  int all_dropped = 0, none_dropped = 0;
  for (int64_t t = 0; t < t_n; ++t) {
    if (n_dropped[t] == k) {
      ++all_dropped;
      EXPECT_EQ(row(cap.out, t), row(cap.a.x_mid, t)) << "token " << t << " was dropped: residual only";
    } else if (n_dropped[t] == 0) {
      ++none_dropped;
      std::vector<float> got = row(cap.out, t), want = row(full.out, t);
      for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-5 * (1 + std::fabs(want[i]))) << t;
    }
  }
  EXPECT_GT(all_dropped, 0);
  EXPECT_GT(none_dropped, 0);
}

// The mixtral fixture, its batch and the config's aux coefficient, for the step-level tests.
class CapacityStep : public ::testing::Test {
 protected:
  void SetUp() override {
    if (!fs::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
    m = load_f32(dir);
    batch = fixture_batch(dir);
    lo.aux_coef = m.config().router_aux_loss_coef;
  }
  const std::string dir = fixture("mixtral");
  Model m;
  Batch batch;
  LossOptions lo;
};

TEST_F(CapacityStep, LargeFactorIsDroplessBitForBit) {
  const ModelConfig& c = m.config();
  const Tensor &ids = batch.ids, &labels = batch.labels;
  ModelWeights g0 = zeros_like(c, m.weights(), MemCategory::Grads), g1 = zeros_like(c, m.weights(), MemCategory::Grads);
  StepLosses r0 = forward_backward(m, ids, labels, &g0, lo);
  lo.route.capacity_factor = double(c.n_expert);  // capacity T·K: nothing can be dropped
  StepLosses r1 = forward_backward(m, ids, labels, &g1, lo);
  EXPECT_EQ(r0.total, r1.total);
  for (const RouterStats& st : r1.router) EXPECT_EQ(st.dropped, 0);
  auto p0 = named_parameters(c, g0), p1 = named_parameters(c, g1);
  for (size_t i = 0; i < p0.size(); ++i) EXPECT_EQ(p0[i].value.to_f32_vector(), p1[i].value.to_f32_vector()) << p0[i].name;
}

// The gradient under capacity dropping is the derivative of the loss the forward computes:
// a central difference of the loss along the normalised gradient equals its norm.
TEST_F(CapacityStep, GradientMatchesDirectionalFiniteDifference) {
  const ModelConfig& c = m.config();
  const Tensor &ids = batch.ids, &labels = batch.labels;
  lo.route.capacity_factor = 0.75;
  ModelWeights g = zeros_like(c, m.weights(), MemCategory::Grads), gfull = zeros_like(c, m.weights(), MemCategory::Grads);
  StepLosses r = forward_backward(m, ids, labels, &g, lo);
  int64_t dropped = 0;
  for (const RouterStats& st : r.router) dropped += st.dropped;
  ASSERT_GT(dropped, 0);
  LossOptions dropless = lo;
  dropless.route.capacity_factor = 0;
  forward_backward(m, ids, labels, &gfull, dropless);

  auto params = named_parameters(c, m.weights()), grads = named_parameters(c, g), gf = named_parameters(c, gfull);
  double norm2 = 0, diff2 = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    std::vector<float> a = grads[i].value.to_f32_vector(), f = gf[i].value.to_f32_vector();
    for (size_t j = 0; j < a.size(); ++j) {
      norm2 += double(a[j]) * a[j];
      diff2 += (double(a[j]) - f[j]) * (double(a[j]) - f[j]);
    }
  }
  const double norm = std::sqrt(norm2);
  ASSERT_GT(norm, 0);
  // Dropping changes the gradient materially: this check can tell the two apart.
  EXPECT_GT(std::sqrt(diff2) / norm, 1e-2);

  const double eps = 2e-3 / norm;  // the loss moves by ~2e-3 along the step
  std::vector<std::vector<float>> base;
  for (auto& p : params) base.push_back(p.value.to_f32_vector());
  auto loss_at = [&](double step) {
    for (size_t i = 0; i < params.size(); ++i) {
      float* w = params[i].value.data<float>();
      const float* d = grads[i].value.data<float>();
      for (int64_t j = 0; j < params[i].value.numel(); ++j)
        w[j] = static_cast<float>(double(base[i][j]) + step * double(d[j]) / norm);
    }
    return forward_backward(m, ids, labels, nullptr, lo).total;
  };
  const double fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps);
  loss_at(0);
  RecordProperty("fd_ratio", std::to_string(fd / norm));
  EXPECT_NEAR(fd / norm, 1.0, 3e-3) << "directional derivative " << fd << " vs gradient norm " << norm;
}

TEST(BiasBalance, UpdateRuleMovesTowardEqualLoad) {
  const std::string dir = fixture("mixtral");
  if (!fs::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  Model m = load_f32(dir);
  const ModelConfig& c = m.config();
  ASSERT_EQ(c.n_expert, 8);
  ASSERT_EQ(c.n_layer, 2);
  // Layer 0 balanced (no change); layer 1: expert 0 over (mean 4), expert 1 under.
  std::vector<std::vector<double>> load = {{4, 4, 4, 4, 4, 4, 4, 4}, {8, 0, 4, 4, 4, 4, 4, 4}};
  update_router_bias(c, m.mutable_weights(), load, 0.125);
  update_router_bias(c, m.mutable_weights(), load, 0.125);
  EXPECT_EQ(m.weights().layers[0].router_bias.to_f32_vector(), std::vector<float>(8, 0.0f));
  EXPECT_EQ(m.weights().layers[1].router_bias.to_f32_vector(),
            (std::vector<float>{-0.25f, 0.25f, 0, 0, 0, 0, 0, 0}));
  // Named for the checkpoint under the router's name (DeepSeek-V3's tensor name).
  auto bufs = named_buffers(c, m.weights());
  ASSERT_EQ(bufs.size(), 2u);
  EXPECT_EQ(bufs[1].first, "model.layers.1.block_sparse_moe.gate.e_score_correction_bias");
}

TEST(BiasBalance, SelectionUsesBiasWeightsDoNot) {
  const std::string dir = fixture("mixtral");
  if (!fs::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  Model m = load_f32(dir);
  const ModelConfig& c = m.config();
  const int64_t b = 1, s = 9, t_n = b * s, k = c.n_expert_used, e_n = c.n_expert;
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> x(static_cast<size_t>(t_n * c.hidden_size));
  for (float& v : x) v = nd(rng);
  std::vector<float> bias(static_cast<size_t>(e_n), 0.0f);
  bias[5] = 2.0f;  // larger than any probability difference: expert 5 is always selected
  m.mutable_weights().layers[0].router_bias = Tensor::from_f32({e_n}, bias, MemCategory::Weights);
  BlockRun r = run_block(m, x, b, s, RouteOptions{});
  for (int64_t t = 0; t < t_n; ++t) {
    const float* lg = r.a.router_logits.data<float>() + t * e_n;
    double mx = lg[0], z = 0;
    for (int64_t e = 0; e < e_n; ++e) mx = std::max<double>(mx, lg[e]);
    for (int64_t e = 0; e < e_n; ++e) z += std::exp(lg[e] - mx);
    double sel = 0;
    bool has5 = false;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = r.a.topk_idx.data<int32_t>()[t * k + j];
      has5 |= e == 5;
      sel += std::exp(lg[e] - mx) / z;
    }
    EXPECT_TRUE(has5) << "token " << t;
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = r.a.topk_idx.data<int32_t>()[t * k + j];
      double p = std::exp(lg[e] - mx) / z;
      if (c.norm_topk_prob) p /= sel;
      EXPECT_NEAR(r.a.topk_w.data<float>()[t * k + j], p, 1e-6) << "token " << t << " slot " << j;
    }
  }
}

// `moe train --bias-balance` wiring: after one step each bias is rate·sign(mean − load) of
// that step's logged load, it is saved in the checkpoint and loads with the model.
TEST(BiasBalance, TrainerUpdatesSavesAndLoadsTheBias) {
  const std::string dir = fixture("mixtral");
  if (!fs::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  const std::string run = std::string(MOE_BINARY_DIR) + "/routing-test-bias";
  fs::remove_all(run);
  fs::create_directories(run);
  {
    std::ofstream text(run + "/corpus.txt");
    for (int i = 0; i < 200; ++i) text << "line " << i << ": the quick brown fox jumps over the lazy dog " << i * 7 << "\n";
  }
  TrainConfig tc;
  tc.model_dir = dir;
  tc.data = run + "/corpus.txt";
  tc.out = run + "/out";
  tc.steps = 1;
  tc.batch_size = 2;
  tc.seq_len = 32;
  tc.bias_rate = 0.01;
  tc.quiet = true;
  run_training(tc);
  std::ifstream in(tc.out + "/metrics.jsonl");
  std::string line;
  ASSERT_TRUE(static_cast<bool>(std::getline(in, line)));
  const auto rec = nlohmann::json::parse(line);
  const auto& loads = rec.at("expert_load");
  Model trained = load_f32(tc.out + "/final");
  const ModelConfig& c = trained.config();
  size_t i = 0;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    if (!c.layer_is_moe(l)) continue;
    const Tensor& bias = trained.weights().layers[static_cast<size_t>(l)].router_bias;
    ASSERT_TRUE(bias.defined()) << "layer " << l << ": no bias in the checkpoint";
    std::vector<double> n = loads.at(i++).get<std::vector<double>>();
    double mean = 0;
    for (double v : n) mean += v / double(n.size());
    std::vector<float> got = bias.to_f32_vector();
    for (int64_t e = 0; e < c.n_expert; ++e) {
      const float want = n[e] < mean ? 0.01f : n[e] > mean ? -0.01f : 0.0f;
      EXPECT_EQ(got[e], want) << "layer " << l << " expert " << e;
    }
  }
}

}  // namespace
}  // namespace moe
