// http_server.h — `moe serve`: the OpenAI-compatible HTTP front of the engine (cpp-httplib).
//
// Routes: POST /v1/chat/completions, POST /v1/completions (whole or streamed as server-sent
// events), GET /v1/models, GET /health, GET /metrics (Prometheus text). Request threads parse
// and tokenize, submit to the engine and wait on their own channel; one engine thread steps
// the continuous batch. A client that disconnects mid-stream cancels its sequence (its KV
// blocks return to the pool at the next step).
#pragma once
#include <atomic>
#include <memory>
#include <string>

#include "serve/api.h"
#include "serve/engine.h"
#include "serve/metrics.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"

namespace httplib {
class Server;
}

namespace moe {

struct ServeOptions {
  std::string host = "127.0.0.1";
  int port = 8080;          // 0: any free port (bind() returns it)
  std::string api_key;      // non-empty: "Authorization: Bearer <key>" required on /v1/* and /metrics
  std::string model_name;   // the id /v1/models reports and requests may name
  ApiLimits limits;
  int64_t max_queue = 256;  // waiting requests beyond this get 503 with Retry-After
  int threads = 0;          // HTTP worker threads (0: max_batch + 16)
};

class HttpServer {
 public:
  // The tokenizer is required; the chat template is optional (chat requests get a 400 without).
  HttpServer(Engine& engine, const Tokenizer& tok, const ChatTemplate* tmpl, const ServeOptions& opt);
  ~HttpServer();
  int bind();   // binds host:port; returns the port. Throws moe::Error when it cannot.
  void run();   // serves until stop(); runs the engine thread meanwhile
  void stop();  // from any thread (or a signal-safe flag watcher)
  const ServerMetrics& metrics() const { return metrics_; }

 private:
  void routes();
  Engine& engine_;
  const Tokenizer& tok_;
  const ChatTemplate* tmpl_;
  ServeOptions opt_;
  ServerMetrics metrics_;
  std::unique_ptr<httplib::Server> svr_;
  std::atomic<bool> stop_{false};
  int64_t created_ = 0;
  std::atomic<uint64_t> next_id_{1};
};

}  // namespace moe
