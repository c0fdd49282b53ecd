// planner.cpp — memory, communication and FLOP arithmetic (formulas in planner.h).
#include "plan/planner.h"

#include <algorithm>
#include <cmath>
#include <cstdio>

#include "core/error.h"
#include "core/nf4.h"
#include "model/activations.h"
#include "model/arch.h"
#include "model/model.h"

namespace moe {

const char* job_name(JobKind j) {
  switch (j) {
    case JobKind::Infer: return "infer";
    case JobKind::Train: return "train";
    case JobKind::Lora: return "lora";
    case JobKind::Qlora: return "qlora";
  }
  return "?";
}

JobKind parse_job(const std::string& s) {
  if (s == "infer" || s == "inference") return JobKind::Infer;
  if (s == "train") return JobKind::Train;
  if (s == "lora") return JobKind::Lora;
  if (s == "qlora") return JobKind::Qlora;
  MOE_FAIL("unknown --job '%s' (expected infer, train, lora or qlora)", s.c_str());
}

const WeightFormatInfo& weight_format_info(WeightFormat f) {
  static const WeightFormatInfo kInfo[] = {
      {WeightFormat::F32, "f32", 4, 1, "4 B/param"},
      {WeightFormat::BF16, "bf16", 2, 1, "2 B/param"},
      // DeepSeek-V3 style: e4m3 values + one f32 scale per 128x128 block.
      {WeightFormat::FP8, "fp8", 16384 + 4, 16384, "1 B/param + f32 scale per 128x128 block"},
      // Q8_0 style: 32 int8 values + one f16 scale = 34 B per 32.
      {WeightFormat::INT8, "int8", 34, 32, "blocks of 32 int8 + f16 scale (34 B / 32)"},
      // bitsandbytes NF4: 64 4-bit codes (32 B) + f32 absmax = 36 B per 64.
      {WeightFormat::NF4, "nf4", int64_t(kNf4BlockBytes), kNf4Block, "blocks of 64 4-bit codes + f32 absmax (36 B / 64)"},
      // NF4 with double quantisation as the engine stores it (core/nf4.h, DType::NF4DQ): per 256
      // params a bf16 scale, four u8 absmax codes and 128 bytes of codes.
      {WeightFormat::NF4DQ, "nf4-dq", int64_t(kNf4DqBlockBytes), kNf4DqBlock,
       "nf4 with u8 absmax per 64 under a bf16 scale per 256 (134 B / 256)"},
      // Q4_0 style: 32 4-bit values (16 B) + f16 scale = 18 B per 32.
      {WeightFormat::Q4, "q4", 18, 32, "blocks of 32 4-bit values + f16 scale (18 B / 32)"},
  };
  return kInfo[static_cast<int>(f)];
}

WeightFormat parse_weight_format(const std::string& s) {
  for (int i = 0; i <= static_cast<int>(WeightFormat::Q4); ++i) {
    auto f = static_cast<WeightFormat>(i);
    if (s == weight_format_info(f).name) return f;
  }
  if (s == "f16" || s == "fp16") return WeightFormat::BF16;  // same size
  if (s == "nf4dq") return WeightFormat::NF4DQ;
  MOE_FAIL("unknown --dtype '%s' (expected f32, bf16, fp8, int8, nf4, nf4-dq or q4)", s.c_str());
}

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int64_t n_ffn_mats(const PlanModel& m) { return m.ffn == FfnKind::SwiGLU ? 3 : 2; }
int64_t n_ffn_hidden(const PlanModel& m) { return m.ffn == FfnKind::SwiGLU ? 2 : 1; }
int64_t rest_elem_bytes(WeightFormat f) { return f == WeightFormat::F32 ? 4 : 2; }
bool is_quantised(WeightFormat f) { return f != WeightFormat::F32 && f != WeightFormat::BF16; }

// (in, out) of each linear in one attention block.
std::vector<std::pair<int64_t, int64_t>> attention_linears(const PlanModel& m) {
  const int64_t d = m.d_model, h = m.n_head;
  if (m.attn == AttnKind::MLA) {
    const int64_t qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
    std::vector<std::pair<int64_t, int64_t>> v;
    if (m.q_lora_rank > 0) {
      v.push_back({d, m.q_lora_rank});
      v.push_back({m.q_lora_rank, h * qk});
    } else {
      v.push_back({d, h * qk});
    }
    v.push_back({d, m.kv_lora_rank + m.qk_rope_head_dim});
    v.push_back({m.kv_lora_rank, h * (m.qk_nope_head_dim + m.v_head_dim)});
    v.push_back({h * m.v_head_dim, d});
    return v;
  }
  return {{d, h * m.head_dim}, {d, m.n_head_kv * m.head_dim}, {d, m.n_head_kv * m.head_dim}, {h * m.head_dim, d}};
}

}  // namespace

