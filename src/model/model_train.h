// model_train.h — the training forward/backward of a Model: the blocks in order, the losses
// (chunked cross-entropy, HF's load-balancing aux loss, the ST-MoE z-loss), and the parameter
// list with HF names that gradients, checkpoints and the optimizer share.
//
// Order of one step: embedding; per layer attention block then feed-forward block, each
// saving its activations (activations.h); router statistics of all MoE layers give the aux
// and z losses; final norm + LM head + cross-entropy fused with their backward chunk by chunk
// (the [T,V] logits are never held whole); then the layers' backward in reverse; embedding.
// With recompute, a layer keeps only its input and re-runs its forward before its backward.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <string>
#include <vector>

#include "model/activations.h"
#include "model/ffn_block.h"
#include "model/model.h"

namespace moe {

struct LossOptions {
  double aux_coef = 0;  // weight of the aux loss in total_loss (callers pass the config's router_aux_loss_coef)
  double z_coef = 0;    // weight of the z-loss
  bool recompute = false;  // per-layer activation recompute
  RouteOptions route;      // capacity factor (dropless by default); the EP group
  // Data parallel: the ranks whose local batches make up the step's global batch. The losses are
  // means over all of them (global target and row counts) and the balancing losses use the
  // router statistics summed over them, so the gradients summed over the ranks equal one
  // process's on the whole batch. Null: this process holds the whole batch.
  dist::Communicator* batch = nullptr;
};

struct StepLosses {
  double loss_ce = 0, aux_loss = 0, z_loss = 0, total = 0;
  int64_t n_targets = 0;                 // label positions that count (not -100)
  std::vector<int64_t> moe_layers;       // decoder-layer index of each entry below
  std::vector<RouterStats> router;       // per MoE layer (summed over LossOptions::batch)
  // Wall seconds of the step by phase, for the benchmarks' breakdown (a few clock reads per
  // layer). The fused-update callbacks (the optimizer) count as their own phase.
  enum Phase { kEmbed, kAttnFwd, kFfnFwd, kHead, kFfnBwd, kAttnBwd, kUpdate, kPhases };
  double phase_s[kPhases] = {};
};

// Names of StepLosses::Phase, for printing.
const char* step_phase_name(int phase);

// One parameter: its HF name, the weight (a view into the model's stacked storage) and what
// the optimizer needs to know about it.
struct NamedParam {
  std::string name;
  Tensor value;
  int64_t layer = -1;   // decoder layer, -1 for embedding / final norm / head
  int64_t expert = -1;  // routed expert index, -1 otherwise
  bool no_decay = false;  // norms and biases (HF Trainer's default: no weight decay)
  bool embedding = false;  // the token embedding (its gradient is final last)
};

// Every parameter of the model under its HF name (per-expert views of the stacked experts,
// per-projection views of the stacked q/k/v). Tied heads are listed once (as the embedding).
// Undefined tensors (a layer whose gradients are not allocated) are left out.
// LoRA factors follow each layer's base parameters under PEFT's names
// ("base_model.model.<module>.lora_A.weight", lora_slots.h); routed experts' factors are
// per-expert views of the stacked ones. trainable_only: with a frozen base, only the adapters
// (and the routers when trained) — the same list, in the same order, as named_parameters of
// the gradients zeros_like makes.
std::vector<NamedParam> named_parameters(const ModelConfig& c, const ModelWeights& w, bool trainable_only = false);

// State saved with the weights that is not trained by gradient: the routers' selection biases
// (aux-loss-free balancing), under their file names.
std::vector<std::pair<std::string, Tensor>> named_buffers(const ModelConfig& c, const ModelWeights& w);

// Aux-loss-free balancing (DeepSeek-V3): for every MoE layer, b[e] += rate · sign(mean − load[e])
// (an underloaded expert becomes more likely to be selected). `load` is per MoE layer in
// decoder-layer order, [E] tokens each. Layers without a bias get a zero one first.
void update_router_bias(const ModelConfig& c, ModelWeights& w, const std::vector<std::vector<double>>& load,
                        double rate);

// A ModelWeights with fn applied to every stored tensor (views such as wq/wk/wv and a tied
// head are rebuilt on the results, not passed to fn).
ModelWeights transform_weights(const ModelConfig& c, const ModelWeights& w,
                               const std::function<Tensor(const Tensor&)>& fn);

// Mixed precision storage: f32 master weights kept in two 16-bit halves, so that forward and
// backward read the upper half as a bf16 matrix and no second copy of the weights exists.
// Every matrix (ndim >= 2) is split: its tensor becomes bf16, each element the f32 value rounded
// to bf16 half away from zero (master_high: the f32 bits plus 0x8000, upper half), and a
// separate array keeps the value's lower 16 bits. master_bits joins the two back into the f32
// value exactly: the rounding added 1 to the upper half exactly when the lower half is
// >= 0x8000. The optimizer updates the f32 value and stores both halves (train/optimizer.h):
// f32 master semantics at 4 bytes a weight, where master plus compute copy took 6, and no
// re-rounding pass after the update. Vectors (norms, biases, router biases) stay f32.
inline uint16_t master_high(uint32_t bits) { return static_cast<uint16_t>((bits + 0x8000u) >> 16); }
inline uint32_t master_bits(uint16_t high, uint16_t low) {
  return (uint32_t(static_cast<uint16_t>(high - (low >> 15))) << 16) | low;
}

// The lower halves of a split ModelWeights' matrices (category Weights, 2 bytes a value).
class MasterLowHalves {
 public:
  // Those of parameter t, a split matrix or a view into one (its elements, in order); nullptr
  // when t is not split (an f32 vector, or a tensor of another model).
  uint16_t* of(const Tensor& t) const;
  void add(const Tensor& high, Tensor low);

