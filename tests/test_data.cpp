// test_data.cpp — training data (train/data.h): the three corpus formats, packing and labels, the
// seeded validation split, the batch sampler (order, shuffle by seed, resume from its state),
// gather_batch, and every class of bad input.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <numeric>
#include <set>

#include "io/safetensors.h"
#include "tokenizer/tokenizer.h"
#include "train/data.h"

namespace fs = std::filesystem;
using namespace moe;

namespace {

void expect_error(const std::function<void()>& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "expected moe::Error";
}

class DataTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/moe_data_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string write(const std::string& name, const std::string& bytes) {
    const std::string p = dir_ + "/" + name;
    std::ofstream(p, std::ios::binary) << bytes;
    return p;
  }
  std::string dir_;
};

// A byte-level tokenizer whose EOS is "<eos>" (id 256).
Tokenizer eos_tokenizer() {
  return Tokenizer::from_json(Tokenizer::byte_level_json({"<eos>"}), {{"eos_token", "<eos>"}}, "test tokenizer");
}

std::vector<int32_t> bytes_of(const std::string& s) { return std::vector<int32_t>(s.begin(), s.end()); }

std::vector<int32_t> row_of(const TokenRows& r, int64_t i) {
  return std::vector<int32_t>(r.input_ids.begin() + i * r.seq, r.input_ids.begin() + (i + 1) * r.seq);
}

Tensor i32_tensor(const Shape& shape, const std::vector<int32_t>& v) {
  Tensor t = Tensor::empty(shape, DType::I32, MemCategory::Workspace);
  std::copy(v.begin(), v.end(), t.data<int32_t>());
  return t;
}

// ---- formats and packing ----

TEST_F(DataTest, PlainTextIsPackedIntoRowsOfBytesWithLabelsEqualToInputs) {
  const std::string text = "In the beginning God created the heaven and the earth.\n";  // 55 bytes
  const std::string p = write("corpus.txt", text);
  DataOptions o;
  o.seq_len = 8;
  o.val_fraction = 0;
  const Dataset ds = load_dataset(p, nullptr, o);
  EXPECT_EQ(ds.n_tokens, int64_t(text.size()));
  EXPECT_EQ(ds.train.n, int64_t(text.size()) / 8);  // the 7-byte tail is dropped
  EXPECT_EQ(ds.train.seq, 8);
  EXPECT_EQ(ds.val.n, 0);
  EXPECT_NE(ds.source.find("text"), std::string::npos);
  const auto all = bytes_of(text);
  EXPECT_EQ(ds.train.input_ids, std::vector<int32_t>(all.begin(), all.begin() + ds.train.n * 8));
  EXPECT_EQ(ds.train.labels, ds.train.input_ids);  // HF semantics: not shifted
}

TEST_F(DataTest, MaxTokensCutsTheStream) {
  const std::string p = write("c.txt", std::string(1000, 'a'));
  DataOptions o;
  o.seq_len = 10;
  o.val_fraction = 0;
  o.max_tokens = 95;
  const Dataset ds = load_dataset(p, nullptr, o);
  EXPECT_EQ(ds.train.n, 9);
}

TEST_F(DataTest, JsonlDocumentsAreJoinedWithEos) {
  const std::string p = write("docs.jsonl", "{\"text\": \"abc\"}\n\n{\"text\": \"de\", \"id\": 7}\r\n{\"text\":\"f\"}");
  const Tokenizer tok = eos_tokenizer();
  ASSERT_EQ(tok.eos_id(), std::optional<int32_t>(256));
  DataOptions o;
  o.seq_len = 4;
  o.val_fraction = 0;
  const Dataset ds = load_dataset(p, &tok, o);
  EXPECT_NE(ds.source.find("jsonl"), std::string::npos);
  EXPECT_EQ(ds.n_documents, 3);
  EXPECT_EQ(ds.n_tokens, 8);  // abc <eos> de <eos> f
  ASSERT_EQ(ds.train.n, 2);
  EXPECT_EQ(ds.train.input_ids, (std::vector<int32_t>{'a', 'b', 'c', 256, 'd', 'e', 256, 'f'}));
}

