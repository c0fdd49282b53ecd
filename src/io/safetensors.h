// safetensors.h — read (mmap, validated) and write (temp file + rename) .safetensors files,
// and open HF checkpoints that are one file or sharded through model.safetensors.index.json.
//
// Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape,
// data_offsets:[begin,end]}, "__metadata__": {str: str}}, then the data section; offsets are
// relative to the data section. The reader rejects, with a message naming the file and tensor:
// a file shorter than 8 bytes, N beyond the end of the file, non-JSON or non-object headers,
// unknown dtypes, negative/non-integer shapes, byte size != numel*dtype size, offsets out of
// the data section, overlapping tensors, headers above 100 MB, nesting deeper than 8 levels, more
// than 2^20 tensors or 16 dimensions.
#pragma once
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "core/tensor.h"

namespace moe {

struct SafetensorsInfo {
  std::string name;
  DType dtype = DType::F32;
  bool fp8_e4m3 = false;  // stored as F8_E4M3: dtype is U8, the codes' bytes (core/fp8.h)
  Shape shape;
  size_t begin = 0;  // byte offset relative to the data section
  size_t end = 0;
};

// Parses and validates a header. `file` is the whole file image (size bytes); `what` names the
// file in errors. Returns the tensors in file order of offsets; fills *metadata if non-null.
std::vector<SafetensorsInfo> parse_safetensors_header(const uint8_t* file, size_t size, const std::string& what,
                                                      std::map<std::string, std::string>* metadata,
                                                      size_t* data_start);

// Parses model.safetensors.index.json text: its "weight_map" as (tensor name, shard file name)
// pairs, sorted by tensor name. Shard names must be plain file names (no '/', not "." or "..").
// Limits: kMaxIndexTensors names, kMaxShards distinct shards (safetensors.cpp). `what` names the
// file in errors.
std::vector<std::pair<std::string, std::string>> parse_safetensors_index(std::string_view text,
                                                                         const std::string& what);

class SafetensorsFile {
 public:
  // mmaps and validates `path`; throws moe::Error on any problem.
  static std::shared_ptr<SafetensorsFile> open(const std::string& path);
  ~SafetensorsFile();

  const std::string& path() const { return path_; }
  const std::vector<SafetensorsInfo>& tensors() const { return infos_; }
  const SafetensorsInfo* find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The tensor's bytes as a CPU Tensor. Zero-copy (borrowing the mapping, which stays alive while
  // the tensor does) when the bytes are aligned for the dtype, else a copy. Throws if missing.
  Tensor tensor(const std::string& name, MemCategory account_as = MemCategory::Weights) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* map_ = nullptr;
  size_t size_ = 0;
  size_t data_start_ = 0;
  std::vector<SafetensorsInfo> infos_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
  std::weak_ptr<SafetensorsFile> self_;
};

// A model directory's weights: model.safetensors, or the shards listed by
// model.safetensors.index.json ("weight_map": name -> file).
class Checkpoint {
 public:
  static Checkpoint open_dir(const std::string& dir);
  bool has(const std::string& name) const;
  // Throws "checkpoint DIR: missing tensor NAME" when absent.
  Tensor get(const std::string& name, MemCategory account_as = MemCategory::Weights) const;
  const SafetensorsInfo& info(const std::string& name) const;
  std::vector<std::string> names() const;
  const std::string& dir() const { return dir_; }

 private:
  std::string dir_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t> where_;  // tensor name -> index in files_
};

// Writes tensors (any devices; copied to host) to `path` atomically: a temp file in the same
// directory, fsync, rename. Names must be unique. The header is padded so the data section
// starts 8-byte aligned.
// `as` (optional): tensors written as something else — their stored dtype, and their bytes in
// it made just before they are written, so one converted tensor exists at a time (split master
// weights written as f32, model_train.h).
struct WriteAs {
  std::function<DType(const Tensor&)> dtype;
  std::function<Tensor(const Tensor&)> convert;
};
void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {}, const WriteAs* as = nullptr);

}  // namespace moe
