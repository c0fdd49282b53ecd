// ref_kernels.cpp — the naive reference maths (ref_kernels.h): plain loops in double, written
// from the op comments in ops.h. Clarity over speed: no blocking, no threads, no intrinsics.
#include "ops/ref/ref_kernels.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/lora.h"

namespace moe {
namespace ref {
namespace f64 {
namespace {

double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }
double silu(double x) { return x * sigmoid(x); }
// d/dx silu(x) = sigmoid(x) * (1 + x * (1 - sigmoid(x))).
double silu_grad(double x) {
  const double s = sigmoid(x);
  return s * (1.0 + x * (1.0 - s));
}

// log sum_e exp(l[e]) over n values, max-shifted.
double logsumexp(const double* l, int64_t n) {
  double mx = -INFINITY;
  for (int64_t i = 0; i < n; ++i) mx = std::max(mx, l[i]);
  double sum = 0;
  for (int64_t i = 0; i < n; ++i) sum += std::exp(l[i] - mx);
  return mx + std::log(sum);
}

// p [n] = softmax(l [n]).
void softmax(double* p, const double* l, int64_t n) {
  const double lse = logsumexp(l, n);
  for (int64_t i = 0; i < n; ++i) p[i] = std::exp(l[i] - lse);
}

// Rotary angle of pair i at position pos: pos * theta^(-2i/Dh).
double rope_angle(int64_t pos, int64_t i, int64_t dh, double theta) {
  return double(pos) * std::pow(theta, -double(2 * i) / double(dh));
}

// Rotates every (i, i+Dh/2) pair of x [B,S,H,Dh] by +angle (sign 1) or -angle (sign -1).
void rope_rotate(double* x, int64_t b_n, int64_t s_n, int64_t h_n, int64_t dh, int64_t past, double theta,
                 double sign) {
  const int64_t half = dh / 2;
  for (int64_t b = 0; b < b_n; ++b)
    for (int64_t s = 0; s < s_n; ++s)
      for (int64_t h = 0; h < h_n; ++h) {
        double* v = x + ((b * s_n + s) * h_n + h) * dh;
        for (int64_t i = 0; i < half; ++i) {
          const double ang = rope_angle(past + s, i, dh, theta);
          const double c = std::cos(ang), sn = sign * std::sin(ang);
          const double a = v[i], bb = v[i + half];
          v[i] = a * c - bb * sn;
          v[i + half] = bb * c + a * sn;
        }
      }
}

double dot(const double* a, const double* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// The gated activation and its partial derivatives (GluF64; limit 0: silu(h1)·h3).
double glu(double h1, double h3, const GluF64& g) {
  if (g.limit == 0) return silu(h1) * h3;
  const double x = std::min(h1, g.limit), u = std::clamp(h3, -g.limit, g.limit);
  return x * sigmoid(g.alpha * x) * (u + 1.0);
}
void glu_grad(double h1, double h3, const GluF64& g, double* d1, double* d3) {
  if (g.limit == 0) {
    *d1 = h3 * silu_grad(h1);
    *d3 = silu(h1);
    return;
  }
  const double x = std::min(h1, g.limit), u = std::clamp(h3, -g.limit, g.limit), sg = sigmoid(g.alpha * x);
  *d1 = h1 <= g.limit ? sg * (1.0 + g.alpha * x * (1.0 - sg)) * (u + 1.0) : 0.0;
  *d3 = h3 >= -g.limit && h3 <= g.limit ? x * sg : 0.0;
}

// First key visible from position pos under a window (0: none).
int64_t first_key(int64_t pos, int64_t window) { return window > 0 ? std::max<int64_t>(0, pos - window + 1) : 0; }

}  // namespace

void rope_rotate_table(double* x, int64_t b_n, int64_t s_n, int64_t h_n, int64_t dh, int64_t past,
                       const double* inv_freq, double factor, double sign, bool interleaved) {
  const int64_t half = dh / 2;
  for (int64_t b = 0; b < b_n; ++b)
    for (int64_t s = 0; s < s_n; ++s)
      for (int64_t h = 0; h < h_n; ++h) {
        double* v = x + ((b * s_n + s) * h_n + h) * dh;
        for (int64_t i = 0; i < half; ++i) {
          const double ang = double(past + s) * inv_freq[i];
          const double c = factor * std::cos(ang), sn = sign * factor * std::sin(ang);
          const int64_t i0 = interleaved ? 2 * i : i, i1 = interleaved ? 2 * i + 1 : i + half;
          const double a = v[i0], bb = v[i1];
          v[i0] = a * c - bb * sn;
          v[i1] = bb * c + a * sn;
        }
      }
}

// ---- forward ----

void embedding_forward(double* out, const int32_t* ids, const double* table, int64_t t_n, int64_t v, int64_t d) {
  for (int64_t t = 0; t < t_n; ++t) {
    MOE_CHECK(ids[t] >= 0 && ids[t] < v, "embedding: token id %d out of range [0,%lld)", ids[t], (long long)v);
    for (int64_t i = 0; i < d; ++i) out[t * d + i] = table[int64_t(ids[t]) * d + i];
  }
}

void rmsnorm_forward(double* out, double* rstd, const double* x, const double* w, double eps, int64_t n,
                     int64_t d) {
  for (int64_t r = 0; r < n; ++r) {
    const double inv = 1.0 / std::sqrt(dot(x + r * d, x + r * d, d) / double(d) + eps);
    if (rstd) rstd[r] = inv;
    for (int64_t i = 0; i < d; ++i) out[r * d + i] = x[r * d + i] * inv * w[i];
  }
}

void linear_forward(double* out, const double* x, const double* w, const double* bias, int64_t n, int64_t m,
                    int64_t kd) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t c = 0; c < m; ++c) out[r * m + c] = dot(x + r * kd, w + c * kd, kd) + (bias ? bias[c] : 0.0);
}

void rope_forward(double* x, int64_t b_n, int64_t s_n, int64_t h_n, int64_t dh, int64_t past, double theta) {
  rope_rotate(x, b_n, s_n, h_n, dh, past, theta, 1.0);
}

void attention_forward(double* out, const double* q, const double* k_cache, const double* v_cache, int64_t b_n,
                       int64_t s_n, int64_t h_n, int64_t hkv, int64_t dh, int64_t cap, int64_t past,
                       const AttnF64& av) {
  const double scale = av.scale != 0 ? av.scale : 1.0 / std::sqrt(double(dh));
  const int64_t group = h_n / hkv;
  // Scores of the visible keys, then the sink as one more column (dropped after the softmax).
  std::vector<double> sc_buf(static_cast<size_t>(past + s_n + 1));
  double* sc = sc_buf.data();
  for (int64_t b = 0; b < b_n; ++b)
    for (int64_t s = 0; s < s_n; ++s)
      for (int64_t h = 0; h < h_n; ++h) {
        const double* qr = q + ((b * s_n + s) * h_n + h) * dh;
        const int64_t kvh = h / group, j0 = first_key(past + s, av.window), n_keys = past + s + 1 - j0;
        for (int64_t j = 0; j < n_keys; ++j)
          sc[j] = dot(qr, k_cache + ((b * cap + j0 + j) * hkv + kvh) * dh, dh) * scale;
        const int64_t cols = n_keys + (av.sinks ? 1 : 0);
        if (av.sinks) sc[n_keys] = av.sinks[h];
        softmax(sc, sc, cols);
        double* o = out + ((b * s_n + s) * h_n + h) * dh;
        for (int64_t i = 0; i < dh; ++i) {
          double acc = 0;
          for (int64_t j = 0; j < n_keys; ++j) acc += sc[j] * v_cache[((b * cap + j0 + j) * hkv + kvh) * dh + i];
          o[i] = acc;
        }
      }
}

void attention_forward_train(double* out, double* lse, const double* q, const double* k, const double* v,
                             int64_t b_n, int64_t s_n, int64_t h_n, int64_t hkv, int64_t dh, const AttnF64& av) {
  const double scale = av.scale != 0 ? av.scale : 1.0 / std::sqrt(double(dh));
  const int64_t group = h_n / hkv;
  std::vector<double> sc_buf(static_cast<size_t>(s_n + 1));
  double* sc = sc_buf.data();
  for (int64_t b = 0; b < b_n; ++b)
    for (int64_t h = 0; h < h_n; ++h)
      for (int64_t s = 0; s < s_n; ++s) {
        const double* qr = q + ((b * s_n + s) * h_n + h) * dh;
        const int64_t kvh = h / group, j0 = first_key(s, av.window);
        for (int64_t j = j0; j <= s; ++j) sc[j] = dot(qr, k + ((b * s_n + j) * hkv + kvh) * dh, dh) * scale;
        // lse over the visible keys and the sink column.
        if (av.sinks) sc[s + 1] = av.sinks[h];
        const double l = logsumexp(sc + j0, s + 1 - j0 + (av.sinks ? 1 : 0));
        if (lse) lse[(b * h_n + h) * s_n + s] = l;
        double* o = out + ((b * s_n + s) * h_n + h) * dh;
        for (int64_t i = 0; i < dh; ++i) {
          double acc = 0;
          for (int64_t j = j0; j <= s; ++j) acc += std::exp(sc[j] - l) * v[((b * s_n + j) * hkv + kvh) * dh + i];
          o[i] = acc;
        }
      }
}

void router_topk_forward(int32_t* idx, double* w, const double* logits, const double* bias, int64_t t_n,
                         int64_t e_n, int64_t k, bool renorm) {
  std::vector<char> taken(static_cast<size_t>(e_n));
  std::vector<double> p_buf(static_cast<size_t>(e_n));
  double* p = p_buf.data();
  for (int64_t t = 0; t < t_n; ++t) {
    const double* l = logits + t * e_n;
    softmax(p, l, e_n);
    for (int64_t e = 0; e < e_n; ++e) taken[e] = false;
    // K passes of "largest not yet taken"; strict > keeps the lower index on ties. Selecting
    // by logit is selecting by probability (softmax is monotone) without its rounding.
    auto score = [&](int64_t e) { return bias ? p[e] + bias[e] : l[e]; };
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      int64_t best = -1;
      for (int64_t e = 0; e < e_n; ++e)
        if (!taken[e] && (best < 0 || score(e) > score(best))) best = e;
      taken[best] = true;
      idx[t * k + j] = static_cast<int32_t>(best);
      w[t * k + j] = p[best];
      sum += p[best];
    }
    if (renorm)
      for (int64_t j = 0; j < k; ++j) w[t * k + j] /= sum;
  }
}

