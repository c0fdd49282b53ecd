// cpu_router_variant.cpp — the router variant of DeepSeek-V2/V3 (variants.h RouterVariant) on the
// CPU: softmax or sigmoid scores, a selection bias, group-limited selection, renormalisation
// with its epsilon and the routed scaling factor; and its backward. f32 in and out; each token's
// E scores are small, so they are computed in f64 (as the reference) and one token per thread.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/backend.h"

namespace moe {
namespace cpu {
namespace {

// s [E] = softmax or sigmoid of one token's logits.
void scores_of(double* s, const float* l, int64_t e_n, bool sig) {
  if (sig) {
    for (int64_t e = 0; e < e_n; ++e) s[e] = 1.0 / (1.0 + std::exp(-double(l[e])));
    return;
  }
  double mx = -INFINITY, sum = 0;
  for (int64_t e = 0; e < e_n; ++e) mx = std::max(mx, double(l[e]));
  for (int64_t e = 0; e < e_n; ++e) sum += (s[e] = std::exp(double(l[e]) - mx));
  for (int64_t e = 0; e < e_n; ++e) s[e] /= sum;
}

// Marks the n largest of v [m] in `keep` (ties: the lower index), returning them in order.
void take_largest(const double* v, int64_t m, int64_t n, std::vector<char>& keep, int32_t* out) {
  std::fill(keep.begin(), keep.begin() + m, 0);
  for (int64_t j = 0; j < n; ++j) {
    int64_t best = -1;
    for (int64_t e = 0; e < m; ++e)
      if (!keep[size_t(e)] && (best < 0 || v[e] > v[best])) best = e;
    keep[size_t(best)] = 1;
    if (out) out[j] = static_cast<int32_t>(best);
  }
}

}  // namespace

void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, const RouterVariant& rv,
                         const Tensor& select_bias) {
  const int64_t t_n = logits.dim(0), e_n = logits.dim(1), k = topk_idx.dim(1);
  const int64_t ng = std::max<int64_t>(rv.n_group, 1), gsz = e_n / ng;
  const float* lg = logits.data<float>();
  const float* bias = select_bias.defined() ? select_bias.data<float>() : nullptr;
  int32_t* idx = topk_idx.data<int32_t>();
  float* wt = topk_w.data<float>();
#pragma omp parallel if(t_n * e_n > 32768)
  {
    std::vector<double> s(static_cast<size_t>(e_n)), u(static_cast<size_t>(e_n)), gs(static_cast<size_t>(ng));
    std::vector<char> keep(static_cast<size_t>(std::max(e_n, ng)));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < t_n; ++t) {
      scores_of(s.data(), lg + t * e_n, e_n, rv.sigmoid);
      for (int64_t e = 0; e < e_n; ++e) u[size_t(e)] = s[size_t(e)] + (bias ? double(bias[e]) : 0.0);
      if (ng > 1) {
        for (int64_t g = 0; g < ng; ++g) {
          double m1 = -INFINITY, m2 = -INFINITY;
          for (int64_t e = g * gsz; e < (g + 1) * gsz; ++e) {
            const double v = u[size_t(e)];
            if (v > m1) {
              m2 = m1;
              m1 = v;
            } else if (v > m2) {
              m2 = v;
            }
          }
          gs[size_t(g)] = rv.group_top2 ? m1 + m2 : m1;
        }
        take_largest(gs.data(), ng, rv.topk_group, keep, nullptr);
        // HF masks the dropped groups with 0.0 (not -inf); kept as it does.
        for (int64_t e = 0; e < e_n; ++e)
          if (!keep[size_t(e / gsz)]) u[size_t(e)] = 0.0;
      }
      int32_t* ix = idx + t * k;
      take_largest(u.data(), e_n, k, keep, ix);
      double sum = rv.renorm_eps;
      for (int64_t j = 0; j < k; ++j) sum += s[size_t(ix[j])];
      for (int64_t j = 0; j < k; ++j) {
        const double w = rv.renorm ? s[size_t(ix[j])] / sum : s[size_t(ix[j])];
        wt[t * k + j] = static_cast<float>(w * rv.scale);
      }
    }
  }
}

void router_topk_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& logits, const Tensor& topk_idx,
                          const RouterVariant& rv) {
  const int64_t t_n = logits.dim(0), e_n = logits.dim(1), k = topk_idx.dim(1);
  const float* lg = logits.data<float>();
  const float* gw = dtopk_w.data<float>();
  const int32_t* idx = topk_idx.data<int32_t>();
  float* dl = dlogits.data<float>();
#pragma omp parallel if(t_n * e_n > 32768)
  {
    std::vector<double> s(static_cast<size_t>(e_n)), ds(static_cast<size_t>(e_n));
#pragma omp for schedule(static)
    for (int64_t t = 0; t < t_n; ++t) {
      scores_of(s.data(), lg + t * e_n, e_n, rv.sigmoid);
      std::fill(ds.begin(), ds.end(), 0.0);
      const int32_t* ix = idx + t * k;
      const float* g = gw + t * k;
      if (!rv.renorm) {
        for (int64_t j = 0; j < k; ++j) ds[size_t(ix[j])] += rv.scale * double(g[j]);
      } else {
        double sum = rv.renorm_eps, gp = 0;
        for (int64_t j = 0; j < k; ++j) {
          sum += s[size_t(ix[j])];
          gp += double(g[j]) * s[size_t(ix[j])];
        }
        for (int64_t m = 0; m < k; ++m) ds[size_t(ix[m])] += rv.scale * (double(g[m]) / sum - gp / (sum * sum));
      }
      float* d = dl + t * e_n;
      if (rv.sigmoid) {
        for (int64_t e = 0; e < e_n; ++e) d[e] = static_cast<float>(ds[size_t(e)] * s[size_t(e)] * (1.0 - s[size_t(e)]));
      } else {
        double c = 0;
        for (int64_t e = 0; e < e_n; ++e) c += ds[size_t(e)] * s[size_t(e)];
        for (int64_t e = 0; e < e_n; ++e) d[e] = static_cast<float>(s[size_t(e)] * (ds[size_t(e)] - c));
      }
    }
  }
}

}  // namespace cpu
}  // namespace moe
