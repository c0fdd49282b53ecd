// hardware.cpp — GPU catalog (vendor datasheets, dense figures).
#include "plan/hardware.h"

#include <cctype>

#include "core/error.h"
#include "plan/model_catalog.h"

namespace moe {

const std::vector<GpuSpec>& gpu_catalog() {
  // name, description, GiB, bf16 TFLOP/s, fp8 TFLOP/s, GB/s, link GB/s, link
  static const std::vector<GpuSpec> kGpus = {
      {"A100-40GB", "NVIDIA A100 SXM4 40 GB HBM2", 40, 312, 0, 1555, 300, "NVLink3"},
      {"A100-80GB", "NVIDIA A100 SXM4 80 GB HBM2e", 80, 312, 0, 2039, 300, "NVLink3"},
      {"H100-80GB", "NVIDIA H100 SXM5 80 GB HBM3", 80, 989, 1979, 3350, 450, "NVLink4"},
      {"H200-141GB", "NVIDIA H200 SXM 141 GB HBM3e", 141, 989, 1979, 4800, 450, "NVLink4"},
      {"B200-180GB", "NVIDIA B200 (HGX) 180 GB HBM3e", 180, 2250, 4500, 8000, 900, "NVLink5"},
      {"MI300X-192GB", "AMD Instinct MI300X 192 GB HBM3", 192, 1307, 2615, 5300, 448, "Infinity Fabric"},
      {"L40S-48GB", "NVIDIA L40S 48 GB GDDR6", 48, 362, 733, 864, 32, "PCIe4 x16"},
      {"A6000-48GB", "NVIDIA RTX A6000 48 GB GDDR6", 48, 155, 0, 768, 32, "PCIe4 x16"},
      {"RTX4090-24GB", "NVIDIA GeForce RTX 4090 24 GB GDDR6X", 24, 165, 330, 1008, 32, "PCIe4 x16"},
      {"RTX3090-24GB", "NVIDIA GeForce RTX 3090 24 GB GDDR6X", 24, 71, 0, 936, 32, "PCIe4 x16"},
      {"L4-24GB", "NVIDIA L4 24 GB GDDR6", 24, 121, 242, 300, 32, "PCIe4 x16"},
  };
  return kGpus;
}

namespace {
std::string lower(const std::string& s) {
  std::string out = s;
  for (char& ch : out) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return out;
}
}  // namespace

const GpuSpec& find_gpu(const std::string& name) {
  const std::string q = lower(name);
  const GpuSpec* prefix = nullptr;
  int n_prefix = 0;
  for (auto& g : gpu_catalog()) {
    const std::string n = lower(g.name);
    if (n == q) return g;
    if (n.rfind(q + "-", 0) == 0) prefix = &g, ++n_prefix;
  }
  if (n_prefix == 1) return *prefix;
  // "rtx4090", "RTX-4090", "h100": a unique match on letters and digits alone.
  const GpuSpec* keyed = nullptr;
  int n_keyed = 0;
  for (auto& g : gpu_catalog())
    if (name_key(g.name).rfind(name_key(name), 0) == 0 && !name_key(name).empty()) keyed = &g, ++n_keyed;
  if (n_prefix == 0 && n_keyed == 1) return *keyed;
  std::vector<std::string> names;
  for (auto& g : gpu_catalog()) names.push_back(g.name);
  auto best = closest_names(name, names, 2);
  std::string all;
  for (auto& n : names) all += (all.empty() ? "" : ", ") + n;
  MOE_FAIL("unknown GPU '%s'%s. Did you mean %s? (known: %s)", name.c_str(),
           n_prefix > 1 ? " (ambiguous)" : "", best[0].c_str(), all.c_str());
}

}  // namespace moe
