// gguf.cpp — validated GGUF reader (mmap) and streaming atomic writer (see gguf.h).
//
// The parser never trusts a number from the file: every length is checked against the bytes
// that remain before it is used, element counts against per-element minimum sizes before any
// allocation, and sizes are multiplied with overflow checks (DESIGN.md invariant 6).
#include "io/gguf.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cstdio>
#include <cstring>
#include <set>

#include "core/error.h"

namespace moe {

static_assert(std::endian::native == std::endian::little, "GGUF I/O assumes a little-endian host");

namespace {

constexpr uint32_t kMagic = 0x46554747;  // "GGUF" read as a little-endian u32
constexpr int kMaxDims = 4;

// Bytes a scalar of type t occupies (0 for STRING/ARRAY, whose size is variable).
size_t scalar_size(GgufType t) {
  switch (t) {
    case GgufType::U8: case GgufType::I8: case GgufType::BOOL: return 1;
    case GgufType::U16: case GgufType::I16: return 2;
    case GgufType::U32: case GgufType::I32: case GgufType::F32: return 4;
    case GgufType::U64: case GgufType::I64: case GgufType::F64: return 8;
    default: return 0;
  }
}

bool valid_type(uint32_t t) { return t <= static_cast<uint32_t>(GgufType::F64); }

class Cursor {
 public:
  Cursor(const uint8_t* p, size_t n, const std::string& what) : p_(p), n_(n), what_(what) {}
  size_t pos() const { return pos_; }
  size_t left() const { return n_ - pos_; }
  const std::string& what() const { return what_; }

  void need(size_t k, const char* ctx) const {
    MOE_CHECK(k <= left(), "%s: %s: needs %zu bytes at offset %zu but the file ends at %zu (truncated?)",
              what_.c_str(), ctx, k, pos_, n_);
  }
  template <class T>
  T get(const char* ctx) {
    need(sizeof(T), ctx);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof(T));
    pos_ += sizeof(T);
    return v;
  }
  std::string str(const char* ctx, uint64_t max_len) {
    const uint64_t len = get<uint64_t>(ctx);
    MOE_CHECK(len <= max_len, "%s: %s: string length %llu exceeds the limit of %llu bytes", what_.c_str(), ctx,
              static_cast<unsigned long long>(len), static_cast<unsigned long long>(max_len));
    need(static_cast<size_t>(len), ctx);
    std::string s(reinterpret_cast<const char*>(p_ + pos_), static_cast<size_t>(len));
    pos_ += static_cast<size_t>(len);
    return s;
  }

