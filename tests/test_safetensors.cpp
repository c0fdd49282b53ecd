// test_safetensors.cpp — safetensors reader/writer and Checkpoint: round trips, the reference
// fixtures, sharded checkpoints, and every class of bad input the reader must reject with a
// message naming the file and the problem.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <random>

#include "io/safetensors.h"

namespace fs = std::filesystem;
using namespace moe;

namespace {

// Runs fn, expecting a moe::Error whose message contains every one of `parts`.
void expect_error(const std::function<void()>& fn, std::initializer_list<const char*> parts) {
  try {
    fn();
  } catch (const Error& e) {
    std::string msg = e.what();
    for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "expected moe::Error";
}

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good());
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// A raw file image: 8-byte length, the header text as given, then `data_bytes` zero bytes.
std::string make_image(const std::string& header, size_t data_bytes) {
  uint64_t n = header.size();
  std::string s(reinterpret_cast<const char*>(&n), 8);
  s += header;
  s.append(data_bytes, '\0');
  return s;
}

// Parses an in-memory image, as a file named "x.safetensors".
void parse_image(const std::string& img) {
  parse_safetensors_header(reinterpret_cast<const uint8_t*>(img.data()), img.size(), "x.safetensors", nullptr,
                           nullptr);
}

Tensor random_tensor(const Shape& shape, DType dt, uint32_t seed) {
  Tensor t = Tensor::empty(shape, dt, MemCategory::Workspace);
  std::mt19937 rng(seed);
  auto* p = t.data<uint8_t>();
  for (size_t i = 0; i < t.nbytes(); ++i) p[i] = static_cast<uint8_t>(rng());
  return t;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

class Safetensors : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/moe_safetensors_XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return dir_ + "/" + name; }
  // Files in the temp dir whose names contain ".tmp." (what an interrupted write would leave).
  int temp_files() const {
    int n = 0;
    for (const auto& e : fs::directory_iterator(dir_))
      if (e.path().filename().string().find(".tmp.") != std::string::npos) ++n;
    return n;
  }
  std::string dir_;
};

}  // namespace

TEST_F(Safetensors, RoundTripBytesAndMetadata) {
  // bf16 with an odd count first in the list, so naive packing would misalign what follows.
  std::vector<std::pair<std::string, Tensor>> ts = {
      {"b.bf16", random_tensor({7}, DType::BF16, 1)},
      {"a.f32", random_tensor({3, 5}, DType::F32, 2)},
      {"c.i64", random_tensor({2, 3}, DType::I64, 3)},
      {"d.scalar", random_tensor({}, DType::F32, 4)},
      {"e.empty", random_tensor({0, 4}, DType::F32, 5)},
  };
  std::map<std::string, std::string> meta = {{"format", "pt"}, {"note", "héllo \"quoted\""}};
  std::string p = path("rt.safetensors");
  write_safetensors(p, ts, meta);
  EXPECT_EQ(temp_files(), 0);

  auto f = SafetensorsFile::open(p);
  EXPECT_EQ(f->metadata(), meta);
  ASSERT_EQ(f->tensors().size(), ts.size());
  for (const auto& [name, t] : ts) {
    Tensor got = f->tensor(name);
    EXPECT_TRUE(same_bytes(got, t)) << name << " " << got.desc() << " vs " << t.desc();
    EXPECT_EQ(reinterpret_cast<uintptr_t>(got.raw()) % dtype_size(got.dtype()), 0u) << name;
  }

  // The header is padded so the data section starts 8-aligned, and the data is packed without
  // gaps (the HF reference reader rejects gaps).
  std::string bytes = read_bytes(p);
  uint64_t n = 0;
  std::memcpy(&n, bytes.data(), 8);
  EXPECT_EQ((8 + n) % 8, 0u);
  size_t expect_begin = 0;
  for (const SafetensorsInfo& info : f->tensors()) {  // sorted by offset
    EXPECT_EQ(info.begin, expect_begin) << info.name;
    expect_begin = info.end;
  }
  EXPECT_EQ(8 + n + expect_begin, bytes.size());
}

