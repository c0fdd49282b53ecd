// cpu_attention.cpp — CPU linear layers and causal grouped-query attention (inference), over a
// per-slot KV cache or a paged one (serving).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include <omp.h>

#include "ops/backend.h"
#include "ops/cpu/cpu_gemm.h"
#include "ops/cpu/cpu_parallel.h"
#include "ops/cpu/cpu_quant_gemm.h"
#include "ops/cpu/cpu_scratch.h"
#include "ops/cpu/cpu_simd_exp.h"
#include "ops/cpu/cpu_attention_tiles.h"

namespace moe {
namespace cpu {

namespace {
// o [n, ldo]: bias [m] (any float dtype) added to the first m columns of every row.
void add_bias(float* o, int64_t ldo, int64_t n, int64_t m, const Tensor& bias) {
  float* b = scratch<float>(Scratch::LinearBias, static_cast<size_t>(m));
  convert_to_f32(b, bias.raw(), bias.dtype(), static_cast<size_t>(m));
  parallel_for(n * m > 32768, n, [&](int64_t r) {
    for (int64_t c = 0; c < m; ++c) o[r * ldo + c] += b[c];
  });
}
}  // namespace

void linear_forward(Tensor& out, const Tensor& x, const Tensor& w, const Tensor& bias) {
  MOE_CHECK(out.dtype() == DType::F32 && x.dtype() == DType::F32, "linear_forward (cpu): activations must be f32");
  const int64_t k = w.dim(1), m = w.dim(0), n = x.numel() / k;
  float* o = out.data<float>();
  gemm_xwt(o, m, x.data<float>(), w.raw(), w.dtype(), n, m, k, false);
  if (bias.defined()) add_bias(o, m, n, m, bias);
}

void linear_forward_cat(Tensor& out, const Tensor& x, std::initializer_list<LinearPart> parts) {
  MOE_CHECK(out.dtype() == DType::F32 && x.dtype() == DType::F32, "linear_forward_cat (cpu): activations must be f32");
  const int64_t kd = x.dim(-1), n = x.numel() / kd, ldo = out.dim(-1);
  float* o = out.data<float>();
  bool one_token_quant = n == 1 && !quant_exact() && parts.size() <= 8;
  for (const LinearPart& p : parts) one_token_quant = one_token_quant && dtype_is_quant(p.w->dtype());
  if (one_token_quant) {
    QuantPart qp[8];
    int64_t col = 0;
    for (const LinearPart& p : parts) {
      qp[&p - parts.begin()] = {p.w->raw(), p.w->dtype(), p.w->dim(0), o + col};
      col += p.w->dim(0);
    }
    quant_gemv_parts(x.data<float>(), kd, qp, static_cast<int>(parts.size()));
  } else {
    int64_t col = 0;
    for (const LinearPart& p : parts) {
      gemm_xwt(o + col, ldo, x.data<float>(), p.w->raw(), p.w->dtype(), n, p.w->dim(0), kd, false);
      col += p.w->dim(0);
    }
  }
  int64_t col = 0;
  for (const LinearPart& p : parts) {
    if (p.bias && p.bias->defined()) add_bias(o + col, ldo, n, p.w->dim(0), *p.bias);
    col += p.w->dim(0);
  }
}

namespace {
// Sink logit of head h as f32 (-inf: no sink, which adds nothing to a row's softmax).
float sink_of(const AttnVariant& av, int64_t h) {
  if (!av.sinks.defined()) return -INFINITY;
  float v;
  convert_to_f32(&v, static_cast<const char*>(av.sinks.raw()) + h * dtype_size(av.sinks.dtype()), av.sinks.dtype(), 1);
  return v;
}

constexpr int64_t kAttnAhead = 4;  // keys fetched ahead in decode attention
constexpr int64_t kAttnValuesEarlyBytes = 256 << 10;  // a task's values fetched with its keys up to this

inline void prefetch_row(const float* p, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(p + i);
}

// One position's query rows of heads [h0, h0 + g) (contiguous in q and o, dh apart), which share
// one kv head, against keys [j0, n_keys): scores, a stable softmax whose denominator also counts
// each head's sink, the weighted sum of values. Each key and value row is read once for the g
// heads (once per head before: a GQA model's decode read its cache `group` times). key(j) and
// value(j) point at key j's row of the kv head; sc holds g * (n_keys - j0) + 2 * g floats.
template <class KeyRow, class ValueRow>
void attend_decode_heads(const float* q, float* o, int64_t g, int64_t h0, int64_t dh, int64_t j0, int64_t n_keys,
                         float scale, const AttnVariant& av, KeyRow key, ValueRow value, float* sc) {
  const int64_t nk = n_keys - j0;
  float* mx = sc + g * nk;
  float* inv = mx + g;
  for (int64_t i = 0; i < g; ++i) mx[i] = sink_of(av, h0 + i);
  // The values too are fetched during the scores where they all stay in L2 until the weighted
  // sum (short contexts, where decode attention is latency-bound: Q4_K_M medium model at 16-80
  // keys, 7-10 -> 6-7.5 µs a layer).
  const bool values_early = nk * dh * int64_t(sizeof(float)) <= kAttnValuesEarlyBytes;
  for (int64_t j = 0; j < nk; ++j) {
    const float* kr = key(j0 + j);
    // g dot products per key row leave fewer rows in flight than one head's loop did: fetch
    // ahead (rows of a block are 1 KiB apart, blocks anywhere).
    if (j + kAttnAhead < nk) prefetch_row(key(j0 + j + kAttnAhead), dh);
    if (values_early && j + kAttnAhead < nk) prefetch_row(value(j0 + j + kAttnAhead), dh);
    for (int64_t i = 0; i < g; ++i) {
      const float v = dot_f32(q + i * dh, kr, dh) * scale;
      sc[i * nk + j] = v;
      mx[i] = std::max(mx[i], v);
    }
  }
  for (int64_t i = 0; i < g; ++i) {
    float* si = sc + i * nk;
    double sum = av.sinks.defined() ? std::exp(double(sink_of(av, h0 + i)) - mx[i]) : 0.0;
    // e^x four at a time (cpu_simd_exp.h: expf's rounding but for 0.008% of arguments); the
    // scalar expf per score was ~40% of a 16-sequence, 400-key decode attention.
    const __m128 m4 = _mm_set1_ps(mx[i]);
    int64_t j = 0;
    for (; j + 4 <= nk; j += 4) {
      const __m128 e = exp4(_mm_sub_ps(_mm_loadu_ps(si + j), m4));
      _mm_storeu_ps(si + j, e);
      alignas(16) float t[4];
      _mm_store_ps(t, e);
      sum += t[0], sum += t[1], sum += t[2], sum += t[3];
    }
    for (; j < nk; ++j) {
      si[j] = std::exp(si[j] - mx[i]);
      sum += si[j];
    }
    inv[i] = static_cast<float>(1.0 / sum);
  }
  // Weighted sum of values: 4 heads × 32 columns of o held in 16 registers across all keys
  // (the loop over keys read and wrote each head's o row per key before), then the rest of
  // the heads / columns as before. Each output sums its keys in order, as the old loop did.
  for (int64_t i = 0; i < g; ++i)
    for (int64_t j = 0; j < nk; ++j) sc[i * nk + j] *= inv[i];
  std::fill(o, o + g * dh, 0.0f);
  const int64_t g4 = g / 4 * 4, d32 = dh / 32 * 32;
  for (int64_t i0 = 0; i0 < g4; i0 += 4)
    for (int64_t d0 = 0; d0 < d32; d0 += 32) {
      __m256 acc[4][4];
      for (auto& a : acc)
        for (auto& v : a) v = _mm256_setzero_ps();
      const float* p0 = sc + i0 * nk;
      for (int64_t j = 0; j < nk; ++j) {
        const float* vr = value(j0 + j) + d0;
        if (j + kAttnAhead < nk) prefetch_row(value(j0 + j + kAttnAhead) + d0, 32);
        const __m256 v0 = _mm256_loadu_ps(vr), v1 = _mm256_loadu_ps(vr + 8);
        const __m256 v2 = _mm256_loadu_ps(vr + 16), v3 = _mm256_loadu_ps(vr + 24);
        for (int r = 0; r < 4; ++r) {
          const __m256 p = _mm256_broadcast_ss(p0 + r * nk + j);
          acc[r][0] = _mm256_fmadd_ps(p, v0, acc[r][0]);
          acc[r][1] = _mm256_fmadd_ps(p, v1, acc[r][1]);
          acc[r][2] = _mm256_fmadd_ps(p, v2, acc[r][2]);
          acc[r][3] = _mm256_fmadd_ps(p, v3, acc[r][3]);
        }
      }
      for (int r = 0; r < 4; ++r)
        for (int c = 0; c < 4; ++c) _mm256_storeu_ps(o + (i0 + r) * dh + d0 + 8 * c, acc[r][c]);
    }
  if (g4 == g && d32 == dh) return;
  for (int64_t j = 0; j < nk; ++j) {
    const float* vr = value(j0 + j);
    for (int64_t i = 0; i < g; ++i) {
      const float p = sc[i * nk + j];
      float* orow = o + i * dh;
      for (int64_t d = i < g4 ? d32 : 0; d < dh; ++d) orow[d] += p * vr[d];
    }
  }
}

// Heads per decode task: the whole group sharing a kv head (its keys and values then come from
// memory once), halved only while some thread would have no task (one sequence of a model with
// fewer kv heads than threads).
int64_t decode_heads_per_task(int64_t rows, int64_t hkv, int64_t group) {
  int64_t g = group;
  while (g % 2 == 0 && rows * hkv * (group / g) < int64_t(omp_get_max_threads())) g /= 2;
  return g;
}

}  // namespace

void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past) {
  attention_forward(out, q, k_cache, v_cache, past, AttnVariant{});
}

// out, q [B,S,H,Dh]; caches [B,C,Hkv,Dh]. Per (b, s, h) query row: scores over the visible keys
// (the window's, with a sliding window), a stable softmax whose denominator also counts the
// head's sink, then the weighted sum of values — one row at a time in decode, blocks of
// kAttnQBlock rows in prefill (attend_block).
void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past,
                       const AttnVariant& av) {
  MOE_CHECK(q.dtype() == DType::F32 && k_cache.dtype() == DType::F32, "attention_forward (cpu): f32 only");
  const int64_t b_n = q.dim(0), s_n = q.dim(1), h_n = q.dim(2), dh = q.dim(3);
  const int64_t cap = k_cache.dim(1), hkv = k_cache.dim(2), group = h_n / hkv;
  const float scale = av.scale != 0 ? av.scale : 1.0f / std::sqrt(float(dh));
  const float* qp = q.data<float>();
  const float* kp = k_cache.data<float>();
  const float* vp = v_cache.data<float>();
  float* op = out.data<float>();
  if (s_n >= kAttnBlockMin && dh % 8 == 0) {
    const int64_t n_qb = (s_n + kAttnQBlock - 1) / kAttnQBlock, nkp = (past + s_n + 15) / 16 * 16;
#pragma omp parallel
    {
      float* S = scratch<float>(Scratch::AttnScores, static_cast<size_t>(kAttnQBlock * nkp));
      float* kt = scratch<float>(Scratch::AttnKeysT, static_cast<size_t>(dh * nkp));
#pragma omp for collapse(3) schedule(dynamic, 1)
      for (int64_t b = 0; b < b_n; ++b)
        for (int64_t h = 0; h < h_n; ++h)
          for (int64_t qb = 0; qb < n_qb; ++qb) {
            const int64_t s0 = qb * kAttnQBlock, nq = std::min(kAttnQBlock, s_n - s0), kv_h = h / group;
            const int64_t ja = av.first_key(past + s0), nk = past + s0 + nq - ja;
            const float* kr = kp + ((b * cap + ja) * hkv + kv_h) * dh;
            const float* vr = vp + ((b * cap + ja) * hkv + kv_h) * dh;
            attend_block(qp + ((b * s_n + s0) * h_n + h) * dh, h_n * dh, kr, vr, hkv * dh, nq, ja, nk, past + s0, dh,
                         scale, sink_of(av, h), av.sinks.defined(), av, kt, S, op + ((b * s_n + s0) * h_n + h) * dh,
                         h_n * dh);
          }
    }
    return;
  }
  const int64_t gs = decode_heads_per_task(b_n * s_n, hkv, group), parts = group / gs;
#pragma omp parallel if(b_n * s_n * h_n * (past + s_n) * dh > 32768)
  {
    float* sc = scratch<float>(Scratch::AttnScores, static_cast<size_t>(gs * (past + s_n + 2)));
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < b_n; ++b)
      for (int64_t s = 0; s < s_n; ++s)
        for (int64_t t = 0; t < hkv * parts; ++t) {
          const int64_t kv_h = t / parts, h0 = kv_h * group + (t % parts) * gs;
          const int64_t n_keys = past + s + 1, j0 = av.first_key(past + s);
          auto row = [&](const float* cache) {
            return [=](int64_t j) { return cache + ((b * cap + j) * hkv + kv_h) * dh; };
          };
          attend_decode_heads(qp + ((b * s_n + s) * h_n + h0) * dh, op + ((b * s_n + s) * h_n + h0) * dh, gs, h0, dh,
                              j0, n_keys, scale, av, row(kp), row(vp), sc);
        }
  }
}

