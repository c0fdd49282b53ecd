// cpu_gemm.cpp — x·wᵀ on the CPU: BLAS for many rows, a streaming kernel for few.
#include "ops/cpu/cpu_gemm.h"

#include <cblas.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <vector>

#include "core/error.h"
#include "core/nf4.h"
#include "core/tensor.h"
#include "ops/cpu/cpu_gemm_bf16dot.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "ops/cpu/cpu_parallel.h"
#include "ops/cpu/cpu_quant_gemm.h"
#include "ops/cpu/cpu_scratch.h"

namespace moe {
namespace cpu {
namespace {

// Loads 8 weights starting at w+i as f32.
template <DType WT>
inline __m256 load8(const void* w, int64_t i) {
  if constexpr (WT == DType::F32) {
    return _mm256_loadu_ps(static_cast<const float*>(w) + i);
  } else if constexpr (WT == DType::BF16) {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(w) + i));
    return _mm256_cvtph_ps(h);
  }
}

template <DType WT>
inline float load1(const void* w, int64_t i) {
  if constexpr (WT == DType::F32) return static_cast<const float*>(w)[i];
  else if constexpr (WT == DType::BF16) return bf16_to_f32(static_cast<const uint16_t*>(w)[i]);
  else return f16_to_f32(static_cast<const uint16_t*>(w)[i]);
}

inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_hadd_ps(lo, lo);
  lo = _mm_hadd_ps(lo, lo);
  return _mm_cvtss_f32(lo);
}

// Streaming kernel, one tile: R weight rows (wr, rr of them real: the rest repeat the last)
// dotted with N rows of x over all k, out[i * ldo + j] (+)= Σ x[i]·w[j]. N*R independent FMA
// chains hide the FMA latency (5 cycles on Zen 2 at two FMAs per cycle: ten chains needed; one
// chain alone runs at a quarter of the load bandwidth); tile_rows sets R for each N.
// Prefetch: one cache line of [*pf, pf_end) per step of 8 (the next block's weights, pulled
// into L2 while this block computes; null: none).
template <DType WT, int N, int R>
inline void gemv_tile(float* out, int64_t ldo, const float* x, const float* xq, int64_t ldx, const void* const* wr,
                      int rr, int64_t k, bool accumulate, const char** pf, const char* pf_end) {
  const int64_t k8 = k / 8 * 8;
  __m256 acc[R][N];
  for (int j = 0; j < R; ++j)
    for (int i = 0; i < N; ++i) acc[j][i] = _mm256_setzero_ps();
  int64_t c = 0;
  if constexpr (WT == DType::BF16) {
    // 16 weights per load: the even ones (low halves of the dwords) shifted up, the odd ones
    // (high halves) masked, against x de-interleaved the same way (xq: per 16, the 8 even then
    // the 8 odd values). Two ALU ops per 16 weights instead of two widening loads and shifts.
    const int64_t k16 = k / 16 * 16;
    const __m256i hi = _mm256_set1_epi32(static_cast<int>(0xFFFF0000u));
    for (; c < k16; c += 16) {
      if (*pf < pf_end) {
        _mm_prefetch(*pf, _MM_HINT_T1);
        *pf += 64;
      }
      __m256 xe[N], xo[N];
      for (int i = 0; i < N; ++i) {
        xe[i] = _mm256_loadu_ps(xq + i * ldx + c);
        xo[i] = _mm256_loadu_ps(xq + i * ldx + c + 8);
      }
      for (int j = 0; j < R; ++j) {
        const __m256i wd = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(wr[j]) + c));
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(wd, 16));
        const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(wd, hi));
        for (int i = 0; i < N; ++i) acc[j][i] = _mm256_fmadd_ps(wo, xo[i], _mm256_fmadd_ps(we, xe[i], acc[j][i]));
      }
    }
  }
  for (; c < k8; c += 8) {
    if (*pf < pf_end) {
      _mm_prefetch(*pf, _MM_HINT_T1);
      *pf += 64;
    }
    __m256 xv[N];
    for (int i = 0; i < N; ++i) xv[i] = _mm256_loadu_ps(x + i * ldx + c);
    for (int j = 0; j < R; ++j) {
      const __m256 wv = load8<WT>(wr[j], c);
      for (int i = 0; i < N; ++i) acc[j][i] = _mm256_fmadd_ps(wv, xv[i], acc[j][i]);
    }
  }
  for (int j = 0; j < rr; ++j)
    for (int i = 0; i < N; ++i) {
      float s = hsum(acc[j][i]);
      for (int64_t c = k8; c < k; ++c) s += load1<WT>(wr[j], c) * x[i * ldx + c];
      float* o = out + i * ldo + j;
      *o = accumulate ? *o + s : s;
    }
}

