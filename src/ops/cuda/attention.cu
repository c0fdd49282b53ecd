// attention.cu — causal grouped-query attention over the KV cache on CUDA.
//
// Shapes (ops.h): out, q [B,S,H,Dh]; caches [B,C,Hkv,Dh], keys [0, past+S) valid; query s sits
// at position past+s and sees keys 0..past+s. Scale 1/sqrt(Dh). Dh <= 256 (any even value).
//
// bf16 prefill with Dh 64 or 128 runs on the tensor cores instead (attention_mma.cu: a
// FlashAttention-2-style mma.sync kernel), and 2-byte decode with Dh 64/128 and at most 8 query
// heads per kv head on attention_decode.cu; the kernels here serve everything else.
//
// Two kernels, both with online softmax (running max m, running sum l, rescaled accumulator):
// - prefill (S > kDecodeMaxS): flash-style. A block takes 32 queries of one (b, h) (8 warps x 4
//   queries) and walks the keys up to its last query's position in tiles of 32, staged in
//   shared memory as f32. Lane j scores key j of the tile against the warp's 4 queries (K rows
//   padded so the 16-byte reads are conflict-free), then each lane accumulates P V for its
//   dims d = lane + 32 i. No S x S matrix exists anywhere.
// - decode (S <= kDecodeMaxS): bandwidth-bound flash-decoding. A block takes the query heads
//   of one kv head (up to 8; GQA reuse of every K/V row loaded) for one (b, s) and one split
//   of the key range; its 4 warps take keys round-robin, 4 keys in flight per step, each lane
//   holding Dh/32 contiguous dims of q and of its accumulators (vector loads of K and V rows),
//   one warp reduction per (key, head). Splits write (m, l, acc) partials to the workspace and
//   a second kernel merges them, so a long cache fills the GPU even at batch 1.
#include <algorithm>
#include <cmath>

#include "ops/backend.h"
#include "ops/cuda/attention_mma.cuh"
#include "ops/cuda/kernel_util.cuh"

