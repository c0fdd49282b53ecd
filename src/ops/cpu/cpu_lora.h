// cpu_lora.h — the CPU products of a LoRA adapter over a block of rows (BLAS sgemm with the
// small rank r as one dimension), shared by lora_forward/lora_backward (cpu_lora.cpp) and the
// grouped experts (cpu_train_moe.cpp), which call them per expert over the same offsets as
// the base GEMMs. Leading dimensions let the rows be columns of a wider (stacked) matrix.
#pragma once
#include <cstdint>

namespace moe {
namespace cpu {

// Dropout of one call (core/lora.h): input element (row0 + t, k) kept by lora_keep(seed, ·, p).
struct LoraDrop {
  float p = 0;
  uint64_t seed = 0;
  int64_t row0 = 0;
};

// out[n, :m] (rows of ldo) += scale · (xd aᵀ) bᵀ with xd = x (or x after dropout).  x [n,kd]
// (rows of ldx), a [r,kd], b [m,r]; u: n·r floats of scratch.
void lora_rows_forward(float* out, int64_t ldo, const float* x, int64_t ldx, const float* a, const float* b,
                       float scale, int64_t n, int64_t m, int64_t kd, int64_t r, float* u, const LoraDrop& drop = {});

// With v = dy b (dy [n, :m], rows of ldy) and u = xd aᵀ (recomputed):
//   dx += scale · (v a) ⊙ mask/(1−p) (rows of lddx);  da += scale · vᵀ xd;  db += scale · dyᵀ u.
// dx, da, db nullable. u, v: n·r floats of scratch each.
void lora_rows_backward(float* dx, int64_t lddx, float* da, float* db, const float* dy, int64_t ldy, const float* x,
                        int64_t ldx, const float* a, const float* b, float scale, int64_t n, int64_t m, int64_t kd,
                        int64_t r, float* u, float* v, const LoraDrop& drop = {});

}  // namespace cpu
}  // namespace moe