// Weight rows per tile for N rows of x, measured (bf16, Zen 2): enough FMA chains without
// spilling the R·N accumulators and 2N de-interleaved x vectors from the 16 AVX2 registers.
template <int N>
constexpr int tile_rows() {
  return N == 1 ? 8 : N == 2 ? 4 : 3;
}

// Rows [r0, r1) of w against x rows [x0, x0 + N): tiles of tile_rows<N>() weight rows.
template <DType WT, int N>
void gemv_group(float* out, int64_t ldo, const float* x, const float* xq, const void* w, size_t row_bytes, int64_t r0,
                int64_t r1, int64_t x0, int64_t k, bool accumulate, const char** pf, const char* pf_end) {
  constexpr int R = tile_rows<N>();
  for (int64_t t = r0; t < r1; t += R) {
    const int rr = static_cast<int>(std::min<int64_t>(R, r1 - t));
    const void* wr[R];
    for (int j = 0; j < R; ++j) wr[j] = static_cast<const char*>(w) + static_cast<size_t>(t + std::min(j, rr - 1)) * row_bytes;
    gemv_tile<WT, N, R>(out + x0 * ldo + t, ldo, x + x0 * k, xq + x0 * k, k, wr, rr, k, accumulate, pf, pf_end);
  }
}

// Streaming GEMM for up to kStreamMaxRows rows of x: each weight row is read from memory once.
// Two or more x rows go in groups of 2-3 (5 = 3+2, 8 = 3+3+2, ...; one row: gemv_one_row), each a pass of
// register tiles over a block of weight rows small enough to stay in L2 between the passes.
// (One tile over all N rows, as before, left 5-8 rows with one weight row per tile: 5-8 FMA
// chains, latency-bound at half the FMA rate, and the bulk of a 16-stream serving step.)
// Rows of x up to which 16-bit weights take the streaming kernel (serving's batched decode):
// with BLAS every small block of widened weight rows re-packed all of x (a third of a
// 16-stream step's dense GEMM time).
constexpr int64_t kStreamMaxRows = 16;

// For bf16 weights: the n rows of x de-interleaved per 16 values as gemv_tile reads them (the 8
// even then the 8 odd), in the thread's scratch; other types: x itself.
template <DType WT>
const float* gemv_x(const float* x, int64_t n, int64_t k) {
  if constexpr (WT != DType::BF16) return x;
  float* xd = scratch<float>(Scratch::GemvX, static_cast<size_t>(n * k));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t c = 0; c + 16 <= k; c += 16)
      for (int64_t j = 0; j < 8; ++j) {
        xd[i * k + c + j] = x[i * k + c + 2 * j];
        xd[i * k + c + 8 + j] = x[i * k + c + 2 * j + 1];
      }
  return xd;
}

