// ops.cpp — argument validation and backend dispatch for every op in ops.h.
#include "ops/ops.h"

#include <cmath>
#include <string>
#include <tuple>

#include "ops/backend.h"
#include "ops/cpu/cpu_gemm.h"

#include <array>
#include <utility>

namespace moe {
namespace {

bool is_float(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

void check_float(const char* op, const char* arg, const Tensor& t) {
  MOE_CHECK(t.defined(), "%s: %s is undefined", op, arg);
  MOE_CHECK(is_float(t.dtype()), "%s: %s expected a float dtype, got %s", op, arg, dtype_name(t.dtype()));
}

// A GEMM weight: float, a block type (the frozen QLoRA base: NF4, or Q8_0 as the int8
// option; CPU only — the forward's products use the block kernels, backward's dequantize by rows),
// or serving's panel-packed bf16 (CPU inference only).
void check_gemm_weight(const char* op, const char* arg, const Tensor& t) {
  if (t.defined() && (dtype_is_block(t.dtype()) || t.dtype() == DType::BF16P)) {
    MOE_CHECK(t.device() == Device::CPU, "%s: %s is %s, which only the CPU backend reads", op, arg,
              dtype_name(t.dtype()));
    return;
  }
  check_float(op, arg, t);
}

void check_device(const char* op, Device dev, std::initializer_list<const Tensor*> ts) {
  for (const Tensor* t : ts)
    if (t->defined())
      MOE_CHECK(t->device() == dev, "%s: tensors on different devices (%s vs %s)", op, device_name(dev),
                device_name(t->device()));
}

// `moe --reference` (set_reference_backend): every CPU op runs on the naive reference backend.
bool g_reference = false;

#define MOE_DISPATCH(dev, call)                  \
  do {                                           \
    if ((dev) == Device::CPU) {                  \
      if (g_reference)                           \
        ref::call;                               \
      else                                       \
        cpu::call;                               \
    } else {                                     \
      cuda::call;                                \
    }                                            \
  } while (0)

// The CPU backends: the naive reference under `moe --reference`, else the optimised kernels.
#define MOE_CPU_DISPATCH(call) \
  do {                         \
    if (g_reference)           \
      ref::call;               \
    else                       \
      cpu::call;               \
  } while (0)

// Training ops run on the CPU only until the CUDA training issue lands.
#define MOE_TRAIN_DISPATCH(dev, op, call)                                                         \
  do {                                                                                            \
    MOE_CHECK((dev) == Device::CPU, "%s: training ops are not implemented on %s yet (CPU only)", \
              op, device_name(dev));                                                              \
    MOE_CPU_DISPATCH(call);                                                                       \
  } while (0)

// Op variants (variants.h) run on the CPU backends only for now; the plain variant of an
// inference op goes through MOE_DISPATCH as before.
#define MOE_VARIANT_DISPATCH(dev, op, call)                                                       \
  do {                                                                                            \
    MOE_CHECK((dev) == Device::CPU,                                                               \
              "%s: this variant (sinks, sliding window, scaled RoPE, clamped SwiGLU, expert "     \
              "biases, MLA or DeepSeek routing) runs on the CPU only for now, not on %s",         \
              op, device_name(dev));                                                              \
    MOE_CPU_DISPATCH(call);                                                                       \
  } while (0)

void check_f32(const char* op, const char* arg, const Tensor& t) {
  MOE_CHECK(t.defined(), "%s: %s is undefined", op, arg);
  MOE_CHECK(t.dtype() == DType::F32, "%s: %s must be f32, got %s", op, arg, dtype_name(t.dtype()));
}

// The experts' saved pre-activations h1, h3: f32, or both bf16 (mixed precision saves them so).
void check_saved_h(const char* op, const Tensor& h1, const Tensor& h3, Shape shape) {
  for (auto [name, t] : {std::pair{"h1", &h1}, {"h3", &h3}}) {
    MOE_CHECK(t->defined(), "%s: %s is undefined", op, name);
    MOE_CHECK(t->dtype() == DType::F32 || t->dtype() == DType::BF16, "%s: %s must be f32 or bf16, got %s", op, name,
              dtype_name(t->dtype()));
    check_shape(op, name, *t, shape);
  }
  MOE_CHECK(h1.dtype() == h3.dtype(), "%s: h1 is %s but h3 is %s", op, dtype_name(h1.dtype()), dtype_name(h3.dtype()));
}

void check_i32(const char* op, const char* arg, const Tensor& t) {
  MOE_CHECK(t.defined(), "%s: %s is undefined", op, arg);
  MOE_CHECK(t.dtype() == DType::I32, "%s: %s must be i32, got %s", op, arg, dtype_name(t.dtype()));
}

// A weight of a quantized block dtype (core/dtype.h): the supported pairs are exactly
// (q8_0 | q4_0 | q4_k | q5_k | q6_k weight, f32 activations) on the CPU, for inference.
void check_quant_weight(const char* op, const char* arg, const Tensor& w, Device dev,
                        std::initializer_list<std::pair<const char*, const Tensor*>> acts) {
  MOE_CHECK(dev == Device::CPU,
            "%s: %s is quantized (%s); quantized weights run on the CPU only (no CUDA kernels yet): load the model "
            "with float weights for --device cuda",
            op, arg, dtype_name(w.dtype()));
  for (auto [name, t] : acts)
    MOE_CHECK(t->dtype() == DType::F32, "%s: with a quantized weight %s (%s), %s must be f32, got %s", op, arg,
              dtype_name(w.dtype()), name, dtype_name(t->dtype()));
}

// An optional gradient: undefined, or f32 of the parameter's shape.
void check_grad(const char* op, const char* arg, const Tensor& g, const Shape& shape) {
  if (!g.defined()) return;
  check_f32(op, arg, g);
  check_shape(op, arg, g, shape);
}

// AttnVariant's sinks [H] float (heads `h_n`) and window >= 0.
void check_attn_variant(const char* op, const AttnVariant& av, int64_t h_n, Device dev) {
  MOE_CHECK(av.window >= 0, "%s: negative sliding window %lld", op, (long long)av.window);
  MOE_CHECK(av.scale >= 0 && std::isfinite(av.scale), "%s: softmax scale %g must be finite and >= 0", op, av.scale);
  if (!av.sinks.defined()) return;
  check_float(op, "sinks", av.sinks);
  check_shape(op, "sinks", av.sinks, {h_n});
  check_device(op, dev, {&av.sinks});
}

// ExpertGlu and ExpertBias of experts [E,F,D].
void check_expert_variant(const char* op, const ExpertGlu& glu, const ExpertBias& b, int64_t e, int64_t f, int64_t d,
                          Device dev) {
  MOE_CHECK(glu.plain() || (glu.limit > 0 && std::isfinite(glu.limit) && std::isfinite(glu.alpha)),
            "%s: clamped SwiGLU needs a positive limit and a finite alpha, got %g and %g", op, glu.limit, glu.alpha);
  for (auto [name, t, want] : {std::tuple{"b1", &b.b1, Shape{e, f}}, {"b3", &b.b3, Shape{e, f}}, {"b2", &b.b2, Shape{e, d}}}) {
    if (!t->defined()) continue;
    check_float(op, name, *t);
    check_shape(op, name, *t, want);
    check_device(op, dev, {t});
  }
}

}  // namespace

void set_reference_backend(bool on) { g_reference = on; }
bool reference_backend() { return g_reference; }

bool bf16_products(DType wdt) { return !g_reference && cpu::bf16_matrix_applies(wdt); }

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

namespace {
// A linear layer's weight w [M, x's last dim] (`arg` names it in errors) and its bias [M] or
// undefined, on out's device.
void check_linear_weight(const char* op, const char* arg, const Tensor& w, const Tensor& bias, const Tensor& x,
                         const Tensor& out) {
  MOE_CHECK(w.defined(), "%s: %s is undefined", op, arg);
  check_ndim(op, arg, w, 2);
  if (dtype_is_quant(w.dtype()))
    check_quant_weight(op, arg, w, out.device(), {{"x", &x}, {"out", &out}});
  else
    check_gemm_weight(op, arg, w);
  MOE_CHECK(x.dim(-1) == w.dim(1), "%s: x %s and %s %s disagree on the inner dimension", op, x.shape_str().c_str(),
            arg, w.shape_str().c_str());
  if (bias.defined()) check_shape(op, "bias", bias, {w.dim(0)});
  check_device(op, out.device(), {&x, &w, &bias});
}
}  // namespace

void linear_forward(Tensor& out, const Tensor& x, const Tensor& w, const Tensor& bias) {
  const char* op = "linear_forward";
  check_float(op, "x", x);
  check_linear_weight(op, "w", w, bias, x, out);
  int64_t n = x.numel() / x.dim(-1);
  MOE_CHECK(out.numel() == n * w.dim(0) && out.dim(-1) == w.dim(0), "%s: out %s, expected [%lld,%lld]", op,
            out.shape_str().c_str(), (long long)n, (long long)w.dim(0));
  MOE_DISPATCH(out.device(), linear_forward(out, x, w, bias));
}

void linear_forward_cat(Tensor& out, const Tensor& x, std::initializer_list<LinearPart> parts) {
  const char* op = "linear_forward_cat";
  check_float(op, "x", x);
  MOE_CHECK(parts.size() > 0, "%s: no parts", op);
  const int64_t n = x.numel() / x.dim(-1);
  int64_t cols = 0;
  for (const LinearPart& p : parts) {
    const std::string arg = "part " + std::to_string(&p - parts.begin()) + "'s w";
    MOE_CHECK(p.w, "%s: %s is missing", op, arg.c_str());
    check_linear_weight(op, arg.c_str(), *p.w, p.bias ? *p.bias : Tensor(), x, out);
    cols += p.w->dim(0);
  }
  MOE_CHECK(out.numel() == n * cols && out.dim(-1) == cols, "%s: out %s, expected [%lld,%lld]", op,
            out.shape_str().c_str(), (long long)n, (long long)cols);
  MOE_DISPATCH(out.device(), linear_forward_cat(out, x, parts));
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

// The shapes attention_forward (plain and variant) takes: out, q [B,S,H,Dh]; caches [B,C,Hkv,Dh]
// holding positions [0, past+S).
static void check_attention_args(const char* op, const Tensor& out, const Tensor& q, const Tensor& k_cache,
                                 const Tensor& v_cache, int64_t past) {
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
}

void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       int64_t past) {
  const char* op = "attention_forward";
  check_attention_args(op, out, q, k_cache, v_cache, past);
  check_device(op, out.device(), {&q, &k_cache, &v_cache});
  MOE_DISPATCH(out.device(), attention_forward(out, q, k_cache, v_cache, past));
}

// The shapes and dtypes both router_topk_forward entry points take.
static void check_router_args(const char* op, const Tensor& topk_idx, const Tensor& topk_w, const Tensor& logits) {
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
}

void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, bool renorm,
                         const Tensor& select_bias) {
  const char* op = "router_topk_forward";
  check_router_args(op, topk_idx, topk_w, logits);
  if (select_bias.defined()) {
    check_dtype(op, "select_bias", select_bias, DType::F32);
    check_shape(op, "select_bias", select_bias, {logits.dim(1)});
  }
  check_device(op, logits.device(), {&topk_idx, &topk_w, &select_bias});
  MOE_DISPATCH(logits.device(), router_topk_forward(topk_idx, topk_w, logits, renorm, select_bias));
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

namespace {
// expert_ffn_forward's arguments (every variant); returns {E, F, D}.
std::array<int64_t, 3> check_expert_ffn_infer(const char* op, const Tensor& yp, const Tensor& xp,
                                              const Tensor& offsets, const Tensor& w1, const Tensor& w3,
                                              const Tensor& w2, const Tensor& row_scale) {
  check_ndim(op, "w1", w1, 3);
  int64_t e = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  check_shape(op, "w3", w3, {e, f, d});
  check_shape(op, "w2", w2, {e, d, f});
  if (dtype_is_quant(w1.dtype()) || dtype_is_quant(w2.dtype())) {
    // Quantized experts (CPU inference): w1 and w3 share a type; w2 may have another, as in
    // llama.cpp's mixed files (Q4_K gate/up with a Q6_K down projection).
    MOE_CHECK(w1.dtype() == w3.dtype(), "%s: w1 (%s) and w3 (%s) must have the same dtype", op, dtype_name(w1.dtype()),
              dtype_name(w3.dtype()));
    if (!dtype_is_quant(w2.dtype())) check_float(op, "w2", w2);
    if (!dtype_is_quant(w1.dtype())) check_float(op, "w1", w1);
    check_quant_weight(op, dtype_is_quant(w1.dtype()) ? "w1" : "w2", dtype_is_quant(w1.dtype()) ? w1 : w2, yp.device(),
                       {{"xp", &xp}, {"yp", &yp}});
  } else {
    MOE_CHECK(w1.dtype() == w3.dtype() && w1.dtype() == w2.dtype(), "%s: expert weight dtypes differ", op);
  }
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
  return {e, f, d};
}
}  // namespace

void expert_ffn_forward(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1,
                        const Tensor& w3, const Tensor& w2, const Tensor& row_scale) {
  check_expert_ffn_infer("expert_ffn_forward", yp, xp, offsets, w1, w3, w2, row_scale);
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
  check_float(op, "h1", h1);
  MOE_CHECK(out.dtype() == h1.dtype() && h1.dtype() == h3.dtype(), "%s: dtypes %s %s %s differ", op,
            dtype_name(out.dtype()), dtype_name(h1.dtype()), dtype_name(h3.dtype()));
  // The CPU backend computes in f32 activations only (a bf16 tensor read as f32 would run past it).
  if (out.device() == Device::CPU) check_f32(op, "out", out);
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
  MOE_CHECK(y.shape() == x.shape(), "%s: y %s vs x %s: shapes differ", op, y.shape_str().c_str(),
            x.shape_str().c_str());
  check_float(op, "y", y);
  check_float(op, "x", x);
  check_device(op, y.device(), {&x});
  MOE_DISPATCH(y.device(), add_inplace(y, x));
}

void copy_columns(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col, int64_t ncols) {
  const char* op = "copy_columns";
  check_ndim(op, "dst", dst, 2);
  check_ndim(op, "src", src, 2);
  MOE_CHECK(dst.dim(0) == src.dim(0), "%s: dst %s and src %s have different rows", op, dst.shape_str().c_str(),
            src.shape_str().c_str());
  MOE_CHECK(dst.dtype() == src.dtype(), "%s: dtype mismatch (%s vs %s)", op, dtype_name(dst.dtype()),
            dtype_name(src.dtype()));
  MOE_CHECK(ncols >= 0 && dst_col >= 0 && src_col >= 0 && dst_col + ncols <= dst.dim(1) && src_col + ncols <= src.dim(1),
            "%s: columns [%lld,+%lld) of %s into [%lld,+%lld) of %s out of range", op, (long long)src_col,
            (long long)ncols, src.shape_str().c_str(), (long long)dst_col, (long long)ncols, dst.shape_str().c_str());
  check_device(op, dst.device(), {&src});
  MOE_DISPATCH(dst.device(), copy_columns(dst, dst_col, src, src_col, ncols));
}

void cast(Tensor& out, const Tensor& in) {
  const char* op = "cast";
  MOE_CHECK(out.numel() == in.numel(), "%s: out %s vs in %s", op, out.shape_str().c_str(), in.shape_str().c_str());
  check_float(op, "in", in);
  check_float(op, "out", out);
  check_device(op, out.device(), {&in});
  MOE_DISPATCH(out.device(), cast(out, in));
}

// ---- training ops ----

void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids, int64_t padding_idx) {
  const char* op = "embedding_backward";
  check_f32(op, "dtable", dtable);
  check_ndim(op, "dtable", dtable, 2);
  check_i32(op, "ids", ids);
  check_f32(op, "dout", dout);
  check_shape(op, "dout", dout, {ids.numel(), dtable.dim(1)});
  check_device(op, dtable.device(), {&dout, &ids});
  MOE_TRAIN_DISPATCH(dtable.device(), op, embedding_backward(dtable, dout, ids, padding_idx));
}

void rmsnorm_forward_train(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w, float eps) {
  const char* op = "rmsnorm_forward_train";
  check_f32(op, "x", x);
  check_f32(op, "out", out);
  check_float(op, "w", w);
  check_shape(op, "w", w, {x.dim(-1)});
  check_shape(op, "out", out, x.shape());
  check_f32(op, "rstd", rstd);
  check_shape(op, "rstd", rstd, {x.numel() / x.dim(-1)});
  MOE_CHECK(out.raw() != x.raw(), "%s: out must not alias x (backward reads x)", op);
  check_device(op, out.device(), {&rstd, &x, &w});
  MOE_TRAIN_DISPATCH(out.device(), op, rmsnorm_forward_train(out, rstd, x, w, eps));
}

void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                      const Tensor& rstd, bool accumulate) {
  const char* op = "rmsnorm_backward";
  check_f32(op, "x", x);
  check_f32(op, "dx", dx);
  check_f32(op, "dy", dy);
  check_shape(op, "dx", dx, x.shape());
  check_shape(op, "dy", dy, x.shape());
  check_float(op, "w", w);
  check_shape(op, "w", w, {x.dim(-1)});
  check_grad(op, "dw", dw, {x.dim(-1)});
  check_f32(op, "rstd", rstd);
  check_shape(op, "rstd", rstd, {x.numel() / x.dim(-1)});
  check_device(op, dx.device(), {&dw, &dy, &x, &w, &rstd});
  MOE_TRAIN_DISPATCH(dx.device(), op, rmsnorm_backward(dx, dw, dy, x, w, rstd, accumulate));
}

