// fuzz_tokenizer_json.cpp — libFuzzer target: tokenizer.json (before a NUL byte): load, then encode the text after it and a few fixed strings, decode, stream.
//
// The entry point lives in fuzz_targets.h (shared with the ctest replay of tests/fuzz_corpus/tokenizer_json/):
// any input must succeed or throw moe::Error; a crash, sanitizer report, leak, hang or any other
// exception is a bug.
//
// Build (clang; scripts/test.sh's asan stage does this): CC=clang CXX=clang++ cmake -S . -B build-asan -G Ninja \
//                  -DMOE_FUZZ=ON -DMOE_SANITIZE=ON && cmake --build build-asan --target fuzz_tokenizer_json
// Run:           build-asan/fuzz_tokenizer_json CORPUS_DIR -max_total_time=60 -timeout=10
#include "fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::fuzz::tokenizer_json(data, size);
  return 0;
}
