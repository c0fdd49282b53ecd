// lora_fused.cpp — PEFT's fused-expert LoRA layout to and from per-expert factors (see lora_fused.h).
#include "train/lora_fused.h"

#include "model/arch.h"

namespace moe {

void split_fused_lora(const Tensor& fused_a, const Tensor& fused_b, int64_t n_expert, Tensor* a, Tensor* b) {
  MOE_CHECK(fused_a.ndim() == 2 && fused_b.ndim() == 2, "fused LoRA: lora_A %s and lora_B %s must be 2-D",
            fused_a.shape_str().c_str(), fused_b.shape_str().c_str());
  MOE_CHECK(n_expert > 0 && fused_a.dim(0) % n_expert == 0 && fused_a.dim(0) == fused_b.dim(1),
            "fused LoRA: lora_A %s and lora_B %s do not fit %lld experts ([r*E, in] and [out, r*E])",
            fused_a.shape_str().c_str(), fused_b.shape_str().c_str(), (long long)n_expert);
  const int64_t e_n = n_expert, r = fused_a.dim(0) / e_n, in = fused_a.dim(1), out = fused_b.dim(0);
  const Tensor fa = fused_a.to_dtype(DType::F32, MemCategory::Workspace);
  const Tensor fb = fused_b.to_dtype(DType::F32, MemCategory::Workspace);
  *a = Tensor::empty({e_n, r, in}, DType::F32, MemCategory::Lora);
  *b = Tensor::empty({e_n, out, r}, DType::F32, MemCategory::Lora);
  const float* pa = fa.data<float>();
  const float* pb = fb.data<float>();
  float* qa = a->data<float>();
  float* qb = b->data<float>();
  for (int64_t e = 0; e < e_n; ++e)
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t i = 0; i < in; ++i) qa[(e * r + j) * in + i] = pa[(e * r + j) * in + i];  // rows e·r + j
      for (int64_t o = 0; o < out; ++o) qb[(e * out + o) * r + j] = pb[o * (r * e_n) + j * e_n + e];  // column j·E + e
    }
}

void join_fused_lora(const Tensor& a, const Tensor& b, Tensor* fused_a, Tensor* fused_b) {
  MOE_CHECK(a.ndim() == 3 && b.ndim() == 3 && a.dim(0) == b.dim(0) && a.dim(1) == b.dim(2),
            "fused LoRA: per-expert a %s and b %s must be [E,r,in] and [E,out,r]", a.shape_str().c_str(),
            b.shape_str().c_str());
  const int64_t e_n = a.dim(0), r = a.dim(1), in = a.dim(2), out = b.dim(1);
  const Tensor fa = a.to_dtype(DType::F32, MemCategory::Workspace);
  const Tensor fb = b.to_dtype(DType::F32, MemCategory::Workspace);
  *fused_a = Tensor::empty({r * e_n, in}, DType::F32, MemCategory::Lora);
  *fused_b = Tensor::empty({out, r * e_n}, DType::F32, MemCategory::Lora);
  const float* pa = fa.data<float>();
  const float* pb = fb.data<float>();
  float* qa = fused_a->data<float>();
  float* qb = fused_b->data<float>();
  for (int64_t e = 0; e < e_n; ++e)
    for (int64_t j = 0; j < r; ++j) {
      for (int64_t i = 0; i < in; ++i) qa[(e * r + j) * in + i] = pa[(e * r + j) * in + i];
      for (int64_t o = 0; o < out; ++o) qb[o * (r * e_n) + j * e_n + e] = pb[(e * out + o) * r + j];
    }
}

std::string fused_lora_name(const ModelConfig& c, int64_t layer, bool gate_up, bool nested, const char* ab) {
  const ArchSpec& a = arch_spec(c.model_type);
  MOE_ASSERT(a.experts_gate_up != nullptr);
  const std::string param = tensor_name(gate_up ? a.experts_gate_up : a.experts_down, layer, -1, "");
  const std::string module = param.substr(0, param.rfind('.'));  // "...mlp.experts"
  return "base_model.model." + module + (gate_up && nested ? ".base_layer" : "") + ".lora_" + ab + ".weight";
}

