// data.cpp — corpus loading, packing, validation split and the batch sampler (see data.h).
#include "train/data.h"

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <fstream>
#include <sstream>

#include "core/error.h"
#include "core/json_util.h"
#include "core/rng.h"
#include "io/safetensors.h"
#include "tokenizer/tokenizer.h"

namespace moe {
namespace {

// RNG stream ids, so the validation split and the epoch permutations never share draws.
constexpr uint64_t kValSplitStream = 0x5eed0001;
constexpr uint64_t kEpochStreamBase = 0x5eed1000;

// Uniform integer in [0, n) without modulo bias (Lemire's multiply-shift with rejection).
uint64_t uniform_below(Rng& rng, uint64_t n) {
  unsigned __int128 m = (unsigned __int128)rng.next() * n;
  uint64_t low = uint64_t(m);
  if (low < n) {
    const uint64_t threshold = (0 - n) % n;
    while (low < threshold) {
      m = (unsigned __int128)rng.next() * n;
      low = uint64_t(m);
    }
  }
  return uint64_t(m >> 64);
}

// Fisher-Yates permutation of 0..n-1.
std::vector<int64_t> random_permutation(int64_t n, Rng& rng) {
  std::vector<int64_t> p(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) p[size_t(i)] = i;
  for (int64_t i = n - 1; i > 0; --i) std::swap(p[size_t(i)], p[size_t(uniform_below(rng, uint64_t(i) + 1))]);
  return p;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MOE_CHECK(in.good(), "%s: cannot open data file", path.c_str());
  std::ostringstream ss;
  ss << in.rdbuf();
  MOE_CHECK(!in.bad(), "%s: read error", path.c_str());
  return ss.str();
}

bool ends_with(const std::string& s, const char* suffix) {
  const size_t n = std::strlen(suffix);
  if (s.size() < n) return false;
  for (size_t i = 0; i < n; ++i)
    if (std::tolower(static_cast<unsigned char>(s[s.size() - n + i])) != suffix[i]) return false;
  return true;
}

bool is_blank(std::string_view s) {
  for (char c : s)
    if (!std::isspace(static_cast<unsigned char>(c))) return false;
  return true;
}

// A safetensors image: u64 header length that fits the file, then '{'.
bool looks_like_safetensors(const std::string& bytes) {
  if (bytes.size() < 10) return false;
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  return n >= 2 && n <= bytes.size() - 8 && bytes[8] == '{';
}

// Splits into lines (without '\n' or a trailing '\r'); calls fn(line, 1-based number).
template <class Fn>
void for_each_line(const std::string& text, Fn fn) {
  size_t start = 0;
  int64_t number = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    std::string_view line(text.data() + start, end - start);
    if (!line.empty() && line.back() == '\r') line.remove_suffix(1);
    fn(line, ++number);
    start = end + 1;
  }
}

// The "text" of one JSONL line; throws naming PATH:LINE.
std::string jsonl_text(std::string_view line, int64_t number, const std::string& path) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(line);
  } catch (const nlohmann::json::exception& e) {
    MOE_FAIL("%s:%lld: malformed JSON: %s", path.c_str(), (long long)number, json_error_text(e).c_str());
  }
  MOE_CHECK(j.is_object(), "%s:%lld: expected a JSON object with a \"text\" string, got %s", path.c_str(),
            (long long)number, j.type_name());
  auto it = j.find("text");
  MOE_CHECK(it != j.end(), "%s:%lld: object has no \"text\" field", path.c_str(), (long long)number);
  MOE_CHECK(it->is_string(), "%s:%lld: \"text\" must be a string, got %s", path.c_str(), (long long)number,
            it->type_name());
  return it->get<std::string>();
}

enum class JsonlKind { None, Text, Chat, PromptCompletion };

// What the first non-blank line is: a JSON object with "messages" (chat), "prompt" and
// "completion", or a string "text"; None otherwise.
JsonlKind jsonl_kind(const std::string& bytes) {
  JsonlKind answer = JsonlKind::None;
  bool decided = false;
  for_each_line(bytes, [&](std::string_view line, int64_t) {
    if (decided || is_blank(line)) return;
    decided = true;
    try {
      auto j = nlohmann::json::parse(line);
      if (!j.is_object()) return;
      if (j.contains("messages")) answer = JsonlKind::Chat;
      else if (j.contains("prompt") && j.contains("completion")) answer = JsonlKind::PromptCompletion;
      else if (j.contains("text") && j["text"].is_string()) answer = JsonlKind::Text;
    } catch (const nlohmann::json::exception&) {
      answer = JsonlKind::None;
    }
  });
  return answer;
}