int64_t linear_bytes(int64_t n, WeightFormat f) {
  const auto& fi = weight_format_info(f);
  // n * num may exceed int64 for the largest models with fp8 (~7e11 * 16388): split the product.
  return (n / fi.bytes_den) * fi.bytes_num + ceil_div((n % fi.bytes_den) * fi.bytes_num, fi.bytes_den);
}

int64_t model_weight_bytes(const ParamCounts& pc, WeightFormat f) {
  return linear_bytes(pc.linear, f) + (pc.total - pc.linear) * rest_elem_bytes(f);
}

int64_t expert_weight_bytes(const ParamCounts& pc, WeightFormat f) {
  return linear_bytes(pc.expert_linear, f) + (pc.experts - pc.expert_linear) * rest_elem_bytes(f);
}

int64_t kv_cache_bytes(const PlanModel& m, int64_t batch, int64_t context, int64_t bytes) {
  int64_t per_seq = 0;
  for (auto& l : m.layers) {
    if (l.encoder) continue;
    const int64_t ctx = l.sliding && m.sliding_window > 0 ? std::min(context, m.sliding_window) : context;
    if (m.attn == AttnKind::MLA) {
      per_seq += ctx * (m.kv_lora_rank + m.qk_rope_head_dim) * bytes;
    } else {
      per_seq += ctx * 2 * m.n_head_kv * m.head_dim * bytes;
    }
    if (l.cross_attn) per_seq += context * 2 * m.n_head * m.head_dim * bytes;
  }
  return batch * per_seq;
}