TEST_F(DataTest, JsonlWithoutEosOrByContent) {
  // No .jsonl extension: recognised by its first line. The byte-level tokenizer has no EOS.
  const std::string p = write("docs.data", "{\"text\": \"abcd\"}\n{\"text\": \"efgh\"}\n");
  DataOptions o;
  o.seq_len = 4;
  o.val_fraction = 0;
  const Dataset ds = load_dataset(p, nullptr, o);
  EXPECT_NE(ds.source.find("jsonl"), std::string::npos);
  EXPECT_EQ(ds.train.input_ids, bytes_of("abcdefgh"));
  // A text file that merely starts with '{' is plain text.
  const std::string q = write("brace.txt", "{ not json at all }\n");
  const Dataset t = load_dataset(q, nullptr, o);
  EXPECT_NE(t.source.find("text"), std::string::npos);
  EXPECT_EQ(row_of(t.train, 0), bytes_of("{ no"));
}

TEST_F(DataTest, TextUsesTheGivenTokenizer) {
  // Special-token strings in the text become their ids (HF encode semantics).
  const std::string p = write("c.txt", "ab<eos>cd");
  const Tokenizer tok = eos_tokenizer();
  DataOptions o;
  o.seq_len = 5;
  o.val_fraction = 0;
  const Dataset ds = load_dataset(p, &tok, o);
  EXPECT_EQ(ds.train.input_ids, (std::vector<int32_t>{'a', 'b', 256, 'c', 'd'}));
}

TEST_F(DataTest, PretokenizedSafetensorsI32AndI64) {
  std::vector<int32_t> ids(3 * 4), labels(3 * 4);
  std::iota(ids.begin(), ids.end(), 10);
  for (size_t i = 0; i < labels.size(); ++i) labels[i] = i % 4 == 0 ? kIgnoreLabel : ids[i];
  const std::string p = dir_ + "/batch.safetensors";
  write_safetensors(p, {{"input_ids", i32_tensor({3, 4}, ids)}, {"labels", i32_tensor({3, 4}, labels)}});
  DataOptions o;
  o.seq_len = 0;  // take the file's S
  o.val_fraction = 0;
  Dataset ds = load_dataset(p, nullptr, o);
  EXPECT_NE(ds.source.find("safetensors"), std::string::npos);
  EXPECT_EQ(ds.train.n, 3);
  EXPECT_EQ(ds.train.seq, 4);
  EXPECT_EQ(ds.train.input_ids, ids);
  EXPECT_EQ(ds.train.labels, labels);
  EXPECT_EQ(ds.val.n, 0);

  // i64 without labels: labels = input_ids; recognised by content despite the extension.
  Tensor t64 = Tensor::empty({2, 3}, DType::I64, MemCategory::Workspace);
  for (int i = 0; i < 6; ++i) t64.data<int64_t>()[i] = 100 + i;
  const std::string q = dir_ + "/ids.bin";
  write_safetensors(q, {{"input_ids", t64}});
  o.seq_len = 3;
  ds = load_dataset(q, nullptr, o);
  EXPECT_EQ(ds.train.input_ids, (std::vector<int32_t>{100, 101, 102, 103, 104, 105}));
  EXPECT_EQ(ds.train.labels, ds.train.input_ids);
}

TEST(Data, FixtureBatchLoadsAsWritten) {
  // The reference batch written by PyTorch: i64 [2,16] input_ids and labels with labels[1,:4] = -100.
  const std::string path = std::string(MOE_FIXTURES_DIR) + "/mixtral/batch.safetensors";
  DataOptions o;
  o.val_fraction = 0;
  const Dataset ds = load_dataset(path, nullptr, o);
  ASSERT_EQ(ds.train.n, 2);
  ASSERT_EQ(ds.train.seq, 16);
  auto f = SafetensorsFile::open(path);
  const Tensor ids = f->tensor("input_ids"), labels = f->tensor("labels");
  ASSERT_EQ(ids.dtype(), DType::I64);
  for (int64_t i = 0; i < 32; ++i) {
    EXPECT_EQ(int64_t(ds.train.input_ids[size_t(i)]), ids.data<int64_t>()[i]) << i;
    EXPECT_EQ(int64_t(ds.train.labels[size_t(i)]), labels.data<int64_t>()[i]) << i;
  }
  for (int t = 0; t < 4; ++t) EXPECT_EQ(ds.train.labels[size_t(16 + t)], kIgnoreLabel);
}

