// cmd_serve.cpp — `moe serve MODEL_DIR`: the OpenAI-compatible server (serve/http_server.h).
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <memory>
#include <thread>

#include "cli/cli_util.h"
#include "cli/commands.h"
#include "core/error.h"
#include "core/memory.h"
#include "serve/http_server.h"

namespace moe {
namespace {

volatile std::sig_atomic_t g_signalled = 0;
void on_signal(int) { g_signalled = 1; }

}  // namespace

void add_engine_flags(CLI::App* cmd, EngineOptions* e) {
  cmd->add_option("--max-batch", e->max_batch, "sequences decoded together (and KV cache slots)")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--block-size", e->block_size, "KV cache block size in positions (paged cache, CPU)")
      ->capture_default_str()
      ->check(CLI::Range(1, 4096));
  cmd->add_option("--kv-blocks", e->kv_blocks, "KV cache blocks (0: max-batch x max-context positions' worth)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(0), int64_t(1) << 30));
  cmd->add_option("--prefill-chunk", e->prefill_chunk, "prompt tokens prefilled per step (all sequences together)")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 20));
  cmd->add_option("--max-context", e->max_context, "positions per sequence (0: the model's max_position_embeddings)")
      ->capture_default_str()
      ->check(CLI::Range(int64_t(0), int64_t(1) << 28));
}

void add_serve_command(CLI::App& app) {
  struct Opts {
    std::string dir, weights = "none", tokenizer, adapter, panels = "on";
    DeviceFlags dev;
    ServeOptions serve;
    EngineOptions engine;
  };
  auto o = std::make_shared<Opts>();
  o->engine.route_stats = true;
  o->engine.max_context = 4096;
  CLI::App* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server (chat/completions, streaming, /metrics)");
  cmd->add_option("dir", o->dir, "model directory (HF: config.json, safetensors, tokenizer.json), or a .gguf with --tokenizer")
      ->required();
  cmd->add_option("--tokenizer", o->tokenizer, "directory with tokenizer.json (and chat template), or a .gguf; default: the model's (a .gguf's own)");
  cmd->add_option("--adapter", o->adapter, "a PEFT LoRA adapter directory, merged into the weights at load (CPU)");
  cmd->add_option("--host", o->serve.host, "address to bind (127.0.0.1: this machine only)")->capture_default_str();
  cmd->add_option("--port", o->serve.port, "port (0: any free port, printed)")->capture_default_str()->check(CLI::Range(0, 65535));
  cmd->add_option("--api-key", o->serve.api_key, "require 'Authorization: Bearer KEY' on /v1/* and /metrics");
  cmd->add_option("--model-name", o->serve.model_name, "model id reported by /v1/models (default: the directory name)");
  cmd->add_option("--max-queue", o->serve.max_queue, "waiting requests before 503 + Retry-After")
      ->capture_default_str()
      ->check(CLI::Range(0, 1 << 20));
  cmd->add_option("--max-tokens-limit", o->serve.limits.max_tokens, "largest max_tokens a request may ask for")
      ->capture_default_str()
      ->check(CLI::Range(1, 1 << 24));
  cmd->add_option("--max-body", o->serve.limits.max_body_bytes, "largest request body in bytes")
      ->capture_default_str()
      ->check(CLI::Range(1024, 1 << 30));
  cmd->add_option("--threads", o->serve.threads, "HTTP worker threads (0: max-batch + 16)")->capture_default_str();
  add_engine_flags(cmd, &o->engine);
  add_device_flags(cmd, &o->dev);
  add_weights_flag(cmd, &o->weights);
  add_panels_flag(cmd, &o->panels);
  cmd->callback([o]() {
    const std::string tok_dir = o->tokenizer.empty() ? o->dir : o->tokenizer;
    Tokenizer tok = Tokenizer::from_dir(tok_dir);
    std::unique_ptr<ChatTemplate> tmpl;
    try {
      tmpl = std::make_unique<ChatTemplate>(ChatTemplate::from_dir(tok_dir));
    } catch (const Error& e) {
      std::fprintf(stderr, "serve: no chat template (%s): /v1/chat/completions will answer 400\n", e.what());
    }
    if (o->serve.model_name.empty())
      o->serve.model_name = std::filesystem::path(o->dir).lexically_normal().filename().string();
    if (o->serve.model_name.empty()) o->serve.model_name = std::filesystem::path(o->dir).parent_path().filename().string();
    const double t0 = now_seconds();
    Model m = load_model_arg(o->dir, o->dev, o->weights);
    if (!o->adapter.empty()) apply_adapter(m, o->adapter);
    apply_panels_flag(m, o->panels, "serve");
    MOE_CHECK(tok.vocab_size() <= m.config().vocab_size,
              "serve: the tokenizer has %lld tokens but the model's vocabulary is %lld", (long long)tok.vocab_size(),
              (long long)m.config().vocab_size);
    Engine engine(m, &tok, o->engine);
    HttpServer server(engine, tok, tmpl.get(), o->serve);
    const int port = server.bind();
    std::printf("serving '%s' on http://%s:%d/v1 (loaded in %.1f s; max batch %lld, context %lld, KV %s)%s\n",
                o->serve.model_name.c_str(), o->serve.host.c_str(), port, now_seconds() - t0,
                (long long)o->engine.max_batch, (long long)engine.max_context(),
                engine.kv_pool() ? (std::to_string(engine.kv_pool()->n_blocks()) + " blocks of " +
                                    std::to_string(engine.kv_pool()->block_size()))
                                       .c_str()
                                 : "per-slot",
                o->serve.api_key.empty() ? "" : " [API key required]");
    std::printf("%s", mem_report().c_str());
    std::fflush(stdout);
    std::signal(SIGINT, on_signal);
    std::signal(SIGTERM, on_signal);
    std::signal(SIGPIPE, SIG_IGN);
    std::thread watcher([&server] {
      while (!g_signalled) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      server.stop();
    });
    server.run();
    g_signalled = 1;
    watcher.join();
    std::printf("serve: stopped\n");
  });
}

}  // namespace moe
