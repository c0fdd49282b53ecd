// ops.cpp — argument validation and backend dispatch for every op in ops.h.
#include "ops/ops.h"

#include "ops/backend.h"

namespace moe {
namespace {

bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

void check_float(const char* op, const char* arg, const Tensor& t) {
  MOE_CHECK(t.defined(), "%s: %s is undefined", op, arg);
  MOE_CHECK(is_float(t.dtype()), "%s: %s expected a float dtype, got %s", op, arg, dtype_name(t.dtype()));
}

void check_device(const char* op, Device dev, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t->defined())
      MOE_CHECK(t->device() == dev, "%s: tensors on different devices (%s vs %s)", op, device_name(dev),
                device_name(t->device()));
}

#define MOE_DISPATCH(dev, call)                  \
  do {                                           \
    if ((dev) == Device::CPU) {                  \
      cpu::call;                                 \
    } else {                                     \
      cuda::call;                                \
    }                                            \
  } while (0)

}  // namespace

void embedding_forward(Tensor& out, const Tensor& ids, const Tensor& table) {
  const char* op = "embedding_forward";
  check_ndim(op, "table", table, 2);
  check_float(op, "table", table);
  check_dtype(op, "ids", ids, DType::I32);
  check_shape(op, "out", out, {ids.numel(), table.dim(1)});
  check_device(op, out.device(), {&ids, &table});
  MOE_DISPATCH(out.device(), embedding_forward(out, ids, table));
}

void rmsnorm_forward(Tensor& out, const Tensor& x, const Tensor& w, float eps) {
  const char* op = "rmsnorm_forward";
  check_float(op, "x", x);
  check_float(op, "w", w);
  check_shape(op, "w", w, {x.dim(-1)});
  MOE_CHECK(out.numel() == x.numel() && out.dim(-1) == x.dim(-1), "%s: out %s does not match x %s", op,
            out.shape_str().c_str(), x.shape_str().c_str());
  check_device(op, out.device(), {&x, &w});
  MOE_DISPATCH(out.device(), rmsnorm_forward(out, x, w, eps));
}

void linear_forward(Tensor& out, const Tensor& x, const Tensor& w, const Tensor& bias) {
  const char* op = "linear_forward";
  check_float(op, "x", x);
  check_float(op, "w", w);
  check_ndim(op, "w", w, 2);
  MOE_CHECK(x.dim(-1) == w.dim(1), "%s: x %s and w %s disagree on the inner dimension", op,
            x.shape_str().c_str(), w.shape_str().c_str());
  int64_t n = x.numel() / x.dim(-1);
  MOE_CHECK(out.numel() == n * w.dim(0) && out.dim(-1) == w.dim(0), "%s: out %s, expected [%lld,%lld]", op,
            out.shape_str().c_str(), (long long)n, (long long)w.dim(0));
  if (bias.defined()) check_shape(op, "bias", bias, {w.dim(0)});
  check_device(op, out.device(), {&x, &w, &bias});
  MOE_DISPATCH(out.device(), linear_forward(out, x, w, bias));
}

void rope_forward(Tensor& x, int64_t past, float theta) {
  const char* op = "rope_forward";
  check_float(op, "x", x);
  check_ndim(op, "x", x, 4);
  MOE_CHECK(x.dim(3) % 2 == 0, "%s: head dim must be even, got %lld", op, (long long)x.dim(3));
  MOE_CHECK(past >= 0, "%s: negative past %lld", op, (long long)past);
  MOE_DISPATCH(x.device(), rope_forward(x, past, theta));
}

void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, int64_t past) {
  const char* op = "kv_append";
  check_ndim(op, "k_cache", k_cache, 4);
  check_ndim(op, "k", k, 4);
  MOE_CHECK(k_cache.shape() == v_cache.shape() && k.shape() == v.shape(), "%s: k/v shapes differ", op);
  MOE_CHECK(k.dim(0) == k_cache.dim(0) && k.dim(2) == k_cache.dim(2) && k.dim(3) == k_cache.dim(3),
            "%s: k %s does not fit cache %s", op, k.shape_str().c_str(), k_cache.shape_str().c_str());
  MOE_CHECK(past >= 0 && past + k.dim(1) <= k_cache.dim(1),
            "%s: positions [%lld,%lld) exceed the KV cache capacity %lld", op, (long long)past,
            (long long)(past + k.dim(1)), (long long)k_cache.dim(1));
  MOE_CHECK(k.dtype() == k_cache.dtype() && v.dtype() == v_cache.dtype(), "%s: dtype mismatch", op);
  check_device(op, k_cache.device(), {&v_cache, &k, &v});
  MOE_DISPATCH(k_cache.device(), kv_append(k_cache, v_cache, k, v, past));
}

