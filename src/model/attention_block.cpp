// attention_block.cpp — forward (inference and training) and backward of the attention block.
//
// The q/k norm is one RMSNorm over rows of its weight's width (ModelConfig::q_norm_dim): per head
// (qwen3_moe: q seen as [T*H, Dh]) or over the whole projection (olmoe: q seen as [T, H*Dh]); q
// and k are contiguous [B,S,H,Dh], so both are views of the same storage.
#include "model/attention_block.h"

#include "model/linear.h"
#include "model/mla_block.h"
#include "ops/ops.h"

namespace moe {
namespace {

struct QkvDims {
  int64_t q, kv;  // H*Dh, Hkv*Dh
};

QkvDims qkv_dims(const ModelConfig& c) { return {c.n_head * c.head_dim, c.n_head_kv * c.head_dim}; }

// x (q or k, or their gradients) as the rows its q/k norm of `width` normalises.
Tensor norm_rows(const Tensor& x, int64_t width) { return x.view({x.numel() / width, width}); }

const RopeTable& rope_of(const ModelConfig& c) { return rope_table_of(c); }

// The layer's attention variant: its sinks and sliding window (plain for most families).
AttnVariant attn_variant(const LayerWeights& w) { return AttnVariant{w.sinks, w.attn_window}; }

// Splits the stacked projection output [T, q+2kv] into q [T,q], k [T,kv], v [T,kv].
void split_qkv(const Tensor& qkv, Tensor& q, Tensor& k, Tensor& v, QkvDims d) {
  copy_columns(q, 0, qkv, 0, d.q);
  copy_columns(k, 0, qkv, d.q, d.kv);
  copy_columns(v, 0, qkv, d.q + d.kv, d.kv);
}

// q, k and v into qkv's columns [T, q+2kv]: one product on the stacked wqkv — or, where a GGUF
// mix gives the parts different quantized types (wqkv undefined, model.h), the three side by side.
void qkv_forward(Tensor& qkv, const Tensor& h, const LayerWeights& w) {
  if (w.wqkv.defined()) return linear_forward(qkv, h, w.wqkv, w.bqkv);
  linear_forward_cat(qkv, h, {{&w.wq, &w.bq}, {&w.wk, &w.bk}, {&w.wv, &w.bv}});
}

// Training reads the stacked projection (one backward through wqkv).
void check_stacked_qkv(const LayerWeights& w) {
  MOE_CHECK(w.wqkv.defined(),
            "attention: q/k/v of different quantized types (a GGUF mix such as Q4_K_M) run inference only; "
            "training and fine-tuning read the GGUF dequantized");
}

}  // namespace

const RopeTable& rope_table_of(const ModelConfig& c) {
  struct Key {
    double theta = -1;
    int64_t dh = 0, max_pos = 0;
    RopeScaling rs;
    bool interleave = false;
    bool operator==(const Key&) const = default;
  };
  thread_local Key last;
  thread_local RopeTable table;
  const Key key{c.rope_theta, c.head_dim, c.max_position_embeddings, c.rope_scaling, c.rope_interleave};
  if (!(key == last)) {
    table = rope_table(c.rope_theta, c.head_dim, c.rope_scaling, c.max_position_embeddings);
    table.interleaved = c.rope_interleave;
    last = key;
  }
  return table;
}

void attention_block_infer(const ModelConfig& c, const LayerWeights& w, Tensor& x, Tensor& h, Tensor& y,
                           Tensor& k_cache, Tensor& v_cache, int64_t batch, int64_t seq,
                           const std::vector<int64_t>& slots, const std::vector<int64_t>& past,
                           const Tensor& tables, const Tensor& pos) {
  if (c.is_mla()) return mla_block_infer(c, w, x, h, y, k_cache, batch, seq, slots, past, tables, pos);
  const int64_t t_n = batch * seq, dh = c.head_dim, h_n = c.n_head, hkv = c.n_head_kv;
  const QkvDims dm = qkv_dims(c);
  const Device dev = x.device();
  const DType adt = x.dtype();
  const MemCategory act = MemCategory::Activations;
  rmsnorm_forward(h, x, w.attn_norm, float(c.rms_norm_eps));
  Tensor qkv = Tensor::empty({t_n, dm.q + 2 * dm.kv}, adt, act, dev);
  qkv_forward(qkv, h, w);
  Tensor q, k, v;
  if (t_n == 1) {
    // One row: q, k and v are contiguous pieces of it (decode is launch-bound: no copies).
    Tensor flat = qkv.view({qkv.numel()});
    q = flat.rows(0, dm.q).view({1, 1, h_n, dh});
    k = flat.rows(dm.q, dm.q + dm.kv).view({1, 1, hkv, dh});
    v = flat.rows(dm.q + dm.kv, dm.q + 2 * dm.kv).view({1, 1, hkv, dh});
  } else {
    q = Tensor::empty({batch, seq, h_n, dh}, adt, act, dev);
    k = Tensor::empty({batch, seq, hkv, dh}, adt, act, dev);
    v = Tensor::empty({batch, seq, hkv, dh}, adt, act, dev);
    Tensor q2 = q.view({t_n, dm.q}), k2 = k.view({t_n, dm.kv}), v2 = v.view({t_n, dm.kv});
    split_qkv(qkv, q2, k2, v2, dm);
  }
  if (c.qk_norm != QkNormKind::None) {
    Tensor qn = norm_rows(q, c.q_norm_dim()), kn = norm_rows(k, c.k_norm_dim());
    rmsnorm_forward(qn, qn, w.q_norm, float(c.rms_norm_eps));
    rmsnorm_forward(kn, kn, w.k_norm, float(c.rms_norm_eps));
  }
  Tensor attn = Tensor::empty({batch, seq, h_n, dh}, adt, act, dev);
  // One call for the whole batch when it is the whole cache at one position (prefill, lockstep
  // decode); otherwise each row on its own slot at its own position.
  bool lockstep = !tables.defined() && batch == k_cache.dim(0);
  for (int64_t b = 0; b < batch && lockstep; ++b)
    lockstep = slots[static_cast<size_t>(b)] == b && past[static_cast<size_t>(b)] == past[0];
  const RopeTable& theta = rope_of(c);
  const AttnVariant av = attn_variant(w);
  if (lockstep) {
    rope_forward(q, past[0], theta);
    rope_forward(k, past[0], theta);
    kv_append(k_cache, v_cache, k, v, past[0]);
    attention_forward(attn, q, k_cache, v_cache, past[0], av);
  } else if (tables.defined()) {
    // Paged: rotate each row at its own position, then one append and one attention call for
    // the whole batch (each row reads its own block table).
    for (int64_t b = 0; b < batch; ++b) {
      Tensor qb = q.rows(b, b + 1), kb = k.rows(b, b + 1);
      rope_forward(qb, past[static_cast<size_t>(b)], theta);
      rope_forward(kb, past[static_cast<size_t>(b)], theta);
    }
    kv_append_paged(k_cache, v_cache, k, v, tables, pos);
    attention_forward_paged(attn, q, k_cache, v_cache, tables, pos, av);
  } else {
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t sl = slots[static_cast<size_t>(b)], p = past[static_cast<size_t>(b)];
      Tensor qb = q.rows(b, b + 1), kb = k.rows(b, b + 1), vb = v.rows(b, b + 1), ob = attn.rows(b, b + 1);
      Tensor kc = k_cache.rows(sl, sl + 1), vc = v_cache.rows(sl, sl + 1);
      rope_forward(qb, p, theta);
      rope_forward(kb, p, theta);
      kv_append(kc, vc, kb, vb, p);
      attention_forward(ob, qb, kc, vc, p, av);
    }
  }
  linear_forward(y, attn.view({t_n, dm.q}), w.wo, w.bo);
  add_inplace(x, y);
}

