// json_util.cpp — see json_util.h.
#include "core/json_util.h"

#include <utility>
#include <vector>

#include "core/error.h"

namespace moe {

namespace {

template <class J>
void check_depth_impl(const J& root, const std::string& what, int max_depth) {
  // Explicit stack of (value, depth): no recursion whatever the input.
  std::vector<std::pair<const J*, int>> stack;
  stack.emplace_back(&root, 1);
  while (!stack.empty()) {
    auto [j, d] = stack.back();
    stack.pop_back();
    if (!j->is_structured()) continue;
    MOE_CHECK(d <= max_depth, "%s: JSON nests deeper than %d levels", what.c_str(), max_depth);
    for (const J& kid : *j)
      if (kid.is_structured()) stack.emplace_back(&kid, d + 1);
  }
}

template <class J>
J parse_impl(std::string_view text, const std::string& what, int max_depth) {
  check_json_text_depth(text, what, max_depth);
  try {
    return J::parse(text.begin(), text.end());
  } catch (const nlohmann::json::exception& e) {
    MOE_FAIL("%s: malformed JSON: %s", what.c_str(), json_error_text(e).c_str());
  }
}

}  // namespace

std::string json_error_text(const std::exception& e) {
  std::string s = e.what();  // "[json.exception.parse_error.101] parse error at ..."
  if (!s.empty() && s[0] == '[') {
    size_t close = s.find("] ");
    if (close != std::string::npos) s.erase(0, close + 2);
  }
  return s;
}

void check_json_text_depth(std::string_view text, const std::string& what, int max_depth) {
  int depth = 0;
  bool in_string = false;
  for (size_t i = 0; i < text.size(); ++i) {
    const char c = text[i];
    if (in_string) {
      if (c == '\\') ++i;  // skip the escaped character
      else if (c == '"') in_string = false;
      continue;
    }
    if (c == '"') {
      in_string = true;
    } else if (c == '[' || c == '{') {
      MOE_CHECK(++depth <= max_depth, "%s: JSON nests deeper than %d levels (at byte %zu)", what.c_str(), max_depth,
                i);
    } else if ((c == ']' || c == '}') && depth > 0) {
      --depth;
    }
  }
}

void check_json_depth(const nlohmann::json& j, const std::string& what, int max_depth) {
  check_depth_impl(j, what, max_depth);
}
void check_json_depth(const nlohmann::ordered_json& j, const std::string& what, int max_depth) {
  check_depth_impl(j, what, max_depth);
}

nlohmann::json parse_json(std::string_view text, const std::string& what, int max_depth) {
  return parse_impl<nlohmann::json>(text, what, max_depth);
}

nlohmann::ordered_json parse_ordered_json(std::string_view text, const std::string& what, int max_depth) {
  return parse_impl<nlohmann::ordered_json>(text, what, max_depth);
}

nlohmann::json parse_json_object(std::string_view text, const std::string& what, int max_depth) {
  nlohmann::json j = parse_json(text, what, max_depth);
  MOE_CHECK(j.is_object(), "%s: expected a JSON object, got %s", what.c_str(), j.type_name());
  return j;
}

std::string json_brief(const nlohmann::json& j, size_t max_chars) {
  std::string s;
  try {
    check_json_depth(j, "value", kMaxJsonDepth);
    s = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
  } catch (const std::exception&) {
    s = std::string("<") + j.type_name() + ">";
  }
  if (s.size() > max_chars) s = s.substr(0, max_chars > 3 ? max_chars - 3 : 0) + "...";
  return s;
}

}  // namespace moe
