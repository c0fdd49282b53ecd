// lora.cpp — creating, reading, writing, merging and auditing LoRA adapters (see lora.h).
#include "train/lora.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <map>
#include <optional>
#include <set>

#include "core/file_util.h"
#include "core/json_util.h"
#include "core/rng.h"
#include "io/safetensors.h"
#include "model/arch.h"
#include "model/fused_experts.h"
#include "model/lora_slots.h"
#include "model/model_train.h"
#include "train/checkpoint.h"
#include "train/lora_fused.h"

namespace moe {
namespace {

constexpr MemCategory kLoraMem = MemCategory::Lora;

// Slots grouped by the Lora they share (routed experts: one stacked pair per layer and
// projection), in slot order.
std::vector<std::vector<LoraSlot*>> by_factor(std::vector<LoraSlot>& slots) {
  std::vector<std::vector<LoraSlot*>> out;
  std::map<const Lora*, size_t> index;
  for (LoraSlot& s : slots) {
    auto [it, fresh] = index.emplace(s.lora, out.size());
    if (fresh) out.emplace_back();
    out[it->second].push_back(&s);
  }
  return out;
}

const char* kind_name(LoraKind k) {
  switch (k) {
    case LoraKind::Attention: return "attention";
    case LoraKind::Router: return "router";
    case LoraKind::Expert: return "routed experts";
    case LoraKind::SharedExpert: return "shared expert";
    case LoraKind::DenseMlp: return "dense MLP";
  }
  return "?";
}

bool all_linear_matches(const LoraSlot& s) { return s.kind != LoraKind::Router; }

// A fused family's routed-expert slot (fused_experts.h) also answers to its fused parameter's
// path, as PEFT's target_parameters name it ("mlp.experts.gate_up_proj" for gate and up).
std::string fused_param(const LoraSlot& s) {
  if (s.fused_param == nullptr) return "";
  return tensor_name(s.fused_param, s.layer, -1, "");
}

bool slot_targeted(const LoraSlot& s, const std::vector<std::string>& targets) {
  const std::string fp = fused_param(s);
  for (const std::string& t : targets) {
    if (t == "all-linear" ? all_linear_matches(s) : lora_target_matches(s.module, t)) return true;
    if (!fp.empty() && lora_target_matches(fp, t)) return true;
  }
  return false;
}

// Fused experts: gate and up are one PEFT parameter, so their adapters share A (lora_fused.h).
void share_fused_gate_up(const ModelConfig& c, ModelWeights& w) {
  if (!fused_experts(c)) return;
  for (LayerWeights& l : w.layers) {
    if (!l.lexp.w1.on() && !l.lexp.w3.on()) continue;
    MOE_CHECK(l.lexp.w1.on() && l.lexp.w3.on(),
              "%s: target the experts' gate and up projections together (one fused parameter, gate_up_proj)",
              c.model_type.c_str());
    l.lexp.w3.a = l.lexp.w1.a;
  }
}

// Allocates zeroed factors for a group of slots sharing one Lora (stacked for routed experts).
void alloc_factors(const ModelConfig& c, const std::vector<LoraSlot*>& group, int64_t r, float scale) {
  const LoraSlot& s0 = *group[0];
  Lora& l = *s0.lora;
  if (s0.expert >= 0) {
    l.a = Tensor::zeros({c.n_expert, r, s0.in}, DType::F32, kLoraMem);
    l.b = Tensor::zeros({c.n_expert, s0.out, r}, DType::F32, kLoraMem);
  } else {
    l.a = Tensor::zeros({r, s0.in}, DType::F32, kLoraMem);
    l.b = Tensor::zeros({s0.out, r}, DType::F32, kLoraMem);
  }
  l.scale = scale;
}

// Every slot of one Lora group targeted, or none (routed experts of a layer share storage).
bool group_targeted(const std::vector<LoraSlot*>& group, const std::vector<std::string>& targets) {
  size_t hit = 0;
  for (const LoraSlot* s : group) hit += slot_targeted(*s, targets);
  MOE_CHECK(hit == 0 || hit == group.size(),
            "target_modules select %zu of the %zu experts of %s (e.g. %s): adapt all routed experts of a layer's "
            "projection or none",
            hit, group.size(), kind_name(group[0]->kind), group[0]->module.c_str());
  return hit > 0;
}

void check_targets_match(const std::vector<LoraSlot>& slots, const std::vector<std::string>& targets,
                         const ModelConfig& c) {
  MOE_CHECK(!targets.empty(), "target_modules is empty: name the modules to adapt (e.g. q_proj,k_proj,v_proj,o_proj)");
  for (const std::string& t : targets) {
    bool any = false;
    for (const LoraSlot& s : slots) any = any || slot_targeted(s, {t});
    if (any) continue;
    std::set<std::string> kinds;
    for (const LoraSlot& s : slots) kinds.insert(s.module.substr(s.module.rfind('.') + 1));
    std::string list;
    for (const std::string& k : kinds) list += (list.empty() ? "" : ", ") + k;
    MOE_FAIL("target_modules: '%s' matches no module of this %s model (its modules are named like %s; "
             "adaptable names: %s)",
             t.c_str(), c.model_type.c_str(), slots.empty() ? "?" : slots[0].module.c_str(), list.c_str());
  }
}

// A router trained in full is saved as PEFT saves modules_to_save: under its module's name.
std::string router_tensor_name(const LoraSlot& s) { return "base_model.model." + s.module + ".weight"; }

void finish_attach(ModelWeights& w, bool train_router) {
  w.frozen_base = true;
  w.train_router = train_router;
}

// A's initialisation: kaiming_uniform_(a=sqrt(5)) as torch's nn.Linear and PEFT use, i.e.
// U(-1/sqrt(in), 1/sqrt(in)).
void init_a(Tensor& a, int64_t in, Rng& rng) {
  const double bound = 1.0 / std::sqrt(double(in));
  float* p = a.data<float>();
  for (int64_t i = 0; i < a.numel(); ++i) p[i] = static_cast<float>((2.0 * rng.uniform() - 1.0) * bound);
}

}  // namespace

float LoraConfig::scale() const {
  return static_cast<float>(rslora ? alpha / std::sqrt(double(r)) : alpha / double(r));
}

std::vector<std::string> parse_target_modules(const std::string& csv) {
  std::vector<std::string> out;
  size_t p = 0;
  while (p <= csv.size()) {
    const size_t q = std::min(csv.find(',', p), csv.size());
    std::string t = csv.substr(p, q - p);
    while (!t.empty() && t.front() == ' ') t.erase(t.begin());
    while (!t.empty() && t.back() == ' ') t.pop_back();
    MOE_CHECK(!t.empty(), "--target-modules '%s': empty entry", csv.c_str());
    out.push_back(t);
    p = q + 1;
  }
  return out;
}

void attach_lora(const ModelConfig& c, ModelWeights& w, const LoraConfig& cfg) {
  MOE_CHECK(cfg.r >= 1 && cfg.r <= 4096, "LoRA rank r must be in [1, 4096], got %lld", (long long)cfg.r);
  MOE_CHECK(std::isfinite(cfg.alpha) && cfg.alpha > 0, "lora_alpha must be a positive number");
  MOE_CHECK(cfg.dropout >= 0 && cfg.dropout < 1, "lora_dropout must be in [0, 1), got %g", cfg.dropout);
  MOE_CHECK(!w.has_lora(), "the model already carries LoRA adapters");
  std::vector<LoraSlot> slots = lora_slots(c, w);
  check_targets_match(slots, cfg.target_modules, c);
  Rng rng(cfg.seed, 0x10Aull);
  for (const std::vector<LoraSlot*>& g : by_factor(slots)) {
    if (!group_targeted(g, cfg.target_modules)) continue;
    alloc_factors(c, g, cfg.r, cfg.scale());
    const LoraSlot& s0 = *g[0];
    init_a(s0.lora->a, s0.in, rng);
  }
  share_fused_gate_up(c, w);
  finish_attach(w, cfg.train_router);
  set_lora_dropout(w, float(cfg.dropout), cfg.seed);
}

void set_lora_dropout(ModelWeights& w, float p, uint64_t seed) {
  uint64_t i = 0;
  for (LayerWeights& l : w.layers) {
    for (Lora* a : l.loras()) {
      uint64_t s = seed ^ (0xA0761D6478BD642Full * ++i);
      a->dropout = p;
      a->seed = splitmix64(s);
    }
    // One fused adapter (shared A) reads its input through one mask, as PEFT's.
    if (l.lexp.w1.on() && l.lexp.w1.a.raw() == l.lexp.w3.a.raw()) l.lexp.w3.seed = l.lexp.w1.seed;
  }
}

LoraConfig load_adapter(const std::string& dir, const ModelConfig& c, ModelWeights& w) {
  const std::string cfg_path = dir + "/adapter_config.json";
  const std::string st_path = dir + "/adapter_model.safetensors";
  MOE_CHECK(is_regular_file(cfg_path), "%s: no adapter_config.json (is this a PEFT adapter directory?)", dir.c_str());
  const nlohmann::json j = parse_json_object(read_file(cfg_path), cfg_path);
  auto str = [&](const char* k, const char* dflt) -> std::string {
    if (!j.contains(k) || j[k].is_null()) return dflt;
    MOE_CHECK(j[k].is_string(), "%s: field '%s' must be a string", cfg_path.c_str(), k);
    return j[k].get<std::string>();
  };
  MOE_CHECK(str("peft_type", "LORA") == "LORA", "%s: peft_type is '%s', only LORA adapters are supported",
            cfg_path.c_str(), str("peft_type", "").c_str());
  LoraConfig lc;
  MOE_CHECK(j.contains("r") && j["r"].is_number_integer(), "%s: field 'r' (an integer) is required", cfg_path.c_str());
  lc.r = j["r"].get<int64_t>();
  MOE_CHECK(lc.r >= 1 && lc.r <= 4096, "%s: r = %lld is out of range", cfg_path.c_str(), (long long)lc.r);
  lc.alpha = double(lc.r);
  if (j.contains("lora_alpha")) {
    MOE_CHECK(j["lora_alpha"].is_number(), "%s: field 'lora_alpha' must be a number", cfg_path.c_str());
    lc.alpha = j["lora_alpha"].get<double>();
  }
  MOE_CHECK(std::isfinite(lc.alpha) && lc.alpha > 0, "%s: lora_alpha must be positive", cfg_path.c_str());
  if (j.contains("use_rslora") && !j["use_rslora"].is_null()) {
    MOE_CHECK(j["use_rslora"].is_boolean(), "%s: field 'use_rslora' must be true or false", cfg_path.c_str());
    lc.rslora = j["use_rslora"].get<bool>();
  }
  if (j.contains("use_dora") && j["use_dora"].is_boolean())
    MOE_CHECK(!j["use_dora"].get<bool>(), "%s: DoRA adapters (use_dora) are not supported", cfg_path.c_str());
  for (const char* k : {"rank_pattern", "alpha_pattern"})
    if (j.contains(k) && j[k].is_object())
      MOE_CHECK(j[k].empty(), "%s: per-module %s is not supported", cfg_path.c_str(), k);
  // target_parameters: LoRA on fused 3-D expert tensors (fused families only).
  std::vector<std::string> target_params;
  if (j.contains("target_parameters") && j["target_parameters"].is_array() && fused_experts(c)) {
    for (const auto& t : j["target_parameters"]) {
      MOE_CHECK(t.is_string(), "%s: target_parameters entries must be strings", cfg_path.c_str());
      const std::string tp = t.get<std::string>();
      MOE_CHECK(tp.ends_with("gate_up_proj") || tp.ends_with("down_proj"),
                "%s: target_parameters names '%s'; this %s model's fused parameters are mlp.experts.gate_up_proj and "
                "mlp.experts.down_proj",
                cfg_path.c_str(), tp.c_str(), c.model_type.c_str());
      target_params.push_back(tp);
    }
  } else if (j.contains("target_parameters") && j["target_parameters"].is_array())
    MOE_CHECK(j["target_parameters"].empty(),
              "%s: target_parameters (LoRA on fused 3-D expert tensors) is for models whose experts are fused "
              "tensors; this %s model has one module per expert (convert with lora_fused.h's layout)",
              cfg_path.c_str(), c.model_type.c_str());
  MOE_CHECK(j.contains("target_modules") || !target_params.empty(), "%s: field 'target_modules' is required",
            cfg_path.c_str());
  const nlohmann::json& tm = j.contains("target_modules") ? j["target_modules"] : nlohmann::json::array();
  if (tm.is_null()) {
  } else if (tm.is_string()) {
    lc.target_modules = {tm.get<std::string>()};
  } else {
    MOE_CHECK(tm.is_array(), "%s: target_modules must be a list of module names", cfg_path.c_str());
    for (const auto& t : tm) {
      MOE_CHECK(t.is_string(), "%s: target_modules entries must be strings", cfg_path.c_str());
      lc.target_modules.push_back(t.get<std::string>());
    }
  }
  lc.base_model = str("base_model_name_or_path", "");
  MOE_CHECK(!w.has_lora(), "%s: the model already carries LoRA adapters", dir.c_str());

  auto file = SafetensorsFile::open(st_path);
  std::vector<LoraSlot> slots = lora_slots(c, w);
  std::set<std::string> used;
  const bool fused = fused_experts(c);
  for (const std::vector<LoraSlot*>& g : by_factor(slots)) {
    if (fused && g[0]->kind == LoraKind::Expert) continue;  // PEFT's fused layout, below
    // A group is adapted when the file has its tensors (the targets say which modules PEFT
    // wrapped; the file is the truth, and every targeted module must be in it).
    size_t present = 0;
    for (const LoraSlot* s : g) present += file->find(lora_a_name(*s)) != nullptr;
    if (present == 0) {
      MOE_CHECK(!slot_targeted(*g[0], lc.target_modules),
                "%s: module %s is targeted (target_modules) but the file has no %s", st_path.c_str(),
                g[0]->module.c_str(), lora_a_name(*g[0]).c_str());
      continue;
    }
    MOE_CHECK(present == g.size(), "%s: adapters for %zu of the %zu experts of %s (e.g. %s): all or none",
              st_path.c_str(), present, g.size(), kind_name(g[0]->kind), g[0]->module.c_str());
    const Shape want_a = {lc.r, g[0]->in}, want_b = {g[0]->out, lc.r};
    for (const LoraSlot* s : g)
      for (const auto& [name, want] : {std::pair{lora_a_name(*s), want_a}, {lora_b_name(*s), want_b}}) {
        const SafetensorsInfo* info = file->find(name);
        MOE_CHECK(info != nullptr, "%s: tensor %s is missing", st_path.c_str(), name.c_str());
        Tensor t = file->tensor(name, MemCategory::Workspace);
        MOE_CHECK(t.shape() == want,
                  "%s: tensor %s is %s but this %s model's %s needs %s (an adapter for another base model, or "
                  "another r?)",
                  st_path.c_str(), name.c_str(), shape_str(t.shape()).c_str(), c.model_type.c_str(),
                  s->module.c_str(), shape_str(want).c_str());
      }
    alloc_factors(c, g, lc.r, lc.scale());
    for (const LoraSlot* s : g) {
      Tensor a = slot_a(*s), b = slot_b(*s);
      a.copy_from(file->tensor(lora_a_name(*s), MemCategory::Workspace).to_dtype(DType::F32, MemCategory::Workspace));
      b.copy_from(file->tensor(lora_b_name(*s), MemCategory::Workspace).to_dtype(DType::F32, MemCategory::Workspace));
      used.insert(lora_a_name(*s));
      used.insert(lora_b_name(*s));
    }
  }
  // Fused experts (target_parameters): one [r·E, in] / [out, r·E] pair per layer and parameter.
  if (fused && !target_params.empty()) {
    const bool want_gu = std::any_of(target_params.begin(), target_params.end(),
                                     [](const std::string& t) { return t.ends_with("gate_up_proj"); });
    const bool want_dn = std::any_of(target_params.begin(), target_params.end(),
                                     [](const std::string& t) { return t.ends_with("down_proj"); });
    const int64_t e_n = c.n_expert, f = c.moe_intermediate_size, d = c.hidden_size;
    for (int64_t l = 0; l < c.n_layer; ++l) {
      if (!c.layer_is_moe(l)) continue;
      for (const bool gu : {true, false}) {
        if (gu ? !want_gu : !want_dn) continue;
        const std::string an = fused_lora_name(c, l, gu, want_gu && want_dn, "A");
        const std::string bn = fused_lora_name(c, l, gu, want_gu && want_dn, "B");
        const Shape want_a = {lc.r * e_n, gu ? d : f}, want_b = {gu ? 2 * f : d, lc.r * e_n};
        for (const auto& [name, want] : {std::pair{an, want_a}, {bn, want_b}}) {
          MOE_CHECK(file->find(name) != nullptr, "%s: target_parameters adapts %s, but tensor %s is missing",
                    st_path.c_str(), gu ? "gate_up_proj" : "down_proj", name.c_str());
          Tensor t = file->tensor(name, MemCategory::Workspace);
          MOE_CHECK(t.shape() == want, "%s: tensor %s is %s but this %s model needs %s (r %lld, %lld experts)",
                    st_path.c_str(), name.c_str(), t.shape_str().c_str(), c.model_type.c_str(),
                    shape_str(want).c_str(), (long long)lc.r, (long long)e_n);
          used.insert(name);
        }
        set_fused_lora(file->tensor(an, MemCategory::Workspace), file->tensor(bn, MemCategory::Workspace), e_n, gu,
                       lc.scale(), &w.layers[size_t(l)].lexp);
      }
    }
  }
  // Routers trained in full (modules_to_save): their weights replace the base's.
  for (LoraSlot& s : slots) {
    if (s.kind != LoraKind::Router) continue;
    const std::string name = router_tensor_name(s);
    if (!file->find(name)) continue;
    Tensor t = file->tensor(name, MemCategory::Workspace);
    MOE_CHECK(t.shape() == Shape({s.out, s.in}), "%s: tensor %s is %s, this model's router needs [%lld,%lld]",
              st_path.c_str(), name.c_str(), t.shape_str().c_str(), (long long)s.out, (long long)s.in);
    Tensor& router = w.layers[size_t(s.layer)].router;
    router = t.to_dtype(DType::F32, MemCategory::Weights);
    used.insert(name);
  }
  for (const SafetensorsInfo& info : file->tensors())
    MOE_CHECK(used.count(info.name) > 0,
              "%s: tensor %s names no adaptable module of this %s model (an adapter for another base?)",
              st_path.c_str(), info.name.c_str(), c.model_type.c_str());
  MOE_CHECK(!used.empty(), "%s: no LoRA tensors", st_path.c_str());
  finish_attach(w, false);
  return lc;
}

std::vector<std::pair<std::string, Tensor>> adapter_tensors(const ModelConfig& c, const ModelWeights& w) {
  std::vector<std::pair<std::string, Tensor>> out;
  std::vector<LoraSlot> slots = lora_slots(c, const_cast<ModelWeights&>(w));
  const bool fused = fused_experts(c);
  std::vector<bool> fused_done(static_cast<size_t>(c.n_layer), false);
  for (const LoraSlot& s : slots) {
    if (w.train_router && s.kind == LoraKind::Router) out.emplace_back(router_tensor_name(s), *s.base);
    if (!s.lora->on()) continue;
    if (fused && s.kind == LoraKind::Expert) {  // PEFT's fused layout, once per layer
      if (!fused_done[size_t(s.layer)])
        for (auto& t : fused_lora_tensors(c, s.layer, w.layers[size_t(s.layer)].lexp)) out.push_back(std::move(t));
      fused_done[size_t(s.layer)] = true;
      continue;
    }
    out.emplace_back(lora_a_name(s), slot_a(s));
    out.emplace_back(lora_b_name(s), slot_b(s));
  }
  return out;
}

void save_adapter(const std::string& dir, const ModelConfig& c, const ModelWeights& w, const LoraConfig& cfg) {
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  MOE_CHECK(!ec, "%s: cannot create the adapter directory: %s", dir.c_str(), ec.message().c_str());
  std::vector<std::pair<std::string, Tensor>> tensors = adapter_tensors(c, w);
  MOE_CHECK(!tensors.empty(), "save_adapter: the model has no adapters");
  // target_modules as PEFT writes them: the module-name suffixes that were adapted.
  std::set<std::string> kinds, params;
  for (const LoraSlot& s : lora_slots(c, const_cast<ModelWeights&>(w))) {
    if (!s.lora->on()) continue;
    if (s.fused_param) {  // fused experts: PEFT's target_parameters ("mlp.experts.gate_up_proj")
      const std::string p = fused_param(s);
      params.insert(p.substr(p.find(".mlp.") + 1));
    } else {
      kinds.insert(s.module.substr(s.module.rfind('.') + 1));
    }
  }
  nlohmann::ordered_json j;
  j["peft_type"] = "LORA";
  j["task_type"] = "CAUSAL_LM";
  j["r"] = cfg.r;
  j["lora_alpha"] = cfg.alpha;
  j["lora_dropout"] = cfg.dropout;
  j["use_rslora"] = cfg.rslora;
  j["use_dora"] = false;
  j["bias"] = "none";
  j["fan_in_fan_out"] = false;
  j["target_modules"] = std::vector<std::string>(kinds.begin(), kinds.end());
  if (!params.empty()) j["target_parameters"] = std::vector<std::string>(params.begin(), params.end());
  if (w.train_router) {
    const std::string router_module = tensor_name(arch_spec(c.model_type).router, 0, -1, "");
    j["modules_to_save"] = {router_module.substr(router_module.rfind('.') + 1)};
  } else {
    j["modules_to_save"] = nullptr;
  }
  j["init_lora_weights"] = true;
  j["inference_mode"] = true;
  j["base_model_name_or_path"] = cfg.base_model;
  j["revision"] = nullptr;
  write_safetensors(dir + "/adapter_model.safetensors", tensors, {{"format", "pt"}});
  write_text_atomic(dir + "/adapter_config.json", j.dump(2) + "\n");
}

void merge_lora(const ModelConfig& c, ModelWeights& w) {
  std::vector<LoraSlot> slots = lora_slots(c, w);
  // Owned f32-or-bf16 copies of every base tensor an adapter will change, made once.
  std::set<const void*> copied;
  auto own = [&](Tensor& t, const std::string& module) {
    MOE_CHECK(t.defined(), "merge: module %s has no (stacked, float) base weight; dequantize a quantized base first",
              module.c_str());
    MOE_CHECK(t.dtype() == DType::F32 || t.dtype() == DType::BF16 || t.dtype() == DType::F16,
              "merge: the base weight of %s is %s; dequantize the base first (merging needs float weights)",
              module.c_str(), dtype_name(t.dtype()));
    if (copied.count(t.raw())) return;
    Tensor o = Tensor::empty(t.shape(), t.dtype(), MemCategory::Weights);
    o.copy_from(t);
    t = o;
    copied.insert(t.raw());
  };
  for (LoraSlot& s : slots)
    if (s.lora->on()) own(*s.base, s.module);
  for (LayerWeights& lw : w.layers) set_qkv_views(c, lw);  // wqkv may be a new copy
  for (LoraSlot& s : slots) {
    if (!s.lora->on()) continue;
    const Tensor a = slot_a(s), b = slot_b(s);
    const int64_t r = a.dim(0);
    // ΔW [out,in] = scale · b·a, one module at a time (the merge's output, not a training buffer).
    Tensor dw = Tensor::empty({s.out, s.in}, DType::F32, MemCategory::Workspace);
    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)s.out, (int)s.in, (int)r, s.lora->scale,
                b.data<float>(), (int)r, a.data<float>(), (int)s.in, 0.0f, dw.data<float>(), (int)s.in);
    Tensor base = s.expert >= 0 ? s.base->select(s.expert) : *s.base;
    if (s.base_row0 > 0 || base.dim(0) != s.out) base = base.rows(s.base_row0, s.base_row0 + s.out);
    MOE_CHECK(base.numel() == s.out * s.in, "merge: %s: base %s does not fit [%lld,%lld]", s.module.c_str(),
              base.shape_str().c_str(), (long long)s.out, (long long)s.in);
    Tensor f = base.to_dtype(DType::F32, MemCategory::Workspace);
    float* pf = f.data<float>();
    const float* pd = dw.data<float>();
    for (int64_t i = 0; i < f.numel(); ++i) pf[i] += pd[i];
    base.copy_from(f.to_dtype(base.dtype(), MemCategory::Workspace));
  }
  for (LoraSlot& s : slots) *s.lora = Lora();
  w.frozen_base = false;
  w.train_router = false;
}

