// optimizer.cpp — AdamW, gradient clipping, learning-rate schedules.
#include "train/optimizer.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#define MOE_ADAMW_NS lanes8
#define MOE_ADAMW_512 0
#include "train/adamw_lanes.h"  // NOLINT(build/include): this file's copy of the loops

namespace moe {

double adamw::update_range_avx2(const Betas& bt, const ParamUpdate& u, int64_t j0, int64_t j1, bool bf16_moments) {
  return bf16_moments ? lanes8::update_range<uint16_t>(bt, u, j0, j1) : lanes8::update_range<float>(bt, u, j0, j1);
}

namespace {
// Sum of squares of an f32 tensor, accumulated in f64 (the gradient norm's terms).
double sum_squares(const Tensor& t) {
  const float* p = t.data<float>();
  const int64_t n = t.numel();
  double s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static) if(n > 65536)
  for (int64_t j = 0; j < n; ++j) s += double(p[j]) * p[j];
  return s;
}

// An update below this many elements stays on the calling thread: a team's start and barrier
// cost more than the work (a layer norm, a small group).
constexpr int64_t kParallelMin = 65536;
// Elements per slice of the parallel loop: 64 KiB of weights, large enough that a slice's
// scheduling costs nothing, small enough that the threads finish together when one of them
// is slowed (dynamic schedule) on a shared machine.
constexpr int64_t kSlice = 16384;

// A piece of one parameter's elements: the unit of the parallel loop.
struct Slice {
  size_t param;
  int64_t begin, end;
};

// Every update in one parallel loop over slices; the sum of squares is added slice by slice
// in order, so it does not depend on the thread count.
template <typename M>
double run_updates(const adamw::Betas& bt, const std::vector<adamw::ParamUpdate>& ups) {
  std::vector<Slice> slices;
  int64_t total = 0;
  for (size_t i = 0; i < ups.size(); ++i) {
    for (int64_t b = 0; b < ups[i].n; b += kSlice) slices.push_back({i, b, std::min(ups[i].n, b + kSlice)});
    total += ups[i].n;
  }
  std::vector<double> part(slices.size());
  static const bool wide = adamw::avx512_available();  // the sixteen-lane copy: the same bits, faster
  constexpr bool bf16 = std::is_same_v<M, uint16_t>;
  const int64_t n_slices = static_cast<int64_t>(slices.size());
#pragma omp parallel for schedule(dynamic, 1) if(total > kParallelMin)
  for (int64_t s = 0; s < n_slices; ++s) {
    const Slice& sl = slices[static_cast<size_t>(s)];
    part[static_cast<size_t>(s)] = wide ? adamw::update_range_avx512(bt, ups[sl.param], sl.begin, sl.end, bf16)
                                        : adamw::update_range_avx2(bt, ups[sl.param], sl.begin, sl.end, bf16);
  }
  double ss = 0;
  for (double p : part) ss += p;
  return ss;
}

}  // namespace

// The header's opaque job type is adamw_rule.h's ParamUpdate.
struct AdamW::Job : adamw::ParamUpdate {};

AdamW::AdamW(std::vector<NamedParam> params, std::vector<NamedParam> grads, const AdamWOptions& opt,
             const MasterLowHalves* low)
    : params_(std::move(params)), grads_(std::move(grads)), state_(params_.size()), low_(params_.size()), opt_(opt) {
  // grads may be empty: the fused update passes each group's gradients to step_group.
  MOE_ASSERT(grads_.empty() || params_.size() == grads_.size());
  MOE_CHECK(opt_.state_dtype == DType::F32 || opt_.state_dtype == DType::BF16,
            "AdamW: optimizer state must be f32 or bf16, not %s", dtype_name(opt_.state_dtype));
  for (size_t i = 0; i < params_.size(); ++i) {
    index_[params_[i].name] = i;
    MOE_ASSERT(grads_.empty() ||
               (params_[i].name == grads_[i].name && params_[i].value.shape() == grads_[i].value.shape()));
    if (low) low_[i] = low->of(params_[i].value);
    MOE_CHECK((params_[i].value.dtype() == DType::F32 || low_[i]) && params_[i].value.device() == Device::CPU,
              "AdamW: parameter %s must be f32 (or a split master weight) on the CPU (got %s)",
              params_[i].name.c_str(), params_[i].value.desc().c_str());
  }
}

void AdamW::step(double lr, const std::vector<std::vector<bool>>& touched) {
  MOE_ASSERT(!grads_.empty());
  std::vector<Job> jobs(params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    prepare(i, lr, touched, grads_[i].value, &jobs[i]);
    if (!jobs[i].w && !jobs[i].hi) jobs[i].n = 0;  // a skipped expert: its sum of squares is not wanted here
  }
  run(jobs);
}

double AdamW::step_group(double lr, const std::vector<std::vector<bool>>& touched,
                         const std::vector<NamedParam>& grads) {
  std::vector<Job> jobs(grads.size());
  for (size_t k = 0; k < grads.size(); ++k) {
    auto it = index_.find(grads[k].name);
    MOE_CHECK(it != index_.end(), "AdamW: gradient %s has no parameter", grads[k].name.c_str());
    prepare(it->second, lr, touched, grads[k].value, &jobs[k]);
  }
  return run(jobs);
}

