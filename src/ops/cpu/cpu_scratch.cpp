// cpu_scratch.cpp — per-thread scratch arrays (see cpu_scratch.h).
#include "ops/cpu/cpu_scratch.h"

#include <algorithm>
#include <cstdlib>
#include <new>

#include "core/error.h"

namespace moe {
namespace cpu {
namespace {

struct Buffer {
  void* p = nullptr;
  size_t cap = 0;
  ~Buffer() { std::free(p); }
};

struct ThreadScratch {
  Buffer slot[static_cast<int>(Scratch::kCount)];
};

}  // namespace

void* scratch_bytes(Scratch s, size_t bytes) {
  thread_local ThreadScratch ts;
  Buffer& b = ts.slot[static_cast<int>(s)];
  if (bytes > b.cap) {
    // Geometric growth: a buffer that grows by a row per token (attention scores) reallocates
    // O(log n) times over a generation, not once per token.
    const size_t cap = std::max<size_t>({bytes, b.cap * 2, 256});
    void* p = std::aligned_alloc(16, (cap + 15) / 16 * 16);
    MOE_CHECK(p != nullptr, "out of host memory: %zu bytes of kernel scratch", cap);
    std::free(b.p);
    b.p = p;
    b.cap = cap;
  }
  return b.p;
}

}  // namespace cpu
}  // namespace moe
