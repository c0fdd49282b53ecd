// fuzz_targets.h — the one-input entry points of the libFuzzer targets (fuzz/fuzz_*.cpp), shared
// with the regression test that replays tests/fuzz_corpus/<target>/* through ctest
// (tests/test_hostile_corpus.cpp), so a found input is re-run exactly as the fuzzer ran it.
//
// Contract of every entry point: any input either succeeds or throws moe::Error (DESIGN.md
// invariant 6). Each catches moe::Error and returns; anything else (another exception, a
// sanitizer report, a broken invariant -> std::abort) is a bug.
#pragma once
#include <cstdint>
#include <cstdlib>
#include <map>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_util.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "plan/plan_model.h"
#include "serve/api.h"
#include "tokenizer/jinja.h"
#include "tokenizer/regex.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/unicode.h"

namespace moe::fuzz {

// A broken promise of an API that accepted the input.
#define MOE_FUZZ_REQUIRE(cond) \
  do {                         \
    if (!(cond)) std::abort(); \
  } while (0)

// Splits "a\0b" into (a, b); without a NUL byte, b is empty.
inline std::pair<std::string_view, std::string_view> split_at_nul(const uint8_t* data, size_t size) {
  const std::string_view all(reinterpret_cast<const char*>(data), size);
  const size_t z = all.find('\0');
  if (z == std::string_view::npos) return {all, std::string_view()};
  return {all.substr(0, z), all.substr(z + 1)};
}

// safetensors header: parse, then check the offsets against the promises the reader makes.
inline void safetensors_header(const uint8_t* data, size_t size) {
  std::map<std::string, std::string> metadata;
  size_t data_start = 0;
  std::vector<SafetensorsInfo> infos;
  try {
    infos = parse_safetensors_header(data, size, "fuzz.safetensors", &metadata, &data_start);
  } catch (const Error&) {
    return;
  }
  MOE_FUZZ_REQUIRE(data_start >= 8 && data_start <= size);
  size_t prev_begin = 0;
  for (const SafetensorsInfo& t : infos) {
    MOE_FUZZ_REQUIRE(t.begin <= t.end && t.end <= size - data_start);
    MOE_FUZZ_REQUIRE(t.begin >= prev_begin);
    prev_begin = t.begin;
    size_t bytes = dtype_size(t.dtype);
    for (int64_t d : t.shape) bytes *= static_cast<size_t>(d);
    MOE_FUZZ_REQUIRE(bytes == t.end - t.begin);
  }
}

// model.safetensors.index.json text.
inline void safetensors_index(const uint8_t* data, size_t size) {
  try {
    const auto entries =
        parse_safetensors_index(std::string_view(reinterpret_cast<const char*>(data), size), "fuzz.index.json");
    for (const auto& [name, shard] : entries) {
      MOE_FUZZ_REQUIRE(!shard.empty() && shard.find('/') == std::string::npos && shard != "." && shard != "..");
    }
  } catch (const Error&) {
  }
}

// config.json: the engine's parser (and its serialiser round trip), then the planner's.
inline void config_json(const uint8_t* data, size_t size) {
  const std::string text(reinterpret_cast<const char*>(data), size);
  try {
    const ModelConfig c = parse_hf_config(text, "fuzz/config.json");
    MOE_FUZZ_REQUIRE(c.vocab_size > 0 && c.hidden_size > 0 && c.n_layer > 0 && c.head_dim > 0);
    std::string again;
    try {
      again = hf_config_to_json(c);
    } catch (const Error&) {
      again.clear();  // a setting that family's config.json cannot express
    }
    if (!again.empty()) MOE_FUZZ_REQUIRE(parse_hf_config(again, "round trip") == c);
  } catch (const Error&) {
  }
  try {
    const PlanModel m = plan_model_from_hf_json(text, "fuzz/config.json");
    const ParamCounts pc = plan_params(m);
    // The overflow this guards against showed up as negative totals.
    MOE_FUZZ_REQUIRE(pc.total > 0 && pc.active > 0 && pc.active <= pc.total + pc.embed && pc.experts >= 0 &&
                     pc.mtp >= 0 && pc.total <= kMaxPlanParams);
  } catch (const Error&) {
  }
}

// tokenizer.json (before a NUL byte) + a text to encode (after it): load, encode, decode, stream.
//
// Each input builds a whole tokenizer (JSON, vocabulary, merges, compiled pre-tokenizer regexes),
// so the work per input is kept small for the fuzzer to reach millions of executions under ASan:
// inputs above kFuzzTokenizerMaxBytes are skipped (a larger vocabulary only repeats the same
// code), and two texts are encoded: the fuzzer's (with and without the template's special
// tokens) and one fixed text with added tokens, multilingual text, digits and an invalid byte.
constexpr size_t kFuzzTokenizerMaxBytes = 16 << 10;

inline void tokenizer_json(const uint8_t* data, size_t size) {
  if (size > kFuzzTokenizerMaxBytes) return;
  const auto [json_text, extra] = split_at_nul(data, size);
  try {
    const nlohmann::json j = parse_json(json_text, "fuzz/tokenizer.json");
    const Tokenizer tok = Tokenizer::from_json(j, nlohmann::json::object(), "fuzz/tokenizer.json");
    const std::pair<std::string, bool> runs[] = {
        {std::string(extra), true},
        {std::string(extra), false},
        {"<|im_start|>user\n  h\xC3\xA9llo \xE4\xB8\x96\xE7\x95\x8C 12345\n\t!<|im_end|>a\xFF" "b", true}};
    for (const auto& [text, specials] : runs) {
      const std::vector<int32_t> ids = tok.encode(text, specials);
      for (int32_t id : ids) MOE_FUZZ_REQUIRE(id >= 0 && id < tok.vocab_size());
      const std::string back = tok.decode(ids);
      MOE_FUZZ_REQUIRE(utf8_valid(back));
      (void)tok.decode(ids, /*skip_special_tokens=*/true);
      if (!specials) continue;
      DecodeStream ds(tok);
      std::string streamed;
      for (int32_t id : ids) streamed += ds.step(id);
      streamed += ds.flush();
    }
    // Arbitrary ids from the extra bytes: in range or rejected.
    std::vector<int32_t> ids;
    for (size_t i = 0; i + 1 < extra.size() && ids.size() < 64; i += 2)
      ids.push_back(int32_t(uint8_t(extra[i])) | (int32_t(uint8_t(extra[i + 1])) << 8));
    try {
      (void)tok.decode(ids);
    } catch (const Error&) {
    }
  } catch (const Error&) {
  }
}

// A chat template, rendered with a fixed context like the one apply_chat_template passes.
inline void jinja(const uint8_t* data, size_t size) {
  static const nlohmann::ordered_json kContext = nlohmann::ordered_json::parse(R"({
    "messages": [
      {"role": "system", "content": "You are terse."},
      {"role": "user", "content": "What is 2+2? <think>x</think>"},
      {"role": "assistant", "content": "4", "reasoning_content": "add",
       "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
      {"role": "tool", "content": "{\"sum\": 4}"},
      {"role": "user", "content": [{"type": "text", "text": "and 3+3?"}, {"type": "image"}]}
    ],
    "tools": [{"type": "function", "function": {"name": "add", "description": "Adds.",
               "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}],
    "add_generation_prompt": true, "enable_thinking": false,
    "bos_token": "<s>", "eos_token": "</s>", "pad_token": null
  })");
  try {
    const JinjaTemplate t(std::string(reinterpret_cast<const char*>(data), size));
    (void)t.render(kContext);
  } catch (const Error&) {
  }
}

// A regex pattern (before a NUL byte) and a subject (after it): compile, then all matches.
inline void regex(const uint8_t* data, size_t size) {
  const auto [pattern, subject_raw] = split_at_nul(data, size);
  try {
    const Regex re(pattern);
    const std::string subject = utf8_sanitize(subject_raw);
    std::vector<uint32_t> cps;
    for (size_t i = 0; i < subject.size();) cps.push_back(utf8_next(subject, i));
    uint64_t budget = Regex::budget_for(cps.size());
    size_t from = 0, b = 0, e = 0;
    while (from <= cps.size() && re.find(cps.data(), cps.size(), from, &b, &e, &budget)) {
      MOE_FUZZ_REQUIRE(from <= b && b <= e && e <= cps.size());
      from = e > b ? e : b + 1;
    }
  } catch (const Error&) {
  }
}

// An HTTP request body of `moe serve` (the first byte picks the endpoint: odd = chat): parse and
// validate, then build the response objects a request like it gets. Anything wrong with the
// body is an ApiError with status 400 or 413; an accepted request keeps the limits.
inline void api_request(const uint8_t* data, size_t size) {
  if (size == 0) return;
  const bool chat = data[0] & 1;
  const std::string_view body(reinterpret_cast<const char*>(data + 1), size - 1);
  const ApiLimits lim;
  try {
    const ApiRequest r = parse_request(body, chat, lim);
    MOE_FUZZ_REQUIRE(r.gen.max_tokens >= 1 && r.gen.max_tokens <= lim.max_tokens);
    MOE_FUZZ_REQUIRE(r.gen.stop.size() <= lim.max_stop);
    MOE_FUZZ_REQUIRE(r.gen.top_logprobs <= lim.max_top_logprobs);
    MOE_FUZZ_REQUIRE(r.gen.sampling.temperature >= 0 && r.gen.sampling.top_p > 0 && r.gen.sampling.top_p <= 1);
    MOE_FUZZ_REQUIRE(chat ? !r.messages.empty() : (!r.prompt_text.empty() || !r.prompt_ids.empty()));
    // The response objects, with the request's own text standing in for generated text.
    ApiResult res;
    res.text = chat ? r.messages.back()["content"].get<std::string>() : r.prompt_text;
    res.finish_reason = "stop";
    GenToken g;
    g.id = 1;
    g.logprobs.top = {{1, -0.5f}};
    res.tokens = {g};
    res.token_text = {{res.text, {}}};
    res.top_text_flat = {{res.text, {}}};
    (void)response_json(r, res, "id", 0, "m").dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
    (void)chunk_json(r, "id", 0, "m", res.text, true, res.tokens, res.token_text, res.top_text_flat, "stop")
        .dump(-1, ' ', false, nlohmann::ordered_json::error_handler_t::replace);
  } catch (const ApiError& e) {
    MOE_FUZZ_REQUIRE(e.status == 400 || e.status == 413);
    (void)e.body();
  }
}

}  // namespace moe::fuzz