void attention_block_forward(const ModelConfig& c, const LayerWeights& w, LayerActs& a, Tensor& qkv) {
  if (c.is_mla()) return mla_block_forward(c, w, a);
  const int64_t b_n = a.q.dim(0), s_n = a.q.dim(1), t_n = b_n * s_n;
  const QkvDims dm = qkv_dims(c);
  const float eps = float(c.rms_norm_eps);
  check_stacked_qkv(w);
  rmsnorm_forward_train(a.attn_h, a.attn_rstd, a.x_in, w.attn_norm, eps);
  linear(qkv, a.attn_h, w.wqkv, w.bqkv, {{&w.lq, nullptr, 0}, {&w.lk, nullptr, dm.q}, {&w.lv, nullptr, dm.q + dm.kv}});
  Tensor q2 = a.q.view({t_n, dm.q}), k2 = a.k.view({t_n, dm.kv}), v2 = a.v.view({t_n, dm.kv});
  if (c.qk_norm != QkNormKind::None) {
    Tensor qp = a.q_pre.view({t_n, dm.q}), kp = a.k_pre.view({t_n, dm.kv});
    split_qkv(qkv, qp, kp, v2, dm);
    Tensor qn = norm_rows(a.q, c.q_norm_dim()), kn = norm_rows(a.k, c.k_norm_dim());
    rmsnorm_forward_train(qn, a.q_rstd, a.q_pre, w.q_norm, eps);
    rmsnorm_forward_train(kn, a.k_rstd, a.k_pre, w.k_norm, eps);
  } else {
    split_qkv(qkv, q2, k2, v2, dm);
  }
  rope_forward(a.q, 0, rope_of(c));
  rope_forward(a.k, 0, rope_of(c));
  attention_forward_train(a.attn_out, a.lse, a.q, a.k, a.v, attn_variant(w));
  linear(a.x_mid, a.attn_out.view({t_n, dm.q}), w.wo, w.bo, {{&w.lo, nullptr, 0}});
  add_inplace(a.x_mid, a.x_in);
}

