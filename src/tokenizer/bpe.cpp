// bpe.cpp — see bpe.h.
#include "tokenizer/bpe.h"

#include <algorithm>
#include <atomic>
#include <cstring>
#include <functional>
#include <memory>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace moe {
namespace {

struct ByteMap {
  uint32_t to_char[256];
  int16_t to_byte[0x200];
  ByteMap() {
    std::fill(std::begin(to_byte), std::end(to_byte), int16_t(-1));
    int n = 0;
    for (int b = 0; b < 256; ++b) {
      const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF);
      to_char[b] = printable ? uint32_t(b) : uint32_t(256 + n++);
      to_byte[to_char[b]] = int16_t(b);
    }
  }
};
const ByteMap& byte_map() {
  static const ByteMap m;
  return m;
}

uint64_t mix(uint64_t k) {
  k ^= k >> 33;
  k *= 0xff51afd7ed558ccdULL;
  k ^= k >> 33;
  return k;
}

// A fast 64-bit hash of a short byte string (8-byte words, multiply-xorshift, fmix64 finish).
uint64_t word_hash(std::string_view s) {
  constexpr uint64_t kMul = 0x9FB21C651E98DF25ULL;
  const char* p = s.data();
  size_t n = s.size();
  uint64_t h = 0x9E3779B97F4A7C15ULL ^ (uint64_t(n) * 0xC2B2AE3D27D4EB4FULL);
  uint64_t v;
  if (n >= 8) {
    for (; n > 8; p += 8, n -= 8) {
      std::memcpy(&v, p, 8);
      h = (h ^ v) * kMul;
      h ^= h >> 29;
    }
    std::memcpy(&v, p + n - 8, 8);  // the last 8 bytes (overlapping)
  } else {
    v = 0;
    for (size_t k = 0; k < n; ++k) v |= uint64_t(uint8_t(p[k])) << (8 * k);
  }
  h = (h ^ v) * kMul;
  return mix(h ^ (h >> 32));
}

// The per-thread word cache: 2-way set associative, fixed 64-byte slots tagged with the model's
// uid, so that no locking and no clearing is ever needed (a slot of another or of a destroyed model
// is simply a miss). The newest entry goes to way 0, the previous way 0 to way 1.
struct alignas(64) WordSlot {
  static constexpr size_t kMaxKey = 30, kMaxIds = 6;
  uint32_t owner;  // BpeModel uid; 0 = empty
  uint32_t tag;    // the high half of the word's hash
  uint8_t len, n;
  char key[kMaxKey];
  int32_t ids[kMaxIds];
};
static_assert(sizeof(WordSlot) == 64);
constexpr size_t kTlsSets = 8192;  // x 2 ways x 64 bytes = 1 MiB per thread that encodes

WordSlot* tls_set(uint64_t h) {
  thread_local std::unique_ptr<WordSlot[]> table;
  if (!table) table.reset(new WordSlot[2 * kTlsSets]());
  return &table[2 * (h & (kTlsSets - 1))];
}

std::atomic<uint64_t> g_next_uid{1};  // uids are never reused (a reuse could hit stale slots)

std::string cp_string(uint32_t cp) {
  std::string s;
  utf8_append(s, cp);
  return s;
}

}  // namespace

size_t BpeModel::ViewHash::operator()(std::string_view s) const { return size_t(word_hash(s)); }

bool json_token_id(const nlohmann::json& j, int32_t* id) {
  if (!j.is_number_integer()) return false;
  if (j.is_number_unsigned()) {
    const uint64_t v = j.get<uint64_t>();
    if (v >= uint64_t(kMaxTokenId)) return false;
    *id = int32_t(v);
    return true;
  }
  const int64_t v = j.get<int64_t>();
  if (v < 0 || v >= kMaxTokenId) return false;
  *id = int32_t(v);
  return true;
}

uint32_t byte_level_char(uint8_t b) { return byte_map().to_char[b]; }
int byte_level_byte(uint32_t cp) { return cp < 0x200 ? byte_map().to_byte[cp] : -1; }

