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
  bool lockstep = !tables.defined() && batch == cache.dim(0);
  for (int64_t b = 0; b < batch && lockstep; ++b)
    lockstep = slots[static_cast<size_t>(b)] == b && past[static_cast<size_t>(b)] == past[0];
  if (lockstep && past[0] == 0 && seq > 1) {
    // A fresh prefill: the plain form (keys and values decompressed by kv_b_proj, Dn+Dr-wide
    // dot products instead of the absorbed Rkv+Dr, and one GEMM instead of the per-head
    // absorption products); only the latent goes into the cache, as decode reads it.
    AttnVariant av;
    av.scale = mla_softmax_scale(c);
    Tensor kv = Tensor::empty({t_n, m.h * (m.dn + m.dv)}, DType::F32, kAct, dev);
    linear_forward(kv, ckv, w.wkv_b, Tensor());
    copy_columns(qh, m.dn, qpe2, 0, m.dr);
    Tensor k = Tensor::empty({batch, seq, m.h, m.dq}, DType::F32, kAct, dev);
    Tensor v = Tensor::zeros({batch, seq, m.h, m.dq}, DType::F32, kAct, dev);
    Tensor k2 = k.view({t_n, m.h * m.dq}), v2 = v.view({t_n, m.h * m.dq});
    for (int64_t hh = 0; hh < m.h; ++hh) {
      copy_columns(k2, hh * m.dq, kv, hh * (m.dn + m.dv), m.dn);
      copy_columns(k2, hh * m.dq + m.dn, kpe2, 0, m.dr);
      copy_columns(v2, hh * m.dq, kv, hh * (m.dn + m.dv) + m.dn, m.dv);
    }
    kv_append(cache, cache, lat, lat, 0);
    Tensor out = Tensor::empty({batch, seq, m.h, m.dq}, DType::F32, kAct, dev);
    attention_forward(out, q.view({batch, seq, m.h, m.dq}), k, v, 0, av);
    Tensor o = Tensor::empty({t_n, m.h * m.dv}, DType::F32, kAct, dev);
    Tensor out2 = out.view({t_n, m.h * m.dq});
    for (int64_t hh = 0; hh < m.h; ++hh) copy_columns(o, hh * m.dv, out2, hh * m.dq, m.dv);
    linear_forward(y, o, w.wo, Tensor());
    add_inplace(x, y);
    return;
  }
  Tensor qc = Tensor::empty({batch, seq, m.h, m.rc}, DType::F32, kAct, dev);
  Tensor qc3 = qc.view({t_n, m.h, m.rc}), qc2 = qc.view({t_n * m.h, m.rc});
  mla_absorb_q(qc3, q.view({t_n, m.h, m.dq}), w.wkv_b, m.dn, m.dv);
  copy_columns(qc2, m.rkv, qpe2, 0, m.dr);
  // One-kv-head attention over the latent cache (keys and values are the same rows; the value's
  // rope columns come out as well and are not read).
  AttnVariant av;
  av.scale = mla_softmax_scale(c);
  Tensor oc = Tensor::empty({batch, seq, m.h, m.rc}, DType::F32, kAct, dev);
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

