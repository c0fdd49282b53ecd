// dtype.h — element types and the f32 <-> bf16/f16 conversions every backend agrees on.
//
// Compute is f32 on the CPU; bf16/f16 are storage types converted on load. Rounding is
// round-to-nearest-even, as PyTorch does, so a bf16 copy made here equals torch's .bfloat16().
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace moe {

enum class DType : uint8_t { F32, BF16, F16, I32, I64, U8, F64 };

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

inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);  // NaN stays NaN
  uint32_t rounding = 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>((u + rounding) >> 16);
}

float f16_to_f32(uint16_t h);
uint16_t f32_to_f16(float f);

// Converts n elements of type `from` at src to f32 at dst (any dtype but I32/I64/U8 read as
// numbers too).
void convert_to_f32(float* dst, const void* src, DType from, size_t n);
// Converts n f32 values to `to` (F32, BF16, F16).
void convert_from_f32(void* dst, const float* src, DType to, size_t n);

}  // namespace moe
