// cpu_train_attention.cpp — causal GQA self-attention for training on the CPU: a forward that
// saves the row log-sum-exp (Q·Kᵀ, softmax, P·V), and a backward that recomputes the
// probabilities block by block (the [S,S] matrix is never stored); both by the register tiles of
// cpu_attention_tiles.h where the head dim is a multiple of 8, else by f32 sgemm tiles (the
// backward's softmax and dK in f64). Backward work is split by (batch, kv head) so the key/value
// gradients of one kv head are written by one thread.
#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops/backend.h"
#include "ops/cpu/cpu_gemm.h"
#include "ops/cpu/cpu_attention_tiles.h"
#include "ops/cpu/cpu_dot_f64.h"
#include "ops/cpu/cpu_simd_exp.h"

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


// p[j] = e^(x[j]·scale - l) for first <= j <= last, 0 elsewhere, in place over x[0, n) (f64).
void exp_scaled_row(double* x, int64_t n, int64_t first, int64_t last, double scale, double l) {
  std::fill(x, x + first, 0.0);
  std::fill(x + last + 1, x + n, 0.0);
  int64_t j = first;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256d sv = _mm256_set1_pd(scale), lv = _mm256_set1_pd(l);
  for (; j + 4 <= last + 1; j += 4) _mm256_storeu_pd(x + j, exp4d(_mm256_fmsub_pd(_mm256_loadu_pd(x + j), sv, lv)));
#endif
  for (; j <= last; ++j) x[j] = std::exp(x[j] * scale - l);
}

// out[x·ldo + j] += Σ_{r in [r0, r1)} a[r·lda + x] · b[r·ldb + j] for 4 values of x and 8 of j, in
// f64 (dKᵀ += Qᵀ·dS: x head dims, j keys, r query rows).
inline void outer_tile_f64(const double* a, int64_t lda, const double* b, int64_t ldb, int64_t r0, int64_t r1,
                           double* out, int64_t ldo) {
  __m256d acc[4][2];
  for (int x = 0; x < 4; ++x)
    for (int y = 0; y < 2; ++y) acc[x][y] = _mm256_loadu_pd(out + x * ldo + 4 * y);
  for (int64_t r = r0; r < r1; ++r) {
    const __m256d b0 = _mm256_loadu_pd(b + r * ldb), b1 = _mm256_loadu_pd(b + r * ldb + 4);
    for (int x = 0; x < 4; ++x) {
      const __m256d av = _mm256_broadcast_sd(a + r * lda + x);
      acc[x][0] = _mm256_fmadd_pd(av, b0, acc[x][0]);
      acc[x][1] = _mm256_fmadd_pd(av, b1, acc[x][1]);
    }
  }
  for (int x = 0; x < 4; ++x)
    for (int y = 0; y < 2; ++y) _mm256_storeu_pd(out + x * ldo + 4 * y, acc[x][y]);
}

// The backward of one (batch, kv head) for head dims a multiple of 8, by register tiles: per
// head of the group and block of kAttnQBlock query rows,
//   S = scale·Q·Kᵀ and dP = dO·Vᵀ (scores_tile against K and V transposed once per task),
//   each row's softmax renormalised from S (sum in f64), Δ = Σ p·dP in f64, dS = p·(dP - Δ)·scale
//   in f64 (P and dS's f32 rounding overwrite S and dP, zero outside the keys the row sees),
//   dQ = dS·K (values_tile over K's rows, written in place),
//   dVᵀ += dOᵀ·P (outer_tile over the block's rows of P: no transposes), f32,
//   dKᵀ += Qᵀ·dS in f64 (outer_tile_f64): with dS rounded to f32 and summed in f32 blocks, the
//   AdamW trajectory of qwen2's k_proj bias and qwen3's embeddings left the 1e-3 of the
//   torch-f64 reference (test_train_reference.cpp), as it did before with the sgemm path.
// 2-3x the sgemm tiles below (B4 S256 H8 Dh32: 7.6-15 -> 4.5 ms; S1024 Dh64: 460-780 -> 110-140
// ms), which spent most of their time packing these thin (K = Dh) operands.
struct BackwardScratch {
  int64_t ldt;  // row stride of the key-major buffers: keys rounded up to 16, and 16 more
  std::vector<float> kt, vt, S, dP, dvt;
  std::vector<double> dkat, ds64, q64;
  BackwardScratch(int64_t s_n, int64_t dh) : ldt((s_n + 15) / 16 * 16 + 16) {
    const size_t t = static_cast<size_t>(ldt), d = static_cast<size_t>(dh), q = static_cast<size_t>(kAttnQBlock);
    kt.assign(d * t, 0.0f), vt.assign(d * t, 0.0f), S.assign(q * t, 0.0f), dP.assign(q * t, 0.0f);
    dvt.assign(d * t, 0.0f), dkat.assign(d * t, 0.0), ds64.assign(q * t, 0.0), q64.assign(q * d, 0.0);
  }
};

