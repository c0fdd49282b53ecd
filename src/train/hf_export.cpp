// hf_export.cpp — parameters in the HF / PEFT file layout (see hf_export.h).
#include "train/hf_export.h"

#include "model/arch.h"
#include "model/fused_experts.h"
#include "model/model_train.h"
#include "train/lora_fused.h"

namespace moe {

std::vector<std::pair<std::string, Tensor>> hf_parameters(const ModelConfig& c, const ModelWeights& w,
                                                          bool trainable_only) {
  std::vector<std::pair<std::string, Tensor>> out;
  const std::vector<NamedParam> ps = named_parameters(c, w, trainable_only);
  if (!fused_experts(c)) {
    for (const NamedParam& p : ps) out.emplace_back(p.name, p.value);
    return out;
  }
  const ArchSpec& a = arch_spec(c.model_type);
  std::vector<bool> done(static_cast<size_t>(c.n_layer), false);
  for (size_t i = 0; i < ps.size(); ++i) {
    const NamedParam& p = ps[i];
    if (p.expert < 0 || p.layer < 0) {
      out.emplace_back(p.name, p.value);
      continue;
    }
    if (done[size_t(p.layer)]) continue;
    done[size_t(p.layer)] = true;
    // What the list holds for this layer's experts: base weights (and biases), adapters.
    bool base = false, lora = false;
    for (size_t j = i; j < ps.size() && ps[j].layer == p.layer; ++j) {
      if (ps[j].expert < 0) continue;
      (ps[j].name.find(".lora_") != std::string::npos ? lora : base) = true;
    }
    const LayerWeights& lw = w.layers[size_t(p.layer)];
    MOE_CHECK(!base || lw.w1.dim(0) == c.n_expert,
              "writing %s: layer %lld holds %lld of %lld experts (gather them first)", c.model_type.c_str(),
              (long long)p.layer, (long long)lw.w1.dim(0), (long long)c.n_expert);
    if (base) {
      const int64_t l = p.layer;
      out.emplace_back(tensor_name(a.experts_gate_up, l, -1, ""), fuse_gate_up(lw.w1, lw.w3));
      if (lw.b1.defined()) out.emplace_back(tensor_name(a.experts_gate_up, l, -1, "_bias"), fuse_gate_up_bias(lw.b1, lw.b3));
      out.emplace_back(tensor_name(a.experts_down, l, -1, ""), fuse_down(lw.w2));
      if (lw.b2.defined())
        out.emplace_back(tensor_name(a.experts_down, l, -1, "_bias"), lw.b2.to_dtype(DType::F32, MemCategory::Workspace));
    }
    if (lora)
      for (auto& t : fused_lora_tensors(c, p.layer, lw.lexp)) out.push_back(std::move(t));
  }
  return out;
}

}  // namespace moe
