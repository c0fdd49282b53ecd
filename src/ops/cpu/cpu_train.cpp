// cpu_train.cpp — CPU kernels of the training ops that are row-wise or elementwise: embedding
// and RMSNorm backward, linear backward (BLAS), SwiGLU and sigmoid-gate backward, and the
// cross-entropy of the chunked LM head. f32 activations and gradients.
#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/backend.h"
#include "ops/cpu/cpu_gemm.h"
#include "ops/cpu/cpu_dot_f64.h"
#include "ops/cpu/cpu_simd_exp.h"

namespace moe {
namespace cpu {

void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids, int64_t padding_idx) {
  const int64_t t_n = ids.numel(), d = dtable.dim(1), v = dtable.dim(0);
  const int32_t* id = ids.data<int32_t>();
  const float* g = dout.data<float>();
  float* dt = dtable.data<float>();
  // Serial over tokens: repeated ids would race; the work is T*D adds.
  for (int64_t t = 0; t < t_n; ++t) {
    MOE_CHECK(id[t] >= 0 && id[t] < v, "embedding_backward: token id %d out of range [0,%lld)", id[t], (long long)v);
    if (id[t] == padding_idx) continue;
    float* row = dt + int64_t(id[t]) * d;
    const float* gr = g + t * d;
    for (int64_t i = 0; i < d; ++i) row[i] += gr[i];
  }
}

void rmsnorm_forward_train(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w, float eps) {
  const int64_t d = x.dim(-1), n = x.numel() / d;
  std::vector<float> wf(static_cast<size_t>(d));
  convert_to_f32(wf.data(), w.raw(), w.dtype(), wf.size());
  const float* xp = x.data<float>();
  float* op = out.data<float>();
  float* rs = rstd.data<float>();
#pragma omp parallel for schedule(static) if(n * d > 32768)
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = xp + r * d;
    float inv = static_cast<float>(1.0 / std::sqrt(dot_f64(xr, xr, d) / double(d) + double(eps)));
    rs[r] = inv;
    float* orow = op + r * d;
    for (int64_t i = 0; i < d; ++i) orow[i] = wf[i] * (xr[i] * inv);
  }
}

namespace {
// Σ_i w[i]·g[i]·x[i] over n values, in f64: two chains of four lanes where the build has AVX2
// (one scalar chain waited on each add: with the column sums below, ~3% of a small-preset step).
double dot3_f64(const float* w, const float* g, const float* x, int64_t n) {
  int64_t i = 0;
  double dot = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  for (; i + 8 <= n; i += 8) {
    const __m256d w0 = _mm256_cvtps_pd(_mm_loadu_ps(w + i)), w1 = _mm256_cvtps_pd(_mm_loadu_ps(w + i + 4));
    const __m256d g0 = _mm256_cvtps_pd(_mm_loadu_ps(g + i)), g1 = _mm256_cvtps_pd(_mm_loadu_ps(g + i + 4));
    const __m256d x0 = _mm256_cvtps_pd(_mm_loadu_ps(x + i)), x1 = _mm256_cvtps_pd(_mm_loadu_ps(x + i + 4));
    a0 = _mm256_fmadd_pd(_mm256_mul_pd(w0, g0), x0, a0);
    a1 = _mm256_fmadd_pd(_mm256_mul_pd(w1, g1), x1, a1);
  }
  dot = hsum4(_mm256_add_pd(a0, a1));
#endif
  for (; i < n; ++i) dot += double(w[i]) * g[i] * x[i];
  return dot;
}
}  // namespace

