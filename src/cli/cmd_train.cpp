// cmd_train.cpp — `moe train`: train or continue training a model on a corpus (trainer.h).
#include <cstdio>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "core/file_util.h"
#include "core/json_util.h"
#include "train/trainer.h"

namespace moe {

void add_train_command(CLI::App& app) {
  struct Opts {
    TrainConfig c;
    std::string config, schedule = "cosine", optim_dtype = "f32", weight_dtype = "f32";
    bool no_shuffle = false;
  };
  auto o = std::make_shared<Opts>();
  TrainConfig& c = o->c;
  CLI::App* cmd = app.add_subcommand("train", "train a model on a corpus (text, JSONL or pre-tokenized safetensors)");
  cmd->add_option("dir", c.model_dir, "model directory to start from (config.json + model.safetensors)")->required();
  cmd->add_option("--data", c.data, "corpus: plain text, JSONL with a \"text\" field, or .safetensors with input_ids/labels [N,S]");
  cmd->add_option("--out", c.out, "run directory: metrics.jsonl, step-N/ and final/ checkpoints")->required();
  cmd->add_flag("--resume", c.resume, "continue from the newest checkpoint in --out");
  add_dist_flags(cmd, &c.ep, &c.dp, &c.dist_timeout);
  cmd->add_option("--zero", c.zero,
                  "under mpirun: 1 = ZeRO-1, each rank keeps the optimizer state of only the parameters it owns "
                  "(gradients are reduced to their owner, the updated weights broadcast from it)")
      ->capture_default_str();
  // Testing only (hidden): the failure-handling tests' injected fault.
  cmd->add_option("--test-fail-step", c.test_fail_step)->group("");
  cmd->add_option("--test-fail-rank", c.test_fail_rank)->group("");
  cmd->add_flag("--test-fail-hang", c.test_fail_hang)->group("");
  cmd->add_option("--config", o->config, "JSON file of options (keys as these flags without dashes); flags given here win");
  cmd->add_option("--steps", c.steps, "optimizer steps in total")->capture_default_str();
  cmd->add_option("--stop-after", c.stop_after,
                  "stop after N steps of this run, with a checkpoint (continue later with --resume); the schedule still spans --steps")
      ->capture_default_str();
  cmd->add_option("--batch-size", c.batch_size, "sequences per micro-batch")->capture_default_str();
  cmd->add_option("--grad-accum", c.grad_accum, "micro-batches per optimizer step")->capture_default_str();
  cmd->add_option("--seq-len", c.seq_len, "tokens per sequence (0: the file's, or 256 for text)")->capture_default_str();
  cmd->add_option("--lr", c.lr, "peak learning rate")->capture_default_str();
  cmd->add_option("--lr-schedule", o->schedule, "constant | cosine (after --warmup)")
      ->capture_default_str()->check(CLI::IsMember({"constant", "cosine"}));
  cmd->add_option("--warmup", c.warmup, "linear warmup steps")->capture_default_str();
  cmd->add_option("--beta1", c.adamw.beta1, "AdamW beta1")->capture_default_str();
  cmd->add_option("--beta2", c.adamw.beta2, "AdamW beta2")->capture_default_str();
  cmd->add_option("--eps", c.adamw.eps, "AdamW epsilon")->capture_default_str();
  cmd->add_option("--weight-decay", c.adamw.weight_decay, "decoupled weight decay (not on norms and biases unless --decay-all)")
      ->capture_default_str();
  cmd->add_flag("--decay-all", c.adamw.decay_all, "decay every parameter, as torch.optim.AdamW(model.parameters())");
  cmd->add_flag("--dense-expert-update", c.adamw.dense_expert_update,
                "update experts that got no tokens with a zero gradient (default: skip them, as torch does for HF's per-expert parameters)");
  cmd->add_option("--clip", c.clip, "global gradient-norm clipping (0 = off)")->capture_default_str();
  cmd->add_option("--aux-coef", c.aux_coef, "load-balancing aux loss weight (default: the config's router_aux_loss_coef)");
  cmd->add_option("--z-coef", c.z_coef, "router z-loss weight")->capture_default_str();
  cmd->add_option("--capacity-factor", c.capacity_factor,
                  "Switch-style expert capacity: at most ceil(F*tokens*k/E) rows per expert, the rest dropped "
                  "(pass through the residual); 0 = dropless")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1e6));
  cmd->add_option("--bias-balance", c.bias_rate,
                  "aux-loss-free balancing (DeepSeek-V3): per-expert selection bias moved by this rate per step "
                  "toward equal load; 0 = off (default: 0.001 for families whose router has a selection bias, "
                  "deepseek_v3; off otherwise)")
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_flag("--fused-update", c.fused_update,
                "update each layer's parameters as soon as its gradients are final and free them, a MoE layer's "
                "routed experts one at a time in one process (the whole-model gradient never exists; needs --clip 0 "
                "and --grad-accum 1)");
  cmd->add_option("--optimizer-dtype", o->optim_dtype, "AdamW moment storage: f32, or bf16 (half the optimizer memory)")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16"}));
  cmd->add_option("--weight-dtype", o->weight_dtype,
                  "weights the forward/backward read: f32, or bf16 (mixed precision: f32 master weights whose "
                  "matrices are kept as their bf16 rounding + lower 16 bits, no extra memory; products in bf16 on "
                  "the CPU's AMX / AVX512-BF16 units where it has them; the experts' pre-activations saved in bf16)")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16"}));
  cmd->add_flag("--recompute", c.recompute, "recompute each layer's activations in backward (less memory, ~1.3x compute)");
  cmd->add_flag("--no-shuffle", o->no_shuffle, "read rows in file order (step i reads rows [i*B, (i+1)*B))");
  cmd->add_option("--seed", c.seed, "data shuffling and validation split seed")->capture_default_str();
  cmd->add_option("--val-fraction", c.val_fraction, "rows held out for validation")->capture_default_str();
  cmd->add_option("--eval-every", c.eval_every, "validation every N steps (0: at checkpoints and the end)")->capture_default_str();
  cmd->add_option("--eval-batches", c.eval_batches, "validation batches per evaluation (0: all)")->capture_default_str();
  cmd->add_option("--save-every", c.save_every, "checkpoint every N steps (0: only at the end)")->capture_default_str();
  cmd->add_option("--log-every", c.log_every, "progress line every N steps")->capture_default_str();
  cmd->add_option("--max-tokens", c.max_tokens, "text corpora: use at most this many tokens (0: all)")->capture_default_str();
  cmd->add_flag("--quiet", c.quiet, "no progress output");
  cmd->callback([o, cmd]() {
    TrainConfig& c = o->c;
    if (!o->config.empty()) {
      // File values first, then every flag given on the command line again on top.
      TrainConfig from_file = c;
      apply_train_json(parse_json_object(read_file(o->config), o->config), o->config, &from_file);
      auto given = [&](const char* flag) { return cmd->count(flag) > 0; };
      if (!given("--data")) c.data = from_file.data;
      if (!given("--steps")) c.steps = from_file.steps;
      if (!given("--batch-size")) c.batch_size = from_file.batch_size;
      if (!given("--grad-accum")) c.grad_accum = from_file.grad_accum;
      if (!given("--seq-len")) c.seq_len = from_file.seq_len;
      if (!given("--lr")) c.lr = from_file.lr;
      if (!given("--lr-schedule")) o->schedule = from_file.schedule == LrSchedule::Constant ? "constant" : "cosine";
      if (!given("--warmup")) c.warmup = from_file.warmup;
      if (!given("--beta1")) c.adamw.beta1 = from_file.adamw.beta1;
      if (!given("--beta2")) c.adamw.beta2 = from_file.adamw.beta2;
      if (!given("--eps")) c.adamw.eps = from_file.adamw.eps;
      if (!given("--weight-decay")) c.adamw.weight_decay = from_file.adamw.weight_decay;
      if (!given("--decay-all")) c.adamw.decay_all = from_file.adamw.decay_all;
      if (!given("--dense-expert-update")) c.adamw.dense_expert_update = from_file.adamw.dense_expert_update;
      if (!given("--clip")) c.clip = from_file.clip;
      if (!given("--aux-coef")) c.aux_coef = from_file.aux_coef;
      if (!given("--z-coef")) c.z_coef = from_file.z_coef;
      if (!given("--recompute")) c.recompute = from_file.recompute;
      if (!given("--capacity-factor")) c.capacity_factor = from_file.capacity_factor;
      if (!given("--bias-balance")) c.bias_rate = from_file.bias_rate;
      if (!given("--fused-update")) c.fused_update = from_file.fused_update;
      if (!given("--weight-dtype")) o->weight_dtype = from_file.weight_dtype == DType::BF16 ? "bf16" : "f32";
      if (!given("--optimizer-dtype")) o->optim_dtype = from_file.adamw.state_dtype == DType::BF16 ? "bf16" : "f32";
      if (!given("--no-shuffle")) o->no_shuffle = !from_file.shuffle;
      if (!given("--seed")) c.seed = from_file.seed;
      if (!given("--val-fraction")) c.val_fraction = from_file.val_fraction;
      if (!given("--eval-every")) c.eval_every = from_file.eval_every;
      if (!given("--eval-batches")) c.eval_batches = from_file.eval_batches;
      if (!given("--save-every")) c.save_every = from_file.save_every;
      if (!given("--log-every")) c.log_every = from_file.log_every;
      if (!given("--max-tokens")) c.max_tokens = from_file.max_tokens;
      if (!given("--stop-after")) c.stop_after = from_file.stop_after;
    }
    MOE_CHECK(!c.data.empty(), "moe train: --data FILE is required (or \"data\" in --config)");
    c.schedule = o->schedule == "constant" ? LrSchedule::Constant : LrSchedule::Cosine;
    c.shuffle = !o->no_shuffle;
    c.adamw.state_dtype = o->optim_dtype == "bf16" ? DType::BF16 : DType::F32;
    c.weight_dtype = o->weight_dtype == "bf16" ? DType::BF16 : DType::F32;
    // Mixed precision (bf16 weights) multiplies in bf16 on the CPU's matrix units where it has
    // them, forward and backward (as torch's bf16 autocast); MOE_BF16_GEMM=widen keeps the
    // factors exact. f32 training is not affected.
    cpu::use_bf16_matrix_where_available();
    run_training(c);
  });
}

}  // namespace moe
