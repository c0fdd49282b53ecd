// attention_mma.cu — causal grouped-query flash attention (prefill) on the tensor cores, bf16.
//
// Shapes (ops.h): out, q [B,S,H,Dh]; caches [B,C,Hkv,Dh] (row stride Hkv*Dh between positions),
// keys [0, past+S) valid; query s sits at position past+s and sees keys 0..past+s. Dh in {64,128}.
//
// FlashAttention-2 structure. A CTA of kWarps=4 warps takes 64 query rows of one (b, h); each
// warp owns 16 rows, its Q fragments held in registers for the whole key loop (loaded once from
// global memory in the mma A-operand layout). The CTA walks the keys 0 .. past+last_row in tiles
// of 64 rows; K and V tiles are staged in shared memory by cp.async, double-buffered (tile t+1
// loads while tile t computes), rows padded by 16 bytes so ldmatrix is conflict-free. Per tile
// and warp: S = Q K^T with mma.sync.m16n8k16 (bf16 in, f32 accumulate; K fragments by ldmatrix),
// the causal mask applied only on tiles that cross the warp's diagonal, online softmax in f32 with
// exp2 (scores scaled by log2(e)/sqrt(Dh) inside one FMA), P rounded to bf16 straight from the
// accumulator registers into the A-operand layout, O += P V (V fragments by ldmatrix.trans).
// Row sums stay per-thread until the end (one quad reduction). Tiles above the diagonal are never
// visited. Blocks are numbered heaviest (last query block) first so the causal tail is short.
//
// Rows past S in the last query block compute a copy of the last row (clamped) and are not
// stored; cache rows at or past the block's last visible key are zero-filled, never read.
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/attention_mma.cuh"
#include "ops/cuda/kernel_util.cuh"
#include "ops/cuda/mma_util.cuh"

