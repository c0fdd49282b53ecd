// memory.cpp — tracked allocation and the per-category memory report.
#include "core/memory.h"

#include <omp.h>

#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <mutex>

#include "core/error.h"
#include "core/sanitizer.h"

namespace moe {
namespace {

struct Tracker {
  std::atomic<int64_t> current[kNumDevices][kNumMemCategories] = {};
  std::atomic<int64_t> total[kNumDevices] = {};
  std::mutex mu;  // guards peaks
  int64_t peak[kNumDevices][kNumMemCategories] = {};
  int64_t peak_total[kNumDevices] = {};
  DeviceHooks hooks[kNumDevices];
};

Tracker& tracker() {
  static Tracker t;
  return t;
}

// Host blocks, once freed, are kept and reused: a training step or a decode step allocates the
// same sizes every time, so the steady state calls neither malloc nor the kernel.
//   Small blocks (< kMapThreshold, from malloc): kept up to kMaxKeptSmallBytes in all and reused
//     for a request of exactly their size; never flushed by a miss (a flush would drop blocks the
//     rest of the step needs, and the misses that follow would repeat every step).
//   Large blocks (mapped directly) form one pool of mapped address ranges. A request takes the
//     kept range of exactly its size, else the smallest kept range larger than it, from whose
//     front it is carved (the rest stays kept); a freed range merges with kept ranges adjacent
//     to it. Only when no kept range is large enough is a new one mapped, made as far as they
//     go of kept ranges whose pages are moved into it (map_gathering_kept); then kept ranges are
//     returned to the system (oldest first, the last one only in part) until live + kept large
//     bytes fit under the high-water mark of live large bytes: the resident peak is never above
//     that of unmapping each block when it is freed.
//   Why carve: the memory of a training step's forward peak (activations, the logits chunk, the
//   LM head's gradient) is free again during its backward, whose temporaries (the experts'
//   gradients, the embedding's) have other sizes. Kept only for exact sizes, those had to be
//   unmapped under the mark and mapped anew every step: 145 MiB a step at the Mixtral shape of
//   bench/train_vs_torch.sh, and a fresh page costs more than its zeroing in a VM whose host
//   takes back freed memory (the embedding's 62.5 MiB gradient 70 ms a step). Carved from the
//   forward's freed ranges, or gathered from them where none is large enough alone, no page is
//   faulted in after the first step.
// The table of kept ranges is a fixed array (keeping a block must not allocate); when it is full
// a freed block goes back to the system at once. Sanitizer builds keep nothing, so that ASan sees
// every use after free.

constexpr size_t kMapThreshold = size_t(256) << 10;
constexpr size_t kMapGranule = size_t(64) << 10;
// New mappings of this size or more for a training step's temporaries (gradients, activations,
// scratch) ask for transparent huge pages: a fresh 64 MiB gradient faulted in 4 KiB pages cost
// 36 ms a step (Mixtral-shaped training, step 0.92 -> 0.77 s with them). Not for weights, KV
// cache or optimizer state, which are faulted once: bf16 decode measured slower from huge-page
// weights (55 vs 64 tokens/s).
constexpr size_t kHugeMin = size_t(4) << 20;
constexpr size_t kMaxKeptBlocks = 4096;
constexpr size_t kMaxKeptSmallBytes = size_t(32) << 20;

struct KeptBlock {
  size_t size;
  void* p;
  bool mapped;  // a range of a mapping (any size once carved), else a malloc block
};

struct BlockCache {
  std::mutex mu;
  KeptBlock kept[kMaxKeptBlocks];  // oldest first
  size_t n_kept = 0;
  size_t small_bytes = 0;  // kept bytes of small blocks
  size_t large_live = 0, large_kept = 0, large_high = 0;  // mapped bytes: in use, kept, peak in use
  std::atomic<int64_t> system_allocs{0};
};

BlockCache& block_cache() {
  static BlockCache c;
  return c;
}

// Host block sizes: 64-byte multiples; mapped ones whole granules.
size_t host_block_size(size_t n) {
  return n >= kMapThreshold ? (n + kMapGranule - 1) / kMapGranule * kMapGranule : (n + 63) / 64 * 64;
}

bool is_large(size_t size) { return size >= kMapThreshold; }

char* bytes_at(void* p) { return static_cast<char*>(p); }

void take_kept(BlockCache& c, size_t i) {
  std::memmove(&c.kept[i], &c.kept[i + 1], (c.n_kept - i - 1) * sizeof(KeptBlock));
  --c.n_kept;
}

void system_free(const KeptBlock& b) {
  if (b.mapped)
    ::munmap(b.p, b.size);
  else
    std::free(b.p);
}

// Returns kept blocks to the system, oldest first: every one (mapped_only false), or mapped
// ranges until `bytes` of them went back, the last range only in part (its tail). Caller holds
// c.mu.
void release_kept(BlockCache& c, bool mapped_only, size_t bytes = SIZE_MAX) {
  size_t w = 0, freed = 0;
  for (size_t i = 0; i < c.n_kept; ++i) {
    KeptBlock b = c.kept[i];
    if ((mapped_only && !b.mapped) || freed >= bytes) {
      c.kept[w++] = b;
      continue;
    }
    if (!b.mapped) {
      c.small_bytes -= b.size;
      system_free(b);
      continue;
    }
    const size_t want = bytes == SIZE_MAX ? b.size : (bytes - freed + kMapGranule - 1) / kMapGranule * kMapGranule;
    if (want < b.size) {  // the tail goes back, the front stays kept
      ::munmap(bytes_at(b.p) + (b.size - want), want);
      b.size -= want;
      c.large_kept -= want;
      freed += want;
      c.kept[w++] = b;
      continue;
    }
    c.large_kept -= b.size;
    freed += b.size;
    system_free(b);
  }
  c.n_kept = w;
}

// A kept mapped range for `size` bytes (an exact one, else carved from the front of the smallest
// larger one), or null. Caller holds c.mu.
void* carve_kept(BlockCache& c, size_t size) {
  size_t best = SIZE_MAX;
  for (size_t i = c.n_kept; i-- > 0;) {  // newest first: likeliest still in cache
    const KeptBlock& b = c.kept[i];
    if (!b.mapped || b.size < size) continue;
    if (b.size == size) {
      best = i;
      break;
    }
    if (best == SIZE_MAX || b.size < c.kept[best].size) best = i;
  }
  if (best == SIZE_MAX) return nullptr;
  KeptBlock& b = c.kept[best];
  void* p = b.p;
  if (b.size == size) {
    take_kept(c, best);
  } else {
    b.p = bytes_at(b.p) + size;
    b.size -= size;
  }
  c.large_kept -= size;
  c.large_live += size;
  c.large_high = std::max(c.large_high, c.large_live);
  return p;
}

// A new mapping of `size` bytes for a request no kept range fits. Its front is made of kept
// ranges, oldest first, moved into it whole or in part (mremap moves their resident pages: no
// fault, no zeroing, no copy); the rest is fresh. Caller holds c.mu.
void* map_gathering_kept(BlockCache& c, size_t size, bool huge) {
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) return nullptr;
  if (huge && size >= kHugeMin) ::madvise(p, size, MADV_HUGEPAGE);
  size_t off = 0;
  for (size_t i = 0; i < c.n_kept && off < size;) {
    KeptBlock& b = c.kept[i];
    if (!b.mapped) {
      ++i;
      continue;
    }
    const size_t n = std::min(b.size, size - off);
    if (::mremap(b.p, n, n, MREMAP_MAYMOVE | MREMAP_FIXED, bytes_at(p) + off) == MAP_FAILED) break;
    off += n;
    c.large_kept -= n;
    if (n == b.size) {
      take_kept(c, i);
    } else {
      b.p = bytes_at(b.p) + n;
      b.size -= n;
      ++i;
    }
  }
  return p;
}

void* host_alloc(size_t size, bool huge) {
  BlockCache& c = block_cache();
  if (!MOE_ASAN) {
    std::lock_guard<std::mutex> lock(c.mu);
    if (is_large(size)) {
      if (void* p = carve_kept(c, size)) return p;
      c.system_allocs.fetch_add(1, std::memory_order_relaxed);
      void* p = map_gathering_kept(c, size, huge);
      if (!p) return nullptr;
      c.large_live += size;
      c.large_high = std::max(c.large_high, c.large_live);
      if (c.large_live + c.large_kept > c.large_high)
        release_kept(c, /*mapped_only=*/true, c.large_live + c.large_kept - c.large_high);
      return p;
    } else {
      for (size_t i = c.n_kept; i-- > 0;) {  // newest first: likeliest still in cache
        if (c.kept[i].mapped || c.kept[i].size != size) continue;
        void* p = c.kept[i].p;
        take_kept(c, i);  // (the oldest blocks stay first, the ones a later miss returns)
        c.small_bytes -= size;
        return p;
      }
    }
  }
  c.system_allocs.fetch_add(1, std::memory_order_relaxed);
  if (is_large(size)) {  // sanitizer builds: a fresh mapping every time
    void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? nullptr : p;
  }
  return std::aligned_alloc(64, size);
}

void host_free(void* p, size_t size) {
  BlockCache& c = block_cache();
  KeptBlock b{size, p, is_large(size)};
  if (!MOE_ASAN) {
    std::lock_guard<std::mutex> lock(c.mu);
    if (b.mapped) {
      c.large_live -= size;
      c.large_kept += size;
      // Merge with the kept ranges on either side (they stay counted as kept).
      for (size_t i = c.n_kept; i-- > 0;) {
        const KeptBlock& k = c.kept[i];
        if (!k.mapped) continue;
        if (bytes_at(k.p) + k.size == bytes_at(b.p)) {
          b = {b.size + k.size, k.p, true};
          take_kept(c, i);
        } else if (bytes_at(b.p) + b.size == bytes_at(k.p)) {
          b.size += k.size;
          take_kept(c, i);
        }
      }
      if (c.n_kept < kMaxKeptBlocks) {
        c.kept[c.n_kept++] = b;
        return;
      }
      c.large_kept -= b.size;
    } else if (c.n_kept < kMaxKeptBlocks && c.small_bytes + size <= kMaxKeptSmallBytes) {
      c.kept[c.n_kept++] = b;
      c.small_bytes += size;
      return;
    }
  }
  system_free(b);
}

}  // namespace