// One row of x (single-stream decode): each thread's rows [lo, hi) cut into R = 8 equal parts,
// a tile taking row i of every part — 8 sequential streams far apart, which the hardware
// prefetchers follow, where 8 adjacent rows (the blocked path below) read 32-byte steps of one
// region at a 2-4 KiB stride, which they do not (the quantized decode kernels' layout too,
// cpu_quant_kernels.h). Zen 4 VM (2 cores), medium-preset bf16 decode: 40-44 -> 69-73 tokens/s,
// 23-26 -> 40-42 GB/s.
template <DType WT>
void gemv_one_row(float* out, const float* x, const void* w, int64_t m, int64_t k, bool accumulate) {
  constexpr int R = tile_rows<1>();
  const size_t row_bytes = static_cast<size_t>(k) * dtype_size(WT);
  const char* base = static_cast<const char*>(w);
  const float* xq = gemv_x<WT>(x, 1, k);
  // Inside a parallel region (the experts' slices of rows, cpu_moe.cpp) on the calling thread alone.
  parallel_threads(m * k > 32768, [&](int64_t nt, int64_t id) {
    const int64_t lo = m * id / nt, hi = m * (id + 1) / nt, part = (hi - lo) / R;
    const char* no_pf = nullptr;
    const void* wr[R];
    float res[R];
    for (int64_t i = 0; i < part; ++i) {
      for (int j = 0; j < R; ++j) wr[j] = base + static_cast<size_t>(lo + j * part + i) * row_bytes;
      gemv_tile<WT, 1, R>(res, 0, x, xq, k, wr, R, k, false, &no_pf, nullptr);
      for (int j = 0; j < R; ++j) {
        float& o = out[lo + j * part + i];
        o = accumulate ? o + res[j] : res[j];
      }
    }
    for (int64_t r0 = lo + part * R; r0 < hi; r0 += R) {  // the last (hi - lo) % R rows
      const int rr = static_cast<int>(std::min<int64_t>(R, hi - r0));
      for (int j = 0; j < R; ++j) wr[j] = base + static_cast<size_t>(r0 + std::min(j, rr - 1)) * row_bytes;
      gemv_tile<WT, 1, R>(out + r0, 0, x, xq, k, wr, rr, k, accumulate, &no_pf, nullptr);
    }
  });
}

template <DType WT>
void gemv_rows(float* out, int64_t ldo, const float* x, const void* w, int64_t n, int64_t m, int64_t k,
               bool accumulate) {
  if (n == 1) return gemv_one_row<WT>(out, x, w, m, k, accumulate);
  const size_t row_bytes = static_cast<size_t>(k) * dtype_size(WT);
  // A block: 24 rows (a multiple of every tile's R, 3 and 4).
  const int64_t block = 24;
  const int64_t blocks = (m + block - 1) / block;
  int groups[kStreamMaxRows], n_groups = 0;
  for (int64_t left = n; left > 0;) {
    const int g = left == 4 ? 2 : static_cast<int>(std::min<int64_t>(left, 3));
    groups[n_groups++] = g;
    left -= g;
  }
  const float* xq = gemv_x<WT>(x, n, k);
#pragma omp parallel for schedule(static) if(m * k > 32768)
  for (int64_t bi = 0; bi < blocks; ++bi) {
    const int64_t r0 = bi * block, r1 = std::min(m, r0 + block);
    // The block is computed in passes, and memory would idle during all but the first: the next
    // block's rows (contiguous) are prefetched into L2 meanwhile. (Widening the block once into
    // an f32 copy for all the passes measured 30% slower at 16 streams: twice the bytes from L2.)
    const char* base = static_cast<const char*>(w);
    const char* pf = base + static_cast<size_t>(r1) * row_bytes;
    const char* pf_end = base + static_cast<size_t>(std::min(m, r1 + block)) * row_bytes;
    int64_t x0 = 0;
    for (int g = 0; g < n_groups; ++g) {
      switch (groups[g]) {
        case 2: gemv_group<WT, 2>(out, ldo, x, xq, w, row_bytes, r0, r1, x0, k, accumulate, &pf, pf_end); break;
        default: gemv_group<WT, 3>(out, ldo, x, xq, w, row_bytes, r0, r1, x0, k, accumulate, &pf, pf_end); break;
      }
      x0 += groups[g];
    }
  }
}

