// test_fused_update.cpp — the training-memory options of `moe train`:
//   --fused-update: each group's parameters are updated as soon as its gradients are final and
//     the gradients freed; the result must equal the ordinary step bit for bit (weights and
//     optimizer state), for untied and tied LM heads, and peak gradient memory must drop;
//   --optimizer-dtype bf16: half the optimizer memory, and a trajectory close to f32 moments.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>

#include <nlohmann/json.hpp>

#include "core/memory.h"
#include "io/safetensors.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "train/trainer.h"

namespace moe {
namespace {
namespace fs = std::filesystem;

std::string fixture(const std::string& fam) { return std::string(MOE_FIXTURES_DIR) + "/" + fam; }

std::string scratch(const std::string& name) {
  const std::string d = std::string(MOE_BINARY_DIR) + "/fused-test-" + name;
  fs::remove_all(d);
  fs::create_directories(d);
  return d;
}

std::string bytes_of(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

TrainConfig contract(const std::string& model, const std::string& out) {
  TrainConfig tc;
  tc.model_dir = model;
  tc.data = model + "/batch.safetensors";
  tc.out = out;
  tc.steps = 3;
  tc.batch_size = 1;
  tc.shuffle = false;
  tc.val_fraction = 0;
  tc.clip = 0;
  tc.lr = 1e-3;
  tc.adamw.weight_decay = 0.01;
  tc.quiet = true;
  return tc;
}

// A copy of a fixture whose config ties the LM head to the embedding (the file's lm_head is
// then not read).
std::string tied_copy(const std::string& fam) {
  const std::string d = scratch("tied-" + fam) + "/model";
  fs::create_directories(d);
  for (const char* f : {"model.safetensors", "batch.safetensors"}) fs::copy_file(fixture(fam) + "/" + f, d + "/" + f);
  nlohmann::json cfg = nlohmann::json::parse(bytes_of(fixture(fam) + "/config.json"));
  cfg["tie_word_embeddings"] = true;
  std::ofstream(d + "/config.json") << cfg.dump(1);
  return d;
}

class FusedUpdate : public ::testing::TestWithParam<std::string> {};

TEST_P(FusedUpdate, EqualsTheOrdinaryStepBitForBit) {
  const std::string fam = GetParam();
  if (!fs::exists(fixture(fam))) GTEST_SKIP() << "SKIPPED: fixtures not found at " << fixture(fam);
  for (bool tied : {false, true}) {
    SCOPED_TRACE(tied ? "tied head" : "untied head");
    const std::string model = tied ? tied_copy(fam) : fixture(fam);
    const std::string dir = scratch(fam + (tied ? "-tied" : ""));
    TrainConfig plain = contract(model, dir + "/plain"), fused = contract(model, dir + "/fused");
    fused.fused_update = true;
    mem_reset_peaks();
    run_training(plain);
    const int64_t grads_plain = mem_stats().peak[0][int(MemCategory::Grads)];
    mem_reset_peaks();
    run_training(fused);
    const int64_t grads_fused = mem_stats().peak[0][int(MemCategory::Grads)];
    for (const char* f : {"model.safetensors", "optimizer.safetensors"})
      EXPECT_TRUE(bytes_of(dir + "/plain/final/" + f) == bytes_of(dir + "/fused/final/" + f)) << f << " differs";
    // At most one group's gradients at a time: well under the whole model's.
    EXPECT_LT(grads_fused, grads_plain * 3 / 4) << grads_fused << " vs " << grads_plain;
  }
}

TEST_P(FusedUpdate, RefusesClippingAndAccumulation) {
  const std::string fam = GetParam();
  if (!fs::exists(fixture(fam))) GTEST_SKIP() << "SKIPPED: fixtures not found at " << fixture(fam);
  TrainConfig tc = contract(fixture(fam), scratch(fam + "-refuse") + "/run");
  tc.fused_update = true;
  tc.clip = 1.0;
  EXPECT_THROW(run_training(tc), Error);
  tc.clip = 0;
  tc.grad_accum = 2;
  EXPECT_THROW(run_training(tc), Error);
}

// bf16 moments: the optimizer's tracked peak halves, and every parameter's total update stays
// within 5% (normwise) of the f32-moment run over 3 steps (bf16 keeps 8 significant bits:
// ~0.4% per stored moment; measured worst 2.5%, on qwen3_moe).
TEST_P(FusedUpdate, Bf16MomentsHalveOptimizerMemoryAndFollowF32) {
  const std::string fam = GetParam();
  if (!fs::exists(fixture(fam))) GTEST_SKIP() << "SKIPPED: fixtures not found at " << fixture(fam);
  const std::string dir = scratch(fam + "-bf16");
  TrainConfig f32 = contract(fixture(fam), dir + "/f32"), b16 = contract(fixture(fam), dir + "/bf16");
  b16.adamw.state_dtype = DType::BF16;
  mem_reset_peaks();
  run_training(f32);
  const int64_t opt_f32 = mem_stats().peak[0][int(MemCategory::Optimizer)];
  mem_reset_peaks();
  run_training(b16);
  const int64_t opt_b16 = mem_stats().peak[0][int(MemCategory::Optimizer)];
  EXPECT_EQ(opt_b16 * 2, opt_f32);
  auto init = SafetensorsFile::open(fixture(fam) + "/model.safetensors");
  auto a = SafetensorsFile::open(dir + "/f32/final/model.safetensors");
  auto b = SafetensorsFile::open(dir + "/bf16/final/model.safetensors");
  for (const SafetensorsInfo& info : a->tensors()) {
    const std::string& name = info.name;
    std::vector<float> w0 = init->tensor(name, MemCategory::Workspace).to_f32_vector();
    std::vector<float> wa = a->tensor(name, MemCategory::Workspace).to_f32_vector();
    std::vector<float> wb = b->tensor(name, MemCategory::Workspace).to_f32_vector();
    double num = 0, den = 0;
    for (size_t i = 0; i < w0.size(); ++i) {
      const double ua = double(wa[i]) - w0[i], ub = double(wb[i]) - w0[i];
      num += (ua - ub) * (ua - ub);
      den += ua * ua;
    }
    if (den > 0) {
      EXPECT_LE(std::sqrt(num / den), 5e-2) << name;
    }
  }
  // The checkpoint's moments are bf16 and a bf16 run resumes from them; an f32 run refuses them.
  auto st = SafetensorsFile::open(dir + "/bf16/final/optimizer.safetensors");
  EXPECT_EQ(st->tensor(st->tensors().front().name, MemCategory::Workspace).dtype(), DType::BF16);
  TrainConfig more = b16;
  more.steps = 4;
  more.resume = true;
  EXPECT_NO_THROW(run_training(more));
  TrainConfig wrong = f32;
  wrong.out = b16.out;
  wrong.steps = 5;
  wrong.resume = true;
  EXPECT_THROW(run_training(wrong), Error);
}

// Mixed precision (--weight-dtype bf16): forward/backward on bf16 weights, f32 master weights
// (split: model_train.h) in the checkpoint; the losses stay close to f32 but are not identical
// (the bf16 roundings are used); the fused update gives exactly the ordinary step. Both
// ways bf16 weights multiply: widened to f32 (the library's default), and on the bf16 matrix
// units with the other factors rounded to bf16 (`moe train`'s choice where the CPU has them).
void mixed_precision_case(const std::string& fam, cpu::Bf16Gemm mode) {
  const std::string dir = scratch(fam + (mode == cpu::Bf16Gemm::Matrix ? "-mixed-matrix" : "-mixed"));
  TrainConfig f32 = contract(fixture(fam), dir + "/f32"), mixed = contract(fixture(fam), dir + "/mixed"),
              mixed_fused = contract(fixture(fam), dir + "/mixed-fused");
  mixed.weight_dtype = mixed_fused.weight_dtype = DType::BF16;
  mixed_fused.fused_update = true;
  run_training(f32);
  cpu::set_bf16_gemm(mode);
  run_training(mixed);
  run_training(mixed_fused);
  cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
  auto losses = [&](const std::string& run) {
    std::vector<double> out;
    std::ifstream in(run + "/metrics.jsonl");
    std::string line;
    while (std::getline(in, line))
      if (!line.empty()) out.push_back(nlohmann::json::parse(line).at("loss").get<double>());
    return out;
  };
  const std::vector<double> a = losses(f32.out), b = losses(mixed.out), c = losses(mixed_fused.out);
  ASSERT_EQ(a.size(), 3u);
  ASSERT_EQ(b.size(), 3u);
  for (size_t i = 0; i < a.size(); ++i) {
    EXPECT_NE(a[i], b[i]) << "step " << i << ": the bf16 copies were not used";
    EXPECT_NEAR(b[i], a[i], 1e-2 * std::fabs(a[i])) << "step " << i;
  }
  EXPECT_EQ(b, c);
  EXPECT_TRUE(bytes_of(mixed.out + "/final/model.safetensors") == bytes_of(mixed_fused.out + "/final/model.safetensors"));
  auto saved = SafetensorsFile::open(mixed.out + "/final/model.safetensors");
  for (const SafetensorsInfo& info : saved->tensors()) EXPECT_EQ(info.dtype, DType::F32) << info.name;
}

TEST_P(FusedUpdate, Bf16WeightsWithF32Master) {
  const std::string fam = GetParam();
  if (!fs::exists(fixture(fam))) GTEST_SKIP() << "SKIPPED: fixtures not found at " << fixture(fam);
  mixed_precision_case(fam, cpu::Bf16Gemm::Widen);
}

TEST_P(FusedUpdate, Bf16WeightsOnTheMatrixUnits) {
  const std::string fam = GetParam();
  if (!fs::exists(fixture(fam))) GTEST_SKIP() << "SKIPPED: fixtures not found at " << fixture(fam);
  if (!cpu::bf16_matrix_available())
    GTEST_SKIP() << "SKIPPED: no AMX / AVX512-BF16 here (oneDNN ISA " << cpu::onednn_isa_name() << ")";
  mixed_precision_case(fam, cpu::Bf16Gemm::Matrix);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, FusedUpdate, ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe"));

}  // namespace
}  // namespace moe