void moe_dispatch(int32_t* offsets, int32_t* perm, int32_t* inv, const int32_t* idx, int64_t p_n, int64_t e_n) {
  for (int64_t a = 0; a < p_n; ++a)
    MOE_CHECK(idx[a] >= 0 && idx[a] < e_n, "moe_dispatch: expert id %d out of range [0,%lld)", idx[a],
              (long long)e_n);
  // Expert by expert, assignments in order: stable by construction.
  int64_t pos = 0;
  for (int64_t e = 0; e < e_n; ++e) {
    offsets[e] = static_cast<int32_t>(pos);
    for (int64_t a = 0; a < p_n; ++a)
      if (idx[a] == e) {
        perm[pos] = static_cast<int32_t>(a);
        inv[a] = static_cast<int32_t>(pos);
        ++pos;
      }
  }
  offsets[e_n] = static_cast<int32_t>(pos);
}

void moe_capacity_drop(int32_t* offsets, int32_t* perm, int32_t* inv, int64_t p_n, int64_t e_n, int64_t capacity) {
  // Expert of each assignment, then its rank among the earlier assignments to that expert.
  std::vector<int64_t> expert(static_cast<size_t>(p_n));
  for (int64_t e = 0; e < e_n; ++e)
    for (int64_t r = offsets[e]; r < offsets[e + 1]; ++r) expert[perm[r]] = e;
  std::vector<char> keep(static_cast<size_t>(p_n));
  for (int64_t a = 0; a < p_n; ++a) {
    int64_t rank = 0;
    for (int64_t b = 0; b < a; ++b) rank += expert[b] == expert[a];
    keep[a] = rank < capacity;
  }
  int64_t pos = 0;
  for (int64_t e = 0; e < e_n; ++e) {
    offsets[e] = static_cast<int32_t>(pos);
    for (int64_t a = 0; a < p_n; ++a)
      if (keep[a] && expert[a] == e) perm[pos++] = static_cast<int32_t>(a);
  }
  offsets[e_n] = static_cast<int32_t>(pos);
  for (int64_t a = 0; a < p_n; ++a)
    if (!keep[a]) perm[pos++] = static_cast<int32_t>(a);
  for (int64_t r = 0; r < p_n; ++r) inv[perm[r]] = static_cast<int32_t>(r);
}