// Widens cnt bf16/f16 weights to f32 (the chunked BLAS paths of gemm_xwt and gemm_xw).
void widen_rows(float* dst, const uint16_t* src, DType wdt, int64_t cnt) {
#pragma omp parallel for schedule(static) if(cnt > 32768)
  for (int64_t i = 0; i < cnt; ++i) dst[i] = wdt == DType::BF16 ? bf16_to_f32(src[i]) : f16_to_f32(src[i]);
}

// Rows [r0, r0+rows) of a [m,k] weight in dtype wdt (bf16, f16, NF4(DQ) or ggml blocks) as f32 in
// dst: block types are dequantized here, one chunk of rows at a time — the whole matrix never
// exists in f32 (the frozen QLoRA base's backward, dX = dY·W).
void widen_weight_rows(float* dst, const void* w, DType wdt, int64_t r0, int64_t rows, int64_t k) {
  if (dtype_is_block(wdt)) {
    convert_to_f32(dst, static_cast<const uint8_t*>(w) + dtype_nbytes(wdt, r0 * k), wdt, static_cast<size_t>(rows * k));
    return;
  }
  widen_rows(dst, static_cast<const uint16_t*>(w) + r0 * k, wdt, rows * k);
}

// Block-quantized weights (NF4, NF4DQ, int8: a QLoRA base) whose products run on the matrix units: each
// chunk of rows dequantized and rounded to bf16 (bitsandbytes' bf16 compute dtype), then
// multiplied as bf16 weights are. Not on the exact path, where they stay f32.
bool block_matrix_applies(DType wdt) {
  return dtype_is_block(wdt) && bf16_gemm() == Bf16Gemm::Matrix && !quant_exact();
}

// Rows [r0, r0 + rows) of block-quantized w [.., k] as bf16, in scratch.
const uint16_t* bf16_weight_rows(const void* w, DType wdt, int64_t r0, int64_t rows, int64_t k) {
  uint16_t* wb = scratch<uint16_t>(Scratch::GemmBf16, static_cast<size_t>(rows * k));
  if (wdt == DType::NF4 || wdt == DType::NF4DQ) {  // straight to bf16 (the same values as through f32)
    (wdt == DType::NF4 ? nf4_dequantize_bf16 : nf4dq_dequantize_bf16)(
        static_cast<const uint8_t*>(w) + dtype_nbytes(wdt, r0 * k), wb, rows * k);
    return wb;
  }
  float* wf = scratch<float>(Scratch::GemmWidened, static_cast<size_t>(rows * k));
  widen_weight_rows(wf, w, wdt, r0, rows, k);
  convert_from_f32(wb, wf, DType::BF16, static_cast<size_t>(rows * k));
  return wb;
}

// Rows per chunk when a 16-bit or block weight is converted chunk by chunk: ~4 MiB of f32.
int64_t weight_chunk_rows(int64_t m, int64_t k) {
  return std::min(m, std::max<int64_t>(64, (int64_t(1) << 20) / std::max<int64_t>(k, 1)));
}

}  // namespace

