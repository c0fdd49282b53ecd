// tokenizer.cpp — see tokenizer.h. The pipeline of the reference, step by step:
//   added-token split (unnormalized tokens) -> normalizer -> added-token split (normalized
//   tokens) -> pre-tokenizer -> BPE model (+ fuse_unk) -> post-processor.
// A SentencePiece model (Impl::spm) replaces all of it but the added-token split.
#include "tokenizer/tokenizer.h"

#include <algorithm>
#include <cstdlib>
#include <deque>
#include <map>

#include "core/error.h"
#include "core/file_util.h"
#include "core/json_util.h"
#include "tokenizer/gguf_vocab.h"
#include "tokenizer/bpe.h"
#include "tokenizer/regex.h"
#include "tokenizer/spm_model.h"
#include "tokenizer/unicode.h"

namespace moe {
namespace {

using json = nlohmann::json;

// JavaScript's String.prototype.trim white space (the reference uses trimStart/trimEnd for
// lstrip/rstrip): WhiteSpace + LineTerminator.
bool js_is_space(uint32_t cp) {
  return (cp >= 9 && cp <= 13) || cp == 0x20 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
         cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000 || cp == 0xFEFF;
}

std::string_view js_trim_end(std::string_view s) {
  size_t end = s.size();
  size_t i = 0, last_non_space_end = 0;
  while (i < end) {
    const uint32_t cp = utf8_next(s, i);
    if (!js_is_space(cp)) last_non_space_end = i;
  }
  return s.substr(0, last_non_space_end);
}

std::string_view js_trim_start(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    size_t j = i;
    if (!js_is_space(utf8_next(s, j))) break;
    i = j;
  }
  return s.substr(i);
}

std::string type_of(const json& j, const std::string& what, const std::string& origin) {
  MOE_CHECK(j.is_object(), "%s: %s must be an object, got %s", origin.c_str(), what.c_str(), j.type_name());
  MOE_CHECK(j.contains("type") && j["type"].is_string(), "%s: %s has no \"type\"", origin.c_str(), what.c_str());
  return j["type"].get<std::string>();
}

// Hash maps keyed by std::string that are searched with a std::string_view (no allocation).
struct StrHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};
template <class V>
using StrMap = std::unordered_map<std::string, V, StrHash, std::equal_to<>>;

// A Regex or String pattern of tokenizer.json ({"Regex": ".."} or {"String": ".."}).
struct Pattern {
  std::string literal;
  std::unique_ptr<Regex> regex;

  static Pattern parse(const json& j, const std::string& what, const std::string& origin) {
    Pattern p;
    MOE_CHECK(j.is_object(), "%s: %s.pattern must be an object", origin.c_str(), what.c_str());
    if (j.contains("String") && j["String"].is_string()) {
      p.literal = j["String"].get<std::string>();
    } else if (j.contains("Regex") && j["Regex"].is_string()) {
      try {
        p.regex = std::make_unique<Regex>(j["Regex"].get<std::string>());
      } catch (const Error& e) {
        MOE_FAIL("%s: %s: %s", origin.c_str(), what.c_str(), e.what());
      }
    } else {
      MOE_FAIL("%s: %s.pattern must have a \"String\" or \"Regex\"", origin.c_str(), what.c_str());
    }
    return p;
  }

  // All non-empty matches as byte ranges of s (leftmost-first, scanning on after each).
  void matches(std::string_view s, std::vector<std::pair<size_t, size_t>>* out) const {
    out->clear();
    if (!regex) {
      if (literal.empty()) return;
      for (size_t at = s.find(literal); at != std::string_view::npos; at = s.find(literal, at + literal.size()))
        out->emplace_back(at, at + literal.size());
      return;
    }
    thread_local std::vector<uint32_t> cps;
    thread_local std::vector<size_t> offs;
    // Code points and their byte offsets (offs[k] of cps[k]; offs[n] = s.size()).
    cps.resize(s.size());
    offs.resize(s.size() + 1);
    size_t n = 0;
    for (size_t i = 0; i < s.size(); ++n) {
      offs[n] = i;
      const unsigned char c = static_cast<unsigned char>(s[i]);
      if (c < 0x80) {
        cps[n] = c;
        ++i;
      } else {
        cps[n] = utf8_next(s, i);
      }
    }
    offs[n] = s.size();
    cps.resize(n);
    size_t from = 0, b, e;
    uint64_t budget = Regex::budget_for(cps.size());  // for the whole text, not per match
    while (from <= cps.size() && regex->find(cps.data(), cps.size(), from, &b, &e, &budget)) {
      if (e > b) out->emplace_back(offs[b], offs[e]);
      from = e > b ? e : b + 1;
    }
  }

  std::string replace_all(std::string_view s, const std::string& content) const {
    std::vector<std::pair<size_t, size_t>> ms;
    matches(s, &ms);
    if (ms.empty()) return std::string(s);
    std::string r;
    size_t prev = 0;
    for (auto [b, e] : ms) {
      r.append(s.substr(prev, b - prev));
      r += content;
      prev = e;
    }
    r.append(s.substr(prev));
    return r;
  }
};

struct NormStep {
  enum Kind { kNfc, kPrepend, kReplace } kind;
  std::string text;  // Prepend: prefix; Replace: content
  Pattern pattern;
};

struct PreStep {
  enum Kind { kSplit, kByteLevel } kind;
  Pattern pattern;
  enum Behavior { kIsolated, kRemoved, kMergedWithPrevious, kMergedWithNext, kContiguous } behavior = kIsolated;
  bool add_prefix_space = false, use_regex = false;
};

struct DecStep {
  enum Kind { kByteLevel, kReplace, kByteFallback, kFuse, kStrip } kind;
  static DecStep of(Kind k) {
    DecStep d;
    d.kind = k;
    return d;
  }
  Pattern pattern;
  std::string content;  // Replace: content; Strip: the character
  int start = 0, stop = 0;
};

