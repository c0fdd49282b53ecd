// ops.h — every numeric op of the engine, declared once, dispatched by device.
//
// DESIGN.md invariant 2: one signature per op. The naive reference backend (ops/ref: plain
// loops, f64) backs every op; the optimised CPU kernels (ops/cpu) and the CUDA versions
// (ops/cuda, built with MOE_CUDA=ON) must match it in tests/test_ops_backend.cpp, which also
// checks every backward against finite differences.
// Each function validates shapes/dtypes/devices once here, then calls the backend of its
// output tensor; kernels assume valid input.
//
// Conventions.
// - Outputs first, then inputs, then parameters. Shapes use the fixed letters:
//   B batch, S sequence, T tokens (= B*S), D model width, F expert ffn width, E experts,
//   K experts per token (top-k), V vocab, H heads, Hkv kv heads, Dh head dim, C cache capacity,
//   P = T*K permuted (token, slot) rows.
// - "float" tensors are f32, or bf16 on CUDA; weights may be f32 or bf16 (also f16 on CPU).
//   Compute is in f32 with f32 accumulation. Index tensors are i32.
// - Quantized weights (block dtypes q8_0 q4_0 q4_k q5_k q6_k, core/dtype.h): accepted by
//   linear_forward (w) and expert_ffn_forward (w1/w3 one type, w2 that or another) on the CPU,
//   with f32 activations. Training ops take block-type weights (q8_0, and NF4, core/nf4.h) only
//   as a frozen QLoRA base on the CPU: the forward products use the block kernels (NF4 is
//   dequantized by row chunks), backward's input gradient dequantizes rows exactly, and asking
//   for such a weight's gradient is an error. CUDA refuses them.
//   The CPU kernels (ops/cpu/cpu_quant_gemm.h) round each activation row to int8 blocks and
//   use integer dot products, so they differ from the exact product with the dequantized
//   weights by that rounding; cpu::set_quant_exact(true) (`moe logits` without --fast) computes
//   the exact product instead (row chunks dequantized, f32 BLAS), as the reference backend (f64).
// - bf16 weights on a CPU with AMX or AVX512-BF16 (ops/cpu/cpu_gemm_onednn.h): products with more
//   rows than decode streams round x to bf16 and run in bf16 with f32 accumulation, as a bf16
//   autocast does; the exact path (set_quant_exact(true)) keeps x in f32 there too.
// - All tensors of one call live on one device.
// - Backward ops (the training section below): parameter gradients accumulate (+=), activation
//   gradients are assigned (=).
#pragma once
#include "core/lora.h"
#include "core/tensor.h"
#include "ops/linear_parts.h"
#include "ops/variants.h"

namespace moe {

// out[t,:] = table[ids[t],:].  out [T,D] float, ids [T] i32, table [V,D].
void embedding_forward(Tensor& out, const Tensor& ids, const Tensor& table);

// out[n,:] = x[n,:] / sqrt(mean(x[n,:]^2) + eps) * w.  out, x [N,D] (any leading dims), w [D].
// out may alias x.
void rmsnorm_forward(Tensor& out, const Tensor& x, const Tensor& w, float eps);

// out = x w^T (+ bias).  out [N,M], x [N,Kd], w [M,Kd], bias [M] or undefined.
void linear_forward(Tensor& out, const Tensor& x, const Tensor& w, const Tensor& bias);

// out = [x w_0ᵀ + b_0 | x w_1ᵀ + b_1 | ...]: linear_forward of each part into its columns, in order.
// out [N, Σ M_i], x [N,Kd], part i's w [M_i,Kd] and bias [M_i] or none. The weights may differ in
// dtype (q/k/v of a Q4_K_M file); on the CPU one token's quantized parts round x to int8 once and
// run in one parallel region (cpu_quant_gemm.h), with the values of the separate products.
void linear_forward_cat(Tensor& out, const Tensor& x, std::initializer_list<LinearPart> parts);

// Rotary embedding in place, HF rotate_half convention: for i < Dh/2,
//   (x_i, x_{i+Dh/2}) <- (x_i c - x_{i+Dh/2} s, x_{i+Dh/2} c + x_i s), angle = pos * theta^(-2i/Dh).
// x [B,S,H,Dh]; positions are past + s for s in [0,S).
void rope_forward(Tensor& x, int64_t past, float theta);

// Appends k, v [B,S,Hkv,Dh] into caches [B,C,Hkv,Dh] at rows [past, past+S).
void kv_append(Tensor& k_cache, Tensor& v_cache, const Tensor& k, const Tensor& v, int64_t past);

// Causal grouped-query attention over the cache.  out, q [B,S,H,Dh]; caches [B,C,Hkv,Dh] hold
// keys for positions [0, past+S). Query s (position past+s) attends keys 0..past+s.
// Scale 1/sqrt(Dh). H must be a multiple of Hkv.
void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache,
                       int64_t past);