// Reads an integer [N,S] tensor as i32, checking the value range.
std::vector<int32_t> read_id_tensor(const SafetensorsFile& f, const std::string& name, int64_t n, int64_t s,
                                    bool is_label, int64_t vocab) {
  const SafetensorsInfo* info = f.find(name);
  MOE_ASSERT(info != nullptr);
  MOE_CHECK(info->dtype == DType::I32 || info->dtype == DType::I64, "%s: tensor '%s' must be I32 or I64, got %s",
            f.path().c_str(), name.c_str(), dtype_safetensors_name(info->dtype));
  MOE_CHECK(info->shape == Shape({n, s}), "%s: tensor '%s' has shape %s, expected [%lld,%lld] (as input_ids)",
            f.path().c_str(), name.c_str(), shape_str(info->shape).c_str(), (long long)n, (long long)s);
  Tensor t = f.tensor(name, MemCategory::Workspace);
  std::vector<int32_t> out(size_t(n * s));
  for (int64_t i = 0; i < n * s; ++i) {
    const int64_t v = info->dtype == DType::I32 ? int64_t(t.data<int32_t>()[i]) : t.data<int64_t>()[i];
    const bool ok = (is_label && v == kIgnoreLabel) || (v >= 0 && (vocab > 0 ? v < vocab : v <= INT32_MAX));
    if (!ok) {
      if (vocab > 0)
        MOE_FAIL("%s: %s[%lld,%lld] = %lld is not a token id in [0, %lld)%s", f.path().c_str(), name.c_str(),
                 (long long)(i / s), (long long)(i % s), (long long)v, (long long)vocab,
                 is_label ? " or -100 (ignored)" : "");
      MOE_FAIL("%s: %s[%lld,%lld] = %lld is not a token id%s", f.path().c_str(), name.c_str(), (long long)(i / s),
               (long long)(i % s), (long long)v, is_label ? " or -100 (ignored)" : "");
    }
    out[size_t(i)] = int32_t(v);
  }
  return out;
}

TokenRows load_pretokenized(const std::string& path, const DataOptions& opt, int64_t* n_tokens) {
  auto f = SafetensorsFile::open(path);
  const SafetensorsInfo* ids = f->find("input_ids");
  MOE_CHECK(ids != nullptr, "%s: no tensor 'input_ids' (a pre-tokenized file holds input_ids [N,S] and optional "
                            "labels [N,S])", path.c_str());
  MOE_CHECK(ids->shape.size() == 2, "%s: input_ids must be [N,S], got %s", path.c_str(),
            shape_str(ids->shape).c_str());
  const int64_t n = ids->shape[0], s = ids->shape[1];
  MOE_CHECK(n > 0 && s > 0, "%s: input_ids %s holds no tokens", path.c_str(), shape_str(ids->shape).c_str());
  MOE_CHECK(opt.seq_len == 0 || opt.seq_len == s, "%s: rows hold %lld tokens, but the sequence length is %lld",
            path.c_str(), (long long)s, (long long)opt.seq_len);
  TokenRows rows;
  rows.n = n;
  rows.seq = s;
  rows.input_ids = read_id_tensor(*f, "input_ids", n, s, false, opt.vocab_size);
  rows.labels = f->find("labels") ? read_id_tensor(*f, "labels", n, s, true, opt.vocab_size) : rows.input_ids;
  *n_tokens = n * s;
  return rows;
}

TokenRows pack(const std::vector<int32_t>& tokens, int64_t seq_len, const std::string& path) {
  const int64_t n_tok = int64_t(tokens.size());
  MOE_CHECK(n_tok >= seq_len, "%s: the corpus has %lld tokens, fewer than one row of the sequence length %lld",
            path.c_str(), (long long)n_tok, (long long)seq_len);
  TokenRows rows;
  rows.n = n_tok / seq_len;
  rows.seq = seq_len;
  rows.input_ids.assign(tokens.begin(), tokens.begin() + rows.n * seq_len);
  rows.labels = rows.input_ids;
  return rows;
}

