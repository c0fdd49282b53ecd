// test_reference.cpp — the engine's forward pass against the PyTorch golden files in
// ../shared/fixtures (HF modeling code run in float64): logits, router logits, expert choice;
// and incremental decode with the KV cache against the full forward.
#include <gtest/gtest.h>

#include <cmath>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include "io/safetensors.h"
#include "model/ffn_block.h"
#include "model/model.h"
#include "ops/ops.h"

namespace moe {
namespace {


std::string fixture(const std::string& fam) { return std::string(MOE_FIXTURES_DIR) + "/" + fam; }

struct Err {
  double rel_fro;  // ||got - ref|| / ||ref||
  double rel_max;  // max |got - ref| / max |ref|
};

Err compare(const std::vector<float>& got, const std::vector<float>& ref) {
  EXPECT_EQ(got.size(), ref.size());
  double num = 0, den = 0, mx = 0, mref = 0;
  for (size_t i = 0; i < std::min(got.size(), ref.size()); ++i) {
    double d = double(got[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * ref[i];
    mx = std::max(mx, std::fabs(d));
    mref = std::max(mref, std::fabs(double(ref[i])));
    if (!std::isfinite(got[i])) return {INFINITY, INFINITY};
  }
  return {std::sqrt(num / den), mx / mref};
}

// Golden values are f64; read as f32 vectors (the comparison tolerance is far above f32 eps).
std::vector<float> golden(const SafetensorsFile& g, const std::string& key) {
  EXPECT_NE(g.find(key), nullptr) << "golden key " << key;
  return g.tensor(key, MemCategory::Workspace).to_f32_vector();
}

class Reference : public ::testing::TestWithParam<std::string> {};

// Full forward of the fixture batch with `lo`; logits and every layer's router logits against
// the float64 golden values (normwise <= 1e-5, max-abs relative <= 1e-4).
void check_logits_and_router(const std::string& family, const LoadOptions& lo, const char* label) {
  const std::string dir = fixture(family);
  Model m = Model::load(dir, lo);
  auto batch = SafetensorsFile::open(dir + "/batch.safetensors");
  auto gold = SafetensorsFile::open(dir + "/golden.safetensors");
  Tensor ids = batch->tensor("input_ids", MemCategory::Activations);
  KVCache kv = m.make_cache(ids.dim(0), ids.dim(1));
  ForwardOptions fo;
  fo.want_router_logits = true;
  ForwardResult r = m.forward(ids, kv, fo);

  Err e = compare(r.logits.to_f32_vector(), golden(*gold, "logits"));
  std::printf("%s%s logits: rel_fro %.3g rel_max %.3g\n", label, family.c_str(), e.rel_fro, e.rel_max);
  EXPECT_LE(e.rel_fro, 1e-5) << "logits";
  EXPECT_LE(e.rel_max, 1e-4) << "logits";
  for (int64_t l = 0; l < m.config().n_layer; ++l) {
    if (!m.config().layer_is_moe(l)) continue;  // DeepSeek's dense first layers have no router
    const std::string key = "router_logits." + std::to_string(l);
    Err er = compare(r.router_logits[size_t(l)].to_f32_vector(), golden(*gold, key));
    EXPECT_LE(er.rel_fro, 1e-5) << key;
    EXPECT_LE(er.rel_max, 1e-4) << key;
  }
}

TEST_P(Reference, LogitsAndRouterMatchPyTorch) {
  const std::string dir = fixture(GetParam());
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  check_logits_and_router(GetParam(), LoadOptions{}, "");
}

TEST_P(Reference, ExpertChoiceMatchesPyTorch) {
  const std::string dir = fixture(GetParam());
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  Model m = Model::load(dir);
  auto gold = SafetensorsFile::open(dir + "/golden.safetensors");
  const int64_t k = m.config().n_expert_used;
  for (int64_t l = 0; l < m.config().n_layer; ++l) {
    if (!m.config().layer_is_moe(l)) continue;
    // Recompute the top-k from the golden router logits with our router op (the family's rules,
    // the layer's selection bias): indices must agree exactly and weights to f32 precision.
    Tensor lg = gold->tensor("router_logits." + std::to_string(l), MemCategory::Workspace).to_dtype(DType::F32);
    Tensor idx = Tensor::empty({lg.dim(0), k}, DType::I32, MemCategory::Workspace);
    Tensor w = Tensor::empty({lg.dim(0), k}, DType::F32, MemCategory::Workspace);
    router_topk_forward(idx, w, lg, router_variant(m.config()), m.weights().layers[size_t(l)].router_bias);
    std::vector<float> want_idx = golden(*gold, "router_topk_idx." + std::to_string(l));
    std::vector<float> want_w = golden(*gold, "router_topk_weight." + std::to_string(l));
    ASSERT_EQ(want_idx.size(), size_t(idx.numel()));
    for (int64_t i = 0; i < idx.numel(); ++i) {
      EXPECT_EQ(idx.data<int32_t>()[i], int32_t(want_idx[size_t(i)])) << "layer " << l << " slot " << i;
      EXPECT_NEAR(w.data<float>()[i], want_w[size_t(i)], 1e-6) << "layer " << l << " slot " << i;
    }
  }
}

TEST_P(Reference, IncrementalDecodeEqualsFullForward) {
  const std::string dir = fixture(GetParam());
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  Model m = Model::load(dir);
  auto batch = SafetensorsFile::open(dir + "/batch.safetensors");
  Tensor ids = batch->tensor("input_ids", MemCategory::Activations).to_dtype(DType::F32);
  const int64_t b_n = ids.dim(0), s_n = ids.dim(1), v = m.config().vocab_size;
  Tensor ids32 = Tensor::empty({b_n, s_n}, DType::I32, MemCategory::Activations);
  for (int64_t i = 0; i < b_n * s_n; ++i) ids32.data<int32_t>()[i] = int32_t(ids.data<float>()[i]);

  KVCache full_kv = m.make_cache(b_n, s_n);
  std::vector<float> full = m.forward(ids32, full_kv).logits.to_f32_vector();

  // Prefill 5 tokens, then one token at a time.
  KVCache kv = m.make_cache(b_n, s_n);
  const int64_t pre = 5;
  std::vector<float> got(size_t(b_n * s_n * v));
  auto run = [&](int64_t s0, int64_t s1) {
    Tensor part = Tensor::empty({b_n, s1 - s0}, DType::I32, MemCategory::Activations);
    for (int64_t b = 0; b < b_n; ++b)
      for (int64_t s = s0; s < s1; ++s) part.data<int32_t>()[b * (s1 - s0) + s - s0] = ids32.data<int32_t>()[b * s_n + s];
    std::vector<float> lg = m.forward(part, kv).logits.to_f32_vector();
    for (int64_t b = 0; b < b_n; ++b)
      for (int64_t s = s0; s < s1; ++s)
        std::copy_n(lg.begin() + ((b * (s1 - s0) + s - s0) * v), v, got.begin() + (b * s_n + s) * v);
  };
  run(0, pre);
  for (int64_t s = pre; s < s_n; ++s) run(s, s + 1);
  EXPECT_EQ(kv.pos, std::vector<int64_t>(size_t(b_n), s_n));
  Err e = compare(got, full);
  EXPECT_LE(e.rel_fro, 1e-5);
  EXPECT_LE(e.rel_max, 1e-5);
}

TEST_P(Reference, SingleTokenStepsEqualFullForward) {
  // Batch 1, one token per step: the path that uses the stacked q/k/v projection.
  const std::string dir = fixture(GetParam());
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  Model m = Model::load(dir);
  auto batch = SafetensorsFile::open(dir + "/batch.safetensors");
  std::vector<float> ids = batch->tensor("input_ids", MemCategory::Activations).to_f32_vector();
  const int64_t s_n = 16, v = m.config().vocab_size;
  Tensor all = Tensor::empty({1, s_n}, DType::I32, MemCategory::Activations);
  for (int64_t s = 0; s < s_n; ++s) all.data<int32_t>()[s] = int32_t(ids[size_t(s)]);
  KVCache full_kv = m.make_cache(1, s_n);
  std::vector<float> full = m.forward(all, full_kv).logits.to_f32_vector();
  KVCache kv = m.make_cache(1, s_n);
  std::vector<float> got;
  Tensor one = Tensor::empty({1, 1}, DType::I32, MemCategory::Activations);
  for (int64_t s = 0; s < s_n; ++s) {
    one.data<int32_t>()[0] = all.data<int32_t>()[s];
    std::vector<float> lg = m.forward(one, kv).logits.to_f32_vector();
    ASSERT_EQ(int64_t(lg.size()), v);
    got.insert(got.end(), lg.begin(), lg.end());
  }
  Err e = compare(got, full);
  EXPECT_LE(e.rel_fro, 1e-5);
  EXPECT_LE(e.rel_max, 1e-5);
}

TEST_P(Reference, LogitsCommandContract) {
  // The CLI contract: `moe logits DIR --input batch.safetensors --out F` writes logits [B,S,V]
  // and router_logits.<layer> [B*S,E] in f32 that match the golden files.
  const std::string dir = fixture(GetParam());
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  const std::string moe = std::string(MOE_BINARY_DIR) + "/moe";
  ASSERT_TRUE(std::filesystem::exists(moe)) << moe;
  const std::string out = std::string(std::filesystem::temp_directory_path()) + "/moe_logits_" + GetParam() + "_" +
                          std::to_string(::getpid()) + ".safetensors";
  const std::string cmd = moe + " logits " + dir + " --input " + dir + "/batch.safetensors --out " + out + " > /dev/null";
  ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
  auto got = SafetensorsFile::open(out);
  auto gold = SafetensorsFile::open(dir + "/golden.safetensors");
  const SafetensorsInfo* li = got->find("logits");
  ASSERT_NE(li, nullptr);
  EXPECT_EQ(li->dtype, DType::F32);
  EXPECT_EQ(li->shape.size(), 3u);
  EXPECT_LE(compare(got->tensor("logits").to_f32_vector(), golden(*gold, "logits")).rel_max, 1e-4);
  const ModelConfig cfg = load_hf_config(dir + "/config.json");
  for (int l = 0; l < cfg.n_layer; ++l) {
    if (!cfg.layer_is_moe(l)) continue;
    const std::string key = "router_logits." + std::to_string(l);
    ASSERT_NE(got->find(key), nullptr) << key;
    EXPECT_EQ(got->find(key)->shape.size(), 2u);
    EXPECT_LE(compare(got->tensor(key).to_f32_vector(), golden(*gold, key)).rel_max, 1e-4) << key;
  }
  std::filesystem::remove(out);
}

TEST_P(Reference, Bf16WeightsStayClose) {
  // bf16 weight storage (f32 compute) must stay near the f32 logits: a sanity bound, not a
  // golden match (bf16 has ~3 significant digits).
  const std::string dir = fixture(GetParam());
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  LoadOptions lo;
  lo.keep_dtype = false;
  lo.weight_dtype = DType::BF16;
  Model m = Model::load(dir, lo);
  EXPECT_EQ(m.weights().layers[0].w1.dtype(), DType::BF16);
  auto batch = SafetensorsFile::open(dir + "/batch.safetensors");
  auto gold = SafetensorsFile::open(dir + "/golden.safetensors");
  Tensor ids = batch->tensor("input_ids", MemCategory::Activations);
  KVCache kv = m.make_cache(ids.dim(0), ids.dim(1));
  Err e = compare(m.forward(ids, kv).logits.to_f32_vector(), golden(*gold, "logits"));
  EXPECT_LE(e.rel_fro, 2e-2);
  EXPECT_GT(e.rel_fro, 0.0);  // it really used bf16
}

// The same fixtures on the CUDA backend: f32 weights and activations must match the float64
// golden logits like the CPU does; bf16 must agree on the argmax of (nearly) every position.
TEST_P(Reference, CudaF32LogitsMatchPyTorch) {
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU: CUDA reference test SKIPPED";
  if (!config_runs_on_cuda(load_hf_config(fixture(GetParam()) + "/config.json")))
    GTEST_SKIP() << GetParam() << ": its op variants have no CUDA kernels yet (CPU only): SKIPPED";
  LoadOptions lo;
  lo.device = Device::CUDA;
  lo.act_dtype = DType::F32;
  check_logits_and_router(GetParam(), lo, "cuda f32 ");
}

TEST_P(Reference, CudaBf16ArgmaxAgrees) {
  const std::string dir = fixture(GetParam());
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU: CUDA reference test SKIPPED";
  if (!config_runs_on_cuda(load_hf_config(dir + "/config.json")))
    GTEST_SKIP() << GetParam() << ": its op variants have no CUDA kernels yet (CPU only): SKIPPED";
  LoadOptions lo;
  lo.device = Device::CUDA;
  lo.keep_dtype = false;
  lo.weight_dtype = DType::BF16;
  lo.act_dtype = DType::BF16;
  Model m = Model::load(dir, lo);
  auto batch = SafetensorsFile::open(dir + "/batch.safetensors");
  auto gold = SafetensorsFile::open(dir + "/golden.safetensors");
  Tensor ids = batch->tensor("input_ids", MemCategory::Activations);
  KVCache kv = m.make_cache(ids.dim(0), ids.dim(1));
  std::vector<float> got = m.forward(ids, kv).logits.to_f32_vector();
  std::vector<float> ref = golden(*gold, "logits");
  const int64_t v = m.config().vocab_size, rows = int64_t(ref.size()) / v;
  int64_t agree = 0;
  for (int64_t r = 0; r < rows; ++r) {
    auto a = std::max_element(got.begin() + r * v, got.begin() + (r + 1) * v) - (got.begin() + r * v);
    auto b = std::max_element(ref.begin() + r * v, ref.begin() + (r + 1) * v) - (ref.begin() + r * v);
    agree += a == b;
  }
  Err e = compare(got, ref);
  std::printf("cuda bf16 %s: argmax agreement %lld/%lld, rel_fro %.3g\n", GetParam().c_str(), (long long)agree,
              (long long)rows, e.rel_fro);
  // Stated bound: bf16 storage + compute keeps logits within 3% (normwise) and the argmax on at
  // least 90% of positions (ties among near-equal logits of a random tiny model may flip).
  EXPECT_LE(e.rel_fro, 3e-2);
  EXPECT_GE(agree * 10, rows * 9);
}

// Positions per sequence: two sequences prefilled separately into their own cache slots (5 and
// 3 tokens), then decoded together while at different positions, and one step with only slot 1.
// Every logit row equals that of the sequence's own full forward.
TEST_P(Reference, SequencesAtDifferentPositionsShareABatch) {
  const std::string dir = fixture(GetParam());
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  Model m = Model::load(dir);
  auto batch = SafetensorsFile::open(dir + "/batch.safetensors");
  std::vector<float> all = batch->tensor("input_ids", MemCategory::Activations).to_f32_vector();
  const int64_t s_n = batch->tensor("input_ids", MemCategory::Activations).dim(1), v = m.config().vocab_size;
  ASSERT_GE(s_n, 10);
  std::vector<int32_t> seq_a, seq_b;  // two different sequences: the batch's first row, and the same shifted
  for (int64_t s = 0; s < 10; ++s) {
    seq_a.push_back(int32_t(all[size_t(s)]));
    seq_b.push_back(int32_t(all[size_t(s + (s_n - 10))]) ^ 1);
  }
  auto full = [&](const std::vector<int32_t>& ids) {
    Tensor t = Tensor::empty({1, int64_t(ids.size())}, DType::I32, MemCategory::Activations);
    std::copy(ids.begin(), ids.end(), t.data<int32_t>());
    KVCache kv = m.make_cache(1, int64_t(ids.size()));
    return m.forward(t, kv).logits.to_f32_vector();
  };
  const std::vector<float> ref_a = full(seq_a), ref_b = full(seq_b);
  auto row_of = [&](const std::vector<float>& lg, int64_t pos) {
    return std::vector<float>(lg.begin() + pos * v, lg.begin() + (pos + 1) * v);
  };
  KVCache kv = m.make_cache(2, 10);
  auto step = [&](const std::vector<std::vector<int32_t>>& rows, std::vector<int64_t> slots) {
    const int64_t n = int64_t(rows.size()), len = int64_t(rows[0].size());
    Tensor t = Tensor::empty({n, len}, DType::I32, MemCategory::Activations);
    for (int64_t i = 0; i < n; ++i) std::copy(rows[i].begin(), rows[i].end(), t.data<int32_t>() + i * len);
    ForwardOptions fo;
    fo.slots = std::move(slots);
    return m.forward(t, kv, fo).logits.to_f32_vector();
  };
  std::vector<float> got = step({{seq_a.begin(), seq_a.begin() + 5}}, {0});
  EXPECT_LE(compare(got, std::vector<float>(ref_a.begin(), ref_a.begin() + 5 * v)).rel_max, 1e-5);
  got = step({{seq_b.begin(), seq_b.begin() + 3}}, {1});
  EXPECT_LE(compare(got, std::vector<float>(ref_b.begin(), ref_b.begin() + 3 * v)).rel_max, 1e-5);
  EXPECT_EQ(kv.pos, (std::vector<int64_t>{5, 3}));
  for (int64_t i = 0; i < 3; ++i) {  // slot 1 listed first: rows need not follow slot order
    got = step({{seq_b[size_t(3 + i)]}, {seq_a[size_t(5 + i)]}}, {1, 0});
    EXPECT_LE(compare(row_of(got, 0), row_of(ref_b, 3 + i)).rel_max, 1e-5) << "step " << i << " seq b";
    EXPECT_LE(compare(row_of(got, 1), row_of(ref_a, 5 + i)).rel_max, 1e-5) << "step " << i << " seq a";
  }
  got = step({{seq_b[6]}}, {1});
  EXPECT_LE(compare(got, row_of(ref_b, 6)).rel_max, 1e-5);
  EXPECT_EQ(kv.pos, (std::vector<int64_t>{8, 7}));
  // Misuse is a clear error.
  Tensor one = Tensor::empty({2, 1}, DType::I32, MemCategory::Activations);
  one.data<int32_t>()[0] = one.data<int32_t>()[1] = 1;
  ForwardOptions twice;
  twice.slots = {0, 0};
  EXPECT_THROW(m.forward(one, kv, twice), Error);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, Reference,
                         ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "gpt_oss", "deepseek_v2",
                                           "deepseek_v3"));

}  // namespace
}  // namespace moe
