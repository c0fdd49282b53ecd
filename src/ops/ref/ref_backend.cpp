// ref_backend.cpp — moe::ref, the naive reference backend (backend.h): every forward and
// backward op of ops.h, for `moe --reference` and the op test runner.
//
// Each op widens its float inputs to double (exactly: f32, bf16, f16 and f64 all convert
// without rounding), runs the plain-loop kernel of ref_kernels.h, and rounds each output once
// into its tensor's dtype. The double copies are workspace tensors from the tracked allocator.
// Outputs that the op accumulates into (+=) are read first, so accumulation happens in double.
// Inputs are fully copied before any output is written, so aliasing (rmsnorm out = x,
// cross-entropy dlogits = logits, in-place rope) needs no special case.
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "ops/backend.h"
#include "ops/ref/ref_kernels.h"

namespace moe {
namespace ref {
namespace {

double load_one(const void* base, DType dt, int64_t i) {
  switch (dt) {
    case DType::F32: return static_cast<const float*>(base)[i];
    case DType::BF16: return bf16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::F16: return f16_to_f32(static_cast<const uint16_t*>(base)[i]);
    case DType::F64: return static_cast<const double*>(base)[i];
    default: MOE_FAIL("reference backend: expected a float tensor, got %s", dtype_name(dt));
  }
}

void store_one(void* base, DType dt, int64_t i, double v) {
  switch (dt) {
    case DType::F32: static_cast<float*>(base)[i] = static_cast<float>(v); return;
    case DType::BF16: static_cast<uint16_t*>(base)[i] = f32_to_bf16(static_cast<float>(v)); return;
    case DType::F16: static_cast<uint16_t*>(base)[i] = f32_to_f16(static_cast<float>(v)); return;
    case DType::F64: static_cast<double*>(base)[i] = v; return;
    default: MOE_FAIL("reference backend: expected a float tensor, got %s", dtype_name(dt));
  }
}

void require_cpu(const Tensor& t) {
  MOE_CHECK(!t.defined() || t.device() == Device::CPU, "reference backend: tensor %s is not on the CPU",
            t.desc().c_str());
}

// A double (f64) copy of a float tensor, or an empty holder for an undefined one.
class Wide {
 public:
  explicit Wide(const Tensor& t) {
    require_cpu(t);
    if (!t.defined()) return;
    buf_ = Tensor::empty(t.shape(), DType::F64, MemCategory::Workspace);
    double* d = buf_.data<double>();
    if (dtype_is_block(t.dtype())) {
      // A quantized weight: its blocks dequantized exactly as defined (core/quant.h), so the
      // reference product is the exact one with the dequantized values.
      Tensor f = t.to_dtype(DType::F32, MemCategory::Workspace);
      for (int64_t i = 0; i < t.numel(); ++i) d[i] = f.data<float>()[i];
      return;
    }
    for (int64_t i = 0; i < t.numel(); ++i) d[i] = load_one(t.raw(), t.dtype(), i);
  }
  // A double buffer of n elements, all NaN: an element the kernel fails to write shows.
  static Wide scratch(int64_t n) {
    Wide w;
    w.buf_ = Tensor::empty({n}, DType::F64, MemCategory::Workspace);
    double* d = w.buf_.data<double>();
    for (int64_t i = 0; i < n; ++i) d[i] = std::numeric_limits<double>::quiet_NaN();
    return w;
  }
  // nullptr when the source was undefined.
  double* p() const { return buf_.defined() ? buf_.data<double>() : nullptr; }
  // Rounds the values into `out` (same element count); no-op for an undefined `out`.
  void store(Tensor& out) const {
    if (!out.defined()) return;
    require_cpu(out);
    MOE_ASSERT(out.numel() == buf_.numel());
    const double* d = buf_.data<double>();
    for (int64_t i = 0; i < out.numel(); ++i) store_one(out.raw(), out.dtype(), i, d[i]);
  }

