// safetensors.cpp — validated mmap reader, atomic writer and sharded-checkpoint opener for the
// safetensors format (see safetensors.h for the layout and the list of rejected inputs).
//
// The header parser never trusts a number from the file: lengths are checked against the file
// size before use, element counts are multiplied with overflow checks, and every message names
// the file and the tensor or field at fault (DESIGN.md invariant 6).
#include "io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <nlohmann/json.hpp>
#include <set>

#include "core/file_util.h"
#include "core/json_util.h"

namespace moe {

// The format stores the header length and every tensor's bytes little-endian; we read and write
// them as they sit in memory.
static_assert(std::endian::native == std::endian::little, "safetensors I/O assumes a little-endian host");

namespace {

using json = nlohmann::json;

// The reference implementation (huggingface/safetensors) refuses headers above 100 MB; a larger
// length is a corrupt or hostile file, not a real model.
constexpr uint64_t kMaxHeaderBytes = 100'000'000;
// A valid header nests three levels ({name: {shape: [..]}}). Anything deeper is garbage; the
// limit keeps pathological input from costing stack or time anywhere downstream.
constexpr int kMaxHeaderDepth = 8;
// Tensors in one file, and tensor names in one index: the largest real checkpoints hold ~100k.
constexpr size_t kMaxTensorsPerFile = size_t(1) << 20;
constexpr size_t kMaxIndexTensors = size_t(1) << 22;
// Distinct shard files an index may name (each is opened and mapped).
constexpr size_t kMaxShards = 100'000;
// model.safetensors.index.json: real ones are a few MB.
constexpr size_t kMaxIndexBytes = size_t(256) << 20;
// Dimensions of one tensor.
constexpr size_t kMaxTensorRank = Shape::kMaxRank;

// A non-negative JSON integer (floats, negatives, and numbers beyond uint64 are rejected).
bool json_to_u64(const json& j, uint64_t* out) {
  if (j.is_number_unsigned()) {
    *out = j.get<uint64_t>();
    return true;
  }
  if (j.is_number_integer()) {
    int64_t v = j.get<int64_t>();
    if (v < 0) return false;
    *out = static_cast<uint64_t>(v);
    return true;
  }
  return false;
}

std::string join_path(const std::string& dir, const std::string& name) {
  if (dir.empty()) return name;
  if (dir.back() == '/') return dir + name;
  return dir + "/" + name;
}

bool path_exists(const std::string& p, bool* is_dir = nullptr) {
  struct stat st;
  if (::stat(p.c_str(), &st) != 0) return false;
  if (is_dir) *is_dir = S_ISDIR(st.st_mode);
  return true;
}

// Parses a JSON document, rejecting duplicate keys in the top-level object (nlohmann would keep
// the last one silently, hiding a corrupt file), nesting deeper than kMaxHeaderDepth and more
// than kMaxTensorsPerFile entries.
json parse_json_strict(const char* begin, const char* end, const std::string& what) {
  check_json_text_depth(std::string_view(begin, size_t(end - begin)), what + ": header", kMaxHeaderDepth);
  std::set<std::string> top_keys;
  auto cb = [&](int depth, json::parse_event_t ev, json& parsed) -> bool {
    if (ev == json::parse_event_t::key && depth == 1 && parsed.is_string()) {
      const std::string& k = parsed.get_ref<const std::string&>();
      MOE_CHECK(top_keys.insert(k).second, "%s: header lists tensor '%s' twice", what.c_str(), k.c_str());
      MOE_CHECK(top_keys.size() <= kMaxTensorsPerFile + 1, "%s: header lists more than %zu tensors", what.c_str(),
                kMaxTensorsPerFile);
    }
    return true;
  };
  try {
    return json::parse(begin, end, cb);
  } catch (const json::exception& e) {
    MOE_FAIL("%s: header is not valid JSON: %s", what.c_str(), json_error_text(e).c_str());
  }
}

// Validates one tensor entry of the header into *out.
void parse_entry(const std::string& name, const json& e, size_t data_len, const std::string& what,
                 SafetensorsInfo* out) {
  const char* w = what.c_str();
  const char* n = name.c_str();
  MOE_CHECK(e.is_object(), "%s: tensor '%s': entry must be an object, got %s", w, n, e.type_name());
  out->name = name;

  auto dt = e.find("dtype");
  MOE_CHECK(dt != e.end(), "%s: tensor '%s': missing field 'dtype'", w, n);
  MOE_CHECK(dt->is_string(), "%s: tensor '%s': dtype must be a string, got %s", w, n, json_brief(*dt).c_str());
  const std::string& dts = dt->get_ref<const std::string&>();
  // FP8 e4m3 (DeepSeek-V3's weights) is read as its bytes; the model loader decodes it with its
  // block scales (core/fp8.h).
  out->fp8_e4m3 = dts == "F8_E4M3";
  if (out->fp8_e4m3) out->dtype = DType::U8;
  MOE_CHECK(out->fp8_e4m3 || dtype_from_safetensors(dts, &out->dtype),
            "%s: tensor '%s': unknown dtype '%s' (supported: F32 BF16 F16 I32 I64 U8 F64 F8_E4M3)", w, n, dts.c_str());

  auto sh = e.find("shape");
  MOE_CHECK(sh != e.end(), "%s: tensor '%s': missing field 'shape'", w, n);
  MOE_CHECK(sh->is_array(), "%s: tensor '%s': shape must be an array, got %s", w, n, json_brief(*sh).c_str());
  MOE_CHECK(sh->size() <= kMaxTensorRank, "%s: tensor '%s': shape has %zu dimensions, above the limit of %zu", w, n,
            sh->size(), kMaxTensorRank);
  // Tensor computes numel as a running int64 product, so the product of the non-zero dims must
  // fit in int64 even when a zero dim makes the tensor empty; the byte size must fit in uint64.
  uint64_t numel_nonzero = 1;
  bool has_zero = false, too_large = false;
  out->shape.clear();
  for (size_t i = 0; i < sh->size(); ++i) {
    uint64_t d = 0;
    const json& dj = (*sh)[i];
    MOE_CHECK(json_to_u64(dj, &d) && d <= static_cast<uint64_t>(INT64_MAX),
              "%s: tensor '%s': shape[%zu] is %s, must be a non-negative integer", w, n, i, json_brief(dj).c_str());
    out->shape.push_back(static_cast<int64_t>(d));
    if (d == 0) {
      has_zero = true;
    } else if (__builtin_mul_overflow(numel_nonzero, d, &numel_nonzero) ||
               numel_nonzero > static_cast<uint64_t>(INT64_MAX)) {
      too_large = true;
    }
  }
  uint64_t nbytes = 0;
  if (!too_large && !has_zero) too_large = __builtin_mul_overflow(numel_nonzero, dtype_size(out->dtype), &nbytes);
  MOE_CHECK(!too_large, "%s: tensor '%s': shape %s is too large", w, n, shape_str(out->shape).c_str());

  auto off = e.find("data_offsets");
  MOE_CHECK(off != e.end(), "%s: tensor '%s': missing field 'data_offsets'", w, n);
  uint64_t b = 0, en = 0;
  MOE_CHECK(off->is_array() && off->size() == 2 && json_to_u64((*off)[0], &b) && json_to_u64((*off)[1], &en),
            "%s: tensor '%s': data_offsets must be [begin, end] non-negative integers, got %s", w, n,
            json_brief(*off).c_str());
  MOE_CHECK(b <= en, "%s: tensor '%s': data_offsets [%llu,%llu] have begin > end", w, n,
            static_cast<unsigned long long>(b), static_cast<unsigned long long>(en));
  MOE_CHECK(en - b == nbytes,
            "%s: tensor '%s': data_offsets [%llu,%llu] span %llu bytes but %s %s needs %llu bytes", w, n,
            static_cast<unsigned long long>(b), static_cast<unsigned long long>(en),
            static_cast<unsigned long long>(en - b), dts.c_str(), shape_str(out->shape).c_str(),
            static_cast<unsigned long long>(nbytes));
  MOE_CHECK(en <= data_len, "%s: tensor '%s': data_offsets [%llu,%llu] exceed data section of %zu bytes", w, n,
            static_cast<unsigned long long>(b), static_cast<unsigned long long>(en), data_len);
  out->begin = static_cast<size_t>(b);
  out->end = static_cast<size_t>(en);
}

}  // namespace

std::vector<SafetensorsInfo> parse_safetensors_header(const uint8_t* file, size_t size, const std::string& what,
                                                      std::map<std::string, std::string>* metadata,
                                                      size_t* data_start) {
  const char* w = what.c_str();
  MOE_CHECK(size >= 8, "%s: file is %zu bytes, too short for a safetensors file (the header length alone is 8)",
            w, size);
  uint64_t n = 0;
  std::memcpy(&n, file, 8);
  MOE_CHECK(n <= kMaxHeaderBytes, "%s: header length %llu is implausibly large (limit %llu bytes); not a safetensors file?",
            w, static_cast<unsigned long long>(n), static_cast<unsigned long long>(kMaxHeaderBytes));
  MOE_CHECK(n <= size - 8, "%s: header length %llu runs beyond the end of the file (%zu bytes)", w,
            static_cast<unsigned long long>(n), size);
  MOE_CHECK(n > 0, "%s: header length is 0; a header must be a JSON object", w);

  const char* hb = reinterpret_cast<const char*>(file) + 8;
  json root = parse_json_strict(hb, hb + n, what);
  MOE_CHECK(root.is_object(), "%s: header is not a JSON object (got %s)", w, root.type_name());

  size_t start = 8 + static_cast<size_t>(n);
  size_t data_len = size - start;
  std::vector<SafetensorsInfo> infos;
  infos.reserve(root.size());
  std::map<std::string, std::string> meta;
  for (auto it = root.begin(); it != root.end(); ++it) {
    if (it.key() == "__metadata__") {
      const json& m = it.value();
      MOE_CHECK(m.is_object(), "%s: __metadata__ must be an object of strings, got %s", w, m.type_name());
      for (auto mi = m.begin(); mi != m.end(); ++mi) {
        MOE_CHECK(mi.value().is_string(), "%s: __metadata__ entry '%s' must be a string, got %s", w,
                  mi.key().c_str(), json_brief(mi.value()).c_str());
        meta[mi.key()] = mi.value().get<std::string>();
      }
      continue;
    }
    SafetensorsInfo info;
    parse_entry(it.key(), it.value(), data_len, what, &info);
    infos.push_back(std::move(info));
  }

  // File order of offsets; ties (empty tensors) by name so the order is deterministic.
  std::sort(infos.begin(), infos.end(), [](const SafetensorsInfo& a, const SafetensorsInfo& b) {
    if (a.begin != b.begin) return a.begin < b.begin;
    if (a.end != b.end) return a.end < b.end;
    return a.name < b.name;
  });
  // Overlap check on bytes: an empty tensor occupies nothing, so it cannot overlap. Gaps are
  // tolerated (the reference reader refuses them, but they are harmless to us).
  const SafetensorsInfo* reach = nullptr;  // the non-empty tensor ending furthest so far
  for (const SafetensorsInfo& t : infos) {
    if (t.begin == t.end) continue;
    if (reach && t.begin < reach->end) {
      MOE_FAIL("%s: tensors '%s' [%zu,%zu] and '%s' [%zu,%zu] overlap", w, reach->name.c_str(), reach->begin,
               reach->end, t.name.c_str(), t.begin, t.end);
    }
    if (!reach || t.end > reach->end) reach = &t;
  }

  if (metadata) *metadata = std::move(meta);
  if (data_start) *data_start = start;
  return infos;
}

// ---- SafetensorsFile ---------------------------------------------------------------------

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path) {
  const char* p = path.c_str();
  int fd = ::open(p, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    MOE_FAIL("%s: cannot open safetensors file: %s", p, std::strerror(err));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    MOE_FAIL("%s: cannot stat: %s", p, std::strerror(err));
  }
  if (S_ISDIR(st.st_mode)) {
    ::close(fd);
    MOE_FAIL("%s: is a directory, expected a .safetensors file", p);
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    MOE_FAIL("%s: not a regular file", p);
  }
  if (st.st_size == 0) {
    ::close(fd);
    MOE_FAIL("%s: empty file (0 bytes), not a safetensors file", p);
  }
  size_t size = static_cast<size_t>(st.st_size);
  // Private and writable, with no swap reservation: pages are shared with the page cache until a
  // caller writes into a borrowed tensor, which then gets a private copy of that page instead of
  // a SIGSEGV (or, worse, a modified checkpoint). NORESERVE keeps a mapping larger than RAM from
  // being refused by overcommit accounting. Note: if another process truncates the file while it
  // is mapped, reads past the new end fault (SIGBUS); nothing portable prevents that.
  void* m = ::mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
  int err = errno;
  ::close(fd);  // the mapping keeps its own reference to the file
  if (m == MAP_FAILED) MOE_FAIL("%s: mmap of %zu bytes failed: %s", p, size, std::strerror(err));

  std::shared_ptr<SafetensorsFile> f(new SafetensorsFile());
  f->path_ = path;
  f->map_ = m;  // from here the destructor unmaps, also when validation below throws
  f->size_ = size;
  f->infos_ = parse_safetensors_header(static_cast<const uint8_t*>(m), size, path, &f->metadata_, &f->data_start_);
  for (size_t i = 0; i < f->infos_.size(); ++i) f->index_[f->infos_[i].name] = i;
  f->self_ = f;
  return f;
}

