// test_tokenizer.cpp — tokenizer unit tests that need no reference data: the byte-level
// tokenizer, the regex engine, bad input (malformed tokenizer.json, unsupported components,
// template errors) and streaming decode. The comparisons with the JavaScript reference on real
// tokenizer files are in test_tokenizer_reference.cpp.
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/jinja.h"
#include "tokenizer/regex.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

namespace moe {
namespace {

using json = nlohmann::json;

std::vector<std::string> regex_split(const char* pattern, const std::string& text) {
  Regex re(pattern);
  std::vector<uint32_t> cps;
  std::vector<size_t> offs;
  for (size_t i = 0; i < text.size();) {
    offs.push_back(i);
    cps.push_back(utf8_next(text, i));
  }
  offs.push_back(text.size());
  std::vector<std::string> out;
  size_t from = 0, b, e;
  while (re.find(cps, from, &b, &e)) {
    out.push_back(text.substr(offs[b], offs[e] - offs[b]));
    from = e > b ? e : b + 1;
  }
  return out;
}

void expect_error(const std::function<void()>& f, const std::string& needle) {
  try {
    f();
    ADD_FAILURE() << "expected moe::Error containing '" << needle << "'";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(needle), std::string::npos) << e.what();
  }
}

TEST(Tokenizer, ByteLevelRoundTrip) {
  Tokenizer tok = Tokenizer::byte_level({"<|bos|>", "<|eos|>"});
  EXPECT_EQ(tok.vocab_size(), 258);
  const std::string s = "héllo 世界 🎉\n\t<|eos|>x";
  const auto ids = tok.encode(s);
  std::vector<int32_t> want;
  for (unsigned char c : std::string("héllo 世界 🎉\n\tx")) want.push_back(c);
  want.insert(want.end() - 1, 257);
  EXPECT_EQ(ids, want);
  EXPECT_EQ(tok.decode(ids), s);
  EXPECT_EQ(tok.decode({257, 'a'}, /*skip_special_tokens=*/true), "a");
  EXPECT_TRUE(tok.is_special(256));
  // Its tokenizer.json loads like any other.
  Tokenizer again = Tokenizer::from_json(Tokenizer::byte_level_json({"<|bos|>"}), json::object());
  EXPECT_EQ(again.encode("ab"), (std::vector<int32_t>{'a', 'b'}));
  // Invalid UTF-8 input becomes U+FFFD.
  EXPECT_EQ(tok.decode(tok.encode("a\xff" "b")), "a\xEF\xBF\xBD" "b");
}

TEST(Tokenizer, DecodeStreamNeverSplitsUtf8) {
  Tokenizer tok = Tokenizer::byte_level({});
  const std::string s = "aé世🎉z";
  DecodeStream ds(tok);
  std::string all;
  for (int32_t id : tok.encode(s)) {
    const std::string part = ds.step(id);
    EXPECT_TRUE(utf8_valid(part));
    all += part;
  }
  all += ds.flush();
  EXPECT_EQ(all, s);
  // A truncated sequence is released by flush() as U+FFFD.
  DecodeStream ds2(tok);
  EXPECT_EQ(ds2.step(0xE4), "");
  EXPECT_EQ(ds2.flush(), "\xEF\xBF\xBD");
}

TEST(Tokenizer, RegexEngine) {
  EXPECT_EQ(regex_split("\\p{N}{1,3}", "12345a6"), (std::vector<std::string>{"123", "45", "6"}));
  EXPECT_EQ(regex_split("(?i:'s|'t)|\\p{L}+", "IT'S it's"), (std::vector<std::string>{"IT", "'S", "it", "'s"}));
  EXPECT_EQ(regex_split("\\s+(?!\\S)|\\s+", "a   b"), (std::vector<std::string>{"  ", " "}));
  EXPECT_EQ(regex_split("[一-龥぀-ゟ]+", "ab日本語ひらがなc"), (std::vector<std::string>{"日本語ひらがな"}));
  EXPECT_EQ(regex_split("a+?b", "aaab"), (std::vector<std::string>{"aaab"}));
  EXPECT_EQ(regex_split("[^\\s\\p{L}]+", "ab!? c1"), (std::vector<std::string>{"!?", "1"}));
  // First-character dispatch (guards) must not skip branches that can match.
  EXPECT_EQ(regex_split("(?:ab)+|c", "ababc abx"), (std::vector<std::string>{"abab", "c", "ab"}));
  EXPECT_EQ(regex_split("(?:|a)b", "ab b"), (std::vector<std::string>{"ab", "b"}));
  EXPECT_EQ(regex_split("(?=a)\\p{L}+|b", "ba ab"), (std::vector<std::string>{"b", "a", "ab"}));
  EXPECT_EQ(regex_split("(?:ab){1,2}c|a", "ababcabc a"), (std::vector<std::string>{"ababc", "abc", "a"}));
  EXPECT_EQ(regex_split("[😀-🙏]+|x", "a😀😁x"), (std::vector<std::string>{"😀😁", "x"}));
  EXPECT_EQ(regex_split("x?$|y", "ay"), (std::vector<std::string>{"y", ""}));  // as JavaScript
  expect_error([] { Regex r("(?<=a)b"); }, "lookbehind");
  expect_error([] { Regex r("\\p{Han}"); }, "\\p{Han}");
  expect_error([] { Regex r("(a"); }, "missing ')'");
  expect_error([] { Regex r("a++"); }, "possessive");
  expect_error([] { Regex r("\\1"); }, "backreference");
}

TEST(Tokenizer, Nfc) {
  EXPECT_EQ(nfc("e\xCC\x81"), "\xC3\xA9");                  // e + U+0301 -> é
  EXPECT_EQ(nfc("\xE1\x84\x80\xE1\x85\xA1"), "\xEA\xB0\x80");  // Hangul L+V -> 가
  EXPECT_EQ(nfc("abc"), "abc");
}

// nfc_quick_check answering true must mean the string is in NFC: every code point alone, and
// after a few bases. U+212B (NFC_QC = No) in front forces nfc() through the full algorithm.
TEST(Tokenizer, NfcQuickCheckIsSound) {
  const std::string force = "\xE2\x84\xAB ", forced = "\xC3\x85 ";  // U+212B -> U+00C5
  ASSERT_FALSE(nfc_quick_check(force));
  const char* bases[] = {"", "a", "e", "A", "\xD0\xB8" /* и */, "\xCE\xB1" /* α */, "\xE1\x84\x80" /* L jamo */,
                         "\xEA\xB0\x80" /* 가 */, "\xE0\xA4\x95" /* क */, "\xE3\x81\x8B" /* か */};
  size_t yes = 0, bad = 0;
  for (const char* base : bases) {
    const uint32_t limit = *base ? 0x10000 : 0x110000;
    for (uint32_t cp = 1; cp < limit; ++cp) {
      if (cp >= 0xD800 && cp < 0xE000) continue;
      std::string s = base;
      utf8_append(s, cp);
      if (!nfc_quick_check(s)) continue;
      ++yes;
      if (nfc(force + s) != forced + s && bad++ < 5) ADD_FAILURE() << "quick check says NFC: U+" << std::hex << cp << " after '" << base << "'";
    }
  }
  EXPECT_EQ(bad, 0u);
  EXPECT_GT(yes, 500000u);
  EXPECT_FALSE(nfc_quick_check("e\xCC\x81"));  // may compose
  EXPECT_FALSE(nfc_quick_check("\xE2\x84\xAB"));  // singleton
}

json minimal_bpe() {
  return json::parse(R"({
    "added_tokens": [{"id": 3, "content": "<s>", "special": true}],
    "normalizer": null, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true},
    "post_processor": null, "decoder": {"type": "ByteLevel"},
    "model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}})");
}

