// planner.h — analytic memory, communication and time figures for MoE jobs.
//
// Everything here is arithmetic on a PlanModel (plan_model.h); nothing allocates model memory.
// Conventions (each function's comment gives its formula; `moe plan --explain` prints them):
//   * Weight formats apply to 2-D linear weights (ParamCounts::linear); embeddings, LM head,
//     norms, biases and sinks stay bf16 (f32 when the format is f32).
//   * Full training is mixed precision AdamW (ZeRO paper accounting): bf16 weights (2 B/param),
//     bf16 grads (2 B), f32 master weights + Adam m + v (12 B) = 16 B/param before sharding.
//   * Parallelism: gpus = dp * tp. Expert parallelism splits the E experts over ep ranks drawn
//     from the dp ranks (dp % ep == 0, E % ep == 0); tensor parallelism splits every matrix tp
//     ways. ZeRO-1/2/3 shard optimizer / +grads / +weights over the data-parallel group: dp ranks
//     for non-expert parameters, dp/ep ranks for expert parameters (DeepSpeed-MoE / Megatron).
//   * LoRA: adapters A [R,in], B [out,R] on every targeted linear, f32 weights + grads + AdamW
//     m, v = 16 B per adapter parameter; the base is frozen (bf16 for LoRA, NF4 for QLoRA).
//   * Activations are bf16 for GPU jobs; the engine's own CPU forward is f32 and predicted
//     exactly by engine_forward_activation_bytes().
//   * The engine's own CPU training step (JobSpec::cpu_engine) is f32 throughout and reads the
//     engine's activation layout (model/activations.h): see engine_train_plan().
#pragma once
#include <cstdint>
#include <string>

#include "plan/plan_model.h"

