// norm_rope.cu — rmsnorm (one block per row, warp reductions) and rotary embedding on CUDA.
//
// RoPE angles are computed in f64 (pos * theta^(-2i/Dh), then sin/cos) so positions in the
// tens of thousands keep f32-level accuracy and match the CPU reference closely.
#include "ops/backend.h"
#include "ops/cuda/kernel_util.cuh"

namespace moe {
namespace cuda {
namespace {

constexpr int kNormThreads = 256;

// out[n,:] = x[n,:] * rsqrt(mean(x^2) + eps) * w.  One block per row; out may alias x (each
// element is read and then written by the same thread).
template <class TX, class TO>
__global__ void rmsnorm_kernel(TO* out, const TX* x, const void* w, Elt tw, int64_t d, float eps) {
  const TX* xr = x + blockIdx.x * d;
  TO* orow = out + blockIdx.x * d;
  float ss = 0.f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float v = to_f32(xr[i]);
    ss += v * v;
  }
  __shared__ float red[32];
  ss = warp_sum(ss);
  int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) red[warp] = ss;
  __syncthreads();
  if (warp == 0) {
    float v = lane < int(blockDim.x / 32) ? red[lane] : 0.f;
    v = warp_sum(v);
    if (lane == 0) red[0] = v;
  }
  __syncthreads();
  float r = rsqrtf(red[0] / float(d) + eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x)
    orow[i] = from_f32<TO>(to_f32(xr[i]) * r * load_rt(w, tw, i));
}

// x [rows = B*S*H, Dh] in place; row -> position past + s with s = (row / H) % S.
template <class T>
__global__ void rope_kernel(T* x, int64_t rows, int64_t s_len, int64_t h, int64_t dh, int64_t past, double theta) {
  int64_t half = dh / 2;
  int64_t n = rows * half;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t row = i / half, j = i - row * half;
    int64_t pos = past + (row / h) % s_len;
    double ang = double(pos) * pow(theta, -2.0 * double(j) / double(dh));
    double sn, cs;
    sincos(ang, &sn, &cs);
    T* xr = x + row * dh;
    float a = to_f32(xr[j]), b = to_f32(xr[j + half]);
    float c = float(cs), s = float(sn);
    xr[j] = from_f32<T>(a * c - b * s);
    xr[j + half] = from_f32<T>(b * c + a * s);
  }
}

}  // namespace

void rmsnorm_forward(Tensor& out, const Tensor& x, const Tensor& w, float eps) {
  int64_t d = x.dim(-1);
  int64_t rows = d ? x.numel() / d : 0;
  if (rows == 0) return;
  MOE_CHECK(rows <= 0x7fffffff, "rmsnorm_forward: too many rows for the CUDA grid");
  Elt tw = elt_of(w.dtype());
  MOE_CUDA_FLOAT_SWITCH2(x.dtype(), TX, out.dtype(), TO, {
    rmsnorm_kernel<TX, TO><<<unsigned(rows), kNormThreads, 0, stream()>>>(out.data<TO>(), x.data<TX>(), w.raw(), tw,
                                                                          d, eps);
  });
  MOE_CUDA_LAUNCH_CHECK();
}

void rope_forward(Tensor& x, int64_t past, float theta) {
  int64_t s = x.dim(1), h = x.dim(2), dh = x.dim(3);
  int64_t rows = x.dim(0) * s * h;
  int64_t n = rows * (dh / 2);
  if (n == 0) return;
  int64_t blocks = std::min<int64_t>((n + 255) / 256, int64_t(sm_count() > 0 ? sm_count() : 80) * 16);
  MOE_CUDA_FLOAT_SWITCH(x.dtype(), T, {
    rope_kernel<T><<<unsigned(blocks), 256, 0, stream()>>>(x.data<T>(), rows, s, h, dh, past, double(theta));
  });
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace moe
