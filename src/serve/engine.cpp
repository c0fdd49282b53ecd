// engine.cpp — continuous batching: admission, chunked prefill, batched decode, sampling, stop
// conditions, preemption, cancellation.
#include "serve/engine.h"

#include <algorithm>
#include <chrono>

#include "core/error.h"

namespace moe {
namespace {
double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
}  // namespace

const char* finish_reason_name(FinishReason r) {
  switch (r) {
    case FinishReason::Stop: return "stop";
    case FinishReason::Length: return "length";
    case FinishReason::Cancelled: return "cancelled";
  }
  return "?";
}

struct Engine::Seq {
  GenRequest req;
  GenCallbacks cb;
  std::shared_ptr<SeqHandle> h;
  Rng rng{1};
  // Prompt, then every sampled token. The KV cache holds the first `filled`; while decoding,
  // filled == tokens.size() - 1 (the last sampled token is the next step's input).
  std::vector<int32_t> tokens;
  int64_t n_prompt = 0, filled = 0, generated = 0, slot = -1;
  bool prefilling = true, done = false;
  std::unique_ptr<DecodeStream> stream;
  std::string held;  // detokenized text not yet delivered: it may be the start of a stop string
};

Engine::Engine(const Model& model, const Tokenizer* tok, const EngineOptions& opt)
    : model_(model), tok_(tok), opt_(opt) {
  const ModelConfig& c = model.config();
  MOE_CHECK(opt.max_batch > 0 && opt.prefill_chunk > 0, "engine: max_batch %lld, prefill_chunk %lld",
            (long long)opt.max_batch, (long long)opt.prefill_chunk);
  max_ctx_ = opt.max_context > 0 ? std::min(opt.max_context, c.max_position_embeddings) : c.max_position_embeddings;
  eos_ = tok && tok->eos_id() ? *tok->eos_id() : c.eos_token_id;
  if (model.device() == Device::CPU) {
    const int64_t bs = opt.block_size;
    MOE_CHECK(bs > 0, "engine: block size %lld", (long long)bs);
    const int64_t n_blocks = opt.kv_blocks > 0 ? opt.kv_blocks : opt.max_batch * ((max_ctx_ + bs - 1) / bs);
    cache_ = model.make_paged_cache(opt.max_batch, n_blocks, bs);
    pool_ = std::make_unique<KvPool>(n_blocks, bs);
  } else {
    cache_ = model.make_cache(opt.max_batch, max_ctx_);
  }
  for (int64_t s = opt.max_batch - 1; s >= 0; --s) free_slots_.push_back(s);
}

Engine::~Engine() = default;

int64_t Engine::kv_blocks_in_use() const { return pool_ ? pool_->blocks_in_use() : 0; }

std::shared_ptr<SeqHandle> Engine::submit(GenRequest req, GenCallbacks cb) {
  const ModelConfig& c = model_.config();
  MOE_CHECK(!req.prompt.empty(), "the prompt is empty");
  for (int32_t id : req.prompt)
    MOE_CHECK(id >= 0 && id < c.vocab_size, "prompt token %d outside the vocabulary [0,%lld)", id,
              (long long)c.vocab_size);
  MOE_CHECK(req.max_tokens > 0, "max_tokens must be positive, got %lld", (long long)req.max_tokens);
  const int64_t n = static_cast<int64_t>(req.prompt.size());
  MOE_CHECK(n + req.max_tokens <= max_ctx_,
            "the prompt (%lld tokens) plus max_tokens (%lld) exceeds the context length %lld", (long long)n,
            (long long)req.max_tokens, (long long)max_ctx_);
  MOE_CHECK(req.stop.empty() || tok_, "stop strings need a tokenizer");
  if (pool_)
    MOE_CHECK((n + req.max_tokens + pool_->block_size() - 1) / pool_->block_size() <= pool_->n_blocks(),
              "the request needs more KV blocks than the cache holds (%lld of %lld positions)", (long long)pool_->n_blocks(),
              (long long)pool_->block_size());
  auto s = std::make_unique<Seq>();
  s->h = std::make_shared<SeqHandle>();
  s->h->prompt_tokens_ = n;
  s->rng = Rng(req.seed);
  s->tokens = req.prompt;
  s->n_prompt = n;
  s->req = std::move(req);
  s->cb = std::move(cb);
  if (tok_) s->stream = std::make_unique<DecodeStream>(*tok_, true);
  std::shared_ptr<SeqHandle> h = s->h;
  {
    std::lock_guard<std::mutex> lk(mu_);
    incoming_.push_back(std::move(s));
    ++n_waiting_;
  }
  cv_.notify_all();
  return h;
}

bool Engine::wait_for_work(const std::atomic<bool>& stop, double timeout_s) {
  std::unique_lock<std::mutex> lk(mu_);
  auto ready = [&] { return stop || !incoming_.empty() || !queue_.empty() || !running_.empty(); };
  if (timeout_s < 0) {
    cv_.wait(lk, ready);
    return true;
  }
  return cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), ready);
}

