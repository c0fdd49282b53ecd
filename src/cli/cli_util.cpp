// cli_util.cpp — shared flag handling for the subcommands.
#include <CLI/CLI.hpp>

#include "cli/cli_util.h"
#include "ops/ops.h"

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
  return o;
}

}  // namespace moe
