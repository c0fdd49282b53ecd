// cuda_device.cu — CUDA backend state: device hooks for the tracked allocator, the stream,
// the cuBLAS handle (cuBLAS loaded at run time), workspace and pinned scratch.
#include <dlfcn.h>

#include <map>
#include <string>
#include <mutex>
#include <vector>

#include "ops/backend.h"
#include "ops/cuda/cuda_common.cuh"
#include "ops/ops.h"

namespace moe {
namespace cuda {
namespace {

struct State {
  bool tried = false;
  bool ok = false;
  cudaStream_t stream = nullptr;
  cublasHandle_t cublas = nullptr;
  CublasApi api;
  void* ws = nullptr;
  size_t ws_bytes = 0;
  void* pinned = nullptr;
  size_t pinned_bytes = 0;
  int sms = 0;
  std::mutex mu;
};

State& state() {
  static State s;
  return s;
}

// A caching allocator: freed blocks go to per-size free lists and are reused, because
// cudaMalloc/cudaFree cost tens of microseconds and cudaFree synchronises the device — per-op
// temporaries in the forward pass would otherwise dominate decode. All work runs on one stream,
// so a block freed by the host may be handed out again at once: later kernels on the stream
// run after the ones that used it. Sizes are rounded (512 B below 1 MiB, 2 MiB above) so that
// repeated shapes hit the cache; the tracker still counts the bytes tensors asked for.
struct BlockCache {
  std::mutex mu;
  std::map<size_t, std::vector<void*>> free_blocks;  // rounded size -> blocks
  std::map<void*, size_t> sizes;                     // live and cached blocks
  size_t cached_bytes = 0;
};

BlockCache& cache() {
  static BlockCache c;
  return c;
}

size_t round_size(size_t n) {
  const size_t small = 512, large = size_t(2) << 20;
  return n < (size_t(1) << 20) ? (n + small - 1) / small * small : (n + large - 1) / large * large;
}

void release_cached_locked(BlockCache& c) {
  for (auto& [sz, blocks] : c.free_blocks)
    for (void* p : blocks) {
      cudaFree(p);
      c.sizes.erase(p);
    }
  c.free_blocks.clear();
  c.cached_bytes = 0;
}

void* hook_alloc(size_t n) {
  BlockCache& c = cache();
  const size_t sz = round_size(n);
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.free_blocks.find(sz);
  if (it != c.free_blocks.end() && !it->second.empty()) {
    void* p = it->second.back();
    it->second.pop_back();
    c.cached_bytes -= sz;
    return p;
  }
  void* p = nullptr;
  cudaError_t e = cudaMalloc(&p, sz);
  if (e != cudaSuccess) {  // give the cache back and retry once
    cudaGetLastError();
    release_cached_locked(c);
    e = cudaMalloc(&p, sz);
  }
  if (e != cudaSuccess) {
    cudaGetLastError();
    size_t free_b = 0, total_b = 0;
    cudaMemGetInfo(&free_b, &total_b);
    MOE_FAIL("CUDA out of memory allocating %s (free %s of %s)", human_bytes(double(n)).c_str(),
             human_bytes(double(free_b)).c_str(), human_bytes(double(total_b)).c_str());
  }
  c.sizes[p] = sz;
  return p;
}

void hook_free(void* p) {
  BlockCache& c = cache();
  std::lock_guard<std::mutex> lock(c.mu);
  auto it = c.sizes.find(p);
  if (it == c.sizes.end()) {
    cudaFree(p);
    return;
  }
  c.free_blocks[it->second].push_back(p);
  c.cached_bytes += it->second;
}

void hook_copy(void* dst, Device dst_dev, const void* src, Device src_dev, size_t n) {
  cudaMemcpyKind kind = dst_dev == Device::CPU ? cudaMemcpyDeviceToHost
                        : src_dev == Device::CPU ? cudaMemcpyHostToDevice
                                                 : cudaMemcpyDeviceToDevice;
  MOE_CUDA_CHECK(cudaMemcpyAsync(dst, src, n, kind, stream()));
  if (kind != cudaMemcpyDeviceToDevice) MOE_CUDA_CHECK(cudaStreamSynchronize(stream()));
}

void hook_memset0(void* p, size_t n) { MOE_CUDA_CHECK(cudaMemsetAsync(p, 0, n, stream())); }

}  // namespace

// Opens the cuBLAS of the toolkit the backend was built with (its soname, then the toolkit's
// library directory) and resolves the entry points; a GPU without cuBLAS is a broken install.
void load_cublas(CublasApi* api) {
  const std::string soname = "libcublas.so." + std::to_string(CUBLAS_VER_MAJOR);
  void* lib = dlopen(soname.c_str(), RTLD_NOW | RTLD_LOCAL);
#ifdef MOE_CUDA_LIBRARY_DIR
  if (!lib) lib = dlopen((std::string(MOE_CUDA_LIBRARY_DIR) + "/" + soname).c_str(), RTLD_NOW | RTLD_LOCAL);
#endif
  MOE_CHECK(lib != nullptr, "a GPU is present but cuBLAS could not be loaded (%s): %s", soname.c_str(), dlerror());
  auto sym = [&](const char* name) {
    void* f = dlsym(lib, name);
    MOE_CHECK(f != nullptr, "%s has no symbol %s", soname.c_str(), name);
    return f;
  };
  api->create = reinterpret_cast<decltype(api->create)>(sym("cublasCreate_v2"));
  api->set_stream = reinterpret_cast<decltype(api->set_stream)>(sym("cublasSetStream_v2"));
  api->gemm_ex = reinterpret_cast<decltype(api->gemm_ex)>(sym("cublasGemmEx"));
}

bool init() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mu);
  if (s.tried) return s.ok;
  s.tried = true;
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess || n == 0) {
    cudaGetLastError();  // clear
    return false;
  }
  MOE_CUDA_CHECK(cudaSetDevice(0));
  MOE_CUDA_CHECK(cudaStreamCreateWithFlags(&s.stream, cudaStreamNonBlocking));
  load_cublas(&s.api);
  MOE_CUBLAS_CHECK(s.api.create(&s.cublas));
  MOE_CUBLAS_CHECK(s.api.set_stream(s.cublas, s.stream));
  cudaDeviceProp prop{};
  MOE_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
  s.sms = prop.multiProcessorCount;
  DeviceHooks h;
  h.alloc = hook_alloc;
  h.free = hook_free;
  h.copy = hook_copy;
  h.memset0 = hook_memset0;
  register_device_hooks(Device::CUDA, h);
  s.ok = true;
  return true;
}

cudaStream_t stream() { return state().stream; }
cublasHandle_t cublas() { return state().cublas; }
const CublasApi& cublas_api() { return state().api; }
int sm_count() { return state().sms; }

void* workspace(size_t bytes) {
  State& s = state();
  if (bytes > s.ws_bytes) {
    if (s.ws) mem_release(Device::CUDA, MemCategory::Workspace, s.ws, s.ws_bytes);
    s.ws = mem_allocate(Device::CUDA, MemCategory::Workspace, bytes);
    s.ws_bytes = bytes;
  }
  return s.ws;
}

void* pinned_scratch(size_t bytes) {
  State& s = state();
  if (bytes > s.pinned_bytes) {
    if (s.pinned) cudaFreeHost(s.pinned);
    MOE_CUDA_CHECK(cudaMallocHost(&s.pinned, bytes));
    s.pinned_bytes = bytes;
  }
  return s.pinned;
}

void synchronize() { MOE_CUDA_CHECK(cudaStreamSynchronize(stream())); }

}  // namespace cuda

bool cuda_available() { return cuda::init(); }

}  // namespace moe
