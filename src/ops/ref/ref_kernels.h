// ref_kernels.h — the naive reference maths of every op in ops.h, in double precision on plain
// arrays. Internal to src/ops (and the op test runner, which evaluates these forwards in f64
// for its finite-difference checks).
//
// Each function is a direct transcription of its op's comment in ops.h: plain loops, no BLAS,
// no threads, no vector intrinsics, every value in double. ref_backend.cpp wraps them with the
// Tensor signatures of backend.h (moe::ref::<op>): inputs are widened to double exactly (f32,
// bf16, f16), outputs rounded once to their tensor's dtype.
//
// Dimension letters as in ops.h (T tokens, D width, E experts, K top-k, F expert ffn width,
// P = T*K permuted rows, V vocab, B batch, S sequence, H heads, Hkv kv heads, Dh head dim,
// C cache capacity). Arrays are dense row-major. Gradient convention as in ops.h: parameter
// gradients accumulate (+=), activation gradients are assigned (=) unless `accumulate`.
// A pointer documented as "nullable" may be nullptr (optional input, or gradient not wanted).
#pragma once
#include <cstdint>

namespace moe {
namespace ref {
namespace f64 {

// Variants (ops/variants.h) in f64: sinks [H] (nullable) and a sliding window (0: none);
// the clamped gated activation (limit 0: plain SwiGLU); expert biases b1, b3 [E,F], b2 [E,D]
// and their gradients (+=), each nullable.
struct AttnF64 {
  const double* sinks = nullptr;
  int64_t window = 0;
  double scale = 0;  // 0: 1/sqrt(Dh)
};
// RouterVariant (variants.h) in f64.
struct RouterF64 {
  bool sigmoid = false, renorm = false;
  double renorm_eps = 0;
  int64_t n_group = 1, topk_group = 1;
  bool group_top2 = false;
  double scale = 1;
};
struct GluF64 {
  double alpha = 1, limit = 0;
};
struct BiasF64 {
  const double *b1 = nullptr, *b3 = nullptr, *b2 = nullptr;
  double *db1 = nullptr, *db3 = nullptr, *db2 = nullptr;
};

// ---- forward ----

// out [T,D] = table [V,D] rows ids [T] (each id checked to be in [0,V)).
void embedding_forward(double* out, const int32_t* ids, const double* table, int64_t t_n, int64_t v, int64_t d);

// out [N,D] = x * rstd[n] * w, rstd[n] = 1/sqrt(mean(x[n,:]^2) + eps); rstd [N] nullable.
// out may alias x.
void rmsnorm_forward(double* out, double* rstd, const double* x, const double* w, double eps, int64_t n,
                     int64_t d);

// out [N,M] = x [N,Kd] w [M,Kd]^T (+ bias [M], nullable).
void linear_forward(double* out, const double* x, const double* w, const double* bias, int64_t n, int64_t m,
                    int64_t kd);

// In place on x [B,S,H,Dh]: HF rotate_half rotary embedding at positions past + s.
void rope_forward(double* x, int64_t b_n, int64_t s_n, int64_t h_n, int64_t dh, int64_t past, double theta);
// The same with frequencies inv_freq [Dh/2] and cos, sin × factor; sign -1: its transpose.
// interleaved: frequency i rotates (x[2i], x[2i+1]) instead of (x[i], x[i+Dh/2]).
void rope_rotate_table(double* x, int64_t b_n, int64_t s_n, int64_t h_n, int64_t dh, int64_t past,
                       const double* inv_freq, double factor, double sign, bool interleaved = false);

// Router variant (variants.h RouterVariant): idx [T,K], w [T,K] from logits [T,E]; bias [E]
// nullable (selection only).
void router_topk_variant(int32_t* idx, double* w, const double* logits, const double* bias, int64_t t_n,
                         int64_t e_n, int64_t k, const RouterF64& rv);
// Its backward: dlogits [T,E] (assigned) from dw [T,K] at the same selection idx.
void router_topk_variant_backward(double* dlogits, const double* dw, const double* logits, const int32_t* idx,
                                  int64_t t_n, int64_t e_n, int64_t k, const RouterF64& rv);

// MLA's absorbed products with kv_b [H*(Dn+Dv), R] (ops.h mla_absorb_q / mla_absorb_out), over
// N = T*H head rows: qc [N,Rc] columns [0,R) = q [N,Dq] columns [0,Dn) times head h's k rows;
// o [N,Dv] = oc [N,Rc] columns [0,R) times head h's v rows transposed.
void mla_absorb_q(double* qc, const double* q, const double* kv_b, int64_t t_n, int64_t h_n, int64_t dq,
                  int64_t rc, int64_t dn, int64_t dv, int64_t r);
void mla_absorb_out(double* o, const double* oc, const double* kv_b, int64_t t_n, int64_t h_n, int64_t rc,
                    int64_t dn, int64_t dv, int64_t r);

// Causal GQA attention of q [B,S,H,Dh] over caches [B,C,Hkv,Dh] (keys 0..past+s).
void attention_forward(double* out, const double* q, const double* k_cache, const double* v_cache, int64_t b_n,
                       int64_t s_n, int64_t h_n, int64_t hkv, int64_t dh, int64_t cap, int64_t past,
                       const AttnF64& av = {});

// Training attention (no cache): q [B,S,H,Dh], k, v [B,S,Hkv,Dh]; lse [B,H,S] nullable.
void attention_forward_train(double* out, double* lse, const double* q, const double* k, const double* v,
                             int64_t b_n, int64_t s_n, int64_t h_n, int64_t hkv, int64_t dh, const AttnF64& av = {});

// Softmax over E, the K largest logits (ties: lower index), renormalised when `renorm`.
// idx [T,K], w [T,K], logits [T,E]; bias [E] nullable: select by probability + bias.
void router_topk_forward(int32_t* idx, double* w, const double* logits, const double* bias, int64_t t_n,
                         int64_t e_n, int64_t k, bool renorm);

// Keeps the first `capacity` assignments (in assignment order) of each expert of a dispatch
// (offsets [E+1], perm, inv [P] updated): kept rows first by expert, then the dropped ones.
void moe_capacity_drop(int32_t* offsets, int32_t* perm, int32_t* inv, int64_t p_n, int64_t e_n, int64_t capacity);

// Stable grouping of the P assignments idx [P] by expert (ids checked to be in [0,E)).
// offsets [E+1], perm [P], inv [P].
void moe_dispatch(int32_t* offsets, int32_t* perm, int32_t* inv, const int32_t* idx, int64_t p_n, int64_t e_n);

// xp [P,D] = x [T,D] rows perm[p] / K.
void gather_rows(double* xp, const double* x, const int32_t* perm, int64_t p_n, int64_t d, int64_t k);

// One projection's LoRA factors (a [r,in], b [out,r]; stacked per expert for the expert ops:
// a [E,r,in], b [E,out,r]) and, for backward, their gradients (da, db +=, nullable).
// a == nullptr: no adapter.
struct LoraF64 {
  const double* a = nullptr;
  const double* b = nullptr;
  double scale = 0;
  int64_t r = 0;
  double* da = nullptr;
  double* db = nullptr;
  // Dropout (core/lora.h): element (row0 + t, k) of the input kept by lora_keep(seed, ·, p).
  float dropout = 0;
  uint64_t seed = 0;
  int64_t row0 = 0;
};

// Grouped SwiGLU experts over the rows of each expert (offsets [E+1]); h1, h3 [P,F] nullable
// (saved pre-activations); row_scale [P] nullable (then 1). w1, w3 [E,F,D]; w2 [E,D,F].
// lora: the adapters of w1, w3, w2 (nullptr: none). h_bf16: the pre-activations are saved in
// bf16 — rounded (through f32, as the CPU kernel's f32 products are) before the GLU reads them.
void expert_ffn_forward(double* yp, double* h1, double* h3, const double* xp, const int32_t* offsets,
                        const double* w1, const double* w3, const double* w2, const double* row_scale, int64_t e_n,
                        int64_t f, int64_t d, const LoraF64* lora = nullptr, const GluF64& glu = {},
                        const BiasF64& bias = {}, bool h_bf16 = false);

// out[n, col0 + j] += scale · sum_q (x[n] · a[q]) b[j,q];  out rows of ldo, x [N,Kd], a [r,Kd], b [M,r].
void lora_forward(double* out, int64_t ldo, int64_t col0, const double* x, const LoraF64& l, int64_t n, int64_t m,
                  int64_t kd);
// dx [N,Kd] += scale · (dyₛ b) a;  l.da += scale · (dyₛ b)ᵀ x;  l.db += scale · dyₛᵀ (x aᵀ), with dyₛ the
// columns [col0, col0+M) of dy (rows of ldy). dx nullable.
void lora_backward(double* dx, const double* dy, int64_t ldy, int64_t col0, const double* x, const LoraF64& l,
                   int64_t n, int64_t m, int64_t kd);

// y [T,D] (+)= sum_j yp [P,D] rows inv[t*K+j].
void moe_combine(double* y, const double* yp, const int32_t* inv, int64_t t_n, int64_t d, int64_t k,
                 bool accumulate);

// row_scale [P] = topk_w.flat[perm[p]].
void permute_weights(double* row_scale, const double* topk_w, const int32_t* perm, int64_t p_n);

// out = silu(h1) * h3, n elements.
void swiglu_forward(double* out, const double* h1, const double* h3, int64_t n);

// y [T,D] += sigmoid(gate[t]) * s [T,D].
void sigmoid_gate_add(double* y, const double* s, const double* gate, int64_t t_n, int64_t d);

// y += x, n elements.
void add_inplace(double* y, const double* x, int64_t n);

// Router statistics: prob_sum [E], count [E], z_sum [1] (assigned). idx [T,K].
void router_stats(double* prob_sum, double* count, double* z_sum, const double* logits, const int32_t* idx,
                  int64_t t_n, int64_t e_n, int64_t k);

// loss [N] = logsumexp(logits[n]) - logits[n, targets[n]]; 0 where targets[n] == -100
// (other targets checked to be in [0,V)).
void cross_entropy_forward(double* loss, const double* logits, const int32_t* targets, int64_t n, int64_t v);

// ---- backward ----

// dtable [V,D] rows ids[t] += dout [T,D] rows, except ids equal to padding_idx (-1: none).
void embedding_backward(double* dtable, const double* dout, const int32_t* ids, int64_t padding_idx, int64_t t_n,
                        int64_t v, int64_t d);

// dx [N,D] (=, or += with accumulate); dw [D] += sum_n dy*x*rstd (nullable).
void rmsnorm_backward(double* dx, double* dw, const double* dy, const double* x, const double* w,
                      const double* rstd, bool accumulate, int64_t n, int64_t d);

// dx [N,Kd] (=, or +=) dy [N,M] w [M,Kd]; dw [M,Kd] += dy^T x; db [M] += colsum(dy). Each nullable.
void linear_backward(double* dx, double* dw, double* db, const double* dy, const double* x, const double* w,
                     bool accumulate, int64_t n, int64_t m, int64_t kd);

// In place on dx [B,S,H,Dh]: the inverse rotation (transpose of rope_forward's).
void rope_backward(double* dx, int64_t b_n, int64_t s_n, int64_t h_n, int64_t dh, int64_t past, double theta);

// dq [B,S,H,Dh], dk, dv [B,S,Hkv,Dh] assigned, from dout, q, k, v, out and lse of the forward.
void attention_backward(double* dq, double* dk, double* dv, const double* dout, const double* q, const double* k,
                        const double* v, const double* out, const double* lse, int64_t b_n, int64_t s_n,
                        int64_t h_n, int64_t hkv, int64_t dh, const AttnF64& av = {}, double* dsinks = nullptr);

// dlogits [T,E] assigned: gradient of the top-k weights (fixed selection idx) w.r.t. logits.
void router_topk_backward(double* dlogits, const double* dtopk_w, const double* logits, const int32_t* idx,
                          int64_t t_n, int64_t e_n, int64_t k, bool renorm);

// dlogits [T,E] += aux_scale * d(sum_e g[e] p[e]) + z_scale * d(lse^2); g [E] nullable.
void router_balance_backward(double* dlogits, const double* logits, const double* g, double aux_scale,
                             double z_scale, int64_t t_n, int64_t e_n);

// dtopk_w.flat[perm[p]] = drow_scale[p].
void permute_weights_backward(double* dtopk_w, const double* drow_scale, const int32_t* perm, int64_t p_n);

// Grouped SwiGLU expert backward (ops.h): dxp [P,D] assigned on expert rows; dw1, dw3 [E,F,D],
// dw2 [E,D,F] += (each nullable; experts without rows untouched); drow_scale [P] assigned
// (nullable); row_scale nullable (then 1).
void expert_ffn_backward(double* dxp, double* dw1, double* dw3, double* dw2, double* drow_scale, const double* dyp,
                         const double* xp, const double* h1, const double* h3, const int32_t* offsets,
                         const double* w1, const double* w3, const double* w2, const double* row_scale,
                         int64_t e_n, int64_t f, int64_t d, const LoraF64* lora = nullptr, const GluF64& glu = {},
                         const BiasF64& bias = {});

// dh1, dh3 assigned (n elements) for out = silu(h1) * h3.
void swiglu_backward(double* dh1, double* dh3, const double* dout, const double* h1, const double* h3, int64_t n);

// ds [T,D] = sigmoid(gate) * dy; dgate [T] = sigmoid'(gate) * sum_d dy*s (both assigned).
void sigmoid_gate_backward(double* ds, double* dgate, const double* dy, const double* s, const double* gate,
                           int64_t t_n, int64_t d);

// dlogits [N,V] = scale * (softmax(logits[n]) - onehot(targets[n])), 0 on ignored rows.
// dlogits may alias logits.
void cross_entropy_backward(double* dlogits, const double* logits, const int32_t* targets, double scale, int64_t n,
                            int64_t v);

}  // namespace f64
}  // namespace ref
}  // namespace moe