// Paged KV cache (serving): k_pages, v_pages [N,P,Hkv,Dh] hold N blocks of P positions. Row b's
// position p lives in block tables[b, p / P] at offset p % P. tables [B,M] i32 and pos [B] i32
// are host tensors; pos[b] is the position of row b's first new token. CPU backends only.
// Appends k, v [B,S,Hkv,Dh] at positions [pos[b], pos[b]+S) of each row.
void kv_append_paged(Tensor& k_pages, Tensor& v_pages, const Tensor& k, const Tensor& v, const Tensor& tables,
                     const Tensor& pos);
// attention_forward over a paged cache: query s of row b (position pos[b]+s) attends that row's
// keys 0..pos[b]+s. out, q [B,S,H,Dh].
void attention_forward_paged(Tensor& out, const Tensor& q, const Tensor& k_pages, const Tensor& v_pages,
                             const Tensor& tables, const Tensor& pos, const AttnVariant& av = {});

// Variants (variants.h), CPU backends only unless the variant is plain:
// rope with a table (core/rope_scaling.h; YaRN): angle = pos · inv_freq[i] (the plain theta
// frequencies when inv_freq is empty) and cos, sin both × attention_factor; x [B,S,H,Dh].
// rope_backward is its transpose: the inverse rotation × attention_factor.
void rope_forward(Tensor& x, int64_t past, const RopeTable& rt);
void rope_backward(Tensor& dx, int64_t past, const RopeTable& rt);
// attention_forward with sinks [H] and/or a sliding window (AttnVariant).
void attention_forward(Tensor& out, const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, int64_t past,
                       const AttnVariant& av);
// expert_ffn_forward with the clamped gated activation and expert biases (variants.h):
//   yp[p] = row_scale[p] · (act(xp w1[e]ᵀ + b1[e], xp w3[e]ᵀ + b3[e]) w2[e]ᵀ + b2[e])
// b1, b3 [E,F], b2 [E,D] float, each optional.
void expert_ffn_forward(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1, const Tensor& w3,
                        const Tensor& w2, const Tensor& row_scale, const ExpertGlu& glu, const ExpertBias& bias);

// Router variant (variants.h RouterVariant: DeepSeek's sigmoid scores, group-limited selection,
// renormalisation epsilon and routed scaling factor), CPU backends only unless plain (then the
// op above with rv.renorm). Same tensors as router_topk_forward; topk_w holds the scaled weights.
void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, const RouterVariant& rv,
                         const Tensor& select_bias = Tensor());

// Multi-head Latent Attention, absorbed form (inference; CPU backends only). kv_b [H*(Dn+Dv), R]
// f32 is kv_b_proj: head h's rows [h(Dn+Dv), h(Dn+Dv)+Dn) map the latent to its k_nope, the next
// Dv rows to its v. Folding them into the query and output sides lets attention run over the
// cached latent (R + Dr values per token) instead of per-head keys and values:
//   mla_absorb_q:   qc[t,h,c] = Σ_{i<Dn} q[t,h,i] · kv_b[h(Dn+Dv)+i, c]  for c < R (columns R.. of
//                   qc untouched);  qc [T,H,Rc] (Rc >= R), q [T,H,Dq] (Dq >= Dn, only [0,Dn) read)
//   mla_absorb_out: o[t,h,j] = Σ_{c<R} oc[t,h,c] · kv_b[h(Dn+Dv)+Dn+j, c];  o [T,H,Dv], oc [T,H,Rc]
void mla_absorb_q(Tensor& qc, const Tensor& q, const Tensor& kv_b, int64_t dn, int64_t dv);
void mla_absorb_out(Tensor& o, const Tensor& oc, const Tensor& kv_b, int64_t dn, int64_t dv);

