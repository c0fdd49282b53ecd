// nf4.h — NF4, the 4-bit NormalFloat storage of QLoRA's frozen base (Dettmers et al. 2023):
// blocks of 64 weights, each stored as the index of the nearest of 16 code values (quantiles of
// a standard normal, rescaled to [-1, 1], with an exact 0) times the block's absmax.
//
// Block layout (36 bytes for 64 values, 4.5 bits per weight): f32 absmax, then 32 bytes of
// 4-bit indices, two per byte — the even element in the high nibble, the odd one in the low
// nibble (bitsandbytes' packing order). Dequantization: code[index] · absmax, exactly.
// Quantization: index of the nearest code to x / absmax (ties to the lower code); an all-zero
// block stores absmax 0. The error per weight is at most absmax · (largest half-gap between
// adjacent codes) = absmax · (1 − 0.6961928) / 2 (between −1 and the next code).
// A DType::NF4 tensor is a block type (dtype.h) over its last dimension, like the ggml types,
// but it has no integer kernels: ops dequantize it row block by row block into f32 inside
// their GEMMs (never the whole tensor).
#pragma once
#include <cstddef>
#include <cstdint>

namespace moe {

constexpr int64_t kNf4Block = 64;
constexpr size_t kNf4BlockBytes = 36;

// The 16 NF4 code values (QLoRA, Appendix E; as bitsandbytes stores them), ascending.
extern const float kNf4Codes[16];

// The largest |x − dequant(quant(x))| for a block of absmax 1.
float nf4_max_error_per_absmax();

// n values (a multiple of 64) <-> n/64 blocks.
void nf4_quantize(const float* src, uint8_t* dst, int64_t n);
void nf4_dequantize(const uint8_t* src, float* dst, int64_t n);
// n/64 blocks -> n bf16 values: nf4_dequantize's values rounded to bf16 (to nearest even), bit
// for bit, without the f32 array (a QLoRA base's products on the bf16 matrix units).
void nf4_dequantize_bf16(const uint8_t* src, uint16_t* dst, int64_t n);

}  // namespace moe
