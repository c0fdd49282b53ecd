// test_decode_alloc.cpp — the decode loop does not allocate (issue: "no per-token heap
// allocation in the decode loop").
//
// After a prompt and two warm-up tokens, N more decode steps (Model::forward on one token per
// sequence, then sampling) must make no C++ heap allocation (every operator new in this test
// binary is counted) and take no host block from the system (mem_system_allocs: tensor bytes
// come from blocks the tracker keeps for reuse). Covered: the mixtral, qwen2_moe, qwen3_moe and
// olmoe fixtures with f32, bf16 and q8_0 weights; one sequence; and a batch of two sequences at
// different positions (the per-row attention path the server's continuous batching uses).
//
// Sanitizer builds free every block at once on purpose (so ASan sees a use after free) and
// keep ASan's own operator new: the test is skipped there and runs in the release stage.
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <new>
#include <string>
#include <vector>

#include "core/memory.h"
#include "core/sanitizer.h"
#include "model/model.h"
#include "serve/sampling.h"

#if !MOE_ASAN
namespace {
std::atomic<int64_t> g_news{0};

void* counted_alloc(size_t n, size_t align) {
  g_news.fetch_add(1, std::memory_order_relaxed);
  if (n == 0) n = 1;
  void* p = align > alignof(std::max_align_t) ? std::aligned_alloc(align, (n + align - 1) / align * align) : std::malloc(n);
  if (!p) throw std::bad_alloc();
  return p;
}
}  // namespace

// Every C++ allocation of the test binary (library code included) goes through these.
void* operator new(size_t n) { return counted_alloc(n, 0); }
void* operator new[](size_t n) { return counted_alloc(n, 0); }
void* operator new(size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<size_t>(a)); }
void* operator new[](size_t n, std::align_val_t a) { return counted_alloc(n, static_cast<size_t>(a)); }
void* operator new(size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n, 0);
  } catch (...) {
    return nullptr;
  }
}
void* operator new[](size_t n, const std::nothrow_t&) noexcept {
  try {
    return counted_alloc(n, 0);
  } catch (...) {
    return nullptr;
  }
}
void operator delete(void* p) noexcept { std::free(p); }
void operator delete[](void* p) noexcept { std::free(p); }
void operator delete(void* p, size_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t) noexcept { std::free(p); }
void operator delete(void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, std::align_val_t) noexcept { std::free(p); }
void operator delete(void* p, size_t, std::align_val_t) noexcept { std::free(p); }
void operator delete[](void* p, size_t, std::align_val_t) noexcept { std::free(p); }
#endif

