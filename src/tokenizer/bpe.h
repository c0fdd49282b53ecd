// bpe.h — the BPE model of a tokenizer.json: vocabulary, merges, and the merge loop.
//
// Merging follows the reference exactly: repeatedly merge the adjacent pair of lowest merge rank,
// the leftmost (by original position) on ties; a later duplicate merge line overrides an earlier
// one. Words are either byte-level (input is raw bytes, each mapped to its GPT-2 byte character)
// or code points (SentencePiece style, with byte_fallback to <0xXX> tokens).
#pragma once
#include <cstdint>
#include <mutex>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe {

// Token ids of tokenizer files (vocab, added tokens, post-processor ids) must be below this:
// 4M, 16x the largest real vocabulary. Bounds the id -> token table (a vocabulary id near 2^30
// would otherwise ask for tens of GiB).
constexpr int64_t kMaxTokenId = int64_t(1) << 22;

// Reads a JSON integer in [0, kMaxTokenId) into *id; false (and *id untouched) otherwise. Never
// wraps (2^32 is not 0).
bool json_token_id(const nlohmann::json& j, int32_t* id);

// The GPT-2 byte <-> character map used by ByteLevel pre-tokenizers and decoders.
uint32_t byte_level_char(uint8_t b);
int byte_level_byte(uint32_t cp);  // -1 when cp is not a byte-level character

class BpeModel {
 public:
  // `model` is tokenizer.json's "model" object; `byte_level` says whether words arrive as raw
  // bytes (a ByteLevel pre-tokenizer ran) or as text. `origin` names the file in errors.
  void load(const nlohmann::json& model, bool byte_level, const std::string& origin);
  // Adds (or overrides) a token, as added_tokens do.
  void set_token(const std::string& content, int32_t id);
  // Call after the last set_token().
  void finalize();

  // Appends the ids of one pre-tokenized word. Results are cached: first in a per-thread cache
  // (short words; no locking), then in a shared one.
  void encode_word(std::string_view word, std::vector<int32_t>* out) const;

  const std::vector<std::string>& id_to_token() const { return id_to_token_; }
  const std::unordered_map<std::string, int32_t>& token_to_id() const { return token_to_id_; }
  int32_t unk_id() const { return unk_id_; }
  bool fuse_unk() const { return fuse_unk_; }
  bool byte_level() const { return byte_level_; }

 private:
  void bpe(std::string_view word, std::vector<int32_t>* out) const;
  // encode_word with the cache; split: may cut the word at uncrossable boundaries first.
  void encode_cached(std::string_view word, std::vector<int32_t>* out, bool split) const;
  void encode_uncached(std::string_view word, std::vector<int32_t>* out, bool split) const;
  // Splitting: no merge result contains the adjacent characters (bytes when byte-level) a, b, so
  // no merge ever crosses a boundary between them and the word's BPE is the concatenation of the
  // BPE of its pieces (which the cache then holds).
  bool crossable(uint32_t a, uint32_t b) const;
  void build_pairs(const std::vector<std::pair<std::string, std::string>>& merges);

  struct MergeSlot {
    uint64_t key = ~uint64_t(0);
    uint32_t rank = 0;
    int32_t id = -1;
  };
  const MergeSlot* find_merge(int32_t a, int32_t b) const;

  bool byte_level_ = false, byte_fallback_ = false, fuse_unk_ = false, ignore_merges_ = false;
  int32_t unk_id_ = -1;
  std::unordered_map<std::string, int32_t> token_to_id_;
  std::vector<std::string> id_to_token_;
  struct ViewHash {
    using is_transparent = void;
    size_t operator()(std::string_view s) const;
  };
  std::unordered_map<std::string, int32_t, ViewHash, std::equal_to<>> raw_to_id_;  // byte-level: raw bytes -> id
  std::unordered_map<uint32_t, int32_t> char_id_;       // text mode: single code point -> id
  int32_t byte_sym_[256];                               // byte-level: byte -> id (or -1)
  int32_t byte_fallback_id_[256];                       // <0xXX> -> id (or -1)
  std::vector<std::pair<std::string, std::string>> merge_strings_;
  std::vector<MergeSlot> merges_;  // open addressing, power-of-two size
  uint64_t merge_mask_ = 0;
  size_t n_merges_ = 0;
  bool split_ = false;                // splitting at uncrossable boundaries is enabled
  std::vector<uint64_t> byte_pairs_;  // byte-level: 65536 bits, (a << 8 | b) crossable
  std::vector<uint64_t> cp_pairs_;    // text: open-addressing set of (a << 21 | b) + 1 (0 = empty)
  uint64_t cp_pairs_mask_ = 0;

  // This model's tag in the per-thread word caches (unique per process, never reused).
  uint32_t uid_ = 0;
  // Shared word cache (words shorter than kCacheMaxWord bytes that the per-thread cache cannot
  // hold).
  static constexpr size_t kCacheMaxWord = 256, kCacheMaxEntries = 1 << 18, kShards = 16;
  struct Shard {
    std::mutex mu;
    std::unordered_map<std::string, std::vector<int32_t>, ViewHash, std::equal_to<>> map;
  };
  mutable Shard cache_[kShards];
};

}  // namespace moe