void mem_trim() {
  BlockCache& c = block_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  release_kept(c, /*mapped_only=*/false);
  c.large_high = c.large_live;  // what comes next is measured from here
}

int64_t mem_system_allocs() { return block_cache().system_allocs.load(std::memory_order_relaxed); }

const char* mem_category_name(MemCategory c) {
  static const char* names[] = {"weights",     "quantized-weights", "lora",
                                "grads",       "optimizer",         "activations",
                                "kv-cache",    "workspace",         "comm"};
  int i = static_cast<int>(c);
  return (i >= 0 && i < kNumMemCategories) ? names[i] : "?";
}

const char* device_name(Device d) { return d == Device::CPU ? "cpu" : "cuda"; }

void register_device_hooks(Device d, const DeviceHooks& hooks) {
  tracker().hooks[static_cast<int>(d)] = hooks;
}

bool device_available(Device d) {
  return d == Device::CPU || tracker().hooks[static_cast<int>(d)].alloc != nullptr;
}

void mem_account(Device dev, MemCategory cat, int64_t delta) {
  Tracker& t = tracker();
  int di = static_cast<int>(dev), ci = static_cast<int>(cat);
  int64_t cur = t.current[di][ci].fetch_add(delta) + delta;
  int64_t tot = t.total[di].fetch_add(delta) + delta;
  if (delta > 0) {
    std::lock_guard<std::mutex> lock(t.mu);
    if (cur > t.peak[di][ci]) t.peak[di][ci] = cur;
    if (tot > t.peak_total[di]) t.peak_total[di] = tot;
  }
}

