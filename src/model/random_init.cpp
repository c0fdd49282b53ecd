// random_init.cpp — presets and random checkpoints.
#include "model/random_init.h"

#include <sys/stat.h>

#include <cstdio>
#include <filesystem>
#include <fstream>

#include "core/rng.h"
#include "io/safetensors.h"
#include "model/model.h"

namespace moe {

ModelConfig preset_config(const std::string& arch, const std::string& preset) {
  MOE_CHECK(arch == "mixtral" || arch == "qwen2_moe" || arch == "qwen3_moe" || arch == "olmoe" || arch == "gpt_oss",
            "unknown --arch '%s' (expected mixtral, qwen2_moe, qwen3_moe, olmoe or gpt_oss)", arch.c_str());
  const bool olmoe = arch == "olmoe";
  const bool gpt_oss = arch == "gpt_oss";
  ModelConfig c;
  c.model_type = arch;
  c.rope_theta = olmoe ? 1e4 : 1e6;
  c.rms_norm_eps = arch == "mixtral" || olmoe ? 1e-5 : 1e-6;
  c.router_aux_loss_coef = arch == "mixtral" ? 0.02 : olmoe ? 0.01 : 0.001;
  c.norm_topk_prob = arch == "mixtral" || arch == "qwen3_moe";  // OLMoE-1B-7B does not renormalise
  c.attn_qkv_bias = arch == "qwen2_moe";
  c.qk_norm = arch == "qwen3_moe" ? QkNormKind::PerHead : olmoe ? QkNormKind::Full : QkNormKind::None;
  c.bos_token_id = 1;
  c.eos_token_id = 2;
  if (preset == "tiny") {
    c.vocab_size = 256, c.hidden_size = 64, c.n_layer = 2, c.n_head = 4, c.n_head_kv = 2;
    c.n_expert = 8, c.n_expert_used = 2, c.intermediate_size = 128, c.moe_intermediate_size = 128;
    c.max_position_embeddings = 4096;
    if (arch != "mixtral") c.moe_intermediate_size = 64;
    if (arch == "qwen2_moe") c.n_expert_used = 4, c.shared_expert_intermediate_size = 128;
  } else if (preset == "small") {
    c.vocab_size = 4096, c.hidden_size = 256, c.n_layer = 4, c.n_head = 8, c.n_head_kv = 4;
    c.n_expert = 8, c.n_expert_used = 2, c.intermediate_size = 768, c.moe_intermediate_size = 768;
    c.max_position_embeddings = 8192;
    if (arch != "mixtral") c.n_expert = 16, c.n_expert_used = 4, c.moe_intermediate_size = 384;
    if (arch == "qwen2_moe") c.shared_expert_intermediate_size = 768;
  } else if (preset == "medium") {
    // ~1.0B total parameters in every family.
    c.vocab_size = 32000, c.hidden_size = 1024, c.n_layer = 12, c.n_head = 16, c.n_head_kv = 4;
    c.n_expert = 8, c.n_expert_used = 2, c.intermediate_size = 3072, c.moe_intermediate_size = 3072;
    c.max_position_embeddings = 32768;
    if (arch != "mixtral") c.n_expert = 32, c.n_expert_used = 4, c.moe_intermediate_size = 704;
    if (arch == "qwen2_moe") c.shared_expert_intermediate_size = 2048;
  } else if (preset == "8x7b") {
    // The real Mixtral-8x7B shape (46.7B parameters); benchmarks cut it to a few layers.
    c.vocab_size = 32000, c.hidden_size = 4096, c.n_layer = 32, c.n_head = 32, c.n_head_kv = 8;
    c.n_expert = 8, c.n_expert_used = 2, c.intermediate_size = 14336, c.moe_intermediate_size = 14336;
    c.max_position_embeddings = 32768;
    MOE_CHECK(arch == "mixtral", "preset 8x7b is a mixtral shape (use --arch mixtral)");
  } else {
    MOE_FAIL("unknown --preset '%s' (expected tiny, small, medium or 8x7b)", preset.c_str());
  }
  c.head_dim = arch == "qwen3_moe" && preset == "tiny" ? 32 : c.hidden_size / c.n_head;
  // OLMoE's experts are its MLP (intermediate_size is their width); its shapes are qwen's, with
  // GQA kept so that k_norm [Hkv*Dh] is narrower than q_norm [H*Dh].
  if (olmoe) c.intermediate_size = c.moe_intermediate_size;
  c.torch_dtype = preset == "medium" ? DType::BF16 : DType::F32;
  if (gpt_oss) {
    // GptOssConfig's structure at these sizes: every layer MoE with the expert width as
    // intermediate_size, q/k/v/o biases, sinks, router and expert biases, the clamped SwiGLU,
    // sliding/full alternation from layer 0 and YaRN (factor 32 over 4096 positions, truncate
    // false) as gpt-oss-20b/120b; a sliding window of 128 (tiny: 8, so short runs reach it).
    c.intermediate_size = c.moe_intermediate_size;
    c.norm_topk_prob = true;  // softmax over the K selected logits
    c.rope_theta = 150000.0;
    c.rms_norm_eps = 1e-5;
    c.router_aux_loss_coef = 0.9;
    c.attn_qkv_bias = c.attn_o_bias = true;
    c.attn_sinks = c.router_bias = c.expert_bias = true;
    c.swiglu_alpha = 1.702;
    c.swiglu_limit = 7.0;
    c.sliding_window = preset == "tiny" ? 8 : 128;
    c.layer_sliding.assign(size_t(c.n_layer), false);
    for (int64_t l = 0; l < c.n_layer; l += 2) c.layer_sliding[size_t(l)] = true;
    c.rope_scaling.kind = RopeScalingKind::Yarn;
    c.rope_scaling.factor = 32;
    c.rope_scaling.beta_fast = 32;
    c.rope_scaling.beta_slow = 1;
    c.rope_scaling.original_max_position_embeddings = 4096;
    c.rope_scaling.truncate = false;
    c.max_position_embeddings = 4096 * 32;
    c.bos_token_id = c.eos_token_id = -1;
  }
  return c;
}

std::vector<std::pair<std::string, Tensor>> random_weights(const ModelConfig& cfg, uint64_t seed, DType dt) {
  const double std_dev = 0.02;
  auto names = expected_tensors(cfg);
  std::vector<std::pair<std::string, Tensor>> out;
  out.reserve(names.size());
  const int64_t kChunk = 1 << 16;
  for (size_t ti = 0; ti < names.size(); ++ti) {
    const auto& [name, shape] = names[ti];
    Tensor t = Tensor::empty(shape, dt, MemCategory::Weights);
    const int64_t n = t.numel();
    const bool is_norm = name.find("norm") != std::string::npos;
    const bool is_bias = name.size() > 5 && name.compare(name.size() - 5, 5, ".bias") == 0;
    const int64_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      Rng rng(seed, (uint64_t(ti) << 32) | uint64_t(ch));
      const int64_t lo = ch * kChunk, hi = std::min(n, lo + kChunk);
      float buf[256];
      for (int64_t i = lo; i < hi; i += 256) {
        const int64_t m = std::min<int64_t>(256, hi - i);
        for (int64_t j = 0; j < m; ++j)
          buf[j] = is_norm ? 1.0f : is_bias ? float(0.1 * rng.normal()) : float(std_dev * rng.normal());
        convert_from_f32(static_cast<char*>(t.raw()) + size_t(i) * dtype_size(dt), buf, dt, size_t(m));
      }
    }
    out.emplace_back(name, std::move(t));
  }
  return out;
}

void write_model_dir(const std::string& dir, const ModelConfig& cfg,
                     const std::vector<std::pair<std::string, Tensor>>& tensors) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  MOE_CHECK(!ec, "cannot create directory %s: %s", dir.c_str(), ec.message().c_str());
  write_safetensors(dir + "/model.safetensors", tensors, {{"format", "pt"}});
  const std::string path = dir + "/config.json", tmp = path + ".tmp";
  {
    std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
    MOE_CHECK(f.good(), "cannot write %s", tmp.c_str());
    f << hf_config_to_json(cfg) << "\n";
    MOE_CHECK(f.good(), "error writing %s", tmp.c_str());
  }
  MOE_CHECK(std::rename(tmp.c_str(), path.c_str()) == 0, "cannot rename %s to %s", tmp.c_str(), path.c_str());
}

}  // namespace moe