void gather_rows(double* xp, const double* x, const int32_t* perm, int64_t p_n, int64_t d, int64_t k) {
  for (int64_t p = 0; p < p_n; ++p)
    for (int64_t i = 0; i < d; ++i) xp[p * d + i] = x[(perm[p] / k) * d + i];
}

namespace {
// Row t of the adapter's input after dropout (x itself when off); mult[c] = m / (1 − p).
void dropped_row(const double* x, const LoraF64& l, int64_t t, int64_t kd, double* xd, double* mult) {
  for (int64_t c = 0; c < kd; ++c) {
    mult[c] = l.dropout > 0 ? (lora_keep(l.seed, uint64_t((l.row0 + t) * kd + c), l.dropout) ? 1.0 / (1.0 - l.dropout)
                                                                                                : 0.0)
                            : 1.0;
    xd[c] = x[t * kd + c] * mult[c];
  }
}
}  // namespace

void lora_forward(double* out, int64_t ldo, int64_t col0, const double* x, const LoraF64& l, int64_t n, int64_t m,
                  int64_t kd) {
  std::vector<double> u(static_cast<size_t>(l.r)), xd(static_cast<size_t>(kd)), mult(static_cast<size_t>(kd));
  for (int64_t t = 0; t < n; ++t) {
    dropped_row(x, l, t, kd, xd.data(), mult.data());
    for (int64_t q = 0; q < l.r; ++q) u[q] = dot(xd.data(), l.a + q * kd, kd);
    for (int64_t j = 0; j < m; ++j) out[t * ldo + col0 + j] += l.scale * dot(u.data(), l.b + j * l.r, l.r);
  }
}

void lora_backward(double* dx, const double* dy, int64_t ldy, int64_t col0, const double* x, const LoraF64& l,
                   int64_t n, int64_t m, int64_t kd) {
  std::vector<double> u(static_cast<size_t>(l.r)), v(static_cast<size_t>(l.r));
  std::vector<double> xd(static_cast<size_t>(kd)), mult(static_cast<size_t>(kd));
  for (int64_t t = 0; t < n; ++t) {
    const double* g = dy + t * ldy + col0;
    dropped_row(x, l, t, kd, xd.data(), mult.data());
    for (int64_t q = 0; q < l.r; ++q) {
      u[q] = dot(xd.data(), l.a + q * kd, kd);
      double acc = 0;
      for (int64_t j = 0; j < m; ++j) acc += g[j] * l.b[j * l.r + q];
      v[q] = acc;
    }
    for (int64_t q = 0; q < l.r; ++q)
      for (int64_t c = 0; c < kd; ++c) {
        if (dx) dx[t * kd + c] += l.scale * v[q] * l.a[q * kd + c] * mult[c];
        if (l.da) l.da[q * kd + c] += l.scale * v[q] * xd[c];
      }
    if (l.db)
      for (int64_t j = 0; j < m; ++j)
        for (int64_t q = 0; q < l.r; ++q) l.db[j * l.r + q] += l.scale * g[j] * u[q];
  }
}

