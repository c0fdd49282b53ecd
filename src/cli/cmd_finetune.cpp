// cmd_finetune.cpp — `moe finetune`: LoRA fine-tuning of a frozen base (trainer.h with
// TrainConfig::finetune), and `moe merge`: folding an adapter into a copy of the base.
#include <cstdio>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "core/file_util.h"
#include "io/gguf_model.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/model_train.h"
#include "train/checkpoint.h"
#include "train/lora.h"
#include "train/trainer.h"
#include "train/hf_export.h"

namespace moe {

void add_finetune_command(CLI::App& app) {
  struct Opts {
    TrainConfig c;
    std::string targets = "q_proj,k_proj,v_proj,o_proj", schedule = "cosine", optim_dtype = "f32";
    bool no_shuffle = false, no_packing = false;
  };
  auto o = std::make_shared<Opts>();
  TrainConfig& c = o->c;
  c.finetune = true;
  c.lr = 2e-4;
  c.lora.r = 16;
  c.lora.alpha = 16;
  c.batch_size = 4;
  c.clip = 1.0;
  CLI::App* cmd = app.add_subcommand(
      "finetune",
      "LoRA fine-tuning of a frozen base: chat JSONL (loss on assistant tokens), prompt/completion JSONL or text; "
      "checkpoints are PEFT adapters");
  cmd->add_option("dir", c.model_dir, "base model directory (config.json + safetensors + tokenizer)")->required();
  cmd->add_option("--data", c.data,
                  "chat JSONL {\"messages\":[...]}, prompt/completion JSONL, text/JSONL {\"text\"}, or pre-tokenized "
                  ".safetensors")
      ->required();
  cmd->add_option("--out", c.out, "run directory: metrics.jsonl, step-N/ and final/ adapters")->required();
  cmd->add_option("--lora-r", c.lora.r, "LoRA rank r")->capture_default_str()->check(CLI::Range(1, 4096));
  cmd->add_option("--lora-alpha", c.lora.alpha, "LoRA alpha (scale alpha/r)")->capture_default_str();
  cmd->add_option("--lora-dropout", c.lora.dropout, "dropout on the adapters' inputs (training only)")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 0.95));
  cmd->add_flag("--rslora", c.lora.rslora, "rank-stabilised scale alpha/sqrt(r)");
  cmd->add_option("--target-modules", o->targets,
                  "comma-separated PEFT target_modules: q_proj,k_proj,v_proj,o_proj; experts w1,w2,w3 (Mixtral) or "
                  "gate_proj,up_proj,down_proj (Qwen; also the shared expert and dense MLPs); gate = the router; "
                  "all-linear")
      ->capture_default_str();
  cmd->add_flag("--train-router", c.lora.train_router,
                "train the routers' weights in full (frozen by default); saved as modules_to_save");
  cmd->add_option("--adapter-init", c.adapter_init, "start from this PEFT adapter (continue a fine-tune)");
  cmd->add_option("--base-dtype", c.base_dtype, "the frozen base in memory: keep (the file's), f32 or bf16 (bf16: products in bf16 on the "
                  "CPU's AMX / AVX512-BF16 units where it has them)")
      ->capture_default_str()
      ->check(CLI::IsMember({"keep", "f32", "bf16"}));
  cmd->add_flag("--load-in-4bit", c.load_in_4bit,
                "QLoRA: store the frozen base's projections as NF4 (block 64, absmax), dequantized block by block "
                "inside the GEMMs");
  cmd->add_flag("--double-quant", c.double_quant,
                "with --load-in-4bit: double-quantise the NF4 absmax values (8-bit codes under a bf16 scale per 256 "
                "weights: 4.19 instead of 4.5 bits a weight; bitsandbytes' bnb_4bit_use_double_quant)");
  cmd->add_flag("--load-in-8bit", c.load_in_8bit,
                "the int8 option: the frozen base's projections stored as q8_0 blocks (32 int8 + f16 scale)");
  cmd->add_option("--chat-template", c.chat_template, "a Jinja chat template file (default: the model's)");
  cmd->add_flag("--no-packing", o->no_packing, "one example per row (cut/padded to --seq-len) instead of packing");
  cmd->add_flag("--resume", c.resume, "continue from the newest checkpoint in --out");
  add_dist_flags(cmd, &c.ep, &c.dp, &c.dist_timeout);
  cmd->add_option("--steps", c.steps, "optimizer steps in total")->capture_default_str();
  cmd->add_option("--epochs", c.epochs, "passes over the training rows (overrides --steps)");
  cmd->add_option("--stop-after", c.stop_after,
                  "stop after N steps of this run, with a checkpoint (continue later with --resume)")
      ->capture_default_str();
  cmd->add_option("--batch-size", c.batch_size, "sequences per micro-batch")->capture_default_str();
  cmd->add_option("--grad-accum", c.grad_accum, "micro-batches per optimizer step")->capture_default_str();
  cmd->add_option("--seq-len", c.seq_len, "tokens per row (0: 256, or the file's when pre-tokenized)")
      ->capture_default_str();
  cmd->add_option("--lr", c.lr, "peak learning rate")->capture_default_str();
  cmd->add_option("--lr-schedule", o->schedule, "constant | cosine (after --warmup)")
      ->capture_default_str()
      ->check(CLI::IsMember({"constant", "cosine"}));
  cmd->add_option("--warmup", c.warmup, "linear warmup steps")->capture_default_str();
  cmd->add_option("--weight-decay", c.adamw.weight_decay, "AdamW decoupled weight decay")->capture_default_str();
  cmd->add_option("--clip", c.clip, "global gradient-norm clipping (0 = off)")->capture_default_str();
  cmd->add_option("--aux-coef", c.aux_coef,
                  "load-balancing aux loss weight (default: 0 with a frozen router, the config's with --train-router)");
  cmd->add_flag("--fused-update", c.fused_update, "update each layer's adapters as soon as their gradients are final");
  cmd->add_option("--optimizer-dtype", o->optim_dtype, "AdamW moments: f32 or bf16")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16"}));
  cmd->add_flag("--recompute", c.recompute, "recompute each layer's activations in backward (less memory)");
  cmd->add_flag("--no-shuffle", o->no_shuffle, "read rows in file order");
  cmd->add_option("--seed", c.seed, "shuffling, validation split and adapter initialisation seed")->capture_default_str();
  cmd->add_option("--val-fraction", c.val_fraction, "rows held out for validation")->capture_default_str();
  cmd->add_option("--eval-every", c.eval_every, "validation every N steps (0: at checkpoints and the end)")
      ->capture_default_str();
  cmd->add_option("--eval-batches", c.eval_batches, "validation batches per evaluation (0: all)")->capture_default_str();
  cmd->add_option("--save-every", c.save_every, "checkpoint every N steps (0: only at the end)")->capture_default_str();
  cmd->add_option("--log-every", c.log_every, "progress line every N steps")->capture_default_str();
  cmd->add_option("--collapse-share", c.collapse_share,
                  "router health: warn when an expert gets under this fraction of an equal share ...")
      ->capture_default_str();
  cmd->add_option("--collapse-steps", c.collapse_steps, "... for this many steps in a row (0: off)")
      ->capture_default_str();
  cmd->add_flag("--quiet", c.quiet, "no progress output");
  cmd->add_option("--test-drop-grad", c.test_drop_grad,
                  "TESTING ONLY: zero the gradients whose names contain this string (injects a frozen-adapter bug)")
      ->group("Testing");
  cmd->callback([o]() {
    TrainConfig& c = o->c;
    c.lora.target_modules = parse_target_modules(o->targets);
    c.lora.seed = c.seed;
    c.schedule = o->schedule == "constant" ? LrSchedule::Constant : LrSchedule::Cosine;
    c.shuffle = !o->no_shuffle;
    c.packing = !o->no_packing;
    c.adamw.state_dtype = o->optim_dtype == "bf16" ? DType::BF16 : DType::F32;
    if (c.aux_coef < 0 && !c.lora.train_router) c.aux_coef = 0;
    // A bf16 base multiplies in bf16 on the CPU's matrix units where it has them (the other
    // factor rounded to bf16, f32 accumulation), as PEFT on a bf16 model computes in bf16;
    // MOE_BF16_GEMM=widen keeps the factors exact. f32 and NF4 bases are not affected.
    cpu::use_bf16_matrix_where_available();
    run_training(c);
  });
}