 private:
  Wide() = default;
  Tensor buf_;
};

Wide out_buf(const Tensor& t) { return Wide::scratch(t.numel()); }

const int32_t* ints(const Tensor& t) {
  require_cpu(t);
  MOE_CHECK(t.dtype() == DType::I32, "reference backend: index tensor must be i32, got %s", dtype_name(t.dtype()));
  return t.data<int32_t>();
}
int32_t* ints_out(Tensor& t) { return const_cast<int32_t*>(ints(t)); }

}  // namespace

// ---- forward ----

void embedding_forward(Tensor& out, const Tensor& ids, const Tensor& table) {
  Wide tb(table), o = out_buf(out);
  f64::embedding_forward(o.p(), ints(ids), tb.p(), ids.numel(), table.dim(0), table.dim(1));
  o.store(out);
}

void rmsnorm_forward(Tensor& out, const Tensor& x, const Tensor& w, float eps) {
  Wide xx(x), ww(w);
  const int64_t d = x.dim(-1);
  f64::rmsnorm_forward(xx.p(), nullptr, xx.p(), ww.p(), eps, x.numel() / d, d);
  xx.store(out);
}

void linear_forward(Tensor& out, const Tensor& x, const Tensor& w, const Tensor& bias) {
  Wide xx(x), ww(w), bb(bias), o = out_buf(out);
  const int64_t m = w.dim(0), kd = w.dim(1);
  f64::linear_forward(o.p(), xx.p(), ww.p(), bb.p(), x.numel() / kd, m, kd);
  o.store(out);
}

void linear_forward_cat(Tensor& out, const Tensor& x, std::initializer_list<LinearPart> parts) {
  const int64_t n = x.numel() / x.dim(-1);
  int64_t col = 0;
  for (const LinearPart& p : parts) {
    const int64_t m = p.w->dim(0);
    Tensor part = Tensor::empty({n, m}, out.dtype(), MemCategory::Activations);
    linear_forward(part, x, *p.w, p.bias ? *p.bias : Tensor());
    copy_columns(out, col, part, 0, m);
    col += m;
  }
}

void rope_forward(Tensor& x, int64_t past, float theta) {
  Wide xx(x);
  f64::rope_forward(xx.p(), x.dim(0), x.dim(1), x.dim(2), x.dim(3), past, theta);
  xx.store(x);
}

void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, int64_t past) {
  require_cpu(k_cache);
  require_cpu(v_cache);
  require_cpu(k);
  require_cpu(v);
  // Element copies, one (b, s) row of Hkv*Dh values at a time; the dtypes match (validated).
  const int64_t b_n = k.dim(0), s_n = k.dim(1), row = k.dim(2) * k.dim(3), cap = k_cache.dim(1);
  const size_t es = dtype_size(k.dtype());
  for (int64_t b = 0; b < b_n; ++b)
    for (int64_t s = 0; s < s_n; ++s) {
      const size_t dst = static_cast<size_t>((b * cap + past + s) * row) * es;
      const size_t src = static_cast<size_t>((b * s_n + s) * row) * es;
      std::memcpy(static_cast<char*>(k_cache.raw()) + dst, static_cast<const char*>(k.raw()) + src, row * es);
      std::memcpy(static_cast<char*>(v_cache.raw()) + dst, static_cast<const char*>(v.raw()) + src, row * es);
    }
}

void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past) {
  Wide qq(q), kc(k_cache), vc(v_cache), o = out_buf(out);
  f64::attention_forward(o.p(), qq.p(), kc.p(), vc.p(), q.dim(0), q.dim(1), q.dim(2), k_cache.dim(2), q.dim(3),
                         k_cache.dim(1), past);
  o.store(out);
}

// The paged ops, plainly: each row's pages are copied out to (or in from) a contiguous
// [1,C,Hkv,Dh] cache and the per-slot ops above do the rest.
namespace {
int64_t page_offset(const Tensor& pages, const Tensor& tables, int64_t b, int64_t p) {
  const int64_t block = pages.dim(1), row = pages.dim(2) * pages.dim(3);
  return (int64_t(tables.data<int32_t>()[b * tables.dim(1) + p / block]) * block + p % block) * row;
}
}  // namespace

