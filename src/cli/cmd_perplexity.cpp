// cmd_perplexity.cpp — `moe perplexity MODEL --file TEXT [--ctx N] [--kl-base BASE]`.
//
// The text is tokenized once (the model directory's tokenizer, a .gguf's own, or --tokenizer DIR)
// and cut into chunks of --ctx tokens. Each chunk is one forward from an empty cache; every
// position but the last predicts the next token, so a chunk scores ctx-1 tokens, all of them
// (llama.cpp's perplexity scores only each chunk's second half; the numbers are therefore
// comparable between our runs, not with its output).
//
// With --kl-base the same chunks also run through the base model (typically the unquantized
// model the quantized one came from), and per scored position we accumulate
//   KL(base || model) = sum_v p_base(v) (log p_base(v) - log p_model(v))
// and whether both models' most likely tokens agree (top-1 agreement), as users check a
// quantization's quality. All sums in f64.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <memory>
#include <vector>

#include <nlohmann/json.hpp>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "core/file_util.h"
#include "tokenizer/gguf_vocab.h"
#include "tokenizer/tokenizer.h"

namespace moe {
namespace {

// log-softmax of one row of logits, in f64.
void log_softmax(const float* logits, int64_t v, std::vector<double>* out) {
  out->resize(static_cast<size_t>(v));
  double mx = -INFINITY;
  for (int64_t i = 0; i < v; ++i) mx = std::max(mx, double(logits[i]));
  double sum = 0;
  for (int64_t i = 0; i < v; ++i) sum += std::exp(double(logits[i]) - mx);
  const double lse = mx + std::log(sum);
  for (int64_t i = 0; i < v; ++i) (*out)[static_cast<size_t>(i)] = double(logits[i]) - lse;
}

int64_t argmax(const std::vector<double>& v) {
  return static_cast<int64_t>(std::max_element(v.begin(), v.end()) - v.begin());
}

struct Totals {
  double nll = 0, base_nll = 0, kl = 0, kl_max = 0;
  int64_t scored = 0, agree = 0;
};

// Full logits of one chunk [ctx, V] on the host.
Tensor chunk_logits(const Model& m, const Tensor& ids) {
  KVCache kv = m.make_cache(1, ids.dim(1));
  ForwardResult r = m.forward(ids, kv, ForwardOptions{});
  return r.logits.device() == Device::CPU && r.logits.dtype() == DType::F32
             ? r.logits
             : r.logits.to_dtype(DType::F32).to(Device::CPU, MemCategory::Activations);
}

}  // namespace

void add_perplexity_command(CLI::App& app) {
  struct Opts {
    std::string model, file, base, tokenizer, weights = "none", base_weights = "none", panels = "on";
    int64_t ctx = 256, max_chunks = 0;
    bool json = false;
    DeviceFlags dev;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "perplexity", "perplexity of a model on a text file; with --kl-base, KL divergence and top-1 agreement against a base model");
  cmd->add_option("model", o->model, "model directory (HF) or .gguf file")->required();
  cmd->add_option("--file", o->file, "UTF-8 text file to score")->required();
  cmd->add_option("--ctx", o->ctx, "tokens per chunk (each chunk is scored from an empty cache)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(2), int64_t(1) << 20));
  cmd->add_option("--max-chunks", o->max_chunks, "score at most this many chunks (0 = all)")->capture_default_str();
  cmd->add_option("--kl-base", o->base, "base model (directory or .gguf) to compare against: KL(base||model), top-1 agreement");
  cmd->add_option("--tokenizer", o->tokenizer,
                  "directory with tokenizer.json / tokenizer.model, or a .gguf (default: the model's own, else the base's)");
  add_device_flags(cmd, &o->dev);
  add_weights_flag(cmd, &o->weights);
  cmd->add_option("--base-weights", o->base_weights, "--weights for the base model")
      ->capture_default_str()
      ->check(CLI::IsMember({"none", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q5_k", "q6_k"}));
  cmd->add_flag("--json", o->json, "also print one JSON line with the results");
  add_panels_flag(cmd, &o->panels);
  cmd->callback([o]() {
    // The tokenizer: --tokenizer, else the model's (a .gguf's own), else a base directory's.
    std::string tok_dir = o->tokenizer;
    if (tok_dir.empty())
      tok_dir = !is_gguf_path(o->model) || gguf_has_vocab(o->model) || o->base.empty() ? o->model : o->base;
    const Tokenizer tok = Tokenizer::from_dir(tok_dir);
    const std::string text = read_file(o->file);
    const std::vector<int32_t> ids = tok.encode(text, /*add_special_tokens=*/false);
    Model m = load_model_arg(o->model, o->dev, o->weights);
    apply_panels_flag(m, o->panels, "perplexity");
    const int64_t v = m.config().vocab_size;
    MOE_CHECK(o->ctx <= m.config().max_position_embeddings, "--ctx %lld is above the model's limit of %lld positions",
              (long long)o->ctx, (long long)m.config().max_position_embeddings);
    const int64_t n_chunks_all = static_cast<int64_t>(ids.size()) / o->ctx;
    MOE_CHECK(n_chunks_all > 0, "%s: %zu tokens, fewer than one chunk of --ctx %lld", o->file.c_str(), ids.size(),
              (long long)o->ctx);
    const int64_t n_chunks = o->max_chunks > 0 ? std::min(o->max_chunks, n_chunks_all) : n_chunks_all;
    for (int32_t id : ids)
      MOE_CHECK(id >= 0 && id < v, "%s: the tokenizer of %s gives token %d, outside the model's vocabulary of %lld",
                o->file.c_str(), tok_dir.c_str(), id, (long long)v);
    std::unique_ptr<Model> base;
    if (!o->base.empty()) {
      base = std::make_unique<Model>(load_model_arg(o->base, o->dev, o->base_weights));
      apply_panels_flag(*base, o->panels, "perplexity (base)");
      MOE_CHECK(base->config().vocab_size == v, "--kl-base %s: vocabulary %lld differs from the model's %lld",
                o->base.c_str(), (long long)base->config().vocab_size, (long long)v);
    }

    Totals t;
    std::vector<double> lp, lb;
    const double t0 = now_seconds();
    Tensor chunk = Tensor::empty({1, o->ctx}, DType::I32, MemCategory::Activations);
    for (int64_t c = 0; c < n_chunks; ++c) {
      std::copy_n(ids.begin() + c * o->ctx, o->ctx, chunk.data<int32_t>());
      const Tensor logits = chunk_logits(m, chunk);
      const Tensor base_logits = base ? chunk_logits(*base, chunk) : Tensor();
      for (int64_t i = 0; i + 1 < o->ctx; ++i) {
        const int32_t next = chunk.data<int32_t>()[i + 1];
        log_softmax(logits.data<float>() + i * v, v, &lp);
        t.nll -= lp[static_cast<size_t>(next)];
        if (base) {
          log_softmax(base_logits.data<float>() + i * v, v, &lb);
          t.base_nll -= lb[static_cast<size_t>(next)];
          double kl = 0;
          for (int64_t j = 0; j < v; ++j) {
            const double pb = std::exp(lb[static_cast<size_t>(j)]);
            kl += pb * (lb[static_cast<size_t>(j)] - lp[static_cast<size_t>(j)]);
          }
          t.kl += kl;
          t.kl_max = std::max(t.kl_max, kl);
          t.agree += argmax(lp) == argmax(lb) ? 1 : 0;
        }
        ++t.scored;
      }
      const double el = now_seconds() - t0;
      std::fprintf(stderr, "\rchunk %lld/%lld  ppl %.4f%s  %.1f tokens/s  ETA %.0f s   ", (long long)(c + 1),
                   (long long)n_chunks, std::exp(t.nll / double(t.scored)),
                   base ? strformat("  KL %.3e  top-1 %.2f%%", t.kl / double(t.scored),
                                    100.0 * double(t.agree) / double(t.scored)).c_str()
                        : "",
                   double((c + 1) * o->ctx) / el, el / double(c + 1) * double(n_chunks - c - 1));
    }
    std::fprintf(stderr, "\n");
    const double ppl = std::exp(t.nll / double(t.scored));
    std::printf("perplexity %.6f over %lld tokens (%lld chunks of %lld; %s%s)\n", ppl, (long long)t.scored,
                (long long)n_chunks, (long long)o->ctx, o->model.c_str(),
                o->weights != "none" ? (", weights " + o->weights).c_str() : "");
    if (base) {
      const double base_ppl = std::exp(t.base_nll / double(t.scored));
      std::printf("base perplexity %.6f (%s)\n", base_ppl, o->base.c_str());
      std::printf("KL(base || model) mean %.6e, max %.6e per token; top-1 agreement %.4f%% (%lld of %lld)\n",
                  t.kl / double(t.scored), t.kl_max, 100.0 * double(t.agree) / double(t.scored), (long long)t.agree,
                  (long long)t.scored);
    }
    if (o->json) {
      nlohmann::json j = {{"perplexity", ppl}, {"tokens", t.scored}, {"chunks", n_chunks}, {"ctx", o->ctx}};
      if (base) {
        j["base_perplexity"] = std::exp(t.base_nll / double(t.scored));
        j["kl_mean"] = t.kl / double(t.scored);
        j["kl_max"] = t.kl_max;
        j["top1_agreement"] = double(t.agree) / double(t.scored);
      }
      std::printf("%s\n", j.dump().c_str());
    }
  });
}

}  // namespace moe
