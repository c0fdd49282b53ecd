// rope_scaling.h — RoPE frequency tables: the default theta^(-2i/Dh), or YaRN's blend of
// extrapolated and interpolated frequencies with its attention factor (HF transformers'
// `_compute_yarn_parameters`, 4.5x generation: mscale / mscale_all_dim aware, `truncate`).
//
// One place for the YaRN formulas, so every family that scales RoPE this way (gpt-oss,
// DeepSeek-V2/V3) reads the same code. The config parser fills RopeScaling from config.json's
// rope_scaling (or v5's rope_parameters); the model turns it into a RopeTable once and the rope
// ops rotate with it.
#pragma once
#include <cstdint>
#include <vector>

namespace moe {

enum class RopeScalingKind : uint8_t { None, Yarn };

// rope_scaling as config.json says it (fields a family does not use keep their defaults).
struct RopeScaling {
  RopeScalingKind kind = RopeScalingKind::None;
  double factor = 1;                          // context extension factor
  double beta_fast = 32, beta_slow = 1;       // correction range, in rotations
  int64_t original_max_position_embeddings = 0;  // 0: the config's max_position_embeddings
  bool truncate = true;                       // floor/ceil the correction range (gpt-oss: false)
  double attention_factor = 0;                // 0: derived (mscale rule below)
  double mscale = 0, mscale_all_dim = 0;      // 0: absent
  bool operator==(const RopeScaling&) const = default;
};

// The rotation of a rope op: per frequency i < Dh/2 the angle is pos · inv_freq[i], and cos and
// sin are both multiplied by attention_factor (YaRN: so attention scores scale by its square).
// inv_freq empty: the default theta^(-2i/Dh) (the plain `theta` rope ops).
// interleaved: frequency i rotates the pair (x[2i], x[2i+1]) (DeepSeek's complex-pair form,
// and V3's rope_interleave) instead of (x[i], x[i+Dh/2]) (HF rotate_half).
struct RopeTable {
  float theta = 10000;
  std::vector<double> inv_freq;
  double attention_factor = 1;
  bool interleaved = false;
  bool plain() const { return inv_freq.empty() && attention_factor == 1 && !interleaved; }
};

// YaRN's mscale: 1 for scale <= 1, else 0.1 · m · ln(scale) + 1.
double yarn_mscale(double scale, double m = 1);

// The factor DeepSeek-V3 puts on its softmax scale: yarn_mscale(factor, mscale_all_dim)² when
// YaRN is on and mscale_all_dim is set, else 1 (HF's DeepseekV3Attention; V2 does not apply it).
double yarn_softmax_factor(const RopeScaling& s);

// The table for head width `dim` (even): plain for RopeScalingKind::None, YaRN otherwise
// (max_position_embeddings stands in for a missing original_max_position_embeddings).
RopeTable rope_table(double theta, int64_t dim, const RopeScaling& s, int64_t max_position_embeddings);

}  // namespace moe
