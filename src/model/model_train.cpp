// model_train.cpp — training forward/backward over the blocks, the losses, HF-named parameters.
#include "model/model_train.h"

#include <chrono>
#include <cmath>
#include <functional>

#include "model/arch.h"
#include "model/attention_block.h"
#include "model/lora_slots.h"
#include "ops/ops.h"

namespace moe {
namespace {

// Host ids/labels [B,S] (i32 or i64) must agree in shape and fit the model's positions.
void check_batch(const ModelConfig& c, const Tensor& ids_in, const Tensor& labels_in) {
  MOE_CHECK(ids_in.ndim() == 2, "training batch: input_ids must be [B,S], got %s", ids_in.shape_str().c_str());
  MOE_CHECK(labels_in.shape() == ids_in.shape(), "training batch: labels %s do not match input_ids %s",
            labels_in.shape_str().c_str(), ids_in.shape_str().c_str());
  MOE_CHECK(ids_in.device() == Device::CPU && labels_in.device() == Device::CPU, "training batch must be on the host");
  MOE_CHECK(ids_in.dim(1) <= c.max_position_embeddings,
            "training batch: sequence length %lld exceeds the model's limit %lld", (long long)ids_in.dim(1),
            (long long)c.max_position_embeddings);
}

// Host ids/labels [B,S] -> i32 token ids [T] and shifted targets [T] (allocated by the caller):
// position t of a sequence predicts labels[t+1]; the last position and -100 labels count for nothing.
void prepare_batch(const ModelConfig& c, const Tensor& ids_in, const Tensor& labels_in, Tensor& ids, Tensor& targets) {
  const int64_t b_n = ids_in.dim(0), s_n = ids_in.dim(1), t_n = b_n * s_n;
  auto read = [](const Tensor& t, int64_t i) -> int64_t {
    if (t.dtype() == DType::I64) return t.data<int64_t>()[i];
    MOE_CHECK(t.dtype() == DType::I32, "training batch: ids and labels must be i32 or i64, got %s", dtype_name(t.dtype()));
    return t.data<int32_t>()[i];
  };
  for (int64_t i = 0; i < t_n; ++i) {
    const int64_t v = read(ids_in, i);
    MOE_CHECK(v >= 0 && v < c.vocab_size, "training batch: token id %lld out of range [0,%lld)", (long long)v,
              (long long)c.vocab_size);
    ids.data<int32_t>()[i] = static_cast<int32_t>(v);
    int64_t tg = -100;
    if ((i % s_n) + 1 < s_n) tg = read(labels_in, i + 1);
    MOE_CHECK(tg == -100 || (tg >= 0 && tg < c.vocab_size), "training batch: label %lld out of range [0,%lld)",
              (long long)tg, (long long)c.vocab_size);
    targets.data<int32_t>()[i] = static_cast<int32_t>(tg);
  }
}

// Rows of the LM head: when the rows of h [T,D] whose target is not -100 fill fewer chunks of
// `chunk` rows than all T rows do, moves them to the front, in order, with their targets [T]
// (the targets after them become -100), records each one's original row in *kept and returns
// those rows rounded up to whole chunks (< T); otherwise moves nothing and returns T (every
// sequence's last position has no target: plain language-model batches stay as they are).
int64_t compact_target_rows(Tensor& h, Tensor& targets, int64_t chunk, std::vector<int64_t>* kept) {
  const int64_t t_n = targets.numel(), d = h.dim(1);
  kept->clear();
  if (t_n == 0 || chunk <= 0) return t_n;  // a rank with no rows of the batch
  int32_t* tg = targets.data<int32_t>();
  int64_t n = 0;
  for (int64_t i = 0; i < t_n; ++i) n += tg[i] != -100;
  const int64_t head_chunks = (n + chunk - 1) / chunk;
  if (head_chunks >= (t_n + chunk - 1) / chunk) return t_n;
  kept->reserve(size_t(n));
  float* hp = h.data<float>();
  for (int64_t i = 0; i < t_n; ++i) {
    if (tg[i] == -100) continue;
    const int64_t j = int64_t(kept->size());
    if (j != i) {
      std::memcpy(hp + j * d, hp + i * d, size_t(d) * sizeof(float));
      tg[j] = tg[i];
    }
    kept->push_back(i);
  }
  std::fill(tg + n, tg + t_n, -100);
  return head_chunks * chunk;
}

// The inverse for the head's input gradient dh [T,D], whose first rows are the kept rows'
// (compact_target_rows moved them): each goes back to its row, and the other rows get 0.
void spread_target_rows(Tensor& dh, const std::vector<int64_t>& kept) {
  const int64_t n = int64_t(kept.size()), d = dh.dim(1);
  float* p = dh.data<float>();
  // From the last: row kept[j] >= j, so no source row is overwritten before it is read.
  for (int64_t j = n; j-- > 0;)
    if (kept[size_t(j)] != j) std::memcpy(p + kept[size_t(j)] * d, p + j * d, size_t(d) * sizeof(float));
  for (int64_t j = 0, i = 0; i < dh.dim(0); ++i) {
    if (j < n && kept[size_t(j)] == i) {
      ++j;
      continue;
    }
    std::memset(p + i * d, 0, size_t(d) * sizeof(float));
  }
}

// The tensors one layer computes with: its own saved set (Training), or the shared set with
// the layer's kept input (TrainingRecompute). Tensors share storage; this copies handles only.
LayerActs layer_view(const LayerActs& own, const LayerActs& shared, bool recompute) {
  LayerActs a = recompute ? shared : own;
  a.x_in = own.x_in;
  a.qkv = shared.qkv;
  return a;
}

// Which tensors a layer transform produces: the base weights (else left undefined), the router
// among them, the routed experts among them, and the LoRA factors (through fn, or shared as
// they are).
struct LayerSel {
  bool base = true;
  bool router = true;
  bool lora_fn = false;  // false: the result shares the source's factors
  bool experts = true;   // the routed experts' weights (w1, w3, w2) among the base ones
};

// One layer of transform_weights / zeros_like.
LayerWeights transform_layer(const ModelConfig& c, const LayerWeights& lw,
                             const std::function<Tensor(const Tensor&)>& fn, LayerSel sel = {}) {
  auto f = [&](const Tensor& t) { return t.defined() && sel.base ? fn(t) : Tensor(); };
  LayerWeights lg;
  {
    lg.is_moe = lw.is_moe;
    lg.attn_norm = f(lw.attn_norm);
    lg.ffn_norm = f(lw.ffn_norm);
    lg.wqkv = f(lw.wqkv);
    lg.bqkv = f(lw.bqkv);
    set_qkv_views(c, lg);
    lg.wo = f(lw.wo);
    lg.bo = f(lw.bo);
    lg.q_norm = f(lw.q_norm);
    lg.k_norm = f(lw.k_norm);
    lg.sinks = f(lw.sinks);
    lg.wq_a = f(lw.wq_a);
    lg.q_a_norm = f(lw.q_a_norm);
    lg.wq_b = f(lw.wq_b);
    lg.wkv_a = f(lw.wkv_a);
    lg.kv_a_norm = f(lw.kv_a_norm);
    lg.wkv_b = f(lw.wkv_b);
    lg.attn_window = lw.attn_window;
    lg.router = lw.router.defined() && sel.router ? fn(lw.router) : Tensor();
    lg.brouter = lw.brouter.defined() && sel.router ? fn(lw.brouter) : Tensor();
    lg.b1 = f(lw.b1);
    lg.b3 = f(lw.b3);
    lg.b2 = f(lw.b2);
    lg.router_bias = lw.router_bias;  // not a parameter: shared, never transformed
    if (sel.experts) {
      lg.w1 = f(lw.w1);
      lg.w3 = f(lw.w3);
      lg.w2 = f(lw.w2);
    }
    lg.shared_w1 = f(lw.shared_w1);
    lg.shared_w3 = f(lw.shared_w3);
    lg.shared_w2 = f(lw.shared_w2);
    lg.shared_gate = f(lw.shared_gate);
  }
  const auto dst = lg.loras();
  const auto src = lw.loras();
  for (size_t i = 0; i < LayerWeights::kNumLoras; ++i) {
    *dst[i] = *src[i];
    if (sel.lora_fn && src[i]->on()) {
      dst[i]->a = fn(src[i]->a);
      dst[i]->b = fn(src[i]->b);
    }
  }
  // Fused experts' gate and up share one A (train/lora_fused.h): so do its transforms.
  if (sel.lora_fn && lw.lexp.w1.on() && lw.lexp.w3.on() && lw.lexp.w1.a.raw() == lw.lexp.w3.a.raw())
    lg.lexp.w3.a = lg.lexp.w1.a;
  return lg;
}

// The tensors that get gradients: everything, or with a frozen base the adapters (and the
// routers when trained).
LayerSel grad_selection(const ModelWeights& w) {
  return {!w.frozen_base, !w.frozen_base || w.train_router, true};
}

}  // namespace

ModelWeights transform_weights(const ModelConfig& c, const ModelWeights& w,
                               const std::function<Tensor(const Tensor&)>& fn) {
  auto f = [&](const Tensor& t) { return t.defined() ? fn(t) : Tensor(); };
  ModelWeights g;
  g.embed = f(w.embed);
  g.final_norm = f(w.final_norm);
  g.lm_head = c.tie_word_embeddings ? g.embed : f(w.lm_head);
  for (const LayerWeights& lw : w.layers) g.layers.push_back(transform_layer(c, lw, fn));
  g.frozen_base = w.frozen_base;
  g.train_router = w.train_router;
  g.expert_begin = w.expert_begin;
  return g;
}

uint16_t* MasterLowHalves::of(const Tensor& t) const {
  if (!t.defined() || t.dtype() != DType::BF16 || by_start_.empty()) return nullptr;
  const uintptr_t p = reinterpret_cast<uintptr_t>(t.raw());
  auto it = by_start_.upper_bound(p);
  if (it == by_start_.begin()) return nullptr;
  --it;
  if (p + t.nbytes() > it->first + it->second.bytes) return nullptr;
  return it->second.low.data<uint16_t>() + (p - it->first) / 2;
}

void MasterLowHalves::add(const Tensor& high, Tensor low) {
  MOE_ASSERT(high.dtype() == DType::BF16 && low.nbytes() == high.nbytes());
  by_start_[reinterpret_cast<uintptr_t>(high.raw())] = {high.nbytes(), std::move(low)};
}

MasterLowHalves split_master(const ModelConfig& c, ModelWeights& w) {
  // The allocator keeps freed blocks and lends one to a request of at least half its size
  // (core/memory.cpp): a half placed in a freed f32 block would leave that block's other pages
  // resident. So what loading freed, and each source once split, go back to the system first.
  mem_trim();
  MasterLowHalves low;
  auto split = [&](const Tensor& t) {
    if (t.ndim() < 2) return t;
    MOE_CHECK(t.dtype() == DType::F32 && t.device() == Device::CPU,
              "mixed precision: master weight %s must be f32 on the CPU", t.desc().c_str());
    Tensor hi = Tensor::empty(t.shape(), DType::BF16, MemCategory::Weights);
    Tensor lo = Tensor::empty({2 * t.numel()}, DType::U8, MemCategory::Weights);
    const uint32_t* x = t.data<uint32_t>();
    uint16_t* h = hi.data<uint16_t>();
    uint16_t* l = lo.data<uint16_t>();
    const int64_t n = t.numel();
#pragma omp parallel for schedule(static) if(n > 65536)
    for (int64_t j = 0; j < n; ++j) {
      h[j] = master_high(x[j]);
      l[j] = static_cast<uint16_t>(x[j]);
    }
    low.add(hi, std::move(lo));
    release_mapped(t);  // a tensor borrowed from the file mapping: its pages leave the RSS
    return hi;
  };
  // One tensor or layer at a time, each source dropped before the next is split.
  {
    const Tensor e = std::move(w.embed);
    w.embed = split(e);
  }
  if (c.tie_word_embeddings) {
    w.lm_head = w.embed;
  } else if (w.lm_head.defined()) {
    mem_trim();
    const Tensor h = std::move(w.lm_head);
    w.lm_head = split(h);
  }
  for (LayerWeights& lw : w.layers) {
    mem_trim();
    const LayerWeights old = std::move(lw);
    lw = transform_layer(c, old, split);
  }
  mem_trim();
  return low;
}

Tensor join_master(const Tensor& t, const MasterLowHalves& low) {
  const uint16_t* l = low.of(t);
  if (!l) return t;
  Tensor f = Tensor::empty(t.shape(), DType::F32, MemCategory::Workspace);
  const uint16_t* h = t.data<uint16_t>();
  uint32_t* x = f.data<uint32_t>();
  const int64_t n = t.numel();
#pragma omp parallel for schedule(static) if(n > 65536)
  for (int64_t j = 0; j < n; ++j) x[j] = master_bits(h[j], l[j]);
  return f;
}

ModelWeights join_master(const ModelConfig& c, const ModelWeights& w, const MasterLowHalves& low) {
  return transform_weights(c, w, [&](const Tensor& t) { return join_master(t, low); });
}

ModelWeights zeros_like(const ModelConfig& c, const ModelWeights& w, MemCategory cat) {
  auto zeros = [&](const Tensor& t) { return Tensor::zeros(t.shape(), DType::F32, cat); };
  ModelWeights g;
  const LayerSel sel = grad_selection(w);
  if (sel.base) {
    g.embed = zeros(w.embed);
    g.final_norm = zeros(w.final_norm);
    g.lm_head = c.tie_word_embeddings ? g.embed : zeros(w.lm_head);
  }
  for (const LayerWeights& lw : w.layers) g.layers.push_back(transform_layer(c, lw, zeros, sel));
  g.expert_begin = w.expert_begin;
  return g;
}

std::vector<NamedParam> named_parameters(const ModelConfig& c, const ModelWeights& w, bool trainable_only) {
  const ArchSpec& a = arch_spec(c.model_type);
  std::vector<NamedParam> out;
  const bool skip_base = trainable_only && w.frozen_base;
  const bool skip_router = skip_base && !w.train_router;
  // The adapters of each layer, after its base parameters, under PEFT's names.
  std::vector<std::vector<LoraSlot>> slots_by_layer(static_cast<size_t>(c.n_layer));
  ModelWeights& mw = const_cast<ModelWeights&>(w);  // lora_slots hands out mutable pointers; only read here
  for (LoraSlot& s : lora_slots(c, mw))
    if (s.lora->on()) slots_by_layer[static_cast<size_t>(s.layer)].push_back(std::move(s));
  auto add = [&](std::string name, const Tensor& t, int64_t layer, int64_t expert = -1) {
    if (!t.defined()) return;
    if (skip_base && !((name == tensor_name(a.router, layer) || name == tensor_name(a.router, layer, -1, ".bias")) &&
                       !skip_router))
      return;
    const bool no_decay = t.ndim() == 1 || name.ends_with(".bias");
    out.push_back({std::move(name), t, layer, expert, no_decay, false});
  };
  add(tensor_name(a.embed), w.embed, -1);
  if (!out.empty()) out.back().embedding = true;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    add(tensor_name(a.attn_norm, l), lw.attn_norm, l);
    if (c.is_mla()) {
      if (c.q_lora_rank > 0) {
        add(tensor_name(a.q_a_proj, l), lw.wq_a, l);
        add(tensor_name(a.q_a_norm, l), lw.q_a_norm, l);
        add(tensor_name(a.q_b_proj, l), lw.wq_b, l);
      } else {
        add(tensor_name(a.q_proj, l), lw.wq_b, l);
      }
      add(tensor_name(a.kv_a_proj, l), lw.wkv_a, l);
      add(tensor_name(a.kv_a_norm, l), lw.kv_a_norm, l);
      add(tensor_name(a.kv_b_proj, l), lw.wkv_b, l);
    } else {
      add(tensor_name(a.q_proj, l), lw.wq, l);
      add(tensor_name(a.k_proj, l), lw.wk, l);
      add(tensor_name(a.v_proj, l), lw.wv, l);
      add(tensor_name(a.q_proj, l, -1, ".bias"), lw.bq, l);
      add(tensor_name(a.k_proj, l, -1, ".bias"), lw.bk, l);
      add(tensor_name(a.v_proj, l, -1, ".bias"), lw.bv, l);
    }
    add(tensor_name(a.o_proj, l), lw.wo, l);
    add(tensor_name(a.o_proj, l, -1, ".bias"), lw.bo, l);
    if (c.qk_norm != QkNormKind::None) {
      add(tensor_name(a.q_norm, l), lw.q_norm, l);
      add(tensor_name(a.k_norm, l), lw.k_norm, l);
    }
    if (a.attn_sinks) add(tensor_name(a.attn_sinks, l, -1, ""), lw.sinks, l);
    add(tensor_name(a.ffn_norm, l), lw.ffn_norm, l);
    if (lw.is_moe) {
      add(tensor_name(a.router, l), lw.router, l);
      add(tensor_name(a.router, l, -1, ".bias"), lw.brouter, l);
      // Stacked experts are [El,...]: experts expert_begin.. of the model (all E but under EP).
      for (int64_t i = 0; lw.w1.defined() && i < lw.w1.dim(0); ++i) {
        const int64_t e = w.expert_begin + i;
        add(tensor_name(a.expert_gate, l, e), lw.w1.select(i), l, e);
        add(tensor_name(a.expert_up, l, e), lw.w3.select(i), l, e);
        add(tensor_name(a.expert_down, l, e), lw.w2.select(i), l, e);
        if (lw.b1.defined()) add(tensor_name(a.expert_gate, l, e, ".bias"), lw.b1.select(i), l, e);
        if (lw.b3.defined()) add(tensor_name(a.expert_up, l, e, ".bias"), lw.b3.select(i), l, e);
        if (lw.b2.defined()) add(tensor_name(a.expert_down, l, e, ".bias"), lw.b2.select(i), l, e);
      }
      if (lw.shared_w1.defined()) {
        add(tensor_name(a.shared_gate, l), lw.shared_w1, l);
        add(tensor_name(a.shared_up, l), lw.shared_w3, l);
        add(tensor_name(a.shared_down, l), lw.shared_w2, l);
        if (a.shared_expert_gate) add(tensor_name(a.shared_expert_gate, l), lw.shared_gate, l);
      }
    } else if (lw.w1.defined()) {
      add(tensor_name(a.dense_gate, l), lw.w1, l);
      add(tensor_name(a.dense_up, l), lw.w3, l);
      add(tensor_name(a.dense_down, l), lw.w2, l);
    }
    for (const LoraSlot& sl : slots_by_layer[static_cast<size_t>(l)]) {
      // A factor shared by two projections (fused experts' gate and up) is one parameter: listed
      // under the first.
      const bool shared_a = sl.lora == &lw.lexp.w3 && lw.lexp.w1.on() && lw.lexp.w1.a.raw() == lw.lexp.w3.a.raw();
      if (!shared_a) out.push_back({lora_a_name(sl), slot_a(sl), l, sl.expert, false, false});
      out.push_back({lora_b_name(sl), slot_b(sl), l, sl.expert, false, false});
    }
  }
  add(tensor_name(a.final_norm), w.final_norm, -1);
  if (!c.tie_word_embeddings) add(tensor_name(a.lm_head), w.lm_head, -1);
  return out;
}

