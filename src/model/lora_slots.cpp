// lora_slots.cpp — the adapter slots of a model (see lora_slots.h).
#include "model/lora_slots.h"

#include "model/arch.h"

namespace moe {

std::vector<LoraSlot> lora_slots(const ModelConfig& c, ModelWeights& w) {
  const ArchSpec& a = arch_spec(c.model_type);
  const int64_t qd = c.n_head * c.head_dim, kvd = c.n_head_kv * c.head_dim, d = c.hidden_size;
  std::vector<LoraSlot> out;
  auto add = [&](const char* tmpl, LoraKind kind, int64_t l, int64_t e, Lora& lora, Tensor& base, int64_t in,
                 int64_t o, int64_t row0 = 0) {
    if (!tmpl) return;
    LoraSlot s;
    s.module = tensor_name(tmpl, l, e, "");
    s.kind = kind;
    s.layer = l;
    s.expert = e;
    s.in = in;
    s.out = o;
    s.lora = &lora;
    s.base = &base;
    s.base_row0 = row0;
    out.push_back(std::move(s));
  };
  MOE_CHECK(int64_t(w.layers.size()) == c.n_layer,
            "lora_slots: weights for %lld layers, the config has %lld", (long long)w.layers.size(),
            (long long)c.n_layer);
  // Dimensions from the config (a gradient ModelWeights has no base tensors to read them from).
  for (int64_t l = 0; l < c.n_layer; ++l) {
    LayerWeights& lw = w.layers[size_t(l)];
    LayerWeights& bw = lw;
    if (c.is_mla()) {
      // MLA: the query projection(s), the latent's two projections, o_proj (PEFT's names).
      const int64_t h = c.n_head, dq = c.qk_nope_head_dim + c.qk_rope_head_dim, rkv = c.kv_lora_rank;
      if (c.q_lora_rank > 0) {
        add(a.q_a_proj, LoraKind::Attention, l, -1, lw.lq_a, bw.wq_a, d, c.q_lora_rank);
        add(a.q_b_proj, LoraKind::Attention, l, -1, lw.lq_b, bw.wq_b, c.q_lora_rank, h * dq);
      } else {
        add(a.q_proj, LoraKind::Attention, l, -1, lw.lq_b, bw.wq_b, d, h * dq);
      }
      add(a.kv_a_proj, LoraKind::Attention, l, -1, lw.lkv_a, bw.wkv_a, d, rkv + c.qk_rope_head_dim);
      add(a.kv_b_proj, LoraKind::Attention, l, -1, lw.lkv_b, bw.wkv_b, rkv, h * (c.qk_nope_head_dim + c.v_head_dim));
      add(a.o_proj, LoraKind::Attention, l, -1, lw.lo, bw.wo, h * c.v_head_dim, d);
    } else {
      add(a.q_proj, LoraKind::Attention, l, -1, lw.lq, bw.wqkv, d, qd, 0);
      add(a.k_proj, LoraKind::Attention, l, -1, lw.lk, bw.wqkv, d, kvd, qd);
      add(a.v_proj, LoraKind::Attention, l, -1, lw.lv, bw.wqkv, d, kvd, qd + kvd);
      add(a.o_proj, LoraKind::Attention, l, -1, lw.lo, bw.wo, qd, d);
    }
    if (c.layer_is_moe(l)) {
      add(a.router, LoraKind::Router, l, -1, lw.lrouter, bw.router, d, c.n_expert);
      const int64_t f = c.moe_intermediate_size;
      for (int64_t e = 0; e < c.n_expert; ++e) {
        add(a.expert_gate, LoraKind::Expert, l, e, lw.lexp.w1, bw.w1, d, f);
        out.back().fused_param = a.experts_gate_up;
        add(a.expert_up, LoraKind::Expert, l, e, lw.lexp.w3, bw.w3, d, f);
        out.back().fused_param = a.experts_gate_up;
        add(a.expert_down, LoraKind::Expert, l, e, lw.lexp.w2, bw.w2, f, d);
        out.back().fused_param = a.experts_down;
      }
      if (c.shared_expert_intermediate_size > 0) {
        const int64_t fs = c.shared_expert_intermediate_size;
        add(a.shared_gate, LoraKind::SharedExpert, l, -1, lw.lshared.w1, bw.shared_w1, d, fs);
        add(a.shared_up, LoraKind::SharedExpert, l, -1, lw.lshared.w3, bw.shared_w3, d, fs);
        add(a.shared_down, LoraKind::SharedExpert, l, -1, lw.lshared.w2, bw.shared_w2, fs, d);
      }
    } else {
      const int64_t fd = c.intermediate_size;
      add(a.dense_gate, LoraKind::DenseMlp, l, -1, lw.lmlp.w1, bw.w1, d, fd);
      add(a.dense_up, LoraKind::DenseMlp, l, -1, lw.lmlp.w3, bw.w3, d, fd);
      add(a.dense_down, LoraKind::DenseMlp, l, -1, lw.lmlp.w2, bw.w2, fd, d);
    }
  }
  return out;
}

std::string lora_a_name(const LoraSlot& s) { return "base_model.model." + s.module + ".lora_A.weight"; }
std::string lora_b_name(const LoraSlot& s) { return "base_model.model." + s.module + ".lora_B.weight"; }

Tensor slot_a(const LoraSlot& s) { return s.expert >= 0 ? s.lora->a.select(s.expert) : s.lora->a; }
Tensor slot_b(const LoraSlot& s) { return s.expert >= 0 ? s.lora->b.select(s.expert) : s.lora->b; }

bool lora_target_matches(const std::string& module, const std::string& target) {
  return module == target || (module.size() > target.size() && module.ends_with("." + target));
}

}  // namespace moe