struct AddedToken {
  std::string content;
  int32_t id;
  bool single_word, lstrip, rstrip, normalized, special;
};

// A byte trie of added-token contents; split() is the reference's DictionarySplitter: at each
// position the longest token starting there, else advance.
class TokenTrie {
 public:
  TokenTrie() : nodes_(1) {}
  void add(const std::string& word) {
    if (word.empty()) return;
    int n = 0;
    for (unsigned char c : word) {
      auto& kids = nodes_[size_t(n)].kids;
      auto it = std::find_if(kids.begin(), kids.end(), [&](auto& k) { return k.first == c; });
      if (it == kids.end()) {
        kids.emplace_back(c, int(nodes_.size()));
        n = int(nodes_.size());
        nodes_.emplace_back();
      } else {
        n = it->second;
      }
    }
    nodes_[size_t(n)].end = int(word.size());
    first_[(unsigned char)word[0]] = true;
    empty_ = false;
  }
  // Pieces of text (views of it): (piece, is_match).
  void split(std::string_view text, std::vector<std::pair<std::string_view, bool>>* out) const {
    out->clear();
    if (empty_) {
      out->emplace_back(text, false);
      return;
    }
    size_t start = 0, i = 0;
    while (i < text.size()) {
      int match = 0;
      if (first_[(unsigned char)text[i]]) {
        int n = 0;
        for (size_t j = i; j < text.size(); ++j) {
          const auto& kids = nodes_[size_t(n)].kids;
          auto it = std::find_if(kids.begin(), kids.end(), [&](auto& k) { return k.first == (unsigned char)text[j]; });
          if (it == kids.end()) break;
          n = it->second;
          if (nodes_[size_t(n)].end) match = nodes_[size_t(n)].end;
        }
      }
      if (match) {
        if (i > start) out->emplace_back(text.substr(start, i - start), false);
        out->emplace_back(text.substr(i, size_t(match)), true);
        i += size_t(match);
        start = i;
      } else {
        ++i;
      }
    }
    if (start < text.size()) out->emplace_back(text.substr(start), false);
  }

 private:
  struct Node {
    std::vector<std::pair<unsigned char, int>> kids;
    int end = 0;
  };
  std::vector<Node> nodes_;
  bool first_[256] = {};
  bool empty_ = true;
};

std::string token_content(const json& j) {
  if (j.is_string()) return j.get<std::string>();
  if (j.is_object() && j.contains("content") && j["content"].is_string()) return j["content"].get<std::string>();
  return "";
}

std::string clean_up_tokenization(std::string s) {
  static const std::pair<const char*, const char*> reps[] = {
      {" .", "."}, {" ?", "?"}, {" !", "!"}, {" ,", ","}, {" ' ", "'"}, {" n't", "n't"},
      {" 'm", "'m"}, {" 's", "'s"}, {" 've", "'ve"}, {" 're", "'re"}};
  for (auto [from, to] : reps) {
    std::string r;
    const std::string f = from;
    size_t prev = 0;
    for (size_t at = s.find(f); at != std::string::npos; at = s.find(f, at + f.size())) {
      r.append(s, prev, at - prev);
      r += to;
      prev = at + f.size();
    }
    r.append(s, prev);
    s = std::move(r);
  }
  return s;
}

}  // namespace

struct Tokenizer::Impl {
  std::string origin;
  json config = json::object();
  std::vector<NormStep> norm;
  bool has_normalizer = false;
  std::vector<PreStep> pre;
  bool has_pre_tokenizer = false;
  BpeModel model;
  std::vector<DecStep> dec;
  bool has_decoder = false;
  // Post-processor "single" template: ids before and after the sequence (-1 marks A).
  std::vector<int32_t> post_prefix, post_suffix;

  std::vector<AddedToken> added;
  StrMap<size_t> added_map;  // content and normalized content -> added index
  std::unordered_map<int32_t, size_t> added_by_id;
  TokenTrie trie_unnormalized, trie_normalized;
  std::vector<std::string> special_tokens;  // special added tokens + additional_special_tokens
  StrMap<bool> special_set;
  bool clean_up_spaces = true;
  int64_t vocab_size = 0;
  // SentencePiece (tokenizer.model): when set, `model` and the pipeline above are unused.
  std::unique_ptr<SpmModel> spm;

  // ---- loading ----
  void load_normalizer(const json& j, const std::string& what) {
    if (j.is_null()) return;
    const std::string t = type_of(j, what, origin);
    if (t == "Sequence") {
      MOE_CHECK(j.contains("normalizers") && j["normalizers"].is_array(), "%s: %s.normalizers must be an array",
                origin.c_str(), what.c_str());
      for (size_t i = 0; i < j["normalizers"].size(); ++i)
        load_normalizer(j["normalizers"][i], what + ".normalizers[" + std::to_string(i) + "]");
    } else if (t == "NFC") {
      norm.push_back(NormStep{NormStep::kNfc, "", {}});
    } else if (t == "Prepend") {
      MOE_CHECK(j.contains("prepend") && j["prepend"].is_string(), "%s: %s.prepend must be a string", origin.c_str(),
                what.c_str());
      norm.push_back(NormStep{NormStep::kPrepend, j["prepend"].get<std::string>(), {}});
    } else if (t == "Replace") {
      MOE_CHECK(j.contains("content") && j["content"].is_string(), "%s: %s.content must be a string", origin.c_str(),
                what.c_str());
      MOE_CHECK(j.contains("pattern"), "%s: %s has no pattern", origin.c_str(), what.c_str());
      norm.push_back(NormStep{NormStep::kReplace, j["content"].get<std::string>(), Pattern::parse(j["pattern"], what, origin)});
    } else {
      MOE_FAIL("%s: %s: normalizer type '%s' is not supported (supported: NFC, Prepend, Replace, Sequence)",
               origin.c_str(), what.c_str(), t.c_str());
    }
  }

