// model.h — an MoE transformer built from an ArchSpec + ModelConfig: weights, KV cache and the
// inference forward pass (prefill and incremental decode) on any backend.
//
// The forward pass only calls ops.h, so it runs wherever its weights live (CPU or CUDA).
// Activations are f32 on the CPU and f32 or bf16 on CUDA (`act_dtype`); routing is always f32.
// Training forward/backward (next issue) will add saved-activation variants of the same steps.
#pragma once
#include <array>
#include <string>
#include <vector>

#include "core/lora.h"
#include "core/tensor.h"
#include "dist/communicator.h"
#include "io/hf_config.h"
#include "model/arch.h"

namespace moe {

class Checkpoint;

// Parameters a config implies: all of them, and those a token touches (K of E experts).
int64_t params_total(const ModelConfig& cfg);
int64_t params_active(const ModelConfig& cfg);

// Weights of one decoder layer. Expert weights are stacked per layer: w1/w3 [E,F,D], w2 [E,D,F].
struct LayerWeights {
  Tensor attn_norm, ffn_norm;              // [D]
  Tensor wqkv;                             // [(H+2Hkv)*Dh, D]: q, k, v stacked (one GEMV per decode step)
  Tensor wq, wk, wv, wo;                   // views of wqkv: [H*Dh,D], [Hkv*Dh,D], [Hkv*Dh,D]; wo [D,H*Dh]
                                           // (q/k/v quantized in different types, a GGUF mix: wqkv
                                           // undefined, wq/wk/wv own their blocks; inference only)
  Tensor bqkv;                             // optional stacked q/k/v bias; bq/bk/bv view it
  Tensor bq, bk, bv, bo;                   // optional biases
  Tensor q_norm, k_norm;                   // optional: [Dh] per head (qwen3_moe), [H*Dh], [Hkv*Dh] (olmoe)
  bool is_moe = false;
  Tensor router;                           // [E,D]
  Tensor router_bias;                      // [E] f32, optional: selection bias of aux-loss-free balancing
                                           // (file name "<router>.e_score_correction_bias", as DeepSeek-V3)
  Tensor w1, w3, w2;                       // experts (MoE) — or dense MLP [F,D]/[D,F] when !is_moe
  Tensor shared_w1, shared_w3, shared_w2;  // shared expert (qwen2_moe), optional
  Tensor shared_gate;                      // [1,D]
  Tensor sinks;                            // [H] attention sink logits (gpt_oss), optional
  int64_t attn_window = 0;                 // this layer's sliding window (ModelConfig::layer_window), 0: full
  Tensor brouter;                          // [E] the router linear's own bias (gpt_oss), optional
  // Multi-head Latent Attention (ModelConfig::is_mla; wqkv and wq/wk/wv are then undefined, wo is
  // [D, H*Dv]). Letters: Rq q_lora_rank, Rkv kv_lora_rank, Dn/Dr/Dv the nope/rope/value widths.
  Tensor wq_a, q_a_norm;                   // [Rq,D], [Rq]: q_a_proj, q_a_layernorm (q_lora_rank > 0)
  Tensor wq_b;                             // [H*(Dn+Dr), Rq] q_b_proj, or [H*(Dn+Dr), D] q_proj
  Tensor wkv_a;                            // [Rkv+Dr, D] kv_a_proj_with_mqa: the latent, then the shared k_pe
  Tensor kv_a_norm;                        // [Rkv] kv_a_layernorm
  Tensor wkv_b;                            // [H*(Dn+Dv), Rkv] kv_b_proj: per head k_nope rows, then v rows
  Tensor b1, b3, b2;                       // routed experts' biases [E,F], [E,F], [E,D] (gpt_oss), optional
  // LoRA adapters (fine-tuning, src/train/lora.h); each is off unless attached. lq/lk/lv adapt
  // the q/k/v parts of the stacked wqkv; lexp holds the routed experts' stacked factors
  // ([E,r,in], [E,out,r]); lmlp the dense MLP's and lshared the shared expert's (2-D). In a
  // gradient ModelWeights the same fields hold the factors' gradients.
  Lora lq, lk, lv, lo, lrouter;
  ExpertLora lexp, lmlp, lshared;
  Lora lq_a, lq_b, lkv_a, lkv_b;           // MLA: q_a_proj, q_b_proj (or q_proj), kv_a_proj_with_mqa, kv_b_proj
  static constexpr size_t kNumLoras = 18;
  // Every adapter field above, in a fixed order (walks that treat them alike: on/off, dropout,
  // copying).
  std::array<Lora*, kNumLoras> loras() {
    return {&lq, &lk, &lv, &lo, &lrouter, &lexp.w1, &lexp.w3, &lexp.w2,
            &lmlp.w1, &lmlp.w3, &lmlp.w2, &lshared.w1, &lshared.w3, &lshared.w2,
            &lq_a, &lq_b, &lkv_a, &lkv_b};
  }
  std::array<const Lora*, kNumLoras> loras() const {
    auto m = const_cast<LayerWeights*>(this)->loras();
    std::array<const Lora*, kNumLoras> out;
    for (size_t i = 0; i < kNumLoras; ++i) out[i] = m[i];
    return out;
  }
};

// wq/wk/wv (and bq/bk/bv) as row views of the stacked wqkv (bqkv), where those are defined.
// Whoever replaces wqkv (load, a dtype copy, quantization, a merge) calls it again.
void set_qkv_views(const ModelConfig& c, LayerWeights& lw);

struct ModelWeights {
  Tensor embed;       // [V,D]
  Tensor final_norm;  // [D]
  Tensor lm_head;     // [V,D] (the embedding when tied)
  std::vector<LayerWeights> layers;
  // Fine-tuning: the base weights are frozen (no gradient is computed or allocated for them;
  // only the LoRA factors, and the routers when train_router, are trained).
  bool frozen_base = false;
  bool train_router = false;
  // Expert parallel: the stacked routed experts (w1/w3/w2 [El,...]) are experts
  // [expert_begin, expert_begin + El) of the model's E (dist/parallel.h). 0 and El = E otherwise.
  int64_t expert_begin = 0;
  bool has_lora() const;
};

struct LoadOptions {
  Device device = Device::CPU;
  // Weight dtype in memory: F32 or BF16; "keep" (the file's) when keep_dtype.
  bool keep_dtype = true;
  DType weight_dtype = DType::F32;
  DType act_dtype = DType::F32;  // activations and KV cache (BF16 only on CUDA)
  // Quantized inference weights (CPU only): a block dtype (core/dtype.h: Q8_0, Q4_0, Q4_K, Q5_K,
  // Q6_K) for every projection — q/k/v/o, experts, shared experts, dense MLPs, the LM head —
  // quantized at load with core/quant.h (kept as is when the source already holds that type).
  // A weight whose rows are not a whole number of blocks gets Q8_0 (rows of 32) or stays float.
  // Embeddings, norms, routers and the shared-expert gate stay float (routing is f32). F32
  // (default): no quantization; a source tensor that is already quantized (GGUF) is kept when
  // it is a projection (keep_dtype) and dequantized otherwise.
  DType quant_dtype = DType::F32;
  // Expert parallel (dist/parallel.h): load only routed experts [expert_begin, expert_begin +
  // expert_count) of every MoE layer (ModelWeights::expert_begin records it), so a rank never
  // holds the others' experts, not even while loading. expert_count < 0: all of them.
  int64_t expert_begin = 0, expert_count = -1;
};

// Per-layer KV caches [B,C,Hkv,Dh]: B sequence slots of C positions. MLA models cache the latent
// instead: k[l] is [B,C,1,Rkv+Dr] (the normed latent, then the rotated shared k_pe) and v[l] is
// the same tensor (the absorbed attention reads its values from the latent too), so a token
// costs (Rkv+Dr)·dtype bytes per layer. Slot b holds positions
// [0, pos[b]); every slot has its own length, so one forward may carry sequences at different
// positions (serving batches requests of different lengths). A caller reuses a slot for a new
// sequence by setting its pos to 0.
//
// Paged (serving, CPU): k[l], v[l] are [N,P,Hkv,Dh] — N blocks of P = block_size positions
// shared by all slots — and slot b's position p lives in block tables[b][p / P]. The caller
// (serve/kv_pool.h) owns the blocks: it grows a slot's table before a forward needs it.
struct KVCache {
  std::vector<Tensor> k, v;
  std::vector<int64_t> pos;  // per slot: positions filled (= the position of its next token)
  int64_t batch = 0;         // slots
  int64_t capacity = 0;      // per-slot positions (contiguous); N·P (paged)
  int64_t block_size = 0;    // > 0: paged
  std::vector<std::vector<int32_t>> tables;  // paged: per slot, its blocks in position order
};

struct ForwardOptions {
  bool last_logits_only = false;  // logits for the last position of each sequence only
  bool want_router_logits = false;
  // The cache slot of each input row (ids row i continues slot slots[i] at its own position);
  // empty: row i is slot i and every slot of the cache is in the batch.
  std::vector<int64_t> slots;
};

struct ForwardResult {
  Tensor logits;                      // [B,S,V] f32 (or [B,1,V] with last_logits_only), on the model's device
  std::vector<Tensor> router_logits;  // per MoE layer [B*S,E] f32 (empty for dense layers), if asked
};

class Model {
 public:
  // Loads config.json + safetensors weights from `dir`. Throws moe::Error naming the missing
  // tensor / bad shape / bad config.
  static Model load(const std::string& dir, const LoadOptions& opt = {});
  // The same from a checkpoint already open (its directory holds config.json).
  static Model load(const Checkpoint& ck, const LoadOptions& opt = {});
  // Builds from a config and named tensors (e.g. random init) without files.
  static Model from_tensors(const ModelConfig& cfg, const std::vector<std::pair<std::string, Tensor>>& named,
                            const LoadOptions& opt = {});

