// file_util.h — the one whole-file reader of the library.
//
// Every file a user hands us (config.json, tokenizer.json, safetensors index, chat templates,
// price lists) is read through read_file(), which refuses directories, special files and files
// larger than the caller's limit before allocating, and reports every failure as a moe::Error
// naming the path and the reason.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace moe {

// Default cap for small JSON/text inputs (config.json, tokenizer_config.json, price lists, index
// files, chat templates): far above any real one, far below memory trouble.
constexpr size_t kMaxTextFileBytes = size_t(64) << 20;  // 64 MiB
// tokenizer.json files reach ~30 MB (gpt-oss, DeepSeek-V3); allow a generous margin.
constexpr size_t kMaxTokenizerFileBytes = size_t(512) << 20;  // 512 MiB

// Reads the whole regular file at `path`. Throws moe::Error "PATH: cannot open: <reason>",
// "PATH: is a directory", "PATH: not a regular file", or "PATH: file is N bytes, above the limit
// of M bytes" (checked before reading).
std::string read_file(const std::string& path, size_t max_bytes = kMaxTextFileBytes);

// True when `path` names an existing regular file (no exceptions; false on any error).
bool is_regular_file(const std::string& path);
// True when `path` names an existing directory (no exceptions; false on any error).
bool is_directory(const std::string& path);
// True when `path` ends in ".gguf" (a GGUF model file where a model or tokenizer directory may be).
bool is_gguf_path(const std::string& path);

}  // namespace moe
