// file_util.cpp — see file_util.h.
#include "core/file_util.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>

#include "core/error.h"

namespace moe {

std::string read_file(const std::string& path, size_t max_bytes) {
  const char* p = path.c_str();
  const int fd = ::open(p, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    const int err = errno;
    MOE_FAIL("%s: cannot open: %s", p, std::strerror(err));
  }
  struct Closer {
    int fd;
    ~Closer() { ::close(fd); }
  } closer{fd};
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    const int err = errno;
    MOE_FAIL("%s: cannot stat: %s", p, std::strerror(err));
  }
  MOE_CHECK(!S_ISDIR(st.st_mode), "%s: is a directory, expected a file", p);
  MOE_CHECK(S_ISREG(st.st_mode), "%s: not a regular file", p);
  const uint64_t size = static_cast<uint64_t>(st.st_size);
  MOE_CHECK(size <= max_bytes, "%s: file is %llu bytes, above the limit of %zu bytes for this kind of file", p,
            static_cast<unsigned long long>(size), max_bytes);
  std::string out(static_cast<size_t>(size), '\0');
  size_t got = 0;
  while (got < out.size()) {
    const ssize_t r = ::read(fd, out.data() + got, out.size() - got);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0) {
      const int err = errno;
      MOE_FAIL("%s: read failed: %s", p, std::strerror(err));
    }
    if (r == 0) break;  // the file shrank while we read it
    got += static_cast<size_t>(r);
  }
  out.resize(got);
  return out;
}

bool is_gguf_path(const std::string& path) {
  return path.size() > 5 && path.compare(path.size() - 5, 5, ".gguf") == 0;
}

bool is_regular_file(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

bool is_directory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

}  // namespace moe