 private:
  const uint8_t* p_;
  size_t n_;
  size_t pos_ = 0;
  const std::string& what_;
};

GgufValue read_scalar(Cursor& c, GgufType t, const char* ctx) {
  GgufValue v;
  v.type = t;
  switch (t) {
    case GgufType::U8: v.u = c.get<uint8_t>(ctx); break;
    case GgufType::I8: v.i = c.get<int8_t>(ctx); break;
    case GgufType::U16: v.u = c.get<uint16_t>(ctx); break;
    case GgufType::I16: v.i = c.get<int16_t>(ctx); break;
    case GgufType::U32: v.u = c.get<uint32_t>(ctx); break;
    case GgufType::I32: v.i = c.get<int32_t>(ctx); break;
    case GgufType::U64: v.u = c.get<uint64_t>(ctx); break;
    case GgufType::I64: v.i = c.get<int64_t>(ctx); break;
    case GgufType::F32: v.f = c.get<float>(ctx); break;
    case GgufType::F64: v.f = c.get<double>(ctx); break;
    case GgufType::BOOL: {
      const uint8_t b = c.get<uint8_t>(ctx);
      MOE_CHECK(b <= 1, "%s: %s: bool value is %u, must be 0 or 1", c.what().c_str(), ctx, b);
      v.u = b;
      break;
    }
    case GgufType::STRING: v.s = c.str(ctx, kGgufMaxStringBytes); break;
    default: MOE_FAIL("%s: %s: type %u is not a scalar (bug)", c.what().c_str(), ctx, static_cast<unsigned>(t));
  }
  return v;
}

GgufValue read_value(Cursor& c, uint32_t type, const std::string& key) {
  const std::string ctx_s = "metadata key '" + key + "'";
  const char* ctx = ctx_s.c_str();
  MOE_CHECK(valid_type(type), "%s: %s: unknown value type %u (GGUF types are 0..12)", c.what().c_str(), ctx, type);
  const GgufType t = static_cast<GgufType>(type);
  if (t != GgufType::ARRAY) return read_scalar(c, t, ctx);
  GgufValue v;
  v.type = GgufType::ARRAY;
  const uint32_t et = c.get<uint32_t>(ctx);
  MOE_CHECK(valid_type(et), "%s: %s: unknown array element type %u", c.what().c_str(), ctx, et);
  v.elem = static_cast<GgufType>(et);
  MOE_CHECK(v.elem != GgufType::ARRAY, "%s: %s: nested arrays are not supported", c.what().c_str(), ctx);
  const uint64_t n = c.get<uint64_t>(ctx);
  // Each element takes at least its scalar size (a string at least its 8-byte length), so a
  // count the remaining bytes cannot hold is refused before any allocation.
  const size_t min_elem = v.elem == GgufType::STRING ? 8 : scalar_size(v.elem);
  MOE_CHECK(n <= c.left() / min_elem, "%s: %s: array of %llu %s elements runs past the end of the file",
            c.what().c_str(), ctx, static_cast<unsigned long long>(n), gguf_type_name(v.elem));
  v.arr.reserve(static_cast<size_t>(n));
  for (uint64_t k = 0; k < n; ++k) v.arr.push_back(read_scalar(c, v.elem, ctx));
  return v;
}

void write_all(FILE* f, const void* data, size_t n, const std::string& path, const std::string& tmp) {
  if (n && std::fwrite(data, 1, n, f) != n) {
    int err = errno;
    MOE_FAIL("%s: write to %s failed: %s", path.c_str(), tmp.c_str(), std::strerror(err));
  }
}

void put_str(std::string& b, const std::string& s) {
  const uint64_t n = s.size();
  b.append(reinterpret_cast<const char*>(&n), 8);
  b.append(s);
}

template <class T>
void put(std::string& b, T v) {
  b.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

void put_scalar(std::string& b, const GgufValue& v, GgufType t) {
  switch (t) {
    case GgufType::U8: put<uint8_t>(b, static_cast<uint8_t>(v.u)); break;
    case GgufType::I8: put<int8_t>(b, static_cast<int8_t>(v.i)); break;
    case GgufType::U16: put<uint16_t>(b, static_cast<uint16_t>(v.u)); break;
    case GgufType::I16: put<int16_t>(b, static_cast<int16_t>(v.i)); break;
    case GgufType::U32: put<uint32_t>(b, static_cast<uint32_t>(v.u)); break;
    case GgufType::I32: put<int32_t>(b, static_cast<int32_t>(v.i)); break;
    case GgufType::U64: put<uint64_t>(b, v.u); break;
    case GgufType::I64: put<int64_t>(b, v.i); break;
    case GgufType::F32: put<float>(b, static_cast<float>(v.f)); break;
    case GgufType::F64: put<double>(b, v.f); break;
    case GgufType::BOOL: put<uint8_t>(b, v.u ? 1 : 0); break;
    case GgufType::STRING: put_str(b, v.s); break;
    case GgufType::ARRAY: MOE_FAIL("GGUF writer: nested arrays are not supported");
  }
}

uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

}  // namespace

const char* gguf_type_name(GgufType t) {
  static const char* const names[] = {"u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array",
                                      "u64", "i64", "f64"};
  const auto i = static_cast<uint32_t>(t);
  return i < 13 ? names[i] : "unknown";
}

// ---- GgufValue -----------------------------------------------------------------------------

GgufValue GgufValue::u32(uint32_t v) { GgufValue x; x.type = GgufType::U32; x.u = v; return x; }
GgufValue GgufValue::i32(int32_t v) { GgufValue x; x.type = GgufType::I32; x.i = v; return x; }
GgufValue GgufValue::u64(uint64_t v) { GgufValue x; x.type = GgufType::U64; x.u = v; return x; }
GgufValue GgufValue::f32(float v) { GgufValue x; x.type = GgufType::F32; x.f = v; return x; }
GgufValue GgufValue::f64(double v) { GgufValue x; x.type = GgufType::F64; x.f = v; return x; }
GgufValue GgufValue::boolean(bool v) { GgufValue x; x.type = GgufType::BOOL; x.u = v ? 1 : 0; return x; }
GgufValue GgufValue::str(std::string v) { GgufValue x; x.type = GgufType::STRING; x.s = std::move(v); return x; }
GgufValue GgufValue::array(GgufType elem, std::vector<GgufValue> values) {
  GgufValue x;
  x.type = GgufType::ARRAY;
  x.elem = elem;
  x.arr = std::move(values);
  for (GgufValue& e : x.arr) e.type = elem;
  return x;
}

bool GgufValue::is_int() const {
  switch (type) {
    case GgufType::U8: case GgufType::I8: case GgufType::U16: case GgufType::I16: case GgufType::U32:
    case GgufType::I32: case GgufType::U64: case GgufType::I64: return true;
    default: return false;
  }
}

bool GgufValue::get_int(int64_t* out) const {
  switch (type) {
    case GgufType::I8: case GgufType::I16: case GgufType::I32: case GgufType::I64: *out = i; return true;
    case GgufType::U8: case GgufType::U16: case GgufType::U32: case GgufType::U64:
      if (u > static_cast<uint64_t>(INT64_MAX)) return false;
      *out = static_cast<int64_t>(u);
      return true;
    default: return false;
  }
}

bool GgufValue::get_float(double* out) const {
  if (type == GgufType::F32 || type == GgufType::F64) {
    *out = f;
    return true;
  }
  int64_t v;
  if (!get_int(&v)) return false;
  *out = static_cast<double>(v);
  return true;
}

int64_t GgufTensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : ne) n *= d;
  return n;
}

