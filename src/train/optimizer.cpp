// optimizer.cpp — AdamW, gradient clipping, learning-rate schedules.
#include "train/optimizer.h"

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

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

// An update below this many elements stays on the calling thread: a team's start and barrier
// cost more than the work (a layer norm, a small group).
constexpr int64_t kParallelMin = 65536;
// Elements per slice of the parallel loop: 64 KiB of weights, large enough that a slice's
// scheduling costs nothing, small enough that the threads finish together when one of them
// is slowed (dynamic schedule) on a shared machine.
constexpr int64_t kSlice = 16384;

// One parameter's update at its step: where its tensors are and the rule's constants.
// w and hi both nullptr: a skipped expert, whose gradient only enters the sum of squares. A
// split master weight (model_train.h) has hi and lo instead of w.
struct ParamUpdate {
  float* w = nullptr;
  uint16_t* hi = nullptr;
  uint16_t* lo = nullptr;
  const float* g = nullptr;
  void* m = nullptr;
  void* v = nullptr;
  int64_t n = 0;
  double step_size = 0, decay = 1, bc2 = 1;
};

struct Betas {
  double b1, b2, eps;
};

// Moment storage: f32 as is, bf16 widened on load and rounded to nearest-even on store (the
// f64 value rounded to f32 first, then to bf16). round_store returns the stored value widened:
// the update uses the moment as stored.
inline float widen(float x) { return x; }
inline float widen(uint16_t h) { return bf16_to_f32(h); }
inline float round_store(double x, float* at) {
  *at = static_cast<float>(x);
  return *at;
}
inline float round_store(double x, uint16_t* at) {
  *at = f32_to_bf16(static_cast<float>(x));
  return bf16_to_f32(*at);
}

// Weight storage: f32, or a split master weight (its two halves, model_train.h).
struct SplitRef {
  uint16_t* hi;
  uint16_t* lo;
};
inline double load_weight(const float* w, int64_t j) { return w[j]; }
inline double load_weight(const SplitRef& w, int64_t j) {
  return std::bit_cast<float>(master_bits(w.hi[j], w.lo[j]));
}
inline void store_weight(float* w, int64_t j, float x) { w[j] = x; }
inline void store_weight(const SplitRef& w, int64_t j, float x) {
  const uint32_t b = std::bit_cast<uint32_t>(x);
  w.hi[j] = master_high(b);
  w.lo[j] = static_cast<uint16_t>(b);
}

#if defined(__AVX2__) && defined(__FMA__)
// Four elements at a time in f64 (the rule is computed in f64; AVX2 holds four).
inline __m256d load4(const float* p) { return _mm256_cvtps_pd(_mm_loadu_ps(p)); }
inline __m256d load4(const uint16_t* p) {
  const __m128i u = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return _mm256_cvtps_pd(_mm_castsi128_ps(_mm_slli_epi32(u, 16)));
}
inline __m128 round_store4(__m256d x, float* at) {
  const __m128 f = _mm256_cvtpd_ps(x);
  _mm_storeu_ps(at, f);
  return f;
}
// f32_to_bf16 on four lanes: a NaN keeps its top half and is made quiet, everything else
// rounds to nearest-even; every lane is below 2^16, so the unsigned-saturating pack is exact.
inline __m128 round_store4(__m256d x, uint16_t* at) {
  const __m128i u = _mm_castps_si128(_mm256_cvtpd_ps(x));
  const __m128i hi = _mm_srli_epi32(u, 16);
  const __m128i nan = _mm_cmpgt_epi32(_mm_and_si128(u, _mm_set1_epi32(0x7fffffff)), _mm_set1_epi32(0x7f800000));
  const __m128i bias = _mm_add_epi32(_mm_set1_epi32(0x7fff), _mm_and_si128(hi, _mm_set1_epi32(1)));
  const __m128i rounded = _mm_srli_epi32(_mm_add_epi32(u, bias), 16);
  const __m128i h = _mm_blendv_epi8(rounded, _mm_or_si128(hi, _mm_set1_epi32(0x40)), nan);
  _mm_storel_epi64(reinterpret_cast<__m128i*>(at), _mm_packus_epi32(h, h));
  return _mm_castsi128_ps(_mm_slli_epi32(h, 16));
}
inline __m256d load_weight4(const float* w, int64_t j) { return load4(w + j); }
// master_bits on four lanes (the upper half's wrap below zero is the same modulo 2^16).
inline __m256d load_weight4(const SplitRef& w, int64_t j) {
  const __m128i h = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.hi + j)));
  const __m128i l = _mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.lo + j)));
  const __m128i b = _mm_or_si128(_mm_slli_epi32(_mm_sub_epi32(h, _mm_srli_epi32(l, 15)), 16), l);
  return _mm256_cvtps_pd(_mm_castsi128_ps(b));
}
inline void store_weight4(float* w, int64_t j, __m256d x) { _mm_storeu_ps(w + j, _mm256_cvtpd_ps(x)); }
// master_high and the lower half on four lanes; both are below 2^16, so the packs are exact.
inline void store_weight4(const SplitRef& w, int64_t j, __m256d x) {
  const __m128i b = _mm_castps_si128(_mm256_cvtpd_ps(x));
  const __m128i h = _mm_srli_epi32(_mm_add_epi32(b, _mm_set1_epi32(0x8000)), 16);
  const __m128i l = _mm_and_si128(b, _mm_set1_epi32(0xFFFF));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(w.hi + j), _mm_packus_epi32(h, h));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(w.lo + j), _mm_packus_epi32(l, l));
}
#endif