void linear_backward(Tensor& dx, Tensor& dw, Tensor& db, const Tensor& dy, const Tensor& x, const Tensor& w,
                     bool accumulate, bool assign_dw) {
  const char* op = "linear_backward";
  check_gemm_weight(op, "w", w);
  check_ndim(op, "w", w, 2);
  const int64_t m = w.dim(0), kd = w.dim(1);
  MOE_CHECK(dy.defined() && (dy.dtype() == DType::F32 || dy.dtype() == DType::BF16),
            "%s: dy must be f32 or bf16, got %s", op, dy.defined() ? dtype_name(dy.dtype()) : "undefined");
  MOE_CHECK(dy.dim(-1) == m, "%s: dy %s does not end in %lld", op, dy.shape_str().c_str(), (long long)m);
  const int64_t n = dy.numel() / m;
  if (dx.defined()) {
    check_f32(op, "dx", dx);
    MOE_CHECK(dx.numel() == n * kd && dx.dim(-1) == kd, "%s: dx %s, expected [%lld,%lld]", op,
              dx.shape_str().c_str(), (long long)n, (long long)kd);
  }
  if (dw.defined()) {
    check_f32(op, "x", x);
    MOE_CHECK(x.numel() == n * kd && x.dim(-1) == kd, "%s: x %s, expected [%lld,%lld]", op, x.shape_str().c_str(),
              (long long)n, (long long)kd);
  }
  check_grad(op, "dw", dw, {m, kd});
  check_grad(op, "db", db, {m});
  MOE_CHECK(!dw.defined() || !dtype_is_block(w.dtype()),
            "%s: w is %s, a frozen (quantized) weight: it takes no gradient (dw must be undefined)", op,
            dtype_name(w.dtype()));
  check_device(op, dy.device(), {&dx, &dw, &db, &x, &w});
  MOE_TRAIN_DISPATCH(dy.device(), op, linear_backward(dx, dw, db, dy, x, w, accumulate, assign_dw));
}

