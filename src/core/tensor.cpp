// tensor.cpp — Tensor views, copies and argument checks; dropping a copied file mapping's pages.
#include "core/tensor.h"

#include <sys/mman.h>
#include <unistd.h>

#include <mutex>
#include <new>

#include "core/bf16_panels.h"
#include "core/sanitizer.h"

namespace moe {

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ",";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

namespace {
// A block-type tensor holds whole blocks of its last dimension (see tensor.h).
void check_block_shape(const Shape& shape, DType dt) {
  if (!dtype_is_block(dt)) return;
  const int64_t be = dtype_block_elems(dt);
  MOE_CHECK(!shape.empty() && shape.back() % be == 0,
            "a %s tensor needs a last dimension that is a multiple of %lld, got shape %s", dtype_name(dt),
            static_cast<long long>(be), moe::shape_str(shape).c_str());
}

// Storage objects (with their shared_ptr control block) come from a free list of nodes of one
// size: a decode step makes dozens of tensors and must not call the allocator for them
// (tests/test_decode_alloc.cpp). Nodes are never returned to the system; there are as many as
// Storage objects were ever alive at once. Sanitizer builds use the plain allocator, so ASan
// sees a use of a freed Storage.

template <size_t Size, size_t Align>
struct NodePool {
  struct alignas(Align) Node {
    union {
      Node* next;
      unsigned char bytes[Size];
    };
  };
  std::mutex mu;
  Node* free = nullptr;
  void* get() {
    {
      std::lock_guard<std::mutex> lock(mu);
      if (free) {
        Node* n = free;
        free = n->next;
        return n;
      }
    }
    return ::operator new(sizeof(Node), std::align_val_t(alignof(Node)));
  }
  void put(void* p) {
    std::lock_guard<std::mutex> lock(mu);
    Node* n = static_cast<Node*>(p);
    n->next = free;
    free = n;
  }
  static NodePool& instance() {
    static NodePool* pool = new NodePool;  // never destroyed: tensors may outlive static destructors
    return *pool;
  }
};

template <class T>
struct PoolAllocator {
  using value_type = T;
  PoolAllocator() = default;
  template <class U>
  PoolAllocator(const PoolAllocator<U>&) {}
  T* allocate(size_t n) {
    if (MOE_ASAN || n != 1) return std::allocator<T>().allocate(n);
    return static_cast<T*>(NodePool<sizeof(T), alignof(T)>::instance().get());
  }
  void deallocate(T* p, size_t n) {
    if (MOE_ASAN || n != 1) return std::allocator<T>().deallocate(p, n);
    NodePool<sizeof(T), alignof(T)>::instance().put(p);
  }
  template <class U>
  bool operator==(const PoolAllocator<U>&) const { return true; }
  template <class U>
  bool operator!=(const PoolAllocator<U>&) const { return false; }
};

std::shared_ptr<Storage> new_storage() { return std::allocate_shared<Storage>(PoolAllocator<Storage>()); }

}  // namespace

Storage::~Storage() {
  if (owned) {
    mem_release(device, category, data, bytes);
  } else if (bytes) {
    mem_account(device, category, -static_cast<int64_t>(bytes));
  }
}

Tensor Tensor::empty(const Shape& shape, DType dt, MemCategory cat, Device dev) {
  for (int64_t d : shape) MOE_CHECK(d >= 0, "negative dimension in shape %s", moe::shape_str(shape).c_str());
  check_block_shape(shape, dt);
  Tensor t;
  t.storage_ = new_storage();
  t.storage_->bytes = dtype_nbytes(dt, shape_numel(shape));
  t.storage_->device = dev;
  t.storage_->category = cat;
  t.storage_->data = mem_allocate(dev, cat, t.storage_->bytes);
  t.shape_ = shape;
  t.dtype_ = dt;
  return t;
}

Tensor Tensor::zeros(const Shape& shape, DType dt, MemCategory cat, Device dev) {
  Tensor t = empty(shape, dt, cat, dev);
  t.zero_();
  return t;
}

Tensor Tensor::borrow(void* data, const Shape& shape, DType dt, std::shared_ptr<void> keepalive,
                      MemCategory account_as) {
  Tensor t;
  t.storage_ = new_storage();
  t.storage_->data = data;
  t.storage_->owned = false;
  t.storage_->device = Device::CPU;
  t.storage_->category = account_as;
  t.storage_->keepalive = std::move(keepalive);
  check_block_shape(shape, dt);
  t.storage_->bytes = dtype_nbytes(dt, shape_numel(shape));
  mem_account(Device::CPU, account_as, static_cast<int64_t>(t.storage_->bytes));
  t.shape_ = shape;
  t.dtype_ = dt;
  return t;
}

Tensor Tensor::from_f32(const Shape& shape, const std::vector<float>& values, MemCategory cat) {
  MOE_CHECK(static_cast<int64_t>(values.size()) == shape_numel(shape), "from_f32: %zu values for shape %s",
            values.size(), moe::shape_str(shape).c_str());
  Tensor t = empty(shape, DType::F32, cat);
  std::copy(values.begin(), values.end(), t.data<float>());
  return t;
}

int64_t Tensor::dim(int i) const {
  int n = ndim();
  if (i < 0) i += n;
  MOE_ASSERT(i >= 0 && i < n);
  return shape_[static_cast<size_t>(i)];
}

std::string Tensor::desc() const {
  return strformat("%s%s@%s", dtype_name(dtype_), shape_str().c_str(), device_name(device()));
}

Tensor Tensor::view(const Shape& shape) const {
  MOE_CHECK(shape_numel(shape) == numel(), "view: cannot view %s as %s", shape_str().c_str(),
            moe::shape_str(shape).c_str());
  check_block_shape(shape, dtype_);
  Tensor t = *this;
  t.shape_ = shape;
  return t;
}

Tensor Tensor::reinterpret(DType dt, const Shape& shape) const {
  MOE_CHECK(dtype_nbytes(dt, shape_numel(shape)) <= nbytes(), "reinterpret: %s %s does not fit in the bytes of %s",
            dtype_name(dt), moe::shape_str(shape).c_str(), desc().c_str());
  check_block_shape(shape, dt);
  Tensor t = *this;
  t.shape_ = shape;
  t.dtype_ = dt;
  return t;
}

Tensor Tensor::rows(int64_t begin, int64_t end) const {
  MOE_ASSERT(ndim() >= 1 && begin >= 0 && begin <= end && end <= shape_[0]);
  Tensor t = *this;
  int64_t row_elems = shape_[0] ? numel() / shape_[0] : 0;
  t.offset_ += dtype_nbytes(dtype_, begin * row_elems);
  t.shape_[0] = end - begin;
  return t;
}

Tensor Tensor::select(int64_t i) const {
  Tensor t = rows(i, i + 1);
  t.shape_.erase(t.shape_.begin());
  return t;
}

Tensor Tensor::to(Device dev, MemCategory cat) const {
  Tensor t = empty(shape_, dtype_, cat, dev);
  mem_copy(t.raw(), dev, raw(), device(), nbytes());
  return t;
}

Tensor Tensor::to_dtype(DType dt, MemCategory cat) const {
  if (dt == dtype_) return *this;
  MOE_CHECK(device() == Device::CPU, "to_dtype: only CPU tensors can be converted, got %s", desc().c_str());
  if (dt == DType::BF16P || dtype_ == DType::BF16P) {  // panels (core/bf16_panels.h): by the shape's rows
    const int64_t k = ndim() ? shape_.back() : 1, rows = k ? numel() / k : 0;
    if (dt == DType::BF16P) {
      const Tensor b = to_dtype(DType::BF16, MemCategory::Workspace);
      Tensor t = empty(shape_, dt, cat);
      pack_bf16_panels(static_cast<uint16_t*>(t.raw()), static_cast<const uint16_t*>(b.raw()), rows, k);
      return t;
    }
    Tensor b = empty(shape_, DType::BF16, dt == DType::BF16 ? cat : MemCategory::Workspace);
    unpack_bf16_panels(static_cast<uint16_t*>(b.raw()), static_cast<const uint16_t*>(raw()), rows, k);
    return b.to_dtype(dt, cat);
  }
  Tensor t = empty(shape_, dt, cat);
  size_t n = static_cast<size_t>(numel());
  if (dt == DType::F32) {
    convert_to_f32(t.data<float>(), raw(), dtype_, n);
  } else if (dtype_ == DType::F32) {
    convert_from_f32(t.raw(), data<float>(), dt, n);
  } else {
    std::vector<float> tmp(n);
    convert_to_f32(tmp.data(), raw(), dtype_, n);
    convert_from_f32(t.raw(), tmp.data(), dt, n);
  }
  return t;
}

void Tensor::zero_() { mem_zero(raw(), device(), nbytes()); }

void Tensor::copy_from(const Tensor& src) {
  MOE_CHECK(src.shape_ == shape_ && src.dtype_ == dtype_, "copy_from: %s into %s", src.desc().c_str(),
            desc().c_str());
  mem_copy(raw(), device(), src.raw(), src.device(), nbytes());
}

std::vector<float> Tensor::to_f32_vector() const {
  Tensor host = device() == Device::CPU ? *this : to(Device::CPU, MemCategory::Workspace);
  std::vector<float> out(static_cast<size_t>(numel()));
  convert_to_f32(out.data(), host.raw(), dtype_, out.size());
  return out;
}

void check_shape(const char* op, const char* arg, const Tensor& t, const Shape& expected) {
  MOE_CHECK(t.shape() == expected, "%s: %s expected shape %s, got %s", op, arg, shape_str(expected).c_str(),
            t.shape_str().c_str());
}

void check_dtype(const char* op, const char* arg, const Tensor& t, DType expected) {
  MOE_CHECK(t.dtype() == expected, "%s: %s expected dtype %s, got %s", op, arg, dtype_name(expected),
            dtype_name(t.dtype()));
}

void check_ndim(const char* op, const char* arg, const Tensor& t, int ndim) {
  MOE_CHECK(t.ndim() == ndim, "%s: %s expected %d dimensions, got %s", op, arg, ndim, t.shape_str().c_str());
}

void release_mapped(const Tensor& src) {
  if (!src.borrowed() || src.nbytes() == 0) return;
  const uintptr_t page = static_cast<uintptr_t>(sysconf(_SC_PAGESIZE));
  const uintptr_t lo = (reinterpret_cast<uintptr_t>(src.raw()) + page - 1) / page * page;
  const uintptr_t hi = (reinterpret_cast<uintptr_t>(src.raw()) + src.nbytes()) / page * page;
  if (hi > lo) madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

}  // namespace moe