SafetensorsFile::~SafetensorsFile() {
  if (map_) ::munmap(map_, size_);
}

const SafetensorsInfo* SafetensorsFile::find(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? nullptr : &infos_[it->second];
}

Tensor SafetensorsFile::tensor(const std::string& name, MemCategory account_as) const {
  const SafetensorsInfo* info = find(name);
  MOE_CHECK(info, "%s: no tensor '%s'", path_.c_str(), name.c_str());
  uint8_t* p = static_cast<uint8_t*>(map_) + data_start_ + info->begin;
  size_t align = dtype_size(info->dtype);
  if (reinterpret_cast<uintptr_t>(p) % align == 0) {
    std::shared_ptr<SafetensorsFile> self = self_.lock();
    MOE_ASSERT(self);  // every SafetensorsFile is created by open() and owned by a shared_ptr
    return Tensor::borrow(p, info->shape, info->dtype, std::static_pointer_cast<void>(self), account_as);
  }
  // Misaligned bytes (a writer that did not pad its header): element loads would be UB, so copy.
  Tensor t = Tensor::empty(info->shape, info->dtype, account_as);
  if (info->end > info->begin) std::memcpy(t.raw(), p, info->end - info->begin);
  return t;
}

// ---- Checkpoint --------------------------------------------------------------------------

