// backend.h — the per-backend entry points behind ops.h. Internal to src/ops.
//
// ops.cpp validates arguments and calls cpu::<op> or cuda::<op> with the same signature.
// Backends assume valid input.
#pragma once
#include "core/lora.h"
#include <initializer_list>

#include "core/tensor.h"
#include "ops/linear_parts.h"
#include "ops/variants.h"

#define MOE_BACKEND_OPS                                                                                  \
  void embedding_forward(Tensor& out, const Tensor& ids, const Tensor& table);                           \
  void rmsnorm_forward(Tensor& out, const Tensor& x, const Tensor& w, float eps);                        \
  void linear_forward(Tensor& out, const Tensor& x, const Tensor& w, const Tensor& bias);                \
  void linear_forward_cat(Tensor& out, const Tensor& x, std::initializer_list<LinearPart> parts);        \
  void rope_forward(Tensor& x, int64_t past, float theta);                                               \
  void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, int64_t past);      \
  void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,     \
                         int64_t past);                                                                  \
  void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, bool renorm,          \
                           const Tensor& select_bias);                                                   \
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
  void cast(Tensor& out, const Tensor& in);                                                              \
  void copy_columns(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col, int64_t ncols);

// Training ops (ops.h, training section): CPU backends only for now.
#define MOE_BACKEND_TRAIN_OPS                                                                            \
  void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids, int64_t padding_idx);   \
  void rmsnorm_forward_train(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w, float eps);    \
  void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,      \
                        const Tensor& rstd, bool accumulate);                                            \
  void linear_backward(Tensor& dx, Tensor& dw, Tensor& db, const Tensor& dy, const Tensor& x,            \
                       const Tensor& w, bool accumulate, bool assign_dw = false);                        \
  void cast_bf16_in_place(Tensor& out, const Tensor& x);                                                 \
  void rope_backward(Tensor& dx, int64_t past, float theta);                                             \
  void attention_forward_train(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k,               \
                               const Tensor& v, const AttnVariant& av = {});                             \
  void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q,       \
                          const Tensor& k, const Tensor& v, const Tensor& out, const Tensor& lse,        \
                          const AttnVariant& av = {}, Tensor* dsinks = nullptr);                         \
  void router_topk_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& logits,                \
                            const Tensor& topk_idx, bool renorm);                                        \
  void router_stats(Tensor& prob_sum, Tensor& count, Tensor& z_sum, const Tensor& logits,                \
                    const Tensor& topk_idx);                                                             \
  void router_balance_backward(Tensor& dlogits, const Tensor& logits, const Tensor& g, float aux_scale,  \
                               float z_scale);                                                           \
  void moe_capacity_drop(Tensor& offsets, Tensor& perm, Tensor& inv, int64_t capacity);                  \
  void permute_weights_backward(Tensor& dtopk_w, const Tensor& drow_scale, const Tensor& perm);          \
  void expert_ffn_forward_train(Tensor& yp, Tensor& h1, Tensor& h3, const Tensor& xp,                    \
                                const Tensor& offsets, const Tensor& w1, const Tensor& w3,               \
                                const Tensor& w2, const Tensor& row_scale, const ExpertLora& lora = {},  \
                                const ExpertGlu& glu = {}, const ExpertBias& bias = {});                 \
  void expert_ffn_backward(Tensor& dxp, Tensor& dw1, Tensor& dw3, Tensor& dw2, Tensor& drow_scale,       \
                           const Tensor& dyp, const Tensor& xp, const Tensor& h1, const Tensor& h3,      \
                           const Tensor& offsets, const Tensor& w1, const Tensor& w3, const Tensor& w2,  \
                           const Tensor& row_scale, const ExpertLora& lora = {},                    \
                           ExpertLora* dlora = nullptr, const ExpertGlu& glu = {},                       \
                           const ExpertBias& bias = {}, ExpertBias* dbias = nullptr,                     \
                           bool assign_dw = false);                                                      \
  void lora_forward(Tensor& out, int64_t col0, const Tensor& x, const Lora& l);                          \
  void lora_backward(Tensor& dx, Tensor& da, Tensor& db, const Tensor& dy, int64_t col0,                 \
                     const Tensor& x, const Lora& l);                                                    \
  void swiglu_backward(Tensor& dh1, Tensor& dh3, const Tensor& dout, const Tensor& h1, const Tensor& h3); \
  void sigmoid_gate_backward(Tensor& ds, Tensor& dgate, const Tensor& dy, const Tensor& s,               \
                             const Tensor& gate);                                                        \
  void cross_entropy_forward(Tensor& loss, const Tensor& logits, const Tensor& targets);                 \
  void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& targets, float scale);  \
  void cross_entropy_forward_backward(Tensor& loss, Tensor& dlogits, const Tensor& logits,                \
                                      const Tensor& targets, float scale);

// Paged KV cache ops (ops.h, serving section): CPU backends only for now.
#define MOE_BACKEND_PAGED_OPS                                                                            \
  void kv_append_paged(Tensor& k_pages, Tensor& v_pages, const Tensor& k, const Tensor& v,              \
                       const Tensor& tables, const Tensor& pos);                                         \
  void attention_forward_paged(Tensor& out, const Tensor& q, const Tensor& k_pages,                     \
                               const Tensor& v_pages, const Tensor& tables, const Tensor& pos,           \
                               const AttnVariant& av = {});

// Variants of inference ops (ops.h, variants.h): CPU backends only for now.
#define MOE_BACKEND_VARIANT_OPS                                                                          \
  void rope_forward(Tensor& x, int64_t past, const RopeTable& rt);                                      \
  void rope_backward(Tensor& dx, int64_t past, const RopeTable& rt);                                    \
  void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,     \
                         int64_t past, const AttnVariant& av);                                           \
  void expert_ffn_forward(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1,         \
                          const Tensor& w3, const Tensor& w2, const Tensor& row_scale,                   \
                          const ExpertGlu& glu, const ExpertBias& bias);                                 \
  void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits,                       \
                           const RouterVariant& rv, const Tensor& select_bias);                          \
  void router_topk_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& logits,                \
                            const Tensor& topk_idx, const RouterVariant& rv);                            \
  void mla_absorb_q(Tensor& qc, const Tensor& q, const Tensor& kv_b, int64_t dn, int64_t dv);           \
  void mla_absorb_out(Tensor& o, const Tensor& oc, const Tensor& kv_b, int64_t dn, int64_t dv);

namespace moe {
namespace cpu {
MOE_BACKEND_OPS
MOE_BACKEND_TRAIN_OPS
MOE_BACKEND_PAGED_OPS
MOE_BACKEND_VARIANT_OPS
}  // namespace cpu
// The naive reference backend (ops/ref): plain loops, f64 accumulation, every op.
namespace ref {
MOE_BACKEND_OPS
MOE_BACKEND_TRAIN_OPS
MOE_BACKEND_PAGED_OPS
MOE_BACKEND_VARIANT_OPS
}  // namespace ref
namespace cuda {
MOE_BACKEND_OPS
// Registers the CUDA DeviceHooks with the memory tracker if a GPU is present; returns whether
// one is. Safe to call more than once.
bool init();
void synchronize();
}  // namespace cuda
}  // namespace moe