namespace {
// Expert e's slice of a stacked adapter (in -> out), or an off adapter.
LoraF64 expert_lora(const LoraF64* l, int64_t e, int64_t in, int64_t out) {
  if (!l || !l->a) return {};
  LoraF64 s = *l;
  s.a = l->a + e * l->r * in;
  s.b = l->b + e * out * l->r;
  if (l->da) s.da = l->da + e * l->r * in;
  if (l->db) s.db = l->db + e * out * l->r;
  return s;
}
// The adapter as applied to permuted row p (its dropout mask indexes p's elements).
LoraF64 at_row(const LoraF64& l, int64_t p) {
  LoraF64 s = l;
  s.row0 = p;
  return s;
}
}  // namespace

void expert_ffn_forward(double* yp, double* h1, double* h3, const double* xp, const int32_t* offsets,
                        const double* w1, const double* w3, const double* w2, const double* row_scale, int64_t e_n,
                        int64_t f, int64_t d, const LoraF64* lora, const GluF64& gl, const BiasF64& bias,
                        bool h_bf16) {
  std::vector<double> a_buf(static_cast<size_t>(f)), g1_buf(static_cast<size_t>(f)), g3_buf(static_cast<size_t>(f));
  double* a = a_buf.data();
  for (int64_t e = 0; e < e_n; ++e) {
    const double* w1e = w1 + e * f * d;
    const double* w3e = w3 + e * f * d;
    const double* w2e = w2 + e * d * f;
    const LoraF64 l1 = expert_lora(lora ? &lora[0] : nullptr, e, d, f);
    const LoraF64 l3 = expert_lora(lora ? &lora[1] : nullptr, e, d, f);
    const LoraF64 l2 = expert_lora(lora ? &lora[2] : nullptr, e, f, d);
    for (int64_t p = offsets[e]; p < offsets[e + 1]; ++p) {
      const double s = row_scale ? row_scale[p] : 1.0;
      double* g1 = g1_buf.data();
      double* g3 = g3_buf.data();
      for (int64_t i = 0; i < f; ++i) {
        g1[i] = dot(xp + p * d, w1e + i * d, d);
        g3[i] = dot(xp + p * d, w3e + i * d, d);
      }
      if (l1.a) lora_forward(g1, f, 0, xp + p * d, at_row(l1, p), 1, f, d);
      if (l3.a) lora_forward(g3, f, 0, xp + p * d, at_row(l3, p), 1, f, d);
      for (int64_t i = 0; i < f; ++i) {
        if (bias.b1) g1[i] += bias.b1[e * f + i];
        if (bias.b3) g3[i] += bias.b3[e * f + i];
        if (h_bf16) {
          g1[i] = bf16_to_f32(f32_to_bf16(static_cast<float>(g1[i])));
          g3[i] = bf16_to_f32(f32_to_bf16(static_cast<float>(g3[i])));
        }
        if (h1) h1[p * f + i] = g1[i];
        if (h3) h3[p * f + i] = g3[i];
        a[i] = glu(g1[i], g3[i], gl) * s;
      }
      for (int64_t o = 0; o < d; ++o) yp[p * d + o] = dot(a, w2e + o * f, f) + (bias.b2 ? s * bias.b2[e * d + o] : 0.0);
      if (l2.a) lora_forward(yp + p * d, d, 0, a, at_row(l2, p), 1, d, f);
    }
  }
}

void moe_combine(double* y, const double* yp, const int32_t* inv, int64_t t_n, int64_t d, int64_t k,
                 bool accumulate) {
  for (int64_t t = 0; t < t_n; ++t)
    for (int64_t i = 0; i < d; ++i) {
      double acc = accumulate ? y[t * d + i] : 0.0;
      for (int64_t j = 0; j < k; ++j) acc += yp[int64_t(inv[t * k + j]) * d + i];
      y[t * d + i] = acc;
    }
}

void permute_weights(double* row_scale, const double* topk_w, const int32_t* perm, int64_t p_n) {
  for (int64_t p = 0; p < p_n; ++p) row_scale[p] = topk_w[perm[p]];
}

void swiglu_forward(double* out, const double* h1, const double* h3, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = silu(h1[i]) * h3[i];
}

void sigmoid_gate_add(double* y, const double* s, const double* gate, int64_t t_n, int64_t d) {
  for (int64_t t = 0; t < t_n; ++t)
    for (int64_t i = 0; i < d; ++i) y[t * d + i] += sigmoid(gate[t]) * s[t * d + i];
}

void add_inplace(double* y, const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += x[i];
}

