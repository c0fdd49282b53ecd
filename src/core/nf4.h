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
//
// NF4 with double quantisation (DType::NF4DQ, "nf4dq"; QLoRA's double quantisation of the absmax
// values) in a self-contained layout: super-blocks of 256 weights along a row (four NF4 blocks),
// 134 bytes, 4.19 bits a weight: a bf16 scale s (the four absmax values' maximum rounded up to
// bf16), four u8 codes c_j, then the four blocks' 32 bytes of nibbles. Block j's absmax is
// d_j = s · (c_j / 255) with c_j the smallest code for which d_j covers the block's own absmax,
// and its nibbles are the nearest codes to x / d_j. The error per weight is at most
// d_j · (largest half-gap), with d_j − absmax_j ≤ s / 255: a block far smaller than the largest of
// its super-block is represented on a coarser grid than under plain NF4 (weights' neighbouring
// blocks differ by small factors; a test bounds the total error at 1.05x plain NF4's).
// Why not bitsandbytes' own double quantisation (8-bit codes of the mean-subtracted absmax
// values in groups of 256 blocks, 4.13 bits a weight): its groups and offset run over the
// flattened tensor, so a chunk of rows would need tensor-wide side tables; here every 256
// weights carry their own. bitsandbytes' double-quantised checkpoints still load exactly, as
// NF4 with the absmax values decoded (io/bnb_checkpoint.h), and `moe quantize` writes its layout.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moe {

constexpr int64_t kNf4Block = 64;
constexpr size_t kNf4BlockBytes = 36;
constexpr int kNf4DqBlocks = 4;
constexpr int64_t kNf4DqBlock = kNf4DqBlocks * kNf4Block;
constexpr size_t kNf4DqBlockBytes = 2 + kNf4DqBlocks + kNf4DqBlocks * kNf4Block / 2;  // 134

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

// n values (a multiple of 256) <-> n/256 nf4dq super-blocks; the bf16 one as nf4_dequantize_bf16.
void nf4dq_quantize(const float* src, uint8_t* dst, int64_t n);
void nf4dq_dequantize(const uint8_t* src, float* dst, int64_t n);
void nf4dq_dequantize_bf16(const uint8_t* src, uint16_t* dst, int64_t n);

}  // namespace moe