// Router: probabilities = softmax(logits) over E; takes the K largest (ties: lower index
// first); renormalises the K weights to sum 1 when `renorm`.
// topk_idx [T,K] i32, topk_w [T,K] f32, logits [T,E] f32.
// select_bias [E] f32 (optional; auxiliary-loss-free balancing, DeepSeek-V3): experts are
// selected by probability + select_bias[e], the weights stay the unbiased probabilities.
void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, bool renorm,
                         const Tensor& select_bias = Tensor());

// Groups the T*K assignments by expert, stably (token order kept inside an expert).
// offsets [E+1] i32: rows of expert e are [offsets[e], offsets[e+1]) of the permuted order.
// perm [P] i32: permuted row p holds assignment perm[p] (= t*K + j).
// inv [P] i32: assignment a sits at permuted row inv[a].
void moe_dispatch(Tensor& offsets, Tensor& perm, Tensor& inv, const Tensor& topk_idx, int64_t n_expert);

// xp[p,:] = x[perm[p] / K, :].  xp [P,D], x [T,D], perm [P].
void gather_rows(Tensor& xp, const Tensor& x, const Tensor& perm, int64_t k);

// Grouped SwiGLU expert FFN over permuted rows, only experts with rows do work:
//   for p in expert e's rows: yp[p] = ((silu(xp[p] w1[e]^T) * (xp[p] w3[e]^T)) * row_scale[p]) w2[e]^T
// yp, xp [P,D]; offsets [E+1] i32; w1, w3 [E,F,D]; w2 [E,D,F]; row_scale [P] f32 or undefined
// (then 1). The routing weight enters before the down projection (DESIGN.md).
void expert_ffn_forward(Tensor& yp, const Tensor& xp, const Tensor& offsets, const Tensor& w1,
                        const Tensor& w3, const Tensor& w2, const Tensor& row_scale);

// y[t,:] (+)= sum_j yp[inv[t*K+j], :].  y [T,D], yp [P,D], inv [P]. accumulate: += else =.
void moe_combine(Tensor& y, const Tensor& yp, const Tensor& inv, int64_t k, bool accumulate);

// Gathers the routing weights into permuted order: row_scale[p] = topk_w.flat[perm[p]].
void permute_weights(Tensor& row_scale, const Tensor& topk_w, const Tensor& perm);

// out = silu(h1) * h3, elementwise.  all [N,F].
void swiglu_forward(Tensor& out, const Tensor& h1, const Tensor& h3);

// y[t,:] += sigmoid(gate[t]) * s[t,:].  y, s [T,D]; gate [T,1] (the Qwen2-MoE shared expert).
void sigmoid_gate_add(Tensor& y, const Tensor& s, const Tensor& gate);

// y += x, elementwise, same shapes.
void add_inplace(Tensor& y, const Tensor& x);

// dst[:, dst_col : dst_col+ncols] = src[:, src_col : src_col+ncols] for 2-D tensors with the same
// rows and dtype (splits the stacked q/k/v projection output, and joins its gradients).
void copy_columns(Tensor& dst, int64_t dst_col, const Tensor& src, int64_t src_col, int64_t ncols);

// Converts between float dtypes on one device (f32 <-> bf16); shapes equal.
void cast(Tensor& out, const Tensor& in);

// ---------------------------------------------------------------------------------------------
// Training ops: the forward variants that save what backward reads, and every backward.
// CPU only for now (f32 activations and gradients; weights f32, or bf16/f16 where stated);
// on CUDA they fail with a clear message until the CUDA training issue lands.
// Gradient convention: parameter gradients (dw, db, dtable) ACCUMULATE (+=) and may be
// undefined (frozen parameter: not computed); activation gradients are ASSIGNED (=) unless the
// op takes `accumulate`. Every backward is checked against finite differences in f64 by
// tests/test_ops_backend.cpp, and against the naive reference backend (ops/ref).

// embedding: dtable[ids[t],:] += dout[t,:], except rows equal to padding_idx (-1: none), which
// get no gradient (HF builds nn.Embedding with padding_idx = pad_token_id).
// dtable [V,D] f32, dout [T,D], ids [T] i32.
void embedding_backward(Tensor& dtable, const Tensor& dout, const Tensor& ids, int64_t padding_idx);

