// cpu_scratch.h — per-thread scratch arrays that CPU kernels reuse from call to call.
//
// A kernel's temporary array (a row of attention scores, a chunk of widened weights, a top-k
// order) would otherwise be a heap allocation per call: several per layer per decoded token.
// Each thread keeps one buffer per slot, grown (geometrically) only when a call needs more than
// any earlier call on that thread, so a decode loop in its steady state does not allocate
// (tests/test_decode_alloc.cpp). A slot is one call site: a kernel that calls another kernel
// uses a different slot from the callee, so their arrays never alias. Contents are undefined
// on return (not zeroed).
#pragma once
#include <cstddef>

namespace moe {
namespace cpu {

enum class Scratch : int {
  GemmWidened,   // cpu_gemm: a chunk of bf16/f16 weight rows widened to f32
  GemmBf16,      // cpu_gemm: a chunk of block-quantized weight rows as bf16 (matrix units)
  GemvX,         // cpu_gemm: the streaming kernel's x rows, de-interleaved for bf16 weights
  PanelX,        // cpu_gemm_bf16dot: x rounded to bf16 for the panel kernel
  MatrixX,       // cpu_gemm_onednn: x rounded to bf16, rows padded
  MatrixB,       //                  the second factor rounded to bf16 (dW's x), rows padded
  MatrixPad,     //                  oneDNN's scratchpad for the matmul (packed factors)
  MatrixOut,     //                  the product before it goes to out's rows
  LinearBias,    // linear_forward: the bias as f32
  AttnScores,    // attention_forward: one query row's scores (prefill: a block of rows')
  AttnKeysT,     // attention_forward: prefill, a block's keys transposed
  AttnGathered,  // attention_forward_paged: prefill, a block's keys and values from their pages
  NormWeight,    // rmsnorm: the weight as f32
  RopeCos,       // rope: cos per (position, pair)
  RopeSin,       //       sin
  TopkScore,     // router_topk_forward: selection scores of one token
  TopkOrder,     //                      expert order of one token
  DispatchNext,  // moe_dispatch: next free row per expert
  ExpertH1,      // expert_ffn_forward: [rows,F] gate pre-activations
  ExpertH3,      //                     [rows,F] up pre-activations
  ExpertBias,    //                     one expert's biases as f32 (variants.h)
  kCount
};

// At least `bytes` bytes, 16-byte aligned, owned by the calling thread until its next call
// with the same slot.
void* scratch_bytes(Scratch slot, size_t bytes);

template <class T>
T* scratch(Scratch slot, size_t n) {
  return static_cast<T*>(scratch_bytes(slot, n * sizeof(T)));
}

}  // namespace cpu
}  // namespace moe
