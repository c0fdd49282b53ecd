// distributed.cpp — expert sharding, batch slicing, gradient all-reduce and expert gathering
// (distributed.h).
#include "train/distributed.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>

#include "core/error.h"
#include "core/memory.h"
#include "model/arch.h"

namespace moe {
namespace {

// The experts [b, b+n) of a stacked [E,...] tensor, as an owned tensor of the same category.
Tensor slice_experts(const Tensor& t, int64_t b, int64_t n) {
  if (!t.defined()) return t;
  Tensor o = Tensor::empty([&] {
    Shape s = t.shape();
    s[0] = n;
    return s;
  }(), t.dtype(), t.category());
  const size_t per = t.nbytes() / size_t(t.dim(0));
  std::memcpy(o.raw(), static_cast<const char*>(t.raw()) + per * size_t(b), per * size_t(n));
  return o;
}

// Gathers equal [El,...] slices into [El·P,...] on rank 0 of the EP group (the others send
// theirs and get t back: only the writer needs the whole stack).
Tensor gather_stack(const Tensor& t, dist::Communicator& ep) {
  if (!t.defined()) return t;
  const int p_n = ep.size();
  const int64_t nb = int64_t(t.nbytes());
  std::vector<int64_t> send(size_t(p_n), 0), recv(size_t(p_n), 0);
  send[0] = nb;
  if (ep.rank() == 0) std::fill(recv.begin(), recv.end(), nb);
  Shape s = t.shape();
  s[0] *= p_n;
  Tensor o = ep.rank() == 0 ? Tensor::empty(s, t.dtype(), t.category()) : Tensor::empty({1}, DType::U8, MemCategory::Comm);
  ep.all_to_allv(t.raw(), send, o.raw(), recv);
  return ep.rank() == 0 ? o : t;
}

}  // namespace

void shard_experts(const ModelConfig& c, ModelWeights& w, const dist::Parallel& par) {
  if (par.ep == 1) return;
  MOE_CHECK(c.n_expert > 0 && c.n_expert % par.ep == 0,
            "--ep %d: the model's %lld routed experts do not divide evenly over %d ranks", par.ep,
            (long long)c.n_expert, par.ep);
  const int64_t b = par.expert_begin(c.n_expert), n = par.experts_per_rank(c.n_expert);
  for (LayerWeights& lw : w.layers) {
    if (!lw.is_moe || !lw.w1.defined()) continue;
    MOE_CHECK(!lw.lexp.w1.on() && !lw.lexp.w3.on() && !lw.lexp.w2.on(),
              "--ep: LoRA adapters on routed experts are not sharded yet; use --dp, or target only attention / shared "
              "modules");
    if (lw.w1.dim(0) == n && w.expert_begin == b) continue;  // loaded sharded (LoadOptions::expert_begin)
    MOE_CHECK(lw.w1.dim(0) == c.n_expert, "--ep: a layer holds %lld experts, expected %lld", (long long)lw.w1.dim(0),
              (long long)c.n_expert);
    MOE_CHECK(!dtype_is_block(lw.w1.dtype()), "--ep: quantized experts are not sharded yet");
    lw.w1 = slice_experts(lw.w1, b, n);
    lw.w3 = slice_experts(lw.w3, b, n);
    lw.w2 = slice_experts(lw.w2, b, n);
    for (Tensor* t : {&lw.b1, &lw.b3, &lw.b2})  // expert biases (gpt_oss) follow their experts
      if (t->defined()) *t = slice_experts(*t, b, n);
  }
  w.expert_begin = b;
}

void load_own_experts(const ModelConfig& c, const dist::Parallel& par, LoadOptions* lo) {
  if (par.ep == 1) return;
  MOE_CHECK(c.n_expert > 0 && c.n_expert % par.ep == 0,
            "--ep %d: the model's %lld routed experts do not divide evenly over %d ranks", par.ep,
            (long long)c.n_expert, par.ep);
  lo->expert_begin = par.expert_begin(c.n_expert);
  lo->expert_count = par.experts_per_rank(c.n_expert);
}

std::vector<std::pair<std::string, Shape>> all_parameter_shapes(const ModelConfig& c, const ModelWeights& w,
                                                                bool trainable_only) {
  std::vector<std::pair<std::string, Shape>> out;
  const ArchSpec& a = arch_spec(c.model_type);
  int64_t expanded_layer = -1;
  for (const NamedParam& p : named_parameters(c, w, trainable_only)) {
    // named_parameters lists a layer's routed experts together, expert by expert (gate, up,
    // down, and their biases where the family has them): in their place, all E of them.
    const bool routed_any = p.expert >= 0 && p.name.find(".lora_") == std::string::npos;  // weights and biases
    if (!routed_any) {
      out.emplace_back(p.name, p.value.shape());
      continue;
    }
    if (expanded_layer == p.layer) continue;
    expanded_layer = p.layer;
    const LayerWeights& lw = w.layers[size_t(p.layer)];
    for (int64_t e = 0; e < c.n_expert; ++e) {
      out.emplace_back(tensor_name(a.expert_gate, p.layer, e), lw.w1.select(0).shape());
      out.emplace_back(tensor_name(a.expert_up, p.layer, e), lw.w3.select(0).shape());
      out.emplace_back(tensor_name(a.expert_down, p.layer, e), lw.w2.select(0).shape());
      if (lw.b1.defined()) out.emplace_back(tensor_name(a.expert_gate, p.layer, e, ".bias"), lw.b1.select(0).shape());
      if (lw.b3.defined()) out.emplace_back(tensor_name(a.expert_up, p.layer, e, ".bias"), lw.b3.select(0).shape());
      if (lw.b2.defined()) out.emplace_back(tensor_name(a.expert_down, p.layer, e, ".bias"), lw.b2.select(0).shape());
    }
  }
  return out;
}

Tensor local_batch(const Tensor& t, const dist::Parallel& par) {
  const auto [b0, b1] = par.batch_rows(t.dim(0));
  Tensor o = Tensor::empty({b1 - b0, t.dim(1)}, t.dtype(), t.category());
  if (b1 > b0) o.copy_from(t.rows(b0, b1));
  return o;
}

namespace {

enum class Coll { AllReduce, Reduce, Broadcast };

// Runs one kind of collective over a list of f32 tensors: dense ones over the world, routed
// experts over their expert-DP group, packed into buckets (a tensor larger than a bucket goes
// alone, in place). Reduce and Broadcast go to / come from each tensor's owner (owners[i], a
// rank of that tensor's communicator), so tensors are bucketed per owner.
// touched (reductions of gradients): routed experts that received no token anywhere are left out
// (their gradient is zero on every rank).
void bucketed(const dist::Parallel& par, const std::vector<NamedParam>& ts, const std::vector<int>* owners, Coll op,
              const std::vector<std::vector<bool>>* touched = nullptr) {
  if (!par.distributed()) return;
  constexpr int64_t kBucket = int64_t(1) << 22;  // floats per collective (16 MiB)
  for (const bool experts : {false, true}) {
    dist::Communicator& comm = experts ? *par.expert_dp : *par.world;
    if (comm.size() == 1) continue;
    for (int root = 0; root < (op == Coll::AllReduce ? 1 : comm.size()); ++root) {
      std::vector<const NamedParam*> ps;
      int64_t small = 0;  // elements that go through the bucket
      for (size_t i = 0; i < ts.size(); ++i) {
        const NamedParam& g = ts[i];
        if ((g.expert >= 0) != experts || g.value.numel() == 0) continue;
        if (op != Coll::AllReduce && (*owners)[i] != root) continue;
        if (touched && g.expert >= 0 && g.layer >= 0 && !(*touched)[size_t(g.layer)][size_t(g.expert)]) continue;
        MOE_CHECK(g.value.dtype() == DType::F32, "distributed %s: %s is not f32",
                  op == Coll::Broadcast ? "broadcast" : "reduction", g.name.c_str());
        ps.push_back(&g);
        if (g.value.numel() < kBucket) small += g.value.numel();
      }
      if (ps.empty()) continue;
      auto run = [&](float* x, int64_t n) {
        if (op == Coll::AllReduce) comm.all_reduce_sum(x, n);
        else if (op == Coll::Reduce) comm.reduce_sum(x, n, root);
        else comm.broadcast(x, n * int64_t(sizeof(float)), root);
      };
      Tensor buf = Tensor::empty({std::max<int64_t>(1, std::min(kBucket, small))}, DType::F32, MemCategory::Comm);
      float* b = buf.data<float>();
      size_t i = 0;
      while (i < ps.size()) {
        if (ps[i]->value.numel() >= kBucket) {
          run(ps[i]->value.data<float>(), ps[i]->value.numel());
          ++i;
          continue;
        }
        size_t j = i;
        int64_t n = 0;
        while (j < ps.size() && ps[j]->value.numel() < kBucket && n + ps[j]->value.numel() <= kBucket) {
          std::memcpy(b + n, ps[j]->value.raw(), ps[j]->value.nbytes());
          n += ps[j]->value.numel();
          ++j;
        }
        run(b, n);
        n = 0;
        for (size_t q = i; q < j; ++q) {
          std::memcpy(ps[q]->value.raw(), b + n, ps[q]->value.nbytes());
          n += ps[q]->value.numel();
        }
        i = j;
      }
    }
  }
}

}  // namespace

void all_reduce_grads(const dist::Parallel& par, const std::vector<NamedParam>& grads,
                      const std::vector<std::vector<bool>>* touched) {
  bucketed(par, grads, nullptr, Coll::AllReduce, touched);
}

std::vector<int> shard_owners(const dist::Parallel& par, const std::vector<NamedParam>& params) {
  // Greedy: the largest parameter first, to the least-loaded rank; ties to the lower rank.
  std::vector<int> owner(params.size(), 0);
  for (const bool experts : {false, true}) {
    const int n = experts ? par.dp : par.size();
    std::vector<size_t> order;
    for (size_t i = 0; i < params.size(); ++i)
      if ((params[i].expert >= 0) == experts) order.push_back(i);
    std::stable_sort(order.begin(), order.end(),
                     [&](size_t a, size_t b) { return params[a].value.numel() > params[b].value.numel(); });
    std::vector<int64_t> load(static_cast<size_t>(n), 0);
    for (size_t i : order) {
      const int r = int(std::min_element(load.begin(), load.end()) - load.begin());
      owner[i] = r;
      load[size_t(r)] += params[i].value.numel();
    }
  }
  return owner;
}

bool owns(const dist::Parallel& par, const NamedParam& p, int owner) {
  return owner == (p.expert >= 0 ? par.expert_dp->rank() : par.rank());
}

void reduce_grads_to_owners(const dist::Parallel& par, const std::vector<NamedParam>& grads,
                            const std::vector<int>& owners, const std::vector<std::vector<bool>>* touched) {
  bucketed(par, grads, &owners, Coll::Reduce, touched);
}

void broadcast_from_owners(const dist::Parallel& par, const std::vector<NamedParam>& params,
                           const std::vector<int>& owners, const MasterLowHalves* low) {
  // Split weights whole (both halves), in the same order on every rank; the f32 rest bucketed.
  std::vector<NamedParam> rest;
  std::vector<int> rest_owners;
  for (size_t i = 0; i < params.size(); ++i) {
    const NamedParam& p = params[i];
    uint16_t* lo = low ? low->of(p.value) : nullptr;
    if (!lo) {
      rest.push_back(p);
      rest_owners.push_back(owners[i]);
      continue;
    }
    dist::Communicator& comm = p.expert >= 0 ? *par.expert_dp : *par.world;
    if (!par.distributed() || comm.size() == 1 || p.value.numel() == 0) continue;
    const int64_t bytes = int64_t(p.value.nbytes());
    comm.broadcast(p.value.raw(), bytes, owners[i]);
    comm.broadcast(lo, bytes, owners[i]);
  }
  bucketed(par, rest, &rest_owners, Coll::Broadcast);
}

double clip_grad_norm_owned(const dist::Parallel& par, const std::vector<NamedParam>& grads,
                            const std::vector<int>& owners, double max_norm) {
  std::vector<NamedParam> mine;
  for (size_t i = 0; i < grads.size(); ++i)
    if (owns(par, grads[i], owners[i])) mine.push_back(grads[i]);
  // Every parameter has exactly one owner in the job: the owners' squares summed are the norm's.
  const double local = clip_grad_norm(mine, 0);
  double ss = local * local;
  par.world->all_reduce_sum(&ss, 1);
  const double norm = std::sqrt(ss);
  clip_to_norm(mine, norm, max_norm);
  return norm;
}

ModelWeights gather_experts(const ModelConfig& c, const ModelWeights& w, const dist::Parallel& par,
                            const MasterLowHalves* low) {
  if (par.ep == 1) return w;
  ModelWeights g = w;
  auto gather = [&](const Tensor& t) { return gather_stack(low ? join_master(t, *low) : t, *par.ep_group); };
  for (LayerWeights& lw : g.layers) {
    if (!lw.is_moe || !lw.w1.defined()) continue;
    for (Tensor* t : {&lw.w1, &lw.w3, &lw.w2, &lw.b1, &lw.b3, &lw.b2})
      if (t->defined()) *t = gather(*t);
  }
  if (par.ep_group->rank() != 0) return w;
  g.expert_begin = 0;
  return g;
}

double grad_sum_squares(const std::vector<NamedParam>& grads, bool experts) {
  std::vector<NamedParam> sel;
  for (const NamedParam& g : grads)
    if ((g.expert >= 0) == experts) sel.push_back(g);
  const double n = clip_grad_norm(sel, 0);
  return n * n;
}

double clip_grad_norm_global(const dist::Parallel& par, const std::vector<NamedParam>& grads, double max_norm) {
  if (par.ep == 1) return clip_grad_norm(grads, max_norm);
  double ss_exp = grad_sum_squares(grads, true);
  par.ep_group->all_reduce_sum(&ss_exp, 1);
  const double norm = std::sqrt(grad_sum_squares(grads, false) + ss_exp);
  clip_to_norm(grads, norm, max_norm);
  return norm;
}

namespace {

// One routed expert parameter's optimizer state, serialized for the gather to rank 0.
void put(std::vector<char>& b, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  b.insert(b.end(), c, c + n);
}

}  // namespace

OptimizerSnapshot gather_optimizer(const dist::Parallel& par, const AdamW& opt,
                                   const std::vector<std::string>& full_names, bool sharded) {
  if (!par.distributed() || (par.ep == 1 && !sharded)) return par.rank() == 0 ? snapshot(opt) : OptimizerSnapshot{};
  dist::Communicator& g = *par.world;
  // Who sends what: with ZeRO every rank its own shard; else the routed experts of EP group 0's
  // other ranks (every replica holds the same state).
  auto sends = [&](const NamedParam& p) { return sharded || (p.expert >= 0 && par.rank() < par.ep); };
  const std::vector<NamedParam>& ps = opt.params();
  const std::vector<int64_t> steps = opt.step_counts();
  std::map<std::string, Tensor> state;
  for (auto& [name, t] : opt.state_tensors()) state[name] = t;
  // Serialize: name length, name, steps, whether moments follow, dtype, bytes, m, v.
  std::vector<char> mine;
  if (g.rank() != 0)
    for (size_t i = 0; i < ps.size(); ++i) {
      if (!sends(ps[i])) continue;
      const std::string& n = ps[i].name;
      const uint32_t len = uint32_t(n.size());
      put(mine, &len, sizeof len);
      put(mine, n.data(), n.size());
      put(mine, &steps[i], sizeof(int64_t));
      auto m = state.find("m." + n), v = state.find("v." + n);
      const uint8_t has = m != state.end() && v != state.end();
      put(mine, &has, 1);
      if (has) {
        const uint8_t dt = uint8_t(m->second.dtype()), nd = uint8_t(m->second.ndim());
        const int64_t nb = int64_t(m->second.nbytes());
        put(mine, &nd, 1);
        for (int k = 0; k < nd; ++k) {
          const int64_t dk = m->second.dim(k);
          put(mine, &dk, sizeof dk);
        }
        put(mine, &dt, 1);
        put(mine, &nb, sizeof nb);
        put(mine, m->second.raw(), size_t(nb));
        put(mine, v->second.raw(), size_t(nb));
      }
    }
  const int p_n = g.size();
  std::vector<int64_t> sizes(static_cast<size_t>(p_n));
  const int64_t my = int64_t(mine.size());
  g.all_gather(&my, sizeof my, sizes.data());
  std::vector<int64_t> send(size_t(p_n), 0), recv(size_t(p_n), 0);
  send[0] = my;
  int64_t total = 0;
  if (g.rank() == 0)
    for (int q = 0; q < p_n; ++q) total += recv[size_t(q)] = sizes[size_t(q)];
  std::vector<char> all(size_t(std::max<int64_t>(total, 1)));
  g.all_to_allv(mine.data(), send, all.data(), recv);
  if (g.rank() != 0) return {};

  // Rank 0: its own parameters, then the other ranks' experts, looked up in full_names order.
  std::map<std::string, int64_t> step_of;
  for (size_t i = 0; i < ps.size(); ++i) step_of[ps[i].name] = steps[i];
  size_t at = 0;
  auto get = [&](void* p, size_t n) {
    MOE_CHECK(at + n <= all.size(), "gather_optimizer: truncated state from the expert owners");
    std::memcpy(p, all.data() + at, n);
    at += n;
  };
  while (at < size_t(total)) {
    uint32_t len = 0;
    get(&len, sizeof len);
    std::string n(len, '\0');
    get(n.data(), len);
    int64_t st = 0;
    get(&st, sizeof st);
    step_of[n] = st;
    uint8_t has = 0;
    get(&has, 1);
    if (!has) continue;
    uint8_t dt = 0, nd = 0;
    int64_t nb = 0;
    get(&nd, 1);
    Shape shape(size_t(nd), 0);
    for (auto& dk : shape) get(&dk, sizeof dk);
    get(&dt, 1);
    get(&nb, sizeof nb);
    const DType d = static_cast<DType>(dt);
    MOE_CHECK((d == DType::F32 || d == DType::BF16) && int64_t(dtype_nbytes(d, shape_numel(shape))) == nb,
              "gather_optimizer: bad state of %s from an expert owner", n.c_str());
    for (const char* pre : {"m.", "v."}) {
      Tensor t = Tensor::empty(shape, d, MemCategory::Optimizer);
      get(t.raw(), size_t(nb));
      state[pre + n] = t;
    }
  }
  OptimizerSnapshot out;
  for (const std::string& n : full_names) {
    auto it = step_of.find(n);
    MOE_CHECK(it != step_of.end(), "gather_optimizer: no rank holds the state of %s", n.c_str());
    out.steps.push_back(it->second);
    auto m = state.find("m." + n), v = state.find("v." + n);
    if (m != state.end() && v != state.end()) {
      out.tensors.emplace_back("m." + n, m->second);
      out.tensors.emplace_back("v." + n, v->second);
    }
  }
  return out;
}

void print_rank_memory(const dist::Parallel& par, bool print) {
  const MemStats ms = mem_stats();
  const int dev = static_cast<int>(Device::CPU);
  std::vector<int64_t> mine(kNumMemCategories + 1);
  for (int k = 0; k < kNumMemCategories; ++k) mine[size_t(k)] = ms.peak[dev][k];
  mine[kNumMemCategories] = ms.peak_total[dev];
  std::vector<int64_t> all(mine.size() * size_t(par.size()));
  par.world->all_gather(mine.data(), int64_t(mine.size() * sizeof(int64_t)), all.data());
  if (!print) return;
  std::string head = "per-rank host memory, peaks:\n  rank";
  std::vector<int> cols;
  for (int k = 0; k < kNumMemCategories; ++k) {
    bool any = false;
    for (int r = 0; r < par.size(); ++r) any = any || all[size_t(r) * mine.size() + size_t(k)] > 0;
    if (!any) continue;
    cols.push_back(k);
    char b[32];
    std::snprintf(b, sizeof b, " %12s", mem_category_name(MemCategory(k)));
    head += b;
  }
  std::printf("%s %12s\n", head.c_str(), "total");
  for (int r = 0; r < par.size(); ++r) {
    std::printf("  %4d", r);
    for (int k : cols) std::printf(" %12s", human_bytes(double(all[size_t(r) * mine.size() + size_t(k)])).c_str());
    std::printf(" %12s\n", human_bytes(double(all[size_t(r) * mine.size() + size_t(kNumMemCategories)])).c_str());
  }
}

std::string describe_parallel(const dist::Parallel& par, const ModelConfig& c) {
  char buf[256];
  std::snprintf(buf, sizeof buf, "%d ranks: expert parallel %d x data parallel %d; rank %d holds experts %lld..%lld",
                par.size(), par.ep, par.dp, par.rank(), (long long)par.expert_begin(c.n_expert),
                (long long)(par.expert_begin(c.n_expert) + par.experts_per_rank(c.n_expert) - 1));
  return buf;
}

}  // namespace moe
