// activations.cpp — the activation size table and allocation from it.
#include "model/activations.h"

#include <algorithm>

namespace moe {
namespace {

struct Field {
  const char* name;
  Tensor LayerActs::*member;
};

// Every LayerActs field, by its layout name.
constexpr Field kFields[] = {
    {"x_in", &LayerActs::x_in},         {"attn_rstd", &LayerActs::attn_rstd},
    {"attn_h", &LayerActs::attn_h},     {"qkv", &LayerActs::qkv},
    {"q_pre", &LayerActs::q_pre},       {"k_pre", &LayerActs::k_pre},
    {"final_x", &LayerActs::final_x},   {"final_rstd", &LayerActs::final_rstd},
    {"final_h", &LayerActs::final_h},   {"logits", &LayerActs::logits},
    {"q_rstd", &LayerActs::q_rstd},     {"k_rstd", &LayerActs::k_rstd},
    {"q", &LayerActs::q},               {"k", &LayerActs::k},
    {"v", &LayerActs::v},               {"attn_out", &LayerActs::attn_out},
    {"lse", &LayerActs::lse},           {"x_mid", &LayerActs::x_mid},
    {"ffn_rstd", &LayerActs::ffn_rstd}, {"ffn_h", &LayerActs::ffn_h},
    {"router_logits", &LayerActs::router_logits}, {"topk_idx", &LayerActs::topk_idx},
    {"topk_w", &LayerActs::topk_w},     {"offsets", &LayerActs::offsets},
    {"perm", &LayerActs::perm},         {"inv", &LayerActs::inv},
    {"row_scale", &LayerActs::row_scale}, {"xp", &LayerActs::xp},
    {"eh1", &LayerActs::eh1},           {"eh3", &LayerActs::eh3},
    {"sh1", &LayerActs::sh1},           {"sh3", &LayerActs::sh3},
    {"s_out", &LayerActs::s_out},       {"s_gate", &LayerActs::s_gate},
    {"dh1", &LayerActs::dh1},           {"dh3", &LayerActs::dh3},
};

}  // namespace

ActivationLayout activation_layout(const ModelConfig& c, int64_t batch, int64_t seq, ActMode mode) {
  ActivationLayout lay;
  lay.mode = mode;
  lay.batch = batch;
  lay.seq = seq;
  const int64_t t = batch * seq, d = c.hidden_size, dh = c.head_dim, h = c.n_head, hkv = c.n_head_kv;
  const int64_t e = c.n_expert, k = c.n_expert_used, p = t * k, f = c.moe_intermediate_size;
  const int64_t fs = c.shared_expert_intermediate_size, fd = c.intermediate_size;
  lay.logits_chunk = std::min(t, kLogitsChunkRows);
  const DType f32 = DType::F32, i32 = DType::I32;
  auto add = [&](const char* name, Shape shape, DType dt, bool per_layer = true, int only = 0) {
    lay.entries.push_back({name, std::move(shape), dt, per_layer, only == 1, only == 2});
  };
  constexpr int kMoe = 1, kDense = 2;
  if (mode == ActMode::Inference) return lay;  // the inference forward sizes its own (see Model::forward)

  // The residual stream entering each layer is always kept (recompute starts from it).
  add("x_in", {t, d}, f32);
  // Everything else is per layer in Training, one shared set in TrainingRecompute.
  const bool pl = mode == ActMode::Training;
  add("attn_rstd", {t}, f32, pl);
  add("attn_h", {t, d}, f32, pl);
  add("qkv", {t, (h + 2 * hkv) * dh}, f32, false);
  if (c.qk_norm) {
    add("q_pre", {t * h, dh}, f32, pl);
    add("k_pre", {t * hkv, dh}, f32, pl);
    add("q_rstd", {t * h}, f32, pl);
    add("k_rstd", {t * hkv}, f32, pl);
  }
  add("q", {batch, seq, h, dh}, f32, pl);
  add("k", {batch, seq, hkv, dh}, f32, pl);
  add("v", {batch, seq, hkv, dh}, f32, pl);
  add("attn_out", {batch, seq, h, dh}, f32, pl);
  add("lse", {batch, h, seq}, f32, pl);
  add("x_mid", {t, d}, f32, pl);
  add("ffn_rstd", {t}, f32, pl);
  add("ffn_h", {t, d}, f32, pl);
  if (e > 0) {
    add("router_logits", {t, e}, f32, pl, kMoe);
    add("topk_idx", {t, k}, i32, pl, kMoe);
    add("topk_w", {t, k}, f32, pl, kMoe);
    add("offsets", {e + 1}, i32, pl, kMoe);
    add("perm", {p}, i32, pl, kMoe);
    add("inv", {p}, i32, pl, kMoe);
    add("row_scale", {p}, f32, pl, kMoe);
    add("xp", {p, d}, f32, pl, kMoe);
    add("eh1", {p, f}, f32, pl, kMoe);
    add("eh3", {p, f}, f32, pl, kMoe);
    if (fs > 0) {
      add("sh1", {t, fs}, f32, pl, kMoe);
      add("sh3", {t, fs}, f32, pl, kMoe);
      add("s_out", {t, d}, f32, pl, kMoe);
      add("s_gate", {t, 1}, f32, pl, kMoe);
    }
  }
  if (fd > 0) {
    add("dh1", {t, fd}, f32, pl, kDense);
    add("dh3", {t, fd}, f32, pl, kDense);
  }
  add("final_x", {t, d}, f32, false);
  add("final_rstd", {t}, f32, false);
  add("final_h", {t, d}, f32, false);
  add("logits", {lay.logits_chunk, c.vocab_size}, f32, false);
  return lay;
}

int64_t ActivationLayout::total_bytes(const ModelConfig& c) const {
  int64_t moe_layers = 0;
  for (int64_t l = 0; l < c.n_layer; ++l) moe_layers += c.layer_is_moe(l) ? 1 : 0;
  const int64_t dense_layers = c.n_layer - moe_layers;
  int64_t total = 0;
  for (const ActEntry& a : entries) {
    const int64_t bytes = shape_numel(a.shape) * static_cast<int64_t>(dtype_size(a.dtype));
    int64_t copies = 1;
    if (a.per_layer) copies = a.moe_only ? moe_layers : a.dense_only ? dense_layers : c.n_layer;
    else if (a.moe_only && moe_layers == 0) copies = 0;
    else if (a.dense_only && dense_layers == 0) copies = 0;
    total += bytes * copies;
  }
  return total;
}

void alloc_acts(const ActivationLayout& lay, bool is_moe, bool per_layer, LayerActs* acts) {
  for (const ActEntry& a : lay.entries) {
    if (a.per_layer != per_layer || (a.moe_only && !is_moe) || (a.dense_only && is_moe)) continue;
    const Field* f = std::find_if(std::begin(kFields), std::end(kFields),
                                  [&](const Field& x) { return a.name == x.name; });
    MOE_ASSERT(f != std::end(kFields));
    Tensor& t = acts->*(f->member);
    if (!t.defined()) t = Tensor::empty(a.shape, a.dtype, MemCategory::Activations);
  }
}

}  // namespace moe