std::vector<std::pair<std::string, std::string>> parse_safetensors_index(std::string_view text,
                                                                         const std::string& what) {
  const char* ip = what.c_str();
  json root = parse_json_object(text, what);
  auto wm = root.find("weight_map");
  MOE_CHECK(wm != root.end(), "%s: missing field 'weight_map'", ip);
  MOE_CHECK(wm->is_object(), "%s: weight_map must be an object of tensor name -> shard file, got %s", ip,
            wm->type_name());
  MOE_CHECK(wm->size() <= kMaxIndexTensors, "%s: weight_map lists %zu tensors, above the limit of %zu", ip,
            wm->size(), kMaxIndexTensors);
  std::vector<std::pair<std::string, std::string>> out;
  out.reserve(wm->size());
  std::set<std::string> shards;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    const std::string& name = it.key();
    MOE_CHECK(it.value().is_string(), "%s: weight_map['%s'] must be a file name string, got %s", ip, name.c_str(),
              json_brief(it.value()).c_str());
    const std::string& shard = it.value().get_ref<const std::string&>();
    // Shards live beside the index; a path would let an index reach outside the checkpoint.
    MOE_CHECK(!shard.empty() && shard.find('/') == std::string::npos && shard.find('\0') == std::string::npos &&
                  shard != "." && shard != "..",
              "%s: weight_map['%s'] = '%s' is not a plain file name", ip, name.c_str(), shard.c_str());
    if (shards.insert(shard).second)
      MOE_CHECK(shards.size() <= kMaxShards, "%s: weight_map names more than %zu shard files", ip, kMaxShards);
    out.emplace_back(name, shard);
  }
  return out;
}

