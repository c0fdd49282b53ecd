// attention_block.h — the attention half of a decoder layer, forward and backward:
//   x_mid = x_in + o_proj(attention(rope(qk_norm(split(wqkv · rmsnorm(x_in))))))
//
// One q/k/v projection path for every T: the stacked weight wqkv, its output split into q, k
// and v (views for one token, column copies otherwise). In training the projections go through
// the model's linear helper (linear.h), the one place LoRA applies: q/k/v adapters add into
// their parts of the stacked output, o_proj's into its own.
//
// Family variants come from the config and the layer (ops/variants.h): RoPE through the config's
// table (YaRN), a per-head sink logit in every softmax row (LayerWeights::sinks) and the layer's
// sliding window (LayerWeights::attn_window); backward adds the sinks' gradient.
//
// Training forward saves (LayerActs): x_in, attn_rstd, attn_h (normed input), q_pre/k_pre and
// q_rstd/k_rstd (q/k norm only), q, k (normed and rotated), v, attn_out, lse (attention's row
// log-sum-exp: backward recomputes the probabilities from it), and writes x_mid. Nothing it
// saves is overwritten later in the step: the residual add writes a new tensor (x_mid).
#pragma once
#include <vector>

#include "io/hf_config.h"
#include "model/activations.h"
#include "model/model.h"

namespace moe {

// The config's RoPE table (default or YaRN, core/rope_scaling.h; interleaved pairs when the
// config says so) over head_dim, built once per thread and config: a decode step must not allocate.
const RopeTable& rope_table_of(const ModelConfig& c);

// Inference: x [T,D] (T = batch·seq) is updated in place (x += attention); row b's keys and
// values go to cache slot slots[b] at positions [past[b], past[b]+seq), and its queries attend
// that slot's positions up to their own. Rows may be at different positions. `h` [T,D] and
// `y` [T,D] are scratch. With a paged cache (`tables` defined: [B,M] i32 block tables of the
// rows, `pos` [B] i32 = past) the caches are pages [N,P,Hkv,Dh] (ops.h) and `slots` is unused.
void attention_block_infer(const ModelConfig& c, const LayerWeights& w, Tensor& x, Tensor& h, Tensor& y,
                           Tensor& k_cache, Tensor& v_cache, int64_t batch, int64_t seq,
                           const std::vector<int64_t>& slots, const std::vector<int64_t>& past,
                           const Tensor& tables = Tensor(), const Tensor& pos = Tensor());

// Training forward: reads a.x_in, fills the saved tensors listed above and a.x_mid.
// `qkv` [T,(H+2Hkv)Dh] is scratch.
void attention_block_forward(const ModelConfig& c, const LayerWeights& w, LayerActs& a, Tensor& qkv);

// Backward: from dx_mid [T,D] computes dx_in [T,D] (assigned) and accumulates the layer's
// attention parameter gradients into g (undefined gradient tensors are skipped).
// `dqkv` [T,(H+2Hkv)Dh] is scratch.
void attention_block_backward(const ModelConfig& c, const LayerWeights& w, const LayerActs& a,
                              const Tensor& dx_mid, Tensor& dx_in, LayerWeights& g, Tensor& dqkv);

}  // namespace moe
