// cmd_plan.cpp — `moe plan MODEL|DIR`: memory, time and cost of an MoE job before running it.
// With --device cpu: the engine's own CPU job (one process, f32), per memory category, from
// the engine's tables (plan_memory with JobSpec::cpu_engine; engine_train_plan for training);
// with --ep/--dp for training, also the bytes the distributed step's collectives move
// (engine_dist_comm; `moe bench dist` measures them).
#include <cstdio>
#include <memory>
#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "core/memory.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "plan/model_catalog.h"
#include "plan/plan_report.h"

namespace moe {
namespace {

// The CPU engine's plan for `job` (train or infer) as text or JSON; ep x dp > 1: the
// communication of the distributed training step too (job.batch is then the global batch).
void print_cpu_plan(const PlanModel& m, const JobSpec& job, int64_t ep, int64_t dp, bool json) {
  const MemoryPlan mp = plan_memory(m, job, Parallel{});
  const bool train = job.job == JobKind::Train;
  EngineTrainPlan tp;
  if (train) tp = engine_train_plan(m, job.batch, job.seq, job.checkpointing, job.engine_train);
  const bool dist = ep * dp > 1;
  EngineDistComm cm;
  if (dist) cm = engine_dist_comm(m, job.batch, job.seq, ep, dp, job.checkpointing);
  const int64_t n = plan_params(m).total;
  if (json) {
    nlohmann::ordered_json j;
    j["model"] = m.name;
    j["family"] = m.family;
    j["device"] = "cpu";
    j["job"] = job_name(job.job);
    j["params"] = n;
    j["batch"] = job.batch;
    j["seq"] = job.seq;
    if (train) {
      j["recompute"] = job.checkpointing;
      j["fused_update"] = job.engine_train.fused_update;
      j["optimizer_dtype"] = job.engine_train.optimizer_bf16 ? "bf16" : "f32";
      j["weight_dtype"] = job.engine_train.weights_bf16 ? "bf16" : "f32";
    } else {
      j["context"] = job.context;
      j["weights_dtype"] = weight_format_info(job.weights).name;
    }
    nlohmann::ordered_json mem;
    mem["weights"] = mp.weights;
    if (mp.quant_weights) mem["quant_weights"] = mp.quant_weights;
    if (train) {
      mem["grads"] = mp.grads;
      mem["optimizer"] = mp.optimizer;
    } else {
      mem["kv_cache"] = mp.kv_cache;
    }
    mem["activations"] = mp.activations;
    mem["total"] = mp.total();
    j["memory"] = mem;
    if (train)
      j["activations"] = {{"saved", tp.act_saved},
                          {"step", tp.act_step},
                          {"working", tp.act_working},
                          {"working_phase", tp.working_phase}};
    if (dist) {
      nlohmann::ordered_json c;
      c["ranks"] = cm.ranks;
      c["ep"] = ep;
      c["dp"] = dp;
      c["memory_is_one_process"] = true;
      c["all_reduce"] = cm.all_reduce();
      c["all_to_all"] = cm.all_to_all();
      c["total"] = cm.total();
      c["stats"] = cm.stats;
      c["ce"] = cm.ce;
      c["dense_grads"] = cm.dense_grads;
      c["expert_grads"] = cm.expert_grads;
      c["clip"] = cm.clip;
      c["counts"] = cm.counts;
      c["rows"] = cm.rows;
      c["rows_off"] = cm.rows_off;
      j["comm_bytes_per_step"] = c;
    }
    std::printf("%s\n", j.dump(1).c_str());
    return;
  }
  auto line = [](const char* what, int64_t bytes, const std::string& how) {
    std::printf("%-12s %18s B %12s  %s\n", what, with_commas(bytes).c_str(), human_bytes(double(bytes)).c_str(),
                how.c_str());
  };
  std::printf("model        %s (%s): %s parameters\n", m.name.c_str(), m.family.c_str(), with_commas(n).c_str());
  if (train) {
    const EngineTrainOptions& eo = job.engine_train;
    std::printf("job          train on the CPU engine (%s, one process): batch %lld x seq %lld = %lld tokens%s\n",
                eo.weights_bf16 ? "mixed precision: bf16 products, f32 master weights" : "f32", (long long)job.batch,
                (long long)job.seq, (long long)(job.batch * job.seq), job.checkpointing ? ", per-layer recompute" : "");
    line("weights", mp.weights, eo.weights_bf16 ? "f32 master 4 B x parameters, the matrices as bf16 upper + lower halves"
                                                : "4 B x parameters");
    line("grads", mp.grads,
         eo.fused_update ? "fused update: the largest group (head, a layer with one routed expert, embedding) x 4 B"
                         : "4 B x parameters");
    line("optimizer", mp.optimizer,
         std::string("AdamW m, v: ") + (eo.optimizer_bf16 ? "bf16, 4" : "f32, 8") +
             " B x parameters, from the first step (never-routed experts: none)");
    line("activations", mp.activations,
         strformat("peak of a step: saved %s%s + step buffers %s + working set %s (%s)",
                   with_commas(tp.act_saved).c_str(), eo.weights_bf16 ? " (experts' pre-activations bf16)" : "",
                   with_commas(tp.act_step).c_str(), with_commas(tp.act_working).c_str(), tp.working_phase.c_str()));
  } else {
    std::printf("job          infer on the CPU engine (f32 compute, %s weights): batch %lld, prefill chunks of %lld, "
                "%lld-position KV cache\n",
                weight_format_info(job.weights).name, (long long)job.batch, (long long)job.seq,
                (long long)job.context);
    if (mp.quant_weights) {
      line("quantized", mp.quant_weights, std::string("linear weights, ") + weight_format_info(job.weights).layout);
      line("weights", mp.weights, "embeddings, norms, biases: 2 B/param");
    } else {
      line("weights", mp.weights, weight_format_info(job.weights).layout);
    }
    line("kv-cache", mp.kv_cache,
         m.attn == AttnKind::MLA
             ? strformat("MLA latent: (kv_lora_rank %lld + qk_rope_head_dim %lld) x 4 B per position and layer",
                         (long long)m.kv_lora_rank, (long long)m.qk_rope_head_dim)
             : std::string("2 x Hkv x Dh x 4 B per position and layer"));
    line("activations", mp.activations, "peak of one prefill chunk");
  }
  line("total", mp.total(), "the tracker's categories; op scratch (workspace) and the process itself not included");
  if (!dist) return;
  std::printf("comm         ep %lld x dp %lld = %lld ranks (mpirun): bytes per step summed over the ranks; --batch is "
              "the global batch; the memory above is one process holding all of it\n",
              (long long)ep, (long long)dp, (long long)cm.ranks);
  line("all-reduce", cm.all_reduce(),
       strformat("router stats %s + cross-entropy %s + dense grads %s + expert grads %s + clip norm %s",
                 with_commas(cm.stats).c_str(), with_commas(cm.ce).c_str(), with_commas(cm.dense_grads).c_str(),
                 with_commas(cm.expert_grads).c_str(), with_commas(cm.clip).c_str()));
  line("all-to-all", cm.all_to_all(),
       strformat("counts %s + token rows %s (%s assignments off-rank, uniform: Lm*T*K*(ep-1)/ep)",
                 with_commas(cm.counts).c_str(), with_commas(cm.rows).c_str(), with_commas(cm.rows_off).c_str()));
  line("comm total", cm.total(), "engine_dist_comm (planner.h); `moe bench dist` measures it");
}

}  // namespace

void add_plan_command(CLI::App& app) {
  struct Opts {
    std::string model, job = "infer", gpu, dtype, prices, lora_targets = "all", device = "gpu";
    std::string optimizer_dtype = "f32", weight_dtype = "f32";
    bool fused_update = false;
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
  cmd->add_option("--device", o->device,
                  "gpu: GPU jobs and layouts; cpu: the engine's own CPU job (f32, one process; train or infer; "
                  "mixtral, qwen2_moe, qwen3_moe, olmoe)")
      ->capture_default_str();
  cmd->add_option("--gpu", o->gpu, "GPU type (e.g. H100-80GB); default: compare every GPU in the catalog");
  cmd->add_option("--gpus", o->gpus, "number of GPUs (default: the fewest that fit)");
  cmd->add_option("--batch", o->batch, "inference: concurrent sequences; training: micro-batch per data-parallel rank")
      ->capture_default_str();
  cmd->add_option("--seq", o->seq, "training sequence length / inference prefill chunk")->capture_default_str();
  cmd->add_option("--context", o->context, "inference KV-cache positions per sequence")->capture_default_str();
  cmd->add_option("--dtype", o->dtype,
                  "weights: f32, bf16, fp8, int8, nf4, nf4-dq or q4 (inference; qlora base, default nf4)");
  cmd->add_option("--zero", o->zero, "ZeRO stage 0-3 (default: the lowest that fits)");
  cmd->add_option("--dp", o->dp,
                  "data-parallel ranks (with --tp/--ep: evaluate exactly this layout); --device cpu --job train: "
                  "replicas of the distributed engine step (ep x dp ranks)");
  cmd->add_option("--tp", o->tp, "tensor-parallel ranks");
  cmd->add_option("--ep", o->ep,
                  "expert-parallel ranks (drawn from the dp ranks); --device cpu --job train: the experts' ranks in "
                  "each replica of the distributed engine step");
  cmd->add_option("--lora-r", o->lora_r, "LoRA rank")->capture_default_str();
  cmd->add_option("--lora-targets", o->lora_targets, "attn (attention projections) or all (+ experts, FFNs)")
      ->capture_default_str();
  cmd->add_flag("--checkpointing", o->checkpointing, "activation checkpointing (recompute each layer in backward)");
  cmd->add_flag("--fused-update", o->fused_update, "--device cpu --job train: moe train's fused per-layer update");
  cmd->add_option("--optimizer-dtype", o->optimizer_dtype, "--device cpu --job train: AdamW moments f32 or bf16")
      ->check(CLI::IsMember({"f32", "bf16"}));
  cmd->add_option("--weight-dtype", o->weight_dtype,
                  "--device cpu --job train: f32, or bf16 (mixed precision: f32 master weights split into bf16 + lower halves)")
      ->check(CLI::IsMember({"f32", "bf16"}));
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
    MOE_CHECK(o->device == "gpu" || o->device == "cpu", "--device must be gpu or cpu, got '%s'", o->device.c_str());
    if (o->device == "cpu") {
      MOE_CHECK(o->gpu.empty() && !o->gpus && !o->tp && o->zero < 0 && o->prices.empty() && o->tokens == 0,
                "--device cpu plans the engine's own job: --gpu, --gpus, --tp, --zero, --tokens and --prices apply "
                "to GPU plans");
      MOE_CHECK(req.job.job == JobKind::Train || (!o->dp && !o->ep),
                "--device cpu: --ep and --dp plan the distributed training step's communication (--job train)");
      req.job.cpu_engine = true;
      req.job.engine_train.fused_update = o->fused_update;
      req.job.engine_train.optimizer_bf16 = o->optimizer_dtype == "bf16";
      req.job.engine_train.weights_bf16 = o->weight_dtype == "bf16";
      // `moe train` multiplies bf16 weights on the matrix units where this CPU has them.
      req.job.engine_train.bf16_matrix = cpu::bf16_matrix_available();
      req.job.act_bytes = 4;
      if (o->dtype.empty()) req.job.weights = WeightFormat::F32;
      MOE_CHECK(req.job.job != JobKind::Train || req.job.weights == WeightFormat::F32,
                "--device cpu: training keeps f32 weights (--dtype %s)", o->dtype.c_str());
      print_cpu_plan(resolve_plan_model(o->model), req.job, o->ep ? o->ep : 1, o->dp ? o->dp : 1, o->json);
      return;
    }
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
