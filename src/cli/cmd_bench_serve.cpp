// cmd_bench_serve.cpp — `moe bench serve`: aggregate decode throughput of the serving engine
// (serve/engine.h, no HTTP) at several numbers of concurrent streams, on a random model of a
// preset shape, against the single-stream figure of the same run (never asserted on time).
//
// For each concurrency C: C requests (random prompts of --prompt tokens, --tokens new tokens
// each, greedy, EOS ignored) are submitted together and stepped to the end. Reported:
//  - aggregate decode tokens/s: tokens decoded in steps where every stream was decoding (no
//    prefill in the step) over those steps' time — the steady state a busy server runs in;
//  - weight bytes read per decode step: the non-expert weights (attention, norms, routers,
//    shared experts, dense MLPs, LM head) once, plus every expert that received a token in
//    that step (counted from the router's choices) — tokens of all streams share one read;
//  - the speed-up over one stream (targets from the issue: >= 4x at 16 streams, >= 10x at 64).
// The sweep over the counts runs --rounds times and each count keeps its best round: on a shared
// VM the memory bandwidth moved 1.6x between minutes, and one sweep's single-stream figure taken
// in a fast minute against a slow one for 16 streams read 2.98x where the next sweep read 4.3x.
#include <omp.h>

#include <algorithm>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "core/memory.h"
#include "core/rng.h"
#include "model/random_init.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "serve/engine.h"