void kv_append_paged(Tensor& k_pages, Tensor& v_pages, const Tensor& k, const Tensor& v, const Tensor& tables,
                     const Tensor& pos) {
  const int64_t row = k.dim(2) * k.dim(3), es = int64_t(dtype_size(k.dtype()));
  for (int64_t b = 0; b < k.dim(0); ++b)
    for (int64_t s = 0; s < k.dim(1); ++s) {
      const int64_t p = pos.data<int32_t>()[b] + s, src = (b * k.dim(1) + s) * row;
      for (int64_t i = 0; i < row * es; ++i) {
        static_cast<char*>(k_pages.raw())[page_offset(k_pages, tables, b, p) * es + i] =
            static_cast<const char*>(k.raw())[src * es + i];
        static_cast<char*>(v_pages.raw())[page_offset(v_pages, tables, b, p) * es + i] =
            static_cast<const char*>(v.raw())[src * es + i];
      }
    }
}

void attention_forward_paged(Tensor& out, const Tensor& q, const Tensor& k_pages, const Tensor& v_pages,
                             const Tensor& tables, const Tensor& pos, const AttnVariant& av) {
  const int64_t s_n = q.dim(1), hkv = k_pages.dim(2), dh = k_pages.dim(3), row = hkv * dh;
  for (int64_t b = 0; b < q.dim(0); ++b) {
    const int64_t past = pos.data<int32_t>()[b], n = past + s_n;
    Tensor kc = Tensor::empty({1, n, hkv, dh}, DType::F32, MemCategory::Workspace);
    Tensor vc = Tensor::empty({1, n, hkv, dh}, DType::F32, MemCategory::Workspace);
    for (int64_t p = 0; p < n; ++p)
      for (int64_t i = 0; i < row; ++i) {
        kc.data<float>()[p * row + i] = k_pages.data<float>()[page_offset(k_pages, tables, b, p) + i];
        vc.data<float>()[p * row + i] = v_pages.data<float>()[page_offset(v_pages, tables, b, p) + i];
      }
    Tensor ob = out.rows(b, b + 1);
    attention_forward(ob, q.rows(b, b + 1), kc, vc, past, av);
  }
}

void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, bool renorm,
                         const Tensor& select_bias) {
  Wide l(logits), w = out_buf(topk_w), b(select_bias);
  f64::router_topk_forward(ints_out(topk_idx), w.p(), l.p(), select_bias.defined() ? b.p() : nullptr,
                           logits.dim(0), logits.dim(1), topk_idx.dim(1), renorm);
  w.store(topk_w);
}

void moe_dispatch(Tensor& offsets, Tensor& perm, Tensor& inv, const Tensor& topk_idx, int64_t n_expert) {
  f64::moe_dispatch(ints_out(offsets), ints_out(perm), ints_out(inv), ints(topk_idx), topk_idx.numel(), n_expert);
}

void gather_rows(Tensor& xp, const Tensor& x, const Tensor& perm, int64_t k) {
  Wide xx(x), o = out_buf(xp);
  f64::gather_rows(o.p(), xx.p(), ints(perm), perm.numel(), x.dim(1), k);
  o.store(xp);
}

void expert_ffn_forward(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1, const Tensor& w3,
                        const Tensor& w2, const Tensor& row_scale) {
  Wide x(xp), a(w1), c(w3), b(w2), rs(row_scale);
  // Rows outside every expert's range are not written by the op; keep what yp holds there.
  Wide o(yp);
  f64::expert_ffn_forward(o.p(), nullptr, nullptr, x.p(), ints(offsets), a.p(), c.p(), b.p(), rs.p(), w1.dim(0),
                          w1.dim(1), w1.dim(2));
  o.store(yp);
}

