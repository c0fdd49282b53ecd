// router_dispatch.cu — router top-k and the MoE dispatch (counts, offsets, stable permutation)
// on CUDA, entirely on the device: no host synchronisation.
//
// moe_dispatch runs in ONE block of W warps. The P = T*K assignments are cut into W contiguous
// segments, one per warp. Pass 1: each warp walks its segment 32 assignments at a time and
// counts per expert into its own row cnt[w][e] (lanes with the same expert are grouped with
// __match_any_sync, the group's lowest lane adds the group size). Then per expert an exclusive
// scan over warps turns counts into each warp's starting rank, and a scan over experts gives
// offsets. Pass 2 walks the segments again in the same order: the rank of an assignment is
// offsets[e] + warp start + earlier lanes of its group in this step + earlier steps. Every
// assignment's rank therefore counts exactly the assignments before it (in flat order) with
// the same expert: the permutation is stable.
#include <algorithm>

#include "ops/backend.h"
#include "ops/cuda/kernel_util.cuh"

namespace moe {
namespace cuda {
namespace {

// One thread per token. probabilities = softmax(logits[t,:]); the K largest by (value desc,
// index asc); optional renormalisation.
__global__ void router_topk_kernel(int32_t* idx, float* w, const float* logits, const float* bias, int64_t t_len,
                                   int e_len, int k, bool renorm) {
  int64_t t = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (t >= t_len) return;
  const float* l = logits + t * e_len;
  float mx = -INFINITY;
  for (int e = 0; e < e_len; ++e) mx = fmaxf(mx, l[e]);
  float sum = 0.f;
  for (int e = 0; e < e_len; ++e) sum += expf(l[e] - mx);
  float inv_sum = 1.f / sum;
  // Selection by logit equals selection by probability (and matches the CPU reference on ties);
  // with a selection bias the score is probability + bias.
  auto score = [&](int e) { return bias ? expf(l[e] - mx) * inv_sum + bias[e] : l[e]; };
  float prev_v = INFINITY;
  int prev_i = -1;
  float sel_sum = 0.f;
  for (int j = 0; j < k; ++j) {
    // The next element in (value desc, index asc) order after (prev_v, prev_i).
    float best_v = -INFINITY;
    int best_i = -1;
    for (int e = 0; e < e_len; ++e) {
      float v = score(e);
      bool after_prev = v < prev_v || (v == prev_v && e > prev_i);
      if (after_prev && (best_i < 0 || v > best_v)) {
        best_v = v;
        best_i = e;
      }
    }
    float pr = expf(l[best_i] - mx) * inv_sum;
    idx[t * k + j] = best_i;
    w[t * k + j] = pr;
    sel_sum += pr;
    prev_v = best_v;
    prev_i = best_i;
  }
  if (renorm) {
    float r = 1.f / sel_sum;
    for (int j = 0; j < k; ++j) w[t * k + j] *= r;
  }
}

// Dynamic shared memory: cnt [W][E] ints, then total/offsets [E+1] ints.
__global__ void dispatch_kernel(int32_t* offsets, int32_t* perm, int32_t* inv, const int32_t* ids, int64_t p_len,
                                int e_len) {
  extern __shared__ int32_t sm[];
  const int n_warps = blockDim.x / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  int32_t* cnt = sm;                       // [W][E]
  int32_t* off = sm + n_warps * e_len;     // [E+1]
  for (int i = threadIdx.x; i < n_warps * e_len; i += blockDim.x) cnt[i] = 0;
  __syncthreads();
  int64_t seg = (p_len + n_warps - 1) / n_warps;
  int64_t begin = std::min<int64_t>(p_len, warp * seg), end = std::min<int64_t>(p_len, begin + seg);
  int32_t* my = cnt + warp * e_len;
  const unsigned lt_mask = (1u << lane) - 1u;
  // Pass 1: per-warp counts.
  for (int64_t base = begin; base < end; base += 32) {
    int64_t a = base + lane;
    int e = a < end ? ids[a] : -1;
    unsigned grp = __match_any_sync(0xffffffffu, e);
    if (e >= 0 && (grp & lt_mask) == 0) my[e] += __popc(grp);
    __syncwarp();
  }
  __syncthreads();
  // Per expert: exclusive scan over warps; totals into off[e].
  for (int e = threadIdx.x; e < e_len; e += blockDim.x) {
    int run = 0;
    for (int w = 0; w < n_warps; ++w) {
      int c = cnt[w * e_len + e];
      cnt[w * e_len + e] = run;
      run += c;
    }
    off[e] = run;
  }
  __syncthreads();
  // Exclusive scan over experts (E is small; warp 0 does it 32 at a time).
  if (warp == 0) {
    int carry = 0;
    for (int base = 0; base < e_len; base += 32) {
      int e = base + lane;
      int v = e < e_len ? off[e] : 0;
      int incl = v;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        int u = __shfl_up_sync(0xffffffffu, incl, o);
        if (lane >= o) incl += u;
      }
      if (e < e_len) off[e] = carry + incl - v;
      carry += __shfl_sync(0xffffffffu, incl, 31);
    }
    if (lane == 0) off[e_len] = carry;
  }
  __syncthreads();
  for (int e = threadIdx.x; e <= e_len; e += blockDim.x) offsets[e] = off[e];
  // Pass 2: stable placement.
  for (int64_t base = begin; base < end; base += 32) {
    int64_t a = base + lane;
    int e = a < end ? ids[a] : -1;
    unsigned grp = __match_any_sync(0xffffffffu, e);
    if (e >= 0) {
      int rank = off[e] + my[e] + __popc(grp & lt_mask);
      perm[rank] = int32_t(a);
      inv[a] = rank;
    }
    __syncwarp();
    if (e >= 0 && (grp & lt_mask) == 0) my[e] += __popc(grp);
    __syncwarp();
  }
}

}  // namespace

void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, bool renorm,
                         const Tensor& select_bias) {
  int64_t t = logits.dim(0);
  if (t == 0) return;
  int e = int(logits.dim(1)), k = int(topk_idx.dim(1));
  const float* bias = select_bias.defined() ? select_bias.data<float>() : nullptr;
  router_topk_kernel<<<ceil_div(t, 128), 128, 0, stream()>>>(topk_idx.data<int32_t>(), topk_w.data<float>(),
                                                             logits.data<float>(), bias, t, e, k, renorm);
  MOE_CUDA_LAUNCH_CHECK();
}

void moe_dispatch(Tensor& offsets, Tensor& perm, Tensor& inv, const Tensor& topk_idx, int64_t n_expert) {
  int64_t p = topk_idx.numel();
  int e = int(n_expert);
  // As many warps as fit 48 KB of counters, at most 32, and no more than the work needs.
  int warps = int(std::min<int64_t>(32, std::max<int64_t>(1, (48 * 1024 / 4 - (e + 1)) / std::max(e, 1))));
  warps = int(std::min<int64_t>(warps, std::max<int64_t>(1, (p + 255) / 256)));
  size_t smem = size_t(warps * e + e + 1) * sizeof(int32_t);
  MOE_CHECK(smem <= 48 * 1024, "moe_dispatch: %d experts is more than the CUDA dispatch kernel holds", e);
  dispatch_kernel<<<1, warps * 32, smem, stream()>>>(offsets.data<int32_t>(), perm.data<int32_t>(),
                                                     inv.data<int32_t>(), topk_idx.data<int32_t>(), p, e);
  MOE_CUDA_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace moe
