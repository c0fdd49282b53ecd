// fuzz_regex.cpp — libFuzzer target: the pre-tokenizer regex engine: pattern (before a NUL byte) + subject (after it), all matches.
//
// The entry point lives in fuzz_targets.h (shared with the ctest replay of tests/fuzz_corpus/regex/):
// any input must succeed or throw moe::Error; a crash, sanitizer report, leak, hang or any other
// exception is a bug.
//
// Build (clang): CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DMOE_FUZZ=ON -DMOE_TESTS=OFF \
//                  -DMOE_SANITIZE=ON -DCMAKE_CXX_FLAGS=-fsanitize=fuzzer-no-link
// Run:           build-fuzz/fuzz_regex CORPUS_DIR -max_total_time=60 -timeout=10
#include "fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::fuzz::regex(data, size);
  return 0;
}
