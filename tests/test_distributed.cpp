// test_distributed.cpp — distributed training and inference (issue 10): the EP exchange's
// bookkeeping in one process, then, under Open MPI's mpirun with 2 and 4 ranks, the CLI
// contracts against one process on the whole batch:
//   `moe grad --ep/--dp`  — losses and every gradient within 1e-6 (normwise, per tensor) of the
//                           single-process file, and within the fixtures' 1e-4 of PyTorch;
//   `moe train --ep/--dp` — the same loss curve over 20 steps (also with ZeRO-1); a checkpoint
//                           written under N ranks resumes under M; the PyTorch AdamW trajectory
//                           under EP;
//   uneven routing (every token to the same two experts: three of four ranks get nothing);
//   a rank that dies or hangs ends the job in bounded time with the rank named, and the last
//   checkpoint stays intact; `moe generate --ep` produces the single-process tokens.
// The multi-process tests need a build with MPI (MOE_MPIEXEC); without it they report SKIPPED.
#include <gtest/gtest.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <random>
#include <tuple>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "dist/expert_exchange.h"
#include "dist/parallel.h"
#include "fixture_util.h"
#include "io/safetensors.h"

namespace moe {
namespace {
namespace fs = std::filesystem;

using testutil::fixture;
using testutil::moe_bin;
using testutil::read_metrics;
using testutil::rel_err;
using testutil::run;
using testutil::scalar;

std::string scratch(const std::string& name) { return testutil::scratch_dir("dist-test-", name); }

// ---- one process: the exchange's bookkeeping ----

// With one rank every row stays: the plan keeps the offsets, dispatch and return are copies,
// and rows beyond the routed ones (capacity drops) are neither sent nor overwritten.
TEST(ExpertExchange, OneRankKeepsRowsInPlace) {
  auto comm = dist::make_single_process();
  const std::vector<int32_t> off = {0, 3, 3, 7, 8};  // 4 experts, expert 1 empty, 8 routed rows
  Tensor offsets = Tensor::empty({5}, DType::I32, MemCategory::Workspace);
  std::copy(off.begin(), off.end(), offsets.data<int32_t>());
  const dist::ExpertExchange x = dist::plan_exchange(*comm, offsets, 4);
  EXPECT_EQ(x.n_local, 4);
  EXPECT_EQ(x.sent(), 8);
  EXPECT_EQ(x.received(), 8);
  EXPECT_EQ(x.local_offsets, off);
  std::vector<float> vals(10 * 3);
  for (size_t i = 0; i < vals.size(); ++i) vals[i] = float(i) + 0.5f;
  Tensor src = Tensor::from_f32({10, 3}, vals);  // rows 8, 9: dropped, not sent
  Tensor mid = Tensor::empty({8, 3}, DType::F32, MemCategory::Workspace);
  dist::dispatch_rows(*comm, x, src, mid);
  EXPECT_EQ(mid.to_f32_vector(), std::vector<float>(vals.begin(), vals.begin() + 24));
  Tensor back = Tensor::from_f32({10, 3}, std::vector<float>(30, -1.0f));
  dist::return_rows(*comm, x, mid, back);
  std::vector<float> want(vals.begin(), vals.begin() + 24);
  want.resize(30, -1.0f);
  EXPECT_EQ(back.to_f32_vector(), want);
}

// Several tensors in one exchange (activations [N,3] and a per-row weight [N]): each arrives in
// its own tensor as if sent alone.
TEST(ExpertExchange, TensorsTravelTogether) {
  auto comm = dist::make_single_process();
  Tensor offsets = Tensor::empty({3}, DType::I32, MemCategory::Workspace);
  const std::vector<int32_t> off = {0, 2, 5};
  std::copy(off.begin(), off.end(), offsets.data<int32_t>());
  const dist::ExpertExchange x = dist::plan_exchange(*comm, offsets, 2);
  std::vector<float> rows(6 * 3), w(6);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = float(i) * 0.25f;
  for (size_t i = 0; i < w.size(); ++i) w[i] = 100.0f + float(i);
  Tensor a = Tensor::from_f32({6, 3}, rows), b = Tensor::from_f32({6}, w);  // row 5: dropped, not sent
  Tensor ga = Tensor::empty({5, 3}, DType::F32, MemCategory::Workspace), gb = Tensor::empty({5}, DType::F32, MemCategory::Workspace);
  dist::dispatch_rows(*comm, x, {&a, &b}, {&ga, &gb});
  EXPECT_EQ(ga.to_f32_vector(), std::vector<float>(rows.begin(), rows.begin() + 15));
  EXPECT_EQ(gb.to_f32_vector(), std::vector<float>(w.begin(), w.begin() + 5));
  Tensor ra = Tensor::from_f32({6, 3}, std::vector<float>(18, -1.0f)), rb = Tensor::from_f32({6}, std::vector<float>(6, -1.0f));
  dist::return_rows(*comm, x, {&ga, &gb}, {&ra, &rb});
  std::vector<float> want_a(rows.begin(), rows.begin() + 15), want_b(w.begin(), w.begin() + 5);
  want_a.resize(18, -1.0f);
  want_b.resize(6, -1.0f);
  EXPECT_EQ(ra.to_f32_vector(), want_a);
  EXPECT_EQ(rb.to_f32_vector(), want_b);
}

// A layout that does not fit the job is an error that says how to start it.
TEST(Parallel, LayoutMustFitTheRanks) {
  try {
    dist::make_parallel(2, 1);  // this test runs as one process
    FAIL() << "expected an error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("mpirun -np 2"), std::string::npos) << e.what();
  }
  const auto p = dist::make_parallel(0, 0);
  EXPECT_EQ(p->size(), 1);
  EXPECT_EQ(p->batch_rows(5), std::make_pair(int64_t(0), int64_t(5)));
}

// ---- several processes ----

#ifdef MOE_MPIEXEC
#define REQUIRE_MPI() (void)0
std::string mpirun(int np) {
  return std::string(MOE_MPIEXEC) + " --allow-run-as-root --oversubscribe -x OMP_NUM_THREADS=1 -x OMP_WAIT_POLICY=passive -np " +
         std::to_string(np) + " ";
}
#else
#define REQUIRE_MPI() GTEST_SKIP() << "SKIPPED: this build has no MPI (CMake did not find Open MPI)"
std::string mpirun(int) { return ""; }
#endif
// One process with the ranks' thread count: f32 results already differ at ~5e-7 between 1 and 2
// OpenMP threads (other summation orders), which is not what these tests measure.
const std::string kOne = "OMP_NUM_THREADS=1 ";

// Worst per-tensor normwise relative difference of b from a over every tensor of a (b must
// have the same names); the name of the worst one in *worst_name.
double worst_rel(const std::string& a_path, const std::string& b_path, std::string* worst_name) {
  auto a = SafetensorsFile::open(a_path), b = SafetensorsFile::open(b_path);
  EXPECT_EQ(a->tensors().size(), b->tensors().size());
  double worst = 0;
  for (const SafetensorsInfo& info : a->tensors()) {
    EXPECT_NE(b->find(info.name), nullptr) << "missing " << info.name;
    if (!b->find(info.name)) return INFINITY;
    const double e = rel_err(b->tensor(info.name, MemCategory::Workspace).to_f32_vector(),
                             a->tensor(info.name, MemCategory::Workspace).to_f32_vector());
    if (e > worst) worst = e, *worst_name = info.name;
  }
  return worst;
}

struct Layout {
  int np;
  std::string flags;
};
const std::vector<Layout> kLayouts = {{2, "--dp 2"},  {2, "--ep 2"},  {4, "--ep 2 --dp 2"},
                                      {4, "--ep 4"},  {4, "--dp 4"},  {2, "--ep 2 --recompute"}};

class DistGrad : public ::testing::TestWithParam<std::string> {};

// Every layout's `moe grad` file equals one process's (1e-6) and PyTorch's golden (1e-4). With
// B = 2 rows, the 4-rank layouts leave two ranks without a row of their own.
TEST_P(DistGrad, EveryLayoutMatchesOneProcessAndPyTorch) {
  REQUIRE_MPI();
  const std::string dir = fixture(GetParam());
  if (!fs::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  const std::string d = scratch("grad-" + GetParam());
  const std::string args = " grad " + dir + " --input " + dir + "/batch.safetensors --out ";
  ASSERT_EQ(run(kOne + moe_bin() + args + d + "/one.safetensors > /dev/null"), 0);
  auto gold = SafetensorsFile::open(dir + "/golden.safetensors");
  for (const Layout& l : kLayouts) {
    const std::string out = d + "/np" + std::to_string(l.np) + "-" + std::to_string(&l - kLayouts.data()) + ".safetensors";
    ASSERT_EQ(run(mpirun(l.np) + moe_bin() + args + out + " " + l.flags + " > " + d + "/log.txt 2>&1"), 0) << l.flags;
    std::string name;
    const double e = worst_rel(d + "/one.safetensors", out, &name);
    EXPECT_LE(e, 1e-6) << "-np " << l.np << " " << l.flags << ": " << name;
    auto got = SafetensorsFile::open(out);
    double worst_gold = 0;
    int n = 0;
    for (const SafetensorsInfo& info : gold->tensors()) {
      if (info.name.rfind("grad.", 0) != 0) continue;
      ASSERT_NE(got->find(info.name), nullptr) << info.name;
      worst_gold = std::max(worst_gold, rel_err(got->tensor(info.name, MemCategory::Workspace).to_f32_vector(),
                                                gold->tensor(info.name, MemCategory::Workspace).to_f32_vector()));
      ++n;
    }
    EXPECT_GT(n, 60);
    EXPECT_LE(worst_gold, 1e-4) << l.flags;
    EXPECT_LE(std::fabs(scalar(*got, "total_loss") - scalar(*gold, "total_loss")) / scalar(*gold, "total_loss"), 1e-5);
    std::printf("%s -np %d %s: vs one process %.3g, vs PyTorch %.3g\n", GetParam().c_str(), l.np, l.flags.c_str(), e,
                worst_gold);
  }
}

INSTANTIATE_TEST_SUITE_P(Fixtures, DistGrad, ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe", "olmoe"));

// LoRA gradients (the fixture's PEFT adapter) under data parallelism equal one process's; expert
// parallelism with adapters on the routed experts is refused with a message that says so.
TEST(DistGradLora, DataParallelAdapterGradients) {
  REQUIRE_MPI();
  const std::string dir = fixture("mixtral");
  if (!fs::exists(dir + "/lora")) GTEST_SKIP() << "SKIPPED: no LoRA fixture at " << dir << "/lora";
  const std::string d = scratch("grad-lora");
  const std::string args = " grad " + dir + " --adapter " + dir + "/lora --input " + dir + "/batch.safetensors --out ";
  ASSERT_EQ(run(kOne + moe_bin() + args + d + "/one.safetensors > /dev/null"), 0);
  ASSERT_EQ(run(mpirun(2) + moe_bin() + args + d + "/dp.safetensors --dp 2 > /dev/null"), 0);
  std::string name;
  EXPECT_LE(worst_rel(d + "/one.safetensors", d + "/dp.safetensors", &name), 1e-6) << name;
  EXPECT_NE(run(mpirun(2) + moe_bin() + args + d + "/ep.safetensors --ep 2 > " + d + "/ep.txt 2>&1"), 0);
  std::ifstream in(d + "/ep.txt");
  const std::string err((std::istreambuf_iterator<char>(in)), {});
  EXPECT_NE(err.find("not sharded yet"), std::string::npos) << err;
  EXPECT_NE(err.find("rank"), std::string::npos) << err;
}

// The mixtral fixture with every router weight zero: all logits tie, so every token picks
// experts 0 and 1 (lowest index first) and, under --ep 4, ranks 1-3 own experts that get
// nothing. The gradients still equal one process's, and the idle experts' are exactly zero.
TEST(DistGrad, AllTokensToTwoExperts) {
  REQUIRE_MPI();
  const std::string src = fixture("mixtral");
  if (!fs::exists(src)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << src;
  const std::string d = scratch("uneven");
  const std::string model = d + "/model";
  fs::create_directories(model);
  fs::copy_file(src + "/config.json", model + "/config.json");
  auto f = SafetensorsFile::open(src + "/model.safetensors");
  std::vector<std::pair<std::string, Tensor>> named;
  int routers = 0;
  for (const SafetensorsInfo& info : f->tensors()) {
    Tensor t = f->tensor(info.name, MemCategory::Workspace).clone();
    if (info.name.find("block_sparse_moe.gate.weight") != std::string::npos) {
      t.zero_();
      ++routers;
    }
    named.emplace_back(info.name, t);
  }
  ASSERT_GT(routers, 0);
  write_safetensors(model + "/model.safetensors", named);
  const std::string args = " grad " + model + " --input " + src + "/batch.safetensors --out ";
  ASSERT_EQ(run(kOne + moe_bin() + args + d + "/one.safetensors > /dev/null"), 0);
  for (const Layout& l : {Layout{4, "--ep 4"}, Layout{4, "--ep 2 --dp 2"}}) {
    ASSERT_EQ(run(mpirun(l.np) + moe_bin() + args + d + "/ep.safetensors " + l.flags + " > /dev/null"), 0);
    std::string name;
    EXPECT_LE(worst_rel(d + "/one.safetensors", d + "/ep.safetensors", &name), 1e-6) << l.flags << ": " << name;
  }
  auto g = SafetensorsFile::open(d + "/ep.safetensors");
  int idle = 0, busy = 0;
  for (const SafetensorsInfo& info : g->tensors()) {
    const size_t at = info.name.find(".experts.");
    if (at == std::string::npos) continue;
    const int e = std::stoi(info.name.substr(at + 9));
    double ss = 0;
    for (float v : g->tensor(info.name, MemCategory::Workspace).to_f32_vector()) ss += double(v) * v;
    if (e >= 2) {
      EXPECT_EQ(ss, 0.0) << info.name;
      ++idle;
    } else {
      EXPECT_GT(ss, 0.0) << info.name;
      ++busy;
    }
  }
  EXPECT_GT(idle, 0);
  EXPECT_GT(busy, 0);
}

// A pre-tokenized file of 64 random rows of 16 tokens (ids < 64).
std::string write_rows(const std::string& d) {
  std::mt19937 rng(7);
  std::vector<int32_t> ids(64 * 16);
  for (int32_t& v : ids) v = int32_t(rng() % 64);
  Tensor t = Tensor::empty({64, 16}, DType::I32, MemCategory::Workspace);
  std::copy(ids.begin(), ids.end(), t.data<int32_t>());
  const std::string path = d + "/rows.safetensors";
  write_safetensors(path, {{"input_ids", t}, {"labels", t}});
  return path;
}

void expect_same_curve(const std::vector<nlohmann::json>& a, const std::vector<nlohmann::json>& b, size_t n,
                       const std::string& what) {
  ASSERT_EQ(a.size(), n) << what;
  ASSERT_EQ(b.size(), n) << what;
  for (size_t i = 0; i < n; ++i) {
    EXPECT_EQ(b[i]["step"], a[i]["step"]);
    const double x = a[i]["loss"].get<double>(), y = b[i]["loss"].get<double>();
    EXPECT_LE(std::fabs(x - y) / std::fabs(x), 1e-6) << what << " step " << i + 1 << ": " << y << " vs " << x;
    const double gx = a[i]["grad_norm"].get<double>(), gy = b[i]["grad_norm"].get<double>();
    EXPECT_LE(std::fabs(gx - gy) / gx, 1e-5) << what << " step " << i + 1;
    if (a[i].contains("val_loss")) {
      const double va = a[i]["val_loss"].get<double>(), vb = b[i]["val_loss"].get<double>();
      EXPECT_LE(std::fabs(va - vb) / va, 1e-6) << what;
    }
  }
}

// 20 steps of `moe train` (clipping, cosine schedule, validation, bias-free aux loss) give one
// process's loss curve under EP, EP x DP and DP; the checkpoint of step 10 written by 2 ranks
// resumes under 4 ranks and under one process to the same curve; metrics carry the traffic.
TEST(DistTrain, LossCurveAndResumeAcrossRankCounts) {
  REQUIRE_MPI();
  const std::string dir = fixture("qwen2_moe");
  if (!fs::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  const std::string d = scratch("train");
  const std::string flags = " train " + dir + " --data " + write_rows(d) +
                            " --batch-size 4 --steps 20 --lr 1e-3 --warmup 2 --clip 0.5 --val-fraction 0.1"
                            " --eval-every 10 --save-every 10 --seed 3 --quiet --out ";
  ASSERT_EQ(run(kOne + moe_bin() + flags + d + "/one"), 0);
  const auto one = read_metrics(d + "/one");
  const std::vector<std::pair<Layout, std::string>> runs = {{{2, "--ep 2"}, "np2ep"},
                                                             {{4, "--ep 2 --dp 2"}, "np4"},
                                                             {{2, "--dp 2"}, "np2dp"},
                                                             {{4, "--ep 2 --dp 2 --zero 1"}, "np4zero"}};
  for (const auto& [l, tag] : runs) {
    const std::string out = d + "/" + tag;
    ASSERT_EQ(run(mpirun(l.np) + moe_bin() + flags + out + " " + l.flags), 0) << l.flags;
    const auto m = read_metrics(out);
    expect_same_curve(one, m, 20, l.flags);
    ASSERT_FALSE(m.empty());
    EXPECT_GT(m.back()["comm_bytes"].get<int64_t>(), 0);
    EXPECT_TRUE(m.back()["comm"].contains("all-reduce")) << m.back()["comm"].dump();
    if (l.flags.find("ep") != std::string::npos) {
      EXPECT_TRUE(m.back()["comm"].contains("all-to-all"));
    }
  }
  // Resume step-10 checkpoints under other rank counts: the 2-rank EP run's under 4 ranks (EP 4)
  // and one process; the ZeRO-1 run's (its optimizer state gathered from four shards) under 2.
  const std::vector<std::tuple<std::string, int, std::string>> resumes = {
      {"np2ep", 4, "--ep 4"}, {"np2ep", 1, ""}, {"np4zero", 2, "--ep 2"}};
  for (const auto& [from, np, fl] : resumes) {
    const std::string r = d + "/resume-" + from + "-" + std::to_string(np);
    fs::create_directories(r);
    fs::copy(d + "/" + from + "/step-10", r + "/step-10", fs::copy_options::recursive);
    fs::copy_file(d + "/" + from + "/metrics.jsonl", r + "/metrics.jsonl");
    const std::string launch = np > 1 ? mpirun(np) : kOne;
    ASSERT_EQ(run(launch + moe_bin() + flags + r + " --resume " + fl), 0) << np;
    expect_same_curve(one, read_metrics(r), 20, from + " resumed under " + std::to_string(np));
  }
  // The checkpoint is the whole model, as one process writes it: every tensor, close. (Not to
  // 1e-6: the k-projection bias has a zero true gradient, so AdamW walks it on f32 noise, which
  // differs run to run; measured 2.6e-5 after 20 steps.)
  std::string name;
  EXPECT_LE(worst_rel(d + "/one/final/model.safetensors", d + "/np2ep/final/model.safetensors", &name), 1e-4) << name;
}

// Mixed precision under ZeRO-1: each owner updates its split master weights (model_train.h) and
// sends both halves, so every rank computes on the owner's bf16 values and rank 0 saves the
// owners' f32 values: one process's losses and checkpoint. Two steps at lr 1e-4 only: the
// layouts' f32 rounding differences flip bf16 roundings of activations (the experts' saved
// pre-activations are bf16) and AdamW's first, sign-like updates turn each flip into a 2·lr step
// (~1e-2 after 8 steps; 9.5e-4 after two at lr 1e-3). Measured after two at lr 1e-4: 9.5e-5,
// while rank 0 joining new upper halves with stale lower ones (a mutation that skips their
// broadcast) measured 2.7e-3.
TEST(DistTrain, MixedPrecisionUnderZeroOne) {
  REQUIRE_MPI();
  const std::string dir = fixture("qwen2_moe");
  if (!fs::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  const std::string d = scratch("mixed-zero");
  const std::string flags = " train " + dir + " --data " + write_rows(d) +
                            " --batch-size 4 --steps 2 --lr 1e-4 --clip 0.5 --val-fraction 0 --seed 3"
                            " --weight-dtype bf16 --quiet --out ";
  ASSERT_EQ(run(kOne + moe_bin() + flags + d + "/one"), 0);
  ASSERT_EQ(run(mpirun(4) + moe_bin() + flags + d + "/four --ep 2 --dp 2 --zero 1"), 0);
  const auto a = read_metrics(d + "/one"), b = read_metrics(d + "/four");
  ASSERT_EQ(a.size(), 2u);
  ASSERT_EQ(b.size(), 2u);
  for (size_t i = 0; i < a.size(); ++i) {
    const double x = a[i]["loss"].get<double>(), y = b[i]["loss"].get<double>();
    EXPECT_LE(std::fabs(x - y) / std::fabs(x), 1e-5) << "step " << i + 1 << ": " << y << " vs " << x;
  }
  std::string name;
  EXPECT_LE(worst_rel(d + "/one/final/model.safetensors", d + "/four/final/model.safetensors", &name), 3e-4) << name;
}

// The fused update (each layer's gradients reduced and applied as they become final) under
// EP x DP gives one process's fused run.
TEST(DistTrain, FusedUpdateUnderEpDp) {
  REQUIRE_MPI();
  const std::string dir = fixture("qwen2_moe");
  if (!fs::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  const std::string d = scratch("fused");
  const std::string flags = " train " + dir + " --data " + write_rows(d) +
                            " --batch-size 4 --steps 10 --lr 1e-3 --clip 0 --fused-update --val-fraction 0 --seed 3"
                            " --quiet --out ";
  ASSERT_EQ(run(kOne + moe_bin() + flags + d + "/one"), 0);
  ASSERT_EQ(run(mpirun(4) + moe_bin() + flags + d + "/four --ep 2 --dp 2"), 0);
  expect_same_curve(read_metrics(d + "/one"), read_metrics(d + "/four"), 10, "fused --ep 2 --dp 2");
}

// LoRA fine-tuning: adapters on attention and the routed experts under --dp 2, on attention
// only under --ep 2, each the loss curve of one process; the adapter is written once.
TEST(DistFinetune, LoraUnderDpAndEp) {
  REQUIRE_MPI();
  const std::string dir = fixture("qwen3_moe");
  if (!fs::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  const std::string d = scratch("finetune");
  const std::string flags = " finetune " + dir + " --data " + write_rows(d) +
                            " --batch-size 4 --steps 6 --lr 1e-3 --val-fraction 0 --seed 3 --lora-r 4 --quiet";
  for (const auto& [targets, layout] : {std::pair{std::string("q_proj,v_proj,gate_proj,up_proj,down_proj"), std::string("--dp 2")},
                                        std::pair{std::string("q_proj,v_proj,o_proj"), std::string("--ep 2")}}) {
    const std::string t = " --target-modules " + targets + " --out ";
    const std::string tag = layout.substr(2, 2);
    ASSERT_EQ(run(kOne + moe_bin() + flags + t + d + "/one-" + tag), 0);
    ASSERT_EQ(run(mpirun(2) + moe_bin() + flags + t + d + "/two-" + tag + " " + layout), 0) << layout;
    expect_same_curve(read_metrics(d + "/one-" + tag), read_metrics(d + "/two-" + tag), 6, layout);
    std::string name;
    EXPECT_LE(worst_rel(d + "/one-" + tag + "/final/adapter_model.safetensors",
                        d + "/two-" + tag + "/final/adapter_model.safetensors", &name),
              1e-4)
        << layout << ": " << name;
  }
}

// The fixture's five float64 torch.optim.AdamW steps, replayed under expert parallelism.
TEST(DistTrain, AdamWTrajectoryUnderExpertParallel) {
  REQUIRE_MPI();
  const std::string dir = fixture("mixtral");
  if (!fs::exists(dir + "/train_traj.safetensors")) GTEST_SKIP() << "SKIPPED: no train_traj.safetensors in " << dir;
  const std::string d = scratch("traj");
  auto traj = SafetensorsFile::open(dir + "/train_traj.safetensors");
  Tensor ids = traj->tensor("traj_input_ids", MemCategory::Workspace);
  Tensor labels = traj->tensor("traj_labels", MemCategory::Workspace);
  const int64_t s = ids.dim(2);
  write_safetensors(d + "/traj.safetensors",
                    {{"input_ids", ids.view({ids.numel() / s, s})}, {"labels", labels.view({labels.numel() / s, s})}});
  ASSERT_EQ(run(mpirun(2) + moe_bin() + " train " + dir + " --data " + d + "/traj.safetensors --out " + d +
                "/run --ep 2 --batch-size 2 --no-shuffle --steps 5 --lr 1e-3 --lr-schedule constant --warmup 0"
                " --beta1 0.9 --beta2 0.95 --eps 1e-8 --weight-decay 0.1 --decay-all --clip 0 --val-fraction 0 --quiet"),
            0);
  const std::vector<float> ref = traj->tensor("total_loss", MemCategory::Workspace).to_f32_vector();
  const auto m = read_metrics(d + "/run");
  ASSERT_EQ(m.size(), 5u);
  for (size_t i = 0; i < 5; ++i)
    EXPECT_LE(std::fabs(m[i]["loss"].get<double>() - ref[i]) / std::fabs(ref[i]), 1e-5) << "step " << i + 1;
}

// A rank that dies mid-run ends the job within a bounded time, the launcher names the rank, and
// the checkpoints written before stay complete; a rank that hangs is caught by the others'
// watchdog (--dist-timeout), which names the waiting rank and the collective.
TEST(DistFailure, DeadOrHungRankEndsTheJob) {
  REQUIRE_MPI();
  const std::string dir = fixture("mixtral");
  if (!fs::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  const std::string d = scratch("fail");
  const std::string data = write_rows(d);
  for (const bool hang : {false, true}) {
    const std::string r = d + (hang ? "/hang" : "/die");
    const auto t0 = std::chrono::steady_clock::now();
    const int rc = run(mpirun(2) + moe_bin() + " train " + dir + " --data " + data + " --out " + r +
                       " --ep 2 --batch-size 4 --steps 50 --save-every 1 --val-fraction 0 --quiet --dist-timeout 5"
                       " --test-fail-step 4 --test-fail-rank 1" + (hang ? " --test-fail-hang" : "") + " > " + r +
                       ".log 2>&1");
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    std::ifstream in(r + ".log");
    const std::string log((std::istreambuf_iterator<char>(in)), {});
    EXPECT_NE(rc, 0) << log;
    EXPECT_LT(secs, 120) << log;
    if (hang) {
      EXPECT_NE(log.find("rank 0: all-to-all has waited"), std::string::npos) << log;
    } else {
      EXPECT_NE(log.find("rank 1"), std::string::npos) << log;
    }
    // Steps 1-3 finished with their checkpoints; the newest loads and is complete.
    ASSERT_TRUE(fs::exists(r + "/step-3/trainer_state.json")) << log;
    EXPECT_FALSE(fs::exists(r + "/step-4"));
    auto st = nlohmann::json::parse(std::ifstream(r + "/step-3/trainer_state.json"));
    EXPECT_EQ(st["step"].get<int>(), 3);
    auto w = SafetensorsFile::open(r + "/step-3/model.safetensors");
    EXPECT_GT(w->tensors().size(), 60u);
  }
}

// Generation with the experts spread over 2 and 4 ranks gives one process's greedy tokens.
TEST(DistGenerate, ExpertParallelTokensMatch) {
  REQUIRE_MPI();
  const std::string dir = fixture("qwen3_moe");
  if (!fs::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  const std::string d = scratch("generate");
  const std::string args = " generate " + dir + " --ids 5,17,42,7 --max-new-tokens 16";
  auto tokens = [&](const std::string& launch, const std::string& tag) {
    EXPECT_EQ(run(launch + moe_bin() + args + " > " + d + "/" + tag + ".txt 2>&1"), 0) << tag;
    std::ifstream in(d + "/" + tag + ".txt");
    std::string line;
    while (std::getline(in, line))
      if (line.rfind("generated:", 0) == 0) return line;
    return std::string("(none)");
  };
  const std::string one = tokens("", "one");
  ASSERT_NE(one, "(none)");
  EXPECT_EQ(tokens(mpirun(2), "ep2"), one);
  EXPECT_EQ(tokens(mpirun(4), "ep4"), one);
}

}  // namespace
}  // namespace moe
