// checkpoint.h — training checkpoints: a HF-format model directory plus the state to resume.
//
// RUN_DIR/step-N/ (and RUN_DIR/final/) hold
//   config.json, model.safetensors   HF names and shapes (f32): loadable by `moe generate` and
//                                    HF Transformers; tokenizer files copied from the source model
//   optimizer.safetensors            AdamW moments m.<name>, v.<name> (parameters ever updated)
//   trainer_state.json               step, per-parameter optimizer step counts, data sampler
//                                    position, the options that shape the run, the model's
//                                    parameter names and shapes (to refuse a foreign resume)
// A checkpoint is written into a temporary sibling directory, fsynced, then renamed into place:
// a process killed at any point leaves every earlier checkpoint intact and loadable, and a
// directory named step-N is always complete.
#pragma once
#include <string>

#include <nlohmann/json.hpp>

#include "model/model.h"
#include "train/lora.h"
#include "train/optimizer.h"

namespace moe {

// Writes `dir` atomically (see above). `tokenizer_from` (may be empty): a directory whose
// tokenizer files are copied alongside.
// With `lora` (fine-tuning) the directory holds the adapter (adapter_config.json,
// adapter_model.safetensors: what `moe generate BASE --adapter DIR` and PEFT load) instead of
// config.json and model.safetensors.
// The optimizer's part of a checkpoint: its moments by name and the step count of every
// parameter of trainer_state's "params" list, in that order (AdamW::state_tensors and
// step_counts in one process; gathered from the expert owners under expert parallelism).
struct OptimizerSnapshot {
  std::vector<std::pair<std::string, Tensor>> tensors;
  std::vector<int64_t> steps;
};
OptimizerSnapshot snapshot(const AdamW& opt);

// low (mixed precision): m's weights are split master weights (model_train.h); each is joined
// into its f32 values as it is written, one tensor at a time.
void save_checkpoint(const std::string& dir, const Model& m, const OptimizerSnapshot& opt,
                     const nlohmann::json& trainer_state, const std::string& tokenizer_from,
                     const LoraConfig* lora = nullptr, const MasterLowHalves* low = nullptr);

// The newest complete RUN_DIR/step-N (largest N), or "" when there is none.
std::string latest_checkpoint(const std::string& run_dir);

// Reads trainer_state.json of a checkpoint directory (moe::Error naming the file when bad).
nlohmann::json read_trainer_state(const std::string& dir);

// Restores the optimizer state of checkpoint `dir` into `opt`, matching parameters by name
// (trainer_state's "params" list orders "optimizer_steps"), so a rank holding a subset of the
// parameters (expert parallel) takes its own.
void load_optimizer(const std::string& dir, AdamW& opt);

// Writes text to `path` atomically (temp file in the same directory, fsync, rename).
void write_text_atomic(const std::string& path, const std::string& text);

}  // namespace moe
