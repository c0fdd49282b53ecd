// backend.h — the per-backend entry points behind ops.h. Internal to src/ops.
//
// ops.cpp validates arguments and calls cpu::<op> or cuda::<op> with the same signature.
// Backends assume valid input.
#pragma once
#include "core/tensor.h"

#define MOE_BACKEND_OPS                                                                                  \
  void embedding_forward(Tensor& out, const Tensor& ids, const Tensor& table);                           \
  void rmsnorm_forward(Tensor& out, const Tensor& x, const Tensor& w, float eps);                        \
  void linear_forward(Tensor& out, const Tensor& x, const Tensor& w, const Tensor& bias);                \
  void rope_forward(Tensor& x, int64_t past, float theta);                                               \
  void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, int64_t past);      \
  void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,     \
                         int64_t past);                                                                  \
  void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, bool renorm);         \
  void moe_dispatch(Tensor& offsets, Tensor& perm, Tensor& inv, const Tensor& topk_idx,                  \
                    int64_t n_expert);                                                                   \
  void gather_rows(Tensor& xp, const Tensor& x, const Tensor& perm, int64_t k);                          \
  void expert_ffn_forward(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1,         \
                          const Tensor& w3, const Tensor& w2, const Tensor& row_scale);                  \
  void moe_combine(Tensor& y, const Tensor& yp, const Tensor& inv, int64_t k, bool accumulate);          \
  void permute_weights(Tensor& row_scale, const Tensor& topk_w, const Tensor& perm);                     \
  void swiglu_forward(Tensor& out, const Tensor& h1, const Tensor& h3);                                  \
  void sigmoid_gate_add(Tensor& y, const Tensor& s, const Tensor& gate);                                 \
  void add_inplace(Tensor& y, const Tensor& x);                                                          \
  void cast(Tensor& out, const Tensor& in);

namespace moe {
namespace cpu {
MOE_BACKEND_OPS
}  // namespace cpu
namespace cuda {
MOE_BACKEND_OPS
// Registers the CUDA DeviceHooks with the memory tracker if a GPU is present; returns whether
// one is. Safe to call more than once.
bool init();
void synchronize();
}  // namespace cuda
}  // namespace moe