// ---- validation split ----

TEST_F(DataTest, ValidationSplitIsDisjointDeterministicAndSeeded) {
  std::string text;  // 100 distinct rows of 8 bytes: "0000000\n", "0000001\n", ...
  for (int i = 0; i < 100; ++i) {
    char row[16];
    std::snprintf(row, sizeof row, "%07d\n", i);
    text += row;
  }
  const std::string p = write("c.txt", text);
  DataOptions o;
  o.seq_len = 8;
  o.val_fraction = 0.1;
  o.seed = 1;
  const Dataset a = load_dataset(p, nullptr, o), b = load_dataset(p, nullptr, o);
  EXPECT_EQ(a.train.n, 90);
  EXPECT_EQ(a.val.n, 10);
  EXPECT_EQ(a.train.input_ids, b.train.input_ids);
  EXPECT_EQ(a.val.input_ids, b.val.input_ids);
  // Disjoint, and together every row exactly once.
  std::multiset<std::vector<int32_t>> rows;
  for (int64_t i = 0; i < a.train.n; ++i) rows.insert(row_of(a.train, i));
  for (int64_t i = 0; i < a.val.n; ++i) {
    EXPECT_EQ(rows.count(row_of(a.val, i)), 0u) << "validation row " << i << " is also a training row";
    rows.insert(row_of(a.val, i));
  }
  std::multiset<std::vector<int32_t>> expected;
  for (int i = 0; i < 100; ++i) expected.insert(bytes_of(text.substr(size_t(i) * 8, 8)));
  EXPECT_EQ(rows, expected);
  // Another seed picks other rows.
  o.seed = 2;
  const Dataset c = load_dataset(p, nullptr, o);
  EXPECT_EQ(c.val.n, 10);
  EXPECT_NE(c.val.input_ids, a.val.input_ids);
  // At least one validation row when asked for, at least one training row always.
  o.val_fraction = 0.001;
  EXPECT_EQ(load_dataset(p, nullptr, o).val.n, 1);
  const std::string two = write("two.txt", std::string(16, 'x'));
  o.val_fraction = 0.9;
  const Dataset d = load_dataset(two, nullptr, o);
  EXPECT_EQ(d.train.n, 1);
  EXPECT_EQ(d.val.n, 1);
}

// ---- sampler ----

TEST(BatchSampler, InOrderWithoutShuffleWrapsAtEpochEnd) {
  BatchSampler s(10, 4, 123, false);
  std::vector<int64_t> rows;
  s.next(&rows);
  EXPECT_EQ(rows, (std::vector<int64_t>{0, 1, 2, 3}));
  s.next(&rows);
  EXPECT_EQ(rows, (std::vector<int64_t>{4, 5, 6, 7}));
  s.next(&rows);
  EXPECT_EQ(rows, (std::vector<int64_t>{8, 9, 0, 1}));
  EXPECT_EQ(s.epoch(), 1);
}

TEST(BatchSampler, ShuffleIsAPermutationPerEpochDeterminedBySeed) {
  const int64_t n = 37;
  auto epochs = [&](uint64_t seed, int n_epochs) {
    BatchSampler s(n, n, seed, true);  // batch = one epoch
    std::vector<std::vector<int64_t>> out(static_cast<size_t>(n_epochs));
    for (auto& e : out) s.next(&e);
    return out;
  };
  const auto a = epochs(7, 3), b = epochs(7, 3), c = epochs(8, 3);
  EXPECT_EQ(a, b);
  EXPECT_NE(a[0], c[0]);
  std::vector<int64_t> identity(n);
  std::iota(identity.begin(), identity.end(), 0);
  for (const auto& e : a) {
    auto sorted = e;
    std::sort(sorted.begin(), sorted.end());
    EXPECT_EQ(sorted, identity);  // every row once per epoch
    EXPECT_NE(e, identity);
  }
  EXPECT_NE(a[0], a[1]);  // a new order each epoch
}

