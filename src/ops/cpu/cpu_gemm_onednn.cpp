// cpu_gemm_onednn.cpp — bf16 GEMMs on the matrix units through oneDNN (cpu_gemm_onednn.h).
#include "ops/cpu/cpu_gemm_onednn.h"

#include <omp.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>
#include <tuple>

#include "core/error.h"
#include "ops/cpu/cpu_scratch.h"

#if MOE_HAVE_ONEDNN
#include <oneapi/dnnl/dnnl.hpp>
#endif

namespace moe {
namespace cpu {

#if MOE_HAVE_ONEDNN
namespace {

using dnnl::memory;

dnnl::engine& onednn_engine() {
  static dnnl::engine eng(dnnl::engine::kind::cpu, 0);
  return eng;
}

// oneDNN's ISA values are feature masks: a CPU has an ISA when every bit of its value is set.
bool isa_has(dnnl::cpu_isa isa, dnnl::cpu_isa want) {
  return (static_cast<unsigned>(isa) & static_cast<unsigned>(want)) == static_cast<unsigned>(want);
}

// Row counts are padded so that the MoE experts' varying token counts share a few primitives
// (each one is JIT-compiled when created): to 16 up to 256 rows, to 64 above.
int64_t padded_rows(int64_t n) { return n <= 256 ? (n + 15) / 16 * 16 : (n + 63) / 64 * 64; }

// One matmul per shape and layout: C [M, N] (dense f32) = A [M, K] · B [K, N], each factor
// stored row-major as given (a_t: A stored as its transpose [K, M]; b_t: B stored as [N, K], as
// a weight [out, in] is). Keyed also by whether it is created inside a parallel region: there
// oneDNN runs it on the calling thread alone (the training experts' per-thread products), and a
// primitive planned for the whole team would split its work for threads that do not come.
// Threads of a region execute the same primitive at once, so its scratchpad is ours (user
// mode, per thread): oneDNN's own (library mode) is one buffer per primitive, and two threads
// packing into it at once corrupt each other's products.
// A [rows, cols] factor of type t stored row-major, or as its transpose [cols, rows]
// (transposed), with row stride ld (0: dense; of the stored rows when transposed).
memory::desc mat_desc(int64_t rows, int64_t cols, memory::data_type t, bool transposed, int64_t ld = 0) {
  return memory::desc({rows, cols}, t, transposed ? memory::dims{1, ld ? ld : rows} : memory::dims{ld ? ld : cols, 1});
}

memory::data_type onednn_type(DType dt) { return dt == DType::BF16 ? memory::data_type::bf16 : memory::data_type::f32; }

struct Matmul {
  dnnl::matmul prim;
  size_t scratchpad_bytes = 0;
};

// The product's destination: a dense [M, N] scratch (ldc 0), or out itself with row stride ldc,
// the product added to it (sum) or written over it.
struct Dst {
  int64_t ldc = 0;
  bool sum = false;
};

const Matmul& matmul_for(int64_t M, int64_t N, int64_t K, bool a_t, int64_t lda, bool b_t, DType dt, Dst d) {
  static std::mutex mu;
  static std::map<std::tuple<int64_t, int64_t, int64_t, int, int64_t, int, int, int, int64_t, int>, Matmul> cache;
  const bool in_region = omp_in_parallel();
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_tuple(M, N, K, int(a_t), lda, int(b_t), static_cast<int>(dt), int(in_region), d.ldc, int(d.sum));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const memory::data_type t = onednn_type(dt);
  const memory::desc src = mat_desc(M, K, t, a_t, lda), wei = mat_desc(K, N, t, b_t);
  const memory::desc dst = mat_desc(M, N, memory::data_type::f32, false, d.ldc);
  try {
    dnnl::primitive_attr attr;
    attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
    if (d.sum) {
      dnnl::post_ops po;
      po.append_sum(1.0f);
      attr.set_post_ops(po);
    }
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, wei, dst), attr, onednn_engine());
    return cache.emplace(key, Matmul{dnnl::matmul(pd), pd.scratchpad_desc().get_size()}).first->second;
  } catch (const dnnl::error& e) {
    MOE_FAIL("oneDNN matmul [%lld x %lld] x [%lld x %lld] %s: %s (oneDNN ISA %s)", (long long)M, (long long)K,
             (long long)K, (long long)N, dtype_name(dt), e.what(), onednn_isa_name().c_str());
  }
}

// out [M_out, ldo] (+)= A · B through matmul_for; a and b already in dt. When every row of the
// product is out's (M_out == M) oneDNN writes (or adds) into out directly; with padding rows it
// writes a dense scratch first, and those of its rows that are out's are copied or added. A's
// row stride lda (0: dense) is that of its stored rows.
void run_matmul(float* out, int64_t ldo, int64_t M_out, int64_t M, int64_t N, int64_t K, const void* a, bool a_t,
                const void* b, bool b_t, DType dt, bool accumulate, int64_t lda = 0) {
  const memory::data_type t = onednn_type(dt);
  const bool direct = M_out == M;
  const Dst d = direct ? Dst{ldo, accumulate} : Dst{};
  float* ys = direct ? out
                     : static_cast<float*>(scratch_bytes(Scratch::MatrixOut, static_cast<size_t>(M * N) * sizeof(float)));
  const Matmul& mm = matmul_for(M, N, K, a_t, lda, b_t, dt, d);
  dnnl::engine& eng = onednn_engine();
  memory src(mat_desc(M, K, t, a_t, lda), eng, const_cast<void*>(a));
  memory wei(mat_desc(K, N, t, b_t), eng, const_cast<void*>(b));
  memory dst(mat_desc(M, N, memory::data_type::f32, false, d.ldc), eng, ys);
  memory pad(memory::desc({int64_t(mm.scratchpad_bytes)}, memory::data_type::u8, memory::dims{1}), eng,
             scratch_bytes(Scratch::MatrixPad, std::max<size_t>(mm.scratchpad_bytes, 64)));
  thread_local dnnl::stream s(eng);
  mm.prim.execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}, {DNNL_ARG_SCRATCHPAD, pad}});
  s.wait();
  if (direct) return;
