// fp8.h — DeepSeek-V3's FP8 weights (e4m3 with 128×128 block scales), dequantised at load.
//
// A checkpoint stores a linear weight W [out, in] as two tensors:
//   W                  float8_e4m3fn [out, in] (safetensors "F8_E4M3", read as its bytes: U8);
//   W_scale_inv        f32 (or bf16) [ceil(out/128), ceil(in/128)]: one factor per block;
// value[i, j] = e4m3(W[i, j]) · scale_inv[i / 128, j / 128] (HF's and DeepSeek's dequantisation:
// the "inv" is the inverse of the quantisation scale, so it multiplies).
// e4m3 (OCP FP8, "fn": finite): 1 sign, 4 exponent bits (bias 7), 3 mantissa bits; exponent 0 is
// subnormal (m/8 · 2^-6); S.1111.111 is NaN (the only special code: no infinities), so the largest
// finite magnitude is 1.75 · 2^8 = 448.
#pragma once
#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace moe {

// The value of an e4m3 code (0..255), from the format's definition (NaN for 0x7F and 0xFF).
float e4m3_value(uint8_t code);

// w [out, in] u8 (e4m3 codes) and scale_inv [ceil(out/block), ceil(in/block)] f32/bf16/f16 ->
// f32 [out, in] (category Workspace). Each element is the code's value times its block's factor,
// rounded once to f32 (exact whenever the factor is a power of two). Throws moe::Error naming
// `what` for other dtypes or a scale shape that does not tile w.
Tensor fp8_block_dequantize(const Tensor& w, const Tensor& scale_inv, const std::string& what, int64_t block = 128);

}  // namespace moe