Shape GgufTensorInfo::torch_shape() const { return Shape(ne.rbegin(), ne.rend()); }

// ---- parser --------------------------------------------------------------------------------

GgufHeader parse_gguf(const uint8_t* file, size_t size, const std::string& what) {
  const char* w = what.c_str();
  Cursor c(file, size, what);
  MOE_CHECK(size >= 24, "%s: file is %zu bytes, too short for a GGUF header (24)", w, size);
  const uint32_t magic = c.get<uint32_t>("magic");
  MOE_CHECK(magic == kMagic, "%s: bad magic 0x%08x (expected \"GGUF\"); not a GGUF file", w, magic);
  GgufHeader h;
  h.version = c.get<uint32_t>("version");
  MOE_CHECK(h.version == 2 || h.version == 3, "%s: GGUF version %u is not supported (2 or 3)", w, h.version);
  const uint64_t n_tensors = c.get<uint64_t>("tensor count");
  const uint64_t n_kv = c.get<uint64_t>("metadata count");
  MOE_CHECK(n_tensors <= kGgufMaxTensors, "%s: tensor count %llu exceeds the limit of %llu", w,
            static_cast<unsigned long long>(n_tensors), static_cast<unsigned long long>(kGgufMaxTensors));
  MOE_CHECK(n_kv <= kGgufMaxKV, "%s: metadata count %llu exceeds the limit of %llu", w,
            static_cast<unsigned long long>(n_kv), static_cast<unsigned long long>(kGgufMaxKV));

  std::set<std::string> keys;
  for (uint64_t k = 0; k < n_kv; ++k) {
    std::string key = c.str("metadata key", kGgufMaxStringBytes);
    MOE_CHECK(keys.insert(key).second, "%s: metadata key '%s' appears twice", w, key.c_str());
    const uint32_t type = c.get<uint32_t>("metadata value type");
    GgufValue v = read_value(c, type, key);
    if (key == "general.alignment") {
      MOE_CHECK(v.type == GgufType::U32, "%s: general.alignment must be u32, got %s", w, gguf_type_name(v.type));
      MOE_CHECK(v.u > 0 && (v.u & (v.u - 1)) == 0 && v.u <= 65536,
                "%s: general.alignment %llu must be a power of two up to 65536", w,
                static_cast<unsigned long long>(v.u));
      h.alignment = v.u;
    }
    h.kv.emplace_back(std::move(key), std::move(v));
  }

  std::set<std::string> names;
  for (uint64_t k = 0; k < n_tensors; ++k) {
    GgufTensorInfo t;
    t.name = c.str("tensor name", kGgufMaxNameBytes);
    const char* n = t.name.c_str();
    MOE_CHECK(names.insert(t.name).second, "%s: tensor '%s' appears twice", w, n);
    const uint32_t nd = c.get<uint32_t>("tensor dimension count");
    MOE_CHECK(nd >= 1 && nd <= kMaxDims, "%s: tensor '%s': %u dimensions (1..%d supported)", w, n, nd, kMaxDims);
    uint64_t numel = 1;
    for (uint32_t d = 0; d < nd; ++d) {
      const int64_t v = c.get<int64_t>("tensor dimension");
      MOE_CHECK(v >= 0, "%s: tensor '%s': ne[%u] = %lld is negative", w, n, d, static_cast<long long>(v));
      MOE_CHECK(!__builtin_mul_overflow(numel, static_cast<uint64_t>(v), &numel) &&
                    numel <= static_cast<uint64_t>(INT64_MAX),
                "%s: tensor '%s': element count overflows", w, n);
      t.ne.push_back(v);
    }
    const uint32_t type = c.get<uint32_t>("tensor type");
    GgmlTypeInfo ti;
    MOE_CHECK(ggml_type_info(type, &ti), "%s: tensor '%s': unknown ggml type %u", w, n, type);
    t.type = static_cast<GgmlType>(type);
    MOE_CHECK(t.ne[0] % ti.block_elems == 0, "%s: tensor '%s': row length ne[0] = %lld is not a multiple of %s's block of %lld",
              w, n, static_cast<long long>(t.ne[0]), ti.name, static_cast<long long>(ti.block_elems));
    const uint64_t nblocks = numel / static_cast<uint64_t>(ti.block_elems);
    MOE_CHECK(!__builtin_mul_overflow(nblocks, static_cast<uint64_t>(ti.block_bytes), &t.nbytes),
              "%s: tensor '%s': byte size overflows", w, n);
    t.offset = c.get<uint64_t>("tensor offset");
    h.tensors.push_back(std::move(t));
  }

  h.data_start = align_up(c.pos(), h.alignment);
  MOE_CHECK(h.data_start <= size || h.tensors.empty(),
            "%s: data section would start at %llu, past the end of the file (%zu bytes)", w,
            static_cast<unsigned long long>(h.data_start), size);
  const uint64_t data_len = h.data_start <= size ? size - h.data_start : 0;
  for (const GgufTensorInfo& t : h.tensors) {
    const char* n = t.name.c_str();
    MOE_CHECK(t.offset % h.alignment == 0, "%s: tensor '%s': offset %llu is not a multiple of the alignment %llu", w, n,
              static_cast<unsigned long long>(t.offset), static_cast<unsigned long long>(h.alignment));
    MOE_CHECK(t.offset <= data_len && t.nbytes <= data_len - t.offset,
              "%s: tensor '%s': bytes [%llu, +%llu) exceed the data section of %llu bytes (truncated file?)", w, n,
              static_cast<unsigned long long>(t.offset), static_cast<unsigned long long>(t.nbytes),
              static_cast<unsigned long long>(data_len));
  }
  // Overlap: sort by offset; an empty tensor occupies nothing.
  std::vector<const GgufTensorInfo*> order;
  for (const GgufTensorInfo& t : h.tensors)
    if (t.nbytes) order.push_back(&t);
  std::sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->offset < b->offset; });
  for (size_t k = 1; k < order.size(); ++k) {
    const GgufTensorInfo* a = order[k - 1];
    const GgufTensorInfo* b = order[k];
    MOE_CHECK(b->offset >= a->offset + a->nbytes, "%s: tensors '%s' [%llu,+%llu) and '%s' [%llu,+%llu) overlap", w,
              a->name.c_str(), static_cast<unsigned long long>(a->offset), static_cast<unsigned long long>(a->nbytes),
              b->name.c_str(), static_cast<unsigned long long>(b->offset), static_cast<unsigned long long>(b->nbytes));
  }
  return h;
}