#pragma omp parallel for schedule(static) if(M_out * N > 65536 && !omp_in_parallel())
  for (int64_t r = 0; r < M_out; ++r) {
    float* o = out + r * ldo;
    const float* y = ys + r * N;
    if (accumulate)
      for (int64_t i = 0; i < N; ++i) o[i] += y[i];
    else
      std::copy(y, y + N, o);
  }
}

// Rows of x [n, k] (row stride ldx) to dt in scratch slot `slot`, zero rows up to np (both
// types' zero is all-zero bytes).
const void* rounded_rows(Scratch slot, const float* x, int64_t ldx, int64_t n, int64_t np, int64_t k, DType dt) {
  const size_t esz = dt == DType::BF16 ? 2 : 4;
  char* xs = static_cast<char*>(scratch_bytes(slot, static_cast<size_t>(np * k) * esz));
#pragma omp parallel for schedule(static) if(n * k > 65536 && !omp_in_parallel())
  for (int64_t r = 0; r < n; ++r) convert_from_f32(xs + static_cast<size_t>(r * k) * esz, x + r * ldx, dt, size_t(k));
  std::memset(xs + static_cast<size_t>(n * k) * esz, 0, static_cast<size_t>((np - n) * k) * esz);
  return xs;
}

// dW [m, k] (row stride ldw) += dYᵀ·X for dY = ys [np, m] and X = xs [np, k], both in dt: in
// blocks of at most kDwBlockRows rows of dW, each its own product. At the LM head's shape
// (m 32000, k 512, np 256) one product over all m rows ran 580-650 GFLOP/s on Zen 5's bf16 units,
// blocks of 2000-4000 rows 816-834 (oneDNN's sum into a large dW loses its locality). f32
// products (f32 weights under Matrix mode) take the same blocks, not measured apart.
// accumulate false: dW = dYᵀ·X, its old values never read (oneDNN's sum reads every block of dW
// from memory: accumulating into a fresh expert gradient ran 555-590 GFLOP/s where the same
// product into a cache-resident one ran 850-870).
constexpr int64_t kDwBlockRows = 2048;
void dw_product(float* dw, int64_t ldw, int64_t m, int64_t k, int64_t np, const void* ys, const void* xs, DType dt,
                bool accumulate) {
  const size_t esz = dt == DType::BF16 ? 2 : 4;
  const int64_t blocks = (m + kDwBlockRows - 1) / kDwBlockRows, rows = (m + blocks - 1) / blocks;
  for (int64_t r0 = 0; r0 < m; r0 += rows) {
    const int64_t n = std::min(rows, m - r0);
    run_matmul(dw + r0 * ldw, ldw, n, n, k, np, static_cast<const char*>(ys) + static_cast<size_t>(r0) * esz, true,
               xs, false, dt, accumulate, m);
  }
}

