// gguf_vocab.cpp — see gguf_vocab.h.
#include "tokenizer/gguf_vocab.h"

#include <filesystem>
#include <unordered_set>

#include "core/error.h"
#include "core/file_util.h"
#include "core/json_util.h"
#include "io/gguf.h"
#include "tokenizer/spm_proto.h"
#include "tokenizer/tokenizer.h"

namespace moe {
namespace {

using json = nlohmann::json;

// ---- The byte-level BPE pre-tokenizers llama.cpp knows by name --------------------------------
// Each entry is the normalizer, pre-tokenizer and ignore_merges of the tokenizer.json files of
// that family; the writer names a file's entry by comparing their meaning (signature()), the
// reader rebuilds the tokenizer.json from it.

json split(const std::string& regex) {
  return {{"type", "Split"}, {"pattern", {{"Regex", regex}}}, {"behavior", "Isolated"}, {"invert", false}};
}
json byte_level(bool use_regex) {
  return {{"type", "ByteLevel"}, {"add_prefix_space", false}, {"trim_offsets", true}, {"use_regex", use_regex}};
}
json sequence(std::vector<json> parts) { return {{"type", "Sequence"}, {"pretokenizers", std::move(parts)}}; }

struct PreTokenizer {
  const char* name;
  json normalizer, pre_tokenizer;
  bool ignore_merges;
  bool clean_spaces;  // decode cleans up spaces before punctuation (llama.cpp's clean_spaces per pre)
};

const std::vector<PreTokenizer>& pre_tokenizers() {
  // The regexes are the tokenizer.json ones (HF semantics); llama.cpp runs equivalent ones.
  static const std::string contractions = R"((?i:'s|'t|'re|'ve|'m|'ll|'d))";
  static const std::vector<PreTokenizer> table = {
      {"gpt-2", nullptr, byte_level(true), false, true},
      {"llama-bpe", nullptr,
       sequence({split(contractions + R"(|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"),
                 byte_level(false)}),
       true, true},
      {"qwen2", {{"type", "NFC"}},
       sequence({split(contractions + R"(|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)"),
                 byte_level(false)}),
       false, false},
      {"gpt-4o", nullptr,
       sequence({split(R"([^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
                       R"(|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?)"
                       R"(|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+)"),
                 byte_level(false)}),
       true, false},
      // DeepSeek-V3 writes CR and LF themselves (not "\r", "\n" escapes) in its third regex.
      {"deepseek-v3", nullptr,
       sequence({split(R"(\p{N}{1,3})"), split("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"),
                 split(R"([!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^)" "\r\n" R"(\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+)"
                       R"(| ?[\p{P}\p{S}]+[)" "\r\n" R"(]*|\s*[)" "\r\n" R"(]+|\s+(?!\S)|\s+)"),
                 byte_level(false)}),
       false, false},
  };
  return table;
}

// What a normalizer / pre-tokenizer does, as a string: fields that do not change ids
// (trim_offsets) are left out, and an empty Sequence equals null.
std::string signature(const json& j) {
  if (j.is_null()) return "";
  if (!j.is_object() || !j.contains("type") || !j["type"].is_string()) return "?" + j.dump();
  const std::string type = j["type"].get<std::string>();
  if (type == "Sequence") {
    const char* key = j.contains("pretokenizers") ? "pretokenizers" : "normalizers";
    if (!j.contains(key) || !j[key].is_array()) return "?" + j.dump();
    std::string s;
    for (const json& part : j[key]) {
      const std::string p = signature(part);
      if (!p.empty()) s += (s.empty() ? "" : " ; ") + p;
    }
    return s;
  }
  auto flag = [&](const char* k, bool dflt) { return j.contains(k) && j[k].is_boolean() ? j[k].get<bool>() : dflt; };
  if (type == "ByteLevel")
    return std::string("ByteLevel(prefix ") + (flag("add_prefix_space", true) ? "1" : "0") + ", regex " +
           (flag("use_regex", true) ? "1" : "0") + ")";
  if (type == "Split" && j.contains("pattern") && j["pattern"].is_object()) {
    const json& p = j["pattern"];
    const std::string pat = p.contains("Regex") ? "re:" + p["Regex"].dump() : "str:" + p.value("String", json()).dump();
    return "Split(" + pat + ", " + j.value("behavior", std::string()) + ", " + (flag("invert", false) ? "1" : "0") + ")";
  }
  if (type == "NFC") return "NFC";
  return "?" + j.dump();
}

const PreTokenizer* find_pre_tokenizer(const std::string& name) {
  for (const PreTokenizer& p : pre_tokenizers())
    if (name == p.name) return &p;
  return nullptr;
}

// ---- Writing ----------------------------------------------------------------------------------

std::string chat_template_of(const std::string& dir, const json& cfg) {
  if (cfg.contains("chat_template") && cfg["chat_template"].is_string()) return cfg["chat_template"].get<std::string>();
  if (cfg.contains("chat_template") && cfg["chat_template"].is_array())
    for (const json& t : cfg["chat_template"])
      if (t.is_object() && t.value("name", std::string()) == "default" && t.contains("template") &&
          t["template"].is_string())
        return t["template"].get<std::string>();
  const std::string jinja = dir + "/chat_template.jinja";
  return is_regular_file(jinja) ? read_file(jinja) : std::string();
}

// BOS/EOS and whether encode(text) adds them, observed on the directory's own tokenizer.
void special_ids(const Tokenizer& tok, GgufVocab* v) {
  v->bos = tok.bos_id() ? *tok.bos_id() : -1;
  v->eos = tok.eos_id() ? *tok.eos_id() : -1;
  const std::vector<int32_t> with = tok.encode("a", true), without = tok.encode("a", false);
  v->add_bos = v->bos >= 0 && with.size() > without.size() && with.front() == v->bos;
  v->add_eos = v->eos >= 0 && with.size() > without.size() && with.back() == v->eos &&
               (!v->add_bos || with.size() >= without.size() + 2);
}

void pad_to(GgufVocab* v, int64_t vocab_size) {
  for (int64_t id = static_cast<int64_t>(v->tokens.size()); id < vocab_size; ++id) {
    v->tokens.push_back("[PAD" + std::to_string(id) + "]");
    v->types.push_back(kSpmUnused);
    if (v->model == "llama") v->scores.push_back(0.0f);
  }
}

bool from_sentencepiece(const std::string& dir, GgufVocab* v, std::string* why) {
  const std::string path = dir + "/tokenizer.model";
  const SpmProto p = parse_spm_proto(read_file(path, kMaxTokenizerFileBytes), path);
  if (p.model_type != 2) {
    *why = path + " is a Unigram SentencePiece model; llama.cpp's SentencePiece tokenizer merges by score as BPE "
                  "does and would tokenize differently";
    return false;
  }
  if (p.has_charsmap || p.remove_extra_whitespaces || !p.escape_whitespaces) {
    *why = path + " normalizes text ('" + p.normalizer_name +
           "': a normalization table or whitespace rules), which llama.cpp does not";
    return false;
  }
  v->model = "llama";
  for (const SpmPiece& piece : p.pieces) {
    v->tokens.push_back(piece.piece);
    v->scores.push_back(piece.score);
    v->types.push_back(piece.type);
  }
  v->unk = p.unk_id;
  v->pad = p.pad_id;
  v->add_space_prefix = p.add_dummy_prefix;
  // Tokens tokenizer_config.json adds past the model's pieces.
  const Tokenizer tok = Tokenizer::from_dir(dir);
  for (int64_t id = static_cast<int64_t>(p.pieces.size()); id < tok.vocab_size(); ++id) {
    const std::string t = tok.id_to_token(static_cast<int32_t>(id));
    if (t.empty()) break;
    v->tokens.push_back(t);
    v->scores.push_back(0.0f);
    v->types.push_back(tok.is_special(static_cast<int32_t>(id)) ? kSpmControl : kSpmUserDefined);
  }
  special_ids(tok, v);
  return true;
}

bool from_tokenizer_json(const std::string& dir, const json& cfg, GgufVocab* v, std::string* why) {
  const std::string path = dir + "/tokenizer.json";
  const json tj = parse_json_object(read_file(path, kMaxTokenizerFileBytes), path);
  if (!tj.contains("model") || !tj["model"].is_object() || tj["model"].value("type", std::string()) != "BPE") {
    *why = path + ": only BPE models are written to GGUF";
    return false;
  }
  const json& m = tj["model"];
  auto truthy = [&](const char* k) { return m.contains(k) && m[k].is_boolean() && m[k].get<bool>(); };
  if (truthy("byte_fallback")) {
    *why = path + " is a SentencePiece-style BPE (byte_fallback): GGUF's 'llama' tokenizer needs the piece scores "
                  "of tokenizer.model, which this directory lacks";
    return false;
  }
  const std::string norm = signature(tj.value("normalizer", json())), pre = signature(tj.value("pre_tokenizer", json()));
  const PreTokenizer* entry = nullptr;
  for (const PreTokenizer& p : pre_tokenizers())
    if (signature(p.pre_tokenizer) == pre && signature(p.normalizer) == norm && p.ignore_merges == truthy("ignore_merges"))
      entry = &p;
  // Without merges every byte is its own token whatever the pre-tokenizer splits (the engine's
  // byte-level tokenizer for models trained from scratch): any entry gives the same ids.
  const bool no_merges = !m.contains("merges") || (m["merges"].is_array() && m["merges"].empty());
  if (!entry && no_merges && norm.empty() && pre.rfind("ByteLevel(", 0) == 0) entry = find_pre_tokenizer("gpt-2");
  if (!entry) {
    *why = path + ": its normalizer and pre-tokenizer are none of those llama.cpp knows by name "
                  "(gpt-2, llama-bpe, qwen2, gpt-4o, deepseek-v3)";
    return false;
  }
  v->model = "gpt2";
  v->pre = entry->name;
  MOE_CHECK(m.contains("vocab") && m["vocab"].is_object(), "%s: model.vocab is not an object", path.c_str());
  auto place = [&](int64_t id, const std::string& text, int32_t type) {
    MOE_CHECK(id >= 0 && id < (int64_t(1) << 24), "%s: token id %lld out of range", path.c_str(), (long long)id);
    if (id >= static_cast<int64_t>(v->tokens.size())) {
      v->tokens.resize(id + 1);
      v->types.resize(id + 1, 0);
    }
    v->tokens[id] = text;
    v->types[id] = type;
  };
  for (const auto& [text, id] : m["vocab"].items()) {
    MOE_CHECK(id.is_number_integer(), "%s: model.vocab['%s'] is not an id", path.c_str(), text.c_str());
    place(id.get<int64_t>(), text, kSpmNormal);
  }
  if (tj.contains("added_tokens") && tj["added_tokens"].is_array())
    for (const json& a : tj["added_tokens"]) {
      MOE_CHECK(a.is_object() && a.contains("id") && a["id"].is_number_integer() && a.contains("content") &&
                    a["content"].is_string(),
                "%s: malformed added_tokens entry", path.c_str());
      place(a["id"].get<int64_t>(), a["content"].get<std::string>(),
            a.value("special", false) ? kSpmControl : kSpmUserDefined);
    }
  for (size_t id = 0; id < v->tokens.size(); ++id)
    if (v->types[id] == 0) {
      v->tokens[id] = "[PAD" + std::to_string(id) + "]";
      v->types[id] = kSpmUnused;
    }
  if (m.contains("merges") && m["merges"].is_array())
    for (const json& mg : m["merges"]) {
      if (mg.is_string()) {
        v->merges.push_back(mg.get<std::string>());
      } else {
        MOE_CHECK(mg.is_array() && mg.size() == 2 && mg[0].is_string() && mg[1].is_string(),
                  "%s: malformed merges entry", path.c_str());
        v->merges.push_back(mg[0].get<std::string>() + " " + mg[1].get<std::string>());
      }
    }
  special_ids(Tokenizer::from_json(tj, cfg, path), v);  // the JSON already parsed, not read again
  return true;
}

// ---- Reading ----------------------------------------------------------------------------------

std::vector<std::string> string_array(const GgufFile& f, const std::string& key) {
  const GgufValue* v = f.find(key);
  MOE_CHECK(v && v->type == GgufType::ARRAY && v->elem == GgufType::STRING, "%s: metadata key %s: expected an array of "
            "strings", f.path().c_str(), key.c_str());
  std::vector<std::string> out;
  out.reserve(v->arr.size());
  for (const GgufValue& e : v->arr) out.push_back(e.s);
  return out;
}

}  // namespace

std::optional<GgufVocab> gguf_vocab_from_dir(const std::string& dir, int64_t vocab_size, std::string* why) {
  const bool has_model = is_regular_file(dir + "/tokenizer.model"), has_json = is_regular_file(dir + "/tokenizer.json");
  if (!has_model && !has_json) {
    *why = dir + " has no tokenizer.json or tokenizer.model";
    return std::nullopt;
  }
  json cfg = json::object();
  const std::string cpath = dir + "/tokenizer_config.json";
  if (is_regular_file(cpath)) cfg = parse_json_object(read_file(cpath), cpath);
  GgufVocab v;
  const bool ok = has_model ? from_sentencepiece(dir, &v, why) : from_tokenizer_json(dir, cfg, &v, why);
  if (!ok) return std::nullopt;
  if (vocab_size > 0 && static_cast<int64_t>(v.tokens.size()) > vocab_size) {
    *why = dir + ": the tokenizer has " + std::to_string(v.tokens.size()) + " tokens, more than the model's " +
           std::to_string(vocab_size) + " embedding rows";
    return std::nullopt;
  }
  pad_to(&v, vocab_size);
  v.chat_template = chat_template_of(dir, cfg);
  return v;
}

void write_gguf_vocab(GgufWriter& w, const GgufVocab& v) {
  auto strings = [](const std::vector<std::string>& s) {
    std::vector<GgufValue> a;
    a.reserve(s.size());
    for (const std::string& x : s) a.push_back(GgufValue::str(x));
    return GgufValue::array(GgufType::STRING, std::move(a));
  };
  w.set("tokenizer.ggml.model", GgufValue::str(v.model));
  if (v.model == "gpt2") w.set("tokenizer.ggml.pre", GgufValue::str(v.pre));
  w.set("tokenizer.ggml.tokens", strings(v.tokens));
  if (v.model == "llama") {
    std::vector<GgufValue> s;
    for (float x : v.scores) s.push_back(GgufValue::f32(x));
    w.set("tokenizer.ggml.scores", GgufValue::array(GgufType::F32, std::move(s)));
  }
  std::vector<GgufValue> t;
  for (int32_t x : v.types) t.push_back(GgufValue::i32(x));
  w.set("tokenizer.ggml.token_type", GgufValue::array(GgufType::I32, std::move(t)));
  if (v.model == "gpt2") w.set("tokenizer.ggml.merges", strings(v.merges));
  auto id = [&](const char* key, int64_t x) {
    if (x >= 0) w.set(key, GgufValue::u32(static_cast<uint32_t>(x)));
  };
  id("tokenizer.ggml.bos_token_id", v.bos);
  id("tokenizer.ggml.eos_token_id", v.eos);
  id("tokenizer.ggml.unknown_token_id", v.unk);
  id("tokenizer.ggml.padding_token_id", v.pad);
  w.set("tokenizer.ggml.add_bos_token", GgufValue::boolean(v.add_bos));
  w.set("tokenizer.ggml.add_eos_token", GgufValue::boolean(v.add_eos));
  if (v.model == "llama") w.set("tokenizer.ggml.add_space_prefix", GgufValue::boolean(v.add_space_prefix));
  if (!v.chat_template.empty()) w.set("tokenizer.chat_template", GgufValue::str(v.chat_template));
}

std::optional<GgufVocab> read_gguf_vocab(const GgufFile& f) {
  const GgufValue* model = f.find("tokenizer.ggml.model");
  if (!model || (model->type == GgufType::STRING && model->s == "none")) return std::nullopt;
  GgufVocab v;
  v.model = f.get_string("tokenizer.ggml.model");
  const std::string& file = f.path();
  MOE_CHECK(v.model == "gpt2" || v.model == "llama",
            "%s: tokenizer.ggml.model '%s' is not one the engine reads (gpt2: byte-level BPE, llama: SentencePiece)",
            file.c_str(), v.model.c_str());
  v.tokens = string_array(f, "tokenizer.ggml.tokens");
  const size_t n = v.tokens.size();
  MOE_CHECK(n > 0, "%s: tokenizer.ggml.tokens is empty", file.c_str());
  auto numbers = [&](const char* key, bool required, auto get) {
    const GgufValue* a = f.find(key);
    if (!a) {
      MOE_CHECK(!required, "%s: metadata key %s is missing", file.c_str(), key);
      return;
    }
    MOE_CHECK(a->type == GgufType::ARRAY && a->arr.size() == n,
              "%s: metadata key %s: expected an array of %zu numbers (one per token)", file.c_str(), key, n);
    for (const GgufValue& e : a->arr) get(e);
  };
  numbers("tokenizer.ggml.token_type", false, [&](const GgufValue& e) {
    int64_t t = 0;
    MOE_CHECK(e.get_int(&t) && t >= kSpmNormal && t <= kSpmByte, "%s: tokenizer.ggml.token_type holds %lld (not 1..6)",
              file.c_str(), (long long)t);
    v.types.push_back(static_cast<int32_t>(t));
  });
  if (v.types.empty()) v.types.assign(n, kSpmNormal);
  if (v.model == "llama") {
    numbers("tokenizer.ggml.scores", true, [&](const GgufValue& e) {
      double s = 0;
      MOE_CHECK(e.get_float(&s), "%s: tokenizer.ggml.scores holds a non-number", file.c_str());
      v.scores.push_back(static_cast<float>(s));
    });
  } else {
    v.pre = f.find("tokenizer.ggml.pre") ? f.get_string("tokenizer.ggml.pre") : "default";
    v.merges = string_array(f, "tokenizer.ggml.merges");
  }
  auto id = [&](const char* key) {
    const int64_t x = f.get_int(key, -1);
    MOE_CHECK(x >= -1 && x < static_cast<int64_t>(n), "%s: %s = %lld is not a token id (%zu tokens)", file.c_str(), key,
              (long long)x, n);
    return x;
  };
  v.bos = id("tokenizer.ggml.bos_token_id");
  v.eos = id("tokenizer.ggml.eos_token_id");
  v.unk = id("tokenizer.ggml.unknown_token_id");
  v.pad = id("tokenizer.ggml.padding_token_id");
  // llama.cpp's defaults: SentencePiece adds BOS, byte-level BPE does not.
  v.add_bos = f.get_bool("tokenizer.ggml.add_bos_token", v.model == "llama");
  v.add_eos = f.get_bool("tokenizer.ggml.add_eos_token", false);
  v.add_space_prefix = f.get_bool("tokenizer.ggml.add_space_prefix", true);
  if (f.find("tokenizer.chat_template")) v.chat_template = f.get_string("tokenizer.chat_template");
  return v;
}

json gguf_vocab_config(const GgufVocab& v) {
  json cfg = {{"add_bos_token", v.add_bos}, {"add_eos_token", v.add_eos}};
  if (v.bos >= 0) cfg["bos_token"] = v.tokens[v.bos];
  if (v.eos >= 0) cfg["eos_token"] = v.tokens[v.eos];
  if (!v.chat_template.empty()) cfg["chat_template"] = v.chat_template;
  return cfg;
}

Tokenizer tokenizer_from_gguf_vocab(const GgufVocab& v, const std::string& origin) {
  const json cfg = gguf_vocab_config(v);
  if (v.model == "llama") {
    SpmProto p;
    p.model_type = 2;
    for (size_t i = 0; i < v.tokens.size(); ++i) {
      p.pieces.push_back(SpmPiece{v.tokens[i], v.scores[i], v.types[i]});
      p.byte_fallback |= v.types[i] == kSpmByte;
    }
    p.unk_id = static_cast<int32_t>(v.unk);
    if (p.unk_id < 0)
      for (size_t i = 0; i < v.types.size() && p.unk_id < 0; ++i)
        if (v.types[i] == kSpmUnknown) p.unk_id = static_cast<int32_t>(i);
    MOE_CHECK(p.unk_id >= 0 && v.types[p.unk_id] == kSpmUnknown,
              "%s: the SentencePiece vocabulary has no unknown token (tokenizer.ggml.unknown_token_id)", origin.c_str());
    p.bos_id = static_cast<int32_t>(v.bos);
    p.eos_id = static_cast<int32_t>(v.eos);
    p.pad_id = static_cast<int32_t>(v.pad);
    p.normalizer_name = "identity";
    p.add_dummy_prefix = v.add_space_prefix;
    p.remove_extra_whitespaces = false;
    p.escape_whitespaces = true;
    return Tokenizer::from_sentencepiece_bytes(serialize_spm_proto(p), cfg, origin);
  }
  const PreTokenizer* entry = find_pre_tokenizer(v.pre);
  MOE_CHECK(entry, "%s: tokenizer.ggml.pre '%s' is not a pre-tokenizer the engine knows (gpt-2, llama-bpe, qwen2, "
            "gpt-4o, deepseek-v3)", origin.c_str(), v.pre.c_str());
  json vocab = json::object(), added = json::array();
  std::unordered_set<std::string> seen;
  for (size_t id = 0; id < v.tokens.size(); ++id) {
    const int32_t t = v.types[id];
    if (t == kSpmControl || t == kSpmUserDefined) {
      added.push_back({{"id", id}, {"content", v.tokens[id]}, {"single_word", false}, {"lstrip", false},
                       {"rstrip", false}, {"normalized", false}, {"special", t == kSpmControl}});
    } else if (t != kSpmUnused && seen.insert(v.tokens[id]).second) {
      vocab[v.tokens[id]] = id;
    }
  }
  json tj = {{"version", "1.0"},
             {"added_tokens", added},
             {"normalizer", entry->normalizer},
             {"pre_tokenizer", entry->pre_tokenizer},
             {"post_processor", nullptr},
             {"decoder", {{"type", "ByteLevel"}, {"add_prefix_space", true}, {"trim_offsets", true}, {"use_regex", true}}},
             {"model",
              {{"type", "BPE"}, {"dropout", nullptr}, {"unk_token", nullptr}, {"continuing_subword_prefix", nullptr},
               {"end_of_word_suffix", nullptr}, {"fuse_unk", false}, {"byte_fallback", false},
               {"ignore_merges", entry->ignore_merges}, {"vocab", std::move(vocab)}, {"merges", v.merges}}}};
  json cfg_bpe = cfg;
  cfg_bpe["clean_up_tokenization_spaces"] = entry->clean_spaces;
  return Tokenizer::from_json(tj, cfg_bpe, origin);
}

GgufVocab load_gguf_vocab(const std::string& path) {
  const auto f = GgufFile::open(path);
  std::optional<GgufVocab> v = read_gguf_vocab(*f);
  MOE_CHECK(v.has_value(), "%s: the GGUF file carries no tokenizer (tokenizer.ggml.model is 'none' or absent): give "
            "--tokenizer DIR", path.c_str());
  return std::move(*v);
}

bool gguf_has_vocab(const std::string& path) {
  const auto f = GgufFile::open(path);
  const GgufValue* m = f->find("tokenizer.ggml.model");
  return m && m->type == GgufType::STRING && (m->s == "gpt2" || m->s == "llama");
}

}  // namespace moe