  void load_pre_tokenizer(const json& j, const std::string& what) {
    if (j.is_null()) return;
    const std::string t = type_of(j, what, origin);
    if (t == "Sequence") {
      MOE_CHECK(j.contains("pretokenizers") && j["pretokenizers"].is_array(), "%s: %s.pretokenizers must be an array",
                origin.c_str(), what.c_str());
      for (size_t i = 0; i < j["pretokenizers"].size(); ++i)
        load_pre_tokenizer(j["pretokenizers"][i], what + ".pretokenizers[" + std::to_string(i) + "]");
    } else if (t == "Split") {
      MOE_CHECK(j.contains("pattern"), "%s: %s has no pattern", origin.c_str(), what.c_str());
      PreStep s{PreStep::kSplit, Pattern::parse(j["pattern"], what, origin)};
      const std::string b = j.value("behavior", std::string("Isolated"));
      if (b == "Isolated") s.behavior = PreStep::kIsolated;
      else if (b == "Removed") s.behavior = PreStep::kRemoved;
      else if (b == "MergedWithPrevious") s.behavior = PreStep::kMergedWithPrevious;
      else if (b == "MergedWithNext") s.behavior = PreStep::kMergedWithNext;
      else if (b == "Contiguous") s.behavior = PreStep::kContiguous;
      else MOE_FAIL("%s: %s.behavior '%s' is not supported", origin.c_str(), what.c_str(), b.c_str());
      MOE_CHECK(!j.value("invert", false), "%s: %s.invert = true is not supported", origin.c_str(), what.c_str());
      for (auto& p : pre)
        MOE_CHECK(p.kind != PreStep::kByteLevel, "%s: %s: a Split after a ByteLevel pre-tokenizer is not supported",
                  origin.c_str(), what.c_str());
      pre.push_back(std::move(s));
    } else if (t == "ByteLevel") {
      PreStep s{PreStep::kByteLevel, {}};
      s.add_prefix_space = j.value("add_prefix_space", false);
      s.use_regex = j.value("use_regex", true);
      if (s.use_regex) {
        // The GPT-2 pattern as the reference runs it (a JavaScript literal: \s is JS white space).
        const std::string ws = "\\t\\n\\v\\f\\r \\xA0\\u1680\\u2000-\\u200A\\u2028\\u2029\\u202F\\u205F\\u3000\\uFEFF";
        s.pattern.regex = std::make_unique<Regex>("'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^" + ws +
                                                  "\\p{L}\\p{N}]+|[" + ws + "]+(?![^" + ws + "])|[" + ws + "]+");
      }
      pre.push_back(std::move(s));
    } else {
      MOE_FAIL("%s: %s: pre_tokenizer type '%s' is not supported (supported: Split, ByteLevel, Sequence)",
               origin.c_str(), what.c_str(), t.c_str());
    }
  }

