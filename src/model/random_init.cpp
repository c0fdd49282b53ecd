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
namespace {

// DeepSeek's structure at the preset sizes: MLA (V2: one q_proj as V2-Lite; V3: q_lora_rank),
// layer 0 dense, shared experts, YaRN over 4096 original positions with the released mscale pairs
// (V2-Lite 0.707/0.707, V3 1/1), V2-Lite's greedy softmax routing, V3's sigmoid noaux_tc routing
// in groups with renormalisation and ×2.5; no aux loss (HF returns none).
ModelConfig deepseek_preset(const std::string& arch, const std::string& preset) {
  const bool v3 = arch == "deepseek_v3";
  ModelConfig c;
  c.model_type = arch;
  c.rope_theta = 1e4;
  c.rms_norm_eps = 1e-6;
  c.router_aux_loss_coef = 0;
  c.bos_token_id = 0;
  c.eos_token_id = 1;
  c.rope_interleave = true;
  c.first_k_dense_replace = 1;
  c.n_shared_experts = v3 ? 1 : 2;
  c.routed_scaling_factor = v3 ? 2.5 : 1.0;
  c.norm_topk_prob = v3;
  c.topk_method = v3 ? RouterTopk::NoauxTc : RouterTopk::Greedy;
  int64_t rq = 0, rkv = 0, dn = 0, dr = 0;
  if (preset == "tiny") {  // the fixtures' shapes
    c.vocab_size = 256, c.hidden_size = 64, c.n_layer = 3, c.n_head = 4;
    c.n_expert = 8, c.n_expert_used = 2, c.intermediate_size = 128, c.moe_intermediate_size = 32;
    rq = 48, rkv = 32, dn = 16, dr = 8;
    c.n_group = v3 ? 4 : 1, c.topk_group = v3 ? 2 : 1;
  } else if (preset == "small") {
    c.vocab_size = 4096, c.hidden_size = 256, c.n_layer = 4, c.n_head = 8;
    c.n_expert = 16, c.n_expert_used = 4, c.intermediate_size = 768, c.moe_intermediate_size = 256;
    rq = 96, rkv = 64, dn = 32, dr = 16;
    c.n_group = v3 ? 4 : 1, c.topk_group = v3 ? 2 : 1;
  } else if (preset == "medium") {
    // ~1.0B total parameters.
    c.vocab_size = 32000, c.hidden_size = 1024, c.n_layer = 12, c.n_head = 16;
    c.n_expert = 32, c.n_expert_used = 4, c.intermediate_size = 3072, c.moe_intermediate_size = 704;
    rq = 384, rkv = 256, dn = 64, dr = 32;
    c.n_group = v3 ? 8 : 1, c.topk_group = v3 ? 4 : 1;
  } else {
    MOE_FAIL("unknown --preset '%s' for %s (expected tiny, small or medium)", preset.c_str(), arch.c_str());
  }
  c.n_head_kv = c.n_head;
  c.q_lora_rank = v3 ? rq : 0;
  c.kv_lora_rank = rkv;
  c.qk_nope_head_dim = dn;
  c.qk_rope_head_dim = dr;
  c.v_head_dim = dn;
  c.head_dim = dr;
  c.shared_expert_intermediate_size = c.n_shared_experts * c.moe_intermediate_size;
  c.rope_scaling.kind = RopeScalingKind::Yarn;
  c.rope_scaling.factor = 40;
  c.rope_scaling.original_max_position_embeddings = 4096;
  c.rope_scaling.mscale = c.rope_scaling.mscale_all_dim = v3 ? 1.0 : 0.707;
  c.max_position_embeddings = 4096 * 40;
  c.torch_dtype = preset == "medium" ? DType::BF16 : DType::F32;
  return c;
}

}  // namespace

ModelConfig preset_config(const std::string& arch, const std::string& preset) {
  MOE_CHECK(arch == "mixtral" || arch == "qwen2_moe" || arch == "qwen3_moe" || arch == "olmoe" || arch == "gpt_oss" ||
                arch == "deepseek_v2" || arch == "deepseek_v3",
            "unknown --arch '%s' (expected mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v2 or deepseek_v3)",
            arch.c_str());
  if (arch == "deepseek_v2" || arch == "deepseek_v3") return deepseek_preset(arch, preset);
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
    // DeepSeek-V3's router selection bias is a buffer HF initialises to zeros.
    const bool is_zero = name.ends_with("e_score_correction_bias");
    const int64_t n_chunks = (n + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(dynamic, 4)
    for (int64_t ch = 0; ch < n_chunks; ++ch) {
      Rng rng(seed, (uint64_t(ti) << 32) | uint64_t(ch));
      const int64_t lo = ch * kChunk, hi = std::min(n, lo + kChunk);
      float buf[256];
      for (int64_t i = lo; i < hi; i += 256) {
        const int64_t m = std::min<int64_t>(256, hi - i);
        for (int64_t j = 0; j < m; ++j)
          buf[j] = is_zero ? 0.0f : is_norm ? 1.0f : is_bias ? float(0.1 * rng.normal()) : float(std_dev * rng.normal());
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
