// cpu_quant_impl.h — internal to the quantized CPU kernels (cpu_quant_*.cpp): the quantized
// activation rows and the job handed to each instruction-set variant.
#pragma once
#include <cstddef>
#include <cstdint>

#include "core/dtype.h"
#include "core/quant.h"
#include "ops/cpu/cpu_parallel.h"

namespace moe {
namespace cpu {

// n activation rows of k values rounded to int8 (cpu_quant_gemm.h): blocks of `blk` values
// (32 or 256) with one f32 scale each.
struct QActs {
  int64_t n = 0, k = 0, blk = 32;
  const int8_t* qs = nullptr;     // [n, k]
  const float* d = nullptr;       // [n, k/blk] scales
  const int16_t* bsum = nullptr;  // blk 256: [n, k/16] sum of each 16 q
  const int16_t* bsum32 = nullptr;  // blk 256: [n, k/32] sum of each 32 q
  // q4_0 weights, and q4_1/q5_0/q5_1 in decode: the kernels take two blocks per 256-bit
  // vector, so qs is regrouped per pair of blocks (b, b+1) as [b 0-15 | b+1 0-15 | b 16-31 |
  // b+1 16-31], matching the nibble order of two joined q4_0 blocks (an odd last block stays as
  // it is); and per block, 4 times each (one 128-bit lane per block of a pair):
  const float* d4 = nullptr;    // [n, k/32, 4] d
  const int32_t* s4 = nullptr;  // [n, k/32, 4] 2·Σq (four lanes add up to the 8·Σq of the -8 offset)
  // q4_0 weights on the packed path (cpu_quant_packed.h), whose qs stay in order, and the
  // q4_1 / q5_0 / q5_1 weights (quant_is_legacy):
  const int32_t* sum32 = nullptr;  // [n, k/32] Σq of each block (also q8_0 decode: tile_q8_0_rows512)
};

// q4_1 / q5_0 / q5_1: 32-value blocks with a minimum or a fixed offset, whose kernels need Σq of
// each activation block (QActs::sum32); no decode kernel of their own layout.
constexpr bool quant_is_legacy(DType t) { return t == DType::Q4_1 || t == DType::Q5_0 || t == DType::Q5_1; }

// The formats with a packed prefill layout (cpu_quant_packed.h): all of them.
constexpr bool quant_has_packed(DType t) {
  return t == DType::Q8_0 || t == DType::Q4_0 || t == DType::Q4_1 || t == DType::Q5_0 || t == DType::Q5_1 ||
         t == DType::Q2_K || t == DType::Q3_K || t == DType::Q4_K || t == DType::Q5_K || t == DType::Q6_K ||
         t == DType::IQ4_NL || t == DType::IQ4_XS;
}

// The packed prefill path (cpu_quant_packed.h) is taken from this many activation rows on:
// below it the repack would cost more than it saves.
constexpr int64_t kPackedMinRows = 8;

// One super-block of an 8-row packed tile: sb_values values per row, sb_bytes bytes, the f32
// scales at d_off (layout: cpu_quant_packed.h).
struct QuantPackedLayout {
  int64_t sb_values, sb_bytes, d_off;
};
constexpr QuantPackedLayout quant_packed_layout(DType wdt) {
  switch (wdt) {
    case DType::Q8_0:
    case DType::IQ4_NL: return {32, 512 + 32, 512};
    case DType::Q4_0:
    case DType::Q5_0: return {32, 256 + 32, 256};
    case DType::Q4_1:
    case DType::Q5_1: return {32, 256 + 64, 256};
    case DType::Q4_K:
    case DType::Q5_K: return {256, 2048 + 256 + 128 + 64, 2048 + 256 + 128};
    case DType::IQ4_XS: return {256, 4096 + 256 + 32, 4096 + 256};
    case DType::Q2_K: return {256, 2048 + 512 + 256 + 64, 2048 + 512 + 256};
    default: return {256, 2048 + 512 + 256 + 32, 2048 + 512 + 256};  // Q6_K, Q3_K
  }
}

// Rows of one matrix a decode job reads after the job's own (QuantJob::more).
struct QuantSeg {
  const uint8_t* w = nullptr;  // [m] rows of the job's row_bytes
  float* out = nullptr;        // [m]
  int64_t m = 0;
};
constexpr int kQuantMaxSegs = 7;

struct QuantJob {
  DType wdt = DType::Q8_0;
  const uint8_t* w = nullptr;  // [m] rows of row_bytes
  int64_t m = 0, k = 0;
  size_t row_bytes = 0;
  const QActs* a = nullptr;
  float* out = nullptr;  // [n, ldo]
  int64_t ldo = 0;
  bool accumulate = false;
  // The packed path: per thread (omp_get_thread_num()) pack_stride bytes at pack for one
  // repacked 8-row tile; null: the row kernels.
  uint8_t* pack = nullptr;
  size_t pack_stride = 0;
  // Decode (one activation row) only: the rows of further matrices of the same dtype and k,
  // taken as if they followed w's m rows — one set of streams over all of them (run_decode).
  QuantSeg more[kQuantMaxSegs];
  int n_more = 0;
};

// One entry per variant (cpu_quant_avx2.cpp, cpu_quant_avx512.cpp, cpu_quant_vnni.cpp).
namespace qk_avx2 { void run(const QuantJob& job); }
namespace qk_avx512 { void run(const QuantJob& job); }
namespace qk_vnni { void run(const QuantJob& job); }

}  // namespace cpu
}  // namespace moe