void Engine::wake() {
  std::lock_guard<std::mutex> lk(mu_);
  cv_.notify_all();
}

void Engine::release(Seq& s) {
  if (s.slot < 0) return;
  if (pool_) pool_->release(cache_.tables[static_cast<size_t>(s.slot)]);
  cache_.pos[static_cast<size_t>(s.slot)] = 0;
  free_slots_.push_back(s.slot);
  s.slot = -1;
}

void Engine::finish(Seq& s, FinishReason r) {
  if (s.done) return;
  s.done = true;
  std::string tail;
  if (r != FinishReason::Cancelled && s.stream) tail = s.held + s.stream->flush();
  s.held.clear();
  release(s);
  if (s.cb.on_finish) s.cb.on_finish(r, tail);
  s.h->finished_ = true;
}

// Sampled `token` from `logits` [V]: record it, deliver its text, check the stop conditions.
void Engine::emit(Seq& s, int32_t token, const float* logits) {
  const int64_t vocab = model_.config().vocab_size;
  s.tokens.push_back(token);
  ++s.generated;
  s.h->generated_ = s.generated;
  GenToken g;
  g.id = token;
  if (s.req.top_logprobs >= 0) token_logprobs(logits, vocab, token, s.req.top_logprobs, &g.logprobs);
  const bool eos = !s.req.ignore_eos && eos_ >= 0 && token == eos_;
  bool stopped = false;
  if (s.stream && !eos) {
    s.held += s.stream->step(token);
    // The earliest stop string in the held text ends the output there.
    size_t cut = std::string::npos;
    for (const std::string& st : s.req.stop)
      if (!st.empty()) cut = std::min(cut, s.held.find(st));
    if (cut != std::string::npos) {
      g.text = s.held.substr(0, cut);
      s.held.clear();
      stopped = true;
    } else {
      // Hold back the longest tail that could begin a stop string.
      size_t keep = 0;
      for (const std::string& st : s.req.stop)
        for (size_t n = std::min(st.size() - 1, s.held.size()); n > keep; --n)
          if (s.held.compare(s.held.size() - n, n, st, 0, n) == 0) {
            keep = n;
            break;
          }
      g.text = s.held.substr(0, s.held.size() - keep);
      s.held.erase(0, s.held.size() - keep);
    }
  }
  if (s.cb.on_token) s.cb.on_token(g);
  if (stopped) {
    s.stream.reset();  // nothing after the stop string is delivered
    finish(s, FinishReason::Stop);
  } else if (eos) {
    finish(s, FinishReason::Stop);
  } else if (s.generated >= s.req.max_tokens || static_cast<int64_t>(s.tokens.size()) >= max_ctx_) {
    finish(s, FinishReason::Length);
  }
}

