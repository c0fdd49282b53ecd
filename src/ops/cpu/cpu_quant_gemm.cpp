// cpu_quant_gemm.cpp — the quantized x·Wᵀ entry (cpu_quant_gemm.h): run-time choice of the
// instruction-set variant, int8 rounding of the activation rows, and the hand-off to the
// variant's kernels (cpu_quant_kernels.h).
#include "ops/cpu/cpu_quant_gemm.h"

#include <immintrin.h>
#include <omp.h>

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "core/cpu_features.h"
#include "core/tensor.h"
#include "ops/cpu/cpu_quant_impl.h"

namespace moe {
namespace cpu {
namespace {

QuantIsa best_isa() {
  if (cpu_has_avx512()) return cpu_has_avx512_vnni() ? QuantIsa::Avx512Vnni : QuantIsa::Avx512;
  return QuantIsa::Avx2;
}

// The variant in use: resolved on first use from MOE_QUANT_ISA or the CPU.
std::atomic<int> g_isa{static_cast<int>(QuantIsa::Auto)};

QuantIsa resolve(QuantIsa isa) {
  if (isa != QuantIsa::Auto) return isa;
  if (const char* env = std::getenv("MOE_QUANT_ISA"); env && *env) {
    QuantIsa want;
    MOE_CHECK(quant_isa_from_name(env, &want), "MOE_QUANT_ISA=%s: expected auto, avx2, avx512 or avx512vnni", env);
    MOE_CHECK(quant_isa_supported(want), "MOE_QUANT_ISA=%s: this CPU does not support it", env);
    if (want != QuantIsa::Auto) return want;
  }
  return best_isa();
}

// Rounds one block of `len` (a multiple of 32) values to int8: d = amax/127, q = x * (1/d)
// rounded half to even (cvtps uses the default rounding mode). Returns d; writes the int32
// sum of the q in *sum and, when bsum is given, the sum of each 16 into bsum. A NaN in the
// block makes d NaN, so the outputs that read it are NaN as with f32 weights (max_ps alone
// would drop it).
float quant_block(const float* x, int64_t len, int8_t* q, int32_t* sum, int16_t* bsum) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 mx = _mm256_setzero_ps(), nan = _mm256_setzero_ps();
  for (int64_t i = 0; i < len; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v));
    nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
  const float amax = _mm256_movemask_ps(nan) ? std::nanf("") : _mm_cvtss_f32(m4);
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  const __m256 vid = _mm256_set1_ps(id);
  __m256i tot = _mm256_setzero_si256();
  for (int64_t i = 0; i < len; i += 32) {
    __m256i v[4];
    for (int j = 0; j < 4; ++j) v[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vid));
    if (bsum) {
      for (int h = 0; h < 2; ++h) {
        const __m256i s = _mm256_add_epi32(v[2 * h], v[2 * h + 1]);
        __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
        t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
        bsum[i / 16 + h] = static_cast<int16_t>(_mm_cvtsi128_si32(t));
      }
    }
    tot = _mm256_add_epi32(tot, _mm256_add_epi32(_mm256_add_epi32(v[0], v[1]), _mm256_add_epi32(v[2], v[3])));
    // Pack 32 int32 to int8 in order (packs interleave the 128-bit lanes; the permute undoes it).
    const __m256i p01 = _mm256_packs_epi32(v[0], v[1]), p23 = _mm256_packs_epi32(v[2], v[3]);
    const __m256i p = _mm256_packs_epi16(p01, p23);
    const __m256i ordered = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), ordered);
  }
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(tot), _mm256_extracti128_si256(tot, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4e));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xb1));
  *sum = _mm_cvtsi128_si32(t);
  return d;
}

size_t align64(size_t v) { return (v + 63) / 64 * 64; }

}  // namespace

const char* quant_isa_name(QuantIsa isa) {
  switch (isa) {
    case QuantIsa::Auto: return "auto";
    case QuantIsa::Avx2: return "avx2";
    case QuantIsa::Avx512: return "avx512";
    case QuantIsa::Avx512Vnni: return "avx512vnni";
  }
  return "?";
}

bool quant_isa_from_name(const char* s, QuantIsa* out) {
  for (QuantIsa i : {QuantIsa::Auto, QuantIsa::Avx2, QuantIsa::Avx512, QuantIsa::Avx512Vnni})
    if (std::strcmp(s, quant_isa_name(i)) == 0) {
      *out = i;
      return true;
    }
  return false;
}

bool quant_isa_supported(QuantIsa isa) {
  switch (isa) {
    case QuantIsa::Auto: return true;
    case QuantIsa::Avx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case QuantIsa::Avx512: return cpu_has_avx512();
    case QuantIsa::Avx512Vnni: return cpu_has_avx512_vnni();
  }
  return false;
}

void set_quant_isa(QuantIsa isa) {
  MOE_CHECK(quant_isa_supported(isa), "quantized kernels: this CPU does not support the %s variant", quant_isa_name(isa));
  g_isa.store(static_cast<int>(isa == QuantIsa::Auto ? resolve(isa) : isa));
}

