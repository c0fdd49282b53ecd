// fuzz_safetensors_header.cpp — libFuzzer target for the safetensors header parser.
//
// Any input must either parse or throw moe::Error (DESIGN.md invariant 6); a crash, sanitizer
// report, leak or any other exception is a bug. When parsing succeeds, the returned offsets are
// checked against the promises the reader makes to its callers (in bounds, sorted, sized).
//
// Build (clang): cmake -S . -B build-fuzz -G Ninja -DMOE_FUZZ=ON -DMOE_TESTS=OFF
// Run:           ./build-fuzz/fuzz_safetensors_header -max_total_time=60
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>

#include "io/safetensors.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::map<std::string, std::string> metadata;
  size_t data_start = 0;
  std::vector<moe::SafetensorsInfo> infos;
  try {
    infos = moe::parse_safetensors_header(data, size, "fuzz.safetensors", &metadata, &data_start);
  } catch (const moe::Error&) {
    return 0;  // rejected with a message: the expected outcome for most inputs
  }
  // Accepted: every tensor must lie inside the file, with the byte size its dtype and shape imply,
  // in offset order.
  if (data_start < 8 || data_start > size) std::abort();
  size_t prev_begin = 0;
  for (const moe::SafetensorsInfo& t : infos) {
    if (t.begin > t.end || t.end > size - data_start) std::abort();
    if (t.begin < prev_begin) std::abort();
    prev_begin = t.begin;
    size_t bytes = moe::dtype_size(t.dtype);
    for (int64_t d : t.shape) bytes *= static_cast<size_t>(d);
    if (bytes != t.end - t.begin) std::abort();
  }
  return 0;
}
