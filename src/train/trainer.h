// trainer.h — the training loop of `moe train`: data -> forward/backward -> clipping -> AdamW,
// with a live progress line, RUN_DIR/metrics.jsonl (one object per optimizer step), periodic
// validation, atomic checkpoints and resume.
//
// Contract (what the reference tests rely on): with a pre-tokenized data file, batch_size B
// and shuffle off, optimizer step i (0-based) consumes rows [i·B, (i+1)·B); the loss logged
// for step i+1 in metrics.jsonl is the one computed before that step's update.
#pragma once
#include <cstdint>
#include <string>

#include <nlohmann/json.hpp>

#include "train/lora.h"
#include "train/optimizer.h"

namespace moe {

struct TrainConfig {
  std::string model_dir;    // HF-format model directory to start from
  std::string data;         // text, JSONL or pre-tokenized safetensors
  std::string out;          // RUN_DIR
  bool resume = false;      // continue from the newest checkpoint in RUN_DIR
  int64_t steps = 100;      // optimizer steps in total (a resumed run continues up to it)
  int64_t stop_after = 0;   // stop (with a checkpoint) after this many steps of this invocation; 0: run to --steps
  int64_t batch_size = 8;   // sequences per micro-batch
  int64_t grad_accum = 1;   // micro-batches per optimizer step
  int64_t seq_len = 0;      // 0: the data file's (pre-tokenized) or 256 (text)
  double lr = 1e-3;
  LrSchedule schedule = LrSchedule::Cosine;
  int64_t warmup = 0;
  AdamWOptions adamw;
  double clip = 1.0;        // global gradient-norm clip; 0 = off
  double aux_coef = -1;     // < 0: the config's router_aux_loss_coef
  double z_coef = 0;
  bool recompute = false;
  double capacity_factor = 0;  // Switch-style expert capacity; 0 = dropless
  // Aux-loss-free bias balancing rate; 0 = off; < 0: the family's way of training (0.001, as
  // DeepSeek-V3 was trained, for routers with a selection bias; else off).
  double bias_rate = -1;
  bool fused_update = false;   // update each group as its gradients are final (needs clip 0, grad_accum 1)
  DType weight_dtype = DType::F32;  // BF16: mixed precision on split f32 master weights (model_train.h)
  bool shuffle = true;
  uint64_t seed = 1;
  double val_fraction = 0.05;
  int64_t eval_every = 0;   // validation every N steps (0: at checkpoints and at the end)
  int64_t eval_batches = 8; // validation batches per evaluation (0: all)
  int64_t save_every = 0;   // checkpoint every N steps (0: only final)
  int64_t log_every = 1;    // progress line every N steps
  int64_t max_tokens = 0;   // text corpora: use at most this many tokens
  bool quiet = false;       // no progress lines
  // Distribution (under mpirun; dist/parallel.h): expert-parallel ranks per replica and
  // data-parallel replicas (0: derived from the other and the number of ranks).
  int ep = 0, dp = 0;
  double dist_timeout = 600;  // seconds a collective may wait before the job is ended
  int zero = 0;  // 1: ZeRO-1, the optimizer state sharded by parameter over the ranks sharing it
  // Testing only: rank test_fail_rank dies (SIGKILL) or hangs (test_fail_hang) when step
  // test_fail_step starts — the failure-handling tests' injected fault.
  int64_t test_fail_step = 0;
  int test_fail_rank = -1;
  bool test_fail_hang = false;

  // Fine-tuning (`moe finetune`): LoRA adapters on a frozen base (train/lora.h). Checkpoints
  // then hold the adapter (PEFT files), not the model.
  bool finetune = false;
  LoraConfig lora;              // r, alpha, targets, router training
  std::string adapter_init;     // start from this PEFT adapter directory (its r/alpha/targets)
  std::string base_dtype = "keep";  // frozen base in memory: keep (the file's), f32 or bf16
  bool load_in_4bit = false;    // QLoRA: the base's projections stored NF4 (quantized at load)
  bool double_quant = false;    // ... with double-quantised absmax values (NF4DQ, core/nf4.h)
  bool load_in_8bit = false;    // ... or Q8_0 (int8 blocks)
  std::string chat_template;    // a Jinja file overriding the model's chat template
  bool packing = true;          // chat / prompt-completion data packed into rows
  double epochs = 0;            // > 0: steps = ceil(epochs · train rows / (batch · grad_accum))
  double collapse_share = 0.1;  // warn when an expert gets < this × 1/E of a layer's tokens ...
  int64_t collapse_steps = 20;  // ... for this many steps in a row
  std::string test_drop_grad;   // testing only: zero the gradients whose names contain this (an injected bug)
};

// Reads a JSON object of options (keys as the CLI flags without dashes, e.g. "batch-size")
// into cfg; unknown keys are an error naming them.
void apply_train_json(const nlohmann::json& j, const std::string& what, TrainConfig* cfg);

// Runs training (or fine-tuning); throws moe::Error on bad input or a non-finite loss (the last
// good checkpoint stays in place), and, when fine-tuning for 2+ steps, if an adapter factor of a
// module that received tokens never had a non-zero gradient. Returns the last step's loss.
double run_training(const TrainConfig& cfg);

}  // namespace moe