namespace {
// f64 views of the op variants (variants.h); the Wide holders keep the copies alive.
struct WideAttn {
  Wide sinks;
  f64::AttnF64 av;
  explicit WideAttn(const AttnVariant& v) : sinks(v.sinks) { av = {sinks.p(), v.window, double(v.scale)}; }
};
struct WideBias {
  Wide b1, b3, b2, db1, db3, db2;
  f64::BiasF64 bias;
  WideBias(const ExpertBias& b, const ExpertBias* g)
      : b1(b.b1), b3(b.b3), b2(b.b2), db1(g ? g->b1 : Tensor()), db3(g ? g->b3 : Tensor()), db2(g ? g->b2 : Tensor()) {
    bias = {b1.p(), b3.p(), b2.p(), db1.p(), db3.p(), db2.p()};
  }
  void store(ExpertBias* g) const {
    if (!g) return;
    db1.store(g->b1);
    db3.store(g->b3);
    db2.store(g->b2);
  }
};
f64::GluF64 glu_f64(const ExpertGlu& g) { return {g.alpha, g.limit}; }

void rope_table(Tensor& x, int64_t past, const RopeTable& rt, double sign) {
  std::vector<double> freq = rt.inv_freq;
  const int64_t half = x.dim(3) / 2;
  if (freq.empty())
    for (int64_t i = 0; i < half; ++i) freq.push_back(std::pow(double(rt.theta), -double(2 * i) / double(x.dim(3))));
  Wide xx(x);
  f64::rope_rotate_table(xx.p(), x.dim(0), x.dim(1), x.dim(2), x.dim(3), past, freq.data(), rt.attention_factor, sign,
                         rt.interleaved);
  xx.store(x);
}
}  // namespace

void rope_forward(Tensor& x, int64_t past, const RopeTable& rt) { rope_table(x, past, rt, 1.0); }
void rope_backward(Tensor& dx, int64_t past, const RopeTable& rt) { rope_table(dx, past, rt, -1.0); }

void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past,
                       const AttnVariant& av) {
  Wide qq(q), kc(k_cache), vc(v_cache), o = out_buf(out);
  WideAttn wa(av);
  f64::attention_forward(o.p(), qq.p(), kc.p(), vc.p(), q.dim(0), q.dim(1), q.dim(2), k_cache.dim(2), q.dim(3),
                         k_cache.dim(1), past, wa.av);
  o.store(out);
}

void expert_ffn_forward(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1, const Tensor& w3,
                        const Tensor& w2, const Tensor& row_scale, const ExpertGlu& glu, const ExpertBias& bias) {
  Wide x(xp), a(w1), c(w3), b(w2), rs(row_scale);
  Wide o(yp);
  WideBias wb(bias, nullptr);
  f64::expert_ffn_forward(o.p(), nullptr, nullptr, x.p(), ints(offsets), a.p(), c.p(), b.p(), rs.p(), w1.dim(0),
                          w1.dim(1), w1.dim(2), nullptr, glu_f64(glu), wb.bias);
  o.store(yp);
}

void moe_combine(Tensor& y, const Tensor& yp, const Tensor& inv, int64_t k, bool accumulate) {
  Wide yy(y), pp(yp);
  f64::moe_combine(yy.p(), pp.p(), ints(inv), y.dim(0), y.dim(1), k, accumulate);
  yy.store(y);
}

void permute_weights(Tensor& row_scale, const Tensor& topk_w, const Tensor& perm) {
  Wide w(topk_w), o = out_buf(row_scale);
  f64::permute_weights(o.p(), w.p(), ints(perm), perm.numel());
  o.store(row_scale);
}

void swiglu_forward(Tensor& out, const Tensor& h1, const Tensor& h3) {
  Wide a(h1), b(h3), o = out_buf(out);
  f64::swiglu_forward(o.p(), a.p(), b.p(), out.numel());
  o.store(out);
}

void sigmoid_gate_add(Tensor& y, const Tensor& s, const Tensor& gate) {
  Wide yy(y), ss(s), g(gate);
  const int64_t t_n = y.dim(0);
  f64::sigmoid_gate_add(yy.p(), ss.p(), g.p(), t_n, y.numel() / t_n);
  yy.store(y);
}