namespace moe {
namespace {

struct ServeBenchOpts {
  std::string arch = "mixtral", preset = "medium", dtype = "bf16";
  std::vector<int64_t> streams = {1, 4, 16, 64};
  int64_t layers = 0, prompt = 16, tokens = 32, rounds = 3;
  uint64_t seed = 1;
  bool json = false;
  std::string panels = "on";
};

struct Point {
  int64_t streams = 0, decode_tokens = 0, decode_steps = 0;
  double decode_seconds = 0, total_seconds = 0, bytes_per_step = 0, experts_per_step = 0;
};

void run_serve_bench(const ServeBenchOpts& o) {
  ModelConfig cfg = preset_config(o.arch, o.preset);
  if (o.layers > 0) cfg.n_layer = o.layers;
  DType wdt;
  MOE_CHECK(dtype_from_name(o.dtype, &wdt) && (wdt == DType::F32 || wdt == DType::BF16),
            "--dtype: expected f32 or bf16, got '%s'", o.dtype.c_str());
  const std::vector<int64_t>& counts = o.streams;
  MOE_CHECK(!counts.empty(), "--streams: give at least one count");
  const int64_t max_streams = *std::max_element(counts.begin(), counts.end());
  std::fprintf(stderr, "bench serve: %s/%s %lld layers, %s weights; building random model...\n", o.arch.c_str(),
               o.preset.c_str(), (long long)cfg.n_layer, o.dtype.c_str());
  LoadOptions lo;
  lo.keep_dtype = true;
  cpu::use_bf16_matrix_where_available();  // prefill chunks, as moe serve runs them
  Model m = Model::from_tensors(cfg, random_weights(cfg, o.seed, wdt), lo);
  // As moe serve: bf16 weights in 16-row panels where the CPU has AVX512-BF16 (model/panel_weights.h).
  const std::string layout = apply_panels_flag(m, o.panels, "bench serve") ? " in 16-row panels" : "";

  // Weight bytes: read every step (non-expert) and per expert touched.
  double fixed_bytes = 0, expert_bytes = 0;
  const ModelWeights& w = m.weights();
  fixed_bytes += double(w.final_norm.nbytes() + w.lm_head.nbytes());
  for (const LayerWeights& lw : w.layers) {
    // wq/wk/wv: views of wqkv, or the parts a GGUF mix keeps apart (model.h).
    for (const Tensor* t : {&lw.attn_norm, &lw.ffn_norm, &lw.wq, &lw.wk, &lw.wv, &lw.wo, &lw.bqkv, &lw.bo, &lw.q_norm, &lw.k_norm,
                            &lw.router, &lw.shared_w1, &lw.shared_w3, &lw.shared_w2, &lw.shared_gate})
      if (t->defined()) fixed_bytes += double(t->nbytes());
    if (lw.is_moe)
      expert_bytes = double(lw.w1.nbytes() + lw.w3.nbytes() + lw.w2.nbytes()) / double(cfg.n_expert);
    else
      fixed_bytes += double(lw.w1.nbytes() + lw.w3.nbytes() + lw.w2.nbytes());
  }

  EngineOptions eo;
  eo.max_batch = max_streams;
  eo.max_context = o.prompt + o.tokens;
  eo.prefill_chunk = 4096;
  eo.route_stats = true;
  Engine engine(m, nullptr, eo);
  Rng rng(o.seed + 7);
  auto rate_of = [](const Point& p) { return p.decode_seconds > 0 ? double(p.decode_tokens) / p.decode_seconds : 0; };
  std::vector<Point> pts(counts.size());
  for (int64_t round = 0; round < o.rounds; ++round)
  for (size_t ci = 0; ci < counts.size(); ++ci) {
    const int64_t c = counts[ci];
    // A short warm-up at this batch size (kept blocks and scratch reach their sizes).
    for (int pass = 0; pass < 2; ++pass) {
      Point p;
      p.streams = c;
      for (int64_t i = 0; i < c; ++i) {
        GenRequest r;
        for (int64_t j = 0; j < o.prompt; ++j) r.prompt.push_back(int32_t(rng.next() % uint64_t(cfg.vocab_size)));
        r.max_tokens = pass == 0 ? 3 : o.tokens;
        r.ignore_eos = true;
        engine.submit(r, {});
      }
      const double t0 = now_seconds();
      double bytes = 0, experts = 0;
      for (;;) {
        StepStats st;
        if (!engine.step(&st) && engine.active() == 0 && engine.waiting() == 0) break;
        if (st.prefill_tokens == 0 && st.decode_rows == c) {
          p.decode_tokens += st.decode_rows;
          p.decode_seconds += st.seconds;
          ++p.decode_steps;
          bytes += fixed_bytes + double(st.experts_touched) * expert_bytes;
          experts += double(st.experts_touched);
        }
      }
      p.total_seconds = now_seconds() - t0;
      if (pass == 0) continue;
      p.bytes_per_step = p.decode_steps ? bytes / double(p.decode_steps) : 0;
      p.experts_per_step = p.decode_steps ? experts / double(p.decode_steps) : 0;
      const double rate = rate_of(p);
      if (rate >= rate_of(pts[ci])) pts[ci] = p;
      std::fprintf(stderr, "  round %lld, %lld streams: %.1f tokens/s aggregate\n", (long long)round + 1, (long long)c, rate);
    }
  }
  MOE_CHECK(engine.kv_blocks_in_use() == 0, "bench serve: %lld KV blocks still in use", (long long)engine.kv_blocks_in_use());

  const double base = pts[0].decode_seconds > 0 ? double(pts[0].decode_tokens) / pts[0].decode_seconds : 0;
  std::printf("serve: %s/%s %lld layers, %s weights%s (%.2f GB), %lld experts top-%lld, prompt %lld + %lld new tokens "
              "per stream, %d threads, best of %lld rounds\n",
              o.arch.c_str(), o.preset.c_str(), (long long)cfg.n_layer, o.dtype.c_str(), layout.c_str(),
              (fixed_bytes + expert_bytes * double(cfg.n_expert) * double(cfg.n_layer)) / 1e9, (long long)cfg.n_expert,
              (long long)cfg.n_expert_used, (long long)o.prompt, (long long)o.tokens, omp_get_max_threads(),
              (long long)o.rounds);
  std::printf("%8s %14s %10s %16s %16s %14s\n", "streams", "tokens/s", "vs 1", "experts/step", "MB read/step",
              "MB read/token");
  for (const Point& p : pts) {
    const double rate = p.decode_seconds > 0 ? double(p.decode_tokens) / p.decode_seconds : 0;
    std::printf("%8lld %14.1f %9.2fx %16.1f %16.1f %14.2f\n", (long long)p.streams, rate, base > 0 ? rate / base : 0,
                p.experts_per_step, p.bytes_per_step / 1e6, p.bytes_per_step / 1e6 / double(p.streams));
  }
  for (const Point& p : pts) {
    const double rate = p.decode_seconds > 0 ? double(p.decode_tokens) / p.decode_seconds : 0;
    if (p.streams == 16) std::printf("target: 16 streams >= 4x one stream: %.2fx\n", base > 0 ? rate / base : 0);
    if (p.streams == 64) std::printf("target: 64 streams >= 10x one stream: %.2fx\n", base > 0 ? rate / base : 0);
  }
  std::printf("%s", mem_report().c_str());
  if (o.json) {
    std::printf("{\"bench\":\"serve\",\"arch\":\"%s\",\"preset\":\"%s\",\"dtype\":\"%s\",\"points\":[", o.arch.c_str(),
                o.preset.c_str(), o.dtype.c_str());
    for (size_t i = 0; i < pts.size(); ++i) {
      const Point& p = pts[i];
      std::printf("%s{\"streams\":%lld,\"tokens_per_s\":%.3f,\"speedup\":%.4f,\"bytes_per_step\":%.6e,\"experts_per_step\":%.3f}",
                  i ? "," : "", (long long)p.streams, p.decode_seconds > 0 ? double(p.decode_tokens) / p.decode_seconds : 0,
                  base > 0 && p.decode_seconds > 0 ? double(p.decode_tokens) / p.decode_seconds / base : 0,
                  p.bytes_per_step, p.experts_per_step);
    }
    std::printf("]}\n");
  }
}

}  // namespace

void add_serve_bench(CLI::App* bench) {
  auto o = std::make_shared<ServeBenchOpts>();
  CLI::App* cmd = bench->add_subcommand("serve", "serving engine: aggregate decode tokens/s at several concurrent "
                                                 "stream counts, against one stream in the same run");
  cmd->add_option("--arch", o->arch, "model family of the preset")->capture_default_str();
  cmd->add_option("--preset", o->preset, "tiny, small, medium or 8x7b")->capture_default_str();
  cmd->add_option("--layers", o->layers, "override the preset's layer count")->check(CLI::Range(1, 1000));
  cmd->add_option("--dtype", o->dtype, "weight dtype: f32 or bf16")->capture_default_str()->check(CLI::IsMember({"f32", "bf16"}));
  cmd->add_option("--rounds", o->rounds, "sweeps over the stream counts; each count keeps its best")
      ->capture_default_str()
      ->check(CLI::Range(1, 100));
  cmd->add_option("--streams", o->streams, "comma-separated concurrent stream counts (the first is the baseline)")
      ->delimiter(',')
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--prompt", o->prompt, "prompt tokens per stream")->capture_default_str()->check(CLI::Range(1, 1 << 16));
  cmd->add_option("--tokens", o->tokens, "new tokens per stream")->capture_default_str()->check(CLI::Range(2, 1 << 16));
  cmd->add_option("--seed", o->seed, "weights seed")->capture_default_str();
  cmd->add_flag("--json", o->json, "also print one JSON line");
  add_panels_flag(cmd, &o->panels);
  cmd->callback([o]() { run_serve_bench(*o); });
}

}  // namespace moe
