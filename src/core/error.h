// error.h — the one exception type of MoE Engine and the checks that throw it.
//
// Library code never exits; it throws moe::Error with a message naming the file, field or value
// at fault. The CLI (and later the server) catch it at their boundary. Two kinds of check:
//   MOE_CHECK(cond, fmt, ...)  bad user input: "expected …, got …"
//   MOE_ASSERT(cond)           internal invariant: the message says it is a bug.
#pragma once
#include <cstdio>
#include <stdexcept>
#include <string>

namespace moe {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& msg) : std::runtime_error(msg) {}
};

// printf-style formatting into a std::string.
std::string strformat(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

[[noreturn]] void throw_error(const std::string& msg);
[[noreturn]] void throw_bug(const char* cond, const char* file, int line);

}  // namespace moe

#define MOE_CHECK(cond, ...)                                      \
  do {                                                            \
    if (!(cond)) ::moe::throw_error(::moe::strformat(__VA_ARGS__)); \
  } while (0)

#define MOE_FAIL(...) ::moe::throw_error(::moe::strformat(__VA_ARGS__))

#define MOE_ASSERT(cond)                                              \
  do {                                                                \
    if (!(cond)) ::moe::throw_bug(#cond, __FILE__, __LINE__);         \
  } while (0)