TEST_F(Safetensors, BorrowedTensorOutlivesFileAndIsAccounted) {
  Tensor src = random_tensor({64, 16}, DType::F32, 7);
  std::string p = path("w.safetensors");
  write_safetensors(p, {{"w", src}});
  int64_t before = mem_stats().current[0][static_cast<int>(MemCategory::Weights)];
  Tensor t;
  {
    auto f = SafetensorsFile::open(p);
    t = f->tensor("w");
  }  // the file handle is gone; the tensor keeps the mapping alive
  EXPECT_EQ(mem_stats().current[0][static_cast<int>(MemCategory::Weights)] - before,
            static_cast<int64_t>(t.nbytes()));
  EXPECT_TRUE(same_bytes(t, src));
  // The mapping is private: writing into a borrowed tensor must not fault or touch the file.
  t.data<float>()[0] = 12345.0f;
  EXPECT_TRUE(same_bytes(SafetensorsFile::open(p)->tensor("w"), src));
  t = Tensor();
  EXPECT_EQ(mem_stats().current[0][static_cast<int>(MemCategory::Weights)], before);
}

TEST_F(Safetensors, MisalignedDataIsCopied) {
  // Pad the header so the data section starts at an offset = 1 (mod 8): an F32 tensor there is
  // not 4-aligned in the (page-aligned) mapping and must be copied, not borrowed.
  std::string header = R"({"v":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
  while ((8 + header.size()) % 8 != 1) header.push_back(' ');
  std::string img = make_image(header, 0);
  float vals[2] = {1.5f, -2.25f};
  img.append(reinterpret_cast<const char*>(vals), 8);
  std::string p = path("mis.safetensors");
  write_bytes(p, img);
  Tensor t = SafetensorsFile::open(p)->tensor("v");
  ASSERT_EQ(t.shape(), (Shape{2}));
  EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw()) % 4, 0u);
  EXPECT_EQ(t.data<float>()[0], 1.5f);
  EXPECT_EQ(t.data<float>()[1], -2.25f);
}

TEST_F(Safetensors, ReadsEveryFixture) {
  for (const char* arch : {"mixtral", "qwen2_moe", "qwen3_moe"}) {
    SCOPED_TRACE(arch);
    std::string dir = std::string(MOE_FIXTURES_DIR) + "/" + arch;
    auto f = SafetensorsFile::open(dir + "/model.safetensors");
    ASSERT_GT(f->tensors().size(), 10u);
    const SafetensorsInfo* emb = f->find("model.embed_tokens.weight");
    ASSERT_NE(emb, nullptr);
    EXPECT_EQ(emb->dtype, DType::F32);
    EXPECT_EQ(emb->shape, (Shape{256, 64}));
    for (const SafetensorsInfo& info : f->tensors()) {
      Tensor t = f->tensor(info.name);
      EXPECT_EQ(t.nbytes(), info.end - info.begin) << info.name;
      if (t.dtype() == DType::F32) {
        for (float v : t.to_f32_vector()) ASSERT_TRUE(std::isfinite(v)) << info.name;
      }
    }
    Checkpoint ck = Checkpoint::open_dir(dir);
    EXPECT_EQ(ck.names().size(), f->tensors().size());
    EXPECT_TRUE(ck.has("model.norm.weight"));
    EXPECT_EQ(ck.get("model.norm.weight").shape(), (Shape{64}));

    auto batch = SafetensorsFile::open(dir + "/batch.safetensors");
    Tensor ids = batch->tensor("input_ids");
    EXPECT_EQ(ids.dtype(), DType::I64);
    EXPECT_EQ(ids.shape(), (Shape{2, 16}));
  }
}

