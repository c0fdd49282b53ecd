// chat_data.h — supervised fine-tuning examples: chat conversations rendered with the model's
// chat template, and prompt/completion pairs, tokenized with labels on the answer only.
//
// Chat ({"messages":[{"role","content"},…]}): the conversation is rendered up to its last
// assistant message. Assistant turn i's tokens are found by rendering incrementally: p = the
// messages before it with the generation prompt, q = the messages through it; the text
// q[len(p):] (the reply and the template's end-of-turn marker) is the turn, when the full
// rendering starts with q. Templates that rewrite earlier turns once later ones follow (Qwen3
// drops the reasoning of earlier replies) leave those earlier turns unlabeled: they are counted
// and reported (ChatStats), never silently labeled wrong. Pieces are tokenized one after
// another (add_special_tokens = false), so a label boundary is a token boundary.
//
// Prompt/completion ({"prompt","completion"} strings): prompt tokens unlabeled, completion
// tokens and EOS labeled.
//
// Labels are HF's: the id itself on scored tokens, kIgnoreLabel elsewhere (unshifted).
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

namespace moe {

class ChatTemplate;
class Tokenizer;

struct LabeledTokens {
  std::vector<int32_t> ids, labels;
};

struct ChatStats {
  int64_t examples = 0;
  int64_t assistant_turns = 0;   // assistant messages seen
  int64_t labeled_turns = 0;     // of them, labeled
  int64_t labeled_tokens = 0;
  int64_t tokens = 0;
};

// One chat example; `where` ("FILE:LINE") names it in errors (a missing or malformed messages
// list, a role or content that is not a string, no assistant message).
LabeledTokens encode_chat(const nlohmann::ordered_json& messages, const ChatTemplate& tmpl, const Tokenizer& tok,
                          const std::string& where, ChatStats* stats);

// One prompt/completion example (EOS appended to the completion when the tokenizer has one).
LabeledTokens encode_prompt_completion(const std::string& prompt, const std::string& completion, const Tokenizer& tok,
                                       ChatStats* stats);

}  // namespace moe
