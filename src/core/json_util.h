// json_util.h — parsing JSON text with errors that name the source.
#pragma once
#include <nlohmann/json.hpp>
#include <string>

namespace moe {

// Parses `text`; throws moe::Error "<what>: malformed JSON: <parser message>" on a syntax error
// and "<what>: expected a JSON object, got <type>" when the top level is not an object.
nlohmann::json parse_json_object(const std::string& text, const std::string& what);

// The parser's message without nlohmann's "[json.exception.parse_error.101] " prefix.
std::string json_error_text(const std::exception& e);

}  // namespace moe
