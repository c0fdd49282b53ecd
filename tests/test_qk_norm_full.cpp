// test_qk_norm_full.cpp — q/k RMSNorm over the whole projection (OLMoE, QkNormKind::Full) with
// grouped-query attention. The olmoe fixture has Hkv = H, so its golden files cannot tell k_norm
// [Hkv*Dh] from q_norm [H*Dh]; here a random GQA olmoe model (H 4, Hkv 2) checks
//   - the training backward against a directional finite difference of the forward's loss, along
//     the gradient of the q/k projections and norms only;
//   - incremental decode (prefill, then one token at a time) against the full forward.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>
#include <vector>

#include "core/rng.h"
#include "model/model.h"
#include "model/model_train.h"
#include "model/random_init.h"

namespace moe {
namespace {

// The tiny olmoe preset (GQA) with random weights; q_norm/k_norm weights drawn around 1 so that
// every entry of them matters differently.
Model gqa_olmoe() {
  ModelConfig c = preset_config("olmoe", "tiny");
  EXPECT_EQ(c.qk_norm, QkNormKind::Full);
  EXPECT_LT(c.n_head_kv, c.n_head);
  auto named = random_weights(c, 17, DType::F32);
  Rng rng(5);
  for (auto& [name, t] : named) {
    if (name.find("q_norm") == std::string::npos && name.find("k_norm") == std::string::npos) continue;
    for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = float(1.0 + 0.5 * rng.normal());
  }
  return Model::from_tensors(c, named);
}

Tensor token_ids(int64_t b, int64_t s, int64_t vocab) {
  Tensor ids = Tensor::empty({b, s}, DType::I32, MemCategory::Workspace);
  for (int64_t i = 0; i < b * s; ++i) ids.data<int32_t>()[i] = int32_t((i * 37 + 11) % vocab);
  return ids;
}

bool is_qk_param(const std::string& name) {
  for (const char* s : {"self_attn.q_norm.weight", "self_attn.k_norm.weight", "self_attn.q_proj.weight",
                        "self_attn.k_proj.weight"})
    if (name.ends_with(s)) return true;
  return false;
}

// The central difference of the loss along the normalised q/k gradient equals its norm.
TEST(QkNormFull, GqaGradientMatchesDirectionalFiniteDifference) {
  Model m = gqa_olmoe();
  const ModelConfig& c = m.config();
  const Tensor ids = token_ids(2, 12, c.vocab_size);
  LossOptions lo;
  lo.aux_coef = c.router_aux_loss_coef;
  ModelWeights g = zeros_like(c, m.weights(), MemCategory::Grads);
  forward_backward(m, ids, ids, &g, lo);
  auto params = named_parameters(c, m.weights()), grads = named_parameters(c, g);
  ASSERT_EQ(params.size(), grads.size());
  double norm2 = 0;
  int n_norms = 0;
  std::vector<size_t> sel;
  for (size_t i = 0; i < params.size(); ++i) {
    if (!is_qk_param(params[i].name)) continue;
    sel.push_back(i);
    n_norms += params[i].name.ends_with("_norm.weight");
    if (params[i].name.ends_with("k_norm.weight")) {
      EXPECT_EQ(params[i].value.numel(), c.n_head_kv * c.head_dim);
    } else if (params[i].name.ends_with("q_norm.weight")) {
      EXPECT_EQ(params[i].value.numel(), c.n_head * c.head_dim);
    }
    for (float v : grads[i].value.to_f32_vector()) norm2 += double(v) * v;
  }
  ASSERT_EQ(n_norms, 2 * c.n_layer);
  const double norm = std::sqrt(norm2);
  ASSERT_GT(norm, 0);

  // The loss moves by ~2e-4 along the step: small enough that no router choice of this random
  // model flips (at 2e-3 one does: the quotient is then 2% off), large against f32 rounding.
  const double eps = 2e-4 / norm;
  std::vector<std::vector<float>> base;
  for (size_t i : sel) base.push_back(params[i].value.to_f32_vector());
  auto loss_at = [&](double step) {
    for (size_t s = 0; s < sel.size(); ++s) {
      float* w = params[sel[s]].value.data<float>();
      const float* d = grads[sel[s]].value.data<float>();
      for (int64_t j = 0; j < params[sel[s]].value.numel(); ++j)
        w[j] = static_cast<float>(double(base[s][size_t(j)]) + step * double(d[j]) / norm);
    }
    return forward_backward(m, ids, ids, nullptr, lo).total;
  };
  const double fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps);
  loss_at(0);
  std::printf("olmoe GQA q/k: directional derivative %.7g, gradient norm %.7g (ratio - 1 = %.2g)\n", fd, norm,
              fd / norm - 1);
  EXPECT_NEAR(fd / norm, 1.0, 1e-3) << "directional derivative " << fd << " vs gradient norm " << norm;
}

// Prefill 5 tokens, then one at a time: batch 1 (the single-row path, q/k viewed inside the
// stacked projection) and batch 2 (rows split into their own q/k): the full forward's logits.
TEST(QkNormFull, GqaIncrementalDecodeEqualsFullForward) {
  Model m = gqa_olmoe();
  const int64_t s_n = 12, v = m.config().vocab_size, pre = 5;
  for (int64_t b_n : {1, 2}) {
    SCOPED_TRACE("batch " + std::to_string(b_n));
    const Tensor ids = token_ids(b_n, s_n, v);
    KVCache full_kv = m.make_cache(b_n, s_n);
    const std::vector<float> full = m.forward(ids, full_kv).logits.to_f32_vector();
    KVCache kv = m.make_cache(b_n, s_n);
    std::vector<float> got(full.size());
    for (int64_t s0 = 0; s0 < s_n; s0 = s0 == 0 ? pre : s0 + 1) {
      const int64_t s1 = s0 == 0 ? pre : s0 + 1, n = s1 - s0;
      Tensor part = Tensor::empty({b_n, n}, DType::I32, MemCategory::Workspace);
      for (int64_t b = 0; b < b_n; ++b)
        for (int64_t s = s0; s < s1; ++s) part.data<int32_t>()[b * n + s - s0] = ids.data<int32_t>()[b * s_n + s];
      const std::vector<float> lg = m.forward(part, kv).logits.to_f32_vector();
      for (int64_t b = 0; b < b_n; ++b)
        std::copy_n(lg.begin() + b * n * v, n * v, got.begin() + (b * s_n + s0) * v);
    }
    double num = 0, den = 0;
    for (size_t i = 0; i < full.size(); ++i) {
      num += (double(got[i]) - full[i]) * (double(got[i]) - full[i]);
      den += double(full[i]) * full[i];
    }
    std::printf("olmoe GQA decode vs full forward, batch %lld: rel err %.3g\n", (long long)b_n, std::sqrt(num / den));
    EXPECT_LE(std::sqrt(num / den), 1e-5);
  }
}

}  // namespace
}  // namespace moe
