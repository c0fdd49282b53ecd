// expert_ffn.cu — the grouped SwiGLU expert FFN on CUDA (ops.h expert_ffn_forward):
//   yp[p] = ((silu(xp[p] w1[e]^T) * (xp[p] w3[e]^T)) * row_scale[p]) w2[e]^T,  p in expert e's rows.
//
// Three paths, chosen per call:
// - GEMV (P <= MOE_CUDA_EXPERT_GEMV_MAX_P, default 32: decode and small batches). Two kernels,
//   grid (columns, expert groups): each block finds the g-th non-empty expert from the device
//   offsets, one warp per output column reads that expert's weight rows once (w1 and w3 rows
//   together) and dots them with the expert's rows of xp. Only used experts' weights are read:
//   this is what bounds decode tokens/s, and it runs at memory bandwidth. No host sync.
// - own (MOE_CUDA_EXPERT_GEMM=own, bf16/f16 weights): the tensor-core grouped GEMM of
//   grouped_gemm.cuh, two launches (gated w1/w3 with SwiGLU and row_scale fused into the
//   epilogue, then w2), scheduled from the device offsets: no host sync. Measured on an H100
//   at ~260 TFLOP/s against cuBLAS's ~650 (mma.sync, not yet wgmma/TMA), hence not the default.
// - cublas (the default, MOE_CUDA_EXPERT_GEMM=cublas, and always for f32 weights): reads the
//   E+1 offsets to pinned host
//   memory (one small sync), then per non-empty expert cuBLAS GEMMs H1 = Xe w1e^T, H3 = Xe w3e^T
//   into the workspace, one fused SwiGLU*row_scale pass, and per expert Yp_e = A_e w2e^T.
// Workspace ([P,F]-sized intermediates) comes from cuda::workspace().
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "ops/backend.h"
#include "ops/cuda/grouped_gemm.cuh"
#include "ops/cuda/linear_gemv.cuh"

