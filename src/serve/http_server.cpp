// http_server.cpp — routes, auth, streaming and the engine thread of `moe serve`.
#include "serve/http_server.h"

#include <httplib.h>
#include <malloc.h>

#include <chrono>
#include <condition_variable>
#include <ctime>
#include <mutex>
#include <random>
#include <thread>

#include "core/error.h"
#include "core/memory.h"

namespace moe {
namespace {

using ojson = nlohmann::ordered_json;

constexpr double kIdleTrimSeconds = 0.2;

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// What the engine thread hands one request thread: tokens as they come, then the end.
struct Channel {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<GenToken> toks;  // not yet taken by the request thread
  bool done = false;
  std::string finish, tail;
};

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(e.body(), "application/json");
}

TokenText token_text(const Tokenizer& tok, int32_t id) {
  TokenText t;
  t.text = tok.decode({id}, false);
  for (unsigned char c : t.text) t.bytes.push_back(c);
  return t;
}

void texts_for(const Tokenizer& tok, const std::vector<GenToken>& toks, std::vector<TokenText>& tt,
               std::vector<TokenText>& top) {
  for (const GenToken& g : toks) {
    tt.push_back(token_text(tok, g.id));
    for (auto& [id, lp] : g.logprobs.top) {
      (void)lp;
      top.push_back(token_text(tok, id));
    }
  }
}

std::string sse(const ojson& j) {
  return "data: " + j.dump(-1, ' ', false, ojson::error_handler_t::replace) + "\n\n";
}

}  // namespace

HttpServer::HttpServer(Engine& engine, const Tokenizer& tok, const ChatTemplate* tmpl, const ServeOptions& opt)
    : engine_(engine), tok_(tok), tmpl_(tmpl), opt_(opt), svr_(std::make_unique<httplib::Server>()) {
  created_ = static_cast<int64_t>(std::time(nullptr));
  const int threads = opt.threads > 0 ? opt.threads : static_cast<int>(engine.options().max_batch) + 16;
  svr_->new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
  svr_->set_payload_max_length(opt.limits.max_body_bytes);
  svr_->set_read_timeout(30, 0);
  svr_->set_write_timeout(30, 0);
  routes();
}

HttpServer::~HttpServer() { stop(); }

int HttpServer::bind() {
  int port = opt_.port;
  if (port == 0) {
    port = svr_->bind_to_any_port(opt_.host);
    MOE_CHECK(port > 0, "serve: cannot bind %s (any port)", opt_.host.c_str());
  } else {
    MOE_CHECK(svr_->bind_to_port(opt_.host, port), "serve: cannot bind %s:%d (in use, or not an address of this host)",
              opt_.host.c_str(), port);
  }
  opt_.port = port;
  return port;
}

void HttpServer::run() {
  std::thread engine_thread([this] {
    // A burst of requests leaves freed memory behind: blocks kept for reuse at the batch sizes
    // it ran (memory.cpp) and malloc's per-thread arenas (80 request threads by default). A
    // server idle for a moment hands both back to the system, so its resident set after a burst
    // is what it holds, not what it once held.
    bool trimmed = true;
    while (!stop_) {
      if (!engine_.wait_for_work(stop_, trimmed ? -1.0 : kIdleTrimSeconds)) {
        mem_trim();
        malloc_trim(0);
        trimmed = true;
        continue;
      }
      if (stop_) break;
      trimmed = false;
      StepStats st;
      try {
        engine_.step(&st);
      } catch (const std::exception& e) {
        // A failed step (e.g. out of memory) must not take the server down silently.
        std::fprintf(stderr, "serve: engine step failed: %s\n", e.what());
        std::this_thread::sleep_for(std::chrono::milliseconds(50));
      }
      metrics_.step(st.decode_rows, st.expert_tokens);
    }
  });
  svr_->listen_after_bind();
  stop_ = true;
  engine_.wake();
  engine_thread.join();
}

void HttpServer::stop() {
  stop_ = true;
  engine_.wake();
  if (svr_) svr_->stop();
}