Checkpoint Checkpoint::open_dir(const std::string& dir) {
  const char* d = dir.c_str();
  bool is_dir = false;
  MOE_CHECK(path_exists(dir, &is_dir), "%s: no such directory", d);
  MOE_CHECK(is_dir, "%s: not a directory", d);

  Checkpoint ck;
  ck.dir_ = dir;
  std::string index_path = join_path(dir, "model.safetensors.index.json");
  if (path_exists(index_path)) {
    const char* ip = index_path.c_str();
    const std::vector<std::pair<std::string, std::string>> entries =
        parse_safetensors_index(read_file(index_path, kMaxIndexBytes), index_path);
    std::map<std::string, size_t> shard_index;  // shard file name -> index in files_
    for (const auto& [name, shard] : entries) {
      auto si = shard_index.find(shard);
      if (si == shard_index.end()) {
        std::string sp = join_path(dir, shard);
        MOE_CHECK(path_exists(sp), "%s: shard '%s' (listed for tensor '%s') does not exist", ip, shard.c_str(),
                  name.c_str());
        ck.files_.push_back(SafetensorsFile::open(sp));
        si = shard_index.emplace(shard, ck.files_.size() - 1).first;
      }
      MOE_CHECK(ck.files_[si->second]->find(name), "%s: tensor '%s' is listed in shard '%s' but absent from it", ip,
                name.c_str(), shard.c_str());
      ck.where_[name] = si->second;
    }
    return ck;
  }

  std::string single = join_path(dir, "model.safetensors");
  MOE_CHECK(path_exists(single), "%s: no model.safetensors or model.safetensors.index.json", d);
  ck.files_.push_back(SafetensorsFile::open(single));
  for (const SafetensorsInfo& t : ck.files_[0]->tensors()) ck.where_[t.name] = 0;
  return ck;
}