// rmsnorm_forward that also saves rstd[n] = 1/sqrt(mean(x[n,:]^2) + eps).  rstd [N] f32.
// out must not alias x here (backward reads x).
void rmsnorm_forward_train(Tensor& out, Tensor& rstd, const Tensor& x, const Tensor& w, float eps);
// dx = d/dx (assigned; accumulate: +=), dw += sum_n dy*x*rstd.  dx, dy, x [N,D]; w [D]; rstd [N].
void rmsnorm_backward(Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                      const Tensor& rstd, bool accumulate);

// Rounds the f32 rows x [N,M] to bf16 (to nearest even, as cast does) into the first half of
// x's own bytes and returns that bf16 [N,M] view; x's f32 values are gone. The LM head's
// gradient chunk takes the bf16 copy its products read this way, with no second buffer.
Tensor cast_bf16_in_place(const Tensor& x);

// linear backward for out = x w^T + b:  dx (=, or += with accumulate) dy w;  dw += dy^T x (=
// with assign_dw: a fresh gradient, never read); db += column sums of dy. dx/dw/db may each be
// undefined (not needed).
// dx, x [N,Kd]; dy [N,M]; w, dw [M,Kd]; db [M]. dy is f32, or bf16: already rounded for bf16
// products (the LM head's gradient, cast_bf16_in_place), taken as it is.
void linear_backward(Tensor& dx, Tensor& dw, Tensor& db, const Tensor& dy, const Tensor& x, const Tensor& w,
                     bool accumulate, bool assign_dw = false);

// Inverse rotation, in place: the gradient of rope_forward (an orthogonal map) at the same
// positions.  dx [B,S,H,Dh].
void rope_backward(Tensor& dx, int64_t past, float theta);

// Causal GQA self-attention over the batch's own keys (training: no cache; query s sees keys
// 0..s of its sequence). Saves lse[b,h,s] = log sum_j exp(score) (f32), from which backward
// recomputes the probabilities (flash-style: the [S,S] matrix is never stored).
// out, q [B,S,H,Dh]; k, v [B,S,Hkv,Dh]; lse [B,H,S] f32. Scale 1/sqrt(Dh).
// av (variants.h): sinks [H] join each row's log-sum-exp; a window limits the keys.
void attention_forward_train(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& k, const Tensor& v,
                             const AttnVariant& av = {});
// dq, dk, dv assigned; shapes as q, k, v. Reads q, k, v, out and lse of the forward (and its av).
// With sinks, dsinks [H] f32 += -Σ_rows p_sink · Δ (p_sink = exp(sink - lse), Δ = dO·O); the
// gradients of q, k and v keep their form (the sink only enters through lse).
void attention_backward(Tensor& dq, Tensor& dk, Tensor& dv, const Tensor& dout, const Tensor& q, const Tensor& k,
                        const Tensor& v, const Tensor& out, const Tensor& lse, const AttnVariant& av = {},
                        Tensor* dsinks = nullptr);

// Gradient of router_topk_forward's weights w.r.t. the logits (softmax over E recomputed from
// the logits; with renorm, through the renormalisation).  dlogits [T,E] f32 assigned;
// dtopk_w [T,K] f32; logits [T,E]; topk_idx [T,K].
void router_topk_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& logits, const Tensor& topk_idx,
                          bool renorm);

// Backward of the router variant: dlogits [T,E] f32 assigned, through the scaling factor, the
// renormalisation and the scores (softmax or sigmoid); the selection (and its bias) passes no
// gradient. CPU backends only.
void router_topk_backward(Tensor& dlogits, const Tensor& dtopk_w, const Tensor& logits, const Tensor& topk_idx,
                          const RouterVariant& rv);

// Per-layer router statistics for the balancing losses (HF load_balancing_loss_func and the
// ST-MoE z-loss), over the T rows of one layer:
//   prob_sum[e] = sum_t softmax(logits[t])[e]      count[e] = #{(t,j): topk_idx[t,j] = e}
//   z_sum[0]    = sum_t logsumexp(logits[t])^2
// prob_sum [E] f32, count [E] f32, z_sum [1] f32 (all assigned).
void router_stats(Tensor& prob_sum, Tensor& count, Tensor& z_sum, const Tensor& logits, const Tensor& topk_idx);
// Adds the balancing losses' gradient to dlogits [T,E]:
//   aux: aux_scale * d/dlogits[t] ( sum_e g[e] * softmax(logits[t])[e] )   (g [E] f32)
//   z:   z_scale * d/dlogits[t] ( logsumexp(logits[t])^2 )
// For the HF aux loss over N rows of all layers, g[e] = E * count_all[e] / N and
// aux_scale = coef / N; for the z-loss z_scale = coef / N. g may be undefined (no aux term).
void router_balance_backward(Tensor& dlogits, const Tensor& logits, const Tensor& g, float aux_scale,
                             float z_scale);