void add_inplace(Tensor& y, const Tensor& x) {
  Wide yy(y), xx(x);
  f64::add_inplace(yy.p(), xx.p(), y.numel());
  yy.store(y);
}

void copy_columns(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col, int64_t ncols) {
  require_cpu(dst);
  require_cpu(src);
  // Element by element (same dtype, validated): dst[r, dst_col + c] = src[r, src_col + c].
  const size_t es = dtype_size(dst.dtype());
  for (int64_t r = 0; r < dst.dim(0); ++r)
    for (int64_t c = 0; c < ncols; ++c)
      std::memcpy(static_cast<char*>(dst.raw()) + static_cast<size_t>(r * dst.dim(1) + dst_col + c) * es,
                  static_cast<const char*>(src.raw()) + static_cast<size_t>(r * src.dim(1) + src_col + c) * es, es);
}

void cast(Tensor& out, const Tensor& in) { Wide(in).store(out); }

// out is the first half of x's bytes: x is read whole before out is written.
void cast_bf16_in_place(Tensor& out, const Tensor& x) { Wide(x).store(out); }

// ---- training ----

void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids, int64_t padding_idx) {
  Wide dt(dtable), go(dout);
  f64::embedding_backward(dt.p(), go.p(), ints(ids), padding_idx, ids.numel(), dtable.dim(0), dtable.dim(1));
  dt.store(dtable);
}

void rmsnorm_forward_train(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w, float eps) {
  Wide xx(x), ww(w), o = out_buf(out), r = out_buf(rstd);
  const int64_t d = x.dim(-1);
  f64::rmsnorm_forward(o.p(), r.p(), xx.p(), ww.p(), eps, x.numel() / d, d);
  o.store(out);
  r.store(rstd);
}

void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                      const Tensor& rstd, bool accumulate) {
  Wide gx = accumulate ? Wide(dx) : out_buf(dx);
  Wide gw(dw), gy(dy), xx(x), ww(w), r(rstd);
  const int64_t d = x.dim(-1);
  f64::rmsnorm_backward(gx.p(), gw.p(), gy.p(), xx.p(), ww.p(), r.p(), accumulate, x.numel() / d, d);
  gx.store(dx);
  gw.store(dw);
}

void linear_backward(Tensor& dx, Tensor& dw, Tensor& db, const Tensor& dy, const Tensor& x, const Tensor& w,
                     bool accumulate, bool assign_dw) {
  const int64_t m = w.dim(0), kd = w.dim(1), n = dy.numel() / m;
  Wide gx = !dx.defined() ? Wide(Tensor()) : accumulate ? Wide(dx) : out_buf(dx);
  Wide gw(dw), gb(db), gy(dy), ww(w);
  if (assign_dw && gw.p()) std::fill(gw.p(), gw.p() + dw.numel(), 0.0);  // the kernel's sums are then the values
  Wide xx(dw.defined() ? x : Tensor());  // x is only read (and only validated) when dw is wanted
  f64::linear_backward(gx.p(), gw.p(), gb.p(), gy.p(), xx.p(), ww.p(), accumulate, n, m, kd);
  gx.store(dx);
  gw.store(dw);
  gb.store(db);
}

void rope_backward(Tensor& dx, int64_t past, float theta) {
  Wide g(dx);
  f64::rope_backward(g.p(), dx.dim(0), dx.dim(1), dx.dim(2), dx.dim(3), past, theta);
  g.store(dx);
}

void attention_forward_train(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                             const AttnVariant& av) {
  Wide qq(q), kk(k), vv(v), o = out_buf(out), l = out_buf(lse);
  WideAttn wa(av);
  f64::attention_forward_train(o.p(), l.p(), qq.p(), kk.p(), vv.p(), q.dim(0), q.dim(1), q.dim(2), k.dim(2),
                               q.dim(3), wa.av);
  o.store(out);
  l.store(lse);
}

