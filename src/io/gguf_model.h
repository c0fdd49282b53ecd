// gguf_model.h — the engine's model families in GGUF files, as llama.cpp's converter
// (convert_hf_to_gguf.py) writes them, in both directions.
//
//   family     GGUF general.architecture   notes
//   mixtral    llama (+ expert_count)      q/k rows permuted for llama.cpp's interleaved RoPE
//   qwen2_moe  qwen2moe                    shared expert: ffn_*_shexp, ffn_gate_inp_shexp
//   qwen3_moe  qwen3moe                    attn_q_norm / attn_k_norm
//
// Tensor names: token_embd, output_norm, output (absent when tied), and per layer N
// blk.N.{attn_norm, ffn_norm, attn_q, attn_k, attn_v, attn_output, attn_q_norm, attn_k_norm,
// ffn_gate_inp (router), ffn_{gate,up,down}_exps (experts stacked: ne = [D,F,E] / [F,D,E]),
// ffn_{gate,up,down}_shexp, ffn_gate_inp_shexp, ffn_{gate,up,down} (dense layers)}.{weight,bias}.
//
// The llama q/k permutation: HF stores each head's rotary pairs as (i, i + Dh/2); llama.cpp as
// (2i, 2i+1). The converter reorders the rows of q_proj (n_head heads) and k_proj (n_head_kv
// heads): GGUF row h*Dh + 2i + p = HF row h*Dh + p*Dh/2 + i (p in {0,1}). The reader undoes it.
//
// Metadata written (what llama.cpp's loader reads): general.architecture/name/file_type/
// quantization_version, ARCH.{vocab_size, context_length, embedding_length, block_count,
// feed_forward_length, attention.{head_count, head_count_kv, key_length, value_length,
// layer_norm_rms_epsilon}, rope.{dimension_count, freq_base}, expert_count,
// expert_used_count, expert_feed_forward_length, expert_shared_feed_forward_length,
// expert_weights_norm}, and the tokenizer (tokenizer/gguf_vocab.h) when the writer is given one;
// without it tokenizer.ggml.model = "none" with bos/eos ids (llama.cpp then runs on token ids).
#pragma once
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "core/quant.h"
#include "core/tensor.h"
#include "io/hf_config.h"

namespace moe {

struct GgufModel {
  ModelConfig config;
  // HF tensor names (per-expert names, e.g. model.layers.0.block_sparse_moe.experts.3.w1.weight)
  // -> tensors with the HF shapes: f32 (dequantised), F16/BF16 as stored, or quantized
  // projections (see GgufLoadOptions); ready for Model::from_tensors.
  std::vector<std::pair<std::string, Tensor>> tensors;
};

struct GgufLoadOptions {
  // Keep the projection weights (attn_q/k/v/output, ffn_*_exps, ffn_*_shexp, dense ffn_*,
  // output) in the file's block type when the CPU kernels have it (q8_0 q4_0 q4_K q5_K q6_K:
  // the quantized dtypes of core/dtype.h), so Model::from_tensors (keep_dtype) runs them
  // quantized; the bytes are copied as stored (q/k rows un-permuted whole). Every other tensor,
  // and other types, are dequantised to f32 as without it — except F16 and BF16 tensors, which
  // always arrive as stored (F16/BF16 tensors).
  bool keep_quantized = false;
};

// Reads a GGUF file of a supported family. Throws moe::Error naming the file and the key or
// tensor at fault (unknown architecture, missing keys, unexpected tensor names or shapes,
// types that cannot be dequantised).
GgufModel load_gguf_model(const std::string& path, const GgufLoadOptions& opt = {});
// The config alone (cheap: no tensor data is read).
ModelConfig load_gguf_config(const std::string& path);

// What `moe quantize --type` accepts: the file type decides each tensor's type as llama.cpp's
// mixes do (1-D tensors and routers stay f32; *_k_m give output, and attn_v / ffn_down on a
// subset of layers, q6_K; rows that are not whole 256-value super-blocks take q5_0 for q4_K,
// q5_1 for q5_K and q8_0 for q6_K, as llama.cpp's quantizer falls back).
enum class GgufFileType { F32, F16, BF16, Q8_0, Q4_0, Q4_K_M, Q5_K_M, Q6_K, Q4_1, Q5_0, Q5_1 };
bool gguf_file_type_from_name(const std::string& s, GgufFileType* out);  // "q4_k_m", ...
const char* gguf_file_type_name(GgufFileType t);
uint32_t gguf_llama_ftype(GgufFileType t);  // LLAMA_FTYPE_* value for general.file_type

struct GgufVocab;

struct GgufWriteOptions {
  GgufFileType type = GgufFileType::F32;
  const GgufVocab* vocab = nullptr;  // the tokenizer's metadata (gguf_vocab_from_dir); nullptr: "none"
  std::string name;  // general.name (default: the directory's base name)
  // progress(i, n, gguf tensor name, type) before tensor i of n is produced.
  std::function<void(size_t, size_t, const std::string&, GgmlType)> progress;
};

// The ggml type a tensor gets in a file of type t (name is the GGUF name, ne in ggml order,
// n_layer the model's layer count).
GgmlType gguf_tensor_type(GgufFileType t, const std::string& name, const std::vector<int64_t>& ne, int64_t n_layer);

// Converts a HF model directory (config.json + safetensors) into a GGUF file (atomic write).
void write_gguf(const std::string& model_dir, const std::string& out_path, const GgufWriteOptions& opt = {});

}  // namespace moe