int64_t engine_forward_activation_bytes(const PlanModel& m, int64_t batch, int64_t seq, int64_t a,
                                        bool last_logits_only) {
  const int64_t t = batch * seq, d = m.d_model, h = m.n_head;
  const int64_t qd = h * m.q_head_dim(), od = h * m.v_dim_per_head();
  const int64_t kd = m.attn == AttnKind::MLA ? qd : m.n_head_kv * m.head_dim;
  const int64_t vd = m.attn == AttnKind::MLA ? od : kd;
  const bool f32 = a == 4;
  // x, h, y [T,D] live through the forward.
  const int64_t persistent = a * t * 3 * d;
  // The attention block's temporaries (attention_block_infer): the stacked projection output
  // qkv [T,q+k+v], its split copies q, k, v (views when T = 1) and the attention output.
  int64_t attn_tmp = a * t * (qd + kd + vd) * (t > 1 ? 2 : 1) + a * t * od;
  if (m.attn == AttnKind::MLA) {
    // mla_block_infer, decode (absorbed): q [T,H(Dn+Dr)], kv_a [T,Rc], c_kv [T,Rkv], k_pe [T,Dr], the
    // latent rows [T,Rc], q_pe [T,H,Dr], the absorbed query and its output [T,H,Rc] and the value
    // output [T,H,Dv] all live to the block's end (Rc = Rkv + Dr); the q latent [T,Rq] is freed
    // before them.
    // A prefill (seq > 1 from an empty cache) runs the plain form instead: after the same first
    // six, kv_b_proj's output [T,H(Dn+Dv)], the per-head keys, padded values and attention
    // output [T,H(Dn+Dr)] each, and the value columns [T,H,Dv].
    const int64_t rc = m.kv_lora_rank + m.qk_rope_head_dim;
    const int64_t common = qd + rc + m.kv_lora_rank + m.qk_rope_head_dim + rc + h * m.qk_rope_head_dim;
    attn_tmp = seq > 1 ? a * t * (common + h * (m.qk_nope_head_dim + m.v_head_dim) + 3 * qd + od)
                       : a * t * (common + 2 * h * rc + od);
  }
  int64_t layer_max = attn_tmp;
  for (auto& l : m.layers) {
    int64_t tmp = 0;
    if (!l.moe) {
      tmp = (n_ffn_hidden(m) + 1) * a * t * m.dense_ffn;  // h1, h3 and the SwiGLU output [T,Fd]
    } else {
      const int64_t e = m.n_expert, k = m.n_expert_used, p = t * k;
      tmp = 4 * t * e + (f32 ? 0 : a * t * e)  // router logits f32 (+ the bf16 lg it is cast from)
            + 4 * t * k * 2                    // topk_idx i32, topk_w f32 [T,K]
            + 4 * (e + 1)                      // offsets
            + 4 * p * 3                        // perm, inv i32, row_scale f32 [P]
            + 2 * a * p * d;                   // xp, yp [P,D]
      if (m.shared_ffn > 0) {
        // s [T,D] and the shared MLP's h1, h3 [T,Fs] live across its SwiGLU output [T,Fs] and
        // then the gate logit gf [T,1] f32.
        tmp += a * t * d + n_ffn_hidden(m) * a * t * m.shared_ffn + std::max(a * t * m.shared_ffn, 4 * t);
      }
    }
    layer_max = std::max(layer_max, tmp);
  }
  const bool last_only = last_logits_only && seq > 1;
  const int64_t rows = last_only ? batch : t;
  const int64_t head = (last_only ? a * batch * d : 0)  // xf [B,D]
                       + a * rows * d                    // hf
                       + a * rows * m.vocab              // logits
                       + (f32 ? 0 : 4 * rows * m.vocab); // f32 copy of the logits
  return persistent + std::max(layer_max, head);
}

int64_t lora_params(const PlanModel& m, int64_t r, LoraTargets targets) {
  int64_t attn = 0;
  for (auto& [in, out] : attention_linears(m)) attn += r * (in + out);
  int64_t n = 0;
  const int64_t d = m.d_model;
  for (auto& l : m.layers) {
    n += attn * (l.cross_attn ? 2 : 1);
    if (targets != LoraTargets::All) continue;
    if (!l.moe) {
      n += n_ffn_mats(m) * r * (d + m.dense_ffn);
    } else {
      n += m.n_expert * n_ffn_mats(m) * r * (d + m.expert_ffn);
      if (m.shared_ffn > 0) n += n_ffn_mats(m) * r * (d + m.shared_ffn);
    }
  }
  return n;
}

int64_t lora_expert_params(const PlanModel& m, int64_t r, LoraTargets targets) {
  if (targets != LoraTargets::All) return 0;
  return m.n_moe_layers() * m.n_expert * n_ffn_mats(m) * r * (m.d_model + m.expert_ffn);
}

