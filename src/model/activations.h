// activations.h — the one activation layout (DESIGN.md invariant 7): every buffer a forward
// (and backward) uses, as a size table computed from the config, the batch shape and the mode.
//
// The engine allocates from this table (alloc_acts, alloc_step_acts) and `moe plan` sums the
// same table (total_bytes), so the two agree by construction; the planner-vs-engine test
// (tests/test_plan.cpp, PlanVsEngine.TrainingPeakMemoryPerCategory) checks the rest against
// the tracker's measured peak of the Activations category.
//
// Modes:
//   Inference          — no table yet: Model::forward sizes its own buffers and the planner
//                        predicts them with engine_forward_activation_bytes (plan/planner.h);
//   Training           — every layer keeps its saved activations until its backward;
//   TrainingRecompute  — every layer keeps only its input (the residual stream); backward
//                        re-runs that layer's forward into one shared set of saved buffers.
//
// A training step's activation memory has three parts; total_bytes() is their sum, and it is
// the step's peak exactly (not an upper bound), because the first two are allocated before
// anything else and freed after everything else:
//   1. entries — LayerActs fields (alloc_acts): PerLayer entries once per layer (attention +
//      feed-forward block of that layer), Shared entries once per model (the head, the
//      recompute set, the stacked q/k/v scratch).
//   2. step    — StepActs fields (alloc_step_acts), once per step: token ids and targets, the
//      loss rows, the aux-loss factor and the three [T,D] gradients that flow backward. Their
//      lifetimes are arranged so that none needs a buffer of its own: the head's gradient
//      dfinal_h and the recompute forward's output are both dx_in (free at those moments).
//   3. phases  — the working set: temporaries a block allocates and frees inside one call
//      (attention_block_backward's dq/dk/dv, ffn_block_backward's dh/dyp/dxp, the SwiGLU
//      temporaries, the head's logits chunk, ...). Phases never overlap in time, so the
//      working set is the MAX over the phases the config has (not their sum). Each phase
//      lists what is live at its high-water mark; a temporary freed before the next is
//      allocated appears in the phase before and not in the one after. Phases mirror
//      attention_block.cpp, ffn_block.cpp and the head in model_train.cpp allocation by
//      allocation; if those change, the test above fails until this table does.
// Everything in training is f32 (the CPU engine) but the experts' pre-activations under bf16
// expert weights (activation_layout's expert_h). Op kernels' scratch is Workspace, not here.
// An evaluation forward (no gradients) allocates the entries, the non-backward step buffers
// and the forward phases only: the table is then an upper bound.
#pragma once
#include <memory>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "dist/expert_exchange.h"
#include "io/hf_config.h"