std::vector<std::pair<std::string, Tensor>> named_buffers(const ModelConfig& c, const ModelWeights& w) {
  std::vector<std::pair<std::string, Tensor>> out;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    if (lw.router_bias.defined()) out.emplace_back(router_bias_name(c, l), lw.router_bias);
  }
  return out;
}

void update_router_bias(const ModelConfig& c, ModelWeights& w, const std::vector<std::vector<double>>& load,
                        double rate) {
  size_t i = 0;
  for (int64_t l = 0; l < c.n_layer; ++l) {
    LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    if (!lw.is_moe) continue;
    MOE_CHECK(i < load.size() && int64_t(load[i].size()) == c.n_expert, "update_router_bias: no load for layer %lld",
              (long long)l);
    if (!lw.router_bias.defined()) lw.router_bias = Tensor::zeros({c.n_expert}, DType::F32, MemCategory::Weights);
    const std::vector<double>& n = load[i++];
    double mean = 0;
    for (double v : n) mean += v / double(n.size());
    float* b = lw.router_bias.data<float>();
    for (int64_t e = 0; e < c.n_expert; ++e)
      b[e] += static_cast<float>(n[e] < mean ? rate : n[e] > mean ? -rate : 0.0);
  }
}

namespace {

// Sums the step's token and target counts and every MoE layer's router statistics over the
// ranks of a data-parallel batch (one all-reduce of doubles).
void reduce_step_stats(dist::Communicator& comm, int64_t e_n, int64_t* t_n, StepLosses* res) {
  std::vector<double> buf;
  buf.push_back(double(*t_n));
  buf.push_back(double(res->n_targets));
  for (const RouterStats& st : res->router) {
    buf.insert(buf.end(), st.count.begin(), st.count.end());
    buf.insert(buf.end(), st.prob_sum.begin(), st.prob_sum.end());
    buf.push_back(st.z_sum);
    buf.push_back(double(st.dropped));
  }
  comm.all_reduce_sum(buf.data(), int64_t(buf.size()));
  size_t i = 0;
  *t_n = int64_t(buf[i++]);
  res->n_targets = int64_t(buf[i++]);
  for (RouterStats& st : res->router) {
    for (int64_t e = 0; e < e_n; ++e) st.count[size_t(e)] = float(buf[i++]);
    for (int64_t e = 0; e < e_n; ++e) st.prob_sum[size_t(e)] = float(buf[i++]);
    st.z_sum = buf[i++];
    st.dropped = int64_t(buf[i++]);
  }
}

// forward_backward and forward_backward_fused: with `fused`, grads points to a skeleton whose
// groups are allocated and handed over one at a time.
// Adds the seconds since the last call to one phase of the step's breakdown.
struct PhaseClock {
  double* phase_s;
  std::chrono::steady_clock::time_point t = std::chrono::steady_clock::now();
  void lap(int phase) {
    const auto now = std::chrono::steady_clock::now();
    phase_s[phase] += std::chrono::duration<double>(now - t).count();
    t = now;
  }
};

}  // namespace

