// ref_quant.cpp — the naive references of the quantized kernels (see ref_quant.h).
#include "ops/ref/ref_quant.h"

#include <cmath>

#include "core/error.h"
#include "core/quant.h"

namespace moe {
namespace ref {
namespace {

int64_t act_block(DType wdt) { return dtype_block_elems(wdt) == 32 ? 32 : 256; }

// The m rows of w dequantized (f32, as the format defines them), widened to double.
std::vector<double> dequant_rows(const void* w, DType wdt, int64_t m, int64_t k) {
  MOE_CHECK(dtype_is_quant(wdt), "quantized reference: %s is not a quantized dtype", dtype_name(wdt));
  std::vector<float> f(static_cast<size_t>(m * k));
  const size_t rb = dtype_nbytes(wdt, k);
  for (int64_t r = 0; r < m; ++r)
    dequantize_row(dtype_ggml_type(wdt), static_cast<const uint8_t*>(w) + r * rb, f.data() + r * k, k);
  return std::vector<double>(f.begin(), f.end());
}

void gemm(double* out, const std::vector<double>& x, const std::vector<double>& w, int64_t n, int64_t m, int64_t k) {
  for (int64_t i = 0; i < n; ++i)
    for (int64_t r = 0; r < m; ++r) {
      double s = 0;
      for (int64_t j = 0; j < k; ++j) s += x[i * k + j] * w[r * k + j];
      out[i * m + r] = s;
    }
}

}  // namespace

void quantize_act_row(const float* x, int64_t k, int64_t blk, int8_t* q, float* d) {
  for (int64_t b = 0; b < k / blk; ++b) {
    float amax = 0;
    for (int64_t j = 0; j < blk; ++j)  // a NaN makes the block's scale NaN (as the kernels do)
      amax = std::isnan(x[b * blk + j]) || std::isnan(amax) ? NAN : std::fmax(amax, std::fabs(x[b * blk + j]));
    const float db = amax / 127.0f;
    const float id = db != 0.0f ? 1.0f / db : 0.0f;
    d[b] = db;
    for (int64_t j = 0; j < blk; ++j) {
      const float v = std::nearbyint(x[b * blk + j] * id);
      q[b * blk + j] = static_cast<int8_t>(std::isfinite(v) ? v : 0.0f);  // the scale carries the NaN
    }
  }
}

void quant_gemm_xwt_exact(double* out, const float* x, const void* w, DType wdt, int64_t n, int64_t m, int64_t k) {
  gemm(out, std::vector<double>(x, x + n * k), dequant_rows(w, wdt, m, k), n, m, k);
}

void quant_gemm_xwt_int8(double* out, const float* x, const void* w, DType wdt, int64_t n, int64_t m, int64_t k) {
  const int64_t blk = act_block(wdt);
  std::vector<double> xh(static_cast<size_t>(n * k));
  std::vector<int8_t> q(static_cast<size_t>(k));
  std::vector<float> d(static_cast<size_t>(k / blk));
  for (int64_t i = 0; i < n; ++i) {
    quantize_act_row(x + i * k, k, blk, q.data(), d.data());
    for (int64_t j = 0; j < k; ++j) xh[i * k + j] = double(d[j / blk]) * q[j];
  }
  gemm(out, xh, dequant_rows(w, wdt, m, k), n, m, k);
}

void act_rounding_bound(double* bound, const float* x, const void* w, DType wdt, int64_t n, int64_t m, int64_t k) {
  const int64_t blk = act_block(wdt);
  const std::vector<double> wd = dequant_rows(w, wdt, m, k);
  std::vector<int8_t> q(static_cast<size_t>(k));
  std::vector<float> d(static_cast<size_t>(k / blk));
  for (int64_t i = 0; i < n; ++i) {
    quantize_act_row(x + i * k, k, blk, q.data(), d.data());
    for (int64_t r = 0; r < m; ++r) {
      double s = 0;
      for (int64_t j = 0; j < k; ++j) s += 0.5 * double(d[j / blk]) * std::fabs(wd[r * k + j]);
      bound[i * m + r] = s;
    }
  }
}

}  // namespace ref
}  // namespace moe
