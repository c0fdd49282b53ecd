// ops.h — every numeric op of the engine, declared once, dispatched by device.
//
// DESIGN.md invariant 2: one signature per op; the CPU f32 version (ops/cpu) is the reference
// and a CUDA version (ops/cuda, built with MOE_CUDA=ON) must match it in tests/test_ops_cross.
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
// - All tensors of one call live on one device.
// - Backward ops (next issue) follow: parameter gradients accumulate (+=), activation gradients
//   are assigned (=).
#pragma once
#include "core/tensor.h"

namespace moe {

// out[t,:] = table[ids[t],:].  out [T,D] float, ids [T] i32, table [V,D].
void embedding_forward(Tensor& out, const Tensor& ids, const Tensor& table);

// out[n,:] = x[n,:] / sqrt(mean(x[n,:]^2) + eps) * w.  out, x [N,D] (any leading dims), w [D].
// out may alias x.
void rmsnorm_forward(Tensor& out, const Tensor& x, const Tensor& w, float eps);

// out = x w^T (+ bias).  out [N,M], x [N,Kd], w [M,Kd], bias [M] or undefined.
void linear_forward(Tensor& out, const Tensor& x, const Tensor& w, const Tensor& bias);

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

// Router: probabilities = softmax(logits) over E; takes the K largest (ties: lower index
// first); renormalises the K weights to sum 1 when `renorm`.
// topk_idx [T,K] i32, topk_w [T,K] f32, logits [T,E] f32.
void router_topk_forward(Tensor& topk_idx, Tensor& topk_w, const Tensor& logits, bool renorm);

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

// Converts between float dtypes on one device (f32 <-> bf16); shapes equal.
void cast(Tensor& out, const Tensor& in);

// True when this build has the CUDA backend and a GPU is visible.
bool cuda_available();

// Waits until all work queued on `dev` has finished (no-op on the CPU). For timing.
void synchronize(Device dev);

}  // namespace moe