TEST(BatchSampler, RestoredStateContinuesIdentically) {
  for (bool shuffle : {false, true}) {
    BatchSampler full(23, 5, 99, shuffle);
    std::vector<std::vector<int64_t>> expected(12);
    for (auto& r : expected) full.next(&r);

    BatchSampler first(23, 5, 99, shuffle);
    std::vector<int64_t> rows;
    for (int i = 0; i < 7; ++i) first.next(&rows);  // crosses an epoch boundary
    const std::string saved = first.state().dump();
    BatchSampler resumed(23, 5, 99, shuffle);
    resumed.restore(nlohmann::json::parse(saved));
    for (int i = 7; i < 12; ++i) {
      resumed.next(&rows);
      EXPECT_EQ(rows, expected[size_t(i)]) << "shuffle " << shuffle << " batch " << i;
    }
  }
}

TEST(BatchSampler, RestoreRejectsAnotherConfiguration) {
  BatchSampler a(23, 5, 99, true);
  const nlohmann::json st = a.state();
  expect_error([&] { BatchSampler(24, 5, 99, true).restore(st); }, {"23", "24", "rows"});
  expect_error([&] { BatchSampler(23, 4, 99, true).restore(st); }, {"batch size"});
  expect_error([&] { BatchSampler(23, 5, 98, true).restore(st); }, {"seed"});
  expect_error([&] { BatchSampler(23, 5, 99, false).restore(st); }, {"shuffle"});
  nlohmann::json bad = st;
  bad.erase("position");
  expect_error([&] { BatchSampler(23, 5, 99, true).restore(bad); }, {"position"});
  expect_error([] { BatchSampler(0, 5, 1, true); }, {"no training rows"});
  expect_error([] { BatchSampler(5, 0, 1, true); }, {"batch size"});
}

TEST_F(DataTest, GatherBatchCopiesRows) {
  const std::string p = write("c.txt", "aaaabbbbccccdddd");
  DataOptions o;
  o.seq_len = 4;
  o.val_fraction = 0;
  const Dataset ds = load_dataset(p, nullptr, o);
  Tensor ids, labels;
  gather_batch(ds.train, {2, 0}, &ids, &labels);
  ASSERT_EQ(ids.shape(), Shape({2, 4}));
  EXPECT_EQ(ids.dtype(), DType::I32);
  EXPECT_EQ(labels.shape(), Shape({2, 4}));
  const int32_t* d = ids.data<int32_t>();
  EXPECT_EQ(std::vector<int32_t>(d, d + 8), bytes_of("ccccaaaa"));
  const void* before = ids.raw();
  gather_batch(ds.train, {3, 1}, &ids, &labels);  // same shape: buffers reused
  EXPECT_EQ(ids.raw(), before);
  EXPECT_EQ(std::vector<int32_t>(labels.data<int32_t>(), labels.data<int32_t>() + 8), bytes_of("ddddbbbb"));
  expect_error([&] { gather_batch(ds.train, {4}, &ids, &labels); }, {"row 4"});
}

// ---- bad input ----

TEST_F(DataTest, MalformedJsonlNamesFileAndLine) {
  DataOptions o;
  o.seq_len = 2;
  const std::string p = write("bad.jsonl", "{\"text\": \"ok\"}\n\n{\"text\": \"also ok\"}\n{\"text\": oops}\n");
  expect_error([&] { load_dataset(p, nullptr, o); }, {p + ":4", "malformed JSON"});
  const std::string q = write("nofield.jsonl", "{\"text\": \"ok\"}\n{\"body\": \"x\"}\n");
  expect_error([&] { load_dataset(q, nullptr, o); }, {q + ":2", "\"text\""});
  const std::string r = write("notstring.jsonl", "{\"text\": 5}\n");
  expect_error([&] { load_dataset(r, nullptr, o); }, {r + ":1", "string"});
  const std::string s = write("array.jsonl", "{\"text\": \"a\"}\n[1,2]\n");
  expect_error([&] { load_dataset(s, nullptr, o); }, {s + ":2", "object"});
}

