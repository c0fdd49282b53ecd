// tokenizer_bench.cpp — see tokenizer_bench.h.
#include "tokenizer/tokenizer_bench.h"

#include <chrono>

namespace moe {

std::vector<std::string> tokenizer_bench_corpus(size_t bytes) {
  static const char* pieces[] = {
      "The quick brown fox jumps over the lazy dog. ",
      "Mixture-of-Experts models route each token to a few experts out of many; ",
      "for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; }\n",
      "def forward(self, x):\n    return self.proj(torch.relu(x)) + 1.5e-3\n",
      "Der schnelle braune Fuchs springt über den faulen Hund. ",
      "Съешь же ещё этих мягких французских булок, да выпей чаю. ",
      "我爱自然语言处理，机器学习很有趣。", "日本語の文章です。東京は大きい都市です。",
      "한국어 문장입니다. ", "العربية لغة جميلة. ", "🎉👍🏽 emoji! ",
      "In 2024, 1,234,567 tokens were processed at 98.6% accuracy. ",
      "    indented line with    irregular   spacing\n", "\n\n",
  };
  std::vector<std::string> out;
  std::string line;
  size_t total = 0;
  uint64_t s = 88172645463325252ULL;
  while (total < bytes) {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    line += pieces[s % std::size(pieces)];
    if (line.size() >= 2048) {
      total += line.size();
      out.push_back(std::move(line));
      line.clear();
    }
  }
  return out;
}

EncodeBenchResult bench_encode(const Tokenizer& tok, const std::vector<std::string>& texts, double min_seconds) {
  using clock = std::chrono::steady_clock;
  for (const auto& t : texts) tok.encode(t);  // warm-up (word cache, page faults)
  EncodeBenchResult r;
  const auto t0 = clock::now();
  do {
    for (const auto& t : texts) {
      r.tokens += int64_t(tok.encode(t).size());
      r.bytes += double(t.size());
    }
    r.seconds = std::chrono::duration<double>(clock::now() - t0).count();
  } while (r.seconds < min_seconds);
  return r;
}

}  // namespace moe
