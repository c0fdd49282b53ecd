// sampling.h — next-token selection from logits: greedy, temperature, top-k, top-p.
#pragma once
#include <cstdint>

#include "core/rng.h"

namespace moe {

struct SamplingParams {
  float temperature = 0.0f;  // 0 = greedy (argmax)
  int64_t top_k = 0;         // 0 = all
  float top_p = 1.0f;        // nucleus mass
};

// logits [V] f32 on the host. Deterministic for a given rng state.
int32_t sample_token(const float* logits, int64_t vocab, const SamplingParams& p, Rng& rng);

}  // namespace moe
