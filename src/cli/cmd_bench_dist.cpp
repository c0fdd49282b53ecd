// cmd_bench_dist.cpp — `moe bench dist`: one distributed training step under mpirun, the bytes
// its collectives move against the planner's prediction for the same job (engine_dist_comm,
// what `moe plan --device cpu --job train --ep P --dp Q` prints), and its time split into
// compute, all-to-all and all-reduce (reported, never asserted on time).
//
// Every rank builds the same model (a directory, or random weights of a preset shape), keeps
// its routed experts (shard_experts) and runs what the trainer runs per step: zero the
// gradients, forward_backward on its rows of a random global batch (LossOptions::batch = the
// world, route.ep = its EP group), all_reduce_grads, clip_grad_norm_global, AdamW.
// Measured per timed step, on each rank:
//  - wall time, and the seconds and bytes of each kind of collective (the delta of
//    Parallel::stats(): the bytes the rank sends to other ranks); bytes are summed over ranks,
//    times are each rank's own (a collective's time includes waiting for the slowest rank);
//    compute = wall - time inside collectives;
//  - R_off, the routed (token, slot) assignments whose expert lives on another rank of the EP
//    group, from an untimed forward-only pass on the same rows and weights just before the step
//    (without LossOptions::batch, so its router counts are this rank's own): the rows outside
//    the rank's own experts, summed over MoE layers. The step's routing is the same (same
//    weights, same rows, dropless).
// Reported by rank 0: bytes per kind, measured (mean over the timed steps) against the plan
// (uniform R_off = Lm T K (ep-1)/ep, the planner's figure) and against the plan evaluated at
// the measured R_off (the formula alone: it must match to the byte); each rank's median step
// split into compute / all-to-all / all-reduce.
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "core/rng.h"
#include "dist/parallel.h"
#include "model/model_train.h"
#include "model/random_init.h"
#include "plan/plan_model.h"
#include "plan/planner.h"
#include "train/distributed.h"
#include "train/optimizer.h"

