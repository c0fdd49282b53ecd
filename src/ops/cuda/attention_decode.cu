// attention_decode.cu — bandwidth-oriented decode attention (S <= 8) for 2-byte floats, Dh 64/128.
//
// A block (4 warps) serves all G <= 8 query heads of one kv head for one (b, s) and one split of
// the key range. A key row (Dh*2 bytes) is read by Dh/8 lanes with one 16-byte load each, so a
// warp reads 32/(Dh/8) rows per load step and issues 4 steps (K and V) before using any: 8
// independent 16-byte loads per thread in flight. Each lane group ("sub") keeps its own online
// softmax state (scores in log2 units: q is pre-scaled by log2(e)/sqrt(Dh)); the block merges its
// subs through shared memory, and a second kernel merges the splits (split weights computed once
// per row, then one pass over the partial accumulators). Splits: about 4 blocks per SM, at least
// 64 keys each.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>

#include "ops/cuda/attention_mma.cuh"
#include "ops/cuda/kernel_util.cuh"

namespace moe {
namespace cuda {
namespace {

constexpr int kDvWarps = 4, kDvThreads = kDvWarps * 32, kDvU = 4;

template <class T>
__device__ __forceinline__ void cvt8(const uint4& u, float* f) {
  const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_f32(e[i]);
}

template <class T, int D, int G>
__global__ void __launch_bounds__(kDvThreads)
    attn_decode_vec_kernel(void* out, Elt to, float* part_acc, float* part_ml, const T* q, const T* kc, const T* vc,
                           int s_len, int h_len, int hkv, int64_t c_len, int64_t past, float scale_log2,
                           int64_t chunk, int n_split) {
  constexpr int LPR = D / 8;      // lanes per key row
  constexpr int KPW = 32 / LPR;   // rows per warp per load step
  constexpr int NSUB = kDvWarps * KPW;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int sub_l = lane / LPR, cl = lane % LPR;
  const int sub = warp * KPW + sub_l;
  const int split = blockIdx.x;
  const int64_t r2 = blockIdx.y;
  const int hk = int(r2 % hkv);
  const int64_t bs = r2 / hkv;
  const int s = int(bs % s_len), b = int(bs / s_len);
  const int g_len = h_len / hkv;  // <= G
  const int h0 = hk * g_len;
  const int64_t c_row = int64_t(hkv) * D;
  const T* kb = kc + int64_t(b) * c_len * c_row + int64_t(hk) * D + cl * 8;
  const T* vb = vc + int64_t(b) * c_len * c_row + int64_t(hk) * D + cl * 8;

  float qv[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g < g_len) {
      uint4 u = __ldg(reinterpret_cast<const uint4*>(q + (bs * h_len + h0 + g) * D + cl * 8));
      cvt8<T>(u, qv[g]);
#pragma unroll
      for (int i = 0; i < 8; ++i) qv[g][i] *= scale_log2;
    } else {
#pragma unroll
      for (int i = 0; i < 8; ++i) qv[g][i] = 0.f;
    }
  }
  const int64_t k_lim = past + s + 1;
  const int64_t k0 = int64_t(split) * chunk;
  const int64_t k1 = min(k_lim, k0 + chunk);
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }
  // Warp-uniform loop (the shuffles below need every lane); lane group sub_l takes row
  // jb + sub_l + u * NSUB.
  for (int64_t jb = k0 + warp * KPW; jb < k1; jb += int64_t(kDvU) * NSUB) {
    uint4 kr[kDvU], vr[kDvU];
    bool ok[kDvU];
#pragma unroll
    for (int u = 0; u < kDvU; ++u) {
      const int64_t jj = jb + sub_l + int64_t(u) * NSUB;
      ok[u] = jj < k1;
      if (ok[u]) {
        kr[u] = __ldg(reinterpret_cast<const uint4*>(kb + jj * c_row));
        vr[u] = __ldg(reinterpret_cast<const uint4*>(vb + jj * c_row));
      } else {
        kr[u] = vr[u] = make_uint4(0u, 0u, 0u, 0u);
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (g >= g_len) break;
      float sc[kDvU];
#pragma unroll
      for (int u = 0; u < kDvU; ++u) {
        float kf[8];
        cvt8<T>(kr[u], kf);
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) d = fmaf(qv[g][i], kf[i], d);
        sc[u] = d;
      }
#pragma unroll
      for (int o = LPR / 2; o > 0; o >>= 1)
#pragma unroll
        for (int u = 0; u < kDvU; ++u) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < kDvU; ++u)
        if (ok[u]) mx = fmaxf(mx, sc[u]);
      const float alpha = mx == -INFINITY ? 1.f : exp2f(m[g] - mx);
      float p[kDvU], psum = 0.f;
#pragma unroll
      for (int u = 0; u < kDvU; ++u) {
        p[u] = ok[u] ? exp2f(sc[u] - mx) : 0.f;
        psum += p[u];
      }
      l[g] = l[g] * alpha + psum;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= alpha;
#pragma unroll
      for (int u = 0; u < kDvU; ++u) {
        float vf[8];
        cvt8<T>(vr[u], vf);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(p[u], vf[i], acc[g][i]);
      }
      m[g] = mx;
    }
  }
  // Merge the subs of the block.
  __shared__ float sm_ml[NSUB][G][2];
  __shared__ float sm_acc[NSUB][G][D];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (cl == 0) {
      sm_ml[sub][g][0] = m[g];
      sm_ml[sub][g][1] = l[g];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sm_acc[sub][g][cl * 8 + i] = acc[g][i];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < g_len * D; idx += kDvThreads) {
    const int g = idx / D, d = idx % D;
    float mm = -INFINITY;
#pragma unroll
    for (int w = 0; w < NSUB; ++w) mm = fmaxf(mm, sm_ml[w][g][0]);
    float ll = 0.f, o = 0.f;
#pragma unroll
    for (int w = 0; w < NSUB; ++w) {
      const float f = sm_ml[w][g][0] == -INFINITY ? 0.f : exp2f(sm_ml[w][g][0] - mm);
      ll += sm_ml[w][g][1] * f;
      o += sm_acc[w][g][d] * f;
    }
    const int64_t row = bs * h_len + h0 + g;
    if (n_split == 1) {
      store_rt(out, to, row * D + d, ll > 0.f ? o / ll : 0.f);
    } else {
      const int64_t pi = row * n_split + split;
      if (d == 0) {
        part_ml[pi * 2] = mm;
        part_ml[pi * 2 + 1] = ll;
      }
      part_acc[pi * D + d] = o;
    }
  }
}