Tensor cast_bf16_in_place(const Tensor& x) {
  const char* op = "cast_bf16_in_place";
  check_f32(op, "x", x);
  check_ndim(op, "x", x, 2);
  Tensor out = x.reinterpret(DType::BF16, x.shape());
  MOE_TRAIN_DISPATCH(x.device(), op, cast_bf16_in_place(out, x));
  return out;
}

void rope_backward(Tensor& dx, int64_t past, float theta) {
  const char* op = "rope_backward";
  check_f32(op, "dx", dx);
  check_ndim(op, "dx", dx, 4);
  MOE_CHECK(dx.dim(3) % 2 == 0, "%s: head dim must be even, got %lld", op, (long long)dx.dim(3));
  MOE_CHECK(past >= 0, "%s: negative past %lld", op, (long long)past);
  MOE_TRAIN_DISPATCH(dx.device(), op, rope_backward(dx, past, theta));
}

namespace {
void check_attention_train(const char* op, const Tensor& q, const Tensor& k, const Tensor& v) {
  check_f32(op, "q", q);
  check_f32(op, "k", k);
  check_f32(op, "v", v);
  check_ndim(op, "q", q, 4);
  check_ndim(op, "k", k, 4);
  check_shape(op, "v", v, k.shape());
  MOE_CHECK(k.dim(0) == q.dim(0) && k.dim(1) == q.dim(1) && k.dim(3) == q.dim(3), "%s: q %s vs k %s", op,
            q.shape_str().c_str(), k.shape_str().c_str());
  MOE_CHECK(k.dim(2) > 0 && q.dim(2) % k.dim(2) == 0, "%s: %lld heads not a multiple of %lld kv heads", op,
            (long long)q.dim(2), (long long)k.dim(2));
}
}  // namespace