void check_token_range(const std::vector<int32_t>& tokens, int64_t vocab, const std::string& path) {
  if (vocab <= 0) return;
  for (int32_t t : tokens)
    MOE_CHECK(t >= 0 && t < vocab, "%s: the tokenizer produced id %d, outside the model's vocabulary [0, %lld)",
              path.c_str(), t, (long long)vocab);
}

// Chat or prompt/completion JSONL -> labeled token rows (packed, or one example per row).
TokenRows load_sft(const std::string& path, const std::string& bytes, JsonlKind kind, const Tokenizer& t,
                   const DataOptions& opt, Dataset* ds) {
  MOE_CHECK(kind != JsonlKind::Chat || opt.chat != nullptr,
            "%s: chat data needs a chat template, and the model has none (give --chat-template FILE)", path.c_str());
  std::vector<LabeledTokens> examples;
  for_each_line(bytes, [&](std::string_view line, int64_t number) {
    if (is_blank(line)) return;
    const std::string where = path + ":" + std::to_string(number);
    nlohmann::ordered_json j;
    try {
      j = nlohmann::ordered_json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      MOE_FAIL("%s: malformed JSON: %s", where.c_str(), json_error_text(e).c_str());
    }
    MOE_CHECK(j.is_object(), "%s: expected a JSON object, got %s", where.c_str(), j.type_name());
    if (kind == JsonlKind::Chat) {
      MOE_CHECK(j.contains("messages"), "%s: object has no \"messages\" list", where.c_str());
      examples.push_back(encode_chat(j["messages"], *opt.chat, t, where, &ds->sft));
    } else {
      for (const char* k : {"prompt", "completion"})
        MOE_CHECK(j.contains(k) && j[k].is_string(), "%s: \"%s\" must be a string", where.c_str(), k);
      examples.push_back(
          encode_prompt_completion(j["prompt"].get<std::string>(), j["completion"].get<std::string>(), t, &ds->sft));
    }
    ++ds->n_documents;
  });
  MOE_CHECK(ds->n_documents > 0, "%s: empty dataset (no JSONL lines)", path.c_str());
  MOE_CHECK(ds->sft.labeled_tokens > 0, "%s: no token carries loss (no assistant / completion tokens)", path.c_str());
  const int64_t s = opt.seq_len;
  TokenRows rows;
  rows.seq = s;
  if (opt.packing) {
    std::vector<int32_t> ids, labels;
    for (const LabeledTokens& e : examples) {
      ids.insert(ids.end(), e.ids.begin(), e.ids.end());
      labels.insert(labels.end(), e.labels.begin(), e.labels.end());
    }
    ds->n_tokens = int64_t(ids.size());
    if (opt.max_tokens > 0 && int64_t(ids.size()) > opt.max_tokens) {
      ids.resize(size_t(opt.max_tokens));
      labels.resize(size_t(opt.max_tokens));
    }
    rows = pack(ids, s, path);
    rows.labels.assign(labels.begin(), labels.begin() + rows.n * s);
  } else {
    const int32_t pad = t.eos_id().value_or(0);
    for (const LabeledTokens& e : examples) {
      const size_t n = std::min(e.ids.size(), size_t(s));
      rows.input_ids.insert(rows.input_ids.end(), e.ids.begin(), e.ids.begin() + long(n));
      rows.labels.insert(rows.labels.end(), e.labels.begin(), e.labels.begin() + long(n));
      rows.input_ids.insert(rows.input_ids.end(), size_t(s) - n, pad);
      rows.labels.insert(rows.labels.end(), size_t(s) - n, kIgnoreLabel);
      ds->n_tokens += int64_t(e.ids.size());
    }
    rows.n = int64_t(examples.size());
  }
  check_token_range(rows.input_ids, opt.vocab_size, path);
  int64_t scored = 0;
  for (int64_t r = 0; r < rows.n; ++r)
    for (int64_t i = 1; i < s; ++i) scored += rows.labels[size_t(r * s + i)] != kIgnoreLabel;
  MOE_CHECK(scored > 0, "%s: no scored token survives cutting into rows of %lld tokens", path.c_str(), (long long)s);
  return rows;
}