TrainActivations train_activation_bytes(const PlanModel& m, int64_t micro_batch, int64_t seq, bool checkpointing,
                                        int64_t lora_r, LoraTargets targets, int64_t tp) {
  const int64_t a = 2, t = micro_batch * seq, d = m.d_model, h = m.n_head;
  int64_t attn = a * t * 2 * d + 4 * t * h;  // x, h [T,D]; f32 log-sum-exp [T,H]
  if (m.attn == AttnKind::MLA) {
    const int64_t qk = m.qk_nope_head_dim + m.qk_rope_head_dim;
    attn += a * t * (m.q_lora_rank > 0 ? 2 * m.q_lora_rank : 0)           // c_q and its norm
            + a * t * (m.kv_lora_rank + m.qk_rope_head_dim) + a * t * m.kv_lora_rank  // c_kv, its norm
            + a * t * h * (2 * qk + 2 * m.v_head_dim);                     // q, k, v, output
  } else {
    attn += a * t * (2 * h * m.head_dim + 2 * m.n_head_kv * m.head_dim);  // q, output; k, v
  }
  const int64_t n_attn_lin = static_cast<int64_t>(attention_linears(m).size());
  TrainActivations r;
  for (auto& l : m.layers) {
    int64_t b = attn * (l.cross_attn ? 2 : 1) + a * t * 2 * d;  // + FFN norm in/out
    int64_t lora_rows = lora_r > 0 ? t * n_attn_lin * (l.cross_attn ? 2 : 1) : 0;
    if (!l.moe) {
      b += n_ffn_hidden(m) * a * t * m.dense_ffn;
      if (lora_r > 0 && targets == LoraTargets::All) lora_rows += t * n_ffn_mats(m);
    } else {
      const int64_t k = m.n_expert_used;
      b += 4 * t * m.n_expert + 16 * t * k + n_ffn_hidden(m) * a * t * k * m.expert_ffn;
      if (m.shared_ffn > 0) b += n_ffn_hidden(m) * a * t * m.shared_ffn;
      if (lora_r > 0 && targets == LoraTargets::All)
        lora_rows += t * k * n_ffn_mats(m) + (m.shared_ffn > 0 ? t * n_ffn_mats(m) : 0);
    }
    b += a * lora_rows * lora_r;
    r.per_layer_max = std::max(r.per_layer_max, b);
    r.layers += checkpointing ? a * t * d : b;
  }
  r.working = r.per_layer_max;
  r.head = a * t * 2 * d + 4 * t * m.vocab;
  r.per_layer_max = ceil_div(r.per_layer_max, tp);
  r.layers = ceil_div(r.layers, tp);
  r.working = ceil_div(r.working, tp);
  r.head = ceil_div(r.head, tp);
  r.total = r.layers + r.working + r.head;
  return r;
}

void validate_parallel(const PlanModel& m, const Parallel& p) {
  MOE_CHECK(p.dp >= 1 && p.tp >= 1 && p.ep >= 1, "--dp, --tp and --ep must be >= 1 (got %lld, %lld, %lld)",
            (long long)p.dp, (long long)p.tp, (long long)p.ep);
  MOE_CHECK(p.zero >= 0 && p.zero <= 3, "--zero must be 0, 1, 2 or 3, got %d", p.zero);
  if (p.ep > 1) {
    MOE_CHECK(m.n_expert > 0, "--ep %lld: model %s has no experts", (long long)p.ep, m.name.c_str());
    MOE_CHECK(p.ep <= m.n_expert, "--ep %lld: more expert-parallel ranks than experts (%s has %lld experts per layer)",
              (long long)p.ep, m.name.c_str(), (long long)m.n_expert);
    MOE_CHECK(m.n_expert % p.ep == 0, "--ep %lld does not divide the %lld experts of %s", (long long)p.ep,
              (long long)m.n_expert, m.name.c_str());
    MOE_CHECK(p.dp % p.ep == 0,
              "--ep %lld must divide --dp %lld (expert-parallel ranks are drawn from the data-parallel ranks)",
              (long long)p.ep, (long long)p.dp);
  }
  MOE_CHECK(m.n_head % p.tp == 0, "--tp %lld does not divide the %lld attention heads of %s", (long long)p.tp,
            (long long)m.n_head, m.name.c_str());
}

