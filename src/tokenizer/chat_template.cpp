// chat_template.cpp — see chat_template.h.
#include "tokenizer/chat_template.h"

#include <fstream>
#include <sstream>

#include "core/error.h"

namespace moe {
namespace {

std::string slurp(const std::string& path, bool* ok) {
  std::ifstream f(path, std::ios::binary);
  *ok = f.good();
  std::stringstream ss;
  if (*ok) ss << f.rdbuf();
  return ss.str();
}

}  // namespace

ChatTemplate ChatTemplate::from_dir(const std::string& dir) {
  bool ok;
  nlohmann::json cfg = nlohmann::json::object();
  const std::string cpath = dir + "/tokenizer_config.json";
  const std::string text = slurp(cpath, &ok);
  if (ok) {
    try {
      cfg = nlohmann::json::parse(text);
    } catch (const nlohmann::json::exception& e) {
      MOE_FAIL("%s: malformed JSON: %s", cpath.c_str(), e.what());
    }
  }
  std::string source;
  if (cfg.contains("chat_template") && cfg["chat_template"].is_string()) {
    source = cfg["chat_template"].get<std::string>();
  } else if (cfg.contains("chat_template") && cfg["chat_template"].is_array()) {
    for (const auto& t : cfg["chat_template"])
      if (t.is_object() && t.value("name", "") == "default" && t.contains("template") && t["template"].is_string())
        source = t["template"].get<std::string>();
    MOE_CHECK(!source.empty(), "%s: chat_template list has no \"default\" entry", cpath.c_str());
  } else {
    source = slurp(dir + "/chat_template.jinja", &ok);
    MOE_CHECK(ok, "%s: no chat template (no \"chat_template\" in tokenizer_config.json, no chat_template.jinja)",
              dir.c_str());
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
  nlohmann::ordered_json ctx = nlohmann::ordered_json::object();
  ctx["messages"] = messages;
  ctx["add_generation_prompt"] = add_generation_prompt;
  for (auto it = special_.begin(); it != special_.end(); ++it) ctx[it.key()] = it.value();
  if (extra.is_object())
    for (auto it = extra.begin(); it != extra.end(); ++it) ctx[it.key()] = it.value();
  return tmpl_.render(ctx);
}

}  // namespace moe
