// cpu_moe.cpp — CPU reference for the MoE block: router top-k, dispatch (stable counting sort
// by expert), gather, grouped SwiGLU expert FFN over non-empty experts, combine.
#include <omp.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#include "ops/backend.h"
#include "ops/cpu/cpu_gemm.h"
#include "ops/cpu/cpu_glu.h"
#include "ops/cpu/cpu_parallel.h"
#include "ops/cpu/cpu_quant_gemm.h"
#include "ops/cpu/cpu_scratch.h"

namespace moe {
namespace cpu {

void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, bool renorm,
                         const Tensor& select_bias) {
  const int64_t t_n = logits.dim(0), e_n = logits.dim(1), k = topk_idx.dim(1);
  const float* lg = logits.data<float>();
  const float* bias = select_bias.defined() ? select_bias.data<float>() : nullptr;
  int32_t* idx = topk_idx.data<int32_t>();
  float* wt = topk_w.data<float>();
  parallel_for(t_n * e_n > 32768, t_n, [&](int64_t t) {
    const float* l = lg + t * e_n;
    float mx = -INFINITY;
    for (int64_t e = 0; e < e_n; ++e) mx = std::max(mx, l[e]);
    double sum = 0;
    for (int64_t e = 0; e < e_n; ++e) sum += std::exp(double(l[e] - mx));
    // Selection by logit equals selection by probability; ties keep the lower index. With a
    // selection bias the score is probability + bias (the weights stay unbiased).
    double* score = scratch<double>(Scratch::TopkScore, static_cast<size_t>(e_n));
    for (int64_t e = 0; e < e_n; ++e) score[e] = bias ? std::exp(double(l[e] - mx)) / sum + bias[e] : double(l[e]);
    int32_t* order = scratch<int32_t>(Scratch::TopkOrder, static_cast<size_t>(e_n));
    for (int64_t e = 0; e < e_n; ++e) order[e] = static_cast<int32_t>(e);
    std::partial_sort(order, order + k, order + e_n, [&](int32_t a, int32_t b) {
      return score[a] > score[b] || (score[a] == score[b] && a < b);
    });
    double ksum = 0;
    for (int64_t j = 0; j < k; ++j) {
      double p = std::exp(double(l[order[j]] - mx)) / sum;
      idx[t * k + j] = order[j];
      wt[t * k + j] = static_cast<float>(p);
      ksum += p;
    }
    if (renorm)
      for (int64_t j = 0; j < k; ++j) {
        double p = std::exp(double(l[order[j]] - mx)) / sum;
        wt[t * k + j] = static_cast<float>(p / ksum);
      }
  });
}

void moe_dispatch(Tensor& offsets, Tensor& perm, Tensor& inv, const Tensor& topk_idx, int64_t n_expert) {
  const int64_t p_n = topk_idx.numel();
  const int32_t* idx = topk_idx.data<int32_t>();
  int32_t* off = offsets.data<int32_t>();
  std::fill(off, off + n_expert + 1, 0);
  for (int64_t a = 0; a < p_n; ++a) {
    MOE_CHECK(idx[a] >= 0 && idx[a] < n_expert, "moe_dispatch: expert id %d out of range [0,%lld)", idx[a],
              (long long)n_expert);
    off[idx[a] + 1]++;
  }
  for (int64_t e = 0; e < n_expert; ++e) off[e + 1] += off[e];
  int32_t* next = scratch<int32_t>(Scratch::DispatchNext, static_cast<size_t>(n_expert));
  std::copy(off, off + n_expert, next);
  int32_t* pm = perm.data<int32_t>();
  int32_t* iv = inv.data<int32_t>();
  for (int64_t a = 0; a < p_n; ++a) {
    int32_t pos = next[idx[a]]++;
    pm[pos] = static_cast<int32_t>(a);
    iv[a] = pos;
  }
}

void gather_rows(Tensor& xp, const Tensor& x, const Tensor& perm, int64_t k) {
  MOE_CHECK(x.dtype() == DType::F32, "gather_rows (cpu): f32 only");
  const int64_t p_n = perm.numel(), d = x.dim(1);
  const int32_t* pm = perm.data<int32_t>();
  const float* src = x.data<float>();
  float* dst = xp.data<float>();
  parallel_for(p_n * d > 32768, p_n, [&](int64_t p) { std::copy_n(src + (pm[p] / k) * d, d, dst + p * d); });
}

void permute_weights(Tensor& row_scale, const Tensor& topk_w, const Tensor& perm) {
  const int64_t p_n = perm.numel();
  const int32_t* pm = perm.data<int32_t>();
  const float* w = topk_w.data<float>();
  float* rs = row_scale.data<float>();
  for (int64_t p = 0; p < p_n; ++p) rs[p] = w[pm[p]];
}

namespace {

// Decode-sized batches — every expert at most gemm_stream_rows(dtype) rows (cpu_gemm.h; any
// weight dtype: quantized rows are whole blocks, so a slice of rows starts on a block):
// the layer's experts in one parallel region, each thread taking an equal slice of every
// expert's weight rows (gate and up with the gated activation of those columns, then, after one
// barrier, down), so every thread reads the same bytes and the barrier waits on no tail. Each
// slice streams its weight rows once (the GEMMs run single-threaded inside the region). Per
// expert and product, a parallel region of its own cost a barrier each: 288 per 16-stream step
// of the medium preset, and the imbalance at each; tasks of 384 rows taken dynamically left
// half a task (a 60 µs down slice of q6_K on the medium model) idle at each barrier on
// average: 8-9% of a Q4_K_M decode token in libgomp's spin. `act(g, u, e, r, f0, f1)`: the
// gated activation of row r (permuted) of expert e over columns [f0, f1), into g from the gate
// and up rows g, u.

// Row i of a split of `rows` into `parts`, on a multiple of q rows: 8 (the dot kernels' tiles),
// 16 for panel-packed weights (a slice must start on a panel).
inline int64_t split_at(int64_t rows, int64_t i, int64_t parts, int64_t q) {
  return i == parts ? rows : std::min(rows, (rows * i / parts + q / 2) / q * q);
}

// Also: enough work for a parallel region (a region that runs on one thread would make the
// GEMVs' own regions nested ones, which libgomp serves with fresh threads: 10x slower).
bool experts_decode_sized(const int32_t* off, int64_t e_n, const Tensor& w1) {
  const int64_t max_rows = gemm_stream_rows(w1.dtype());
  for (int64_t e = 0; e < e_n; ++e)
    if (off[e + 1] - off[e] > max_rows) return false;
  return omp_get_max_threads() > 1 && int64_t(off[e_n]) * w1.dim(1) * w1.dim(2) >= (int64_t(1) << 20);
}

constexpr int64_t kMaxReadyExperts = 512;  // experts_streamed's per-expert flags (more: one barrier)

template <class Act, class Down>
void experts_streamed(Tensor& yp, const Tensor& xp, const int32_t* off, const Tensor& w1, const Tensor& w3,
                      const Tensor& w2, Act act, Down down_bias) {
  const int64_t e_n = w1.dim(0), f = w1.dim(1), d = w1.dim(2), total = off[e_n];
  float* h1 = scratch<float>(Scratch::ExpertH1, static_cast<size_t>(std::max<int64_t>(total, 1) * f));
  float* h3 = scratch<float>(Scratch::ExpertH3, static_cast<size_t>(std::max<int64_t>(total, 1) * f));
  // ready[e]: the threads that have written their columns of expert e's gated activation. A
  // thread starts e's down product once all have, rather than at one barrier after every
  // expert's gate and up, so it does not wait on another thread's last expert (Q4_K_M medium
  // decode, alternated runs in fast-memory minutes: 74-79% -> 77-80% of the read bandwidth).
  const bool flags = e_n <= kMaxReadyExperts;
  std::atomic<int> ready[kMaxReadyExperts];
  for (int64_t e = 0; e < e_n && flags; ++e) ready[e].store(0, std::memory_order_relaxed);

#pragma omp parallel
  {
    const int64_t nt = omp_get_num_threads(), id = omp_get_thread_num();
    const int64_t q1 = w1.dtype() == DType::BF16P ? 16 : 8, q2 = w2.dtype() == DType::BF16P ? 16 : 8;
    const int64_t f0 = split_at(f, id, nt, q1), f1 = split_at(f, id + 1, nt, q1);
    for (int64_t e = 0; e < e_n && f1 <= f0 && flags; ++e) ready[e].fetch_add(1, std::memory_order_release);
    for (int64_t e = 0; e < e_n && f1 > f0; ++e) {
      const int64_t r0 = off[e], n = off[e + 1] - r0;
      if (n == 0) continue;
      const float* x = xp.data<float>() + r0 * d;
      const char* w1e = static_cast<const char*>(w1.raw()) + dtype_nbytes(w1.dtype(), (e * f + f0) * d);
      const char* w3e = static_cast<const char*>(w3.raw()) + dtype_nbytes(w3.dtype(), (e * f + f0) * d);
      if (n == 1 && dtype_is_quant(w1.dtype()) && !quant_exact()) {
        // One token: gate and up rounded x once, and of one dtype read as one set of streams.
        const QuantPart p[2] = {{w1e, w1.dtype(), f1 - f0, h1 + r0 * f + f0}, {w3e, w3.dtype(), f1 - f0, h3 + r0 * f + f0}};
        quant_gemv_parts(x, d, p, 2);
      } else {
        gemm_xwt(h1 + r0 * f + f0, f, x, w1e, w1.dtype(), n, f1 - f0, d, false);
        gemm_xwt(h3 + r0 * f + f0, f, x, w3e, w3.dtype(), n, f1 - f0, d, false);
      }
      for (int64_t r = r0; r < r0 + n; ++r) act(h1 + r * f, h3 + r * f, e, r, f0, f1);
      if (flags) ready[e].fetch_add(1, std::memory_order_release);
    }
    if (!flags) {
#pragma omp barrier
    }
    const int64_t d0 = split_at(d, id, nt, q2), d1 = split_at(d, id + 1, nt, q2);
    for (int64_t e = 0; e < e_n && d1 > d0; ++e) {
      const int64_t r0 = off[e], n = off[e + 1] - r0;
      if (n == 0) continue;
      while (flags && ready[e].load(std::memory_order_acquire) < nt) _mm_pause();
      const char* w2e = static_cast<const char*>(w2.raw()) + dtype_nbytes(w2.dtype(), (e * d + d0) * f);
      float* y = yp.data<float>() + r0 * d;
      gemm_xwt(y + d0, d, h1 + r0 * f, w2e, w2.dtype(), n, d1 - d0, f, false);
      down_bias(y, e, r0, n, d0, d1);
    }
  }
}

}  // namespace

// For each expert with rows: H1 = X W1ᵀ, H3 = X W3ᵀ [n,F]; A = silu(H1)·H3·scale; Y = A W2ᵀ [n,D].
// Experts without rows are skipped entirely (their weights are never read).
void expert_ffn_forward(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1, const Tensor& w3,
                        const Tensor& w2, const Tensor& row_scale) {
  MOE_CHECK(xp.dtype() == DType::F32 && yp.dtype() == DType::F32, "expert_ffn_forward (cpu): f32 activations");
  const int64_t e_n = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  const int32_t* off = offsets.data<int32_t>();
  const float* rs = row_scale.defined() ? row_scale.data<float>() : nullptr;
  if (experts_decode_sized(off, e_n, w1)) {
    auto act = [rs](float* g, const float* u, int64_t, int64_t r, int64_t f0, int64_t f1) {
      swiglu_row(g + f0, g + f0, u + f0, rs ? rs[r] : 1.0f, f1 - f0);
    };
    return experts_streamed(yp, xp, off, w1, w3, w2, act, [](float*, int64_t, int64_t, int64_t, int64_t, int64_t) {});
  }
  int64_t max_rows = 0;
  for (int64_t e = 0; e < e_n; ++e) max_rows = std::max<int64_t>(max_rows, off[e + 1] - off[e]);
  float* h1 = scratch<float>(Scratch::ExpertH1, static_cast<size_t>(max_rows * f));
  float* h3 = scratch<float>(Scratch::ExpertH3, static_cast<size_t>(max_rows * f));
  for (int64_t e = 0; e < e_n; ++e) {
    const int64_t r0 = off[e], n = off[e + 1] - off[e];
    if (n == 0) continue;
    const float* x = xp.data<float>() + r0 * d;
    // Byte offsets through dtype_nbytes: quantized experts are whole blocks per row, and w2 may
    // have another dtype than w1/w3 (ops.h).
    const char* w1e = static_cast<const char*>(w1.raw()) + dtype_nbytes(w1.dtype(), e * f * d);
    const char* w3e = static_cast<const char*>(w3.raw()) + dtype_nbytes(w3.dtype(), e * f * d);
    const char* w2e = static_cast<const char*>(w2.raw()) + dtype_nbytes(w2.dtype(), e * d * f);
    gemm_xwt(h1, f, x, w1e, w1.dtype(), n, f, d, false);
    gemm_xwt(h3, f, x, w3e, w3.dtype(), n, f, d, false);
#pragma omp parallel for schedule(static) if(n * f > 32768)
    for (int64_t r = 0; r < n; ++r) {
      float s = rs ? rs[r0 + r] : 1.0f;
      for (int64_t i = 0; i < f; ++i) {
        float a = h1[r * f + i];
        h1[r * f + i] = a / (1.0f + std::exp(-a)) * h3[r * f + i] * s;
      }
    }
    gemm_xwt(yp.data<float>() + r0 * d, d, h1, w2e, w2.dtype(), n, d, f, false);
  }
}

// The variant (variants.h): biases added to the gate/up pre-activations, the clamped gated
// activation, and the down bias scaled by the row's routing weight like the rest of the row.
void expert_ffn_forward(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1, const Tensor& w3,
                        const Tensor& w2, const Tensor& row_scale, const ExpertGlu& glu, const ExpertBias& bias) {
  MOE_CHECK(xp.dtype() == DType::F32 && yp.dtype() == DType::F32, "expert_ffn_forward (cpu): f32 activations");
  const int64_t e_n = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  const int32_t* off = offsets.data<int32_t>();
  const float* rs = row_scale.defined() ? row_scale.data<float>() : nullptr;
  if (experts_decode_sized(off, e_n, w1)) {
    // Biases read in place as f32 when stored so (the variants' biases are f32: variants.h);
    // otherwise the per-expert path below widens them.
    const bool f32b = (!bias.b1.defined() || bias.b1.dtype() == DType::F32) &&
                      (!bias.b3.defined() || bias.b3.dtype() == DType::F32) &&
                      (!bias.b2.defined() || bias.b2.dtype() == DType::F32);
    if (f32b) {
      const float* b1 = bias.b1.defined() ? bias.b1.data<float>() : nullptr;
      const float* b3 = bias.b3.defined() ? bias.b3.data<float>() : nullptr;
      const float* b2 = bias.b2.defined() ? bias.b2.data<float>() : nullptr;
      auto act = [&](float* g, const float* u, int64_t e, int64_t r, int64_t f0, int64_t f1) {
        const float sc = rs ? rs[r] : 1.0f;
        for (int64_t i = f0; i < f1; ++i)
          g[i] = glu_act(g[i] + (b1 ? b1[e * f + i] : 0.0f), u[i] + (b3 ? b3[e * f + i] : 0.0f), glu) * sc;
      };
      auto down = [&](float* y, int64_t e, int64_t r0, int64_t n, int64_t d0, int64_t d1) {
        if (!b2) return;
        for (int64_t r = 0; r < n; ++r) {
          const float sc = rs ? rs[r0 + r] : 1.0f;
          for (int64_t i = d0; i < d1; ++i) y[r * d + i] += sc * b2[e * d + i];
        }
      };
      return experts_streamed(yp, xp, off, w1, w3, w2, act, down);
    }
  }
  int64_t max_rows = 0;
  for (int64_t e = 0; e < e_n; ++e) max_rows = std::max<int64_t>(max_rows, off[e + 1] - off[e]);
  float* h1 = scratch<float>(Scratch::ExpertH1, static_cast<size_t>(max_rows * f));
  float* h3 = scratch<float>(Scratch::ExpertH3, static_cast<size_t>(max_rows * f));
  float* bb = scratch<float>(Scratch::ExpertBias, static_cast<size_t>(2 * f + d));
  for (int64_t e = 0; e < e_n; ++e) {
    const int64_t r0 = off[e], n = off[e + 1] - off[e];
    if (n == 0) continue;
    const float* x = xp.data<float>() + r0 * d;
    const char* w1e = static_cast<const char*>(w1.raw()) + dtype_nbytes(w1.dtype(), e * f * d);
    const char* w3e = static_cast<const char*>(w3.raw()) + dtype_nbytes(w3.dtype(), e * f * d);
    const char* w2e = static_cast<const char*>(w2.raw()) + dtype_nbytes(w2.dtype(), e * d * f);
    gemm_xwt(h1, f, x, w1e, w1.dtype(), n, f, d, false);
    gemm_xwt(h3, f, x, w3e, w3.dtype(), n, f, d, false);
    float* b1 = bias.b1.defined() ? bb : nullptr;
    float* b3 = bias.b3.defined() ? bb + f : nullptr;
    float* b2 = bias.b2.defined() ? bb + 2 * f : nullptr;
    if (b1) bias_row(b1, bias.b1, e, f);
    if (b3) bias_row(b3, bias.b3, e, f);
    if (b2) bias_row(b2, bias.b2, e, d);
#pragma omp parallel for schedule(static) if(n * f > 32768)
    for (int64_t r = 0; r < n; ++r) {
      const float s = rs ? rs[r0 + r] : 1.0f;
      for (int64_t i = 0; i < f; ++i) {
        const float g = h1[r * f + i] + (b1 ? b1[i] : 0.0f), u = h3[r * f + i] + (b3 ? b3[i] : 0.0f);
        h1[r * f + i] = glu_act(g, u, glu) * s;
      }
    }
    float* y = yp.data<float>() + r0 * d;
    gemm_xwt(y, d, h1, w2e, w2.dtype(), n, d, f, false);
    if (b2)
      for (int64_t r = 0; r < n; ++r) {
        const float s = rs ? rs[r0 + r] : 1.0f;
        for (int64_t i = 0; i < d; ++i) y[r * d + i] += s * b2[i];
      }
  }
}

void moe_combine(Tensor& y, const Tensor& yp, const Tensor& inv, int64_t k, bool accumulate) {
  MOE_CHECK(y.dtype() == DType::F32, "moe_combine (cpu): f32 only");
  const int64_t t_n = y.dim(0), d = y.dim(1);
  const int32_t* iv = inv.data<int32_t>();
  const float* src = yp.data<float>();
  float* dst = y.data<float>();
  parallel_for(t_n * d > 32768, t_n, [&](int64_t t) {
    float* yr = dst + t * d;
    if (!accumulate) std::fill(yr, yr + d, 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      const float* r = src + int64_t(iv[t * k + j]) * d;
      for (int64_t i = 0; i < d; ++i) yr[i] += r[i];
    }
  });
}

}  // namespace cpu
}  // namespace moe