namespace {
// Parameters per gradient group of the fused update (model_train.h), from the tensor list a
// config implies.
struct GroupParams {
  int64_t head = 0, embed = 0, largest_layer = 0;
  // The largest layer when its routed experts come one at a time (forward_backward_fused in one
  // process): the rest of the layer plus one expert's weights — not where the experts carry
  // biases (gpt_oss), which keeps them stacked.
  int64_t largest_layer_each_expert = 0;
};
GroupParams group_params(const ModelConfig& c) {
  const ArchSpec& a = arch_spec(c.model_type);
  const std::string embed = tensor_name(a.embed);
  std::vector<int64_t> layer(static_cast<size_t>(c.n_layer), 0), experts(layer.size(), 0);
  std::vector<bool> expert_bias(layer.size(), false);
  GroupParams g;
  for (const auto& [name, shape] : expected_tensors(c)) {
    const int64_t n = shape_numel(shape);
    long l = -1;
    if (std::sscanf(name.c_str(), "model.layers.%ld.", &l) == 1 && l >= 0 && l < c.n_layer) {
      layer[static_cast<size_t>(l)] += n;
      if (name.find(".experts.") != std::string::npos) {
        experts[static_cast<size_t>(l)] += n;
        if (name.ends_with("bias")) expert_bias[static_cast<size_t>(l)] = true;
      }
    } else if (name == embed) {
      g.embed += n;
    } else {
      g.head += n;
    }
  }
  const int64_t one_expert = 3 * c.moe_intermediate_size * c.hidden_size;
  for (size_t l = 0; l < layer.size(); ++l) {
    g.largest_layer = std::max(g.largest_layer, layer[l]);
    const bool each = experts[l] > 0 && !expert_bias[l];
    g.largest_layer_each_expert =
        std::max(g.largest_layer_each_expert, each ? layer[l] - experts[l] + one_expert : layer[l]);
  }
  return g;
}
}  // namespace

EngineTrainPlan engine_train_plan(const PlanModel& m, int64_t batch, int64_t seq, bool recompute,
                                  const EngineTrainOptions& opt) {
  MOE_CHECK(m.engine.has_value(),
            "%s: the CPU engine runs mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v2 and deepseek_v3 configs, "
            "not this %s one (plan it for GPUs instead)",
            m.name.c_str(), m.family.c_str());
  MOE_CHECK(batch >= 1 && batch <= (int64_t(1) << 24), "batch must be in [1, 2^24], got %lld", (long long)batch);
  MOE_CHECK(seq >= 1 && seq <= (int64_t(1) << 24), "sequence length must be in [1, 2^24], got %lld", (long long)seq);
  const ModelConfig& c = *m.engine;
  // A bound on the layout's bytes in floating point, so the exact int64 sums below cannot overflow.
  const double t = double(batch) * double(seq);
  const double widths = 12.0 * double(c.hidden_size) + 6.0 * double(c.n_head + c.n_head_kv) * double(c.head_dim) +
                        4.0 * double(c.n_expert_used) * double(c.moe_intermediate_size + c.hidden_size + 4) +
                        4.0 * double(c.shared_expert_intermediate_size + c.intermediate_size + c.n_expert + 8) +
                        double(c.vocab_size);
  const double bound = 4.0 * t * widths * double(c.n_layer + 2) + 4.0 * double(c.n_expert + 1) * double(c.n_layer);
  MOE_CHECK(bound < 1e18, "%s: batch %lld x seq %lld is too large to plan (activations above 10^18 bytes)",
            m.name.c_str(), (long long)batch, (long long)seq);
  const ActivationLayout lay =
      activation_layout(c, batch, seq, recompute ? ActMode::TrainingRecompute : ActMode::Training,
                        opt.weights_bf16 ? DType::BF16 : DType::F32,
                        opt.weights_bf16 && opt.bf16_matrix ? HeadGrad::TrainsBf16 : HeadGrad::Trains);
  EngineTrainPlan r;
  r.act_saved = lay.entry_bytes(c);
  r.act_step = lay.step_bytes(c);
  r.act_working = lay.working_bytes(c, &r.working_phase);
  const int64_t n = plan_params(m).total;
  // DeepSeek-V3's selection bias is a buffer: held with the weights, never a gradient or moments.
  const int64_t trainable = n - (m.router_score_bias ? m.n_moe_layers() * m.n_expert : 0);
  const GroupParams gp = group_params(c);
  // weights_bf16 splits the matrices into bf16 upper and lower halves: the f32 bytes (model_train.h).
  r.mem.weights = 4 * n;
  if (opt.fused_update) {
    const int64_t tied = c.tie_word_embeddings ? gp.embed : 0;
    r.mem.grads = 4 * std::max({gp.head + tied, gp.largest_layer_each_expert + tied, gp.embed});
  } else {
    r.mem.grads = 4 * trainable;
  }
  r.mem.optimizer = (opt.optimizer_bf16 ? 4 : 8) * trainable;
  r.mem.activations = lay.total_bytes(c);
  return r;
}

