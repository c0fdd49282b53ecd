// fuzz_safetensors_index.cpp — libFuzzer target: model.safetensors.index.json (weight_map).
//
// The entry point lives in fuzz_targets.h (shared with the ctest replay of tests/fuzz_corpus/safetensors_index/):
// any input must succeed or throw moe::Error; a crash, sanitizer report, leak, hang or any other
// exception is a bug.
//
// Build (clang; scripts/test.sh's asan stage does this): CC=clang CXX=clang++ cmake -S . -B build-asan -G Ninja \
//                  -DMOE_FUZZ=ON -DMOE_SANITIZE=ON && cmake --build build-asan --target fuzz_safetensors_index
// Run:           build-asan/fuzz_safetensors_index CORPUS_DIR -max_total_time=60 -timeout=10
#include "fuzz_targets.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::fuzz::safetensors_index(data, size);
  return 0;
}