void BpeModel::load(const nlohmann::json& m, bool byte_level, const std::string& origin) {
  using json = nlohmann::json;
  byte_level_ = byte_level;
  MOE_CHECK(m.contains("vocab") && m["vocab"].is_object(), "%s: model.vocab must be an object", origin.c_str());
  MOE_CHECK(m.contains("merges") && m["merges"].is_array(), "%s: model.merges must be an array", origin.c_str());
  auto str_opt = [&](const char* key) -> std::string {
    if (!m.contains(key) || m[key].is_null()) return "";
    MOE_CHECK(m[key].is_string(), "%s: model.%s must be a string or null", origin.c_str(), key);
    return m[key].get<std::string>();
  };
  auto bool_opt = [&](const char* key) -> bool {
    if (!m.contains(key) || m[key].is_null()) return false;
    MOE_CHECK(m[key].is_boolean(), "%s: model.%s must be a boolean", origin.c_str(), key);
    return m[key].get<bool>();
  };
  MOE_CHECK(str_opt("continuing_subword_prefix").empty(), "%s: model.continuing_subword_prefix is not supported",
            origin.c_str());
  MOE_CHECK(str_opt("end_of_word_suffix").empty(), "%s: model.end_of_word_suffix is not supported", origin.c_str());
  MOE_CHECK(!m.contains("dropout") || m["dropout"].is_null() || m["dropout"] == 0.0,
            "%s: model.dropout is not supported", origin.c_str());
  byte_fallback_ = bool_opt("byte_fallback");
  fuse_unk_ = bool_opt("fuse_unk");
  ignore_merges_ = bool_opt("ignore_merges");
  const std::string unk = str_opt("unk_token");

  for (auto it = m["vocab"].begin(); it != m["vocab"].end(); ++it) {
    int32_t id = -1;
    MOE_CHECK(json_token_id(it.value(), &id), "%s: model.vocab['%s'] must be an integer id in [0, %lld), got %s",
              origin.c_str(), it.key().c_str(), (long long)kMaxTokenId,
              it.value().is_number() ? it.value().dump().c_str() : it.value().type_name());
    token_to_id_[it.key()] = int32_t(id);
    if (size_t(id) >= id_to_token_.size()) id_to_token_.resize(size_t(id) + 1);
    id_to_token_[size_t(id)] = it.key();
  }
  unk_id_ = -1;
  if (!unk.empty()) {
    auto it = token_to_id_.find(unk);
    MOE_CHECK(it != token_to_id_.end(), "%s: model.unk_token '%s' is not in the vocabulary", origin.c_str(), unk.c_str());
    unk_id_ = it->second;
  }
  const json& merges = m["merges"];
  merge_strings_.reserve(merges.size());
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& mg = merges[i];
    if (mg.is_string()) {
      const std::string s = mg.get<std::string>();
      const size_t sp = s.find(' ');
      MOE_CHECK(sp != std::string::npos, "%s: model.merges[%zu] = '%s' is not 'a b'", origin.c_str(), i, s.c_str());
      // As the reference does (split(" ", 2)): the second part ends at the next space.
      const size_t sp2 = s.find(' ', sp + 1);
      merge_strings_.emplace_back(s.substr(0, sp), s.substr(sp + 1, sp2 == std::string::npos ? std::string::npos : sp2 - sp - 1));
    } else {
      MOE_CHECK(mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string(),
                "%s: model.merges[%zu] must be \"a b\" or [\"a\", \"b\"]", origin.c_str(), i);
      merge_strings_.emplace_back(mg[0].get<std::string>(), mg[1].get<std::string>());
    }
  }
}

void BpeModel::set_token(const std::string& content, int32_t id) {
  token_to_id_[content] = id;
  if (size_t(id) >= id_to_token_.size()) id_to_token_.resize(size_t(id) + 1);
  id_to_token_[size_t(id)] = content;
}