TEST_F(Safetensors, ShardedCheckpoint) {
  Tensor a = random_tensor({4, 8}, DType::F32, 11), b = random_tensor({3}, DType::BF16, 12),
         c = random_tensor({5}, DType::I64, 13);
  write_safetensors(path("model-00001-of-00002.safetensors"), {{"a", a}, {"b", b}});
  write_safetensors(path("model-00002-of-00002.safetensors"), {{"c", c}});
  write_bytes(path("model.safetensors.index.json"), R"({
    "metadata": {"total_size": 78},
    "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                   "c": "model-00002-of-00002.safetensors"}})");
  Checkpoint ck = Checkpoint::open_dir(dir_);
  EXPECT_EQ(ck.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_TRUE(same_bytes(ck.get("a"), a));
  EXPECT_TRUE(same_bytes(ck.get("b"), b));
  EXPECT_TRUE(same_bytes(ck.get("c"), c));
  EXPECT_EQ(ck.info("c").shape, (Shape{5}));
  EXPECT_FALSE(ck.has("d"));
  expect_error([&] { ck.get("d"); }, {"missing tensor d", dir_.c_str()});
}

TEST_F(Safetensors, CheckpointErrors) {
  expect_error([&] { Checkpoint::open_dir(dir_); }, {"no model.safetensors or model.safetensors.index.json"});
  expect_error([&] { Checkpoint::open_dir(path("nope")); }, {"no such directory"});

  write_safetensors(path("s1.safetensors"), {{"a", random_tensor({2}, DType::F32, 1)}});
  write_bytes(path("model.safetensors.index.json"), R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  expect_error([&] { Checkpoint::open_dir(dir_); }, {"model.safetensors.index.json", "shard 's2.safetensors'", "'b'",
                                                     "does not exist"});

  write_bytes(path("model.safetensors.index.json"), R"({"weight_map": {"a": "s1.safetensors", "z": "s1.safetensors"}})");
  expect_error([&] { Checkpoint::open_dir(dir_); }, {"tensor 'z'", "absent"});

  write_bytes(path("model.safetensors.index.json"), R"({"weight_map": {"a": "s1.safetensors",)");
  expect_error([&] { Checkpoint::open_dir(dir_); }, {"model.safetensors.index.json", "malformed JSON"});

  write_bytes(path("model.safetensors.index.json"), R"({"metadata": {}})");
  expect_error([&] { Checkpoint::open_dir(dir_); }, {"missing field 'weight_map'"});

  write_bytes(path("model.safetensors.index.json"), R"({"weight_map": {"a": "../s1.safetensors"}})");
  expect_error([&] { Checkpoint::open_dir(dir_); }, {"not a plain file name"});
}

TEST_F(Safetensors, OpenErrors) {
  expect_error([&] { SafetensorsFile::open(path("missing.safetensors")); },
               {"missing.safetensors", "No such file"});
  expect_error([&] { SafetensorsFile::open(dir_); }, {"is a directory"});
  write_bytes(path("empty.safetensors"), "");
  expect_error([&] { SafetensorsFile::open(path("empty.safetensors")); }, {"empty.safetensors", "empty file"});
  write_bytes(path("short.safetensors"), "abc");
  expect_error([&] { SafetensorsFile::open(path("short.safetensors")); }, {"short.safetensors", "too short"});
  write_safetensors(path("ok.safetensors"), {{"a", random_tensor({2}, DType::F32, 1)}});
  expect_error([&] { SafetensorsFile::open(path("ok.safetensors"))->tensor("b"); }, {"ok.safetensors", "no tensor 'b'"});
}

TEST_F(Safetensors, RejectsBadHeaders) {
  const std::string entry_a = R"("a":{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]})";
  EXPECT_NO_THROW(parse_image(make_image("{" + entry_a + "}", 16)));

  expect_error([] { parse_image(""); }, {"x.safetensors", "0 bytes", "too short"});
  expect_error([] { parse_image("1234567"); }, {"x.safetensors", "7 bytes", "too short"});
  {
    std::string img = make_image("{}", 0);
    uint64_t n = 1000;
    std::memcpy(img.data(), &n, 8);
    expect_error([&] { parse_image(img); }, {"x.safetensors", "header length 1000", "beyond the end"});
    n = ~0ull;
    std::memcpy(img.data(), &n, 8);
    expect_error([&] { parse_image(img); }, {"implausibly large"});
  }
  expect_error([] { parse_image(make_image("{\"a\": ", 0)); }, {"x.safetensors", "not valid JSON"});
  expect_error([] { parse_image(make_image("[1,2]", 0)); }, {"x.safetensors", "not a JSON object", "array"});
  expect_error([] { parse_image(make_image(R"({"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,1]}})", 1)); },
               {"tensor 'a'", "unknown dtype 'Q4'"});
  expect_error([] { parse_image(make_image(R"({"a":{"dtype":"F32","shape":[2,-1],"data_offsets":[0,0]}})", 0)); },
               {"tensor 'a'", "shape[1] is -1", "non-negative integer"});
  expect_error([] { parse_image(make_image(R"({"a":{"dtype":"F32","shape":[2.5],"data_offsets":[0,0]}})", 0)); },
               {"tensor 'a'", "shape[0] is 2.5"});
  expect_error([] { parse_image(make_image(R"({"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,20]}})", 24)); },
               {"tensor 'a'", "span 20 bytes", "needs 24 bytes"});
  expect_error([] { parse_image(make_image(R"({"a":{"dtype":"F32","shape":[25],"data_offsets":[0,100]}})", 64)); },
               {"x.safetensors: tensor 'a': data_offsets [0,100] exceed data section of 64 bytes"});
  expect_error([] { parse_image(make_image(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[8,4]}})", 8)); },
               {"tensor 'a'", "begin > end"});
  expect_error(
      [] {
        parse_image(make_image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                               R"("b":{"dtype":"F32","shape":[2],"data_offsets":[12,20]}})",
                               20));
      },
      {"'a' [0,16]", "'b' [12,20]", "overlap"});
  expect_error([] { parse_image(make_image(R"({"a":{"shape":[1],"data_offsets":[0,4]}})", 4)); },
               {"tensor 'a'", "missing field 'dtype'"});
  expect_error([] { parse_image(make_image(R"({"a":{"dtype":"F32","shape":[1]}})", 4)); },
               {"tensor 'a'", "missing field 'data_offsets'"});
  expect_error([] { parse_image(make_image(R"({"a":[1]})", 0)); }, {"tensor 'a'", "must be an object"});
  expect_error([] { parse_image(make_image(R"({"__metadata__":{"k":1}})", 0)); }, {"__metadata__", "'k'", "string"});
  expect_error([] { parse_image(make_image(R"({"__metadata__":[]})", 0)); }, {"__metadata__", "object"});
  // Duplicate names would otherwise be silently collapsed to the last one.
  expect_error([&] { parse_image(make_image("{" + entry_a + "," + entry_a + "}", 16)); }, {"'a' twice"});
  // A shape whose byte size overflows 64 bits.
  expect_error(
      [] {
        parse_image(make_image(
            R"({"a":{"dtype":"F64","shape":[4294967296,4294967296],"data_offsets":[0,0]}})", 0));
      },
      {"tensor 'a'", "too large"});
  // Empty, but its element count would overflow int64 before reaching the zero.
  expect_error(
      [] {
        parse_image(make_image(
            R"({"a":{"dtype":"U8","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}})", 0));
      },
      {"tensor 'a'", "too large"});
  // Deep nesting is refused rather than recursed into.
  expect_error([] { parse_image(make_image(std::string(5000, '[') + std::string(5000, ']'), 0)); }, {"nests deeper"});
}