void Engine::admit() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    while (!incoming_.empty()) {
      queue_.push_back(std::move(incoming_.front()));
      incoming_.pop_front();
    }
  }
  // Cancelled before admission: finish without ever holding blocks.
  for (auto& s : queue_)
    if (s->h->cancelled_) finish(*s, FinishReason::Cancelled);
  queue_.erase(std::remove_if(queue_.begin(), queue_.end(), [](const auto& s) { return s->done; }), queue_.end());
  // First come, first served: a request that does not fit waits, and so do those behind it.
  while (!queue_.empty() && !free_slots_.empty()) {
    Seq& s = *queue_.front();
    const int64_t slot = free_slots_.back();
    if (pool_) {
      auto& table = cache_.tables[static_cast<size_t>(slot)];
      const int64_t reused = pool_->match_prefix(s.tokens, table);
      // The whole prompt (+ the first generated position) must fit now.
      if (!pool_->grow(table, static_cast<int64_t>(s.tokens.size()) + 1)) {
        pool_->release(table);
        break;
      }
      s.filled = reused;
      if (s.generated == 0) s.h->cached_prompt_ = reused;
    } else {
      s.filled = 0;
    }
    free_slots_.pop_back();
    s.slot = slot;
    cache_.pos[static_cast<size_t>(slot)] = s.filled;
    s.prefilling = true;
    running_.push_back(std::move(queue_.front()));
    queue_.pop_front();
  }
  n_waiting_ = static_cast<int64_t>(queue_.size());
  n_active_ = static_cast<int64_t>(running_.size());
}

void Engine::count_routes(const ForwardResult& r, StepStats* st) {
  const ModelConfig& c = model_.config();
  st->expert_tokens.resize(static_cast<size_t>(c.n_layer));
  thread_local std::vector<int32_t> order;
  for (size_t l = 0; l < r.router_logits.size() && l < st->expert_tokens.size(); ++l) {
    const Tensor& lg = r.router_logits[l];
    auto& cnt = st->expert_tokens[l];
    if (!lg.defined()) continue;
    const int64_t e_n = lg.dim(1), k = std::min<int64_t>(c.n_expert_used, e_n);
    if (cnt.empty()) cnt.assign(static_cast<size_t>(e_n), 0);
    Tensor host = lg.device() == Device::CPU ? lg : lg.to(Device::CPU, MemCategory::Activations);
    const float* p = host.data<float>();
    // Softmax is monotone: the top-k logits are the top-k probabilities (a layer's selection
    // bias, when it has one, is not applied here: the counts are for monitoring).
    order.resize(static_cast<size_t>(e_n));
    for (int64_t t = 0; t < lg.dim(0); ++t) {
      for (int64_t e = 0; e < e_n; ++e) order[static_cast<size_t>(e)] = static_cast<int32_t>(e);
      const float* row = p + t * e_n;
      std::partial_sort(order.begin(), order.begin() + k, order.end(),
                        [&](int32_t a, int32_t b) { return row[a] > row[b] || (row[a] == row[b] && a < b); });
      for (int64_t j = 0; j < k; ++j) ++cnt[static_cast<size_t>(order[static_cast<size_t>(j)])];
    }
  }
}

bool Engine::prefill_step(StepStats* st) {
  int64_t budget = opt_.prefill_chunk;
  bool ran = false;
  for (auto& sp : running_) {
    Seq& s = *sp;
    if (s.done || !s.prefilling || budget <= 0) continue;
    const int64_t n = std::min(budget, static_cast<int64_t>(s.tokens.size()) - s.filled);
    Tensor ids = Tensor::empty({1, n}, DType::I32, MemCategory::Activations);
    std::copy(s.tokens.begin() + s.filled, s.tokens.begin() + s.filled + n, ids.data<int32_t>());
    ForwardOptions fo;
    fo.last_logits_only = true;
    fo.want_router_logits = opt_.route_stats;
    fo.slots = {s.slot};
    ForwardResult r = model_.forward(ids, cache_, fo);
    if (st && opt_.route_stats) count_routes(r, st);
    s.filled += n;
    budget -= n;
    ran = true;
    if (st) st->prefill_tokens += n;
    if (s.filled < static_cast<int64_t>(s.tokens.size())) continue;
    s.prefilling = false;
    if (pool_ && s.generated == 0)
      pool_->publish_prefix(s.tokens, cache_.tables[static_cast<size_t>(s.slot)], s.n_prompt);
    Tensor lg = r.logits.device() == Device::CPU ? r.logits : r.logits.to(Device::CPU, MemCategory::Activations);
    emit(s, sample_token(lg.data<float>(), model_.config().vocab_size, s.req.sampling, s.rng), lg.data<float>());
  }
  return ran;
}

