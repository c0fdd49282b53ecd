// grouped_gemm.cuh — a tensor-core grouped GEMM over expert row groups, scheduled from the
// device offsets (no host synchronisation). Internal to src/ops/cuda (used by expert_ffn.cu).
//
//   out[p, n] = sum_k a[p, k] * w[e, n, k]   for p in [offsets[e], offsets[e+1])
//
// a [P,K] and w [E,N,K] are both K-contiguous bf16 (or f16): the "NT" product that
// mma.sync.m16n8k16.row.col takes directly. Block tile 128 x 128 x 32, 8 warps (2 x 4, each
// 64 x 32), a 4-stage cp.async pipeline, ldmatrix from shared memory rows padded to 80 bytes
// (conflict-free), f32 accumulators.
//
// Gated mode (the first expert GEMM) takes two weight tensors w1, w3 and gives each block 64
// output columns of both: the block's 128 B rows interleave them in runs of 16 (16 of w1, the
// same 16 of w3, ...), so each thread holds h1 and h3 of the same (row, col) and the epilogue
// writes A = silu(h1) * h3 * row_scale directly. No H1/H3 ever reaches memory.
//
// Scheduling: row tiles of all experts are numbered consecutively (expert e owns
// ceil(n_e/128) of them); the grid is an upper bound (ceil(P/128) + min(E, P) row slots) times
// the column tiles, and blocks past the real count exit. Blocks are rasterised in groups of 16
// row tiles so a wave of blocks shares both its A rows and its weight columns in L2.
#pragma once
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/mma_util.cuh"

namespace moe {
namespace cuda {
namespace gg {

constexpr int kBM = 128, kBN = 128, kBK = 32, kStages = 4, kThreads = 256, kLds = kBK + 8;
constexpr int kGroupM = 16;
constexpr size_t kSmemBytes = size_t(kStages) * (kBM + kBN) * kLds * 2;

using ptx::cp_async16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;
using ptx::ldmatrix_x4;
using ptx::mma16816;

template <class TO>
__device__ __forceinline__ void store2(TO* p, float a, float b);
template <>
__device__ __forceinline__ void store2<float>(float* p, float a, float b) {
  *reinterpret_cast<float2*>(p) = make_float2(a, b);
}
template <>
__device__ __forceinline__ void store2<__nv_bfloat16>(__nv_bfloat16* p, float a, float b) {
  *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(a, b);
}
template <>
__device__ __forceinline__ void store2<__half>(__half* p, float a, float b) {
  *reinterpret_cast<__half2*>(p) = __floats2half2_rn(a, b);
}

// Finds the row tile `slot` among all experts' tiles: sets e, the first row and the end row.
// Returns false when slot is past the last tile. Called by all threads; warp 0 scans.
__device__ __forceinline__ bool find_row_tile(const int32_t* offsets, int e_len, int64_t slot, int& e_out,
                                              int64_t& row0, int64_t& row_end) {
  __shared__ int64_t sh[3];
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    int64_t cum = 0;
    int found = -1;
    int64_t f_r0 = 0, f_r1 = 0;
    for (int base = 0; base < e_len && found < 0; base += 32) {
      int e = base + lane;
      int64_t o0 = 0, o1 = 0, tiles = 0;
      if (e < e_len) {
        o0 = offsets[e];
        o1 = offsets[e + 1];
        tiles = (o1 - o0 + kBM - 1) / kBM;
      }
      int64_t incl = tiles;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        int64_t u = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += u;
      }
      int64_t excl = incl - tiles;
      bool mine = tiles > 0 && slot >= cum + excl && slot < cum + incl;
      unsigned bal = __ballot_sync(0xffffffffu, mine);
      if (bal) {
        int src = __ffs(bal) - 1;
        found = base + src;
        int64_t my_r0 = o0 + (slot - cum - excl) * kBM;
        f_r0 = __shfl_sync(0xffffffffu, my_r0, src);
        f_r1 = __shfl_sync(0xffffffffu, o1, src);
      }
      cum += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) {
      sh[0] = found;
      sh[1] = f_r0;
      sh[2] = f_r1;
    }
  }
  __syncthreads();
  e_out = int(sh[0]);
  row0 = sh[1];
  row_end = sh[2];
  return e_out >= 0;
}

// out [P, ldo]: plain mode writes out[p, n] (TO); gated mode writes A[p, f] (TO) for
// f < n_len, with row_scale (f32, may be null).
template <class T, class TO, bool kGated>
__global__ void __launch_bounds__(kThreads) grouped_gemm_kernel(TO* out, int64_t ldo, const T* a, const T* w0,
                                                                const T* w1, const int32_t* offsets, int e_len,
                                                                const float* row_scale, int64_t n_len,
                                                                int64_t k_len, int64_t row_slots, int64_t col_tiles) {
  extern __shared__ float4 smem4[];
  T* as = reinterpret_cast<T*>(smem4);
  T* bs = as + kStages * kBM * kLds;

  // Rasterise: groups of kGroupM row slots, row fastest inside a group.
  int64_t lin = blockIdx.x;
  int64_t per_group = int64_t(kGroupM) * col_tiles;
  int64_t group = lin / per_group;
  int64_t gm = min(int64_t(kGroupM), row_slots - group * kGroupM);
  int64_t in_g = lin - group * per_group;
  int64_t slot = group * kGroupM + in_g % gm;
  int64_t col_tile = in_g / gm;

  int e;
  int64_t row0, row_end;
  if (!find_row_tile(offsets, e_len, slot, e, row0, row_end)) return;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;
  const int64_t n0 = col_tile * (kGated ? kBN / 2 : kBN);
  const T* wb0 = w0 + int64_t(e) * n_len * k_len;
  const T* wb1 = kGated ? w1 + int64_t(e) * n_len * k_len : nullptr;

  // Per-thread load slots: 2 chunks of 16 bytes for A and 2 for B per stage.
  const T* a_src[2];
  bool a_ok[2];
  const T* b_src[2];
  bool b_ok[2];
  int ld_row[2], ld_kc[2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    int c = tid + i * kThreads;
    int r = c / 4;
    ld_row[i] = r;
    ld_kc[i] = (c % 4) * 8;
    int64_t ar = row0 + r;
    a_ok[i] = ar < row_end;
    a_src[i] = a + (a_ok[i] ? ar : row0) * k_len;
    int64_t col;
    const T* wm;
    if (kGated) {
      col = n0 + (r / 32) * 16 + r % 16;
      wm = ((r / 16) % 2) ? wb1 : wb0;
    } else {
      col = n0 + r;
      wm = wb0;
    }
    b_ok[i] = col < n_len;
    b_src[i] = wm + (b_ok[i] ? col : 0) * k_len;
  }

  auto load_stage = [&](int stage, int64_t kt) {
    int64_t k0 = kt * kBK;
    T* as_s = as + stage * kBM * kLds;
    T* bs_s = bs + stage * kBN * kLds;
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      int64_t k = k0 + ld_kc[i];
      bool kok = k < k_len;
      cp_async16(as_s + ld_row[i] * kLds + ld_kc[i], a_src[i] + (kok ? k : 0), a_ok[i] && kok);
      cp_async16(bs_s + ld_row[i] * kLds + ld_kc[i], b_src[i] + (kok ? k : 0), b_ok[i] && kok);
    }
  };