namespace moe {
namespace cuda {
namespace {

constexpr int64_t kDecodeMaxS = 8;

// ----------------------------------------------------------------------------------------------
// Prefill.

constexpr int kPfWarps = 8, kPfQPW = 4, kPfBQ = kPfWarps * kPfQPW, kPfBK = 32;

struct PfLayout {
  int dhp;  // Dh rounded up to 4
  int ks;   // K row stride in floats (conflict-free float4 reads)
  int vs;   // V row stride = 32 * DPL
  size_t floats() const { return size_t(kPfBQ) * dhp + size_t(kPfBK) * ks + size_t(kPfBK) * vs + kPfWarps * kPfQPW * 32; }
};

PfLayout pf_layout(int dh, int dpl) {
  PfLayout l;
  l.dhp = (dh + 3) / 4 * 4;
  l.ks = l.dhp + ((l.dhp / 4) % 2 == 0 ? 4 : 8);
  l.vs = 32 * dpl;
  return l;
}

template <class T, int DPL>
__global__ void __launch_bounds__(kPfWarps * 32)
    attn_prefill_kernel(void* out, Elt to, const T* q, const T* kc, const T* vc, int s_len, int h_len, int hkv,
                        int dh, int64_t c_len, int64_t past, float scale, PfLayout lay) {
  extern __shared__ float4 smem4[];
  float* qs = reinterpret_cast<float*>(smem4);
  float* ks = qs + kPfBQ * lay.dhp;
  float* vs = ks + kPfBK * lay.ks;
  float* ps = vs + kPfBK * lay.vs;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int q0 = blockIdx.x * kPfBQ, h = blockIdx.y, b = blockIdx.z;
  const int hk = h / (h_len / hkv);
  const int64_t q_row = int64_t(h_len) * dh;       // stride between s in q/out
  const int64_t c_row = int64_t(hkv) * dh;         // stride between positions in the cache
  const T* qb = q + (int64_t(b) * s_len) * q_row + int64_t(h) * dh;
  const T* kb = kc + int64_t(b) * c_len * c_row + int64_t(hk) * dh;
  const T* vb = vc + int64_t(b) * c_len * c_row + int64_t(hk) * dh;

  // Q tile (scaled), zero-padded.
  for (int i = threadIdx.x; i < kPfBQ * lay.dhp; i += blockDim.x) {
    int r = i / lay.dhp, d = i - r * lay.dhp;
    int qi = q0 + r;
    qs[i] = (qi < s_len && d < dh) ? to_f32(qb[qi * q_row + d]) * scale : 0.f;
  }
  float m[kPfQPW], l[kPfQPW], acc[kPfQPW][DPL];
#pragma unroll
  for (int r = 0; r < kPfQPW; ++r) {
    m[r] = -INFINITY;
    l[r] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[r][i] = 0.f;
  }
  const int64_t l_len = past + s_len;
  const int64_t k_end = std::min<int64_t>(l_len, past + std::min(q0 + kPfBQ, s_len));
  float* pw = ps + warp * kPfQPW * 32;
  for (int64_t kt = 0; kt < k_end; kt += kPfBK) {
    __syncthreads();  // previous tile fully consumed (and Q tile written, first time)
    for (int i = threadIdx.x; i < kPfBK * lay.vs; i += blockDim.x) {
      int j = i / lay.vs, d = i - j * lay.vs;
      int64_t kp = kt + j;
      bool ok = kp < l_len && d < dh;
      float kv = ok ? to_f32(kb[kp * c_row + d]) : 0.f;
      float vv = ok ? to_f32(vb[kp * c_row + d]) : 0.f;
      if (d < lay.dhp) ks[j * lay.ks + d] = kv;
      vs[j * lay.vs + d] = vv;
    }
    __syncthreads();
    // Scores: lane = key.
    float s[kPfQPW];
#pragma unroll
    for (int r = 0; r < kPfQPW; ++r) s[r] = 0.f;
    const float4* kr = reinterpret_cast<const float4*>(ks + lane * lay.ks);
    const float* qw = qs + warp * kPfQPW * lay.dhp;
    for (int d4 = 0; d4 < lay.dhp / 4; ++d4) {
      float4 kv = kr[d4];
#pragma unroll
      for (int r = 0; r < kPfQPW; ++r) {
        float4 qv = reinterpret_cast<const float4*>(qw + r * lay.dhp)[d4];
        s[r] = fmaf(qv.x, kv.x, fmaf(qv.y, kv.y, fmaf(qv.z, kv.z, fmaf(qv.w, kv.w, s[r]))));
      }
    }
    const int64_t kp = kt + lane;
#pragma unroll
    for (int r = 0; r < kPfQPW; ++r) {
      int qi = q0 + warp * kPfQPW + r;
      bool valid = qi < s_len && kp <= past + qi;
      float sv = valid ? s[r] : -INFINITY;
      float mt = warp_max(sv);
      float m_new = fmaxf(m[r], mt);
      float alpha, p;
      if (m_new == -INFINITY) {
        alpha = 1.f;
        p = 0.f;
      } else {
        alpha = m[r] == -INFINITY ? 0.f : expf(m[r] - m_new);
        p = valid ? expf(sv - m_new) : 0.f;
      }
      m[r] = m_new;
      l[r] = l[r] * alpha + p;
#pragma unroll
      for (int i = 0; i < DPL; ++i) acc[r][i] *= alpha;
      pw[r * 32 + lane] = p;
    }
    __syncwarp();
    const int jn = int(std::min<int64_t>(kPfBK, k_end - kt));
    for (int j = 0; j < jn; ++j) {
      float pj[kPfQPW];
#pragma unroll
      for (int r = 0; r < kPfQPW; ++r) pj[r] = pw[r * 32 + j];
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        float v = vs[j * lay.vs + i * 32 + lane];
#pragma unroll
        for (int r = 0; r < kPfQPW; ++r) acc[r][i] = fmaf(pj[r], v, acc[r][i]);
      }
    }
    __syncwarp();
  }
#pragma unroll
  for (int r = 0; r < kPfQPW; ++r) {
    int qi = q0 + warp * kPfQPW + r;
    float lt = warp_sum(l[r]);
    if (qi >= s_len) continue;
    float inv = lt > 0.f ? 1.f / lt : 0.f;
    int64_t ob = ((int64_t(b) * s_len + qi) * h_len + h) * dh;
#pragma unroll
    for (int i = 0; i < DPL; ++i) {
      int d = i * 32 + lane;
      if (d < dh) store_rt(out, to, ob + d, acc[r][i] * inv);
    }
  }
}

template <class T, int DPL>
void launch_prefill(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past) {
  int b = int(q.dim(0)), s = int(q.dim(1)), h = int(q.dim(2)), dh = int(q.dim(3)), hkv = int(k_cache.dim(2));
  PfLayout lay = pf_layout(dh, DPL);
  size_t smem = lay.floats() * sizeof(float);
  auto kern = attn_prefill_kernel<T, DPL>;
  MOE_CUDA_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  dim3 grid{ceil_div(s, kPfBQ), unsigned(h), unsigned(b)};
  kern<<<grid, kPfWarps * 32, smem, stream()>>>(out.raw(), elt_of(out.dtype()), q.data<T>(), k_cache.data<T>(),
                                                v_cache.data<T>(), s, h, hkv, dh, k_cache.dim(1), past,
                                                float(1.0 / std::sqrt(double(dh))), lay);
  MOE_CUDA_LAUNCH_CHECK();
}

// ----------------------------------------------------------------------------------------------
// Decode.

constexpr int kDcWarps = 4;

// Loads DPL contiguous elements at p (vector loads when `vec`), zero beyond `valid` dims.
template <class T, int DPL>
__device__ __forceinline__ void load_dims(const T* p, float* out, bool vec, int valid) {
  if (vec) {
    load_vec<T, DPL>(p, out);
  } else {
#pragma unroll
    for (int i = 0; i < DPL; ++i) out[i] = i < valid ? to_f32(p[i]) : 0.f;
  }
}

// grid (n_split, B*S*Hkv*n_hchunks). A block serves up to G query heads of one kv head (GQA:
// each K/V row it loads is used G times), one split of the key range. Each warp takes U keys per
// step (loads of all U in flight before any use). Partials: part_acc [rows][n_split][Dh],
// part_ml [rows][n_split][2] with rows = B*S*H (the output row of each head).
template <class T, int DPL, int G>
__global__ void __launch_bounds__(kDcWarps * 32)
    attn_decode_kernel(void* out, Elt to, float* part_acc, float* part_ml, const T* q, const T* kc, const T* vc,
                       int s_len, int h_len, int hkv, int dh, int64_t c_len, int64_t past, float scale,
                       int64_t chunk, int n_split, bool vec, int n_hchunks) {
  constexpr int U = DPL >= 8 ? 2 : 4;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int split = blockIdx.x;
  int64_t r2 = blockIdx.y;
  const int hc = int(r2 % n_hchunks);
  r2 /= n_hchunks;
  const int hk = int(r2 % hkv);
  const int64_t bs = r2 / hkv;
  const int s = int(bs % s_len), b = int(bs / s_len);
  const int g_len = h_len / hkv;
  const int h0 = hk * g_len + hc * G;
  const int n_heads = min(G, g_len - hc * G);
  const int64_t c_row = int64_t(hkv) * dh;
  const T* kb = kc + int64_t(b) * c_len * c_row + int64_t(hk) * dh;
  const T* vb = vc + int64_t(b) * c_len * c_row + int64_t(hk) * dh;
  const int d0 = lane * DPL;
  const int valid = max(0, min(DPL, dh - d0));
  float qv[G][DPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (g < n_heads) {
      load_dims<T, DPL>(q + (bs * h_len + h0 + g) * dh + d0, qv[g], vec, valid);
#pragma unroll
      for (int i = 0; i < DPL; ++i) qv[g][i] *= scale;
    } else {
#pragma unroll
      for (int i = 0; i < DPL; ++i) qv[g][i] = 0.f;
    }
  }
  const int64_t k_lim = past + s + 1;
  const int64_t k0 = int64_t(split) * chunk;
  const int64_t k1 = min(k_lim, k0 + chunk);
  float m[G], l[G], acc[G][DPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    m[g] = -INFINITY;
    l[g] = 0.f;
#pragma unroll
    for (int i = 0; i < DPL; ++i) acc[g][i] = 0.f;
  }
  for (int64_t j = k0 + warp; j < k1; j += int64_t(U) * kDcWarps) {
    float kv[U][DPL], vv[U][DPL];
    bool ok[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      int64_t jj = j + int64_t(u) * kDcWarps;
      ok[u] = jj < k1;
      if (ok[u]) {
        load_dims<T, DPL>(kb + jj * c_row + d0, kv[u], vec, valid);
        load_dims<T, DPL>(vb + jj * c_row + d0, vv[u], vec, valid);
      } else {
#pragma unroll
        for (int i = 0; i < DPL; ++i) kv[u][i] = vv[u][i] = 0.f;
      }
    }
#pragma unroll
    for (int g = 0; g < G; ++g) {
      if (g >= n_heads) break;
      float sc[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float d = 0.f;
#pragma unroll
        for (int i = 0; i < DPL; ++i) d = fmaf(qv[g][i], kv[u][i], d);
        sc[u] = d;
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1)
#pragma unroll
        for (int u = 0; u < U; ++u) sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], o);
      float mx = m[g];
#pragma unroll
      for (int u = 0; u < U; ++u)
        if (ok[u]) mx = fmaxf(mx, sc[u]);
      float alpha = m[g] == -INFINITY ? 0.f : expf(m[g] - mx);
      float p[U];
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        p[u] = ok[u] ? expf(sc[u] - mx) : 0.f;
        psum += p[u];
      }
      l[g] = l[g] * alpha + psum;
#pragma unroll
      for (int i = 0; i < DPL; ++i) {
        float a = acc[g][i] * alpha;
#pragma unroll
        for (int u = 0; u < U; ++u) a = fmaf(p[u], vv[u][i], a);
        acc[g][i] = a;
      }
      m[g] = mx;
    }
  }
  // Merge the warps.
  __shared__ float sm_ml[kDcWarps][G][2];
  __shared__ float sm_acc[kDcWarps][G][32 * DPL];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    if (lane == 0) {
      sm_ml[warp][g][0] = m[g];
      sm_ml[warp][g][1] = l[g];
    }