void router_stats(double* prob_sum, double* count, double* z_sum, const double* logits, const int32_t* idx,
                  int64_t t_n, int64_t e_n, int64_t k) {
  for (int64_t e = 0; e < e_n; ++e) prob_sum[e] = count[e] = 0;
  z_sum[0] = 0;
  std::vector<double> p_buf(static_cast<size_t>(e_n));
  double* p = p_buf.data();
  for (int64_t t = 0; t < t_n; ++t) {
    softmax(p, logits + t * e_n, e_n);
    for (int64_t e = 0; e < e_n; ++e) prob_sum[e] += p[e];
    const double l = logsumexp(logits + t * e_n, e_n);
    z_sum[0] += l * l;
    for (int64_t j = 0; j < k; ++j) {
      MOE_CHECK(idx[t * k + j] >= 0 && idx[t * k + j] < e_n, "router_stats: expert id %d out of range [0,%lld)",
                idx[t * k + j], (long long)e_n);
      count[idx[t * k + j]] += 1;
    }
  }
}

void cross_entropy_forward(double* loss, const double* logits, const int32_t* targets, int64_t n, int64_t v) {
  for (int64_t r = 0; r < n; ++r) {
    const int32_t tg = targets[r];
    if (tg == -100) {
      loss[r] = 0;
      continue;
    }
    MOE_CHECK(tg >= 0 && tg < v, "cross_entropy: target %d of row %lld out of range [0,%lld) (or -100)", tg,
              (long long)r, (long long)v);
    loss[r] = logsumexp(logits + r * v, v) - logits[r * v + tg];
  }
}

// ---- backward ----

void embedding_backward(double* dtable, const double* dout, const int32_t* ids, int64_t padding_idx, int64_t t_n,
                        int64_t v, int64_t d) {
  for (int64_t t = 0; t < t_n; ++t) {
    MOE_CHECK(ids[t] >= 0 && ids[t] < v, "embedding_backward: token id %d out of range [0,%lld)", ids[t],
              (long long)v);
    if (ids[t] == padding_idx) continue;
    for (int64_t i = 0; i < d; ++i) dtable[int64_t(ids[t]) * d + i] += dout[t * d + i];
  }
}

// y_i = x_i r w_i, r = (mean(x^2) + eps)^(-1/2), dr/dx_j = -r^3 x_j / D:
//   dx_j = r w_j dy_j - r^3 x_j / D * sum_i dy_i w_i x_i.
void rmsnorm_backward(double* dx, double* dw, const double* dy, const double* x, const double* w,
                      const double* rstd, bool accumulate, int64_t n, int64_t d) {
  for (int64_t r = 0; r < n; ++r) {
    const double* xr = x + r * d;
    const double* gr = dy + r * d;
    const double rs = rstd[r];
    double c = 0;
    for (int64_t i = 0; i < d; ++i) c += gr[i] * w[i] * xr[i];
    for (int64_t j = 0; j < d; ++j) {
      const double g = rs * w[j] * gr[j] - rs * rs * rs * xr[j] / double(d) * c;
      dx[r * d + j] = accumulate ? dx[r * d + j] + g : g;
    }
    if (dw)
      for (int64_t i = 0; i < d; ++i) dw[i] += gr[i] * xr[i] * rs;
  }
}

void linear_backward(double* dx, double* dw, double* db, const double* dy, const double* x, const double* w,
                     bool accumulate, int64_t n, int64_t m, int64_t kd) {
  if (dx)
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = 0; c < kd; ++c) {
        double acc = 0;
        for (int64_t o = 0; o < m; ++o) acc += dy[r * m + o] * w[o * kd + c];
        dx[r * kd + c] = accumulate ? dx[r * kd + c] + acc : acc;
      }
  if (dw)
    for (int64_t o = 0; o < m; ++o)
      for (int64_t c = 0; c < kd; ++c) {
        double acc = 0;
        for (int64_t r = 0; r < n; ++r) acc += dy[r * m + o] * x[r * kd + c];
        dw[o * kd + c] += acc;
      }
  if (db)
    for (int64_t o = 0; o < m; ++o) {
      double acc = 0;
      for (int64_t r = 0; r < n; ++r) acc += dy[r * m + o];
      db[o] += acc;
    }
}

void rope_backward(double* dx, int64_t b_n, int64_t s_n, int64_t h_n, int64_t dh, int64_t past, double theta) {
  rope_rotate(dx, b_n, s_n, h_n, dh, past, theta, -1.0);
}

