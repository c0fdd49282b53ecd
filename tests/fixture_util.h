// fixture_util.h — helpers the fixture-based tests share: where the fixtures and the `moe`
// binary are, a model loaded in f32, a fresh scratch directory, running a command, the normwise relative error the
// fixtures' tolerances are stated in, reading a scalar from a safetensors file and a run's
// metrics.jsonl, and a model's logits / greedy tokens for a prompt.
#pragma once
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <initializer_list>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "io/safetensors.h"
#include "model/model.h"

namespace moe::testutil {

inline std::string fixture(const std::string& fam) { return std::string(MOE_FIXTURES_DIR) + "/" + fam; }
// A model directory loaded with f32 weights whatever their stored dtype.
inline Model load_f32(const std::string& dir) {
  LoadOptions lo;
  lo.keep_dtype = false;
  lo.weight_dtype = DType::F32;
  return Model::load(dir, lo);
}
// fn throws moe::Error whose message contains every one of parts.
inline void expect_error(const std::function<void()>& fn, std::initializer_list<const char*> parts) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const char* p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "expected moe::Error";
}

inline std::string moe_bin() { return std::string(MOE_BINARY_DIR) + "/moe"; }

// A fresh, empty directory in the build tree: <build>/<prefix><name>.
inline std::string scratch_dir(const std::string& prefix, const std::string& name) {
  const std::string d = std::string(MOE_BINARY_DIR) + "/" + prefix + name;
  std::filesystem::remove_all(d);
  std::filesystem::create_directories(d);
  return d;
}

// Runs a shell command; its exit status (-1 when it did not exit normally).
inline int run(const std::string& cmd) {
  int rc = std::system(cmd.c_str());
  return WIFEXITED(rc) ? WEXITSTATUS(rc) : -1;
}

// ||got - ref|| / ||ref|| over two equally long vectors (f64 accumulation).
inline double rel_err(const std::vector<float>& got, const std::vector<float>& ref) {
  EXPECT_EQ(got.size(), ref.size());
  double num = 0, den = 0;
  for (size_t i = 0; i < std::min(got.size(), ref.size()); ++i) {
    if (!std::isfinite(got[i])) return INFINITY;
    const double d = double(got[i]) - double(ref[i]);
    num += d * d;
    den += double(ref[i]) * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

// The records of a training run's RUN_DIR/metrics.jsonl, one per optimizer step.
inline std::vector<nlohmann::json> read_metrics(const std::string& run_dir) {
  std::ifstream in(run_dir + "/metrics.jsonl");
  std::vector<nlohmann::json> out;
  std::string line;
  while (std::getline(in, line))
    if (!line.empty()) out.push_back(nlohmann::json::parse(line));
  return out;
}

inline double scalar(const SafetensorsFile& f, const std::string& key) {
  EXPECT_NE(f.find(key), nullptr) << key;
  return double(f.tensor(key, MemCategory::Workspace).to_f32_vector().at(0));
}

// input_ids [1, S] for a prompt.
inline Tensor ids_tensor(const std::vector<int32_t>& ids) {
  Tensor t = Tensor::empty({1, static_cast<int64_t>(ids.size())}, DType::I32, MemCategory::Activations);
  std::copy(ids.begin(), ids.end(), t.data<int32_t>());
  return t;
}

// The logits [S, V] of one forward over the prompt, flattened.
inline std::vector<float> logits_of(const Model& m, const std::vector<int32_t>& ids) {
  KVCache kv = m.make_cache(1, static_cast<int64_t>(ids.size()));
  return m.forward(ids_tensor(ids), kv).logits.to_f32_vector();
}

// n greedy tokens after the prompt, one decode step at a time.
inline std::vector<int32_t> greedy(const Model& m, std::vector<int32_t> prompt, int n) {
  KVCache kv = m.make_cache(1, static_cast<int64_t>(prompt.size()) + n);
  std::vector<int32_t> out;
  ForwardOptions fo;
  fo.last_logits_only = true;
  std::vector<int32_t> step = prompt;
  for (int i = 0; i < n; ++i) {
    std::vector<float> l = m.forward(ids_tensor(step), kv, fo).logits.to_f32_vector();
    const int32_t best = static_cast<int32_t>(std::max_element(l.begin(), l.end()) - l.begin());
    out.push_back(best);
    step.assign(1, best);
  }
  return out;
}

// max |a - b| / max |b| (INFINITY when the sizes differ).
inline double max_rel(const std::vector<float>& a, const std::vector<float>& b) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    num = std::max(num, std::fabs(double(a[i]) - b[i]));
    den = std::max(den, std::fabs(double(b[i])));
  }
  return a.size() == b.size() ? num / std::max(den, 1e-30) : INFINITY;
}

}  // namespace moe::testutil
