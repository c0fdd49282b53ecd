// dtype.cpp — dtype names and element conversions.
#include "core/dtype.h"

#include <algorithm>
#include <cctype>
#include <cmath>

#include "core/cpu_features.h"
#include "core/dtype_avx512.h"
#include "core/error.h"
#include "core/nf4.h"
#include "core/quant.h"

namespace moe {

bool dtype_is_quant(DType t) {
  return t == DType::Q8_0 || t == DType::Q4_0 || t == DType::Q4_1 || t == DType::Q5_0 || t == DType::Q5_1 ||
         t == DType::Q2_K || t == DType::Q3_K || t == DType::Q4_K || t == DType::Q5_K || t == DType::Q6_K ||
         t == DType::IQ4_NL || t == DType::IQ4_XS;
}

bool dtype_is_block(DType t) { return dtype_is_quant(t) || t == DType::NF4 || t == DType::NF4DQ; }

int64_t dtype_block_elems(DType t) {
  if (t == DType::NF4) return kNf4Block;
  if (t == DType::NF4DQ) return kNf4DqBlock;
  return dtype_is_quant(t) ? ggml_type_info(dtype_ggml_type(t)).block_elems : 1;
}

size_t dtype_nbytes(DType t, int64_t n) {
  if (t == DType::NF4) {
    MOE_CHECK(n % kNf4Block == 0, "nf4: %lld values are not whole blocks of %lld", (long long)n, (long long)kNf4Block);
    return static_cast<size_t>(n / kNf4Block) * kNf4BlockBytes;
  }
  if (t == DType::NF4DQ) {
    MOE_CHECK(n % kNf4DqBlock == 0, "nf4dq: %lld values are not whole super-blocks of %lld", (long long)n,
              (long long)kNf4DqBlock);
    return static_cast<size_t>(n / kNf4DqBlock) * kNf4DqBlockBytes;
  }
  if (!dtype_is_quant(t)) return static_cast<size_t>(n) * dtype_size(t);
  return ggml_row_bytes(dtype_ggml_type(t), n);
}

bool dtype_from_quant_name(const std::string& s, DType* out) {
  std::string l = s;
  for (char& c : l) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
  static const struct { const char* n; DType t; } k[] = {
      {"q8_0", DType::Q8_0}, {"q4_0", DType::Q4_0}, {"q4_1", DType::Q4_1}, {"q5_0", DType::Q5_0},
      {"q5_1", DType::Q5_1}, {"q4_k", DType::Q4_K}, {"q5_k", DType::Q5_K}, {"q6_k", DType::Q6_K},
      {"nf4", DType::NF4}, {"nf4dq", DType::NF4DQ}};
  for (auto& e : k)
    if (l == e.n) { *out = e.t; return true; }
  return false;
}

size_t dtype_size(DType t) {
  switch (t) {
    case DType::F32: return 4;
    case DType::BF16: return 2;
    case DType::BF16P: return 2;
    case DType::F16: return 2;
    case DType::I32: return 4;
    case DType::I64: return 8;
    case DType::U8: return 1;
    case DType::F64: return 8;
    case DType::Q8_0:
    case DType::Q4_0:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
    case DType::Q4_1:
    case DType::Q5_0:
    case DType::Q5_1:
    case DType::Q2_K:
    case DType::Q3_K:
    case DType::IQ4_NL:
    case DType::IQ4_XS:
    case DType::NF4:
    case DType::NF4DQ: break;
  }
  MOE_FAIL("dtype_size: %s is a block type without a per-element size (this is a bug: use dtype_nbytes)",
           dtype_name(t));
}

const char* dtype_name(DType t) {
  switch (t) {
    case DType::F32: return "f32";
    case DType::BF16: return "bf16";
    case DType::BF16P: return "bf16p";
    case DType::F16: return "f16";
    case DType::I32: return "i32";
    case DType::I64: return "i64";
    case DType::U8: return "u8";
    case DType::F64: return "f64";
    case DType::Q8_0: return "q8_0";
    case DType::Q4_0: return "q4_0";
    case DType::Q4_K: return "q4_k";
    case DType::Q5_K: return "q5_k";
    case DType::Q6_K: return "q6_k";
    case DType::Q4_1: return "q4_1";
    case DType::Q5_0: return "q5_0";
    case DType::Q5_1: return "q5_1";
    case DType::Q2_K: return "q2_k";
    case DType::Q3_K: return "q3_k";
    case DType::IQ4_NL: return "iq4_nl";
    case DType::IQ4_XS: return "iq4_xs";
    case DType::NF4: return "nf4";
    case DType::NF4DQ: return "nf4dq";
  }
  return "?";
}

const char* dtype_safetensors_name(DType t) {
  switch (t) {
    case DType::F32: return "F32";
    case DType::BF16: return "BF16";
    case DType::F16: return "F16";
    case DType::I32: return "I32";
    case DType::I64: return "I64";
    case DType::U8: return "U8";
    case DType::F64: return "F64";
    default: break;  // block types have no safetensors spelling
  }
  return "?";
}

bool dtype_from_safetensors(const std::string& s, DType* out) {
  static const struct { const char* n; DType t; } k[] = {
      {"F32", DType::F32}, {"BF16", DType::BF16}, {"F16", DType::F16}, {"I32", DType::I32},
      {"I64", DType::I64}, {"U8", DType::U8},     {"F64", DType::F64}};
  for (auto& e : k)
    if (s == e.n) { *out = e.t; return true; }
  return false;
}

bool dtype_from_name(const std::string& s, DType* out) {
  if (s == "f32" || s == "float32") { *out = DType::F32; return true; }
  if (s == "bf16" || s == "bfloat16") { *out = DType::BF16; return true; }
  if (s == "f16" || s == "float16") { *out = DType::F16; return true; }
  return false;
}

namespace {
// Block-type conversions of n values (whole blocks), in parallel chunks of 64 blocks (the
// K-quant quantizers search their scales: loading a large model is otherwise slow).
constexpr int64_t kBlockChunk = 64;

int64_t whole_blocks(DType t, size_t n) {
  const int64_t be = dtype_block_elems(t);
  MOE_CHECK(static_cast<int64_t>(n) % be == 0, "%s: %zu values are not a whole number of %lld-value blocks",
            dtype_name(t), n, static_cast<long long>(be));
  return static_cast<int64_t>(n) / be;
}

void dequant_blocks(float* dst, const void* src, DType t, size_t n) {
  const int64_t nb = whole_blocks(t, n), be = dtype_block_elems(t);
  const size_t bb = dtype_nbytes(t, be);
  const auto* s = static_cast<const uint8_t*>(src);
#pragma omp parallel for schedule(static) if(nb > kBlockChunk)
  for (int64_t c = 0; c < nb; c += kBlockChunk)
    dequantize_row(dtype_ggml_type(t), s + static_cast<size_t>(c) * bb, dst + c * be, std::min(kBlockChunk, nb - c) * be);
}

void quant_blocks(void* dst, const float* src, DType t, size_t n) {
  const int64_t nb = whole_blocks(t, n), be = dtype_block_elems(t);
  const size_t bb = dtype_nbytes(t, be);
  // NaN/inf are refused here, outside the parallel loop (quantize_row would throw inside it).
  for (size_t i = 0; i < n; ++i)
    MOE_CHECK(std::isfinite(src[i]), "cannot quantize to %s: value %zu is %g", dtype_name(t), i,
              static_cast<double>(src[i]));
  auto* d = static_cast<uint8_t*>(dst);
#pragma omp parallel for schedule(dynamic, 1) if(nb > kBlockChunk)
  for (int64_t c = 0; c < nb; c += kBlockChunk)
    quantize_row(dtype_ggml_type(t), src + c * be, d + static_cast<size_t>(c) * bb, std::min(kBlockChunk, nb - c) * be);
}
}  // namespace

float f16_to_f32(uint16_t h) {
  uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f;
  uint32_t mant = h & 0x3ff;
  uint32_t u;
  if (exp == 0) {
    if (mant == 0) {
      u = sign;
    } else {  // subnormal: renormalise
      float f = std::ldexp(static_cast<float>(mant), -24);
      std::memcpy(&u, &f, 4);
      u |= sign;
    }
  } else if (exp == 31) {
    u = sign | 0x7f800000u | (mant << 13);
  } else {
    u = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t absu = u & 0x7fffffffu;
  if (absu > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u);
  if (absu >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (absu < 0x38800000u) {  // subnormal or zero in f16: round via float arithmetic
    float a;
    std::memcpy(&a, &absu, 4);
    float scaled = a * 16777216.0f;  // 2^24
    uint32_t m = static_cast<uint32_t>(std::nearbyint(scaled));
    return static_cast<uint16_t>(sign | m);
  }
  uint32_t mant_round = absu + 0xfffu + ((absu >> 13) & 1u);
  return static_cast<uint16_t>(sign | ((mant_round - 0x38000000u) >> 13));
}

// NF4 / NF4DQ blocks to f32 in parallel chunks of kBlockChunk blocks (bytes: one block's).
static void nf4_blocks_to_f32(float* dst, const void* src, DType t, size_t n, size_t bytes,
                              void (*dequant)(const uint8_t*, float*, int64_t)) {
  const int64_t nb = whole_blocks(t, n), be = dtype_block_elems(t);
  const auto* s = static_cast<const uint8_t*>(src);
#pragma omp parallel for schedule(static) if(nb > kBlockChunk)
  for (int64_t c = 0; c < nb; c += kBlockChunk)
    dequant(s + static_cast<size_t>(c) * bytes, dst + c * be, std::min(kBlockChunk, nb - c) * be);
}

void convert_to_f32(float* dst, const void* src, DType from, size_t n) {
  switch (from) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::BF16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = bf16_to_f32(s[i]);
      return;
    }
    case DType::F16: {
      auto* s = static_cast<const uint16_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = f16_to_f32(s[i]);
      return;
    }
    case DType::F64: {
      auto* s = static_cast<const double*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    case DType::I32: {
      auto* s = static_cast<const int32_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    case DType::I64: {
      auto* s = static_cast<const int64_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    case DType::U8: {
      auto* s = static_cast<const uint8_t*>(src);
      for (size_t i = 0; i < n; ++i) dst[i] = static_cast<float>(s[i]);
      return;
    }
    case DType::Q8_0:
    case DType::Q4_0:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
    case DType::Q4_1:
    case DType::Q5_0:
    case DType::Q5_1:
    case DType::Q2_K:
    case DType::Q3_K:
    case DType::IQ4_NL:
    case DType::IQ4_XS: dequant_blocks(dst, src, from, n); return;
    case DType::NF4: nf4_blocks_to_f32(dst, src, from, n, kNf4BlockBytes, nf4_dequantize); return;
    case DType::NF4DQ: nf4_blocks_to_f32(dst, src, from, n, kNf4DqBlockBytes, nf4dq_dequantize); return;
    case DType::BF16P: break;
  }
  MOE_FAIL("convert_to_f32: %s values are not in row order; Tensor::to_dtype unpacks them with their shape",
           dtype_name(from));
}

void convert_from_f32(void* dst, const float* src, DType to, size_t n) {
  switch (to) {
    case DType::F32: std::memcpy(dst, src, n * 4); return;
    case DType::BF16: {
      auto* d = static_cast<uint16_t*>(dst);
      if (n >= 64 && cpu_has_avx512()) {
        bf16_from_f32_avx512(d, src, n);
        return;
      }
      // (simd: GCC's -O2 cost model leaves it scalar; the bf16 kernels round x with it per call.)
#pragma omp simd
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_bf16(src[i]);
      return;
    }
    case DType::F16: {
      auto* d = static_cast<uint16_t*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = f32_to_f16(src[i]);
      return;
    }
    case DType::F64: {
      auto* d = static_cast<double*>(dst);
      for (size_t i = 0; i < n; ++i) d[i] = src[i];
      return;
    }
    case DType::Q8_0:
    case DType::Q4_0:
    case DType::Q4_K:
    case DType::Q5_K:
    case DType::Q6_K:
    case DType::Q4_1:
    case DType::Q5_0:
    case DType::Q5_1:
    case DType::Q2_K:
    case DType::Q3_K:
    case DType::IQ4_NL:
    case DType::IQ4_XS: quant_blocks(dst, src, to, n); return;
    case DType::NF4: nf4_quantize(src, static_cast<uint8_t*>(dst), static_cast<int64_t>(n)); return;
    case DType::NF4DQ: nf4dq_quantize(src, static_cast<uint8_t*>(dst), static_cast<int64_t>(n)); return;
    default: MOE_FAIL("convert_from_f32: cannot convert to %s", dtype_name(to));
  }
}

}  // namespace moe