namespace moe {
namespace cuda {
namespace {

constexpr int kEgWarps = 8;

size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

unsigned grid_for(int64_t n) {
  int64_t cap = int64_t(sm_count() > 0 ? sm_count() : 80) * 16;
  return unsigned(std::max<int64_t>(1, std::min<int64_t>((n + 255) / 256, cap)));
}

__global__ void convert_kernel(void* out, Elt to, const void* in, Elt ti, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    store_rt(out, to, i, load_rt(in, ti, i));
}

// The g-th expert with rows (g = blockIdx.y): sets e, r0, r1; false when there are fewer.
__device__ __forceinline__ bool find_group(const int32_t* offsets, int e_len, int g, int& e_out, int& r0, int& r1) {
  __shared__ int sh[3];
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int cum = 0, found = -1, f0 = 0, f1 = 0;
    for (int base = 0; base < e_len && found < 0; base += 32) {
      int e = base + lane;
      int o0 = 0, o1 = 0;
      if (e < e_len) {
        o0 = offsets[e];
        o1 = offsets[e + 1];
      }
      unsigned nonempty = __ballot_sync(0xffffffffu, o1 > o0);
      int rank = cum + __popc(nonempty & ((1u << lane) - 1u));
      unsigned hit = __ballot_sync(0xffffffffu, o1 > o0 && rank == g);
      if (hit) {
        int src = __ffs(hit) - 1;
        found = base + src;
        f0 = __shfl_sync(0xffffffffu, o0, src);
        f1 = __shfl_sync(0xffffffffu, o1, src);
      }
      cum += __popc(nonempty);
    }
    if (lane == 0) {
      sh[0] = found;
      sh[1] = f0;
      sh[2] = f1;
    }
  }
  __syncthreads();
  e_out = sh[0];
  r0 = sh[1];
  r1 = sh[2];
  return e_out >= 0;
}

// a[p, f] = silu(xp[p] w1[e,f]^T) * (xp[p] w3[e,f]^T) * row_scale[p], f32.  grid (F/8, groups).
template <class TW, class TX, int R>
__global__ void __launch_bounds__(kEgWarps * 32)
    expert_gemv_up_kernel(float* a, const TX* xp, const TW* w1, const TW* w3, const int32_t* offsets, int e_len,
                          const float* row_scale, int64_t f_len, int64_t d_len, bool vec) {
  int e, r0, r1;
  if (!find_group(offsets, e_len, blockIdx.y, e, r0, r1)) return;
  int64_t f = int64_t(blockIdx.x) * kEgWarps + threadIdx.x / 32;
  if (f >= f_len) return;
  const int lane = threadIdx.x % 32;
  const TW* const wr[2] = {w1 + (int64_t(e) * f_len + f) * d_len, w3 + (int64_t(e) * f_len + f) * d_len};
  for (int rb = r0; rb < r1; rb += R) {
    int n = min(R, r1 - rb);
    float acc[2][R];
    warp_dot_rows<TW, TX, R, 2>(acc, wr, xp + int64_t(rb) * d_len, d_len, n, d_len, vec);
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (r < n && lane == r) {
        float rs = row_scale ? row_scale[rb + r] : 1.f;
        a[int64_t(rb + r) * f_len + f] = silu(acc[0][r]) * acc[1][r] * rs;
      }
  }
}

// yp[p, d] = a[p] w2[e,d]^T.  grid (D/8, groups).
template <class TW, int R>
__global__ void __launch_bounds__(kEgWarps * 32)
    expert_gemv_down_kernel(void* yp, Elt ty, const float* a, const TW* w2, const int32_t* offsets, int e_len,
                            int64_t f_len, int64_t d_len, bool vec) {
  int e, r0, r1;
  if (!find_group(offsets, e_len, blockIdx.y, e, r0, r1)) return;
  int64_t d = int64_t(blockIdx.x) * kEgWarps + threadIdx.x / 32;
  if (d >= d_len) return;
  const int lane = threadIdx.x % 32;
  const TW* const wr[1] = {w2 + (int64_t(e) * d_len + d) * f_len};
  for (int rb = r0; rb < r1; rb += R) {
    int n = min(R, r1 - rb);
    float acc[1][R];
    warp_dot_rows<TW, float, R, 1>(acc, wr, a + int64_t(rb) * f_len, f_len, n, f_len, vec);
#pragma unroll
    for (int r = 0; r < R; ++r)
      if (r < n && lane == r) store_rt(yp, ty, int64_t(rb + r) * d_len + d, acc[0][r]);
  }
}

template <class TW, class TX, int R>
void launch_gemv_path(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1, const Tensor& w3,
                      const Tensor& w2, const Tensor& row_scale) {
  int64_t p = xp.dim(0), e = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  float* a = static_cast<float*>(workspace(size_t(p * f) * sizeof(float)));
  unsigned groups = unsigned(std::min(e, p));
  bool vec1 = gemv_vec_ok(w1.raw(), size_t(d) * sizeof(TW), xp.raw(), size_t(d) * sizeof(TX)) &&
              reinterpret_cast<uintptr_t>(w3.raw()) % 16 == 0;
  dim3 g1{ceil_div(f, kEgWarps), groups};
  expert_gemv_up_kernel<TW, TX, R><<<g1, kEgWarps * 32, 0, stream()>>>(
      a, xp.data<TX>(), w1.data<TW>(), w3.data<TW>(), offsets.data<int32_t>(), int(e),
      row_scale.defined() ? row_scale.data<float>() : nullptr, f, d, vec1);
  MOE_CUDA_LAUNCH_CHECK();
  bool vec2 = gemv_vec_ok(w2.raw(), size_t(f) * sizeof(TW), a, size_t(f) * sizeof(float));
  dim3 g2{ceil_div(d, kEgWarps), groups};
  expert_gemv_down_kernel<TW, R><<<g2, kEgWarps * 32, 0, stream()>>>(yp.raw(), elt_of(yp.dtype()), a, w2.data<TW>(),
                                                                    offsets.data<int32_t>(), int(e), f, d, vec2);
  MOE_CUDA_LAUNCH_CHECK();
}

void gemv_path(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1, const Tensor& w3,
               const Tensor& w2, const Tensor& row_scale) {
  int64_t p = xp.dim(0);
  MOE_CUDA_FLOAT_SWITCH2(w1.dtype(), TW, xp.dtype(), TX, {
    if (p <= 1)
      launch_gemv_path<TW, TX, 1>(yp, xp, offsets, w1, w3, w2, row_scale);
    else if (p <= 2)
      launch_gemv_path<TW, TX, 2>(yp, xp, offsets, w1, w3, w2, row_scale);
    else if (p <= 4)
      launch_gemv_path<TW, TX, 4>(yp, xp, offsets, w1, w3, w2, row_scale);
    else
      launch_gemv_path<TW, TX, 8>(yp, xp, offsets, w1, w3, w2, row_scale);
  });
}

// ---------------------------------------------------------------------------------------------
// own: tensor-core grouped GEMM.

template <class T, class TO, bool kGated>
void launch_grouped(TO* out, int64_t ldo, const T* a, const T* w0, const T* w1, const int32_t* offsets, int e_len,
                    const float* row_scale, int64_t n_len, int64_t k_len, int64_t p) {
  int64_t row_slots = (p + gg::kBM - 1) / gg::kBM + std::min<int64_t>(e_len, p);
  int64_t col_tiles = (n_len + (kGated ? gg::kBN / 2 : gg::kBN) - 1) / (kGated ? gg::kBN / 2 : gg::kBN);
  int64_t blocks = row_slots * col_tiles;
  MOE_CHECK(blocks < (int64_t(1) << 31), "expert_ffn_forward: grouped GEMM grid too large");
  auto kern = gg::grouped_gemm_kernel<T, TO, kGated>;
  MOE_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(gg::kSmemBytes)));
  kern<<<unsigned(blocks), gg::kThreads, gg::kSmemBytes, stream()>>>(out, ldo, a, w0, w1, offsets, e_len, row_scale,
                                                                      n_len, k_len, row_slots, col_tiles);
  MOE_CUDA_LAUNCH_CHECK();
}

