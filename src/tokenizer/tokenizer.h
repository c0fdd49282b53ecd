// tokenizer.h — HuggingFace tokenizers from tokenizer.json (+ tokenizer_config.json): encoding
// and decoding identical to the reference (@huggingface/tokenizers), and a byte-level tokenizer
// for models trained from scratch.
//
// Supported (anything else is rejected at load with a moe::Error naming the field):
//   model          BPE (byte-level or SentencePiece-style with byte_fallback, fuse_unk,
//                  ignore_merges, unk_token)
//   normalizer     NFC, Prepend, Replace (String or Regex pattern), Sequence, null
//   pre_tokenizer  Split (Regex or String; Isolated, Removed, MergedWithPrevious, MergedWithNext,
//                  Contiguous), ByteLevel (add_prefix_space, use_regex), Sequence, null
//   post_processor TemplateProcessing, ByteLevel, Sequence, null
//   decoder        ByteLevel, Replace, ByteFallback, Fuse, Strip, Sequence, null
//   added_tokens   matched before normalization (normalized: false) or after it (normalized:
//                  true), longest match first, never split; lstrip/rstrip as the reference does.
//
// Encoding semantics are those of HF encode(text): special-token strings in the text become their
// ids; add_special_tokens adds what the post-processor says, except that tokenizer_config.json's
// add_bos_token / add_eos_token (when present) decide BOS/EOS, as transformers does.
// Input that is not valid UTF-8 is first made valid (each invalid sequence -> U+FFFD).
//
// SentencePiece: a directory with tokenizer.model but no tokenizer.json is loaded through
// libsentencepiece (spm_model.h): the text between special tokens is encoded exactly as
// SentencePiece (spm_encode) does. Special tokens: the model's control pieces (<s>, </s>, ...),
// its unknown piece and tokenizer_config.json's added_tokens_decoder / additional_special_tokens;
// their strings in the text become their ids (as transformers' slow tokenizers split on them).
// add_special_tokens adds BOS when add_bos_token (default true, as Llama) and EOS when
// add_eos_token (default false); bos_token / eos_token of tokenizer_config.json name them, else
// the model's own. decode is SentencePiece's, except that special tokens other than the unknown
// piece are written as their text (unless skip_special_tokens), as transformers does; the unknown
// piece decodes to SentencePiece's " ⁇ " (dropped by skip_special_tokens).
//
// Thread-safety: a loaded Tokenizer is immutable apart from its word caches (a per-thread one,
// 1 MiB per encoding thread, shared by all tokenizers, and a guarded shared one); encode/decode may
// be called concurrently.
#pragma once
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe {

class Tokenizer {
 public:
  // Loads DIR/tokenizer.json and, when present, DIR/tokenizer_config.json. Without
  // tokenizer.json, DIR/tokenizer.model (SentencePiece) is loaded instead.
  static Tokenizer from_dir(const std::string& dir);
  // A SentencePiece .model file with tokenizer_config.json's contents (an object, or null/{}).
  static Tokenizer from_sentencepiece(const std::string& model_path, const nlohmann::json& config);
  // The same from a serialized ModelProto; `origin` names it in errors.
  static Tokenizer from_sentencepiece_bytes(std::string_view model_proto, const nlohmann::json& config,
                                            const std::string& origin);
  // `origin` names the source in error messages.
  static Tokenizer from_json(const nlohmann::json& tokenizer, const nlohmann::json& config,
                             const std::string& origin = "tokenizer.json");
  // A byte-level tokenizer for models trained from scratch: ids 0..255 are the bytes, then the
  // special tokens in order. byte_level_json() is its tokenizer.json (loadable by HF tools).
  static nlohmann::json byte_level_json(const std::vector<std::string>& special_tokens);
  static Tokenizer byte_level(const std::vector<std::string>& special_tokens);

  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;
  ~Tokenizer();

  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  // Token ids -> text. Ids outside the vocabulary are an error.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = false) const;

  int64_t vocab_size() const;  // 1 + the largest id
  std::optional<int32_t> token_to_id(std::string_view token) const;
  std::string id_to_token(int32_t id) const;  // "" when the id has no token
  bool is_special(int32_t id) const;
  std::optional<int32_t> bos_id() const;
  std::optional<int32_t> eos_id() const;
  // tokenizer_config.json as loaded (an empty object when absent).
  const nlohmann::json& config() const;

  struct Impl;

 private:
  explicit Tokenizer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Token ids as a compact JSON array, "[1,2,3]" (the `moe tokenize` output format).
std::string ids_to_json(const std::vector<int32_t>& ids);

// Incremental decoding for streaming: feed ids one at a time; text is released only when it is
// final (never a partial UTF-8 sequence, never text a later token could still change at the end).
// The concatenation of all step() results and flush() equals decode(all ids).
class DecodeStream {
 public:
  explicit DecodeStream(const Tokenizer& tok, bool skip_special_tokens = false);
  // Returns the newly final text (possibly empty).
  std::string step(int32_t id);
  // Returns whatever is still held back (e.g. an incomplete UTF-8 tail, as U+FFFD).
  std::string flush();

 private:
  const Tokenizer& tok_;
  bool skip_special_;
  std::vector<int32_t> ids_;  // a window of the most recent ids (context for the decoder)
  std::string emitted_;       // the part of decode(ids_) already returned
};

}  // namespace moe
