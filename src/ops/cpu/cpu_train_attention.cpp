// cpu_train_attention.cpp — causal GQA self-attention for training on the CPU: a forward that
// saves the row log-sum-exp, and a backward that recomputes the probabilities from it (the
// [S,S] matrix is never stored). Work is split by (batch, kv head) so the key/value gradients
// of one kv head are written by one thread.
#include <cmath>
#include <vector>

#include "ops/backend.h"
#include "ops/cpu/cpu_gemm.h"

namespace moe {
namespace cpu {

void attention_forward_train(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v) {
  const int64_t b_n = q.dim(0), s_n = q.dim(1), h_n = q.dim(2), dh = q.dim(3);
  const int64_t hkv = k.dim(2), group = h_n / hkv;
  const float scale = 1.0f / std::sqrt(float(dh));
  const float* qp = q.data<float>();
  const float* kp = k.data<float>();
  const float* vp = v.data<float>();
  float* op = out.data<float>();
  float* lp = lse.data<float>();
#pragma omp parallel if(b_n * h_n * s_n * s_n * dh > 32768)
  {
    std::vector<float> sc(static_cast<size_t>(s_n));
#pragma omp for collapse(3) schedule(dynamic, 4)
    for (int64_t b = 0; b < b_n; ++b)
      for (int64_t h = 0; h < h_n; ++h)
        for (int64_t s = 0; s < s_n; ++s) {
          const int64_t kvh = h / group;
          const float* qr = qp + ((b * s_n + s) * h_n + h) * dh;
          float mx = -INFINITY;
          for (int64_t j = 0; j <= s; ++j) {
            sc[j] = dot_f32(qr, kp + ((b * s_n + j) * hkv + kvh) * dh, dh) * scale;
            mx = std::max(mx, sc[j]);
          }
          double sum = 0;
          for (int64_t j = 0; j <= s; ++j) {
            sc[j] = std::exp(sc[j] - mx);
            sum += sc[j];
          }
          const float inv = static_cast<float>(1.0 / sum);
          float* orow = op + ((b * s_n + s) * h_n + h) * dh;
          for (int64_t i = 0; i < dh; ++i) orow[i] = 0;
          for (int64_t j = 0; j <= s; ++j) {
            const float* vr = vp + ((b * s_n + j) * hkv + kvh) * dh;
            const float p = sc[j] * inv;
            for (int64_t i = 0; i < dh; ++i) orow[i] += p * vr[i];
          }
          lp[(b * h_n + h) * s_n + s] = static_cast<float>(mx + std::log(sum));
        }
  }
}

// With p_j = exp(score_j - lse), dP_j = dO·V_j, Δ = dO·O:
//   dS_j = p_j (dP_j - Δ);  dQ = scale Σ_j dS_j K_j;  dK_j += scale dS_j Q;  dV_j += p_j dO.
// Accumulated in f64: dP_j - Δ cancels, and gradients such as a key bias' (a sum over every
// query of small differences) lose several digits in f32.
void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& out, const Tensor& lse) {
  const int64_t b_n = q.dim(0), s_n = q.dim(1), h_n = q.dim(2), dh = q.dim(3);
  const int64_t hkv = k.dim(2), group = h_n / hkv;
  const double scale = 1.0 / std::sqrt(double(dh));
  const float* qp = q.data<float>();
  const float* kp = k.data<float>();
  const float* vp = v.data<float>();
  const float* op = out.data<float>();
  const float* gp = dout.data<float>();
  const float* lp = lse.data<float>();
  float* dqp = dq.data<float>();
  float* dkp = dk.data<float>();
  float* dvp = dv.data<float>();
  auto dot = [dh](const float* a, const float* b) {
    double s = 0;
    for (int64_t i = 0; i < dh; ++i) s += double(a[i]) * b[i];
    return s;
  };
#pragma omp parallel if(b_n * h_n * s_n * s_n * dh > 32768)
  {
    std::vector<double> ds(static_cast<size_t>(s_n)), pj(static_cast<size_t>(s_n)), dqr(static_cast<size_t>(dh));
    std::vector<double> dka(static_cast<size_t>(s_n * dh)), dva(static_cast<size_t>(s_n * dh));
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < b_n; ++b)
      for (int64_t kvh = 0; kvh < hkv; ++kvh) {
        std::fill(dka.begin(), dka.end(), 0.0);
        std::fill(dva.begin(), dva.end(), 0.0);
        for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
          for (int64_t s = 0; s < s_n; ++s) {
            const int64_t row = ((b * s_n + s) * h_n + h) * dh;
            const float* qr = qp + row;
            const float* gr = gp + row;
            const double l = lp[(b * h_n + h) * s_n + s];
            const double delta = dot(gr, op + row);
            for (int64_t j = 0; j <= s; ++j) {
              const int64_t kr = ((b * s_n + j) * hkv + kvh) * dh;
              const double p = std::exp(dot(qr, kp + kr) * scale - l);
              pj[j] = p;
              ds[j] = p * (dot(gr, vp + kr) - delta) * scale;
            }
            std::fill(dqr.begin(), dqr.end(), 0.0);
            for (int64_t j = 0; j <= s; ++j) {
              const float* krow = kp + ((b * s_n + j) * hkv + kvh) * dh;
              double* dkr = dka.data() + j * dh;
              double* dvr = dva.data() + j * dh;
              const double dsj = ds[j], p = pj[j];
              for (int64_t i = 0; i < dh; ++i) {
                dqr[i] += dsj * krow[i];
                dkr[i] += dsj * qr[i];
                dvr[i] += p * gr[i];
              }
            }
            for (int64_t i = 0; i < dh; ++i) dqp[row + i] = static_cast<float>(dqr[i]);
          }
        for (int64_t j = 0; j < s_n; ++j)
          for (int64_t i = 0; i < dh; ++i) {
            const int64_t at = ((b * s_n + j) * hkv + kvh) * dh + i;
            dkp[at] = static_cast<float>(dka[j * dh + i]);
            dvp[at] = static_cast<float>(dva[j * dh + i]);
          }
      }
  }
}

}  // namespace cpu
}  // namespace moe