void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& out, const Tensor& lse, const AttnVariant& av,
                        Tensor* dsinks) {
  Wide gq = out_buf(dq), gk = out_buf(dk), gv = out_buf(dv);
  Wide go(dout), qq(q), kk(k), vv(v), oo(out), l(lse);
  WideAttn wa(av);
  Wide gs(dsinks ? *dsinks : Tensor());
  f64::attention_backward(gq.p(), gk.p(), gv.p(), go.p(), qq.p(), kk.p(), vv.p(), oo.p(), l.p(), q.dim(0), q.dim(1),
                          q.dim(2), k.dim(2), q.dim(3), wa.av, gs.p());
  if (dsinks) gs.store(*dsinks);
  gq.store(dq);
  gk.store(dk);
  gv.store(dv);
}

void router_topk_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& logits, const Tensor& topk_idx,
                          bool renorm) {
  Wide g = out_buf(dlogits), gw(dtopk_w), l(logits);
  f64::router_topk_backward(g.p(), gw.p(), l.p(), ints(topk_idx), logits.dim(0), logits.dim(1), topk_idx.dim(1),
                            renorm);
  g.store(dlogits);
}

void router_stats(Tensor& prob_sum, Tensor& count, Tensor& z_sum, const Tensor& logits, const Tensor& topk_idx) {
  Wide l(logits), ps = out_buf(prob_sum), c = out_buf(count), z = out_buf(z_sum);
  f64::router_stats(ps.p(), c.p(), z.p(), l.p(), ints(topk_idx), logits.dim(0), logits.dim(1), topk_idx.dim(1));
  ps.store(prob_sum);
  c.store(count);
  z.store(z_sum);
}

void router_balance_backward(Tensor& dlogits, const Tensor& logits, const Tensor& g, float aux_scale,
                             float z_scale) {
  Wide dl(dlogits), l(logits), gg(g);
  f64::router_balance_backward(dl.p(), l.p(), gg.p(), aux_scale, z_scale, logits.dim(0), logits.dim(1));
  dl.store(dlogits);
}

void moe_capacity_drop(Tensor& offsets, Tensor& perm, Tensor& inv, int64_t capacity) {
  f64::moe_capacity_drop(ints_out(offsets), ints_out(perm), ints_out(inv), perm.numel(), offsets.numel() - 1,
                         capacity);
}

void permute_weights_backward(Tensor& dtopk_w, const Tensor& drow_scale, const Tensor& perm) {
  Wide g = out_buf(dtopk_w), dr(drow_scale);
  f64::permute_weights_backward(g.p(), dr.p(), ints(perm), perm.numel());
  g.store(dtopk_w);
}

namespace {
// Double copies of one adapter (and its gradients) for the f64 kernels; stored back by store().
struct WideLora {
  Wide a, b, da, db;
  f64::LoraF64 l;
  WideLora(const Lora& w, const Lora* g, bool stacked)
      : a(w.a), b(w.b), da(g ? g->a : Tensor()), db(g ? g->b : Tensor()) {
    if (!w.on()) return;
    l = {a.p(), b.p(), w.scale, w.a.dim(stacked ? 1 : 0), da.p(), db.p(), w.dropout, w.seed, 0};
  }
  void store(Lora* g) const {
    if (!g) return;
    da.store(g->a);
    db.store(g->b);
  }
};
}  // namespace

void lora_forward(Tensor& out, int64_t col0, const Tensor& x, const Lora& l) {
  Wide o(out), xx(x);
  WideLora w(l, nullptr, false);
  f64::lora_forward(o.p(), out.dim(1), col0, xx.p(), w.l, x.dim(0), l.b.dim(0), x.dim(1));
  o.store(out);
}

void lora_backward(Tensor& dx, Tensor& da, Tensor& db, const Tensor& dy, int64_t col0, const Tensor& x,
                   const Lora& l) {
  Wide gx(dx), gy(dy), xx(x);
  Lora g{da, db, 0};
  WideLora w(l, &g, false);
  f64::lora_backward(gx.p(), gy.p(), dy.dim(1), col0, xx.p(), w.l, x.dim(0), l.b.dim(0), x.dim(1));
  gx.store(dx);
  w.store(&g);
}