namespace moe {

enum class ActMode { Inference, Training, TrainingRecompute };

struct ActEntry {
  std::string name;  // the LayerActs / StepActs field it backs (phases: the block's local name)
  Shape shape;
  DType dtype;
  bool per_layer = false;  // once per layer (else once per model / step)
  bool moe_only = false;   // only MoE layers have it (dense layers have the dense_* entries instead)
  bool dense_only = false;
  bool backward = false;   // step buffers: allocated only when the step computes gradients
  int64_t bytes() const;
};

// One phase of the working set: the temporaries live at its high-water mark.
struct ActPhase {
  std::string name;  // "<function>.<stage>", e.g. "ffn_block_backward.experts"
  bool moe_only = false, dense_only = false;  // which layers run it
  std::vector<ActEntry> live;
  int64_t bytes() const;
};

struct ActivationLayout {
  ActMode mode;
  int64_t batch = 0, seq = 0;
  int64_t logits_chunk = 0;  // rows of the LM head computed at once in training
  std::vector<ActEntry> entries;  // LayerActs fields
  std::vector<ActEntry> step;     // StepActs fields
  std::vector<ActPhase> phases;   // the working set (max over phases)
  // Bytes the layout implies for a config: per-layer entries times the layers that have them.
  int64_t entry_bytes(const ModelConfig& c) const;
  int64_t step_bytes(const ModelConfig& c) const;
  // The largest phase the config runs (MoE phases need a MoE layer, dense ones a dense layer);
  // `which`, when given, receives its name.
  int64_t working_bytes(const ModelConfig& c, std::string* which = nullptr) const;
  // The peak of the Activations category during one training step (forward_backward).
  int64_t total_bytes(const ModelConfig& c) const;
};

// Rows of the LM-head logits held at once when computing the loss (chunked cross-entropy), where
// the head's products are f32: the chunk becomes its own gradient, and dX = dY·W and dW += dYᵀ·X
// read it. The head is a training step's memory peak on Mixtral-shaped models: 128 rows measured
// 25 MiB below 256 at the same head time (Zen 4); 64 saved 2 MiB more and made the products ~20%
// slower.
constexpr int64_t kLogitsChunkRows = 128;
// Where the head's products are bf16 (ops.h bf16_products), the gradient is rounded to bf16 into
// the first half of the chunk's own bytes (cast_bf16_in_place), so a chunk twice as tall holds
// what 128 f32 rows and a second bf16 copy of 256 rows held before. Mixtral-shaped head on Zen 5
// (bf16 peak ~1 TFLOP/s), the three products over 1024 rows: 128-row chunks with dW once per two
// chunks 160-163 ms, 256-row chunks 137-144 ms (forward and dX 660-690 -> 800-860 GFLOP/s; dW
// re-reads the f32 [V, D] gradient once a chunk: 540-580 GFLOP/s), 384 rows 141, 512 rows 134
// for 33 MiB more.
constexpr int64_t kBf16LogitsChunkRows = 256;
// A frozen head (LoRA, QLoRA) holds no [V, D] gradient beside its chunk, so its chunk is twice as
// tall: each chunk reads the head's weight twice (its forward and dX products), and at 256 rows
// the Mixtral-shaped attention-LoRA step's head took 0.095-0.099 s against 0.105-0.116 at 128
// (Zen 5), for 22 MiB more training memory (0.21 of the peer's overhead against 0.17); 512 and
// whole-batch chunks were slower again (0.11-0.14 s: the chunk no longer stays in cache). Under
// bf16 products its gradient is rounded in place too, as the training head's is.
constexpr int64_t kFrozenLogitsChunkRows = 256;

// How the step's LM head takes its gradient, which sets the head's chunk rows:
//   Trains      f32 products: kLogitsChunkRows, the gradient written over the chunk;
//   TrainsBf16  bf16 products: kBf16LogitsChunkRows, the gradient then rounded to bf16 in place;
//   Frozen      no gradient for the head weight (LoRA, QLoRA): kFrozenLogitsChunkRows rows.
enum class HeadGrad { Trains, TrainsBf16, Frozen };

// expert_h: the dtype of the routed experts' saved pre-activations eh1/eh3 — F32, or BF16 when
// the experts' weights are bf16 (mixed precision; a bf16 base under LoRA): their products are
// bf16 products already, and the pre-activations, the largest saved tensors of an MoE layer,
// are then saved rounded to bf16, as autocast saves a bf16 matmul's output (expert_h_dtype()).
// head: the head's buffers and chunk rows (head_grad()).
ActivationLayout activation_layout(const ModelConfig& c, int64_t batch, int64_t seq, ActMode mode,
                                   DType expert_h = DType::F32, HeadGrad head = HeadGrad::Trains);

// What one decoder layer saves for its backward (Training), or what the shared recompute set
// holds. Field names are the layout's entry names.
struct LayerActs {
  // attention block
  Tensor x_in;              // [T,D] block input (residual stream)
  Tensor attn_rstd;         // [T]
  Tensor attn_h;            // [T,D] normed input
  Tensor q_pre, k_pre;      // q/k before their norm (q/k norm only): [T*H,Dh], [T*Hkv,Dh] per head;
                            // [T,H*Dh], [T,Hkv*Dh] over the whole projection
  Tensor q_rstd, k_rstd;    // one per q_pre/k_pre row: [T*H], [T*Hkv] per head; [T], [T] whole
  Tensor q, k, v;           // [B,S,H,Dh], [B,S,Hkv,Dh]: attention inputs (normed, rotated)
  Tensor attn_out;          // [B,S,H,Dh]
  Tensor lse;               // [B,H,S]
  // MLA (mla_block.h; q, k, v, attn_out are then [B,S,H,Dn+Dr], v zero-padded): the q latent
  // before / after q_a_layernorm [T,Rq] and its rstd [T] (q_lora_rank > 0); the kv latent before /
  // after kv_a_layernorm [T,Rkv] and its rstd [T]
  Tensor mla_cq, mla_cq_rstd, mla_cqn;
  Tensor mla_ckv, mla_ckv_rstd, mla_ckn;
  // feed-forward block
  Tensor x_mid;             // [T,D] block input (residual after attention)
  Tensor ffn_rstd;          // [T]
  Tensor ffn_h;             // [T,D]
  Tensor router_logits;     // [T,E] f32
  Tensor topk_idx;          // [T,K] i32
  Tensor topk_w;            // [T,K] f32
  Tensor offsets;           // [E+1] i32
  Tensor perm, inv;         // [P] i32
  Tensor row_scale;         // [P] f32
  Tensor xp;                // [P,D] gathered rows
  Tensor eh1, eh3;          // [P,F] expert pre-activations (f32, or bf16: activation_layout's expert_h)
  Tensor sh1, sh3;          // [T,Fs] shared expert pre-activations
  Tensor s_out;             // [T,D] shared expert output (before its gate)
  Tensor s_gate;            // [T,1] shared expert gate logit
  Tensor dh1, dh3;          // [T,F] dense MLP pre-activations
  // Expert parallel (owner side, sized by the rows this rank's experts received, so not in the
  // layout): the exchange plan and the received rows' saved tensors (xp, eh1/eh3, row_scale and
  // the local offsets take the place of the fields above).
  struct ExpertParallelActs {
    std::shared_ptr<const dist::ExpertExchange> plan;
    Tensor xp, eh1, eh3, row_scale, offsets;
  } ep;
  // Shared entries only (once per model): scratch and the head.
  Tensor qkv;               // [T,(H+2Hkv)Dh] stacked projection output / its gradient (scratch)
  Tensor final_x;           // [T,D] residual stream after the last layer
  Tensor final_rstd;        // [T]
  Tensor final_h;           // [T,D] normed, the LM head's input
  // (The head's logits chunk is a phase of the working set, "head.logits": not held here.)
};

// Buffers of one training step outside the layers (the layout's `step` part).
struct StepActs {
  Tensor ids, targets;       // [T] i32: token ids, shifted targets (-100 = ignored)
  Tensor row_loss;           // [chunk] f32: cross-entropy of each row of one logits chunk
  Tensor aux_g;              // [E] f32: the aux loss's per-expert factor (MoE models)
  // backward only: the [T,D] f32 gradients flowing down the layers (swapped layer by layer).
  // dx_in also holds the head's gradient dfinal_h (before the first layer's backward) and the
  // recompute forward's output (thrown away; the layer's attention backward then assigns it).
  Tensor dx, dx_mid, dx_in;
};

// Allocates the (still undefined) fields of `acts` that the layout has for a layer of this
// kind: the per-layer entries (per_layer) or the shared ones. Activations category.
void alloc_acts(const ActivationLayout& lay, bool is_moe, bool per_layer, LayerActs* acts);
// Allocates the step buffers the config has (aux_g only with a MoE layer); the backward ones
// only when `backward`. Activations category.
void alloc_step_acts(const ActivationLayout& lay, const ModelConfig& c, bool backward, StepActs* s);

}  // namespace moe