void backward_kv_head_tiled(BackwardScratch& w, float* dq, int64_t ldq, const float* q, const float* dout,
                            const float* k, const float* v, int64_t ldk, int64_t s_n, int64_t h0, int64_t group,
                            int64_t h_stride, int64_t dh, float scale, const std::vector<double>& sinks,
                            const AttnVariant& av) {
  const int64_t ldt = w.ldt, QB = kAttnQBlock;
  transpose_keys(k, ldk, s_n, dh, w.kt.data(), ldt);
  transpose_keys(v, ldk, s_n, dh, w.vt.data(), ldt);
  std::fill(w.dkat.begin(), w.dkat.end(), 0.0);
  std::fill(w.dvt.begin(), w.dvt.end(), 0.0f);
  float* S = w.S.data();
  float* dP = w.dP.data();
  for (int64_t h = h0; h < h0 + group; ++h) {
    const bool has_sink = !sinks.empty();
    const float sink = has_sink ? float(sinks[size_t(h)]) : -INFINITY;
    for (int64_t s0 = 0; s0 < s_n; s0 += QB) {
      const int64_t nq = std::min(QB, s_n - s0), j0 = av.first_key(s0), n = s0 + nq - j0, np = (n + 15) / 16 * 16;
      const float* qb = q + (s0 * h_stride + h) * dh;  // query row r at qb + r * ldq
      const float* gb = dout + (s0 * h_stride + h) * dh;
      int64_t lo[kAttnQBlock], hi[kAttnQBlock];
      for (int64_t r = 0; r < nq; ++r) lo[r] = av.first_key(s0 + r) - j0, hi[r] = s0 + r + 1 - j0;
      for_row_groups(nq, [&]<int RX>(int64_t r) {
        for (int64_t j = 0; j < np; j += 16) {
          scores_tile<RX>(qb + r * ldq, ldq, w.kt.data() + j0 + j, ldt, dh, scale, S + r * ldt + j, ldt);
          scores_tile<RX>(gb + r * ldq, ldq, w.vt.data() + j0 + j, ldt, dh, 1.0f, dP + r * ldt + j, ldt);
        }
      });
      for (int64_t r = 0; r < nq; ++r)
        for (int64_t d = 0; d < dh; ++d) w.q64[size_t(r * dh + d)] = qb[r * ldq + d];
      for (int64_t r = 0; r < nq; ++r) {
        float* pr = S + r * ldt;   // scores, then probabilities
        float* dr = dP + r * ldt;  // dP, then dS
        const float mx = max_of(pr + lo[r], hi[r] - lo[r], sink);
        const double sum = (has_sink ? std::exp(double(sink) - mx) : 0.0) +
                           row_exp_sum(pr + lo[r], pr + lo[r], hi[r] - lo[r], mx);
        const float inv = static_cast<float>(1.0 / sum);
        for (int64_t j = lo[r]; j < hi[r]; ++j) pr[j] *= inv;
        const double delta = dot_f64(pr + lo[r], dr + lo[r], hi[r] - lo[r]);
        double* d64 = w.ds64.data() + r * ldt;
        std::fill(d64, d64 + np, 0.0);
        for (int64_t j = lo[r]; j < hi[r]; ++j) {
          d64[j] = double(pr[j]) * (double(dr[j]) - delta) * double(scale);
          dr[j] = static_cast<float>(d64[j]);
        }
        for (float* row : {pr, dr}) {
          std::fill(row, row + lo[r], 0.0f);
          std::fill(row + hi[r], row + np, 0.0f);
        }
      }
      // dQ = dS·K over the keys the row group sees.
      for_row_groups(nq, [&]<int RX>(int64_t r) {
        int64_t ja = lo[r], jb = hi[r];
        for (int i = 1; i < RX; ++i) ja = std::min(ja, lo[r + i]), jb = std::max(jb, hi[r + i]);
        values_rows<RX>(dP + r * ldt, ldt, k + j0 * ldk, ldk, ja, jb, dq + (s0 + r) * ldq + h * dh, ldq, dh);
      });
      // dVᵀ += dOᵀ·P and dKᵀ += Qᵀ·dS by 16 keys, over the query rows that can see them (causal:
      // from the row at the group's first key on).
      for (int64_t j = 0; j < np; j += 16) {
        const int64_t ra = std::max<int64_t>(0, j + j0 - s0);
        for_row_groups(dh, [&]<int RX>(int64_t d) {
          outer_tile<RX, true>(gb + d, 1, ldq, S + j, ldt, ra, nq, 1.0f, w.dvt.data() + d * ldt + j0 + j, ldt);
        });
        for (int64_t d = 0; d < dh; d += 4)
          for (int64_t h8 = 0; h8 < 16; h8 += 8)
            outer_tile_f64(w.q64.data() + d, dh, w.ds64.data() + j + h8, ldt, ra, nq,
                           w.dkat.data() + d * ldt + j0 + j + h8, ldt);
      }
    }
  }
}

}  // namespace

