// fuzz_gguf.cpp — libFuzzer target for the GGUF header parser (io/gguf.h).
//
// Any input must either parse or throw moe::Error (DESIGN.md invariant 6); a crash, sanitizer
// report, leak or any other exception is a bug. When parsing succeeds, the reader's promises are
// checked: the data section starts aligned inside the file, every tensor's bytes lie inside it at
// an aligned offset with the size its type and shape imply, and no two tensors overlap. Accepted
// tensors of a dequantisable type are then dequantised (the first rows), which must not read
// outside the input either.
//
// Build (clang; scripts/test.sh's asan stage does this): CC=clang CXX=clang++ cmake -S . -B build-asan -G Ninja \
//                  -DMOE_FUZZ=ON -DMOE_SANITIZE=ON && cmake --build build-asan --target fuzz_gguf
// Run:           build-asan/fuzz_gguf CORPUS_DIR -max_total_time=60 -timeout=10
// Seeds:         python3 scripts/fuzz_seeds.py gguf CORPUS_DIR ../shared/fixtures (small valid files of
//                every dequantisable type), or any .gguf file (e.g. `moe quantize` output).
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <vector>

#include "core/quant.h"
#include "io/gguf.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  moe::GgufHeader h;
  try {
    h = moe::parse_gguf(data, size, "fuzz.gguf");
  } catch (const moe::Error&) {
    return 0;  // rejected with a message: the expected outcome for most inputs
  }
  if (h.alignment == 0 || h.data_start % h.alignment != 0) std::abort();
  if (!h.tensors.empty() && h.data_start > size) std::abort();
  std::vector<std::pair<uint64_t, uint64_t>> spans;
  for (const moe::GgufTensorInfo& t : h.tensors) {
    if (t.ne.empty() || t.ne.size() > 4) std::abort();
    if (t.offset % h.alignment != 0) std::abort();
    if (t.offset > size - h.data_start || t.nbytes > size - h.data_start - t.offset) std::abort();
    const moe::GgmlTypeInfo& ti = moe::ggml_type_info(t.type);
    if (t.ne[0] % ti.block_elems != 0) std::abort();
    if (t.nbytes != static_cast<uint64_t>(t.numel() / ti.block_elems) * ti.block_bytes) std::abort();
    if (t.nbytes) spans.emplace_back(t.offset, t.offset + t.nbytes);
    // Dequantise up to 4 rows (bounded work per input).
    if (ti.dequantizable && t.ne[0] > 0 && t.ne[0] <= (1 << 16)) {
      const int64_t rows = std::min<int64_t>(t.numel() / t.ne[0], 4);
      const size_t rb = moe::ggml_row_bytes(t.type, t.ne[0]);
      std::vector<float> out(static_cast<size_t>(t.ne[0]));
      for (int64_t r = 0; r < rows; ++r) moe::dequantize_row(t.type, data + h.data_start + t.offset + r * rb, out.data(), t.ne[0]);
    }
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i)
    if (spans[i].first < spans[i - 1].second) std::abort();
  return 0;
}