namespace moe {

enum class JobKind : uint8_t { Infer, Train, Lora, Qlora };
const char* job_name(JobKind j);
JobKind parse_job(const std::string& s);  // "infer" | "train" | "lora" | "qlora"

enum class WeightFormat : uint8_t { F32, BF16, FP8, INT8, NF4, NF4DQ, Q4 };
struct WeightFormatInfo {
  WeightFormat format;
  const char* name;         // "nf4"
  int64_t bytes_num;        // bytes per parameter = bytes_num / bytes_den, scales included
  int64_t bytes_den;
  const char* layout;       // how the bytes arise
};
const WeightFormatInfo& weight_format_info(WeightFormat f);
WeightFormat parse_weight_format(const std::string& s);  // f32 bf16 fp8 int8 nf4 nf4-dq q4
// Bytes of n linear-weight parameters in format f (exact: n * num / den, rounded up).
int64_t linear_bytes(int64_t n, WeightFormat f);
// The whole model's weights: linear in f, everything else 16-bit (32-bit for f32).
int64_t model_weight_bytes(const ParamCounts& pc, WeightFormat f);
// The routed experts' share of model_weight_bytes.
int64_t expert_weight_bytes(const ParamCounts& pc, WeightFormat f);

// KV cache bytes per position summed over layers, for a context of `context` positions (sliding
// layers hold min(context, window)). GQA: 2 * Hkv * Dh * bytes per layer; MLA: the compressed
// latent (kv_lora_rank + qk_rope_head_dim) * bytes; encoder layers none; cross-attention layers
// also hold the encoder's K and V (assumed `context` long).
int64_t kv_cache_bytes(const PlanModel& m, int64_t batch, int64_t context, int64_t bytes_per_elem);

// Peak activation bytes of Model::forward (src/model/model.cpp) for ids [batch, seq]: the
// persistent buffers (x, h, y [T,D]) plus the largest of one block's temporaries (attention:
// qkv and its split q, k, v, the attention output; feed-forward: see ffn_block_infer) and the
// head's (final norm, logits). `act_bytes` is
// 4 on the CPU (f32); bf16 adds the f32 copies the forward makes of router logits, gate and
// logits. Ids are assumed i32 (no conversion buffer).
int64_t engine_forward_activation_bytes(const PlanModel& m, int64_t batch, int64_t seq, int64_t act_bytes,
                                        bool last_logits_only);

// Saved activations of a training step, bf16, per GPU. Per layer (T = micro_batch * seq):
//   attention: x, h [T,D]; q, k, v; attention output; f32 log-sum-exp [T,H] (flash-style, no
//   [S,S] matrix); FFN: x, h [T,D]; dense: the hidden(s) [T,Fd]; MoE: f32 router logits [T,E],
//   top-k ids + weights + permutation [T,K] (16 B), expert hiddens [T*K,F] (SwiGLU: h1, h3;
//   gather and silu recomputed), shared expert hiddens [T,Fs]; LoRA: x*A^T [*,R] per adapter.
// Head: final norm in/out [T,D] and f32 logits [T,V]. Without checkpointing every layer is
// saved; with it only each layer's input [T,D] plus one layer recomputed. Either way one more
// layer's worth is live as the backward working set. Divided by tp (sequence parallel).
struct TrainActivations {
  int64_t per_layer_max = 0;  // the largest layer's saved bytes
  int64_t layers = 0;         // what all layers keep until backward
  int64_t working = 0;        // recompute / backward working set (one layer)
  int64_t head = 0;
  int64_t total = 0;
};
enum class LoraTargets : uint8_t { Attention, All };  // All = attention + experts + shared + dense FFN
TrainActivations train_activation_bytes(const PlanModel& m, int64_t micro_batch, int64_t seq, bool checkpointing,
                                        int64_t lora_r, LoraTargets targets, int64_t tp);

// LoRA adapter parameters: R * (in + out) per targeted linear.
int64_t lora_params(const PlanModel& m, int64_t r, LoraTargets targets);
// The adapter parameters of routed experts (split by expert parallelism).
int64_t lora_expert_params(const PlanModel& m, int64_t r, LoraTargets targets);

struct Parallel {
  int64_t dp = 1, tp = 1, ep = 1;
  int zero = 0;
  int64_t gpus() const { return dp * tp; }
};
// Throws moe::Error for impossible layouts (more EP ranks than experts, E % ep, dp % ep, H % tp, ...).
void validate_parallel(const PlanModel& m, const Parallel& p);

// The memory options of the engine's CPU training step (engine_train_plan).
struct EngineTrainOptions {
  bool fused_update = false;
  bool optimizer_bf16 = false;
  bool weights_bf16 = false;
  bool bf16_matrix = false;  // with weights_bf16: the products run on the CPU's bf16 matrix units
};

struct JobSpec {
  JobKind job = JobKind::Infer;
  WeightFormat weights = WeightFormat::BF16;  // inference weights; QLoRA base (nf4 / nf4-dq)
  int64_t batch = 1;      // sequences (inference: concurrent; training: micro-batch per dp rank)
  int64_t seq = 2048;     // training sequence length / inference prefill chunk
  int64_t context = 4096; // inference KV-cache capacity per sequence
  bool checkpointing = false;
  int64_t lora_r = 16;
  LoraTargets lora_targets = LoraTargets::All;
  int64_t act_bytes = 2;  // activations and KV cache elements (2 = bf16; 4 = the CPU engine's f32)
  bool last_logits_only = true;  // inference prefill computes logits for the last position only
  int64_t overhead_bytes = 0;    // per-GPU runtime reserve (CUDA context, allocator slack)
  // The engine's own CPU job, one process (mixtral, qwen2_moe, qwen3_moe, olmoe): train is
  // engine_train_plan(); infer is the inference figures with act_bytes 4. LoRA is not planned.
  bool cpu_engine = false;
  EngineTrainOptions engine_train;  // cpu_engine training: fused update, bf16 moments / weights
};

// Per-GPU bytes by the engine's memory categories (core/memory.h).
struct MemoryPlan {
  int64_t weights = 0, quant_weights = 0, lora = 0, grads = 0, optimizer = 0, activations = 0, kv_cache = 0,
          workspace = 0;
  int64_t total() const {
    return weights + quant_weights + lora + grads + optimizer + activations + kv_cache + workspace;
  }
};
MemoryPlan plan_memory(const PlanModel& m, const JobSpec& job, const Parallel& p);

// The engine's own CPU training step — forward_backward (model/model_train.h) and one AdamW
// step (train/optimizer.h), all f32, one process — for the families the engine runs (m.engine).
// Per memory category (core/memory.h), what the tracker's peak reads during and after the step:
//   weights     4 B x P (P = plan_params(m).total; a tied LM head is the embedding)
//   grads       4 B x P (one f32 gradient per parameter, zeros_like)
//   optimizer   8 B x P: AdamW's m and v, created lazily, so this holds from the first step
//               on; a routed expert that has never received a token holds none
//               (8 B x ParamCounts::one_expert per such expert and layer less)
//   activations activation_layout(c, batch, seq, Training or TrainingRecompute).total_bytes(c):
//               the step's saved activations + step buffers + the largest working-set phase.
// The memory options of `moe train` change these lines:
//   fused_update    grads: only the largest gradient group at a time (forward_backward_fused):
//                   max(head = final norm + untied LM head, the largest layer, embedding) x 4 B,
//                   a MoE layer's routed experts counted as one expert's weights (they come
//                   one at a time; stacked where they carry biases);
//                   with a tied head the embedding's gradient lives through the whole backward
//                   and adds to the other groups
//   optimizer_bf16  optimizer 4 B x P (bf16 m and v)
//   weights_bf16    weights unchanged: the f32 master weights' matrices are split into their bf16
//                   upper halves (what the products read) and lower halves, 4 B a parameter;
//                   activations: the experts' pre-activations eh1/eh3 are saved in bf16
//   bf16_matrix     (with weights_bf16; `moe plan` sets it where this CPU has the matrix units,
//                   as `moe train` uses them) activations: the LM head's chunk is taller,
//                   its gradient rounded to bf16 in place (HeadGrad::TrainsBf16)
// Not counted: the op kernels' Workspace scratch, the router's selection bias when bias
// balancing creates it ([E] f32 per MoE layer, Weights), the caller's batch tensors.
// Throws moe::Error for a family the engine does not run or sizes too large to compute.
struct EngineTrainPlan {
  MemoryPlan mem;
  int64_t act_saved = 0;    // the layout's per-layer and shared saved activations
  int64_t act_step = 0;     // its step buffers (ids, targets, loss rows, the [T,D] gradients)
  int64_t act_working = 0;  // its largest working-set phase
  std::string working_phase;
};
EngineTrainPlan engine_train_plan(const PlanModel& m, int64_t batch, int64_t seq, bool recompute,
                                  const EngineTrainOptions& opt = {});

// Bytes one GPU sends through expert-parallel all-to-all per micro-batch: for each MoE layer,
// dispatch + combine of its T*K routed rows of D bf16 values, the (ep-1)/ep share that leaves
// the GPU; training doubles it for the backward. Inference: per forward of `batch` x `seq`.
double all_to_all_bytes(const PlanModel& m, const JobSpec& job, const Parallel& p);

// The engine's own distributed CPU training step (`moe train --ep P --dp Q` under mpirun, f32;
// src/dist, src/train/distributed.h): the bytes its collectives move in one step, summed over
// all N = ep * dp ranks, as the communicators count them (dist/communicator.h: the bytes each
// rank sends to other ranks). One step = forward_backward on each rank's rows of the global
// batch, all_reduce_grads, clip_grad_norm_global, AdamW; no validation, --grad-accum 1.
// T = batch_rows_global * seq tokens, K experts per token, E experts, El = E / ep, D hidden,
// F expert width, Lm MoE layers, Pd = plan_params(m).total - experts (every parameter that is
// not a routed expert: embedding, norms, attention, routers, shared experts, dense MLPs,
// untied head), Px = plan_params(m).experts = Lm * E * 3FD.
// An all-reduce of n elements of s bytes over a group of G ranks is a reduce to the group's
// rank 0 then its broadcast: rank 0 sends (G-1) n s, every other rank n s; 2 (G-1) n s in all.
//   all-reduce, N > 1, over the world (G = N):
//     router statistics   8 (2 + Lm (2E + 2))   token and target counts; per MoE layer the
//                                               expert counts, probability sums, z sum, drops
//     cross-entropy sum   8                     (both model_train.cpp run_step)
//     dense gradients     4 Pd                  (all_reduce_grads, in buckets: same bytes)
//   all-reduce, dp > 1, over each of the ep expert-DP groups (G = dp): routed experts'
//     gradients 4 El Lm 3FD per group, so 2 (dp-1) 4 Px in all
//   all-reduce, ep > 1, over each of the dp EP groups (G = ep): the clip norm's expert sum of
//     squares, 8 (the trainer always computes the norm)
//   all-to-all, ep > 1, per MoE layer forward (twice with recompute: the backward re-runs it):
//     the plan's count exchange, each rank (ep-1) El 8 bytes: N (ep-1) El 8 in all;
//     rows: R_off routed (token, slot) assignments whose expert lives on another rank of its
//     EP group move xp (4D) and the routing weight (4) out and the output (4D) back
//     (8D + 4 per row), and in backward dY (4D) out, dX (4D) and the routing weight's
//     gradient (4) back (8D + 4): R_off (16D + 8), R_off (24D + 12) with recompute.
// R_off: with `rows_off` >= 0 that count (summed over MoE layers and ranks, e.g. measured from
// the routing), else Lm T K (ep-1) / ep (rounded down). That needs no balanced router: if every
// rank's tokens pick expert e with the same probability p_e, rank q keeps the share
// sum_{e of q} p_e of its rows, and over an EP group the kept shares sum to 1 — only the
// ranks' rows being alike (same distribution) matters, not the experts' balance.
// Not counted: validation, checkpoints, the per-rank memory table (other collectives); with
// --grad-accum A the statistics, cross-entropy and all-to-all terms are per micro-batch (x A);
// the fused update moves the same bytes (each gradient group once, the same norm exchange).
// Throws moe::Error for a family the engine does not run, ep or dp < 1, E % ep != 0.
struct EngineDistComm {
  int64_t ranks = 1;
  // all-reduce
  int64_t stats = 0;         // router statistics
  int64_t ce = 0;            // the cross-entropy sum
  int64_t dense_grads = 0;   // gradients of everything but the routed experts (world)
  int64_t expert_grads = 0;  // routed experts' gradients (expert-DP groups)
  int64_t clip = 0;          // the norm's expert sum of squares (EP groups)
  // all-to-all
  int64_t counts = 0;        // the per-expert row counts of each MoE layer's plan
  int64_t rows = 0;          // the token rows, forward and backward
  int64_t rows_off = 0;      // R_off used
  int64_t all_reduce() const { return stats + ce + dense_grads + expert_grads + clip; }
  int64_t all_to_all() const { return counts + rows; }
  int64_t total() const { return all_reduce() + all_to_all(); }
};
EngineDistComm engine_dist_comm(const PlanModel& m, int64_t batch_rows_global, int64_t seq, int64_t ep, int64_t dp,
                                bool recompute, int64_t rows_off = -1);

// Model FLOPs per token: 2 * active_no_embed (forward) plus attention 2 * keys * H * (qk + v) per
// layer with keys = seq/2 (causal; min(seq/2, window) when sliding; seq for encoders). Training
// = 3x forward; LoRA/QLoRA = 2x forward (no weight gradients for the frozen base) + 6 * adapter.
double flops_per_token(const PlanModel& m, const JobSpec& job);

}  // namespace moe
