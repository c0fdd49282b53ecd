// mla_block.h — Multi-head Latent Attention (DeepSeek-V2/V3), the attention half of an MLA decoder
// layer: x_mid = x_in + o_proj(attention(q, k, v)) where, per token,
//   q      = q_b_proj(rmsnorm(q_a_proj(h)))  (or q_proj(h)),  h = rmsnorm(x_in)      [H, Dn+Dr]
//   kv_a   = kv_a_proj_with_mqa(h) = [c_kv | k_pe]                                  [Rkv + Dr]
//   c      = rmsnorm(c_kv) (kv_a_layernorm, eps 1e-6 as HF builds it)               [Rkv]
//   [k_nope | v] per head = kv_b_proj(c)                                            [H, Dn+Dv]
//   query = [q_nope | rope(q_pe)], key = [k_nope | rope(k_pe)] (k_pe shared by the heads),
//   softmax scale (Dn+Dr)^-1/2 (× yarn mscale² where the family applies it, ArchSpec).
// RoPE runs over the Dr rope columns only, with the config's pair convention (interleaved pairs
// for V2's complex form and V3's rope_interleave, giving HF's scores).
//
// Inference is the absorbed form: kv_b_proj is folded into the query (q_nope·W_k per head, a
// query in the latent space) and the output (latent output·W_vᵀ per head), so the KV cache holds
// only [c | rope(k_pe)] per token (Rkv + Dr values, model.h KVCache) and attention is one-kv-head
// attention over it. A fresh prefill (every row at position 0, contiguous cache) runs the plain
// form instead — Dn+Dr-wide dot products and one kv_b_proj GEMM rather than Rkv+Dr-wide ones and
// per-head absorption products — and caches the same latent. Training runs the plain form (per-head keys and values; the value is padded
// with zeros to the key width Dn+Dr so the shared attention ops apply, and the padded columns'
// outputs are dropped).
//
// Training forward saves (LayerActs): x_in, attn_rstd, attn_h; mla_cq / mla_cq_rstd / mla_cqn
// (the q latent before and after its norm, q_lora_rank > 0), mla_ckv / mla_ckv_rstd / mla_ckn (the
// kv latent before and after its norm), q, k, v ([B,S,H,Dn+Dr], v padded), attn_out, lse.
#pragma once
#include <vector>

#include "io/hf_config.h"
#include "model/activations.h"
#include "model/model.h"

namespace moe {

// The attention softmax scale of an MLA config (see above).
float mla_softmax_scale(const ModelConfig& c);

// Inference, as attention_block_infer with the latent cache (k_cache = v_cache: [B,C,1,Rkv+Dr], or
// pages [N,P,1,Rkv+Dr] with `tables`/`pos`).
void mla_block_infer(const ModelConfig& c, const LayerWeights& w, Tensor& x, Tensor& h, Tensor& y, Tensor& cache,
                     int64_t batch, int64_t seq, const std::vector<int64_t>& slots, const std::vector<int64_t>& past,
                     const Tensor& tables, const Tensor& pos);

// Training forward: reads a.x_in, fills the saved tensors listed above and a.x_mid.
void mla_block_forward(const ModelConfig& c, const LayerWeights& w, LayerActs& a);

// Backward: from dx_mid [T,D] computes dx_in [T,D] (assigned) and accumulates the layer's MLA
// parameter (and adapter) gradients into g.
void mla_block_backward(const ModelConfig& c, const LayerWeights& w, const LayerActs& a, const Tensor& dx_mid,
                        Tensor& dx_in, LayerWeights& g);

}  // namespace moe
