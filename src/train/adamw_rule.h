// adamw_rule.h — one parameter's AdamW update as the element loops see it (optimizer.cpp):
// where its tensors are and the rule's constants, and the AVX-512 copy of those loops
// (adamw_avx512.cpp), which optimizer.cpp calls where the CPU has AVX-512.
#pragma once
#include <cstdint>

namespace moe {
namespace adamw {

// One parameter's update at its step: where its tensors are and the rule's constants.
// w and hi both nullptr: a skipped expert, whose gradient only enters the sum of squares. A
// split master weight (model_train.h) has hi and lo instead of w.
struct ParamUpdate {
  float* w = nullptr;
  uint16_t* hi = nullptr;
  uint16_t* lo = nullptr;
  const float* g = nullptr;
  void* m = nullptr;
  void* v = nullptr;
  int64_t n = 0;
  double step_size = 0, decay = 1, bc2 = 1;
};

struct Betas {
  double b1, b2, eps;
};

// adamw_lanes.h's update_range over elements [j0, j1) of u: eight f32 lanes at a time where
// the build has AVX2 and FMA, else the scalar loop. Moments bf16 when bf16_moments, else f32.
// Returns the gradient's sum of squares there.
double update_range_avx2(const Betas& bt, const ParamUpdate& u, int64_t j0, int64_t j1, bool bf16_moments);

// Whether this CPU runs update_range_avx512 (AVX-512 F/BW/DQ/VL).
bool avx512_available();

// The same, sixteen f32 lanes at a time first (the same operations, in the same order per
// element, as update_range_avx2: the same bits, fewer instructions).
double update_range_avx512(const Betas& bt, const ParamUpdate& u, int64_t j0, int64_t j1, bool bf16_moments);

}  // namespace adamw
}  // namespace moe
