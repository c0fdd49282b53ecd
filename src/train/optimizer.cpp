// optimizer.cpp — AdamW, gradient clipping, learning-rate schedules.
#include "train/optimizer.h"

#include <cmath>

namespace moe {

AdamW::AdamW(std::vector<NamedParam> params, std::vector<NamedParam> grads, const AdamWOptions& opt)
    : params_(std::move(params)), grads_(std::move(grads)), state_(params_.size()), opt_(opt) {
  MOE_ASSERT(params_.size() == grads_.size());
  for (size_t i = 0; i < params_.size(); ++i) {
    MOE_ASSERT(params_[i].name == grads_[i].name && params_[i].value.shape() == grads_[i].value.shape());
    MOE_CHECK(params_[i].value.dtype() == DType::F32 && params_[i].value.device() == Device::CPU,
              "AdamW: parameter %s must be f32 on the CPU (got %s)", params_[i].name.c_str(),
              params_[i].value.desc().c_str());
  }
}

void AdamW::step(double lr, const std::vector<std::vector<bool>>& touched) {
  const double b1 = opt_.beta1, b2 = opt_.beta2, eps = opt_.eps;
  for (size_t i = 0; i < params_.size(); ++i) {
    const NamedParam& p = params_[i];
    if (p.expert >= 0 && !opt_.dense_expert_update) {
      const auto& tl = touched.at(static_cast<size_t>(p.layer));
      if (!tl.at(static_cast<size_t>(p.expert))) continue;  // no gradient this step: torch skips it
    }
    State& s = state_[i];
    if (!s.m.defined()) {
      s.m = Tensor::zeros(p.value.shape(), DType::F32, MemCategory::Optimizer);
      s.v = Tensor::zeros(p.value.shape(), DType::F32, MemCategory::Optimizer);
    }
    s.steps += 1;
    const double wd = (p.no_decay && !opt_.decay_all) ? 0.0 : opt_.weight_decay;
    const double bc1 = 1.0 - std::pow(b1, double(s.steps)), bc2 = std::sqrt(1.0 - std::pow(b2, double(s.steps)));
    const double step_size = lr / bc1, decay = 1.0 - lr * wd;
    float* w = p.value.data<float>();
    const float* g = grads_[i].value.data<float>();
    float* m = s.m.data<float>();
    float* v = s.v.data<float>();
    const int64_t n = p.value.numel();
#pragma omp parallel for schedule(static) if(n > 65536)
    for (int64_t j = 0; j < n; ++j) {
      const double gj = g[j];
      const double mj = b1 * m[j] + (1.0 - b1) * gj;
      const double vj = b2 * v[j] + (1.0 - b2) * gj * gj;
      m[j] = static_cast<float>(mj);
      v[j] = static_cast<float>(vj);
      const double denom = std::sqrt(double(v[j])) / bc2 + eps;
      w[j] = static_cast<float>(double(w[j]) * decay - step_size * double(m[j]) / denom);
    }
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
      MOE_CHECK(t.shape() == params_[i].value.shape() && t.dtype() == DType::F32,
                "%s: optimizer tensor %s%s is %s, expected f32%s", what.c_str(), prefix, params_[i].name.c_str(),
                t.desc().c_str(), params_[i].value.shape_str().c_str());
      *dst = Tensor::empty(t.shape(), DType::F32, MemCategory::Optimizer);
      dst->copy_from(t);
    }
  }
}

double clip_grad_norm(const std::vector<NamedParam>& grads, double max_norm) {
  double ss = 0;
  for (const NamedParam& g : grads) {
    const float* p = g.value.data<float>();
    const int64_t n = g.value.numel();
    double s = 0;
#pragma omp parallel for reduction(+ : s) schedule(static) if(n > 65536)
    for (int64_t j = 0; j < n; ++j) s += double(p[j]) * p[j];
    ss += s;
  }
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
