// elementwise.cu — the one-pass memory-bound ops on CUDA: embedding, kv_append, swiglu,
// sigmoid_gate_add, add_inplace, cast, permute_weights, gather_rows, moe_combine.
//
// Element types are read at run time (Elt): these kernels are bound by memory traffic and a
// uniform branch per element is free next to it, while one template instance per dtype
// combination would multiply compile time. Row copies (gather_rows) move 16-byte words when
// the row size and alignment allow.
#include "ops/backend.h"
#include "ops/cuda/kernel_util.cuh"

namespace moe {
namespace cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(int64_t n) {
  int64_t blocks = (n + kThreads - 1) / kThreads;
  int64_t cap = int64_t(sm_count() > 0 ? sm_count() : 80) * 16;
  if (blocks > cap) blocks = cap;
  if (blocks < 1) blocks = 1;
  return static_cast<unsigned>(blocks);
}

// out[t,d] = table[ids[t],d].  out [T,D], table [V,D].
__global__ void embedding_kernel(void* out, Elt to, const int32_t* ids, const void* table, Elt tt, int64_t n,
                                 int64_t d) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t t = i / d, c = i - t * d;
    store_rt(out, to, i, load_rt(table, tt, int64_t(ids[t]) * d + c));
  }
}

__global__ void swiglu_kernel(void* out, Elt to, const void* h1, Elt t1, const void* h3, Elt t3, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store_rt(out, to, i, silu(load_rt(h1, t1, i)) * load_rt(h3, t3, i));
}

// y[t,:] += sigmoid(gate[t]) * s[t,:].  y, s [T,D], gate [T].
__global__ void sigmoid_gate_add_kernel(void* y, Elt ty, const void* s, Elt ts, const void* gate, Elt tg, int64_t n,
                                        int64_t d) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float g = load_rt(gate, tg, i / d);
    g = 1.f / (1.f + expf(-g));
    store_rt(y, ty, i, load_rt(y, ty, i) + g * load_rt(s, ts, i));
  }
}

__global__ void add_kernel(void* y, Elt ty, const void* x, Elt tx, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store_rt(y, ty, i, load_rt(y, ty, i) + load_rt(x, tx, i));
}

__global__ void cast_kernel(void* out, Elt to, const void* in, Elt ti, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store_rt(out, to, i, load_rt(in, ti, i));
}

// row_scale[p] = topk_w.flat[perm[p]].
__global__ void permute_weights_kernel(void* rs, Elt tr, const void* w, Elt tw, const int32_t* perm, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store_rt(rs, tr, i, load_rt(w, tw, perm[i]));
}

// xp[p,:] = x[perm[p]/K,:], moving `U` words; `row` is the row length in U words.
template <class U>
__global__ void gather_rows_kernel(U* xp, const U* x, const int32_t* perm, int64_t k, int64_t row) {
  int64_t p = blockIdx.x;
  const U* src = x + int64_t(perm[p] / k) * row;
  U* dst = xp + p * row;
  for (int64_t i = threadIdx.x; i < row; i += blockDim.x) dst[i] = src[i];
}

// y[t,:] (+)= sum_j yp[inv[t*K+j],:].  One block-stride pass over T*D.
__global__ void moe_combine_kernel(void* y, Elt ty, const void* yp, Elt tp, const int32_t* inv, int64_t k, int64_t n,
                                   int64_t d, bool accumulate) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    int64_t t = i / d, c = i - t * d;
    float acc = accumulate ? load_rt(y, ty, i) : 0.f;
    for (int64_t j = 0; j < k; ++j) acc += load_rt(yp, tp, int64_t(inv[t * k + j]) * d + c);
    store_rt(y, ty, i, acc);
  }
}

}  // namespace

void embedding_forward(Tensor& out, const Tensor& ids, const Tensor& table) {
  int64_t n = out.numel(), d = table.dim(1);
  if (n == 0) return;
  embedding_kernel<<<grid_for(n), kThreads, 0, stream()>>>(out.raw(), elt_of(out.dtype()), ids.data<int32_t>(),
                                                           table.raw(), elt_of(table.dtype()), n, d);
  MOE_CUDA_LAUNCH_CHECK();
}

void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, int64_t past) {
  // Per batch row b the S new positions are one contiguous run in both k and the cache.
  int64_t b = k.dim(0), s = k.dim(1), c = k_cache.dim(1);
  size_t es = dtype_size(k.dtype());
  size_t width = size_t(s * k.dim(2) * k.dim(3)) * es;
  size_t dpitch = size_t(c * k.dim(2) * k.dim(3)) * es;
  size_t off = size_t(past * k.dim(2) * k.dim(3)) * es;
  if (width == 0 || b == 0) return;
  MOE_CUDA_CHECK(cudaMemcpy2DAsync(static_cast<char*>(k_cache.raw()) + off, dpitch, k.raw(), width, width, b,
                                   cudaMemcpyDeviceToDevice, stream()));
  MOE_CUDA_CHECK(cudaMemcpy2DAsync(static_cast<char*>(v_cache.raw()) + off, dpitch, v.raw(), width, width, b,
                                   cudaMemcpyDeviceToDevice, stream()));
}

