// cli_util.h — helpers shared by the subcommands: device/dtype flags, model loading, timing.
#pragma once
#include <CLI/CLI.hpp>
#include <chrono>
#include <string>

#include "core/file_util.h"
#include "io/safetensors.h"
#include "model/model.h"

namespace moe {

struct DeviceFlags {
  std::string device = "cpu";
  std::string dtype = "keep";      // weights in memory: keep|f32|bf16
  std::string act_dtype = "auto";  // auto: f32 on CPU, the weight dtype on CUDA
};
void add_device_flags(CLI::App* cmd, DeviceFlags* f);
// Resolves the flags into LoadOptions (initialises CUDA when asked for; throws if absent).
// `file_dtype` is the checkpoint's weight dtype, used for "keep".
LoadOptions resolve_device_flags(const DeviceFlags& f, DType file_dtype);

// --weights none|q8_0|q4_0|q4_k|q5_k|q6_k: quantize the projection weights at load (CPU).
void add_weights_flag(CLI::App* cmd, std::string* w);

// --ep / --dp (and --dist-timeout when timeout is given): how the ranks of an mpirun job
// divide the work (dist/parallel.h).
void add_dist_flags(CLI::App* cmd, int* ep, int* dp, double* timeout = nullptr);
LoadOptions with_weights_flag(LoadOptions lo, const std::string& w);
// The dtype most of a checkpoint's bytes are stored in.
DType checkpoint_dtype(const Checkpoint& ck);
// A model from an HF directory or a .gguf file, with the device/dtype and --weights flags.
Model load_model_arg(const std::string& path, const DeviceFlags& dev, const std::string& weights);

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Merges a PEFT LoRA adapter into a loaded model (CPU, float weights), saying so on stderr.
void apply_adapter(Model& m, const std::string& adapter_dir);

// GEMM peak (FLOP/s) through linear_forward, y = x·wᵀ of n×n matrices, best of 3 after a warm-up:
// on the CPU n = 2048, x f32 and w in `wdt` (f32: sgemm; bf16: the matrix units where the process
// chose them, oneDNN; bf16p: the panel kernels — the peaks the benchmarks' products are measured
// against); on CUDA bf16 8192^3 (wdt ignored).
double measure_gemm_peak(Device dev, DType wdt = DType::F32);

// --panels on|off (decoding commands): bf16 weights in 16-row panels for the AVX512-BF16 decode
// kernel where the CPU has it (model/panel_weights.h); off keeps them in rows.
void add_panels_flag(CLI::App* cmd, std::string* panels);
// Packs the model when `panels` is "on" (and the CPU allows), saying so on stderr as `who`;
// returns the bytes packed (0: none).
int64_t apply_panels_flag(Model& m, const std::string& panels, const char* who);

}  // namespace moe