QuantIsa quant_isa() {
  int v = g_isa.load();
  if (v == static_cast<int>(QuantIsa::Auto)) {
    v = static_cast<int>(resolve(QuantIsa::Auto));
    g_isa.store(v);
  }
  return static_cast<QuantIsa>(v);
}

namespace {
std::atomic<bool> g_exact{false};
}  // namespace

void set_quant_exact(bool exact) { g_exact.store(exact); }
bool quant_exact() { return g_exact.load(); }

int64_t quant_act_block(DType wdt) { return dtype_block_elems(wdt) == 32 ? 32 : 256; }

namespace {

// The activation layout a weight dtype's kernels read at n rows (what quant_gemm_xwt rounds x to).
struct ActsLayout {
  int64_t blk;
  bool packed;  // the packed prefill tiles: per-thread repack buffers
  bool pairs;   // QActs::d4 / s4 and the pair-regrouped qs
  bool sum32;   // QActs::sum32
  bool operator==(const ActsLayout&) const = default;
};

ActsLayout acts_layout(DType wdt, int64_t n) {
  ActsLayout l;
  l.blk = quant_act_block(wdt);
  // Enough rows: the packed tiles (cpu_quant_packed.h), one repacked 8-row tile per thread.
  l.packed = n >= kPackedMinRows && quant_has_packed(wdt);
  // q4_0's row kernels, and the q4_1/q5_0/q5_1 decode kernel (tile_legacy_rows; their tiles of
  // several activation rows read the blocks in order).
  l.pairs = !l.packed && (wdt == DType::Q4_0 || (quant_is_legacy(wdt) && n == 1));
  // Σq of each block: q4_0's packed tiles, the legacy formats, and q8_0's 512-bit decode rows
  // (tile_q8_0_rows512, which take the weights as w + 128).
  l.sum32 = (wdt == DType::Q4_0 && l.packed) || quant_is_legacy(wdt) || (wdt == DType::Q8_0 && n == 1);
  return l;
}

// x [n, k] rounded to int8 in the layout `l` (QActs), in workspace memory `ws` holds; plus the
// packed path's per-thread tile buffers (*pack, *pack_stride) for weights of dtype `wdt`.
QActs round_acts(Tensor& ws, const float* x, int64_t n, int64_t k, const ActsLayout& l, DType wdt, uint8_t** pack,
                 size_t* pack_stride) {
  const int64_t blk = l.blk, nbk = k / blk;
  // Activations rounded to int8: q [n,k], d [n,k/blk], and (blk 256) bsum [n,k/16], bsum32 [n,k/32].
  const size_t q_bytes = static_cast<size_t>(n * k), d_bytes = static_cast<size_t>(n * nbk) * 4;
  const size_t x_bytes = blk == 32 ? 0 : static_cast<size_t>(n * (k / 16 + k / 32)) * 2;
  // The packed tiles' buffers belong to this call's own threads (one when called inside another
  // parallel region).
  const QuantPackedLayout pl = quant_packed_layout(wdt);
  *pack_stride = l.packed ? align64(static_cast<size_t>(k / pl.sb_values * pl.sb_bytes)) : 0;
  const size_t pack_bytes = *pack_stride * static_cast<size_t>(omp_in_parallel() ? 1 : omp_get_max_threads());
  const size_t p_bytes = l.pairs ? static_cast<size_t>(n * nbk) * 16 : 0;
  const size_t s_bytes = l.sum32 ? align64(static_cast<size_t>(n * nbk) * 4) : 0;
  ws = Tensor::empty(
      {static_cast<int64_t>(align64(q_bytes) + align64(d_bytes) + align64(x_bytes) + 2 * p_bytes + s_bytes + pack_bytes)},
      DType::U8, MemCategory::Workspace);
  auto* base = static_cast<uint8_t*>(ws.raw());
  int8_t* qs = reinterpret_cast<int8_t*>(base);
  float* dd = reinterpret_cast<float*>(base + align64(q_bytes));
  void* extra = base + align64(q_bytes) + align64(d_bytes);
  int16_t* bs = blk == 32 ? nullptr : static_cast<int16_t*>(extra);
  int16_t* bs32 = bs ? bs + n * (k / 16) : nullptr;
  uint8_t* pairs_at = base + align64(q_bytes) + align64(d_bytes) + align64(x_bytes);
  float* d4 = l.pairs ? reinterpret_cast<float*>(pairs_at) : nullptr;
  int32_t* s4 = l.pairs ? reinterpret_cast<int32_t*>(pairs_at + p_bytes) : nullptr;
  uint8_t* after = pairs_at + 2 * p_bytes;
  int32_t* sum32 = s_bytes ? reinterpret_cast<int32_t*>(after) : nullptr;
  *pack = l.packed ? after + s_bytes : nullptr;
  const bool pairs = l.pairs;
  parallel_threads(n * k > 65536, [&](int64_t nt, int64_t id) {
    for (int64_t r = n * id / nt; r < n * (id + 1) / nt; ++r) {
      for (int64_t b = 0; b < nbk; ++b) {
        int32_t sum = 0;
        const float d = quant_block(x + r * k + b * blk, blk, qs + r * k + b * blk, &sum,
                                    bs ? bs + r * (k / 16) + b * (blk / 16) : nullptr);
        dd[r * nbk + b] = d;
        if (sum32) sum32[r * nbk + b] = sum;
        if (pairs)
          for (int j = 0; j < 4; ++j) d4[(r * nbk + b) * 4 + j] = d, s4[(r * nbk + b) * 4 + j] = 2 * sum;
      }
      if (pairs)
        for (int64_t b = 0; b + 2 <= nbk; b += 2) {  // [b 0-15 | b 16-31 | b+1 0-15 | b+1 16-31] -> QActs order
          int8_t* p = qs + r * k + b * 32;
          int8_t t[16];
          std::memcpy(t, p + 16, 16);
          std::memcpy(p + 16, p + 32, 16);
          std::memcpy(p + 32, t, 16);
        }
      if (bs32)
        for (int64_t j = 0; j < k / 32; ++j)
          bs32[r * (k / 32) + j] = static_cast<int16_t>(bs[r * (k / 16) + 2 * j] + bs[r * (k / 16) + 2 * j + 1]);
    }
  });
  QActs a;
  a.n = n;
  a.k = k;
  a.blk = blk;
  a.qs = qs;
  a.d = dd;
  a.bsum = bs;
  a.bsum32 = bs32;
  a.d4 = d4;
  a.s4 = s4;
  a.sum32 = sum32;
  return a;
}

void run_job(const QuantJob& job) {
  switch (quant_isa()) {
    case QuantIsa::Avx512Vnni: qk_vnni::run(job); return;
    case QuantIsa::Avx512: qk_avx512::run(job); return;
    default: qk_avx2::run(job); return;
  }
}

void check_row_length(DType wdt, int64_t k) {
  MOE_CHECK(k % dtype_block_elems(wdt) == 0, "quantized gemm: row length %lld is not a whole number of %s blocks",
            static_cast<long long>(k), dtype_name(wdt));
}

}  // namespace