// Text-mode BPE splits words where no merge can cross (no merge result holds the pair): the ids
// must be those of the merge loop over the whole word.
TEST(Tokenizer, BpeSplitAtUncrossableBoundaries) {
  const json tj = json::parse(R"({
    "normalizer": null, "pre_tokenizer": null, "post_processor": null, "decoder": null,
    "model": {"type": "BPE", "vocab": {"\u2581": 0, "a": 1, "b": 2, "ab": 3, "b\u2581": 4, "\u2581a": 5, "\u2581ab": 6},
              "merges": ["b \u2581", "a b", "\u2581 a", "\u2581 ab"]}})");
  Tokenizer tok = Tokenizer::from_json(tj, json::object());
  // ▁ab▁a: b▁ (rank 0) first, then ▁a; the b|▁ boundary is crossable, a|a is not.
  EXPECT_EQ(tok.encode("\xE2\x96\x81" "ab" "\xE2\x96\x81" "aa"), (std::vector<int32_t>{5, 4, 1, 1}));
  EXPECT_EQ(tok.encode("aab" "\xE2\x96\x81" "ab"), (std::vector<int32_t>{1, 1, 4, 3}));
}

TEST(Tokenizer, MinimalBpe) {
  Tokenizer tok = Tokenizer::from_json(minimal_bpe(), json::object());
  EXPECT_EQ(tok.encode("abab<s>a"), (std::vector<int32_t>{2, 2, 3, 0}));
  EXPECT_EQ(tok.decode({2, 3, 0}), "ab<s>a");
}

