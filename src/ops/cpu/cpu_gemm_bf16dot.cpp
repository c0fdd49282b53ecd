// cpu_gemm_bf16dot.cpp — bf16 weights against rows of x with vdpbf16ps (AVX512-BF16): row-order
// weights against a few rows (the dot kernel), panel-packed ones against any number.
// Every kernel function here gets the target avx512f,avx512bw,avx512vl,avx512bf16 (pragma
// below); gemm_xwt calls them only when bf16dot_available() says the CPU has them.
#if !defined(__clang__)
// GCC 12's AVX-512 intrinsics build vectors from deliberately undefined registers, which
// -Wuninitialized reports once inlined (see cpu_quant_vnni.cpp).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include "ops/cpu/cpu_gemm_bf16dot.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "core/bf16_panels.h"
#include "core/cpu_features.h"
#include "core/dtype.h"
#include "core/error.h"
#include "ops/cpu/cpu_gemm_amx.h"
#include "ops/cpu/cpu_parallel.h"
#include "ops/cpu/cpu_scratch.h"

namespace moe {
namespace cpu {

bool bf16dot_available() { return cpu_has_avx512_bf16(); }

const char* bf16panels_kernels() { return amx_bf16_ready() ? "AVX512-BF16 for one row, AMX tiles from 2 rows" : "AVX512-BF16"; }

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#endif

namespace {

// A tile: R weight rows against N rows of x, R·N accumulators. R = 4 rows of w (each step loads
// one 64-byte line of each) and N ≤ 6 rows of x keep 24 accumulators, the 4 weight vectors and
// one x vector in the 32 registers; vdpbf16ps's latency (6 cycles on Zen 4) is hidden by ≥ 8
// independent chains.
constexpr int R = 4;
constexpr int kMaxGroup = 6;

// The horizontal sums of a, b, c, d, in that order.
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  // 128-bit lanes: ab = [a0+a2, a1+a3, b0+b2, b1+b3], cd likewise, then abcd's lane L holds
  // four partial sums of the L-th input; two in-lane swaps finish each lane's sum.
  const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
  __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
  t = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, 0x4E));
  t = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, 0xB1));
  return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), t));
}

inline __m512bh as_bh(__m512i v) { return reinterpret_cast<__m512bh&>(v); }

// res[i * R + j] (+)= Σ_c xb[i][c] · wr[j][c] over c in [c0, c1), c0 a multiple of 32 (xb rows
// padded with zeros to a multiple of 32 at stride ldx; where c1 = k, the weight rows' last
// partial step is a masked load); add: res accumulates.
// With `next` (R row pointers, PF true), each step also prefetches the same line of the next
// tile's weight rows into L1.
template <int N, bool PF>
inline void tile(float* res, const uint16_t* const* wr, const uint16_t* xb, int64_t ldx, int64_t k,
                 const uint16_t* const* next, int64_t c0, int64_t c1, bool add) {
  __m512 acc[R][N];
  for (int j = 0; j < R; ++j)
    for (int i = 0; i < N; ++i) acc[j][i] = _mm512_setzero_ps();
  const int64_t k32 = std::min(c1, k / 32 * 32);
  for (int64_t c = c0; c < k32; c += 32) {
    __m512i wv[R];
    for (int j = 0; j < R; ++j) wv[j] = _mm512_loadu_si512(wr[j] + c);
    if constexpr (PF)
      for (int j = 0; j < R; ++j) _mm_prefetch(reinterpret_cast<const char*>(next[j] + c), _MM_HINT_T0);
    for (int i = 0; i < N; ++i) {
      const __m512bh xv = as_bh(_mm512_loadu_si512(xb + i * ldx + c));
      for (int j = 0; j < R; ++j) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], as_bh(wv[j]), xv);
    }
  }
  if (c1 == k && k32 < k) {
    const __mmask32 mask = (__mmask32(1) << (k - k32)) - 1;
    __m512i wv[R];
    for (int j = 0; j < R; ++j) wv[j] = _mm512_maskz_loadu_epi16(mask, wr[j] + k32);
    for (int i = 0; i < N; ++i) {
      const __m512bh xv = as_bh(_mm512_loadu_si512(xb + i * ldx + k32));
      for (int j = 0; j < R; ++j) acc[j][i] = _mm512_dpbf16_ps(acc[j][i], as_bh(wv[j]), xv);
    }
  }
  for (int i = 0; i < N; ++i) {
    const __m128 h = hsum4(acc[0][i], acc[1][i], acc[2][i], acc[3][i]);
    _mm_storeu_ps(res + i * R, add ? _mm_add_ps(_mm_loadu_ps(res + i * R), h) : h);
  }
}

