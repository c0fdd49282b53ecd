// chat_template.h — chat templates of HF tokenizer directories: tokenizer_config.json's
// "chat_template" (a string, or a list of {name, template} where "default" is used) or a
// chat_template.jinja file, rendered by the Jinja subset in jinja.h.
//
// The context is what transformers' apply_chat_template passes: messages, add_generation_prompt,
// the special tokens of tokenizer_config.json (bos_token, eos_token, unk_token, pad_token, as
// strings, when set), then the keys of `extra` (tools, enable_thinking, ...).
#pragma once
#include <string>

#include <nlohmann/json.hpp>

#include "tokenizer/jinja.h"

namespace moe {

class ChatTemplate {
 public:
  // Throws moe::Error when the directory has no chat template or it does not parse.
  static ChatTemplate from_dir(const std::string& dir);
  ChatTemplate(const std::string& source, const nlohmann::json& tokenizer_config);

  std::string apply(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                    const nlohmann::ordered_json& extra = nlohmann::ordered_json::object()) const;

 private:
  JinjaTemplate tmpl_;
  nlohmann::ordered_json special_;  // special-token strings for the context
};

}  // namespace moe