namespace {
// Whether the LM head's products round their other factor to bf16 (ops.h bf16_products): its
// gradient then goes to them rounded in place, frozen or not.
bool head_products_bf16(const ModelWeights& w) { return w.lm_head.defined() && bf16_products(w.lm_head.dtype()); }
}  // namespace

HeadGrad head_grad(const ModelWeights& w) {
  if (w.frozen_base) return HeadGrad::Frozen;
  return head_products_bf16(w) ? HeadGrad::TrainsBf16 : HeadGrad::Trains;
}

DType expert_h_dtype(const ModelConfig& c, const ModelWeights& w) {
  for (int64_t l = 0; l < c.n_layer; ++l) {
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    if (c.layer_is_moe(l) && lw.w1.defined()) return lw.w1.dtype() == DType::BF16 ? DType::BF16 : DType::F32;
  }
  return DType::F32;
}

namespace {

StepLosses run_step(const Model& m, const Tensor& ids_in, const Tensor& labels_in, ModelWeights* grads,
                    const LossOptions& opt, const GradGroupFn* fused) {
  const ModelConfig& c = m.config();
  const ModelWeights& w = m.weights();
  MOE_CHECK(m.device() == Device::CPU, "training runs on the CPU for now (model is on %s)", device_name(m.device()));
  check_batch(c, ids_in, labels_in);
  const int64_t b_n = ids_in.dim(0), s_n = ids_in.dim(1), t_n = b_n * s_n, n_l = c.n_layer;

  // Every activation buffer of the step outside the blocks' own temporaries comes from the
  // layout (activations.h), allocated before anything else.
  const ActMode mode = opt.recompute ? ActMode::TrainingRecompute : ActMode::Training;
  const ActivationLayout lay = activation_layout(c, b_n, s_n, mode, expert_h_dtype(c, w), head_grad(w));
  StepActs step;
  alloc_step_acts(lay, c, grads != nullptr, &step);
  prepare_batch(c, ids_in, labels_in, step.ids, step.targets);
  const Tensor& ids = step.ids;
  const Tensor& targets = step.targets;
  bool any_moe = false, any_dense = false;
  for (int64_t l = 0; l < n_l; ++l) (c.layer_is_moe(l) ? any_moe : any_dense) = true;
  LayerActs shared;
  if (any_moe) alloc_acts(lay, true, false, &shared);
  if (any_dense) alloc_acts(lay, false, false, &shared);
  std::vector<LayerActs> own(static_cast<size_t>(n_l));
  for (int64_t l = 0; l < n_l; ++l) alloc_acts(lay, c.layer_is_moe(l), true, &own[static_cast<size_t>(l)]);

  StepLosses res;
  PhaseClock clk{res.phase_s};
  // ---- forward ----
  embedding_forward(own[0].x_in, ids, w.embed);
  clk.lap(StepLosses::kEmbed);
  auto layer_forward = [&](int64_t l, LayerActs& a, RouterStats* st) {
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    attention_block_forward(c, lw, a, a.qkv);
    clk.lap(StepLosses::kAttnFwd);
    Tensor x_out = l + 1 < n_l ? own[static_cast<size_t>(l + 1)].x_in : shared.final_x;
    ffn_block_forward(c, lw, a, x_out, st, opt.route);
    clk.lap(StepLosses::kFfnFwd);
  };
  for (int64_t l = 0; l < n_l; ++l) {
    LayerActs a = layer_view(own[static_cast<size_t>(l)], shared, opt.recompute);
    RouterStats st;
    const bool moe = c.layer_is_moe(l);
    layer_forward(l, a, moe ? &st : nullptr);
    if (!opt.recompute) own[static_cast<size_t>(l)].ep = a.ep;  // the EP plan and received rows, for backward
    if (moe) {
      res.moe_layers.push_back(l);
      res.router.push_back(std::move(st));
    }
  }
  for (int64_t i = 0; i < t_n; ++i) res.n_targets += targets.data<int32_t>()[i] != -100;
  // Data parallel: the global batch's counts and router statistics, in one all-reduce.
  int64_t t_all = t_n;
  if (opt.batch) reduce_step_stats(*opt.batch, c.n_expert, &t_all, &res);
  // ---- balancing losses: HF load_balancing_loss_func over all MoE layers' rows at once ----
  BalanceGrad bal;
  if (!res.router.empty()) {
    const int64_t e_n = c.n_expert;
    const double n_rows = double(t_all) * double(res.router.size());
    std::vector<double> cnt(static_cast<size_t>(e_n), 0.0), ps(static_cast<size_t>(e_n), 0.0);
    double z = 0;
    for (const RouterStats& st : res.router) {
      for (int64_t e = 0; e < e_n; ++e) {
        cnt[e] += st.count[e];
        ps[e] += st.prob_sum[e];
      }
      z += st.z_sum;
    }
    // Families whose HF model returns no load-balancing loss (DeepSeek) report 0 unless a
    // coefficient asks for one.
    double aux = 0;
    if (arch_spec(c.model_type).aux_loss || opt.aux_coef != 0)
      for (int64_t e = 0; e < e_n; ++e) aux += (cnt[e] / n_rows) * (ps[e] / n_rows);
    res.aux_loss = double(e_n) * aux;
    res.z_loss = z / n_rows;
    if (opt.aux_coef != 0) {
      bal.aux_g = step.aux_g;
      for (int64_t e = 0; e < e_n; ++e) bal.aux_g.data<float>()[e] = static_cast<float>(double(e_n) * cnt[e] / n_rows);
      bal.aux_scale = static_cast<float>(opt.aux_coef / n_rows);
    }
    bal.z_scale = static_cast<float>(opt.z_coef / n_rows);
  }
  // ---- head: final norm, LM head and cross-entropy, chunk by chunk (fused with backward) ----
  rmsnorm_forward_train(shared.final_h, shared.final_rstd, shared.final_x, w.final_norm, float(c.rms_norm_eps));
  const float ce_scale = res.n_targets > 0 ? 1.0f / float(res.n_targets) : 0.0f;
  Tensor dfinal_h = step.dx_in;  // [T,D]: dx_in is free until the first layer's backward
  const Tensor& row_loss = step.row_loss;
  // Rows without a target (the prompt of chat data, padding) need no logits: their loss and
  // gradient are zero. The rows with one are moved to the front of final_h and targets (in
  // place, in order; neither is read after the head) and the head runs on those alone — the
  // LM head is most of a fine-tuning step's products, so a half-prompt batch saves a quarter.
  // The head runs on whole chunks (the rows after the kept ones have no target): the chunk's
  // shapes, and with them the GEMM scratch sizes and primitives, stay those of every step.
  std::vector<int64_t> kept;
  const int64_t h_n = compact_target_rows(shared.final_h, step.targets, lay.logits_chunk, &kept);
  double ce_sum = 0;
  // The logits chunk (the layout's "head.logits" phase) lives for the head alone: freed before
  // the first gradient group is handed over and the layers' backward starts.
  Tensor logits = Tensor::empty({lay.logits_chunk, c.vocab_size}, DType::F32, MemCategory::Activations);
  // Under bf16 products the gradient is rounded to bf16 in the chunk's own bytes (as the products
  // would round it) and dX = dY·W, dW += dYᵀ·X read that: no second buffer, and the chunk twice as
  // tall as an f32 one (activations.h kBf16LogitsChunkRows).
  const bool bf16_dy = grads && head_products_bf16(w);
  // Under the fused update the head's weight gradient is fresh (forward_backward_fused leaves it
  // unset): the first chunk assigns it, so it is neither zeroed nor read back by the first sum
  // (65 MiB of f32 at the Mixtral shape; head+loss 0.141-0.146 -> 0.137-0.143 s, alternated).
  const bool head_fresh = fused != nullptr && grads && grads->lm_head.defined();
  if (head_fresh && h_n == 0) grads->lm_head.zero_();
  for (int64_t r0 = 0; r0 < h_n; r0 += lay.logits_chunk) {
    const int64_t r1 = std::min(h_n, r0 + lay.logits_chunk), n = r1 - r0;
    Tensor lg = logits.rows(0, n), h = shared.final_h.rows(r0, r1), tg = targets.rows(r0, r1);
    Tensor rl = row_loss.rows(0, n);
    linear_forward(lg, h, w.lm_head, Tensor());
    if (grads)
      cross_entropy_forward_backward(rl, lg, lg, tg, ce_scale);  // the logits become their gradient
    else
      cross_entropy_forward(rl, lg, tg);
    for (int64_t i = 0; i < n; ++i) ce_sum += rl.data<float>()[i];
    if (!grads) continue;
    Tensor dh = dfinal_h.rows(r0, r1), none;
    linear_backward(dh, grads->lm_head, none, bf16_dy ? cast_bf16_in_place(lg) : lg, h, w.lm_head, false,
                    /*assign_dw=*/head_fresh && r0 == 0);
  }
  logits = Tensor();
  if (grads && h_n < t_n) spread_target_rows(dfinal_h, kept);
  if (opt.batch) opt.batch->all_reduce_sum(&ce_sum, 1);
  res.loss_ce = res.n_targets > 0 ? ce_sum / double(res.n_targets) : 0.0;
  res.total = res.loss_ce + opt.aux_coef * res.aux_loss + opt.z_coef * res.z_loss;
  if (!grads) {
    clk.lap(StepLosses::kHead);
    return res;
  }

  // ---- backward ----
  Tensor dx = step.dx, dx_mid = step.dx_mid, dx_in = step.dx_in;
  rmsnorm_backward(dx, grads->final_norm, dfinal_h, shared.final_x, w.final_norm, shared.final_rstd, false);
  dfinal_h = Tensor();
  clk.lap(StepLosses::kHead);
  if (fused) {
    (*fused)(kGroupHead, group_parameters(c, *grads, kGroupHead), res);
    clk.lap(StepLosses::kUpdate);
    grads->final_norm = Tensor();
    if (!c.tie_word_embeddings) grads->lm_head = Tensor();
  }
  for (int64_t l = n_l - 1; l >= 0; --l) {
    LayerActs a = layer_view(own[static_cast<size_t>(l)], shared, opt.recompute);
    if (opt.recompute) {
      // Re-run this layer's forward into the shared set; its output is thrown away (the next
      // layer's input is kept and must not change), into dx_in, which is free until this
      // layer's attention backward assigns it.
      Tensor x_out = dx_in;
      const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
      attention_block_forward(c, lw, a, a.qkv);
      clk.lap(StepLosses::kAttnFwd);
      ffn_block_forward(c, lw, a, x_out, nullptr, opt.route);
      clk.lap(StepLosses::kFfnFwd);
    }
    const LayerWeights& lw = w.layers[static_cast<size_t>(l)];
    LayerWeights& lg = grads->layers[static_cast<size_t>(l)];
    // The fused update takes a MoE layer's routed experts one at a time (ffn_block.h,
    // per_expert) where each expert's gradients are its own: one process (a data-parallel
    // step reduces whole layers), no expert parallelism, no adapters or biases on the experts.
    const bool each_expert = fused && !w.frozen_base && !opt.batch && !a.ep.plan && experts_one_at_a_time(lw);
    if (fused) {
      LayerSel sel = grad_selection(w);
      sel.experts = !each_expert;
      lg = transform_layer(
          c, lw, [](const Tensor& t) { return Tensor::zeros(t.shape(), DType::F32, MemCategory::Grads); }, sel);
    }
    const ExpertGradFn expert_fn = [&](int64_t e, const Tensor& dw1, const Tensor& dw3, const Tensor& dw2) {
      clk.lap(StepLosses::kFfnBwd);
      (*fused)(l, expert_parameters(c, l, w.expert_begin + e, dw1, dw3, dw2), res);
      clk.lap(StepLosses::kUpdate);
    };
    ffn_block_backward(c, lw, a, dx, dx_mid, lg, bal, opt.route.ep, each_expert ? &expert_fn : nullptr);
    clk.lap(StepLosses::kFfnBwd);
    attention_block_backward(c, lw, a, dx_mid, dx_in, lg, a.qkv);
    clk.lap(StepLosses::kAttnBwd);
    std::swap(dx, dx_in);
    if (fused) {
      (*fused)(l, group_parameters(c, *grads, l), res);
      lg = LayerWeights();
      clk.lap(StepLosses::kUpdate);
    }
  }
  if (fused && !grads->embed.defined() && !w.frozen_base)
    grads->embed = Tensor::zeros(w.embed.shape(), DType::F32, MemCategory::Grads);
  if (grads->embed.defined()) embedding_backward(grads->embed, dx, ids, c.pad_token_id);
  clk.lap(StepLosses::kEmbed);
  if (fused) {
    (*fused)(kGroupEmbed, group_parameters(c, *grads, kGroupEmbed), res);
    *grads = ModelWeights();
    clk.lap(StepLosses::kUpdate);
  }
  return res;
}

}  // namespace