TokenRows select_rows(const TokenRows& all, const std::vector<int64_t>& which) {
  TokenRows r;
  r.n = int64_t(which.size());
  r.seq = all.seq;
  r.input_ids.resize(size_t(r.n * r.seq));
  r.labels.resize(size_t(r.n * r.seq));
  for (int64_t i = 0; i < r.n; ++i) {
    const size_t src = size_t(which[size_t(i)] * all.seq), dst = size_t(i * all.seq);
    std::copy_n(all.input_ids.begin() + long(src), all.seq, r.input_ids.begin() + long(dst));
    std::copy_n(all.labels.begin() + long(src), all.seq, r.labels.begin() + long(dst));
  }
  return r;
}

}  // namespace

Dataset load_dataset(const std::string& path, const Tokenizer* tok, const DataOptions& opt) {
  MOE_CHECK(opt.seq_len >= 0, "data: sequence length must be >= 0, got %lld", (long long)opt.seq_len);
  MOE_CHECK(opt.val_fraction >= 0 && opt.val_fraction < 1, "data: validation fraction must be in [0, 1), got %g",
            opt.val_fraction);
  MOE_CHECK(opt.max_tokens >= 0, "data: max_tokens must be >= 0, got %lld", (long long)opt.max_tokens);

  Dataset ds;
  TokenRows all;
  std::string bytes = read_file(path);
  if (ends_with(path, ".safetensors") || looks_like_safetensors(bytes)) {
    bytes.clear();
    bytes.shrink_to_fit();
    all = load_pretokenized(path, opt, &ds.n_tokens);
    ds.source = "safetensors: " + path;
    ds.n_documents = all.n;
  } else {
    MOE_CHECK(opt.seq_len > 0, "%s: a text corpus needs a sequence length > 0", path.c_str());
    Tokenizer bytes_tok = Tokenizer::byte_level({});
    const Tokenizer& t = tok ? *tok : bytes_tok;
    std::vector<int32_t> tokens;
    const JsonlKind kind = jsonl_kind(bytes);
    const bool jsonl = ends_with(path, ".jsonl") || ends_with(path, ".ndjson") || kind == JsonlKind::Text;
    if (kind == JsonlKind::Chat || kind == JsonlKind::PromptCompletion) {
      ds.source = std::string(kind == JsonlKind::Chat ? "chat" : "prompt/completion") + ": " + path;
      all = load_sft(path, bytes, kind, t, opt, &ds);
    } else if (jsonl) {
      ds.source = "jsonl: " + path;
      const auto eos = t.eos_id();
      bool any_text = false;
      for_each_line(bytes, [&](std::string_view line, int64_t number) {
        if (is_blank(line)) return;
        const std::string text = jsonl_text(line, number, path);
        any_text |= !is_blank(text);
        if (ds.n_documents > 0 && eos) tokens.push_back(*eos);
        const auto ids = t.encode(text, false);
        tokens.insert(tokens.end(), ids.begin(), ids.end());
        ++ds.n_documents;
      });
      MOE_CHECK(ds.n_documents > 0, "%s: empty corpus (no JSONL lines)", path.c_str());
      MOE_CHECK(any_text, "%s: empty corpus (every \"text\" is empty or whitespace)", path.c_str());
    } else {
      ds.source = "text: " + path;
      MOE_CHECK(!is_blank(bytes), "%s: empty corpus (%s)", path.c_str(),
                bytes.empty() ? "the file is empty" : "only whitespace");
      tokens = t.encode(bytes, false);
      ds.n_documents = 1;
    }
    bytes.clear();
    bytes.shrink_to_fit();
    if (all.n == 0) {
      ds.n_tokens = int64_t(tokens.size());
      if (opt.max_tokens > 0 && int64_t(tokens.size()) > opt.max_tokens) tokens.resize(size_t(opt.max_tokens));
      check_token_range(tokens, opt.vocab_size, path);
      all = pack(tokens, opt.seq_len, path);
    }
  }

  // Validation split: rows picked by a seeded permutation; both splits keep file order.
  int64_t n_val = 0;
  if (opt.val_fraction > 0 && all.n >= 2)
    n_val = std::clamp<int64_t>(std::llround(double(all.n) * opt.val_fraction), 1, all.n - 1);
  if (n_val == 0) {
    ds.train = std::move(all);
    ds.val.seq = ds.train.seq;
    return ds;
  }
  Rng rng(opt.seed, kValSplitStream);
  const std::vector<int64_t> perm = random_permutation(all.n, rng);
  std::vector<char> is_val(size_t(all.n), 0);
  for (int64_t i = 0; i < n_val; ++i) is_val[size_t(perm[size_t(i)])] = 1;
  std::vector<int64_t> train_rows, val_rows;
  for (int64_t r = 0; r < all.n; ++r) (is_val[size_t(r)] ? val_rows : train_rows).push_back(r);
  ds.train = select_rows(all, train_rows);
  ds.val = select_rows(all, val_rows);
  return ds;
}