void* mem_allocate(Device dev, MemCategory cat, size_t bytes) {
  void* p = nullptr;
  size_t n = bytes == 0 ? 64 : bytes;
  if (dev == Device::CPU) {
    const bool transient = cat == MemCategory::Grads || cat == MemCategory::Activations || cat == MemCategory::Workspace;
    p = host_alloc(host_block_size(n), transient);
    MOE_CHECK(p != nullptr, "out of host memory allocating %s for %s", human_bytes(double(bytes)).c_str(),
              mem_category_name(cat));
  } else {
    auto& h = tracker().hooks[static_cast<int>(dev)];
    MOE_CHECK(h.alloc != nullptr, "device %s is not available in this build or on this machine",
              device_name(dev));
    p = h.alloc(n);
  }
  mem_account(dev, cat, static_cast<int64_t>(bytes));
  return p;
}

void mem_release(Device dev, MemCategory cat, void* p, size_t bytes) {
  if (!p) return;
  if (dev == Device::CPU) {
    host_free(p, host_block_size(bytes == 0 ? 64 : bytes));
  } else {
    tracker().hooks[static_cast<int>(dev)].free(p);
  }
  mem_account(dev, cat, -static_cast<int64_t>(bytes));
}

void mem_copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t n) {
  if (n == 0) return;
  if (dst_dev == Device::CPU && src_dev == Device::CPU) {
    std::memcpy(dst, src, n);
    return;
  }
  Device gpu = dst_dev != Device::CPU ? dst_dev : src_dev;
  auto& h = tracker().hooks[static_cast<int>(gpu)];
  MOE_CHECK(h.copy != nullptr, "device %s is not available", device_name(gpu));
  h.copy(dst, dst_dev, src, src_dev, n);
}