void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       int64_t past) {
  const char* op = "attention_forward";
  check_ndim(op, "q", q, 4);
  check_ndim(op, "k_cache", k_cache, 4);
  check_float(op, "q", q);
  MOE_CHECK(out.shape() == q.shape(), "%s: out %s != q %s", op, out.shape_str().c_str(), q.shape_str().c_str());
  MOE_CHECK(k_cache.shape() == v_cache.shape(), "%s: k/v cache shapes differ", op);
  MOE_CHECK(q.dim(0) == k_cache.dim(0) && q.dim(3) == k_cache.dim(3), "%s: q %s vs cache %s", op,
            q.shape_str().c_str(), k_cache.shape_str().c_str());
  MOE_CHECK(q.dim(2) % k_cache.dim(2) == 0, "%s: %lld heads not a multiple of %lld kv heads", op,
            (long long)q.dim(2), (long long)k_cache.dim(2));
  MOE_CHECK(past >= 0 && past + q.dim(1) <= k_cache.dim(1), "%s: past %lld + %lld exceeds cache %lld", op,
            (long long)past, (long long)q.dim(1), (long long)k_cache.dim(1));
  check_device(op, out.device(), {&q, &k_cache, &v_cache});
  MOE_DISPATCH(out.device(), attention_forward(out, q, k_cache, v_cache, past));
}

void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, bool renorm) {
  const char* op = "router_topk_forward";
  check_ndim(op, "logits", logits, 2);
  check_dtype(op, "logits", logits, DType::F32);
  check_dtype(op, "topk_idx", topk_idx, DType::I32);
  check_dtype(op, "topk_w", topk_w, DType::F32);
  check_ndim(op, "topk_idx", topk_idx, 2);
  MOE_CHECK(topk_idx.dim(0) == logits.dim(0) && topk_idx.shape() == topk_w.shape(),
            "%s: topk shapes %s/%s vs logits %s", op, topk_idx.shape_str().c_str(), topk_w.shape_str().c_str(),
            logits.shape_str().c_str());
  MOE_CHECK(topk_idx.dim(1) >= 1 && topk_idx.dim(1) <= logits.dim(1), "%s: k=%lld with %lld experts", op,
            (long long)topk_idx.dim(1), (long long)logits.dim(1));
  check_device(op, logits.device(), {&topk_idx, &topk_w});
  MOE_DISPATCH(logits.device(), router_topk_forward(topk_idx, topk_w, logits, renorm));
}

void moe_dispatch(Tensor& offsets, Tensor& perm, Tensor& inv, const Tensor& topk_idx, int64_t n_expert) {
  const char* op = "moe_dispatch";
  check_dtype(op, "topk_idx", topk_idx, DType::I32);
  check_shape(op, "offsets", offsets, {n_expert + 1});
  check_shape(op, "perm", perm, {topk_idx.numel()});
  check_shape(op, "inv", inv, {topk_idx.numel()});
  check_dtype(op, "offsets", offsets, DType::I32);
  check_dtype(op, "perm", perm, DType::I32);
  check_dtype(op, "inv", inv, DType::I32);
  check_device(op, topk_idx.device(), {&offsets, &perm, &inv});
  MOE_DISPATCH(topk_idx.device(), moe_dispatch(offsets, perm, inv, topk_idx, n_expert));
}

void gather_rows(Tensor& xp, const Tensor& x, const Tensor& perm, int64_t k) {
  const char* op = "gather_rows";
  check_ndim(op, "x", x, 2);
  check_shape(op, "xp", xp, {perm.numel(), x.dim(1)});
  MOE_CHECK(perm.numel() == x.dim(0) * k, "%s: perm has %lld rows, expected %lld", op, (long long)perm.numel(),
            (long long)(x.dim(0) * k));
  MOE_CHECK(xp.dtype() == x.dtype(), "%s: dtype mismatch", op);
  check_device(op, xp.device(), {&x, &perm});
  MOE_DISPATCH(xp.device(), gather_rows(xp, x, perm, k));
}

