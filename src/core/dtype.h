// dtype.h — element types and the f32 <-> bf16/f16 conversions every backend agrees on.
//
// Compute is f32 on the CPU; bf16/f16 are storage types converted on load. Rounding is
// round-to-nearest-even, as PyTorch does, so a bf16 copy made here equals torch's .bfloat16().
//
// BF16P is bf16 weights rearranged for the AVX512-BF16 decode kernel (core/bf16_panels.h): an
// [M, K] weight as M/16 panels of 16 rows, each K/2 lines of the 16 rows' pairs (k, k+1). Two
// bytes a value, but its values are not in row order: only Tensor::to_dtype (which knows the
// shape) converts it, a row range starting on a panel is a panel-packed weight again, and only
// gemm_xwt reads it (inference; cpu_gemm.h).
//
// Quantized weights (Q8_0 Q4_0 Q4_K Q5_K Q6_K) are block types: a tensor of one holds ggml
// blocks (core/quant.h, byte for byte as in GGUF files) of its LAST dimension, row-major, so a
// [E,F,D] expert tensor or an [N,K] linear weight is E*F (N) rows of D/32 (K/256) blocks. The
// last dimension must be a multiple of the block size (Tensor::empty checks), so every row,
// and every slice along dimension 0, starts on a block. They have no per-element size:
// dtype_nbytes gives the bytes of n values, dtype_size refuses them. Converting to/from f32
// (convert_to_f32 / convert_from_f32, Tensor::to_dtype) dequantizes / quantizes with
// core/quant.h. Ops accept them only as the weight of linear_forward / expert_ffn_forward on
// the CPU (ops.h); their bytes are tagged MemCategory::QuantWeights by the model loader.
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace moe {

enum class DType : uint8_t { F32, BF16, F16, I32, I64, U8, F64, Q8_0, Q4_0, Q4_K, Q5_K, Q6_K, NF4, Q4_1, Q5_0, Q5_1, Q2_K, Q3_K, IQ4_NL, IQ4_XS, NF4DQ, BF16P };

// True for the ggml block types (Q8_0 ... Q6_K): the ones with integer kernels.
bool dtype_is_quant(DType t);
// True for every block type: the ggml ones and NF4 / NF4DQ (core/nf4.h, QLoRA's frozen base),
// which ops dequantize by row blocks instead.
bool dtype_is_block(DType t);
// Values per block: 32 (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, IQ4_NL), 64 (NF4), 256 (Q2_K ... Q6_K, IQ4_XS, NF4DQ),
// 1 for element types.
int64_t dtype_block_elems(DType t);
// Bytes of n values of t (n a multiple of the block size: throws moe::Error otherwise).
size_t dtype_nbytes(DType t, int64_t n);
// Parses "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k", "nf4", "nf4dq" (any case); false
// for anything else.
bool dtype_from_quant_name(const std::string& s, DType* out);

// Bytes per element; throws for the block types (use dtype_nbytes).
size_t dtype_size(DType t);
const char* dtype_name(DType t);           // "f32", "bf16", …
const char* dtype_safetensors_name(DType t);  // "F32", "BF16", …
// Parses the safetensors spelling ("F32", "BF16", "F16", "I32", "I64", "U8", "F64");
// returns false for anything else.
bool dtype_from_safetensors(const std::string& s, DType* out);
// Parses the user spelling ("f32", "bf16", "f16").
bool dtype_from_name(const std::string& s, DType* out);

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even; NaN stays NaN (quieted). Branch-free, so loops over it vectorise.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements of type `from` at src to f32 at dst (any dtype but I32/I64/U8 read as
// numbers too; block types are dequantized, n a multiple of the block size).
void convert_to_f32(float* dst, const void* src, DType from, size_t n);
// Converts n f32 values to `to` (F32, BF16, F16, F64, or a block type: quantized).
void convert_from_f32(void* dst, const float* src, DType to, size_t n);

}  // namespace moe
