// linear.cpp — the model's dense linear path with its LoRA adapters (see linear.h).
#include "model/linear.h"

#include "ops/ops.h"

namespace moe {

void linear(Tensor& y, const Tensor& x, const Tensor& w, const Tensor& b, std::initializer_list<LinearLora> lora) {
  linear_forward(y, x, w, b);
  for (const LinearLora& l : lora)
    if (l.w && l.w->on()) lora_forward(y, l.col0, x, *l.w);
}

void linear_backward(Tensor& dx, Tensor& dw, Tensor& db, const Tensor& dy, const Tensor& x, const Tensor& w,
                     bool accumulate, std::initializer_list<LinearLora> lora) {
  linear_backward(dx, dw, db, dy, x, w, accumulate);
  for (const LinearLora& l : lora) {
    if (!l.w || !l.w->on()) continue;
    Tensor none;
    lora_backward(dx, l.g ? l.g->a : none, l.g ? l.g->b : none, dy, l.col0, x, *l.w);
  }
}

}  // namespace moe
