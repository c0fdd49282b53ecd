// cpu_elementwise.cpp — CPU reference for the row-wise and elementwise ops: embedding, RMSNorm,
// RoPE, KV append, SwiGLU, sigmoid gate, residual add, cast. f32 activations.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "ops/backend.h"
#include "ops/cpu/cpu_dot_f64.h"
#include "ops/cpu/cpu_parallel.h"
#include "ops/cpu/cpu_scratch.h"

namespace moe {
namespace cpu {
namespace {

void require_f32(const char* op, const Tensor& t) {
  MOE_CHECK(t.dtype() == DType::F32, "%s (cpu): activations must be f32, got %s", op, dtype_name(t.dtype()));
}

// Reads n values of a float tensor starting at element `at` as f32.
void read_f32(float* dst, const Tensor& t, int64_t at, int64_t n) {
  const char* base = static_cast<const char*>(t.raw()) + static_cast<size_t>(at) * dtype_size(t.dtype());
  convert_to_f32(dst, base, t.dtype(), static_cast<size_t>(n));
}

}  // namespace

void embedding_forward(Tensor& out, const Tensor& ids, const Tensor& table) {
  require_f32("embedding_forward", out);
  const int64_t t_n = ids.numel(), d = table.dim(1), v = table.dim(0);
  const int32_t* id = ids.data<int32_t>();
  for (int64_t t = 0; t < t_n; ++t)
    MOE_CHECK(id[t] >= 0 && id[t] < v, "embedding: token id %d out of range [0,%lld)", id[t], (long long)v);
  float* o = out.data<float>();
  parallel_for(t_n * d > 32768, t_n, [&](int64_t t) { read_f32(o + t * d, table, int64_t(id[t]) * d, d); });
}

void rmsnorm_forward(Tensor& out, const Tensor& x, const Tensor& w, float eps) {
  require_f32("rmsnorm_forward", out);
  require_f32("rmsnorm_forward", x);
  const int64_t d = x.dim(-1), n = x.numel() / d;
  float* wf = scratch<float>(Scratch::NormWeight, static_cast<size_t>(d));
  read_f32(wf, w, 0, d);
  const float* xp = x.data<float>();
  float* op = out.data<float>();
  auto row = [&](int64_t r) {
    const float* xr = xp + r * d;
    const float inv = static_cast<float>(1.0 / std::sqrt(dot_f64(xr, xr, d) / double(d) + double(eps)));
    float* orow = op + r * d;
    for (int64_t i = 0; i < d; ++i) orow[i] = wf[i] * (xr[i] * inv);
  };
  parallel_for(n * d > 32768, n, row);
}

namespace {

// A fingerprint of a RopeTable's frequencies and factor (FNV-1a over their bits; 0: plain).
uint64_t table_hash(const RopeTable* rt) {
  if (!rt || rt->plain()) return 0;
  uint64_t h = 1469598103934665603ull;
  auto mix = [&](double v) {
    uint64_t b;
    std::memcpy(&b, &v, sizeof b);
    for (int i = 0; i < 8; ++i) h = (h ^ ((b >> (8 * i)) & 0xff)) * 1099511628211ull;
  };
  for (double v : rt->inv_freq) mix(v);
  mix(rt->attention_factor);
  return h | 1;
}

// Rotates pairs (x_i, x_{i+Dh/2}) by +angle (forward) or -angle (backward: the rotation is
// orthogonal, so its gradient is the inverse rotation). With a table (YaRN) the angles use its
// frequencies and cos, sin carry its attention factor (the map is then factor × a rotation,
// whose transpose is factor × the inverse rotation).
void rope_rotate(Tensor& x, int64_t past, float theta, float sign, const RopeTable* rt = nullptr) {
  const int64_t b_n = x.dim(0), s_n = x.dim(1), h_n = x.dim(2), dh = x.dim(3), half = dh / 2;
  // cos/sin per (position, i), computed in f64 for accuracy. A training step rotates q and k
  // forward and backward at the same positions, so the table of the last call is kept (per
  // thread, in its scratch) and reused when the positions, width and theta repeat.
  struct TableKey {
    int64_t past = -1, s_n = 0, dh = 0;
    float theta = 0;
    uint64_t table = 0;
    const float* cs = nullptr;
    const float* sn = nullptr;  // the buffers themselves: a grown scratch is a new table
    bool operator==(const TableKey&) const = default;
  };
  thread_local TableKey last;
  float* cs = scratch<float>(Scratch::RopeCos, static_cast<size_t>(s_n * half));
  float* sn = scratch<float>(Scratch::RopeSin, static_cast<size_t>(s_n * half));
  const uint64_t th = table_hash(rt);
  const TableKey key{past, s_n, dh, theta, th, cs, sn};
  if (!(key == last)) {
    const double factor = th ? rt->attention_factor : 1.0;
    for (int64_t i = 0; i < half; ++i) {
      const double inv_freq =
          th && !rt->inv_freq.empty() ? rt->inv_freq[size_t(i)] : 1.0 / std::pow(double(theta), double(2 * i) / double(dh));
      for (int64_t s = 0; s < s_n; ++s) {
        const double ang = double(past + s) * inv_freq;
        cs[s * half + i] = static_cast<float>(std::cos(ang) * factor);
        sn[s * half + i] = static_cast<float>(std::sin(ang) * factor);
      }
    }
    last = key;
  }
  float* p = x.data<float>();
  const bool pairs = rt && rt->interleaved;  // (x[2i], x[2i+1]) rather than (x[i], x[i+Dh/2])
  parallel_for(b_n * s_n * h_n * dh > 32768, b_n * s_n, [&](int64_t bs) {
    const int64_t s = bs % s_n;
    for (int64_t h = 0; h < h_n; ++h) {
      float* v = p + (bs * h_n + h) * dh;
      for (int64_t i = 0; i < half; ++i) {
        float c = cs[s * half + i], si = sign * sn[s * half + i];
        const int64_t i0 = pairs ? 2 * i : i, i1 = pairs ? 2 * i + 1 : i + half;
        float a = v[i0], bb = v[i1];
        v[i0] = a * c - bb * si;
        v[i1] = bb * c + a * si;
      }
    }
  });
}

}  // namespace

void rope_forward(Tensor& x, int64_t past, float theta) {
  require_f32("rope_forward", x);
  rope_rotate(x, past, theta, 1.0f);
}

void rope_backward(Tensor& dx, int64_t past, float theta) { rope_rotate(dx, past, theta, -1.0f); }

void rope_forward(Tensor& x, int64_t past, const RopeTable& rt) {
  require_f32("rope_forward", x);
  rope_rotate(x, past, rt.theta, 1.0f, &rt);
}

void rope_backward(Tensor& dx, int64_t past, const RopeTable& rt) { rope_rotate(dx, past, rt.theta, -1.0f, &rt); }

void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, int64_t past) {
  const int64_t b_n = k.dim(0), s_n = k.dim(1), row = k.dim(2) * k.dim(3), cap = k_cache.dim(1);
  const size_t es = dtype_size(k.dtype());
  for (int64_t b = 0; b < b_n; ++b) {
    size_t bytes = static_cast<size_t>(s_n * row) * es;
    size_t dst = static_cast<size_t>((b * cap + past) * row) * es;
    size_t src = static_cast<size_t>(b * s_n * row) * es;
    std::memcpy(static_cast<char*>(k_cache.raw()) + dst, static_cast<const char*>(k.raw()) + src, bytes);
    std::memcpy(static_cast<char*>(v_cache.raw()) + dst, static_cast<const char*>(v.raw()) + src, bytes);
  }
}

void swiglu_forward(Tensor& out, const Tensor& h1, const Tensor& h3) {
  require_f32("swiglu_forward", out);
  const int64_t n = out.numel();
  const float* a = h1.data<float>();
  const float* b = h3.data<float>();
  float* o = out.data<float>();
#pragma omp parallel for schedule(static) if(n > 32768)
  for (int64_t i = 0; i < n; ++i) o[i] = a[i] / (1.0f + std::exp(-a[i])) * b[i];
}

void sigmoid_gate_add(Tensor& y, const Tensor& s, const Tensor& gate) {
  require_f32("sigmoid_gate_add", y);
  const int64_t t_n = y.dim(0), d = t_n > 0 ? y.numel() / t_n : 0;  // a rank may hold no rows
  const float* g = gate.data<float>();
  const float* sp = s.data<float>();
  float* yp = y.data<float>();
#pragma omp parallel for schedule(static) if(t_n * d > 32768)
  for (int64_t t = 0; t < t_n; ++t) {
    float sg = 1.0f / (1.0f + std::exp(-g[t]));
    for (int64_t i = 0; i < d; ++i) yp[t * d + i] += sg * sp[t * d + i];
  }
}

void add_inplace(Tensor& y, const Tensor& x) {
  require_f32("add_inplace", y);
  require_f32("add_inplace", x);
  const int64_t n = y.numel();
  const float* xp = x.data<float>();
  float* yp = y.data<float>();
  parallel_for(n > 32768, n, [&](int64_t i) { yp[i] += xp[i]; });
}

void copy_columns(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col, int64_t ncols) {
  const int64_t rows = dst.dim(0);
  const size_t es = dtype_size(dst.dtype());
  const size_t dp = static_cast<size_t>(dst.dim(1)) * es, sp = static_cast<size_t>(src.dim(1)) * es;
  char* d = static_cast<char*>(dst.raw()) + static_cast<size_t>(dst_col) * es;
  const char* s = static_cast<const char*>(src.raw()) + static_cast<size_t>(src_col) * es;
  for (int64_t r = 0; r < rows; ++r) std::memcpy(d + r * dp, s + r * sp, static_cast<size_t>(ncols) * es);
}

namespace {
constexpr size_t kCastRun = 4096;  // values a cast converts at a time

// n <= kCastRun values of dtype from at x to dtype to at o (float dtypes).
void cast_run(void* o, DType to, const void* x, DType from, size_t n) {
  if (to == from) {
    std::memcpy(o, x, n * dtype_size(from));
  } else if (to == DType::F32) {
    convert_to_f32(static_cast<float*>(o), x, from, n);
  } else if (from == DType::F32) {
    convert_from_f32(o, static_cast<const float*>(x), to, n);
  } else {
    float tmp[kCastRun];
    convert_to_f32(tmp, x, from, n);
    convert_from_f32(o, tmp, to, n);
  }
}
}  // namespace

// In runs of kCastRun values over the threads (the LM head's gradient chunk: 4M values a cast).
void cast(Tensor& out, const Tensor& in) {
  const size_t n = static_cast<size_t>(in.numel()), runs = (n + kCastRun - 1) / kCastRun;
  const size_t so = dtype_size(out.dtype()), si = dtype_size(in.dtype());
  char* o = static_cast<char*>(out.raw());
  const char* x = static_cast<const char*>(in.raw());
#pragma omp parallel for schedule(static) if(n > 65536 && !omp_in_parallel())
  for (size_t r = 0; r < runs; ++r)
    cast_run(o + r * kCastRun * so, out.dtype(), x + r * kCastRun * si, in.dtype(),
             std::min(kCastRun, n - r * kCastRun));
}

// Row r's bf16 values go to bytes [2rm, 2rm + 2m): the first or second half of f32 row r/2. Row 0
// (its own first half) goes first, run by run from the left through a buffer: each run lands on
// f32 values already read. Then the rows go in waves [1, 2), [2, 4), [4, 8), …: a wave's
// destinations are rows the waves before it have read, and its sources no row of it writes, so
// a wave's runs go over the threads in any order.
void cast_bf16_in_place(Tensor& out, const Tensor& x) {
  const int64_t n = x.dim(0), m = x.dim(1);
  if (n == 0 || m == 0) return;
  const float* xf = x.data<float>();
  uint16_t* o = out.data<uint16_t>();
  uint16_t run[kCastRun];
  for (int64_t c = 0; c < m; c += int64_t(kCastRun)) {
    const size_t len = std::min<size_t>(kCastRun, size_t(m - c));
    convert_from_f32(run, xf + c, DType::BF16, len);
    std::memcpy(o + c, run, len * sizeof(uint16_t));
  }
  const int64_t runs = (m + int64_t(kCastRun) - 1) / int64_t(kCastRun);
#pragma omp parallel if(n * m > 65536 && !omp_in_parallel())
  for (int64_t lo = 1; lo < n; lo *= 2) {
    const int64_t hi = std::min(n, 2 * lo);
#pragma omp for schedule(static)
    for (int64_t i = 0; i < (hi - lo) * runs; ++i) {
      const int64_t r = lo + i / runs, c = (i % runs) * int64_t(kCastRun);
      convert_from_f32(o + r * m + c, xf + r * m + c, DType::BF16, std::min<size_t>(kCastRun, size_t(m - c)));
    }
  }
}

}  // namespace cpu
}  // namespace moe
