// cpu_gemm_amx.cpp — the AMX path of the bf16 panel kernel (cpu_gemm_amx.h). Every function
// that touches tiles gets the target amx-tile,amx-bf16 (pragma below); callers check
// amx_bf16_ready() first.
#include "ops/cpu/cpu_gemm_amx.h"

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

namespace moe {
namespace cpu {

namespace {

#if defined(__x86_64__)
// Linux keeps the 8 KiB tile state off until a process asks for it (arch_prctl
// ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA); a tile instruction before that faults.
constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

bool amx_probe() {
  if (const char* e = std::getenv("MOE_AMX"); e && std::strcmp(e, "0") == 0) return false;
  // CPUID leaf 7: EDX bit 22 AMX-BF16, bit 24 AMX-TILE (clang 14 knows no "amx-*" strings for
  // __builtin_cpu_supports).
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(d & (1u << 22)) || !(d & (1u << 24))) return false;
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}
#else
bool amx_probe() { return false; }
#endif

}  // namespace

bool amx_bf16_ready() {
  static const bool ok = amx_probe();
  return ok;
}

#if defined(__x86_64__)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("amx-tile,amx-bf16,avx512f"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("amx-tile,amx-bf16,avx512f")
#endif

namespace {

// Palette 1: tiles 0-3 the C accumulators (16 rows x 16 f32), 4-5 the A tiles (16 rows of x,
// 32 bf16 each), 6-7 the B tiles (16 panel lines).
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Bytes ahead of a panel's line in use that each k step prefetches (one step's 16 lines, 128
// lines on: the distance the AVX512-BF16 panel kernel measured best). On the AMX Xeon VM none,
// 4-32 KB ahead and to L2 instead of L1 all read the weights at 23-29 GB/s (2 threads, 1-16
// rows of x): within its noise; a tile load waits for the product still reading its tile (no
// renaming), which no prefetch hides — nor did alternating two tile sets by k step.
constexpr int64_t kAmxPrefetchBytes = 128 * 64;

// RG row groups (16 rows of x each, at xg and xg + 16 k) against P adjacent panels (at wq,
// wq + 16 k): C tile 2 g + q holds group g against panel q.
template <int RG, int P>
void tiles_block(float* out, int64_t ldo, const uint16_t* xg, const uint16_t* wq, int64_t k, int64_t rows_left,
                 bool add) {
  const int64_t xs = k * 2;  // bytes between rows of x
  _tile_zero(0);
  if constexpr (P == 2) _tile_zero(1);
  if constexpr (RG == 2) _tile_zero(2);
  if constexpr (RG == 2 && P == 2) _tile_zero(3);
  for (int64_t k0 = 0; k0 < k; k0 += 32) {
    const uint16_t* b0 = wq + k0 * 16;  // line k0/2 of panel 0 (32 bf16 a line)
    for (int64_t o = 0; o < 1024; o += 64) {
      _mm_prefetch(reinterpret_cast<const char*>(b0) + kAmxPrefetchBytes + o, _MM_HINT_T0);
      if constexpr (P == 2) _mm_prefetch(reinterpret_cast<const char*>(b0 + 16 * k) + kAmxPrefetchBytes + o, _MM_HINT_T0);
    }
    _tile_loadd(6, b0, 64);
    if constexpr (P == 2) _tile_loadd(7, b0 + 16 * k, 64);
    _tile_loadd(4, xg + k0, xs);
    if constexpr (RG == 2) _tile_loadd(5, xg + 16 * k + k0, xs);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (P == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (RG == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (RG == 2 && P == 2) _tile_dpbf16ps(3, 5, 7);
  }
  alignas(64) float c[4][16 * 16];
  _tile_stored(0, c[0], 64);
  if constexpr (P == 2) _tile_stored(1, c[1], 64);
  if constexpr (RG == 2) _tile_stored(2, c[2], 64);
  if constexpr (RG == 2 && P == 2) _tile_stored(3, c[3], 64);
  for (int g = 0; g < RG; ++g)
    for (int q = 0; q < P; ++q) {
      const float* cg = c[2 * g + q];
      for (int64_t i = 0; i < std::min<int64_t>(16, rows_left - 16 * g); ++i) {
        float* o = out + (16 * g + i) * ldo + 16 * q;
        const __m512 v = _mm512_load_ps(cg + 16 * i);
        _mm512_storeu_ps(o, add ? _mm512_add_ps(_mm512_loadu_ps(o), v) : v);
      }
    }
}

}  // namespace

void panels_amx(float* out, int64_t ldo, const uint16_t* xb, int64_t n, const uint16_t* wp, int64_t p0, int64_t p1,
                int64_t k, bool accumulate) {
  if (p1 <= p0 || n == 0) return;
  const int64_t groups = (n + kAmxTileRows - 1) / kAmxTileRows;
  // One group (decode, batched decode): A and C tiles of just its rows.
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) cfg.colsb[t] = 64, cfg.rows[t] = static_cast<uint8_t>(t < 6 && groups == 1 ? n : 16);
  _tile_loadconfig(&cfg);
  // A pair of panels (64 k bytes, in L2) meets every row group before the next pair is read.
  for (int64_t p = p0; p < p1; p += 2) {
    const bool two = p + 1 < p1;
    const uint16_t* wq = wp + p * 16 * k;
    for (int64_t g = 0; g < groups; g += 2) {
      float* o = out + g * 16 * ldo + p * 16;
      const uint16_t* xg = xb + g * 16 * k;
      const int64_t rows_left = n - g * 16;
      if (g + 1 < groups) {
        if (two) tiles_block<2, 2>(o, ldo, xg, wq, k, rows_left, accumulate);
        else tiles_block<2, 1>(o, ldo, xg, wq, k, rows_left, accumulate);
      } else {
        if (two) tiles_block<1, 2>(o, ldo, xg, wq, k, rows_left, accumulate);
        else tiles_block<1, 1>(o, ldo, xg, wq, k, rows_left, accumulate);
      }
    }
  }
  _tile_release();
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

#else
void panels_amx(float*, int64_t, const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, int64_t, bool) {}
#endif

}  // namespace cpu
}  // namespace moe
