// quant.h — ggml/GGUF weight types: the block layouts, dequantisation to f32 and quantisation.
//
// The layouts are llama.cpp's (ggml-common.h), byte for byte, so a GGUF file's tensor data is an
// array of these blocks along each row (a row of n elements is n / block_elems blocks). Every
// half-precision scale is IEEE f16, stored little-endian. Dequantisation follows the format
// definitions exactly (f32 arithmetic in the same order as llama.cpp's reference code, so the
// results are bit-identical). Quantisation:
//   Q8_0, Q4_0, Q4_1, Q5_0, Q5_1
//                      reproduce llama.cpp's reference rounding (quantize_row_*_ref) exactly;
//   Q4_K, Q5_K, Q6_K   our own quantisers: per-sub-block scale/min search, then the 6-/8-bit
//                      sub-block scales quantised against the f16 super-block scale, and the
//                      values rounded against the scales as they will be decoded.
//
// Shape convention: a GGUF tensor's ne[0] is its row length (the innermost dimension, the last
// one of the torch shape). Row lengths must be multiples of the type's block size.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

#include "core/dtype.h"

namespace moe {

// ggml_type values as stored in GGUF tensor infos.
enum class GgmlType : uint32_t {
  F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9,
  Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13, Q6_K = 14, Q8_K = 15,
  IQ2_XXS = 16, IQ2_XS = 17, IQ3_XXS = 18, IQ1_S = 19, IQ4_NL = 20, IQ3_S = 21, IQ2_S = 22, IQ4_XS = 23,
  I8 = 24, I16 = 25, I32 = 26, I64 = 27, F64 = 28, IQ1_M = 29, BF16 = 30, TQ1_0 = 34, TQ2_0 = 35,
  MXFP4 = 39,
};

constexpr int64_t kQK8_0 = 32;
constexpr int64_t kQK4_0 = 32;
constexpr int64_t kQK_K = 256;  // super-block of the K-quants

// Q8_0: 32 values, x = d * q.
struct BlockQ8_0 {
  uint16_t d;       // f16 scale
  int8_t qs[32];
};
// Q4_0: 32 values, x = d * (q - 8); byte j holds value j (low nibble) and value j+16 (high).
struct BlockQ4_0 {
  uint16_t d;
  uint8_t qs[16];
};
// Q4_1: 32 values, x = d * q + m, q in 0..15, nibbles as Q4_0.
struct BlockQ4_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qs[16];
};
// Q5_0: 32 values, x = d * (q - 16), q in 0..31: the low 4 bits as Q4_0, bit 4 of value j in
// bit j of qh (a little-endian uint32).
struct BlockQ5_0 {
  uint16_t d;
  uint8_t qh[4];
  uint8_t qs[16];
};
// Q5_1: 32 values, x = d * q + m, q in 0..31 as Q5_0.
struct BlockQ5_1 {
  uint16_t d;
  uint16_t m;
  uint8_t qh[4];
  uint8_t qs[16];
};
// (llama.cpp writes Q5_0 / Q5_1 / Q8_0 for the rows of a Q4_K / Q5_K / Q6_K file that are not
// whole 256-value super-blocks, and Q4_1 / Q5_0 / Q5_1 files exist in their own right.)
// Q4_K: 256 values in 8 sub-blocks of 32, x = d*sc[s]*q - dmin*m[s], q in 0..15; the 6-bit
// sc/m of the 8 sub-blocks are packed into 12 bytes (see get_scale_min_k4 in quant.cpp).
struct BlockQ4_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qs[128];
};
// Q5_K: as Q4_K with a fifth bit per value in qh, q in 0..31.
struct BlockQ5_K {
  uint16_t d;
  uint16_t dmin;
  uint8_t scales[12];
  uint8_t qh[32];
  uint8_t qs[128];
};
// Q2_K: 256 values in 16 sub-blocks of 16, x = d*sc[s]*q - dmin*m[s], q in 0..3; scales[s] holds
// sc (low 4 bits) and m (high 4 bits). Value v = 128n + 32j + l (n 0-1, j 0-3, l 0-31) is
// bits 2j..2j+1 of qs[32n + l].
struct BlockQ2_K {
  uint8_t scales[16];
  uint8_t qs[64];
  uint16_t d;
  uint16_t dmin;
};
// Q3_K: 256 values in 16 sub-blocks of 16, x = d * (sc[s] - 32) * (q - 4), q in 0..7: the low two
// bits as Q2_K's, bit 2 from hmask (value 128n + 32j + l: bit 4n + j of hmask[l]); the 6-bit sc
// packed into 12 bytes (see q3_k_scales in quant.cpp).
struct BlockQ3_K {
  uint8_t hmask[32];
  uint8_t qs[64];
  uint8_t scales[12];
  uint16_t d;
};
// IQ4_NL: 32 values, x = d * kIq4NlValues[q] (a non-linear 4-bit grid), nibbles as Q4_0.
struct BlockIQ4_NL {
  uint16_t d;
  uint8_t qs[16];
};
// IQ4_XS: 256 values in 8 sub-blocks of 32, x = d * (ls[s] - 32) * kIq4NlValues[q]: the 6-bit ls
// has its low 4 bits in scales_l[s / 2] (nibble s % 2) and its top 2 bits at bit 2s of
// scales_h; each sub-block's 16 bytes of nibbles as Q4_0's.
struct BlockIQ4_XS {
  uint16_t d;
  uint16_t scales_h;
  uint8_t scales_l[4];
  uint8_t qs[128];
};
// Sub-block s's signed scale ls[s] - 32 of the IQ4_XS super-block whose bytes start at p (the
// reference dequantisation and the CPU kernels read it through here).
inline int iq4_xs_scale(const uint8_t* p, int s) {
  const int sh = p[2] | (p[3] << 8);
  return (((p[4 + s / 2] >> (4 * (s % 2))) & 0xF) | (((sh >> (2 * s)) & 3) << 4)) - 32;
}
// The 16 levels of the IQ4 formats (ggml-common.h's kvalues_iq4nl: part of the format).
inline constexpr int8_t kIq4NlValues[16] = {-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113};
// Q6_K: 256 values in 16 sub-blocks of 16, x = d * sc[s] * (q - 32), q in 0..63 (4 low bits
// in ql, 2 high bits in qh), sc int8.
struct BlockQ6_K {
  uint8_t ql[128];
  uint8_t qh[64];
  int8_t scales[16];
  uint16_t d;
};
static_assert(sizeof(BlockQ8_0) == 34 && sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 &&
                  sizeof(BlockQ5_0) == 22 && sizeof(BlockQ5_1) == 24 && sizeof(BlockQ4_K) == 144 &&
                  sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210 && sizeof(BlockQ2_K) == 84 &&
                  sizeof(BlockQ3_K) == 110 && sizeof(BlockIQ4_NL) == 18 && sizeof(BlockIQ4_XS) == 136,
              "block layouts must match ggml-common.h");

