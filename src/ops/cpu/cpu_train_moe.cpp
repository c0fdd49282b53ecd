// cpu_train_moe.cpp — CPU kernels of the MoE block's training ops: router top-k backward, the
// balancing-loss statistics and gradients, the routing-weight scatter, and the grouped SwiGLU
// experts' forward (saving h1/h3) and backward over the experts that received rows.
//
// The experts' SwiGLU element work (a sigmoid per element, three passes per step) runs eight
// lanes at a time with its own e^x where the build has AVX2 (with scalar expf it took a fifth
// of the experts' time next to their GEMMs at the small preset's shapes); it computes the same
// formulas as the scalar loops, with an e^x (cpu_simd_exp.h) that rounds as expf does on all but
// 0.008% of inputs.
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "ops/backend.h"
#include "ops/cpu/cpu_gemm.h"
#include "ops/cpu/cpu_glu.h"
#include "ops/cpu/cpu_lora.h"
#include "ops/cpu/cpu_simd_exp.h"

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
constexpr int64_t kPieceRows = 256;  // the training forward's largest piece of an expert's rows

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
  // dtype_nbytes: NF4 experts are whole blocks per row, so expert e starts on a block.
  return {static_cast<const char*>(w1.raw()) + dtype_nbytes(w1.dtype(), e * f * d),
          static_cast<const char*>(w3.raw()) + dtype_nbytes(w3.dtype(), e * f * d),
          static_cast<const char*>(w2.raw()) + dtype_nbytes(w2.dtype(), e * d * f)};
}

// One row of F of the SwiGLU backward, with da = du · s:
//   dh1 = da · h3 · silu'(h1), silu'(v) = sig(v) · (1 + v · (1 - sig(v)));  dh3 = da · silu(h1).
// dh1 goes to `dh1`, dh3 over du; returns Σ du · silu(h1) · h3 (f64), the row scale's gradient.
// u, when given, receives the down projection's input silu(h1) · h3 · s (its sigmoid once for
// both, not a pass of its own). The sigmoid is sigmoid8f's: a derivative needs no expf rounding.
double swiglu_backward_row(float* dh1, float* du, const float* h1, const float* h3, float s, int64_t f, float* u) {
  int64_t i = 0;
  double dot = 0;
#if defined(__AVX2__) && defined(__FMA__)
  const __m256 sv = _mm256_set1_ps(s), one = _mm256_set1_ps(1.0f);
  __m256d acc0 = _mm256_setzero_pd(), acc1 = _mm256_setzero_pd();
  for (; i + 8 <= f; i += 8) {
    const __m256 v = _mm256_loadu_ps(h1 + i), g3 = _mm256_loadu_ps(h3 + i), d = _mm256_loadu_ps(du + i);
    const __m256 sg = sigmoid8f(v), silu = _mm256_mul_ps(v, sg);
    // du · silu · h3 in f64, as the scalar loop.
    acc0 = _mm256_add_pd(acc0, _mm256_mul_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(d)),
                                                          _mm256_cvtps_pd(_mm256_castps256_ps128(silu))),
                                            _mm256_cvtps_pd(_mm256_castps256_ps128(g3))));
    acc1 = _mm256_add_pd(acc1, _mm256_mul_pd(_mm256_mul_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(d, 1)),
                                                          _mm256_cvtps_pd(_mm256_extractf128_ps(silu, 1))),
                                            _mm256_cvtps_pd(_mm256_extractf128_ps(g3, 1))));
    const __m256 da = _mm256_mul_ps(d, sv);
    const __m256 dsilu = _mm256_fmadd_ps(v, _mm256_sub_ps(one, sg), one);
    _mm256_storeu_ps(dh1 + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(da, g3), sg), dsilu));
    _mm256_storeu_ps(du + i, _mm256_mul_ps(da, silu));
    if (u) _mm256_storeu_ps(u + i, _mm256_mul_ps(_mm256_mul_ps(silu, g3), sv));
  }
  dot = hsum4(_mm256_add_pd(acc0, acc1));