  float acc[4][4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.f;

  const int64_t k_tiles = (k_len + kBK - 1) / kBK;
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, s);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    int64_t nk = kt + kStages - 1;
    if (nk < k_tiles) load_stage(int(nk % kStages), nk);
    cp_async_commit();
    const int stage = int(kt % kStages);
    const T* as_s = as + stage * kBM * kLds;
    const T* bs_s = bs + stage * kBN * kLds;
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
      unsigned af[4][4], bf[2][4];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        ldmatrix_x4(af[mi], as_s + (warp_m * 64 + mi * 16 + (lane % 16)) * kLds + kk + (lane / 16) * 8);
#pragma unroll
      for (int nj = 0; nj < 2; ++nj)
        ldmatrix_x4(bf[nj], bs_s + (warp_n * 32 + nj * 16 + (lane % 8) + (lane / 16) * 8) * kLds + kk +
                                ((lane / 8) % 2) * 8);
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
          mma16816<T>(acc[mi][ni], af[mi], bf[ni / 2][(ni % 2) * 2], bf[ni / 2][(ni % 2) * 2 + 1]);
    }
  }
  cp_async_wait<0>();

  // Epilogue.
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      int64_t row = row0 + warp_m * 64 + mi * 16 + lane / 4 + half * 8;
      if (row >= row_end) continue;
      if (kGated) {
        float rs = row_scale ? row_scale[row] : 1.f;
#pragma unroll
        for (int ni = 0; ni < 2; ++ni) {
          int64_t col = n0 + warp_n * 16 + ni * 8 + 2 * (lane % 4);
          if (col >= n_len) continue;
          float h1a = acc[mi][ni][half * 2], h1b = acc[mi][ni][half * 2 + 1];
          float h3a = acc[mi][ni + 2][half * 2], h3b = acc[mi][ni + 2][half * 2 + 1];
          store2<TO>(out + row * ldo + col, silu(h1a) * h3a * rs, silu(h1b) * h3b * rs);
        }
      } else {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
          int64_t col = n0 + warp_n * 32 + ni * 8 + 2 * (lane % 4);
          if (col >= n_len) continue;
          store2<TO>(out + row * ldo + col, acc[mi][ni][half * 2], acc[mi][ni][half * 2 + 1]);
        }
      }
    }
  }
}

}  // namespace gg
}  // namespace cuda
}  // namespace moe
