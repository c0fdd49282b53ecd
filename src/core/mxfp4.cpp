// mxfp4.cpp — MXFP4 (e2m1 codes with e8m0 block scales) decoding (see mxfp4.h).
#include "core/mxfp4.h"

#include <cmath>

#include "core/error.h"

namespace moe {

float e2m1_value(uint8_t code) {
  // bit 3: sign; bits 2..1: exponent e; bit 0: mantissa m. e = 0 is subnormal: m · 2^(1-1) / 2;
  // otherwise (1 + m/2) · 2^(e-1).
  const int e = (code >> 1) & 3, m = code & 1;
  const float mag = e == 0 ? 0.5f * float(m) : std::ldexp(1.0f + 0.5f * float(m), e - 1);
  return (code & 8) ? -mag : mag;
}

Tensor mxfp4_dequantize(const Tensor& blocks, const Tensor& scales, const std::string& what) {
  MOE_CHECK(blocks.dtype() == DType::U8 && scales.dtype() == DType::U8,
            "%s: MXFP4 blocks and scales must be uint8, got %s and %s", what.c_str(), dtype_name(blocks.dtype()),
            dtype_name(scales.dtype()));
  MOE_CHECK(blocks.ndim() >= 2 && blocks.dim(-1) == 16 && scales.ndim() == blocks.ndim() - 1,
            "%s: MXFP4 blocks %s must be [..., G, 16] and scales [..., G], got scales %s", what.c_str(),
            blocks.shape_str().c_str(), scales.shape_str().c_str());
  for (int64_t i = 0; i < scales.ndim(); ++i)
    MOE_CHECK(scales.dim(i) == blocks.dim(i), "%s: MXFP4 scales %s do not match blocks %s", what.c_str(),
              scales.shape_str().c_str(), blocks.shape_str().c_str());
  Shape out_shape(blocks.shape().begin(), blocks.shape().end() - 2);
  out_shape.push_back(blocks.dim(-2) * 32);
  Tensor out = Tensor::empty(out_shape, DType::F32, MemCategory::Workspace);
  const uint8_t* bp = static_cast<const uint8_t*>(blocks.raw());
  const uint8_t* sp = static_cast<const uint8_t*>(scales.raw());
  float* o = out.data<float>();
  float lut[16];
  for (int c = 0; c < 16; ++c) lut[c] = e2m1_value(uint8_t(c));
  const int64_t n_blocks = scales.numel();
  for (int64_t g = 0; g < n_blocks; ++g) {
    const int exp = int(sp[g]) - 127;
    for (int64_t i = 0; i < 16; ++i) {
      const uint8_t byte = bp[g * 16 + i];
      o[g * 32 + 2 * i] = std::ldexp(lut[byte & 15], exp);
      o[g * 32 + 2 * i + 1] = std::ldexp(lut[byte >> 4], exp);
    }
  }
  return out;
}

}  // namespace moe
