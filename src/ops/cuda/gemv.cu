// gemv.cu — the decode-sized linear: out [N,M] = x [N,Kd] w [M,Kd]^T + bias for N <= 8.
// One warp per output column; 8 warps per block. See linear_gemv.cuh.
#include "ops/cuda/linear_gemv.cuh"

namespace moe {
namespace cuda {
namespace {

constexpr int kGemvWarps = 8;

template <class TW, class TX, int R>
__global__ void __launch_bounds__(kGemvWarps * 32) gemv_kernel(void* out, Elt to, const TX* x, const TW* w,
                                                               const void* bias, Elt tb, int nrows, int64_t m,
                                                               int64_t kd, bool vec) {
  int64_t col = int64_t(blockIdx.x) * kGemvWarps + threadIdx.x / 32;
  if (col >= m) return;
  const TW* const wr[1] = {w + col * kd};
  float acc[1][R];
  warp_dot_rows<TW, TX, R, 1>(acc, wr, x, kd, nrows, kd, vec);
  int lane = threadIdx.x % 32;
  float b = bias ? load_rt(bias, tb, col) : 0.f;
#pragma unroll
  for (int r = 0; r < R; ++r)
    if (r < nrows && lane == r) store_rt(out, to, r * m + col, acc[0][r] + b);
}

template <class TW, class TX>
void launch(void* out, DType to, const void* x, const void* w, const void* bias, DType tb, int64_t rows, int64_t m,
            int64_t kd) {
  bool vec = gemv_vec_ok(w, size_t(kd) * sizeof(TW), x, size_t(kd) * sizeof(TX));
  unsigned grid = ceil_div(m, kGemvWarps);
  Elt eo = elt_of(to), eb = bias ? elt_of(tb) : Elt::F32;
  const TX* xp = static_cast<const TX*>(x);
  const TW* wp = static_cast<const TW*>(w);
  int n = int(rows);
  if (rows == 1)
    gemv_kernel<TW, TX, 1><<<grid, kGemvWarps * 32, 0, stream()>>>(out, eo, xp, wp, bias, eb, n, m, kd, vec);
  else if (rows == 2)
    gemv_kernel<TW, TX, 2><<<grid, kGemvWarps * 32, 0, stream()>>>(out, eo, xp, wp, bias, eb, n, m, kd, vec);
  else if (rows <= 4)
    gemv_kernel<TW, TX, 4><<<grid, kGemvWarps * 32, 0, stream()>>>(out, eo, xp, wp, bias, eb, n, m, kd, vec);
  else
    gemv_kernel<TW, TX, 8><<<grid, kGemvWarps * 32, 0, stream()>>>(out, eo, xp, wp, bias, eb, n, m, kd, vec);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace

void gemv_forward(void* out, DType to, const void* x, DType tx, const void* w, DType tw, const void* bias, DType tb,
                  int64_t rows, int64_t m, int64_t kd) {
  MOE_ASSERT(rows >= 1 && rows <= kGemvMaxRows);
  MOE_CUDA_FLOAT_SWITCH2(tw, TW, tx, TX, launch<TW, TX>(out, to, x, w, bias, tb, rows, m, kd));
}

}  // namespace cuda
}  // namespace moe