 private:
  struct Entry {
    size_t bytes;  // the bf16 tensor's
    Tensor low;
  };
  std::map<uintptr_t, Entry> by_start_;  // by the bf16 tensor's first byte
};

// Splits w's matrices in place (w: f32 master weights), a layer at a time so that the f32
// tensors are freed as they are split (when w holds the only reference), and returns the
// allocator's kept blocks to the system before and after (core/memory.h), so the split model
// is resident in the f32 model's bytes; returns the lower halves. Forward and backward then
// run on w as they run on bf16 weights.
MasterLowHalves split_master(const ModelConfig& c, ModelWeights& w);
// The f32 master values of t (a split matrix or a view into one) as a new tensor (Workspace);
// t itself when it is not split.
Tensor join_master(const Tensor& t, const MasterLowHalves& low);
// The f32 master weights of split weights w, as new tensors (what expert parallelism gathers
// for a checkpoint; one process writes them a tensor at a time: train/checkpoint.h).
ModelWeights join_master(const ModelConfig& c, const ModelWeights& w, const MasterLowHalves& low);

// Zero gradients (f32, category `cat`) shaped like every trainable parameter, with the same
// views, so named_parameters(c, grads) names them exactly as named_parameters(c, w, true) names
// the weights. With a frozen base (fine-tuning) only the adapters get gradients (and the
// routers when trained): no base-weight gradient is allocated.
ModelWeights zeros_like(const ModelConfig& c, const ModelWeights& w, MemCategory cat);

// The dtype a training step saves the routed experts' pre-activations in (activations.h,
// activation_layout's expert_h): BF16 when the experts' weights are bf16, else F32.
DType expert_h_dtype(const ModelConfig& c, const ModelWeights& w);
// How a training step's LM head takes its gradient (activation_layout's head): Frozen under
// LoRA (a frozen base), TrainsBf16 where its products round their other factor to bf16 (ops.h
// bf16_products), else Trains.
HeadGrad head_grad(const ModelWeights& w);

// Forward (and, with grads, backward) of one batch: ids, labels [B,S] (HF labels: unshifted,
// -100 ignored). Gradients of total_loss accumulate into *grads. CPU, f32 activations (the
// experts' pre-activations bf16 under bf16 experts: expert_h_dtype).
StepLosses forward_backward(const Model& m, const Tensor& ids, const Tensor& labels, ModelWeights* grads,
                            const LossOptions& opt);

// Gradient groups of the fused update, in the order their gradients become final.
constexpr int64_t kGroupHead = -1;   // final norm and the untied LM head
constexpr int64_t kGroupEmbed = -2;  // the embedding (with a tied head, the head's gradient too)
// Called with a group's final gradients, named as named_parameters names them, and the step's
// forward results (losses, router statistics). A MoE layer's group comes in several calls when
// its routed experts are taken one at a time (forward_backward_fused): each expert's weights as
// soon as its backward is done (every expert, in order), then the rest of the layer.
using GradGroupFn =
    std::function<void(int64_t group, const std::vector<NamedParam>& grads, const StepLosses& forward)>;

// forward_backward without a whole-model gradient (the fused optimizer step, for training
// memory): the gradients of one group at a time — the head, then each layer from the last,
// then the embedding — are allocated zeroed just before that group's backward, handed to
// on_grads as soon as they are final, and freed. At most one layer's gradients are held (plus
// the embedding's from the start of backward when the head is tied to it); of a MoE layer's
// routed experts, one expert's at a time where the step is one process's (no data or expert
// parallelism) and the experts carry no adapters or biases (ffn_block.h, per_expert). The
// gradients equal forward_backward's bit for bit.
StepLosses forward_backward_fused(const Model& m, const Tensor& ids, const Tensor& labels, const LossOptions& opt,
                                  const GradGroupFn& on_grads);

// One routed expert's weight gradients (dw1 [F,D], dw3 [F,D], dw2 [D,F]) under their
// named_parameters names: one call of a MoE layer's group taken expert by expert.
std::vector<NamedParam> expert_parameters(const ModelConfig& c, int64_t layer, int64_t expert, const Tensor& dw1,
                                          const Tensor& dw3, const Tensor& dw2);
// The parameters of one fused-update group among named_parameters(c, grads).
std::vector<NamedParam> group_parameters(const ModelConfig& c, const ModelWeights& grads, int64_t group);

}  // namespace moe