const char* step_phase_name(int phase) {
  static const char* const kNames[StepLosses::kPhases] = {"embedding", "attention fwd", "ffn fwd", "head+loss",
                                                          "ffn bwd", "attention bwd", "update"};
  return phase >= 0 && phase < StepLosses::kPhases ? kNames[phase] : "?";
}

StepLosses forward_backward(const Model& m, const Tensor& ids, const Tensor& labels, ModelWeights* grads,
                            const LossOptions& opt) {
  return run_step(m, ids, labels, grads, opt, nullptr);
}

std::vector<NamedParam> expert_parameters(const ModelConfig& c, int64_t layer, int64_t expert, const Tensor& dw1,
                                          const Tensor& dw3, const Tensor& dw2) {
  const ArchSpec& a = arch_spec(c.model_type);
  // As named_parameters lists a routed expert's weights (names, order, no biases).
  return {{tensor_name(a.expert_gate, layer, expert), dw1, layer, expert, false, false},
          {tensor_name(a.expert_up, layer, expert), dw3, layer, expert, false, false},
          {tensor_name(a.expert_down, layer, expert), dw2, layer, expert, false, false}};
}

std::vector<NamedParam> group_parameters(const ModelConfig& c, const ModelWeights& grads, int64_t group) {
  std::vector<NamedParam> out;
  for (NamedParam& p : named_parameters(c, grads)) {
    const bool in = group == kGroupEmbed ? p.embedding : group == kGroupHead ? (p.layer < 0 && !p.embedding) : p.layer == group;
    if (in) out.push_back(std::move(p));
  }
  return out;
}

StepLosses forward_backward_fused(const Model& m, const Tensor& ids, const Tensor& labels, const LossOptions& opt,
                                  const GradGroupFn& on_grads) {
  const ModelConfig& c = m.config();
  const ModelWeights& w = m.weights();
  // The skeleton: the head's gradients now, unset (the first chunk of the head assigns its
  // weight's: run_step); layers and the embedding when their backward starts (the embedding now
  // when the head is tied to it: the head's assignment covers every row, the embedding's
  // backward then adds to it).
  ModelWeights g;
  g.layers.resize(static_cast<size_t>(c.n_layer));
  g.expert_begin = w.expert_begin;
  if (w.frozen_base) return run_step(m, ids, labels, &g, opt, &on_grads);  // only adapters: per layer
  g.final_norm = Tensor::zeros(w.final_norm.shape(), DType::F32, MemCategory::Grads);
  if (c.tie_word_embeddings) {
    g.embed = Tensor::empty(w.embed.shape(), DType::F32, MemCategory::Grads);
    g.lm_head = g.embed;
  } else {
    g.lm_head = Tensor::empty(w.lm_head.shape(), DType::F32, MemCategory::Grads);
  }
  return run_step(m, ids, labels, &g, opt, &on_grads);
}

}  // namespace moe