// One block per output row: split weights once (log2 units), then one pass over the partials.
__global__ void __launch_bounds__(128)
    attn_decode_vec_merge_kernel(void* out, Elt to, const float* part_acc, const float* part_ml, int dh,
                                 int n_split) {
  __shared__ float w_s[256];
  __shared__ float inv_s;
  const int64_t row = blockIdx.x;
  const float* ml = part_ml + row * n_split * 2;
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float mm = -INFINITY;
    for (int sp = lane; sp < n_split; sp += 32) mm = fmaxf(mm, ml[sp * 2]);
    mm = warp_max(mm);
    float ll = 0.f;
    for (int sp = lane; sp < n_split; sp += 32) {
      const float m = ml[sp * 2];
      const float f = m == -INFINITY ? 0.f : exp2f(m - mm);
      w_s[sp] = f;
      ll += ml[sp * 2 + 1] * f;
    }
    ll = warp_sum(ll);
    if (lane == 0) inv_s = ll > 0.f ? 1.f / ll : 0.f;
  }
  __syncthreads();
  const float* pa = part_acc + row * n_split * dh;
  for (int d = threadIdx.x; d < dh; d += blockDim.x) {
    float o0 = 0.f, o1 = 0.f, o2 = 0.f, o3 = 0.f;
    int sp = 0;
    for (; sp + 4 <= n_split; sp += 4) {
      o0 = fmaf(pa[(sp + 0) * dh + d], w_s[sp + 0], o0);
      o1 = fmaf(pa[(sp + 1) * dh + d], w_s[sp + 1], o1);
      o2 = fmaf(pa[(sp + 2) * dh + d], w_s[sp + 2], o2);
      o3 = fmaf(pa[(sp + 3) * dh + d], w_s[sp + 3], o3);
    }
    for (; sp < n_split; ++sp) o0 = fmaf(pa[sp * dh + d], w_s[sp], o0);
    store_rt(out, to, row * dh + d, ((o0 + o1) + (o2 + o3)) * inv_s);
  }
}