// Capacity limit (Switch-style routing, training): after moe_dispatch, keeps at most
// `capacity` rows per expert — the earliest assignments (token order) — and moves the dropped
// ones behind all kept rows: offsets[E] becomes the kept count N, rows [N, P) of perm are the
// dropped assignments (in order), inv follows. Expert ops process only rows [0, offsets[E]);
// callers zero the dropped rows' outputs, so a dropped token passes through the residual.
// offsets [E+1], perm, inv [P] i32 (updated in place); capacity >= 0.
void moe_capacity_drop(Tensor& offsets, Tensor& perm, Tensor& inv, int64_t capacity);

// Gradient of permute_weights: dtopk_w.flat[perm[p]] = drow_scale[p] (assigned; every
// assignment has exactly one row).  dtopk_w [T,K] f32, drow_scale [P] f32, perm [P].
// (gather_rows and moe_combine are each other's adjoints: the backward of gather_rows is
// moe_combine over inv, and that of moe_combine is gather_rows over perm.)
void permute_weights_backward(Tensor& dtopk_w, const Tensor& drow_scale, const Tensor& perm);

// expert_ffn_forward that saves the pre-activations h1 = xp w1[e]^T and h3 = xp w3[e]^T [P,F]
// (f32) for backward; yp as expert_ffn_forward.
// With expert adapters (lora, per expert e: a [E,r,in], b [E,out,r]) the three products are split
// LoRA over the same offsets:  h1 = xp w1[e]ᵀ + s1·(xp a1[e]ᵀ) b1[e]ᵀ  (h3 likewise) and
// yp = u w2[e]ᵀ + s2·(u a2[e]ᵀ) b2[e]ᵀ with u = silu(h1)·h3·row_scale — never a dense ΔW.
// glu, bias (variants.h): as the expert_ffn_forward variant; h1, h3 hold the biased gate/up
// pre-activations (before the clamps).
void expert_ffn_forward_train(Tensor& yp, Tensor& h1, Tensor& h3, const Tensor& xp, const Tensor& offsets,
                              const Tensor& w1, const Tensor& w3, const Tensor& w2, const Tensor& row_scale,
                              const ExpertLora& lora = {}, const ExpertGlu& glu = {}, const ExpertBias& bias = {});
// Backward of the grouped SwiGLU experts, only over experts with rows (others' dw untouched):
//   a = silu(h1) * h3, u = a * s,  yp = u w2^T
//   du = dyp w2;  dw2[e] += dyp^T u;  drow_scale[p] = sum_f du*a;  da = du * s
//   dh1 = da * h3 * silu'(h1);  dh3 = da * silu(h1)
//   dxp = dh1 w1 + dh3 w3 (assigned);  dw1[e] += dh1^T xp;  dw3[e] += dh3^T xp
// dxp, xp, dyp [P,D]; h1, h3 [P,F]; weights and their grads [E,F,D] / [E,D,F]; drow_scale [P]
// (may be undefined when row_scale is); dw* may be undefined (frozen experts).
// With adapters, each product's gradient goes through its LoRA as lora_backward does, per
// expert with rows: dlora's a/b gradients (shaped as lora's, each may be undefined) accumulate
// only for experts that received rows; the rest are untouched (zero when zero-initialised).
// With glu/bias: a = act(h1, h3) (glu's derivatives, zero where a clamp binds);
// drow_scale[p] also gets dyp·b2[e]; dbias (each tensor optional, f32) accumulates
// db1[e] += Σ dh1, db3[e] += Σ dh3, db2[e] += Σ row_scale·dyp over the expert's rows.
// assign_dw: dw1[e], dw3[e], dw2[e] = (not +=) for the experts with rows, so a caller with fresh
// gradients need not zero them first (and the products never read them); the others untouched.
void expert_ffn_backward(Tensor& dxp, Tensor& dw1, Tensor& dw3, Tensor& dw2, Tensor& drow_scale,
                         const Tensor& dyp, const Tensor& xp, const Tensor& h1, const Tensor& h3,
                         const Tensor& offsets, const Tensor& w1, const Tensor& w3, const Tensor& w2,
                         const Tensor& row_scale, const ExpertLora& lora = {}, ExpertLora* dlora = nullptr,
                         const ExpertGlu& glu = {}, const ExpertBias& bias = {}, ExpertBias* dbias = nullptr,
                         bool assign_dw = false);