struct GgmlTypeInfo {
  const char* name;      // "q4_K", as ggml_type_name spells it
  int64_t block_elems;   // values per block (1 for plain types)
  size_t block_bytes;    // bytes per block
  bool dequantizable;    // dequantize_row supports it
  bool quantizable;      // quantize_row supports it
};

// Info for a ggml type value; false if the value is not a ggml type this engine knows.
bool ggml_type_info(uint32_t type, GgmlTypeInfo* out);
const GgmlTypeInfo& ggml_type_info(GgmlType type);  // throws for an unknown enum value
const char* ggml_type_name(GgmlType type);
// Parses "q4_K"/"q4_k"/"Q4_K"/"f32"/... ; false for anything else.
bool ggml_type_from_name(const std::string& s, GgmlType* out);
// Bytes of n values (n must be a multiple of the block size; throws otherwise).
size_t ggml_row_bytes(GgmlType type, int64_t n);

// The engine's block DTypes (core/dtype.h) are these ggml types.
GgmlType dtype_ggml_type(DType t);              // throws for a DType that is not a block type
bool dtype_from_ggml_type(GgmlType g, DType* out);  // false for ggml types without a DType

// The 16 6-bit scales of a Q3_K block as stored (0..63; the values use sc - 32), from its 12
// bytes: bytes 0-7 hold the low 4 bits of scales 0-7 (low nibbles) and 8-15 (high nibbles);
// byte 8 + s % 4 holds the top 2 bits of scale s at bit 2·(s / 4). (Inline: the CPU kernels
// unpack them once per super-block.)
inline void q3_k_scales(const uint8_t packed[12], int8_t out[16]) {
  for (int s = 0; s < 16; ++s) {
    const int low = s < 8 ? packed[s] & 0xF : packed[s - 8] >> 4;
    const int high = (packed[8 + s % 4] >> (2 * (s / 4))) & 3;
    out[s] = static_cast<int8_t>(low | (high << 4));
  }
}

// Decodes n values (a multiple of the block size) of `type` at src into dst. src needs no
// alignment. Throws moe::Error for a type that cannot be dequantised.
void dequantize_row(GgmlType type, const void* src, float* dst, int64_t n);
// Encodes n values (a multiple of the block size) into `type` at dst (no alignment needed).
// Supported: F32 F16 BF16 Q8_0 Q4_0 Q4_1 Q5_0 Q5_1 Q4_K Q5_K Q6_K. Throws moe::Error otherwise.
void quantize_row(GgmlType type, const float* src, void* dst, int64_t n);

}  // namespace moe