TEST(Tokenizer, BadInput) {
  const std::string dir = std::string(MOE_BINARY_DIR) + "/tokenizer-bad-input";
  std::system(("mkdir -p '" + dir + "'").c_str());
  std::ofstream(dir + "/tokenizer.json") << "{\"model\": {\"type\": \"BPE\", \"vocab\": ";
  expect_error([&] { Tokenizer::from_dir(dir); }, "malformed JSON");
  expect_error([] { Tokenizer::from_dir("/nonexistent-dir"); }, "cannot open /nonexistent-dir/tokenizer.json");

  json j = minimal_bpe();
  j["model"]["type"] = "Unigram";
  expect_error([&] { Tokenizer::from_json(j, json::object()); }, "model type 'Unigram' is not supported");
  j = minimal_bpe();
  j["model"]["merges"] = json::array({"a c"});
  expect_error([&] { Tokenizer::from_json(j, json::object()); }, "token 'c' is not in the vocabulary");
  j = minimal_bpe();
  j["normalizer"] = {{"type", "NFKC"}};
  expect_error([&] { Tokenizer::from_json(j, json::object()); }, "normalizer type 'NFKC' is not supported");
  j = minimal_bpe();
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(?<=x)"}}}, {"behavior", "Isolated"}};
  expect_error([&] { Tokenizer::from_json(j, json::object()); }, "lookbehind");
  j = minimal_bpe();
  j["model"]["vocab"]["a"] = "zero";
  expect_error([&] { Tokenizer::from_json(j, json::object()); }, "model.vocab['a'] must be an integer id");
  j = minimal_bpe();
  j.erase("model");
  expect_error([&] { Tokenizer::from_json(j, json::object()); }, "no \"model\"");
  Tokenizer tok = Tokenizer::from_json(minimal_bpe(), json::object());
  expect_error([&] { tok.decode({42}); }, "token id 42 is not in the vocabulary");
}

TEST(Tokenizer, TemplateErrors) {
  const nlohmann::ordered_json ctx = {{"items", {1, 2}}};
  expect_error([&] { JinjaTemplate("{{ raise_exception('no system role') }}").render(ctx); }, "no system role");
  expect_error([&] { JinjaTemplate t("{% for x in items %}{{ x }}"); }, "missing {% endfor %}");
  expect_error([&] { JinjaTemplate t("{% include 'other.jinja' %}"); }, "unsupported statement '{% include %}'");
  expect_error([&] { JinjaTemplate("{{ items | frobnicate }}").render(ctx); }, "unsupported filter 'frobnicate'");
  expect_error([&] { JinjaTemplate("{{ 'a'.zfill(3) }}").render(ctx); }, "'.zfill()'");
  expect_error([&] { JinjaTemplate("{{ items is frob }}").render(ctx); }, "unknown test 'frob'");
  expect_error([&] { JinjaTemplate t("{{ 'unterminated }}"); }, "unterminated string");
  EXPECT_EQ(JinjaTemplate("{%- for x in items -%} {{ x }}{{ ',' if not loop.last }} {%- endfor %}").render(ctx), "1,2");
  expect_error([] { ChatTemplate::from_dir("/nonexistent-dir"); }, "no chat template");
}

}  // namespace
}  // namespace moe