void quant_gemm_xwt(float* out, int64_t ldo, const float* x, const void* w, DType wdt, int64_t n, int64_t m,
                    int64_t k, bool accumulate) {
  MOE_ASSERT(dtype_is_quant(wdt));
  if (n == 0 || m == 0) return;
  check_row_length(wdt, k);
  Tensor ws;
  QuantJob job;
  const QActs a = round_acts(ws, x, n, k, acts_layout(wdt, n), wdt, &job.pack, &job.pack_stride);
  job.wdt = wdt;
  job.w = static_cast<const uint8_t*>(w);
  job.m = m;
  job.k = k;
  job.row_bytes = dtype_nbytes(wdt, k);
  job.a = &a;
  job.out = out;
  job.ldo = ldo;
  job.accumulate = accumulate;
  run_job(job);
}

void quant_gemv_parts(const float* x, int64_t k, const QuantPart* parts, int n_parts) {
  if (n_parts == 0) return;
  bool shared = true;
  int64_t cells = 0;
  for (int i = 0; i < n_parts; ++i) {
    MOE_ASSERT(dtype_is_quant(parts[i].wdt));
    check_row_length(parts[i].wdt, k);
    shared = shared && acts_layout(parts[i].wdt, 1) == acts_layout(parts[0].wdt, 1);
    cells += parts[i].m * k;
  }
  if (!shared) {  // the activations in two layouts: one product per part
    for (int i = 0; i < n_parts; ++i)
      quant_gemm_xwt(parts[i].out, parts[i].m, x, parts[i].w, parts[i].wdt, 1, parts[i].m, k, false);
    return;
  }
  Tensor ws;
  uint8_t* pack;
  size_t pack_stride;
  const QActs a = round_acts(ws, x, 1, k, acts_layout(parts[0].wdt, 1), parts[0].wdt, &pack, &pack_stride);
  // Each thread its share of every part's rows; consecutive parts of one dtype are one job, whose
  // streams run through all of them (QuantJob::more). Inside this region the variants' decode
  // runs on the calling thread alone (parallel_threads).
  parallel_threads(cells > 65536, [&](int64_t nt, int64_t id) {
    for (int i = 0; i < n_parts;) {
      QuantJob job;
      job.wdt = parts[i].wdt;
      job.row_bytes = dtype_nbytes(job.wdt, k);
      job.k = k;
      job.a = &a;
      for (int s = 0; i < n_parts && parts[i].wdt == job.wdt && s <= kQuantMaxSegs; ++i, ++s) {
        const QuantPart& p = parts[i];
        const int64_t lo = p.m * id / nt, hi = p.m * (id + 1) / nt;
        QuantSeg seg{static_cast<const uint8_t*>(p.w) + static_cast<size_t>(lo) * job.row_bytes, p.out + lo, hi - lo};
        if (s == 0) job.w = seg.w, job.out = seg.out, job.m = seg.m;
        else job.more[job.n_more++] = seg;
      }
      run_job(job);  // a thread with no rows of these parts: run_decode does nothing
    }
  });
}

}  // namespace cpu
}  // namespace moe