float dot_f32(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = hsum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// bf16 weights whose products round x to bf16 on the matrix units (oneDNN), where the process
// asked for that (Bf16Gemm::Matrix) and not on the exact path.
bool bf16_matrix_applies(DType wdt) {
  return wdt == DType::BF16 && bf16_gemm() == Bf16Gemm::Matrix && !quant_exact();
}

namespace {

// Rows of x up to which the bf16 dot kernel takes bf16 weights: all of them inside a parallel
// region (oneDNN cannot run there), up to kBf16DotBeforeOneDnn outside one. Measured against
// oneDNN (Zen 4, 2 threads, [384, 1024] from memory): ahead up to 32 rows, 10% behind at 48-64.
constexpr int64_t kBf16DotMaxRows = 64;
constexpr int64_t kBf16DotBeforeOneDnn = 32;


bool bf16dot_applies(DType wdt, int64_t n) {
  return wdt == DType::BF16 && n >= 2 && n <= kBf16DotMaxRows && bf16_gemm() == Bf16Gemm::Matrix &&
         !quant_exact() && bf16dot_available();
}

}  // namespace

int64_t gemm_stream_rows(DType wdt) {
  return wdt == DType::BF16P || bf16dot_applies(wdt, kBf16DotMaxRows) ? kBf16DotMaxRows : kStreamMaxRows;
}

// Up to this many rows of x, bf16/f16 weights are widened block by block in cache (above: in
// large chunks, where packing x for every small block would cost more than it saves).
constexpr int64_t kSmallBatchRows = 96;

namespace {

// Weights of fewer rows than a panel (routers [E, D], shared-expert gates [1, D]) under
// Bf16Gemm::Matrix: each row of x alone, exact in f32, against the weight rows (widened once a
// call unless f32) —
// the same bits at every row count, as the panel kernel gives serving's projections and
// experts (where one row took the f32 streaming kernel and more the bf16 dot kernel, a
// request's routing could change with the batch it ran in). A few MACs per token.
constexpr int64_t kRowwiseMaxRows = 15;

void gemm_xwt_rowwise(float* out, int64_t ldo, const float* x, const void* w, DType wdt, int64_t n, int64_t m,
                      int64_t k, bool accumulate) {
  const float* wf = static_cast<const float*>(w);
  if (wdt != DType::F32) {
    float* wide = scratch<float>(Scratch::GemmWidened, static_cast<size_t>(m * k));
    convert_to_f32(wide, w, wdt, static_cast<size_t>(m * k));
    wf = wide;
  }
  parallel_threads(n * m * k > (int64_t(1) << 20), [&](int64_t nt, int64_t id) {
    for (int64_t i = n * id / nt; i < n * (id + 1) / nt; ++i)
      for (int64_t j = 0; j < m; ++j) {
        const float v = dot_f32(x + i * k, wf + j * k, k);
        out[i * ldo + j] = accumulate ? out[i * ldo + j] + v : v;
      }
  });
}

}  // namespace

void gemm_xwt(float* out, int64_t ldo, const float* x, const void* w, DType wdt, int64_t n, int64_t m, int64_t k,
              bool accumulate) {
  if (n == 0 || m == 0) return;
  if (m <= kRowwiseMaxRows && !dtype_is_block(wdt) && bf16_gemm() == Bf16Gemm::Matrix && !quant_exact()) {
    gemm_xwt_rowwise(out, ldo, x, w, wdt, n, m, k, accumulate);
    return;
  }
  // Panel-packed bf16 (core/bf16_panels.h): the inference commands pack their bf16 weights so
  // where the CPU has AVX512-BF16, and this kernel alone reads them, at every row count.
  if (wdt == DType::BF16P) {
    MOE_CHECK(bf16dot_available(), "gemm: bf16p (panel-packed) weights need a CPU with AVX512-BF16");
    gemm_xwt_bf16panels(out, ldo, x, static_cast<const uint16_t*>(w), n, m, k, accumulate);
    return;
  }
  if (dtype_is_quant(wdt) && !quant_exact()) {  // block-quantized weights: integer kernels (cpu_quant_gemm.h)
    quant_gemm_xwt(out, ldo, x, w, wdt, n, m, k, accumulate);
    return;
  }
  // bf16 weights, a batched decode's rows, where the process rounds x to bf16 (below): the
  // CPU's bf16 dot products (cpu_gemm_bf16dot.h), serving's experts inside a parallel region.
  if (bf16dot_applies(wdt, n) && (n <= kBf16DotBeforeOneDnn || omp_in_parallel())) {
    gemm_xwt_bf16dot(out, ldo, x, static_cast<const uint16_t*>(w), n, m, k, accumulate);
    return;
  }
  // From here block types (NF4, NF4DQ; the ggml types on the exact path) are dequantized by row chunks.
  // Few rows, and up to kStreamMaxRows for 16-bit weights (which BLAS would need widened
  // first): the streaming kernel.
  if (!dtype_is_block(wdt) && (n <= kGemvMaxRows || (n <= kStreamMaxRows && wdt != DType::F32))) {
    switch (wdt) {
      case DType::F32: gemv_rows<DType::F32>(out, ldo, x, w, n, m, k, accumulate); return;
      case DType::BF16: gemv_rows<DType::BF16>(out, ldo, x, w, n, m, k, accumulate); return;
      case DType::F16: gemv_rows<DType::F16>(out, ldo, x, w, n, m, k, accumulate); return;
      default: MOE_FAIL("gemm: unsupported weight dtype %s", dtype_name(wdt));
    }
  }
  // bf16 weights on a CPU with matrix units (AMX, AVX512-BF16): x rounded to bf16 and oneDNN's
  // bf16 matmul (cpu_gemm_onednn.h) — not on the exact path. Inside a parallel region (training's
  // expert rows split over threads) it runs on the calling thread.
  if (bf16_matrix_applies(wdt)) {
    onednn_gemm_xwt(out, ldo, x, w, wdt, n, m, k, accumulate);
    return;
  }
  if (block_matrix_applies(wdt)) {
    const int64_t chunk = weight_chunk_rows(m, k);
    for (int64_t r0 = 0; r0 < m; r0 += chunk) {
      const int64_t rows = std::min(chunk, m - r0);
      onednn_gemm_xwt(out + r0, ldo, x, bf16_weight_rows(w, wdt, r0, rows, k), DType::BF16, n, rows, k, accumulate);
    }
    return;
  }
  const float beta = accumulate ? 1.0f : 0.0f;
  if (wdt == DType::F32) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)m, (int)k, 1.0f, x, (int)k,
                static_cast<const float*>(w), (int)k, beta, out, (int)ldo);
    return;
  }
  MOE_CHECK(wdt == DType::BF16 || wdt == DType::F16 || dtype_is_block(wdt), "gemm: unsupported weight dtype %s",
            dtype_name(wdt));
  if (n <= kSmallBatchRows && !dtype_is_block(wdt)) {
    // A few rows (batched decode): each thread widens a block of weight rows small enough to
    // stay in its L2 and multiplies every row of x against it (BLAS runs single-threaded inside
    // the parallel region). The weights are read once, as bf16/f16; their f32 copy never goes
    // out to memory, where converting the whole matrix first would write and re-read it.
    const int64_t block = std::clamp<int64_t>((int64_t(48) << 10) / std::max<int64_t>(k, 1), 8, m);
    const int64_t n_blocks = (m + block - 1) / block;
#pragma omp parallel if(n_blocks > 1)
    {
      float* wf = scratch<float>(Scratch::GemmWidened, static_cast<size_t>(block * k));
#pragma omp for schedule(dynamic, 1)
      for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t r0 = b * block, rows = std::min(block, m - r0);
        const uint16_t* src = static_cast<const uint16_t*>(w) + r0 * k;
        if (wdt == DType::BF16)
          for (int64_t i = 0; i < rows * k; ++i) wf[i] = bf16_to_f32(src[i]);
        else
          for (int64_t i = 0; i < rows * k; ++i) wf[i] = f16_to_f32(src[i]);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)rows, (int)k, 1.0f, x, (int)k, wf, (int)k,
                    beta, out + r0, (int)ldo);
      }
    }
    return;
  }
  // Convert weight rows in chunks of ~4 MiB of f32 so the scratch stays small for big heads.
  const int64_t chunk = weight_chunk_rows(m, k);
  float* wf = scratch<float>(Scratch::GemmWidened, static_cast<size_t>(chunk * k));
  for (int64_t r0 = 0; r0 < m; r0 += chunk) {
    int64_t rows = std::min(chunk, m - r0);
    widen_weight_rows(wf, w, wdt, r0, rows, k);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)rows, (int)k, 1.0f, x, (int)k, wf,
                (int)k, beta, out + r0, (int)ldo);
  }
}