void attention_forward_train(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                             const AttnVariant& av) {
  const char* op = "attention_forward_train";
  check_attention_train(op, q, k, v);
  check_f32(op, "out", out);
  check_shape(op, "out", out, q.shape());
  check_f32(op, "lse", lse);
  check_shape(op, "lse", lse, {q.dim(0), q.dim(2), q.dim(1)});
  check_device(op, out.device(), {&lse, &q, &k, &v});
  check_attn_variant(op, av, q.dim(2), out.device());
  MOE_TRAIN_DISPATCH(out.device(), op, attention_forward_train(out, lse, q, k, v, av));
}

void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& out, const Tensor& lse, const AttnVariant& av,
                        Tensor* dsinks) {
  const char* op = "attention_backward";
  check_attention_train(op, q, k, v);
  check_f32(op, "dq", dq);
  check_f32(op, "dk", dk);
  check_f32(op, "dv", dv);
  check_f32(op, "dout", dout);
  check_f32(op, "out", out);
  check_shape(op, "dq", dq, q.shape());
  check_shape(op, "dk", dk, k.shape());
  check_shape(op, "dv", dv, v.shape());
  check_shape(op, "dout", dout, q.shape());
  check_shape(op, "out", out, q.shape());
  check_f32(op, "lse", lse);
  check_shape(op, "lse", lse, {q.dim(0), q.dim(2), q.dim(1)});
  check_device(op, dq.device(), {&dk, &dv, &dout, &q, &k, &v, &out, &lse});
  check_attn_variant(op, av, q.dim(2), dq.device());
  Tensor none;
  if (!dsinks || !av.sinks.defined()) dsinks = &none;  // no sinks: nothing to accumulate
  if (dsinks->defined()) {
    check_f32(op, "dsinks", *dsinks);
    check_shape(op, "dsinks", *dsinks, {q.dim(2)});
  }
  MOE_TRAIN_DISPATCH(dq.device(), op, attention_backward(dq, dk, dv, dout, q, k, v, out, lse, av, dsinks));
}

void router_topk_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& logits, const Tensor& topk_idx,
                          bool renorm) {
  const char* op = "router_topk_backward";
  check_f32(op, "logits", logits);
  check_ndim(op, "logits", logits, 2);
  check_f32(op, "dlogits", dlogits);
  check_shape(op, "dlogits", dlogits, logits.shape());
  check_i32(op, "topk_idx", topk_idx);
  check_ndim(op, "topk_idx", topk_idx, 2);
  MOE_CHECK(topk_idx.dim(0) == logits.dim(0) && topk_idx.dim(1) >= 1 && topk_idx.dim(1) <= logits.dim(1),
            "%s: topk_idx %s vs logits %s", op, topk_idx.shape_str().c_str(), logits.shape_str().c_str());
  check_f32(op, "dtopk_w", dtopk_w);
  check_shape(op, "dtopk_w", dtopk_w, topk_idx.shape());
  check_device(op, dlogits.device(), {&dtopk_w, &logits, &topk_idx});
  MOE_TRAIN_DISPATCH(dlogits.device(), op, router_topk_backward(dlogits, dtopk_w, logits, topk_idx, renorm));
}

void router_stats(Tensor& prob_sum, Tensor& count, Tensor& z_sum, const Tensor& logits, const Tensor& topk_idx) {
  const char* op = "router_stats";
  check_f32(op, "logits", logits);
  check_ndim(op, "logits", logits, 2);
  const int64_t e = logits.dim(1);
  check_i32(op, "topk_idx", topk_idx);
  check_ndim(op, "topk_idx", topk_idx, 2);
  MOE_CHECK(topk_idx.dim(0) == logits.dim(0), "%s: topk_idx %s vs logits %s", op, topk_idx.shape_str().c_str(),
            logits.shape_str().c_str());
  check_f32(op, "prob_sum", prob_sum);
  check_shape(op, "prob_sum", prob_sum, {e});
  check_f32(op, "count", count);
  check_shape(op, "count", count, {e});
  check_f32(op, "z_sum", z_sum);
  check_shape(op, "z_sum", z_sum, {1});
  check_device(op, logits.device(), {&prob_sum, &count, &z_sum, &topk_idx});
  MOE_TRAIN_DISPATCH(logits.device(), op, router_stats(prob_sum, count, z_sum, logits, topk_idx));
}

void router_balance_backward(Tensor& dlogits, const Tensor& logits, const Tensor& g, float aux_scale,
                             float z_scale) {
  const char* op = "router_balance_backward";
  check_f32(op, "logits", logits);
  check_ndim(op, "logits", logits, 2);
  check_f32(op, "dlogits", dlogits);
  check_shape(op, "dlogits", dlogits, logits.shape());
  if (g.defined()) {
    check_f32(op, "g", g);
    check_shape(op, "g", g, {logits.dim(1)});
  }
  check_device(op, dlogits.device(), {&logits, &g});
  MOE_TRAIN_DISPATCH(dlogits.device(), op, router_balance_backward(dlogits, logits, g, aux_scale, z_scale));
}

void moe_capacity_drop(Tensor& offsets, Tensor& perm, Tensor& inv, int64_t capacity) {
  const char* op = "moe_capacity_drop";
  check_i32(op, "offsets", offsets);
  check_i32(op, "perm", perm);
  check_i32(op, "inv", inv);
  check_ndim(op, "offsets", offsets, 1);
  MOE_CHECK(offsets.numel() >= 2, "%s: offsets %s needs E+1 >= 2 entries", op, offsets.shape_str().c_str());
  check_shape(op, "inv", inv, perm.shape());
  check_ndim(op, "perm", perm, 1);
  MOE_CHECK(capacity >= 0, "%s: capacity %lld < 0", op, (long long)capacity);
  check_device(op, offsets.device(), {&perm, &inv});
  MOE_TRAIN_DISPATCH(offsets.device(), op, moe_capacity_drop(offsets, perm, inv, capacity));
}

