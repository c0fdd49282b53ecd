// cpu_train_moe.cpp — CPU kernels of the MoE block's training ops: router top-k backward, the
// balancing-loss statistics and gradients, the routing-weight scatter, and the grouped SwiGLU
// experts' forward (saving h1/h3) and backward over the experts that received rows.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/backend.h"
#include "ops/cpu/cpu_gemm.h"

namespace moe {
namespace cpu {
namespace {

// Softmax of one row in f64; returns the log-sum-exp.
double softmax_row(const float* l, int64_t e_n, double* p) {
  float mx = -INFINITY;
  for (int64_t e = 0; e < e_n; ++e) mx = std::max(mx, l[e]);
  double sum = 0;
  for (int64_t e = 0; e < e_n; ++e) sum += (p[e] = std::exp(double(l[e]) - mx));
  for (int64_t e = 0; e < e_n; ++e) p[e] /= sum;
  return mx + std::log(sum);
}

constexpr int64_t kPar = 32768;  // elements below which a loop stays serial

}  // namespace

// u = dL/dp (over all E; zero outside the selected set), then dl = p ⊙ (u - <u,p>).
void router_topk_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& logits, const Tensor& topk_idx,
                          bool renorm) {
  const int64_t t_n = logits.dim(0), e_n = logits.dim(1), k = topk_idx.dim(1);
  const float* lg = logits.data<float>();
  const float* gw = dtopk_w.data<float>();
  const int32_t* idx = topk_idx.data<int32_t>();
  float* dl = dlogits.data<float>();
#pragma omp parallel if(t_n * e_n > kPar)
  {
    std::vector<double> p(static_cast<size_t>(e_n)), u(static_cast<size_t>(e_n));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < t_n; ++t) {
      softmax_row(lg + t * e_n, e_n, p.data());
      std::fill(u.begin(), u.end(), 0.0);
      const int32_t* it = idx + t * k;
      const float* g = gw + t * k;
      if (renorm) {
        double s = 0, gw_dot = 0;
        for (int64_t j = 0; j < k; ++j) s += p[it[j]];
        for (int64_t j = 0; j < k; ++j) gw_dot += g[j] * p[it[j]];
        for (int64_t j = 0; j < k; ++j) u[it[j]] += g[j] / s - gw_dot / (s * s);
      } else {
        for (int64_t j = 0; j < k; ++j) u[it[j]] += g[j];
      }
      double up = 0;
      for (int64_t e = 0; e < e_n; ++e) up += u[e] * p[e];
      for (int64_t e = 0; e < e_n; ++e) dl[t * e_n + e] = static_cast<float>(p[e] * (u[e] - up));
    }
  }
}

void router_stats(Tensor& prob_sum, Tensor& count, Tensor& z_sum, const Tensor& logits, const Tensor& topk_idx) {
  const int64_t t_n = logits.dim(0), e_n = logits.dim(1), k = topk_idx.dim(1);
  const float* lg = logits.data<float>();
  const int32_t* idx = topk_idx.data<int32_t>();
  std::vector<double> p(static_cast<size_t>(e_n)), ps(static_cast<size_t>(e_n), 0.0), cnt(static_cast<size_t>(e_n), 0.0);
  double z = 0;
  for (int64_t t = 0; t < t_n; ++t) {
    const double lse = softmax_row(lg + t * e_n, e_n, p.data());
    z += lse * lse;
    for (int64_t e = 0; e < e_n; ++e) ps[e] += p[e];
    for (int64_t j = 0; j < k; ++j) {
      const int32_t e = idx[t * k + j];
      MOE_CHECK(e >= 0 && e < e_n, "router_stats: expert id %d out of range [0,%lld)", e, (long long)e_n);
      cnt[e] += 1;
    }
  }
  for (int64_t e = 0; e < e_n; ++e) {
    prob_sum.data<float>()[e] = static_cast<float>(ps[e]);
    count.data<float>()[e] = static_cast<float>(cnt[e]);
  }
  z_sum.data<float>()[0] = static_cast<float>(z);
}