void expert_ffn_forward_train(Tensor& yp, Tensor& h1, Tensor& h3, const Tensor& xp, const Tensor& offsets,
                              const Tensor& w1, const Tensor& w3, const Tensor& w2, const Tensor& row_scale,
                              const ExpertLora& lora, const ExpertGlu& glu, const ExpertBias& bias) {
  Wide x(xp), a(w1), c(w3), b(w2), rs(row_scale);
  Wide o(yp), g1(h1), g3(h3);  // rows outside every expert keep their values (not written)
  WideLora l1(lora.w1, nullptr, true), l3(lora.w3, nullptr, true), l2(lora.w2, nullptr, true);
  const f64::LoraF64 ls[3] = {l1.l, l3.l, l2.l};
  WideBias wb(bias, nullptr);
  f64::expert_ffn_forward(o.p(), g1.p(), g3.p(), x.p(), ints(offsets), a.p(), c.p(), b.p(), rs.p(), w1.dim(0),
                          w1.dim(1), w1.dim(2), ls, glu_f64(glu), wb.bias, h1.dtype() == DType::BF16);
  o.store(yp);
  g1.store(h1);
  g3.store(h3);
}

void expert_ffn_backward(Tensor& dxp, Tensor& dw1, Tensor& dw3, Tensor& dw2, Tensor& drow_scale, const Tensor& dyp,
                         const Tensor& xp, const Tensor& h1, const Tensor& h3, const Tensor& offsets,
                         const Tensor& w1, const Tensor& w3, const Tensor& w2, const Tensor& row_scale,
                         const ExpertLora& lora, ExpertLora* dlora, const ExpertGlu& glu, const ExpertBias& bias,
                         ExpertBias* dbias, bool assign_dw) {
  Wide gx(dxp), g1(dw1), g3(dw3), g2(dw2), gr(drow_scale);  // rows/experts not touched keep their values
  if (assign_dw) {  // the experts with rows start from zero: the kernel's sums are then the values
    const int32_t* off = ints(offsets);
    const int64_t per = w1.dim(1) * w1.dim(2);
    for (int64_t e = 0; e < w1.dim(0); ++e)
      if (off[e + 1] > off[e])
        for (Wide* g : {&g1, &g3, &g2})
          if (g->p()) std::fill(g->p() + e * per, g->p() + (e + 1) * per, 0.0);
  }
  Wide gy(dyp), x(xp), a1(h1), a3(h3), a(w1), c(w3), b(w2), rs(row_scale);
  WideLora l1(lora.w1, dlora ? &dlora->w1 : nullptr, true), l3(lora.w3, dlora ? &dlora->w3 : nullptr, true);
  WideLora l2(lora.w2, dlora ? &dlora->w2 : nullptr, true);
  f64::LoraF64 ls[3] = {l1.l, l3.l, l2.l};
  // Gate and up sharing one A (fused experts, train/lora_fused.h): one f64 gradient for both.
  const bool shared_da = dlora && dlora->w1.a.defined() && dlora->w1.a.raw() == dlora->w3.a.raw();
  if (shared_da) ls[1].da = ls[0].da;
  WideBias wb(bias, dbias);
  f64::expert_ffn_backward(gx.p(), g1.p(), g3.p(), g2.p(), gr.p(), gy.p(), x.p(), a1.p(), a3.p(), ints(offsets),
                           a.p(), c.p(), b.p(), rs.p(), w1.dim(0), w1.dim(1), w1.dim(2), ls, glu_f64(glu), wb.bias);
  wb.store(dbias);
  if (dlora) l1.store(&dlora->w1);
  if (dlora && shared_da) l3.db.store(dlora->w3.b);
  if (dlora && !shared_da) l3.store(&dlora->w3);
  if (dlora) l2.store(&dlora->w2);
  gx.store(dxp);
  g1.store(dw1);
  g3.store(dw3);
  g2.store(dw2);
  gr.store(drow_scale);
}

