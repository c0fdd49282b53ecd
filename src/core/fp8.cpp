// fp8.cpp — e4m3 decoding and 128×128 block dequantisation (see fp8.h).
#include "core/fp8.h"

#include <cmath>
#include <limits>
#include <vector>

#include "core/error.h"

namespace moe {

float e4m3_value(uint8_t code) {
  const int e = (code >> 3) & 15, m = code & 7;
  if (e == 15 && m == 7) return std::numeric_limits<float>::quiet_NaN();
  // Subnormal: m/8 · 2^(1-7); normal: (1 + m/8) · 2^(e-7). Both are exact in f32.
  const float mag = e == 0 ? std::ldexp(float(m), -9) : std::ldexp(float(8 + m), e - 10);
  return (code & 0x80) ? -mag : mag;
}

Tensor fp8_block_dequantize(const Tensor& w, const Tensor& scale_inv, const std::string& what, int64_t block) {
  MOE_CHECK(w.dtype() == DType::U8 && w.ndim() == 2, "%s: FP8 weight must be 2-D e4m3 (read as U8), got %s %s",
            what.c_str(), dtype_name(w.dtype()), w.shape_str().c_str());
  MOE_CHECK(block > 0, "%s: FP8 block size %lld", what.c_str(), (long long)block);
  const int64_t out = w.dim(0), in = w.dim(1);
  const int64_t gr = (out + block - 1) / block, gc = (in + block - 1) / block;
  MOE_CHECK(scale_inv.ndim() == 2 && scale_inv.dim(0) == gr && scale_inv.dim(1) == gc,
            "%s: weight_scale_inv must be [%lld, %lld] for a [%lld, %lld] weight in %lldx%lld blocks, got %s",
            what.c_str(), (long long)gr, (long long)gc, (long long)out, (long long)in, (long long)block,
            (long long)block, scale_inv.shape_str().c_str());
  MOE_CHECK(scale_inv.dtype() == DType::F32 || scale_inv.dtype() == DType::BF16 || scale_inv.dtype() == DType::F16,
            "%s: weight_scale_inv must be f32, bf16 or f16, got %s", what.c_str(), dtype_name(scale_inv.dtype()));
  const std::vector<float> scale = scale_inv.to_f32_vector();
  float lut[256];
  for (int c = 0; c < 256; ++c) lut[c] = e4m3_value(uint8_t(c));
  Tensor o = Tensor::empty({out, in}, DType::F32, MemCategory::Workspace);
  const uint8_t* src = static_cast<const uint8_t*>(w.raw());
  float* dst = o.data<float>();
#pragma omp parallel for schedule(static) if(out * in > (1 << 20))
  for (int64_t i = 0; i < out; ++i) {
    const float* srow = scale.data() + (i / block) * gc;
    for (int64_t j = 0; j < in; ++j) dst[i * in + j] = lut[src[i * in + j]] * srow[j / block];
  }
  return o;
}

}  // namespace moe
