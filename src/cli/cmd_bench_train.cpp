// cmd_bench_train.cpp — `moe bench train`: training throughput and memory on a random model of
// a preset shape (or a model directory), reported against figures measured in the same run
// (never asserted on time).
//
// One step is what the trainer does: zero the gradients, forward_backward, global-norm clip,
// AdamW. Reported:
//  - tokens/s of the median timed step, and the median step's share spent in AdamW (all of
//    step_group's calls with --fused-update; clipping is not included);
//  - peak bytes per tracked category and the peak RSS; the training memory overhead is the
//    peak RSS during the steps minus the RSS after load (the kernel's high-water mark is reset
//    after load), the same definition as the PyTorch peer's peak_rss_increase_bytes;
//  - expert-GEMM FLOP/s: expert_ffn_forward_train + expert_ffn_backward re-run on the last
//    timed step's routing (rows per expert of every MoE layer), 18·P·D·F FLOPs per layer
//    (3 forward GEMMs and 6 backward GEMMs of 2·rows·D·F), over the f32 sgemm peak (a square
//    sgemm, cli_util.h measure_gemm_peak, best of several, measured before and after the timed
//    work, the better kept);
//  - activation peak against the activation layout's prediction, and with --act-sweep E1,E2,..
//    the same for models that differ only in their expert count (activation memory must grow
//    with tokens·top-k, not tokens·experts).
#include <malloc.h>
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "core/memory.h"
#include "core/rng.h"
#include "model/activations.h"
#include "model/model_train.h"
#include "model/random_init.h"
#include "plan/plan_model.h"
#include "plan/planner.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "ops/ops.h"
#include "train/lora.h"
#include "train/optimizer.h"