void router_balance_backward(Tensor& dlogits, const Tensor& logits, const Tensor& g, float aux_scale,
                             float z_scale) {
  const int64_t t_n = logits.dim(0), e_n = logits.dim(1);
  const float* lg = logits.data<float>();
  const float* gv = g.defined() ? g.data<float>() : nullptr;
  float* dl = dlogits.data<float>();
#pragma omp parallel if(t_n * e_n > kPar)
  {
    std::vector<double> p(static_cast<size_t>(e_n));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < t_n; ++t) {
      const double lse = softmax_row(lg + t * e_n, e_n, p.data());
      double gp = 0;
      if (gv)
        for (int64_t e = 0; e < e_n; ++e) gp += gv[e] * p[e];
      for (int64_t e = 0; e < e_n; ++e) {
        double d = 2.0 * z_scale * lse * p[e];
        if (gv) d += aux_scale * p[e] * (gv[e] - gp);
        dl[t * e_n + e] += static_cast<float>(d);
      }
    }
  }
}

void moe_capacity_drop(Tensor& offsets, Tensor& perm, Tensor& inv, int64_t capacity) {
  const int64_t e_n = offsets.numel() - 1, p_n = perm.numel();
  int32_t* off = offsets.data<int32_t>();
  int32_t* pm = perm.data<int32_t>();
  int32_t* iv = inv.data<int32_t>();
  std::vector<int32_t> kept, dropped;
  kept.reserve(static_cast<size_t>(p_n));
  std::vector<int32_t> new_off(static_cast<size_t>(e_n + 1), 0);
  for (int64_t e = 0; e < e_n; ++e) {
    // Rows of an expert are in assignment order (dispatch is stable): the first `capacity` stay.
    for (int32_t p = off[e]; p < off[e + 1]; ++p) (p - off[e] < capacity ? kept : dropped).push_back(pm[p]);
    new_off[e + 1] = static_cast<int32_t>(kept.size());
  }
  std::sort(dropped.begin(), dropped.end());
  std::copy(kept.begin(), kept.end(), pm);
  std::copy(dropped.begin(), dropped.end(), pm + kept.size());
  std::copy(new_off.begin(), new_off.end(), off);
  for (int64_t p = 0; p < p_n; ++p) iv[pm[p]] = static_cast<int32_t>(p);
}

void permute_weights_backward(Tensor& dtopk_w, const Tensor& drow_scale, const Tensor& perm) {
  const int64_t p_n = perm.numel();
  const int32_t* pm = perm.data<int32_t>();
  const float* g = drow_scale.data<float>();
  float* d = dtopk_w.data<float>();
  for (int64_t p = 0; p < p_n; ++p) d[pm[p]] = g[p];
}

namespace {

struct ExpertView {
  const char* w1;
  const char* w3;
  const char* w2;
};

ExpertView expert_view(const Tensor& w1, const Tensor& w3, const Tensor& w2, int64_t e) {
  const int64_t f = w1.dim(1), d = w1.dim(2);
  const size_t es = dtype_size(w1.dtype());
  return {static_cast<const char*>(w1.raw()) + static_cast<size_t>(e * f * d) * es,
          static_cast<const char*>(w3.raw()) + static_cast<size_t>(e * f * d) * es,
          static_cast<const char*>(w2.raw()) + static_cast<size_t>(e * d * f) * es};
}

inline float sigmoid(float a) { return 1.0f / (1.0f + std::exp(-a)); }

int64_t max_rows(const int32_t* off, int64_t e_n) {
  int64_t m = 0;
  for (int64_t e = 0; e < e_n; ++e) m = std::max<int64_t>(m, off[e + 1] - off[e]);
  return m;
}

}  // namespace

void expert_ffn_forward_train(Tensor& yp, Tensor& h1, Tensor& h3, const Tensor& xp, const Tensor& offsets,
                              const Tensor& w1, const Tensor& w3, const Tensor& w2, const Tensor& row_scale) {
  const int64_t e_n = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  const int32_t* off = offsets.data<int32_t>();
  const float* rs = row_scale.defined() ? row_scale.data<float>() : nullptr;
  Tensor act = Tensor::empty({std::max<int64_t>(max_rows(off, e_n), 1), f}, DType::F32, MemCategory::Workspace);
  float* a = act.data<float>();
  for (int64_t e = 0; e < e_n; ++e) {
    const int64_t r0 = off[e], n = off[e + 1] - off[e];
    if (n == 0) continue;
    const ExpertView w = expert_view(w1, w3, w2, e);
    const float* x = xp.data<float>() + r0 * d;
    float* g1 = h1.data<float>() + r0 * f;
    float* g3 = h3.data<float>() + r0 * f;
    gemm_xwt(g1, f, x, w.w1, w1.dtype(), n, f, d, false);
    gemm_xwt(g3, f, x, w.w3, w3.dtype(), n, f, d, false);
#pragma omp parallel for schedule(static) if(n * f > kPar)
    for (int64_t r = 0; r < n; ++r) {
      const float s = rs ? rs[r0 + r] : 1.0f;
      for (int64_t i = 0; i < f; ++i) {
        const float v = g1[r * f + i];
        a[r * f + i] = v * sigmoid(v) * g3[r * f + i] * s;
      }
    }
    gemm_xwt(yp.data<float>() + r0 * d, d, a, w.w2, w2.dtype(), n, d, f, false);
  }
}