void BpeModel::finalize() {
  const uint64_t uid = g_next_uid.fetch_add(1);
  MOE_CHECK(uid < 0xFFFFFFFFu, "BpeModel: too many tokenizers loaded in this process");
  uid_ = uint32_t(uid);
  // Merges -> (id, id) -> (rank, merged id). Every part and result must be in the vocabulary.
  size_t cap = 16;
  while (cap < merge_strings_.size() * 2) cap <<= 1;
  merges_.assign(cap, MergeSlot{});
  merge_mask_ = cap - 1;
  n_merges_ = merge_strings_.size();
  for (size_t i = 0; i < merge_strings_.size(); ++i) {
    const auto& [a, b] = merge_strings_[i];
    auto ia = token_to_id_.find(a), ib = token_to_id_.find(b), ic = token_to_id_.find(a + b);
    MOE_CHECK(ia != token_to_id_.end() && ib != token_to_id_.end() && ic != token_to_id_.end(),
              "model.merges[%zu] = ('%s', '%s'): token '%s' is not in the vocabulary", i, a.c_str(), b.c_str(),
              (ia == token_to_id_.end() ? a : ib == token_to_id_.end() ? b : a + b).c_str());
    const uint64_t key = (uint64_t(uint32_t(ia->second)) << 32) | uint32_t(ib->second);
    for (uint64_t h = mix(key) & merge_mask_;; h = (h + 1) & merge_mask_) {
      MergeSlot& s = merges_[h];
      if (s.key == key || s.id < 0) {  // a later duplicate overrides (last rank wins)
        s.key = key;
        s.rank = uint32_t(i);
        s.id = ic->second;
        break;
      }
    }
  }
  build_pairs(merge_strings_);
  merge_strings_.clear();
  merge_strings_.shrink_to_fit();
  // Byte symbols, byte fallback, single characters, raw byte strings.
  for (int b = 0; b < 256; ++b) {
    auto it = token_to_id_.find(cp_string(byte_level_char(uint8_t(b))));
    byte_sym_[b] = it == token_to_id_.end() ? -1 : it->second;
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    auto fb = token_to_id_.find(name);
    byte_fallback_id_[b] = fb == token_to_id_.end() ? -1 : fb->second;
  }
  char_id_.clear();
  raw_to_id_.clear();
  for (const auto& [tok, id] : token_to_id_) {
    if (byte_level_) {
      std::string raw;
      bool ok = true;
      for (size_t i = 0; i < tok.size() && ok;) {
        const int b = byte_level_byte(utf8_next(tok, i));
        if (b < 0) ok = false;
        else raw += char(b);
      }
      if (ok) raw_to_id_[raw] = id;
    } else {
      size_t i = 0;
      const uint32_t cp = utf8_next(tok, i);
      if (i == tok.size()) char_id_[cp] = id;
    }
  }
}

void BpeModel::build_pairs(const std::vector<std::pair<std::string, std::string>>& merges) {
  split_ = false;
  byte_pairs_.clear();
  cp_pairs_.clear();
  if (ignore_merges_) return;  // the whole word is looked up first: pieces would change that
  // The argument needs each id to stand for one string: ids and tokens must be a bijection.
  size_t named = 0;
  for (const auto& t : id_to_token_) named += !t.empty();
  if (named != token_to_id_.size()) return;
  for (const auto& [tok, id] : token_to_id_)
    if (id_to_token_[size_t(id)] != tok) return;
  if (byte_level_) {
    byte_pairs_.assign(1024, 0);
    std::string raw;
    for (const auto& [a, b] : merges) {
      raw.clear();
      const std::string ab = a + b;
      for (size_t i = 0; i < ab.size();) {
        const int byte = byte_level_byte(utf8_next(ab, i));
        if (byte < 0) return;  // not made of byte characters: do not reason about it
        raw += char(byte);
      }
      for (size_t i = 1; i < raw.size(); ++i) {
        const uint32_t k = uint32_t(uint8_t(raw[i - 1])) << 8 | uint8_t(raw[i]);
        byte_pairs_[k >> 6] |= uint64_t(1) << (k & 63);
      }
    }
  } else {
    std::vector<uint64_t> keys;
    for (const auto& [a, b] : merges) {
      const std::string ab = a + b;
      uint32_t prev = 0;
      for (size_t i = 0; i < ab.size();) {
        const size_t at = i;
        const uint32_t cp = utf8_next(ab, i);
        if (at > 0) keys.push_back((uint64_t(prev) << 21 | cp) + 1);
        prev = cp;
      }
    }
    std::sort(keys.begin(), keys.end());
    keys.erase(std::unique(keys.begin(), keys.end()), keys.end());
    size_t cap = 16;
    while (cap < keys.size() * 2) cap <<= 1;
    cp_pairs_.assign(cap, 0);
    cp_pairs_mask_ = cap - 1;
    for (uint64_t k : keys)
      for (uint64_t h = mix(k) & cp_pairs_mask_;; h = (h + 1) & cp_pairs_mask_)
        if (cp_pairs_[h] == 0) {
          cp_pairs_[h] = k;
          break;
        }
  }
  split_ = true;
}

