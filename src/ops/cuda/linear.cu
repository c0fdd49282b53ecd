// linear.cu — out = x w^T (+ bias) on CUDA.
//
// Decode-sized inputs (N <= kGemvMaxRows rows) go to a bandwidth-bound GEMV: one warp per
// output column m reads w[m,:] once with 16-byte loads and dots it with all N rows of x
// (which stay in L1/L2), bias fused. Larger N goes to cuBLAS (cublasGemmEx) with
// CUBLAS_COMPUTE_32F in the default math mode: f32 stays true f32 (no TF32), bf16/f16 use
// the tensor cores with f32 accumulation. cuBLAS needs x and w of one dtype: when they differ,
// x is converted to w's dtype first (bf16 activations are what the tensor cores take anyway).
#include <algorithm>

#include "ops/backend.h"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/linear_gemv.cuh"

namespace moe {
namespace cuda {
namespace {

__global__ void bias_add_kernel(void* out, Elt to, const void* bias, Elt tb, int64_t n, int64_t m) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store_rt(out, to, i, load_rt(out, to, i) + load_rt(bias, tb, i % m));
}

__global__ void convert_kernel(void* out, Elt to, const void* in, Elt ti, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store_rt(out, to, i, load_rt(in, ti, i));
}

unsigned grid_for(int64_t n) {
  int64_t cap = int64_t(sm_count() > 0 ? sm_count() : 80) * 16;
  return unsigned(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, cap)));
}

size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

}  // namespace

// out [rows, m] = x [rows, kd] * w[m, kd]^T, column-major view: out^T = w * x^T.
void gemm_nt(void* out, DType to, const void* x, const void* w, DType tw, int64_t rows, int64_t m, int64_t kd,
             int64_t ldx, int64_t ldw, int64_t ldo, float beta) {
  float alpha = 1.f;
  MOE_CUBLAS_CHECK(cublas_api().gemm_ex(cublas(), CUBLAS_OP_T, CUBLAS_OP_N, int(m), int(rows), int(kd), &alpha,
                                            w, cuda_dtype(tw), int(ldw), x, cuda_dtype(tw), int(ldx), &beta, out,
                                            cuda_dtype(to), int(ldo), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

void linear_forward(Tensor& out, const Tensor& x, const Tensor& w, const Tensor& bias) {
  int64_t kd = w.dim(1), m = w.dim(0);
  int64_t rows = kd ? x.numel() / kd : 0;
  if (rows == 0 || m == 0) return;
  if (kd == 0) {
    MOE_CUDA_CHECK(cudaMemsetAsync(out.raw(), 0, out.nbytes(), stream()));
    if (bias.defined()) {
      bias_add_kernel<<<grid_for(out.numel()), 256, 0, stream()>>>(out.raw(), elt_of(out.dtype()), bias.raw(),
                                                                   elt_of(bias.dtype()), out.numel(), m);
      MOE_CUDA_LAUNCH_CHECK();
    }
    return;
  }
  if (rows <= kGemvMaxRows) {
    gemv_forward(out.raw(), out.dtype(), x.raw(), x.dtype(), w.raw(), w.dtype(),
                 bias.defined() ? bias.raw() : nullptr, bias.defined() ? bias.dtype() : DType::F32, rows, m, kd);
    return;
  }
  MOE_CHECK(rows <= 0x7fffffff && m <= 0x7fffffff && kd <= 0x7fffffff, "linear_forward: %s too large for cuBLAS",
            out.shape_str().c_str());
  // Workspace: [x converted to w's dtype][f32 result when out's dtype is not a cuBLAS C type].
  DType tw = w.dtype();
  bool conv_x = x.dtype() != tw;
  bool c_ok = out.dtype() == tw || (tw != DType::F32 && out.dtype() == DType::F32);
  size_t x_bytes = conv_x ? align_up(size_t(rows * kd) * dtype_size(tw)) : 0;
  size_t c_bytes = c_ok ? 0 : align_up(size_t(rows * m) * sizeof(float));
  char* ws = (x_bytes + c_bytes) ? static_cast<char*>(workspace(x_bytes + c_bytes)) : nullptr;
  const void* xin = x.raw();
  if (conv_x) {
    convert_kernel<<<grid_for(rows * kd), 256, 0, stream()>>>(ws, elt_of(tw), x.raw(), elt_of(x.dtype()), rows * kd);
    MOE_CUDA_LAUNCH_CHECK();
    xin = ws;
  }
  void* cout = c_ok ? out.raw() : ws + x_bytes;
  DType tc = c_ok ? out.dtype() : DType::F32;
  gemm_nt(cout, tc, xin, w.raw(), tw, rows, m, kd, kd, kd, m, 0.f);
  if (!c_ok) {
    convert_kernel<<<grid_for(rows * m), 256, 0, stream()>>>(out.raw(), elt_of(out.dtype()), cout, Elt::F32, rows * m);
    MOE_CUDA_LAUNCH_CHECK();
  }
  if (bias.defined()) {
    bias_add_kernel<<<grid_for(out.numel()), 256, 0, stream()>>>(out.raw(), elt_of(out.dtype()), bias.raw(),
                                                                 elt_of(bias.dtype()), out.numel(), m);
    MOE_CUDA_LAUNCH_CHECK();
  }
}

// Quantized parts (the reason for the op) never reach CUDA (ops.cpp refuses them): float parts
// one product each, through a part-sized buffer into its columns.
void linear_forward_cat(Tensor& out, const Tensor& x, std::initializer_list<LinearPart> parts) {
  const int64_t n = x.numel() / x.dim(-1);
  int64_t col = 0;
  for (const LinearPart& p : parts) {
    const int64_t m = p.w->dim(0);
    Tensor part = Tensor::empty({n, m}, out.dtype(), MemCategory::Activations, out.device());
    linear_forward(part, x, *p.w, p.bias ? *p.bias : Tensor());
    copy_columns(out, col, part, 0, m);
    col += m;
  }
}

}  // namespace cuda
}  // namespace moe
