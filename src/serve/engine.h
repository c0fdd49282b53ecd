// engine.h — the generation loop (prefill → decode → sample → stop) shared by `moe generate`
// and `moe serve`: a continuous-batching scheduler over one model.
//
// Requests join the running batch at token boundaries. Each step runs
//   - prefill chunks for admitted sequences (at most `prefill_chunk` prompt tokens per step in
//     all, so a long prompt does not stall the others' decoding), then
//   - one decode forward for every sequence that is generating: a [B,1] batch whose rows sit at
//     different positions; the MoE layers group all B tokens per expert, so each expert's
//     weights are read once per step for all of them.
// On the CPU the KV cache is paged (kv_pool.h): blocks are taken as sequences grow, shared
// between prompts with the same leading blocks, and returned when a sequence ends or is
// cancelled. A sequence that cannot get a block is preempted (its blocks returned, its prompt
// and output so far recomputed when blocks free up). On CUDA each sequence has a cache slot of
// `max_context` positions.
//
// Threads: submit() and SeqHandle::cancel() may be called from any thread; step() from one
// thread at a time. Callbacks run on the stepping thread.
#pragma once
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "model/model.h"
#include "serve/kv_pool.h"
#include "serve/sampling.h"
#include "tokenizer/tokenizer.h"

namespace moe {

struct GenRequest {
  std::vector<int32_t> prompt;
  SamplingParams sampling;
  uint64_t seed = 1;
  int64_t max_tokens = 16;
  std::vector<std::string> stop;  // stop strings, matched on the detokenized output (needs a tokenizer)
  bool ignore_eos = false;
  int64_t top_logprobs = -1;      // < 0: no logprobs; n >= 0: the chosen token's and n alternatives
};

enum class FinishReason { Stop, Length, Cancelled };
const char* finish_reason_name(FinishReason r);

struct GenToken {
  int32_t id = 0;
  std::string text;  // visible text this token completes (may be empty; stop strings held back)
  TokenLogprobs logprobs;
};

struct GenCallbacks {
  std::function<void(const GenToken&)> on_token;
  // After the last token: the reason, and any visible text still held back (already included
  // in no on_token call).
  std::function<void(FinishReason, const std::string& tail)> on_finish;
};

// A submitted request. cancel() frees its sequence and KV blocks at the next step.
class SeqHandle {
 public:
  void cancel() { cancelled_ = true; }
  bool finished() const { return finished_; }
  int64_t prompt_tokens() const { return prompt_tokens_; }
  int64_t generated_tokens() const { return generated_; }
  int64_t cached_prompt_tokens() const { return cached_prompt_; }  // prefix reuse

 private:
  friend class Engine;
  std::atomic<bool> cancelled_{false}, finished_{false};
  std::atomic<int64_t> prompt_tokens_{0}, generated_{0}, cached_prompt_{0};
};

struct EngineOptions {
  int64_t max_batch = 64;       // sequences decoding together
  int64_t block_size = 16;      // paged KV: positions per block
  int64_t kv_blocks = 0;        // paged KV: blocks (0: max_batch · max_context positions' worth)
  int64_t prefill_chunk = 256;  // prompt tokens per step, all sequences together
  int64_t max_context = 0;      // positions per sequence (0: the model's max_position_embeddings)
  bool route_stats = false;     // count tokens per expert per layer (metrics; a little host work)
};

// Per step, what ran (for metrics and `moe bench serve`).
struct StepStats {
  int64_t decode_rows = 0, prefill_tokens = 0, finished = 0, preempted = 0;
  double seconds = 0;
  // With route_stats: tokens per expert of each MoE layer this step ([layer][expert]; empty
  // vectors for dense layers) and the experts that received any token.
  std::vector<std::vector<int64_t>> expert_tokens;
  int64_t experts_touched = 0;
};

class Engine {
 public:
  // The tokenizer (optional) detokenizes for stop strings and text; it must outlive the engine.
  Engine(const Model& model, const Tokenizer* tok, const EngineOptions& opt);
  ~Engine();

  // Queues a request (thread-safe). Throws moe::Error for a request the model cannot run
  // (empty prompt, token ids outside the vocabulary, prompt + max_tokens over max_context,
  // stop strings without a tokenizer).
  std::shared_ptr<SeqHandle> submit(GenRequest req, GenCallbacks cb);
  // One scheduler step; false when there was nothing to do.
  bool step(StepStats* stats = nullptr);
  // Steps until every submitted request has finished.
  void run_until_idle();
  // Blocks until a request is queued or `stop` is set (for a serving thread between steps), or
  // for at most `timeout_s` when that is >= 0; false when it returned for the timeout alone.
  bool wait_for_work(const std::atomic<bool>& stop, double timeout_s = -1);
  void wake();  // wakes wait_for_work (e.g. at shutdown)

  int64_t active() const { return n_active_; }    // admitted sequences
  int64_t waiting() const { return n_waiting_; }  // queued, not admitted
  const KvPool* kv_pool() const { return pool_.get(); }
  int64_t kv_blocks_in_use() const;  // 0 when idle (a leak check)
  int64_t max_context() const { return max_ctx_; }
  const EngineOptions& options() const { return opt_; }

 private:
  struct Seq;
  void admit();
  bool prefill_step(StepStats* st);
  bool decode_step(StepStats* st);
  void emit(Seq& s, int32_t token, const float* logits);
  void finish(Seq& s, FinishReason r);
  void release(Seq& s);
  void count_routes(const ForwardResult& r, StepStats* st);

  const Model& model_;
  const Tokenizer* tok_;
  EngineOptions opt_;
  int64_t max_ctx_ = 0;
  int64_t eos_ = -1;
  KVCache cache_;
  std::unique_ptr<KvPool> pool_;  // paged (CPU) only
  std::vector<int64_t> free_slots_;
  std::vector<std::unique_ptr<Seq>> running_;  // admitted, in admission order
  std::deque<std::unique_ptr<Seq>> queue_;     // owned by the stepping thread
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<std::unique_ptr<Seq>> incoming_;  // guarded by mu_
  std::atomic<int64_t> n_active_{0}, n_waiting_{0};
};

}  // namespace moe