TEST_F(DataTest, EmptyCorpusIsAnError) {
  DataOptions o;
  o.seq_len = 4;
  const std::string e = write("empty.txt", "");
  expect_error([&] { load_dataset(e, nullptr, o); }, {e, "empty corpus"});
  const std::string w = write("ws.txt", " \n\t\n  \r\n");
  expect_error([&] { load_dataset(w, nullptr, o); }, {w, "empty corpus"});
  const std::string j = write("empty.jsonl", "\n\n");
  expect_error([&] { load_dataset(j, nullptr, o); }, {j, "empty corpus"});
  const std::string k = write("blank_texts.jsonl", "{\"text\": \"\"}\n{\"text\": \"  \"}\n");
  expect_error([&] { load_dataset(k, nullptr, o); }, {k, "empty corpus"});
  expect_error([&] { load_dataset(dir_ + "/missing.txt", nullptr, o); }, {"missing.txt", "cannot open"});
}

TEST_F(DataTest, CorpusSmallerThanOneRowNamesTheSizes) {
  const std::string p = write("small.txt", "hello");
  DataOptions o;
  o.seq_len = 64;
  expect_error([&] { load_dataset(p, nullptr, o); }, {p, "5 tokens", "64"});
  o.seq_len = 0;
  expect_error([&] { load_dataset(p, nullptr, o); }, {p, "sequence length"});
}

TEST_F(DataTest, BadPretokenizedFiles) {
  DataOptions o;
  o.val_fraction = 0;
  const std::string p = dir_ + "/x.safetensors";
  write_safetensors(p, {{"tokens", i32_tensor({1, 2}, {1, 2})}});
  expect_error([&] { load_dataset(p, nullptr, o); }, {p, "input_ids"});
  write_safetensors(p, {{"input_ids", i32_tensor({2}, {1, 2})}});
  expect_error([&] { load_dataset(p, nullptr, o); }, {p, "[N,S]"});
  write_safetensors(p, {{"input_ids", Tensor::from_f32({1, 2}, {1, 2})}});
  expect_error([&] { load_dataset(p, nullptr, o); }, {p, "input_ids", "I32 or I64"});
  write_safetensors(p, {{"input_ids", i32_tensor({1, 2}, {1, 2})}, {"labels", i32_tensor({1, 3}, {1, 2, 3})}});
  expect_error([&] { load_dataset(p, nullptr, o); }, {p, "labels", "[1,3]"});
  write_safetensors(p, {{"input_ids", i32_tensor({1, 2}, {1, 2})}});
  o.seq_len = 4;
  expect_error([&] { load_dataset(p, nullptr, o); }, {p, "2 tokens", "4"});
  o.seq_len = 0;
  write_safetensors(p, {{"input_ids", i32_tensor({1, 2}, {1, -3})}});
  expect_error([&] { load_dataset(p, nullptr, o); }, {p, "input_ids[0,1] = -3"});
  write_safetensors(p, {{"input_ids", i32_tensor({1, 2}, {1, 300})}});
  o.vocab_size = 256;
  expect_error([&] { load_dataset(p, nullptr, o); }, {p, "input_ids[0,1] = 300", "256"});
  write_safetensors(p, {{"input_ids", i32_tensor({1, 2}, {1, 2})}, {"labels", i32_tensor({1, 2}, {-100, -5})}});
  expect_error([&] { load_dataset(p, nullptr, o); }, {p, "labels[0,1] = -5"});
  // A text corpus whose tokens exceed the model's vocabulary.
  const std::string t = write("t.txt", "abcdefgh");
  o.vocab_size = 64;  // 'a' = 97
  o.seq_len = 4;
  expect_error([&] { load_dataset(t, nullptr, o); }, {t, "97", "64"});
}

}  // namespace
