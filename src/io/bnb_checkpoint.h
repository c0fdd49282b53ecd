// bnb_checkpoint.h — weights in bitsandbytes' 4-bit serialization (core/bnb4.h) inside a model
// directory, as transformers saves load_in_4bit models ("*-bnb-4bit" checkpoints), both ways.
//
// Reading: a weight NAME with the companion NAME.quant_state.bitsandbytes__nf4 is decoded into
// an engine tensor [out, in]: NF4 blocks (core/nf4.h, no value changed) when its blocks are 64
// values along whole rows, else f32 values; double-quantised absmax values are decoded once.
// Writing (`moe quantize --type nf4`): the tensors that stand for one NF4 weight, and whole
// directories.
#pragma once
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace moe {

class Checkpoint;

// True when `name` has a bitsandbytes NF4 quant state beside it. An FP4 state is an error
// naming the tensor (the engine has no FP4 kernels).
bool is_bnb4_weight(const Checkpoint& ck, const std::string& name);
// The decoded weight (see above). Errors name the tensor and what does not fit.
Tensor read_bnb4_weight(const Checkpoint& ck, const std::string& name);
// Every tensor name that belongs to a bitsandbytes quant state (NAME.absmax, NAME.quant_map, ...),
// which the model loader does not look up.
bool is_bnb4_companion(const std::string& tensor_name);

// The tensors bitsandbytes stores for weight `name` (2-D, its rows a multiple of 64 values),
// NF4-quantized; `torch_dtype` is the original dtype's torch name ("bfloat16").
std::vector<std::pair<std::string, Tensor>> bnb4_weight_tensors(const std::string& name, const Tensor& w,
                                                                bool double_quant, const std::string& torch_dtype);

// `moe quantize MODEL --type nf4 --out DIR`: model directory `src` written as a bitsandbytes
// 4-bit checkpoint directory `out` (which must not exist; written to a temporary directory and
// renamed into place): every linear weight NF4 in blocks of 64 (double-quantised absmax values
// unless !double_quant); embeddings, the LM head, norms, routers and the shared-expert gate stay
// as they are (routing stays exact); config.json gains the quantization_config transformers
// reads; tokenizer files are copied along. progress(i, n, name) before each quantized weight.
struct Bnb4DirStats {
  size_t quantized = 0, kept = 0;  // weights quantized, tensors kept as they were
  uint64_t bytes_before = 0;       // the quantized weights' source bytes
  uint64_t bytes_after = 0;        // ... and the bytes of everything stored for them
  uint64_t bytes_total = 0;        // all tensor bytes written
  int64_t params = 0;              // the source's parameters
  int64_t quantized_params = 0;    // ... of them in quantized weights
};
Bnb4DirStats write_bnb4_dir(const std::string& src, const std::string& out, bool double_quant,
                            const std::function<void(size_t, size_t, const std::string&)>& progress = {});

}  // namespace moe