// With p_sj = exp(score_sj - lse_s), score = scale q_s.k_j:
//   dv_j += p_sj dout_s;  dp_sj = dout_s.v_j;  ds_sj = p_sj (dp_sj - dout_s.out_s);
//   dq_s = scale sum_j ds_sj k_j;  dk_j += scale ds_sj q_s.
void attention_backward(double* dq, double* dk, double* dv, const double* dout, const double* q, const double* k,
                        const double* v, const double* out, const double* lse, int64_t b_n, int64_t s_n,
                        int64_t h_n, int64_t hkv, int64_t dh, const AttnF64& av, double* dsinks) {
  const double scale = av.scale != 0 ? av.scale : 1.0 / std::sqrt(double(dh));
  const int64_t group = h_n / hkv;
  for (int64_t i = 0; i < b_n * s_n * hkv * dh; ++i) dk[i] = dv[i] = 0;
  for (int64_t b = 0; b < b_n; ++b)
    for (int64_t h = 0; h < h_n; ++h)
      for (int64_t s = 0; s < s_n; ++s) {
        const int64_t kvh = h / group, qoff = ((b * s_n + s) * h_n + h) * dh;
        const double l = lse[(b * h_n + h) * s_n + s];
        const double dd = dot(dout + qoff, out + qoff, dh);
        for (int64_t i = 0; i < dh; ++i) dq[qoff + i] = 0;
        // The sink column: d lse / d sink = p_sink, and its dp is 0 (no value).
        if (av.sinks && dsinks) dsinks[h] -= std::exp(av.sinks[h] - l) * dd;
        for (int64_t j = first_key(s, av.window); j <= s; ++j) {
          const int64_t koff = ((b * s_n + j) * hkv + kvh) * dh;
          const double p = std::exp(dot(q + qoff, k + koff, dh) * scale - l);
          const double dp = dot(dout + qoff, v + koff, dh);
          const double ds = p * (dp - dd);
          for (int64_t i = 0; i < dh; ++i) {
            dv[koff + i] += p * dout[qoff + i];
            dq[qoff + i] += scale * ds * k[koff + i];
            dk[koff + i] += scale * ds * q[qoff + i];
          }
        }
      }
}

// w_j = p[idx_j] (renorm: / S, S = sum_j p[idx_j]). First dp [E] = dL/dp through the weights,
// then the softmax backward dl = p * (dp - <dp, p>).
void router_topk_backward(double* dlogits, const double* dtopk_w, const double* logits, const int32_t* idx,
                          int64_t t_n, int64_t e_n, int64_t k, bool renorm) {
  std::vector<double> p_buf(static_cast<size_t>(e_n));
  double* p = p_buf.data();
  std::vector<double> dp_buf(static_cast<size_t>(e_n));
  double* dp = dp_buf.data();
  for (int64_t t = 0; t < t_n; ++t) {
    softmax(p, logits + t * e_n, e_n);
    for (int64_t e = 0; e < e_n; ++e) dp[e] = 0;
    const int32_t* ix = idx + t * k;
    const double* g = dtopk_w + t * k;
    if (!renorm) {
      for (int64_t j = 0; j < k; ++j) dp[ix[j]] += g[j];
    } else {
      // w_j = p_j / S: dw_j/dp_m = delta_jm / S - p_j / S^2 for selected m.
      double sum = 0, gp = 0;
      for (int64_t j = 0; j < k; ++j) {
        sum += p[ix[j]];
        gp += g[j] * p[ix[j]];
      }
      for (int64_t m = 0; m < k; ++m) dp[ix[m]] += g[m] / sum - gp / (sum * sum);
    }
    const double c = dot(dp, p, e_n);
    for (int64_t e = 0; e < e_n; ++e) dlogits[t * e_n + e] = p[e] * (dp[e] - c);
  }
}

// d/dl sum_e g_e p_e = p * (g - <g,p>);  d/dl lse^2 = 2 lse p.
void router_balance_backward(double* dlogits, const double* logits, const double* g, double aux_scale,
                             double z_scale, int64_t t_n, int64_t e_n) {
  std::vector<double> p_buf(static_cast<size_t>(e_n));
  double* p = p_buf.data();
  for (int64_t t = 0; t < t_n; ++t) {
    const double* l = logits + t * e_n;
    softmax(p, l, e_n);
    const double lse = logsumexp(l, e_n);
    const double gp = g ? dot(g, p, e_n) : 0.0;
    for (int64_t e = 0; e < e_n; ++e) {
      double d = z_scale * 2.0 * lse * p[e];
      if (g) d += aux_scale * p[e] * (g[e] - gp);
      dlogits[t * e_n + e] += d;
    }
  }
}

void permute_weights_backward(double* dtopk_w, const double* drow_scale, const int32_t* perm, int64_t p_n) {
  for (int64_t p = 0; p < p_n; ++p) dtopk_w[perm[p]] = drow_scale[p];
}