  void load_decoder(const json& j, const std::string& what) {
    if (j.is_null()) return;
    const std::string t = type_of(j, what, origin);
    if (t == "Sequence") {
      MOE_CHECK(j.contains("decoders") && j["decoders"].is_array(), "%s: %s.decoders must be an array", origin.c_str(),
                what.c_str());
      for (size_t i = 0; i < j["decoders"].size(); ++i)
        load_decoder(j["decoders"][i], what + ".decoders[" + std::to_string(i) + "]");
    } else if (t == "ByteLevel") {
      dec.push_back(DecStep::of(DecStep::kByteLevel));
    } else if (t == "Replace") {
      MOE_CHECK(j.contains("pattern"), "%s: %s has no pattern", origin.c_str(), what.c_str());
      DecStep s = DecStep::of(DecStep::kReplace);
      s.pattern = Pattern::parse(j["pattern"], what, origin);
      s.content = j.value("content", std::string());
      dec.push_back(std::move(s));
    } else if (t == "ByteFallback") {
      dec.push_back(DecStep::of(DecStep::kByteFallback));
    } else if (t == "Fuse") {
      dec.push_back(DecStep::of(DecStep::kFuse));
    } else if (t == "Strip") {
      DecStep s = DecStep::of(DecStep::kStrip);
      s.content = j.value("content", std::string(" "));
      auto count = [&](const char* k) {
        if (!j.contains(k)) return 0;
        const json& v = j[k];
        MOE_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() <= 1024,
                  "%s: %s.%s must be an integer in [0, 1024]", origin.c_str(), what.c_str(), k);
        return int(v.get<int64_t>());
      };
      s.start = count("start");
      s.stop = count("stop");
      dec.push_back(std::move(s));
    } else {
      MOE_FAIL("%s: %s: decoder type '%s' is not supported (supported: ByteLevel, Replace, ByteFallback, Fuse, "
               "Strip, Sequence)", origin.c_str(), what.c_str(), t.c_str());
    }
  }

  int32_t lookup(const std::string& token) const {
    auto a = added_map.find(token);
    if (a != added_map.end()) return added[a->second].id;
    if (spm) return spm->find(token);
    auto it = model.token_to_id().find(token);
    return it == model.token_to_id().end() ? -1 : it->second;
  }

  void load_post_processor(const json& j, const std::string& what) {
    if (j.is_null()) return;
    const std::string t = type_of(j, what, origin);
    if (t == "Sequence") {
      MOE_CHECK(j.contains("processors") && j["processors"].is_array(), "%s: %s.processors must be an array",
                origin.c_str(), what.c_str());
      for (size_t i = 0; i < j["processors"].size(); ++i)
        load_post_processor(j["processors"][i], what + ".processors[" + std::to_string(i) + "]");
    } else if (t == "ByteLevel") {
    } else if (t == "TemplateProcessing") {
      MOE_CHECK(j.contains("single") && j["single"].is_array(), "%s: %s.single must be an array", origin.c_str(),
                what.c_str());
      bool seen_a = false;
      for (const json& item : j["single"]) {
        if (item.contains("SpecialToken")) {
          const json& st = item["SpecialToken"];
          MOE_CHECK(st.contains("id") && st["id"].is_string(), "%s: %s: SpecialToken without an id", origin.c_str(),
                    what.c_str());
          const std::string name = st["id"].get<std::string>();
          int32_t id = lookup(name);
          if (id < 0 && j.contains("special_tokens") && j["special_tokens"].contains(name)) {
            const json& ids = j["special_tokens"][name]["ids"];
            int32_t v = -1;
            if (ids.is_array() && ids.size() == 1 && json_token_id(ids[0], &v)) id = v;
          }
          MOE_CHECK(id >= 0, "%s: %s: special token '%s' is not in the vocabulary", origin.c_str(), what.c_str(),
                    name.c_str());
          (seen_a ? post_suffix : post_prefix).push_back(id);
        } else if (item.contains("Sequence")) {
          seen_a = true;
        } else {
          MOE_FAIL("%s: %s.single: unknown item %s", origin.c_str(), what.c_str(), json_brief(item).c_str());
        }
      }
    } else {
      MOE_FAIL("%s: %s: post_processor type '%s' is not supported (supported: TemplateProcessing, ByteLevel, "
               "Sequence)", origin.c_str(), what.c_str(), t.c_str());
    }
  }

  std::string normalize(std::string s) const {
    for (const NormStep& n : norm) {
      switch (n.kind) {
        case NormStep::kNfc:
          if (!nfc_quick_check(s)) s = nfc(s);
          break;
        case NormStep::kPrepend: s = n.text + s; break;
        case NormStep::kReplace: s = n.pattern.replace_all(s, n.text); break;
      }
    }
    return s;
  }

  // Pre-tokenizes one section into words (raw text; the BPE model maps bytes when byte-level).
  // Words are views of `text` or of strings kept in *store.
  void pre_tokenize(std::string_view text, std::vector<std::string_view>* words, std::deque<std::string>* store) const {
    words->clear();
    words->push_back(text);
    thread_local std::vector<std::string_view> next;
    thread_local std::vector<std::pair<size_t, size_t>> ms;
    for (const PreStep& p : pre) {
      next.clear();
      for (const std::string_view w : *words) {
        if (p.kind == PreStep::kByteLevel) {
          std::string_view t = w;
          if (p.add_prefix_space && (w.empty() || w[0] != ' ')) {
            std::string& sp = store->emplace_back(1, ' ');
            sp.append(w);
            t = store->back();
          }
          if (!p.use_regex) {
            next.push_back(t);
            continue;
          }
          p.pattern.matches(t, &ms);  // matches only, as the reference does
          for (auto [b, e] : ms) next.push_back(t.substr(b, e - b));
          continue;
        }
        p.pattern.matches(w, &ms);
        size_t prev = 0;
        auto emit = [&](std::string_view s) {
          if (!s.empty()) next.push_back(s);
        };
        switch (p.behavior) {
          case PreStep::kIsolated:
            for (auto [b, e] : ms) {
              if (b > prev) emit(w.substr(prev, b - prev));
              emit(w.substr(b, e - b));
              prev = e;
            }
            emit(w.substr(prev));
            break;
          case PreStep::kRemoved:
            for (auto [b, e] : ms) {
              emit(w.substr(prev, b - prev));
              prev = e;
            }
            emit(w.substr(prev));
            break;
          case PreStep::kMergedWithPrevious:
            for (auto [b, e] : ms) {
              emit(w.substr(prev, e - prev));
              prev = e;
            }
            emit(w.substr(prev));
            break;
          case PreStep::kMergedWithNext:
            for (auto [b, e] : ms) {
              if (b > prev) emit(w.substr(prev, b - prev));
              prev = b;
            }
            emit(w.substr(prev));
            break;
          case PreStep::kContiguous: {
            size_t run_b = 0, run_e = 0;
            bool in_run = false;
            for (auto [b, e] : ms) {
              if (in_run && b == run_e) {
                run_e = e;
                continue;
              }
              if (in_run) emit(w.substr(run_b, run_e - run_b));
              if (b > (in_run ? run_e : prev)) emit(w.substr(in_run ? run_e : prev, b - (in_run ? run_e : prev)));
              run_b = b, run_e = e, in_run = true;
            }
            if (in_run) {
              emit(w.substr(run_b, run_e - run_b));
              prev = run_e;
            }
            emit(w.substr(prev));
            break;
          }
        }
      }
      words->swap(next);
    }
  }

  // Runs the model on one section's words, then fuse_unk over its output.
  void model_section(std::string_view text, std::vector<int32_t>* out) const {
    thread_local std::vector<std::string_view> words;
    thread_local std::deque<std::string> store;
    const size_t before = out->size();
    if (pre.empty()) {
      model.encode_word(text, out);
    } else {
      store.clear();
      pre_tokenize(text, &words, &store);
      for (const std::string_view w : words) model.encode_word(w, out);
    }
    if (model.fuse_unk() && model.unk_id() >= 0) {
      const int32_t unk = model.unk_id();
      size_t w = before;
      for (size_t r = before; r < out->size(); ++r)
        if (!((*out)[r] == unk && w > before && (*out)[w - 1] == unk)) (*out)[w++] = (*out)[r];
      out->resize(w);
    }
  }

  // lstrip/rstrip of added tokens trim the neighbouring sections (JavaScript trim semantics).
  void strip_neighbours(std::vector<std::pair<std::string_view, bool>>& sections) const {
    for (size_t i = 0; i < sections.size(); ++i) {
      auto it = added_map.find(sections[i].first);
      if (it == added_map.end()) continue;
      const AddedToken& t = added[it->second];
      if (t.lstrip && i > 0) sections[i - 1].first = js_trim_end(sections[i - 1].first);
      if (t.rstrip && i + 1 < sections.size()) sections[i + 1].first = js_trim_start(sections[i + 1].first);
    }
  }

  void encode_text(std::string_view text, std::vector<int32_t>* out) const {
    std::vector<std::pair<std::string_view, bool>> sections, subs;
    trie_unnormalized.split(text, &sections);
    strip_neighbours(sections);
    if (spm) {
      for (auto& [section, matched] : sections) {
        if (section.empty()) continue;
        auto it = added_map.find(section);
        if (it != added_map.end()) out->push_back(added[it->second].id);
        else spm->encode(section, out);
      }
      return;
    }
    for (auto& [section, matched] : sections) {
      if (section.empty()) continue;
      auto it = added_map.find(section);
      if (it != added_map.end()) {
        out->push_back(added[it->second].id);
        continue;
      }
      std::string normalized_buf;
      std::string_view normalized = section;
      if (!norm.empty()) {
        normalized_buf = normalize(std::string(section));
        normalized = normalized_buf;
      }
      if (normalized.empty()) continue;
      trie_normalized.split(normalized, &subs);
      strip_neighbours(subs);
      for (auto& [sub, m2] : subs) {
        if (sub.empty()) continue;
        auto it2 = added_map.find(sub);
        if (it2 != added_map.end()) {
          out->push_back(added[it2->second].id);
          continue;
        }
        model_section(sub, out);
      }
    }
  }

  // ---- decoding ----
  std::vector<std::string> decode_chain(std::vector<std::string> tokens) const {
    for (const DecStep& d : dec) {
      switch (d.kind) {
        case DecStep::kByteLevel: {
          std::vector<std::string> outv;
          std::string bytes;
          auto flush = [&] {
            if (!bytes.empty()) outv.push_back(utf8_sanitize(bytes));
            bytes.clear();
          };
          for (auto& t : tokens) {
            if (added_map.count(t) && is_added_content(t)) {
              flush();
              outv.push_back(t);
              continue;
            }
            for (size_t i = 0; i < t.size();) {
              const int b = byte_level_byte(utf8_next(t, i));
              bytes += char(b < 0 ? 0 : b);
            }
          }
          flush();
          tokens.swap(outv);
          break;
        }
        case DecStep::kReplace:
          for (auto& t : tokens) t = d.pattern.replace_all(t, d.content);
          break;
        case DecStep::kByteFallback: {
          std::vector<std::string> outv;
          std::string bytes;
          for (auto& t : tokens) {
            int byte = -1;
            if (t.size() == 6 && t.compare(0, 3, "<0x") == 0 && t[5] == '>') {
              // parseInt(hex, 16) of the two characters, as the reference does.
              int v = 0, nd = 0;
              for (int k = 3; k < 5; ++k) {
                const char c = t[size_t(k)];
                const int dg = c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : c >= 'A' && c <= 'F' ? c - 'A' + 10 : -1;
                if (dg < 0) break;
                v = v * 16 + dg;
                ++nd;
              }
              if (nd > 0) byte = v;
            }
            if (byte >= 0) {
              bytes += char(byte);
            } else {
              if (!bytes.empty()) outv.push_back(utf8_sanitize(bytes));
              bytes.clear();
              outv.push_back(t);
            }
          }
          if (!bytes.empty()) outv.push_back(utf8_sanitize(bytes));
          tokens.swap(outv);
          break;
        }
        case DecStep::kFuse: {
          std::string all;
          for (auto& t : tokens) all += t;
          tokens.assign(1, all);
          break;
        }
        case DecStep::kStrip:
          for (auto& t : tokens) {
            size_t b = 0, e = t.size();
            for (int k = 0; k < d.start && t.compare(b, d.content.size(), d.content) == 0 && !d.content.empty(); ++k)
              b += d.content.size();
            for (int k = 0; k < d.stop && e >= b + d.content.size() && !d.content.empty() &&
                            t.compare(e - d.content.size(), d.content.size(), d.content) == 0;
                 ++k)
              e -= d.content.size();
            t = t.substr(b, e - b);
          }
          break;
      }
    }
    return tokens;
  }
  std::string decode_spm(const std::vector<int32_t>& ids, bool skip_special) const {
    std::string text;
    std::vector<int32_t> run;
    auto flush = [&] {
      if (!run.empty()) text += spm->decode(run);
      run.clear();
    };
    for (int32_t id : ids) {
      MOE_CHECK(id >= 0 && id < vocab_size && (id < spm->size() || added_by_id.count(id)),
                "decode: token id %d is not in the vocabulary (size %lld)", id, (long long)vocab_size);
      const bool unknown = id < spm->size() && spm->is_unknown(id);
      auto a = added_by_id.find(id);
      if (a != added_by_id.end() && !unknown) {
        flush();
        if (!(skip_special && added[a->second].special)) text += added[a->second].content;
        continue;
      }
      if (unknown && skip_special) continue;
      run.push_back(id);
    }
    flush();
    if (clean_up_spaces) text = clean_up_tokenization(std::move(text));
    return text;
  }

  bool is_added_content(const std::string& t) const {
    auto it = added_map.find(t);
    return it != added_map.end() && added[it->second].content == t;
  }
};