template <bool PF>
void tile_n(int n, float* res, const uint16_t* const* wr, const uint16_t* xb, int64_t ldx, int64_t k,
            const uint16_t* const* next, int64_t c0, int64_t c1, bool add) {
  switch (n) {
    case 1: tile<1, PF>(res, wr, xb, ldx, k, next, c0, c1, add); break;
    case 2: tile<2, PF>(res, wr, xb, ldx, k, next, c0, c1, add); break;
    case 3: tile<3, PF>(res, wr, xb, ldx, k, next, c0, c1, add); break;
    case 4: tile<4, PF>(res, wr, xb, ldx, k, next, c0, c1, add); break;
    case 5: tile<5, PF>(res, wr, xb, ldx, k, next, c0, c1, add); break;
    default: tile<6, PF>(res, wr, xb, ldx, k, next, c0, c1, add); break;
  }
}

// Rows of x up to which a tile's passes run over blocks of kKBlock of the sum at a time (every
// group of x rows over a block, then the next block), so that the block's x rows and weight
// lines stay in L1 between passes: whole rows of 16 x rows of K 1024 with the tile and the next
// one's prefetched lines filled Zen 5's 48 KiB L1. Measured (Zen 5, 2 threads, 48 experts'
// weights from memory, whole rows and blocks alternated, GFLOP/s at 4 / 8 / 12 / 16 rows of x):
// [3072 x 1024] 177 / 333 / 446 / 490 -> 196 / 374 / 512 / 530, [1024 x 3072] 161 / 285 / 366 /
// 414 -> 173 / 323 / 419 / 414; blocked, 20 rows lost 8% and 32 rows up to 25% (the passes'
// partial sums, reduced once a block, cost more than L1 saves there). Serving's 64 streams
// (experts of ~16 rows) 704-752 -> 767-799 tokens/s in the same minutes.
constexpr int64_t kKBlockMaxRows = 16;
constexpr int64_t kKBlock = 256;