TEST_F(Safetensors, EmptyTensorsDoNotOverlapAndZeroDimsAreFine) {
  std::map<std::string, std::string> meta;
  size_t start = 0;
  std::string img = make_image(R"({"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]},)"
                               R"("z":{"dtype":"BF16","shape":[0,3],"data_offsets":[8,8]},)"
                               R"("__metadata__":{"k":"v"}})",
                               16);
  auto infos = parse_safetensors_header(reinterpret_cast<const uint8_t*>(img.data()), img.size(), "x", &meta, &start);
  ASSERT_EQ(infos.size(), 2u);
  EXPECT_EQ(infos[0].name, "a");
  EXPECT_EQ(infos[1].name, "z");
  EXPECT_EQ(meta.at("k"), "v");
  EXPECT_EQ(start, img.size() - 16);
}

TEST_F(Safetensors, EveryTruncationIsAnErrorNotACrash) {
  std::string p = path("t.safetensors");
  write_safetensors(p, {{"a", random_tensor({3, 3}, DType::F32, 1)}, {"b", random_tensor({5}, DType::I32, 2)}},
                    {{"k", "v"}});
  std::string img = read_bytes(p);
  for (size_t len = 0; len < img.size(); ++len) {
    std::string cut = img.substr(0, len);
    EXPECT_THROW(parse_image(cut), Error) << "length " << len;
  }
}

TEST_F(Safetensors, AtomicWriteKeepsExistingFileOnFailure) {
  std::string p = path("keep.safetensors");
  Tensor a = random_tensor({4}, DType::F32, 1);
  write_safetensors(p, {{"a", a}});
  std::string before = read_bytes(p);

  expect_error([&] { write_safetensors(p, {{"x", a}, {"y", a}, {"x", a}}); }, {"keep.safetensors", "duplicate", "'x'"});
  EXPECT_EQ(read_bytes(p), before);
  EXPECT_EQ(temp_files(), 0);

  expect_error([&] { write_safetensors(p, {{"u", Tensor()}}); }, {"'u'", "undefined"});
  EXPECT_EQ(read_bytes(p), before);

  // A failure after the temp file is written (rename onto a non-empty directory) removes it.
  fs::create_directory(path("adir"));
  write_bytes(path("adir/f"), "x");
  expect_error([&] { write_safetensors(path("adir"), {{"a", a}}); }, {"adir", "rename"});
  EXPECT_EQ(temp_files(), 0);

  // A directory that does not exist: nothing is created anywhere.
  expect_error([&] { write_safetensors(path("no/such/dir.safetensors"), {{"a", a}}); }, {"temp file"});
  EXPECT_EQ(temp_files(), 0);

  // Overwriting succeeds and replaces the content.
  Tensor b = random_tensor({2, 2}, DType::F64, 2);
  write_safetensors(p, {{"b", b}});
  EXPECT_TRUE(same_bytes(SafetensorsFile::open(p)->tensor("b"), b));
  EXPECT_EQ(temp_files(), 0);
}