template <class T>
void own_path_t(Tensor& yp, const void* xin, const Tensor& offsets, const Tensor& w1, const Tensor& w3,
                const Tensor& w2, const Tensor& row_scale, T* a_buf) {
  int64_t p = yp.dim(0), e = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  const float* rs = row_scale.defined() ? row_scale.data<float>() : nullptr;
  launch_grouped<T, T, true>(a_buf, f, static_cast<const T*>(xin), w1.data<T>(), w3.data<T>(),
                             offsets.data<int32_t>(), int(e), rs, f, d, p);
  MOE_CUDA_FLOAT_SWITCH(yp.dtype(), TO, {
    launch_grouped<T, TO, false>(yp.data<TO>(), d, a_buf, w2.data<T>(), nullptr, offsets.data<int32_t>(), int(e),
                                 nullptr, d, f, p);
  });
}

void own_path(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1, const Tensor& w3,
              const Tensor& w2, const Tensor& row_scale) {
  int64_t p = xp.dim(0), f = w1.dim(1), d = w1.dim(2);
  DType tw = w1.dtype();
  size_t es = dtype_size(tw);
  bool conv = xp.dtype() != tw;
  size_t x_bytes = conv ? align_up(size_t(p * d) * es) : 0;
  char* ws = static_cast<char*>(workspace(x_bytes + align_up(size_t(p * f) * es)));
  const void* xin = xp.raw();
  if (conv) {
    convert_kernel<<<grid_for(p * d), 256, 0, stream()>>>(ws, elt_of(tw), xp.raw(), elt_of(xp.dtype()), p * d);
    MOE_CUDA_LAUNCH_CHECK();
    xin = ws;
  }
  if (tw == DType::BF16)
    own_path_t<__nv_bfloat16>(yp, xin, offsets, w1, w3, w2, row_scale, reinterpret_cast<__nv_bfloat16*>(ws + x_bytes));
  else
    own_path_t<__half>(yp, xin, offsets, w1, w3, w2, row_scale, reinterpret_cast<__half*>(ws + x_bytes));
}

// ---------------------------------------------------------------------------------------------
// cublas.

// h1[p, f] = silu(h1) * h3 * row_scale[p], in place, over all P rows.
template <class T>
__global__ void swiglu_scale_kernel(T* h1, const T* h3, const float* row_scale, int64_t n, int64_t f) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    float rs = row_scale ? row_scale[i / f] : 1.f;
    h1[i] = from_f32<T>(silu(to_f32(h1[i])) * to_f32(h3[i]) * rs);
  }
}