void permute_weights_backward(Tensor& dtopk_w, const Tensor& drow_scale, const Tensor& perm) {
  const char* op = "permute_weights_backward";
  check_f32(op, "dtopk_w", dtopk_w);
  check_f32(op, "drow_scale", drow_scale);
  check_i32(op, "perm", perm);
  check_shape(op, "drow_scale", drow_scale, {perm.numel()});
  MOE_CHECK(dtopk_w.numel() == perm.numel(), "%s: dtopk_w %s vs perm %s", op, dtopk_w.shape_str().c_str(),
            perm.shape_str().c_str());
  check_device(op, dtopk_w.device(), {&drow_scale, &perm});
  MOE_TRAIN_DISPATCH(dtopk_w.device(), op, permute_weights_backward(dtopk_w, drow_scale, perm));
}

namespace {
// Shapes shared by the expert ops: returns {E, F, D}.
std::array<int64_t, 3> check_experts(const char* op, const Tensor& xp, const Tensor& offsets, const Tensor& w1,
                                     const Tensor& w3, const Tensor& w2, const Tensor& row_scale) {
  check_ndim(op, "w1", w1, 3);
  const int64_t e = w1.dim(0), f = w1.dim(1), d = w1.dim(2);
  check_gemm_weight(op, "w1", w1);
  check_shape(op, "w3", w3, {e, f, d});
  check_shape(op, "w2", w2, {e, d, f});
  MOE_CHECK(w1.dtype() == w3.dtype() && w1.dtype() == w2.dtype(), "%s: expert weight dtypes differ", op);
  check_f32(op, "xp", xp);
  check_ndim(op, "xp", xp, 2);
  check_shape(op, "xp", xp, {xp.dim(0), d});
  check_i32(op, "offsets", offsets);
  check_shape(op, "offsets", offsets, {e + 1});
  if (row_scale.defined()) {
    check_f32(op, "row_scale", row_scale);
    check_shape(op, "row_scale", row_scale, {xp.dim(0)});
  }
  return {e, f, d};
}
}  // namespace

namespace {
// One adapter (or its gradient) of a projection [M,Kd]: a [r,Kd], b [M,r] f32; stacked per
// expert with n_expert > 0: a [E,r,Kd], b [E,M,r]. Returns r.
int64_t check_lora(const char* op, const char* what, const Lora& l, int64_t m, int64_t kd, int64_t n_expert) {
  MOE_CHECK(l.a.defined() && l.b.defined(), "%s: LoRA %s needs both a and b", op, what);
  check_f32(op, what, l.a);
  check_f32(op, what, l.b);
  const int64_t r = l.a.dim(n_expert > 0 ? 1 : 0);
  MOE_CHECK(r > 0, "%s: LoRA %s has rank 0", op, what);
  MOE_CHECK(l.dropout >= 0 && l.dropout < 1, "%s: LoRA %s dropout %g is not in [0, 1)", op, what, double(l.dropout));
  if (n_expert > 0) {
    check_shape(op, what, l.a, {n_expert, r, kd});
    check_shape(op, what, l.b, {n_expert, m, r});
  } else {
    check_shape(op, what, l.a, {r, kd});
    check_shape(op, what, l.b, {m, r});
  }
  return r;
}

// The experts' adapters and (optionally) their gradients: w1/w3 [F,D], w2 [D,F].
void check_expert_lora(const char* op, const ExpertLora& l, const ExpertLora* dl, int64_t e, int64_t f, int64_t d) {
  const std::tuple<const char*, const Lora*, const Lora*, int64_t, int64_t> parts[] = {
      {"lora.w1", &l.w1, dl ? &dl->w1 : nullptr, f, d},
      {"lora.w3", &l.w3, dl ? &dl->w3 : nullptr, f, d},
      {"lora.w2", &l.w2, dl ? &dl->w2 : nullptr, d, f}};
  for (auto [name, p, g, m, kd] : parts) {
    if (!p->on()) continue;
    const int64_t r = check_lora(op, name, *p, m, kd, e);
    if (g) {
      check_grad(op, name, g->a, {e, r, kd});
      check_grad(op, name, g->b, {e, m, r});
    }
  }
}
// A dense adapter on columns [col0, col0+M) of a 2-D f32 `wide` (out, or dy) for rows x [N,Kd].
// Returns r.
int64_t check_lora_columns(const char* op, const char* wide_name, const Tensor& wide, int64_t col0, const Tensor& x,
                           const Lora& l) {
  check_f32(op, wide_name, wide);
  check_f32(op, "x", x);
  check_ndim(op, wide_name, wide, 2);
  check_ndim(op, "x", x, 2);
  MOE_CHECK(l.b.defined() && l.b.ndim() == 2, "%s: b must be [M,r]", op);
  const int64_t m = l.b.dim(0);
  const int64_t r = check_lora(op, "lora", l, m, x.dim(1), 0);
  MOE_CHECK(wide.dim(0) == x.dim(0) && col0 >= 0 && col0 + m <= wide.dim(1),
            "%s: %s %s has no columns [%lld,%lld) for x %s", op, wide_name, wide.shape_str().c_str(),
            (long long)col0, (long long)(col0 + m), x.shape_str().c_str());
  return r;
}
}  // namespace

void lora_forward(Tensor& out, int64_t col0, const Tensor& x, const Lora& l) {
  const char* op = "lora_forward";
  check_lora_columns(op, "out", out, col0, x, l);
  check_device(op, out.device(), {&x, &l.a, &l.b});
  MOE_TRAIN_DISPATCH(out.device(), op, lora_forward(out, col0, x, l));
}

void lora_backward(Tensor& dx, Tensor& da, Tensor& db, const Tensor& dy, int64_t col0, const Tensor& x,
                   const Lora& l) {
  const char* op = "lora_backward";
  const int64_t r = check_lora_columns(op, "dy", dy, col0, x, l);
  const int64_t m = l.b.dim(0), kd = x.dim(1);
  check_grad(op, "dx", dx, x.shape());
  check_grad(op, "da", da, {r, kd});
  check_grad(op, "db", db, {m, r});
  check_device(op, dy.device(), {&dx, &da, &db, &x, &l.a, &l.b});
  MOE_TRAIN_DISPATCH(dy.device(), op, lora_backward(dx, da, db, dy, col0, x, l));
}