// Weight rows rows[0..rr) (rr ≤ R) against all n rows of x, in passes of at most kMaxGroup x
// rows (sizes balanced: 16 = 6+5+5); every pass after the first finds the weight rows in L1 —
// for up to kKBlockMaxRows rows of x, block by block of the sum (kKBlock).
void tile_rows(float* out, int64_t ldo, const uint16_t* xb, int64_t kp, const uint16_t* w, int64_t k, int64_t n,
               const int64_t* rows, int rr, bool accumulate, const int64_t* next_rows = nullptr) {
  const uint16_t* wr[R];
  for (int j = 0; j < R; ++j) wr[j] = w + rows[std::min(j, rr - 1)] * k;
  const uint16_t* next[R];
  if (next_rows)
    for (int j = 0; j < R; ++j) next[j] = w + next_rows[j] * k;
  constexpr int64_t kMaxGroups = (kKBlockMaxRows + kMaxGroup - 1) / kMaxGroup;
  alignas(64) float res[R * kMaxGroup * kMaxGroups];
  const int64_t n_groups = (n + kMaxGroup - 1) / kMaxGroup;
  const int64_t kb = n <= kKBlockMaxRows ? kKBlock : k;
  auto group_rows = [&](int64_t g) { return static_cast<int>(n / n_groups + (g < n % n_groups ? 1 : 0)); };
  auto store = [&](const float* rg, int64_t x0, int gn) {
    for (int i = 0; i < gn; ++i)
      for (int j = 0; j < rr; ++j) {
        float& o = out[(x0 + i) * ldo + rows[j]];
        o = accumulate ? o + rg[i * R + j] : rg[i * R + j];
      }
  };
  for (int64_t c0 = 0; c0 < k; c0 += kb) {
    const int64_t c1 = std::min(k, c0 + kb);
    for (int64_t g = 0, x0 = 0; g < n_groups; ++g) {
      const int gn = group_rows(g);
      // One block: a single result buffer, each group stored as it finishes. Blocks: a buffer
      // per group (at most kMaxGroups of them), stored after the last block.
      float* rg = kb < k ? res + g * R * kMaxGroup : res;
      // Every pass fetches the next tile's weights into L1 as it goes, so that the next tile's
      // first pass does not wait on memory. Measured on Zen 5 (2 threads, 48 experts' weights
      // from memory, GFLOP/s at 8 / 16 / 32 / 64 rows of x), against the second pass alone
      // fetching into L2: [3072 x 1024] 270 / 392 / 525 / 556 -> 313 / 490 / 690 / 620;
      // [1024 x 3072] 245 / 366 / 525 / 522 -> 284 / 419 / 545 / 494 (the one shape that lost);
      // prefetching into L2 from every pass, or a third of the lines from each pass, gained less.
      // Serving's 64 streams (experts of ~16 rows) 653-698 -> 720-771 tokens/s.
      if (next_rows)
        tile_n<true>(gn, rg, wr, xb + x0 * kp, kp, k, next, c0, c1, c0 > 0);
      else
        tile_n<false>(gn, rg, wr, xb + x0 * kp, kp, k, nullptr, c0, c1, c0 > 0);
      if (kb >= k) store(rg, x0, gn);
      x0 += gn;
    }
  }
  if (kb < k)
    for (int64_t g = 0, x0 = 0; g < n_groups; x0 += group_rows(g), ++g) store(res + g * R * kMaxGroup, x0, group_rows(g));
}

}  // namespace

void gemm_xwt_bf16dot(float* out, int64_t ldo, const float* x, const uint16_t* w, int64_t n, int64_t m, int64_t k,
                      bool accumulate) {
  if (n == 0 || m == 0) return;
  const int64_t kp = (k + 31) / 32 * 32;
  // x rounded to bf16 (to nearest even), each row padded with zeros to a whole 32-value step.
  uint16_t* xb = scratch<uint16_t>(Scratch::GemvX, static_cast<size_t>(n * kp));
  for (int64_t i = 0; i < n; ++i) {
    convert_from_f32(xb + i * kp, x + i * k, DType::BF16, static_cast<size_t>(k));
    std::fill(xb + i * kp + k, xb + (i + 1) * kp, uint16_t(0));
  }
  // Each thread's rows [lo, hi) cut into R equal parts, a tile taking row i of every part: R
  // sequential streams far apart, which the hardware prefetchers follow (R adjacent rows read in
  // 64-byte steps at a row stride are not), as the one-row kernel in cpu_gemm.cpp reads.
  parallel_threads(m * k > 32768, [&](int64_t nt, int64_t id) {
    const int64_t lo = m * id / nt, hi = m * (id + 1) / nt, part = (hi - lo) / R;
    int64_t rows[R];
    int64_t next_rows[R];
    for (int64_t i = 0; i < part; ++i) {
      for (int j = 0; j < R; ++j) rows[j] = lo + j * part + i;
      for (int j = 0; j < R; ++j) next_rows[j] = i + 1 < part ? rows[j] + 1 : rows[j];
      tile_rows(out, ldo, xb, kp, w, k, n, rows, R, accumulate, next_rows);
    }
    for (int64_t r0 = lo + part * R; r0 < hi; r0 += R) {  // the last (hi - lo) % R rows
      const int rr = static_cast<int>(std::min<int64_t>(R, hi - r0));
      for (int j = 0; j < rr; ++j) rows[j] = r0 + j;
      tile_rows(out, ldo, xb, kp, w, k, n, rows, rr, accumulate);
    }
  });
}

// ---- panel-packed weights (DType::BF16P, core/bf16_panels.h) ----