// Elements [j0, j1) of one parameter: the update (unless skipped), and the sum of squares of
// the gradient there (the gradient norm's terms, read in the same pass).
template <typename M, typename W>
double update_range(const Betas& bt, const ParamUpdate& u, W w, int64_t j0, int64_t j1) {
  const float* g = u.g;
  double ss = 0;
  const double b1 = bt.b1, b2 = bt.b2, decay = u.decay;
  // step·m / (sqrt(v)/bc2 + eps) as (step·bc2)·m / (sqrt(v) + eps·bc2): the same value with one
  // division a weight instead of two, and that division and the square root in f32 (torch's
  // own precision for f32 parameters) on the moments as stored (f32 or bf16 values, exact in
  // f32): in f64 they bound this loop.
  const float eps_bc2 = float(bt.eps * u.bc2), step_bc2 = float(u.step_size * u.bc2);
  M* m = static_cast<M*>(u.m);
  M* v = static_cast<M*>(u.v);
  int64_t j = j0;
#if defined(__AVX2__) && defined(__FMA__)
  // The scalar loop below, four lanes at a time, with the fused multiply-adds GCC forms for it:
  // m = fma(m, β1, (1-β1)·g), v = fma(v, β2, ((1-β2)·g)·g) in f64, the step (step·bc2·m)/denom
  // in f32, w = fma(w, decay, -step) in f64.
  const __m256d b1v = _mm256_set1_pd(b1), c1v = _mm256_set1_pd(1.0 - b1);
  const __m256d b2v = _mm256_set1_pd(b2), c2v = _mm256_set1_pd(1.0 - b2);
  const __m128 epsv = _mm_set1_ps(eps_bc2), stepv = _mm_set1_ps(step_bc2);
  const __m256d decayv = _mm256_set1_pd(decay);
  __m256d ssv = _mm256_setzero_pd();
  for (; j + 4 <= j1; j += 4) {
    const __m256d gj = load4(g + j);
    ssv = _mm256_add_pd(ssv, _mm256_mul_pd(gj, gj));
    const __m128 mj = round_store4(_mm256_fmadd_pd(load4(m + j), b1v, _mm256_mul_pd(c1v, gj)), m + j);
    const __m128 vj =
        round_store4(_mm256_fmadd_pd(load4(v + j), b2v, _mm256_mul_pd(_mm256_mul_pd(c2v, gj), gj)), v + j);
    const __m128 step = _mm_div_ps(_mm_mul_ps(stepv, mj), _mm_add_ps(_mm_sqrt_ps(vj), epsv));
    const __m256d wj = _mm256_fmsub_pd(load_weight4(w, j), decayv, _mm256_cvtps_pd(step));
    store_weight4(w, j, wj);
  }
  alignas(32) double lanes[4];
  _mm256_store_pd(lanes, ssv);
  ss = (lanes[0] + lanes[1]) + (lanes[2] + lanes[3]);
#endif
  for (; j < j1; ++j) {
    const double gj = g[j];
    ss += gj * gj;
    const float mj = round_store(b1 * widen(m[j]) + (1.0 - b1) * gj, m + j);
    const float vj = round_store(b2 * widen(v[j]) + (1.0 - b2) * gj * gj, v + j);
    const float step = (step_bc2 * mj) / (std::sqrt(vj) + eps_bc2);
    store_weight(w, j, static_cast<float>(load_weight(w, j) * decay - double(step)));
  }
  return ss;
}

// update_range on the parameter's storage; a skipped expert only sums its squares.
template <typename M>
double update_range(const Betas& bt, const ParamUpdate& u, int64_t j0, int64_t j1) {
  if (u.w) return update_range<M>(bt, u, u.w, j0, j1);
  if (u.hi) return update_range<M>(bt, u, SplitRef{u.hi, u.lo}, j0, j1);
  double ss = 0;
  for (int64_t j = j0; j < j1; ++j) ss += double(u.g[j]) * u.g[j];
  return ss;
}

// A piece of one parameter's elements: the unit of the parallel loop.
struct Slice {
  size_t param;
  int64_t begin, end;
};

// Every update in one parallel loop over slices; the sum of squares is added slice by slice
// in order, so it does not depend on the thread count.
template <typename M>
double run_updates(const Betas& bt, const std::vector<ParamUpdate>& ups) {
  std::vector<Slice> slices;
  int64_t total = 0;
  for (size_t i = 0; i < ups.size(); ++i) {
    for (int64_t b = 0; b < ups[i].n; b += kSlice) slices.push_back({i, b, std::min(ups[i].n, b + kSlice)});
    total += ups[i].n;
  }
  std::vector<double> part(slices.size());
  const int64_t n_slices = static_cast<int64_t>(slices.size());
#pragma omp parallel for schedule(dynamic, 1) if(total > kParallelMin)
  for (int64_t s = 0; s < n_slices; ++s) {
    const Slice& sl = slices[static_cast<size_t>(s)];
    part[static_cast<size_t>(s)] = update_range<M>(bt, ups[sl.param], sl.begin, sl.end);
  }
  double ss = 0;
  for (double p : part) ss += p;
  return ss;
}

}  // namespace

// The header's opaque job type is the ParamUpdate above.
struct AdamW::Job : ParamUpdate {};

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
  const std::vector<ParamUpdate> ups(jobs.begin(), jobs.end());
  const Betas bt{opt_.beta1, opt_.beta2, opt_.eps};
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