void mem_zero(void* p, Device dev, size_t n) {
  if (n == 0) return;
  if (dev == Device::CPU) {
    // Large blocks over the threads (a training step zeroes its gradients: one thread's memset
    // kept the other waiting, 2.4-11 MiB an expert under the fused update).
    constexpr size_t kParallelZero = size_t(1) << 20, kPiece = size_t(256) << 10;
    if (n < kParallelZero || omp_in_parallel()) {
      std::memset(p, 0, n);
      return;
    }
    const int64_t pieces = int64_t((n + kPiece - 1) / kPiece);
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < pieces; ++i)
      std::memset(static_cast<char*>(p) + size_t(i) * kPiece, 0, std::min(kPiece, n - size_t(i) * kPiece));
    return;
  }
  auto& h = tracker().hooks[static_cast<int>(dev)];
  MOE_CHECK(h.memset0 != nullptr, "device %s is not available", device_name(dev));
  h.memset0(p, n);
}

MemStats mem_stats() {
  Tracker& t = tracker();
  MemStats s{};
  std::lock_guard<std::mutex> lock(t.mu);
  for (int d = 0; d < kNumDevices; ++d) {
    for (int c = 0; c < kNumMemCategories; ++c) {
      s.current[d][c] = t.current[d][c].load();
      s.peak[d][c] = t.peak[d][c];
    }
    s.current_total[d] = t.total[d].load();
    s.peak_total[d] = t.peak_total[d];
  }
  return s;
}

void mem_reset_peaks() {
  Tracker& t = tracker();
  std::lock_guard<std::mutex> lock(t.mu);
  for (int d = 0; d < kNumDevices; ++d) {
    for (int c = 0; c < kNumMemCategories; ++c) t.peak[d][c] = t.current[d][c].load();
    t.peak_total[d] = t.total[d].load();
  }
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  double v = b < 0 ? -b : b;
  while (v >= 1024.0 && u < 4) { v /= 1024.0; ++u; }
  return strformat("%s%.*f %s", b < 0 ? "-" : "", u == 0 ? 0 : 2, v, units[u]);
}

std::string with_commas(int64_t v) {
  std::string s = std::to_string(v), out;
  int n = 0;
  for (auto it = s.rbegin(); it != s.rend(); ++it) {
    if (n && n % 3 == 0 && *it != '-') out.insert(out.begin(), ',');
    out.insert(out.begin(), *it);
    ++n;
  }
  return out;
}

std::string mem_report() {
  MemStats s = mem_stats();
  std::string out;
  for (int d = 0; d < kNumDevices; ++d) {
    if (s.peak_total[d] == 0) continue;
    out += strformat("memory (%s)        current        peak\n", device_name(static_cast<Device>(d)));
    for (int c = 0; c < kNumMemCategories; ++c) {
      if (s.peak[d][c] == 0) continue;
      out += strformat("  %-18s %12s %12s\n", mem_category_name(static_cast<MemCategory>(c)),
                       human_bytes(double(s.current[d][c])).c_str(), human_bytes(double(s.peak[d][c])).c_str());
    }
    out += strformat("  %-18s %12s %12s\n", "total", human_bytes(double(s.current_total[d])).c_str(),
                     human_bytes(double(s.peak_total[d])).c_str());
  }
  return out;
}

std::string mem_report_json() {
  MemStats s = mem_stats();
  std::string out = "{";
  bool first_dev = true;
  for (int d = 0; d < kNumDevices; ++d) {
    if (s.peak_total[d] == 0) continue;
    if (!first_dev) out += ",";
    first_dev = false;
    out += strformat("\"%s\":{", device_name(static_cast<Device>(d)));
    for (int c = 0; c < kNumMemCategories; ++c)
      out += strformat("\"%s\":{\"current\":%lld,\"peak\":%lld},", mem_category_name(static_cast<MemCategory>(c)),
                       (long long)s.current[d][c], (long long)s.peak[d][c]);
    out += strformat("\"peak_total\":%lld}", (long long)s.peak_total[d]);
  }
  return out + "}";
}

}  // namespace moe