void HttpServer::routes() {
  auto authorized = [this](const httplib::Request& req, httplib::Response& res) {
    if (opt_.api_key.empty()) return true;
    if (req.get_header_value("Authorization") == "Bearer " + opt_.api_key) return true;
    send_error(res, ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')", "",
                             "invalid_api_key", "authentication_error"));
    return false;
  };

  svr_->Get("/health", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(R"({"status":"ok"})", "application/json");
  });

  svr_->Get("/v1/models", [this, authorized](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    ojson m = {{"id", opt_.model_name}, {"object", "model"}, {"created", created_}, {"owned_by", "moe-engine"}};
    res.set_content(ojson{{"object", "list"}, {"data", ojson::array({m})}}.dump(), "application/json");
  });

  svr_->Get("/metrics", [this, authorized](const httplib::Request& req, httplib::Response& res) {
    if (!authorized(req, res)) return;
    ServerMetrics::Gauges g;
    g.running = engine_.active();
    g.waiting = engine_.waiting();
    if (const KvPool* p = engine_.kv_pool()) {
      g.kv_blocks_total = p->n_blocks();
      g.kv_block_size = p->block_size();
      g.kv_blocks_in_use = p->blocks_in_use();
      g.kv_blocks_cached = p->blocks_cached();
      g.prefix_hit_blocks = p->prefix_hits();
    }
    res.set_content(metrics_.render(g), "text/plain; version=0.0.4");
  });

  auto completion = [this, authorized](const httplib::Request& req, httplib::Response& res, bool chat) {
    const std::string endpoint = chat ? "/v1/chat/completions" : "/v1/completions";
    const double t0 = now_s();
    if (!authorized(req, res)) {
      metrics_.request_done(endpoint, res.status);
      return;
    }
    ApiRequest r;
    GenRequest gen;
    try {
      r = parse_request(req.body, chat, opt_.limits);
      if (!r.model.empty() && r.model != opt_.model_name)
        throw ApiError(404, "the model '" + r.model + "' does not exist (this server serves '" + opt_.model_name + "')",
                       "model", "model_not_found");
      gen = r.gen;
      try {
        if (chat) {
          if (!tmpl_) throw ApiError(400, "this model has no chat template: use /v1/completions", "messages");
          gen.prompt = tok_.encode(tmpl_->apply(r.messages, true), false);
        } else if (!r.prompt_ids.empty()) {
          gen.prompt = r.prompt_ids;
        } else {
          gen.prompt = tok_.encode(r.prompt_text);
        }
      } catch (const Error& e) {
        throw ApiError(400, std::string("could not render or tokenize the prompt: ") + e.what(),
                       chat ? "messages" : "prompt");
      }
      const int64_t n = static_cast<int64_t>(gen.prompt.size());
      if (n == 0) throw ApiError(400, "the prompt encodes to no tokens", chat ? "messages" : "prompt");
      if (n + gen.max_tokens > engine_.max_context())
        throw ApiError(400,
                       "this model's context length is " + std::to_string(engine_.max_context()) + " tokens; the prompt has " +
                           std::to_string(n) + " and max_tokens asks for " + std::to_string(gen.max_tokens),
                       "max_tokens", "context_length_exceeded");
      if (engine_.waiting() >= opt_.max_queue) {
        res.set_header("Retry-After", "1");
        throw ApiError(503, "the server is at capacity (" + std::to_string(engine_.waiting()) + " requests waiting); retry",
                       "", "overloaded", "server_error");
      }
      if (!r.has_seed) gen.seed = std::random_device{}() ^ (uint64_t(std::random_device{}()) << 32);
    } catch (const ApiError& e) {
      send_error(res, e);
      metrics_.request_done(endpoint, e.status);
      return;
    }

    auto ch = std::make_shared<Channel>();
    auto t_last = std::make_shared<double>(0.0);
    GenCallbacks cb;
    cb.on_token = [this, ch, t0, t_last](const GenToken& g) {
      metrics_.token_generated();
      const double t = now_s();
      if (*t_last == 0.0)
        metrics_.ttft(t - t0);
      else
        metrics_.per_token(t - *t_last);
      *t_last = t;
      std::lock_guard<std::mutex> lk(ch->mu);
      ch->toks.push_back(g);
      ch->cv.notify_all();
    };
    cb.on_finish = [ch](FinishReason fr, const std::string& tail) {
      std::lock_guard<std::mutex> lk(ch->mu);
      ch->done = true;
      ch->finish = finish_reason_name(fr);
      ch->tail = tail;
      ch->cv.notify_all();
    };
    std::shared_ptr<SeqHandle> h;
    try {
      h = engine_.submit(gen, cb);
    } catch (const Error& e) {
      send_error(res, ApiError(400, e.what()));
      metrics_.request_done(endpoint, 400);
      return;
    }
    const std::string id = (chat ? "chatcmpl-" : "cmpl-") + std::to_string(next_id_++);
    auto finished = [this, endpoint, t0, h]() {
      metrics_.prompt_tokens(h->prompt_tokens(), h->cached_prompt_tokens());
      metrics_.request_latency(now_s() - t0);
      metrics_.request_done(endpoint, 200);
    };

    if (!r.stream) {
      ApiResult out;
      {
        std::unique_lock<std::mutex> lk(ch->mu);
        ch->cv.wait(lk, [&] { return ch->done; });
        out.tokens = std::move(ch->toks);
        out.finish_reason = ch->finish;
        for (const GenToken& g : out.tokens) out.text += g.text;
        out.text += ch->tail;
      }
      out.prompt_tokens = h->prompt_tokens();
      out.completion_tokens = h->generated_tokens();
      out.cached_tokens = h->cached_prompt_tokens();
      if (r.logprobs) texts_for(tok_, out.tokens, out.token_text, out.top_text_flat);
      res.set_content(response_json(r, out, id, created_, opt_.model_name).dump(-1, ' ', false,
                                                                                 ojson::error_handler_t::replace),
                      "application/json");
      finished();
      return;
    }

    res.set_header("Cache-Control", "no-cache");
    auto first = std::make_shared<bool>(true);
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, r, ch, h, id, first, finished](size_t, httplib::DataSink& sink) {
          std::vector<GenToken> toks;
          bool done;
          std::string finish, tail;
          {
            std::unique_lock<std::mutex> lk(ch->mu);
            // Wake now and then to notice a client that went away while nothing was generated.
            while (!ch->cv.wait_for(lk, std::chrono::milliseconds(200), [&] { return ch->done || !ch->toks.empty(); }))
              if (!sink.is_writable()) {
                h->cancel();
                return false;
              }
            toks.swap(ch->toks);
            done = ch->done;
            finish = ch->finish;
            tail = ch->tail;
          }
          std::string out;
          for (const GenToken& g : toks) {
            std::vector<TokenText> tt, top;
            if (r.logprobs) texts_for(tok_, {g}, tt, top);
            out += sse(chunk_json(r, id, created_, opt_.model_name, g.text, *first, r.logprobs ? std::vector<GenToken>{g}
                                                                                              : std::vector<GenToken>{},
                                  tt, top, nullptr));
            *first = false;
          }
          if (done) {
            if (!tail.empty() || *first) out += sse(chunk_json(r, id, created_, opt_.model_name, tail, *first, {}, {}, {}, nullptr));
            *first = false;
            out += sse(chunk_json(r, id, created_, opt_.model_name, "", false, {}, {}, {}, finish.c_str()));
            if (r.include_usage) {
              ojson u = {{"id", id},
                         {"object", r.chat ? "chat.completion.chunk" : "text_completion"},
                         {"created", created_},
                         {"model", opt_.model_name},
                         {"choices", ojson::array()},
                         {"usage", usage_json(h->prompt_tokens(), h->generated_tokens(), h->cached_prompt_tokens())}};
              out += sse(u);
            }
            out += "data: [DONE]\n\n";
          }
          if (!out.empty() && !sink.write(out.data(), out.size())) {
            h->cancel();  // the client went away: free its sequence and KV blocks
            return false;
          }
          if (done) {
            finished();
            sink.done();
          }
          return true;
        },
        [h](bool) {
          if (!h->finished()) h->cancel();
        });
  };

  svr_->Post("/v1/chat/completions",
             [completion](const httplib::Request& req, httplib::Response& res) { completion(req, res, true); });
  svr_->Post("/v1/completions",
             [completion](const httplib::Request& req, httplib::Response& res) { completion(req, res, false); });

  svr_->set_error_handler([](const httplib::Request& req, httplib::Response& res) {
    if (!res.body.empty()) return;
    std::string msg = res.status == 404 ? "no route " + req.method + " " + req.path
                      : res.status == 413 ? "request body too large"
                                          : "request failed";
    res.set_content(ApiError(res.status, msg, "", "", res.status >= 500 ? "server_error" : "invalid_request_error").body(),
                    "application/json");
  });
  svr_->set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
    std::string msg = "internal error";
    try {
      if (ep) std::rethrow_exception(ep);
    } catch (const std::exception& e) {
      msg = e.what();
    } catch (...) {
    }
    res.status = 500;
    res.set_content(ApiError(500, msg, "", "", "server_error").body(), "application/json");
  });
}

}  // namespace moe
