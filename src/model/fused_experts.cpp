// fused_experts.cpp — fused 3-D expert tensors <-> stacked experts (see fused_experts.h).
#include "model/fused_experts.h"

#include "model/arch.h"

namespace moe {

bool fused_experts(const ModelConfig& c) { return arch_spec(c.model_type).experts_gate_up != nullptr; }

void unfuse_expert_weights(const Tensor& gate_up, const Tensor& down, int64_t e0, int64_t n, Tensor* w1, Tensor* w3,
                           Tensor* w2, MemCategory cat) {
  MOE_ASSERT(gate_up.ndim() == 3 && down.ndim() == 3 && gate_up.dim(2) % 2 == 0);
  const int64_t d = gate_up.dim(1), f = gate_up.dim(2) / 2;
  MOE_ASSERT(down.dim(1) == f && down.dim(2) == d && e0 >= 0 && e0 + n <= gate_up.dim(0));
  const Tensor gu = gate_up.to_dtype(DType::F32, MemCategory::Workspace);
  const Tensor dn = down.to_dtype(DType::F32, MemCategory::Workspace);
  *w1 = Tensor::empty({n, f, d}, DType::F32, cat);
  *w3 = Tensor::empty({n, f, d}, DType::F32, cat);
  *w2 = Tensor::empty({n, d, f}, DType::F32, cat);
  const float* g = gu.data<float>();
  const float* dp = dn.data<float>();
  float* p1 = w1->data<float>();
  float* p3 = w3->data<float>();
  float* p2 = w2->data<float>();
  for (int64_t e = 0; e < n; ++e) {
    const float* ge = g + (e0 + e) * d * 2 * f;
    const float* de = dp + (e0 + e) * f * d;
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < f; ++j) {
        p1[(e * f + j) * d + i] = ge[i * 2 * f + 2 * j];
        p3[(e * f + j) * d + i] = ge[i * 2 * f + 2 * j + 1];
      }
    for (int64_t j = 0; j < f; ++j)
      for (int64_t i = 0; i < d; ++i) p2[(e * d + i) * f + j] = de[j * d + i];
  }
}

void unfuse_expert_biases(const Tensor& gate_up_bias, const Tensor& down_bias, int64_t e0, int64_t n, Tensor* b1,
                          Tensor* b3, Tensor* b2, MemCategory cat) {
  MOE_ASSERT(gate_up_bias.ndim() == 2 && down_bias.ndim() == 2 && gate_up_bias.dim(1) % 2 == 0);
  const int64_t f = gate_up_bias.dim(1) / 2, d = down_bias.dim(1);
  const Tensor gu = gate_up_bias.to_dtype(DType::F32, MemCategory::Workspace);
  const Tensor dn = down_bias.to_dtype(DType::F32, MemCategory::Workspace);
  *b1 = Tensor::empty({n, f}, DType::F32, cat);
  *b3 = Tensor::empty({n, f}, DType::F32, cat);
  *b2 = Tensor::empty({n, d}, DType::F32, cat);
  for (int64_t e = 0; e < n; ++e) {
    for (int64_t j = 0; j < f; ++j) {
      b1->data<float>()[e * f + j] = gu.data<float>()[(e0 + e) * 2 * f + 2 * j];
      b3->data<float>()[e * f + j] = gu.data<float>()[(e0 + e) * 2 * f + 2 * j + 1];
    }
    for (int64_t i = 0; i < d; ++i) b2->data<float>()[e * d + i] = dn.data<float>()[(e0 + e) * d + i];
  }
}

Tensor fuse_gate_up(const Tensor& w1, const Tensor& w3) {
  MOE_ASSERT(w1.ndim() == 3 && w1.shape() == w3.shape());
  const int64_t e_n = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  const Tensor a = w1.to_dtype(DType::F32, MemCategory::Workspace), b = w3.to_dtype(DType::F32, MemCategory::Workspace);
  Tensor out = Tensor::empty({e_n, d, 2 * f}, DType::F32, MemCategory::Workspace);
  float* o = out.data<float>();
  for (int64_t e = 0; e < e_n; ++e)
    for (int64_t j = 0; j < f; ++j)
      for (int64_t i = 0; i < d; ++i) {
        o[(e * d + i) * 2 * f + 2 * j] = a.data<float>()[(e * f + j) * d + i];
        o[(e * d + i) * 2 * f + 2 * j + 1] = b.data<float>()[(e * f + j) * d + i];
      }
  return out;
}

Tensor fuse_down(const Tensor& w2) {
  MOE_ASSERT(w2.ndim() == 3);
  const int64_t e_n = w2.dim(0), d = w2.dim(1), f = w2.dim(2);
  const Tensor a = w2.to_dtype(DType::F32, MemCategory::Workspace);
  Tensor out = Tensor::empty({e_n, f, d}, DType::F32, MemCategory::Workspace);
  for (int64_t e = 0; e < e_n; ++e)
    for (int64_t i = 0; i < d; ++i)
      for (int64_t j = 0; j < f; ++j) out.data<float>()[(e * f + j) * d + i] = a.data<float>()[(e * d + i) * f + j];
  return out;
}

Tensor fuse_gate_up_bias(const Tensor& b1, const Tensor& b3) {
  MOE_ASSERT(b1.ndim() == 2 && b1.shape() == b3.shape());
  const int64_t e_n = b1.dim(0), f = b1.dim(1);
  const Tensor a = b1.to_dtype(DType::F32, MemCategory::Workspace), b = b3.to_dtype(DType::F32, MemCategory::Workspace);
  Tensor out = Tensor::empty({e_n, 2 * f}, DType::F32, MemCategory::Workspace);
  for (int64_t e = 0; e < e_n; ++e)
    for (int64_t j = 0; j < f; ++j) {
      out.data<float>()[e * 2 * f + 2 * j] = a.data<float>()[e * f + j];
      out.data<float>()[e * 2 * f + 2 * j + 1] = b.data<float>()[e * f + j];
    }
  return out;
}

}  // namespace moe