void swiglu_forward(Tensor& out, const Tensor& h1, const Tensor& h3) {
  int64_t n = out.numel();
  if (n == 0) return;
  swiglu_kernel<<<grid_for(n), kThreads, 0, stream()>>>(out.raw(), elt_of(out.dtype()), h1.raw(), elt_of(h1.dtype()),
                                                        h3.raw(), elt_of(h3.dtype()), n);
  MOE_CUDA_LAUNCH_CHECK();
}

void sigmoid_gate_add(Tensor& y, const Tensor& s, const Tensor& gate) {
  int64_t n = y.numel();
  if (n == 0) return;
  int64_t d = n / y.dim(0);
  sigmoid_gate_add_kernel<<<grid_for(n), kThreads, 0, stream()>>>(
      y.raw(), elt_of(y.dtype()), s.raw(), elt_of(s.dtype()), gate.raw(), elt_of(gate.dtype()), n, d);
  MOE_CUDA_LAUNCH_CHECK();
}

void add_inplace(Tensor& y, const Tensor& x) {
  int64_t n = y.numel();
  if (n == 0) return;
  add_kernel<<<grid_for(n), kThreads, 0, stream()>>>(y.raw(), elt_of(y.dtype()), x.raw(), elt_of(x.dtype()), n);
  MOE_CUDA_LAUNCH_CHECK();
}

void copy_columns(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col, int64_t ncols) {
  const int64_t rows = dst.dim(0);
  if (rows == 0 || ncols == 0) return;
  const size_t es = dtype_size(dst.dtype());
  MOE_CUDA_CHECK(cudaMemcpy2DAsync(static_cast<char*>(dst.raw()) + dst_col * es, dst.dim(1) * es,
                                   static_cast<const char*>(src.raw()) + src_col * es, src.dim(1) * es, ncols * es,
                                   rows, cudaMemcpyDeviceToDevice, stream()));
}

void cast(Tensor& out, const Tensor& in) {
  int64_t n = out.numel();
  if (n == 0) return;
  if (out.dtype() == in.dtype()) {
    if (out.raw() != in.raw())
      MOE_CUDA_CHECK(cudaMemcpyAsync(out.raw(), in.raw(), out.nbytes(), cudaMemcpyDeviceToDevice, stream()));
    return;
  }
  cast_kernel<<<grid_for(n), kThreads, 0, stream()>>>(out.raw(), elt_of(out.dtype()), in.raw(), elt_of(in.dtype()),
                                                      n);
  MOE_CUDA_LAUNCH_CHECK();
}

void permute_weights(Tensor& row_scale, const Tensor& topk_w, const Tensor& perm) {
  int64_t n = row_scale.numel();
  if (n == 0) return;
  permute_weights_kernel<<<grid_for(n), kThreads, 0, stream()>>>(row_scale.raw(), elt_of(row_scale.dtype()),
                                                                 topk_w.raw(), elt_of(topk_w.dtype()),
                                                                 perm.data<int32_t>(), n);
  MOE_CUDA_LAUNCH_CHECK();
}

void gather_rows(Tensor& xp, const Tensor& x, const Tensor& perm, int64_t k) {
  int64_t p = xp.dim(0);
  if (p == 0 || x.dim(1) == 0) return;
  size_t row_bytes = size_t(x.dim(1)) * dtype_size(x.dtype());
  uintptr_t align = reinterpret_cast<uintptr_t>(xp.raw()) | reinterpret_cast<uintptr_t>(x.raw()) | row_bytes;
  MOE_CHECK(p <= 0x7fffffff, "gather_rows: %lld rows exceed the CUDA grid", (long long)p);
  unsigned grid = static_cast<unsigned>(p);
  if (align % 16 == 0) {
    gather_rows_kernel<uint4><<<grid, 128, 0, stream()>>>(xp.data<uint4>(), x.data<uint4>(), perm.data<int32_t>(), k,
                                                          int64_t(row_bytes / 16));
  } else if (align % 4 == 0) {
    gather_rows_kernel<uint32_t><<<grid, 128, 0, stream()>>>(xp.data<uint32_t>(), x.data<uint32_t>(),
                                                             perm.data<int32_t>(), k, int64_t(row_bytes / 4));
  } else {
    gather_rows_kernel<uint16_t><<<grid, 128, 0, stream()>>>(xp.data<uint16_t>(), x.data<uint16_t>(),
                                                             perm.data<int32_t>(), k, int64_t(row_bytes / 2));
  }
  MOE_CUDA_LAUNCH_CHECK();
}

void moe_combine(Tensor& y, const Tensor& yp, const Tensor& inv, int64_t k, bool accumulate) {
  int64_t n = y.numel();
  if (n == 0) return;
  moe_combine_kernel<<<grid_for(n), kThreads, 0, stream()>>>(y.raw(), elt_of(y.dtype()), yp.raw(),
                                                             elt_of(yp.dtype()), inv.data<int32_t>(), k, n, y.dim(1),
                                                             accumulate);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace moe
