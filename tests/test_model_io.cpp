// test_model_io.cpp — random checkpoints round-trip through safetensors and the loader, and
// bad checkpoints fail with errors that name the problem.
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>

#include "io/safetensors.h"
#include "model/model.h"
#include "model/random_init.h"

namespace moe {
namespace {

std::string temp_dir() {
  char tmpl[] = "/tmp/moe_model_io_XXXXXX";
  char* d = mkdtemp(tmpl);
  EXPECT_NE(d, nullptr);
  return d;
}

bool same_bytes(const Tensor& a, const Tensor& b) {
  return a.dtype() == b.dtype() && a.shape() == b.shape() && std::memcmp(a.raw(), b.raw(), a.nbytes()) == 0;
}

class ModelIo : public ::testing::TestWithParam<std::string> {};

TEST_P(ModelIo, InitWriteLoadWriteLoadIsIdentical) {
  const std::string dir = temp_dir();
  ModelConfig cfg = preset_config(GetParam(), "tiny");
  auto tensors = random_weights(cfg, 42, DType::F32);
  write_model_dir(dir + "/a", cfg, tensors);

  // load -> write -> load: every tensor byte-identical to what init generated.
  ModelConfig cfg2 = load_hf_config(dir + "/a/config.json");
  EXPECT_EQ(cfg2.hidden_size, cfg.hidden_size);
  EXPECT_EQ(cfg2.n_expert, cfg.n_expert);
  EXPECT_EQ(cfg2.shared_expert_intermediate_size, cfg.shared_expert_intermediate_size);
  Checkpoint ck = Checkpoint::open_dir(dir + "/a");
  std::vector<std::pair<std::string, Tensor>> again;
  for (auto& [name, t] : tensors) again.emplace_back(name, ck.get(name));
  write_model_dir(dir + "/b", cfg2, again);
  Checkpoint ck2 = Checkpoint::open_dir(dir + "/b");
  EXPECT_EQ(ck2.names().size(), tensors.size());
  for (auto& [name, t] : tensors) EXPECT_TRUE(same_bytes(t, ck2.get(name))) << name;

  // The model built from files equals the model built from the tensors in memory.
  Model m1 = Model::load(dir + "/b");
  Model m2 = Model::from_tensors(cfg, tensors);
  EXPECT_TRUE(same_bytes(m1.weights().layers[1].w2, m2.weights().layers[1].w2));
  Tensor ids = Tensor::empty({1, 4}, DType::I32, MemCategory::Activations);
  for (int i = 0; i < 4; ++i) ids.data<int32_t>()[i] = 3 * i + 1;
  KVCache k1 = m1.make_cache(1, 4), k2 = m2.make_cache(1, 4);
  EXPECT_TRUE(same_bytes(m1.forward(ids, k1).logits, m2.forward(ids, k2).logits));
  std::filesystem::remove_all(dir);
}

TEST_P(ModelIo, Bf16InitRoundTrips) {
  const std::string dir = temp_dir();
  ModelConfig cfg = preset_config(GetParam(), "tiny");
  cfg.torch_dtype = DType::BF16;
  auto tensors = random_weights(cfg, 5, DType::BF16);
  write_model_dir(dir, cfg, tensors);
  Checkpoint ck = Checkpoint::open_dir(dir);
  for (auto& [name, t] : tensors) EXPECT_TRUE(same_bytes(t, ck.get(name))) << name;
  EXPECT_EQ(load_hf_config(dir + "/config.json").torch_dtype, DType::BF16);
  std::filesystem::remove_all(dir);
}

INSTANTIATE_TEST_SUITE_P(Families, ModelIo, ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss"));

TEST(ModelLoad, MissingTensorIsNamed) {
  const std::string dir = temp_dir();
  ModelConfig cfg = preset_config("mixtral", "tiny");
  auto tensors = random_weights(cfg, 1, DType::F32);
  const std::string victim = "model.layers.1.block_sparse_moe.experts.5.w3.weight";
  std::erase_if(tensors, [&](auto& p) { return p.first == victim; });
  write_model_dir(dir, cfg, tensors);
  try {
    Model::load(dir);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(victim), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

TEST(ModelLoad, WrongShapeIsNamed) {
  const std::string dir = temp_dir();
  ModelConfig cfg = preset_config("qwen3_moe", "tiny");
  auto tensors = random_weights(cfg, 1, DType::F32);
  for (auto& [name, t] : tensors)
    if (name == "model.layers.0.self_attn.q_norm.weight") t = Tensor::zeros({7}, DType::F32, MemCategory::Weights);
  write_model_dir(dir, cfg, tensors);
  try {
    Model::load(dir);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    std::string msg = e.what();
    EXPECT_NE(msg.find("q_norm"), std::string::npos) << msg;
    EXPECT_NE(msg.find("[7]"), std::string::npos) << msg;
  }
  std::filesystem::remove_all(dir);
}

TEST(ModelLoad, UnknownModelTypeIsNamed) {
  const std::string dir = temp_dir();
  ModelConfig cfg = preset_config("mixtral", "tiny");
  write_model_dir(dir, cfg, random_weights(cfg, 1, DType::F32));
  std::string text;
  {
    std::ifstream f(dir + "/config.json");
    text.assign(std::istreambuf_iterator<char>(f), {});
  }
  auto pos = text.find("\"mixtral\"");
  ASSERT_NE(pos, std::string::npos);
  text.replace(pos, 9, "\"deepseek_v9\"");
  std::ofstream(dir + "/config.json") << text;
  try {
    Model::load(dir);
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("deepseek_v9"), std::string::npos) << e.what();
  }
  std::filesystem::remove_all(dir);
}

TEST(ModelForward, OutOfRangeTokenAndCacheOverflowAreErrors) {
  ModelConfig cfg = preset_config("mixtral", "tiny");
  Model m = Model::from_tensors(cfg, random_weights(cfg, 1, DType::F32));
  Tensor ids = Tensor::empty({1, 2}, DType::I64, MemCategory::Activations);
  ids.data<int64_t>()[0] = 1;
  ids.data<int64_t>()[1] = 999;
  KVCache kv = m.make_cache(1, 8);
  EXPECT_THROW(m.forward(ids, kv), Error);
  Tensor ids32 = Tensor::empty({1, 1}, DType::I32, MemCategory::Activations);
  ids32.data<int32_t>()[0] = -3;
  KVCache kv32 = m.make_cache(1, 8);
  EXPECT_THROW(m.forward(ids32, kv32), Error);
  ids.data<int64_t>()[1] = 2;
  KVCache small = m.make_cache(1, 1);
  EXPECT_THROW(m.forward(ids, small), Error);
}

TEST(ModelParams, MediumMixtralHandCount) {
  // D=1024, L=12, H=16, Hkv=4 (Dh=64), E=8, K=2, F=3072, V=32000, untied.
  // per layer: norms 2*1024 + q,o 2*1024*1024 + k,v 2*256*1024 + router 8*1024 + experts 8*3*3072*1024
  //          = 2048 + 2621440 + 8192 + 75497472 = 78129152
  // total = 12*78129152 + 2*32000*1024 + 1024 = 1003086848
  // active = 12*(2048 + 2621440 + 8192 + 2*3*3072*1024) + 2*32000*1024 + 1024 = 323609600
  ModelConfig cfg = preset_config("mixtral", "medium");
  EXPECT_EQ(params_total(cfg), 1003086848);
  EXPECT_EQ(params_active(cfg), 323609600);
}

}  // namespace
}  // namespace moe