// LoRA (fine-tuning; core/lora.h). The delta of one adapted projection, added into columns
// [col0, col0+M) of its output (col0 > 0: one part of a stacked projection such as q/k/v):
//   out[:, col0:col0+M] += l.scale · (x l.aᵀ) l.bᵀ.   out [N,≥col0+M], x [N,Kd], a [r,Kd], b [M,r].
void lora_forward(Tensor& out, int64_t col0, const Tensor& x, const Lora& l);
// Its backward, with dyₛ = dy[:, col0:col0+M] and u = x aᵀ (recomputed, not saved: N·r·Kd flops):
//   dx += scale · (dyₛ b) a;   da += scale · (dyₛ b)ᵀ x;   db += scale · dyₛᵀ u.
// Every gradient accumulates (dx too: it adds to the frozen base's input gradient); each may be
// undefined (not computed).
// With l.dropout > 0 the adapter reads xd = x ⊙ m / (1 − p), m = lora_keep(l.seed, n·Kd + k)
// (core/lora.h): u = xd aᵀ, da uses xd, and dx gets the masked, rescaled gradient. For the
// grouped experts the element index is the permuted row's (row p: p·in + k).
void lora_backward(Tensor& dx, Tensor& da, Tensor& db, const Tensor& dy, int64_t col0, const Tensor& x,
                   const Lora& l);

// Backward of out = silu(h1) * h3: dh1, dh3 assigned.  all [N,F].
void swiglu_backward(Tensor& dh1, Tensor& dh3, const Tensor& dout, const Tensor& h1, const Tensor& h3);

// Backward of y += sigmoid(gate[t]) * s[t,:]:  ds = sigmoid(gate) * dy (assigned),
// dgate[t] = sigmoid'(gate[t]) * sum_d dy[t,d] s[t,d] (assigned).  dy, s, ds [T,D]; gate, dgate [T,1].
void sigmoid_gate_backward(Tensor& ds, Tensor& dgate, const Tensor& dy, const Tensor& s, const Tensor& gate);

// Cross-entropy over rows of logits [N,V] f32 against targets [N] i32 (-100: ignored).
// loss[n] = logsumexp(logits[n]) - logits[n, target[n]], 0 for ignored rows.  loss [N] f32.
void cross_entropy_forward(Tensor& loss, const Tensor& logits, const Tensor& targets);
// dlogits[n] = scale * (softmax(logits[n]) - onehot(target[n])), 0 for ignored rows.
// dlogits may alias logits (the chunked LM head does that, so [N,V] is held once).
void cross_entropy_backward(Tensor& dlogits, const Tensor& logits, const Tensor& targets, float scale);
// Both at once (a training step's chunk of logits): loss as cross_entropy_forward and dlogits as
// cross_entropy_backward, each row's log-sum-exp computed once; dlogits may alias logits.
void cross_entropy_forward_backward(Tensor& loss, Tensor& dlogits, const Tensor& logits, const Tensor& targets,
                                    float scale);

// Switches every CPU op to the naive reference backend (plain loops, f64 accumulation):
// `moe --reference ...`, to tell a kernel bug from a model bug. Off by default.
void set_reference_backend(bool on);
bool reference_backend();

// Whether products on weights of dtype wdt round their other factor to bf16 on the backend CPU
// ops run on now (the matrix units: cpu::Bf16Gemm::Matrix; never the reference backend): a
// gradient that only feeds such products may then be kept in bf16 with the same values (the
// LM head's dlogits).
bool bf16_products(DType wdt);

// True when this build has the CUDA backend and a GPU is visible.
bool cuda_available();

// Waits until all work queued on `dev` has finished (no-op on the CPU). For timing.
void synchronize(Device dev);

}  // namespace moe
