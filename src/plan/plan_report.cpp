// plan_report.cpp — layout search, time and cost, and the table / JSON / --explain renderings.
#include "core/json_util.h"
#include "plan/plan_report.h"

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <sstream>

#include "core/error.h"
#include "core/file_util.h"
#include "core/memory.h"
#include "plan/model_catalog.h"

namespace moe {

using json = nlohmann::json;

namespace {

constexpr int64_t kGpuOverheadBytes = int64_t(1) << 30;  // CUDA context + cuBLAS workspace + allocator slack
constexpr int64_t kMaxGpus = 4096;

std::string short_count(double v) {
  if (v >= 1e12) return strformat("%.2fT", v / 1e12);
  if (v >= 1e9) return strformat("%.2fB", v / 1e9);
  if (v >= 1e6) return strformat("%.2fM", v / 1e6);
  if (v >= 1e3) return strformat("%.1fK", v / 1e3);
  return strformat("%.0f", v);
}

std::string duration(double s) {
  if (s < 120) return strformat("%.1f s", s);
  if (s < 7200) return strformat("%.1f min", s / 60);
  if (s < 3 * 86400) return strformat("%.1f h", s / 3600);
  return strformat("%.1f days", s / 86400);
}

std::string layout_str(const Parallel& p, JobKind job) {
  std::string s = strformat("%lld GPU%s: dp %lld tp %lld ep %lld", (long long)p.gpus(), p.gpus() > 1 ? "s" : "",
                            (long long)p.dp, (long long)p.tp, (long long)p.ep);
  if (job != JobKind::Infer) s += strformat(" zero %d", p.zero);
  return s;
}

GpuPlan evaluate(const PlanModel& m, const PlanRequest& req, const GpuSpec& gpu, const Parallel& par) {
  GpuPlan g;
  g.gpu = &gpu;
  g.par = par;
  JobSpec job = req.job;
  job.overhead_bytes = kGpuOverheadBytes;
  g.mem = plan_memory(m, job, par);
  g.usable_bytes = gpu.mem_bytes();
  g.fits = double(g.mem.total()) <= g.usable_bytes;
  if (!g.fits)
    g.why_not = strformat("needs %s per GPU, has %s", human_bytes(double(g.mem.total())).c_str(),
                          human_bytes(g.usable_bytes).c_str());
  g.a2a_bytes = all_to_all_bytes(m, job, par);
  const double n = double(par.gpus()), peak = gpu.bf16_tflops * 1e12, bw = gpu.mem_bw_gbs * 1e9;
  if (req.prices) {
    auto it = req.prices->gpu_hour.find(gpu.name);
    if (it != req.prices->gpu_hour.end()) g.price_per_gpu_hour = it->second;
  }
  if (job.job == JobKind::Infer) {
    const ParamCounts pc = plan_params(m);
    JobSpec dj = job;
    dj.seq = job.context;  // decode attends to (on average) half the context
    g.flops_per_token = flops_per_token(m, dj);
    const double w_ex = double(expert_weight_bytes(pc, job.weights));
    const double w_ne = double(model_weight_bytes(pc, job.weights)) - w_ex;
    double frac = 1.0;
    if (m.n_expert > 0)
      frac = 1.0 - std::pow(1.0 - double(m.n_expert_used) / double(m.n_expert), double(job.batch));
    g.decode_bytes_per_step = w_ne + w_ex * frac + double(kv_cache_bytes(m, job.batch, job.context, job.act_bytes));
    const double t_mem = g.decode_bytes_per_step / (n * bw * req.mbu);
    const double t_cmp = double(job.batch) * g.flops_per_token / (n * peak * req.mfu);
    g.decode_tok_s = double(job.batch) / std::max(t_mem, t_cmp);
    JobSpec pj = job;
    pj.seq = std::min(job.seq, job.context);
    g.prefill_tok_s = n * peak * req.mfu / flops_per_token(m, pj);
    if (g.price_per_gpu_hour) g.cost = *g.price_per_gpu_hour * n / 3600.0 / g.decode_tok_s * 1e6;
  } else {
    g.flops_per_token = flops_per_token(m, job);
    if (req.tokens > 0) {
      const double recompute = job.checkpointing ? 4.0 / 3.0 : 1.0;
      g.train_seconds = g.flops_per_token * double(req.tokens) * recompute / (n * peak * req.mfu);
      g.gpu_hours = n * g.train_seconds / 3600.0;
      if (g.price_per_gpu_hour) g.cost = *g.price_per_gpu_hour * g.gpu_hours;
    }
  }
  return g;
}

// The fewest GPUs (or exactly req.gpus) on which the job fits; at that count the layout with the
// least communication: lowest ZeRO stage, then lowest tp, then lowest ep.
GpuPlan best_layout(const PlanModel& m, const PlanRequest& req, const GpuSpec& gpu) {
  if (req.layout_given) {
    Parallel p = req.par;
    p.zero = std::max(req.zero, 0);
    if (req.gpus > 0)
      MOE_CHECK(req.gpus == p.gpus(), "--gpus %lld but --dp %lld x --tp %lld = %lld GPUs", (long long)req.gpus,
                (long long)p.dp, (long long)p.tp, (long long)p.gpus());
    return evaluate(m, req, gpu, p);
  }
  std::vector<int64_t> counts;
  if (req.gpus > 0) {
    counts.push_back(req.gpus);
  } else {
    for (int64_t n = 1; n <= kMaxGpus; n *= 2) counts.push_back(n);
  }
  std::vector<int> zeros;
  if (req.job.job == JobKind::Infer) {
    zeros = {0};
  } else if (req.zero >= 0) {
    zeros = {req.zero};
  } else {
    zeros = {0, 1, 2, 3};
  }
  std::optional<GpuPlan> smallest;
  for (int64_t n : counts) {
    for (int z : zeros)
      for (int64_t tp : {1, 2, 4, 8}) {
        if (n % tp || m.n_head % tp) continue;
        const int64_t dp = n / tp;
        for (int64_t ep = 1; ep <= std::min<int64_t>(dp, std::max<int64_t>(m.n_expert, 1)); ++ep) {
          if (dp % ep || (m.n_expert > 0 && m.n_expert % ep)) continue;
          Parallel p{dp, tp, ep, z};
          GpuPlan g = evaluate(m, req, gpu, p);
          if (g.fits) return g;
          if (!smallest || g.mem.total() < smallest->mem.total()) smallest = g;
        }
      }
  }
  MOE_ASSERT(smallest.has_value());
  GpuPlan g = *smallest;
  g.why_not = req.gpus > 0 ? strformat("does not fit on %lld GPUs (best layout %s)", (long long)req.gpus,
                                       g.why_not.c_str())
                           : strformat("does not fit on up to %lld GPUs", (long long)kMaxGpus);
  return g;
}

}  // namespace

PriceTable parse_prices(const std::string& text, const std::string& what) {
  json j = parse_json_object(text, what);
  PriceTable p;
  p.path = what;
  if (j.contains("currency")) {
    MOE_CHECK(j["currency"].is_string(), "%s: 'currency' must be a string", what.c_str());
    p.currency = j["currency"].get<std::string>();
  }
  if (j.contains("note") && j["note"].is_string()) p.note = j["note"].get<std::string>();
  MOE_CHECK(j.contains("gpu_hour") && j["gpu_hour"].is_object(),
            "%s: expected an object 'gpu_hour' mapping GPU names to a price per GPU-hour", what.c_str());
  for (auto& [k, v] : j["gpu_hour"].items()) {
    MOE_CHECK(v.is_number() && v.get<double>() >= 0, "%s: gpu_hour.%s must be a non-negative number", what.c_str(),
              k.c_str());
    p.gpu_hour[find_gpu(k).name] = v.get<double>();
  }
  return p;
}

// read_file refuses directories, special files and oversized files, naming the path.
PriceTable load_prices(const std::string& path) { return parse_prices(read_file(path), path); }

PlanModel resolve_plan_model(const std::string& arg) {
  std::error_code ec;
  if (std::filesystem::exists(arg, ec)) return plan_model_from_path(arg);
  return catalog_model(arg);
}

PlanReport make_plan(const PlanModel& m, const PlanRequest& req) {
  const JobSpec& job = req.job;
  MOE_CHECK(job.batch >= 1, "--batch must be >= 1, got %lld", (long long)job.batch);
  MOE_CHECK(job.seq >= 1, "--seq must be >= 1, got %lld", (long long)job.seq);
  MOE_CHECK(job.context >= 1, "--context must be >= 1, got %lld", (long long)job.context);
  MOE_CHECK(req.gpus >= 0, "--gpus must be >= 1, got %lld", (long long)req.gpus);
  MOE_CHECK(req.mfu > 0 && req.mfu <= 1, "--mfu must be in (0, 1], got %g", req.mfu);
  MOE_CHECK(req.mbu > 0 && req.mbu <= 1, "--mbu must be in (0, 1], got %g", req.mbu);
  MOE_CHECK(req.tokens >= 0, "--tokens must be >= 0");
  MOE_CHECK(job.job == JobKind::Infer || job.job == JobKind::Qlora || job.weights == WeightFormat::BF16,
            "--dtype applies to inference and the QLoRA base; %s keeps bf16 weights", job_name(job.job));
  MOE_CHECK(job.job == JobKind::Infer || job.job == JobKind::Train || job.lora_r >= 1, "--lora-r must be >= 1, got %lld",
            (long long)job.lora_r);
  if (req.layout_given) {
    Parallel p = req.par;
    p.zero = std::max(req.zero, 0);
    validate_parallel(m, p);
  }
  if (req.zero >= 0) MOE_CHECK(req.zero <= 3, "--zero must be 0, 1, 2 or 3, got %d", req.zero);
  PlanReport r;
  r.model = m;
  r.params = plan_params(m);
  r.req = req;
  r.kv_bytes_per_token = kv_cache_bytes(m, 1, 1, job.act_bytes);
  for (WeightFormat f : {WeightFormat::F32, WeightFormat::BF16, WeightFormat::FP8, WeightFormat::INT8, WeightFormat::NF4,
                         WeightFormat::NF4DQ, WeightFormat::Q4})
    r.weight_bytes.push_back({weight_format_info(f).name, model_weight_bytes(r.params, f)});
  if (!req.gpu.empty()) {
    r.options.push_back(best_layout(m, req, find_gpu(req.gpu)));
  } else {
    for (auto& g : gpu_catalog()) r.options.push_back(best_layout(m, req, g));
  }
  return r;
}

namespace {

void add_mem_lines(std::ostringstream& o, const MemoryPlan& mp) {
  const std::pair<const char*, int64_t> rows[] = {
      {"weights", mp.weights},     {"quantized-weights", mp.quant_weights}, {"lora", mp.lora},
      {"grads", mp.grads},         {"optimizer", mp.optimizer},             {"activations", mp.activations},
      {"kv-cache", mp.kv_cache},   {"workspace", mp.workspace}};
  for (auto& [name, v] : rows)
    if (v) o << strformat("    %-18s %12s\n", name, human_bytes(double(v)).c_str());
  o << strformat("    %-18s %12s\n", "total", human_bytes(double(mp.total())).c_str());
}

void explain_lines(std::ostringstream& o, const PlanReport& r, const GpuPlan& g) {
  const PlanModel& m = r.model;
  const ParamCounts& pc = r.params;
  const JobSpec& job = r.req.job;
  const int64_t nm = m.ffn == FfnKind::SwiGLU ? 3 : 2;
  o << "\nhow each number is computed\n";
  o << strformat("  total params = embed V*D (%s) + lm_head (%s%s) + attention (%s) + norms (%s) + dense FFN (%s)\n"
                 "                + routers (%s) + routed experts (%s) + shared experts (%s) = %s\n",
                 with_commas(pc.embed).c_str(), with_commas(pc.lm_head).c_str(), m.tie_embeddings ? ", tied" : "",
                 with_commas(pc.attn).c_str(), with_commas(pc.norms).c_str(), with_commas(pc.dense_ffn).c_str(),
                 with_commas(pc.router).c_str(), with_commas(pc.experts).c_str(),
                 with_commas(pc.shared_experts).c_str(), with_commas(pc.total).c_str());
  if (m.n_expert > 0)
    o << strformat("  routed experts = %lld MoE layers x E %lld x one expert (%lld*D*F = %lld*%lld*%lld%s = %s) = %s\n",
                   (long long)m.n_moe_layers(), (long long)m.n_expert, (long long)nm, (long long)nm,
                   (long long)m.d_model, (long long)m.expert_ffn, m.expert_bias ? " + biases" : "",
                   with_commas(pc.one_expert).c_str(), with_commas(pc.experts).c_str());
  o << strformat("  active params = total - routed experts + MoE layers %lld x K %lld x one expert = %s"
                 " (without the input embedding: %s)\n",
                 (long long)m.n_moe_layers(), (long long)m.n_expert_used, with_commas(pc.active).c_str(),
                 with_commas(pc.active_no_embed).c_str());
  if (pc.mtp) o << strformat("  MTP module params (not in total) = %s\n", with_commas(pc.mtp).c_str());
  o << strformat("  weight bytes = linear weights (%s) x bytes/param of the format + the rest (%s) x 2 B"
                 " (4 B for f32)\n",
                 with_commas(pc.linear).c_str(), with_commas(pc.total - pc.linear).c_str());
  for (int i = 0; i <= static_cast<int>(WeightFormat::Q4); ++i) {
    const auto& fi = weight_format_info(static_cast<WeightFormat>(i));
    o << strformat("      %-7s %s\n", fi.name, fi.layout);
  }
  if (m.attn == AttnKind::MLA)
    o << strformat("  KV per token = layers x (kv_lora_rank %lld + qk_rope_head_dim %lld) x %lld B = %s"
                   " (the compressed MLA cache)\n",
                   (long long)m.kv_lora_rank, (long long)m.qk_rope_head_dim, (long long)job.act_bytes,
                   human_bytes(double(r.kv_bytes_per_token)).c_str());
  else
    o << strformat("  KV per token = decoder layers x 2 (K,V) x Hkv %lld x Dh %lld x %lld B = %s%s\n",
                   (long long)m.n_head_kv, (long long)m.head_dim, (long long)job.act_bytes,
                   human_bytes(double(r.kv_bytes_per_token)).c_str(),
                   m.sliding_window ? strformat(" (sliding layers hold at most %lld positions)",
                                                (long long)m.sliding_window).c_str()
                                    : "");
  const Parallel& p = g.par;
  o << strformat("  layout: gpus = dp %lld x tp %lld; experts split over ep %lld of the dp ranks; ZeRO group: dp %lld"
                 " ranks (non-expert), dp/ep %lld ranks (expert)\n",
                 (long long)p.dp, (long long)p.tp, (long long)p.ep, (long long)p.dp, (long long)(p.dp / p.ep));
  switch (job.job) {
    case JobKind::Train:
      o << "  weights = 2 B x (non-expert/tp + experts/(ep*tp)), / ZeRO group if zero >= 3\n"
           "  grads = 2 B x the same, sharded if zero >= 2; optimizer = 12 B (f32 master + Adam m, v), sharded if"
           " zero >= 1\n";
      break;
    case JobKind::Lora:
    case JobKind::Qlora:
      o << strformat("  adapter params = R %lld x (in + out) per targeted linear = %s;"
                     " lora = 4 B, grads = 4 B, optimizer = 8 B per adapter param (split like the weights)\n",
                     (long long)job.lora_r, with_commas(lora_params(m, job.lora_r, job.lora_targets)).c_str());
      o << strformat("  frozen base in %s: linear weights quantised as above, the rest bf16\n",
                     job.job == JobKind::Lora ? "bf16" : weight_format_info(job.weights).name);
      break;
    case JobKind::Infer:
      o << strformat("  weights = %s bytes split: non-expert/tp + experts/(ep*tp); KV = batch/dp x context %lld x"
                     " KV per token (/ min(tp, Hkv))\n",
                     weight_format_info(job.weights).name, (long long)job.context);
      o << "  activations = the engine's forward: x, h, y [T,D] + q, attn [T,H*Dh] + k, v [T,Hkv*Dh] + max(one layer's"
           " temporaries, head: final norm + logits [rows,V]); T = batch/dp x prefill chunk\n";
      break;
  }
  if (job.job != JobKind::Infer)
    o << strformat("  activations (bf16, T = micro-batch %lld x seq %lld): %s + one layer working set + head"
                   " (f32 logits [T,V]); / tp\n",
                   (long long)job.batch, (long long)job.seq,
                   job.checkpointing ? "layer inputs [T,D] only (checkpointing)" : "every layer's saved tensors");
  o << strformat("  workspace = 1 GiB per GPU runtime reserve (CUDA context, cuBLAS, allocator slack)%s\n",
                 job.job == JobKind::Qlora ? " + the largest linear dequantised to bf16" : "");
  if (p.ep > 1)
    o << strformat("  all-to-all per GPU per micro-batch = MoE layers %lld x 2 (dispatch+combine) x T*K rows x D %lld"
                   " x 2 B x (ep-1)/ep%s = %s\n",
                   (long long)m.n_moe_layers(), (long long)m.d_model, job.job == JobKind::Infer ? "" : " x 2 (backward)",
                   human_bytes(g.a2a_bytes).c_str());
  if (job.job == JobKind::Infer) {
    o << strformat("  decode step = max(bytes read / (gpus x %.0f GB/s x mbu %.2f), batch x FLOPs/token / (gpus x %.0f"
                   " TFLOP/s x mfu %.2f))\n",
                   g.gpu->mem_bw_gbs, r.req.mbu, g.gpu->bf16_tflops, r.req.mfu);
    o << "    bytes read = non-expert weights + expert weights x (1 - (1 - K/E)^batch) (distinct experts hit,"
         " uniform routing) + the whole KV cache\n";
    o << "  prefill tokens/s = gpus x peak x mfu / (2 x active params w/o embedding + attention FLOPs)\n";
  } else {
    o << strformat("  forward FLOPs/token = 2 x active params w/o embedding %s + attention 2 x keys x H x (qk+v)"
                   " per layer (keys = seq/2, causal)\n",
                   with_commas(pc.active_no_embed).c_str());
    o << strformat("  FLOPs/token = %s = %.4g\n",
                   job.job == JobKind::Train
                       ? "3 x forward"
                       : "2 x forward (no weight gradients for the frozen base) + 6 x adapter params a token uses",
                   g.flops_per_token);
    o << "  time = FLOPs/token x tokens (x 4/3 with checkpointing) / (gpus x peak bf16 x mfu); GPU-hours = gpus x"
         " time\n";
  }
  o << "  cost = GPU-hours x your price per GPU-hour (--prices); never a built-in price\n";
}

}  // namespace

std::string report_text(const PlanReport& r, bool explain) {
  const PlanModel& m = r.model;
  const ParamCounts& pc = r.params;
  const JobSpec& job = r.req.job;
  std::ostringstream o;
  o << strformat("model        %s (%s)%s\n", m.name.c_str(), m.family.c_str(),
                 m.source.empty() ? "" : (", config from " + m.source).c_str());
  o << strformat("layers       %zu (%lld MoE), D %lld, heads %lld", m.layers.size(), (long long)m.n_moe_layers(),
                 (long long)m.d_model, (long long)m.n_head);
  if (m.attn == AttnKind::MLA)
    o << strformat(" (MLA: q_lora %lld, kv_lora %lld, rope %lld, nope %lld, v %lld)", (long long)m.q_lora_rank,
                   (long long)m.kv_lora_rank, (long long)m.qk_rope_head_dim, (long long)m.qk_nope_head_dim,
                   (long long)m.v_head_dim);
  else
    o << strformat(" (kv %lld, head_dim %lld)", (long long)m.n_head_kv, (long long)m.head_dim);
  o << strformat(", experts %lld top-%lld, expert FFN %lld\n", (long long)m.n_expert, (long long)m.n_expert_used,
                 (long long)m.expert_ffn);
  o << strformat("parameters   total %s (%s), active per token %s (%s), without input embedding %s\n",
                 with_commas(pc.total).c_str(), short_count(double(pc.total)).c_str(), with_commas(pc.active).c_str(),
                 short_count(double(pc.active)).c_str(), short_count(double(pc.active_no_embed)).c_str());
  o << strformat("             embedding %s, LM head %s, attention %s, routed experts %s, shared %s, dense FFN %s\n",
                 short_count(double(pc.embed)).c_str(), short_count(double(pc.lm_head)).c_str(),
                 short_count(double(pc.attn)).c_str(), short_count(double(pc.experts)).c_str(),
                 short_count(double(pc.shared_experts)).c_str(), short_count(double(pc.dense_ffn)).c_str());
  if (pc.mtp) o << strformat("             + MTP module %s (not counted in total)\n", short_count(double(pc.mtp)).c_str());
  std::string wl;
  for (auto& [name, b] : r.weight_bytes)
    wl += strformat("%s%s %s", wl.empty() ? "" : " | ", name.c_str(), human_bytes(double(b)).c_str());
  o << "weights      " << wl << "\n";
  o << strformat("KV cache     %s per token; batch %lld x context %lld = %s\n",
                 human_bytes(double(r.kv_bytes_per_token)).c_str(), (long long)job.batch, (long long)job.context,
                 human_bytes(double(kv_cache_bytes(m, job.batch, job.context, job.act_bytes))).c_str());
  o << strformat("job          %s", job_name(job.job));
  if (job.job == JobKind::Infer || job.job == JobKind::Qlora) o << ", weights " << weight_format_info(job.weights).name;
  if (job.job == JobKind::Infer)
    o << strformat(", batch %lld, prefill chunk %lld, context %lld", (long long)job.batch, (long long)job.seq,
                   (long long)job.context);
  else
    o << strformat(", micro-batch %lld x seq %lld%s", (long long)job.batch, (long long)job.seq,
                   job.checkpointing ? ", activation checkpointing" : "");
  if (job.job == JobKind::Lora || job.job == JobKind::Qlora)
    o << strformat(", LoRA r %lld on %s (%s adapter params)", (long long)job.lora_r,
                   job.lora_targets == LoraTargets::All ? "attention+FFN/experts" : "attention",
                   short_count(double(lora_params(m, job.lora_r, job.lora_targets))).c_str());
  if (r.req.tokens) o << strformat(", %s tokens at mfu %.2f", short_count(double(r.req.tokens)).c_str(), r.req.mfu);
  o << "\n\n";
  o << strformat("%-14s %-38s %-24s %s\n", "GPU", "fewest GPUs that fit (layout)", "per-GPU memory",
                 job.job == JobKind::Infer ? "decode tok/s | prefill tok/s | cost/1M tok" : "time | GPU-hours | cost");
  for (auto& g : r.options) {
    std::string mem = strformat("%s / %s", human_bytes(double(g.mem.total())).c_str(), human_bytes(g.usable_bytes).c_str());
    std::string lay = g.fits ? layout_str(g.par, job.job) : "no: " + g.why_not;
    std::string perf;
    if (job.job == JobKind::Infer) {
      perf = strformat("%.1f | %.0f | %s", g.decode_tok_s, g.prefill_tok_s,
                       g.cost ? strformat("%.3f %s", *g.cost, r.req.prices->currency.c_str()).c_str() : "-");
    } else if (r.req.tokens) {
      perf = strformat("%s | %.0f | %s", duration(g.train_seconds).c_str(), g.gpu_hours,
                       g.cost ? strformat("%.0f %s", *g.cost, r.req.prices->currency.c_str()).c_str() : "-");
    } else {
      perf = "(give --tokens)";
    }
    o << strformat("%-14s %-38s %-24s %s\n", g.gpu->name, lay.c_str(), g.fits ? mem.c_str() : "", perf.c_str());
  }
  if (r.options.size() == 1) {
    const GpuPlan& g = r.options[0];
    o << strformat("\nper-GPU memory on %s (%s), %s:\n", g.gpu->name, g.gpu->description,
                   layout_str(g.par, job.job).c_str());
    add_mem_lines(o, g.mem);
    o << strformat("    %-18s %12s  -> %s\n", "usable", human_bytes(g.usable_bytes).c_str(),
                   g.fits ? "fits" : ("does not fit: " + g.why_not).c_str());
    if (g.par.ep > 1)
      o << strformat("  expert-parallel all-to-all: %s per GPU per %s\n", human_bytes(g.a2a_bytes).c_str(),
                     job.job == JobKind::Infer ? "forward" : "micro-batch step (fwd+bwd)");
  }
  if (r.req.prices) {
    o << strformat("\nprices from %s (user input, %s per GPU-hour)%s%s\n", r.req.prices->path.c_str(),
                   r.req.prices->currency.c_str(), r.req.prices->note.empty() ? "" : ": ",
                   r.req.prices->note.c_str());
  } else {
    o << "\nno prices given: pass --prices FILE.json (see data/prices.example.json) for costs\n";
  }
  if (explain) {
    const GpuPlan* g = &r.options[0];
    for (auto& x : r.options)
      if (x.fits) {
        g = &x;
        break;
      }
    explain_lines(o, r, *g);
  }
  return o.str();
}

std::string report_json(const PlanReport& r) {
  const PlanModel& m = r.model;
  const ParamCounts& pc = r.params;
  const JobSpec& job = r.req.job;
  json j;
  j["model"] = m.name;
  j["family"] = m.family;
  if (!m.source.empty()) j["source"] = m.source;
  j["total_params"] = pc.total;
  j["active_params"] = pc.active;
  j["active_params_no_embedding"] = pc.active_no_embed;
  j["params"] = {{"embedding", pc.embed},       {"lm_head", pc.lm_head},     {"attention", pc.attn},
                 {"norms", pc.norms},           {"dense_ffn", pc.dense_ffn}, {"router", pc.router},
                 {"routed_experts", pc.experts}, {"shared_experts", pc.shared_experts},
                 {"one_expert", pc.one_expert}, {"linear", pc.linear},       {"mtp", pc.mtp}};
  j["layers"] = m.layers.size();
  j["moe_layers"] = m.n_moe_layers();
  json wb = json::object();
  for (auto& [name, b] : r.weight_bytes) wb[name] = b;
  j["weight_bytes"] = wb;
  j["kv_cache_bytes_per_token"] = r.kv_bytes_per_token;
  j["kv_cache_bytes"] = kv_cache_bytes(m, job.batch, job.context, job.act_bytes);
  j["job"] = {{"kind", job_name(job.job)},     {"batch", job.batch},        {"seq", job.seq},
              {"context", job.context},        {"dtype", weight_format_info(job.weights).name},
              {"checkpointing", job.checkpointing}, {"lora_r", job.lora_r}, {"tokens", r.req.tokens},
              {"mfu", r.req.mfu},              {"mbu", r.req.mbu}};
  json opts = json::array();
  for (auto& g : r.options) {
    json o;
    o["gpu"] = g.gpu->name;
    o["fits"] = g.fits;
    if (!g.fits) o["why_not"] = g.why_not;
    o["gpus"] = g.par.gpus();
    o["layout"] = {{"dp", g.par.dp}, {"tp", g.par.tp}, {"ep", g.par.ep}, {"zero", g.par.zero}};
    o["memory_per_gpu"] = {{"weights", g.mem.weights},         {"quantized-weights", g.mem.quant_weights},
                           {"lora", g.mem.lora},               {"grads", g.mem.grads},
                           {"optimizer", g.mem.optimizer},     {"activations", g.mem.activations},
                           {"kv-cache", g.mem.kv_cache},       {"workspace", g.mem.workspace},
                           {"total", g.mem.total()}};
    o["usable_bytes_per_gpu"] = g.usable_bytes;
    o["all_to_all_bytes_per_gpu"] = g.a2a_bytes;
    o["flops_per_token"] = g.flops_per_token;
    if (job.job == JobKind::Infer) {
      o["decode_tokens_per_s"] = g.decode_tok_s;
      o["prefill_tokens_per_s"] = g.prefill_tok_s;
      o["decode_bytes_per_step"] = g.decode_bytes_per_step;
      if (g.cost) o["cost_per_million_output_tokens"] = *g.cost;
    } else if (r.req.tokens) {
      o["train_seconds"] = g.train_seconds;
      o["gpu_hours"] = g.gpu_hours;
      if (g.cost) o["cost"] = *g.cost;
    }
    if (g.price_per_gpu_hour) o["price_per_gpu_hour"] = *g.price_per_gpu_hour;
    opts.push_back(o);
  }
  j["options"] = opts;
  if (r.req.prices) j["prices"] = {{"file", r.req.prices->path}, {"currency", r.req.prices->currency}};
  return j.dump(2);
}

}  // namespace moe
