// test_master_split.cpp — mixed precision's split master weights (model_train.h): an f32 value
// kept as its bf16 rounding plus its lower 16 bits. The two halves must give every f32 bit
// pattern back exactly, the upper half must be the value rounded to nearest bf16 (ties away
// from zero), splitting a model must cost no byte more than its f32 weights, and AdamW on the
// split weights must produce bit for bit the f32 weights AdamW produces on the f32 model.
#include <gtest/gtest.h>

#include <cstring>
#include <filesystem>

#include "core/memory.h"
#include "core/rng.h"
#include "model/model.h"
#include "model/model_train.h"
#include "io/safetensors.h"
#include "train/checkpoint.h"
#include "train/hf_export.h"
#include "train/optimizer.h"
#include "fixture_util.h"

namespace moe {
namespace {

const std::string kDir = std::string(MOE_FIXTURES_DIR) + "/mixtral";

float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

TEST(MasterSplit, HalvesJoinExactlyAndRoundToNearest) {
  // Every upper half with lower halves at and around the rounding boundary, and a spread.
  const uint16_t lows[] = {0x0000, 0x0001, 0x1234, 0x7FFE, 0x7FFF, 0x8000, 0x8001, 0xABCD, 0xFFFE, 0xFFFF};
  int64_t ties = 0;
  for (uint32_t top = 0; top < 0x10000; ++top)
    for (uint16_t low : lows) {
      const uint32_t bits = (top << 16) | low;
      const uint16_t hi = master_high(bits);
      ASSERT_EQ(master_bits(hi, low), bits) << std::hex << bits;
      const float x = from_bits(bits);
      if (std::isnan(x)) continue;
      // Nearest bf16: the distance to the upper half is at most half a bf16 step (in the bit
      // pattern's units, 0x8000), and below it unless the value is exactly halfway.
      const int64_t dist = std::llabs(int64_t(uint32_t(hi) << 16) - int64_t(bits));
      ASSERT_LE(dist, 0x8000) << std::hex << bits;
      if (dist == 0x8000) {
        ++ties;
        EXPECT_GT(std::fabs(bf16_to_f32(hi)), std::fabs(x)) << "ties round away from zero: " << std::hex << bits;
      } else {
        EXPECT_EQ(hi, f32_to_bf16(x)) << "the upper half is the usual bf16 rounding off ties: " << std::hex << bits;
      }
    }
  EXPECT_GT(ties, 0);
}

TEST(MasterSplit, SplitModelCostsItsF32BytesAndJoinsBack) {
  if (!std::filesystem::exists(kDir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << kDir;
  const Model ref = testutil::load_f32(kDir);
  Model m = testutil::load_f32(kDir);
  const ModelConfig& c = m.config();
  const int64_t weights_before = mem_stats().current[int(Device::CPU)][int(MemCategory::Weights)];
  const MasterLowHalves low = split_master(c, m.mutable_weights());
  EXPECT_EQ(mem_stats().current[int(Device::CPU)][int(MemCategory::Weights)], weights_before)
      << "split weights must hold exactly the f32 bytes they replace";
  const std::vector<NamedParam> a = named_parameters(c, ref.weights()), b = named_parameters(c, m.weights());
  ASSERT_EQ(a.size(), b.size());
  int64_t split = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(a[i].name, b[i].name);
    if (a[i].value.ndim() < 2) {
      EXPECT_EQ(b[i].value.dtype(), DType::F32) << a[i].name;
      EXPECT_EQ(low.of(b[i].value), nullptr) << a[i].name;
      continue;
    }
    ++split;
    ASSERT_EQ(b[i].value.dtype(), DType::BF16) << a[i].name;
    const uint16_t* lo = low.of(b[i].value);  // per-expert and q/k/v views find their halves too
    ASSERT_NE(lo, nullptr) << a[i].name;
    const uint32_t* x = a[i].value.data<uint32_t>();
    const uint16_t* hi = b[i].value.data<uint16_t>();
    for (int64_t j = 0; j < a[i].value.numel(); ++j) {
      ASSERT_EQ(hi[j], master_high(x[j])) << a[i].name << " [" << j << "]";
      ASSERT_EQ(master_bits(hi[j], lo[j]), x[j]) << a[i].name << " [" << j << "]";
    }
  }
  EXPECT_GT(split, 10);
  const ModelWeights joined = join_master(c, m.weights(), low);
  const std::vector<NamedParam> j = named_parameters(c, joined);
  ASSERT_EQ(j.size(), a.size());
  for (size_t i = 0; i < a.size(); ++i) {
    ASSERT_EQ(j[i].value.dtype(), DType::F32) << a[i].name;
    EXPECT_EQ(std::memcmp(j[i].value.raw(), a[i].value.raw(), a[i].value.nbytes()), 0) << a[i].name;
  }
  // A tensor of another model is not split.
  EXPECT_EQ(low.of(ref.weights().layers[0].w1), nullptr);
}

TEST(MasterSplit, AdamWOnSplitWeightsIsBitForBitF32) {
  if (!std::filesystem::exists(kDir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << kDir;
  for (DType moments : {DType::F32, DType::BF16}) {
    SCOPED_TRACE(dtype_name(moments));
    Model f = testutil::load_f32(kDir);
    Model s = testutil::load_f32(kDir);
    const ModelConfig& c = f.config();
    const MasterLowHalves low = split_master(c, s.mutable_weights());
    ModelWeights gw = zeros_like(c, f.weights(), MemCategory::Grads);
    const std::vector<NamedParam> grads = named_parameters(c, gw);
    AdamWOptions ao;
    ao.state_dtype = moments;
    ao.weight_decay = 0.1;
    AdamW of(named_parameters(c, f.weights()), grads, ao), os(named_parameters(c, s.weights()), grads, ao, &low);
    std::vector<std::vector<bool>> touched(size_t(c.n_layer), std::vector<bool>(size_t(c.n_expert), true));
    touched[0][1] = false;  // a skipped expert stays as it is in both
    Rng rng(5);
    for (int step = 0; step < 3; ++step) {
      for (const NamedParam& g : grads)
        for (int64_t k = 0; k < g.value.numel(); ++k) g.value.data<float>()[k] = 1e-2f * float(rng.normal());
      of.step(1e-2, touched);
      os.step(1e-2, touched);
    }
    const ModelWeights joined = join_master(c, s.weights(), low);
    const std::vector<NamedParam> a = named_parameters(c, f.weights()), b = named_parameters(c, joined);
    for (size_t i = 0; i < a.size(); ++i)
      EXPECT_EQ(std::memcmp(a[i].value.raw(), b[i].value.raw(), a[i].value.nbytes()), 0) << a[i].name;
  }
}

// A checkpoint of split weights holds their f32 values, joined one tensor at a time while it is
// written: the save's extra memory is one tensor's f32 copy, not the model's.
TEST(MasterSplit, CheckpointWritesF32ValuesATensorAtATime) {
  if (!std::filesystem::exists(kDir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << kDir;
  const Model ref = testutil::load_f32(kDir);
  Model m = testutil::load_f32(kDir);
  const ModelConfig& c = m.config();
  const MasterLowHalves low = split_master(c, m.mutable_weights());
  const std::string dir = testing::TempDir() + "/master-split-ckpt";
  std::filesystem::remove_all(dir);
  const auto named = hf_parameters(c, ref.weights());
  int64_t largest = 0;
  for (const auto& [name, t] : named) largest = std::max<int64_t>(largest, int64_t(t.nbytes()));
  const int ws = int(MemCategory::Workspace), cpu = int(Device::CPU);
  const int64_t ws_before = mem_stats().current[cpu][ws];
  mem_reset_peaks();
  save_checkpoint(dir, m, OptimizerSnapshot{}, nlohmann::json{{"step", 0}}, "", nullptr, &low);
  const int64_t ws_peak = mem_stats().peak[cpu][ws] - ws_before;
  EXPECT_LE(ws_peak, largest) << "more than one joined tensor at a time";
  EXPECT_GT(ws_peak, 0);
  auto file = SafetensorsFile::open(dir + "/model.safetensors");
  ASSERT_EQ(file->tensors().size(), named.size() + named_buffers(c, ref.weights()).size());
  for (const auto& [name, t] : named) {
    ASSERT_NE(file->find(name), nullptr) << name;
    const Tensor got = file->tensor(name, MemCategory::Workspace);
    ASSERT_EQ(got.dtype(), DType::F32) << name;
    ASSERT_EQ(got.shape(), t.shape()) << name;
    EXPECT_EQ(std::memcmp(got.raw(), t.raw(), t.nbytes()), 0) << name << ": not the f32 master values";
  }
  std::filesystem::remove_all(dir);
}

}  // namespace
}  // namespace moe
