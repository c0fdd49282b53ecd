// api.cpp — OpenAI request parsing/validation and response objects.
#include "serve/api.h"

#include <cmath>
#include <limits>

#include "core/error.h"
#include "core/json_util.h"

// GCC 12 at -O3 reports a false -Wrestrict inside std::string's operator+ (GCC bug 105329);
// the messages built here are ordinary concatenations.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wrestrict"
#endif

namespace moe {

using ojson = nlohmann::ordered_json;

ApiError::ApiError(int status_, std::string message, std::string param_, std::string code_, std::string type_)
    : std::runtime_error(std::move(message)),
      status(status_),
      type(std::move(type_)),
      param(std::move(param_)),
      code(std::move(code_)) {}

std::string ApiError::body() const {
  ojson e = {{"message", what()},
             {"type", type},
             {"param", param.empty() ? ojson(nullptr) : ojson(param)},
             {"code", code.empty() ? ojson(nullptr) : ojson(code)}};
  return ojson{{"error", e}}.dump(-1, ' ', false, ojson::error_handler_t::replace);
}

namespace {

[[noreturn]] void bad(const std::string& param, const std::string& msg, const std::string& code = "") {
  throw ApiError(400, msg, param, code);
}

const char* type_name(const ojson& v) {
  switch (v.type()) {
    case ojson::value_t::null: return "null";
    case ojson::value_t::object: return "object";
    case ojson::value_t::array: return "array";
    case ojson::value_t::string: return "string";
    case ojson::value_t::boolean: return "boolean";
    case ojson::value_t::number_integer:
    case ojson::value_t::number_unsigned: return "integer";
    case ojson::value_t::number_float: return "number";
    default: return "value";
  }
}

[[noreturn]] void wrong_type(const std::string& param, const char* want, const ojson& v) {
  bad(param, "'" + param + "' must be " + want + ", got " + type_name(v));
}

// Optional fields: absent or null means "not given".
const ojson* field(const ojson& o, const char* name) {
  auto it = o.find(name);
  return it == o.end() || it->is_null() ? nullptr : &*it;
}

double number_in(const ojson& o, const char* name, double lo, double hi, double def) {
  const ojson* v = field(o, name);
  if (!v) return def;
  if (!v->is_number()) wrong_type(name, "a number", *v);
  const double x = v->get<double>();
  if (!(x >= lo && x <= hi))
    bad(name, "'" + std::string(name) + "' must be in [" + json_brief(ojson(lo)) + ", " + json_brief(ojson(hi)) + "], got " +
                  json_brief(*v));
  return x;
}

int64_t int_in(const ojson& o, const char* name, int64_t lo, int64_t hi, int64_t def) {
  const ojson* v = field(o, name);
  if (!v) return def;
  if (!v->is_number_integer()) wrong_type(name, "an integer", *v);
  // Unsigned values above int64's range compare as huge: clamp through double-free checks.
  if (v->is_number_unsigned() && v->get<uint64_t>() > uint64_t(std::numeric_limits<int64_t>::max()))
    bad(name, "'" + std::string(name) + "' is out of range");
  const int64_t x = v->get<int64_t>();
  if (x < lo || x > hi)
    bad(name, "'" + std::string(name) + "' must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                  std::to_string(x));
  return x;
}

bool bool_field(const ojson& o, const char* name, bool def) {
  const ojson* v = field(o, name);
  if (!v) return def;
  if (!v->is_boolean()) wrong_type(name, "a boolean", *v);
  return v->get<bool>();
}

// Message content: a string, or an array of {"type":"text","text":...} parts (joined).
std::string message_content(const ojson& m, size_t i) {
  const std::string p = "messages[" + std::to_string(i) + "].content";
  const ojson* c = field(m, "content");
  if (!c) return "";
  if (c->is_string()) return c->get<std::string>();
  if (!c->is_array()) wrong_type(p, "a string or an array of text parts", *c);
  std::string out;
  for (size_t j = 0; j < c->size(); ++j) {
    const ojson& part = (*c)[j];
    const std::string pp = p + "[" + std::to_string(j) + "]";
    if (!part.is_object()) wrong_type(pp, "an object", part);
    const ojson* t = field(part, "type");
    if (!t || !t->is_string() || t->get<std::string>() != "text")
      bad(pp + ".type", "only text content parts are supported");
    const ojson* tx = field(part, "text");
    if (!tx || !tx->is_string()) bad(pp + ".text", "'" + pp + ".text' must be a string");
    out += tx->get<std::string>();
  }
  return out;
}

}  // namespace

ApiRequest parse_request(std::string_view body, bool chat, const ApiLimits& lim) {
  if (body.size() > lim.max_body_bytes)
    throw ApiError(413, "request body of " + std::to_string(body.size()) + " bytes exceeds the limit of " +
                            std::to_string(lim.max_body_bytes));
  ojson o;
  try {
    o = parse_ordered_json(body, "request body");
  } catch (const std::exception& e) {
    bad("", std::string("could not parse the request body as JSON: ") + e.what());
  }
  if (!o.is_object()) bad("", std::string("the request body must be a JSON object, got ") + type_name(o));
  ApiRequest r;
  r.chat = chat;
  if (const ojson* m = field(o, "model")) {
    if (!m->is_string()) wrong_type("model", "a string", *m);
    r.model = m->get<std::string>();
  }
  if (chat) {
    const ojson* ms = field(o, "messages");
    if (!ms) bad("messages", "'messages' is required");
    if (!ms->is_array()) wrong_type("messages", "an array", *ms);
    if (ms->empty()) bad("messages", "'messages' must not be empty");
    if (ms->size() > lim.max_messages)
      bad("messages", "too many messages (" + std::to_string(ms->size()) + " > " + std::to_string(lim.max_messages) + ")");
    r.messages = ojson::array();
    for (size_t i = 0; i < ms->size(); ++i) {
      const ojson& m = (*ms)[i];
      const std::string p = "messages[" + std::to_string(i) + "]";
      if (!m.is_object()) wrong_type(p, "an object", m);
      const ojson* role = field(m, "role");
      if (!role || !role->is_string()) bad(p + ".role", "'" + p + ".role' must be a string");
      const std::string rs = role->get<std::string>();
      if (rs != "system" && rs != "user" && rs != "assistant" && rs != "developer" && rs != "tool")
        bad(p + ".role", "unknown role '" + json_brief(ojson(rs)) + "'");
      r.messages.push_back({{"role", rs == "developer" ? "system" : rs}, {"content", message_content(m, i)}});
    }
    if (const ojson* lp = field(o, "logprobs")) {
      if (!lp->is_boolean()) wrong_type("logprobs", "a boolean", *lp);
      r.logprobs = lp->get<bool>();
    }
    const int64_t top = int_in(o, "top_logprobs", 0, lim.max_top_logprobs, -1);
    if (top >= 0 && !r.logprobs) bad("top_logprobs", "'top_logprobs' needs 'logprobs': true");
    r.gen.top_logprobs = r.logprobs ? std::max<int64_t>(top, 0) : -1;
  } else {
    const ojson* p = field(o, "prompt");
    if (!p) bad("prompt", "'prompt' is required");
    // A string, a one-element array of a string, or token ids (an array of integers).
    const ojson* one = p;
    if (p->is_array() && p->size() == 1 && (*p)[0].is_string()) one = &(*p)[0];
    if (one->is_string()) {
      r.prompt_text = one->get<std::string>();
      if (r.prompt_text.empty()) bad("prompt", "'prompt' must not be empty");
    } else if (p->is_array() && !p->empty()) {
      for (const ojson& v : *p) {
        if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > std::numeric_limits<int32_t>::max())
          bad("prompt", "'prompt' must be a string or an array of token ids (non-negative integers)");
        r.prompt_ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
      }
    } else {
      bad("prompt", "'prompt' must be a non-empty string or an array of token ids");
    }
    const int64_t lp = int_in(o, "logprobs", 0, std::min<int64_t>(lim.max_top_logprobs, 5), -1);
    r.logprobs = lp >= 0;
    r.gen.top_logprobs = lp;
    r.echo = bool_field(o, "echo", false);
    if (r.echo) bad("echo", "'echo' is not supported");
  }
  const int64_t n = int_in(o, "n", 1, 1, 1);
  (void)n;
  r.gen.sampling.temperature = static_cast<float>(number_in(o, "temperature", 0.0, 2.0, 1.0));
  r.gen.sampling.top_p = static_cast<float>(number_in(o, "top_p", 0.0, 1.0, 1.0));
  if (r.gen.sampling.top_p <= 0.0f) bad("top_p", "'top_p' must be in (0, 1]");
  r.gen.sampling.top_k = int_in(o, "top_k", -1, std::numeric_limits<int32_t>::max(), 0);
  if (r.gen.sampling.top_k < 0) r.gen.sampling.top_k = 0;  // -1: all (vLLM's convention)
  r.has_seed = field(o, "seed") != nullptr;
  r.gen.seed = static_cast<uint64_t>(int_in(o, "seed", std::numeric_limits<int64_t>::min(),
                                            std::numeric_limits<int64_t>::max(), 0));
  int64_t max_tokens = int_in(o, "max_tokens", 1, lim.max_tokens, -1);
  const int64_t mct = int_in(o, "max_completion_tokens", 1, lim.max_tokens, -1);
  if (mct > 0) max_tokens = mct;
  r.gen.max_tokens = max_tokens > 0 ? max_tokens : std::min<int64_t>(chat ? 256 : 16, lim.max_tokens);
  if (const ojson* st = field(o, "stop")) {
    if (st->is_string()) {
      r.gen.stop.push_back(st->get<std::string>());
    } else if (st->is_array()) {
      if (st->size() > lim.max_stop)
        bad("stop", "at most " + std::to_string(lim.max_stop) + " stop sequences, got " + std::to_string(st->size()));
      for (const ojson& s : *st) {
        if (!s.is_string()) wrong_type("stop", "a string or an array of strings", s);
        r.gen.stop.push_back(s.get<std::string>());
      }
    } else {
      wrong_type("stop", "a string or an array of strings", *st);
    }
    for (const std::string& s : r.gen.stop)
      if (s.empty() || s.size() > 256) bad("stop", "stop sequences must be 1 to 256 bytes long");
  }
  r.stream = bool_field(o, "stream", false);
  if (const ojson* so = field(o, "stream_options")) {
    if (!so->is_object()) wrong_type("stream_options", "an object", *so);
    if (!r.stream) bad("stream_options", "'stream_options' needs 'stream': true");
    r.include_usage = bool_field(*so, "include_usage", false);
  }
  r.gen.ignore_eos = bool_field(o, "ignore_eos", false);  // vLLM's extension (benchmarks)
  return r;
}

ojson usage_json(int64_t prompt_tokens, int64_t completion_tokens, int64_t cached_tokens) {
  return {{"prompt_tokens", prompt_tokens},
          {"completion_tokens", completion_tokens},
          {"total_tokens", prompt_tokens + completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", cached_tokens}}}};
}

ojson logprobs_json(bool chat, const std::vector<GenToken>& toks, const std::vector<TokenText>& tok_text,
                    const std::vector<TokenText>& top_text, size_t text_offset0) {
  size_t ti = 0;
  if (chat) {
    ojson content = ojson::array();
    for (size_t i = 0; i < toks.size(); ++i) {
      ojson tops = ojson::array();
      for (auto& [id, lp] : toks[i].logprobs.top) {
        (void)id;
        const TokenText& t = top_text[ti++];
        tops.push_back({{"token", t.text}, {"logprob", lp}, {"bytes", t.bytes}});
      }
      content.push_back({{"token", tok_text[i].text},
                         {"logprob", toks[i].logprobs.logprob},
                         {"bytes", tok_text[i].bytes},
                         {"top_logprobs", tops}});
    }
    return {{"content", content}};
  }
  ojson tokens = ojson::array(), lps = ojson::array(), tops = ojson::array(), offs = ojson::array();
  size_t off = text_offset0;
  for (size_t i = 0; i < toks.size(); ++i) {
    tokens.push_back(tok_text[i].text);
    lps.push_back(toks[i].logprobs.logprob);
    ojson m = ojson::object();
    for (auto& [id, lp] : toks[i].logprobs.top) {
      (void)id;
      m[top_text[ti++].text] = lp;
    }
    tops.push_back(m);
    offs.push_back(off);
    off += tok_text[i].text.size();
  }
  return {{"tokens", tokens}, {"token_logprobs", lps}, {"top_logprobs", tops}, {"text_offset", offs}};
}

ojson response_json(const ApiRequest& r, const ApiResult& res, const std::string& id, int64_t created,
                    const std::string& model) {
  ojson choice;
  choice["index"] = 0;
  const ojson lp = r.logprobs ? logprobs_json(r.chat, res.tokens, res.token_text, res.top_text_flat, 0) : ojson(nullptr);
  if (r.chat) {
    choice["message"] = {{"role", "assistant"}, {"content", res.text}};
    choice["logprobs"] = lp;
  } else {
    choice["text"] = res.text;
    choice["logprobs"] = lp;
  }
  choice["finish_reason"] = res.finish_reason;
  return {{"id", id},
          {"object", r.chat ? "chat.completion" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", ojson::array({choice})},
          {"usage", usage_json(res.prompt_tokens, res.completion_tokens, res.cached_tokens)}};
}

ojson chunk_json(const ApiRequest& r, const std::string& id, int64_t created, const std::string& model,
                 const std::string& delta, bool first, const std::vector<GenToken>& toks,
                 const std::vector<TokenText>& tok_text, const std::vector<TokenText>& top_text,
                 const char* finish_reason) {
  ojson choice;
  choice["index"] = 0;
  if (r.chat) {
    ojson d = ojson::object();
    if (first) d["role"] = "assistant";
    if (!delta.empty() || first) d["content"] = delta;
    choice["delta"] = d;
  } else {
    choice["text"] = delta;
  }
  choice["logprobs"] = r.logprobs && !toks.empty() ? logprobs_json(r.chat, toks, tok_text, top_text, 0) : ojson(nullptr);
  choice["finish_reason"] = finish_reason ? ojson(finish_reason) : ojson(nullptr);
  return {{"id", id},
          {"object", r.chat ? "chat.completion.chunk" : "text_completion"},
          {"created", created},
          {"model", model},
          {"choices", ojson::array({choice})}};
}

}  // namespace moe
