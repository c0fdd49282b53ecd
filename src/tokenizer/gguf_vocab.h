// gguf_vocab.h — a model's tokenizer as GGUF metadata (llama.cpp's tokenizer.ggml.* keys), both
// ways: `moe quantize` writes it from the model directory, and a .gguf is accepted wherever a
// tokenizer directory is (Tokenizer::from_dir, ChatTemplate::from_dir).
//
//   tokenizer.ggml.model        "gpt2" (byte-level BPE) | "llama" (SentencePiece) | "none"
//   tokenizer.ggml.pre          gpt2: the pre-tokenizer's name in llama.cpp (table below)
//   tokenizer.ggml.tokens       every id's string; ids no tokenizer entry names are "[PAD<id>]"
//   tokenizer.ggml.token_type   1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
//   tokenizer.ggml.scores       llama: SentencePiece's piece scores (the BPE merge priorities)
//   tokenizer.ggml.merges       gpt2: "left right", in rank order
//   tokenizer.ggml.{bos,eos,unknown,padding}_token_id, add_bos_token, add_eos_token,
//   add_space_prefix (llama), tokenizer.chat_template
//
// What can be written, so that llama.cpp tokenizes as the engine does:
//   - tokenizer.model: a BPE SentencePiece model without a normalization table (Llama, Mistral,
//     Mixtral: the identity normalizer). Read back, the pieces become a BPE ModelProto again.
//   - tokenizer.json: byte-level BPE whose normalizer and pre-tokenizer are one of the table's
//     (gpt-2, llama-bpe, qwen2, gpt-4o, deepseek-v3). Read back, the tokenizer.json is rebuilt from
//     the same table entry, so ids equal the directory's tokenizer.
//   Anything else (a Unigram model, an unknown pre-tokenizer regex, a SentencePiece-style
//   tokenizer.json without tokenizer.model) is written as "none", with the reason.
// Control pieces / special added tokens are type 3, non-special added tokens type 4; their strings
// in the text become their ids (llama.cpp's parse_special, HF's added tokens).
#pragma once
#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe {

class GgufFile;
class GgufWriter;
class Tokenizer;

struct GgufVocab {
  std::string model;  // "gpt2" | "llama"
  std::string pre;    // gpt2 only
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  std::vector<float> scores;        // llama only
  std::vector<std::string> merges;  // gpt2 only
  int64_t bos = -1, eos = -1, unk = -1, pad = -1;
  bool add_bos = false, add_eos = false;
  bool add_space_prefix = true;     // llama only
  std::string chat_template;        // "" when none
};

// From a model directory (tokenizer.model preferred, else tokenizer.json; the chat template of
// tokenizer_config.json or chat_template.jinja). The list is padded to vocab_size (the
// embedding's rows) with "[PAD<id>]" unused entries, as llama.cpp's converter does. Returns
// std::nullopt with *why when the directory has no tokenizer or one that cannot be written.
std::optional<GgufVocab> gguf_vocab_from_dir(const std::string& dir, int64_t vocab_size, std::string* why);

void write_gguf_vocab(GgufWriter& w, const GgufVocab& v);
// std::nullopt when the file has no tokenizer (tokenizer.ggml.model absent or "none"); a
// malformed one is a moe::Error naming the file and key.
std::optional<GgufVocab> read_gguf_vocab(const GgufFile& f);

// The engine's tokenizer for a GGUF vocabulary, and the tokenizer_config.json it stands for
// (add_bos_token, add_eos_token, bos_token, eos_token, chat_template). `origin` names the file.
Tokenizer tokenizer_from_gguf_vocab(const GgufVocab& v, const std::string& origin);
nlohmann::json gguf_vocab_config(const GgufVocab& v);

// A .gguf path's vocabulary; an error naming the file when it has none.
GgufVocab load_gguf_vocab(const std::string& path);
bool gguf_has_vocab(const std::string& path);  // the file's tokenizer.ggml.model is gpt2 or llama

}  // namespace moe
