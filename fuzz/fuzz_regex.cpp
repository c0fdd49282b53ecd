// fuzz_regex.cpp — libFuzzer target: the pre-tokenizer regex engine: pattern (before a NUL byte) + subject (after it), all matches.
//
// The entry point lives in fuzz_targets.h (shared with the ctest replay of tests/fuzz_corpus/regex/):
// any input must succeed or throw moe::Error; a crash, sanitizer report, leak, hang or any other
// exception is a bug.
//
// Build (clang; scripts/test.sh's asan stage does this): CC=clang CXX=clang++ cmake -S . -B build-asan -G Ninja \
//                  -DMOE_FUZZ=ON -DMOE_SANITIZE=ON && cmake --build build-asan --target fuzz_regex
// Run:           build-asan/fuzz_regex CORPUS_DIR -max_total_time=60 -timeout=10
#include "fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::fuzz::regex(data, size);
  return 0;
}
