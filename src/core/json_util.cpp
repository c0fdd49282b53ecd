// json_util.cpp — JSON parsing with source-naming errors.
#include "core/json_util.h"

#include "core/error.h"

namespace moe {

std::string json_error_text(const std::exception& e) {
  std::string s = e.what();  // "[json.exception.parse_error.101] parse error at ..."
  if (!s.empty() && s[0] == '[') {
    size_t close = s.find("] ");
    if (close != std::string::npos) s.erase(0, close + 2);
  }
  return s;
}

nlohmann::json parse_json_object(const std::string& text, const std::string& what) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    MOE_FAIL("%s: malformed JSON: %s", what.c_str(), json_error_text(e).c_str());
  }
  MOE_CHECK(j.is_object(), "%s: expected a JSON object, got %s", what.c_str(), j.type_name());
  return j;
}

}  // namespace moe
