// bnb4.h — bitsandbytes' 4-bit serialization (what transformers writes for load_in_4bit models,
// the "*-bnb-4bit" checkpoints people share): a weight W [out, in] becomes
//   NAME                                            u8 [numel/2, 1]: two 4-bit code indices per
//                                                   byte, the first value in the high nibble
//   NAME.absmax                                     f32 [blocks] (or u8 codes with double quant)
//   NAME.quant_map                                  f32 [16]: the code values (NF4: kNf4Codes)
//   NAME.nested_absmax, NAME.nested_quant_map       double quant only: f32 [ceil(blocks/256)],
//                                                   f32 [256]
//   NAME.quant_state.bitsandbytes__nf4              u8: JSON {quant_type, blocksize, dtype,
//                                                   shape, [nested_blocksize, nested_dtype,
//                                                   nested_offset]}
// Blocks run over the flattened tensor (blocksize values each, usually 64). Value i is
// quant_map[nibble_i] · absmax[i / blocksize]. With double quantisation ("compress_statistics")
// the absmax values are stored as absmax[b] = nested_quant_map[code_b] · nested_absmax[b / 256]
// + nested_offset: bitsandbytes subtracts their mean (the offset), then quantizes them blockwise
// (256 per block) to 8-bit codes of its signed dynamic map — 8.13 bits of statistics per 64
// weights, 0.127 bits per weight, instead of 32 bits per 64 (0.5 bits per weight).
//
// The engine's NF4 tensors (nf4.h: f32 absmax + 32 bytes per block of 64 along each row) hold the
// same codes and nibble order, so a blocksize-64 NF4 weight whose rows are whole blocks converts
// without touching a value; absmax values under double quantisation are decoded once at load.
#pragma once
#include <array>
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

constexpr int64_t kBnbNestedBlock = 256;

// The non-tensor part of a quant state (the JSON in NAME.quant_state.bitsandbytes__<type>).
struct Bnb4State {
  std::string quant_type = "nf4";   // "nf4" | "fp4"
  int64_t blocksize = 64;
  std::string dtype = "bfloat16";   // the original weight dtype (torch name without "torch.")
  std::vector<int64_t> shape;       // the original weight shape
  bool nested = false;
  int64_t nested_blocksize = kBnbNestedBlock;
  std::string nested_dtype = "float32";
  double nested_offset = 0;
};

// Throws moe::Error naming `what` for malformed JSON or fields of the wrong type.
Bnb4State parse_bnb4_state(std::string_view json_text, const std::string& what);
std::string bnb4_state_json(const Bnb4State& s);

// bitsandbytes' signed dynamic 8-bit map (create_dynamic_map(signed=True)): 0, ±1 and seven
// decades of fractions, ascending; the codes of the double-quantised absmax values.
const std::array<float, 256>& bnb_dynamic_map();

// Decodes double-quantised absmax values: out[b] = map[codes[b]] · nested_absmax[b / nested_block]
// + offset, in f32 as bitsandbytes computes them.
void bnb4_decode_absmax(float* out, const uint8_t* codes, int64_t blocks, const float* nested_absmax,
                        const float* map, int64_t nested_block, float offset);

// The stored tensors of one weight.
struct Bnb4Tensors {
  std::vector<uint8_t> packed;         // [numel/2]
  std::vector<float> absmax;           // [blocks] (plain)
  std::vector<uint8_t> absmax_codes;   // [blocks] (double quant)
  std::vector<float> nested_absmax;    // [ceil(blocks/256)] (double quant)
  float offset = 0;                    // (double quant)
};

// NF4-quantizes n values (a multiple of 64; blocks of 64, nf4.h's rounding), optionally with
// double quantisation of the absmax values.
Bnb4Tensors bnb4_quantize(const float* w, int64_t n, bool double_quant);

// Values i in [0, n): quant_map[nibble_i] · absmax[i / blocksize].
void bnb4_dequantize(float* out, const uint8_t* packed, int64_t n, const float* absmax, const float* quant_map,
                     int64_t blocksize);

// The engine's NF4 blocks (nf4.h) from the packed nibbles and per-block absmax of a blocksize-64
// tensor (n a multiple of 64): the same codes, no value changes.
void bnb4_to_nf4_blocks(uint8_t* dst, const uint8_t* packed, const float* absmax, int64_t n);

}  // namespace moe