// Per (batch, head, tile of kTile query rows): the scores of the tile against every key it
// can see are one sgemm (Q·Kᵀ, rows of q and k read in place through their leading
// dimensions), the masked softmax runs row by row, and P·V is a second sgemm writing the
// output rows in place. BLAS runs single-threaded inside the parallel region; tiles are taken
// largest (last) first. Sinks join each row's softmax denominator (and so lse); a window limits
// the keys to (s - window, s].
void attention_forward_train(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                             const AttnVariant& av) {
  const int64_t b_n = q.dim(0), s_n = q.dim(1), h_n = q.dim(2), dh = q.dim(3);
  const int64_t hkv = k.dim(2), group = h_n / hkv;
  const float scale = av.scale != 0 ? av.scale : 1.0f / std::sqrt(float(dh));
  constexpr int64_t kTile = 64;
  const int64_t tile = std::min(kTile, s_n), n_tiles = (s_n + tile - 1) / tile;
  const int64_t ldq = h_n * dh, ldk = hkv * dh;
  const float* qp = q.data<float>();
  const float* kp = k.data<float>();
  const float* vp = v.data<float>();
  float* op = out.data<float>();
  float* lp = lse.data<float>();
  const std::vector<double> sinks = sinks_f64(av);
  if (dh % 8 == 0) {
    // Head dims a multiple of 8: the register-tiled blocks of prefill (cpu_attention_tiles.h),
    // 5-7x faster than the sgemm tiles below at Dh 32-64 (OpenBLAS' packing dominates there).
    const int64_t n_qb = (s_n + kAttnQBlock - 1) / kAttnQBlock, nkp = (s_n + 15) / 16 * 16;
#pragma omp parallel if(b_n * h_n * s_n * s_n * dh > 32768)
    {
      std::vector<float> S(static_cast<size_t>(kAttnQBlock * nkp)), kt(static_cast<size_t>(dh * nkp));
#pragma omp for collapse(3) schedule(dynamic, 1)
      for (int64_t qi = 0; qi < n_qb; ++qi)
        for (int64_t b = 0; b < b_n; ++b)
          for (int64_t h = 0; h < h_n; ++h) {
            const int64_t s0 = (n_qb - 1 - qi) * kAttnQBlock, nq = std::min(kAttnQBlock, s_n - s0), kvh = h / group;
            const int64_t j0 = av.first_key(s0), nk = s0 + nq - j0;
            const float sink = sinks.empty() ? -INFINITY : float(sinks[size_t(h)]);
            attend_block(qp + ((b * s_n + s0) * h_n + h) * dh, ldq, kp + ((b * s_n + j0) * hkv + kvh) * dh,
                         vp + ((b * s_n + j0) * hkv + kvh) * dh, ldk, nq, j0, nk, s0, dh, scale, sink, !sinks.empty(),
                         av, kt.data(), S.data(), op + ((b * s_n + s0) * h_n + h) * dh, ldq,
                         lp + (b * h_n + h) * s_n + s0);
          }
    }
    return;
  }
#pragma omp parallel if(b_n * h_n * s_n * s_n * dh > 32768)
  {
    std::vector<float> sc(static_cast<size_t>(tile * s_n));
    std::vector<float> inv(static_cast<size_t>(tile));
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t ti = 0; ti < n_tiles; ++ti)
      for (int64_t b = 0; b < b_n; ++b)
        for (int64_t h = 0; h < h_n; ++h) {
          const int64_t s0 = (n_tiles - 1 - ti) * tile, nq = std::min(tile, s_n - s0), kvh = h / group;
          const int64_t j0 = av.first_key(s0), nk = s0 + nq - j0;  // keys j0..s0+nq-1 are visible to the tile
          const float* qb = qp + ((b * s_n + s0) * h_n + h) * dh;
          const float* kb = kp + ((b * s_n + j0) * hkv + kvh) * dh;
          const float* vb = vp + ((b * s_n + j0) * hkv + kvh) * dh;
          float* ob = op + ((b * s_n + s0) * h_n + h) * dh;
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nq, (int)nk, (int)dh, scale, qb, (int)ldq, kb,
                      (int)ldk, 0.0f, sc.data(), (int)nk);
          for (int64_t r = 0; r < nq; ++r) {
            const int64_t s = s0 + r, first = av.first_key(s) - j0, last = s - j0;  // visible columns
            float* row = sc.data() + r * nk;
            const float mx = max_of(row + first, last - first + 1, sinks.empty() ? -INFINITY : float(sinks[size_t(h)]));
            double sum = sinks.empty() ? 0.0 : std::exp(sinks[size_t(h)] - mx);
            sum += exp_shift_sum(row + first, last - first + 1, mx);
            std::fill(row, row + first, 0.0f);
            std::fill(row + last + 1, row + nk, 0.0f);
            inv[size_t(r)] = static_cast<float>(1.0 / sum);
            lp[(b * h_n + h) * s_n + s] = static_cast<float>(mx + std::log(sum));
          }
          cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nq, (int)dh, (int)nk, 1.0f, sc.data(), (int)nk,
                      vb, (int)ldk, 0.0f, ob, (int)ldq);
          for (int64_t r = 0; r < nq; ++r)
            for (int64_t i = 0; i < dh; ++i) ob[r * ldq + i] *= inv[size_t(r)];
        }
  }
}