void expert_ffn_backward(double* dxp, double* dw1, double* dw3, double* dw2, double* drow_scale, const double* dyp,
                         const double* xp, const double* h1, const double* h3, const int32_t* offsets,
                         const double* w1, const double* w3, const double* w2, const double* row_scale,
                         int64_t e_n, int64_t f, int64_t d, const LoraF64* lora, const GluF64& gl,
                         const BiasF64& bias) {
  std::vector<double> u_buf(static_cast<size_t>(f));
  double* u = u_buf.data();
  std::vector<double> a_buf(static_cast<size_t>(f));
  double* a = a_buf.data();
  std::vector<double> du_buf(static_cast<size_t>(f));
  double* du = du_buf.data();
  std::vector<double> dh1_buf(static_cast<size_t>(f));
  double* dh1 = dh1_buf.data();
  std::vector<double> dh3_buf(static_cast<size_t>(f));
  double* dh3 = dh3_buf.data();
  for (int64_t e = 0; e < e_n; ++e) {
    const double* w1e = w1 + e * f * d;
    const double* w3e = w3 + e * f * d;
    const double* w2e = w2 + e * d * f;
    const LoraF64 l1 = expert_lora(lora ? &lora[0] : nullptr, e, d, f);
    const LoraF64 l3 = expert_lora(lora ? &lora[1] : nullptr, e, d, f);
    const LoraF64 l2 = expert_lora(lora ? &lora[2] : nullptr, e, f, d);
    for (int64_t p = offsets[e]; p < offsets[e + 1]; ++p) {
      const double s = row_scale ? row_scale[p] : 1.0;
      const double* g1 = h1 + p * f;
      const double* g3 = h3 + p * f;
      const double* dy = dyp + p * d;
      for (int64_t i = 0; i < f; ++i) a[i] = glu(g1[i], g3[i], gl);
      // du = dyp w2[e] (over D); dw2[e] += dyp^T u with u = a s.
      for (int64_t i = 0; i < f; ++i) {
        double acc = 0;
        for (int64_t o = 0; o < d; ++o) acc += dy[o] * w2e[o * f + i];
        du[i] = acc;
      }
      if (l2.a) {
        for (int64_t i = 0; i < f; ++i) u[i] = a[i] * s;
        lora_backward(du, dy, d, 0, u, at_row(l2, p), 1, d, f);
      }
      if (dw2)
        for (int64_t o = 0; o < d; ++o)
          for (int64_t i = 0; i < f; ++i) dw2[e * d * f + o * f + i] += dy[o] * a[i] * s;
      // y = s · (a w2ᵀ + b2): ds = du·a + dy·b2;  db2 += s dy.
      if (drow_scale) drow_scale[p] = dot(du, a, f) + (bias.b2 ? dot(dy, bias.b2 + e * d, d) : 0.0);
      if (bias.db2)
        for (int64_t o = 0; o < d; ++o) bias.db2[e * d + o] += s * dy[o];
      for (int64_t i = 0; i < f; ++i) {
        const double da = du[i] * s;
        double d1, d3;
        glu_grad(g1[i], g3[i], gl, &d1, &d3);
        dh1[i] = da * d1;
        dh3[i] = da * d3;
        if (bias.db1) bias.db1[e * f + i] += dh1[i];
        if (bias.db3) bias.db3[e * f + i] += dh3[i];
      }
      for (int64_t c = 0; c < d; ++c) {
        double acc = 0;
        for (int64_t i = 0; i < f; ++i) acc += dh1[i] * w1e[i * d + c] + dh3[i] * w3e[i * d + c];
        dxp[p * d + c] = acc;
      }
      if (l1.a) lora_backward(dxp + p * d, dh1, f, 0, xp + p * d, at_row(l1, p), 1, f, d);
      if (l3.a) lora_backward(dxp + p * d, dh3, f, 0, xp + p * d, at_row(l3, p), 1, f, d);
      for (int64_t i = 0; i < f; ++i)
        for (int64_t c = 0; c < d; ++c) {
          if (dw1) dw1[e * f * d + i * d + c] += dh1[i] * xp[p * d + c];
          if (dw3) dw3[e * f * d + i * d + c] += dh3[i] * xp[p * d + c];
        }
    }
  }
}

void swiglu_backward(double* dh1, double* dh3, const double* dout, const double* h1, const double* h3, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const double g1 = h1[i], g3 = h3[i], go = dout[i];
    dh1[i] = go * g3 * silu_grad(g1);
    dh3[i] = go * silu(g1);
  }
}

void sigmoid_gate_backward(double* ds, double* dgate, const double* dy, const double* s, const double* gate,
                           int64_t t_n, int64_t d) {
  for (int64_t t = 0; t < t_n; ++t) {
    const double sg = sigmoid(gate[t]);
    for (int64_t i = 0; i < d; ++i) ds[t * d + i] = sg * dy[t * d + i];
    dgate[t] = sg * (1.0 - sg) * dot(dy + t * d, s + t * d, d);
  }
}

void cross_entropy_backward(double* dlogits, const double* logits, const int32_t* targets, double scale, int64_t n,
                            int64_t v) {
  for (int64_t r = 0; r < n; ++r) {
    const int32_t tg = targets[r];
    if (tg == -100) {
      for (int64_t i = 0; i < v; ++i) dlogits[r * v + i] = 0;
      continue;
    }
    MOE_CHECK(tg >= 0 && tg < v, "cross_entropy: target %d of row %lld out of range [0,%lld) (or -100)", tg,
              (long long)r, (long long)v);
    const double lse = logsumexp(logits + r * v, v);  // reads the row before it is overwritten
    for (int64_t i = 0; i < v; ++i)
      dlogits[r * v + i] = scale * (std::exp(logits[r * v + i] - lse) - (i == tg ? 1.0 : 0.0));
  }
}

// ---- router variant (DeepSeek) ----

namespace {
// Router scores s [E] of one token: softmax or sigmoid of its logits.
void router_scores(double* s, const double* l, int64_t e_n, bool sig) {
  if (!sig) return softmax(s, l, e_n);
  for (int64_t e = 0; e < e_n; ++e) s[e] = 1.0 / (1.0 + std::exp(-l[e]));
}
// The index of the largest u[e] not yet taken (strict >: the lower index wins ties).
int64_t largest_free(const double* u, const std::vector<char>& taken, int64_t n) {
  int64_t best = -1;
  for (int64_t e = 0; e < n; ++e)
    if (!taken[size_t(e)] && (best < 0 || u[e] > u[best])) best = e;
  return best;
}
}  // namespace