bool Engine::decode_step(StepStats* st) {
  // Every decoding row needs a block for its next position; when the pool is dry, the most
  // recently admitted sequence gives its blocks back and waits (recomputed on readmission).
  for (;;) {
    Seq* victim = nullptr;
    bool short_of_blocks = false;
    if (pool_)
      for (auto& sp : running_) {
        Seq& s = *sp;
        if (s.done || s.prefilling) continue;
        if (!pool_->grow(cache_.tables[static_cast<size_t>(s.slot)], s.filled + 1)) short_of_blocks = true;
      }
    if (!short_of_blocks) break;
    for (auto it = running_.rbegin(); it != running_.rend(); ++it)
      if (!(*it)->done) {
        victim = it->get();
        break;
      }
    if (!victim) break;
    release(*victim);
    victim->filled = 0;
    victim->prefilling = true;
    if (st) ++st->preempted;
    auto it = std::find_if(running_.begin(), running_.end(), [&](const auto& p) { return p.get() == victim; });
    queue_.push_front(std::move(*it));
    running_.erase(it);
  }
  thread_local std::vector<Seq*> rows;
  rows.clear();
  for (auto& sp : running_)
    if (!sp->done && !sp->prefilling) rows.push_back(sp.get());
  if (rows.empty()) return false;
  const int64_t b_n = static_cast<int64_t>(rows.size());
  Tensor ids = Tensor::empty({b_n, 1}, DType::I32, MemCategory::Activations);
  ForwardOptions fo;
  fo.last_logits_only = true;
  fo.want_router_logits = opt_.route_stats;
  fo.slots.resize(static_cast<size_t>(b_n));
  for (int64_t b = 0; b < b_n; ++b) {
    ids.data<int32_t>()[b] = rows[static_cast<size_t>(b)]->tokens.back();
    fo.slots[static_cast<size_t>(b)] = rows[static_cast<size_t>(b)]->slot;
  }
  ForwardResult r = model_.forward(ids, cache_, fo);
  if (st && opt_.route_stats) count_routes(r, st);
  if (st) st->decode_rows += b_n;
  Tensor lg = r.logits.device() == Device::CPU ? r.logits : r.logits.to(Device::CPU, MemCategory::Activations);
  const int64_t v = model_.config().vocab_size;
  for (int64_t b = 0; b < b_n; ++b) {
    Seq& s = *rows[static_cast<size_t>(b)];
    s.filled += 1;
    const float* row = lg.data<float>() + b * v;
    emit(s, sample_token(row, v, s.req.sampling, s.rng), row);
  }
  return true;
}

bool Engine::step(StepStats* st) {
  const double t0 = now_s();
  for (auto& sp : running_)
    if (sp->h->cancelled_) finish(*sp, FinishReason::Cancelled);
  admit();
  bool ran = prefill_step(st);
  ran = decode_step(st) || ran;
  int64_t finished = 0;
  for (auto& sp : running_) finished += sp->done ? 1 : 0;
  running_.erase(std::remove_if(running_.begin(), running_.end(), [](const auto& s) { return s->done; }),
                 running_.end());
  // Blocks freed this step may admit waiting requests before the next one runs.
  if (finished) admit();
  n_active_ = static_cast<int64_t>(running_.size());
  if (st) {
    st->finished += finished;
    st->seconds += now_s() - t0;
    if (opt_.route_stats) {
      st->experts_touched = 0;
      for (auto& l : st->expert_tokens)
        for (int64_t n : l) st->experts_touched += n > 0 ? 1 : 0;
    }
  }
  return ran || finished > 0;
}

void Engine::run_until_idle() {
  for (;;) {
    bool pending;
    {
      std::lock_guard<std::mutex> lk(mu_);
      pending = !incoming_.empty();
    }
    if (!step() && !pending && running_.empty() && queue_.empty()) break;
  }
}

}  // namespace moe