#endif
  for (; i < f; ++i) {
    const float v = h1[i], sg = sigmoid(v), silu = v * sg;
    dot += double(du[i]) * silu * h3[i];
    const float da = du[i] * s;
    dh1[i] = da * h3[i] * sg * (1.0f + v * (1.0f - sg));
    du[i] = da * silu;
    if (u) u[i] = silu * h3[i] * s;
  }
  return dot;
}

// Expert e's factors of a stacked adapter (in -> out) as raw pointers; a == nullptr: off.
struct ExpertFactors {
  const float* a = nullptr;
  const float* b = nullptr;
  float* da = nullptr;
  float* db = nullptr;
  float scale = 0;
  int64_t r = 0;
  float dropout = 0;
  uint64_t seed = 0;
  // Dropout of the expert's rows starting at permuted row r0 (the mask indexes global rows).
  LoraDrop at(int64_t r0) const { return {dropout, seed, r0}; }
};

ExpertFactors expert_factors(const Lora& l, const Lora* g, int64_t e, int64_t in, int64_t out) {
  ExpertFactors f;
  if (!l.on()) return f;
  f.r = l.a.dim(1);
  f.scale = l.scale;
  f.dropout = l.dropout;
  f.seed = l.seed;
  f.a = l.a.data<float>() + e * f.r * in;
  f.b = l.b.data<float>() + e * out * f.r;
  if (g && g->a.defined()) f.da = g->a.data<float>() + e * f.r * in;
  if (g && g->b.defined()) f.db = g->b.data<float>() + e * out * f.r;
  return f;
}

int64_t max_rank(const ExpertLora& l) {
  int64_t r = 1;
  for (const Lora* p : {&l.w1, &l.w3, &l.w2})
    if (p->on()) r = std::max(r, p->a.dim(1));
  return r;
}

// One row of the gated activation under a variant: a = act(h1, h3) · s (swiglu_row when plain,
// with sigmoid8f as the backward's; inference's rows keep sigmoid8).
void glu_row(float* a, const float* h1, const float* h3, float s, int64_t f, const ExpertGlu& glu) {
  if (glu.plain()) return swiglu_row<false>(a, h1, h3, s, f);
  for (int64_t i = 0; i < f; ++i) a[i] = glu_act(h1[i], h3[i], glu) * s;
}

// swiglu_backward_row under a variant: dh1 to `dh1`, dh3 over du; returns Σ du · act (f64);
// u, when given, receives act · s.
double glu_backward_row(float* dh1, float* du, const float* h1, const float* h3, float s, int64_t f,
                        const ExpertGlu& glu, float* u) {
  if (glu.plain()) return swiglu_backward_row(dh1, du, h1, h3, s, f, u);
  double dot = 0;
  for (int64_t i = 0; i < f; ++i) {
    float d1, d3;
    glu_grad(h1[i], h3[i], glu, &d1, &d3);
    const float act = glu_act(h1[i], h3[i], glu);
    dot += double(du[i]) * act;
    const float da = du[i] * s;
    dh1[i] = da * d1;
    du[i] = da * d3;
    if (u) u[i] = act * s;
  }
  return dot;
}

// Saved pre-activations in bf16: dst := bf16(src) and src := the rounded values, n elements.
void store_bf16_rounded(uint16_t* dst, float* src, int64_t n) {
  convert_from_f32(dst, src, DType::BF16, size_t(n));
  convert_to_f32(src, dst, DType::BF16, size_t(n));
}

// One row of saved pre-activations as f32: the row itself, or (bf16) its values widened into
// slot `slot` (f floats each) of buf.
const float* saved_row(const Tensor& h, int64_t row, int64_t f, std::vector<float>& buf, int slot) {
  if (h.dtype() == DType::F32) return h.data<float>() + row * f;
  float* dst = buf.data() + slot * f;
  convert_to_f32(dst, static_cast<const uint16_t*>(h.raw()) + row * f, DType::BF16, size_t(f));
  return dst;
}

// A count of scratch rows rounded up to a power of two (at least 64): the experts' scratch is
// sized by it (max_rows; the forward's pieces), and the allocator keeps freed blocks for
// requests of the same size only — sized exactly, each layer and each step (the routing moves
// the maximum) asked for a new size, and the misses mapped and faulted in ~24 blocks a step
// (small preset) and evicted the blocks of the same sizes the rest of the step reuses.
// Untouched pages of the rounding cost no resident memory (large blocks are mapped).
int64_t steady_rows(int64_t m) {
  int64_t r = 64;
  while (r < m) r *= 2;
  return r;
}

