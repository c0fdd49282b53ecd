// bnb_checkpoint.cpp — see bnb_checkpoint.h.
#include "io/bnb_checkpoint.h"

#include <cstring>
#include <filesystem>
#include <fstream>
#include <set>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "core/bnb4.h"
#include "core/error.h"
#include "core/file_util.h"
#include "core/json_util.h"
#include "core/nf4.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "model/arch.h"

namespace moe {
namespace {

const char* const kNf4State = ".quant_state.bitsandbytes__nf4";
const char* const kFp4State = ".quant_state.bitsandbytes__fp4";

// A checkpoint tensor's bytes as a host vector of T, checking its dtype and element count.
template <typename T>
std::vector<T> read_as(const Checkpoint& ck, const std::string& name, DType dt, int64_t count) {
  const Tensor t = ck.get(name);
  MOE_CHECK(t.dtype() == dt, "checkpoint %s: tensor %s must be %s, got %s", ck.dir().c_str(), name.c_str(),
            dtype_name(dt), dtype_name(t.dtype()));
  MOE_CHECK(count < 0 || t.numel() == count, "checkpoint %s: tensor %s holds %lld values, expected %lld", ck.dir().c_str(),
            name.c_str(), static_cast<long long>(t.numel()), static_cast<long long>(count));
  std::vector<T> v(static_cast<size_t>(t.numel()));
  std::memcpy(v.data(), t.data<T>(), v.size() * sizeof(T));
  return v;
}

Tensor u8_tensor(const Shape& shape, const uint8_t* bytes) {
  Tensor t = Tensor::empty(shape, DType::U8, MemCategory::Weights);
  std::memcpy(t.data<uint8_t>(), bytes, static_cast<size_t>(t.numel()));
  return t;
}

Tensor f32_tensor(const Shape& shape, const float* values) {
  Tensor t = Tensor::empty(shape, DType::F32, MemCategory::Weights);
  std::memcpy(t.data<float>(), values, static_cast<size_t>(t.numel()) * 4);
  return t;
}

const char* torch_dtype_name(DType dt) {
  switch (dt) {
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    default: return "float32";
  }
}

}  // namespace

bool is_bnb4_companion(const std::string& n) {
  for (const char* suffix : {".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map", kNf4State, kFp4State}) {
    const size_t len = std::strlen(suffix);
    if (n.size() > len && n.compare(n.size() - len, len, suffix) == 0) return true;
  }
  return false;
}

bool is_bnb4_weight(const Checkpoint& ck, const std::string& name) {
  MOE_CHECK(!ck.has(name + kFp4State), "checkpoint %s: tensor %s is bitsandbytes FP4, which the engine does not "
            "read (quantize with bnb_4bit_quant_type nf4)", ck.dir().c_str(), name.c_str());
  return ck.has(name + kNf4State);
}

Tensor read_bnb4_weight(const Checkpoint& ck, const std::string& name) {
  const std::string what = "checkpoint " + ck.dir() + ": " + name + kNf4State;
  const std::vector<uint8_t> js = read_as<uint8_t>(ck, name + kNf4State, DType::U8, -1);
  const Bnb4State s = parse_bnb4_state(std::string_view(reinterpret_cast<const char*>(js.data()), js.size()), what);
  MOE_CHECK(s.quant_type == "nf4", "%s: quant_type '%s' is not nf4", what.c_str(), s.quant_type.c_str());
  MOE_CHECK(s.shape.size() == 2, "%s: the engine reads 2-D bitsandbytes weights, this one is %zu-D", what.c_str(),
            s.shape.size());
  const int64_t rows = s.shape[0], cols = s.shape[1], n = rows * cols;
  MOE_CHECK(n > 0 && n % 2 == 0, "%s: shape [%lld, %lld] is empty or has an odd number of values", what.c_str(),
            (long long)rows, (long long)cols);
  const int64_t blocks = (n + s.blocksize - 1) / s.blocksize;
  const std::vector<uint8_t> packed = read_as<uint8_t>(ck, name, DType::U8, n / 2);
  const std::vector<float> map = read_as<float>(ck, name + ".quant_map", DType::F32, 16);
  std::vector<float> absmax;
  if (s.nested) {
    const std::vector<uint8_t> codes = read_as<uint8_t>(ck, name + ".absmax", DType::U8, blocks);
    const int64_t groups = (blocks + s.nested_blocksize - 1) / s.nested_blocksize;
    const std::vector<float> nested = read_as<float>(ck, name + ".nested_absmax", DType::F32, groups);
    const std::vector<float> nmap = read_as<float>(ck, name + ".nested_quant_map", DType::F32, 256);
    absmax.resize(static_cast<size_t>(blocks));
    bnb4_decode_absmax(absmax.data(), codes.data(), blocks, nested.data(), nmap.data(), s.nested_blocksize,
                       static_cast<float>(s.nested_offset));
  } else {
    absmax = read_as<float>(ck, name + ".absmax", DType::F32, blocks);
  }
  // The engine's NF4 when the file's code table is NF4's and its blocks are 64 values along rows.
  bool nf4_table = true;
  for (int i = 0; i < 16; ++i) nf4_table &= map[i] == kNf4Codes[i];
  if (nf4_table && s.blocksize == kNf4Block && cols % kNf4Block == 0) {
    Tensor t = Tensor::empty({rows, cols}, DType::NF4, MemCategory::Weights);
    bnb4_to_nf4_blocks(t.data<uint8_t>(), packed.data(), absmax.data(), n);
    return t;
  }
  Tensor t = Tensor::empty({rows, cols}, DType::F32, MemCategory::Weights);
  bnb4_dequantize(t.data<float>(), packed.data(), n, absmax.data(), map.data(), s.blocksize);
  return t;
}

std::vector<std::pair<std::string, Tensor>> bnb4_weight_tensors(const std::string& name, const Tensor& w,
                                                                bool double_quant, const std::string& torch_dtype) {
  MOE_CHECK(w.ndim() == 2 && w.dim(1) % kNf4Block == 0, "bnb4: %s %s is not a 2-D weight with rows of whole blocks of 64",
            name.c_str(), w.desc().c_str());
  const Tensor f = w.dtype() == DType::F32 ? w : w.to_dtype(DType::F32, MemCategory::Workspace);
  const int64_t n = w.numel();
  const Bnb4Tensors q = bnb4_quantize(f.data<float>(), n, double_quant);
  std::vector<std::pair<std::string, Tensor>> out;
  out.emplace_back(name, u8_tensor({n / 2, 1}, q.packed.data()));
  if (double_quant) {
    out.emplace_back(name + ".absmax", u8_tensor({static_cast<int64_t>(q.absmax_codes.size())}, q.absmax_codes.data()));
    out.emplace_back(name + ".nested_absmax",
                     f32_tensor({static_cast<int64_t>(q.nested_absmax.size())}, q.nested_absmax.data()));
    out.emplace_back(name + ".nested_quant_map", f32_tensor({256}, bnb_dynamic_map().data()));
  } else {
    out.emplace_back(name + ".absmax", f32_tensor({static_cast<int64_t>(q.absmax.size())}, q.absmax.data()));
  }
  out.emplace_back(name + ".quant_map", f32_tensor({16}, kNf4Codes));
  Bnb4State s;
  s.blocksize = kNf4Block;
  s.dtype = torch_dtype;
  s.shape = {w.dim(0), w.dim(1)};
  s.nested = double_quant;
  s.nested_offset = q.offset;
  const std::string js = bnb4_state_json(s);
  out.emplace_back(name + kNf4State, u8_tensor({static_cast<int64_t>(js.size())},
                                               reinterpret_cast<const uint8_t*>(js.data())));
  return out;
}

Bnb4DirStats write_bnb4_dir(const std::string& src, const std::string& out, bool double_quant,
                            const std::function<void(size_t, size_t, const std::string&)>& progress) {
  namespace fs = std::filesystem;
  MOE_CHECK(!is_gguf_path(out), "--type nf4 writes a model directory (bitsandbytes' format), not a .gguf: %s",
            out.c_str());
  MOE_CHECK(!fs::exists(out), "%s already exists: give a new directory (nothing was written)", out.c_str());
  const std::string cfg_path = src + "/config.json";
  const ModelConfig c = load_hf_config(cfg_path);
  const ArchSpec& a = arch_spec(c.model_type);
  // The modules that stay unquantized, by module name (tensor name without ".weight").
  std::set<std::string> keep_modules;
  auto keep = [&](const char* tmpl, long layer) {
    if (tmpl) keep_modules.insert(tensor_name(tmpl, layer, -1, ""));
  };
  keep(a.embed, -1);
  keep(a.lm_head, -1);
  for (int64_t l = 0; l < c.n_layer; ++l) {
    keep(a.router, l);
    keep(a.shared_expert_gate, l);
  }
  nlohmann::ordered_json cfg = parse_ordered_json(read_file(cfg_path), cfg_path);
  std::vector<std::string> skip(keep_modules.begin(), keep_modules.end());
  cfg["quantization_config"] = {{"quant_method", "bitsandbytes"},
                                {"load_in_4bit", true},
                                {"load_in_8bit", false},
                                {"bnb_4bit_quant_type", "nf4"},
                                {"bnb_4bit_use_double_quant", double_quant},
                                {"bnb_4bit_compute_dtype", "bfloat16"},
                                {"bnb_4bit_quant_storage", "uint8"},
                                {"llm_int8_skip_modules", skip},
                                {"llm_int8_threshold", 6.0},
                                {"llm_int8_has_fp16_weight", false},
                                {"llm_int8_enable_fp32_cpu_offload", false}};

  const Checkpoint ck = Checkpoint::open_dir(src);
  std::vector<std::pair<std::string, Tensor>> tensors;
  Bnb4DirStats st;
  const std::vector<std::string> names = ck.names();
  for (size_t i = 0; i < names.size(); ++i) {
    const std::string& name = names[i];
    MOE_CHECK(!is_bnb4_companion(name) && !is_bnb4_weight(ck, name), "%s: tensor %s is already bitsandbytes-quantized",
              src.c_str(), name.c_str());
    const Tensor t = ck.get(name);
    st.params += t.numel();
    const bool is_weight = name.size() > 7 && name.compare(name.size() - 7, 7, ".weight") == 0;
    const std::string module = is_weight ? name.substr(0, name.size() - 7) : name;
    // Like transformers' skip list, a kept name also keeps the modules it is a prefix of.
    bool kept = !is_weight || t.ndim() != 2 || t.dim(1) % 64 != 0 ||
                !(t.dtype() == DType::F32 || t.dtype() == DType::BF16 || t.dtype() == DType::F16);
    for (const std::string& k : keep_modules) kept |= module.find(k) != std::string::npos;
    st.bytes_total += kept ? t.nbytes() : 0;
    if (kept) {
      tensors.emplace_back(name, t);
      ++st.kept;
      continue;
    }
    if (progress) progress(i, names.size(), name);
    st.bytes_before += t.nbytes();
    st.quantized_params += t.numel();
    for (auto& p : bnb4_weight_tensors(name, t, double_quant, torch_dtype_name(t.dtype()))) {
      st.bytes_after += p.second.nbytes();
      st.bytes_total += p.second.nbytes();
      tensors.push_back(std::move(p));
    }
    ++st.quantized;
  }
  MOE_CHECK(st.quantized > 0, "%s: no weight could be quantized (2-D float weights with rows of whole blocks of 64)",
            src.c_str());

  // Everything goes into a temporary directory beside `out`, renamed into place at the end.
  const std::string tmp = out + ".tmp-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    write_safetensors(tmp + "/model.safetensors", tensors);
    std::ofstream(tmp + "/config.json") << cfg.dump(2) << "\n";
    MOE_CHECK(std::filesystem::file_size(tmp + "/config.json") > 2, "%s/config.json: write failed", tmp.c_str());
    for (const char* f : {"tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                          "chat_template.jinja", "generation_config.json"})
      if (is_regular_file(src + "/" + f)) fs::copy_file(src + "/" + f, tmp + "/" + f);
    fs::rename(tmp, out);
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
  return st;
}

}  // namespace moe
