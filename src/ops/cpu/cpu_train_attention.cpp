// cpu_train_attention.cpp — causal GQA self-attention for training on the CPU: a forward that
// saves the row log-sum-exp, and a backward that recomputes the probabilities from it (the
// [S,S] matrix is never stored). Work is split by (batch, kv head) so the key/value gradients
// of one kv head are written by one thread.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/backend.h"
#include "ops/cpu/cpu_gemm.h"

namespace moe {
namespace cpu {
namespace {
// The sinks [H] as f64 (empty: none).
std::vector<double> sinks_f64(const AttnVariant& av) {
  std::vector<double> out;
  if (!av.sinks.defined()) return out;
  std::vector<float> f(static_cast<size_t>(av.sinks.numel()));
  convert_to_f32(f.data(), av.sinks.raw(), av.sinks.dtype(), f.size());
  out.assign(f.begin(), f.end());
  return out;
}
}  // namespace

// Sinks join each row's softmax denominator (and so lse); a window limits the keys to
// (s - window, s].
void attention_forward_train(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                             const AttnVariant& av) {
  const int64_t b_n = q.dim(0), s_n = q.dim(1), h_n = q.dim(2), dh = q.dim(3);
  const int64_t hkv = k.dim(2), group = h_n / hkv;
  const float scale = av.scale != 0 ? av.scale : 1.0f / std::sqrt(float(dh));
  const float* qp = q.data<float>();
  const float* kp = k.data<float>();
  const float* vp = v.data<float>();
  float* op = out.data<float>();
  float* lp = lse.data<float>();
  const std::vector<double> sinks = sinks_f64(av);
#pragma omp parallel if(b_n * h_n * s_n * s_n * dh > 32768)
  {
    std::vector<float> sc(static_cast<size_t>(s_n));
#pragma omp for collapse(3) schedule(dynamic, 4)
    for (int64_t b = 0; b < b_n; ++b)
      for (int64_t h = 0; h < h_n; ++h)
        for (int64_t s = 0; s < s_n; ++s) {
          const int64_t kvh = h / group;
          const float* qr = qp + ((b * s_n + s) * h_n + h) * dh;
          const int64_t j0 = av.first_key(s);
          float mx = sinks.empty() ? -INFINITY : float(sinks[size_t(h)]);
          for (int64_t j = j0; j <= s; ++j) {
            sc[j] = dot_f32(qr, kp + ((b * s_n + j) * hkv + kvh) * dh, dh) * scale;
            mx = std::max(mx, sc[j]);
          }
          double sum = sinks.empty() ? 0.0 : std::exp(sinks[size_t(h)] - mx);
          for (int64_t j = j0; j <= s; ++j) {
            sc[j] = std::exp(sc[j] - mx);
            sum += sc[j];
          }
          const float inv = static_cast<float>(1.0 / sum);
          float* orow = op + ((b * s_n + s) * h_n + h) * dh;
          for (int64_t i = 0; i < dh; ++i) orow[i] = 0;
          for (int64_t j = j0; j <= s; ++j) {
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
// Per (batch, kv head), query rows in tiles of kTile: the scores, dP, dQ, dK and dV of a tile
// are f64 GEMMs (cblas_dgemm) over the keys up to the tile's last row; the causal mask zeroes
// p (and so dS) above the diagonal. The f64 products keep the accumulation of the scalar
// formulation at GEMM speed.
// Sinks: p_sink = exp(sink - lse) and dsink_h = -Σ_rows p_sink Δ (a serial pass after the
// parallel one: every batch row adds into the same [H]). A window zeroes p outside it.
void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& out, const Tensor& lse, const AttnVariant& av,
                        Tensor* dsinks) {
  const int64_t b_n = q.dim(0), s_n = q.dim(1), h_n = q.dim(2), dh = q.dim(3);
  const int64_t hkv = k.dim(2), group = h_n / hkv;
  const double scale = av.scale != 0 ? double(av.scale) : 1.0 / std::sqrt(double(dh));
  constexpr int64_t kTile = 64;
  const float* qp = q.data<float>();
  const float* kp = k.data<float>();
  const float* vp = v.data<float>();
  const float* op = out.data<float>();
  const float* gp = dout.data<float>();
  const float* lp = lse.data<float>();
  float* dqp = dq.data<float>();
  float* dkp = dk.data<float>();
  float* dvp = dv.data<float>();
  const int64_t tile = std::min(kTile, s_n);
#pragma omp parallel if(b_n * h_n * s_n * s_n * dh > 32768)
  {
    // Per thread: K and V of one (batch, kv head) in f64, their gradient accumulators, and one
    // query tile's Q, dO, scores/probabilities, dP/dS and dQ.
    const size_t kv_n = static_cast<size_t>(s_n * dh), tq = static_cast<size_t>(tile);
    std::vector<double> kd(kv_n), vd(kv_n), dka(kv_n), dva(kv_n);
    std::vector<double> qt(tq * size_t(dh)), gt(tq * size_t(dh)), pt(tq * size_t(s_n)), dst(tq * size_t(s_n));
    std::vector<double> dqt(static_cast<size_t>(tile * dh)), delta(static_cast<size_t>(tile));
#pragma omp for collapse(2) schedule(dynamic, 1)
    for (int64_t b = 0; b < b_n; ++b)
      for (int64_t kvh = 0; kvh < hkv; ++kvh) {
        for (int64_t j = 0; j < s_n; ++j)
          for (int64_t i = 0; i < dh; ++i) {
            const int64_t at = ((b * s_n + j) * hkv + kvh) * dh + i;
            kd[size_t(j * dh + i)] = kp[at];
            vd[size_t(j * dh + i)] = vp[at];
          }
        std::fill(dka.begin(), dka.end(), 0.0);
        std::fill(dva.begin(), dva.end(), 0.0);
        for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
          for (int64_t s0 = 0; s0 < s_n; s0 += tile) {
            const int64_t nq = std::min(tile, s_n - s0), nk = s0 + nq;  // keys 0..nk-1 are visible to the tile
            for (int64_t r = 0; r < nq; ++r) {
              const int64_t row = ((b * s_n + s0 + r) * h_n + h) * dh;
              double dl = 0;
              for (int64_t i = 0; i < dh; ++i) {
                qt[size_t(r * dh + i)] = qp[row + i];
                gt[size_t(r * dh + i)] = gp[row + i];
                dl += double(gp[row + i]) * op[row + i];
              }
              delta[size_t(r)] = dl;
            }
            // scores = Q Kᵀ and dP = dO Vᵀ over the visible keys
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nq, (int)nk, (int)dh, 1.0, qt.data(), (int)dh,
                        kd.data(), (int)dh, 0.0, pt.data(), (int)nk);
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nq, (int)nk, (int)dh, 1.0, gt.data(), (int)dh,
                        vd.data(), (int)dh, 0.0, dst.data(), (int)nk);
            for (int64_t r = 0; r < nq; ++r) {
              const double l = lp[(b * h_n + h) * s_n + s0 + r];
              double* pr = pt.data() + r * nk;
              double* dr = dst.data() + r * nk;
              const int64_t last = s0 + r, first = av.first_key(last);  // causal: keys first..last
              for (int64_t j = 0; j < nk; ++j) {
                const double p = j <= last && j >= first ? std::exp(pr[j] * scale - l) : 0.0;
                pr[j] = p;
                dr[j] = p * (dr[j] - delta[size_t(r)]) * scale;
              }
            }
            // dQ = dS K;  dK += dSᵀ Q;  dV += Pᵀ dO
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nq, (int)dh, (int)nk, 1.0, dst.data(),
                        (int)nk, kd.data(), (int)dh, 0.0, dqt.data(), (int)dh);
            cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)nk, (int)dh, (int)nq, 1.0, dst.data(), (int)nk,
                        qt.data(), (int)dh, 1.0, dka.data(), (int)dh);
            cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)nk, (int)dh, (int)nq, 1.0, pt.data(), (int)nk,
                        gt.data(), (int)dh, 1.0, dva.data(), (int)dh);
            for (int64_t r = 0; r < nq; ++r) {
              float* dqr = dqp + ((b * s_n + s0 + r) * h_n + h) * dh;
              for (int64_t i = 0; i < dh; ++i) dqr[i] = static_cast<float>(dqt[size_t(r * dh + i)]);
            }
          }
        for (int64_t j = 0; j < s_n; ++j)
          for (int64_t i = 0; i < dh; ++i) {
            const int64_t at = ((b * s_n + j) * hkv + kvh) * dh + i;
            dkp[at] = static_cast<float>(dka[size_t(j * dh + i)]);
            dvp[at] = static_cast<float>(dva[size_t(j * dh + i)]);
          }
      }
  }
  if (dsinks && dsinks->defined() && av.sinks.defined()) {
    const std::vector<double> sinks = sinks_f64(av);
    float* ds = dsinks->data<float>();
    for (int64_t h = 0; h < h_n; ++h) {
      double acc = 0;
      for (int64_t b = 0; b < b_n; ++b)
        for (int64_t s = 0; s < s_n; ++s) {
          const int64_t row = ((b * s_n + s) * h_n + h) * dh;
          double delta = 0;
          for (int64_t i = 0; i < dh; ++i) delta += double(gp[row + i]) * op[row + i];
          acc -= std::exp(sinks[size_t(h)] - double(lp[(b * h_n + h) * s_n + s])) * delta;
        }
      ds[h] += static_cast<float>(acc);
    }
  }
}

}  // namespace cpu
}  // namespace moe
