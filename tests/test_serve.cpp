// test_serve.cpp — the serving stack without the network: the paged KV block manager, sampling
// and logprobs, the continuous-batching engine, and the OpenAI request parser.
//
// Engine properties (fixture models, f32, greedy):
//  - one sequence through the engine (paged cache, chunked prefill) gives the tokens of a plain
//    loop over Model::forward with a per-slot cache (an independent path: no pages, no engine);
//  - batched generation gives, for every request, the tokens it gets alone — requests of
//    different prompt lengths arriving at different steps, with prompts sharing a prefix (the
//    prefix cache hits), with a pool so small that sequences are preempted and recomputed;
//  - cancelled and finished sequences return every KV block (blocks_in_use back to 0);
//  - stop strings end the text exactly before the stop string; max_tokens gives "length".
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <map>
#include <string>
#include <vector>

#include "model/model.h"
#include "model/panel_weights.h"
#include "model/random_init.h"
#include "ops/cpu/cpu_gemm_bf16dot.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "serve/api.h"
#include "serve/engine.h"
#include "serve/kv_pool.h"
#include "serve/sampling.h"
#include "tokenizer/tokenizer.h"

namespace moe {
namespace {

std::string fixture(const std::string& fam) { return std::string(MOE_FIXTURES_DIR) + "/" + fam; }

// ---- KvPool ----

TEST(KvPool, GrowIsAllOrNothingAndReleaseReturnsEveryBlock) {
  KvPool p(6, 4);
  std::vector<int32_t> a, b;
  EXPECT_TRUE(p.grow(a, 9));  // 3 blocks
  EXPECT_EQ(a.size(), 3u);
  EXPECT_EQ(p.blocks_in_use(), 3);
  EXPECT_TRUE(p.grow(a, 12));  // still 3
  EXPECT_EQ(a.size(), 3u);
  EXPECT_FALSE(p.grow(b, 17));  // needs 5 of the 3 left: nothing taken
  EXPECT_TRUE(b.empty());
  EXPECT_EQ(p.blocks_in_use(), 3);
  EXPECT_TRUE(p.grow(b, 12));
  EXPECT_EQ(p.blocks_available(), 0);
  for (int32_t x : a)
    for (int32_t y : b) EXPECT_NE(x, y) << "a block given to two sequences";
  p.release(a);
  p.release(b);
  EXPECT_TRUE(a.empty());
  EXPECT_EQ(p.blocks_in_use(), 0);
  EXPECT_EQ(p.blocks_available(), 6);
}

TEST(KvPool, PrefixBlocksAreSharedCachedAndEvictedLeastRecentFirst) {
  KvPool p(4, 2);
  const std::vector<int32_t> prompt = {5, 6, 7, 8, 9};  // blocks [5,6] [7,8], then 9
  std::vector<int32_t> a;
  EXPECT_EQ(p.match_prefix(prompt, a), 0);
  ASSERT_TRUE(p.grow(a, 6));
  p.publish_prefix(prompt, a, 5);
  EXPECT_EQ(p.blocks_cached(), 2);
  // A second sequence with the same prompt takes both whole blocks (not the last token's).
  std::vector<int32_t> b;
  EXPECT_EQ(p.match_prefix(prompt, b), 4);
  EXPECT_EQ(b, std::vector<int32_t>(a.begin(), a.begin() + 2));
  EXPECT_EQ(p.blocks_in_use(), 3);
  // A prompt that differs in the second block shares only the first.
  std::vector<int32_t> c;
  EXPECT_EQ(p.match_prefix({5, 6, 7, 0, 9}, c), 2);
  p.release(c);
  // The whole prompt is at most (len-1)/P blocks: [5,6,7,8] reuses one block, not two.
  std::vector<int32_t> d;
  EXPECT_EQ(p.match_prefix({5, 6, 7, 8}, d), 2);
  p.release(d);
  p.release(a);
  p.release(b);
  EXPECT_EQ(p.blocks_in_use(), 0);
  EXPECT_EQ(p.blocks_cached(), 2);  // kept for later prompts
  // Needing every block evicts the cached ones (and forgets their content).
  std::vector<int32_t> e;
  ASSERT_TRUE(p.grow(e, 8));
  EXPECT_EQ(p.blocks_cached(), 0);
  p.release(e);
  std::vector<int32_t> f;
  EXPECT_EQ(p.match_prefix(prompt, f), 0);
}

// ---- sampling ----

TEST(Sampling, TopKAndTopPSampleTheRenormalisedDistribution) {
  // p = softmax(logits): 0.5, 0.25, 0.125, 0.0625, ... (powers of two).
  const int64_t v = 10;
  std::vector<float> lg(v);
  for (int64_t i = 0; i < v; ++i) lg[i] = static_cast<float>(-double(i) * std::log(2.0));
  std::swap(lg[0], lg[7]);  // the most likely id is 7: order must not follow ids
  auto freq = [&](const SamplingParams& sp, int n) {
    Rng rng(3);
    std::vector<double> f(v, 0);
    for (int i = 0; i < n; ++i) f[static_cast<size_t>(sample_token(lg.data(), v, sp, rng))] += 1.0 / n;
    return f;
  };
  const int n = 40000;
  // top-k 2: only ids 7 and 1, at 2/3 and 1/3.
  std::vector<double> f = freq({1.0f, 2, 1.0f}, n);
  EXPECT_NEAR(f[7], 2.0 / 3, 0.01);
  EXPECT_NEAR(f[1], 1.0 / 3, 0.01);
  EXPECT_NEAR(f[7] + f[1], 1.0, 1e-12);
  // top-p 0.8: the nucleus is {7, 1, 2} (0.5 + 0.25 reaches 0.75 < 0.8; + 0.125 = 0.875).
  f = freq({1.0f, 0, 0.8f}, n);
  EXPECT_NEAR(f[7], 0.5 / 0.875, 0.01);
  EXPECT_NEAR(f[2], 0.125 / 0.875, 0.01);
  EXPECT_NEAR(f[7] + f[1] + f[2], 1.0, 1e-12);
  // Plain temperature 1: every id at its probability (id 9's is 2^-9 ~ 0.002).
  f = freq({1.0f, 0, 1.0f}, n);
  EXPECT_NEAR(f[7], 0.5, 0.01);
  EXPECT_NEAR(f[3], 0.0625, 0.005);
  // A wide nucleus over a flat distribution widens past the first candidate set (64).
  std::vector<float> flat(1000, 0.0f);
  Rng rng(1);
  std::map<int32_t, int> seen;
  for (int i = 0; i < 5000; ++i) ++seen[sample_token(flat.data(), 1000, {1.0f, 0, 0.5f}, rng)];
  EXPECT_GT(seen.size(), 400u);
  for (auto& [id, c] : seen) EXPECT_LT(id, 500) << "outside the nucleus (ties: lower ids first)";
  // Greedy: argmax.
  EXPECT_EQ(sample_token(lg.data(), v, {0.0f, 0, 1.0f}, rng), 7);
}

TEST(Sampling, LogprobsAreTheLogSoftmax) {
  std::vector<float> lg = {1.0f, 3.0f, -2.0f, 3.0f, 0.5f};
  TokenLogprobs t;
  token_logprobs(lg.data(), 5, 4, 3, &t);
  double z = 0;
  for (float x : lg) z += std::exp(double(x));
  EXPECT_NEAR(t.logprob, 0.5 - std::log(z), 1e-6);
  ASSERT_EQ(t.top.size(), 3u);
  EXPECT_EQ(t.top[0].first, 1);  // tie with id 3: lower id first
  EXPECT_EQ(t.top[1].first, 3);
  EXPECT_EQ(t.top[2].first, 0);
  EXPECT_NEAR(t.top[2].second, 1.0 - std::log(z), 1e-6);
}

// ---- engine ----

struct GenRun {
  std::vector<int32_t> tokens;
  std::string text, finish;
};

// Runs requests through one engine: request i is submitted before step at_step[i].
std::vector<GenRun> run_engine(const Model& m, const Tokenizer* tok, EngineOptions eo, const std::vector<GenRequest>& reqs,
                            const std::vector<int>& at_step, int64_t* preempted = nullptr) {
  Engine e(m, tok, eo);
  std::vector<GenRun> out(reqs.size());
  size_t next = 0;
  for (int step = 0; next < reqs.size() || e.active() || e.waiting(); ++step) {
    while (next < reqs.size() && at_step[next] <= step) {
      GenRun* r = &out[next];
      GenCallbacks cb;
      cb.on_token = [r](const GenToken& g) {
        r->tokens.push_back(g.id);
        r->text += g.text;
      };
      cb.on_finish = [r](FinishReason f, const std::string& tail) {
        r->text += tail;
        r->finish = finish_reason_name(f);
      };
      e.submit(reqs[next], cb);
      ++next;
    }
    StepStats st;
    e.step(&st);
    if (preempted) *preempted += st.preempted;
    EXPECT_LT(step, 10000) << "engine does not finish";
    if (step >= 10000) break;
  }
  EXPECT_EQ(e.kv_blocks_in_use(), 0) << "KV blocks leaked";
  return out;
}

GenRequest greedy(std::vector<int32_t> prompt, int64_t max_tokens) {
  GenRequest r;
  r.prompt = std::move(prompt);
  r.max_tokens = max_tokens;
  r.ignore_eos = true;
  return r;
}

// Greedy decoding with Model::forward and a per-slot cache: no pages, no engine.
std::vector<int32_t> plain_greedy(const Model& m, const std::vector<int32_t>& prompt, int64_t n) {
  KVCache kv = m.make_cache(1, static_cast<int64_t>(prompt.size()) + n);
  ForwardOptions fo;
  fo.last_logits_only = true;
  Tensor ids = Tensor::empty({1, static_cast<int64_t>(prompt.size())}, DType::I32, MemCategory::Activations);
  std::copy(prompt.begin(), prompt.end(), ids.data<int32_t>());
  std::vector<int32_t> out;
  const int64_t v = m.config().vocab_size;
  while (static_cast<int64_t>(out.size()) < n) {
    ForwardResult r = m.forward(ids, kv, fo);
    const float* lg = r.logits.data<float>();
    out.push_back(static_cast<int32_t>(std::max_element(lg, lg + v) - lg));
    ids = Tensor::empty({1, 1}, DType::I32, MemCategory::Activations);
    ids.data<int32_t>()[0] = out.back();
  }
  return out;
}

std::vector<int32_t> prompt_of(int64_t n, int32_t salt, int64_t vocab) {
  std::vector<int32_t> p;
  for (int64_t i = 0; i < n; ++i) p.push_back(static_cast<int32_t>((i * 7 + salt * 13 + 1) % vocab));
  return p;
}

// One sequence at a time, in blocks of 4 positions, prompts prefilled 6 tokens a step: the
// reference the batched runs are compared with.
EngineOptions one_at_a_time() {
  EngineOptions eo;
  eo.max_batch = 1;
  eo.block_size = 4;
  eo.prefill_chunk = 6;
  eo.max_context = 64;
  return eo;
}

class EngineFixture : public ::testing::TestWithParam<std::string> {};

TEST_P(EngineFixture, OneSequenceMatchesPlainForwardLoop) {
  Model m = Model::load(fixture(GetParam()));
  const int64_t v = m.config().vocab_size;
  EngineOptions eo;
  eo.max_batch = 1;
  eo.block_size = 4;      // several blocks per sequence
  eo.prefill_chunk = 5;   // the 11-token prompt in three chunks
  eo.max_context = 64;
  auto runs = run_engine(m, nullptr, eo, {greedy(prompt_of(11, 1, v), 9)}, {0});
  EXPECT_EQ(runs[0].tokens, plain_greedy(m, prompt_of(11, 1, v), 9));
  EXPECT_EQ(runs[0].finish, "length");
}

TEST_P(EngineFixture, BatchedGreedyEqualsOneAtATime) {
  Model m = Model::load(fixture(GetParam()));
  const int64_t v = m.config().vocab_size;
  // Different prompt lengths; requests 3 and 4 share request 1's first 8 tokens (prefix cache).
  std::vector<GenRequest> reqs = {greedy(prompt_of(3, 1, v), 12), greedy(prompt_of(13, 2, v), 7),
                                  greedy(prompt_of(1, 3, v), 10), greedy(prompt_of(13, 2, v), 9),
                                  greedy(prompt_of(8, 4, v), 5)};
  reqs[3].prompt.resize(8);
  reqs[3].prompt.push_back(5);
  reqs[3].prompt.push_back(2);
  std::vector<int> at = {0, 0, 2, 5, 6};
  const EngineOptions solo = one_at_a_time();
  std::vector<std::vector<int32_t>> alone;
  for (auto& r : reqs) alone.push_back(run_engine(m, nullptr, solo, {r}, {0})[0].tokens);
  EngineOptions batched = solo;
  batched.max_batch = 8;
  auto runs = run_engine(m, nullptr, batched, reqs, at);
  for (size_t i = 0; i < reqs.size(); ++i) {
    EXPECT_EQ(runs[i].tokens, alone[i]) << "request " << i;
    EXPECT_EQ(static_cast<int64_t>(runs[i].tokens.size()), reqs[i].max_tokens) << "request " << i;
  }
  // A pool of 8 blocks of 4 positions cannot hold them all at once: sequences are preempted
  // and recomputed, and still give the same tokens.
  EngineOptions tight = batched;
  tight.kv_blocks = 8;
  int64_t preempted = 0;
  auto tight_runs = run_engine(m, nullptr, tight, reqs, at, &preempted);
  EXPECT_GT(preempted, 0) << "the tight pool was meant to force preemption";
  for (size_t i = 0; i < reqs.size(); ++i) EXPECT_EQ(tight_runs[i].tokens, alone[i]) << "request " << i << " (tight pool)";
}

TEST_P(EngineFixture, CancelledSequencesReturnTheirBlocks) {
  Model m = Model::load(fixture(GetParam()));
  const int64_t v = m.config().vocab_size;
  EngineOptions eo;
  eo.max_batch = 4;
  eo.block_size = 4;
  eo.max_context = 64;
  Engine e(m, nullptr, eo);
  std::string finish_a, finish_b;
  int tokens_a = 0;
  GenCallbacks ca, cb;
  ca.on_token = [&](const GenToken&) { ++tokens_a; };
  ca.on_finish = [&](FinishReason f, const std::string&) { finish_a = finish_reason_name(f); };
  cb.on_finish = [&](FinishReason f, const std::string&) { finish_b = finish_reason_name(f); };
  auto a = e.submit(greedy(prompt_of(9, 1, v), 40), ca);
  auto b = e.submit(greedy(prompt_of(5, 2, v), 40), cb);
  for (int i = 0; i < 4; ++i) e.step();
  EXPECT_GT(e.kv_blocks_in_use(), 0);
  a->cancel();
  e.step();
  EXPECT_EQ(finish_a, "cancelled");
  EXPECT_TRUE(a->finished());
  EXPECT_EQ(e.active(), 1);
  const int after_cancel = tokens_a;
  b->cancel();
  e.step();
  EXPECT_EQ(finish_b, "cancelled");
  EXPECT_EQ(e.kv_blocks_in_use(), 0);
  EXPECT_EQ(tokens_a, after_cancel) << "tokens after cancel";
  EXPECT_FALSE(e.step()) << "an idle engine reports no work";
}

// Serving's bf16 weights in 16-row panels (model/panel_weights.h): the panel kernel computes
// each row alone, so a request's tokens do not depend on the batch it ran in.
TEST(Engine, PanelPackedBf16BatchedGreedyEqualsOneAtATime) {
  if (!cpu::bf16_matrix_available() || !cpu::bf16dot_available())
    GTEST_SKIP() << "SKIPPED: this CPU has no AVX512-BF16";
  cpu::set_bf16_gemm(cpu::Bf16Gemm::Matrix);
  for (const char* arch : {"mixtral", "qwen2_moe"}) {
    ModelConfig cfg = preset_config(arch, "tiny");
    LoadOptions lo;
    lo.keep_dtype = true;
    Model m = Model::from_tensors(cfg, random_weights(cfg, 3, DType::BF16), lo);
    ASSERT_GT(pack_bf16_panels(m), 0) << arch;
    const int64_t v = cfg.vocab_size;
    std::vector<GenRequest> reqs = {greedy(prompt_of(3, 1, v), 12), greedy(prompt_of(13, 2, v), 7),
                                    greedy(prompt_of(1, 3, v), 10), greedy(prompt_of(21, 4, v), 9),
                                    greedy(prompt_of(8, 5, v), 5)};
    std::vector<int> at = {0, 0, 2, 5, 6};
    const EngineOptions solo = one_at_a_time();
    EngineOptions batched = solo;
    batched.max_batch = 8;
    auto runs = run_engine(m, nullptr, batched, reqs, at);
    for (size_t i = 0; i < reqs.size(); ++i)
      EXPECT_EQ(runs[i].tokens, run_engine(m, nullptr, solo, {reqs[i]}, {0})[0].tokens) << arch << " request " << i;
  }
  cpu::set_bf16_gemm(cpu::Bf16Gemm::Widen);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, EngineFixture, ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe"));

TEST(Engine, StopStringsEndTheTextBeforeThem) {
  // A byte-level tokenizer over the fixture's vocabulary: ids < 256 are bytes.
  Model m = Model::load(fixture("mixtral"));
  ASSERT_GE(m.config().vocab_size, 256);
  Tokenizer tok = Tokenizer::byte_level({});
  EngineOptions eo;
  eo.max_batch = 2;
  eo.max_context = 64;
  const std::vector<int32_t> prompt = {72, 101, 108, 108, 111};  // "Hello"
  GenRequest base = greedy(prompt, 24);
  GenRun full = run_engine(m, &tok, eo, {base}, {0})[0];
  ASSERT_EQ(full.finish, "length");
  std::string all = tok.decode(full.tokens, true);
  ASSERT_EQ(full.text, all) << "delivered text = decode(tokens)";
  // Stop at a piece from the middle of what it generates (bytes 5..6 of the text).
  ASSERT_GE(all.size(), 8u);
  GenRequest s = base;
  s.stop = {all.substr(5, 2), "\x01never\x02"};
  GenRun stopped = run_engine(m, &tok, eo, {s}, {0})[0];
  EXPECT_EQ(stopped.finish, "stop");
  EXPECT_EQ(stopped.text, all.substr(0, all.find(all.substr(5, 2))));
}

TEST(Engine, RejectsRequestsTheModelCannotRun) {
  Model m = Model::load(fixture("mixtral"));
  EngineOptions eo;
  eo.max_context = 16;
  Engine e(m, nullptr, eo);
  EXPECT_THROW(e.submit(greedy({}, 4), {}), Error);
  EXPECT_THROW(e.submit(greedy({1, 2, 3}, 14), {}), Error);  // 3 + 14 > 16
  EXPECT_THROW(e.submit(greedy({1, static_cast<int32_t>(m.config().vocab_size)}, 4), {}), Error);
  GenRequest s = greedy({1, 2}, 4);
  s.stop = {"x"};
  EXPECT_THROW(e.submit(s, {}), Error);  // stop strings without a tokenizer
}

// The serving thread's idle wait: with a timeout it returns false on an idle engine (the server
// then hands memory back), true at once when work is queued or stop is set; without one it
// returns for work.
TEST(Engine, IdleWaitTimesOutOnlyWithoutWork) {
  Model m = Model::load(fixture("mixtral"));
  EngineOptions eo;
  eo.max_context = 32;
  Engine e(m, nullptr, eo);
  std::atomic<bool> stop{false};
  const auto t0 = std::chrono::steady_clock::now();
  EXPECT_FALSE(e.wait_for_work(stop, 0.05)) << "idle: the timeout";
  EXPECT_GE(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count(), 0.04);
  auto h = e.submit(greedy({1, 2, 3}, 2), {});
  EXPECT_TRUE(e.wait_for_work(stop, 10.0)) << "queued work";
  EXPECT_TRUE(e.wait_for_work(stop)) << "queued work, no timeout";
  e.run_until_idle();
  EXPECT_TRUE(h->finished());
  EXPECT_FALSE(e.wait_for_work(stop, 0.01)) << "idle again";
  stop = true;
  EXPECT_TRUE(e.wait_for_work(stop, 10.0)) << "stop set";
}

// ---- request parser ----

int status_of(const std::string& body, bool chat, std::string* param = nullptr) {
  try {
    parse_request(body, chat, ApiLimits{});
  } catch (const ApiError& e) {
    if (param) *param = e.param;
    EXPECT_FALSE(std::string(e.what()).empty());
    EXPECT_NE(e.body().find("\"error\""), std::string::npos);
    return e.status;
  }
  return 200;
}

TEST(ApiRequest, ParsesTheOpenAIFields) {
  ApiRequest r = parse_request(
      R"({"model":"m","messages":[{"role":"system","content":"S"},{"role":"user","content":[{"type":"text","text":"a"},{"type":"text","text":"b"}]}],
          "temperature":0.5,"top_p":0.9,"top_k":4,"max_tokens":7,"stop":["x","y"],"seed":-3,"n":1,"logprobs":true,
          "top_logprobs":3,"stream":true,"stream_options":{"include_usage":true}})",
      true, ApiLimits{});
  EXPECT_EQ(r.messages.size(), 2u);
  EXPECT_EQ(r.messages[1]["content"], "ab");
  EXPECT_FLOAT_EQ(r.gen.sampling.temperature, 0.5f);
  EXPECT_FLOAT_EQ(r.gen.sampling.top_p, 0.9f);
  EXPECT_EQ(r.gen.sampling.top_k, 4);
  EXPECT_EQ(r.gen.max_tokens, 7);
  EXPECT_EQ(r.gen.stop, (std::vector<std::string>{"x", "y"}));
  EXPECT_TRUE(r.has_seed);
  EXPECT_EQ(r.gen.top_logprobs, 3);
  EXPECT_TRUE(r.stream && r.include_usage && r.logprobs);
  ApiRequest c = parse_request(R"({"prompt":[1,2,3],"logprobs":2,"stop":"\n"})", false, ApiLimits{});
  EXPECT_EQ(c.prompt_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(c.gen.top_logprobs, 2);
  EXPECT_EQ(c.gen.max_tokens, 16);  // OpenAI's default for completions
  EXPECT_FALSE(c.has_seed);
}

TEST(ApiRequest, BadRequestsAre400WithTheFieldNamed) {
  std::string p;
  EXPECT_EQ(status_of("{", true), 400);
  EXPECT_EQ(status_of("[1,2]", true), 400);
  EXPECT_EQ(status_of(R"({"messages":"hi"})", true, &p), 400);
  EXPECT_EQ(p, "messages");
  EXPECT_EQ(status_of(R"({"messages":[]})", true, &p), 400);
  EXPECT_EQ(status_of(R"({"messages":[{"role":"wizard","content":"x"}]})", true, &p), 400);
  EXPECT_EQ(p, "messages[0].role");
  EXPECT_EQ(status_of(R"({"messages":[{"role":"user","content":5}]})", true, &p), 400);
  EXPECT_EQ(p, "messages[0].content");
  EXPECT_EQ(status_of(R"({"messages":[{"role":"user","content":"x"}],"temperature":"hot"})", true, &p), 400);
  EXPECT_EQ(p, "temperature");
  EXPECT_EQ(status_of(R"({"messages":[{"role":"user","content":"x"}],"temperature":3})", true, &p), 400);
  EXPECT_EQ(status_of(R"({"messages":[{"role":"user","content":"x"}],"max_tokens":0})", true, &p), 400);
  EXPECT_EQ(p, "max_tokens");
  EXPECT_EQ(status_of(R"({"messages":[{"role":"user","content":"x"}],"max_tokens":1e9})", true, &p), 400);
  EXPECT_EQ(status_of(R"({"messages":[{"role":"user","content":"x"}],"max_tokens":99999999})", true, &p), 400);
  EXPECT_EQ(status_of(R"({"messages":[{"role":"user","content":"x"}],"n":2})", true, &p), 400);
  EXPECT_EQ(p, "n");
  EXPECT_EQ(status_of(R"({"messages":[{"role":"user","content":"x"}],"stop":["a","b","c","d","e"]})", true, &p), 400);
  EXPECT_EQ(status_of(R"({"messages":[{"role":"user","content":"x"}],"top_logprobs":2})", true, &p), 400);
  EXPECT_EQ(status_of(R"({"messages":[{"role":"user","content":"x"}],"stream_options":{}})", true, &p), 400);
  EXPECT_EQ(status_of(R"({"prompt":""})", false, &p), 400);
  EXPECT_EQ(status_of(R"({"prompt":[1,-2]})", false, &p), 400);
  EXPECT_EQ(status_of(R"({"prompt":"x","seed":18446744073709551615})", false, &p), 400);
  EXPECT_EQ(status_of(R"({"max_tokens":3})", false, &p), 400);
  EXPECT_EQ(p, "prompt");
  EXPECT_EQ(status_of(std::string(4096, '[') + std::string(4096, ']'), true), 400);  // nesting
  EXPECT_EQ(status_of(std::string(5u << 20, ' '), true), 413);
}

}  // namespace
}  // namespace moe
