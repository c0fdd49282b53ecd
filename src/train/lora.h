// lora.h — LoRA fine-tuning adapters: which projections get one (PEFT's target_modules rule),
// their initialisation, PEFT adapter files in and out, merging into the base, and the
// trainable-parameter audit.
//
// The adapters live in the model's LayerWeights (model.h) and are applied by the model's one
// linear path and the grouped expert ops; this file only creates, names, reads and writes them.
// Attaching adapters freezes the base (ModelWeights::frozen_base): zeros_like then allocates
// gradients for the factors only (and the routers with train_router).
//
// Adapter files (PEFT's format, what `peft.PeftModel.from_pretrained` reads):
//   adapter_config.json         peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, lora_dropout,
//                               use_rslora, target_modules, base_model_name_or_path, ...
//   adapter_model.safetensors   base_model.model.<module>.lora_A.weight [r,in] and lora_B.weight
//                               [out,r] per adapted module; routed experts one module each
//                               (…experts.<e>.w1 / gate_proj …).
// The fused layout PEFT uses for 3-D expert parameters (target_parameters) is in lora_fused.h.
#pragma once
#include <string>
#include <vector>

#include "model/model.h"

namespace moe {

struct LoraConfig {
  int64_t r = 16;
  double alpha = 16;
  double dropout = 0;  // PEFT's lora_dropout on the adapters' inputs (training only)
  bool rslora = false;  // scale alpha/sqrt(r) instead of alpha/r
  // PEFT target_modules: module-name suffixes ("q_proj", "w1", "gate_proj", "gate" = the
  // router in Mixtral/Qwen naming) or full module paths; "all-linear" = every attention and
  // MLP/expert projection (not the router).
  std::vector<std::string> target_modules;
  bool train_router = false;  // the router's own weight trained (base otherwise frozen)
  uint64_t seed = 1;          // A's initialisation
  std::string base_model;     // base_model_name_or_path written to adapter_config.json
  float scale() const;
};

// Parses a comma-separated target list ("q_proj,k_proj"); empty entries are an error.
std::vector<std::string> parse_target_modules(const std::string& csv);

// Creates adapters on every module the targets match: A ~ kaiming-uniform (bound 1/sqrt(in),
// as PEFT initialises lora_A), B = 0 (the model is unchanged until trained). Freezes the base.
// Errors: a target that matches no module of the model (naming it and showing what modules look
// like), a routed-expert target matching some experts of a layer but not all, r < 1.
void attach_lora(const ModelConfig& c, ModelWeights& w, const LoraConfig& cfg);

// Sets every adapter's dropout to p with a fresh mask seed derived from (seed, adapter index):
// the trainer calls it before each micro-batch (a new mask per step, the same one in that step's
// forward, recompute and backward) and with p = 0 before evaluation.
void set_lora_dropout(ModelWeights& w, float p, uint64_t seed);

// Reads a PEFT adapter directory onto the model (attaching and freezing as attach_lora does);
// returns its config. Errors name the file and tensor: not a LoRA adapter, a tensor whose
// shape does not fit this model (an adapter for another base), a targeted module without
// tensors, tensors for modules this model does not have, a fused (target_parameters) adapter.
LoraConfig load_adapter(const std::string& dir, const ModelConfig& c, ModelWeights& w);

// Writes the model's adapters as a PEFT adapter directory (atomic per file).
void save_adapter(const std::string& dir, const ModelConfig& c, const ModelWeights& w, const LoraConfig& cfg);

// The adapters' tensors under their PEFT names (what save_adapter writes).
std::vector<std::pair<std::string, Tensor>> adapter_tensors(const ModelConfig& c, const ModelWeights& w);

// Folds every adapter into its base weight (W += scale · B·A, in f32, rounded once to the
// weight's dtype) and removes the adapters; the base is unfrozen. Base tensors that carry an
// adapter are copied first (never written through a file mapping). Float bases only: a
// quantized base must be dequantized by the caller (merge_lora refuses it, naming the tensor).
void merge_lora(const ModelConfig& c, ModelWeights& w);

// QLoRA: stores the frozen base's projections (q/k/v, o, routed and shared experts, dense MLPs)
// as `dt`, replacing the float tensors: NF4 or NF4DQ (core/nf4.h; their products dequantize
// block rows exactly; under NF4DQ a projection whose rows are 64- but not 256-value blocks is
// stored plain NF4), or Q8_0 as the int8 option (blocks of 32 int8 + f16 scale; forward products use the
// int8 kernels, which round each activation row to int8 blocks as LLM.int8-style kernels do, and
// backward dequantizes exactly). Embeddings, norms, routers and the LM head stay as they are. A
// projection whose rows are not whole blocks stays float (counted); a layer's routed experts
// w1/w3/w2 stay float together when one of them cannot be quantized.
// Returns a one-line summary (tensors quantized, bytes before and after).
std::string quantize_frozen_base(const ModelConfig& c, ModelWeights& w, DType dt);

// The storage the QLoRA flags ask for: NF4 (--load-in-4bit), NF4DQ (with --double-quant) or
// Q8_0 (--load-in-8bit); throws for two storages at once or --double-quant without 4 bits.
DType qlora_base_dtype(bool load_in_4bit, bool double_quant, bool load_in_8bit);

// The audit printed at the start of a fine-tune: adapted modules and trainable parameters per
// module kind (attention, router, experts, shared expert, dense MLP), per routed expert, and in
// total next to the base's parameter count.
std::string lora_audit(const ModelConfig& c, const ModelWeights& w);
int64_t lora_param_count(const ModelConfig& c, const ModelWeights& w);

// The end-of-run check: every adapter factor of a module that received tokens must have had a
// non-zero gradient at some step. `seen` is indexed like named_parameters(c, w, true) and says
// which parameters ever had a non-zero gradient; `touched[layer][expert]` which routed experts
// ever received tokens. Returns the names of the parameters that fail (empty: all trained).
std::vector<std::string> untrained_adapters(const ModelConfig& c, const ModelWeights& w,
                                            const std::vector<bool>& seen,
                                            const std::vector<std::vector<bool>>& touched);

}  // namespace moe