void AdamW::prepare(size_t i, double lr, const std::vector<std::vector<bool>>& touched, const Tensor& grad,
                    Job* job) {
  const NamedParam& p = params_[i];
  MOE_ASSERT(grad.shape() == p.value.shape() && grad.dtype() == DType::F32);
  job->g = grad.data<float>();
  job->n = grad.numel();
  if (p.expert >= 0 && !opt_.dense_expert_update) {
    const auto& tl = touched.at(static_cast<size_t>(p.layer));
    if (!tl.at(static_cast<size_t>(p.expert))) return;  // no gradient this step: torch skips it
  }
  State& s = state_[i];
  if (!s.m.defined()) {
    s.m = Tensor::zeros(p.value.shape(), opt_.state_dtype, MemCategory::Optimizer);
    s.v = Tensor::zeros(p.value.shape(), opt_.state_dtype, MemCategory::Optimizer);
  }
  s.steps += 1;
  const double wd = (p.no_decay && !opt_.decay_all) ? 0.0 : opt_.weight_decay;
  job->bc2 = std::sqrt(1.0 - std::pow(opt_.beta2, double(s.steps)));
  job->step_size = lr / (1.0 - std::pow(opt_.beta1, double(s.steps)));
  job->decay = 1.0 - lr * wd;
  if (low_[i]) {
    job->hi = p.value.data<uint16_t>();
    job->lo = low_[i];
  } else {
    job->w = p.value.data<float>();
  }
  job->m = s.m.raw();
  job->v = s.v.raw();
}

double AdamW::run(const std::vector<Job>& jobs) const {
  const std::vector<adamw::ParamUpdate> ups(jobs.begin(), jobs.end());
  const adamw::Betas bt{opt_.beta1, opt_.beta2, opt_.eps};
  return opt_.state_dtype == DType::BF16 ? run_updates<uint16_t>(bt, ups) : run_updates<float>(bt, ups);
}

std::vector<std::pair<std::string, Tensor>> AdamW::state_tensors() const {
  std::vector<std::pair<std::string, Tensor>> out;
  for (size_t i = 0; i < params_.size(); ++i) {
    if (!state_[i].m.defined()) continue;
    out.emplace_back("m." + params_[i].name, state_[i].m);
    out.emplace_back("v." + params_[i].name, state_[i].v);
  }
  return out;
}

std::vector<int64_t> AdamW::step_counts() const {
  std::vector<int64_t> out;
  for (const State& s : state_) out.push_back(s.steps);
  return out;
}

void AdamW::load_state(const std::vector<int64_t>& steps, const std::function<Tensor(const std::string&)>& get,
                       const std::string& what) {
  MOE_CHECK(steps.size() == params_.size(), "%s: optimizer state has %zu parameters, the model %zu", what.c_str(),
            steps.size(), params_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    State& s = state_[i];
    s.steps = steps[i];
    MOE_CHECK(s.steps >= 0, "%s: negative step count for %s", what.c_str(), params_[i].name.c_str());
    if (s.steps == 0) {
      s.m = s.v = Tensor();
      continue;
    }
    for (auto [prefix, dst] : {std::pair{"m.", &s.m}, std::pair{"v.", &s.v}}) {
      Tensor t = get(prefix + params_[i].name);
      MOE_CHECK(t.shape() == params_[i].value.shape() && t.dtype() == opt_.state_dtype,
                "%s: optimizer tensor %s%s is %s, expected %s%s (--optimizer-dtype must match the run's)", what.c_str(),
                prefix, params_[i].name.c_str(), t.desc().c_str(), dtype_name(opt_.state_dtype),
                params_[i].value.shape_str().c_str());
      *dst = Tensor::empty(t.shape(), opt_.state_dtype, MemCategory::Optimizer);
      dst->copy_from(t);
    }
  }
}

double clip_grad_norm(const std::vector<NamedParam>& grads, double max_norm) {
  double ss = 0;
  for (const NamedParam& g : grads) ss += sum_squares(g.value);
  const double norm = std::sqrt(ss);
  clip_to_norm(grads, norm, max_norm);
  return norm;
}

void clip_to_norm(const std::vector<NamedParam>& grads, double norm, double max_norm) {
  if (max_norm <= 0) return;
  const double coef = max_norm / (norm + 1e-6);
  if (coef >= 1.0) return;
  for (const NamedParam& g : grads) {
    float* p = g.value.data<float>();
    const int64_t n = g.value.numel();
#pragma omp parallel for schedule(static) if(n > kParallelMin)
    for (int64_t j = 0; j < n; ++j) p[j] = static_cast<float>(p[j] * coef);
  }
}

double lr_at(LrSchedule s, double base_lr, int64_t step, int64_t warmup, int64_t total) {
  if (step < warmup) return base_lr * double(step) / double(std::max<int64_t>(1, warmup));
  if (s == LrSchedule::Constant) return base_lr;
  const double progress = double(step - warmup) / double(std::max<int64_t>(1, total - warmup));
  return base_lr * std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
}

}  // namespace moe