// y = w * x * r with r = (mean(x^2) + eps)^-1/2:
//   dx = r * (w*dy) - x * r^3 / D * sum(w*dy*x),   dw += sum_n dy * x * r.
void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                      const Tensor& rstd, bool accumulate) {
  const int64_t d = x.dim(-1), n = x.numel() / d;
  std::vector<float> wf(static_cast<size_t>(d));
  convert_to_f32(wf.data(), w.raw(), w.dtype(), wf.size());
  const float* xp = x.data<float>();
  const float* gp = dy.data<float>();
  const float* rs = rstd.data<float>();
  float* dxp = dx.data<float>();
#pragma omp parallel for schedule(static) if(n * d > 32768)
  for (int64_t r = 0; r < n; ++r) {
    const float* xr = xp + r * d;
    const float* gr = gp + r * d;
    const double dot = dot3_f64(wf.data(), gr, xr, d);
    const float inv = rs[r];
    const float c = static_cast<float>(dot * double(inv) * inv * inv / double(d));
    float* o = dxp + r * d;
    for (int64_t i = 0; i < d; ++i) {
      float v = inv * wf[i] * gr[i] - xr[i] * c;
      o[i] = accumulate ? o[i] + v : v;
    }
  }
  if (dw.defined()) {
    float* dwp = dw.data<float>();
    // Column sums in f64 over the rows in order, by blocks of 16 columns over the threads: each
    // block walks the rows once, a cache line of dy and of x a row (a column at a time walked
    // every row's line for each of its columns).
    constexpr int64_t kCols = 16;
    const int64_t blocks = (d + kCols - 1) / kCols;
#pragma omp parallel for schedule(static) if(n * d > 32768)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t c0 = b * kCols, c1 = std::min(d, c0 + kCols);
      int64_t c = c0;
#if defined(__AVX2__) && defined(__FMA__)
      if (c1 - c0 == kCols) {
        __m256d acc[4] = {_mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd(), _mm256_setzero_pd()};
        for (int64_t r = 0; r < n; ++r) {
          const __m256d rv = _mm256_set1_pd(rs[r]);
          for (int q = 0; q < 4; ++q) {
            const __m256d g4 = _mm256_cvtps_pd(_mm_loadu_ps(gp + r * d + c0 + 4 * q));
            const __m256d x4 = _mm256_cvtps_pd(_mm_loadu_ps(xp + r * d + c0 + 4 * q));
            acc[q] = _mm256_fmadd_pd(_mm256_mul_pd(g4, x4), rv, acc[q]);
          }
        }
        alignas(32) double sums[kCols];
        for (int q = 0; q < 4; ++q) _mm256_store_pd(sums + 4 * q, acc[q]);
        for (int64_t i = 0; i < kCols; ++i) dwp[c0 + i] += static_cast<float>(sums[i]);
        c = c1;
      }
#endif
      for (; c < c1; ++c) {
        double acc = 0;
        for (int64_t r = 0; r < n; ++r) acc += double(gp[r * d + c]) * xp[r * d + c] * rs[r];
        dwp[c] += static_cast<float>(acc);
      }
    }
  }
}

void linear_backward(Tensor& dx, Tensor& dw, Tensor& db, const Tensor& dy, const Tensor& x, const Tensor& w,
                     bool accumulate, bool assign_dw) {
  const int64_t m = w.dim(0), k = w.dim(1), n = dy.numel() / m;
  if (dy.dtype() == DType::BF16) {
    const auto* g = static_cast<const uint16_t*>(dy.raw());
    gemm_xw_atb(dx.defined() ? dx.data<float>() : nullptr, dw.defined() ? dw.data<float>() : nullptr, g,
                dw.defined() ? x.data<float>() : nullptr, w.raw(), w.dtype(), n, m, k, accumulate, assign_dw);
    if (db.defined()) {
      float* b = db.data<float>();
      for (int64_t c = 0; c < m; ++c) {
        double acc = 0;
        for (int64_t r = 0; r < n; ++r) acc += bf16_to_f32(g[r * m + c]);
        b[c] += static_cast<float>(acc);
      }
    }
    return;
  }
  const float* g = dy.data<float>();
  if (dx.defined() && dw.defined()) {
    // One bf16 rounding of dy for both products on the matrix units (the LM head's chunk: 16 MiB
    // of f32 a pass).
    gemm_xw_atb(dx.data<float>(), dw.data<float>(), g, x.data<float>(), w.raw(), w.dtype(), n, m, k, accumulate,
                assign_dw);
  } else {
    if (dx.defined()) gemm_xw(dx.data<float>(), g, w.raw(), w.dtype(), n, m, k, accumulate);
    if (dw.defined()) gemm_atb(dw.data<float>(), k, g, m, x.data<float>(), w.dtype(), n, m, k, !assign_dw);
  }
  if (db.defined()) {
    float* b = db.data<float>();
    for (int64_t c = 0; c < m; ++c) {
      double acc = 0;
      for (int64_t r = 0; r < n; ++r) acc += g[r * m + c];
      b[c] += static_cast<float>(acc);
    }
  }
}

// out = silu(a) * b; silu(a) = a * sig(a); silu'(a) = sig(a) * (1 + a * (1 - sig(a))).
void swiglu_backward(Tensor& dh1, Tensor& dh3, const Tensor& dout, const Tensor& h1, const Tensor& h3) {
  const int64_t n = h1.numel();
  const float* a = h1.data<float>();
  const float* b = h3.data<float>();
  const float* g = dout.data<float>();
  float* da = dh1.data<float>();
  float* db = dh3.data<float>();
#pragma omp parallel for schedule(static) if(n > 32768)
  for (int64_t i = 0; i < n; ++i) {
    const float sg = 1.0f / (1.0f + std::exp(-a[i]));
    const float silu = a[i] * sg;
    db[i] = g[i] * silu;
    da[i] = g[i] * b[i] * sg * (1.0f + a[i] * (1.0f - sg));
  }
}