void check_dtype(DType dt) {
  MOE_CHECK(dt == DType::BF16 || dt == DType::F32, "oneDNN gemm: weights must be bf16 or f32, not %s", dtype_name(dt));
}

}  // namespace

bool bf16_matrix_available() {
  static const bool yes = isa_has(dnnl::get_effective_cpu_isa(), dnnl::cpu_isa::avx512_core_bf16);
  return yes;
}

std::string onednn_isa_name() {
  const dnnl::cpu_isa isa = dnnl::get_effective_cpu_isa();
  // Highest first: each later mask is a subset of the earlier ones.
  static const std::pair<dnnl::cpu_isa, const char*> names[] = {
      {dnnl::cpu_isa::avx512_core_amx, "avx512_core_amx"}, {dnnl::cpu_isa::avx512_core_bf16, "avx512_core_bf16"},
      {dnnl::cpu_isa::avx512_core_vnni, "avx512_core_vnni"}, {dnnl::cpu_isa::avx512_core, "avx512_core"},
      {dnnl::cpu_isa::avx2_vnni, "avx2_vnni"}, {dnnl::cpu_isa::avx2, "avx2"}, {dnnl::cpu_isa::avx, "avx"},
      {dnnl::cpu_isa::sse41, "sse41"}};
  for (const auto& [mask, name] : names)
    if (isa_has(isa, mask)) return name;
  return "generic";
}

void onednn_gemm_xwt(float* out, int64_t ldo, const float* x, const void* w, DType wdt, int64_t n, int64_t m,
                     int64_t k, bool accumulate) {
  check_dtype(wdt);
  if (n == 0 || m == 0) return;
  const int64_t np = padded_rows(n);
  const void* xs = rounded_rows(Scratch::MatrixX, x, k, n, np, k, wdt);
  run_matmul(out, ldo, n, np, m, k, xs, false, w, true, wdt, accumulate);
}

void onednn_gemm_xw(float* out, const float* x, int64_t ldx, const void* w, DType wdt, int64_t n, int64_t m,
                    int64_t k, bool accumulate) {
  check_dtype(wdt);
  if (n == 0 || k == 0) return;
  if (m == 0) {
    if (!accumulate) std::fill(out, out + n * k, 0.0f);
    return;
  }
  const int64_t np = padded_rows(n);
  const void* xs = rounded_rows(Scratch::MatrixX, x, ldx, n, np, m, wdt);
  run_matmul(out, k, n, np, k, m, xs, false, w, false, wdt, accumulate);
}

void onednn_gemm_atb(float* dw, int64_t ldw, const float* dy, int64_t ldy, const float* x, int64_t ldx, DType dt,
                     int64_t n, int64_t m, int64_t k, bool accumulate) {
  check_dtype(dt);
  if (m == 0 || k == 0) return;
  if (n == 0) {
    if (!accumulate)
      for (int64_t r = 0; r < m; ++r) std::fill(dw + r * ldw, dw + r * ldw + k, 0.0f);
    return;
  }
  // The sum runs over the n rows: both factors padded with zero rows to np.
  const int64_t np = padded_rows(n);
  const void* ys = rounded_rows(Scratch::MatrixX, dy, ldy, n, np, m, dt);
  const void* xs = rounded_rows(Scratch::MatrixB, x, ldx, n, np, k, dt);
  dw_product(dw, ldw, m, k, np, ys, xs, dt, accumulate);
}