void gemm_xw(float* out, const float* x, const void* w, DType wdt, int64_t n, int64_t m, int64_t k, bool accumulate) {
  if (n == 0 || k == 0) return;
  const float beta = accumulate ? 1.0f : 0.0f;
  if (m == 0) {
    if (!accumulate) std::fill(out, out + n * k, 0.0f);
    return;
  }
  if (bf16_matrix_applies(wdt)) {
    onednn_gemm_xw(out, x, m, w, wdt, n, m, k, accumulate);
    return;
  }
  if (block_matrix_applies(wdt)) {  // the chunks of w's rows are chunks of the sum: later ones accumulate
    const int64_t chunk = weight_chunk_rows(m, k);
    for (int64_t r0 = 0; r0 < m; r0 += chunk) {
      const int64_t rows = std::min(chunk, m - r0);
      onednn_gemm_xw(out, x + r0, m, bf16_weight_rows(w, wdt, r0, rows, k), DType::BF16, n, rows, k,
                     accumulate || r0 > 0);
    }
    return;
  }
  if (wdt == DType::F32) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)k, (int)m, 1.0f, x, (int)m,
                static_cast<const float*>(w), (int)k, beta, out, (int)k);
    return;
  }
  MOE_CHECK(wdt == DType::BF16 || wdt == DType::F16 || dtype_is_block(wdt), "gemm: unsupported weight dtype %s",
            dtype_name(wdt));
  // Rows of w (the inner dimension here) in chunks, converted to f32; later chunks accumulate.
  const int64_t chunk = weight_chunk_rows(m, k);
  float* wf = scratch<float>(Scratch::GemmWidened, static_cast<size_t>(chunk * k));
  for (int64_t r0 = 0; r0 < m; r0 += chunk) {
    int64_t rows = std::min(chunk, m - r0);
    widen_weight_rows(wf, w, wdt, r0, rows, k);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)k, (int)rows, 1.0f, x + r0, (int)m, wf,
                (int)k, r0 == 0 ? beta : 1.0f, out, (int)k);
  }
}

