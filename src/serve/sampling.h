// sampling.h — next-token selection from logits (greedy, temperature, top-k, top-p) and the
// log-probabilities the OpenAI API reports.
#pragma once
#include <cstdint>
#include <utility>
#include <vector>

#include "core/rng.h"

namespace moe {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy (argmax)
  int64_t top_k = 0;         // 0 = all
  float top_p = 1.0f;        // nucleus mass
};

// logits [V] f32 on the host. Deterministic for a given rng state; one uniform draw per call
// when sampling (none when greedy). Never sorts the whole vocabulary: top-k selects k
// candidates in O(V); top-p widens a selected candidate set until it holds the mass; plain
// temperature sampling walks the vocabulary once in id order.
int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p, Rng& rng);

// Log-probabilities under the model's own distribution (log-softmax of the raw logits, no
// temperature), as OpenAI's `logprobs`: of `token`, and the n_top most likely tokens, most
// likely first (ties: lower id first).
struct TokenLogprobs {
  float logprob = 0.0f;
  std::vector<std::pair<int32_t, float>> top;
};
void token_logprobs(const float* logits, int64_t vocab, int32_t token, int64_t n_top, TokenLogprobs* out);

}  // namespace moe