void expert_ffn_backward(Tensor& dxp, Tensor& dw1, Tensor& dw3, Tensor& dw2, Tensor& drow_scale, const Tensor& dyp,
                         const Tensor& xp, const Tensor& h1, const Tensor& h3, const Tensor& offsets,
                         const Tensor& w1, const Tensor& w3, const Tensor& w2, const Tensor& row_scale) {
  const int64_t e_n = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  const int32_t* off = offsets.data<int32_t>();
  const float* rs = row_scale.defined() ? row_scale.data<float>() : nullptr;
  const int64_t rows = std::max<int64_t>(max_rows(off, e_n), 1);
  // Scratch: u (then dh1) and du (then dh3), [rows, F] each.
  Tensor s1 = Tensor::empty({rows, f}, DType::F32, MemCategory::Workspace);
  Tensor s2 = Tensor::empty({rows, f}, DType::F32, MemCategory::Workspace);
  float* u = s1.data<float>();
  float* du = s2.data<float>();
  for (int64_t e = 0; e < e_n; ++e) {
    const int64_t r0 = off[e], n = off[e + 1] - off[e];
    if (n == 0) continue;
    const ExpertView w = expert_view(w1, w3, w2, e);
    const float* x = xp.data<float>() + r0 * d;
    const float* g = dyp.data<float>() + r0 * d;
    const float* a1 = h1.data<float>() + r0 * f;
    const float* a3 = h3.data<float>() + r0 * f;
    // u = silu(h1) * h3 * s: the down projection's input, recomputed.
    if (dw2.defined()) {
#pragma omp parallel for schedule(static) if(n * f > kPar)
      for (int64_t r = 0; r < n; ++r) {
        const float s = rs ? rs[r0 + r] : 1.0f;
        for (int64_t i = 0; i < f; ++i) u[r * f + i] = a1[r * f + i] * sigmoid(a1[r * f + i]) * a3[r * f + i] * s;
      }
      gemm_atb_acc(dw2.data<float>() + e * d * f, g, u, n, d, f);
    }
    gemm_xw(du, g, w.w2, w2.dtype(), n, d, f, false);
    float* drs = drow_scale.defined() ? drow_scale.data<float>() + r0 : nullptr;
#pragma omp parallel for schedule(static) if(n * f > kPar)
    for (int64_t r = 0; r < n; ++r) {
      const float s = rs ? rs[r0 + r] : 1.0f;
      double dot = 0;
      for (int64_t i = 0; i < f; ++i) {
        const int64_t at = r * f + i;
        const float v = a1[at], sg = sigmoid(v), silu = v * sg;
        dot += double(du[at]) * silu * a3[at];
        const float da = du[at] * s;
        u[at] = da * a3[at] * sg * (1.0f + v * (1.0f - sg));  // dh1
        du[at] = da * silu;                                    // dh3
      }
      if (drs) drs[r] = static_cast<float>(dot);
    }
    float* dx = dxp.data<float>() + r0 * d;
    gemm_xw(dx, u, w.w1, w1.dtype(), n, f, d, false);
    gemm_xw(dx, du, w.w3, w3.dtype(), n, f, d, true);
    if (dw1.defined()) gemm_atb_acc(dw1.data<float>() + e * f * d, u, x, n, f, d);
    if (dw3.defined()) gemm_atb_acc(dw3.data<float>() + e * f * d, du, x, n, f, d);
  }
}

}  // namespace cpu
}  // namespace moe
