// hardware.h — the GPU catalog the planner sizes jobs against.
//
// Figures are vendor datasheet values for dense math (no 2:4 sparsity): memory as marketed
// (binary GiB: an "80 GB" H100 holds 80 GiB of HBM), peak bf16 tensor FLOP/s, memory bandwidth
// and the per-GPU interconnect bandwidth (one direction). The planner never presents a price as
// fact: prices come from a user file (plan/prices.h).
#pragma once
#include <string>
#include <vector>

namespace moe {

struct GpuSpec {
  const char* name;          // "H100-80GB"
  const char* description;   // "NVIDIA H100 SXM5 80 GB HBM3"
  double mem_gib;            // device memory, GiB
  double bf16_tflops;        // dense bf16 tensor-core peak, TFLOP/s
  double fp8_tflops;         // dense fp8 peak (0 = no fp8 tensor cores)
  double mem_bw_gbs;         // memory bandwidth, GB/s (1e9 bytes/s)
  double link_gbs;           // GPU-to-GPU bandwidth per GPU, one direction, GB/s
  const char* link;          // "NVLink4", "PCIe4 x16", "Infinity Fabric"
  double mem_bytes() const { return mem_gib * 1073741824.0; }
};

const std::vector<GpuSpec>& gpu_catalog();
// Case-insensitive; also accepts the name without the memory suffix when unambiguous ("H200").
// Throws moe::Error for an unknown GPU, suggesting close names.
const GpuSpec& find_gpu(const std::string& name);

}  // namespace moe