bool BpeModel::crossable(uint32_t a, uint32_t b) const {
  if (byte_level_) {
    const uint32_t k = a << 8 | b;
    return (byte_pairs_[k >> 6] >> (k & 63)) & 1;
  }
  const uint64_t k = (uint64_t(a) << 21 | b) + 1;
  for (uint64_t h = mix(k) & cp_pairs_mask_;; h = (h + 1) & cp_pairs_mask_) {
    if (cp_pairs_[h] == k) return true;
    if (cp_pairs_[h] == 0) return false;
  }
}

const BpeModel::MergeSlot* BpeModel::find_merge(int32_t a, int32_t b) const {
  const uint64_t key = (uint64_t(uint32_t(a)) << 32) | uint32_t(b);
  for (uint64_t h = mix(key) & merge_mask_;; h = (h + 1) & merge_mask_) {
    const MergeSlot& s = merges_[h];
    if (s.key == key) return &s;
    if (s.id < 0) return nullptr;
  }
}

void BpeModel::encode_uncached(std::string_view word, std::vector<int32_t>* out, bool split) const {
  if (ignore_merges_) {
    if (byte_level_) {
      auto it = raw_to_id_.find(word);
      if (it != raw_to_id_.end()) {
        out->push_back(it->second);
        return;
      }
    } else {
      auto it = token_to_id_.find(std::string(word));
      if (it != token_to_id_.end()) {
        out->push_back(it->second);
        return;
      }
    }
  }
  if (split && split_ && word.size() > 1) {
    size_t start = 0;
    if (byte_level_) {
      for (size_t i = 1; i < word.size(); ++i)
        if (!crossable(uint8_t(word[i - 1]), uint8_t(word[i]))) {
          encode_cached(word.substr(start, i - start), out, false);
          start = i;
        }
    } else {
      size_t i = 0;
      uint32_t prev = utf8_next(word, i);
      while (i < word.size()) {
        const size_t at = i;
        const uint32_t cp = utf8_next(word, i);
        if (!crossable(prev, cp)) {
          encode_cached(word.substr(start, at - start), out, false);
          start = at;
        }
        prev = cp;
      }
    }
    if (start > 0) {
      encode_cached(word.substr(start), out, false);
      return;
    }
  }
  bpe(word, out);
}

void BpeModel::encode_word(std::string_view word, std::vector<int32_t>* out) const { encode_cached(word, out, true); }

void BpeModel::encode_cached(std::string_view word, std::vector<int32_t>* out, bool split) const {
  if (word.empty()) return;
  if (word.size() >= kCacheMaxWord) {
    encode_uncached(word, out, split);
    return;
  }
  const uint64_t h = word_hash(word);
  const bool tls_key = word.size() <= WordSlot::kMaxKey;
  WordSlot* set = nullptr;
  if (tls_key) {
    set = tls_set(h);
    const uint32_t tag = uint32_t(h >> 32);
    for (int w = 0; w < 2; ++w) {
      const WordSlot& sl = set[w];
      if (sl.owner == uid_ && sl.tag == tag && sl.len == word.size() &&
          std::memcmp(sl.key, word.data(), word.size()) == 0) {
        out->insert(out->end(), sl.ids, sl.ids + sl.n);
        return;
      }
    }
  }
  Shard& sh = cache_[(h >> 20) % kShards];
  {
    std::lock_guard<std::mutex> lock(sh.mu);
    auto it = sh.map.find(word);
    if (it != sh.map.end()) {
      out->insert(out->end(), it->second.begin(), it->second.end());
      return;
    }
  }
  const size_t before = out->size();
  encode_uncached(word, out, split);
  const size_t n = out->size() - before;
  if (tls_key && n <= WordSlot::kMaxIds) {
    set[1] = set[0];
    WordSlot& sl = set[0];
    sl.owner = uid_;
    sl.tag = uint32_t(h >> 32);
    sl.len = uint8_t(word.size());
    sl.n = uint8_t(n);
    std::memcpy(sl.key, word.data(), word.size());
    std::copy(out->begin() + long(before), out->end(), sl.ids);
    return;
  }
  std::lock_guard<std::mutex> lock(sh.mu);
  if (sh.map.size() >= kCacheMaxEntries / kShards) sh.map.clear();
  sh.map.emplace(std::string(word), std::vector<int32_t>(out->begin() + long(before), out->end()));
}

