// metrics.cpp — Prometheus text exposition of the server's metrics.
#include "serve/metrics.h"

#include "core/memory.h"

#include <algorithm>
#include <cstdarg>
#include <cstdio>

namespace moe {
namespace {

void line(std::string& out, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void line(std::string& out, const char* fmt, ...) {
  char buf[512];
  va_list ap;
  va_start(ap, fmt);
  int n = std::vsnprintf(buf, sizeof buf, fmt, ap);
  va_end(ap);
  if (n > 0) out.append(buf, std::min<size_t>(size_t(n), sizeof buf - 1));
}

void header(std::string& out, const char* name, const char* help, const char* type) {
  line(out, "# HELP %s %s\n# TYPE %s %s\n", name, help, name, type);
}

// A metric without labels: its HELP/TYPE lines and its one sample.
void scalar(std::string& out, const char* name, const char* help, const char* type, long long v) {
  header(out, name, help, type);
  line(out, "%s %lld\n", name, v);
}

}  // namespace

Histogram::Histogram(std::vector<double> bounds) : bounds_(std::move(bounds)), buckets_(bounds_.size() + 1, 0) {}

void Histogram::observe(double v) {
  size_t i = 0;
  while (i < bounds_.size() && v > bounds_[i]) ++i;
  ++buckets_[i];
  sum_ += v;
  ++count_;
}

void Histogram::render(std::string& out, const std::string& name, const std::string& help) const {
  header(out, name.c_str(), help.c_str(), "histogram");
  uint64_t acc = 0;
  for (size_t i = 0; i < bounds_.size(); ++i) {
    acc += buckets_[i];
    line(out, "%s_bucket{le=\"%g\"} %llu\n", name.c_str(), bounds_[i], (unsigned long long)acc);
  }
  acc += buckets_.back();
  line(out, "%s_bucket{le=\"+Inf\"} %llu\n%s_sum %.9g\n%s_count %llu\n", name.c_str(), (unsigned long long)acc,
       name.c_str(), sum_, name.c_str(), (unsigned long long)count_);
}

ServerMetrics::ServerMetrics()
    : ttft_({0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30}),
      per_token_({0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1}),
      latency_({0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120}),
      batch_({1, 2, 4, 8, 16, 32, 64, 128, 256}) {}

void ServerMetrics::request_done(const std::string& endpoint, int status) {
  std::lock_guard<std::mutex> lk(mu_);
  ++requests_[{endpoint, status}];
}

void ServerMetrics::prompt_tokens(int64_t prompt, int64_t cached_prompt) {
  std::lock_guard<std::mutex> lk(mu_);
  prompt_tokens_ += uint64_t(prompt);
  cached_tokens_ += uint64_t(cached_prompt);
}

void ServerMetrics::token_generated() {
  std::lock_guard<std::mutex> lk(mu_);
  ++generated_tokens_;
}

void ServerMetrics::ttft(double s) {
  std::lock_guard<std::mutex> lk(mu_);
  ttft_.observe(s);
}

void ServerMetrics::per_token(double s) {
  std::lock_guard<std::mutex> lk(mu_);
  per_token_.observe(s);
}

void ServerMetrics::request_latency(double s) {
  std::lock_guard<std::mutex> lk(mu_);
  latency_.observe(s);
}

void ServerMetrics::step(int64_t decode_rows, const std::vector<std::vector<int64_t>>& expert_tokens) {
  std::lock_guard<std::mutex> lk(mu_);
  ++steps_;
  if (decode_rows > 0) batch_.observe(double(decode_rows));
  if (expert_tokens_.size() < expert_tokens.size()) expert_tokens_.resize(expert_tokens.size());
  for (size_t l = 0; l < expert_tokens.size(); ++l) {
    auto& dst = expert_tokens_[l];
    if (dst.size() < expert_tokens[l].size()) dst.resize(expert_tokens[l].size(), 0);
    for (size_t e = 0; e < expert_tokens[l].size(); ++e) dst[e] += uint64_t(expert_tokens[l][e]);
  }
}

std::string ServerMetrics::render(const Gauges& g) const {
  std::lock_guard<std::mutex> lk(mu_);
  std::string out;
  header(out, "moe_requests_total", "Finished HTTP requests by endpoint and status.", "counter");
  for (auto& [k, n] : requests_)
    line(out, "moe_requests_total{endpoint=\"%s\",status=\"%d\"} %llu\n", k.first.c_str(), k.second,
         (unsigned long long)n);
  scalar(out, "moe_prompt_tokens_total", "Prompt tokens of finished requests.", "counter", (long long)prompt_tokens_);
  scalar(out, "moe_prompt_tokens_cached_total", "Prompt tokens whose KV blocks were reused (prefix cache).", "counter", (long long)cached_tokens_);
  scalar(out, "moe_generated_tokens_total", "Tokens generated (cancelled requests' included).", "counter", (long long)generated_tokens_);
  scalar(out, "moe_engine_steps_total", "Scheduler steps run.", "counter", (long long)steps_);
  ttft_.render(out, "moe_time_to_first_token_seconds", "Time from request arrival to its first token.");
  per_token_.render(out, "moe_time_per_output_token_seconds", "Time between consecutive tokens of a request.");
  latency_.render(out, "moe_request_duration_seconds", "Time from request arrival to its last token.");
  batch_.render(out, "moe_batch_size", "Sequences decoded together per step.");
  scalar(out, "moe_requests_running", "Requests admitted to the running batch.", "gauge", (long long)g.running);
  scalar(out, "moe_requests_waiting", "Requests queued for admission.", "gauge", (long long)g.waiting);
  scalar(out, "moe_kv_blocks_total", "KV cache blocks.", "gauge", (long long)g.kv_blocks_total);
  scalar(out, "moe_kv_block_size", "Positions per KV cache block.", "gauge", (long long)g.kv_block_size);
  scalar(out, "moe_kv_blocks_in_use", "KV cache blocks held by running sequences.", "gauge", (long long)g.kv_blocks_in_use);
  scalar(out, "moe_kv_blocks_cached", "KV cache blocks holding a reusable prompt prefix.", "gauge", (long long)g.kv_blocks_cached);
  scalar(out, "moe_kv_prefix_hit_blocks_total", "KV blocks reused from the prefix cache.", "counter", (long long)g.prefix_hit_blocks);
  // The engine's tracked memory by category (current bytes): idle, activations return to 0.
  header(out, "moe_memory_bytes", "Bytes the engine holds now, by device and category.", "gauge");
  const MemStats ms = mem_stats();
  for (int d = 0; d < kNumDevices; ++d)
    for (int c = 0; c < kNumMemCategories; ++c)
      if (ms.current[d][c] != 0 || ms.peak[d][c] != 0)
        line(out, "moe_memory_bytes{device=\"%s\",category=\"%s\"} %lld\n", device_name(static_cast<Device>(d)),
             mem_category_name(static_cast<MemCategory>(c)), (long long)ms.current[d][c]);
  header(out, "moe_expert_tokens_total", "Tokens routed to each expert, per MoE layer.", "counter");
  for (size_t l = 0; l < expert_tokens_.size(); ++l)
    for (size_t e = 0; e < expert_tokens_[l].size(); ++e)
      line(out, "moe_expert_tokens_total{layer=\"%zu\",expert=\"%zu\"} %llu\n", l, e,
           (unsigned long long)expert_tokens_[l][e]);
  return out;
}

}  // namespace moe