// ---- GgufFile ------------------------------------------------------------------------------

std::shared_ptr<GgufFile> GgufFile::open(const std::string& path) {
  const char* p = path.c_str();
  int fd = ::open(p, O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    int err = errno;
    MOE_FAIL("%s: cannot open GGUF file: %s", p, std::strerror(err));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    MOE_FAIL("%s: not a regular file", p);
  }
  if (st.st_size == 0) {
    ::close(fd);
    MOE_FAIL("%s: empty file (0 bytes), not a GGUF file", p);
  }
  const size_t size = static_cast<size_t>(st.st_size);
  // Read-only and shared: dequantised copies are made for every use, nothing writes through it.
  void* m = ::mmap(nullptr, size, PROT_READ, MAP_SHARED, fd, 0);
  int err = errno;
  ::close(fd);
  if (m == MAP_FAILED) MOE_FAIL("%s: mmap of %zu bytes failed: %s", p, size, std::strerror(err));
  std::shared_ptr<GgufFile> f(new GgufFile());
  f->path_ = path;
  f->map_ = m;
  f->size_ = size;
  f->h_ = parse_gguf(static_cast<const uint8_t*>(m), size, path);
  for (size_t i = 0; i < f->h_.tensors.size(); ++i) f->tensor_index_[f->h_.tensors[i].name] = i;
  for (size_t i = 0; i < f->h_.kv.size(); ++i) f->kv_index_[f->h_.kv[i].first] = i;
  return f;
}