// The most rows any expert has, as steady_rows.
int64_t max_rows(const int32_t* off, int64_t e_n) {
  int64_t m = 0;
  for (int64_t e = 0; e < e_n; ++e) m = std::max<int64_t>(m, off[e + 1] - off[e]);
  return steady_rows(m);
}

// The experts' rows cut into pieces — an expert's rows whole, or in equal parts of at most
// kPieceRows — largest first (the order threads take them), and the largest piece as
// steady_rows (each thread's scratch rows).
struct Piece {
  int64_t e, r0, n;  // expert, first (permuted) row, rows
};
std::vector<Piece> expert_pieces(const int32_t* off, int64_t e_n, int64_t* piece_rows) {
  std::vector<Piece> pieces;
  int64_t most = 1;
  for (int64_t e = 0; e < e_n; ++e) {
    const int64_t ne = off[e + 1] - off[e], parts = (ne + kPieceRows - 1) / kPieceRows;
    for (int64_t j = 0; j < parts; ++j) {
      const int64_t p0 = ne * j / parts, p1 = ne * (j + 1) / parts;
      pieces.push_back({e, off[e] + p0, p1 - p0});
      most = std::max(most, p1 - p0);
    }
  }
  std::stable_sort(pieces.begin(), pieces.end(), [](const Piece& a, const Piece& b) { return a.n > b.n; });
  *piece_rows = steady_rows(most);
  return pieces;
}

}  // namespace