void attention_block_backward(const ModelConfig& c, const LayerWeights& w, const LayerActs& a,
                              const Tensor& dx_mid, Tensor& dx_in, LayerWeights& g, Tensor& dqkv) {
  if (c.is_mla()) return mla_block_backward(c, w, a, dx_mid, dx_in, g);
  const int64_t b_n = a.q.dim(0), s_n = a.q.dim(1), t_n = b_n * s_n;
  const QkvDims dm = qkv_dims(c);
  const MemCategory act = MemCategory::Activations;
  // o_proj
  Tensor dattn = Tensor::empty(a.attn_out.shape(), DType::F32, act);
  Tensor dattn2 = dattn.view({t_n, dm.q});
  linear_backward(dattn2, g.wo, g.bo, dx_mid, a.attn_out.view({t_n, dm.q}), w.wo, false, {{&w.lo, &g.lo, 0}});
  // attention, then the inverse rotation
  Tensor dq = Tensor::empty(a.q.shape(), DType::F32, act);
  Tensor dk = Tensor::empty(a.k.shape(), DType::F32, act);
  Tensor dv = Tensor::empty(a.v.shape(), DType::F32, act);
  attention_backward(dq, dk, dv, dattn, a.q, a.k, a.v, a.attn_out, a.lse, attn_variant(w), &g.sinks);
  dattn = Tensor();
  rope_backward(dq, 0, rope_of(c));
  rope_backward(dk, 0, rope_of(c));
  if (c.qk_norm != QkNormKind::None) {
    Tensor dqp = Tensor::empty(a.q_pre.shape(), DType::F32, act);
    Tensor dkp = Tensor::empty(a.k_pre.shape(), DType::F32, act);
    rmsnorm_backward(dqp, g.q_norm, norm_rows(dq, c.q_norm_dim()), a.q_pre, w.q_norm, a.q_rstd, false);
    rmsnorm_backward(dkp, g.k_norm, norm_rows(dk, c.k_norm_dim()), a.k_pre, w.k_norm, a.k_rstd, false);
    dq = dqp;
    dk = dkp;
  }
  // join into the stacked layout; one backward through wqkv
  copy_columns(dqkv, 0, dq.view({t_n, dm.q}), 0, dm.q);
  copy_columns(dqkv, dm.q, dk.view({t_n, dm.kv}), 0, dm.kv);
  copy_columns(dqkv, dm.q + dm.kv, dv.view({t_n, dm.kv}), 0, dm.kv);
  Tensor dh_norm = Tensor::empty({t_n, c.hidden_size}, DType::F32, act);
  linear_backward(dh_norm, g.wqkv, g.bqkv, dqkv, a.attn_h, w.wqkv, false,
                  {{&w.lq, &g.lq, 0}, {&w.lk, &g.lk, dm.q}, {&w.lv, &g.lv, dm.q + dm.kv}});
  rmsnorm_backward(dx_in, g.attn_norm, dh_norm, a.x_in, w.attn_norm, a.attn_rstd, false);
  add_inplace(dx_in, dx_mid);
}

}  // namespace moe