bool Checkpoint::has(const std::string& name) const { return where_.count(name) != 0; }

const SafetensorsInfo& Checkpoint::info(const std::string& name) const {
  auto it = where_.find(name);
  MOE_CHECK(it != where_.end(), "checkpoint %s: missing tensor %s", dir_.c_str(), name.c_str());
  const SafetensorsInfo* info = files_[it->second]->find(name);
  MOE_ASSERT(info);  // open_dir verified every listed tensor is in its shard
  return *info;
}

Tensor Checkpoint::get(const std::string& name, MemCategory account_as) const {
  auto it = where_.find(name);
  MOE_CHECK(it != where_.end(), "checkpoint %s: missing tensor %s", dir_.c_str(), name.c_str());
  return files_[it->second]->tensor(name, account_as);
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& kv : where_) out.push_back(kv.first);
  return out;
}

// ---- writer ------------------------------------------------------------------------------

void write_safetensors(const std::string& path, const std::vector<std::pair<std::string, Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata, const WriteAs* as) {
  const char* p = path.c_str();
  // Validate everything before creating any file, so a bad call leaves no trace on disk.
  std::set<std::string> seen;
  for (const auto& [name, t] : tensors) {
    MOE_CHECK(name != "__metadata__", "%s: '__metadata__' is reserved and cannot name a tensor", p);
    MOE_CHECK(seen.insert(name).second, "%s: duplicate tensor name '%s'", p, name.c_str());
    MOE_CHECK(t.defined(), "%s: tensor '%s' is undefined (no storage)", p, name.c_str());
  }

  // Data order: largest element size first (stable otherwise), as the Python writer does, so the
  // tensors are packed with no gaps (which the reference reader requires) and each one still
  // starts aligned to its element size, keeping later loads zero-copy.
  std::vector<DType> stored(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) stored[i] = as ? as->dtype(tensors[i].second) : tensors[i].second.dtype();
  std::vector<size_t> order(tensors.size());
  for (size_t i = 0; i < order.size(); ++i) order[i] = i;
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t a, size_t b) { return dtype_size(stored[a]) > dtype_size(stored[b]); });

  std::string header;
  try {
    json h = json::object();
    if (!metadata.empty()) {
      json m = json::object();
      for (const auto& [k, v] : metadata) m[k] = v;
      h["__metadata__"] = std::move(m);
    }
    size_t off = 0;
    for (size_t i : order) {
      const Tensor& t = tensors[i].second;
      json shape = json::array();
      for (int64_t d : t.shape()) shape.push_back(d);
      const size_t bytes = dtype_nbytes(stored[i], t.numel());
      h[tensors[i].first] = {{"dtype", dtype_safetensors_name(stored[i])},
                             {"shape", std::move(shape)},
                             {"data_offsets", {off, off + bytes}}};
      off += bytes;
    }
    header = h.dump();
  } catch (const json::exception& e) {  // e.g. a name or metadata value that is not UTF-8
    MOE_FAIL("%s: cannot encode header: %s", p, json_error_text(e).c_str());
  }
  // Pad with spaces (valid JSON whitespace) so the data section starts 8-byte aligned.
  while ((8 + header.size()) % 8 != 0) header.push_back(' ');

  std::string tmp = path + ".tmp." + std::to_string(::getpid());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) {
    int err = errno;
    MOE_FAIL("%s: cannot create temp file %s: %s", p, tmp.c_str(), std::strerror(err));
  }
  try {
    auto put = [&](const void* data, size_t n) {
      if (n && std::fwrite(data, 1, n, f) != n) {
        int err = errno;
        MOE_FAIL("%s: write to %s failed: %s", p, tmp.c_str(), std::strerror(err));
      }
    };
    uint64_t n = header.size();
    put(&n, 8);
    put(header.data(), header.size());
    for (size_t i : order) {
      const Tensor& t = tensors[i].second;
      if (t.numel() == 0) continue;
      Tensor host = as ? as->convert(t) : t;
      MOE_ASSERT(host.dtype() == stored[i] && host.shape() == t.shape());
      if (host.device() != Device::CPU) host = host.to(Device::CPU, MemCategory::Workspace);
      put(host.raw(), host.nbytes());
    }
    if (std::fflush(f) != 0 || ::fsync(fileno(f)) != 0) {
      int err = errno;
      MOE_FAIL("%s: flushing %s failed: %s", p, tmp.c_str(), std::strerror(err));
    }
    FILE* closing = f;
    f = nullptr;
    if (std::fclose(closing) != 0) {
      int err = errno;
      MOE_FAIL("%s: closing %s failed: %s", p, tmp.c_str(), std::strerror(err));
    }
    if (std::rename(tmp.c_str(), p) != 0) {
      int err = errno;
      MOE_FAIL("%s: cannot rename %s into place: %s", p, tmp.c_str(), std::strerror(err));
    }
  } catch (...) {
    if (f) std::fclose(f);
    std::remove(tmp.c_str());
    throw;
  }
  // Make the rename itself durable. Best effort: the data is already complete and in place, and
  // some filesystems refuse fsync on a directory.
  size_t slash = path.rfind('/');
  std::string parent = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  int dfd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    (void)::fsync(dfd);
    ::close(dfd);
  }
}

}  // namespace moe