void BpeModel::bpe(std::string_view word, std::vector<int32_t>* out) const {
  struct Sym {
    int32_t id;
    int32_t prev, next;
    uint32_t begin, end;  // byte range in word
  };
  thread_local std::vector<Sym> syms;
  syms.clear();
  if (byte_level_) {
    for (size_t i = 0; i < word.size(); ++i)
      syms.push_back(Sym{byte_sym_[uint8_t(word[i])], int32_t(i) - 1, int32_t(i) + 1, uint32_t(i), uint32_t(i + 1)});
  } else {
    for (size_t i = 0; i < word.size();) {
      const size_t b = i;
      const uint32_t cp = utf8_next(word, i);
      auto it = char_id_.find(cp);
      const int32_t n = int32_t(syms.size());
      syms.push_back(Sym{it == char_id_.end() ? -1 : it->second, n - 1, n + 1, uint32_t(b), uint32_t(i)});
    }
  }
  syms.back().next = -1;
  if (syms.size() > 1 && n_merges_ > 0) {
    struct Cand {
      uint32_t rank;
      int32_t left;
      int32_t left_id, right_id, merged;
      bool operator>(const Cand& o) const { return rank != o.rank ? rank > o.rank : left > o.left; }
    };
    thread_local std::vector<Cand> heap;
    heap.clear();
    const auto cmp = std::greater<Cand>();
    auto push = [&](int32_t l) {
      const int32_t r = syms[size_t(l)].next;
      if (r < 0 || syms[size_t(l)].id < 0 || syms[size_t(r)].id < 0) return;
      if (const MergeSlot* m = find_merge(syms[size_t(l)].id, syms[size_t(r)].id)) {
        heap.push_back(Cand{m->rank, l, syms[size_t(l)].id, syms[size_t(r)].id, m->id});
        std::push_heap(heap.begin(), heap.end(), cmp);
      }
    };
    for (int32_t i = 0; i + 1 < int32_t(syms.size()); ++i) push(i);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), cmp);
      const Cand c = heap.back();
      heap.pop_back();
      Sym& l = syms[size_t(c.left)];
      if (l.id != c.left_id || l.next < 0) continue;  // l merged away (id -2) or changed
      Sym& r = syms[size_t(l.next)];
      if (r.id != c.right_id) continue;
      l.id = c.merged;  // the merge of (left_id, right_id), looked up when pushed
      l.end = r.end;
      l.next = r.next;
      if (r.next >= 0) syms[size_t(r.next)].prev = c.left;
      r.id = -2;
      if (l.prev >= 0) push(l.prev);
      push(c.left);
    }
  }
  for (int32_t i = 0; i >= 0; i = syms[size_t(i)].next) {
    const Sym& s = syms[size_t(i)];
    if (s.id >= 0) {
      out->push_back(s.id);
      continue;
    }
    // Not in the vocabulary (only single characters can be): byte fallback, else unk, else drop.
    bool all = byte_fallback_;
    for (uint32_t k = s.begin; k < s.end && all; ++k) all = byte_fallback_id_[uint8_t(word[k])] >= 0;
    if (all) {
      for (uint32_t k = s.begin; k < s.end; ++k) out->push_back(byte_fallback_id_[uint8_t(word[k])]);
    } else if (unk_id_ >= 0) {
      out->push_back(unk_id_);
    }
  }
}

}  // namespace moe
