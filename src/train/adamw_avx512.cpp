// adamw_avx512.cpp — adamw_lanes.h's AdamW loops compiled for AVX-512 (F/BW/DQ/VL): sixteen f32
// lanes at a time. Every function here gets that target (pragma below), so only this file uses
// those instructions; optimizer.cpp calls it only when the CPU has them.
#if !defined(__clang__)
// GCC 12's AVX-512 intrinsics build vectors from deliberately undefined registers, which
// -Wuninitialized reports once inlined (as in cpu_quant_avx512.cpp).
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>

#include <bit>
#include <cmath>
#include <cstdint>

#include "core/cpu_features.h"
#include "core/dtype.h"
#include "core/error.h"
#include "model/model_train.h"
#include "train/adamw_rule.h"

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl")
#endif

#include "core/bf16_avx512.h"  // NOLINT(build/include_order): under this file's AVX-512 target
#define MOE_ADAMW_NS lanes16
#define MOE_ADAMW_512 1
#include "train/adamw_lanes.h"  // NOLINT(build/include): this file's copy of the loops

namespace moe {
namespace adamw {
double update_range_avx512(const Betas& bt, const ParamUpdate& u, int64_t j0, int64_t j1, bool bf16_moments) {
  return bf16_moments ? lanes16::update_range<uint16_t>(bt, u, j0, j1) : lanes16::update_range<float>(bt, u, j0, j1);
}
}  // namespace adamw
}  // namespace moe

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif

namespace moe {
namespace adamw {
bool avx512_available() { return cpu_has_avx512(); }
}  // namespace adamw
}  // namespace moe

#else  // no AVX2 base build, or not x86-64: the four-lane (or scalar) loops only

namespace moe {
namespace adamw {
bool avx512_available() { return false; }
double update_range_avx512(const Betas&, const ParamUpdate&, int64_t, int64_t, bool) {
  MOE_FAIL("AdamW: this build has no AVX-512 copy of the update (avx512_available() is false)");
}
}  // namespace adamw
}  // namespace moe

#endif