// The experts run in one parallel region: BLAS called inside it runs single-threaded
// (OpenBLAS's OpenMP build), so each thread multiplies its own share with no hand-off between
// the OpenMP and BLAS pools and no barrier per product. At the small preset's shapes (~256
// rows per expert, F 768, D 256) a 2-thread BLAS call per product, one expert after another,
// spent a third of the experts' time outside the GEMM kernel.
//
// Forward: every row is independent, so the rows are cut into pieces — an expert's rows whole, or
// in equal parts of at most kPieceRows — and the threads take pieces largest first through
// gate/up, the GLU and down. Whole experts rather than each thread a share of every expert:
// each product is twice as tall (a 256-row bf16 product ran ~15% faster than a 128-row one)
// and each expert's weights are packed for the matrix units once, not once per thread.
void expert_ffn_forward_train(Tensor& yp, Tensor& h1, Tensor& h3, const Tensor& xp, const Tensor& offsets,
                              const Tensor& w1, const Tensor& w3, const Tensor& w2, const Tensor& row_scale,
                              const ExpertLora& lora, const ExpertGlu& glu, const ExpertBias& bias) {
  const int64_t e_n = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  const int32_t* off = offsets.data<int32_t>();
  const float* rs = row_scale.defined() ? row_scale.data<float>() : nullptr;
  // Scratch: each thread its own piece's rows (threads do not wait for each other between
  // pieces).
  int64_t piece_rows = 1;
  const std::vector<Piece> pieces = expert_pieces(off, e_n, &piece_rows);
  const int64_t max_threads = omp_get_max_threads(), n_pieces = int64_t(pieces.size());
  Tensor act = Tensor::empty({max_threads * piece_rows, f}, DType::F32, MemCategory::Workspace);
  // bf16 saved pre-activations (mixed precision): the products land in f32 scratch, are rounded
  // to bf16 there and stored; the GLU reads the rounded values, so the forward computes exactly
  // the function whose gradient the backward takes from what was saved.
  const bool h_bf16 = h1.dtype() == DType::BF16;
  Tensor hs = h_bf16 ? Tensor::empty({max_threads * piece_rows, 2 * f}, DType::F32, MemCategory::Workspace) : Tensor();
  const int64_t rk = lora.any() ? max_rank(lora) : 0;
  Tensor lu = rk ? Tensor::empty({max_threads * piece_rows, rk}, DType::F32, MemCategory::Workspace) : Tensor();
  const int64_t total = off[e_n] - off[0];
#pragma omp parallel if(total * f > kPar)
  {
    const int64_t tid = omp_get_thread_num();
    std::vector<float> bb(static_cast<size_t>(bias.any() ? 2 * f + d : 0));
#pragma omp for schedule(dynamic, 1)
    for (int64_t pi = 0; pi < n_pieces; ++pi) {
      const int64_t e = pieces[size_t(pi)].e, r0 = pieces[size_t(pi)].r0, n = pieces[size_t(pi)].n;
      const ExpertView w = expert_view(w1, w3, w2, e);
      const float* x = xp.data<float>() + r0 * d;
      float* g1 = h_bf16 ? hs.data<float>() + tid * piece_rows * 2 * f : h1.data<float>() + r0 * f;
      float* g3 = h_bf16 ? g1 + piece_rows * f : h3.data<float>() + r0 * f;
      float* a = act.data<float>() + tid * piece_rows * f;
      float* lus = rk ? lu.data<float>() + tid * piece_rows * rk : nullptr;
      gemm_xwt(g1, f, x, w.w1, w1.dtype(), n, f, d, false);
      gemm_xwt(g3, f, x, w.w3, w3.dtype(), n, f, d, false);
      const ExpertFactors l1 = expert_factors(lora.w1, nullptr, e, d, f), l3 = expert_factors(lora.w3, nullptr, e, d, f);
      if (l1.a) lora_rows_forward(g1, f, x, d, l1.a, l1.b, l1.scale, n, f, d, l1.r, lus, l1.at(r0));
      if (l3.a) lora_rows_forward(g3, f, x, d, l3.a, l3.b, l3.scale, n, f, d, l3.r, lus, l3.at(r0));
      // Biases join the saved pre-activations (backward differentiates the activation at them).
      for (auto [bt, g] : {std::pair{&bias.b1, g1}, {&bias.b3, g3}}) {
        if (!bt->defined()) continue;
        bias_row(bb.data(), *bt, e, f);
        for (int64_t r = 0; r < n; ++r)
          for (int64_t i = 0; i < f; ++i) g[r * f + i] += bb[size_t(i)];
      }
      if (h_bf16) {
        store_bf16_rounded(static_cast<uint16_t*>(h1.raw()) + r0 * f, g1, n * f);
        store_bf16_rounded(static_cast<uint16_t*>(h3.raw()) + r0 * f, g3, n * f);
      }
      for (int64_t r = 0; r < n; ++r) glu_row(a + r * f, g1 + r * f, g3 + r * f, rs ? rs[r0 + r] : 1.0f, f, glu);
      float* y = yp.data<float>() + r0 * d;
      gemm_xwt(y, d, a, w.w2, w2.dtype(), n, d, f, false);
      const ExpertFactors l2 = expert_factors(lora.w2, nullptr, e, f, d);
      if (l2.a) lora_rows_forward(y, d, a, f, l2.a, l2.b, l2.scale, n, d, f, l2.r, lus, l2.at(r0));
      if (bias.b2.defined()) {
        bias_row(bb.data(), bias.b2, e, d);
        for (int64_t r = 0; r < n; ++r) {
          const float sc = rs ? rs[r0 + r] : 1.0f;
          for (int64_t i = 0; i < d; ++i) y[r * d + i] += sc * bb[size_t(i)];
        }
      }
    }
  }
}

