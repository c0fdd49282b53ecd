// gguf_model.cpp — GGUF <-> the engine's model families (see gguf_model.h for the mapping).
//
// Layering note: the HF tensor names come from the ArchSpec table (model/arch.h), the one place
// that knows them (DESIGN.md invariant 4); only that table is used from model/.
#include "io/gguf_model.h"

#include <algorithm>
#include <charconv>
#include <cstdlib>
#include <cstring>
#include <map>
#include <set>

#include "core/error.h"
#include "io/gguf.h"
#include "io/safetensors.h"
#include "tokenizer/gguf_vocab.h"
#include "model/arch.h"

namespace moe {
namespace {

struct Role {
  const char* gguf;                   // GGUF role name ("attn_q", "ffn_gate_exps", ...)
  const char* ArchSpec::*field;       // the HF name template in the ArchSpec
  bool per_layer;
  bool experts;                       // stacked [E, ...] in GGUF, per-expert tensors in HF
};

const Role kRoles[] = {
    {"token_embd", &ArchSpec::embed, false, false},
    {"output_norm", &ArchSpec::final_norm, false, false},
    {"output", &ArchSpec::lm_head, false, false},
    {"attn_norm", &ArchSpec::attn_norm, true, false},
    {"ffn_norm", &ArchSpec::ffn_norm, true, false},
    {"attn_q", &ArchSpec::q_proj, true, false},
    {"attn_k", &ArchSpec::k_proj, true, false},
    {"attn_v", &ArchSpec::v_proj, true, false},
    {"attn_output", &ArchSpec::o_proj, true, false},
    {"attn_q_norm", &ArchSpec::q_norm, true, false},
    {"attn_k_norm", &ArchSpec::k_norm, true, false},
    {"ffn_gate_inp", &ArchSpec::router, true, false},
    {"ffn_gate_exps", &ArchSpec::expert_gate, true, true},
    {"ffn_up_exps", &ArchSpec::expert_up, true, true},
    {"ffn_down_exps", &ArchSpec::expert_down, true, true},
    {"ffn_gate_shexp", &ArchSpec::shared_gate, true, false},
    {"ffn_up_shexp", &ArchSpec::shared_up, true, false},
    {"ffn_down_shexp", &ArchSpec::shared_down, true, false},
    {"ffn_gate_inp_shexp", &ArchSpec::shared_expert_gate, true, false},
    {"ffn_gate", &ArchSpec::dense_gate, true, false},
    {"ffn_up", &ArchSpec::dense_up, true, false},
    {"ffn_down", &ArchSpec::dense_down, true, false},
};

const Role* find_role(const std::string& r) {
  for (const Role& role : kRoles)
    if (r == role.gguf) return &role;
  return nullptr;
}

struct Family {
  const char* model_type;
  const char* gguf_arch;
  bool permute_qk;      // llama.cpp's LLAMA arch uses interleaved RoPE pairs
  bool default_norm_topk;
};

const Family kFamilies[] = {
    {"mixtral", "llama", true, true},
    {"qwen2_moe", "qwen2moe", false, false},
    {"qwen3_moe", "qwen3moe", false, true},
};

const Family& family_by_model_type(const std::string& mt) {
  for (const Family& f : kFamilies)
    if (mt == f.model_type) return f;
  MOE_FAIL("GGUF: model_type '%s' has no GGUF mapping (supported: mixtral, qwen2_moe, qwen3_moe)", mt.c_str());
}

// A parsed GGUF tensor name: [blk.N.]ROLE.SUFFIX, or blk.N.ffn_{gate,up,down}.E.SUFFIX: one
// expert's matrix as llama.cpp's converter wrote Mixtral before the stacked ffn_*_exps tensors
// (the layout of most Mixtral GGUF files published in 2023-24, which llama.cpp's own loader no
// longer reads: its names table keeps "blk.%d.ffn_gate.%d", no loader uses it); the role is
// then ffn_*_exps.
struct ParsedName {
  long layer = -1;
  long expert = -1;
  std::string role, suffix;
};

bool parse_name(const std::string& name, ParsedName* out) {
  std::string rest = name;
  if (rest.rfind("blk.", 0) == 0) {
    const size_t dot = rest.find('.', 4);
    if (dot == std::string::npos || dot == 4 || dot - 4 > 6) return false;
    long l = 0;
    for (size_t i = 4; i < dot; ++i) {
      if (rest[i] < '0' || rest[i] > '9') return false;
      l = l * 10 + (rest[i] - '0');
    }
    out->layer = l;
    rest = rest.substr(dot + 1);
  }
  const size_t dot = rest.rfind('.');
  if (dot == std::string::npos || dot == 0) return false;
  out->role = rest.substr(0, dot);
  out->suffix = rest.substr(dot + 1);
  if (const size_t e = out->role.rfind('.'); e != std::string::npos && out->layer >= 0) {
    const std::string base = out->role.substr(0, e), idx = out->role.substr(e + 1);
    if ((base == "ffn_gate" || base == "ffn_up" || base == "ffn_down") && !idx.empty() && idx.size() <= 6 &&
        idx.find_first_not_of("0123456789") == std::string::npos) {
      out->expert = std::stol(idx);
      out->role = base + "_exps";
    }
  }
  return out->suffix == "weight" || out->suffix == "bias";
}

// A float stored as f32 in GGUF back to the decimal a config.json would hold: the shortest
// decimal that rounds to the same f32 (1e-5f -> 1e-05), parsed as double.
double f32_to_decimal(double v) {
  char buf[64];
  auto r = std::to_chars(buf, buf + sizeof buf - 1, static_cast<float>(v));
  *r.ptr = '\0';
  return std::strtod(buf, nullptr);
}

// GGUF row h*Dh + 2i + p <-> HF row h*Dh + p*Dh/2 + i (see gguf_model.h). `rows` rows of
// `row_bytes` bytes (floats, or whole rows of quantized blocks); to_gguf picks the direction.
void permute_row_bytes(uint8_t* data, int64_t rows, size_t row_bytes, int64_t n_heads, bool to_gguf,
                       const std::string& what) {
  MOE_CHECK(n_heads > 0 && rows % n_heads == 0 && (rows / n_heads) % 2 == 0,
            "%s: %lld rows cannot be split into %lld heads of an even size for the RoPE permutation", what.c_str(),
            static_cast<long long>(rows), static_cast<long long>(n_heads));
  const int64_t dh = rows / n_heads, half = dh / 2;
  std::vector<uint8_t> src(data, data + static_cast<size_t>(rows) * row_bytes);
  for (int64_t h = 0; h < n_heads; ++h) {
    for (int64_t i = 0; i < half; ++i) {
      for (int64_t p = 0; p < 2; ++p) {
        const int64_t g = h * dh + 2 * i + p, f = h * dh + p * half + i;
        const int64_t dst_row = to_gguf ? g : f, src_row = to_gguf ? f : g;
        std::memcpy(data + static_cast<size_t>(dst_row) * row_bytes, src.data() + static_cast<size_t>(src_row) * row_bytes,
                    row_bytes);
      }
    }
  }
}

void permute_rows(float* data, int64_t rows, int64_t cols, int64_t n_heads, bool to_gguf, const std::string& what) {
  permute_row_bytes(reinterpret_cast<uint8_t*>(data), rows, static_cast<size_t>(cols) * 4, n_heads, to_gguf, what);
}

// The roles whose weights go through linear_forward / the expert GEMMs (GgufLoadOptions).
bool is_projection(const std::string& role) {
  static const char* const k[] = {"attn_q",         "attn_k",      "attn_v",        "attn_output",
                                  "ffn_gate_exps",  "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp",
                                  "ffn_up_shexp",   "ffn_down_shexp", "ffn_gate",   "ffn_up",
                                  "ffn_down",       "output"};
  for (const char* r : k)
    if (role == r) return true;
  return false;
}

std::string base_name(std::string dir) {
  while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
  const size_t s = dir.rfind('/');
  return s == std::string::npos ? dir : dir.substr(s + 1);
}

ModelConfig config_from_gguf(const GgufFile& f, const Family** fam_out) {
  const std::string& p = f.path();
  const char* w = p.c_str();
  const std::string arch = f.get_string("general.architecture");
  const Family* fam = nullptr;
  for (const Family& c : kFamilies)
    if (arch == c.gguf_arch) fam = &c;
  MOE_CHECK(fam, "%s: general.architecture '%s' is not supported (supported: llama with experts (Mixtral), qwen2moe, qwen3moe)",
            w, arch.c_str());
  *fam_out = fam;
  const std::string a = arch + ".";
  ModelConfig c;
  c.model_type = fam->model_type;
  c.n_layer = f.get_int(a + "block_count");
  c.hidden_size = f.get_int(a + "embedding_length");
  c.n_head = f.get_int(a + "attention.head_count");
  c.n_head_kv = f.get_int(a + "attention.head_count_kv", c.n_head);
  c.n_expert = f.get_int(a + "expert_count", 0);
  MOE_CHECK(c.n_expert > 0, "%s: %sexpert_count is missing or 0: a dense model, which the engine does not run", w, a.c_str());
  c.n_expert_used = f.get_int(a + "expert_used_count");
  MOE_CHECK(c.n_head > 0, "%s: %sattention.head_count must be positive", w, a.c_str());
  c.head_dim = f.get_int(a + "attention.key_length", c.hidden_size / c.n_head);
  MOE_CHECK(f.get_int(a + "attention.value_length", c.head_dim) == c.head_dim,
            "%s: %sattention.value_length differs from key_length; not supported", w, a.c_str());
  c.intermediate_size = f.get_int(a + "feed_forward_length", 0);
  if (c.model_type == "mixtral") {
    c.moe_intermediate_size = c.intermediate_size;
  } else {
    c.moe_intermediate_size = f.get_int(a + "expert_feed_forward_length");
    if (c.intermediate_size == 0) c.intermediate_size = c.moe_intermediate_size;
  }
  if (c.model_type == "qwen2_moe") {
    c.shared_expert_intermediate_size =
        f.find_tensor("blk.0.ffn_gate_shexp.weight") ? f.get_int(a + "expert_shared_feed_forward_length") : 0;
  }
  c.norm_topk_prob = f.get_bool(a + "expert_weights_norm", fam->default_norm_topk);
  c.rope_theta = f32_to_decimal(f.get_float(a + "rope.freq_base", 10000.0));
  c.rms_norm_eps = f32_to_decimal(f.get_float(a + "attention.layer_norm_rms_epsilon", 1e-6));
  c.max_position_embeddings = f.get_int(a + "context_length", 4096);
  c.bos_token_id = f.get_int("tokenizer.ggml.bos_token_id", -1);
  c.eos_token_id = f.get_int("tokenizer.ggml.eos_token_id", -1);
  c.tie_word_embeddings = f.find_tensor("output.weight") == nullptr;
  c.attn_qkv_bias = f.find_tensor("blk.0.attn_q.bias") != nullptr;
  c.attn_o_bias = f.find_tensor("blk.0.attn_output.bias") != nullptr;
  c.qk_norm = c.model_type == "qwen3_moe" ? QkNormKind::PerHead : QkNormKind::None;
  // Vocabulary size: the explicit key, else the tokenizer's list, else the embedding's rows.
  if (const GgufValue* v = f.find(a + "vocab_size")) {
    MOE_CHECK(v->get_int(&c.vocab_size), "%s: %svocab_size must be an integer", w, a.c_str());
  } else if (const GgufValue* t = f.find("tokenizer.ggml.tokens"); t && t->type == GgufType::ARRAY) {
    c.vocab_size = static_cast<int64_t>(t->arr.size());
  } else {
    const GgufTensorInfo* e = f.find_tensor("token_embd.weight");
    MOE_CHECK(e && e->ne.size() == 2, "%s: cannot tell the vocabulary size (no %svocab_size, tokens or token_embd)", w,
              a.c_str());
    c.vocab_size = e->ne[1];
  }
  // Dense layers are those without a router.
  c.decoder_sparse_step = 1;
  for (int64_t l = 0; l < c.n_layer && l < 1'000'000; ++l)
    if (!f.find_tensor("blk." + std::to_string(l) + ".ffn_gate_inp.weight")) c.mlp_only_layers.push_back(l);
  MOE_CHECK(c.model_type != "mixtral" || c.mlp_only_layers.empty(), "%s: a llama-arch MoE layer lacks ffn_gate_inp", w);
  const int64_t ft = f.get_int("general.file_type", 0);
  c.torch_dtype = ft == 1 ? DType::F16 : ft == 32 ? DType::BF16 : DType::F32;
  // Validate with the same rules as config.json (family constraints, sizes, limits).
  try {
    return parse_hf_config(hf_config_to_json(c), p + " (as config.json)");
  } catch (const Error& e) {
    MOE_FAIL("%s: hyperparameters are not a valid %s model: %s", w, c.model_type.c_str(), e.what());
  }
}

}  // namespace

ModelConfig load_gguf_config(const std::string& path) {
  auto f = GgufFile::open(path);
  const Family* fam = nullptr;
  return config_from_gguf(*f, &fam);
}

GgufModel load_gguf_model(const std::string& path, const GgufLoadOptions& opt) {
  auto f = GgufFile::open(path);
  const char* w = path.c_str();
  const Family* fam = nullptr;
  GgufModel m;
  m.config = config_from_gguf(*f, &fam);
  const ModelConfig& c = m.config;
  const ArchSpec& spec = arch_spec(c.model_type);
  std::set<std::string> seen;  // HF names produced so far
  for (const GgufTensorInfo& t : f->tensors()) {
    ParsedName pn;
    const char* n = t.name.c_str();
    MOE_CHECK(parse_name(t.name, &pn), "%s: tensor '%s': name is not [blk.N.]ROLE.weight|bias", w, n);
    const Role* role = find_role(pn.role);
    MOE_CHECK(role, "%s: tensor '%s': unknown role '%s' for %s", w, n, pn.role.c_str(), c.model_type.c_str());
    const char* tmpl = spec.*(role->field);
    MOE_CHECK(tmpl, "%s: tensor '%s': %s has no such tensor", w, n, c.model_type.c_str());
    MOE_CHECK(role->per_layer == (pn.layer >= 0), "%s: tensor '%s': %s", w, n,
              role->per_layer ? "needs a blk.N. prefix" : "must not have a blk.N. prefix");
    MOE_CHECK(pn.layer < c.n_layer, "%s: tensor '%s': layer %ld beyond block_count %lld", w, n, pn.layer,
              static_cast<long long>(c.n_layer));
    const char* suffix = pn.suffix == "bias" ? ".bias" : ".weight";
    DType qdt = DType::F32;
    const bool keep = opt.keep_quantized && pn.suffix == "weight" && is_projection(pn.role) &&
                      dtype_from_ggml_type(t.type, &qdt) && t.ne.size() >= 2;
    // 16-bit floats stay as stored too: widened to f32 they would double the model's memory
    // and the bytes every decode step reads (the model keeps the file's dtype by default).
    const bool half = t.type == GgmlType::BF16 || t.type == GgmlType::F16;
    Tensor x;
    if (keep || half) {  // the blocks or values as stored (the reader validated sizes and offsets)
      const DType sdt = keep ? qdt : t.type == GgmlType::BF16 ? DType::BF16 : DType::F16;
      x = Tensor::empty(t.torch_shape(), sdt, keep ? MemCategory::QuantWeights : MemCategory::Weights);
      MOE_CHECK(x.nbytes() == t.nbytes, "%s: tensor '%s': %llu bytes, expected %zu for %s %s", w, n,
                static_cast<unsigned long long>(t.nbytes), x.nbytes(), dtype_name(sdt), x.shape_str().c_str());
      std::memcpy(x.raw(), f->data(t), x.nbytes());
    } else {
      x = f->dequantize(t.name);
    }
    if (fam->permute_qk && (pn.role == "attn_q" || pn.role == "attn_k")) {
      const int64_t heads = pn.role == "attn_q" ? c.n_head : c.n_head_kv;
      const int64_t rows = x.dim(0), cols = x.ndim() == 1 ? 1 : x.numel() / rows;
      permute_row_bytes(static_cast<uint8_t*>(x.raw()), rows, dtype_nbytes(x.dtype(), cols), heads, /*to_gguf=*/false,
                        path + ": tensor " + t.name);
    }
    auto add = [&](std::string hf, Tensor v) {
      MOE_CHECK(seen.insert(hf).second, "%s: tensor '%s': %s is given twice (stacked and per-expert tensors of one layer?)",
                w, n, hf.c_str());
      m.tensors.emplace_back(std::move(hf), std::move(v));
    };
    if (role->experts && pn.expert >= 0) {
      MOE_CHECK(pn.expert < c.n_expert && x.ndim() == 2, "%s: tensor '%s': expert %ld of %lld, shape %s (expected [rows, cols])",
                w, n, pn.expert, static_cast<long long>(c.n_expert), x.shape_str().c_str());
      add(tensor_name(tmpl, pn.layer, pn.expert, suffix), x);
      continue;
    }
    if (role->experts) {
      MOE_CHECK(x.ndim() == 3 && x.dim(0) == c.n_expert, "%s: tensor '%s': shape %s, expected [%lld experts, rows, cols]",
                w, n, x.shape_str().c_str(), static_cast<long long>(c.n_expert));
      for (int64_t e = 0; e < c.n_expert; ++e) add(tensor_name(tmpl, pn.layer, e, suffix), x.select(e));
      continue;
    }
    if (role->field == &ArchSpec::shared_expert_gate && x.ndim() == 1) x = x.view({1, x.dim(0)});
    add(tensor_name(tmpl, pn.layer, -1, suffix), x);
  }
  return m;
}

// ---- writer --------------------------------------------------------------------------------

bool gguf_file_type_from_name(const std::string& s, GgufFileType* out) {
  static const std::pair<const char*, GgufFileType> names[] = {
      {"f32", GgufFileType::F32},   {"f16", GgufFileType::F16},       {"bf16", GgufFileType::BF16},
      {"q8_0", GgufFileType::Q8_0}, {"q4_0", GgufFileType::Q4_0},     {"q4_k_m", GgufFileType::Q4_K_M},
      {"q5_k_m", GgufFileType::Q5_K_M}, {"q6_k", GgufFileType::Q6_K}, {"q4_1", GgufFileType::Q4_1},
      {"q5_0", GgufFileType::Q5_0},     {"q5_1", GgufFileType::Q5_1},
  };
  std::string lower = s;
  for (char& ch : lower) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  for (const auto& [n, t] : names) {
    if (lower == n) {
      *out = t;
      return true;
    }
  }
  return false;
}

const char* gguf_file_type_name(GgufFileType t) {
  switch (t) {
    case GgufFileType::F32: return "f32";
    case GgufFileType::F16: return "f16";
    case GgufFileType::BF16: return "bf16";
    case GgufFileType::Q8_0: return "q8_0";
    case GgufFileType::Q4_0: return "q4_0";
    case GgufFileType::Q4_K_M: return "q4_k_m";
    case GgufFileType::Q5_K_M: return "q5_k_m";
    case GgufFileType::Q6_K: return "q6_k";
    case GgufFileType::Q4_1: return "q4_1";
    case GgufFileType::Q5_0: return "q5_0";
    case GgufFileType::Q5_1: return "q5_1";
  }
  return "?";
}

uint32_t gguf_llama_ftype(GgufFileType t) {
  switch (t) {
    case GgufFileType::F32: return 0;
    case GgufFileType::F16: return 1;
    case GgufFileType::BF16: return 32;
    case GgufFileType::Q8_0: return 7;
    case GgufFileType::Q4_0: return 2;
    case GgufFileType::Q4_K_M: return 15;
    case GgufFileType::Q5_K_M: return 17;
    case GgufFileType::Q6_K: return 18;
    case GgufFileType::Q4_1: return 3;
    case GgufFileType::Q5_0: return 8;
    case GgufFileType::Q5_1: return 9;
  }
  return 0;
}

GgmlType gguf_tensor_type(GgufFileType t, const std::string& name, const std::vector<int64_t>& ne, int64_t n_layer) {
  if (ne.size() <= 1 || name.find("ffn_gate_inp") != std::string::npos) return GgmlType::F32;
  ParsedName pn;
  const bool parsed = parse_name(name, &pn);
  const bool is_output = name == "output.weight";
  // llama.cpp's use_more_bits: the first and last eighth of the layers and every third between.
  auto more_bits = [&](long i) { return i < n_layer / 8 || i >= 7 * n_layer / 8 || (i - n_layer / 8) % 3 == 2; };
  const bool bump = parsed && pn.layer >= 0 && (pn.role == "attn_v" || pn.role == "ffn_down" || pn.role == "ffn_down_exps") &&
                    more_bits(pn.layer);
  GgmlType want = GgmlType::F32;
  switch (t) {
    case GgufFileType::F32: return GgmlType::F32;
    case GgufFileType::F16: return GgmlType::F16;
    case GgufFileType::BF16: return GgmlType::BF16;
    case GgufFileType::Q8_0: want = GgmlType::Q8_0; break;
    case GgufFileType::Q4_0: want = is_output ? GgmlType::Q6_K : GgmlType::Q4_0; break;
    case GgufFileType::Q4_1: want = is_output ? GgmlType::Q6_K : GgmlType::Q4_1; break;
    case GgufFileType::Q5_0: want = is_output ? GgmlType::Q6_K : GgmlType::Q5_0; break;
    case GgufFileType::Q5_1: want = is_output ? GgmlType::Q6_K : GgmlType::Q5_1; break;
    case GgufFileType::Q4_K_M: want = is_output || bump ? GgmlType::Q6_K : GgmlType::Q4_K; break;
    case GgufFileType::Q5_K_M: want = is_output || bump ? GgmlType::Q6_K : GgmlType::Q5_K; break;
    case GgufFileType::Q6_K: want = GgmlType::Q6_K; break;
  }
  // Rows that are not a whole number of blocks fall back to a 32-value block as llama.cpp's
  // quantizer does (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0), then to f16.
  if (ne[0] % ggml_type_info(want).block_elems == 0) return want;
  if (ne[0] % kQK8_0 != 0) return GgmlType::F16;
  if (want == GgmlType::Q4_K) return GgmlType::Q5_0;
  if (want == GgmlType::Q5_K) return GgmlType::Q5_1;
  return GgmlType::Q8_0;
}

void write_gguf(const std::string& model_dir, const std::string& out_path, const GgufWriteOptions& opt) {
  const std::string cfg_path = model_dir + "/config.json";
  const ModelConfig c = load_hf_config(cfg_path);
  const Family& fam = family_by_model_type(c.model_type);
  const ArchSpec& spec = arch_spec(c.model_type);
  auto ck = std::make_shared<Checkpoint>(Checkpoint::open_dir(model_dir));
  const std::string a = std::string(fam.gguf_arch) + ".";
  const std::string md = model_dir;

  GgufWriter wr;
  auto u32 = [](int64_t v) { return GgufValue::u32(static_cast<uint32_t>(v)); };
  wr.set("general.architecture", GgufValue::str(fam.gguf_arch));
  wr.set("general.name", GgufValue::str(opt.name.empty() ? base_name(model_dir) : opt.name));
  wr.set("general.file_type", u32(gguf_llama_ftype(opt.type)));
  wr.set("general.quantization_version", u32(2));
  wr.set(a + "vocab_size", u32(c.vocab_size));
  wr.set(a + "context_length", u32(c.max_position_embeddings));
  wr.set(a + "embedding_length", u32(c.hidden_size));
  wr.set(a + "block_count", u32(c.n_layer));
  wr.set(a + "feed_forward_length", u32(c.intermediate_size));
  wr.set(a + "attention.head_count", u32(c.n_head));
  wr.set(a + "attention.head_count_kv", u32(c.n_head_kv));
  wr.set(a + "attention.key_length", u32(c.head_dim));
  wr.set(a + "attention.value_length", u32(c.head_dim));
  wr.set(a + "rope.dimension_count", u32(c.head_dim));
  wr.set(a + "rope.freq_base", GgufValue::f32(static_cast<float>(c.rope_theta)));
  wr.set(a + "attention.layer_norm_rms_epsilon", GgufValue::f32(static_cast<float>(c.rms_norm_eps)));
  wr.set(a + "expert_count", u32(c.n_expert));
  wr.set(a + "expert_used_count", u32(c.n_expert_used));
  if (c.model_type != "mixtral") wr.set(a + "expert_feed_forward_length", u32(c.moe_intermediate_size));
  if (c.model_type == "qwen2_moe") wr.set(a + "expert_shared_feed_forward_length", u32(c.shared_expert_intermediate_size));
  wr.set(a + "expert_weights_norm", GgufValue::boolean(c.norm_topk_prob));
  if (opt.vocab) {
    MOE_CHECK(static_cast<int64_t>(opt.vocab->tokens.size()) == c.vocab_size,
              "%s: the tokenizer lists %zu tokens for %lld embedding rows", model_dir.c_str(), opt.vocab->tokens.size(),
              static_cast<long long>(c.vocab_size));
    write_gguf_vocab(wr, *opt.vocab);
  } else {
    wr.set("tokenizer.ggml.model", GgufValue::str("none"));
    if (c.bos_token_id >= 0) wr.set("tokenizer.ggml.bos_token_id", u32(c.bos_token_id));
    if (c.eos_token_id >= 0) wr.set("tokenizer.ggml.eos_token_id", u32(c.eos_token_id));
  }

  // The tensors, in llama.cpp's usual order.
  struct Item {
    std::string gguf;
    std::vector<std::string> hf;  // one, or E per-expert sources stacked along a new first dim
    int64_t permute_heads = 0;    // > 0: apply the llama q/k row permutation with this many heads
  };
  std::vector<Item> items;
  auto add = [&](const Role& r, long layer, const char* suffix) {
    const char* tmpl = spec.*(r.field);
    if (!tmpl) return;
    Item it;
    it.gguf = (layer >= 0 ? "blk." + std::to_string(layer) + "." : std::string()) + r.gguf + suffix;
    const char* hsuf = std::strcmp(suffix, ".bias") == 0 ? ".bias" : ".weight";
    if (r.experts) {
      for (int64_t e = 0; e < c.n_expert; ++e) it.hf.push_back(tensor_name(tmpl, layer, e, hsuf));
    } else {
      it.hf.push_back(tensor_name(tmpl, layer, -1, hsuf));
    }
    for (const std::string& h : it.hf)
      if (!ck->has(h)) return;  // optional pieces (biases, tied head, dense layers) are absent
    if (fam.permute_qk && (std::strcmp(r.gguf, "attn_q") == 0 || std::strcmp(r.gguf, "attn_k") == 0))
      it.permute_heads = std::strcmp(r.gguf, "attn_q") == 0 ? c.n_head : c.n_head_kv;
    items.push_back(std::move(it));
  };
  for (const Role& r : kRoles)
    if (!r.per_layer && std::strcmp(r.gguf, "output") != 0) add(r, -1, ".weight");
  for (int64_t l = 0; l < c.n_layer; ++l)
    for (const Role& r : kRoles)
      if (r.per_layer) {
        add(r, l, ".weight");
        add(r, l, ".bias");
      }
  if (!c.tie_word_embeddings) {
    add(kRoles[2], -1, ".weight");
    MOE_CHECK(!items.empty() && items.back().gguf == "output.weight", "%s: missing tensor %s (tie_word_embeddings is false)",
              md.c_str(), tensor_name(spec.lm_head, -1, -1).c_str());
  }

  std::map<std::string, GgmlType> types;
  for (const Item& it : items) {
    const SafetensorsInfo& info = ck->info(it.hf[0]);
    Shape shape = info.shape;
    for (const std::string& h : it.hf)
      MOE_CHECK(ck->info(h).shape == shape, "%s: tensor %s has shape %s, expected %s like %s", md.c_str(), h.c_str(),
                shape_str(ck->info(h).shape).c_str(), shape_str(shape).c_str(), it.hf[0].c_str());
    if (it.hf.size() > 1) shape.insert(shape.begin(), static_cast<int64_t>(it.hf.size()));
    // [1, D] (the shared expert gate) is stored 1-D, as llama.cpp expects.
    if (shape.size() == 2 && shape[0] == 1) shape.erase(shape.begin());
    MOE_CHECK(!shape.empty(), "%s: tensor %s is a scalar", md.c_str(), it.hf[0].c_str());
    std::vector<int64_t> ne(shape.rbegin(), shape.rend());
    const GgmlType type = gguf_tensor_type(opt.type, it.gguf, ne, c.n_layer);
    const int64_t row = ne[0];
    Item item = it;
    wr.add_tensor(it.gguf, type, ne, [ck, item, type, row, md](uint8_t* dst) {
      // Gather the f32 source (stacking experts), permute, quantise row by row.
      int64_t numel = 0;
      std::vector<float> buf;
      for (const std::string& h : item.hf) {
        Tensor t = ck->get(h, MemCategory::Workspace);
        const size_t n0 = buf.size();
        buf.resize(n0 + static_cast<size_t>(t.numel()));
        convert_to_f32(buf.data() + n0, t.raw(), t.dtype(), static_cast<size_t>(t.numel()));
        numel += t.numel();
      }
      const int64_t rows = row ? numel / row : 0;
      if (item.permute_heads > 0) {
        // Weight [rows, D] or bias [rows] (then rows=1, cols=... : treat each element as a row).
        const bool bias = item.gguf.size() > 5 && item.gguf.compare(item.gguf.size() - 5, 5, ".bias") == 0;
        if (bias) {
          permute_rows(buf.data(), numel, 1, item.permute_heads, true, md + ": " + item.hf[0]);
        } else {
          permute_rows(buf.data(), rows, row, item.permute_heads, true, md + ": " + item.hf[0]);
        }
      }
      const size_t rb = ggml_row_bytes(type, row);
      std::string err;  // an exception must not leave an OpenMP region: keep the first message
#pragma omp parallel for schedule(static)
      for (int64_t r = 0; r < rows; ++r) {
        try {
          quantize_row(type, buf.data() + r * row, dst + r * rb, row);
        } catch (const Error& e) {
#pragma omp critical(moe_gguf_quant_err)
          if (err.empty()) err = e.what();
        }
      }
      MOE_CHECK(err.empty(), "%s: tensor %s: %s", md.c_str(), item.hf[0].c_str(), err.c_str());
    });
    types[it.gguf] = type;
  }
  std::function<void(size_t, size_t, const std::string&)> prog;
  if (opt.progress) prog = [&](size_t i, size_t n, const std::string& name) { opt.progress(i, n, name, types[name]); };
  wr.write(out_path, prog);
}

}  // namespace moe