Tokenizer::Tokenizer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;
Tokenizer::~Tokenizer() = default;

Tokenizer Tokenizer::from_dir(const std::string& dir) {
  if (is_gguf_path(dir)) return tokenizer_from_gguf_vocab(load_gguf_vocab(dir), dir);
  const std::string tpath = dir + "/tokenizer.json", cpath = dir + "/tokenizer_config.json",
                    mpath = dir + "/tokenizer.model";
  json cfg = json::object();
  if (is_regular_file(cpath)) cfg = parse_json(read_file(cpath), cpath);
  if (!is_regular_file(tpath) && is_regular_file(mpath)) return from_sentencepiece(mpath, cfg);
  MOE_CHECK(is_regular_file(tpath), "%s: cannot open %s (and there is no %s either)", dir.c_str(), tpath.c_str(),
            mpath.c_str());
  const json tok = parse_json(read_file(tpath, kMaxTokenizerFileBytes), tpath);
  return from_json(tok, cfg, tpath);
}

Tokenizer Tokenizer::from_sentencepiece(const std::string& model_path, const json& cfg) {
  return from_sentencepiece_bytes(read_file(model_path, kMaxTokenizerFileBytes), cfg, model_path);
}

Tokenizer Tokenizer::from_sentencepiece_bytes(std::string_view bytes, const json& cfg, const std::string& model_path) {
  auto impl = std::make_unique<Impl>();
  Impl& t = *impl;
  t.origin = model_path;
  MOE_CHECK(cfg.is_object() || cfg.is_null(), "%s: tokenizer_config must be a JSON object", model_path.c_str());
  if (cfg.is_object()) t.config = cfg;
  t.spm = SpmModel::load_bytes(bytes, model_path);
  const SpmModel& sp = *t.spm;
  const int32_t n = sp.size();
  // Special tokens: the model's control and unknown pieces, then tokenizer_config.json's.
  std::unordered_map<int32_t, size_t> by_id;
  auto add = [&](const std::string& content, int32_t id, bool special, bool lstrip, bool rstrip) {
    if (content.empty()) return;
    auto it = by_id.find(id);
    if (it != by_id.end()) {
      AddedToken& a = t.added[it->second];
      a.special |= special;
      a.lstrip |= lstrip;
      a.rstrip |= rstrip;
      if (a.content == content) return;
    }
    by_id[id] = t.added.size();
    t.added.push_back(AddedToken{content, id, false, lstrip, rstrip, false, special});
  };
  for (int32_t id = 0; id < n; ++id)
    if (sp.is_control(id) || sp.is_unknown(id)) add(sp.piece(id), id, true, false, false);
  try {
    if (t.config.contains("added_tokens_decoder") && t.config["added_tokens_decoder"].is_object()) {
      for (auto& [key, v] : t.config["added_tokens_decoder"].items()) {
        char* end = nullptr;
        const long long id = std::strtoll(key.c_str(), &end, 10);
        MOE_CHECK(!key.empty() && *end == 0 && id >= 0 && id < kMaxTokenId,
                  "%s: tokenizer_config added_tokens_decoder key '%s' is not a token id", model_path.c_str(),
                  key.c_str());
        const std::string c = token_content(v);
        MOE_CHECK(!c.empty(), "%s: tokenizer_config added_tokens_decoder['%s'] has no content", model_path.c_str(),
                  key.c_str());
        const auto& entry = v;  // clang 14 cannot capture structured bindings
        auto flag = [&](const char* k) {
          return entry.is_object() && entry.contains(k) && entry[k].is_boolean() && entry[k].get<bool>();
        };
        add(c, int32_t(id), flag("special"), flag("lstrip"), flag("rstrip"));
      }
    }
    std::vector<std::string> named;
    for (const char* k : {"bos_token", "eos_token", "unk_token", "pad_token"})
      if (t.config.contains(k)) named.push_back(token_content(t.config[k]));
    if (t.config.contains("additional_special_tokens") && t.config["additional_special_tokens"].is_array())
      for (const json& s : t.config["additional_special_tokens"]) named.push_back(token_content(s));
    for (const std::string& c : named) {
      if (c.empty()) continue;
      int32_t id = -1;
      for (auto& a : t.added)
        if (a.content == c) id = a.id;
      if (id < 0) id = sp.find(c);
      if (id >= 0) add(c, id, true, false, false);
    }
  } catch (const json::exception& e) {
    MOE_FAIL("%s: unexpected tokenizer_config structure: %s", model_path.c_str(), e.what());
  }
  t.vocab_size = n;
  for (size_t i = 0; i < t.added.size(); ++i) {
    const AddedToken& a = t.added[i];
    t.added_by_id[a.id] = i;
    t.added_map[a.content] = i;
    t.trie_unnormalized.add(a.content);
    if (a.special) t.special_set[a.content] = true;
    t.vocab_size = std::max(t.vocab_size, int64_t(a.id) + 1);
  }
  // BOS/EOS: add_bos_token (default true, as Llama) and add_eos_token (default false).
  auto flag = [&](const char* k, bool dflt) {
    return t.config.contains(k) && t.config[k].is_boolean() ? t.config[k].get<bool>() : dflt;
  };
  auto special_id = [&](const char* key, int32_t model_id) -> int32_t {
    const std::string c = t.config.contains(key) ? token_content(t.config[key]) : "";
    if (c.empty()) return model_id;
    const int32_t id = t.lookup(c);
    MOE_CHECK(id >= 0, "%s: tokenizer_config %s '%s' is not in the vocabulary", model_path.c_str(), key, c.c_str());
    return id;
  };
  const int32_t bos = special_id("bos_token", sp.bos_id()), eos = special_id("eos_token", sp.eos_id());
  if (flag("add_bos_token", true) && bos >= 0) t.post_prefix.push_back(bos);
  if (flag("add_eos_token", false) && eos >= 0) t.post_suffix.push_back(eos);
  // transformers cleans up tokenization spaces only when asked to; SentencePiece never does.
  t.clean_up_spaces = flag("clean_up_tokenization_spaces", false);
  return Tokenizer(std::move(impl));
}