namespace {
// The two products from ys, dy in bf16 with rows padded to np; dx or dw null: not wanted.
void linear_backward_rounded(float* dx, float* dw, const void* ys, const float* x, const void* w, int64_t n,
                             int64_t np, int64_t m, int64_t k, bool accumulate, bool assign_dw) {
  if (dx) run_matmul(dx, k, n, np, k, m, ys, false, w, false, DType::BF16, accumulate);
  if (!dw) return;
  const void* xs = rounded_rows(Scratch::MatrixB, x, k, n, np, k, DType::BF16);
  dw_product(dw, k, m, k, np, ys, xs, DType::BF16, !assign_dw);
}
}  // namespace

void onednn_linear_backward_bf16(float* dx, float* dw, const float* dy, const float* x, const void* w, int64_t n,
                                 int64_t m, int64_t k, bool accumulate, bool assign_dw) {
  if (n == 0 || m == 0 || k == 0) return;
  const int64_t np = padded_rows(n);
  linear_backward_rounded(dx, dw, rounded_rows(Scratch::MatrixX, dy, m, n, np, m, DType::BF16), x, w, n, np, m, k,
                          accumulate, assign_dw);
}

void onednn_linear_backward_bf16(float* dx, float* dw, const uint16_t* dy, const float* x, const void* w, int64_t n,
                                 int64_t m, int64_t k, bool accumulate, bool assign_dw) {
  if (n == 0 || m == 0 || k == 0) return;
  const int64_t np = padded_rows(n);
  const void* ys = dy;
  if (np > n) {  // a short last chunk: its rows copied above zero rows
    auto* pad = static_cast<uint16_t*>(scratch_bytes(Scratch::MatrixX, static_cast<size_t>(np * m) * 2));
    std::memcpy(pad, dy, static_cast<size_t>(n * m) * 2);
    std::memset(pad + n * m, 0, static_cast<size_t>((np - n) * m) * 2);
    ys = pad;
  }
  linear_backward_rounded(dx, dw, ys, x, w, n, np, m, k, accumulate, assign_dw);
}

#else
bool bf16_matrix_available() { return false; }
std::string onednn_isa_name() { return "none: built without oneDNN (Debian's libdnnl-dev)"; }
[[noreturn]] void no_onednn() { MOE_FAIL("oneDNN gemm: this build has no oneDNN (install libdnnl-dev and reconfigure)"); }
void onednn_gemm_xwt(float*, int64_t, const float*, const void*, DType, int64_t, int64_t, int64_t, bool) { no_onednn(); }
void onednn_gemm_xw(float*, const float*, int64_t, const void*, DType, int64_t, int64_t, int64_t, bool) { no_onednn(); }
void onednn_gemm_atb(float*, int64_t, const float*, int64_t, const float*, int64_t, DType, int64_t, int64_t, int64_t,
                     bool) {
  no_onednn();
}
void onednn_linear_backward_bf16(float*, float*, const float*, const float*, const void*, int64_t, int64_t, int64_t,
                                 bool, bool) {
  no_onednn();
}
void onednn_linear_backward_bf16(float*, float*, const uint16_t*, const float*, const void*, int64_t, int64_t, int64_t,
                                 bool, bool) {
  no_onednn();
}
#endif

namespace {
const char* env_mode() {
  const char* e = std::getenv("MOE_BF16_GEMM");
  return e ? e : "";
}
Bf16Gemm& mode_ref() {
  static Bf16Gemm mode = [] {
    if (std::strcmp(env_mode(), "matrix") != 0) return Bf16Gemm::Widen;
    MOE_CHECK(bf16_matrix_available(), "MOE_BF16_GEMM=matrix: no bf16 matrix units that oneDNN can use on this CPU "
              "(oneDNN ISA: %s)", onednn_isa_name().c_str());
    return Bf16Gemm::Matrix;
  }();
  return mode;
}
}  // namespace

Bf16Gemm bf16_gemm() { return mode_ref(); }

void set_bf16_gemm(Bf16Gemm mode) {
  MOE_CHECK(mode != Bf16Gemm::Matrix || bf16_matrix_available(),
            "bf16 matrix units: none that oneDNN can use on this CPU (oneDNN ISA: %s)", onednn_isa_name().c_str());
  mode_ref() = mode;
}

void use_bf16_matrix_where_available() {
  if (bf16_matrix_available() && std::strcmp(env_mode(), "widen") != 0) set_bf16_gemm(Bf16Gemm::Matrix);
}

}  // namespace cpu
}  // namespace moe