// With p_j = softmax(score)_j, dP_j = dO·V_j, Δ = Σ_j p_j dP_j (= dO·O):
//   dS_j = p_j (dP_j - Δ);  dQ = scale Σ_j dS_j K_j;  dK_j += scale dS_j Q;  dV_j += p_j dO.
// Per (batch, kv head), query rows in tiles of kTile over the keys up to the tile's last row
// (the causal mask zeroes p, and so dS, above the diagonal; a window zeroes p outside it):
//   - scores Q·Kᵀ and dP = dO·Vᵀ are f32 sgemms reading q, k, v and dO in place;
//   - each row's softmax is renormalised in f64 from those scores (not from the forward's f32
//     lse), Δ is Σ p·dP in f64, and dS in f64: Σ_j dS_j is then Δ·p_sink up to f64 rounding,
//     as it is mathematically;
//   - dK += dSᵀ·Q is an f64 dgemm: the gradients that sum dK over keys (a key bias', exactly 0
//     without sinks) would otherwise keep an f32 residue that AdamW, normalising it, turns into
//     a full-size step;
//   - dQ = dS·K and dV += Pᵀ·dO are f32 sgemms (no cancellation there).
// Sinks: p_sink = exp(sink - lse) and dsink_h = -Σ_rows p_sink Δ (a serial pass after the
// parallel one: every batch row adds into the same [H]).
void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& out, const Tensor& lse, const AttnVariant& av,
                        Tensor* dsinks) {
  const int64_t b_n = q.dim(0), s_n = q.dim(1), h_n = q.dim(2), dh = q.dim(3);
  const int64_t hkv = k.dim(2), group = h_n / hkv;
  const double scale = av.scale != 0 ? double(av.scale) : 1.0 / std::sqrt(double(dh));
  constexpr int64_t kTile = 64;
  const int64_t ldq = h_n * dh, ldk = hkv * dh;
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
  const std::vector<double> sk = sinks_f64(av);
  if (dh % 8 == 0) {
#pragma omp parallel if(b_n * h_n * s_n * s_n * dh > 32768)
    {
      BackwardScratch w(s_n, dh);
#pragma omp for collapse(2) schedule(dynamic, 1)
      for (int64_t b = 0; b < b_n; ++b)
        for (int64_t kvh = 0; kvh < hkv; ++kvh) {
          const int64_t kv0 = (b * s_n * hkv + kvh) * dh, q0 = b * s_n * h_n * dh;
          backward_kv_head_tiled(w, dqp + q0, ldq, qp + q0, gp + q0, kp + kv0, vp + kv0, ldk, s_n, kvh * group, group,
                                 h_n, dh, static_cast<float>(scale), sk, av);
          for (int64_t j = 0; j < s_n; ++j)
            for (int64_t i = 0; i < dh; ++i) {
              const int64_t at = ((b * s_n + j) * hkv + kvh) * dh + i;
              dkp[at] = static_cast<float>(w.dkat[size_t(i * w.ldt + j)]);
              dvp[at] = w.dvt[size_t(i * w.ldt + j)];
            }
        }
    }
  } else {
#pragma omp parallel if(b_n * h_n * s_n * s_n * dh > 32768)
    {
      // Per thread: the kv head's dK accumulator (f64) and dV accumulator (f32), and one query
      // tile's Q (f64), scores and dP (f32), P (f32 and f64) and dS (f32 and f64).
      const size_t kv_n = static_cast<size_t>(s_n * dh), tq = static_cast<size_t>(tile), sq = tq * size_t(s_n);
      std::vector<double> dka(kv_n), qt(tq * size_t(dh)), pd(sq), dsd(sq);
      std::vector<float> dva(kv_n), sc(sq), dpt(sq), pf(sq), dsf(sq);
#pragma omp for collapse(2) schedule(dynamic, 1)
      for (int64_t b = 0; b < b_n; ++b)
        for (int64_t kvh = 0; kvh < hkv; ++kvh) {
          const float* kb = kp + (b * s_n * hkv + kvh) * dh;  // key row j at kb + j * ldk
          const float* vb = vp + (b * s_n * hkv + kvh) * dh;
          std::fill(dka.begin(), dka.end(), 0.0);
          std::fill(dva.begin(), dva.end(), 0.0f);
          for (int64_t h = kvh * group; h < (kvh + 1) * group; ++h)
            for (int64_t s0 = 0; s0 < s_n; s0 += tile) {
              const int64_t nq = std::min(tile, s_n - s0), nk = s0 + nq;  // keys 0..nk-1 are visible to the tile
              const float* qb = qp + ((b * s_n + s0) * h_n + h) * dh;   // query row r at qb + r * ldq
              const float* gb = gp + ((b * s_n + s0) * h_n + h) * dh;
              for (int64_t r = 0; r < nq; ++r)
                for (int64_t i = 0; i < dh; ++i) qt[size_t(r * dh + i)] = qb[r * ldq + i];
              // scores = Q Kᵀ and dP = dO Vᵀ over the visible keys
              cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nq, (int)nk, (int)dh, 1.0f, qb, (int)ldq, kb,
                          (int)ldk, 0.0f, sc.data(), (int)nk);
              cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nq, (int)nk, (int)dh, 1.0f, gb, (int)ldq, vb,
                          (int)ldk, 0.0f, dpt.data(), (int)nk);
              for (int64_t r = 0; r < nq; ++r) {
                double* pr = pd.data() + r * nk;
                double* dr = dsd.data() + r * nk;
                const float* sr = sc.data() + r * nk;
                const float* dpr = dpt.data() + r * nk;
                const int64_t last = s0 + r, first = av.first_key(last);  // causal: keys first..last
                double mx = sk.empty() ? -INFINITY : sk[size_t(h)];
                for (int64_t j = first; j <= last; ++j) {
                  pr[j] = sr[j];
                  mx = std::max(mx, pr[j] * scale);
                }
                exp_scaled_row(pr, nk, first, last, scale, mx);
                double sum = sk.empty() ? 0.0 : std::exp(sk[size_t(h)] - mx);
                for (int64_t j = first; j <= last; ++j) sum += pr[j];
                const double inv = 1.0 / sum;
                double dl = 0;
                for (int64_t j = first; j <= last; ++j) {
                  pr[j] *= inv;
                  dl += pr[j] * dpr[j];
                }
                float* pfr = pf.data() + r * nk;
                float* dsr = dsf.data() + r * nk;
                for (int64_t j = 0; j < nk; ++j) {
                  dr[j] = pr[j] * (dpr[j] - dl) * scale;
                  pfr[j] = static_cast<float>(pr[j]);
                  dsr[j] = static_cast<float>(dr[j]);
                }
              }
              // dQ = dS K (into dq's rows);  dK += dSᵀ Q (f64);  dV += Pᵀ dO
              cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)nq, (int)dh, (int)nk, 1.0f, dsf.data(),
                          (int)nk, kb, (int)ldk, 0.0f, dqp + ((b * s_n + s0) * h_n + h) * dh, (int)ldq);
              cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)nk, (int)dh, (int)nq, 1.0, dsd.data(), (int)nk,
                          qt.data(), (int)dh, 1.0, dka.data(), (int)dh);
              cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)nk, (int)dh, (int)nq, 1.0f, pf.data(), (int)nk,
                          gb, (int)ldq, 1.0f, dva.data(), (int)dh);
            }
          for (int64_t j = 0; j < s_n; ++j)
            for (int64_t i = 0; i < dh; ++i) {
              const int64_t at = ((b * s_n + j) * hkv + kvh) * dh + i;
              dkp[at] = static_cast<float>(dka[size_t(j * dh + i)]);
              dvp[at] = dva[size_t(j * dh + i)];
            }
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