void expert_ffn_forward_train(Tensor& yp, Tensor& h1, Tensor& h3, const Tensor& xp, const Tensor& offsets,
                              const Tensor& w1, const Tensor& w3, const Tensor& w2, const Tensor& row_scale,
                              const ExpertLora& lora, const ExpertGlu& glu, const ExpertBias& bias) {
  const char* op = "expert_ffn_forward_train";
  auto [e, f, d] = check_experts(op, xp, offsets, w1, w3, w2, row_scale);
  check_expert_variant(op, glu, bias, e, f, d, yp.device());
  check_expert_lora(op, lora, nullptr, e, f, d);
  check_f32(op, "yp", yp);
  check_shape(op, "yp", yp, xp.shape());
  check_saved_h(op, h1, h3, {xp.dim(0), f});
  check_device(op, yp.device(), {&h1, &h3, &xp, &offsets, &w1, &w3, &w2, &row_scale});
  MOE_TRAIN_DISPATCH(yp.device(), op,
                     expert_ffn_forward_train(yp, h1, h3, xp, offsets, w1, w3, w2, row_scale, lora, glu, bias));
}

void expert_ffn_backward(Tensor& dxp, Tensor& dw1, Tensor& dw3, Tensor& dw2, Tensor& drow_scale, const Tensor& dyp,
                         const Tensor& xp, const Tensor& h1, const Tensor& h3, const Tensor& offsets,
                         const Tensor& w1, const Tensor& w3, const Tensor& w2, const Tensor& row_scale,
                         const ExpertLora& lora, ExpertLora* dlora, const ExpertGlu& glu, const ExpertBias& bias,
                         ExpertBias* dbias, bool assign_dw) {
  const char* op = "expert_ffn_backward";
  auto [e, f, d] = check_experts(op, xp, offsets, w1, w3, w2, row_scale);
  check_expert_variant(op, glu, bias, e, f, d, dxp.device());
  ExpertBias no_dbias;
  if (!dbias) dbias = &no_dbias;
  check_grad(op, "db1", dbias->b1, {e, f});
  check_grad(op, "db3", dbias->b3, {e, f});
  check_grad(op, "db2", dbias->b2, {e, d});
  check_expert_lora(op, lora, dlora, e, f, d);
  ExpertLora none;
  if (!dlora) dlora = &none;
  const int64_t p = xp.dim(0);
  check_f32(op, "dxp", dxp);
  check_shape(op, "dxp", dxp, xp.shape());
  check_f32(op, "dyp", dyp);
  check_shape(op, "dyp", dyp, xp.shape());
  check_saved_h(op, h1, h3, {p, f});
  check_grad(op, "dw1", dw1, {e, f, d});
  check_grad(op, "dw3", dw3, {e, f, d});
  check_grad(op, "dw2", dw2, {e, d, f});
  MOE_CHECK(!(dw1.defined() || dw3.defined() || dw2.defined()) || !dtype_is_block(w1.dtype()),
            "%s: the experts are %s, frozen (quantized) weights: they take no gradient", op, dtype_name(w1.dtype()));
  if (drow_scale.defined()) {
    MOE_CHECK(row_scale.defined(), "%s: drow_scale given without row_scale", op);
    check_f32(op, "drow_scale", drow_scale);
    check_shape(op, "drow_scale", drow_scale, {p});
  }
  check_device(op, dxp.device(), {&dw1, &dw3, &dw2, &drow_scale, &dyp, &xp, &h1, &h3, &offsets, &w1, &w3, &w2,
                                  &row_scale});
  MOE_TRAIN_DISPATCH(dxp.device(), op,
                     expert_ffn_backward(dxp, dw1, dw3, dw2, drow_scale, dyp, xp, h1, h3, offsets, w1, w3, w2,
                                         row_scale, lora, dlora, glu, bias, dbias, assign_dw));
}

void swiglu_backward(Tensor& dh1, Tensor& dh3, const Tensor& dout, const Tensor& h1, const Tensor& h3) {
  const char* op = "swiglu_backward";
  const std::pair<const char*, const Tensor*> args[] = {{"dh1", &dh1}, {"dh3", &dh3}, {"dout", &dout}, {"h1", &h1}, {"h3", &h3}};
  for (auto [name, t] : args) {
    check_f32(op, name, *t);
    check_shape(op, name, *t, h1.shape());
  }
  check_device(op, dh1.device(), {&dh3, &dout, &h1, &h3});
  MOE_TRAIN_DISPATCH(dh1.device(), op, swiglu_backward(dh1, dh3, dout, h1, h3));
}

void sigmoid_gate_backward(Tensor& ds, Tensor& dgate, const Tensor& dy, const Tensor& s, const Tensor& gate) {
  const char* op = "sigmoid_gate_backward";
  check_f32(op, "dy", dy);
  check_ndim(op, "dy", dy, 2);
  check_f32(op, "s", s);
  check_shape(op, "s", s, dy.shape());
  check_f32(op, "ds", ds);
  check_shape(op, "ds", ds, dy.shape());
  check_f32(op, "gate", gate);
  check_shape(op, "gate", gate, {dy.dim(0), 1});
  check_f32(op, "dgate", dgate);
  check_shape(op, "dgate", dgate, {dy.dim(0), 1});
  check_device(op, ds.device(), {&dgate, &dy, &s, &gate});
  MOE_TRAIN_DISPATCH(ds.device(), op, sigmoid_gate_backward(ds, dgate, dy, s, gate));
}

namespace {
// The cross-entropy ops' shared arguments: logits [N,V] f32, targets [N] i32, and their outputs'
// shapes (loss [N], dlogits [N,V]; undefined: not an output of this op).
void check_ce(const char* op, const Tensor& logits, const Tensor& targets, const Tensor& loss, const Tensor& dlogits) {
  check_f32(op, "logits", logits);
  check_ndim(op, "logits", logits, 2);
  check_i32(op, "targets", targets);
  check_shape(op, "targets", targets, {logits.dim(0)});
  if (loss.defined()) {
    check_f32(op, "loss", loss);
    check_shape(op, "loss", loss, {logits.dim(0)});
  }
  if (dlogits.defined()) {
    check_f32(op, "dlogits", dlogits);
    check_shape(op, "dlogits", dlogits, logits.shape());
  }
}
}  // namespace

void cross_entropy_forward(Tensor& loss, const Tensor& logits, const Tensor& targets) {
  const char* op = "cross_entropy_forward";
  check_ce(op, logits, targets, loss, Tensor());
  check_device(op, loss.device(), {&logits, &targets});
  MOE_TRAIN_DISPATCH(loss.device(), op, cross_entropy_forward(loss, logits, targets));
}

void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& targets, float scale) {
  const char* op = "cross_entropy_backward";
  check_ce(op, logits, targets, Tensor(), dlogits);
  check_device(op, dlogits.device(), {&logits, &targets});
  MOE_TRAIN_DISPATCH(dlogits.device(), op, cross_entropy_backward(dlogits, logits, targets, scale));
}