MemoryPlan plan_memory(const PlanModel& m, const JobSpec& job, const Parallel& p) {
  validate_parallel(m, p);
  MOE_CHECK(job.batch >= 1, "batch must be >= 1, got %lld", (long long)job.batch);
  MOE_CHECK(job.seq >= 1, "sequence length must be >= 1, got %lld", (long long)job.seq);
  MOE_CHECK(job.job != JobKind::Infer || job.context >= 1, "context must be >= 1, got %lld", (long long)job.context);
  if (job.cpu_engine) {
    MOE_CHECK(p.gpus() == 1 && p.ep == 1 && p.zero == 0,
              "the CPU engine plan is for one process (no --dp, --tp, --ep or --zero)");
    MOE_CHECK(job.job == JobKind::Train || job.job == JobKind::Infer,
              "the CPU engine plan covers --job train and infer, not %s", job_name(job.job));
    MOE_CHECK(m.engine.has_value(),
              "%s: the CPU engine runs mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v2 and deepseek_v3 configs, "
            "not this %s one (plan it for GPUs instead)",
              m.name.c_str(), m.family.c_str());
    if (job.job == JobKind::Train)
      return engine_train_plan(m, job.batch, job.seq, job.checkpointing, job.engine_train).mem;
    MOE_CHECK(job.act_bytes == 4, "the CPU engine computes in f32 (act_bytes 4), got %lld", (long long)job.act_bytes);
  }
  const ParamCounts pc = plan_params(m);
  const int64_t tp = p.tp, ep = p.ep, dp = p.dp, dp_ex = p.dp / p.ep;
  // Per-GPU share of a non-expert / expert quantity before ZeRO.
  auto split = [&](int64_t ne, int64_t ex) { return ceil_div(ne, tp) + ceil_div(ex, ep * tp); };
  auto shard = [&](int64_t ne, int64_t ex, int stage) {
    const bool on = p.zero >= stage;
    return ceil_div(ceil_div(ne, tp), on ? dp : 1) + ceil_div(ceil_div(ex, ep * tp), on ? dp_ex : 1);
  };
  MemoryPlan mp;
  mp.workspace = job.overhead_bytes;
  if (job.job == JobKind::Train) {
    const int64_t ne = pc.total - pc.experts, ex = pc.experts;
    mp.weights = 2 * shard(ne, ex, 3);
    mp.grads = 2 * shard(ne, ex, 2);
    mp.optimizer = 12 * shard(ne, ex, 1);
    mp.activations = train_activation_bytes(m, job.batch, job.seq, job.checkpointing, 0, job.lora_targets, tp).total;
    return mp;
  }
  // Inference and LoRA: frozen weights in a format (LoRA: bf16).
  WeightFormat f = job.job == JobKind::Lora ? WeightFormat::BF16 : job.weights;
  if (job.job == JobKind::Qlora)
    MOE_CHECK(f == WeightFormat::NF4 || f == WeightFormat::NF4DQ || f == WeightFormat::Q4 || f == WeightFormat::INT8 ||
                  f == WeightFormat::FP8,
              "qlora needs a quantised base (--dtype nf4, nf4-dq, q4, int8 or fp8), got %s",
              weight_format_info(f).name);
  const int64_t lin_ex = linear_bytes(pc.expert_linear, f), lin_all = linear_bytes(pc.linear, f);
  const int64_t rest_ex = (pc.experts - pc.expert_linear) * rest_elem_bytes(f);
  const int64_t rest_all = (pc.total - pc.linear) * rest_elem_bytes(f);
  const bool z3 = job.job != JobKind::Infer && p.zero >= 3;
  auto frozen = [&](int64_t ne, int64_t ex) {
    return z3 ? ceil_div(ceil_div(ne, tp), dp) + ceil_div(ceil_div(ex, ep * tp), dp_ex) : split(ne, ex);
  };
  const int64_t lin = frozen(lin_all - lin_ex, lin_ex), rest = frozen(rest_all - rest_ex, rest_ex);
  if (is_quantised(f)) {
    mp.quant_weights = lin;
    mp.weights = rest;
  } else {
    mp.weights = lin + rest;
  }
  if (job.job == JobKind::Infer) {
    const int64_t b_local = ceil_div(job.batch, dp);
    const int64_t kv_split = m.attn == AttnKind::MLA ? 1 : std::min(tp, m.n_head_kv);
    mp.kv_cache = ceil_div(kv_cache_bytes(m, b_local, job.context, job.act_bytes), kv_split);
    const int64_t chunk = std::min(job.seq, job.context);
    mp.activations =
        ceil_div(engine_forward_activation_bytes(m, b_local, chunk, job.act_bytes, job.last_logits_only), tp);
    return mp;
  }
  const int64_t lp = lora_params(m, job.lora_r, job.lora_targets), lpe = lora_expert_params(m, job.lora_r, job.lora_targets);
  mp.lora = 4 * split(lp - lpe, lpe);
  mp.grads = 4 * shard(lp - lpe, lpe, 2);
  mp.optimizer = 8 * shard(lp - lpe, lpe, 1);
  mp.activations =
      train_activation_bytes(m, job.batch, job.seq, job.checkpointing, job.lora_r, job.lora_targets, tp).total;
  if (job.job == JobKind::Qlora) {
    // One linear dequantised to bf16 at a time (the largest one bounds the buffer).
    int64_t largest = 0;
    for (auto& [in, out] : attention_linears(m)) largest = std::max(largest, in * out);
    largest = std::max({largest, m.d_model * m.dense_ffn, m.d_model * m.expert_ffn, m.d_model * m.shared_ffn});
    mp.workspace += 2 * ceil_div(largest, tp);
  }
  return mp;
}