#pragma unroll
    for (int i = 0; i < DPL; ++i) sm_acc[warp][g][d0 + i] = acc[g][i];
  }
  __syncthreads();
  // Warp w finalises heads w, w + kDcWarps, ...
  for (int g = warp; g < n_heads; g += kDcWarps) {
    float mm = -INFINITY;
    for (int w = 0; w < kDcWarps; ++w) mm = fmaxf(mm, sm_ml[w][g][0]);
    float ll = 0.f, o[DPL];
#pragma unroll
    for (int i = 0; i < DPL; ++i) o[i] = 0.f;
    for (int w = 0; w < kDcWarps; ++w) {
      float f = sm_ml[w][g][0] == -INFINITY ? 0.f : expf(sm_ml[w][g][0] - mm);
      ll += sm_ml[w][g][1] * f;
#pragma unroll
      for (int i = 0; i < DPL; ++i) o[i] += sm_acc[w][g][d0 + i] * f;
    }
    const int64_t row = bs * h_len + h0 + g;
    if (n_split == 1) {
      float inv = ll > 0.f ? 1.f / ll : 0.f;
#pragma unroll
      for (int i = 0; i < DPL; ++i)
        if (i < valid) store_rt(out, to, row * dh + d0 + i, o[i] * inv);
    } else {
      int64_t pi = row * n_split + split;
      if (lane == 0) {
        part_ml[pi * 2] = mm;
        part_ml[pi * 2 + 1] = ll;
      }
#pragma unroll
      for (int i = 0; i < DPL; ++i)
        if (i < valid) part_acc[pi * dh + d0 + i] = o[i];
    }
  }
}

