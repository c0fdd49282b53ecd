// chat_data.cpp — chat and prompt/completion examples with answer-only labels (see chat_data.h).
#include "train/chat_data.h"

#include "core/error.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "train/data.h"

namespace moe {
namespace {

void append(LabeledTokens& out, const Tokenizer& tok, std::string_view text, bool labeled) {
  if (text.empty()) return;
  const std::vector<int32_t> ids = tok.encode(text, false);
  out.ids.insert(out.ids.end(), ids.begin(), ids.end());
  for (int32_t id : ids) out.labels.push_back(labeled ? id : kIgnoreLabel);
}

}  // namespace

LabeledTokens encode_chat(const nlohmann::ordered_json& messages, const ChatTemplate& tmpl, const Tokenizer& tok,
                          const std::string& where, ChatStats* stats) {
  MOE_CHECK(messages.is_array() && !messages.empty(), "%s: \"messages\" must be a non-empty list", where.c_str());
  int64_t last_assistant = -1;
  for (size_t i = 0; i < messages.size(); ++i) {
    const auto& m = messages[i];
    MOE_CHECK(m.is_object(), "%s: messages[%zu] must be an object with \"role\" and \"content\"", where.c_str(), i);
    MOE_CHECK(m.contains("role") && m["role"].is_string(), "%s: messages[%zu].role must be a string", where.c_str(), i);
    MOE_CHECK(m.contains("content") && m["content"].is_string(), "%s: messages[%zu].content must be a string",
              where.c_str(), i);
    if (m["role"] == "assistant") last_assistant = int64_t(i);
  }
  MOE_CHECK(last_assistant >= 0, "%s: the conversation has no assistant message (nothing to learn)", where.c_str());
  auto head = [&](int64_t n) {
    nlohmann::ordered_json h = nlohmann::ordered_json::array();
    for (int64_t i = 0; i < n; ++i) h.push_back(messages[size_t(i)]);
    return h;
  };
  const std::string full = tmpl.apply(head(last_assistant + 1), false);
  // Assistant spans [begin, end) in `full`, in order.
  std::vector<std::pair<size_t, size_t>> spans;
  int64_t turns = 0;
  for (int64_t i = 0; i <= last_assistant; ++i) {
    if (messages[size_t(i)]["role"] != "assistant") continue;
    ++turns;
    const std::string p = tmpl.apply(head(i), true);
    const std::string q = i == last_assistant ? full : tmpl.apply(head(i + 1), false);
    if (q.size() <= p.size() || q.compare(0, p.size(), p) != 0 || full.compare(0, q.size(), q) != 0) continue;
    if (!spans.empty() && p.size() < spans.back().second) continue;
    spans.emplace_back(p.size(), q.size());
  }
  MOE_CHECK(!spans.empty(),
            "%s: the chat template does not render the conversation incrementally (the text before the last "
            "assistant reply with the generation prompt is not a prefix of the full rendering), so the assistant "
            "tokens cannot be found",
            where.c_str());
  LabeledTokens out;
  size_t pos = 0;
  for (auto [b, e] : spans) {
    append(out, tok, std::string_view(full).substr(pos, b - pos), false);
    append(out, tok, std::string_view(full).substr(b, e - b), true);
    pos = e;
  }
  append(out, tok, std::string_view(full).substr(pos), false);
  if (stats) {
    ++stats->examples;
    stats->assistant_turns += turns;
    stats->labeled_turns += int64_t(spans.size());
    stats->tokens += int64_t(out.ids.size());
    for (int32_t l : out.labels) stats->labeled_tokens += l != kIgnoreLabel;
  }
  return out;
}

LabeledTokens encode_prompt_completion(const std::string& prompt, const std::string& completion, const Tokenizer& tok,
                                       ChatStats* stats) {
  LabeledTokens out;
  append(out, tok, prompt, false);
  append(out, tok, completion, true);
  if (const auto eos = tok.eos_id()) {
    out.ids.push_back(*eos);
    out.labels.push_back(*eos);
  }
  if (stats) {
    ++stats->examples;
    ++stats->assistant_turns;
    ++stats->labeled_turns;
    stats->tokens += int64_t(out.ids.size());
    for (int32_t l : out.labels) stats->labeled_tokens += l != kIgnoreLabel;
  }
  return out;
}

}  // namespace moe
