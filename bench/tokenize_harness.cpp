// tokenize_harness.cpp — encode throughput of one revision of src/tokenizer, for
// bench/tokenize_vs_baseline.sh (which compiles this file against two revisions and runs them
// alternately on the same machine). Prints "MB/s tokens bytes" of the timed passes.
#include <cstdio>
#include <cstdlib>

#include "tokenizer/tokenizer_bench.h"

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s TOKENIZER_DIR SECONDS\n", argv[0]);
    return 2;
  }
  const moe::Tokenizer tok = moe::Tokenizer::from_dir(argv[1]);
  const std::vector<std::string> texts = moe::tokenizer_bench_corpus(size_t(1) << 20);
  const moe::EncodeBenchResult r = moe::bench_encode(tok, texts, std::atof(argv[2]));
  std::printf("%.3f %lld %.0f\n", r.mb_per_s(), static_cast<long long>(r.tokens), r.bytes);
  return 0;
}