std::vector<std::pair<std::string, Tensor>> fused_lora_tensors(const ModelConfig& c, int64_t layer,
                                                               const ExpertLora& l) {
  std::vector<std::pair<std::string, Tensor>> out;
  const bool gate_up = l.w1.a.defined() || l.w3.a.defined() || l.w1.b.defined() || l.w3.b.defined();
  const bool down = l.w2.a.defined() || l.w2.b.defined();
  if (gate_up) {
    MOE_CHECK(l.w1.a.defined() && l.w1.b.defined() && l.w3.b.defined() && l.w1.a.raw() == l.w3.a.raw(),
              "layer %lld: the fused gate_up_proj adapter needs the gate and up projections adapted together "
              "through one lora_A (PEFT target_parameters)",
              (long long)layer);
    // b [E, 2F, r]: gate rows even, up rows odd.
    const Tensor b1 = l.w1.b.to_dtype(DType::F32, MemCategory::Workspace);
    const Tensor b3 = l.w3.b.to_dtype(DType::F32, MemCategory::Workspace);
    const int64_t e_n = b1.dim(0), f = b1.dim(1), r = b1.dim(2);
    Tensor b = Tensor::empty({e_n, 2 * f, r}, DType::F32, MemCategory::Workspace);
    for (int64_t e = 0; e < e_n; ++e)
      for (int64_t j = 0; j < f; ++j)
        for (int64_t q = 0; q < r; ++q) {
          b.data<float>()[(e * 2 * f + 2 * j) * r + q] = b1.data<float>()[(e * f + j) * r + q];
          b.data<float>()[(e * 2 * f + 2 * j + 1) * r + q] = b3.data<float>()[(e * f + j) * r + q];
        }
    Tensor fa, fb;
    join_fused_lora(l.w1.a, b, &fa, &fb);
    out.emplace_back(fused_lora_name(c, layer, true, down, "A"), fa);
    out.emplace_back(fused_lora_name(c, layer, true, down, "B"), fb);
  }
  if (down) {
    MOE_CHECK(l.w2.a.defined() && l.w2.b.defined(), "layer %lld: the down_proj adapter lacks a factor",
              (long long)layer);
    Tensor fa, fb;
    join_fused_lora(l.w2.a, l.w2.b, &fa, &fb);
    out.emplace_back(fused_lora_name(c, layer, false, gate_up, "A"), fa);
    out.emplace_back(fused_lora_name(c, layer, false, gate_up, "B"), fb);
  }
  return out;
}

void set_fused_lora(const Tensor& fused_a, const Tensor& fused_b, int64_t n_expert, bool gate_up, float scale,
                    ExpertLora* l) {
  Tensor a, b;
  split_fused_lora(fused_a, fused_b, n_expert, &a, &b);
  if (!gate_up) {
    l->w2.a = a;
    l->w2.b = b;
    l->w2.scale = scale;
    return;
  }
  const int64_t e_n = b.dim(0), f = b.dim(1) / 2, r = b.dim(2);
  Tensor b1 = Tensor::empty({e_n, f, r}, DType::F32, MemCategory::Lora);
  Tensor b3 = Tensor::empty({e_n, f, r}, DType::F32, MemCategory::Lora);
  for (int64_t e = 0; e < e_n; ++e)
    for (int64_t j = 0; j < f; ++j)
      for (int64_t q = 0; q < r; ++q) {
        b1.data<float>()[(e * f + j) * r + q] = b.data<float>()[(e * 2 * f + 2 * j) * r + q];
        b3.data<float>()[(e * f + j) * r + q] = b.data<float>()[(e * 2 * f + 2 * j + 1) * r + q];
      }
  l->w1.a = a;
  l->w3.a = a;  // one A for gate and up
  l->w1.b = b1;
  l->w3.b = b3;
  l->w1.scale = l->w3.scale = scale;
}

}  // namespace moe
