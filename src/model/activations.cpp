// activations.cpp — the activation size table and allocation from it.
#include "model/activations.h"

#include <algorithm>

namespace moe {
namespace {

template <typename S>
struct Field {
  const char* name;
  Tensor S::*member;
};

// Every LayerActs field, by its layout name.
constexpr Field<LayerActs> kFields[] = {
    {"x_in", &LayerActs::x_in},         {"attn_rstd", &LayerActs::attn_rstd},
    {"attn_h", &LayerActs::attn_h},     {"qkv", &LayerActs::qkv},
    {"q_pre", &LayerActs::q_pre},       {"k_pre", &LayerActs::k_pre},
    {"final_x", &LayerActs::final_x},   {"final_rstd", &LayerActs::final_rstd},
    {"final_h", &LayerActs::final_h},
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
    {"mla_cq", &LayerActs::mla_cq},     {"mla_cq_rstd", &LayerActs::mla_cq_rstd},
    {"mla_cqn", &LayerActs::mla_cqn},   {"mla_ckv", &LayerActs::mla_ckv},
    {"mla_ckv_rstd", &LayerActs::mla_ckv_rstd}, {"mla_ckn", &LayerActs::mla_ckn},
};

// Every StepActs field, by its layout name.
constexpr Field<StepActs> kStepFields[] = {
    {"ids", &StepActs::ids},     {"targets", &StepActs::targets}, {"row_loss", &StepActs::row_loss},
    {"aux_g", &StepActs::aux_g}, {"dx", &StepActs::dx},           {"dx_mid", &StepActs::dx_mid},
    {"dx_in", &StepActs::dx_in},
};

template <typename S, size_t N>
Tensor& field(const Field<S> (&fields)[N], const std::string& name, S* s) {
  const Field<S>* f =
      std::find_if(std::begin(fields), std::end(fields), [&](const Field<S>& x) { return name == x.name; });
  MOE_ASSERT(f != std::end(fields));
  return s->*(f->member);
}

struct LayerCounts {
  int64_t moe = 0, dense = 0;
};
LayerCounts layer_counts(const ModelConfig& c) {
  LayerCounts n;
  for (int64_t l = 0; l < c.n_layer; ++l) (c.layer_is_moe(l) ? n.moe : n.dense) += 1;
  return n;
}

// Whether the config has something that only MoE / only dense layers have.
bool present(const LayerCounts& n, bool moe_only, bool dense_only) {
  return !(moe_only && n.moe == 0) && !(dense_only && n.dense == 0);
}

}  // namespace

int64_t ActEntry::bytes() const { return shape_numel(shape) * static_cast<int64_t>(dtype_size(dtype)); }

int64_t ActPhase::bytes() const {
  int64_t b = 0;
  for (const ActEntry& a : live) b += a.bytes();
  return b;
}

ActivationLayout activation_layout(const ModelConfig& c, int64_t batch, int64_t seq, ActMode mode, DType expert_h,
                                   HeadGrad head) {
  MOE_CHECK(expert_h == DType::F32 || expert_h == DType::BF16,
            "activation_layout: the experts' pre-activations are saved in f32 or bf16, not %s", dtype_name(expert_h));
  ActivationLayout lay;
  lay.mode = mode;
  lay.batch = batch;
  lay.seq = seq;
  const int64_t t = batch * seq, d = c.hidden_size, dh = c.head_dim, h = c.n_head, hkv = c.n_head_kv;
  const int64_t e = c.n_expert, k = c.n_expert_used, p = t * k, f = c.moe_intermediate_size;
  const int64_t fs = c.shared_expert_intermediate_size, fd = c.intermediate_size;
  lay.logits_chunk = std::min(t, head == HeadGrad::Frozen       ? kFrozenLogitsChunkRows
                                 : head == HeadGrad::TrainsBf16 ? kBf16LogitsChunkRows
                                                                : kLogitsChunkRows);
  const DType f32 = DType::F32, i32 = DType::I32;
  constexpr int kMoe = 1, kDense = 2;
  auto add = [&](const char* name, Shape shape, DType dt, bool per_layer = true, int only = 0) {
    lay.entries.push_back({name, std::move(shape), dt, per_layer, only == kMoe, only == kDense, false});
  };
  if (mode == ActMode::Inference) return lay;  // the inference forward sizes its own (see Model::forward)

  // ---- 1. saved per layer / shared (LayerActs) ----
  // The residual stream entering each layer is always kept (recompute starts from it).
  add("x_in", {t, d}, f32);
  // Everything else is per layer in Training, one shared set in TrainingRecompute.
  const bool pl = mode == ActMode::Training;
  add("attn_rstd", {t}, f32, pl);
  add("attn_h", {t, d}, f32, pl);
  const bool mla = c.is_mla();
  // MLA widths (mla_block.h): q/k head Dq = Dn+Dr (v padded to it), latent Rkv, cached row Rc.
  const int64_t dq = c.qk_nope_head_dim + c.qk_rope_head_dim, rq = c.q_lora_rank, rkv = c.kv_lora_rank;
  const int64_t rc = rkv + c.qk_rope_head_dim, dkv = h * (c.qk_nope_head_dim + c.v_head_dim), hdv = h * c.v_head_dim;
  if (!mla) add("qkv", {t, (h + 2 * hkv) * dh}, f32, false);
  // q/k norm rows: [T*H, Dh] per head, [T, H*Dh] over the whole projection (q_norm_dim()).
  const bool qk_norm = c.qk_norm != QkNormKind::None;
  const int64_t qn_rows = qk_norm ? t * h * dh / c.q_norm_dim() : 0, qn_d = c.q_norm_dim();
  const int64_t kn_rows = qk_norm ? t * hkv * dh / c.k_norm_dim() : 0, kn_d = c.k_norm_dim();
  if (qk_norm) {
    add("q_pre", {qn_rows, qn_d}, f32, pl);
    add("k_pre", {kn_rows, kn_d}, f32, pl);
    add("q_rstd", {qn_rows}, f32, pl);
    add("k_rstd", {kn_rows}, f32, pl);
  }
  if (mla) {
    if (rq > 0) {
      add("mla_cq", {t, rq}, f32, pl);
      add("mla_cq_rstd", {t}, f32, pl);
      add("mla_cqn", {t, rq}, f32, pl);
    }
    add("mla_ckv", {t, rkv}, f32, pl);
    add("mla_ckv_rstd", {t}, f32, pl);
    add("mla_ckn", {t, rkv}, f32, pl);
  }
  const int64_t hq = mla ? h : h, hk = mla ? h : hkv, dqk = mla ? dq : dh;
  add("q", {batch, seq, hq, dqk}, f32, pl);
  add("k", {batch, seq, hk, dqk}, f32, pl);
  add("v", {batch, seq, hk, dqk}, f32, pl);
  add("attn_out", {batch, seq, hq, dqk}, f32, pl);
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
    add("eh1", {p, f}, expert_h, pl, kMoe);
    add("eh3", {p, f}, expert_h, pl, kMoe);
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

  // ---- 2. step buffers (StepActs) ----
  auto step = [&](const char* name, Shape shape, DType dt, bool moe_only, bool backward) {
    lay.step.push_back({name, std::move(shape), dt, false, moe_only, false, backward});
  };
  step("ids", {t}, i32, false, false);
  step("targets", {t}, i32, false, false);
  step("row_loss", {lay.logits_chunk}, f32, false, false);
  if (e > 0) step("aux_g", {e}, f32, true, false);
  step("dx", {t, d}, f32, false, true);
  step("dx_mid", {t, d}, f32, false, true);
  step("dx_in", {t, d}, f32, false, true);

  // ---- 3. the working set: one phase per high-water mark of a block's temporaries ----
  // Each list is what is live at that moment, in the order the block allocates it; a
  // temporary the block frees (or lets go out of scope) before the next allocation is absent.
  auto phase = [&](const char* name, int only, std::vector<std::pair<const char*, Shape>> live) {
    ActPhase ph;
    ph.name = name;
    ph.moe_only = only == kMoe;
    ph.dense_only = only == kDense;
    for (auto& [n, s] : live) ph.live.push_back({n, s, f32, false, false, false, false});
    lay.phases.push_back(std::move(ph));
  };
  // The head (run_step): one chunk of LM-head logits, then its gradient in the same bytes (f32,
  // or rounded to bf16 in place). Allocated for the head alone, it never meets a layer's
  // gradients or a block's temporaries.
  phase("head.logits", 0, {{"logits", {lay.logits_chunk, c.vocab_size}}});
  // ffn_block_forward (the training forward and the recompute forward alike):
  if (fd > 0) phase("ffn_block_forward.dense", kDense, {{"act", {t, fd}}});  // swiglu_mlp's output
  if (e > 0) {
    phase("ffn_block_forward.experts", kMoe, {{"yp", {p, d}}});  // freed before the shared expert
    if (fs > 0) phase("ffn_block_forward.shared", kMoe, {{"act", {t, fs}}});
    // The first forward's router statistics (the recompute forward passes no stats).
    phase("ffn_block_forward.router_stats", kMoe, {{"ps", {e}}, {"cnt", {e}}, {"z", {1}}});
  }
  // ffn_block_backward: dh [T,D] lives through the whole call.
  if (fd > 0)  // swiglu_mlp_backward: act (recomputed, then reused as dh1), dact, dh3
    phase("ffn_block_backward.dense", kDense, {{"dh", {t, d}}, {"act", {t, fd}}, {"dact", {t, fd}}, {"dh3", {t, fd}}});
  if (e > 0) {
    if (fs > 0)
      phase("ffn_block_backward.shared", kMoe,
            {{"dh", {t, d}}, {"ds", {t, d}}, {"dgate", {t, 1}}, {"act", {t, fs}}, {"dact", {t, fs}}, {"dh3", {t, fs}}});
    // dyp is freed after expert_ffn_backward, dxp after the combine; drs stays to the end.
    phase("ffn_block_backward.experts", kMoe, {{"dh", {t, d}}, {"dyp", {p, d}}, {"dxp", {p, d}}, {"drs", {p}}});
    phase("ffn_block_backward.router", kMoe, {{"dh", {t, d}}, {"drs", {p}}, {"dtw", {t, k}}, {"dlogits", {t, e}}});
  }
  // attention_block_backward: dattn [T,H*Dh] lives to the end of the call (its 2-D view
  // dattn2 keeps the storage after `dattn = Tensor()`); with q/k norm, dq and dk are replaced
  // by their pre-norm gradients dqp, dkp (the old ones freed, the new ones the same size).
  // The first high-water mark (dattn, dq, dk, dv) is below both phases here.
  if (mla) {
    // mla_block_forward: the kv projections and rope temporaries live together, then o.
    phase("mla_block_forward.kv", 0, {{"kva", {t, rc}}, {"kv", {t, dkv}}, {"pe", {t * h, c.qk_rope_head_dim}},
                                      {"kpe", {t, c.qk_rope_head_dim}}});
    phase("mla_block_forward.o", 0, {{"o", {t, hdv}}});
    // mla_block_backward, allocation by allocation (dattn is freed after the attention backward,
    // dk/dv after the per-head split, dkv after kv_b_proj's backward, the k side's temporaries
    // before dh).
    const int64_t hq2 = h * dq, dr = c.qk_rope_head_dim;
    phase("mla_block_backward.o_proj", 0, {{"dattn", {t, hq2}}, {"o", {t, hdv}}, {"d_o", {t, hdv}}});
    phase("mla_block_backward.attention", 0, {{"dattn", {t, hq2}}, {"dq", {t, hq2}}, {"dk", {t, hq2}}, {"dv", {t, hq2}}});
    phase("mla_block_backward.kv", 0,
          {{"dq", {t, hq2}}, {"dk", {t, hq2}}, {"dv", {t, hq2}}, {"dkva", {t, rc}}, {"dkv", {t, dkv}}, {"dkpe", {t, dr}},
           {"tmp", {t, dr}}});
    phase("mla_block_backward.kv_b", 0,
          {{"dq", {t, hq2}}, {"dkva", {t, rc}}, {"dkv", {t, dkv}}, {"dkpe", {t, dr}}, {"tmp", {t, dr}}, {"dckn", {t, rkv}}});
    phase("mla_block_backward.kv_norm", 0,
          {{"dq", {t, hq2}}, {"dkva", {t, rc}}, {"dkpe", {t, dr}}, {"tmp", {t, dr}}, {"dckn", {t, rkv}}, {"dckv", {t, rkv}}});
    phase("mla_block_backward.kv_a", 0, {{"dq", {t, hq2}}, {"dkva", {t, rc}}, {"dh", {t, d}}});
    if (rq > 0)
      phase("mla_block_backward.q", 0, {{"dq", {t, hq2}}, {"dh", {t, d}}, {"dcqn", {t, rq}}, {"dcq", {t, rq}}});
    return lay;
  }
  if (qk_norm)
    phase("attention_block_backward.qk_norm", 0,
          {{"dattn", {t, h * dh}}, {"dq", {t, h * dh}}, {"dk", {t, hkv * dh}}, {"dv", {t, hkv * dh}},
           {"dqp", {qn_rows, qn_d}}, {"dkp", {kn_rows, kn_d}}});
  phase("attention_block_backward.projection", 0,
        {{"dattn", {t, h * dh}}, {"dq", {t, h * dh}}, {"dk", {t, hkv * dh}}, {"dv", {t, hkv * dh}},
         {"dh_norm", {t, d}}});
  return lay;
}

int64_t ActivationLayout::entry_bytes(const ModelConfig& c) const {
  const LayerCounts n = layer_counts(c);
  int64_t total = 0;
  for (const ActEntry& a : entries) {
    int64_t copies = present(n, a.moe_only, a.dense_only) ? 1 : 0;
    if (a.per_layer) copies = a.moe_only ? n.moe : a.dense_only ? n.dense : c.n_layer;
    total += a.bytes() * copies;
  }
  return total;
}

int64_t ActivationLayout::step_bytes(const ModelConfig& c) const {
  const LayerCounts n = layer_counts(c);
  int64_t total = 0;
  for (const ActEntry& a : step)
    if (!a.moe_only || n.moe > 0) total += a.bytes();
  return total;
}

int64_t ActivationLayout::working_bytes(const ModelConfig& c, std::string* which) const {
  const LayerCounts n = layer_counts(c);
  int64_t best = 0;
  for (const ActPhase& ph : phases) {
    if (c.n_layer == 0 || !present(n, ph.moe_only, ph.dense_only) || ph.bytes() <= best) continue;
    best = ph.bytes();
    if (which) *which = ph.name;
  }
  return best;
}

int64_t ActivationLayout::total_bytes(const ModelConfig& c) const {
  return entry_bytes(c) + step_bytes(c) + working_bytes(c);
}

void alloc_acts(const ActivationLayout& lay, bool is_moe, bool per_layer, LayerActs* acts) {
  for (const ActEntry& a : lay.entries) {
    if (a.per_layer != per_layer || (a.moe_only && !is_moe) || (a.dense_only && is_moe)) continue;
    Tensor& t = field(kFields, a.name, acts);
    if (!t.defined()) t = Tensor::empty(a.shape, a.dtype, MemCategory::Activations);
  }
}

void alloc_step_acts(const ActivationLayout& lay, const ModelConfig& c, bool backward, StepActs* s) {
  const LayerCounts n = layer_counts(c);
  for (const ActEntry& a : lay.step) {
    if ((a.backward && !backward) || (a.moe_only && n.moe == 0)) continue;
    Tensor& t = field(kStepFields, a.name, s);
    if (!t.defined()) t = Tensor::empty(a.shape, a.dtype, MemCategory::Activations);
  }
}

}  // namespace moe
