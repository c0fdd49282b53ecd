// lora_fused.cpp — PEFT's fused-expert LoRA layout to and from per-expert factors (see lora_fused.h).
#include "train/lora_fused.h"

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

}  // namespace moe
