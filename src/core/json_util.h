// json_util.h — the one JSON entry point: parsing text with a nesting limit and errors that name
// the source, plus bounded rendering of values for error messages.
//
// nlohmann's parser is iterative, but copying, comparing and dumping a value recurse once per
// nesting level, and so does every walker of ours (Jinja's context conversion, ...). Text that
// nests deeper than the limit is refused before it is parsed, so no deep value ever exists.
#pragma once
#include <nlohmann/json.hpp>
#include <string>
#include <string_view>

namespace moe {

// Deepest nesting of arrays/objects any JSON input may have. Real files nest < 20 levels
// (tokenizer.json ~6, chat messages with tool JSON schemas ~15).
constexpr int kMaxJsonDepth = 128;

// Parses `text`; throws moe::Error "<what>: malformed JSON: <parser message>" on a syntax error
// and "<what>: JSON nests deeper than <limit> levels" beyond max_depth.
nlohmann::json parse_json(std::string_view text, const std::string& what, int max_depth = kMaxJsonDepth);
// The same, keeping object key order (chat messages, template contexts).
nlohmann::ordered_json parse_ordered_json(std::string_view text, const std::string& what,
                                          int max_depth = kMaxJsonDepth);
// parse_json, then "<what>: expected a JSON object, got <type>" when the top level is not an object.
nlohmann::json parse_json_object(std::string_view text, const std::string& what, int max_depth = kMaxJsonDepth);

// Throws "<what>: JSON nests deeper than <max_depth> levels" when `text` (JSON, possibly invalid)
// opens more than max_depth arrays/objects at once. Linear, no allocation.
void check_json_text_depth(std::string_view text, const std::string& what, int max_depth = kMaxJsonDepth);
// The same check for an already-built value (iterative: safe on any depth).
void check_json_depth(const nlohmann::json& j, const std::string& what, int max_depth = kMaxJsonDepth);
void check_json_depth(const nlohmann::ordered_json& j, const std::string& what, int max_depth = kMaxJsonDepth);

// A short rendering of a value for error messages: at most max_chars characters (then "..."),
// never throws (invalid UTF-8 is replaced). Values deeper than kMaxJsonDepth print as "<array>"/
// "<object>" rather than recursing.
std::string json_brief(const nlohmann::json& j, size_t max_chars = 40);

// The parser's message without nlohmann's "[json.exception.parse_error.101] " prefix.
std::string json_error_text(const std::exception& e);

}  // namespace moe