Tokenizer Tokenizer::from_json(const json& tj, const json& cfg, const std::string& origin) {
  auto impl = std::make_unique<Impl>();
  Impl& t = *impl;
  t.origin = origin;
  MOE_CHECK(tj.is_object(), "%s: expected a JSON object at the top level", origin.c_str());
  MOE_CHECK(cfg.is_object() || cfg.is_null(), "%s: tokenizer_config must be a JSON object", origin.c_str());
  if (cfg.is_object()) t.config = cfg;
  MOE_CHECK(tj.contains("model"), "%s: no \"model\"", origin.c_str());
  const json& m = tj["model"];
  MOE_CHECK(m.is_object(), "%s: \"model\" must be an object", origin.c_str());
  std::string mtype = m.contains("type") && m["type"].is_string() ? m["type"].get<std::string>() : "";
  if (mtype.empty() && m.contains("merges")) mtype = "BPE";
  MOE_CHECK(mtype == "BPE", "%s: model type '%s' is not supported (supported: BPE)", origin.c_str(),
            mtype.empty() ? "(none)" : mtype.c_str());

  try {
    if (tj.contains("normalizer")) {
      t.has_normalizer = !tj["normalizer"].is_null();
      t.load_normalizer(tj["normalizer"], "normalizer");
    }
    if (tj.contains("pre_tokenizer")) {
      t.has_pre_tokenizer = !tj["pre_tokenizer"].is_null();
      t.load_pre_tokenizer(tj["pre_tokenizer"], "pre_tokenizer");
    }
    bool byte_level = false;
    for (auto& p : t.pre) byte_level |= p.kind == PreStep::kByteLevel;
    t.model.load(m, byte_level, origin);

    // Added tokens.
    if (tj.contains("added_tokens") && !tj["added_tokens"].is_null()) {
      const json& at = tj["added_tokens"];
      MOE_CHECK(at.is_array(), "%s: added_tokens must be an array", origin.c_str());
      for (size_t i = 0; i < at.size(); ++i) {
        const json& a = at[i];
        MOE_CHECK(a.is_object() && a.contains("id") && a["id"].is_number_integer() && a.contains("content") &&
                      a["content"].is_string(),
                  "%s: added_tokens[%zu] needs an integer \"id\" and a string \"content\"", origin.c_str(), i);
        AddedToken tok;
        tok.content = a["content"].get<std::string>();
        // Range-checked, never wrapped: an id of 2^32 must not become token 0.
        MOE_CHECK(json_token_id(a["id"], &tok.id), "%s: added_tokens[%zu].id = %s is not a token id in [0, %lld)",
                  origin.c_str(), i, json_brief(a["id"]).c_str(), (long long)kMaxTokenId);
        auto flag = [&](const char* k, bool dflt) { return a.contains(k) && a[k].is_boolean() ? a[k].get<bool>() : dflt; };
        tok.single_word = flag("single_word", false);
        tok.lstrip = flag("lstrip", false);
        tok.rstrip = flag("rstrip", false);
        tok.special = flag("special", false);
        tok.normalized = flag("normalized", !tok.special);
        t.added.push_back(tok);
      }
    }
    for (size_t i = 0; i < t.added.size(); ++i) {
      const AddedToken& a = t.added[i];
      t.model.set_token(a.content, a.id);
      t.added_by_id[a.id] = i;
      if (a.special) t.special_tokens.push_back(a.content);
      t.added_map[a.content] = i;
      if (a.normalized && t.has_normalizer) {
        const std::string nc = t.normalize(a.content);
        t.added_map[nc] = i;
        t.trie_normalized.add(nc);
      } else {
        t.trie_unnormalized.add(a.content);
      }
    }
    t.model.finalize();
    if (t.config.contains("additional_special_tokens") && t.config["additional_special_tokens"].is_array())
      for (const json& s : t.config["additional_special_tokens"]) {
        const std::string c = token_content(s);
        if (!c.empty() && std::find(t.special_tokens.begin(), t.special_tokens.end(), c) == t.special_tokens.end())
          t.special_tokens.push_back(c);
      }
    for (auto& s : t.special_tokens) t.special_set[s] = true;

    if (tj.contains("post_processor")) t.load_post_processor(tj["post_processor"], "post_processor");
    // transformers: add_bos_token / add_eos_token in tokenizer_config.json decide BOS/EOS.
    const bool has_bos_flag = t.config.contains("add_bos_token") && t.config["add_bos_token"].is_boolean();
    const bool has_eos_flag = t.config.contains("add_eos_token") && t.config["add_eos_token"].is_boolean();
    if (has_bos_flag || has_eos_flag) {
      auto special_id = [&](const char* key) -> int32_t {
        const std::string c = t.config.contains(key) ? token_content(t.config[key]) : "";
        if (c.empty()) return -1;
        const int32_t id = t.lookup(c);
        MOE_CHECK(id >= 0, "%s: tokenizer_config %s '%s' is not in the vocabulary", origin.c_str(), key, c.c_str());
        return id;
      };
      if (has_bos_flag) {
        t.post_prefix.clear();
        const int32_t bos = special_id("bos_token");
        if (t.config["add_bos_token"].get<bool>() && bos >= 0) t.post_prefix.push_back(bos);
      }
      if (has_eos_flag) {
        t.post_suffix.clear();
        const int32_t eos = special_id("eos_token");
        if (t.config["add_eos_token"].get<bool>() && eos >= 0) t.post_suffix.push_back(eos);
      }
    }
    if (tj.contains("decoder")) {
      t.has_decoder = !tj["decoder"].is_null();
      t.load_decoder(tj["decoder"], "decoder");
    }
  } catch (const json::exception& e) {
    MOE_FAIL("%s: unexpected JSON structure: %s", origin.c_str(), e.what());
  }
  if (t.config.contains("clean_up_tokenization_spaces") && t.config["clean_up_tokenization_spaces"].is_boolean())
    t.clean_up_spaces = t.config["clean_up_tokenization_spaces"].get<bool>();
  t.vocab_size = int64_t(t.model.id_to_token().size());
  return Tokenizer(std::move(impl));
}

