// ffn_block.h — the feed-forward half of a decoder layer, forward and backward: the MoE block
// (router, dispatch, grouped SwiGLU experts, combine, optional gated shared expert) or a dense
// SwiGLU MLP:   x_out = x_mid + ffn(rmsnorm(x_mid)).
//
// Training forward saves (LayerActs): x_mid (written by the attention block), ffn_rstd, ffn_h;
// MoE: router_logits (full [T,E]: backward recomputes the softmax from them), topk_idx,
// topk_w, offsets/perm/inv, row_scale, xp (gathered rows) and eh1/eh3 (expert
// pre-activations; SwiGLU's output is recomputed), shared expert sh1/sh3, s_out, s_gate;
// dense: dh1/dh3. It writes x_out, a new tensor (the next layer's x_in).
// gpt_oss: the router linear has a bias (LayerWeights::brouter) and the experts biases
// (b1/b3/b2) and the clamped SwiGLU (ModelConfig::swiglu_limit), through the same grouped ops.
// Activation memory is O(T·K·F) (only the rows routed to each expert), never O(T·E·F).
#pragma once
#include <functional>
#include <vector>

#include "dist/communicator.h"
#include "io/hf_config.h"
#include "model/activations.h"
#include "model/model.h"
#include "ops/variants.h"

namespace moe {

// Router balancing figures of one MoE layer for one step (for the aux/z losses and metrics).
struct RouterStats {
  std::vector<float> prob_sum;  // [E] sum over tokens of the router softmax
  std::vector<float> count;     // [E] tokens routed to each expert (over all K slots)
  double z_sum = 0;             // sum over tokens of logsumexp(logits)^2
  int64_t dropped = 0;          // assignments dropped over the capacity (0 when dropless)
};

// Routing options of the training forward (DESIGN.md "The MoE block", step 1).
struct RouteOptions {
  // Switch-style capacity: each expert takes at most ceil(factor · T·K / E) rows per layer and
  // step, earliest tokens first; the rest are dropped (the token passes through the residual).
  // 0: dropless (the default).
  double capacity_factor = 0;
  // Expert parallel: the EP group over which this layer's routed experts are spread (rank q owns
  // experts [q·El, (q+1)·El), El = w.w1.dim(0)); rows travel to their owner and back
  // (dist/expert_exchange.h). Null: every expert is local.
  dist::Communicator* ep = nullptr;
};

// The router rules of the config's family (ops/variants.h): softmax or sigmoid scores, grouped
// selection, renormalisation, routed_scaling_factor.
RouterVariant router_variant(const ModelConfig& c);

// Rows one expert may take for T tokens under `capacity_factor` (> 0).
int64_t expert_capacity(double capacity_factor, int64_t t_n, int64_t k, int64_t e_n);

// Inference: x [T,D] updated in place; h, y [T,D] scratch. Router logits are returned in
// `router_logits` [T,E] f32 when it is defined on entry.
// ep (expert parallel, Model::set_expert_parallel): the same tokens on every rank of ep; this
// rank computes its own experts' rows (w.w1 holds El of the E experts) and the outputs are
// summed over ep (CPU, f32 activations).
void ffn_block_infer(const ModelConfig& c, const LayerWeights& w, Tensor& x, Tensor& h, Tensor& y,
                     Tensor* router_logits, dist::Communicator* ep = nullptr);

// Training forward: reads a.x_mid, fills the saved tensors and writes x_out [T,D];
// MoE layers fill `stats`.
// The router's selection uses w.router_bias when the layer has one (bias balancing).
void ffn_block_forward(const ModelConfig& c, const LayerWeights& w, LayerActs& a, Tensor& x_out, RouterStats* stats,
                       const RouteOptions& ro);

// The balancing-loss gradient terms one MoE layer's backward adds to its router logits (see
// router_balance_backward in ops.h); aux_g undefined = no aux term.
struct BalanceGrad {
  Tensor aux_g;           // [E] f32
  float aux_scale = 0;
  float z_scale = 0;
};

// Backward: from dx_out [T,D] computes dx_mid [T,D] (assigned) and accumulates the layer's
// feed-forward parameter gradients into g. Expert weight gradients are touched only for
// experts that received rows. ep: the forward's EP group (RouteOptions::ep).
// per_expert (the fused update's expert groups; needs the experts' gradients g.w1/w3/w2
// undefined, no expert parallelism, adapters or biases on the experts): each routed expert's
// weight gradients are computed into one expert-sized buffer set, in turn, and handed to
// per_expert(e, dw1 [F,D], dw3 [F,D], dw2 [D,F]) — every expert, a zero gradient for one without
// rows — so a layer holds one expert's weight gradients, not E. The same products, split the
// same way: the gradients equal the stacked ones bit for bit.
using ExpertGradFn = std::function<void(int64_t e, const Tensor& dw1, const Tensor& dw3, const Tensor& dw2)>;
// Whether a layer's routed experts can be taken one at a time (per_expert): a MoE layer whose
// experts carry no adapters or biases.
bool experts_one_at_a_time(const LayerWeights& w);
void ffn_block_backward(const ModelConfig& c, const LayerWeights& w, const LayerActs& a, const Tensor& dx_out,
                        Tensor& dx_mid, LayerWeights& g, const BalanceGrad& bal, dist::Communicator* ep = nullptr,
                        const ExpertGradFn* per_expert = nullptr);

}  // namespace moe
