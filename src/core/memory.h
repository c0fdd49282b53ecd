// memory.h — the tracked allocator: every byte the engine holds is tagged with a category.
//
// DESIGN.md invariant 3. Allocations go through allocate()/release() with a Device and a
// MemCategory; the tracker keeps current and peak bytes per (device, category) and the peak
// of the device total. Memory mapped from checkpoint files counts as Weights on the CPU (it
// becomes resident as it is read). The planner's predictions are tested against report().
//
// Thread-safety: all functions may be called from any thread (atomics + one mutex for peaks).
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace moe {

enum class Device : uint8_t { CPU = 0, CUDA = 1 };
constexpr int kNumDevices = 2;

enum class MemCategory : uint8_t {
  Weights = 0,
  QuantWeights,
  Lora,
  Grads,
  Optimizer,
  Activations,
  KvCache,
  Workspace,
  Comm,
  kCount
};
constexpr int kNumMemCategories = static_cast<int>(MemCategory::kCount);

const char* mem_category_name(MemCategory c);
const char* device_name(Device d);

// A backend that owns memory on a device registers these; CPU is built in.
struct DeviceHooks {
  void* (*alloc)(size_t bytes) = nullptr;  // throws moe::Error on failure
  void (*free)(void* p) = nullptr;
  // Copies n bytes; either side may be on the host (kind inferred by the backend).
  void (*copy)(void* dst, Device dst_dev, const void* src, Device src_dev, size_t n) = nullptr;
  void (*memset0)(void* p, size_t n) = nullptr;
};
void register_device_hooks(Device d, const DeviceHooks& hooks);
bool device_available(Device d);

// Allocates `bytes` on `dev`, tagged `cat`. 64-byte aligned on the CPU. Throws on failure.
void* mem_allocate(Device dev, MemCategory cat, size_t bytes);
void mem_release(Device dev, MemCategory cat, void* p, size_t bytes);
void mem_copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t n);
void mem_zero(void* p, Device dev, size_t n);

// Accounting only (for memory the engine did not allocate itself, e.g. mmapped weights).
void mem_account(Device dev, MemCategory cat, int64_t delta_bytes);

struct MemStats {
  int64_t current[kNumDevices][kNumMemCategories];
  int64_t peak[kNumDevices][kNumMemCategories];
  int64_t peak_total[kNumDevices];
  int64_t current_total[kNumDevices];
};
MemStats mem_stats();
// Returns the host blocks kept for reuse (see memory.cpp) to the system, e.g. after
// loading, before measuring what a job adds.
void mem_trim();
// Host blocks obtained from the system (malloc or mmap) so far: an allocation served by a kept
// block does not count. A loop whose count stays flat allocates nothing per iteration.
int64_t mem_system_allocs();
void mem_reset_peaks();  // peaks := current
// A human-readable table of current and peak bytes per category for each device in use.
std::string mem_report();
// Same data as JSON text: {"cpu":{"weights":{"current":..,"peak":..},...,"peak_total":..},...}
std::string mem_report_json();
std::string human_bytes(double bytes);
// 1234567 -> "1,234,567".
std::string with_commas(int64_t v);

}  // namespace moe
