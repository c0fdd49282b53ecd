// test_cpu_parallel.cpp — parallel_threads (ops/cpu/cpu_parallel.h): a team at the top level,
// the calling thread alone inside another region, and the decode GEMVs that use it giving the
// same outputs on both paths.
#include <gtest/gtest.h>

#include <omp.h>

#include <atomic>
#include <cstdint>
#include <random>
#include <vector>

#include "core/dtype.h"
#include "core/quant.h"
#include "ops/cpu/cpu_gemm.h"
#include "ops/cpu/cpu_parallel.h"

namespace moe {
namespace {

TEST(CpuParallel, TeamAtTopLevelCallerAloneInsideARegion) {
  const int max_threads = omp_get_max_threads();
  std::vector<std::atomic<int>> seen(static_cast<size_t>(max_threads));
  std::atomic<int> calls{0}, bad_nt{0};
  cpu::parallel_threads(true, [&](int64_t nt, int64_t id) {
    calls++;
    if (nt != max_threads) bad_nt++;
    seen[static_cast<size_t>(id)]++;
  });
  EXPECT_EQ(calls.load(), max_threads);
  EXPECT_EQ(bad_nt.load(), 0);
  for (auto& s : seen) EXPECT_EQ(s.load(), 1) << "every thread id once";

  calls = 0;
  cpu::parallel_threads(false, [&](int64_t nt, int64_t id) {
    calls++;
    EXPECT_EQ(nt, 1);
    EXPECT_EQ(id, 0);
  });
  EXPECT_EQ(calls.load(), 1);

  // Inside a region of two threads: each runs the body once, itself, as (1, 0) — no new team.
  calls = 0;
  std::atomic<int> wrong{0};
#pragma omp parallel num_threads(2)
  {
    const int outer = omp_get_thread_num(), team = omp_get_num_threads();
    cpu::parallel_threads(true, [&](int64_t nt, int64_t id) {
      calls++;
      if (nt != 1 || id != 0 || omp_get_thread_num() != outer || omp_get_num_threads() != team) wrong++;
    });
  }
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(calls.load(), omp_get_max_threads() > 1 ? 2 : 1);
}

// The one-row GEMVs split their rows by (nt, id): the same rows through a team and through the
// calling thread alone (inside a region) give the same outputs, for the quantized decode kernel
// and the bf16 one-row kernel.
TEST(CpuParallel, DecodeGemvSameInsideAndOutsideARegion) {
  const int64_t m = 1000, k = 512;  // m not a multiple of the 4-row tiles or of the threads
  std::mt19937 g(3);
  std::normal_distribution<float> nd;
  std::vector<float> wf(static_cast<size_t>(m * k)), x(static_cast<size_t>(k));
  for (auto& v : wf) v = nd(g);
  for (auto& v : x) v = nd(g);
  for (DType dt : {DType::Q4_K, DType::Q8_0, DType::BF16}) {
    std::vector<uint8_t> w(dtype_nbytes(dt, m * k));
    if (dt == DType::BF16)
      convert_from_f32(w.data(), wf.data(), dt, wf.size());
    else
      for (int64_t r = 0; r < m; ++r)
        quantize_row(dtype_ggml_type(dt), wf.data() + r * k, w.data() + dtype_nbytes(dt, r * k), k);
    std::vector<float> top(static_cast<size_t>(m)), inside(static_cast<size_t>(m), -1.0f);
    cpu::gemm_xwt(top.data(), m, x.data(), w.data(), dt, 1, m, k, false);
#pragma omp parallel num_threads(2)
    {
      if (omp_get_thread_num() == 0) cpu::gemm_xwt(inside.data(), m, x.data(), w.data(), dt, 1, m, k, false);
    }
    for (int64_t r = 0; r < m; ++r) ASSERT_EQ(top[size_t(r)], inside[size_t(r)]) << dtype_name(dt) << " row " << r;
  }
}

}  // namespace
}  // namespace moe