void mla_block_forward(const ModelConfig& c, const LayerWeights& w, LayerActs& a) {
  const MlaDims m = mla_dims(c);
  const int64_t b_n = a.q.dim(0), s_n = a.q.dim(1), t_n = b_n * s_n;
  rmsnorm_forward_train(a.attn_h, a.attn_rstd, a.x_in, w.attn_norm, float(c.rms_norm_eps));
  // q straight into a.q [B,S,H,Dn+Dr]: the projection's rows are already per head [nope | pe].
  Tensor q2 = a.q.view({t_n, m.h * m.dq});
  if (w.wq_a.defined()) {
    linear(a.mla_cq, a.attn_h, w.wq_a, Tensor(), {{&w.lq_a, nullptr, 0}});
    rmsnorm_forward_train(a.mla_cqn, a.mla_cq_rstd, a.mla_cq, w.q_a_norm, kLatentNormEps);
    linear(q2, a.mla_cqn, w.wq_b, Tensor(), {{&w.lq_b, nullptr, 0}});
  } else {
    linear(q2, a.attn_h, w.wq_b, Tensor(), {{&w.lq_b, nullptr, 0}});
  }
  const RopeTable& rt = rope_table_of(c);
  {
    Tensor kva = Tensor::empty({t_n, m.rc}, DType::F32, kAct);
    linear(kva, a.attn_h, w.wkv_a, Tensor(), {{&w.lkv_a, nullptr, 0}});
    copy_columns(a.mla_ckv, 0, kva, 0, m.rkv);
    rmsnorm_forward_train(a.mla_ckn, a.mla_ckv_rstd, a.mla_ckv, w.kv_a_norm, kLatentNormEps);
    Tensor kv = Tensor::empty({t_n, m.h * (m.dn + m.dv)}, DType::F32, kAct);
    linear(kv, a.mla_ckn, w.wkv_b, Tensor(), {{&w.lkv_b, nullptr, 0}});
    // rope on q's pe columns (per head) and on the shared k_pe
    Tensor pe = Tensor::empty({b_n, s_n, m.h, m.dr}, DType::F32, kAct);
    Tensor pe2 = pe.view({t_n * m.h, m.dr}), qh = a.q.view({t_n * m.h, m.dq});
    copy_columns(pe2, 0, qh, m.dn, m.dr);
    rope_forward(pe, 0, rt);
    copy_columns(qh, m.dn, pe2, 0, m.dr);
    Tensor kpe = Tensor::empty({b_n, s_n, 1, m.dr}, DType::F32, kAct);
    Tensor kpe2 = kpe.view({t_n, m.dr});
    copy_columns(kpe2, 0, kva, m.rkv, m.dr);
    rope_forward(kpe, 0, rt);
    // per-head keys [k_nope | rope(k_pe)] and values [v | 0] (padded to the key width)
    Tensor k2 = a.k.view({t_n, m.h * m.dq}), v2 = a.v.view({t_n, m.h * m.dq});
    v2.zero_();
    for (int64_t hh = 0; hh < m.h; ++hh) {
      copy_columns(k2, hh * m.dq, kv, hh * (m.dn + m.dv), m.dn);
      copy_columns(k2, hh * m.dq + m.dn, kpe2, 0, m.dr);
      copy_columns(v2, hh * m.dq, kv, hh * (m.dn + m.dv) + m.dn, m.dv);
    }
  }
  AttnVariant av;
  av.scale = mla_softmax_scale(c);
  attention_forward_train(a.attn_out, a.lse, a.q, a.k, a.v, av);
  Tensor o = Tensor::empty({t_n, m.h * m.dv}, DType::F32, kAct);
  Tensor out2 = a.attn_out.view({t_n, m.h * m.dq});
  for (int64_t hh = 0; hh < m.h; ++hh) copy_columns(o, hh * m.dv, out2, hh * m.dq, m.dv);
  linear(a.x_mid, o, w.wo, w.bo, {{&w.lo, nullptr, 0}});
  add_inplace(a.x_mid, a.x_in);
}

