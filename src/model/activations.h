// activations.h — the one activation layout (DESIGN.md invariant 7): every buffer a forward
// (and backward) uses, as a size table computed from the config, the batch shape and the mode.
//
// The engine allocates its per-layer activation structs from this table (alloc_layer_acts),
// and `moe plan` sums the same table, so the two agree by construction.
//
// Modes:
//   Inference          — buffers of one layer, reused by every layer (nothing is kept);
//   Training           — every layer keeps its saved activations until its backward;
//   TrainingRecompute  — every layer keeps only its input (the residual stream); backward
//                        re-runs that layer's forward into one shared set of saved buffers.
// Scopes: PerLayer entries exist once per layer (attention + feed-forward block of that
// layer); Shared entries once per model (the head, the recompute buffers, gradients of the
// activations that flow backward).
#pragma once
#include <string>
#include <vector>

#include "core/tensor.h"
#include "io/hf_config.h"

namespace moe {

enum class ActMode { Inference, Training, TrainingRecompute };

struct ActEntry {
  std::string name;  // the LayerActs / HeadActs field it backs
  Shape shape;
  DType dtype;
  bool per_layer;  // once per layer (else once per model)
  bool moe_only;   // only MoE layers have it (dense layers have the dense_* entries instead)
  bool dense_only;
};

struct ActivationLayout {
  ActMode mode;
  int64_t batch = 0, seq = 0;
  int64_t logits_chunk = 0;  // rows of the LM head computed at once in training
  std::vector<ActEntry> entries;
  // Bytes the layout implies for a config: per-layer entries times the layers that have them.
  int64_t total_bytes(const ModelConfig& c) const;
};

// Rows of the LM-head logits held at once when computing the loss (chunked cross-entropy).
constexpr int64_t kLogitsChunkRows = 256;

ActivationLayout activation_layout(const ModelConfig& c, int64_t batch, int64_t seq, ActMode mode);

// What one decoder layer saves for its backward (Training), or what the shared recompute set
// holds. Field names are the layout's entry names.
struct LayerActs {
  // attention block
  Tensor x_in;              // [T,D] block input (residual stream)
  Tensor attn_rstd;         // [T]
  Tensor attn_h;            // [T,D] normed input
  Tensor q_pre, k_pre;      // [T*H,Dh], [T*Hkv,Dh] q/k before their norm (q/k norm only)
  Tensor q_rstd, k_rstd;    // [T*H], [T*Hkv] (q/k norm only)
  Tensor q, k, v;           // [B,S,H,Dh], [B,S,Hkv,Dh]: attention inputs (normed, rotated)
  Tensor attn_out;          // [B,S,H,Dh]
  Tensor lse;               // [B,H,S]
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
  Tensor eh1, eh3;          // [P,F] expert pre-activations
  Tensor sh1, sh3;          // [T,Fs] shared expert pre-activations
  Tensor s_out;             // [T,D] shared expert output (before its gate)
  Tensor s_gate;            // [T,1] shared expert gate logit
  Tensor dh1, dh3;          // [T,F] dense MLP pre-activations
  // Shared entries only (once per model): scratch and the head.
  Tensor qkv;               // [T,(H+2Hkv)Dh] stacked projection output / its gradient (scratch)
  Tensor final_x;           // [T,D] residual stream after the last layer
  Tensor final_rstd;        // [T]
  Tensor final_h;           // [T,D] normed, the LM head's input
  Tensor logits;            // [chunk,V] f32: one chunk of LM-head logits, then its gradient
};

// Allocates the (still undefined) fields of `acts` that the layout has for a layer of this
// kind: the per-layer entries (per_layer) or the shared ones. Activations category.
void alloc_acts(const ActivationLayout& lay, bool is_moe, bool per_layer, LayerActs* acts);

}  // namespace moe
