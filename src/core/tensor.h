// tensor.h — a dense, contiguous, row-major tensor with a dtype, a device and a memory category.
//
// A Tensor is a view (shape, dtype, byte offset) onto a reference-counted Storage; copying a
// Tensor shares the storage. Views (reshape, row ranges) never copy. Storage either owns
// tracked memory (freed when the last view goes) or borrows external bytes (an mmapped file
// kept alive by `keepalive`). Tensors are always contiguous: ops assume row-major layout with
// the last dimension fastest. A tensor of a quantized block dtype (core/dtype.h) holds blocks of
// its last dimension, which must be a whole number of blocks; rows/select/view keep block
// boundaries because they cut along dimension 0 only.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "core/dtype.h"
#include "core/error.h"
#include "core/memory.h"
#include "core/shape.h"

namespace moe {

std::string shape_str(const Shape& s);
int64_t shape_numel(const Shape& s);

struct Storage {
  void* data = nullptr;
  size_t bytes = 0;
  Device device = Device::CPU;
  MemCategory category = MemCategory::Workspace;
  bool owned = true;
  std::shared_ptr<void> keepalive;  // for borrowed bytes (e.g. an mmapped file)
  Storage() = default;
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;
  ~Storage();
};

class Tensor {
 public:
  Tensor() = default;

  // Uninitialised tensor of `shape` on `dev`, its bytes tagged `cat`.
  static Tensor empty(const Shape& shape, DType dt, MemCategory cat, Device dev = Device::CPU);
  static Tensor zeros(const Shape& shape, DType dt, MemCategory cat, Device dev = Device::CPU);
  // Wraps external CPU bytes (not copied): a read-only file mapping — the model loader drops
  // the pages of borrowed tensors it has copied, which is only safe for file-backed memory.
  // `keepalive` owns them; `account_as` (if given) adds the bytes to the tracker for as long
  // as this storage lives.
  static Tensor borrow(void* data, const Shape& shape, DType dt, std::shared_ptr<void> keepalive,
                       MemCategory account_as);
  // An f32 CPU tensor holding `values` (for tests and small constants).
  static Tensor from_f32(const Shape& shape, const std::vector<float>& values,
                         MemCategory cat = MemCategory::Workspace);

  bool defined() const { return storage_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device : Device::CPU; }
  MemCategory category() const { return storage_ ? storage_->category : MemCategory::Workspace; }
  const Shape& shape() const { return shape_; }
  int ndim() const { return static_cast<int>(shape_.size()); }
  // Size of dimension i; negative i counts from the end.
  int64_t dim(int i) const;
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return dtype_nbytes(dtype_, numel()); }  // block types: whole blocks
  std::string shape_str() const { return moe::shape_str(shape_); }
  // "f32[2,16,256]@cpu"
  std::string desc() const;

  void* raw() const { return static_cast<char*>(storage_->data) + offset_; }
  template <class T>
  T* data() const { return static_cast<T*>(raw()); }

  // Same bytes, new shape (numel must match).
  Tensor view(const Shape& shape) const;
  // The first bytes of this tensor's bytes read as another dtype and shape (no conversion); they
  // must fit in this tensor's bytes.
  Tensor reinterpret(DType dt, const Shape& shape) const;
  // Rows [begin, end) along dimension 0.
  Tensor rows(int64_t begin, int64_t end) const;
  // Slice index i along dimension 0, dropping that dimension.
  Tensor select(int64_t i) const;

  // Deep copies.
  Tensor to(Device dev, MemCategory cat) const;
  Tensor to(Device dev) const { return to(dev, category()); }
  // CPU-side dtype conversion (float types); returns *this if dtype already matches.
  Tensor to_dtype(DType dt, MemCategory cat) const;
  Tensor to_dtype(DType dt) const { return to_dtype(dt, category()); }
  Tensor clone() const { return to(device(), category()); }
  void zero_();
  void copy_from(const Tensor& src);  // same shape and dtype, any devices

  // Bytes borrowed from outside the tracker (an mmapped file), not owned by this storage.
  bool borrowed() const { return storage_ && !storage_->owned; }

  // Reads all elements as f32 (copying from the device if needed).
  std::vector<float> to_f32_vector() const;

 private:
  std::shared_ptr<Storage> storage_;
  size_t offset_ = 0;
  Shape shape_;
  DType dtype_ = DType::F32;
};

// Once a file-mapped (borrowed) tensor has been copied (stacked experts, converted dtypes,
// split master weights, moved to a device), its pages are dropped from memory: the mapping is
// read-only and private, so the kernel re-reads them from the file if they are ever touched
// again. Without this the mapped copy stays resident beside the engine's (measured: 6.6 GiB RSS
// for 3.4 GiB of weights). Only whole pages inside the tensor are released: a neighbour sharing
// a page keeps it. Does nothing for tensors that own their memory.
void release_mapped(const Tensor& src);

// Argument checks shared by ops: throw moe::Error naming the op and the argument.
void check_shape(const char* op, const char* arg, const Tensor& t, const Shape& expected);
void check_dtype(const char* op, const char* arg, const Tensor& t, DType expected);
void check_ndim(const char* op, const char* arg, const Tensor& t, int ndim);

}  // namespace moe