void cross_entropy_forward_backward(Tensor& loss, Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                    float scale) {
  const char* op = "cross_entropy_forward_backward";
  check_ce(op, logits, targets, loss, dlogits);
  check_device(op, dlogits.device(), {&loss, &logits, &targets});
  MOE_TRAIN_DISPATCH(dlogits.device(), op, cross_entropy_forward_backward(loss, dlogits, logits, targets, scale));
}

// ---- paged KV cache (serving) ----

namespace {

// Shared checks of the paged ops: pages [N,P,Hkv,Dh] on the host, tables [B,M] and pos [B] i32
// host tensors, and every block a row's positions [0, pos[b]+s_n) need is a valid index.
void check_paged(const char* op, const Tensor& k_pages, const Tensor& v_pages, const Tensor& tables,
                 const Tensor& pos, int64_t b_n, int64_t s_n) {
  check_ndim(op, "k_pages", k_pages, 4);
  MOE_CHECK(k_pages.shape() == v_pages.shape(), "%s: k/v page shapes differ", op);
  MOE_CHECK(k_pages.device() == Device::CPU, "%s: the paged KV cache is CPU only (got %s)", op,
            device_name(k_pages.device()));
  check_device(op, Device::CPU, {&v_pages, &tables, &pos});
  check_i32(op, "tables", tables);
  check_i32(op, "pos", pos);
  check_ndim(op, "tables", tables, 2);
  check_shape(op, "pos", pos, {b_n});
  MOE_CHECK(tables.dim(0) == b_n, "%s: %lld block tables for %lld rows", op, (long long)tables.dim(0), (long long)b_n);
  const int64_t n_blocks = k_pages.dim(0), block = k_pages.dim(1), m = tables.dim(1);
  const int32_t* tb = tables.data<int32_t>();
  for (int64_t b = 0; b < b_n; ++b) {
    const int64_t p = pos.data<int32_t>()[b];
    MOE_CHECK(p >= 0, "%s: row %lld at negative position %lld", op, (long long)b, (long long)p);
    const int64_t need = (p + s_n + block - 1) / block;
    MOE_CHECK(need <= m, "%s: row %lld needs %lld blocks, its table holds %lld", op, (long long)b, (long long)need,
              (long long)m);
    for (int64_t i = 0; i < need; ++i)
      MOE_CHECK(tb[b * m + i] >= 0 && tb[b * m + i] < n_blocks, "%s: row %lld block %lld is %d, not in [0,%lld)", op,
                (long long)b, (long long)i, tb[b * m + i], (long long)n_blocks);
  }
}

#define MOE_PAGED_DISPATCH(call) \
  do {                           \
    if (g_reference)             \
      ref::call;                 \
    else                         \
      cpu::call;                 \
  } while (0)

}  // namespace

void kv_append_paged(Tensor& k_pages, Tensor& v_pages, const Tensor& k, const Tensor& v, const Tensor& tables,
                     const Tensor& pos) {
  const char* op = "kv_append_paged";
  check_ndim(op, "k", k, 4);
  MOE_CHECK(k.shape() == v.shape(), "%s: k/v shapes differ", op);
  check_paged(op, k_pages, v_pages, tables, pos, k.dim(0), k.dim(1));
  MOE_CHECK(k.dim(2) == k_pages.dim(2) && k.dim(3) == k_pages.dim(3), "%s: k %s does not fit pages %s", op,
            k.shape_str().c_str(), k_pages.shape_str().c_str());
  MOE_CHECK(k.dtype() == k_pages.dtype() && v.dtype() == v_pages.dtype(), "%s: dtype mismatch", op);
  check_device(op, Device::CPU, {&k, &v});
  MOE_PAGED_DISPATCH(kv_append_paged(k_pages, v_pages, k, v, tables, pos));
}

void attention_forward_paged(Tensor& out, const Tensor& q, const Tensor& k_pages, const Tensor& v_pages,
                             const Tensor& tables, const Tensor& pos, const AttnVariant& av) {
  const char* op = "attention_forward_paged";
  check_ndim(op, "q", q, 4);
  check_f32(op, "q", q);
  check_f32(op, "k_pages", k_pages);
  check_paged(op, k_pages, v_pages, tables, pos, q.dim(0), q.dim(1));
  MOE_CHECK(out.shape() == q.shape(), "%s: out %s != q %s", op, out.shape_str().c_str(), q.shape_str().c_str());
  MOE_CHECK(q.dim(3) == k_pages.dim(3), "%s: q %s vs pages %s", op, q.shape_str().c_str(),
            k_pages.shape_str().c_str());
  MOE_CHECK(q.dim(2) % k_pages.dim(2) == 0, "%s: %lld heads not a multiple of %lld kv heads", op,
            (long long)q.dim(2), (long long)k_pages.dim(2));
  check_device(op, Device::CPU, {&out, &q});
  check_attn_variant(op, av, q.dim(2), Device::CPU);
  MOE_PAGED_DISPATCH(attention_forward_paged(out, q, k_pages, v_pages, tables, pos, av));
}


void rope_forward(Tensor& x, int64_t past, const RopeTable& rt) {
  if (rt.plain()) return rope_forward(x, past, rt.theta);
  const char* op = "rope_forward";
  check_float(op, "x", x);
  check_ndim(op, "x", x, 4);
  MOE_CHECK(x.dim(3) % 2 == 0 && (rt.inv_freq.empty() || int64_t(rt.inv_freq.size()) * 2 == x.dim(3)),
            "%s: head dim %lld does not fit a table of %zu frequencies", op, (long long)x.dim(3), rt.inv_freq.size());
  MOE_CHECK(past >= 0, "%s: negative past %lld", op, (long long)past);
  MOE_VARIANT_DISPATCH(x.device(), op, rope_forward(x, past, rt));
}

void rope_backward(Tensor& dx, int64_t past, const RopeTable& rt) {
  if (rt.plain()) return rope_backward(dx, past, rt.theta);
  const char* op = "rope_backward";
  check_f32(op, "dx", dx);
  check_ndim(op, "dx", dx, 4);
  MOE_CHECK(dx.dim(3) % 2 == 0 && (rt.inv_freq.empty() || int64_t(rt.inv_freq.size()) * 2 == dx.dim(3)),
            "%s: head dim %lld does not fit a table of %zu frequencies",
            op, (long long)dx.dim(3), rt.inv_freq.size());
  MOE_CHECK(past >= 0, "%s: negative past %lld", op, (long long)past);
  MOE_VARIANT_DISPATCH(dx.device(), op, rope_backward(dx, past, rt));
}

void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past,
                       const AttnVariant& av) {
  if (av.plain()) return attention_forward(out, q, k_cache, v_cache, past);
  const char* op = "attention_forward";
  check_attention_args(op, out, q, k_cache, v_cache, past);
  check_attn_variant(op, av, q.dim(2), out.device());
  check_device(op, out.device(), {&q, &k_cache, &v_cache});
  MOE_VARIANT_DISPATCH(out.device(), op, attention_forward(out, q, k_cache, v_cache, past, av));
}

