// test_op_boundary.cpp — ops.cpp validates dtypes and full shapes before any kernel runs: each
// op fed a wrong dtype or a wrong (same element count) shape throws moe::Error naming the op.
#include <gtest/gtest.h>

#include <functional>
#include <string>

#include "ops/ops.h"

namespace moe {
namespace {

Tensor f32(const Shape& s) { return Tensor::zeros(s, DType::F32, MemCategory::Workspace); }
Tensor bf16(const Shape& s) { return Tensor::zeros(s, DType::BF16, MemCategory::Workspace); }
Tensor i32(const Shape& s) { return Tensor::zeros(s, DType::I32, MemCategory::Workspace); }
Tensor i64(const Shape& s) { return Tensor::zeros(s, DType::I64, MemCategory::Workspace); }

void expect_op_error(const char* op, const std::function<void()>& call) {
  try {
    call();
    ADD_FAILURE() << op << ": no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find(op), std::string::npos) << e.what();
  }
}

TEST(OpBoundary, WrongDtypesAndShapesAreErrors) {
  Tensor none;
  // The review's two examples: bf16 activations into the f32-only CPU SwiGLU (read past the
  // end before), and add_inplace with equal element counts but different shapes.
  expect_op_error("swiglu_forward", [&] {
    Tensor o = bf16({3, 5}), a = bf16({3, 5}), b = bf16({3, 5});
    swiglu_forward(o, a, b);
  });
  expect_op_error("swiglu_forward", [&] {
    Tensor o = f32({3, 5}), a = f32({3, 5}), b = bf16({3, 5});
    swiglu_forward(o, a, b);
  });
  expect_op_error("add_inplace", [&] {
    Tensor y = f32({3, 4}), x = f32({4, 3});
    add_inplace(y, x);
  });
  expect_op_error("add_inplace", [&] {
    Tensor y = f32({3, 4}), x = i32({3, 4});
    add_inplace(y, x);
  });
  expect_op_error("linear_forward", [&] {
    Tensor o = f32({2, 3}), x = f32({2, 5}), w = f32({3, 4});
    linear_forward(o, x, w, none);
  });
  // linear_forward_cat: out narrower than the parts together; a part of another inner width; a
  // bias of the wrong length.
  expect_op_error("linear_forward_cat", [&] {
    Tensor o = f32({2, 6}), x = f32({2, 4}), a = f32({3, 4}), b = f32({4, 4});
    linear_forward_cat(o, x, {{&a, nullptr}, {&b, nullptr}});
  });
  expect_op_error("linear_forward_cat", [&] {
    Tensor o = f32({2, 7}), x = f32({2, 4}), a = f32({3, 4}), b = f32({4, 5});
    linear_forward_cat(o, x, {{&a, nullptr}, {&b, nullptr}});
  });
  expect_op_error("linear_forward_cat", [&] {
    Tensor o = f32({2, 7}), x = f32({2, 4}), a = f32({3, 4}), b = f32({4, 4}), bb = f32({3});
    linear_forward_cat(o, x, {{&a, nullptr}, {&b, &bb}});
  });
  expect_op_error("linear_backward", [&] {
    Tensor dx = f32({2, 4}), dw = f32({4, 3}), dy = f32({2, 3}), x = f32({2, 4}), w = f32({3, 4});
    linear_backward(dx, dw, none, dy, x, w, false);
  });
  expect_op_error("rmsnorm_backward", [&] {
    Tensor dx = f32({2, 4}), dw = f32({4}), dy = f32({2, 4}), x = f32({2, 4}), w = f32({4}), r = f32({4});
    rmsnorm_backward(dx, dw, dy, x, w, r, false);
  });
  expect_op_error("embedding_backward", [&] {
    Tensor dt = f32({10, 4}), g = f32({3, 4}), ids = i64({3});
    embedding_backward(dt, g, ids, -1);
  });
  expect_op_error("attention_forward_train", [&] {
    Tensor o = f32({1, 4, 2, 8}), lse = f32({1, 4, 2}), q = f32({1, 4, 2, 8}), k = f32({1, 4, 1, 8});
    attention_forward_train(o, lse, q, k, k);
  });
  expect_op_error("cross_entropy_forward", [&] {
    Tensor loss = f32({3}), lg = f32({3, 7}), tg = i64({3});
    cross_entropy_forward(loss, lg, tg);
  });
  expect_op_error("expert_ffn_backward", [&] {
    const int64_t e = 2, f = 3, d = 4, p = 5;
    Tensor dxp = f32({p, d}), dyp = f32({p, d}), xp = f32({p, d}), h1 = f32({p, d}), h3 = f32({p, f});
    Tensor off = i32({e + 1}), w1 = f32({e, f, d}), w3 = f32({e, f, d}), w2 = f32({e, d, f});
    expert_ffn_backward(dxp, none, none, none, none, dyp, xp, h1, h3, off, w1, w3, w2, none);
  });
  expect_op_error("router_topk_backward", [&] {
    Tensor dl = f32({3, 5}), dw = f32({3, 2}), lg = f32({3, 5}), idx = f32({3, 2});
    router_topk_backward(dl, dw, lg, idx, true);
  });
  expect_op_error("copy_columns", [&] {
    Tensor dst = f32({3, 4}), src = f32({3, 4});
    copy_columns(dst, 2, src, 0, 3);
  });
}

}  // namespace
}  // namespace moe