namespace moe {
namespace {

struct TrainBenchOpts {
  std::string arch = "mixtral", preset = "small", model_dir, act_sweep;
  int64_t layers = 0, experts = 0, topk = 0, batch = 4, seq = 256, steps = 5, warmup = 1;
  double lr = 1e-4, clip = 1.0;
  uint64_t seed = 1;
  bool recompute = false, json = false, fused = false;
  std::string optim_dtype = "f32";
  // The weights' dtype in the forward and backward: bf16 (mixed-precision training on bf16
  // copies of f32 master weights; a bf16 frozen base when fine-tuning) runs its products on the
  // CPU's bf16 matrix units where it has them, as `moe train/finetune` do.
  std::string weight_dtype = "f32";
  // `moe bench finetune`: LoRA on a frozen base (QLoRA with nf4).
  bool finetune = false, nf4 = false, double_quant = false;
  int64_t lora_r = 16;
  double lora_alpha = 16;
  std::string targets = "q_proj,k_proj,v_proj,o_proj";
  // The first prompt_frac of every sequence carries no loss (labels -100), as the prompt of
  // chat fine-tuning data: those rows skip the LM head.
  double prompt_frac = 0;
};

// A field of /proc/self/status in bytes ("VmRSS", "VmHWM"); 0 when unreadable.
int64_t proc_status_bytes(const char* key) {
  std::ifstream f("/proc/self/status");
  std::string line;
  const size_t n = std::strlen(key);
  while (std::getline(f, line))
    if (line.compare(0, n, key) == 0 && line.size() > n && line[n] == ':') {
      std::istringstream in(line.substr(n + 1));
      int64_t kb = 0;
      in >> kb;
      return kb * 1024;
    }
  return 0;
}

// Resets the kernel's RSS high-water mark (VmHWM := VmRSS; Linux >= 4.0), as the torch peer does.
bool reset_peak_rss() {
  std::ofstream f("/proc/self/clear_refs");
  if (!f) return false;
  f << "5";
  f.flush();
  return bool(f);
}

// GEMM peaks (cli_util.h): f32 through sgemm, bf16 on the path bf16 weights' products take.
double measure_sgemm_peak() { return measure_gemm_peak(Device::CPU, DType::F32); }
double measure_bf16_peak() { return measure_gemm_peak(Device::CPU, DType::BF16); }

// Whether bf16 weights' products run on the matrix units here (after the bench chose so).
bool bf16_on_matrix(const TrainBenchOpts& o) {
  return o.weight_dtype == "bf16" && cpu::bf16_gemm() == cpu::Bf16Gemm::Matrix;
}

std::string bf16_products_line(const TrainBenchOpts& o) {
  if (o.weight_dtype != "bf16") return "products: f32 weights, f32 GEMMs (OpenBLAS sgemm)";
  if (bf16_on_matrix(o))
    return "products: bf16 weights on oneDNN's bf16 matmul (ISA " + cpu::onednn_isa_name() +
           "), the other factor rounded to bf16, f32 accumulation";
  return "products: bf16 weights widened to f32 for sgemm (no bf16 matrix units in use: oneDNN ISA " +
         cpu::onednn_isa_name() + (cpu::bf16_matrix_available() ? ", MOE_BF16_GEMM=widen)" : ")");
}

ModelConfig bench_config(const TrainBenchOpts& o) {
  ModelConfig c = o.model_dir.empty() ? preset_config(o.arch, o.preset) : load_hf_config(o.model_dir + "/config.json");
  if (o.layers > 0) c.n_layer = o.layers;
  if (o.experts > 0) c.n_expert = o.experts;
  if (o.topk > 0) c.n_expert_used = o.topk;
  MOE_CHECK(c.n_expert_used <= c.n_expert, "--topk %lld exceeds the number of experts %lld",
            (long long)c.n_expert_used, (long long)c.n_expert);
  MOE_CHECK(o.seq <= c.max_position_embeddings, "--seq %lld exceeds the model's max_position_embeddings %lld",
            (long long)o.seq, (long long)c.max_position_embeddings);
  return c;
}

// The model the steps train: f32 weights the engine owns (the optimizer writes into them), as
// the trainer holds them. From o.model_dir when given (used as written), else random weights of cfg.
// Fine-tuning: the base as loaded (frozen; nf4 with o.nf4) with LoRA adapters attached.
Model build_model(const TrainBenchOpts& o, const ModelConfig& cfg) {
  LoadOptions lo;
  lo.keep_dtype = false;
  lo.weight_dtype = DType::F32;
  if (o.finetune) {
    if (o.weight_dtype == "bf16") lo.weight_dtype = DType::BF16;
    Model m = o.model_dir.empty() ? Model::from_tensors(cfg, random_weights(cfg, o.seed, DType::F32), lo)
                                  : Model::load(o.model_dir, lo);
    const DType qdt = qlora_base_dtype(o.nf4, o.double_quant, false);
    if (o.nf4) std::printf("%s\n", quantize_frozen_base(m.config(), m.mutable_weights(), qdt).c_str());
    LoraConfig lc;
    lc.r = o.lora_r;
    lc.alpha = o.lora_alpha;
    lc.target_modules = parse_target_modules(o.targets);
    lc.seed = o.seed;
    attach_lora(m.config(), m.mutable_weights(), lc);
    std::printf("%s", lora_audit(m.config(), m.weights()).c_str());
    return m;
  }
  if (!o.model_dir.empty()) {
    Model m = Model::load(o.model_dir, lo);
    m.mutable_weights() = transform_weights(m.config(), m.weights(), [](const Tensor& t) {
      Tensor out = Tensor::empty(t.shape(), DType::F32, MemCategory::Weights);
      out.copy_from(t);
      return out;
    });
    return m;
  }
  return Model::from_tensors(cfg, random_weights(cfg, o.seed, DType::F32), lo);
}

// Random token ids [B,S] i32 (labels are the ids themselves, as in the torch peer).
Tensor random_ids(Rng& rng, int64_t b, int64_t s, int64_t vocab) {
  Tensor ids = Tensor::empty({b, s}, DType::I32, MemCategory::Workspace);
  for (int64_t i = 0; i < b * s; ++i) ids.data<int32_t>()[i] = int32_t(rng.next() % uint64_t(vocab));
  return ids;
}

// The labels of a bench batch: the ids, with the first `frac` of every row -100 (a prompt).
Tensor prompt_masked(const Tensor& ids, double frac) {
  if (frac <= 0) return ids;
  Tensor l = Tensor::empty(ids.shape(), DType::I32, MemCategory::Workspace);
  const int64_t s = ids.dim(1), cut = int64_t(frac * double(s));
  for (int64_t i = 0; i < ids.numel(); ++i) l.data<int32_t>()[i] = i % s < cut ? -100 : ids.data<int32_t>()[i];
  return l;
}

struct ExpertTiming {
  double seconds = 0;  // all MoE layers, forward + backward, median of the repetitions
  double flops = 0;    // 18·P·D·F summed over the MoE layers
  int64_t rows = 0;    // P summed over the MoE layers
};

// Re-runs the expert ops of every MoE layer on the routing of one step (router counts per
// layer), with the model's weights and gradient tensors and random inputs of those shapes.
ExpertTiming time_expert_ops(const Model& m, ModelWeights& grads, const StepLosses& step, int reps = 3) {
  const ModelConfig& c = m.config();
  const int64_t d = c.hidden_size, f = c.moe_intermediate_size, e_n = c.n_expert;
  struct LayerCase {
    int64_t layer;
    Tensor offsets, xp, yp, h1, h3, dyp, dxp, drs, rs;
  };
  std::vector<LayerCase> cases;
  Rng rng(11);
  auto fill = [&](Tensor& t, double scale) {
    for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = float((rng.uniform() - 0.5) * scale);
  };
  ExpertTiming r;
  for (size_t i = 0; i < step.router.size(); ++i) {
    LayerCase lc;
    lc.layer = step.moe_layers[i];
    lc.offsets = Tensor::empty({e_n + 1}, DType::I32, MemCategory::Workspace);
    int32_t* off = lc.offsets.data<int32_t>();
    off[0] = 0;
    for (int64_t e = 0; e < e_n; ++e) off[e + 1] = off[e] + int32_t(step.router[i].count[size_t(e)]);
    const int64_t p = off[e_n];
    if (p == 0) continue;
    auto make = [&](int64_t cols, double scale) {
      Tensor t = Tensor::empty({p, cols}, DType::F32, MemCategory::Workspace);
      fill(t, scale);
      return t;
    };
    lc.xp = make(d, 2.0);
    lc.dyp = make(d, 1e-3);
    lc.yp = make(d, 0);
    lc.h1 = make(f, 0);
    lc.h3 = make(f, 0);
    lc.dxp = make(d, 0);
    lc.drs = Tensor::empty({p}, DType::F32, MemCategory::Workspace);
    lc.rs = Tensor::empty({p}, DType::F32, MemCategory::Workspace);
    for (int64_t j = 0; j < p; ++j) lc.rs.data<float>()[j] = 0.5f;
    r.rows += p;
    // 3 forward GEMMs and the backward's 3 dX GEMMs, plus 3 dW GEMMs when the experts train.
    const bool dw = grads.layers[size_t(lc.layer)].w1.defined();
    r.flops += (dw ? 18.0 : 12.0) * double(p) * double(d) * double(f);
    cases.push_back(std::move(lc));
  }
  std::vector<double> times;
  for (int rep = 0; rep < reps; ++rep) {
    const double t0 = now_seconds();
    for (LayerCase& lc : cases) {
      const LayerWeights& w = m.weights().layers[size_t(lc.layer)];
      LayerWeights& g = grads.layers[size_t(lc.layer)];
      expert_ffn_forward_train(lc.yp, lc.h1, lc.h3, lc.xp, lc.offsets, w.w1, w.w3, w.w2, lc.rs, w.lexp);
      expert_ffn_backward(lc.dxp, g.w1, g.w3, g.w2, lc.drs, lc.dyp, lc.xp, lc.h1, lc.h3, lc.offsets, w.w1, w.w3, w.w2,
                          lc.rs, w.lexp, &g.lexp);
    }
    times.push_back(now_seconds() - t0);
  }
  std::sort(times.begin(), times.end());
  r.seconds = times[times.size() / 2];
  return r;
}

// Peak Activations (and Workspace) bytes of one forward_backward of a model that differs from
// cfg only in its expert count, and the layout's prediction.
struct ActPoint {
  int64_t experts = 0;
  int64_t measured = 0, workspace = 0, layout = 0;
};

ActPoint measure_activations(const TrainBenchOpts& o, ModelConfig cfg, int64_t experts) {
  cfg.n_expert = experts;
  MOE_CHECK(cfg.n_expert_used <= experts, "--act-sweep: %lld experts is fewer than top-k %lld", (long long)experts,
            (long long)cfg.n_expert_used);
  LoadOptions lo;
  lo.keep_dtype = false;
  lo.weight_dtype = DType::F32;
  Model m = Model::from_tensors(cfg, random_weights(cfg, o.seed, DType::F32), lo);
  ModelWeights grads = zeros_like(cfg, m.weights(), MemCategory::Grads);
  Rng rng(o.seed + 1);
  Tensor ids = random_ids(rng, o.batch, o.seq, cfg.vocab_size);
  LossOptions lopt;
  lopt.aux_coef = cfg.router_aux_loss_coef;
  lopt.recompute = o.recompute;
  const int dev = int(Device::CPU);
  const int64_t act0 = mem_stats().current[dev][int(MemCategory::Activations)];
  const int64_t ws0 = mem_stats().current[dev][int(MemCategory::Workspace)];
  mem_reset_peaks();
  forward_backward(m, ids, ids, &grads, lopt);
  const MemStats st = mem_stats();
  ActPoint p;
  p.experts = experts;
  p.measured = st.peak[dev][int(MemCategory::Activations)] - act0;
  p.workspace = st.peak[dev][int(MemCategory::Workspace)] - ws0;
  p.layout = activation_layout(cfg, o.batch, o.seq, o.recompute ? ActMode::TrainingRecompute : ActMode::Training)
                 .total_bytes(cfg);
  return p;
}

std::vector<int64_t> parse_int_list(const std::string& s, const char* flag) {
  std::vector<int64_t> out;
  std::stringstream in(s);
  std::string item;
  while (std::getline(in, item, ',')) {
    char* end = nullptr;
    const long long v = std::strtoll(item.c_str(), &end, 10);
    MOE_CHECK(!item.empty() && end && *end == '\0' && v > 0 && v <= 4096,
              "%s: expected a comma-separated list of positive integers, got '%s'", flag, s.c_str());
    out.push_back(v);
  }
  return out;
}

double mib(double b) { return b / double(1 << 20); }

// The timed training steps and everything measured on them; fills *out (the JSON fields) and
// returns the model's config.
ModelConfig run_steps(const TrainBenchOpts& o, const ModelConfig& cfg, nlohmann::json* out) {
  const int dev = int(Device::CPU);
  const int threads = omp_get_max_threads();
  const std::string what = o.model_dir.empty() ? o.arch + "/" + o.preset : o.model_dir;
  if (o.weight_dtype == "bf16") cpu::use_bf16_matrix_where_available();  // as moe train / finetune
  const bool matrix = bf16_on_matrix(o);
  const double peak_before = measure_sgemm_peak();
  const double bf16_before = matrix ? measure_bf16_peak() : 0;

  // ---- model, then the RSS the training overhead is measured from ----
  double t_load = now_seconds();
  Model m = build_model(o, cfg);
  t_load = now_seconds() - t_load;
  const ModelConfig& mc = m.config();
  const bool bf16 = o.weight_dtype == "bf16";
  std::printf("%s\n", bf16_products_line(o).c_str());
  // Mixed-precision training: the f32 master weights' matrices split into bf16 upper halves (what
  // the steps read) and lower halves, as the trainer does (model_train.h): the same bytes as the
  // f32 weights loaded, so the split is part of making the model ready, before the measure.
  const bool mixed = bf16 && !o.finetune;
  MasterLowHalves low;
  if (mixed) low = split_master(mc, m.mutable_weights());
  // Return what loading freed (the random or mapped source tensors) to the OS, so the RSS the
  // overhead is measured from holds the model, not reusable free heap that would hide growth.
  malloc_trim(0);
  mem_trim();
  const int64_t rss_after_load = proc_status_bytes("VmRSS");
  const bool hwm_reset = reset_peak_rss();
  mem_reset_peaks();
  const MemStats at_load = mem_stats();

  MOE_CHECK(!o.fused || o.clip == 0, "moe bench train: --fused-update needs --clip 0");
  ModelWeights grads = o.fused ? ModelWeights() : zeros_like(mc, m.weights(), MemCategory::Grads);
  const std::vector<NamedParam> gparams = o.fused ? std::vector<NamedParam>() : named_parameters(mc, grads);
  AdamWOptions aopt;  // torch.optim.AdamW defaults, weight decay 0 (HF Trainer's default)
  aopt.state_dtype = o.optim_dtype == "bf16" ? DType::BF16 : DType::F32;
  AdamW opt(named_parameters(mc, m.weights(), true), gparams, aopt, mixed ? &low : nullptr);
  LossOptions lopt;
  lopt.aux_coef = mc.router_aux_loss_coef;
  lopt.recompute = o.recompute;
  std::vector<std::vector<bool>> touched(size_t(mc.n_layer), std::vector<bool>(size_t(std::max<int64_t>(mc.n_expert, 1))));

  Rng rng(o.seed + 1);
  std::vector<double> times, losses, opt_times;
  double phase_sum[StepLosses::kPhases] = {};  // over the timed steps
  StepLosses last;
  for (int64_t step = 0; step < o.warmup + o.steps; ++step) {
    Tensor ids = random_ids(rng, o.batch, o.seq, mc.vocab_size), labels = prompt_masked(ids, o.prompt_frac);
    const double t0 = now_seconds();
    for (const NamedParam& g : gparams) std::memset(g.value.raw(), 0, g.value.nbytes());
    for (auto& row : touched) std::fill(row.begin(), row.end(), false);
    auto mark = [&](const StepLosses& fw) {
      for (size_t i = 0; i < fw.router.size(); ++i)
        for (size_t e = 0; e < fw.router[i].count.size(); ++e)
          if (fw.router[i].count[e] > 0) touched[size_t(fw.moe_layers[i])][e] = true;
    };
    StepLosses r;
    double t_opt = 0;  // seconds in AdamW this step
    if (o.fused) {
      r = forward_backward_fused(m, ids, labels, lopt, [&](int64_t group, const std::vector<NamedParam>& g,
                                                           const StepLosses& fw) {
        if (group == kGroupHead) mark(fw);
        const double t1 = now_seconds();
        opt.step_group(o.lr, touched, g);
        t_opt += now_seconds() - t1;
      });
    } else {
      r = forward_backward(m, ids, labels, &grads, lopt);
      mark(r);
      clip_grad_norm(gparams, o.clip);
      const double t1 = now_seconds();
      opt.step(o.lr, touched);
      t_opt = now_seconds() - t1;
    }
    const double dt = now_seconds() - t0;
    losses.push_back(r.total);
    const bool warm = step < o.warmup;
    if (!warm) {
      times.push_back(dt);
      opt_times.push_back(t_opt);
      for (int p = 0; p < StepLosses::kPhases; ++p) phase_sum[p] += r.phase_s[p];
      if (!o.fused) phase_sum[StepLosses::kUpdate] += t_opt;
    }
    std::printf("step %lld/%lld%s: loss %.6f  %.3f s (AdamW %.3f s)  rss %.0f MiB\n", (long long)step + 1,
                (long long)(o.warmup + o.steps), warm ? " (warm-up)" : "", r.total, dt, t_opt,
                mib(double(proc_status_bytes("VmRSS"))));
    std::fflush(stdout);
    last = std::move(r);
  }
  const MemStats st = mem_stats();
  const int64_t hwm = proc_status_bytes("VmHWM");
  const int64_t peak_rss = hwm_reset ? hwm : std::max(hwm, rss_after_load);
  const int64_t overhead = peak_rss - rss_after_load;
  std::vector<double> sorted = times;
  std::sort(sorted.begin(), sorted.end());
  const double step_s = sorted[sorted.size() / 2];
  const double tok_s = double(o.batch * o.seq) / step_s;
  std::sort(opt_times.begin(), opt_times.end());
  const double opt_s = opt_times[opt_times.size() / 2];

  // ---- expert GEMMs on the last step's routing, then the GEMM peak again ----
  // (the fused update holds no whole-model gradient: the timing gets its own, after the peaks)
  if (o.fused) grads = zeros_like(mc, m.weights(), MemCategory::Workspace);
  const ExpertTiming et = time_expert_ops(m, grads, last);
  const double peak_after = measure_sgemm_peak();
  const double sgemm_peak = std::max(peak_before, peak_after);
  const double bf16_after = matrix ? measure_bf16_peak() : 0;
  const double bf16_peak = std::max(bf16_before, bf16_after);
  // The utilisations below are against the peak of the products' own type.
  const double peak = matrix ? bf16_peak : sgemm_peak;
  const char* peak_name = matrix ? "bf16 matmul peak" : "sgemm peak";
  const double expert_flops = et.seconds > 0 ? et.flops / et.seconds : 0;

  const int64_t act_peak = st.peak[dev][int(MemCategory::Activations)] - at_load.current[dev][int(MemCategory::Activations)];
  const int64_t act_layout =
      activation_layout(mc, o.batch, o.seq, o.recompute ? ActMode::TrainingRecompute : ActMode::Training,
                        expert_h_dtype(mc, m.weights()), head_grad(m.weights()))
          .total_bytes(mc);

  std::printf("\ntrain: median step %.3f s = %.1f tokens/s (%lld tokens/step); model ready in %.1f s, %s params\n",
              step_s, tok_s, (long long)(o.batch * o.seq), t_load, with_commas(m.n_params_total()).c_str());
  std::printf("AdamW (%s moments%s): median %.3f s per step = %.0f%% of the median step\n", o.optim_dtype.c_str(),
              o.fused ? ", fused per group" : "", opt_s, 100.0 * opt_s / step_s);
  // Where the time goes: each phase's mean over the timed steps (the rest is the step's
  // setup, gradient zeroing and clipping).
  nlohmann::json phases = nlohmann::json::object();
  double mean_step = 0;
  for (double t : times) mean_step += t / double(times.size());
  std::printf("step breakdown (mean of the timed steps, %.3f s):", mean_step);
  double accounted = 0;
  for (int p = 0; p < StepLosses::kPhases; ++p) {
    const double s = phase_sum[p] / double(times.size());
    accounted += s;
    phases[step_phase_name(p)] = s;
    std::printf(" %s %.3f s (%.0f%%)%s", step_phase_name(p), s, 100.0 * s / mean_step, p + 1 < StepLosses::kPhases ? "," : "");
  }
  phases["other"] = mean_step - accounted;
  std::printf("; other %.3f s\n", mean_step - accounted);
  std::printf("f32 sgemm peak (2048^3 cblas_sgemm, best of 3): %.1f GFLOP/s before, %.1f after -> %.1f GFLOP/s\n",
              peak_before / 1e9, peak_after / 1e9, sgemm_peak / 1e9);
  if (matrix)
    std::printf("bf16 matmul peak (2048^3 through oneDNN, best of 3): %.1f GFLOP/s before, %.1f after -> %.1f GFLOP/s "
                "(%.2fx the sgemm peak)\n",
                bf16_before / 1e9, bf16_after / 1e9, bf16_peak / 1e9, bf16_peak / sgemm_peak);
  std::printf("expert GEMMs (forward_train + backward, last step's routing: %lld rows over %zu MoE layers): "
              "%.2f GFLOP in %.3f s = %.1f GFLOP/s = %.1f%% of the %s (target >= 50%%); %.0f%% of the step\n",
              (long long)et.rows, last.router.size(), et.flops / 1e9, et.seconds, expert_flops / 1e9,
              100.0 * expert_flops / peak, peak_name, 100.0 * et.seconds / step_s);
  // The step's model FLOPs as the planner counts them (6·active parameters per token for full
  // training, 4· plus the adapters' for LoRA; causal attention), against the same sgemm peak:
  // a whole-step utilisation to set beside a peer's step time on the same model.
  JobSpec job;
  job.job = o.finetune ? JobKind::Lora : JobKind::Train;
  job.seq = o.seq;
  job.lora_r = o.lora_r;
  job.lora_targets = LoraTargets::Attention;
  for (const std::string& t : parse_target_modules(o.targets))
    if (t != "q_proj" && t != "k_proj" && t != "v_proj" && t != "o_proj") job.lora_targets = LoraTargets::All;
  const double model_flops = flops_per_token(plan_model_from_config(mc), job) * double(o.batch * o.seq);
  if (o.prompt_frac > 0)
    std::printf("model FLOPs: no utilisation with --prompt-frac (the planner's count includes the LM head of the prompt "
                "rows, which the step skips)\n");
  else
    std::printf("model FLOPs (planner: %s): %.2f GFLOP per step -> %.1f GFLOP/s at the median step = %.1f%% of the "
                "%s\n",
                o.finetune ? "2 x forward + 6 x adapter params per token" : "3 x forward: 6 x active params per token + causal attention", model_flops / 1e9,
                model_flops / step_s / 1e9, 100.0 * model_flops / step_s / peak, peak_name);
  std::printf("memory peaks during the steps (tracked):");
  for (int c = 0; c < kNumMemCategories; ++c)
    if (st.peak[dev][c] > 0) std::printf(" %s %.1f MiB", mem_category_name(MemCategory(c)), mib(double(st.peak[dev][c])));
  std::printf("; total %.1f MiB\n", mib(double(st.peak_total[dev])));
  std::printf("RSS: after load %.1f MiB, peak during the steps %.1f MiB, training overhead %.1f MiB%s\n",
              mib(double(rss_after_load)), mib(double(peak_rss)), mib(double(overhead)),
              hwm_reset ? "" : " (high-water mark not resettable: peak includes loading)");
  std::printf("activations: measured peak %.1f MiB, layout (ActivationLayout::total_bytes) %.1f MiB, ratio %.3f\n",
              mib(double(act_peak)), mib(double(act_layout)), act_layout > 0 ? double(act_peak) / double(act_layout) : 0.0);
  std::fflush(stdout);

  nlohmann::json j = {{"bench", o.finetune ? "finetune" : "train"}, {"model", what}, {"model_type", mc.model_type}, {"layers", mc.n_layer},
                      {"hidden", mc.hidden_size}, {"ffn", mc.moe_intermediate_size}, {"experts", mc.n_expert},
                      {"topk", mc.n_expert_used}, {"vocab", mc.vocab_size}, {"params_total", m.n_params_total()},
                      {"batch", o.batch}, {"seq", o.seq}, {"steps", o.steps}, {"warmup", o.warmup}, {"prompt_frac", o.prompt_frac},
                      {"threads", threads}, {"recompute", o.recompute}, {"fused_update", o.fused},
                      {"optimizer_dtype", o.optim_dtype}, {"clip", o.clip}, {"step_time_s_median", step_s},
                      {"step_times_s", times}, {"tokens_per_s", tok_s},
                      {"optimizer_s_median", opt_s}, {"losses", losses},
                      {"rss_after_load_bytes", rss_after_load}, {"peak_rss_bytes", peak_rss},
                      {"peak_rss_increase_bytes", overhead}, {"peak_is_training_only", hwm_reset},
                      {"activations_peak_bytes", act_peak}, {"activations_layout_bytes", act_layout},
                      {"weight_dtype", o.weight_dtype}, {"bf16_matrix", matrix}, {"bf16_peak_flops", bf16_peak},
                      {"gemm_peak_flops", peak},
                      {"sgemm_peak_flops", sgemm_peak}, {"sgemm_peak_before_flops", peak_before},
                      {"sgemm_peak_after_flops", peak_after}, {"expert_flops", et.flops},
                      {"expert_seconds", et.seconds}, {"expert_flops_per_s", expert_flops},
                      {"expert_fraction_of_peak", peak > 0 ? expert_flops / peak : 0.0},
                      {"expert_fraction_of_step", et.seconds / step_s}, {"phase_s_mean", phases},
                      {"model_flops_per_step", model_flops}, {"model_flops_fraction_of_peak", model_flops / step_s / peak}};
  nlohmann::json mem = nlohmann::json::object();
  for (int c = 0; c < kNumMemCategories; ++c)
    if (st.peak[dev][c] > 0) mem[mem_category_name(MemCategory(c))] = st.peak[dev][c];
  mem["total"] = st.peak_total[dev];
  j["mem_peak_bytes"] = mem;
  if (o.finetune)
    j["lora"] = {{"r", o.lora_r}, {"alpha", o.lora_alpha}, {"target_modules", o.targets}, {"nf4_base", o.nf4}, {"double_quant", o.double_quant},
                 {"trainable_params", lora_param_count(mc, m.weights())}};

  *out = j;
  return mc;
}

void run_train_bench(const TrainBenchOpts& o) {
  MOE_CHECK(o.model_dir.empty() || (o.layers == 0 && o.experts == 0 && o.topk == 0),
            "--model: the directory's shape is used as written (--layers/--experts/--topk apply to presets)");
  const ModelConfig cfg = bench_config(o);
  const std::vector<int64_t> sweep = o.act_sweep.empty() ? std::vector<int64_t>{} : parse_int_list(o.act_sweep, "--act-sweep");
  const int threads = omp_get_max_threads();
  const std::string what = o.model_dir.empty() ? o.arch + "/" + o.preset : o.model_dir;
  std::printf("bench %s: %s (%s, %lld layers, D %lld, F %lld, E %lld, K %lld, V %lld), batch %lld x seq %lld, "
              "%lld timed steps after %lld warm-up, %d threads, recompute %s\n",
              o.finetune ? "finetune" : "train", what.c_str(), cfg.model_type.c_str(), (long long)cfg.n_layer,
              (long long)cfg.hidden_size,
              (long long)cfg.moe_intermediate_size, (long long)cfg.n_expert, (long long)cfg.n_expert_used,
              (long long)cfg.vocab_size, (long long)o.batch, (long long)o.seq, (long long)o.steps,
              (long long)o.warmup, threads, o.recompute ? "on" : "off");
  std::fflush(stdout);
  nlohmann::json j;
  const ModelConfig mcfg = run_steps(o, cfg, &j);  // the model is gone when it returns

  // ---- activation memory against the expert count (other models) ----
  nlohmann::json js = nlohmann::json::array();
  std::vector<ActPoint> pts;
  for (int64_t e : sweep) {
    ActPoint p = measure_activations(o, mcfg, e);
    std::printf("activations at E=%lld (K %lld): measured peak %.2f MiB (+ workspace %.2f MiB), layout %.2f MiB\n",
                (long long)e, (long long)mcfg.n_expert_used, mib(double(p.measured)), mib(double(p.workspace)),
                mib(double(p.layout)));
    js.push_back({{"experts", e}, {"activations_peak_bytes", p.measured}, {"workspace_peak_bytes", p.workspace},
                  {"activations_layout_bytes", p.layout}});
    pts.push_back(p);
  }
  if (pts.size() >= 2) {
    const ActPoint &a = pts.front(), &b = pts.back();
    std::printf("activation growth E=%lld -> E=%lld: measured x%.3f, layout x%.3f (tokens*experts scaling would be "
                "x%.2f, tokens*top-k x1.00)\n",
                (long long)a.experts, (long long)b.experts, double(b.measured) / double(a.measured),
                double(b.layout) / double(a.layout), double(b.experts) / double(a.experts));
  }
  if (!sweep.empty()) j["act_sweep"] = js;
  if (o.json) std::printf("%s\n", j.dump().c_str());
}

}  // namespace

namespace {
CLI::App* add_train_like_bench(CLI::App* bench, bool finetune) {
  auto o = std::make_shared<TrainBenchOpts>();
  o->finetune = finetune;
  CLI::App* cmd =
      finetune ? bench->add_subcommand("finetune", "LoRA / QLoRA fine-tuning steps/s and memory (frozen base), the "
                                                   "same measurements as bench train")
               : bench->add_subcommand("train", "training steps/s, memory and expert-GEMM FLOP/s against the sgemm "
                                                "peak of the same run");
  if (finetune) {
    cmd->add_option("--lora-r", o->lora_r, "LoRA rank")->capture_default_str()->check(CLI::Range(1, 4096));
    cmd->add_option("--lora-alpha", o->lora_alpha, "LoRA alpha")->capture_default_str();
    cmd->add_option("--target-modules", o->targets, "PEFT target_modules (comma-separated)")->capture_default_str();
    cmd->add_flag("--load-in-4bit", o->nf4, "QLoRA: the base's projections stored NF4");
    cmd->add_flag("--double-quant", o->double_quant, "with --load-in-4bit: NF4 with double-quantised absmax values");
  }
  cmd->add_option("--arch", o->arch, "model family of the preset")->capture_default_str();
  cmd->add_option("--preset", o->preset, "tiny, small, medium or 8x7b")->capture_default_str();
  cmd->add_option("--model", o->model_dir, "HF-format model directory instead of a random preset model (the same "
                                           "weights another tool trains)");
  cmd->add_option("--layers", o->layers, "override the preset's layer count")->check(CLI::Range(1, 1000));
  cmd->add_option("--experts", o->experts, "override the preset's expert count E")->check(CLI::Range(1, 4096));
  cmd->add_option("--topk", o->topk, "override the preset's experts per token K")->check(CLI::Range(1, 4096));
  cmd->add_option("--batch", o->batch, "sequences per step")->capture_default_str()->check(CLI::Range(1, 4096));
  cmd->add_option("--seq", o->seq, "tokens per sequence")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--steps", o->steps, "timed steps (the median is reported)")->capture_default_str()
      ->check(CLI::Range(1, 10000));
  cmd->add_option("--warmup-steps", o->warmup, "untimed steps first")->capture_default_str()->check(CLI::Range(0, 1000));
  cmd->add_option("--prompt-frac", o->prompt_frac,
                  "the first fraction of every sequence carries no loss (labels -100, as a chat prompt); those rows "
                  "skip the LM head")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 1.0));
  cmd->add_option("--lr", o->lr, "AdamW learning rate")->capture_default_str();
  cmd->add_option("--clip", o->clip, "global gradient-norm clip (0 = off)")->capture_default_str();
  cmd->add_option("--seed", o->seed, "weights and tokens seed")->capture_default_str();
  cmd->add_flag("--recompute", o->recompute, "per-layer activation recompute");
  cmd->add_flag("--fused-update", o->fused, "update each layer as soon as its gradients are final (needs --clip 0)");
  cmd->add_option("--optimizer-dtype", o->optim_dtype, "AdamW moment storage")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16"}));
  if (finetune)
    cmd->add_option("--base-dtype", o->weight_dtype, "the frozen base's dtype: f32, or bf16 (products on the bf16 "
                                                     "matrix units where the CPU has them)")
        ->capture_default_str()
        ->check(CLI::IsMember({"f32", "bf16"}));
  else
    cmd->add_option("--weight-dtype", o->weight_dtype, "weights the steps read: f32, or bf16 (mixed precision: f32 "
                                                       "master weights whose matrices are kept as bf16 + lower 16 "
                                                       "bits; products on the bf16 matrix units where the CPU has "
                                                       "them)")
        ->capture_default_str()
        ->check(CLI::IsMember({"f32", "bf16"}));
  cmd->add_option("--act-sweep", o->act_sweep, "also measure one step's activation peak at these expert counts "
                                               "(e.g. 8,32), equal top-k");
  cmd->add_flag("--json", o->json, "also print one JSON line (last)");
  cmd->callback([o]() { run_train_bench(*o); });
  return cmd;
}
}  // namespace

void add_train_bench(CLI::App* bench) {
  add_train_like_bench(bench, false);
  add_train_like_bench(bench, true);
}

}  // namespace moe