double all_to_all_bytes(const PlanModel& m, const JobSpec& job, const Parallel& p) {
  if (p.ep <= 1) return 0.0;
  const int64_t b_local = job.job == JobKind::Infer ? ceil_div(job.batch, p.dp) : job.batch;
  const double rows = double(b_local) * double(job.job == JobKind::Infer ? std::min(job.seq, job.context) : job.seq) *
                      double(m.n_expert_used);
  const double per_layer = 2.0 * rows * double(m.d_model) * double(job.act_bytes) * double(p.ep - 1) / double(p.ep);
  return per_layer * double(m.n_moe_layers()) * (job.job == JobKind::Infer ? 1.0 : 2.0);
}

EngineDistComm engine_dist_comm(const PlanModel& m, int64_t batch_rows_global, int64_t seq, int64_t ep, int64_t dp,
                                bool recompute, int64_t rows_off) {
  MOE_CHECK(m.engine.has_value(),
            "%s: the CPU engine runs mixtral, qwen2_moe, qwen3_moe, olmoe, gpt_oss, deepseek_v2 and deepseek_v3 configs, "
            "not this %s one (plan it for GPUs instead)",
            m.name.c_str(), m.family.c_str());
  MOE_CHECK(ep >= 1 && dp >= 1 && ep <= 4096 && dp <= 4096, "--ep and --dp must be in [1, 4096], got --ep %lld --dp %lld",
            (long long)ep, (long long)dp);
  MOE_CHECK(batch_rows_global >= 1 && batch_rows_global <= (int64_t(1) << 24), "batch must be in [1, 2^24], got %lld",
            (long long)batch_rows_global);
  MOE_CHECK(seq >= 1 && seq <= (int64_t(1) << 24), "sequence length must be in [1, 2^24], got %lld", (long long)seq);
  const int64_t e_n = m.n_expert, l_moe = m.n_moe_layers();
  MOE_CHECK(ep == 1 || (e_n > 0 && e_n % ep == 0), "--ep %lld: the model's %lld routed experts do not divide evenly",
            (long long)ep, (long long)e_n);
  const ParamCounts pc = plan_params(m);
  // A bound in floating point, so the exact int64 sums below cannot overflow.
  const double rows_bound = double(l_moe) * double(batch_rows_global) * double(seq) * double(m.n_expert_used);
  const double bound = rows_bound * (24.0 * double(m.d_model) + 12.0) + 4.0 * double(ep * dp) * double(pc.total) +
                       16.0 * double(ep * dp) * double(ep) * double(l_moe + 1) * double(e_n + 2);
  MOE_CHECK(bound < 1e18, "%s: the job is too large to plan (above 10^18 bytes per step)", m.name.c_str());
  const int64_t n = ep * dp, t = batch_rows_global * seq, el = ep > 1 ? e_n / ep : e_n, d = m.d_model;
  // Summed over a group of g ranks, an all-reduce of `bytes` moves 2 (g-1) bytes.
  auto ar = [](int64_t g, int64_t bytes) { return 2 * (g - 1) * bytes; };
  EngineDistComm r;
  r.ranks = n;
  if (n > 1) {
    r.stats = ar(n, 8 * (2 + l_moe * (2 * e_n + 2)));
    r.ce = ar(n, 8);
    r.dense_grads = ar(n, 4 * (pc.total - pc.experts));
  }
  if (dp > 1) r.expert_grads = ar(dp, 4 * pc.experts);  // ep groups of El experts each: all experts once
  if (ep > 1) {
    r.clip = dp * ar(ep, 8);
    const int64_t passes = recompute ? 2 : 1;  // forward passes through each MoE layer
    r.counts = passes * l_moe * n * (ep - 1) * el * 8;
    MOE_CHECK(rows_off < 0 || rows_off <= l_moe * t * m.n_expert_used,
              "engine_dist_comm: %lld off-rank rows exceed the %lld routed assignments", (long long)rows_off,
              (long long)(l_moe * t * m.n_expert_used));
    r.rows_off = rows_off >= 0 ? rows_off : l_moe * t * m.n_expert_used * (ep - 1) / ep;
    r.rows = r.rows_off * ((8 * d + 4) * (passes + 1));
  }
  return r;
}