DType qlora_base_dtype(bool load_in_4bit, bool double_quant, bool load_in_8bit) {
  MOE_CHECK(!(load_in_4bit && load_in_8bit), "choose one of --load-in-4bit and --load-in-8bit");
  MOE_CHECK(!double_quant || load_in_4bit, "--double-quant applies to --load-in-4bit (NF4) only");
  return load_in_4bit ? (double_quant ? DType::NF4DQ : DType::NF4) : DType::Q8_0;
}

std::string quantize_frozen_base(const ModelConfig& c, ModelWeights& w, DType dt) {
  MOE_CHECK(dt == DType::NF4 || dt == DType::NF4DQ || dt == DType::Q8_0,
            "quantize_frozen_base: %s is not a QLoRA storage type (nf4, nf4dq, q8_0)", dtype_name(dt));
  int64_t n_q = 0, n_kept = 0, n_plain = 0;
  size_t before = 0, after = 0;
  // The storage of tensors stored alike: the first candidate whose blocks tile every row (under
  // NF4DQ, plain NF4 for rows of 64 but not 256 values); none: they stay float.
  const std::vector<DType> cands = dt == DType::NF4DQ ? std::vector{DType::NF4DQ, DType::NF4} : std::vector{dt};
  auto storage = [&](std::initializer_list<const Tensor*> ts) -> std::optional<DType> {
    for (DType d : cands) {
      bool all = true;
      for (const Tensor* t : ts)
        all &= (t->dtype() == DType::F32 || t->dtype() == DType::BF16 || t->dtype() == DType::F16) &&
               t->dim(-1) % dtype_block_elems(d) == 0;
      if (all) return d;
    }
    return std::nullopt;
  };
  // Tensors already in a block type (a bitsandbytes checkpoint's NF4) stay as they are.
  auto q = [&](Tensor& t, std::optional<DType> d) {
    if (!t.defined() || dtype_is_block(t.dtype())) return;
    if (!d) {
      ++n_kept;
      return;
    }
    before += t.nbytes();
    t = t.to_dtype(*d, MemCategory::QuantWeights);
    after += t.nbytes();
    ++n_q;
    n_plain += *d != dt;
  };
  for (LayerWeights& lw : w.layers) {
    // MLA: kv_b_proj stays float (the absorbed inference products read it as f32).
    for (Tensor* t : {&lw.wqkv, &lw.wo, &lw.shared_w1, &lw.shared_w3, &lw.shared_w2, &lw.wq_a, &lw.wq_b, &lw.wkv_a})
      if (t->defined()) q(*t, storage({t}));
    // The routed experts' training ops take one dtype for w1, w3 and w2, so the three are
    // stored alike (e.g. w2 [E,D,F] with F = 32 under NF4's blocks of 64 keeps all three float;
    // F = 1408 under NF4DQ's 256 makes all three plain NF4); a dense MLP's are separate linears.
    if (lw.is_moe && lw.w1.defined()) {
      const std::optional<DType> d = storage({&lw.w1, &lw.w3, &lw.w2});
      for (Tensor* t : {&lw.w1, &lw.w3, &lw.w2}) q(*t, d);
    } else {
      for (Tensor* t : {&lw.w1, &lw.w3, &lw.w2})
        if (t->defined()) q(*t, storage({t}));
    }
    set_qkv_views(c, lw);
  }
  char buf[300];
  std::snprintf(buf, sizeof buf, "base quantized to %s: %lld tensors, %.2f MiB -> %.2f MiB%s%s", dtype_name(dt),
                (long long)n_q, double(before) / 1048576.0, double(after) / 1048576.0,
                n_plain ? (", " + std::to_string(n_plain) + " as plain nf4 (rows not whole 256-value blocks)").c_str() : "",
                n_kept ? (", " + std::to_string(n_kept) + " kept float (rows not whole blocks)").c_str() : "");
  return buf;
}

