// checkpoint.cpp — atomic training checkpoints (see checkpoint.h).
#include "train/checkpoint.h"

#include <map>

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <map>

#include "core/file_util.h"
#include "core/json_util.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/model_train.h"
#include "train/hf_export.h"

namespace moe {
namespace fs = std::filesystem;

namespace {

void fsync_path(const std::string& path, bool dir) {
  int fd = ::open(path.c_str(), dir ? O_RDONLY | O_DIRECTORY : O_RDONLY);
  if (fd < 0) return;  // best effort: the data is complete either way
  ::fsync(fd);
  ::close(fd);
}

const char* const kTokenizerFiles[] = {"tokenizer.json", "tokenizer_config.json", "tokenizer.model",
                                       "special_tokens_map.json", "chat_template.jinja"};

}  // namespace

void write_text_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp-" + std::to_string(::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
  MOE_CHECK(fd >= 0, "%s: cannot create: %s", tmp.c_str(), std::strerror(errno));
  size_t done = 0;
  while (done < text.size()) {
    ssize_t w = ::write(fd, text.data() + done, text.size() - done);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) {
      int err = errno;
      ::close(fd);
      ::unlink(tmp.c_str());
      MOE_FAIL("%s: write failed: %s", tmp.c_str(), std::strerror(err));
    }
    done += static_cast<size_t>(w);
  }
  ::fsync(fd);
  ::close(fd);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    int err = errno;
    ::unlink(tmp.c_str());
    MOE_FAIL("%s: cannot rename %s into place: %s", path.c_str(), tmp.c_str(), std::strerror(err));
  }
}

OptimizerSnapshot snapshot(const AdamW& opt) { return {opt.state_tensors(), opt.step_counts()}; }

void save_checkpoint(const std::string& dir, const Model& m, const OptimizerSnapshot& opt,
                     const nlohmann::json& trainer_state, const std::string& tokenizer_from, const LoraConfig* lora,
                     const MasterLowHalves* low) {
  const fs::path final_dir(dir);
  const fs::path tmp = final_dir.parent_path() / (final_dir.filename().string() + ".partial-" + std::to_string(::getpid()));
  std::error_code ec;
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  MOE_CHECK(!ec, "%s: cannot create checkpoint directory: %s", tmp.c_str(), ec.message().c_str());

  if (lora) {
    save_adapter(tmp.string(), m.config(), m.weights(), *lora);
  } else {
    write_text_atomic((tmp / "config.json").string(), hf_config_to_json(m.config()));
    std::vector<std::pair<std::string, Tensor>> named;
    named = hf_parameters(m.config(), m.weights());
    for (auto& b : named_buffers(m.config(), m.weights())) named.push_back(b);
    WriteAs as_f32;
    if (low) {
      as_f32.dtype = [&](const Tensor& t) { return low->of(t) ? DType::F32 : t.dtype(); };
      as_f32.convert = [&](const Tensor& t) { return join_master(t, *low); };
    }
    write_safetensors((tmp / "model.safetensors").string(), named, {{"format", "pt"}}, low ? &as_f32 : nullptr);
  }
  write_safetensors((tmp / "optimizer.safetensors").string(), opt.tensors);
  if (!tokenizer_from.empty())
    for (const char* f : kTokenizerFiles) {
      const fs::path src = fs::path(tokenizer_from) / f;
      if (fs::is_regular_file(src, ec)) fs::copy_file(src, tmp / f, fs::copy_options::overwrite_existing, ec);
    }
  nlohmann::json st = trainer_state;
  st["optimizer_steps"] = opt.steps;
  write_text_atomic((tmp / "trainer_state.json").string(), st.dump(1));
  fsync_path(tmp.string(), true);

  // Swap into place. An older directory of the same name (a re-run after resume) is moved
  // aside first and removed last.
  const fs::path old = final_dir.parent_path() / (final_dir.filename().string() + ".old-" + std::to_string(::getpid()));
  const bool had = fs::exists(final_dir, ec);
  if (had) fs::rename(final_dir, old, ec);
  MOE_CHECK(!ec, "%s: cannot move the previous checkpoint aside: %s", dir.c_str(), ec.message().c_str());
  fs::rename(tmp, final_dir, ec);
  MOE_CHECK(!ec, "%s: cannot rename %s into place: %s", dir.c_str(), tmp.c_str(), ec.message().c_str());
  fsync_path(final_dir.parent_path().string(), true);
  if (had) fs::remove_all(old, ec);
}

std::string latest_checkpoint(const std::string& run_dir) {
  std::error_code ec;
  std::string best;
  long long best_step = -1;
  for (const auto& e : fs::directory_iterator(run_dir, ec)) {
    const std::string name = e.path().filename().string();
    if (name.rfind("step-", 0) != 0 || !e.is_directory()) continue;
    const std::string num = name.substr(5);
    if (num.empty() || num.find_first_not_of("0123456789") != std::string::npos) continue;  // .partial / .old
    const long long s = std::stoll(num);
    if (s > best_step && fs::exists(e.path() / "trainer_state.json")) {
      best_step = s;
      best = e.path().string();
    }
  }
  return best;
}

nlohmann::json read_trainer_state(const std::string& dir) {
  const std::string path = dir + "/trainer_state.json";
  return parse_json_object(read_file(path), path);
}

void load_optimizer(const std::string& dir, AdamW& opt) {
  const nlohmann::json st = read_trainer_state(dir);
  const std::string what = dir + "/trainer_state.json";
  MOE_CHECK(st.contains("optimizer_steps") && st["optimizer_steps"].is_array(), "%s: no 'optimizer_steps' array",
            what.c_str());
  MOE_CHECK(st.contains("params") && st["params"].is_array() && st["params"].size() == st["optimizer_steps"].size(),
            "%s: 'params' and 'optimizer_steps' must be arrays of the same length", what.c_str());
  std::map<std::string, int64_t> by_name;
  for (size_t i = 0; i < st["params"].size(); ++i) {
    const auto& p = st["params"][i];
    const auto& v = st["optimizer_steps"][i];
    MOE_CHECK(p.is_array() && !p.empty() && p[0].is_string(), "%s: 'params' entry %zu is not [name, shape]", what.c_str(), i);
    MOE_CHECK(v.is_number_integer(), "%s: 'optimizer_steps' must hold integers", what.c_str());
    by_name[p[0].get<std::string>()] = v.get<int64_t>();
  }
  std::vector<int64_t> steps;
  for (const NamedParam& p : opt.params()) {
    auto it = by_name.find(p.name);
    MOE_CHECK(it != by_name.end(), "%s: no optimizer step count for parameter %s", what.c_str(), p.name.c_str());
    steps.push_back(it->second);
  }
  auto file = SafetensorsFile::open(dir + "/optimizer.safetensors");
  opt.load_state(
      steps,
      [&](const std::string& name) {
        MOE_CHECK(file->find(name) != nullptr, "%s/optimizer.safetensors: missing tensor '%s'", dir.c_str(),
                  name.c_str());
        return file->tensor(name, MemCategory::Workspace);
      },
      dir + "/optimizer.safetensors");
}

}  // namespace moe