double flops_per_token(const PlanModel& m, const JobSpec& job) {
  const ParamCounts pc = plan_params(m);
  const double s = double(job.seq);
  double attn = 0;
  for (auto& l : m.layers) {
    double keys = l.encoder ? s : s / 2;
    if (l.sliding && m.sliding_window > 0) keys = std::min(keys, double(m.sliding_window));
    attn += 2.0 * keys * double(m.n_head) * double(m.q_head_dim() + m.v_dim_per_head());
    if (l.cross_attn) attn += 2.0 * s * double(m.n_head) * double(2 * m.head_dim);
  }
  const double fwd = 2.0 * double(pc.active_no_embed) + attn;
  switch (job.job) {
    case JobKind::Infer: return fwd;
    case JobKind::Train: return 3.0 * fwd;
    case JobKind::Lora:
    case JobKind::Qlora: {
      const double lp = double(lora_params(m, job.lora_r, job.lora_targets));
      const double lpe = double(lora_expert_params(m, job.lora_r, job.lora_targets));
      const double active_lora = lp - lpe + (m.n_expert > 0 ? lpe * double(m.n_expert_used) / double(m.n_expert) : 0);
      return 2.0 * fwd + 6.0 * active_lora;
    }
  }
  return fwd;
}

}  // namespace moe