// One block per row: merges the n_split partials.
__global__ void attn_decode_merge_kernel(void* out, Elt to, const float* part_acc, const float* part_ml, int dh,
                                         int n_split) {
  const int64_t row = blockIdx.x;
  const float* ml = part_ml + row * n_split * 2;
  float mm = -INFINITY;
  for (int sp = 0; sp < n_split; ++sp) mm = fmaxf(mm, ml[sp * 2]);
  float ll = 0.f;
  for (int sp = 0; sp < n_split; ++sp)
    if (ml[sp * 2] != -INFINITY) ll += ml[sp * 2 + 1] * expf(ml[sp * 2] - mm);
  float inv = ll > 0.f ? 1.f / ll : 0.f;
  for (int d = threadIdx.x; d < dh; d += blockDim.x) {
    float o = 0.f;
    for (int sp = 0; sp < n_split; ++sp)
      if (ml[sp * 2] != -INFINITY) o += part_acc[(row * n_split + sp) * dh + d] * expf(ml[sp * 2] - mm);
    store_rt(out, to, row * dh + d, o * inv);
  }
}

template <class T, int DPL, int G>
void launch_decode_g(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past) {
  int b = int(q.dim(0)), s = int(q.dim(1)), h = int(q.dim(2)), dh = int(q.dim(3)), hkv = int(k_cache.dim(2));
  int g_len = h / hkv;
  int n_hchunks = (g_len + G - 1) / G;
  int64_t rows = int64_t(b) * s * h;                        // output rows
  int64_t blocks_y = int64_t(b) * s * hkv * n_hchunks;       // (row group) blocks per split
  int64_t l_max = past + s;
  int sms = sm_count() > 0 ? sm_count() : 80;
  // Enough blocks for ~4 waves of the SMs, but no split shorter than 32 keys. (Measured on an
  // H100 against 128-key splits with 8 keys per step: better at batch 1, worse at batch 8.)
  int64_t want = (4 * int64_t(sms) + blocks_y - 1) / blocks_y;
  int n_split = int(std::max<int64_t>(1, std::min<int64_t>({want, (l_max + 31) / 32, 256})));
  int64_t chunk = (l_max + n_split - 1) / n_split;
  n_split = int((l_max + chunk - 1) / chunk);
  MOE_CHECK(blocks_y <= 65535, "attention_forward: %lld decode rows exceed the CUDA grid", (long long)blocks_y);
  // Vector loads need every lane's DPL dims in range and 16-byte aligned bases (rows then start
  // at multiples of 32*DPL*sizeof(T) bytes).
  bool vec = dh == 32 * DPL && (reinterpret_cast<uintptr_t>(q.raw()) | reinterpret_cast<uintptr_t>(k_cache.raw()) |
                                reinterpret_cast<uintptr_t>(v_cache.raw())) % 16 == 0;
  const SplitPartials parts = split_partials(rows, n_split, dh);
  float* part_acc = parts.acc;
  float* part_ml = parts.ml;
  dim3 grid{unsigned(n_split), unsigned(blocks_y)};
  Elt to = elt_of(out.dtype());
  attn_decode_kernel<T, DPL, G><<<grid, kDcWarps * 32, 0, stream()>>>(
      out.raw(), to, part_acc, part_ml, q.data<T>(), k_cache.data<T>(), v_cache.data<T>(), s, h, hkv, dh,
      k_cache.dim(1), past, float(1.0 / std::sqrt(double(dh))), chunk, n_split, vec, n_hchunks);
  MOE_CUDA_LAUNCH_CHECK();
  if (n_split > 1) {
    attn_decode_merge_kernel<<<unsigned(rows), 128, 0, stream()>>>(out.raw(), to, part_acc, part_ml, dh, n_split);
    MOE_CUDA_LAUNCH_CHECK();
  }
}

