// cpu_mla.cpp — Multi-head Latent Attention's absorbed products on the CPU (ops.h mla_absorb_q,
// mla_absorb_out): kv_b_proj folded into the query (q_nope · W_k per head gives a query in the
// latent space) and into the output (the latent attention output · W_vᵀ per head), so decode
// reads only the cached latent. One (token, head) row per task; kv_b is f32.
#include <algorithm>

#include "ops/backend.h"

namespace moe {
namespace cpu {

// qc [T,H,Rc] columns [0,R): qc[t,h,c] = Σ_{i<Dn} q[t,h,i] · kv_b[h(Dn+Dv)+i, c].
void mla_absorb_q(Tensor& qc, const Tensor& q, const Tensor& kv_b, int64_t dn, int64_t dv) {
  const int64_t t_n = q.dim(0), h_n = q.dim(1), dq = q.dim(2), rc = qc.dim(2), r = kv_b.dim(1);
  const float* qp = q.data<float>();
  const float* w = kv_b.data<float>();
  float* out = qc.data<float>();
#pragma omp parallel for collapse(2) schedule(static) if(t_n * h_n * dn * r > 65536)
  for (int64_t t = 0; t < t_n; ++t)
    for (int64_t h = 0; h < h_n; ++h) {
      const float* qr = qp + (t * h_n + h) * dq;
      float* o = out + (t * h_n + h) * rc;
      std::fill(o, o + r, 0.0f);
      // Row-wise accumulation: W_k rows are contiguous, so the inner loop streams them.
      for (int64_t i = 0; i < dn; ++i) {
        const float a = qr[i];
        const float* wr = w + (h * (dn + dv) + i) * r;
        for (int64_t c = 0; c < r; ++c) o[c] += a * wr[c];
      }
    }
}

// o [T,H,Dv]: o[t,h,j] = Σ_{c<R} oc[t,h,c] · kv_b[h(Dn+Dv)+Dn+j, c].
void mla_absorb_out(Tensor& o, const Tensor& oc, const Tensor& kv_b, int64_t dn, int64_t dv) {
  const int64_t t_n = oc.dim(0), h_n = oc.dim(1), rc = oc.dim(2), r = kv_b.dim(1);
  const float* op = oc.data<float>();
  const float* w = kv_b.data<float>();
  float* out = o.data<float>();
#pragma omp parallel for collapse(2) schedule(static) if(t_n * h_n * dv * r > 65536)
  for (int64_t t = 0; t < t_n; ++t)
    for (int64_t h = 0; h < h_n; ++h) {
      const float* orow = op + (t * h_n + h) * rc;
      for (int64_t j = 0; j < dv; ++j) {
        const float* wr = w + (h * (dn + dv) + dn + j) * r;
        float acc = 0;
        for (int64_t c = 0; c < r; ++c) acc += orow[c] * wr[c];
        out[(t * h_n + h) * dv + j] = acc;
      }
    }
}

}  // namespace cpu
}  // namespace moe