void cublas_path(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1, const Tensor& w3,
                 const Tensor& w2, const Tensor& row_scale) {
  int64_t p = xp.dim(0), e = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  DType tw = w1.dtype();
  size_t es = dtype_size(tw);
  // The offsets, to the host: the one synchronisation of this path.
  int32_t* off = static_cast<int32_t*>(pinned_scratch(size_t(e + 1) * sizeof(int32_t)));
  MOE_CUDA_CHECK(cudaMemcpyAsync(off, offsets.raw(), size_t(e + 1) * sizeof(int32_t), cudaMemcpyDeviceToHost,
                                 stream()));
  MOE_CUDA_CHECK(cudaStreamSynchronize(stream()));
  std::vector<int32_t> o(off, off + e + 1);
  bool conv = xp.dtype() != tw;
  bool c_ok = yp.dtype() == tw || (tw != DType::F32 && yp.dtype() == DType::F32);
  size_t x_bytes = conv ? align_up(size_t(p * d) * es) : 0;
  size_t h_bytes = align_up(size_t(p * f) * es);
  size_t y_bytes = c_ok ? 0 : align_up(size_t(p * d) * sizeof(float));
  char* ws = static_cast<char*>(workspace(x_bytes + 2 * h_bytes + y_bytes));
  const char* xin = static_cast<const char*>(xp.raw());
  if (conv) {
    convert_kernel<<<grid_for(p * d), 256, 0, stream()>>>(ws, elt_of(tw), xp.raw(), elt_of(xp.dtype()), p * d);
    MOE_CUDA_LAUNCH_CHECK();
    xin = ws;
  }
  char* h1 = ws + x_bytes;
  char* h3 = h1 + h_bytes;
  char* yout = c_ok ? static_cast<char*>(yp.raw()) : h3 + h_bytes;
  DType ty = c_ok ? yp.dtype() : DType::F32;
  size_t ys = dtype_size(ty);
  const char* w1b = static_cast<const char*>(w1.raw());
  const char* w3b = static_cast<const char*>(w3.raw());
  const char* w2b = static_cast<const char*>(w2.raw());
  for (int64_t x = 0; x < e; ++x) {
    int64_t n = o[x + 1] - o[x];
    if (n <= 0) continue;
    gemm_nt(h1 + size_t(o[x] * f) * es, tw, xin + size_t(o[x] * d) * es, w1b + size_t(x * f * d) * es, tw, n, f, d,
            d, d, f, 0.f);
    gemm_nt(h3 + size_t(o[x] * f) * es, tw, xin + size_t(o[x] * d) * es, w3b + size_t(x * f * d) * es, tw, n, f, d,
            d, d, f, 0.f);
  }
  const float* rs = row_scale.defined() ? row_scale.data<float>() : nullptr;
  MOE_CUDA_FLOAT_SWITCH(tw, T, {
    swiglu_scale_kernel<T><<<grid_for(p * f), 256, 0, stream()>>>(reinterpret_cast<T*>(h1),
                                                                   reinterpret_cast<const T*>(h3), rs, p * f, f);
  });
  MOE_CUDA_LAUNCH_CHECK();
  for (int64_t x = 0; x < e; ++x) {
    int64_t n = o[x + 1] - o[x];
    if (n <= 0) continue;
    gemm_nt(yout + size_t(o[x] * d) * ys, ty, h1 + size_t(o[x] * f) * es, w2b + size_t(x * d * f) * es, tw, n, d, f,
            f, f, d, 0.f);
  }
  // Rows outside every expert (none when offsets cover [0, P)) are left as they are.
  if (!c_ok) {
    convert_kernel<<<grid_for(p * d), 256, 0, stream()>>>(yp.raw(), elt_of(yp.dtype()), yout, Elt::F32, p * d);
    MOE_CUDA_LAUNCH_CHECK();
  }
}

// Compute capability major of device 0 (the tensor-core path needs 8+).
int cc_major() {
  static int major = [] {
    int m = 0;
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, 0) != cudaSuccess) m = 0;
    return m;
  }();
  return major;
}

int64_t env_int(const char* name, int64_t dflt) {
  const char* v = std::getenv(name);
  if (!v || !*v) return dflt;
  return std::strtoll(v, nullptr, 10);
}

}  // namespace

void expert_ffn_forward(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1, const Tensor& w3,
                        const Tensor& w2, const Tensor& row_scale) {
  int64_t p = xp.dim(0), f = w1.dim(1), d = w1.dim(2);
  if (p == 0 || d == 0) return;
  if (f == 0) {
    MOE_CUDA_CHECK(cudaMemsetAsync(yp.raw(), 0, yp.nbytes(), stream()));
    return;
  }
  if (p <= env_int("MOE_CUDA_EXPERT_GEMV_MAX_P", 32)) {
    gemv_path(yp, xp, offsets, w1, w3, w2, row_scale);
    return;
  }
  // Default cublas: measured faster on an H100 (Mixtral shapes, P=8192: 4.4 ms vs 11.2 ms for
  // the own mma.sync kernel; P=1024: 1.3 vs 2.2 ms). MOE_CUDA_EXPERT_GEMM=own selects ours.
  const char* mode = std::getenv("MOE_CUDA_EXPERT_GEMM");
  bool want_cublas = !(mode && std::strcmp(mode, "own") == 0);
  DType tw = w1.dtype();
  auto al16 = [](const void* q) { return reinterpret_cast<uintptr_t>(q) % 16 == 0; };
  bool own_ok = cc_major() >= 8 && (tw == DType::BF16 || tw == DType::F16) && d % 8 == 0 && f % 8 == 0 && al16(w1.raw()) &&
                al16(w3.raw()) && al16(w2.raw()) && (xp.dtype() != tw || al16(xp.raw())) && al16(yp.raw());
  if (own_ok && !want_cublas)
    own_path(yp, xp, offsets, w1, w3, w2, row_scale);
  else
    cublas_path(yp, xp, offsets, w1, w3, w2, row_scale);
}

}  // namespace cuda
}  // namespace moe
