// cmd_plan.cpp — `moe plan MODEL|DIR`: memory, time and cost of an MoE job before running it.
#include <cstdio>
#include <memory>

#include "cli/commands.h"
#include "core/error.h"
#include "plan/model_catalog.h"
#include "plan/plan_report.h"

namespace moe {

void add_plan_command(CLI::App& app) {
  struct Opts {
    std::string model, job = "infer", gpu, dtype, prices, lora_targets = "all";
    int64_t gpus = 0, batch = 1, seq = 2048, context = 4096, dp = 0, tp = 0, ep = 0, lora_r = 16;
    int zero = -1;
    bool checkpointing = false, json = false, explain = false, list = false;
    double tokens = 0, mfu = 0.4, mbu = 0.7;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("plan", "memory, time and cost of an MoE job (inference, training, LoRA, QLoRA)");
  cmd->add_option("model", o->model, "model directory / config.json, or a catalog name (--list)");
  cmd->add_flag("--list", o->list, "list the built-in model and GPU catalogs");
  cmd->add_option("--job", o->job, "infer, train, lora or qlora")->capture_default_str();
  cmd->add_option("--gpu", o->gpu, "GPU type (e.g. H100-80GB); default: compare every GPU in the catalog");
  cmd->add_option("--gpus", o->gpus, "number of GPUs (default: the fewest that fit)");
  cmd->add_option("--batch", o->batch, "inference: concurrent sequences; training: micro-batch per data-parallel rank")
      ->capture_default_str();
  cmd->add_option("--seq", o->seq, "training sequence length / inference prefill chunk")->capture_default_str();
  cmd->add_option("--context", o->context, "inference KV-cache positions per sequence")->capture_default_str();
  cmd->add_option("--dtype", o->dtype,
                  "weights: f32, bf16, fp8, int8, nf4, nf4-dq or q4 (inference; qlora base, default nf4)");
  cmd->add_option("--zero", o->zero, "ZeRO stage 0-3 (default: the lowest that fits)");
  cmd->add_option("--dp", o->dp, "data-parallel ranks (with --tp/--ep: evaluate exactly this layout)");
  cmd->add_option("--tp", o->tp, "tensor-parallel ranks");
  cmd->add_option("--ep", o->ep, "expert-parallel ranks (drawn from the dp ranks)");
  cmd->add_option("--lora-r", o->lora_r, "LoRA rank")->capture_default_str();
  cmd->add_option("--lora-targets", o->lora_targets, "attn (attention projections) or all (+ experts, FFNs)")
      ->capture_default_str();
  cmd->add_flag("--checkpointing", o->checkpointing, "activation checkpointing (recompute each layer in backward)");
  cmd->add_option("--tokens", o->tokens, "training tokens (for time and cost), e.g. 1e9");
  cmd->add_option("--mfu", o->mfu, "model FLOPs utilisation assumed")->capture_default_str();
  cmd->add_option("--mbu", o->mbu, "memory-bandwidth utilisation assumed for decode")->capture_default_str();
  cmd->add_option("--prices", o->prices, "JSON price file {\"currency\":..,\"gpu_hour\":{GPU: price}}");
  cmd->add_flag("--json", o->json, "machine-readable output");
  cmd->add_flag("--explain", o->explain, "show the formula behind each number");
  cmd->callback([o]() {
    if (o->list) {
      std::printf("models:\n");
      for (auto& e : model_catalog()) std::printf("  %-18s %-34s %s\n", e.name, e.hf_repo, e.headline);
      std::printf("GPUs:\n");
      for (auto& g : gpu_catalog())
        std::printf("  %-14s %-40s %6.0f GiB %6.0f TFLOP/s bf16 %6.0f GB/s  %s %.0f GB/s\n", g.name, g.description,
                    g.mem_gib, g.bf16_tflops, g.mem_bw_gbs, g.link, g.link_gbs);
      return;
    }
    MOE_CHECK(!o->model.empty(), "plan: give a model directory, config.json or catalog name (see --list)");
    PlanRequest req;
    req.job.job = parse_job(o->job);
    if (!o->dtype.empty()) {
      req.job.weights = parse_weight_format(o->dtype);
    } else if (req.job.job == JobKind::Qlora) {
      req.job.weights = WeightFormat::NF4;
    }
    MOE_CHECK(o->lora_targets == "all" || o->lora_targets == "attn", "--lora-targets must be attn or all, got '%s'",
              o->lora_targets.c_str());
    req.job.lora_targets = o->lora_targets == "all" ? LoraTargets::All : LoraTargets::Attention;
    req.job.batch = o->batch;
    req.job.seq = o->seq;
    req.job.context = o->context;
    req.job.checkpointing = o->checkpointing;
    req.job.lora_r = o->lora_r;
    req.gpu = o->gpu;
    MOE_CHECK(o->gpus >= 0, "--gpus must be >= 1, got %lld", (long long)o->gpus);
    req.gpus = o->gpus;
    MOE_CHECK(o->dp >= 0 && o->tp >= 0 && o->ep >= 0, "--dp, --tp and --ep must be >= 1");
    if (o->dp || o->tp || o->ep) {
      req.layout_given = true;
      req.par.tp = o->tp ? o->tp : 1;
      req.par.ep = o->ep ? o->ep : 1;
      req.par.dp = o->dp ? o->dp : (o->gpus ? o->gpus / req.par.tp : req.par.ep);
      MOE_CHECK(req.par.dp >= 1, "--gpus %lld is smaller than --tp %lld", (long long)o->gpus, (long long)req.par.tp);
    }
    req.zero = o->zero;
    MOE_CHECK(o->tokens >= 0 && o->tokens < 9.2e18, "--tokens must be a non-negative count");
    req.tokens = static_cast<int64_t>(o->tokens);
    req.mfu = o->mfu;
    req.mbu = o->mbu;
    if (!o->prices.empty()) req.prices = load_prices(o->prices);
    PlanModel m = resolve_plan_model(o->model);
    PlanReport r = make_plan(m, req);
    if (o->json) {
      std::printf("%s\n", report_json(r).c_str());
    } else {
      std::fputs(report_text(r, o->explain).c_str(), stdout);
    }
  });
}

}  // namespace moe
