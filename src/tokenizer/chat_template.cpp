// chat_template.cpp — see chat_template.h.
#include "tokenizer/chat_template.h"

#include "core/error.h"
#include "core/file_util.h"
#include "core/json_util.h"
#include "tokenizer/gguf_vocab.h"

namespace moe {

ChatTemplate ChatTemplate::from_dir(const std::string& dir) {
  if (is_gguf_path(dir)) {
    const GgufVocab v = load_gguf_vocab(dir);
    MOE_CHECK(!v.chat_template.empty(), "%s: no chat template (no tokenizer.chat_template in the GGUF)", dir.c_str());
    try {
      return ChatTemplate(v.chat_template, gguf_vocab_config(v));
    } catch (const Error& e) {
      MOE_FAIL("%s: %s", dir.c_str(), e.what());
    }
  }
  nlohmann::json cfg = nlohmann::json::object();
  const std::string cpath = dir + "/tokenizer_config.json", jpath = dir + "/chat_template.jinja";
  if (is_regular_file(cpath)) cfg = parse_json(read_file(cpath), cpath);
  std::string source;
  if (cfg.contains("chat_template") && cfg["chat_template"].is_string()) {
    source = cfg["chat_template"].get<std::string>();
  } else if (cfg.contains("chat_template") && cfg["chat_template"].is_array()) {
    for (const auto& t : cfg["chat_template"])
      if (t.is_object() && t.contains("name") && t["name"] == "default" && t.contains("template") &&
          t["template"].is_string())
        source = t["template"].get<std::string>();
    MOE_CHECK(!source.empty(), "%s: chat_template list has no \"default\" entry", cpath.c_str());
  } else {
    MOE_CHECK(is_regular_file(jpath),
              "%s: no chat template (no \"chat_template\" in tokenizer_config.json, no chat_template.jinja)",
              dir.c_str());
    source = read_file(jpath);
  }
  try {
    return ChatTemplate(source, cfg);
  } catch (const Error& e) {
    MOE_FAIL("%s: %s", dir.c_str(), e.what());
  }
}

ChatTemplate::ChatTemplate(const std::string& source, const nlohmann::json& cfg)
    : tmpl_(source), special_(nlohmann::ordered_json::object()) {
  for (const char* key : {"bos_token", "eos_token", "unk_token", "pad_token"}) {
    if (!cfg.is_object() || !cfg.contains(key)) continue;
    const auto& v = cfg[key];
    if (v.is_string()) special_[key] = v.get<std::string>();
    else if (v.is_object() && v.contains("content") && v["content"].is_string()) special_[key] = v["content"].get<std::string>();
  }
}

std::string ChatTemplate::apply(const nlohmann::ordered_json& messages, bool add_generation_prompt,
                                const nlohmann::ordered_json& extra) const {
  MOE_CHECK(messages.is_array(), "chat template: messages must be a JSON array, got %s", messages.type_name());
  // Copying a value recurses once per level: refuse deep ones before the copies below.
  check_json_depth(messages, "chat template: messages");
  check_json_depth(extra, "chat template: extra context");
  nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
  ctx["messages"] = messages;
  ctx["add_generation_prompt"] = add_generation_prompt;
  for (auto it = special_.begin(); it != special_.end(); ++it) ctx[it.key()] = it.value();
  if (extra.is_object())
    for (auto it = extra.begin(); it != extra.end(); ++it) ctx[it.key()] = it.value();
  return tmpl_.render(ctx);
}

}  // namespace moe