void sigmoid_gate_backward(Tensor& ds, Tensor& dgate, const Tensor& dy, const Tensor& s, const Tensor& gate) {
  const int64_t t_n = dy.dim(0), d = dy.dim(1);
  const float* g = dy.data<float>();
  const float* sp = s.data<float>();
  const float* gt = gate.data<float>();
  float* dsp = ds.data<float>();
  float* dg = dgate.data<float>();
#pragma omp parallel for schedule(static) if(t_n * d > 32768)
  for (int64_t t = 0; t < t_n; ++t) {
    const float sg = 1.0f / (1.0f + std::exp(-gt[t]));
    double dot = 0;
    for (int64_t i = 0; i < d; ++i) {
      dot += double(g[t * d + i]) * sp[t * d + i];
      dsp[t * d + i] = sg * g[t * d + i];
    }
    dg[t] = static_cast<float>(dot * sg * (1.0 - sg));
  }
}

namespace {

// log Σ exp(l) over a row of logits.
double row_lse(const float* l, int64_t v) {
  const float mx = max_of(l, v, -INFINITY);
  return mx + std::log(row_exp_sum(nullptr, l, v, mx));
}

// o[i] = scale · softmax(l)[i] over a row (o may alias l); returns the row's log-sum-exp. Two
// passes after the maximum: e^(l - max) computed once, stored in o and summed, then each
// multiplied by scale / Σ in f64 and rounded once. (Three passes — the exponentials again, of
// l - lse — took 11.5-12 ms of a Mixtral-shaped step's head against ~7.) No rounding is shared by the whole row:
// formed as l - f32(lse), the argument's error grew with |l - lse| and moved every value the
// same way, and qwen3's tied-embedding update drifted 1.8% from torch's after five AdamW steps;
// here max is exact, l - max rounds per value, and Σ and scale / Σ stay in f64.
double row_softmax_scaled(float* o, const float* l, int64_t v, double scale) {
  const float mx = max_of(l, v, -INFINITY);
  const double sum = row_exp_sum(o, l, v, mx);
  const double c = scale / sum;
  int64_t i = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256d cd = _mm256_set1_pd(c);
  for (; i + 8 <= v; i += 8) {
    const __m256 e = _mm256_loadu_ps(o + i);
    const __m128 a = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(e)), cd));
    const __m128 b = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)), cd));
    _mm256_storeu_ps(o + i, _mm256_set_m128(b, a));
  }
#endif
  for (; i < v; ++i) o[i] = static_cast<float>(c * o[i]);
  return mx + std::log(sum);
}

// The target's logit's gradient, scale · (p - 1), in f64: p is near 1 where the model is
// confident, and p - 1 from the f32 softmax value cancels (the few-ulp error of exp8f became a
// 1.8% error in the update of qwen3's tied embeddings after five AdamW steps).
float target_grad(float lt, double lse, double scale) {
  return static_cast<float>(scale * (std::exp(double(lt) - lse) - 1.0));
}

void check_target(int32_t t, int64_t v) {
  MOE_CHECK(t == -100 || (t >= 0 && t < v), "cross_entropy: target %d out of range [0,%lld)", t, (long long)v);
}

// Each row's gradient scale · (softmax - onehot(target)) into dlogits (which may alias logits)
// and, with loss, its loss lse - l[target]; an ignored row (-100) gets 0 for both.
void ce_rows(float* loss, Tensor& dlogits, const Tensor& logits, const Tensor& targets, float scale) {
  const int64_t n = logits.dim(0), v = logits.dim(1);
  const float* lg = logits.data<float>();
  const int32_t* tg = targets.data<int32_t>();
  float* dl = dlogits.data<float>();
  for (int64_t r = 0; r < n; ++r) check_target(tg[r], v);
#pragma omp parallel for schedule(static) if(n * v > 32768)
  for (int64_t r = 0; r < n; ++r) {
    const float* l = lg + r * v;
    float* o = dl + r * v;
    if (tg[r] == -100) {
      if (loss) loss[r] = 0;
      std::fill(o, o + v, 0.0f);
      continue;
    }
    const float lt = l[tg[r]];  // before o overwrites l when they alias
    const double lse = row_softmax_scaled(o, l, v, scale);
    if (loss) loss[r] = static_cast<float>(lse - lt);
    o[tg[r]] = target_grad(lt, lse, scale);
  }
}
}  // namespace

void cross_entropy_forward(Tensor& loss, const Tensor& logits, const Tensor& targets) {
  const int64_t n = logits.dim(0), v = logits.dim(1);
  const float* lg = logits.data<float>();
  const int32_t* tg = targets.data<int32_t>();
  float* out = loss.data<float>();
  for (int64_t r = 0; r < n; ++r) check_target(tg[r], v);
#pragma omp parallel for schedule(static) if(n * v > 32768)
  for (int64_t r = 0; r < n; ++r) {
    if (tg[r] == -100) {
      out[r] = 0;
      continue;
    }
    const float* l = lg + r * v;
    out[r] = static_cast<float>(row_lse(l, v) - l[tg[r]]);
  }
}

void cross_entropy_forward_backward(Tensor& loss, Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                    float scale) {
  ce_rows(loss.data<float>(), dlogits, logits, targets, scale);
}

void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& targets, float scale) {
  ce_rows(nullptr, dlogits, logits, targets, scale);
}

}  // namespace cpu
}  // namespace moe