// Backward, per expert, in two phases of the one parallel region:
//   rows (each thread its share of the expert's rows): u = act(h1, h3)·s recomputed,
//     du = dy·w2, the GLU backward into dh1 and dh3 (over du), the row scales' gradient, and
//     dx = dh1·w1 + dh3·w3 — every output is per row;
//   weights (after a barrier; tasks over slices of the gradients' rows): dw2 += dyᵀu,
//     dw1 += dh1ᵀx, dw3 += dh3ᵀx (= under assign_dw), the adapters' factor gradients, the bias
//     sums — each a sum over all the expert's rows, written by one thread per slice.
void expert_ffn_backward(Tensor& dxp, Tensor& dw1, Tensor& dw3, Tensor& dw2, Tensor& drow_scale, const Tensor& dyp,
                         const Tensor& xp, const Tensor& h1, const Tensor& h3, const Tensor& offsets,
                         const Tensor& w1, const Tensor& w3, const Tensor& w2, const Tensor& row_scale,
                         const ExpertLora& lora, ExpertLora* dlora, const ExpertGlu& glu, const ExpertBias& bias,
                         ExpertBias* dbias, bool assign_dw) {
  const int64_t e_n = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  const int32_t* off = offsets.data<int32_t>();
  const float* rs = row_scale.defined() ? row_scale.data<float>() : nullptr;
  float* db1 = dbias && dbias->b1.defined() ? dbias->b1.data<float>() : nullptr;
  float* db3 = dbias && dbias->b3.defined() ? dbias->b3.data<float>() : nullptr;
  float* db2 = dbias && dbias->b2.defined() ? dbias->b2.data<float>() : nullptr;
  // Frozen experts (no weight, adapter or bias gradients: LoRA on attention alone) have no
  // weights phase: their rows go in the forward's pieces, below.
  const bool rows_only = !dw1.defined() && !dw3.defined() && !dw2.defined() && !lora.any() && !db1 && !db3 && !db2;
  int64_t piece_rows = 0;
  const std::vector<Piece> pieces = rows_only ? expert_pieces(off, e_n, &piece_rows) : std::vector<Piece>();
  // The scratch never shrinks (the process's largest so far): a layer's experts taken one call
  // at a time (ffn_block.h, per_expert) ask for their own row counts, and each new size cost a
  // fresh mapping faulted in (~1.5 ms a call at the small preset's shapes, measured). Rows only:
  // each thread a piece's rows.
  static std::atomic<int64_t> rows_high{1};
  int64_t rows = rows_only ? omp_get_max_threads() * piece_rows
                           : std::max<int64_t>(max_rows(off, e_n), rows_high.load(std::memory_order_relaxed));
  for (int64_t seen = rows_high.load(std::memory_order_relaxed); !rows_only && seen < rows;)
    if (rows_high.compare_exchange_weak(seen, rows, std::memory_order_relaxed)) break;
  // LoRA scratch: u = x aᵀ and v = dy b, [rows, r] each (rows phase: the thread's rows; weights
  // phase: the task's own pair, per adapter).
  const int64_t rk = lora.any() ? max_rank(lora) : 0;
  Tensor lu = rk ? Tensor::empty({4 * rows, rk}, DType::F32, MemCategory::Workspace) : Tensor();
  Tensor lv = rk ? Tensor::empty({4 * rows, rk}, DType::F32, MemCategory::Workspace) : Tensor();
  // Scratch [rows, F] each: u (the down projection's input, when wanted), dh1, du (then dh3).
  const bool need_u = dw2.defined() || lora.w2.on();
  Tensor s0 = need_u ? Tensor::empty({rows, f}, DType::F32, MemCategory::Workspace) : Tensor();
  Tensor s1 = Tensor::empty({rows, f}, DType::F32, MemCategory::Workspace);
  Tensor s2 = Tensor::empty({rows, f}, DType::F32, MemCategory::Workspace);
  float* ub = need_u ? s0.data<float>() : nullptr;
  float* dh1b = s1.data<float>();
  float* dub = s2.data<float>();
  const int64_t total = off[e_n] - off[0];
  // Rows [k0, k0 + n) of expert e's rows: u (when wanted), du, dh1 and dh3, the row scales'
  // gradient and dx, through the thread's scratch rows u, dh1, du, lus, lvs and its row buffers
  // b2row (the down bias, filled here) and hrow (bf16 rows widened).
  auto rows_backward = [&](int64_t e, int64_t k0, int64_t n, float* u, float* dh1, float* du, float* lus, float* lvs,
                           std::vector<float>& b2row, std::vector<float>& hrow) {
    const int64_t r0 = off[e] + k0;
    const ExpertView w = expert_view(w1, w3, w2, e);
    const ExpertFactors l1 = expert_factors(lora.w1, nullptr, e, d, f), l3 = expert_factors(lora.w3, nullptr, e, d, f);
    const ExpertFactors l2 = expert_factors(lora.w2, nullptr, e, f, d);
    const float* g = dyp.data<float>() + r0 * d;
    // u comes with the GLU backward's rows below, unless the down projection's adapter reads it
    // before them (its input under dropout).
    const bool u_first = need_u && l2.a;
    if (u_first)
      for (int64_t r = 0; r < n; ++r)
        glu_row(u + r * f, saved_row(h1, r0 + r, f, hrow, 0), saved_row(h3, r0 + r, f, hrow, 1),
                rs ? rs[r0 + r] : 1.0f, f, glu);
    gemm_xw(du, g, w.w2, w2.dtype(), n, d, f, false);
    if (l2.a)
      lora_rows_backward(du, f, nullptr, nullptr, g, d, u, f, l2.a, l2.b, l2.scale, n, d, f, l2.r, lus, lvs, l2.at(r0));
    float* drs = drow_scale.defined() ? drow_scale.data<float>() + r0 : nullptr;
    if (!b2row.empty()) bias_row(b2row.data(), bias.b2, e, d);
    for (int64_t r = 0; r < n; ++r) {
      double dot = glu_backward_row(dh1 + r * f, du + r * f, saved_row(h1, r0 + r, f, hrow, 0),
                                    saved_row(h3, r0 + r, f, hrow, 1), rs ? rs[r0 + r] : 1.0f, f, glu,
                                    need_u && !u_first ? u + r * f : nullptr);
      // y = s · (a w2ᵀ + b2): the row scale also multiplies the down bias.
      for (int64_t i = 0; i < int64_t(b2row.size()); ++i) dot += double(g[r * d + i]) * b2row[size_t(i)];
      if (drs) drs[r] = static_cast<float>(dot);
    }
    const float* x = xp.data<float>() + r0 * d;
    float* dx = dxp.data<float>() + r0 * d;
    gemm_xw(dx, dh1, w.w1, w1.dtype(), n, f, d, false);
    gemm_xw(dx, du, w.w3, w3.dtype(), n, f, d, true);
    if (l1.a)
      lora_rows_backward(dx, d, nullptr, nullptr, dh1, f, x, d, l1.a, l1.b, l1.scale, n, f, d, l1.r, lus, lvs, l1.at(r0));
    if (l3.a)
      lora_rows_backward(dx, d, nullptr, nullptr, du, f, x, d, l3.a, l3.b, l3.scale, n, f, d, l3.r, lus, lvs, l3.at(r0));
  };
  if (rows_only) {
    // Every output is per row: the pieces go largest first to whichever thread is free, with no
    // barrier between experts, each product as tall as the forward's (whole experts' rows up to
    // kPieceRows, not a thread's half of them) and each expert's weights read by one thread.
#pragma omp parallel if(total * f > kPar)
    {
      const int64_t tid = omp_get_thread_num();
      std::vector<float> b2row(static_cast<size_t>(bias.b2.defined() ? d : 0));
      std::vector<float> hrow(static_cast<size_t>(h1.dtype() == DType::F32 ? 0 : 2 * f));
#pragma omp for schedule(dynamic, 1)
      for (size_t pi = 0; pi < pieces.size(); ++pi) {
        const Piece& pc = pieces[pi];
        rows_backward(pc.e, pc.r0 - off[pc.e], pc.n, nullptr, dh1b + tid * piece_rows * f,
                      dub + tid * piece_rows * f, nullptr, nullptr, b2row, hrow);
      }
    }
    return;
  }
#pragma omp parallel if(total * f > kPar)
  {
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    std::vector<float> b2row(static_cast<size_t>(bias.b2.defined() ? d : 0));
    std::vector<float> hrow(static_cast<size_t>(h1.dtype() == DType::F32 ? 0 : 2 * f));  // bf16 rows widened
    for (int64_t e = 0; e < e_n; ++e) {
      const int64_t ne = off[e + 1] - off[e];
      if (ne == 0) continue;
      const int64_t e0 = off[e];
      const ExpertFactors l1 = expert_factors(lora.w1, dlora ? &dlora->w1 : nullptr, e, d, f);
      const ExpertFactors l3 = expert_factors(lora.w3, dlora ? &dlora->w3 : nullptr, e, d, f);
      const ExpertFactors l2 = expert_factors(lora.w2, dlora ? &dlora->w2 : nullptr, e, f, d);
      // ---- rows ----
      const int64_t p0 = ne * tid / nt, p1 = ne * (tid + 1) / nt;
      if (p1 > p0)
        rows_backward(e, p0, p1 - p0, ub + p0 * f, dh1b + p0 * f, dub + p0 * f, rk ? lu.data<float>() + p0 * rk : nullptr,
                      rk ? lv.data<float>() + p0 * rk : nullptr, b2row, hrow);
#pragma omp barrier
      // ---- weights: nt slices of each weight gradient's rows, then the adapters and biases ----
      const float* x = xp.data<float>() + e0 * d;
      const float* g = dyp.data<float>() + e0 * d;
      const int64_t n_w = 3 * nt, n_tasks = n_w + 4;
#pragma omp for schedule(dynamic, 1)
      for (int64_t task = 0; task < n_tasks; ++task) {
        if (task < n_w) {
          const int64_t which = task / nt, sl = task % nt;
          if (which == 0 && dw2.defined()) {  // dw2 [D, F] += dyᵀ u: rows of dw2 are columns of dy
            const int64_t q0 = d * sl / nt, q1 = d * (sl + 1) / nt;
            gemm_atb(dw2.data<float>() + (e * d + q0) * f, f, g + q0, d, ub, w2.dtype(), ne, q1 - q0, f, !assign_dw);
          } else if (which == 1 && dw1.defined()) {  // dw1 [F, D] += dh1ᵀ x
            const int64_t q0 = f * sl / nt, q1 = f * (sl + 1) / nt;
            gemm_atb(dw1.data<float>() + (e * f + q0) * d, d, dh1b + q0, f, x, w1.dtype(), ne, q1 - q0, d, !assign_dw);
          } else if (which == 2 && dw3.defined()) {  // dw3 [F, D] += dh3ᵀ x
            const int64_t q0 = f * sl / nt, q1 = f * (sl + 1) / nt;
            gemm_atb(dw3.data<float>() + (e * f + q0) * d, d, dub + q0, f, x, w3.dtype(), ne, q1 - q0, d, !assign_dw);
          }
          continue;
        }
        // Each adapter task has its own rows of the LoRA scratch (tasks run concurrently).
        const int64_t slot = task - n_w;
        float* lus = rk ? lu.data<float>() + slot * rows * rk : nullptr;
        float* lvs = rk ? lv.data<float>() + slot * rows * rk : nullptr;
        if (slot == 0 && l2.a && (l2.da || l2.db))
          lora_rows_backward(nullptr, 0, l2.da, l2.db, g, d, ub, f, l2.a, l2.b, l2.scale, ne, d, f, l2.r, lus, lvs,
                             l2.at(e0));
        if (slot == 1 && l1.a && (l1.da || l1.db))
          lora_rows_backward(nullptr, 0, l1.da, l1.db, dh1b, f, x, d, l1.a, l1.b, l1.scale, ne, f, d, l1.r, lus, lvs,
                             l1.at(e0));
        if (slot == 2 && l3.a && (l3.da || l3.db))
          lora_rows_backward(nullptr, 0, l3.da, l3.db, dub, f, x, d, l3.a, l3.b, l3.scale, ne, f, d, l3.r, lus, lvs,
                             l3.at(e0));
        if (slot == 3) {
          // Bias gradients: db1, db3 sum dh1, dh3; db2 sums s · dyp.
          for (int64_t r = 0; r < ne; ++r) {
            if (db1)
              for (int64_t i = 0; i < f; ++i) db1[e * f + i] += dh1b[r * f + i];
            if (db3)
              for (int64_t i = 0; i < f; ++i) db3[e * f + i] += dub[r * f + i];
            if (db2) {
              const float sc = rs ? rs[e0 + r] : 1.0f;
              for (int64_t i = 0; i < d; ++i) db2[e * d + i] += sc * g[r * d + i];
            }
          }
        }
      }
      // (the loop's implicit barrier: the next expert's rows phase reuses the scratch)
    }
  }
}

}  // namespace cpu
}  // namespace moe