void gemm_atb(float* dw, int64_t ldw, const float* dy, int64_t ldy, const float* x, DType wdt, int64_t n, int64_t m,
              int64_t k, bool accumulate) {
  if (m == 0 || k == 0) return;
  if (n == 0) {
    if (!accumulate)
      for (int64_t r = 0; r < m; ++r) std::fill(dw + r * ldw, dw + r * ldw + k, 0.0f);
    return;
  }
  if (bf16_matrix_applies(wdt)) {
    onednn_gemm_atb(dw, ldw, dy, ldy, x, k, DType::BF16, n, m, k, accumulate);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)m, (int)k, (int)n, 1.0f, dy, (int)ldy, x, (int)k,
              accumulate ? 1.0f : 0.0f, dw, (int)ldw);
}

void gemm_xw_atb(float* dx, float* dw, const float* dy, const float* x, const void* w, DType wdt, int64_t n, int64_t m,
                 int64_t k, bool accumulate, bool assign_dw) {
  if (bf16_matrix_applies(wdt)) {
    onednn_linear_backward_bf16(dx, dw, dy, x, w, n, m, k, accumulate, assign_dw);
    return;
  }
  gemm_xw(dx, dy, w, wdt, n, m, k, accumulate);
  gemm_atb(dw, k, dy, m, x, wdt, n, m, k, !assign_dw);
}

void gemm_xw_atb(float* dx, float* dw, const uint16_t* dy, const float* x, const void* w, DType wdt, int64_t n,
                 int64_t m, int64_t k, bool accumulate, bool assign_dw) {
  if (bf16_matrix_applies(wdt)) {
    onednn_linear_backward_bf16(dx, dw, dy, x, w, n, m, k, accumulate, assign_dw);
    return;
  }
  Tensor g = Tensor::empty({n, m}, DType::F32, MemCategory::Workspace);
  convert_to_f32(g.data<float>(), dy, DType::BF16, static_cast<size_t>(n * m));
  if (dx) gemm_xw(dx, g.data<float>(), w, wdt, n, m, k, accumulate);
  if (dw) gemm_atb(dw, k, g.data<float>(), m, x, wdt, n, m, k, !assign_dw);
}

}  // namespace cpu
}  // namespace moe