namespace moe {
namespace {

struct DistBenchOpts {
  std::string model_dir, arch = "mixtral", preset = "tiny";
  int64_t layers = 0, experts = 0, topk = 0, batch = 8, seq = 64, steps = 5, warmup = 1;
  int ep = 0, dp = 0;
  double lr = 1e-4, clip = 1.0;
  uint64_t seed = 1;
  bool recompute = false, json = false;
};

// One timed step on one rank (plain data: gathered to rank 0 as bytes).
struct StepRecord {
  double wall = 0;
  double seconds[dist::kNumColl] = {};
  int64_t bytes[dist::kNumColl] = {};
  int64_t rows_off = 0;
};

// The model every rank trains: f32 weights it owns (the optimizer writes into them), its own
// routed experts only.
Model build_model(const DistBenchOpts& o, const dist::Parallel& par) {
  LoadOptions lo;
  lo.keep_dtype = false;
  lo.weight_dtype = DType::F32;
  Model m;
  if (o.model_dir.empty()) {
    ModelConfig c = preset_config(o.arch, o.preset);
    if (o.layers > 0) c.n_layer = o.layers;
    if (o.experts > 0) c.n_expert = o.experts;
    if (o.topk > 0) c.n_expert_used = o.topk;
    MOE_CHECK(c.n_expert_used <= c.n_expert, "--topk %lld exceeds the number of experts %lld",
              (long long)c.n_expert_used, (long long)c.n_expert);
    m = Model::from_tensors(c, random_weights(c, o.seed, DType::F32), lo);
  } else {
    m = Model::load(o.model_dir, lo);
  }
  MOE_CHECK(o.seq <= m.config().max_position_embeddings, "--seq %lld exceeds the model's max_position_embeddings %lld",
            (long long)o.seq, (long long)m.config().max_position_embeddings);
  shard_experts(m.config(), m.mutable_weights(), par);
  m.mutable_weights() = transform_weights(m.config(), m.weights(), [](const Tensor& t) {
    Tensor out = Tensor::empty(t.shape(), DType::F32, MemCategory::Weights);
    out.copy_from(t);
    return out;
  });
  return m;
}

// Random token ids [B,S] i32, the same on every rank (same seed); labels are the ids.
Tensor random_ids(Rng& rng, int64_t b, int64_t s, int64_t vocab) {
  Tensor ids = Tensor::empty({b, s}, DType::I32, MemCategory::Workspace);
  for (int64_t i = 0; i < b * s; ++i) ids.data<int32_t>()[i] = int32_t(rng.next() % uint64_t(vocab));
  return ids;
}

// This rank's routed assignments to experts it does not hold, summed over MoE layers, from a
// forward without the global statistics (its own router counts).
int64_t off_rank_rows(const Model& m, const Tensor& ids, const LossOptions& lopt, const dist::Parallel& par) {
  if (par.ep == 1) return 0;
  LossOptions local = lopt;
  local.batch = nullptr;
  local.recompute = false;
  const StepLosses r = forward_backward(m, ids, ids, nullptr, local);
  const int64_t e_n = m.config().n_expert, e0 = par.expert_begin(e_n), e1 = e0 + par.experts_per_rank(e_n);
  int64_t off = 0;
  for (const RouterStats& st : r.router) {
    MOE_CHECK(st.dropped == 0, "bench dist: routing dropped assignments (the bench is dropless)");
    for (int64_t e = 0; e < e_n; ++e)
      if (e < e0 || e >= e1) off += int64_t(st.count[size_t(e)]);
  }
  return off;
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

void run_dist_bench(const DistBenchOpts& o) {
  MOE_CHECK(dist::have_mpi(),
            "moe bench dist: this build of moe has no MPI (install libopenmpi-dev and rebuild; CMake reports "
            "'MPI: found')");
  MOE_CHECK(dist::launched_by_mpi(),
            "moe bench dist measures a job over several ranks: start it with mpirun -np N (N = ep x dp), e.g. "
            "mpirun -np 2 -x OMP_NUM_THREADS=1 moe bench dist MODEL --ep 2");
  const std::unique_ptr<dist::Parallel> par = dist::make_parallel(o.ep == 0 && o.dp == 0 ? 1 : o.ep, o.dp);
  MOE_CHECK(par->distributed(), "moe bench dist: the job has one rank; start it with mpirun -np N, N >= 2");
  const bool lead = par->rank() == 0;
  const int n_ranks = par->size();
  MOE_CHECK(o.batch >= n_ranks, "--batch %lld: fewer rows than the %d ranks (every rank takes batch / N rows)",
            (long long)o.batch, n_ranks);

  double t_load = now_seconds();
  Model m = build_model(o, *par);
  t_load = now_seconds() - t_load;
  const ModelConfig& mc = m.config();
  const std::string what = o.model_dir.empty() ? o.arch + "/" + o.preset : o.model_dir;
  if (lead) {
    std::printf("bench dist: %s (%s, %lld layers, D %lld, F %lld, E %lld, K %lld, V %lld), %d ranks = ep %d x dp %d, "
                "global batch %lld x seq %lld, %lld timed steps after %lld warm-up, %d threads per rank, recompute "
                "%s; model ready in %.1f s\n",
                what.c_str(), mc.model_type.c_str(), (long long)mc.n_layer, (long long)mc.hidden_size,
                (long long)mc.moe_intermediate_size, (long long)mc.n_expert, (long long)mc.n_expert_used,
                (long long)mc.vocab_size, n_ranks, par->ep, par->dp, (long long)o.batch, (long long)o.seq,
                (long long)o.steps, (long long)o.warmup, omp_get_max_threads(), o.recompute ? "on" : "off", t_load);
    std::fflush(stdout);
  }

  ModelWeights grads = zeros_like(mc, m.weights(), MemCategory::Grads);
  const std::vector<NamedParam> gparams = named_parameters(mc, grads);
  AdamWOptions aopt;
  AdamW opt(named_parameters(mc, m.weights(), true), gparams, aopt);
  LossOptions lopt;
  lopt.aux_coef = mc.router_aux_loss_coef;
  lopt.recompute = o.recompute;
  lopt.route.ep = par->ep > 1 ? par->ep_group.get() : nullptr;
  lopt.batch = par->world;
  std::vector<std::vector<bool>> touched(size_t(mc.n_layer), std::vector<bool>(size_t(std::max<int64_t>(mc.n_expert, 1))));

  Rng rng(o.seed + 1);
  std::vector<StepRecord> recs;
  for (int64_t step = 0; step < o.warmup + o.steps; ++step) {
    const Tensor ids = local_batch(random_ids(rng, o.batch, o.seq, mc.vocab_size), *par);
    const bool warm = step < o.warmup;
    StepRecord rec;
    if (!warm) rec.rows_off = off_rank_rows(m, ids, lopt, *par);
    par->world->barrier();  // every rank starts the step together: waits inside it are the step's own
    const dist::CommStats c0 = par->stats();
    const double t0 = now_seconds();
    for (const NamedParam& g : gparams) std::memset(g.value.raw(), 0, g.value.nbytes());
    for (auto& row : touched) std::fill(row.begin(), row.end(), false);
    const StepLosses r = forward_backward(m, ids, ids, &grads, lopt);
    for (size_t i = 0; i < r.router.size(); ++i)
      for (size_t e = 0; e < r.router[i].count.size(); ++e)
        if (r.router[i].count[e] > 0) touched[size_t(r.moe_layers[i])][e] = true;
    all_reduce_grads(*par, gparams);
    const double gnorm = clip_grad_norm_global(*par, gparams, o.clip);
    opt.step(o.lr, touched);
    rec.wall = now_seconds() - t0;
    const dist::CommStats dc = par->stats() - c0;
    for (int k = 0; k < dist::kNumColl; ++k) {
      rec.seconds[k] = dc.seconds[size_t(k)];
      rec.bytes[k] = dc.bytes[size_t(k)];
    }
    if (lead) {
      std::printf("step %lld/%lld%s: loss %.6f  grad norm %.4f  %.3f s (rank 0)\n", (long long)step + 1,
                  (long long)(o.warmup + o.steps), warm ? " (warm-up)" : "", r.total, gnorm, rec.wall);
      std::fflush(stdout);
    }
    if (!warm) recs.push_back(rec);
  }

  // ---- every rank's records to every rank (after the timing) ----
  const size_t n_steps = recs.size();
  std::vector<StepRecord> all(n_steps * size_t(n_ranks));
  par->world->all_gather(recs.data(), int64_t(n_steps * sizeof(StepRecord)), all.data());
  if (!lead) return;
  auto at = [&](int r, size_t s) -> const StepRecord& { return all[size_t(r) * n_steps + s]; };

  // Bytes per step summed over ranks, mean over the timed steps; R_off likewise.
  double bytes[dist::kNumColl] = {}, rows_off = 0;
  for (int r = 0; r < n_ranks; ++r)
    for (size_t s = 0; s < n_steps; ++s) {
      for (int k = 0; k < dist::kNumColl; ++k) bytes[k] += double(at(r, s).bytes[k]) / double(n_steps);
      rows_off += double(at(r, s).rows_off) / double(n_steps);
    }
  const PlanModel pm = plan_model_from_config(mc);
  const EngineDistComm plan = engine_dist_comm(pm, o.batch, o.seq, par->ep, par->dp, o.recompute);
  // The formula at each step's measured R_off, averaged like the measurement.
  double routed_ar = 0, routed_a2a = 0;
  for (size_t s = 0; s < n_steps; ++s) {
    int64_t off = 0;
    for (int r = 0; r < n_ranks; ++r) off += at(r, s).rows_off;
    const EngineDistComm p = engine_dist_comm(pm, o.batch, o.seq, par->ep, par->dp, o.recompute, off);
    routed_ar += double(p.all_reduce()) / double(n_steps);
    routed_a2a += double(p.all_to_all()) / double(n_steps);
  }
  const int kAR = int(dist::Coll::AllReduce), kA2A = int(dist::Coll::AllToAll);
  double other = 0;
  for (int k = 0; k < dist::kNumColl; ++k)
    if (k != kAR && k != kA2A) other += bytes[k];
  const double meas_total = bytes[kAR] + bytes[kA2A] + other;
  auto ratio = [](double a, double b) { return b > 0 ? a / b : (a == 0 ? 1.0 : 0.0); };
  const double ratio_total = ratio(meas_total, double(plan.total()));
  const double ratio_routed = ratio(meas_total, routed_ar + routed_a2a);

  std::printf("\nbytes per step, summed over the %d ranks (mean of %zu timed steps):\n", n_ranks, n_steps);
  std::printf("  %-11s %16s %16s %8s %20s %8s\n", "kind", "measured", "plan", "ratio", "plan @ measured R_off",
              "ratio");
  auto row = [&](const char* kind, double meas, double pl, double routed) {
    std::printf("  %-11s %16s %16s %8.4f %20s %8.4f\n", kind, with_commas(int64_t(meas + 0.5)).c_str(),
                with_commas(int64_t(pl + 0.5)).c_str(), ratio(meas, pl), with_commas(int64_t(routed + 0.5)).c_str(),
                ratio(meas, routed));
  };
  row("all-reduce", bytes[kAR], double(plan.all_reduce()), routed_ar);
  row("all-to-all", bytes[kA2A], double(plan.all_to_all()), routed_a2a);
  if (other > 0) row("other", other, 0, 0);
  row("total", meas_total, double(plan.total()), routed_ar + routed_a2a);
  std::printf("  plan: all-reduce = router statistics %s + cross-entropy %s + dense gradients %s + expert gradients "
              "%s + clip norm %s; all-to-all = counts %s + token rows %s\n",
              with_commas(plan.stats).c_str(), with_commas(plan.ce).c_str(), with_commas(plan.dense_grads).c_str(),
              with_commas(plan.expert_grads).c_str(), with_commas(plan.clip).c_str(),
              with_commas(plan.counts).c_str(), with_commas(plan.rows).c_str());
  if (par->ep > 1)
    std::printf("  R_off (assignments sent off-rank, all MoE layers and ranks): measured %.1f per step, plan "
                "Lm*T*K*(ep-1)/ep = %lld (ratio %.4f)\n",
                rows_off, (long long)plan.rows_off, ratio(rows_off, double(plan.rows_off)));
  std::printf("total ratio (measured / plan): %.4f\n", ratio_total);

  // Time: each rank's median step (by its wall time), split so the parts add up.
  std::printf("\ntime per step: each rank's median step (collective time includes waiting for other ranks):\n");
  std::printf("  %4s %10s %18s %18s %18s %14s\n", "rank", "step ms", "compute ms", "all-to-all ms", "all-reduce ms",
              "other ms");
  nlohmann::json jt = nlohmann::json::array();
  for (int r = 0; r < n_ranks; ++r) {
    std::vector<double> walls;
    for (size_t s = 0; s < n_steps; ++s) walls.push_back(at(r, s).wall);
    const double med = median(walls);
    size_t s_med = 0;
    for (size_t s = 0; s < n_steps; ++s)
      if (at(r, s).wall == med) s_med = s;
    const StepRecord& x = at(r, s_med);
    double coll = 0, oth = 0;
    for (int k = 0; k < dist::kNumColl; ++k) {
      coll += x.seconds[k];
      if (k != kAR && k != kA2A) oth += x.seconds[k];
    }
    const double comp = x.wall - coll;
    auto pct = [&](double v) { return x.wall > 0 ? 100.0 * v / x.wall : 0.0; };
    std::printf("  %4d %10.2f %10.2f (%4.1f%%) %10.2f (%4.1f%%) %10.2f (%4.1f%%) %6.2f (%4.1f%%)\n", r, 1e3 * x.wall,
                1e3 * comp, pct(comp), 1e3 * x.seconds[kA2A], pct(x.seconds[kA2A]), 1e3 * x.seconds[kAR],
                pct(x.seconds[kAR]), 1e3 * oth, pct(oth));
    jt.push_back({{"rank", r}, {"step_s", x.wall}, {"compute_s", comp}, {"all_to_all_s", x.seconds[kA2A]},
                  {"all_reduce_s", x.seconds[kAR]}, {"other_s", oth}});
  }
  std::fflush(stdout);
  if (o.json) {
    nlohmann::json j = {{"bench", "dist"}, {"model", what}, {"model_type", mc.model_type}, {"layers", mc.n_layer},
                        {"hidden", mc.hidden_size}, {"ffn", mc.moe_intermediate_size}, {"experts", mc.n_expert},
                        {"topk", mc.n_expert_used}, {"vocab", mc.vocab_size}, {"ranks", n_ranks}, {"ep", par->ep},
                        {"dp", par->dp}, {"batch", o.batch}, {"seq", o.seq}, {"steps", o.steps},
                        {"warmup", o.warmup}, {"recompute", o.recompute}, {"threads", omp_get_max_threads()}};
    j["bytes_per_step"] = {{"all_reduce", bytes[kAR]}, {"all_to_all", bytes[kA2A]}, {"other", other},
                           {"total", meas_total}};
    j["plan_bytes_per_step"] = {{"all_reduce", plan.all_reduce()}, {"all_to_all", plan.all_to_all()},
                                {"total", plan.total()}, {"stats", plan.stats}, {"ce", plan.ce},
                                {"dense_grads", plan.dense_grads}, {"expert_grads", plan.expert_grads},
                                {"clip", plan.clip}, {"counts", plan.counts}, {"rows", plan.rows},
                                {"rows_off", plan.rows_off}};
    j["plan_at_measured_rows_off"] = {{"all_reduce", routed_ar}, {"all_to_all", routed_a2a},
                                      {"total", routed_ar + routed_a2a}, {"rows_off", rows_off}};
    j["ratio_total"] = ratio_total;
    j["ratio_total_at_measured_rows_off"] = ratio_routed;
    j["time_median_step"] = jt;
    std::printf("%s\n", j.dump().c_str());
  }
}

}  // namespace

void add_dist_bench(CLI::App* bench) {
  auto o = std::make_shared<DistBenchOpts>();
  CLI::App* cmd = bench->add_subcommand(
      "dist", "distributed training under mpirun: bytes per step against moe plan's prediction, time split into "
              "compute / all-to-all / all-reduce");
  cmd->add_option("model", o->model_dir, "HF-format model directory (default: random weights of --arch/--preset)");
  cmd->add_option("--arch", o->arch, "model family of the preset")->capture_default_str();
  cmd->add_option("--preset", o->preset, "tiny, small, medium or 8x7b")->capture_default_str();
  cmd->add_option("--layers", o->layers, "override the preset's layer count")->check(CLI::Range(1, 1000));
  cmd->add_option("--experts", o->experts, "override the preset's expert count E")->check(CLI::Range(1, 4096));
  cmd->add_option("--topk", o->topk, "override the preset's experts per token K")->check(CLI::Range(1, 4096));
  cmd->add_option("--ep", o->ep, "expert-parallel ranks (0: the ranks --dp leaves)")->capture_default_str()
      ->check(CLI::Range(0, 4096));
  cmd->add_option("--dp", o->dp, "data-parallel replicas (0: the ranks --ep leaves; neither: all ranks)")
      ->capture_default_str()
      ->check(CLI::Range(0, 4096));
  cmd->add_option("--batch", o->batch, "sequences per step over all ranks (each rank takes its slice)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--seq", o->seq, "tokens per sequence")->capture_default_str()->check(CLI::Range(2, 1 << 20));
  cmd->add_option("--steps", o->steps, "timed steps")->capture_default_str()->check(CLI::Range(1, 10000));
  cmd->add_option("--warmup,--warmup-steps", o->warmup, "untimed steps first")->capture_default_str()
      ->check(CLI::Range(0, 1000));
  cmd->add_option("--lr", o->lr, "AdamW learning rate")->capture_default_str();
  cmd->add_option("--clip", o->clip, "global gradient-norm clip (0 = off; the norm is computed either way)")
      ->capture_default_str();
  cmd->add_option("--seed", o->seed, "weights and tokens seed")->capture_default_str();
  cmd->add_flag("--recompute", o->recompute, "per-layer activation recompute (the MoE exchanges run twice)");
  cmd->add_flag("--json", o->json, "also print one JSON line (last)");
  cmd->callback([o]() { run_dist_bench(*o); });
}

}  // namespace moe
