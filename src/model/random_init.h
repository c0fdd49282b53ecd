// random_init.h — model presets and random HF-format checkpoints (`moe init`), for tests,
// benchmarks and training from scratch.
//
// Presets (per family): tiny (~100K params, like the reference fixtures), small (~20M),
// medium (~1B total). Weights ~ N(0, initializer_range) as HF initialises, norms = 1, biases 0.
#pragma once
#include <string>
#include <utility>
#include <vector>

#include "core/tensor.h"
#include "io/hf_config.h"

namespace moe {

// Throws for an unknown arch or preset, listing the valid ones.
ModelConfig preset_config(const std::string& arch, const std::string& preset);

// Random weights for every tensor expected_tensors(cfg) names, in dtype dt (f32/bf16).
std::vector<std::pair<std::string, Tensor>> random_weights(const ModelConfig& cfg, uint64_t seed, DType dt);

// Writes DIR/config.json and DIR/model.safetensors (both atomically); creates DIR.
void write_model_dir(const std::string& dir, const ModelConfig& cfg,
                     const std::vector<std::pair<std::string, Tensor>>& tensors);

}  // namespace moe