GgufFile::~GgufFile() {
  if (map_) ::munmap(map_, size_);
}

const GgufTensorInfo* GgufFile::find_tensor(const std::string& name) const {
  auto it = tensor_index_.find(name);
  return it == tensor_index_.end() ? nullptr : &h_.tensors[it->second];
}

const GgufValue* GgufFile::find(const std::string& key) const {
  auto it = kv_index_.find(key);
  return it == kv_index_.end() ? nullptr : &h_.kv[it->second].second;
}

int64_t GgufFile::get_int(const std::string& key) const {
  const GgufValue* v = find(key);
  MOE_CHECK(v, "%s: missing metadata key '%s'", path_.c_str(), key.c_str());
  int64_t out;
  MOE_CHECK(v->get_int(&out), "%s: metadata key '%s' must be an integer, got %s", path_.c_str(), key.c_str(),
            gguf_type_name(v->type));
  return out;
}

int64_t GgufFile::get_int(const std::string& key, int64_t fallback) const {
  return find(key) ? get_int(key) : fallback;
}

double GgufFile::get_float(const std::string& key, double fallback) const {
  const GgufValue* v = find(key);
  if (!v) return fallback;
  double out;
  MOE_CHECK(v->get_float(&out), "%s: metadata key '%s' must be a number, got %s", path_.c_str(), key.c_str(),
            gguf_type_name(v->type));
  return out;
}

std::string GgufFile::get_string(const std::string& key) const {
  const GgufValue* v = find(key);
  MOE_CHECK(v, "%s: missing metadata key '%s'", path_.c_str(), key.c_str());
  MOE_CHECK(v->type == GgufType::STRING, "%s: metadata key '%s' must be a string, got %s", path_.c_str(), key.c_str(),
            gguf_type_name(v->type));
  return v->s;
}

bool GgufFile::get_bool(const std::string& key, bool fallback) const {
  const GgufValue* v = find(key);
  if (!v) return fallback;
  MOE_CHECK(v->type == GgufType::BOOL, "%s: metadata key '%s' must be a bool, got %s", path_.c_str(), key.c_str(),
            gguf_type_name(v->type));
  return v->u != 0;
}

const uint8_t* GgufFile::data(const GgufTensorInfo& t) const {
  return static_cast<const uint8_t*>(map_) + h_.data_start + t.offset;
}

Tensor GgufFile::dequantize(const std::string& name, MemCategory cat) const {
  const GgufTensorInfo* t = find_tensor(name);
  MOE_CHECK(t, "%s: no tensor '%s'", path_.c_str(), name.c_str());
  const GgmlTypeInfo& ti = ggml_type_info(t->type);
  MOE_CHECK(ti.dequantizable, "%s: tensor '%s' has type %s, which the engine cannot read (supported: f32 f16 bf16 q8_0 q4_0 q4_1 q5_0 q5_1 q2_K q3_K q4_K q5_K q6_K iq4_nl iq4_xs)",
            path_.c_str(), name.c_str(), ti.name);
  Tensor out = Tensor::empty(t->torch_shape(), DType::F32, cat);
  const int64_t row = t->ne[0];
  if (row == 0) return out;
  const int64_t rows = t->numel() / row;
  const size_t row_bytes = ggml_row_bytes(t->type, row);
  const uint8_t* src = data(*t);
  float* dst = out.data<float>();
#pragma omp parallel for schedule(static) if (rows * row > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) dequantize_row(t->type, src + r * row_bytes, dst + r * row, row);
  return out;
}

