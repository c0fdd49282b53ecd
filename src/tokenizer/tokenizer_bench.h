// tokenizer_bench.h — encode throughput of a Tokenizer (used by `moe bench tokenize`).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "tokenizer/tokenizer.h"

namespace moe {

struct EncodeBenchResult {
  double bytes = 0;    // UTF-8 bytes encoded in the timed passes
  double seconds = 0;  // wall time of the timed passes
  int64_t tokens = 0;  // tokens produced in the timed passes
  double mb_per_s() const { return seconds > 0 ? bytes / seconds / 1e6 : 0; }
};

// A deterministic benchmark corpus of about `bytes` bytes: lines of English prose, code,
// multilingual text, numbers and white space, ~2 KB each.
std::vector<std::string> tokenizer_bench_corpus(size_t bytes);

// Encodes every text (add_special_tokens = true) once untimed (warm-up), then repeatedly until at
// least `min_seconds` have passed; returns the totals of the timed passes.
EncodeBenchResult bench_encode(const Tokenizer& tok, const std::vector<std::string>& texts, double min_seconds);

}  // namespace moe
