// gguf.h — the GGUF container (llama.cpp's model file): validated mmap reader and atomic writer.
//
// Layout (version 3, little-endian):
//   "GGUF" u32 version, i64 n_tensors, i64 n_kv,
//   n_kv × (string key, i32 value type, value)        string = u64 length + bytes (no NUL)
//                                                     array  = i32 element type, u64 n, n values
//   n_tensors × (string name, u32 n_dims, n_dims × i64 ne, i32 ggml type, u64 offset)
//   padding to general.alignment (u32, default 32), then the data section; tensor offsets are
//   relative to it and multiples of the alignment. ne[0] is the row length (innermost dimension);
//   the torch shape is ne reversed.
// The reader rejects, with a message naming the file and the key or tensor: a bad magic or a
// version other than 2/3, counts beyond kGgufMax*, lengths or arrays running past the end of the
// file, unknown value or tensor types, nested arrays, duplicate keys or tensor names, more than
// 4 dimensions, negative dimensions, row lengths that are not a whole number of blocks, sizes
// that overflow, offsets that are misaligned or outside the data section, overlapping tensors.
#pragma once
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "core/quant.h"
#include "core/tensor.h"

namespace moe {

enum class GgufType : uint32_t {
  U8 = 0, I8 = 1, U16 = 2, I16 = 3, U32 = 4, I32 = 5, F32 = 6, BOOL = 7, STRING = 8, ARRAY = 9,
  U64 = 10, I64 = 11, F64 = 12,
};
const char* gguf_type_name(GgufType t);

// Limits on what a file may claim before we allocate for it (llama.cpp's loader has similar
// ones); real models are far below them.
constexpr uint64_t kGgufMaxTensors = 1u << 20;
constexpr uint64_t kGgufMaxKV = 1u << 20;
constexpr uint64_t kGgufMaxStringBytes = 1u << 28;
constexpr uint64_t kGgufMaxNameBytes = 256;  // tensor names (llama.cpp: 64)

// One metadata value. Scalars: integers in i (signed) or u (unsigned; bool as 0/1), floats in f,
// strings in s. Arrays: elem is the element type and arr the elements (no nested arrays).
struct GgufValue {
  GgufType type = GgufType::U32;
  GgufType elem = GgufType::U8;
  int64_t i = 0;
  uint64_t u = 0;
  double f = 0;
  std::string s;
  std::vector<GgufValue> arr;

  static GgufValue u32(uint32_t v);
  static GgufValue i32(int32_t v);
  static GgufValue u64(uint64_t v);
  static GgufValue f32(float v);
  static GgufValue f64(double v);
  static GgufValue boolean(bool v);
  static GgufValue str(std::string v);
  static GgufValue array(GgufType elem, std::vector<GgufValue> values);

  bool is_int() const;  // any integer type (not bool)
  // Integer value as int64 (false if not an integer or an unsigned value above INT64_MAX).
  bool get_int(int64_t* out) const;
  bool get_float(double* out) const;  // F32/F64 (and integers)
};

struct GgufTensorInfo {
  std::string name;
  GgmlType type = GgmlType::F32;
  std::vector<int64_t> ne;  // ggml order: ne[0] = row length
  uint64_t offset = 0;      // relative to the data section
  uint64_t nbytes = 0;
  int64_t numel() const;
  Shape torch_shape() const;  // ne reversed
};

struct GgufHeader {
  uint32_t version = 3;
  uint64_t alignment = 32;
  uint64_t data_start = 0;  // absolute file offset of the data section
  std::vector<std::pair<std::string, GgufValue>> kv;  // file order
  std::vector<GgufTensorInfo> tensors;                // file order
};

// Parses and validates the header of a whole file image (size bytes); `what` names the file.
GgufHeader parse_gguf(const uint8_t* file, size_t size, const std::string& what);

class GgufFile {
 public:
  // mmaps and validates `path`; throws moe::Error on any problem.
  static std::shared_ptr<GgufFile> open(const std::string& path);
  ~GgufFile();

  const std::string& path() const { return path_; }
  const GgufHeader& header() const { return h_; }
  const std::vector<GgufTensorInfo>& tensors() const { return h_.tensors; }
  const GgufTensorInfo* find_tensor(const std::string& name) const;
  const GgufValue* find(const std::string& key) const;
  // Typed lookups that throw "FILE: metadata key K: expected …" when absent or mistyped.
  int64_t get_int(const std::string& key) const;
  int64_t get_int(const std::string& key, int64_t fallback) const;
  double get_float(const std::string& key, double fallback) const;
  std::string get_string(const std::string& key) const;
  bool get_bool(const std::string& key, bool fallback) const;

  // Raw bytes of a tensor inside the mapping.
  const uint8_t* data(const GgufTensorInfo& t) const;
  // The tensor dequantised to f32 with the torch shape (ne reversed). Throws for a type that
  // cannot be dequantised, naming the tensor and its type.
  Tensor dequantize(const std::string& name, MemCategory cat = MemCategory::Weights) const;

 private:
  GgufFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  GgufHeader h_;
  std::map<std::string, size_t> tensor_index_, kv_index_;
};

// Streaming writer: metadata and tensor descriptions first, then write() computes the layout and
// asks each tensor's `fill` callback for its bytes (one tensor in memory at a time). The file is
// written to a temp file beside `path`, fsynced and renamed into place.
class GgufWriter {
 public:
  explicit GgufWriter(uint64_t alignment = 32);
  // Adds or replaces a key (file order: first insertion).
  void set(const std::string& key, GgufValue v);
  // `ne` in ggml order; fill(dst) must write exactly ggml_row_bytes(type, ne[0]) * rows bytes.
  void add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne,
                  std::function<void(uint8_t* dst)> fill);
  // progress(i, n, name) is called before tensor i of n is produced (may be empty).
  void write(const std::string& path,
             const std::function<void(size_t, size_t, const std::string&)>& progress = {}) const;

 private:
  struct Pending {
    std::string name;
    GgmlType type;
    std::vector<int64_t> ne;
    uint64_t nbytes;
    std::function<void(uint8_t*)> fill;
  };
  uint64_t alignment_;
  std::vector<std::pair<std::string, GgufValue>> kv_;
  std::vector<Pending> tensors_;
};

}  // namespace moe