void swiglu_backward(Tensor& dh1, Tensor& dh3, const Tensor& dout, const Tensor& h1, const Tensor& h3) {
  Wide g1 = out_buf(dh1), g3 = out_buf(dh3), go(dout), a(h1), b(h3);
  f64::swiglu_backward(g1.p(), g3.p(), go.p(), a.p(), b.p(), h1.numel());
  g1.store(dh1);
  g3.store(dh3);
}

void sigmoid_gate_backward(Tensor& ds, Tensor& dgate, const Tensor& dy, const Tensor& s, const Tensor& gate) {
  Wide gs = out_buf(ds), gg = out_buf(dgate), gy(dy), ss(s), g(gate);
  f64::sigmoid_gate_backward(gs.p(), gg.p(), gy.p(), ss.p(), g.p(), dy.dim(0), dy.dim(1));
  gs.store(ds);
  gg.store(dgate);
}

void cross_entropy_forward(Tensor& loss, const Tensor& logits, const Tensor& targets) {
  Wide l(logits), o = out_buf(loss);
  f64::cross_entropy_forward(o.p(), l.p(), ints(targets), logits.dim(0), logits.dim(1));
  o.store(loss);
}

void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& targets, float scale) {
  Wide l(logits), g = out_buf(dlogits);
  f64::cross_entropy_backward(g.p(), l.p(), ints(targets), scale, logits.dim(0), logits.dim(1));
  g.store(dlogits);
}

void cross_entropy_forward_backward(Tensor& loss, Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                    float scale) {
  Wide l(logits), o = out_buf(loss), g = out_buf(dlogits);
  f64::cross_entropy_forward(o.p(), l.p(), ints(targets), logits.dim(0), logits.dim(1));
  f64::cross_entropy_backward(g.p(), l.p(), ints(targets), scale, logits.dim(0), logits.dim(1));
  o.store(loss);
  g.store(dlogits);
}

namespace {
f64::RouterF64 router_f64(const RouterVariant& rv) {
  return {rv.sigmoid, rv.renorm, rv.renorm_eps, rv.n_group, rv.topk_group, rv.group_top2, rv.scale};
}
}  // namespace

void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, const RouterVariant& rv,
                         const Tensor& select_bias) {
  Wide l(logits), w = out_buf(topk_w), b(select_bias);
  f64::router_topk_variant(ints_out(topk_idx), w.p(), l.p(), select_bias.defined() ? b.p() : nullptr, logits.dim(0),
                           logits.dim(1), topk_idx.dim(1), router_f64(rv));
  w.store(topk_w);
}

void router_topk_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& logits, const Tensor& topk_idx,
                          const RouterVariant& rv) {
  Wide g = out_buf(dlogits), gw(dtopk_w), l(logits);
  f64::router_topk_variant_backward(g.p(), gw.p(), l.p(), ints(topk_idx), logits.dim(0), logits.dim(1),
                                    topk_idx.dim(1), router_f64(rv));
  g.store(dlogits);
}

void mla_absorb_q(Tensor& qc, const Tensor& q, const Tensor& kv_b, int64_t dn, int64_t dv) {
  Wide o(qc), qq(q), w(kv_b);  // o starts as qc: columns past R keep their values
  f64::mla_absorb_q(o.p(), qq.p(), w.p(), q.dim(0), q.dim(1), q.dim(2), qc.dim(2), dn, dv, kv_b.dim(1));
  o.store(qc);
}

void mla_absorb_out(Tensor& o, const Tensor& oc, const Tensor& kv_b, int64_t dn, int64_t dv) {
  Wide out = out_buf(o), c(oc), w(kv_b);
  f64::mla_absorb_out(out.p(), c.p(), w.p(), oc.dim(0), oc.dim(1), oc.dim(2), dn, dv, kv_b.dim(1));
  out.store(o);
}

}  // namespace ref
}  // namespace moe