json Tokenizer::byte_level_json(const std::vector<std::string>& specials) {
  json vocab = json::object();
  for (int b = 0; b < 256; ++b) {
    std::string c;
    utf8_append(c, byte_level_char(uint8_t(b)));
    vocab[c] = b;
  }
  json added = json::array();
  for (size_t i = 0; i < specials.size(); ++i) {
    MOE_CHECK(!specials[i].empty(), "byte-level tokenizer: special token %zu is empty", i);
    added.push_back({{"id", 256 + int(i)}, {"content", specials[i]}, {"single_word", false}, {"lstrip", false},
                     {"rstrip", false}, {"normalized", false}, {"special", true}});
  }
  const json bl = {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", false}, {"use_regex", false}};
  return {{"version", "1.0"},
          {"truncation", nullptr},
          {"padding", nullptr},
          {"added_tokens", added},
          {"normalizer", nullptr},
          {"pre_tokenizer", bl},
          {"post_processor", nullptr},
          {"decoder", bl},
          {"model",
           {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
            {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false}, {"ignore_merges", false},
            {"vocab", vocab}, {"merges", json::array()}}}};
}

Tokenizer Tokenizer::byte_level(const std::vector<std::string>& specials) {
  return from_json(byte_level_json(specials), json::object(), "byte-level tokenizer");
}

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  std::string fixed;
  if (!utf8_valid(text)) {
    fixed = utf8_sanitize(text);
    text = fixed;
  }
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = impl_->post_prefix;
  impl_->encode_text(text, &ids);
  if (add_special_tokens) ids.insert(ids.end(), impl_->post_suffix.begin(), impl_->post_suffix.end());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  const Impl& t = *impl_;
  if (t.spm) return t.decode_spm(ids, skip_special_tokens);
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  const auto& vocab = t.model.id_to_token();
  for (int32_t id : ids) {
    MOE_CHECK(id >= 0 && size_t(id) < vocab.size() && (!vocab[size_t(id)].empty() || t.added_by_id.count(id)),
              "decode: token id %d is not in the vocabulary (size %zu)", id, vocab.size());
    const std::string& tok = vocab[size_t(id)];
    if (skip_special_tokens && t.special_set.count(tok)) continue;
    tokens.push_back(tok);
  }
  std::string text;
  if (t.has_decoder) {
    for (auto& s : t.decode_chain(std::move(tokens))) text += s;
  } else {
    for (size_t i = 0; i < tokens.size(); ++i) text += (i ? " " : "") + tokens[i];
  }
  if (t.clean_up_spaces) text = clean_up_tokenization(std::move(text));
  return text;
}

