// api.h — the OpenAI-compatible request layer of `moe serve`, without any networking: parsing
// and validating request bodies of /v1/chat/completions and /v1/completions, and building the
// response objects (whole, streamed chunks, usage, logprobs, errors).
//
// Every problem with a request is an ApiError carrying the HTTP status and OpenAI's error
// object fields ({"error":{"message","type","param","code"}}); nothing here throws anything
// else on any input (the fuzz target fuzz/fuzz_api_request.cpp holds it to that).
#pragma once
#include <cstdint>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <nlohmann/json.hpp>

#include "serve/engine.h"

namespace moe {

struct ApiError : std::runtime_error {
  int status;
  std::string type, param, code;
  ApiError(int status, std::string message, std::string param = "", std::string code = "",
           std::string type = "invalid_request_error");
  std::string body() const;  // {"error":{...}}
};

struct ApiLimits {
  size_t max_body_bytes = 4u << 20;
  int64_t max_tokens = 4096;   // per request (and the default when a request gives none: 256 or less)
  size_t max_messages = 1024;
  size_t max_stop = 4;         // as OpenAI
  int64_t max_top_logprobs = 20;
};

// A parsed request: what to render and tokenize (messages or prompt) and how to generate.
struct ApiRequest {
  bool chat = false;
  std::string model;
  nlohmann::ordered_json messages;       // chat: [{role, content(string)}], content parts joined
  std::string prompt_text;               // completions: the prompt as text...
  std::vector<int32_t> prompt_ids;       // ...or as token ids
  GenRequest gen;                        // everything but the prompt tokens
  bool stream = false, include_usage = false;
  bool logprobs = false;                 // chat: logprobs=true; completions: logprobs=N
  bool echo = false;                     // completions: not supported (an error when true)
  bool has_seed = false;                 // without one the server draws a seed per request
};

ApiRequest parse_request(std::string_view body, bool chat, const ApiLimits& lim);

// The text of one token for logprobs (its decoded bytes; invalid UTF-8 as U+FFFD).
struct TokenText {
  std::string text;
  std::vector<int> bytes;
};

// One finished choice's content, for the non-streamed response.
struct ApiResult {
  std::string text;
  std::string finish_reason;
  std::vector<GenToken> tokens;   // with logprobs when asked
  std::vector<TokenText> token_text, top_text_flat;  // per token; per alternative (row-major)
  int64_t prompt_tokens = 0, completion_tokens = 0, cached_tokens = 0;
};

nlohmann::ordered_json usage_json(int64_t prompt_tokens, int64_t completion_tokens, int64_t cached_tokens);
// The whole response object of a finished request.
nlohmann::ordered_json response_json(const ApiRequest& r, const ApiResult& res, const std::string& id, int64_t created,
                                     const std::string& model);
// One streamed chunk: a delta of text (chat: with role on the first), the logprobs of the
// tokens it carries, and the finish reason on the last.
nlohmann::ordered_json chunk_json(const ApiRequest& r, const std::string& id, int64_t created, const std::string& model,
                                  const std::string& delta, bool first, const std::vector<GenToken>& toks,
                                  const std::vector<TokenText>& tok_text, const std::vector<TokenText>& top_text,
                                  const char* finish_reason);
// The logprobs object for tokens (chat: {"content":[...]}; completions: tokens/token_logprobs/
// top_logprobs/text_offset). top_text holds each token's alternatives' text, row-major.
nlohmann::ordered_json logprobs_json(bool chat, const std::vector<GenToken>& toks, const std::vector<TokenText>& tok_text,
                                     const std::vector<TokenText>& top_text, size_t text_offset0);

}  // namespace moe
