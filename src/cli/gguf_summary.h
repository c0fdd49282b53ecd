// gguf_summary.h — what a GGUF file holds, as `moe quantize` prints it after writing one and
// `moe inspect FILE.gguf` prints it: tensors and bytes per ggml type, parameters, bits per
// parameter; inspect adds the model's configuration and the tokenizer.
#pragma once
#include <cstdint>
#include <string>

namespace moe {

class GgufFile;

struct GgufTensorTotals {
  size_t tensors = 0;
  uint64_t bytes = 0;  // tensor data
  int64_t params = 0;
  double bits_per_param() const { return params ? 8.0 * static_cast<double>(bytes) / static_cast<double>(params) : 0; }
};

// Prints "  TYPE   N tensors   X MiB" per ggml type and returns the totals.
GgufTensorTotals print_gguf_tensor_types(const GgufFile& f);
// `moe inspect` on a .gguf path.
void inspect_gguf(const std::string& path);

}  // namespace moe
