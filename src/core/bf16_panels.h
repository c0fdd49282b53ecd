// bf16_panels.h — bf16 weights in 16-row panels (DType::BF16P), the layout of the AVX512-BF16
// decode kernel (ops/cpu/cpu_gemm_bf16dot.h).
//
// vdpbf16ps multiplies 16 lanes of bf16 pairs. With a weight [M, K] stored row by row, one
// 64-byte load holds 32 values of ONE output, so a product needs a horizontal sum per output
// and weight rows (the dot kernel: a quarter of its instructions at 16 rows of x). Panels put
// the pair (k, k+1) of 16 consecutive outputs in one 64-byte line instead:
//   panel p = rows [16p, 16p + 16), line j = pairs (2j, 2j+1) of those rows, output r's pair at
//   bf16 index 2r, 2r + 1 of the line; the lines of a panel one after another.
// Each line then meets a broadcast pair of every row of x, the 16 sums stay in one register,
// and a panel is one sequential stream. Values and bytes are those of the bf16 weight.
#pragma once
#include <cstdint>

namespace moe {

// Whether a [rows, k] weight can be panel-packed: whole panels and whole pairs.
inline bool bf16_panels_fit(int64_t rows, int64_t k) { return rows > 0 && rows % 16 == 0 && k > 0 && k % 2 == 0; }

// dst (panels) := src [rows, k] bf16 row-major; rows, k as bf16_panels_fit. dst != src.
void pack_bf16_panels(uint16_t* dst, const uint16_t* src, int64_t rows, int64_t k);
// The inverse: dst [rows, k] row-major := src (panels).
void unpack_bf16_panels(uint16_t* dst, const uint16_t* src, int64_t rows, int64_t k);

}  // namespace moe