template <class T, int D, int G>
void launch_decode_vec(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past) {
  const int b = int(q.dim(0)), s = int(q.dim(1)), h = int(q.dim(2)), hkv = int(k_cache.dim(2));
  const int64_t rows = int64_t(b) * s * h;
  const int64_t blocks_y = int64_t(b) * s * hkv;
  MOE_CHECK(blocks_y <= 65535, "attention_forward: %lld decode rows exceed the CUDA grid", (long long)blocks_y);
  const int64_t l_max = past + s;
  const int sms = sm_count() > 0 ? sm_count() : 80;
  const int64_t want = (4 * int64_t(sms) + blocks_y - 1) / blocks_y;
  int n_split = int(std::max<int64_t>(1, std::min<int64_t>({want, (l_max + 63) / 64, 256})));
  int64_t chunk = (l_max + n_split - 1) / n_split;
  n_split = int((l_max + chunk - 1) / chunk);
  const SplitPartials parts = split_partials(rows, n_split, D);
  float* part_acc = parts.acc;
  float* part_ml = parts.ml;
  const Elt to = elt_of(out.dtype());
  const float scale_log2 = float(1.4426950408889634 / std::sqrt(double(D)));
  dim3 grid{unsigned(n_split), unsigned(blocks_y)};
  attn_decode_vec_kernel<T, D, G><<<grid, kDvThreads, 0, stream()>>>(
      out.raw(), to, part_acc, part_ml, q.data<T>(), k_cache.data<T>(), v_cache.data<T>(), s, h, hkv,
      k_cache.dim(1), past, scale_log2, chunk, n_split);
  MOE_CUDA_LAUNCH_CHECK();
  if (n_split > 1) {
    attn_decode_vec_merge_kernel<<<unsigned(rows), 128, 0, stream()>>>(out.raw(), to, part_acc, part_ml, D,
                                                                        n_split);
    MOE_CUDA_LAUNCH_CHECK();
  }
}

template <class T, int D>
void dispatch_g(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past) {
  const int64_t g_len = q.dim(2) / k_cache.dim(2);
  if (g_len <= 1)
    launch_decode_vec<T, D, 1>(out, q, k_cache, v_cache, past);
  else if (g_len <= 2)
    launch_decode_vec<T, D, 2>(out, q, k_cache, v_cache, past);
  else if (g_len <= 4)
    launch_decode_vec<T, D, 4>(out, q, k_cache, v_cache, past);
  else
    launch_decode_vec<T, D, 8>(out, q, k_cache, v_cache, past);
}

template <class T>
void dispatch_d(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past) {
  if (q.dim(3) == 64)
    dispatch_g<T, 64>(out, q, k_cache, v_cache, past);
  else
    dispatch_g<T, 128>(out, q, k_cache, v_cache, past);
}

}  // namespace

bool attention_decode_vec(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                          int64_t past) {
  const char* mode = std::getenv("MOE_CUDA_ATTN_DECODE");
  if (mode && std::strcmp(mode, "old") == 0) return false;
  const DType dt = q.dtype();
  if ((dt != DType::BF16 && dt != DType::F16) || k_cache.dtype() != dt || v_cache.dtype() != dt) return false;
  const int64_t dh = q.dim(3);
  if (dh != 64 && dh != 128) return false;
  if (q.dim(2) / k_cache.dim(2) > 8) return false;
  auto al16 = [](const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; };
  if (!al16(q.raw()) || !al16(k_cache.raw()) || !al16(v_cache.raw())) return false;
  if (dt == DType::BF16)
    dispatch_d<__nv_bfloat16>(out, q, k_cache, v_cache, past);
  else
    dispatch_d<__half>(out, q, k_cache, v_cache, past);
  return true;
}

}  // namespace cuda
}  // namespace moe
