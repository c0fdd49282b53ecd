// error.cpp — formatting helpers behind MOE_CHECK / MOE_ASSERT.
#include "core/error.h"

#include <cstdarg>
#include <vector>

namespace moe {

std::string strformat(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  va_list ap2;
  va_copy(ap2, ap);
  int n = std::vsnprintf(nullptr, 0, fmt, ap);
  va_end(ap);
  std::string out;
  if (n > 0) {
    out.resize(static_cast<size_t>(n) + 1);
    std::vsnprintf(out.data(), out.size(), fmt, ap2);
    out.resize(static_cast<size_t>(n));
  }
  va_end(ap2);
  return out;
}

void throw_error(const std::string& msg) { throw Error(msg); }

void throw_bug(const char* cond, const char* file, int line) {
  throw Error(strformat("internal error (this is a bug): %s at %s:%d", cond, file, line));
}

}  // namespace moe