int64_t Tokenizer::vocab_size() const { return impl_->vocab_size; }

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  const int32_t id = impl_->lookup(std::string(token));
  if (id < 0) return std::nullopt;
  return id;
}

std::string Tokenizer::id_to_token(int32_t id) const {
  if (impl_->spm) {
    auto a = impl_->added_by_id.find(id);
    if (a != impl_->added_by_id.end()) return impl_->added[a->second].content;
    return id >= 0 && id < impl_->spm->size() ? impl_->spm->piece(id) : std::string();
  }
  const auto& v = impl_->model.id_to_token();
  return id >= 0 && size_t(id) < v.size() ? v[size_t(id)] : std::string();
}

bool Tokenizer::is_special(int32_t id) const { return impl_->special_set.count(id_to_token(id)) > 0; }

std::optional<int32_t> Tokenizer::bos_id() const {
  if (impl_->spm && !impl_->config.contains("bos_token"))
    return impl_->spm->bos_id() >= 0 ? std::optional<int32_t>(impl_->spm->bos_id()) : std::nullopt;
  if (!impl_->config.contains("bos_token")) return std::nullopt;
  const std::string c = token_content(impl_->config["bos_token"]);
  return c.empty() ? std::nullopt : token_to_id(c);
}

std::optional<int32_t> Tokenizer::eos_id() const {
  if (impl_->spm && !impl_->config.contains("eos_token"))
    return impl_->spm->eos_id() >= 0 ? std::optional<int32_t>(impl_->spm->eos_id()) : std::nullopt;
  if (!impl_->config.contains("eos_token")) return std::nullopt;
  const std::string c = token_content(impl_->config["eos_token"]);
  return c.empty() ? std::nullopt : token_to_id(c);
}

const json& Tokenizer::config() const { return impl_->config; }

// ---- DecodeStream ----

DecodeStream::DecodeStream(const Tokenizer& tok, bool skip_special_tokens)
    : tok_(tok), skip_special_(skip_special_tokens) {}

std::string DecodeStream::step(int32_t id) {
  ids_.push_back(id);
  std::string text = tok_.decode(ids_, skip_special_);
  // Hold back while the text ends in U+FFFD: it may be an incomplete UTF-8 sequence.
  if (text.size() >= 3 && text.compare(text.size() - 3, 3, "\xEF\xBF\xBD") == 0) return "";
  if (text.size() < emitted_.size() || text.compare(0, emitted_.size(), emitted_) != 0) {
    // The decoder rewrote earlier text (not expected for supported decoders): resynchronise.
    emitted_ = text;
    return "";
  }
  std::string out = text.substr(emitted_.size());
  emitted_ = std::move(text);
  // Keep a short window of context so that decoding stays O(1) per token.
  constexpr size_t kWindow = 4;
  if (ids_.size() > 2 * kWindow) {
    ids_.erase(ids_.begin(), ids_.end() - long(kWindow));
    emitted_ = tok_.decode(ids_, skip_special_);
  }
  return out;
}

std::string DecodeStream::flush() {
  if (ids_.empty()) return "";
  std::string text = tok_.decode(ids_, skip_special_);
  std::string out = text.size() >= emitted_.size() && text.compare(0, emitted_.size(), emitted_) == 0
                        ? text.substr(emitted_.size())
                        : std::string();
  ids_.clear();
  emitted_.clear();
  return out;
}

std::string ids_to_json(const std::vector<int32_t>& ids) {
  std::string s = "[";
  for (size_t i = 0; i < ids.size(); ++i) {
    if (i) s += ',';
    s += std::to_string(ids[i]);
  }
  return s + "]";
}

}  // namespace moe
