// cli_util.h — helpers shared by the subcommands: device/dtype flags, model loading, timing.
#pragma once
#include <CLI/CLI.hpp>
#include <chrono>
#include <string>

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

inline double now_seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

}  // namespace moe