// Paged cache: key j of row b is page tables[b, j / P], offset j % P (ops.h).
void kv_append_paged(Tensor& k_pages, Tensor& v_pages, const Tensor& k, const Tensor& v, const Tensor& tables,
                     const Tensor& pos) {
  const int64_t b_n = k.dim(0), s_n = k.dim(1), row = k.dim(2) * k.dim(3);
  const int64_t block = k_pages.dim(1), m = tables.dim(1);
  const size_t bytes = static_cast<size_t>(row) * dtype_size(k.dtype());
  const int32_t* tb = tables.data<int32_t>();
  for (int64_t b = 0; b < b_n; ++b)
    for (int64_t s = 0; s < s_n; ++s) {
      const int64_t p = pos.data<int32_t>()[b] + s;
      const size_t dst = static_cast<size_t>(tb[b * m + p / block] * block + p % block) * bytes;
      const size_t src = static_cast<size_t>(b * s_n + s) * bytes;
      std::memcpy(static_cast<char*>(k_pages.raw()) + dst, static_cast<const char*>(k.raw()) + src, bytes);
      std::memcpy(static_cast<char*>(v_pages.raw()) + dst, static_cast<const char*>(v.raw()) + src, bytes);
    }
}

void attention_forward_paged(Tensor& out, const Tensor& q, const Tensor& k_pages, const Tensor& v_pages,
                             const Tensor& tables, const Tensor& pos, const AttnVariant& av) {
  const int64_t b_n = q.dim(0), s_n = q.dim(1), h_n = q.dim(2), dh = q.dim(3);
  const int64_t block = k_pages.dim(1), hkv = k_pages.dim(2), group = h_n / hkv, m = tables.dim(1);
  const float scale = av.scale != 0 ? av.scale : 1.0f / std::sqrt(float(dh));
  const float* qp = q.data<float>();
  const float* kp = k_pages.data<float>();
  const float* vp = v_pages.data<float>();
  const int32_t* tb = tables.data<int32_t>();
  const int32_t* ps = pos.data<int32_t>();
  float* op = out.data<float>();
  int64_t max_keys = 0, work = 0;
  for (int64_t b = 0; b < b_n; ++b) {
    max_keys = std::max<int64_t>(max_keys, ps[b] + s_n);
    work += (ps[b] + s_n) * s_n * h_n * dh;
  }
  if (s_n >= kAttnBlockMin && dh % 8 == 0) {  // prefill chunks: the blocked path over gathered keys
    const int64_t n_qb = (s_n + kAttnQBlock - 1) / kAttnQBlock, nkp = (max_keys + 15) / 16 * 16;
#pragma omp parallel
    {
      float* S = scratch<float>(Scratch::AttnScores, static_cast<size_t>(kAttnQBlock * nkp));
      float* kt = scratch<float>(Scratch::AttnKeysT, static_cast<size_t>(dh * nkp));
      float* kv = scratch<float>(Scratch::AttnGathered, static_cast<size_t>(2 * dh * nkp));
#pragma omp for collapse(3) schedule(dynamic, 1)
      for (int64_t b = 0; b < b_n; ++b)
        for (int64_t h = 0; h < h_n; ++h)
          for (int64_t qb = 0; qb < n_qb; ++qb) {
            const int64_t s0 = qb * kAttnQBlock, nq = std::min(kAttnQBlock, s_n - s0), kv_h = h / group;
            const int64_t pos0 = ps[b] + s0, ja = av.first_key(pos0), nk = pos0 + nq - ja;
            const int32_t* row_tb = tb + b * m;
            for (int64_t j = 0; j < nk; ++j) {
              const int64_t key = ja + j;
              const int64_t at = (static_cast<int64_t>(row_tb[key / block]) * block + key % block) * hkv + kv_h;
              std::memcpy(kv + j * dh, kp + at * dh, static_cast<size_t>(dh) * sizeof(float));
              std::memcpy(kv + (nk + j) * dh, vp + at * dh, static_cast<size_t>(dh) * sizeof(float));
            }
            attend_block(qp + ((b * s_n + s0) * h_n + h) * dh, h_n * dh, kv, kv + nk * dh, dh, nq, ja, nk, pos0, dh,
                         scale, sink_of(av, h), av.sinks.defined(), av, kt, S, op + ((b * s_n + s0) * h_n + h) * dh,
                         h_n * dh);
          }
    }
    return;
  }
  const int64_t gs = decode_heads_per_task(b_n * s_n, hkv, group), parts = group / gs;
#pragma omp parallel if(work > 32768)
  {
    float* sc = scratch<float>(Scratch::AttnScores, static_cast<size_t>(gs * (max_keys + 2)));
#pragma omp for collapse(3) schedule(dynamic, 1)
    for (int64_t b = 0; b < b_n; ++b)
      for (int64_t s = 0; s < s_n; ++s)
        for (int64_t t = 0; t < hkv * parts; ++t) {
          const int64_t kv_h = t / parts, h0 = kv_h * group + (t % parts) * gs;
          const int32_t* row_tb = tb + b * m;
          const int64_t n_keys = ps[b] + s + 1, j0 = av.first_key(ps[b] + s);
          auto row = [&](const float* pages) {
            return [=](int64_t j) {
              return pages + ((static_cast<int64_t>(row_tb[j / block]) * block + j % block) * hkv + kv_h) * dh;
            };
          };
          attend_decode_heads(qp + ((b * s_n + s) * h_n + h0) * dh, op + ((b * s_n + s) * h_n + h0) * dh, gs, h0, dh,
                              j0, n_keys, scale, av, row(kp), row(vp), sc);
        }
  }
}

}  // namespace cpu
}  // namespace moe
