// sampling.cpp — greedy / temperature / top-k / top-p sampling.
#include "serve/sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "core/error.h"

namespace moe {

int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p, Rng& rng) {
  MOE_CHECK(vocab > 0, "sample_token: empty vocabulary");
  if (p.temperature <= 0.0f) return static_cast<int32_t>(std::max_element(logits, logits + vocab) - logits);
  // Kept from call to call (capacity stays): sampling runs once per decoded token.
  thread_local std::vector<int32_t> idx;
  thread_local std::vector<double> prob;
  idx.resize(static_cast<size_t>(vocab));
  std::iota(idx.begin(), idx.end(), 0);
  int64_t k = p.top_k > 0 ? std::min(p.top_k, vocab) : vocab;
  std::partial_sort(idx.begin(), idx.begin() + k, idx.end(),
                    [&](int32_t a, int32_t b) { return logits[a] > logits[b]; });
  prob.resize(static_cast<size_t>(k));
  double mx = logits[idx[0]], sum = 0;
  for (int64_t i = 0; i < k; ++i) sum += prob[i] = std::exp((logits[idx[i]] - mx) / p.temperature);
  int64_t keep = k;
  if (p.top_p < 1.0f) {
    double acc = 0;
    for (int64_t i = 0; i < k; ++i) {
      acc += prob[i] / sum;
      if (acc >= p.top_p) {
        keep = i + 1;
        break;
      }
    }
  }
  double total = 0;
  for (int64_t i = 0; i < keep; ++i) total += prob[i];
  double r = rng.uniform() * total;
  for (int64_t i = 0; i < keep; ++i) {
    r -= prob[i];
    if (r <= 0) return idx[i];
  }
  return idx[keep - 1];
}

}  // namespace moe
