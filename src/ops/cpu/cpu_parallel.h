// cpu_parallel.h — a parallel region that is skipped, not nested, inside another one.
//
// The decode GEMVs split their rows over the threads by hand (thread id of nt). Called inside
// another region (the decode-sized experts, cpu_moe.cpp, run each thread's slice through them),
// `#pragma omp parallel if(...)` still enters libgomp, which sets up a nested team of one:
// ~0.6 µs a call on the Zen 4 VM against ~0.1 µs of plain call, ~290 calls per Q4_K_M decode
// token. parallel_threads runs the body on the calling thread alone there instead.
#pragma once

#include <omp.h>

#include <cstdint>

namespace moe {
namespace cpu {

// body(nt, id) over a team when `par` and not already in a parallel region, else body(1, 0).
// The body splits its work by (nt, id) itself: no `omp for` inside (on the inline path an
// orphaned one would bind to the enclosing region's team).
template <class Body>
inline void parallel_threads(bool par, Body&& body) {
  if (par && !omp_in_parallel()) {
#pragma omp parallel
    body(static_cast<int64_t>(omp_get_num_threads()), static_cast<int64_t>(omp_get_thread_num()));
  } else {
    body(int64_t(1), int64_t(0));
  }
}

// body(i) for i in [0, n): split statically over a team when `par` and not already in a
// parallel region, else a plain loop on the calling thread. The small per-token ops of decode
// (norms, RoPE, residual adds, routing, gather/combine) under `#pragma omp parallel for if(false)`
// still entered libgomp each call: ~0.2 µs each, ~15 a layer.
template <class Body>
inline void parallel_for(bool par, int64_t n, Body&& body) {
  if (par && !omp_in_parallel()) {
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; ++i) body(i);
  } else {
    for (int64_t i = 0; i < n; ++i) body(i);
  }
}

}  // namespace cpu
}  // namespace moe
