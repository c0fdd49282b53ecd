// mla_block.cpp — Multi-head Latent Attention forward (absorbed inference, plain training) and
// backward. See mla_block.h for the maths.
#include "model/mla_block.h"

#include <cmath>

#include "model/arch.h"
#include "model/attention_block.h"
#include "model/linear.h"
#include "ops/ops.h"

namespace moe {
namespace {

constexpr MemCategory kAct = MemCategory::Activations;
// q_a_layernorm and kv_a_layernorm are built with DeepseekV2RMSNorm's default eps, not
// rms_norm_eps (NOTES.md).
constexpr float kLatentNormEps = 1e-6f;

struct MlaDims {
  int64_t h, dn, dr, dv, dq, rkv, rc;  // heads; nope, rope, value, q/k widths; latent, cached row
};
MlaDims mla_dims(const ModelConfig& c) {
  const int64_t dq = c.qk_nope_head_dim + c.qk_rope_head_dim;
  return {c.n_head, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim, dq, c.kv_lora_rank,
          c.kv_lora_rank + c.qk_rope_head_dim};
}

// Rotates x [B,S,n,Dr] row by row at each row's position (rows of one call may be at different
// positions when serving).
void rope_rows(Tensor& x, const std::vector<int64_t>& past, const RopeTable& rt) {
  for (int64_t b = 0; b < x.dim(0); ++b) {
    Tensor xb = x.rows(b, b + 1);
    rope_forward(xb, past[static_cast<size_t>(b)], rt);
  }
}

}  // namespace

float mla_softmax_scale(const ModelConfig& c) {
  const double m = arch_spec(c.model_type).yarn_softmax_mscale ? yarn_softmax_factor(c.rope_scaling) : 1.0;
  return static_cast<float>(m / std::sqrt(double(c.qk_nope_head_dim + c.qk_rope_head_dim)));
}

void mla_block_infer(const ModelConfig& c, const LayerWeights& w, Tensor& x, Tensor& h, Tensor& y, Tensor& cache,
                     int64_t batch, int64_t seq, const std::vector<int64_t>& slots, const std::vector<int64_t>& past,
                     const Tensor& tables, const Tensor& pos) {
  const MlaDims m = mla_dims(c);
  const int64_t t_n = batch * seq;
  const Device dev = x.device();
  MOE_CHECK(x.dtype() == DType::F32, "MLA attention runs with f32 activations (CPU) only for now");
  rmsnorm_forward(h, x, w.attn_norm, float(c.rms_norm_eps));
  // q [T, H*(Dn+Dr)]
  Tensor q = Tensor::empty({t_n, m.h * m.dq}, DType::F32, kAct, dev);
  if (w.wq_a.defined()) {
    Tensor cq = Tensor::empty({t_n, w.wq_a.dim(0)}, DType::F32, kAct, dev);
    linear_forward(cq, h, w.wq_a, Tensor());
    rmsnorm_forward(cq, cq, w.q_a_norm, kLatentNormEps);
    linear_forward(q, cq, w.wq_b, Tensor());
  } else {
    linear_forward(q, h, w.wq_b, Tensor());
  }
  // The cached row of each token: [rmsnorm(c_kv) | rope(k_pe)].
  Tensor kva = Tensor::empty({t_n, m.rc}, DType::F32, kAct, dev);
  linear_forward(kva, h, w.wkv_a, Tensor());
  Tensor ckv = Tensor::empty({t_n, m.rkv}, DType::F32, kAct, dev);
  copy_columns(ckv, 0, kva, 0, m.rkv);
  rmsnorm_forward(ckv, ckv, w.kv_a_norm, kLatentNormEps);
  const RopeTable& rt = rope_table_of(c);
  Tensor kpe = Tensor::empty({batch, seq, 1, m.dr}, DType::F32, kAct, dev);
  Tensor kpe2 = kpe.view({t_n, m.dr});
  copy_columns(kpe2, 0, kva, m.rkv, m.dr);
  rope_rows(kpe, past, rt);
  Tensor lat = Tensor::empty({batch, seq, 1, m.rc}, DType::F32, kAct, dev);
  Tensor lat2 = lat.view({t_n, m.rc});
  copy_columns(lat2, 0, ckv, 0, m.rkv);
  copy_columns(lat2, m.rkv, kpe2, 0, m.dr);
  // The absorbed query [B,S,H,Rkv+Dr]: q_nope · W_k per head, then rope(q_pe).
  Tensor qpe = Tensor::empty({batch, seq, m.h, m.dr}, DType::F32, kAct, dev);
  Tensor qpe2 = qpe.view({t_n * m.h, m.dr}), qh = q.view({t_n * m.h, m.dq});
  copy_columns(qpe2, 0, qh, m.dn, m.dr);
  rope_rows(qpe, past, rt);
  Tensor qc = Tensor::empty({batch, seq, m.h, m.rc}, DType::F32, kAct, dev);
  Tensor qc3 = qc.view({t_n, m.h, m.rc}), qc2 = qc.view({t_n * m.h, m.rc});
  mla_absorb_q(qc3, q.view({t_n, m.h, m.dq}), w.wkv_b, m.dn, m.dv);
  copy_columns(qc2, m.rkv, qpe2, 0, m.dr);
  // One-kv-head attention over the latent cache (keys and values are the same rows; the value's
  // rope columns come out as well and are not read).
  AttnVariant av;
  av.scale = mla_softmax_scale(c);
  Tensor oc = Tensor::empty({batch, seq, m.h, m.rc}, DType::F32, kAct, dev);
  bool lockstep = !tables.defined() && batch == cache.dim(0);
  for (int64_t b = 0; b < batch && lockstep; ++b)
    lockstep = slots[static_cast<size_t>(b)] == b && past[static_cast<size_t>(b)] == past[0];
  if (lockstep) {
    kv_append(cache, cache, lat, lat, past[0]);
    attention_forward(oc, qc, cache, cache, past[0], av);
  } else if (tables.defined()) {
    kv_append_paged(cache, cache, lat, lat, tables, pos);
    attention_forward_paged(oc, qc, cache, cache, tables, pos, av);
  } else {
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t sl = slots[static_cast<size_t>(b)], p = past[static_cast<size_t>(b)];
      Tensor lb = lat.rows(b, b + 1), qb = qc.rows(b, b + 1), ob = oc.rows(b, b + 1);
      Tensor cb = cache.rows(sl, sl + 1);
      kv_append(cb, cb, lb, lb, p);
      attention_forward(ob, qb, cb, cb, p, av);
    }
  }
  Tensor o = Tensor::empty({t_n, m.h, m.dv}, DType::F32, kAct, dev);
  mla_absorb_out(o, oc.view({t_n, m.h, m.rc}), w.wkv_b, m.dn, m.dv);
  linear_forward(y, o.view({t_n, m.h * m.dv}), w.wo, Tensor());
  add_inplace(x, y);
}

void mla_block_forward(const ModelConfig&, const LayerWeights&, LayerActs&) {
  MOE_FAIL("MLA training forward: not implemented yet");
}

void mla_block_backward(const ModelConfig&, const LayerWeights&, const LayerActs&, const Tensor&, Tensor&,
                        LayerWeights&) {
  MOE_FAIL("MLA training backward: not implemented yet");
}

}  // namespace moe