template <class T, int DPL>
void launch_decode(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past) {
  int64_t g_len = q.dim(2) / k_cache.dim(2);
  if (g_len <= 1)
    launch_decode_g<T, DPL, 1>(out, q, k_cache, v_cache, past);
  else if (g_len <= 2)
    launch_decode_g<T, DPL, 2>(out, q, k_cache, v_cache, past);
  else if (g_len <= 4 || DPL >= 8)
    launch_decode_g<T, DPL, 4>(out, q, k_cache, v_cache, past);
  else
    launch_decode_g<T, DPL, 8>(out, q, k_cache, v_cache, past);
}

template <class T>
void dispatch_dh(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past) {
  int dh = int(q.dim(3));
  bool decode = q.dim(1) <= kDecodeMaxS;
#define MOE_ATTN_CASE(DPL)                                         \
  if (dh <= 32 * DPL) {                                            \
    if (decode)                                                    \
      launch_decode<T, DPL>(out, q, k_cache, v_cache, past);       \
    else                                                           \
      launch_prefill<T, DPL>(out, q, k_cache, v_cache, past);      \
    return;                                                        \
  }
  MOE_ATTN_CASE(1)
  MOE_ATTN_CASE(2)
  MOE_ATTN_CASE(4)
  MOE_ATTN_CASE(8)
#undef MOE_ATTN_CASE
  MOE_FAIL("attention_forward: head dim %d > 256 is not supported on CUDA", dh);
}

}  // namespace

