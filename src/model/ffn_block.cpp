// ffn_block.cpp — forward (inference and training) and backward of the feed-forward block.
#include "model/ffn_block.h"

#include <cmath>

#include "model/arch.h"
#include "model/linear.h"
#include "ops/ops.h"

namespace moe {
namespace {

constexpr MemCategory kAct = MemCategory::Activations;

// The routed experts' activation (plain SwiGLU unless the config clamps it: gpt_oss).
ExpertGlu expert_glu(const ModelConfig& c) {
  return c.swiglu_limit > 0 ? ExpertGlu{float(c.swiglu_alpha), float(c.swiglu_limit)} : ExpertGlu{};
}
ExpertBias expert_bias(const LayerWeights& w) { return ExpertBias{w.b1, w.b3, w.b2}; }

// Adds the shared expert's output s [T,D] into y: through its sigmoid gate where the layer has one
// (qwen2_moe), unweighted otherwise (DeepSeek).
void add_shared(Tensor& y, const Tensor& s, const LayerWeights& w, const Tensor& h, Tensor* gate_out) {
  if (!w.shared_gate.defined()) return add_inplace(y, s);
  Tensor gf = gate_out ? *gate_out : Tensor::empty({h.dim(0), 1}, DType::F32, kAct, h.device());
  linear_forward(gf, h, w.shared_gate, Tensor());
  sigmoid_gate_add(y, s, gf);
}

// y = w2 · swiglu(x w1ᵀ, x w3ᵀ); h1, h3 [T,F] receive the pre-activations (kept by training).
// lora: the MLP's adapters (training; inference passes none).
void swiglu_mlp(Tensor& y, Tensor& h1, Tensor& h3, const Tensor& x, const Tensor& w1, const Tensor& w3,
                const Tensor& w2, const ExpertLora& lora = {}) {
  linear(h1, x, w1, Tensor(), {{&lora.w1, nullptr, 0}});
  linear(h3, x, w3, Tensor(), {{&lora.w3, nullptr, 0}});
  Tensor act = Tensor::empty(h1.shape(), h1.dtype(), kAct, h1.device());
  swiglu_forward(act, h1, h3);
  linear(y, act, w2, Tensor(), {{&lora.w2, nullptr, 0}});
}

// Backward of swiglu_mlp: dx += (accumulates), dw1/dw3/dw2 += , the adapters' gradients += .
void swiglu_mlp_backward(Tensor& dx, Tensor& dw1, Tensor& dw3, Tensor& dw2, const Tensor& dy, const Tensor& x,
                         const Tensor& h1, const Tensor& h3, const Tensor& w1, const Tensor& w3, const Tensor& w2,
                         const ExpertLora& lora, ExpertLora& glora) {
  Tensor act = Tensor::empty(h1.shape(), DType::F32, kAct);
  swiglu_forward(act, h1, h3);  // recomputed, not saved
  Tensor dact = Tensor::empty(h1.shape(), DType::F32, kAct);
  Tensor none;
  linear_backward(dact, dw2, none, dy, act, w2, false, {{&lora.w2, &glora.w2, 0}});
  Tensor dh1 = act, dh3 = Tensor::empty(h1.shape(), DType::F32, kAct);
  swiglu_backward(dh1, dh3, dact, h1, h3);
  linear_backward(dx, dw1, none, dh1, x, w1, true, {{&lora.w1, &glora.w1, 0}});
  linear_backward(dx, dw3, none, dh3, x, w3, true, {{&lora.w3, &glora.w3, 0}});
}

// Kept rows (offsets[E]) of a dispatch; P when nothing was dropped. CPU (training) only.
int64_t kept_rows(const Tensor& offsets) { return offsets.data<int32_t>()[offsets.numel() - 1]; }

void zero_rows_from(Tensor& t, int64_t r0) {
  if (r0 < t.dim(0)) {
    Tensor tail = t.rows(r0, t.dim(0));
    tail.zero_();
  }
}

// Expert parallel forward: this rank's routed rows (a.xp, a.row_scale, sorted by expert over
// a.offsets) go to their experts' owners; this rank computes the rows it received for its own
// experts (saving them and their pre-activations in a.ep) and returns the outputs, which land
// in yp rows [0, kept) as if computed here.
void expert_parallel_forward(dist::Communicator& ep, const ModelConfig& c, const LayerWeights& w, LayerActs& a,
                             Tensor& yp, int64_t e_n) {
  MOE_CHECK(w.w1.dim(0) * ep.size() == e_n, "expert parallel: %lld local experts x %d ranks != %lld experts",
            (long long)w.w1.dim(0), ep.size(), (long long)e_n);
  auto plan = std::make_shared<dist::ExpertExchange>(dist::plan_exchange(ep, a.offsets, e_n));
  const int64_t r = plan->received(), d = a.xp.dim(1), f = w.w1.dim(1);
  a.ep.xp = Tensor::empty({r, d}, DType::F32, kAct);
  a.ep.row_scale = Tensor::empty({r}, DType::F32, kAct);
  const DType hdt = a.eh1.defined() ? a.eh1.dtype() : DType::F32;  // the layout's choice (activations.h)
  a.ep.eh1 = Tensor::empty({r, f}, hdt, kAct);
  a.ep.eh3 = Tensor::empty({r, f}, hdt, kAct);
  a.ep.offsets = Tensor::empty({plan->n_local + 1}, DType::I32, kAct);
  std::copy(plan->local_offsets.begin(), plan->local_offsets.end(), a.ep.offsets.data<int32_t>());
  dist::dispatch_rows(ep, *plan, {&a.xp, &a.row_scale}, {&a.ep.xp, &a.ep.row_scale});
  Tensor yr = Tensor::empty({r, d}, DType::F32, kAct);
  expert_ffn_forward_train(yr, a.ep.eh1, a.ep.eh3, a.ep.xp, a.ep.offsets, w.w1, w.w3, w.w2, a.ep.row_scale, w.lexp,
                           expert_glu(c), expert_bias(w));
  dist::return_rows(ep, *plan, yr, yp);
  a.ep.plan = std::move(plan);
}

// Its backward along the same plan: dY rows to the owners, the owners' expert backward
// (gradients of their own experts), dX and the routing-weight gradients back to their origin.
void expert_parallel_backward(dist::Communicator& ep, const ModelConfig& c, const LayerWeights& w, const LayerActs& a,
                              const Tensor& dyp, Tensor& dxp, Tensor& drs, LayerWeights& g) {
  const dist::ExpertExchange& plan = *a.ep.plan;
  const int64_t r = plan.received(), d = dyp.dim(1);
  Tensor dyr = Tensor::empty({r, d}, DType::F32, kAct);
  dist::dispatch_rows(ep, plan, dyp, dyr);
  Tensor dxr = Tensor::empty({r, d}, DType::F32, kAct), dsr = Tensor::empty({r}, DType::F32, kAct);
  ExpertBias gb = expert_bias(g);
  expert_ffn_backward(dxr, g.w1, g.w3, g.w2, dsr, dyr, a.ep.xp, a.ep.eh1, a.ep.eh3, a.ep.offsets, w.w1, w.w3, w.w2,
                      a.ep.row_scale, w.lexp, &g.lexp, expert_glu(c), expert_bias(w), &gb);
  dist::return_rows(ep, plan, {&dxr, &dsr}, {&dxp, &drs});
}

}  // namespace

RouterVariant router_variant(const ModelConfig& c) {
  const ArchSpec& a = arch_spec(c.model_type);
  RouterVariant rv;
  rv.renorm = c.norm_topk_prob;
  rv.sigmoid = a.router_sigmoid;
  rv.renorm_eps = a.router_renorm_eps;
  rv.scale = c.routed_scaling_factor;
  if (c.topk_method != RouterTopk::Greedy) {
    rv.n_group = c.n_group;
    rv.topk_group = c.topk_group;
    rv.group_top2 = c.topk_method == RouterTopk::NoauxTc;
  }
  return rv;
}

int64_t expert_capacity(double capacity_factor, int64_t t_n, int64_t k, int64_t e_n) {
  return static_cast<int64_t>(std::ceil(capacity_factor * double(t_n * k) / double(e_n)));
}

void ffn_block_infer(const ModelConfig& c, const LayerWeights& w, Tensor& x, Tensor& h, Tensor& y,
                     Tensor* router_logits, dist::Communicator* ep) {
  const int64_t t_n = x.dim(0), d = c.hidden_size, k = c.n_expert_used;
  const Device dev = x.device();
  const DType adt = x.dtype();
  rmsnorm_forward(h, x, w.ffn_norm, float(c.rms_norm_eps));
  if (!w.is_moe) {
    Tensor h1 = Tensor::empty({t_n, w.w1.dim(0)}, adt, kAct, dev), h3 = Tensor::empty(h1.shape(), adt, kAct, dev);
    swiglu_mlp(y, h1, h3, h, w.w1, w.w3, w.w2);
    add_inplace(x, y);
    return;
  }
  const int64_t e_n = c.n_expert, p_n = t_n * k;
  // Routing is f32 whatever the activation dtype (linear accumulates in f32 and writes f32).
  Tensor logits = Tensor::empty({t_n, e_n}, DType::F32, kAct, dev);
  linear_forward(logits, h, w.router, w.brouter);
  Tensor topk_idx = Tensor::empty({t_n, k}, DType::I32, kAct, dev);
  Tensor topk_w = Tensor::empty({t_n, k}, DType::F32, kAct, dev);
  router_topk_forward(topk_idx, topk_w, logits, router_variant(c), w.router_bias);
  Tensor offsets = Tensor::empty({e_n + 1}, DType::I32, kAct, dev);
  Tensor perm = Tensor::empty({p_n}, DType::I32, kAct, dev);
  Tensor inv = Tensor::empty({p_n}, DType::I32, kAct, dev);
  moe_dispatch(offsets, perm, inv, topk_idx, e_n);
  Tensor xp = Tensor::empty({p_n, d}, adt, kAct, dev);
  gather_rows(xp, h, perm, k);
  Tensor row_scale = Tensor::empty({p_n}, DType::F32, kAct, dev);
  permute_weights(row_scale, topk_w, perm);
  Tensor yp = Tensor::empty({p_n, d}, adt, kAct, dev);
  if (ep) {
    // Replicated tokens: only the rows of this rank's experts [e0, e0+El); the others stay zero
    // here and come from their owners in the sum.
    MOE_CHECK(dev == Device::CPU && adt == DType::F32, "expert-parallel inference runs on the CPU with f32 activations");
    const int64_t el = w.w1.dim(0), e0 = int64_t(ep->rank()) * el;
    MOE_CHECK(el * ep->size() == e_n, "expert parallel: %lld local experts x %d ranks != %lld experts", (long long)el,
              ep->size(), (long long)e_n);
    const int32_t* off = offsets.data<int32_t>();
    const int64_t o0 = off[e0], o1 = off[e0 + el];
    Tensor loff = Tensor::empty({el + 1}, DType::I32, kAct);
    for (int64_t j = 0; j <= el; ++j) loff.data<int32_t>()[j] = off[e0 + j] - int32_t(o0);
    yp.zero_();
    Tensor ypl = yp.rows(o0, o1);
    expert_ffn_forward(ypl, xp.rows(o0, o1), loff, w.w1, w.w3, w.w2, row_scale.rows(o0, o1), expert_glu(c),
                       expert_bias(w));
    moe_combine(y, yp, inv, k, /*accumulate=*/false);
    ep->all_reduce_sum(y.data<float>(), y.numel());
  } else {
    expert_ffn_forward(yp, xp, offsets, w.w1, w.w3, w.w2, row_scale, expert_glu(c), expert_bias(w));
    moe_combine(y, yp, inv, k, /*accumulate=*/false);
  }
  if (w.shared_w1.defined()) {
    const int64_t fs = w.shared_w1.dim(0);
    Tensor s = Tensor::empty({t_n, d}, adt, kAct, dev);
    Tensor h1 = Tensor::empty({t_n, fs}, adt, kAct, dev), h3 = Tensor::empty({t_n, fs}, adt, kAct, dev);
    swiglu_mlp(s, h1, h3, h, w.shared_w1, w.shared_w3, w.shared_w2);
    add_shared(y, s, w, h, nullptr);
  }
  add_inplace(x, y);
  if (router_logits) *router_logits = logits;
}

void ffn_block_forward(const ModelConfig& c, const LayerWeights& w, LayerActs& a, Tensor& x_out, RouterStats* stats,
                       const RouteOptions& ro) {
  const int64_t k = c.n_expert_used;
  rmsnorm_forward_train(a.ffn_h, a.ffn_rstd, a.x_mid, w.ffn_norm, float(c.rms_norm_eps));
  if (!w.is_moe) {
    swiglu_mlp(x_out, a.dh1, a.dh3, a.ffn_h, w.w1, w.w3, w.w2, w.lmlp);
    add_inplace(x_out, a.x_mid);
    return;
  }
  const int64_t e_n = c.n_expert;
  linear(a.router_logits, a.ffn_h, w.router, w.brouter, {{&w.lrouter, nullptr, 0}});
  router_topk_forward(a.topk_idx, a.topk_w, a.router_logits, router_variant(c), w.router_bias);
  moe_dispatch(a.offsets, a.perm, a.inv, a.topk_idx, e_n);
  const int64_t p_n = a.perm.numel();
  if (ro.capacity_factor > 0)
    moe_capacity_drop(a.offsets, a.perm, a.inv, expert_capacity(ro.capacity_factor, a.topk_idx.dim(0), k, e_n));
  // Dropped assignments sit in rows [kept, P): the experts skip them and their output rows are
  // zero, so combine adds nothing for them.
  const int64_t kept = kept_rows(a.offsets);
  gather_rows(a.xp, a.ffn_h, a.perm, k);
  permute_weights(a.row_scale, a.topk_w, a.perm);
  Tensor yp = Tensor::empty(a.xp.shape(), DType::F32, kAct);
  if (ro.ep) {
    expert_parallel_forward(*ro.ep, c, w, a, yp, e_n);
  } else {
    a.ep = {};
    expert_ffn_forward_train(yp, a.eh1, a.eh3, a.xp, a.offsets, w.w1, w.w3, w.w2, a.row_scale, w.lexp, expert_glu(c),
                             expert_bias(w));
  }
  zero_rows_from(yp, kept);
  moe_combine(x_out, yp, a.inv, k, /*accumulate=*/false);
  yp = Tensor();
  if (w.shared_w1.defined()) {
    swiglu_mlp(a.s_out, a.sh1, a.sh3, a.ffn_h, w.shared_w1, w.shared_w3, w.shared_w2, w.lshared);
    add_shared(x_out, a.s_out, w, a.ffn_h, &a.s_gate);
  }
  add_inplace(x_out, a.x_mid);
  if (stats) {
    Tensor ps = Tensor::empty({e_n}, DType::F32, kAct), cnt = Tensor::empty({e_n}, DType::F32, kAct);
    Tensor z = Tensor::empty({1}, DType::F32, kAct);
    router_stats(ps, cnt, z, a.router_logits, a.topk_idx);
    stats->prob_sum.assign(ps.data<float>(), ps.data<float>() + e_n);
    stats->count.assign(cnt.data<float>(), cnt.data<float>() + e_n);
    stats->z_sum = z.data<float>()[0];
    stats->dropped = p_n - kept;
  }
}

bool experts_one_at_a_time(const LayerWeights& w) {
  return w.is_moe && w.w1.defined() && !w.lexp.any() && !w.b1.defined() && !w.b3.defined() && !w.b2.defined();
}

// The routed experts' backward one expert at a time (ffn_block.h, per_expert): expert e's rows
// [off[e], off[e+1]) of every row tensor and its slice of the weights, one expert's offsets.
void experts_backward_each(const ModelConfig& c, const LayerWeights& w, const LayerActs& a, const Tensor& dyp,
                           Tensor& dxp, Tensor& drs, const ExpertGradFn& per_expert) {
  const int64_t e_n = w.w1.dim(0), f = w.w1.dim(1), d = w.w1.dim(2);
  const std::vector<int32_t> off(a.offsets.data<int32_t>(), a.offsets.data<int32_t>() + e_n + 1);
  Tensor dw1 = Tensor::empty({1, f, d}, DType::F32, MemCategory::Grads);
  Tensor dw3 = Tensor::empty({1, f, d}, DType::F32, MemCategory::Grads);
  Tensor dw2 = Tensor::empty({1, d, f}, DType::F32, MemCategory::Grads);
  Tensor off1 = Tensor::empty({2}, DType::I32, MemCategory::Workspace);  // expert e's offsets
  for (int64_t e = 0; e < e_n; ++e) {
    const int64_t r0 = off[size_t(e)], r1 = off[size_t(e + 1)];
    // An expert with rows has its gradients assigned (expert_ffn_backward's assign_dw: the
    // products never read the buffers); one without is handed zeros.
    if (r1 == r0) {
      for (Tensor* t : {&dw1, &dw3, &dw2}) t->zero_();
    } else {
      off1.data<int32_t>()[0] = 0;
      off1.data<int32_t>()[1] = static_cast<int32_t>(r1 - r0);
      Tensor dx = dxp.rows(r0, r1), ds = drs.defined() ? drs.rows(r0, r1) : Tensor();
      expert_ffn_backward(dx, dw1, dw3, dw2, ds, dyp.rows(r0, r1), a.xp.rows(r0, r1), a.eh1.rows(r0, r1),
                          a.eh3.rows(r0, r1), off1, w.w1.rows(e, e + 1), w.w3.rows(e, e + 1), w.w2.rows(e, e + 1),
                          a.row_scale.defined() ? a.row_scale.rows(r0, r1) : Tensor(), ExpertLora{}, nullptr,
                          expert_glu(c), ExpertBias{}, nullptr, /*assign_dw=*/true);
    }
    per_expert(e, dw1.select(0), dw3.select(0), dw2.select(0));
  }
}

void ffn_block_backward(const ModelConfig& c, const LayerWeights& w, const LayerActs& a, const Tensor& dx_out,
                        Tensor& dx_mid, LayerWeights& g, const BalanceGrad& bal, dist::Communicator* ep,
                        const ExpertGradFn* per_expert) {
  const int64_t t_n = dx_out.dim(0), d = c.hidden_size, k = c.n_expert_used;
  Tensor dh = Tensor::zeros({t_n, d}, DType::F32, kAct);
  Tensor none;
  if (!w.is_moe) {
    swiglu_mlp_backward(dh, g.w1, g.w3, g.w2, dx_out, a.ffn_h, a.dh1, a.dh3, w.w1, w.w3, w.w2, w.lmlp, g.lmlp);
  } else {
    if (w.shared_w1.defined() && !w.shared_gate.defined()) {
      // Ungated (DeepSeek): the shared expert's output gradient is dx_out itself.
      swiglu_mlp_backward(dh, g.shared_w1, g.shared_w3, g.shared_w2, dx_out, a.ffn_h, a.sh1, a.sh3, w.shared_w1,
                          w.shared_w3, w.shared_w2, w.lshared, g.lshared);
    } else if (w.shared_w1.defined()) {
      Tensor ds = Tensor::empty({t_n, d}, DType::F32, kAct), dgate = Tensor::empty({t_n, 1}, DType::F32, kAct);
      sigmoid_gate_backward(ds, dgate, dx_out, a.s_out, a.s_gate);
      linear_backward(dh, g.shared_gate, none, dgate, a.ffn_h, w.shared_gate, true);
      swiglu_mlp_backward(dh, g.shared_w1, g.shared_w3, g.shared_w2, ds, a.ffn_h, a.sh1, a.sh3, w.shared_w1,
                          w.shared_w3, w.shared_w2, w.lshared, g.lshared);
    }
    const int64_t p_n = a.xp.dim(0);
    // combine's backward is a gather; the experts; gather's backward is a combine.
    Tensor dyp = Tensor::empty({p_n, d}, DType::F32, kAct);
    gather_rows(dyp, dx_out, a.perm, k);
    Tensor dxp = Tensor::empty({p_n, d}, DType::F32, kAct);
    Tensor drs = Tensor::empty({p_n}, DType::F32, kAct);
    if (a.ep.plan) {
      MOE_CHECK(ep != nullptr, "ffn_block_backward: the forward was expert parallel; pass its EP group");
      MOE_CHECK(per_expert == nullptr, "ffn_block_backward: per-expert gradients under expert parallelism");
      expert_parallel_backward(*ep, c, w, a, dyp, dxp, drs, g);
    } else if (per_expert) {
      MOE_CHECK(!g.w1.defined() && experts_one_at_a_time(w),
                "ffn_block_backward: per-expert gradients need the experts' stacked gradients undefined and no "
                "expert adapters or biases");
      experts_backward_each(c, w, a, dyp, dxp, drs, *per_expert);
    } else {
      ExpertBias gb = expert_bias(g);
      expert_ffn_backward(dxp, g.w1, g.w3, g.w2, drs, dyp, a.xp, a.eh1, a.eh3, a.offsets, w.w1, w.w3, w.w2,
                          a.row_scale, w.lexp, &g.lexp, expert_glu(c), expert_bias(w), &gb);
    }
    dyp = Tensor();
    // Dropped rows (capacity) had no expert: no gradient to their input or routing weight.
    const int64_t kept = kept_rows(a.offsets);
    zero_rows_from(dxp, kept);
    zero_rows_from(drs, kept);
    moe_combine(dh, dxp, a.inv, k, /*accumulate=*/true);
    dxp = Tensor();
    // routing weights -> router logits (+ the balancing losses) -> router weight and input
    Tensor dtw = Tensor::empty(a.topk_w.shape(), DType::F32, kAct);
    permute_weights_backward(dtw, drs, a.perm);
    Tensor dlogits = Tensor::empty(a.router_logits.shape(), DType::F32, kAct);
    router_topk_backward(dlogits, dtw, a.router_logits, a.topk_idx, router_variant(c));
    if (bal.aux_g.defined() || bal.z_scale != 0)
      router_balance_backward(dlogits, a.router_logits, bal.aux_g, bal.aux_scale, bal.z_scale);
    linear_backward(dh, g.router, g.brouter, dlogits, a.ffn_h, w.router, true, {{&w.lrouter, &g.lrouter, 0}});
  }
  rmsnorm_backward(dx_mid, g.ffn_norm, dh, a.x_mid, w.ffn_norm, a.ffn_rstd, false);
  add_inplace(dx_mid, dx_out);
}

}  // namespace moe