void mla_block_backward(const ModelConfig& c, const LayerWeights& w, const LayerActs& a, const Tensor& dx_mid,
                        Tensor& dx_in, LayerWeights& g) {
  const MlaDims m = mla_dims(c);
  const int64_t b_n = a.q.dim(0), s_n = a.q.dim(1), t_n = b_n * s_n;
  const RopeTable& rt = rope_table_of(c);
  Tensor none;
  // o_proj: its input (the attention output's value columns) is recomputed, not saved.
  Tensor dattn = Tensor::zeros(a.attn_out.shape(), DType::F32, kAct);
  {
    Tensor o = Tensor::empty({t_n, m.h * m.dv}, DType::F32, kAct);
    Tensor out2 = a.attn_out.view({t_n, m.h * m.dq});
    for (int64_t hh = 0; hh < m.h; ++hh) copy_columns(o, hh * m.dv, out2, hh * m.dq, m.dv);
    Tensor d_o = Tensor::empty({t_n, m.h * m.dv}, DType::F32, kAct);
    linear_backward(d_o, g.wo, g.bo, dx_mid, o, w.wo, false, {{&w.lo, &g.lo, 0}});
    Tensor da2 = dattn.view({t_n, m.h * m.dq});
    for (int64_t hh = 0; hh < m.h; ++hh) copy_columns(da2, hh * m.dq, d_o, hh * m.dv, m.dv);
  }
  Tensor dq = Tensor::empty(a.q.shape(), DType::F32, kAct);
  Tensor dk = Tensor::empty(a.k.shape(), DType::F32, kAct);
  Tensor dv = Tensor::empty(a.v.shape(), DType::F32, kAct);
  AttnVariant av;
  av.scale = mla_softmax_scale(c);
  attention_backward(dq, dk, dv, dattn, a.q, a.k, a.v, a.attn_out, a.lse, av);
  dattn = Tensor();
  // q: the inverse rotation on its pe columns.
  Tensor dqh = dq.view({t_n * m.h, m.dq});
  {
    Tensor pe = Tensor::empty({b_n, s_n, m.h, m.dr}, DType::F32, kAct);
    Tensor pe2 = pe.view({t_n * m.h, m.dr});
    copy_columns(pe2, 0, dqh, m.dn, m.dr);
    rope_backward(pe, 0, rt);
    copy_columns(dqh, m.dn, pe2, 0, m.dr);
  }
  // k and v: per-head k_nope and v gradients into kv_b_proj's output layout; the shared k_pe
  // collects every head's gradient, then the inverse rotation.
  Tensor dkva = Tensor::empty({t_n, m.rc}, DType::F32, kAct);
  {
    Tensor dkv = Tensor::empty({t_n, m.h * (m.dn + m.dv)}, DType::F32, kAct);
    Tensor dkpe = Tensor::zeros({b_n, s_n, 1, m.dr}, DType::F32, kAct);
    Tensor dkpe2 = dkpe.view({t_n, m.dr}), tmp = Tensor::empty({t_n, m.dr}, DType::F32, kAct);
    {
      const Tensor dk2 = dk.view({t_n, m.h * m.dq}), dv2 = dv.view({t_n, m.h * m.dq});
      for (int64_t hh = 0; hh < m.h; ++hh) {
        copy_columns(dkv, hh * (m.dn + m.dv), dk2, hh * m.dq, m.dn);
        copy_columns(dkv, hh * (m.dn + m.dv) + m.dn, dv2, hh * m.dq, m.dv);
        copy_columns(tmp, 0, dk2, hh * m.dq + m.dn, m.dr);
        add_inplace(dkpe2, tmp);
      }
    }  // the views go first, so that these free dk's and dv's storage
    dk = Tensor();
    dv = Tensor();
    rope_backward(dkpe, 0, rt);
    Tensor dckn = Tensor::empty({t_n, m.rkv}, DType::F32, kAct);
    linear_backward(dckn, g.wkv_b, none, dkv, a.mla_ckn, w.wkv_b, false, {{&w.lkv_b, &g.lkv_b, 0}});
    dkv = Tensor();
    Tensor dckv = Tensor::empty({t_n, m.rkv}, DType::F32, kAct);
    rmsnorm_backward(dckv, g.kv_a_norm, dckn, a.mla_ckv, w.kv_a_norm, a.mla_ckv_rstd, false);
    copy_columns(dkva, 0, dckv, 0, m.rkv);
    copy_columns(dkva, m.rkv, dkpe2, 0, m.dr);
  }
  Tensor dh = Tensor::empty({t_n, c.hidden_size}, DType::F32, kAct);
  linear_backward(dh, g.wkv_a, none, dkva, a.attn_h, w.wkv_a, false, {{&w.lkv_a, &g.lkv_a, 0}});
  dkva = Tensor();
  Tensor dq2 = dq.view({t_n, m.h * m.dq});
  if (w.wq_a.defined()) {
    Tensor dcqn = Tensor::empty(a.mla_cqn.shape(), DType::F32, kAct);
    linear_backward(dcqn, g.wq_b, none, dq2, a.mla_cqn, w.wq_b, false, {{&w.lq_b, &g.lq_b, 0}});
    Tensor dcq = Tensor::empty(a.mla_cq.shape(), DType::F32, kAct);
    rmsnorm_backward(dcq, g.q_a_norm, dcqn, a.mla_cq, w.q_a_norm, a.mla_cq_rstd, false);
    linear_backward(dh, g.wq_a, none, dcq, a.attn_h, w.wq_a, true, {{&w.lq_a, &g.lq_a, 0}});
  } else {
    linear_backward(dh, g.wq_b, none, dq2, a.attn_h, w.wq_b, true, {{&w.lq_b, &g.lq_b, 0}});
  }
  rmsnorm_backward(dx_in, g.attn_norm, dh, a.x_in, w.attn_norm, a.attn_rstd, false);
  add_inplace(dx_in, dx_mid);
}

}  // namespace moe