namespace moe {
namespace cuda {
namespace {


__device__ __forceinline__ unsigned fa_pack(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&v);
}

constexpr int kWarps = 4, kThreads = kWarps * 32, kBQ = kWarps * 16, kBN = 64;

template <int D>
struct FaCfg {
  static constexpr int kLd = D + 8;                            // smem row stride (elements)
  static constexpr int kTile = kBN * kLd;                      // elements per K or V tile
  static constexpr size_t kSmem = size_t(4) * kTile * 2;       // K, V x 2 stages, bytes
  static constexpr int kChunks = kBN * D / 8;                  // 16-byte chunks per tile
  static_assert(kChunks % kThreads == 0, "tile chunks must divide among the threads");
};

// Registers (ptxas, sm_90): Dh=128 241 (a cap of 168 for 3 blocks/SM spills), Dh=64 166.
template <int D>
__global__ void __launch_bounds__(kThreads, D <= 64 ? 3 : 2)
    fa_prefill_kernel(__nv_bfloat16* __restrict__ out, const __nv_bfloat16* __restrict__ q,
                      const __nv_bfloat16* __restrict__ kc, const __nv_bfloat16* __restrict__ vc, int s_len,
                      int h_len, int hkv, int64_t c_len, int64_t past, float scale_log2, int n_qb) {
  using C = FaCfg<D>;
  extern __shared__ __align__(16) unsigned char fa_smem[];
  __nv_bfloat16* ks = reinterpret_cast<__nv_bfloat16*>(fa_smem);
  __nv_bfloat16* vs = ks + 2 * C::kTile;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane >> 2, t4 = lane & 3;
  const int bh_len = int(gridDim.x / unsigned(n_qb));
  const int qblk = n_qb - 1 - int(blockIdx.x) / bh_len;  // heaviest blocks first
  const int bh = int(blockIdx.x) % bh_len;
  const int h = bh % h_len, b = bh / h_len;
  const int hk = h / (h_len / hkv);
  const int q0 = qblk * kBQ;
  const int64_t q_row = int64_t(h_len) * D, c_row = int64_t(hkv) * D;
  const __nv_bfloat16* qb = q + int64_t(b) * s_len * q_row + int64_t(h) * D;
  const __nv_bfloat16* kb = kc + int64_t(b) * c_len * c_row + int64_t(hk) * D;
  const __nv_bfloat16* vb = vc + int64_t(b) * c_len * c_row + int64_t(hk) * D;
  const int q_last = min(q0 + kBQ, s_len) - 1;  // last real query of the block
  const int64_t k_end = past + q_last + 1;      // keys [0, k_end) are seen by some row
  const int n_tiles = int((k_end + kBN - 1) / kBN);

  auto load_tile = [&](int tile, int stage) {
    const int64_t kt = int64_t(tile) * kBN;
    __nv_bfloat16* kd = ks + stage * C::kTile;
    __nv_bfloat16* vd = vs + stage * C::kTile;
#pragma unroll
    for (int it = 0; it < C::kChunks / kThreads; ++it) {
      const int i = it * kThreads + int(threadIdx.x);
      const int r = i / (D / 8), c = i % (D / 8);
      const int64_t kp = kt + r;
      const bool ok = kp < k_end;
      const int64_t off = (ok ? kp : 0) * c_row + c * 8;
      ptx::cp_async16(kd + r * C::kLd + c * 8, kb + off, ok);
      ptx::cp_async16(vd + r * C::kLd + c * 8, vb + off, ok);
    }
  };
  load_tile(0, 0);
  ptx::cp_async_commit();

  // Q fragments (A operand, rows g and g+8 of the warp's 16), rows past S clamped to the last.
  const int r0 = q0 + warp * 16 + g, r1 = r0 + 8;
  const int rc0 = min(r0, s_len - 1), rc1 = min(r1, s_len - 1);
  const int64_t lim0 = past + rc0, lim1 = past + rc1;           // last key each row sees
  const int64_t lim_warp = past + min(q0 + warp * 16, s_len - 1);  // smallest limit in the warp
  unsigned qf[D / 16][4];
  {
    const unsigned* qp0 = reinterpret_cast<const unsigned*>(qb + int64_t(rc0) * q_row);
    const unsigned* qp1 = reinterpret_cast<const unsigned*>(qb + int64_t(rc1) * q_row);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      qf[kk][0] = __ldg(qp0 + kk * 8 + t4);
      qf[kk][1] = __ldg(qp1 + kk * 8 + t4);
      qf[kk][2] = __ldg(qp0 + kk * 8 + 4 + t4);
      qf[kk][3] = __ldg(qp1 + kk * 8 + 4 + t4);
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = -INFINITY, m1 = -INFINITY, l0 = 0.f, l1 = 0.f;

  // ldmatrix lane offsets. K (non-trans): matrices (keys +0..7, dims +0..7), (keys +0..7, dims
  // +8..15), (keys +8..15, dims +0..7), (keys +8..15, dims +8..15) -> b0,b1 of two key n-tiles.
  const int k_lane_off = (((lane >> 4) << 3) + (lane & 7)) * C::kLd + ((lane >> 3) & 1) * 8;
  // V (trans): matrices (keys +0..7, dims +0..7), (keys +8..15, dims +0..7), (keys +0..7, dims
  // +8..15), (keys +8..15, dims +8..15) -> b0,b1 of two dim n-tiles.
  const int v_lane_off = ((((lane >> 3) & 1) << 3) + (lane & 7)) * C::kLd + (lane >> 4) * 8;

  for (int tile = 0; tile < n_tiles; ++tile) {
    const int st = tile & 1;
    if (tile + 1 < n_tiles) {
      load_tile(tile + 1, st ^ 1);
      ptx::cp_async_commit();
      ptx::cp_async_wait<1>();
    } else {
      ptx::cp_async_wait<0>();
    }
    __syncthreads();
    const __nv_bfloat16* kst = ks + st * C::kTile + k_lane_off;
    const __nv_bfloat16* vst = vs + st * C::kTile + v_lane_off;

    float s[kBN / 8][4];
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
      for (int jp = 0; jp < kBN / 16; ++jp) {
        unsigned bf[4];
        ptx::ldmatrix_x4(bf, kst + jp * 16 * C::kLd + kk * 16);
        ptx::mma16816<__nv_bfloat16>(s[2 * jp], qf[kk], bf[0], bf[1]);
        ptx::mma16816<__nv_bfloat16>(s[2 * jp + 1], qf[kk], bf[2], bf[3]);
      }
    }
    const int64_t kt = int64_t(tile) * kBN;
    if (kt + kBN - 1 > lim_warp) {  // the tile crosses this warp's diagonal
#pragma unroll
      for (int j = 0; j < kBN / 8; ++j) {
        const int64_t key = kt + j * 8 + 2 * t4;
        if (key > lim0) s[j][0] = -INFINITY;
        if (key + 1 > lim0) s[j][1] = -INFINITY;
        if (key > lim1) s[j][2] = -INFINITY;
        if (key + 1 > lim1) s[j][3] = -INFINITY;
      }
    }
    // Online softmax. Key 0 (tile 0) is visible to every row, so the running max is finite from
    // the first tile on; the guards below only keep a fully masked row NaN-free regardless.
    float mx0 = m0, mx1 = m1;
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
      mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
      mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float ms0 = mx0 == -INFINITY ? 0.f : mx0 * scale_log2;
    const float ms1 = mx1 == -INFINITY ? 0.f : mx1 * scale_log2;
    const float a0 = exp2f(m0 * scale_log2 - ms0), a1 = exp2f(m1 * scale_log2 - ms1);
    m0 = mx0;
    m1 = mx1;
    unsigned pf[kBN / 16][4];
    float rs0 = 0.f, rs1 = 0.f;
#pragma unroll
    for (int j = 0; j < kBN / 8; ++j) {
      const float p0 = exp2f(fmaf(s[j][0], scale_log2, -ms0));
      const float p1 = exp2f(fmaf(s[j][1], scale_log2, -ms0));
      const float p2 = exp2f(fmaf(s[j][2], scale_log2, -ms1));
      const float p3 = exp2f(fmaf(s[j][3], scale_log2, -ms1));
      rs0 += p0 + p1;
      rs1 += p2 + p3;
      pf[j / 2][(j & 1) * 2] = fa_pack(p0, p1);
      pf[j / 2][(j & 1) * 2 + 1] = fa_pack(p2, p3);
    }
    l0 = l0 * a0 + rs0;
    l1 = l1 * a1 + rs1;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][0] *= a0;
      o[n][1] *= a0;
      o[n][2] *= a1;
      o[n][3] *= a1;
    }
#pragma unroll
    for (int kv = 0; kv < kBN / 16; ++kv) {
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        unsigned bf[4];
        ptx::ldmatrix_x4_trans(bf, vst + kv * 16 * C::kLd + dp * 16);
        ptx::mma16816<__nv_bfloat16>(o[2 * dp], pf[kv], bf[0], bf[1]);
        ptx::mma16816<__nv_bfloat16>(o[2 * dp + 1], pf[kv], bf[2], bf[3]);
      }
    }
    __syncthreads();  // this stage is refilled by the next iteration's load
  }

  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f, inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  if (r0 < s_len) {
    unsigned* op = reinterpret_cast<unsigned*>(out + ((int64_t(b) * s_len + r0) * h_len + h) * D);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) op[n * 4 + t4] = fa_pack(o[n][0] * inv0, o[n][1] * inv0);
  }
  if (r1 < s_len) {
    unsigned* op = reinterpret_cast<unsigned*>(out + ((int64_t(b) * s_len + r1) * h_len + h) * D);
#pragma unroll
    for (int n = 0; n < D / 8; ++n) op[n * 4 + t4] = fa_pack(o[n][2] * inv1, o[n][3] * inv1);
  }
}