namespace {

// Lines (64 bytes each) ahead of the one in use that every step prefetches into L1: a panel is
// one sequential stream, which the hardware prefetchers alone left at 23-28 GB/s for two
// threads. Measured (Zen 5, 2 threads, 48 experts' weights from memory, GFLOP/s at 16 / 64
// rows of x, [3072 x 1024] and [1024 x 3072]): none 368 / 590, 443 / 607; 16 lines 419 / 628,
// 431 / 595; 64 lines 645 / 786, 617 / 735; 128 lines 695 / 835, 682 / 755; 256 lines 635 /
// 797, 657 / 733.
constexpr int64_t kPanelPrefetchLines = 128;

// Pair idx (values 2 idx, 2 idx + 1) of bf16 values as one 32-bit lane, for a broadcast.
inline __m512bh pair_at(const uint16_t* x, int64_t idx) {
  int32_t v;
  std::memcpy(&v, x + 2 * idx, 4);
  return as_bh(_mm512_set1_epi32(v));
}

// MR rows of x against P adjacent panels (wp + q 16 k, q < P): out[i * ldo + 16 q + c] (+)=
// Σ_j line j's pair of output c of panel q · pair j of row i, over the kh = k/2 lines; x's pairs
// at pair_at(xp, i * kh + j) (its rows as they are: each broadcast reads its own row, and a
// row's 64-byte line serves 16 lines of a panel). Each broadcast feeds P products. One
// accumulator per row and panel, each summing the lines in order: the order of every output's
// sum is the same at every MR and P, so a row's result does not depend on the other rows of the
// batch.
template <int MR, int P>
inline void panel_rows(float* out, int64_t ldo, const uint16_t* xp, const uint16_t* wp, int64_t k, bool add) {
  const int64_t kh = k / 2;
  __m512 acc[P][MR];
  for (int q = 0; q < P; ++q)
    for (int i = 0; i < MR; ++i) acc[q][i] = _mm512_setzero_ps();
  for (int64_t j = 0; j < kh; ++j) {
    __m512bh w[P];
    for (int q = 0; q < P; ++q) {
      const uint16_t* wq = wp + q * 16 * k;
      w[q] = as_bh(_mm512_loadu_si512(wq + j * 32));
      // (past the weight's end on the last lines: a prefetch never faults)
      _mm_prefetch(reinterpret_cast<const char*>(wq + (j + kPanelPrefetchLines) * 32), _MM_HINT_T0);
    }
    for (int i = 0; i < MR; ++i) {
      const __m512bh b = pair_at(xp, i * kh + j);
      for (int q = 0; q < P; ++q) acc[q][i] = _mm512_dpbf16_ps(acc[q][i], w[q], b);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int q = 0; q < P; ++q) {
      float* o = out + i * ldo + q * 16;
      _mm512_storeu_ps(o, add ? _mm512_add_ps(_mm512_loadu_ps(o), acc[q][i]) : acc[q][i]);
    }
}

// panel_rows<mr, P> for a run-time mr in [1, sizeof...(MR)].
template <int P, int... MR>
void panel_rows_n(int mr, float* out, int64_t ldo, const uint16_t* xp, const uint16_t* wp, int64_t k, bool add,
                  std::integer_sequence<int, MR...>) {
  ((mr == MR + 1 ? panel_rows<MR + 1, P>(out, ldo, xp, wp, k, add) : void()), ...);
}

// Rows of x in a group: up to 16 (decode: one accumulator a row and panel, a panel at a time);
// above 16 rows, groups of up to 12 against pairs of panels (24 accumulators), a broadcast of x
// feeding both. Measured (Zen 5, 2 threads, [3072 x 1024] and [1024 x 3072], GFLOP/s at 256 /
// 512 rows of x, x's pairs interleaved by group then): a panel at a time in groups of 16
// 818 / 800, 760 / 736; pairs 871 / 883, 788 / 778 (oneDNN's matmul on row-order weights,
// same minutes: 790 / 796, 796 / 831). Broadcasting from x's rows as they are, not
// interleaved first: 931 / 943, 934 / 873 (oneDNN 905 / 918, 914 / 827).
constexpr int64_t kPanelGroupRows = 16;
constexpr int64_t kPanelPairGroupRows = 12;
// Groups per pass over the weight: a panel (pair) meets them while it is in L1/L2, and the
// weight is read from memory once per pass (8 groups a pass, interleaved x: 879 / 898, 784 / 752).
constexpr int64_t kPanelGroupsPerPass = 4;

}  // namespace

void gemm_xwt_bf16panels(float* out, int64_t ldo, const float* x, const uint16_t* wp, int64_t n, int64_t m, int64_t k,
                         bool accumulate) {
  if (n == 0 || m == 0) return;
  MOE_CHECK(bf16_panels_fit(m, k), "gemm (bf16 panels): a [%lld, %lld] weight is not whole panels", (long long)m,
            (long long)k);
  // Two rows of x and more: the AMX tile unit where the CPU has one (cpu_gemm_amx.h). One row
  // (single-stream decode) stays on vdpbf16ps, whose bf16 decode measured 12% faster on the
  // AMX Xeon VM. x is rounded into whole tiles of 16 rows, the padding rows zero.
  if (amx_panels_apply(n, k)) {
    const int64_t n_pad = (n + kAmxTileRows - 1) / kAmxTileRows * kAmxTileRows;
    uint16_t* xb = scratch<uint16_t>(Scratch::PanelX, static_cast<size_t>(n_pad * k));
    convert_from_f32(xb, x, DType::BF16, static_cast<size_t>(n * k));
    std::memset(xb + n * k, 0, static_cast<size_t>((n_pad - n) * k) * 2);
    parallel_threads(m * k > 32768, [&](int64_t nt, int64_t id) {
      const int64_t pairs = (m / 16 + 1) / 2;  // panels split between threads in pairs
      const int64_t p0 = std::min(m / 16, 2 * (pairs * id / nt)), p1 = std::min(m / 16, 2 * (pairs * (id + 1) / nt));
      panels_amx(out, ldo, xb, n, wp, p0, p1, k, accumulate);
    });
    return;
  }
  const bool pairs = n > kPanelGroupRows;
  const int64_t max_rows = pairs ? kPanelPairGroupRows : kPanelGroupRows;
  const int64_t n_groups = (n + max_rows - 1) / max_rows;
  auto group_rows = [&](int64_t g) { return n / n_groups + (g < n % n_groups ? 1 : 0); };
  // x rounded to bf16 (to nearest even), rows as they are: row i's pair j is pair i k/2 + j.
  uint16_t* xp = scratch<uint16_t>(Scratch::PanelX, static_cast<size_t>(n * k));
  convert_from_f32(xp, x, DType::BF16, static_cast<size_t>(n * k));
  parallel_threads(m * k > 32768, [&](int64_t nt, int64_t id) {
    // Pairs of panels split between threads (an odd count: the last thread's last panel alone).
    const int64_t panels = m / 16, units = pairs ? (panels + 1) / 2 : panels;
    const int64_t u0 = units * id / nt, u1 = units * (id + 1) / nt;
    for (int64_t g0 = 0, r00 = 0; g0 < n_groups; g0 += kPanelGroupsPerPass) {
      const int64_t g1 = std::min(n_groups, g0 + kPanelGroupsPerPass);
      for (int64_t u = u0; u < u1; ++u)
        for (int64_t g = g0, r0 = r00; g < g1; r0 += group_rows(g), ++g) {
          const int mr = static_cast<int>(group_rows(g));
          const int64_t p = pairs ? 2 * u : u;
          float* o = out + r0 * ldo + p * 16;
          const uint16_t* xg = xp + r0 * k;
          if (pairs && p + 1 < panels)
            panel_rows_n<2>(mr, o, ldo, xg, wp + p * 16 * k, k, accumulate,
                            std::make_integer_sequence<int, kPanelPairGroupRows>());
          else
            panel_rows_n<1>(mr, o, ldo, xg, wp + p * 16 * k, k, accumulate,
                            std::make_integer_sequence<int, kPanelGroupRows>());
        }
      for (int64_t g = g0; g < g1; ++g) r00 += group_rows(g);
    }
  });
}

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

}  // namespace cpu
}  // namespace moe