  const ModelConfig& config() const { return cfg_; }
  const ModelWeights& weights() const { return w_; }
  ModelWeights& mutable_weights() { return w_; }  // the optimizer updates them in place
  Device device() const { return opt_.device; }
  DType act_dtype() const { return opt_.act_dtype; }

  KVCache make_cache(int64_t batch, int64_t capacity) const;
  // Bytes one cached position takes over all layers: keys and values (2·Hkv·Dh per layer), or the
  // MLA latent (kv_lora_rank + qk_rope_head_dim per layer), times the activation dtype's size.
  int64_t kv_bytes_per_token() const;
  // A paged cache (CPU): n_blocks blocks of block_size positions for `slots` sequence slots.
  KVCache make_paged_cache(int64_t slots, int64_t n_blocks, int64_t block_size) const;
  // ids [B,S] i32 (host or device); row i continues its slot at cache.pos[slot], which
  // advances by S (see ForwardOptions::slots).
  ForwardResult forward(const Tensor& ids, KVCache& cache, const ForwardOptions& fo = {}) const;

  // Parameter counts: total, and active per token (embedding and LM head counted too).
  int64_t n_params_total() const { return params_total(cfg_); }
  int64_t n_params_active() const { return params_active(cfg_); }

  // Expert-parallel inference (moe generate --ep under mpirun): every rank runs the same tokens
  // and holds E/ep of the routed experts (ModelWeights::expert_begin); each MoE layer computes
  // its own experts' rows and the partial outputs are summed over `ep`. Null: all local.
  void set_expert_parallel(dist::Communicator* ep) { ep_ = ep; }

 private:
  void add_kv_layers(KVCache& kv, int64_t rows, int64_t positions) const;
  ModelConfig cfg_;
  LoadOptions opt_;
  ModelWeights w_;
  dist::Communicator* ep_ = nullptr;
};

// The HF tensor names and shapes a config implies (used by load, init and inspect).
std::vector<std::pair<std::string, Shape>> expected_tensors(const ModelConfig& cfg);

// Whether the CUDA backend has every op the config needs: the variants of ops/variants.h (gpt_oss's
// sinks, sliding windows, YaRN, clamped SwiGLU and expert biases) are CPU-only so far.
bool config_runs_on_cuda(const ModelConfig& c);

// An MLA layer's attention tensors (HF names and shapes), in load order.
std::vector<std::pair<std::string, Shape>> mla_tensors(const ModelConfig& cfg, int64_t layer);

// File name of a MoE layer's optional router selection bias (LayerWeights::router_bias).
std::string router_bias_name(const ModelConfig& cfg, int64_t layer);

}  // namespace moe
