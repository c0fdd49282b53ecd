// metrics.h — the server's counters, gauges and latency histograms, rendered as Prometheus text
// (GET /metrics). Thread-safe: request threads and the engine thread record concurrently.
#pragma once
#include <cstdint>
#include <map>
#include <mutex>
#include <string>
#include <vector>

namespace moe {

// Cumulative histogram with fixed upper bounds (Prometheus semantics: le buckets, sum, count).
class Histogram {
 public:
  explicit Histogram(std::vector<double> bounds);
  void observe(double v);
  void render(std::string& out, const std::string& name, const std::string& help) const;
  uint64_t count() const { return count_; }

 private:
  std::vector<double> bounds_;
  std::vector<uint64_t> buckets_;  // per bound, non-cumulative; the last is +Inf
  double sum_ = 0;
  uint64_t count_ = 0;
};

class ServerMetrics {
 public:
  ServerMetrics();
  void request_done(const std::string& endpoint, int status);
  void prompt_tokens(int64_t prompt, int64_t cached_prompt);  // of a finished request
  void token_generated();  // every token, cancelled requests' too
  void ttft(double s);
  void per_token(double s);
  void request_latency(double s);
  void step(int64_t decode_rows, const std::vector<std::vector<int64_t>>& expert_tokens);
  // Gauges sampled at render time are passed in.
  struct Gauges {
    int64_t running = 0, waiting = 0, kv_blocks_total = 0, kv_blocks_in_use = 0, kv_blocks_cached = 0, kv_block_size = 0;
    int64_t prefix_hit_blocks = 0;
  };
  std::string render(const Gauges& g) const;

 private:
  mutable std::mutex mu_;
  std::map<std::pair<std::string, int>, uint64_t> requests_;
  uint64_t prompt_tokens_ = 0, cached_tokens_ = 0, generated_tokens_ = 0, steps_ = 0;
  Histogram ttft_, per_token_, latency_, batch_;
  std::vector<std::vector<uint64_t>> expert_tokens_;  // [layer][expert], cumulative
};

}  // namespace moe