void router_topk_variant(int32_t* idx, double* w, const double* logits, const double* bias, int64_t t_n,
                         int64_t e_n, int64_t k, const RouterF64& rv) {
  std::vector<double> s(static_cast<size_t>(e_n)), u(static_cast<size_t>(e_n)), gs(static_cast<size_t>(std::max<int64_t>(rv.n_group, 1)));
  std::vector<char> taken(static_cast<size_t>(e_n));
  const int64_t ng = std::max<int64_t>(rv.n_group, 1), gsz = e_n / ng;
  for (int64_t t = 0; t < t_n; ++t) {
    router_scores(s.data(), logits + t * e_n, e_n, rv.sigmoid);
    for (int64_t e = 0; e < e_n; ++e) u[size_t(e)] = s[size_t(e)] + (bias ? bias[e] : 0.0);
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
      std::vector<char> gtaken(static_cast<size_t>(ng), 0);
      for (int64_t j = 0; j < rv.topk_group; ++j) gtaken[size_t(largest_free(gs.data(), gtaken, ng))] = 1;
      for (int64_t e = 0; e < e_n; ++e)
        if (!gtaken[size_t(e / gsz)]) u[size_t(e)] = 0.0;
    }
    std::fill(taken.begin(), taken.end(), 0);
    double sum = 0;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t best = largest_free(u.data(), taken, e_n);
      taken[size_t(best)] = 1;
      idx[t * k + j] = static_cast<int32_t>(best);
      w[t * k + j] = s[size_t(best)];
      sum += s[size_t(best)];
    }
    for (int64_t j = 0; j < k; ++j) w[t * k + j] = (rv.renorm ? w[t * k + j] / (sum + rv.renorm_eps) : w[t * k + j]) * rv.scale;
  }
}

void router_topk_variant_backward(double* dlogits, const double* dw, const double* logits, const int32_t* idx,
                                  int64_t t_n, int64_t e_n, int64_t k, const RouterF64& rv) {
  std::vector<double> s(static_cast<size_t>(e_n)), ds(static_cast<size_t>(e_n));
  for (int64_t t = 0; t < t_n; ++t) {
    router_scores(s.data(), logits + t * e_n, e_n, rv.sigmoid);
    std::fill(ds.begin(), ds.end(), 0.0);
    const int32_t* ix = idx + t * k;
    const double* g = dw + t * k;
    if (!rv.renorm) {
      for (int64_t j = 0; j < k; ++j) ds[size_t(ix[j])] += rv.scale * g[j];
    } else {
      // w_j = scale · s_j / S, S = Σ s + eps: dw_j/ds_m = scale (δ_jm / S − s_j / S²).
      double sum = rv.renorm_eps, gp = 0;
      for (int64_t j = 0; j < k; ++j) {
        sum += s[size_t(ix[j])];
        gp += g[j] * s[size_t(ix[j])];
      }
      for (int64_t m = 0; m < k; ++m) ds[size_t(ix[m])] += rv.scale * (g[m] / sum - gp / (sum * sum));
    }
    double* dl = dlogits + t * e_n;
    if (rv.sigmoid) {
      for (int64_t e = 0; e < e_n; ++e) dl[e] = ds[size_t(e)] * s[size_t(e)] * (1.0 - s[size_t(e)]);
    } else {
      const double c = dot(ds.data(), s.data(), e_n);
      for (int64_t e = 0; e < e_n; ++e) dl[e] = s[size_t(e)] * (ds[size_t(e)] - c);
    }
  }
}

// ---- MLA absorbed products ----

void mla_absorb_q(double* qc, const double* q, const double* kv_b, int64_t t_n, int64_t h_n, int64_t dq,
                  int64_t rc, int64_t dn, int64_t dv, int64_t r) {
  for (int64_t t = 0; t < t_n; ++t)
    for (int64_t h = 0; h < h_n; ++h) {
      const double* qr = q + (t * h_n + h) * dq;
      double* out = qc + (t * h_n + h) * rc;
      for (int64_t c = 0; c < r; ++c) {
        double acc = 0;
        for (int64_t i = 0; i < dn; ++i) acc += qr[i] * kv_b[(h * (dn + dv) + i) * r + c];
        out[c] = acc;
      }
    }
}

void mla_absorb_out(double* o, const double* oc, const double* kv_b, int64_t t_n, int64_t h_n, int64_t rc,
                    int64_t dn, int64_t dv, int64_t r) {
  for (int64_t t = 0; t < t_n; ++t)
    for (int64_t h = 0; h < h_n; ++h) {
      const double* orow = oc + (t * h_n + h) * rc;
      for (int64_t j = 0; j < dv; ++j)
        o[(t * h_n + h) * dv + j] = dot(orow, kv_b + (h * (dn + dv) + dn + j) * r, r);
    }
}

}  // namespace f64
}  // namespace ref
}  // namespace moe
