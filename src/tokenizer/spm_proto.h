// spm_proto.h — the few fields of SentencePiece's ModelProto (a tokenizer.model file) that the
// GGUF tokenizer conversion (gguf_vocab.h) reads and writes, as plain protobuf wire format:
// Debian's libsentencepiece-dev ships no ModelProto header, and the conversion needs the pieces'
// scores and types, which SentencePieceProcessor does not all expose.
//
//   ModelProto      1 pieces (repeated SentencePiece), 2 trainer_spec, 3 normalizer_spec
//   SentencePiece   1 piece (string), 2 score (float), 3 type (enum, 1 normal … 6 byte)
//   TrainerSpec     3 model_type (1 unigram, 2 BPE), 35 byte_fallback, 40 unk_id, 41 bos_id,
//                   42 eos_id, 43 pad_id
//   NormalizerSpec  1 name, 2 precompiled_charsmap, 3 add_dummy_prefix,
//                   4 remove_extra_whitespaces, 5 escape_whitespaces
// Every other field is skipped when reading and absent when writing (SentencePiece's defaults).
#pragma once
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

// Piece types, the same numbers in SentencePiece and in GGUF's tokenizer.ggml.token_type.
enum SpmPieceType : int32_t {
  kSpmNormal = 1, kSpmUnknown = 2, kSpmControl = 3, kSpmUserDefined = 4, kSpmUnused = 5, kSpmByte = 6
};

struct SpmPiece {
  std::string piece;
  float score = 0;
  int32_t type = kSpmNormal;
};

struct SpmProto {
  std::vector<SpmPiece> pieces;
  int32_t model_type = 1;  // 1 unigram (SentencePiece's default), 2 BPE
  bool byte_fallback = false;
  int32_t unk_id = 0, bos_id = 1, eos_id = 2, pad_id = -1;  // SentencePiece's defaults
  std::string normalizer_name;  // "" when the file has no normalizer_spec name
  bool has_charsmap = false;    // a precompiled normalization table (e.g. nmt_nfkc)
  bool add_dummy_prefix = true, remove_extra_whitespaces = true, escape_whitespaces = true;
};

// Throws moe::Error naming `origin` for bytes that are not a well-formed ModelProto.
SpmProto parse_spm_proto(std::string_view bytes, const std::string& origin);
std::string serialize_spm_proto(const SpmProto& p);

}  // namespace moe