namespace moe {
namespace {

#if !MOE_ASAN
std::string fixture(const std::string& fam) { return std::string(MOE_FIXTURES_DIR) + "/" + fam; }

struct Counts {
  int64_t news = 0, blocks = 0;
};

Counts now_counts() { return {g_news.load(), mem_system_allocs()}; }

// Decodes `steps` tokens for every sequence of `kv` (rows continue `slots`), sampling greedily
// from host logits as `moe generate` does. Returns what the steps allocated.
Counts decode(const Model& m, KVCache& kv, Tensor& ids, const ForwardOptions& fo, int steps) {
  const int64_t v = m.config().vocab_size;
  const SamplingParams sp{};
  Rng rng(1);
  const Counts c0 = now_counts();
  for (int i = 0; i < steps; ++i) {
    ForwardResult r = m.forward(ids, kv, fo);
    for (int64_t b = 0; b < ids.dim(0); ++b)
      ids.data<int32_t>()[b] = sample_token(r.logits.data<float>() + b * v, v, sp, rng);
  }
  const Counts c1 = now_counts();
  return {c1.news - c0.news, c1.blocks - c0.blocks};
}

struct Variant {
  const char* label;
  LoadOptions lo;
};

std::vector<Variant> variants() {
  LoadOptions f32, bf16, q8;
  bf16.keep_dtype = false;
  bf16.weight_dtype = DType::BF16;
  q8.quant_dtype = DType::Q8_0;
  return {{"f32", f32}, {"bf16", bf16}, {"q8_0", q8}};
}

class DecodeAlloc : public testing::TestWithParam<const char*> {};

TEST_P(DecodeAlloc, OneSequenceDecodesWithoutAllocating) {
  for (const Variant& var : variants()) {
    SCOPED_TRACE(var.label);
    Model m = Model::load(fixture(GetParam()), var.lo);
    KVCache kv = m.make_cache(1, 64);
    ForwardOptions fo;
    fo.last_logits_only = true;
    Tensor prompt = Tensor::empty({1, 5}, DType::I32, MemCategory::Activations);
    for (int i = 0; i < 5; ++i) prompt.data<int32_t>()[i] = 3 + 7 * i;
    m.forward(prompt, kv, fo);
    Tensor one = Tensor::empty({1, 1}, DType::I32, MemCategory::Activations);
    one.data<int32_t>()[0] = 1;
    decode(m, kv, one, fo, 2);  // warm-up: first sizes, per-thread kernel scratch
    const Counts c = decode(m, kv, one, fo, 16);
    EXPECT_EQ(c.news, 0) << "operator new calls in 16 decode steps";
    EXPECT_EQ(c.blocks, 0) << "host blocks taken from the system in 16 decode steps";
  }
}

TEST_P(DecodeAlloc, SequencesAtDifferentPositionsDecodeWithoutAllocating) {
  Model m = Model::load(fixture(GetParam()));
  KVCache kv = m.make_cache(3, 64);
  ForwardOptions fo;
  fo.last_logits_only = true;
  // Slots 2 and 0 get prompts of different lengths; the batch then decodes both (slot order
  // reversed, slot 1 idle): every row at its own position.
  for (auto [slot, len] : {std::pair<int64_t, int64_t>{2, 7}, {0, 3}}) {
    Tensor p = Tensor::empty({1, len}, DType::I32, MemCategory::Activations);
    for (int64_t i = 0; i < len; ++i) p.data<int32_t>()[i] = static_cast<int32_t>(5 + i);
    ForwardOptions po = fo;
    po.slots = {slot};
    m.forward(p, kv, po);
  }
  ForwardOptions df = fo;
  df.slots = {2, 0};
  Tensor ids = Tensor::empty({2, 1}, DType::I32, MemCategory::Activations);
  ids.data<int32_t>()[0] = 1;
  ids.data<int32_t>()[1] = 2;
  decode(m, kv, ids, df, 2);
  const Counts c = decode(m, kv, ids, df, 16);
  EXPECT_EQ(c.news, 0);
  EXPECT_EQ(c.blocks, 0);
  EXPECT_EQ(kv.pos[2], 7 + 18);
  EXPECT_EQ(kv.pos[0], 3 + 18);
}

// The counters see allocations: without this, the two tests above could pass vacuously.
TEST(DecodeAllocCounters, CountWhatAllocates) {
  static std::vector<int>* escaped;  // (escapes: the compiler may not elide the allocations)
  const Counts c0 = now_counts();
  escaped = new std::vector<int>(1000);
  const Counts c1 = now_counts();
  delete escaped;
  EXPECT_GE(c1.news - c0.news, 2);
  mem_trim();  // no kept blocks: the next tensor must come from the system
  const Counts c2 = now_counts();
  { Tensor t = Tensor::empty({4096}, DType::F32, MemCategory::Workspace); }
  EXPECT_EQ(now_counts().blocks - c2.blocks, 1);
  // ... and a second tensor of the same size reuses the kept block.
  const Counts c3 = now_counts();
  { Tensor t = Tensor::empty({4096}, DType::F32, MemCategory::Workspace); }
  EXPECT_EQ(now_counts().blocks - c3.blocks, 0);
}

// A large request with no kept block of its size is carved from the front of the smallest kept
// range larger than it, and ranges freed next to each other merge: a training step's backward
// temporaries come out of its forward's freed memory, and the forward's out of theirs.
TEST(DecodeAllocCounters, LargeRequestsCarvedFromKeptRangesWhichMerge) {
  mem_trim();
  char* big = nullptr;
  {
    Tensor t = Tensor::empty({1 << 20}, DType::F32, MemCategory::Workspace);  // 4 MiB
    big = static_cast<char*>(t.raw());
  }
  const Counts c = now_counts();
  {
    Tensor a = Tensor::empty({256 * 1024}, DType::F32, MemCategory::Workspace);  // 1 MiB: the front
    Tensor b = Tensor::empty({512 * 1024}, DType::F32, MemCategory::Workspace);  // 2 MiB: the next bytes
    EXPECT_EQ(static_cast<char*>(a.raw()), big);
    EXPECT_EQ(static_cast<char*>(b.raw()), big + (1 << 20));
    a = Tensor();  // a first: b then merges with the ranges on both of its sides
  }
  {
    Tensor t = Tensor::empty({1 << 20}, DType::F32, MemCategory::Workspace);  // the pieces merged back
    EXPECT_EQ(static_cast<char*>(t.raw()), big);
  }
  EXPECT_EQ(now_counts().blocks - c.blocks, 0);
}

// A large request that no single kept range holds is mapped anew with the kept ranges' pages
// moved into it, not fresh ones: what was written to two freed blocks is in the new block.
TEST(DecodeAllocCounters, LargeRequestGathersKeptPages) {
  mem_trim();
  const int64_t half = 512 * 1024;  // 2 MiB of floats
  {
    Tensor x = Tensor::empty({half}, DType::F32, MemCategory::Workspace);
    Tensor spacer = Tensor::empty({256 * 1024}, DType::F32, MemCategory::Workspace);  // held: x, y apart
    Tensor y = Tensor::empty({half}, DType::F32, MemCategory::Workspace);
    std::fill(x.data<float>(), x.data<float>() + half, 1.0f);
    std::fill(y.data<float>(), y.data<float>() + half, 2.0f);
    x = Tensor();
    y = Tensor();
    Tensor t = Tensor::empty({2 * half}, DType::F32, MemCategory::Workspace);
    const float* v = t.data<float>();
    const float first = v[0], second = v[half];
    EXPECT_TRUE((first == 1.0f && second == 2.0f) || (first == 2.0f && second == 1.0f)) << first << " " << second;
    EXPECT_EQ(std::count(v, v + half, first), half);
    EXPECT_EQ(std::count(v + half, v + 2 * half, second), half);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DecodeAlloc, testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"));
#else
TEST(DecodeAlloc, SkippedUnderSanitizers) {
  GTEST_SKIP() << "sanitizer builds free every block at once and own operator new: checked in the release build";
}
#endif

}  // namespace
}  // namespace moe
