// attention_mma.cuh — the tensor-core causal GQA prefill (flash-attention 2 structure) for bf16.
// Internal to src/ops/cuda; implemented in attention_mma.cu, called by attention.cu.
#pragma once
#include "core/tensor.h"

namespace moe {
namespace cuda {

// Runs attention_forward (ops.h semantics) with the tensor-core prefill kernel when it applies:
// bf16 q/caches/out, Dh 64 or 128, 16-byte aligned bases, a GPU of compute capability 8.0+.
// Returns false (having done nothing) otherwise; the caller then uses the f32-core kernel.
// MOE_CUDA_ATTN_PREFILL=simt forces false (for comparisons).
bool attention_prefill_mma(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                           int64_t past);

// Decode (S <= 8) for bf16/f16 with Dh 64 or 128 and at most 8 query heads per kv head: 16-byte
// loads (Dh/8 lanes per key row, several rows per warp, 4 load steps in flight), all query heads
// of a kv head per block, the key range split over enough blocks to fill the GPU, and a parallel
// merge. Returns false (having done nothing) when it does not apply; MOE_CUDA_ATTN_DECODE=old
// forces false.
bool attention_decode_vec(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                          int64_t past);

// Split-K decode partials in the backend workspace: acc [rows][n_split][dh] f32, then ml
// [rows][n_split][2] (running max, sum). Both null when n_split == 1 (no merge pass).
struct SplitPartials {
  float* acc = nullptr;
  float* ml = nullptr;
};
SplitPartials split_partials(int64_t rows, int n_split, int64_t dh);

}  // namespace cuda
}  // namespace moe