void add_merge_command(CLI::App& app) {
  struct Opts {
    std::string dir, adapter, out, dtype = "keep";
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("merge", "fold a LoRA adapter into a copy of its base model (HF directory)");
  cmd->add_option("dir", o->dir, "base model directory, or a .gguf (quantized: merged into a dequantized copy)")
      ->required();
  cmd->add_option("adapter", o->adapter, "PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")
      ->required();
  cmd->add_option("--out", o->out, "output model directory")->required();
  cmd->add_option("--dtype", o->dtype, "weights written: keep (the base's float dtype), f32 or bf16")
      ->capture_default_str()
      ->check(CLI::IsMember({"keep", "f32", "bf16"}));
  cmd->callback([o]() {
    LoadOptions lo;
    lo.keep_dtype = o->dtype == "keep";
    lo.weight_dtype = o->dtype == "bf16" ? DType::BF16 : DType::F32;
    // A GGUF base may be quantized: it is read dequantized (float weights take the adapter
    // exactly), and the output is a float HF model. A directory holds float weights already.
    Model m = [&] {
      if (!is_gguf_path(o->dir)) return Model::load(Checkpoint::open_dir(o->dir), lo);
      GgufModel g = load_gguf_model(o->dir, GgufLoadOptions{});
      std::printf("%s: merging into a dequantized copy (float weights)\n", o->dir.c_str());
      return Model::from_tensors(g.config, g.tensors, lo);
    }();
    LoraConfig lc = load_adapter(o->adapter, m.config(), m.mutable_weights());
    const int64_t n = lora_param_count(m.config(), m.weights());
    merge_lora(m.config(), m.mutable_weights());
    std::error_code ec;
    std::filesystem::create_directories(o->out, ec);
    MOE_CHECK(!ec, "%s: cannot create the output directory: %s", o->out.c_str(), ec.message().c_str());
    write_text_atomic(o->out + "/config.json", hf_config_to_json(m.config()));
    std::vector<std::pair<std::string, Tensor>> named;
    named = hf_parameters(m.config(), m.weights());
    for (auto& b : named_buffers(m.config(), m.weights())) named.push_back(b);
    write_safetensors(o->out + "/model.safetensors", named, {{"format", "pt"}});
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                          "generation_config.json", "chat_template.jinja"})
      if (is_regular_file(o->dir + "/" + f))
        std::filesystem::copy_file(o->dir + "/" + f, o->out + "/" + f,
                                   std::filesystem::copy_options::overwrite_existing, ec);
    std::printf("merged %s (r %lld, alpha %g, %lld adapter parameters) into %s: %zu tensors\n", o->adapter.c_str(),
                (long long)lc.r, lc.alpha, (long long)n, o->out.c_str(), named.size());
  });
}

}  // namespace moe
