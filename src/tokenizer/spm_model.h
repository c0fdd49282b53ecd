// spm_model.h — a SentencePiece model (tokenizer.model, a serialized ModelProto) through Debian's
// libsentencepiece: encoding, decoding and the piece table. Tokenizer uses it for model
// directories that have tokenizer.model but no tokenizer.json (see tokenizer.h); the sentencepiece
// headers stay inside spm_model.cpp.
//
// encode() and decode() are SentencePiece's own (what spm_encode --output_format=id and
// spm_decode --input_format=id print): the model's normalizer (e.g. nmt_nfkc), dummy prefix,
// byte fallback and user-defined symbols apply; no BOS/EOS are added; control pieces (<s>, </s>)
// decode to nothing and the unknown piece to SentencePiece's " ⁇ ".
//
// Thread-safety: a loaded SpmModel is immutable; encode/decode may be called concurrently.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

class SpmModel {
 public:
  // Reads and parses a .model file; a missing, empty, truncated or otherwise invalid file is a
  // moe::Error naming the path.
  static std::unique_ptr<SpmModel> load_file(const std::string& path);
  // Parses serialized ModelProto bytes; `origin` names them in errors.
  static std::unique_ptr<SpmModel> load_bytes(std::string_view bytes, const std::string& origin);
  ~SpmModel();

  // Appends the ids of text (valid UTF-8).
  void encode(std::string_view text, std::vector<int32_t>* out) const;
  // Ids (all in [0, size())) -> text.
  std::string decode(const std::vector<int32_t>& ids) const;

  int32_t size() const;                      // the number of pieces
  const std::string& piece(int32_t id) const;  // id in [0, size())
  int32_t find(std::string_view piece) const;  // -1 when no piece is exactly `piece`
  bool is_control(int32_t id) const;
  bool is_unknown(int32_t id) const;
  int32_t bos_id() const;  // -1 when the model has none
  int32_t eos_id() const;
  int32_t unk_id() const;
  int32_t pad_id() const;

 private:
  SpmModel();
  struct Impl;
  std::unique_ptr<Impl> impl_;
  std::string origin_;
};

}  // namespace moe