// ---- BatchSampler ----

BatchSampler::BatchSampler(int64_t n_rows, int64_t batch, uint64_t seed, bool shuffle)
    : n_rows_(n_rows), batch_(batch), seed_(seed), shuffle_(shuffle) {
  MOE_CHECK(n_rows > 0, "batch sampler: no training rows");
  MOE_CHECK(batch > 0, "batch sampler: batch size must be > 0, got %lld", (long long)batch);
}

const std::vector<int64_t>& BatchSampler::perm(int64_t epoch) {
  if (perm_epoch_ != epoch) {
    Rng rng(seed_, kEpochStreamBase + uint64_t(epoch));
    perm_ = random_permutation(n_rows_, rng);
    perm_epoch_ = epoch;
  }
  return perm_;
}

void BatchSampler::next(std::vector<int64_t>* rows) {
  rows->resize(size_t(batch_));
  for (int64_t b = 0; b < batch_; ++b, ++pos_) {
    const int64_t within = pos_ % n_rows_;
    (*rows)[size_t(b)] = shuffle_ ? perm(pos_ / n_rows_)[size_t(within)] : within;
  }
}

nlohmann::json BatchSampler::state() const {
  return {{"n_rows", n_rows_}, {"batch", batch_}, {"seed", std::to_string(seed_)}, {"shuffle", shuffle_},
          {"position", pos_}};
}

void BatchSampler::restore(const nlohmann::json& s) {
  MOE_CHECK(s.is_object(), "data state: expected a JSON object, got %s", s.type_name());
  auto get_int = [&](const char* key) {
    MOE_CHECK(s.contains(key) && s[key].is_number_integer(), "data state: field '%s' missing or not an integer",
              key);
    return s[key].get<int64_t>();
  };
  const int64_t n_rows = get_int("n_rows"), batch = get_int("batch"), position = get_int("position");
  MOE_CHECK(s.contains("seed") && s["seed"].is_string(), "data state: field 'seed' missing or not a string");
  MOE_CHECK(s.contains("shuffle") && s["shuffle"].is_boolean(), "data state: field 'shuffle' missing or not a bool");
  const std::string seed_text = s["seed"].get<std::string>();
  MOE_CHECK(n_rows == n_rows_, "data state: saved for %lld training rows, this dataset has %lld", (long long)n_rows,
            (long long)n_rows_);
  MOE_CHECK(batch == batch_, "data state: saved for batch size %lld, this run uses %lld", (long long)batch,
            (long long)batch_);
  MOE_CHECK(seed_text == std::to_string(seed_), "data state: saved for seed %s, this run uses %llu",
            seed_text.c_str(), (unsigned long long)seed_);
  MOE_CHECK(s["shuffle"].get<bool>() == shuffle_, "data state: saved with shuffle %s, this run has shuffle %s",
            s["shuffle"].get<bool>() ? "on" : "off", shuffle_ ? "on" : "off");
  MOE_CHECK(position >= 0, "data state: position must be >= 0, got %lld", (long long)position);
  pos_ = position;
}

void gather_batch(const TokenRows& data, const std::vector<int64_t>& rows, Tensor* ids, Tensor* labels) {
  const int64_t b = int64_t(rows.size()), s = data.seq;
  MOE_CHECK(b > 0, "gather_batch: no rows");
  const Shape shape{b, s};
  for (Tensor* t : {ids, labels})
    if (!t->defined() || t->shape() != shape || t->dtype() != DType::I32 || t->device() != Device::CPU)
      *t = Tensor::empty(shape, DType::I32, MemCategory::Workspace);
  for (int64_t i = 0; i < b; ++i) {
    const int64_t r = rows[size_t(i)];
    MOE_CHECK(r >= 0 && r < data.n, "gather_batch: row %lld outside [0, %lld)", (long long)r, (long long)data.n);
    std::copy_n(data.input_ids.data() + r * s, s, ids->data<int32_t>() + i * s);
    std::copy_n(data.labels.data() + r * s, s, labels->data<int32_t>() + i * s);
  }
}

}  // namespace moe
