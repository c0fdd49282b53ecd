// mxfp4.h — gpt-oss's MXFP4 expert tensors (OCP Microscaling FP4), dequantised at load.
//
// A checkpoint stores each fused expert weight `W` as two tensors:
//   W_blocks uint8 [..., G, 16]: 32 e2m1 codes per block, two per byte, the LOW nibble first
//                                (value 2i from byte i's low 4 bits, value 2i+1 from its high 4);
//   W_scales uint8 [..., G]:     one e8m0 exponent per block, scale = 2^(s - 127).
// value[..., 32g + j] = e2m1(code j of block g) · 2^(s_g - 127). The rows are the weight's output
// units (gate_up_proj_blocks [E, 2F, D/32, 16] gives [E, 2F, D]; HF's loader then transposes to
// the in×out [E, D, 2F] of the bf16 checkpoints).
// e2m1 (1 sign, 2 exponent, 1 mantissa bits, exponent bias 1, no inf/nan): codes 0..7 are
// 0, 0.5, 1, 1.5, 2, 3, 4, 6 and 8..15 their negatives (8 is -0).
#pragma once
#include <cstdint>
#include <string>

#include "core/tensor.h"

namespace moe {

// The value of a 4-bit e2m1 code (0..15), from the format's definition.
float e2m1_value(uint8_t code);

// blocks [..., G, 16] u8 and scales [..., G] u8 -> f32 [..., G·32] (category Workspace), exact
// (every e2m1 value times a power of two in f32's range; exponents beyond it give 0 or inf as
// ldexp does). Throws moe::Error naming `what` for other dtypes or shapes that do not match.
Tensor mxfp4_dequantize(const Tensor& blocks, const Tensor& scales, const std::string& what);

}  // namespace moe
