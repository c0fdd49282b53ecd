// sampling.cpp — greedy / temperature / top-k / top-p sampling and log-probabilities.
#include "serve/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace moe {
namespace {

// Puts the m largest logits' ids first in idx (most likely first; ties: lower id first).
// idx holds 0..V-1 on entry. O(V + m log m).
void select_top(std::vector<int32_t>& idx, const float* logits, int64_t m) {
  auto more = [&](int32_t a, int32_t b) { return logits[a] > logits[b] || (logits[a] == logits[b] && a < b); };
  if (m < static_cast<int64_t>(idx.size())) std::nth_element(idx.begin(), idx.begin() + m, idx.end(), more);
  std::sort(idx.begin(), idx.begin() + m, more);
}

}  // namespace

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p, Rng& rng) {
  MOE_CHECK(vocab > 0, "sample_token: empty vocabulary");
  if (p.temperature <= 0.0f) return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  const double inv_t = 1.0 / p.temperature;
  const double mx = *std::max_element(logits, logits + vocab);
  const bool nucleus = p.top_p < 1.0f;
  if (p.top_k <= 0 && !nucleus) {
    // Plain temperature: one pass for the mass, one for the draw, in id order.
    double sum = 0;
    for (int64_t i = 0; i < vocab; ++i) sum += std::exp((logits[i] - mx) * inv_t);
    double r = rng.uniform() * sum;
    for (int64_t i = 0; i < vocab; ++i) {
      r -= std::exp((logits[i] - mx) * inv_t);
      if (r <= 0) return static_cast<int32_t>(i);
    }
    return static_cast<int32_t>(vocab - 1);
  }
  // Kept from call to call (capacity stays): sampling runs once per decoded token.
  thread_local std::vector<int32_t> idx;
  thread_local std::vector<double> prob;
  idx.resize(static_cast<size_t>(vocab));
  std::iota(idx.begin(), idx.end(), 0);
  const int64_t k = p.top_k > 0 ? std::min(p.top_k, vocab) : vocab;
  // The nucleus is measured against the mass of the top-k set (all of the vocabulary without
  // top-k), as HF's and vLLM's top-k-then-top-p order.
  double total = 0;
  if (p.top_k <= 0)
    for (int64_t i = 0; i < vocab; ++i) total += std::exp((logits[i] - mx) * inv_t);
  int64_t m = nucleus ? std::min<int64_t>(k, 64) : k;
  int64_t keep = 0;
  for (;;) {
    select_top(idx, logits, m);
    prob.resize(static_cast<size_t>(m));
    double sel = 0;
    for (int64_t i = 0; i < m; ++i) sel += prob[i] = std::exp((logits[idx[i]] - mx) * inv_t);
    const double mass = p.top_k > 0 ? sel : total;
    if (p.top_k > 0 && m < k) {  // (top-k with top-p: select all k first)
      m = k;
      continue;
    }
    if (!nucleus) {
      keep = m;
      break;
    }
    double acc = 0;
    for (int64_t i = 0; i < m && !keep; ++i) {
      acc += prob[i] / mass;
      if (acc >= p.top_p) keep = i + 1;
    }
    if (keep || m == k) {
      if (!keep) keep = m;
      break;
    }
    m = std::min(k, m * 4);  // the nucleus is wider than the candidates: widen and select again
  }
  double kept = 0;
  for (int64_t i = 0; i < keep; ++i) kept += prob[i];
  double r = rng.uniform() * kept;
  for (int64_t i = 0; i < keep; ++i) {
    r -= prob[i];
    if (r <= 0) return idx[i];
  }
  return idx[keep - 1];
}

void token_logprobs(const float* logits, int64_t vocab, int32_t token, int64_t n_top, TokenLogprobs* out) {
  MOE_CHECK(token >= 0 && token < vocab, "token_logprobs: token %d outside the vocabulary", token);
  const double mx = *std::max_element(logits, logits + vocab);
  double sum = 0;
  for (int64_t i = 0; i < vocab; ++i) sum += std::exp(double(logits[i]) - mx);
  const double lse = mx + std::log(sum);
  out->logprob = static_cast<float>(logits[token] - lse);
  out->top.clear();
  n_top = std::min(n_top, vocab);
  if (n_top <= 0) return;
  thread_local std::vector<int32_t> idx;
  idx.resize(static_cast<size_t>(vocab));
  std::iota(idx.begin(), idx.end(), 0);
  select_top(idx, logits, n_top);
  for (int64_t i = 0; i < n_top; ++i) out->top.emplace_back(idx[i], static_cast<float>(logits[idx[i]] - lse));
}

}  // namespace moe