int fa_cc_major() {
  static int major = [] {
    int dev = 0, m = 0;
    if (cudaGetDevice(&dev) != cudaSuccess) return 0;
    if (cudaDeviceGetAttribute(&m, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) m = 0;
    return m;
  }();
  return major;
}

template <int D>
void launch_fa(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past) {
  const int b = int(q.dim(0)), s = int(q.dim(1)), h = int(q.dim(2)), hkv = int(k_cache.dim(2));
  const int n_qb = int(ceil_div(s, kBQ));
  const int64_t blocks = int64_t(n_qb) * b * h;
  MOE_CHECK(blocks <= 0x7fffffff, "attention_forward: %lld prefill blocks exceed the CUDA grid", (long long)blocks);
  auto kern = fa_prefill_kernel<D>;
  static bool attr_set = false;  // one device per process (cuda::init); setting twice is harmless
  if (!attr_set) {
    MOE_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(FaCfg<D>::kSmem)));
    attr_set = true;
  }
  const float scale_log2 = float(1.4426950408889634 / std::sqrt(double(D)));
  kern<<<unsigned(blocks), kThreads, FaCfg<D>::kSmem, stream()>>>(
      out.data<__nv_bfloat16>(), q.data<__nv_bfloat16>(), k_cache.data<__nv_bfloat16>(),
      v_cache.data<__nv_bfloat16>(), s, h, hkv, k_cache.dim(1), past, scale_log2, n_qb);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace

bool attention_prefill_mma(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                           int64_t past) {
  const char* mode = std::getenv("MOE_CUDA_ATTN_PREFILL");
  if (mode && std::strcmp(mode, "simt") == 0) return false;
  if (q.dtype() != DType::BF16 || k_cache.dtype() != DType::BF16 || v_cache.dtype() != DType::BF16 ||
      out.dtype() != DType::BF16)
    return false;
  const int64_t dh = q.dim(3);
  if (dh != 64 && dh != 128) return false;
  auto al16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!al16(q.raw()) || !al16(k_cache.raw()) || !al16(v_cache.raw()) || !al16(out.raw())) return false;
  if (fa_cc_major() < 8) return false;
  if (dh == 64)
    launch_fa<64>(out, q, k_cache, v_cache, past);
  else
    launch_fa<128>(out, q, k_cache, v_cache, past);
  return true;
}

}  // namespace cuda
}  // namespace moe