void expert_ffn_forward(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1, const Tensor& w3,
                        const Tensor& w2, const Tensor& row_scale, const ExpertGlu& glu, const ExpertBias& bias) {
  if (glu.plain() && !bias.any()) return expert_ffn_forward(yp, xp, offsets, w1, w3, w2, row_scale);
  const char* op = "expert_ffn_forward";
  auto [e, f, d] = check_expert_ffn_infer(op, yp, xp, offsets, w1, w3, w2, row_scale);
  check_expert_variant(op, glu, bias, e, f, d, yp.device());
  MOE_VARIANT_DISPATCH(yp.device(), op, expert_ffn_forward(yp, xp, offsets, w1, w3, w2, row_scale, glu, bias));
}

// The shapes router_topk_forward / _backward take: logits [T,E] f32, idx/w [T,K]; the variant's
// groups must split E evenly and keep at least K experts.
static void check_router_variant(const char* op, const RouterVariant& rv, int64_t e_n, int64_t k) {
  MOE_CHECK(rv.n_group >= 1 && e_n % rv.n_group == 0, "%s: %lld experts do not split into %lld groups", op,
            (long long)e_n, (long long)rv.n_group);
  MOE_CHECK(rv.topk_group >= 1 && rv.topk_group <= rv.n_group && rv.topk_group * (e_n / rv.n_group) >= k,
            "%s: keeping %lld of %lld groups of %lld experts leaves fewer than k=%lld", op, (long long)rv.topk_group,
            (long long)rv.n_group, (long long)(e_n / rv.n_group), (long long)k);
  MOE_CHECK(!rv.group_top2 || e_n / rv.n_group >= 2, "%s: a top-2 group score needs groups of 2 or more experts", op);
  MOE_CHECK(std::isfinite(rv.scale) && rv.renorm_eps >= 0, "%s: scale %g / renorm_eps %g", op, rv.scale,
            rv.renorm_eps);
}

void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, const RouterVariant& rv,
                         const Tensor& select_bias) {
  if (rv.plain()) return router_topk_forward(topk_idx, topk_w, logits, rv.renorm, select_bias);
  const char* op = "router_topk_forward";
  check_router_args(op, topk_idx, topk_w, logits);
  check_router_variant(op, rv, logits.dim(1), topk_idx.dim(1));
  if (select_bias.defined()) {
    check_dtype(op, "select_bias", select_bias, DType::F32);
    check_shape(op, "select_bias", select_bias, {logits.dim(1)});
  }
  check_device(op, logits.device(), {&topk_idx, &topk_w, &select_bias});
  MOE_VARIANT_DISPATCH(logits.device(), op, router_topk_forward(topk_idx, topk_w, logits, rv, select_bias));
}

void router_topk_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& logits, const Tensor& topk_idx,
                          const RouterVariant& rv) {
  if (rv.plain()) return router_topk_backward(dlogits, dtopk_w, logits, topk_idx, rv.renorm);
  const char* op = "router_topk_backward";
  check_f32(op, "dlogits", dlogits);
  check_f32(op, "dtopk_w", dtopk_w);
  check_f32(op, "logits", logits);
  check_i32(op, "topk_idx", topk_idx);
  check_ndim(op, "logits", logits, 2);
  check_ndim(op, "topk_idx", topk_idx, 2);
  check_shape(op, "dlogits", dlogits, logits.shape());
  check_shape(op, "dtopk_w", dtopk_w, topk_idx.shape());
  MOE_CHECK(topk_idx.dim(0) == logits.dim(0), "%s: topk_idx %s vs logits %s", op, topk_idx.shape_str().c_str(),
            logits.shape_str().c_str());
  check_router_variant(op, rv, logits.dim(1), topk_idx.dim(1));
  MOE_TRAIN_DISPATCH(dlogits.device(), op, router_topk_backward(dlogits, dtopk_w, logits, topk_idx, rv));
}

// kv_b [H*(Dn+Dv), R] f32 and the head rows of an absorbed product.
static void check_mla(const char* op, const Tensor& kv_b, int64_t h_n, int64_t dn, int64_t dv) {
  check_f32(op, "kv_b", kv_b);
  check_ndim(op, "kv_b", kv_b, 2);
  MOE_CHECK(dn >= 0 && dv > 0 && kv_b.dim(0) == h_n * (dn + dv), "%s: kv_b %s does not hold %lld heads of %lld + %lld rows",
            op, kv_b.shape_str().c_str(), (long long)h_n, (long long)dn, (long long)dv);
}

void mla_absorb_q(Tensor& qc, const Tensor& q, const Tensor& kv_b, int64_t dn, int64_t dv) {
  const char* op = "mla_absorb_q";
  check_f32(op, "qc", qc);
  check_f32(op, "q", q);
  check_ndim(op, "qc", qc, 3);
  check_ndim(op, "q", q, 3);
  check_mla(op, kv_b, q.dim(1), dn, dv);
  MOE_CHECK(qc.dim(0) == q.dim(0) && qc.dim(1) == q.dim(1) && qc.dim(2) >= kv_b.dim(1) && q.dim(2) >= dn,
            "%s: qc %s / q %s vs kv_b %s (Dn %lld)", op, qc.shape_str().c_str(), q.shape_str().c_str(),
            kv_b.shape_str().c_str(), (long long)dn);
  check_device(op, qc.device(), {&q, &kv_b});
  MOE_VARIANT_DISPATCH(qc.device(), op, mla_absorb_q(qc, q, kv_b, dn, dv));
}

void mla_absorb_out(Tensor& o, const Tensor& oc, const Tensor& kv_b, int64_t dn, int64_t dv) {
  const char* op = "mla_absorb_out";
  check_f32(op, "o", o);
  check_f32(op, "oc", oc);
  check_ndim(op, "o", o, 3);
  check_ndim(op, "oc", oc, 3);
  check_mla(op, kv_b, oc.dim(1), dn, dv);
  MOE_CHECK(o.dim(0) == oc.dim(0) && o.dim(1) == oc.dim(1) && o.dim(2) == dv && oc.dim(2) >= kv_b.dim(1),
            "%s: o %s / oc %s vs kv_b %s (Dv %lld)", op, o.shape_str().c_str(), oc.shape_str().c_str(),
            kv_b.shape_str().c_str(), (long long)dv);
  check_device(op, o.device(), {&oc, &kv_b});
  MOE_VARIANT_DISPATCH(o.device(), op, mla_absorb_out(o, oc, kv_b, dn, dv));
}

void synchronize(Device dev) {
  if (dev == Device::CUDA) cuda::synchronize();
}

}  // namespace moe