void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past) {
  MOE_CHECK(k_cache.dtype() == q.dtype() && v_cache.dtype() == q.dtype(),
            "attention_forward: CUDA needs q and the caches in one dtype, got %s/%s/%s", dtype_name(q.dtype()),
            dtype_name(k_cache.dtype()), dtype_name(v_cache.dtype()));
  if (q.numel() == 0) return;
  MOE_CHECK(q.dim(0) <= 65535 && q.dim(2) <= 65535, "attention_forward: %s exceeds the CUDA grid",
            q.shape_str().c_str());
  // bf16 prefill with Dh 64/128: the tensor-core kernel (attention_mma.cu); else the kernels here.
  if (q.dim(1) > kDecodeMaxS && attention_prefill_mma(out, q, k_cache, v_cache, past)) return;
  // bf16/f16 decode with Dh 64/128 and <= 8 heads per kv head: 16-byte loads (attention_decode.cu).
  if (q.dim(1) <= kDecodeMaxS && attention_decode_vec(out, q, k_cache, v_cache, past)) return;
  MOE_CUDA_FLOAT_SWITCH(q.dtype(), T, dispatch_dh<T>(out, q, k_cache, v_cache, past));
}

SplitPartials split_partials(int64_t rows, int n_split, int64_t dh) {
  if (n_split <= 1) return {};
  const size_t acc_bytes = (size_t(rows) * n_split * dh * sizeof(float) + 255) / 256 * 256;
  char* ws = static_cast<char*>(workspace(acc_bytes + size_t(rows) * n_split * 2 * sizeof(float)));
  return {reinterpret_cast<float*>(ws), reinterpret_cast<float*>(ws + acc_bytes)};
}

}  // namespace cuda
}  // namespace moe