void expert_ffn_forward(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1,
                        const Tensor& w3, const Tensor& w2, const Tensor& row_scale) {
  const char* op = "expert_ffn_forward";
  check_ndim(op, "w1", w1, 3);
  int64_t e = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  check_shape(op, "w3", w3, {e, f, d});
  check_shape(op, "w2", w2, {e, d, f});
  MOE_CHECK(w1.dtype() == w3.dtype() && w1.dtype() == w2.dtype(), "%s: expert weight dtypes differ", op);
  check_ndim(op, "xp", xp, 2);
  check_shape(op, "xp", xp, {xp.dim(0), d});
  check_shape(op, "yp", yp, xp.shape());
  check_shape(op, "offsets", offsets, {e + 1});
  check_dtype(op, "offsets", offsets, DType::I32);
  if (row_scale.defined()) {
    check_shape(op, "row_scale", row_scale, {xp.dim(0)});
    check_dtype(op, "row_scale", row_scale, DType::F32);
  }
  check_device(op, yp.device(), {&xp, &offsets, &w1, &w3, &w2, &row_scale});
  MOE_DISPATCH(yp.device(), expert_ffn_forward(yp, xp, offsets, w1, w3, w2, row_scale));
}

void moe_combine(Tensor& y, const Tensor& yp, const Tensor& inv, int64_t k, bool accumulate) {
  const char* op = "moe_combine";
  check_ndim(op, "y", y, 2);
  check_shape(op, "yp", yp, {y.dim(0) * k, y.dim(1)});
  check_shape(op, "inv", inv, {y.dim(0) * k});
  check_device(op, y.device(), {&yp, &inv});
  MOE_DISPATCH(y.device(), moe_combine(y, yp, inv, k, accumulate));
}

void permute_weights(Tensor& row_scale, const Tensor& topk_w, const Tensor& perm) {
  const char* op = "permute_weights";
  check_shape(op, "row_scale", row_scale, {perm.numel()});
  MOE_CHECK(topk_w.numel() == perm.numel(), "%s: topk_w %s vs perm %s", op, topk_w.shape_str().c_str(),
            perm.shape_str().c_str());
  check_device(op, row_scale.device(), {&topk_w, &perm});
  MOE_DISPATCH(row_scale.device(), permute_weights(row_scale, topk_w, perm));
}

void swiglu_forward(Tensor& out, const Tensor& h1, const Tensor& h3) {
  const char* op = "swiglu_forward";
  MOE_CHECK(out.shape() == h1.shape() && h1.shape() == h3.shape(), "%s: shapes %s %s %s differ", op,
            out.shape_str().c_str(), h1.shape_str().c_str(), h3.shape_str().c_str());
  check_device(op, out.device(), {&h1, &h3});
  MOE_DISPATCH(out.device(), swiglu_forward(out, h1, h3));
}

void sigmoid_gate_add(Tensor& y, const Tensor& s, const Tensor& gate) {
  const char* op = "sigmoid_gate_add";
  MOE_CHECK(y.shape() == s.shape(), "%s: y %s vs s %s", op, y.shape_str().c_str(), s.shape_str().c_str());
  MOE_CHECK(gate.numel() == y.dim(0), "%s: gate %s for %lld rows", op, gate.shape_str().c_str(),
            (long long)y.dim(0));
  check_device(op, y.device(), {&s, &gate});
  MOE_DISPATCH(y.device(), sigmoid_gate_add(y, s, gate));
}

void add_inplace(Tensor& y, const Tensor& x) {
  const char* op = "add_inplace";
  MOE_CHECK(y.numel() == x.numel(), "%s: y %s vs x %s", op, y.shape_str().c_str(), x.shape_str().c_str());
  check_device(op, y.device(), {&x});
  MOE_DISPATCH(y.device(), add_inplace(y, x));
}

void cast(Tensor& out, const Tensor& in) {
  const char* op = "cast";
  MOE_CHECK(out.numel() == in.numel(), "%s: out %s vs in %s", op, out.shape_str().c_str(), in.shape_str().c_str());
  check_float(op, "in", in);
  check_float(op, "out", out);
  check_device(op, out.device(), {&in});
  MOE_DISPATCH(out.device(), cast(out, in));
}

void synchronize(Device dev) {
  if (dev == Device::CUDA) cuda::synchronize();
}

}  // namespace moe
