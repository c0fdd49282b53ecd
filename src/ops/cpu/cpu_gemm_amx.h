// cpu_gemm_amx.h — bf16 panels (DType::BF16P) against rows of x on the AMX tile unit.
//
// A panel's 16 consecutive lines (pairs (2j, 2j+1) of 16 outputs, core/bf16_panels.h) are, byte
// for byte, the B operand tdpbf16ps reads: 16 rows of 64 bytes, row j the pair j of 16 columns.
// So the panels the inference commands pack for the AVX512-BF16 kernel feed the tile unit as
// they are: no repacking of weights, one C tile of 16 rows x 16 outputs per (row group, panel),
// summed over k in steps of 32. On a Xeon with AMX the AVX512-BF16 panel kernel ran prefill at
// a third of oneDNN's AMX speed and serving's 16-row expert products compute-bound.
//
// Numerics as the AVX512-BF16 panel kernel's contract (cpu_gemm_bf16dot.h): x rounded to bf16,
// products exact, sums in f32 (tdpbf16ps: round to nearest even, denormals flushed). Each
// output's sum runs over the same k steps whatever the rows of x, so at 2 rows and more a row's
// result is the same bits at every batch size. One row takes vdpbf16ps (amx_panels_apply):
// the tile unit sums a step's 32 products in its own order (no sequential order of f32 adds
// reproduces it), so a row alone and the same row in a batch agree to f32 rounding, not bit for
// bit. Why not AMX for one row too: bf16 decode through it measured 12% slower (47.5 against
// 54 tokens/s, medium preset, alternated runs), the weights' stream slower through tile loads.
#pragma once
#include <cstdint>

namespace moe {
namespace cpu {

// True when the CPU has AMX-TILE and AMX-BF16 and the kernel granted this process the tile
// state (arch_prctl; asked once). MOE_AMX=0 in the environment turns it off (A/B runs).
bool amx_bf16_ready();

// Whether gemm_xwt_bf16panels takes the tile unit for n rows of x against a weight of row length
// k: 2 rows and more, k a multiple of 32 (one tile step), amx_bf16_ready().
inline bool amx_panels_apply(int64_t n, int64_t k) { return n >= 2 && k % 32 == 0 && amx_bf16_ready(); }

// Rows of x a call pads to: whole tiles of 16 rows.
constexpr int64_t kAmxTileRows = 16;

// out [n, ldo] (+)= xb [n, k] · panels [p0, p1) of wp, for the calling thread: xb bf16 rows of
// k values, allocated and zeroed up to a multiple of kAmxTileRows rows (the padding rows are
// computed and dropped); k a multiple of 32. Panel p's outputs are columns 16p .. 16p + 15.
void panels_amx(float* out, int64_t ldo, const uint16_t* xb, int64_t n, const uint16_t* wp, int64_t p0, int64_t p1,
                int64_t k, bool accumulate);

}  // namespace cpu
}  // namespace moe
