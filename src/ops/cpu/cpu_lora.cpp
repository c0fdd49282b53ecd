// cpu_lora.cpp — CPU kernels of the LoRA ops (ops.h): the adapter's two thin products per
// direction, through BLAS. The rank is small (4–64), so each product is a skinny GEMM; the
// dense ΔW = b·a is never formed.
#include "ops/cpu/cpu_lora.h"

#include <cblas.h>

#include <algorithm>

#include "ops/backend.h"

namespace moe {
namespace cpu {

namespace {

// m / (1 − p) of input element (t, c): the dropout mask, rescaled.
inline float drop_mult(const LoraDrop& drop, int64_t t, int64_t c, int64_t kd) {
  return lora_keep(drop.seed, uint64_t((drop.row0 + t) * kd + c), drop.p) ? 1.0f / (1.0f - drop.p) : 0.0f;
}

// x after dropout, [n,kd] contiguous, in `keep` (a workspace tensor): x ⊙ m / (1 − p).
const float* apply_dropout(const float* x, int64_t ldx, int64_t n, int64_t kd, const LoraDrop& drop, Tensor& keep) {
  keep = Tensor::empty({std::max<int64_t>(n, 1), kd}, DType::F32, MemCategory::Workspace);
  float* xd = keep.data<float>();
#pragma omp parallel for schedule(static) if(n * kd > 65536)
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c = 0; c < kd; ++c) xd[t * kd + c] = x[t * ldx + c] * drop_mult(drop, t, c, kd);
  return xd;
}

}  // namespace

void lora_rows_forward(float* out, int64_t ldo, const float* x, int64_t ldx, const float* a, const float* b,
                       float scale, int64_t n, int64_t m, int64_t kd, int64_t r, float* u, const LoraDrop& drop) {
  if (n == 0) return;
  Tensor keep;
  if (drop.p > 0) {
    x = apply_dropout(x, ldx, n, kd, drop, keep);
    ldx = kd;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)r, (int)kd, 1.0f, x, (int)ldx, a, (int)kd, 0.0f,
              u, (int)r);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)m, (int)r, scale, u, (int)r, b, (int)r, 1.0f, out,
              (int)ldo);
}

void lora_rows_backward(float* dx, int64_t lddx, float* da, float* db, const float* dy, int64_t ldy, const float* x,
                        int64_t ldx, const float* a, const float* b, float scale, int64_t n, int64_t m, int64_t kd,
                        int64_t r, float* u, float* v, const LoraDrop& drop) {
  if (n == 0) return;
  Tensor keep;
  if (drop.p > 0) {
    x = apply_dropout(x, ldx, n, kd, drop, keep);
    ldx = kd;
  }
  if (dx || da) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)r, (int)m, 1.0f, dy, (int)ldy, b, (int)r,
                0.0f, v, (int)r);
    if (dx && drop.p == 0) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)kd, (int)r, scale, v, (int)r, a, (int)kd,
                  1.0f, dx, (int)lddx);
    } else if (dx) {
      // The gradient through dropout: (v a) masked and rescaled like the input was.
      Tensor g = Tensor::empty({n, kd}, DType::F32, MemCategory::Workspace);
      float* gp = g.data<float>();
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)n, (int)kd, (int)r, scale, v, (int)r, a, (int)kd,
                  0.0f, gp, (int)kd);
      for (int64_t t = 0; t < n; ++t)
        for (int64_t c = 0; c < kd; ++c) dx[t * lddx + c] += gp[t * kd + c] * drop_mult(drop, t, c, kd);
    }
    if (da)
      cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)r, (int)kd, (int)n, scale, v, (int)r, x, (int)ldx,
                  1.0f, da, (int)kd);
  }
  if (db) {
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)n, (int)r, (int)kd, 1.0f, x, (int)ldx, a, (int)kd, 0.0f,
                u, (int)r);
    cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)m, (int)r, (int)n, scale, dy, (int)ldy, u, (int)r, 1.0f,
                db, (int)r);
  }
}

void lora_forward(Tensor& out, int64_t col0, const Tensor& x, const Lora& l) {
  const int64_t n = x.dim(0), kd = x.dim(1), m = l.b.dim(0), r = l.a.dim(0);
  Tensor u = Tensor::empty({std::max<int64_t>(n, 1), r}, DType::F32, MemCategory::Workspace);
  lora_rows_forward(out.data<float>() + col0, out.dim(1), x.data<float>(), kd, l.a.data<float>(), l.b.data<float>(),
                    l.scale, n, m, kd, r, u.data<float>(), {l.dropout, l.seed, 0});
}

void lora_backward(Tensor& dx, Tensor& da, Tensor& db, const Tensor& dy, int64_t col0, const Tensor& x,
                   const Lora& l) {
  const int64_t n = x.dim(0), kd = x.dim(1), m = l.b.dim(0), r = l.a.dim(0);
  Tensor u = Tensor::empty({std::max<int64_t>(n, 1), r}, DType::F32, MemCategory::Workspace);
  Tensor v = Tensor::empty({std::max<int64_t>(n, 1), r}, DType::F32, MemCategory::Workspace);
  lora_rows_backward(dx.defined() ? dx.data<float>() : nullptr, kd, da.defined() ? da.data<float>() : nullptr,
                     db.defined() ? db.data<float>() : nullptr, dy.data<float>() + col0, dy.dim(1), x.data<float>(), kd,
                     l.a.data<float>(), l.b.data<float>(), l.scale, n, m, kd, r, u.data<float>(), v.data<float>(),
                     {l.dropout, l.seed, 0});
}

}  // namespace cpu
}  // namespace moe
