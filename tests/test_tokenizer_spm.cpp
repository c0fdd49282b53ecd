// test_tokenizer_spm.cpp — SentencePiece tokenizer.model support against the real SentencePiece
// command-line tools (Debian package `sentencepiece`).
//
// At test time two tiny models are trained with spm_train (BPE with byte fallback, user-defined
// and control symbols; unigram without byte fallback) on a deterministic multilingual text; ~200
// varied strings are encoded with `spm_encode --output_format=id` and the ids decoded with
// `spm_decode --input_format=id`. Our ids and decodes must be identical to the tools' output.
// Without spm_train the tests are SKIPPED with a loud message.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/file_util.h"
#include "io/gguf.h"
#include "tokenizer/gguf_vocab.h"
#include "tokenizer/spm_proto.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

namespace moe {
namespace {

using json = nlohmann::json;

std::string shell_out(const std::string& cmd, int* rc) {
  std::string out;
  FILE* p = popen(cmd.c_str(), "r");
  if (!p) {
    *rc = -1;
    return out;
  }
  char buf[4096];
  while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
  *rc = pclose(p);
  return out;
}

std::string read_all(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::stringstream ss;
  ss << f.rdbuf();
  return ss.str();
}

void write_all(const std::string& path, const std::string& data) {
  std::ofstream f(path, std::ios::binary);
  f << data;
  ASSERT_TRUE(f.good()) << path;
}

std::vector<std::string> read_lines(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  std::vector<std::string> out;
  std::string line;
  while (std::getline(f, line)) out.push_back(line);
  return out;
}

std::vector<int32_t> parse_ids(const std::string& line) {
  std::vector<int32_t> ids;
  std::istringstream is(line);
  int32_t v;
  while (is >> v) ids.push_back(v);
  return ids;
}

// ---- deterministic multilingual text ----

struct Rng {
  uint64_t s;
  uint64_t next() {
    s ^= s << 13, s ^= s >> 7, s ^= s << 17;
    return s;
  }
  size_t below(size_t n) { return size_t(next() % n); }
};

const std::vector<std::vector<std::string>>& word_pools() {
  static const std::vector<std::vector<std::string>> pools = {
      {"the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "model", "expert", "token", "router",
       "layer", "attention", "mixture", "of", "experts", "and", "a", "to", "in", "is", "it", "that", "with",
       "for", "on", "was", "tokenizer", "sentence", "piece", "training", "language", "data", "small", "large",
       "The", "This", "Hello", "World", "running", "played", "faster", "unbelievable", "internationalization"},
      {"über", "schön", "Straße", "Mädchen", "Hund", "Fuchs", "springt", "café", "naïve", "garçon", "élève",
       "fenêtre", "déjà", "vu", "señor", "niño", "año", "São", "Paulo", "Kraków", "Łódź", "smörgåsbord"},
      {"привет", "мир", "язык", "модель", "данные", "быстро", "Москва", "съешь", "ещё", "этих", "мягких",
       "булок", "чаю"},
      {"καλημέρα", "κόσμε", "γλώσσα", "λόγος", "Αθήνα"},
      {"我们", "学习", "语言", "模型", "数据", "机器", "中国", "北京", "自然", "处理", "很", "有趣", "我爱"},
      {"東京", "ひらがな", "カタカナ", "です", "ます", "日本語", "の", "文章", "大きい", "都市"},
      {"안녕하세요", "한국어", "문장", "입니다", "세계"},
      {"مرحبا", "العالم", "لغة", "جميلة", "العربية"},
      {"नमस्ते", "दुनिया", "भाषा"},
      {"2024", "1,234,567", "98.6%", "3.14159", "42", "0x1F", "1e-3", "$5", "€10", "#1"},
      {".", ",", "!", "?", ";", ":", "(", ")", "\"", "'", "-", "—", "…", "/", "*", "+", "=", "[", "]", "{", "}"},
      {"🎉", "👍", "😀", "🚀", "❤️"},
  };
  return pools;
}

std::string random_line(Rng& r, size_t min_words, size_t max_words) {
  static const size_t weights[] = {30, 8, 6, 3, 6, 4, 3, 3, 2, 5, 6, 2};
  size_t total = 0;
  for (size_t w : weights) total += w;
  const auto& pools = word_pools();
  std::string line;
  const size_t n = min_words + r.below(max_words - min_words + 1);
  for (size_t k = 0; k < n; ++k) {
    size_t pick = r.below(total), p = 0;
    while (pick >= weights[p]) pick -= weights[p++];
    const auto& pool = pools[p];
    if (k && r.below(8)) line += ' ';
    line += pool[r.below(pool.size())];
  }
  return line;
}

// ---- the models, trained once ----

struct SpmSetup {
  std::string skip;   // non-empty: why the tests are skipped
  std::string error;  // non-empty: the setup failed (the tests fail)
  std::string dir;
  std::vector<std::string> strings;  // the comparison strings (one per line in strings.txt)
};

std::string tool(const char* name) {
  int rc;
  std::string p = shell_out(std::string("command -v ") + name + " 2>/dev/null", &rc);
  while (!p.empty() && (p.back() == '\n' || p.back() == '\r')) p.pop_back();
  return rc == 0 ? p : "";
}

std::vector<std::string> comparison_strings() {
  std::vector<std::string> s = {
      "",
      "Hello World",
      "hello world",
      " leading space",
      "trailing space ",
      "   many    spaces   inside   ",
      "\ttab\tseparated\ttext",
      "ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３",  // NFKC folds these
      "e\xCC\x81 combining acute, precomposed é",
      "ﬁ ligature, ½ fraction, x² superscript, Ⅻ numeral",
      "non\xC2\xA0" "breaking\xE3\x80\x80ideographic space",
      "zero\xE2\x80\x8Bwidth space and 👨\u200D👩\u200D👧 family",
      "unseen characters: 龘 ß Ω ж ñ 🦄 ∮ ☃",
      "<sep> user defined [MASK] symbols <sep>",
      "a<sep>b[MASK]c",
      "ALL CAPS SENTENCE WITH NUMBERS 12345 67890",
      "mixed中文and English混合text",
      "code: for (int i = 0; i < n; ++i) { sum += a[i]; }",
      "url https://example.com/path?q=1&r=2#frag",
      "email someone@example.org",
      "repeated aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
      "!!!???...,,,;;;",
      "x",
      " ",
      "🎉",
      "ελληνικά και русский и 日本語",
      "Straße Mädchen schön über",
  };
  std::string long_line;
  Rng r{0x5eed5eed12345ULL};
  while (long_line.size() < 3000) long_line += random_line(r, 5, 12) + " ";
  s.push_back(long_line);
  Rng g{0xC0FFEE0DDBA11ULL};
  while (s.size() < 210) s.push_back(random_line(g, 1, 16));
  return s;
}

const SpmSetup& setup() {
  static std::once_flag once;
  static SpmSetup S;
  std::call_once(once, [] {
    const std::string train = tool("spm_train"), enc = tool("spm_encode"), dec = tool("spm_decode");
    if (train.empty() || enc.empty() || dec.empty()) {
      S.skip = "spm_train/spm_encode/spm_decode not found (apt-get install sentencepiece; scripts/install_deps.sh)";
      return;
    }
    char tmpl[] = "/tmp/moe-spm-test-XXXXXX";
    if (!mkdtemp(tmpl)) {
      S.skip = "cannot create a temporary directory";
      return;
    }
    S.dir = tmpl;
    std::atexit([] {
      if (!S.dir.empty() && !std::getenv("MOE_KEEP_SPM_TEST")) std::system(("rm -rf '" + S.dir + "'").c_str());
    });
    // Training text: deterministic, multilingual.
    {
      std::ofstream f(S.dir + "/train.txt", std::ios::binary);
      Rng r{88172645463325252ULL};
      for (int i = 0; i < 4000; ++i) f << random_line(r, 3, 14) << "\n";
    }
    S.strings = comparison_strings();
    {
      std::ofstream f(S.dir + "/strings.txt", std::ios::binary);
      for (auto& s : S.strings) f << s << "\n";
    }
    const std::string common = " --input=" + S.dir + "/train.txt --num_threads=1 --minloglevel=2 ";
    struct M {
      const char* name;
      std::string flags;
    };
    const M models[] = {
        {"bpe", "--model_type=bpe --vocab_size=500 --character_coverage=0.995 --byte_fallback=true "
                "'--user_defined_symbols=<sep>,[MASK]' '--control_symbols=<ctrl>'"},
        {"unigram", "--model_type=unigram --vocab_size=400 --character_coverage=0.9995"},
        // As Llama / Mistral ship theirs: BPE, no normalization table, whitespace kept as is.
        {"llama", "--model_type=bpe --vocab_size=500 --character_coverage=0.995 --byte_fallback=true "
                  "--normalization_rule_name=identity --remove_extra_whitespaces=false "
                  "'--user_defined_symbols=<sep>,[MASK]' '--control_symbols=<ctrl>'"},
    };
    for (const M& m : models) {
      const std::string prefix = S.dir + "/" + m.name;
      const std::string log = prefix + ".log";
      int rc = std::system(("'" + train + "'" + common + "--model_prefix=" + prefix + " " + m.flags + " >'" + log +
                            "' 2>&1").c_str());
      if (rc != 0) {
        S.error = "spm_train (" + std::string(m.name) + ") failed:\n" + read_all(log);
        return;
      }
      // The reference: the tools' own ids and decodes.
      rc = std::system(("'" + enc + "' --model=" + prefix + ".model --output_format=id < '" + S.dir +
                        "/strings.txt' > '" + prefix + ".ids' 2>>'" + log + "'").c_str());
      rc |= std::system(("'" + dec + "' --model=" + prefix + ".model --input_format=id < '" + prefix + ".ids' > '" +
                         prefix + ".decoded' 2>>'" + log + "'").c_str());
      if (rc != 0) {
        S.error = "spm_encode/spm_decode (" + std::string(m.name) + ") failed:\n" + read_all(log);
        return;
      }
      // A model directory as models ship it: tokenizer.model, no tokenizer.json.
      const std::string mdir = S.dir + "/" + m.name + "-dir";
      if (std::system(("mkdir -p '" + mdir + "' && cp '" + prefix + ".model' '" + mdir + "/tokenizer.model'").c_str())) {
        S.error = "cannot create " + mdir;
        return;
      }
    }
  });
  return S;
}

#define REQUIRE_SPM(S)                                                         \
  const SpmSetup& S = setup();                                                 \
  if (!S.skip.empty()) {                                                       \
    std::fprintf(stderr, "\n*** SKIPPED: %s ***\n\n", S.skip.c_str());         \
    GTEST_SKIP() << "SKIPPED: " << S.skip;                                     \
  }                                                                            \
  ASSERT_TRUE(S.error.empty()) << S.error;

void expect_error(const std::function<void()>& f, const std::vector<std::string>& needles) {
  try {
    f();
    ADD_FAILURE() << "expected moe::Error";
  } catch (const Error& e) {
    for (auto& n : needles) EXPECT_NE(std::string(e.what()).find(n), std::string::npos) << e.what();
  }
}

// via_gguf: the tokenizer written into a GGUF file (llama.cpp's tokenizer.ggml.* keys) and read
// back, instead of the directory's tokenizer.model.
void compare_with_tools(const std::string& name, bool via_gguf = false) {
  REQUIRE_SPM(S);
  const std::string prefix = S.dir + "/" + name;
  const auto ref_ids = read_lines(prefix + ".ids");
  const auto ref_dec = read_lines(prefix + ".decoded");
  ASSERT_EQ(ref_ids.size(), S.strings.size());
  ASSERT_EQ(ref_dec.size(), S.strings.size());
  std::string src = prefix + "-dir";
  if (via_gguf) {
    std::string why;
    const std::optional<GgufVocab> v = gguf_vocab_from_dir(src, 0, &why);
    ASSERT_TRUE(v.has_value()) << why;
    EXPECT_EQ(v->model, "llama");
    GgufWriter w;
    w.set("general.architecture", GgufValue::str("llama"));
    write_gguf_vocab(w, *v);
    src = prefix + ".gguf";
    w.write(src);
  }
  Tokenizer tok = Tokenizer::from_dir(src);
  const int32_t bos = tok.bos_id().value_or(-1);
  ASSERT_GE(bos, 0);
  size_t ids_ok = 0, bos_ok = 0, dec_ok = 0, stream_ok = 0, ref_rt = 0, rt = 0, unk = 0;
  int shown = 0;
  for (size_t i = 0; i < S.strings.size(); ++i) {
    const std::string& s = S.strings[i];
    const std::vector<int32_t> want = parse_ids(ref_ids[i]);
    const std::vector<int32_t> got = tok.encode(s, false);
    ids_ok += got == want;
    if (got != want && shown++ < 5)
      ADD_FAILURE() << name << " #" << i << " " << json(s).dump() << "\n  got  " << ids_to_json(got) << "\n  want "
                    << ids_to_json(want);
    std::vector<int32_t> with_bos = {bos};
    with_bos.insert(with_bos.end(), want.begin(), want.end());
    bos_ok += tok.encode(s) == with_bos;
    for (int32_t id : want) unk += tok.id_to_token(id) == "<unk>";
    const std::string dec = tok.decode(want);
    dec_ok += dec == ref_dec[i];
    if (dec != ref_dec[i] && shown++ < 5)
      ADD_FAILURE() << name << " #" << i << " decode " << ids_to_json(want) << "\n  got  " << json(dec).dump()
                    << "\n  want " << json(ref_dec[i]).dump();
    ref_rt += ref_dec[i] == s;
    rt += dec == s && ref_dec[i] == s;
    DecodeStream ds(tok);
    std::string streamed;
    bool valid = true;
    for (int32_t id : want) {
      std::string c = ds.step(id);
      valid &= utf8_valid(c);
      streamed += c;
    }
    streamed += ds.flush();
    stream_ok += valid && streamed == dec;
  }
  const size_t n = S.strings.size();
  std::printf("[spm %s%s] %zu strings: ids %zu/%zu (spm_encode), with BOS %zu/%zu, decode %zu/%zu (spm_decode), "
              "streaming %zu/%zu, round-trips %zu (spm's own %zu), <unk> ids %zu\n",
              name.c_str(), via_gguf ? " via GGUF" : "", n, ids_ok, n, bos_ok, n, dec_ok, n, stream_ok, n, rt, ref_rt, unk);
  EXPECT_GE(n, 200u);
  EXPECT_EQ(ids_ok, n);
  EXPECT_EQ(bos_ok, n);
  EXPECT_EQ(dec_ok, n);
  EXPECT_EQ(stream_ok, n);
  EXPECT_EQ(rt, ref_rt);
  EXPECT_GT(ref_rt, n / 2);  // the comparison is not vacuous
}

TEST(TokenizerSpm, BpeMatchesSpmTools) { compare_with_tools("bpe"); }
TEST(TokenizerSpm, UnigramMatchesSpmTools) { compare_with_tools("unigram"); }
TEST(TokenizerSpm, LlamaStyleMatchesSpmTools) { compare_with_tools("llama"); }
TEST(TokenizerSpm, GgufVocabMatchesSpmTools) { compare_with_tools("llama", /*via_gguf=*/true); }

// What llama.cpp's SentencePiece tokenizer cannot reproduce is not written: a normalization
// table (spm_train's default nmt_nfkc) or a Unigram model.
TEST(TokenizerSpm, GgufVocabRefusesWhatLlamaCppWouldTokenizeDifferently) {
  REQUIRE_SPM(S);
  std::string why;
  EXPECT_FALSE(gguf_vocab_from_dir(S.dir + "/bpe-dir", 0, &why).has_value());
  EXPECT_NE(why.find("normaliz"), std::string::npos) << why;
  EXPECT_FALSE(gguf_vocab_from_dir(S.dir + "/unigram-dir", 0, &why).has_value());
  EXPECT_NE(why.find("Unigram"), std::string::npos) << why;
}

// The protobuf reader against the .vocab file spm_train wrote: every piece and score, in order.
TEST(TokenizerSpm, ModelProtoReaderMatchesVocabFile) {
  REQUIRE_SPM(S);
  for (const char* name : {"bpe", "unigram", "llama"}) {
    const std::string path = S.dir + "/" + name + ".model";
    const SpmProto p = parse_spm_proto(read_file(path), path);
    const auto vocab = read_lines(S.dir + "/" + name + ".vocab");
    ASSERT_EQ(p.pieces.size(), vocab.size()) << name;
    for (size_t id = 0; id < vocab.size(); ++id) {
      const size_t tab = vocab[id].find('\t');
      ASSERT_NE(tab, std::string::npos);
      EXPECT_EQ(p.pieces[id].piece, vocab[id].substr(0, tab)) << name << " id " << id;
      const float want = std::stof(vocab[id].substr(tab + 1));  // printed with 6 significant digits
      EXPECT_NEAR(p.pieces[id].score, want, 1e-5f * std::max(1.0f, std::fabs(want))) << name << " id " << id;
    }
    EXPECT_EQ(p.model_type, std::string(name) == "unigram" ? 1 : 2) << name;
    EXPECT_EQ(p.has_charsmap, std::string(name) != "llama") << name;
    EXPECT_EQ(p.remove_extra_whitespaces, std::string(name) != "llama") << name;
    EXPECT_EQ(p.byte_fallback, std::string(name) != "unigram") << name;
    EXPECT_EQ(p.pieces[p.unk_id].type, kSpmUnknown) << name;
    if (p.has_charsmap) continue;  // the writer does not carry normalization tables
    // Written back, SentencePiece tokenizes as with the original file.
    const Tokenizer a = Tokenizer::from_sentencepiece(path, nullptr);
    const Tokenizer b = Tokenizer::from_sentencepiece_bytes(serialize_spm_proto(p), nullptr, "re-serialized");
    for (const std::string& s : S.strings) EXPECT_EQ(a.encode(s), b.encode(s)) << json(s).dump();
  }
  expect_error([] { parse_spm_proto(std::string("\x0a\xff\xff\xff\xff\x0f", 6), "junk.model"); },
               {"junk.model", "past the end"});
}

// The piece table against the .vocab file spm_train wrote (one "piece\tscore" line per id).
TEST(TokenizerSpm, VocabularyAndSpecialIds) {
  REQUIRE_SPM(S);
  for (const char* name : {"bpe", "unigram"}) {
    const auto vocab = read_lines(S.dir + "/" + name + ".vocab");
    Tokenizer tok = Tokenizer::from_dir(S.dir + "/" + name + "-dir");
    ASSERT_EQ(tok.vocab_size(), int64_t(vocab.size())) << name;
    for (size_t id = 0; id < vocab.size(); ++id) {
      const std::string piece = vocab[id].substr(0, vocab[id].find('\t'));
      ASSERT_EQ(tok.id_to_token(int32_t(id)), piece) << name << " id " << id;
      ASSERT_EQ(tok.token_to_id(piece), std::optional<int32_t>(int32_t(id))) << name << " " << piece;
    }
    // spm_train's defaults: <unk> 0, <s> 1, </s> 2.
    EXPECT_EQ(tok.token_to_id("<unk>"), 0);
    EXPECT_EQ(tok.bos_id(), 1);
    EXPECT_EQ(tok.eos_id(), 2);
    EXPECT_TRUE(tok.is_special(0));
    EXPECT_TRUE(tok.is_special(1));
    EXPECT_TRUE(tok.is_special(2));
    EXPECT_FALSE(tok.is_special(int32_t(vocab.size()) - 1));
    EXPECT_FALSE(tok.token_to_id("no such piece").has_value());
    EXPECT_EQ(tok.id_to_token(int32_t(vocab.size())), "");
    expect_error([&] { tok.decode({int32_t(vocab.size())}); }, {"not in the vocabulary"});
    expect_error([&] { tok.decode({-1}); }, {"not in the vocabulary"});
  }
}

// Special tokens: strings in the text, BOS/EOS from tokenizer_config.json, decode.
TEST(TokenizerSpm, SpecialTokens) {
  REQUIRE_SPM(S);
  const std::string model = S.dir + "/bpe.model";
  Tokenizer tok = Tokenizer::from_sentencepiece(model, json::object());
  const auto ids = [&](const std::string& s) { return tok.encode(s, false); };
  const int32_t bos = 1, eos = 2, ctrl = tok.token_to_id("<ctrl>").value_or(-1);
  ASSERT_GE(ctrl, 3);
  EXPECT_TRUE(tok.is_special(ctrl));
  const auto hello = ids("hello world"), dog = ids("dog");
  // Control pieces in the text become their ids; the text between is encoded on its own.
  std::vector<int32_t> want = {bos};
  want.insert(want.end(), hello.begin(), hello.end());
  want.push_back(ctrl);
  want.insert(want.end(), dog.begin(), dog.end());
  want.push_back(eos);
  EXPECT_EQ(ids("<s>hello world<ctrl>dog</s>"), want);
  // Default: BOS, no EOS.
  std::vector<int32_t> with_bos = {bos};
  with_bos.insert(with_bos.end(), hello.begin(), hello.end());
  EXPECT_EQ(tok.encode("hello world"), with_bos);
  // Decode writes special tokens as text unless skipped.
  EXPECT_EQ(tok.decode(want), "<s>hello world<ctrl>dog</s>");
  EXPECT_EQ(tok.decode(want, true), "hello worlddog");
  // The unknown piece: SentencePiece's " ⁇ ", dropped when skipping special tokens.
  EXPECT_EQ(tok.decode({0}), " \xE2\x81\x87 ");
  EXPECT_EQ(tok.decode({0}, true), "");
  EXPECT_EQ(tok.encode("<unk>", false), std::vector<int32_t>{0});

  // tokenizer_config.json: no BOS, EOS, an added token beyond the model's pieces.
  const json cfg = {{"add_bos_token", false},
                    {"add_eos_token", true},
                    {"added_tokens_decoder", {{"500", {{"content", "<|im_end|>"}, {"special", true}}},
                                              {"501", {{"content", "<tool>"}, {"special", false}}}}}};
  Tokenizer t2 = Tokenizer::from_sentencepiece(model, cfg);
  EXPECT_EQ(t2.vocab_size(), 502);
  std::vector<int32_t> w2 = hello;
  w2.push_back(500);
  w2.push_back(501);
  w2.insert(w2.end(), dog.begin(), dog.end());
  w2.push_back(eos);
  EXPECT_EQ(t2.encode("hello world<|im_end|><tool>dog"), w2);
  EXPECT_EQ(t2.decode(w2), "hello world<|im_end|><tool>dog</s>");
  EXPECT_EQ(t2.decode(w2, true), "hello world<tool>dog");
  EXPECT_TRUE(t2.is_special(500));
  EXPECT_FALSE(t2.is_special(501));
  EXPECT_EQ(t2.id_to_token(500), "<|im_end|>");
  EXPECT_EQ(t2.token_to_id("<tool>"), 501);

  // bos_token / eos_token in the config name the ids.
  Tokenizer t3 = Tokenizer::from_sentencepiece(model, {{"bos_token", "<ctrl>"}, {"eos_token", {{"content", "</s>"}}}});
  EXPECT_EQ(t3.bos_id(), ctrl);
  EXPECT_EQ(t3.eos_id(), eos);
  EXPECT_EQ(t3.encode("dog").front(), ctrl);
  expect_error([&] { Tokenizer::from_sentencepiece(model, {{"bos_token", "<nope>"}}); },
               {"bos_token", "<nope>", "not in the vocabulary"});
  expect_error([&] { Tokenizer::from_sentencepiece(model, {{"added_tokens_decoder", {{"x1", {{"content", "a"}}}}}}); },
               {"added_tokens_decoder", "x1"});

  // Invalid UTF-8 input is made valid first (as for tokenizer.json tokenizers).
  EXPECT_EQ(tok.encode("a\xFF" "b", false), ids("a\xEF\xBF\xBD" "b"));
}

TEST(TokenizerSpm, CorruptModelFiles) {
  REQUIRE_SPM(S);
  const std::string good = read_all(S.dir + "/bpe.model");
  ASSERT_GT(good.size(), 1000u);
  const std::string d = S.dir + "/corrupt";
  ASSERT_EQ(std::system(("mkdir -p '" + d + "'").c_str()), 0);
  const std::string path = d + "/tokenizer.model";
  struct Case {
    const char* what;
    std::string bytes;
    std::vector<std::string> needles;
  };
  const Case cases[] = {
      {"empty", "", {path, "empty"}},
      {"text", "this is not a SentencePiece model\n", {path, "not a valid SentencePiece model"}},
      {"truncated by one byte", good.substr(0, good.size() - 1), {path, "not a valid SentencePiece model"}},
      {"truncated to half", good.substr(0, good.size() / 2 + 3), {path, "not a valid SentencePiece model"}},
      {"binary junk", std::string("\x0a\xff\xff\xff\xff\x0f\x01\x02", 8), {path, "not a valid SentencePiece model"}},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    write_all(path, c.bytes);
    expect_error([&] { Tokenizer::from_dir(d); }, c.needles);
  }
  expect_error([&] { Tokenizer::from_sentencepiece(d + "/missing.model", json::object()); },
               {"missing.model", "cannot open"});
  // Neither tokenizer.json nor tokenizer.model.
  std::remove(path.c_str());
  expect_error([&] { Tokenizer::from_dir(d); }, {"tokenizer.json", "tokenizer.model"});
  // A malformed tokenizer_config.json next to a good model.
  write_all(path, good);
  write_all(d + "/tokenizer_config.json", "{ not json");
  expect_error([&] { Tokenizer::from_dir(d); }, {"tokenizer_config.json", "malformed JSON"});
  write_all(d + "/tokenizer_config.json", "{\"add_bos_token\": false}");
  EXPECT_EQ(Tokenizer::from_dir(d).encode("dog"), Tokenizer::from_dir(d).encode("dog", false));
}

}  // namespace
}  // namespace moe
