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

// One matmul per (padded rows, m, k, weight dtype): x [n, k] · w [k, m] with w stored [m, k]
// (strides {1, k}), into a dense f32 [n, m].
dnnl::matmul& matmul_for(int64_t n, int64_t m, int64_t k, DType wdt) {
  static std::mutex mu;
  static std::map<std::tuple<int64_t, int64_t, int64_t, int>, dnnl::matmul> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto key = std::make_tuple(n, m, k, static_cast<int>(wdt));
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  const memory::data_type dt = wdt == DType::BF16 ? memory::data_type::bf16 : memory::data_type::f32;
  memory::desc src({n, k}, dt, memory::dims{k, 1});
  memory::desc wei({k, m}, dt, memory::dims{1, k});
  memory::desc dst({n, m}, memory::data_type::f32, memory::dims{m, 1});
  try {
    dnnl::matmul::primitive_desc pd(dnnl::matmul::desc(src, wei, dst), onednn_engine());
    return cache.emplace(key, dnnl::matmul(pd)).first->second;
  } catch (const dnnl::error& e) {
    MOE_FAIL("oneDNN matmul [%lld x %lld] x [%lld x %lld] %s: %s (oneDNN ISA %s)", (long long)n, (long long)k,
             (long long)k, (long long)m, dtype_name(wdt), e.what(), onednn_isa_name().c_str());
  }
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
  MOE_CHECK(wdt == DType::BF16 || wdt == DType::F32, "oneDNN gemm: weights must be bf16 or f32, not %s",
            dtype_name(wdt));
  MOE_CHECK(!omp_in_parallel(), "oneDNN gemm: called inside a parallel region");
  if (n == 0 || m == 0) return;
  const int64_t np = padded_rows(n);
  const size_t esz = wdt == DType::BF16 ? 2 : 4;
  char* xs = static_cast<char*>(scratch_bytes(Scratch::MatrixX, static_cast<size_t>(np * k) * esz));
  float* ys = static_cast<float*>(scratch_bytes(Scratch::MatrixOut, static_cast<size_t>(np * m) * sizeof(float)));
  // x to the weights' type (bf16: round to nearest even), the padding rows zero (both types' zero
  // is all-zero bytes).
#pragma omp parallel for schedule(static) if(n * k > 65536)
  for (int64_t r = 0; r < n; ++r) convert_from_f32(xs + static_cast<size_t>(r * k) * esz, x + r * k, wdt, size_t(k));
  std::memset(xs + static_cast<size_t>(n * k) * esz, 0, static_cast<size_t>((np - n) * k) * esz);
  const memory::data_type dt = wdt == DType::BF16 ? memory::data_type::bf16 : memory::data_type::f32;
  dnnl::engine& eng = onednn_engine();
  memory src(memory::desc({np, k}, dt, memory::dims{k, 1}), eng, xs);
  memory wei(memory::desc({k, m}, dt, memory::dims{1, k}), eng, const_cast<void*>(w));
  memory dst(memory::desc({np, m}, memory::data_type::f32, memory::dims{m, 1}), eng, ys);
  thread_local dnnl::stream s(eng);
  matmul_for(np, m, k, wdt).execute(s, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, wei}, {DNNL_ARG_DST, dst}});
  s.wait();
#pragma omp parallel for schedule(static) if(n * m > 65536)
  for (int64_t r = 0; r < n; ++r) {
    float* o = out + r * ldo;
    const float* y = ys + r * m;
    if (accumulate)
      for (int64_t i = 0; i < m; ++i) o[i] += y[i];
    else
      std::copy(y, y + m, o);
  }
}

#else
bool bf16_matrix_available() { return false; }
std::string onednn_isa_name() { return "none: built without oneDNN (Debian's libdnnl-dev)"; }
void onednn_gemm_xwt(float*, int64_t, const float*, const void*, DType, int64_t, int64_t, int64_t, bool) {
  MOE_FAIL("oneDNN gemm: this build has no oneDNN (install libdnnl-dev and reconfigure)");
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