// ---- writer --------------------------------------------------------------------------------

GgufWriter::GgufWriter(uint64_t alignment) : alignment_(alignment) {
  MOE_CHECK(alignment > 0 && (alignment & (alignment - 1)) == 0, "GGUF writer: alignment %llu is not a power of two",
            static_cast<unsigned long long>(alignment));
  if (alignment != 32) set("general.alignment", GgufValue::u32(static_cast<uint32_t>(alignment)));
}

void GgufWriter::set(const std::string& key, GgufValue v) {
  for (auto& kv : kv_) {
    if (kv.first == key) {
      kv.second = std::move(v);
      return;
    }
  }
  kv_.emplace_back(key, std::move(v));
}

void GgufWriter::add_tensor(const std::string& name, GgmlType type, std::vector<int64_t> ne,
                            std::function<void(uint8_t* dst)> fill) {
  MOE_CHECK(!name.empty() && name.size() < 64, "GGUF writer: tensor name '%s' must be 1..63 bytes (llama.cpp's limit)",
            name.c_str());
  for (const Pending& p : tensors_) MOE_CHECK(p.name != name, "GGUF writer: duplicate tensor '%s'", name.c_str());
  MOE_CHECK(!ne.empty() && ne.size() <= static_cast<size_t>(kMaxDims), "GGUF writer: tensor '%s' has %zu dimensions",
            name.c_str(), ne.size());
  int64_t rows = 1;
  for (size_t d = 1; d < ne.size(); ++d) rows *= ne[d];
  const uint64_t nbytes = ggml_row_bytes(type, ne[0]) * static_cast<uint64_t>(rows);
  tensors_.push_back({name, type, std::move(ne), nbytes, std::move(fill)});
}

void GgufWriter::write(const std::string& path,
                       const std::function<void(size_t, size_t, const std::string&)>& progress) const {
  const char* p = path.c_str();
  std::string head;
  put<uint32_t>(head, kMagic);
  put<uint32_t>(head, 3);
  put<uint64_t>(head, tensors_.size());
  put<uint64_t>(head, kv_.size());
  for (const auto& [key, v] : kv_) {
    put_str(head, key);
    put<uint32_t>(head, static_cast<uint32_t>(v.type));
    if (v.type == GgufType::ARRAY) {
      put<uint32_t>(head, static_cast<uint32_t>(v.elem));
      put<uint64_t>(head, v.arr.size());
      for (const GgufValue& e : v.arr) put_scalar(head, e, v.elem);
    } else {
      put_scalar(head, v, v.type);
    }
  }
  // llama.cpp requires the tensors packed in header order, each padded to the alignment.
  std::vector<uint64_t> offsets;
  uint64_t off = 0;
  for (const Pending& t : tensors_) {
    offsets.push_back(off);
    put_str(head, t.name);
    put<uint32_t>(head, static_cast<uint32_t>(t.ne.size()));
    for (int64_t d : t.ne) put<int64_t>(head, d);
    put<uint32_t>(head, static_cast<uint32_t>(t.type));
    put<uint64_t>(head, off);
    off = align_up(off + t.nbytes, alignment_);
  }
  head.resize(align_up(head.size(), alignment_), '\0');

  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  if (!f) {
    int err = errno;
    MOE_FAIL("%s: cannot create temp file %s: %s", p, tmp.c_str(), std::strerror(err));
  }
  try {
    write_all(f, head.data(), head.size(), path, tmp);
    std::vector<uint8_t> buf;
    const std::vector<uint8_t> zeros(alignment_, 0);
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const Pending& t = tensors_[i];
      if (progress) progress(i, tensors_.size(), t.name);
      buf.assign(t.nbytes, 0);
      if (t.nbytes) t.fill(buf.data());
      write_all(f, buf.data(), buf.size(), path, tmp);
      const uint64_t pad = align_up(t.nbytes, alignment_) - t.nbytes;
      write_all(f, zeros.data(), pad, path, tmp);  // every tensor padded, as llama.cpp writes
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
}

}  // namespace moe
