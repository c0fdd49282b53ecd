// optimizer.h — AdamW with torch.optim.AdamW's update rule, per HF-named parameter, with
// lazily created state; global-norm gradient clipping; the learning-rate schedules.
//
// Update of one parameter p with gradient g at its own step count t (torch's order):
//   p *= 1 - lr·wd;  m = β1·m + (1-β1)·g;  v = β2·v + (1-β2)·g²;
//   p -= lr/(1-β1^t) · m / (sqrt(v)/sqrt(1-β2^t) + eps)
// (evaluated as p -= (lr·sqrt(1-β2^t)/(1-β1^t))·m / (sqrt(v) + eps·sqrt(1-β2^t)), one division)
// computed in f32 per element, as torch computes it for f32 parameters, stored f32 (or as a split
// master weight's two halves, mixed precision: model_train.h). Routed experts that received no
// token in a step are skipped exactly as torch skips HF's per-expert parameters whose gradient
// is None: no moment update, no decay, and that expert's step count does not advance — unless
// dense_expert_update (then they are updated with a zero gradient, as a fused 3-D expert
// parameter would be).
// Moments are allocated (Optimizer category) the first time a parameter is updated, so experts
// that never receive tokens never cost optimizer memory. They are f32, or bf16 with
// state_dtype = BF16 (half the optimizer memory; the update is still computed in f32 from the
// widened moments and rounded to nearest-even when stored).
//
// The fused update (step_group with forward_backward_fused) applies the same rule to one group
// of parameters as soon as its gradients are final, so the whole-model gradient never exists.
//
// Both step and step_group update all their parameters in ONE parallel loop over fixed-size
// slices of the concatenated elements (a group's many small tensors share one thread team, a
// big tensor is spread over all threads), with AVX2 inner loops where the build has them and
// AVX-512 ones where the CPU has those (adamw_lanes.h, compiled twice). The vector loops do
// exactly the scalar loop's f32 operations (its fused multiply-adds written out as std::fma),
// in the same order, so the result does not depend on which path, slice, thread or CPU updates
// an element (test_adamw_lanes.cpp).
#pragma once
#include <map>
#include <string>
#include <vector>

#include "model/model_train.h"

namespace moe {

struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.0;
  bool decay_all = false;            // decay norms and biases too (torch.optim.AdamW(model.parameters()))
  bool dense_expert_update = false;  // update experts without tokens with a zero gradient
  DType state_dtype = DType::F32;    // moments: F32 or BF16
};

class AdamW {
 public:
  // params and grads: named_parameters() of the weights and of their gradients (same order).
  // low: the lower halves of split master weights (mixed precision, model_train.h): the bf16
  // parameters it holds are updated as the f32 values they and their halves make.
  AdamW(std::vector<NamedParam> params, std::vector<NamedParam> grads, const AdamWOptions& opt,
        const MasterLowHalves* low = nullptr);

  // One update at learning rate lr. touched[layer][expert]: the expert received tokens in this
  // step (only read for routed-expert parameters).
  void step(double lr, const std::vector<std::vector<bool>>& touched);

  // The update of the parameters whose gradients `grads` holds (named_parameters of a partial
  // gradient: one group of forward_backward_fused), matched by name. Returns the sum of squares
  // of those gradients (for the logged gradient norm).
  double step_group(double lr, const std::vector<std::vector<bool>>& touched, const std::vector<NamedParam>& grads);

  // Number of updates applied to parameter i (its bias-correction step).
  int64_t param_steps(size_t i) const { return state_[i].steps; }
  size_t size() const { return params_.size(); }
  const std::vector<NamedParam>& params() const { return params_; }

  // State as named tensors (m.<name>, v.<name>) and step counts, for checkpoints.
  std::vector<std::pair<std::string, Tensor>> state_tensors() const;
  std::vector<int64_t> step_counts() const;
  // Restores; tensors are looked up by name; throws moe::Error naming what does not match.
  void load_state(const std::vector<int64_t>& steps,
                  const std::function<Tensor(const std::string&)>& get, const std::string& what);

 private:
  struct State {
    Tensor m, v;
    int64_t steps = 0;
  };
  struct Job;  // one parameter's share of an update (optimizer.cpp)
  // Decides whether parameter i is updated this step; if so advances its step count, creates
  // its moments and fills *job for the update; a skipped expert's job only sums squares.
  void prepare(size_t i, double lr, const std::vector<std::vector<bool>>& touched, const Tensor& grad, Job* job);
  // Runs the jobs in one parallel loop; returns the sum of squares of their gradients.
  double run(const std::vector<Job>& jobs) const;

  std::vector<NamedParam> params_, grads_;
  std::map<std::string, size_t> index_;
  std::vector<State> state_;
  std::vector<uint16_t*> low_;  // per parameter: its lower halves when split, else nullptr
  AdamWOptions opt_;
};

// Scales all gradients so their global L2 norm is at most max_norm (torch's clip_grad_norm_:
// coefficient max_norm / (norm + 1e-6), applied when below 1). Returns the norm before
// clipping; max_norm <= 0 only measures.
double clip_grad_norm(const std::vector<NamedParam>& grads, double max_norm);
// clip_grad_norm's scaling for a norm computed elsewhere (distributed.h's global norm over
// sharded experts): torch's coefficient max_norm / (norm + 1e-6), applied when below 1.
void clip_to_norm(const std::vector<NamedParam>& grads, double norm, double max_norm);

// Learning rate at optimizer step `step` (0-based), HF's schedules: linear warmup over
// `warmup` steps, then constant or cosine decay to 0 at `total` steps.
enum class LrSchedule { Constant, Cosine };
double lr_at(LrSchedule s, double base_lr, int64_t step, int64_t warmup, int64_t total);

}  // namespace moe
