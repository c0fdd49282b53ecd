// memory.cpp — tracked allocation and the per-category memory report.
#include "core/memory.h"

#include <sys/mman.h>

#include <atomic>
#include <cstdlib>
#include <cstring>
#include <map>
#include <mutex>

#include "core/error.h"

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

// Large host blocks: mapped directly and kept, once freed, for an allocation of exactly the same
// size (a training step or a decode step allocates the same sizes every time: no page faults,
// no system calls in the steady state). Any allocation that finds no block of its size first
// unmaps every kept block, so the resident peak is never above that of mapping and unmapping
// each block: between two misses, live + kept bytes only move from one to the other.
constexpr size_t kMapThreshold = size_t(256) << 10;
constexpr size_t kMapGranule = size_t(64) << 10;

struct BlockCache {
  std::mutex mu;
  std::multimap<size_t, void*> free_blocks;  // size -> block
};

BlockCache& block_cache() {
  static BlockCache c;
  return c;
}

void* map_block(size_t size) {
  BlockCache& c = block_cache();
  {
    std::lock_guard<std::mutex> lock(c.mu);
    auto it = c.free_blocks.find(size);
    if (it != c.free_blocks.end()) {
      void* p = it->second;
      c.free_blocks.erase(it);
      return p;
    }
  }
  mem_trim();
  void* p = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  return p == MAP_FAILED ? nullptr : p;
}

void unmap_block(void* p, size_t size) {
  BlockCache& c = block_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  c.free_blocks.emplace(size, p);
}

}  // namespace

void mem_trim() {
  BlockCache& c = block_cache();
  std::lock_guard<std::mutex> lock(c.mu);
  for (auto& [n, p] : c.free_blocks) ::munmap(p, n);
  c.free_blocks.clear();
}

namespace {

}  // namespace

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
    size_t rounded = (n + 63) / 64 * 64;
    p = n >= kMapThreshold ? map_block((n + kMapGranule - 1) / kMapGranule * kMapGranule)
                           : std::aligned_alloc(64, rounded);
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
    const size_t n = bytes == 0 ? 64 : bytes;
    if (n >= kMapThreshold)
      unmap_block(p, (n + kMapGranule - 1) / kMapGranule * kMapGranule);
    else
      std::free(p);
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
    std::memset(p, 0, n);
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
