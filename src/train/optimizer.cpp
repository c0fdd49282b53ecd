// optimizer.cpp — AdamW, gradient clipping, learning-rate schedules.
#include "train/optimizer.h"

#include <cmath>

namespace moe {

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
}  // namespace

AdamW::AdamW(std::vector<NamedParam> params, std::vector<NamedParam> grads, const AdamWOptions& opt)
    : params_(std::move(params)), grads_(std::move(grads)), state_(params_.size()), opt_(opt) {
  // grads may be empty: the fused update passes each group's gradients to step_group.
  MOE_ASSERT(grads_.empty() || params_.size() == grads_.size());
  MOE_CHECK(opt_.state_dtype == DType::F32 || opt_.state_dtype == DType::BF16,
            "AdamW: optimizer state must be f32 or bf16, not %s", dtype_name(opt_.state_dtype));
  for (size_t i = 0; i < params_.size(); ++i) {
    index_[params_[i].name] = i;
    MOE_ASSERT(grads_.empty() ||
               (params_[i].name == grads_[i].name && params_[i].value.shape() == grads_[i].value.shape()));
    MOE_CHECK(params_[i].value.dtype() == DType::F32 && params_[i].value.device() == Device::CPU,
              "AdamW: parameter %s must be f32 on the CPU (got %s)", params_[i].name.c_str(),
              params_[i].value.desc().c_str());
  }
}

void AdamW::step(double lr, const std::vector<std::vector<bool>>& touched) {
  MOE_ASSERT(!grads_.empty());
  for (size_t i = 0; i < params_.size(); ++i) step_param(i, lr, touched, grads_[i].value);
}

double AdamW::step_group(double lr, const std::vector<std::vector<bool>>& touched,
                         const std::vector<NamedParam>& grads) {
  double ss = 0;
  for (const NamedParam& g : grads) {
    auto it = index_.find(g.name);
    MOE_CHECK(it != index_.end(), "AdamW: gradient %s has no parameter", g.name.c_str());
    ss += sum_squares(g.value);
    step_param(it->second, lr, touched, g.value);
  }
  return ss;
}

namespace {
// Moment storage: f32 as is, bf16 widened on load and rounded to nearest-even on store.
inline float load_moment(const void* base, bool bf16, int64_t j) {
  return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(base)[j]) : static_cast<const float*>(base)[j];
}
inline float store_moment(void* base, bool bf16, int64_t j, double v) {
  if (bf16) {
    const uint16_t h = f32_to_bf16(static_cast<float>(v));
    static_cast<uint16_t*>(base)[j] = h;
    return bf16_to_f32(h);
  }
  static_cast<float*>(base)[j] = static_cast<float>(v);
  return static_cast<float*>(base)[j];
}
}  // namespace

void AdamW::step_param(size_t i, double lr, const std::vector<std::vector<bool>>& touched, const Tensor& grad) {
  const double b1 = opt_.beta1, b2 = opt_.beta2, eps = opt_.eps;
  const NamedParam& p = params_[i];
  MOE_ASSERT(grad.shape() == p.value.shape() && grad.dtype() == DType::F32);
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
  const double bc1 = 1.0 - std::pow(b1, double(s.steps)), bc2 = std::sqrt(1.0 - std::pow(b2, double(s.steps)));
  const double step_size = lr / bc1, decay = 1.0 - lr * wd;
  float* w = p.value.data<float>();
  const float* g = grad.data<float>();
  void* m = s.m.raw();
  void* v = s.v.raw();
  const bool bf16 = s.m.dtype() == DType::BF16;
  const int64_t n = p.value.numel();
#pragma omp parallel for schedule(static) if(n > 65536)
  for (int64_t j = 0; j < n; ++j) {
    const double gj = g[j];
    const double mj = store_moment(m, bf16, j, b1 * load_moment(m, bf16, j) + (1.0 - b1) * gj);
    const double vj = store_moment(v, bf16, j, b2 * load_moment(v, bf16, j) + (1.0 - b2) * gj * gj);
    const double denom = std::sqrt(vj) / bc2 + eps;
    w[j] = static_cast<float>(double(w[j]) * decay - step_size * mj / denom);
  }
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
  if (max_norm > 0) {
    const double coef = max_norm / (norm + 1e-6);
    if (coef < 1.0)
      for (const NamedParam& g : grads) {
        float* p = g.value.data<float>();
        for (int64_t j = 0; j < g.value.numel(); ++j) p[j] = static_cast<float>(p[j] * coef);
      }
  }
  return norm;
}

double lr_at(LrSchedule s, double base_lr, int64_t step, int64_t warmup, int64_t total) {
  if (step < warmup) return base_lr * double(step) / double(std::max<int64_t>(1, warmup));
  if (s == LrSchedule::Constant) return base_lr;
  const double progress = double(step - warmup) / double(std::max<int64_t>(1, total - warmup));
  return base_lr * std::max(0.0, 0.5 * (1.0 + std::cos(M_PI * progress)));
}

}  // namespace moe