int64_t lora_param_count(const ModelConfig& c, const ModelWeights& w) {
  int64_t n = 0;
  for (const auto& [name, t] : adapter_tensors(c, w)) n += t.numel();
  return n;
}

std::string lora_audit(const ModelConfig& c, const ModelWeights& w) {
  std::vector<LoraSlot> slots = lora_slots(c, const_cast<ModelWeights&>(w));
  std::map<std::string, std::pair<int64_t, int64_t>> per_kind;  // kind -> modules, params
  std::vector<int64_t> per_expert(static_cast<size_t>(std::max<int64_t>(c.n_expert, 0)), 0);
  int64_t total = 0;
  for (const LoraSlot& s : slots) {
    if (!s.lora->on()) continue;
    // A fused expert's gate and up share one A (lora_fused.h): counted once, under the gate.
    const LayerWeights& lw = w.layers[size_t(s.layer)];
    const bool shared_a = s.lora == &lw.lexp.w3 && lw.lexp.w1.on() && lw.lexp.w1.a.raw() == lw.lexp.w3.a.raw();
    const int64_t n = (shared_a ? 0 : slot_a(s).numel()) + slot_b(s).numel();
    auto& k = per_kind[std::string(kind_name(s.kind)) + " " + s.module.substr(s.module.rfind('.') + 1)];
    k.first += 1;
    k.second += n;
    if (s.expert >= 0) per_expert[static_cast<size_t>(s.expert)] += n;
    total += n;
  }
  std::string out = "trainable parameters (LoRA";
  const int64_t base = params_total(c);
  char buf[256];
  std::snprintf(buf, sizeof buf, "): %lld of %lld (%.3f%%); the base is frozen%s\n", (long long)total,
                (long long)base, 100.0 * double(total) / double(std::max<int64_t>(base, 1)),
                w.train_router ? " except the routers" : "");
  out += buf;
  for (const auto& [kind, v] : per_kind) {
    std::snprintf(buf, sizeof buf, "  %-28s %5lld modules  %12lld params\n", kind.c_str(), (long long)v.first,
                  (long long)v.second);
    out += buf;
  }
  bool any_expert = false;
  for (int64_t n : per_expert) any_expert = any_expert || n > 0;
  if (any_expert) {
    out += "  per routed expert (all layers):";
    for (size_t e = 0; e < per_expert.size(); ++e) {
      out += ' ';
      out += std::to_string(per_expert[e]);
    }
    out += "\n";
  }
  if (w.train_router) {
    int64_t rp = 0;
    for (int64_t l = 0; l < c.n_layer; ++l)
      if (c.layer_is_moe(l)) rp += c.n_expert * c.hidden_size;
    std::snprintf(buf, sizeof buf, "  %-28s %12lld params (full weight)\n", "router", (long long)rp);
    out += buf;
  }
  return out;
}

std::vector<std::string> untrained_adapters(const ModelConfig& c, const ModelWeights& w,
                                            const std::vector<bool>& seen,
                                            const std::vector<std::vector<bool>>& touched) {
  std::vector<std::string> bad;
  const std::vector<NamedParam> ps = named_parameters(c, w, true);
  MOE_CHECK(seen.size() == ps.size(), "untrained_adapters: %zu flags for %zu parameters", seen.size(), ps.size());
  for (size_t i = 0; i < ps.size(); ++i) {
    if (seen[i]) continue;
    const NamedParam& p = ps[i];
    if (p.name.find(".lora_") == std::string::npos) continue;
    // A routed expert that never received a token has no gradient, rightly.
    if (p.expert >= 0 && p.layer >= 0 &&
        !(size_t(p.layer) < touched.size() && size_t(p.expert) < touched[size_t(p.layer)].size() &&
          touched[size_t(p.layer)][size_t(p.expert)]))
      continue;
    bad.push_back(p.name);
  }
  return bad;
}

}  // namespace moe
