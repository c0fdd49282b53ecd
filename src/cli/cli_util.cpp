// cli_util.cpp — shared flag handling for the subcommands.
#include <CLI/CLI.hpp>

#include "cli/cli_util.h"

#include <cstdio>
#include <map>

#include "core/rng.h"
#include "io/gguf_model.h"
#include "model/panel_weights.h"
#include "ops/cpu/cpu_gemm_bf16dot.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "ops/ops.h"
#include "train/lora.h"

namespace moe {

void add_device_flags(CLI::App* cmd, DeviceFlags* f) {
  cmd->add_option("--device", f->device, "cpu or cuda")->check(CLI::IsMember({"cpu", "cuda"}));
  cmd->add_option("--dtype", f->dtype, "weight dtype in memory: keep (as stored), f32 or bf16")
      ->check(CLI::IsMember({"keep", "f32", "bf16"}));
  cmd->add_option("--act-dtype", f->act_dtype, "activation dtype: auto, f32 or bf16 (bf16 on cuda only)")
      ->check(CLI::IsMember({"auto", "f32", "bf16"}));
}

LoadOptions resolve_device_flags(const DeviceFlags& f, DType file_dtype) {
  LoadOptions o;
  o.device = f.device == "cuda" ? Device::CUDA : Device::CPU;
  if (o.device == Device::CUDA)
    MOE_CHECK(cuda_available(), "--device cuda: no CUDA GPU is available (or this build has no CUDA backend)");
  o.keep_dtype = f.dtype == "keep";
  if (!o.keep_dtype) dtype_from_name(f.dtype, &o.weight_dtype);
  DType wdt = o.keep_dtype ? file_dtype : o.weight_dtype;
  if (f.act_dtype == "auto") {
    o.act_dtype = o.device == Device::CPU ? DType::F32 : (wdt == DType::BF16 ? DType::BF16 : DType::F32);
  } else {
    dtype_from_name(f.act_dtype, &o.act_dtype);
  }
  MOE_CHECK(o.device != Device::CPU || o.act_dtype == DType::F32, "--act-dtype bf16 needs --device cuda");
  // Inference (the commands that take these flags): bf16 prefill on AMX / AVX512-BF16 where the
  // CPU has them (the exact path of `moe logits` keeps x in f32 regardless).
  if (o.device == Device::CPU) cpu::use_bf16_matrix_where_available();
  return o;
}

// --weights: quantize the projection weights at load for CPU inference (LoadOptions::quant_dtype).
void add_weights_flag(CLI::App* cmd, std::string* w) {
  cmd->add_option("--weights", *w,
                  "quantize the projection weights at load (CPU inference): none, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k or q6_k")
      ->capture_default_str()
      ->check(CLI::IsMember({"none", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"}));
}

LoadOptions with_weights_flag(LoadOptions lo, const std::string& w) {
  if (w != "none") {
    MOE_CHECK(dtype_from_quant_name(w, &lo.quant_dtype), "--weights %s: unknown type", w.c_str());
    MOE_CHECK(lo.device == Device::CPU, "--weights %s: quantized weights run on the CPU only, not on --device %s",
              w.c_str(), device_name(lo.device));
  }
  return lo;
}

// The dtype most of a checkpoint's bytes are stored in.
DType checkpoint_dtype(const Checkpoint& ck) {
  std::map<DType, size_t> bytes;
  for (auto& n : ck.names()) {
    const auto& i = ck.info(n);
    bytes[i.dtype] += i.end - i.begin;
  }
  DType best = DType::F32;
  size_t most = 0;
  for (auto& [dt, b] : bytes)
    if (b > most) most = b, best = dt;
  return best;
}

Model load_model_arg(const std::string& path, const DeviceFlags& dev, const std::string& weights) {
  if (is_gguf_path(path)) {
    // GGUF: quantized projections of a type the CPU kernels have stay quantized (keep_dtype);
    // everything else arrives dequantized to f32.
    GgufLoadOptions go;
    go.keep_quantized = dev.device == "cpu";
    GgufModel g = load_gguf_model(path, go);
    return Model::from_tensors(g.config, g.tensors, with_weights_flag(resolve_device_flags(dev, DType::F32), weights));
  }
  Checkpoint ck = Checkpoint::open_dir(path);
  return Model::load(ck, with_weights_flag(resolve_device_flags(dev, checkpoint_dtype(ck)), weights));
}

void apply_adapter(Model& m, const std::string& adapter_dir) {
  MOE_CHECK(m.device() == Device::CPU, "--adapter: merging runs on the CPU; merge first (moe merge) to run on %s",
            device_name(m.device()));
  const LoraConfig lc = load_adapter(adapter_dir, m.config(), m.mutable_weights());
  const int64_t n = lora_param_count(m.config(), m.weights());
  merge_lora(m.config(), m.mutable_weights());
  std::fprintf(stderr, "merged adapter %s (r %lld, alpha %g, %lld parameters)\n", adapter_dir.c_str(), (long long)lc.r,
               lc.alpha, (long long)n);
}

void add_dist_flags(CLI::App* cmd, int* ep, int* dp, double* timeout) {
  cmd->add_option("--ep", *ep,
                  "under mpirun: expert-parallel ranks per replica; each holds E/ep of the routed experts and tokens "
                  "travel to them (default 1)");
  cmd->add_option("--dp", *dp, "under mpirun: data-parallel replicas (default: the ranks / --ep)");
  if (timeout)
    cmd->add_option("--dist-timeout", *timeout,
                    "seconds a collective may wait for the other ranks before the job is ended (0: forever)")
        ->capture_default_str();
}

void add_panels_flag(CLI::App* cmd, std::string* panels) {
  cmd->add_option("--panels", *panels,
                  "on: bf16 weights in 16-row panels for the AVX512-BF16 decode kernel where the CPU has it (faster "
                  "decode; with AMX, products of 2 rows and more on its tiles: batched decode and prefill; x rounded "
                  "to bf16 in every product); off: weights in rows as loaded")
      ->capture_default_str()
      ->check(CLI::IsMember({"on", "off"}));
}

double measure_gemm_peak(Device dev, DType wdt) {
  const int64_t n = dev == Device::CPU ? 2048 : 8192;
  const DType dt = dev == Device::CPU ? DType::F32 : DType::BF16;
  Rng rng(7);
  std::vector<float> host(size_t(n * n));
  for (auto& v : host) v = float(rng.uniform() - 0.5);
  Tensor hx = Tensor::from_f32({n, n}, host).to_dtype(dt, MemCategory::Workspace);
  Tensor x = hx.to(dev, MemCategory::Workspace), w = hx.to(dev, MemCategory::Workspace);
  if (dev == Device::CPU && wdt != DType::F32) w = hx.to_dtype(wdt, MemCategory::Workspace);
  Tensor y = Tensor::empty({n, n}, dt, MemCategory::Workspace, dev);
  double best = 1e30;
  for (int rep = 0; rep < 4; ++rep) {
    synchronize(dev);
    double t0 = now_seconds();
    linear_forward(y, x, w, Tensor());
    synchronize(dev);
    if (rep > 0) best = std::min(best, now_seconds() - t0);
  }
  return 2.0 * double(n) * double(n) * double(n) / best;
}

int64_t apply_panels_flag(Model& m, const std::string& panels, const char* who) {
  if (panels != "on") return 0;
  const double t0 = now_seconds();
  const int64_t bytes = pack_bf16_panels(m);
  if (bytes)
    std::fprintf(stderr, "%s: %.2f GB of bf16 weights in 16-row panels (%s) in %.2f s\n", who, double(bytes) / 1e9,
                 cpu::bf16panels_kernels(), now_seconds() - t0);
  return bytes;
}

}  // namespace moe
