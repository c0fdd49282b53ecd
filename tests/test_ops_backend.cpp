// test_ops_backend.cpp — the one op test runner (DESIGN.md invariant 2; like ggml's
// test-backend-ops). Three parts:
//
//  CpuVsRef/<case>   a table of cases, each op x several odd shapes (D=7/33/65, T=1/3/17, E=5
//                    with K=2/3 and experts without rows, H=3/Hkv=1 and H=4/Hkv=2, Dh=6/8,
//                    V=37, ignored targets, renorm on/off, bf16/f16 weights, accumulate on/off):
//                    the optimised CPU backend (through ops.h) against the naive reference
//                    backend (moe::ref), every forward and backward op. Normwise relative error
//                    ||cpu - ref|| / ||ref|| <= 1e-5 (bf16/f16-weight cases too: both sides read
//                    the same stored weights and widen them exactly); index outputs equal.
//                    Quantized weights (q8_0/q4_0/q4_k/q5_k/q6_k linear and expert FFN, each
//                    kernel variant the CPU has, forced): 2e-2, the kernels rounding the
//                    activations to int8 (the exact per-element bound: test_quant_kernels.cpp).
//  CudaVsRef/<case>  the forward cases again on CUDA (f32: 1e-5; bf16 weights, which cuBLAS
//                    multiplies with x rounded to bf16: 2e-2). Without a GPU each is SKIPPED.
//  Grad.*            every backward op against central finite differences in double of the
//                    reference forward (ops/ref/ref_kernels.h): L = <r, forward(inputs)> for a
//                    random r, every input coordinate perturbed by +-h; the reference backward
//                    (in double) must match to 1e-6 and the CPU backward (f32) to 1e-5.
//                    Also: padding rows, experts without rows and frozen gradients stay
//                    untouched; gather_rows and moe_combine are adjoints.
//
// Every output is poisoned first (NaN; -777 for indices), so an element an op forgets to write
// fails the comparison. Inputs are random (fixed seeds), values rounded to f32 so that the f32
// tensors and the double vectors hold the same numbers. Shapes are small: the whole runner
// takes a few seconds (and stays well under a minute under ASan).
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "core/rope_scaling.h"
#include "core/tensor.h"
#include "io/safetensors.h"
#include "ops/backend.h"
#include "ops/cpu/cpu_quant_gemm.h"
#include "ops/ops.h"
#include "ops/ref/ref_kernels.h"

namespace moe {
namespace {

constexpr MemCategory kAct = MemCategory::Activations;
constexpr double kCpuTol = 1e-5;      // optimised CPU vs reference
constexpr double kCudaTol = 1e-5;     // CUDA vs reference, f32
constexpr double kCudaBf16Tol = 2e-2; // CUDA vs reference, bf16 weights (x rounded to bf16)
constexpr double kFdTol = 1e-6;       // reference backward (double) vs finite differences
constexpr double kFdF32Tol = 1e-5;    // CPU backward (f32 maths, f32 saved activations) vs FD
constexpr double kQuantTol = 2e-2;    // quantized-weight kernels (int8 activations) vs the exact reference
constexpr int32_t kIntPoison = -777;

// ---- inputs ----

// n normal values (times scale), rounded to f32 and kept away from 0.
std::vector<double> rnd(int64_t n, uint32_t seed, double scale = 1.0) {
  std::mt19937 rng(seed);
  std::normal_distribution<double> nd(0.0, scale);
  std::vector<double> v(static_cast<size_t>(n));
  for (auto& x : v) {
    x = static_cast<float>(nd(rng));
    if (x == 0) x = 1e-3;
  }
  return v;
}

// Rounds values in place to what `dt` can hold (f32, bf16, f16).
void round_to(std::vector<double>& v, DType dt) {
  for (auto& x : v) {
    float f = static_cast<float>(x);
    if (dt == DType::BF16) f = bf16_to_f32(f32_to_bf16(f));
    if (dt == DType::F16) f = f16_to_f32(f32_to_f16(f));
    x = f;
  }
}

// A CPU tensor of dtype dt holding v (v must already be representable: see round_to).
Tensor ten(const Shape& s, const std::vector<double>& v, DType dt = DType::F32) {
  std::vector<float> f(v.begin(), v.end());
  Tensor t = Tensor::from_f32(s, f, kAct);
  return dt == DType::F32 ? t : t.to_dtype(dt, kAct);
}

// Random weights of dtype dt: the returned vector holds exactly the stored values.
std::pair<Tensor, std::vector<double>> rnd_w(const Shape& s, uint32_t seed, DType dt, double scale = 0.5) {
  std::vector<double> v = rnd(shape_numel(s), seed, scale);
  round_to(v, dt);
  return {ten(s, v, dt), v};
}

Tensor ints(const Shape& s, const std::vector<int32_t>& v) {
  Tensor t = Tensor::empty(s, DType::I32, kAct);
  std::copy(v.begin(), v.end(), t.data<int32_t>());
  return t;
}

std::vector<double> vals(const Tensor& t) {
  std::vector<float> f = t.to_f32_vector();
  return std::vector<double>(f.begin(), f.end());
}

std::vector<int32_t> ivals(const Tensor& t) {
  Tensor c = t.device() == Device::CPU ? t : t.to(Device::CPU, kAct);
  return std::vector<int32_t>(c.data<int32_t>(), c.data<int32_t>() + c.numel());
}

// K distinct experts per token, drawn from `allowed` (so the others get no rows).
std::vector<int32_t> random_topk(int64_t t_n, const std::vector<int32_t>& allowed, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> out, ids = allowed;
  for (int64_t t = 0; t < t_n; ++t) {
    std::shuffle(ids.begin(), ids.end(), rng);
    for (int64_t j = 0; j < k; ++j) out.push_back(ids[j]);
  }
  return out;
}

// Routing in double with the reference dispatch: offsets [E+1], perm, inv for topk idx.
struct Routing {
  std::vector<int32_t> idx, offsets, perm, inv;
};
Routing route(const std::vector<int32_t>& idx, int64_t e_n) {
  Routing r;
  r.idx = idx;
  r.offsets.resize(static_cast<size_t>(e_n + 1));
  r.perm.resize(idx.size());
  r.inv.resize(idx.size());
  ref::f64::moe_dispatch(r.offsets.data(), r.perm.data(), r.inv.data(), idx.data(), int64_t(idx.size()), e_n);
  return r;
}

double rel_err(const std::vector<double>& a, const std::vector<double>& ref) {
  if (a.size() != ref.size()) return INFINITY;
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    if (!std::isfinite(a[i]) || !std::isfinite(ref[i])) return INFINITY;
    num += (a[i] - ref[i]) * (a[i] - ref[i]);
    den += ref[i] * ref[i];
  }
  if (den == 0) return num == 0 ? 0 : INFINITY;
  return std::sqrt(num / den);
}

std::string str(int64_t v) { return std::to_string(v); }

// ---- the case table: one op call on a backend ----

enum class Backend { Cpu, Ref, Cuda };

using Outs = std::vector<std::pair<std::string, Tensor>>;

// Puts a case's inputs and poisoned outputs on the backend's device.
struct Dev {
  Backend b;
  Device dev() const { return b == Backend::Cuda ? Device::CUDA : Device::CPU; }
  // A deep copy (in-place ops and accumulating outputs must not see another run's result).
  Tensor in(const Tensor& t) const { return t.defined() ? t.to(dev(), kAct) : Tensor(); }
  Tensor out(const Shape& s, DType dt = DType::F32) const {
    std::vector<float> nan(static_cast<size_t>(shape_numel(s)), std::nanf(""));
    return Tensor::from_f32(s, nan, kAct).to_dtype(dt, kAct).to(dev(), kAct);
  }
  Tensor outi(const Shape& s) const {
    return ints(s, std::vector<int32_t>(static_cast<size_t>(shape_numel(s)), kIntPoison)).to(dev(), kAct);
  }
};

// The reference backend directly; CPU and CUDA through ops.h (validation, then the backend of
// the tensors' device; the reference switch is off, see the fixture).
#define CALL(b, call)            \
  do {                           \
    if ((b) == Backend::Ref)     \
      ::moe::ref::call;          \
    else                         \
      ::moe::call;               \
  } while (0)

struct Case {
  std::string name;
  bool cuda = false;  // the op has a CUDA version (forward ops)
  double cuda_tol = kCudaTol;
  std::function<Outs(Backend)> run;
  double cpu_tol = kCpuTol;  // kQuantTol for quantized weights (int8 activations)
};

// Runs in every test process before main (ctest runs each case in its own process, and
// registration needs the names): inputs beyond a few thousand values are made inside the case's
// run function from a seed taken here, not here.
std::vector<Case> make_cases() {
  std::vector<Case> cs;
  auto add = [&](std::string name, bool cuda, double cuda_tol, std::function<Outs(Backend)> run) {
    cs.push_back(Case{std::move(name), cuda, cuda_tol, std::move(run)});
  };
  const DType kWdt[] = {DType::F32, DType::BF16, DType::F16};
  auto wtag = [](DType dt) { return std::string(dtype_name(dt)); };
  auto ctol = [](DType dt) { return dt == DType::F32 ? kCudaTol : kCudaBf16Tol; };
  uint32_t seed = 100;

  // embedding_forward
  for (DType dt : kWdt)
    for (int64_t t : {1, 17})
      for (int64_t d : {7, 33}) {
        const int64_t v = 37;
        Tensor table = rnd_w({v, d}, ++seed, dt).first;
        std::vector<int32_t> id;
        for (int64_t i = 0; i < t; ++i) id.push_back(int32_t((i * 7 + 3) % v));
        Tensor ids = ints({t}, id);
        add("embedding_forward_" + wtag(dt) + "_T" + str(t) + "_D" + str(d), dt != DType::F16, ctol(dt),
            [=](Backend b) {
              Dev g{b};
              Tensor out = g.out({t, d});
              CALL(b, embedding_forward(out, g.in(ids), g.in(table)));
              return Outs{{"out", out}};
            });
      }

  // rmsnorm_forward (and in place: out aliases x)
  for (DType dt : {DType::F32, DType::BF16})
    for (int64_t n : {1, 3, 17})
      for (int64_t d : {7, 33, 65}) {
        Tensor x = ten({n, d}, rnd(n * d, ++seed, 2.0));
        Tensor w = rnd_w({d}, ++seed, dt, 1.0).first;
        add("rmsnorm_forward_" + wtag(dt) + "_N" + str(n) + "_D" + str(d), true, ctol(dt), [=](Backend b) {
          Dev g{b};
          Tensor out = g.out({n, d});
          CALL(b, rmsnorm_forward(out, g.in(x), g.in(w), 1e-5f));
          Tensor xa = g.in(x);
          CALL(b, rmsnorm_forward(xa, xa, g.in(w), 1e-5f));
          return Outs{{"out", out}, {"out_in_place", xa}};
        });
      }

  // linear_forward: N <= 8 (16-bit weights: N <= 16) takes the streaming kernel, in groups of
  // 1-3 rows of x (4 = 2+2, 7 = 3+2+2, 16 = 3+3+3+3+2+2: serving's batched decode); N = 17 BLAS
  for (DType dt : kWdt)
    for (int64_t n : {1, 3, 4, 7, 16, 17})
      for (int64_t kd : {7, 33, 65})
        for (bool bias : {false, true}) {
          const int64_t m = kd == 33 ? 37 : 11;
          Tensor x = ten({n, kd}, rnd(n * kd, ++seed));
          Tensor w = rnd_w({m, kd}, ++seed, dt).first;
          Tensor bs = bias ? rnd_w({m}, ++seed, dt).first : Tensor();
          add("linear_forward_" + wtag(dt) + "_N" + str(n) + "_K" + str(kd) + "_M" + str(m) + (bias ? "_bias" : ""),
              dt != DType::F16, ctol(dt), [=](Backend b) {
                Dev g{b};
                Tensor out = g.out({n, m});
                CALL(b, linear_forward(out, g.in(x), g.in(w), g.in(bs)));
                return Outs{{"out", out}};
              });
        }

  // rope_forward
  for (int64_t s : {1, 3})
    for (int64_t dh : {6, 8})
      for (int64_t past : {0, 5}) {
        Tensor x = ten({2, s, 3, dh}, rnd(2 * s * 3 * dh, ++seed));
        add("rope_forward_S" + str(s) + "_Dh" + str(dh) + "_past" + str(past), true, kCudaTol, [=](Backend b) {
          Dev g{b};
          Tensor xx = g.in(x);
          CALL(b, rope_forward(xx, past, 10000.f));
          return Outs{{"x", xx}};
        });
      }

  // kv_append
  for (int64_t s : {1, 3}) {
    const int64_t bn = 2, c = 9, hkv = 2, dh = 6, past = 4;
    Tensor kc = ten({bn, c, hkv, dh}, rnd(bn * c * hkv * dh, ++seed));
    Tensor vc = ten({bn, c, hkv, dh}, rnd(bn * c * hkv * dh, ++seed));
    Tensor k = ten({bn, s, hkv, dh}, rnd(bn * s * hkv * dh, ++seed));
    Tensor v = ten({bn, s, hkv, dh}, rnd(bn * s * hkv * dh, ++seed));
    add("kv_append_S" + str(s), true, 0.0, [=](Backend b) {
      Dev g{b};
      Tensor kk = g.in(kc), vv = g.in(vc);
      CALL(b, kv_append(kk, vv, g.in(k), g.in(v), past));
      return Outs{{"k_cache", kk}, {"v_cache", vv}};
    });
  }

  // attention_forward (over a cache)
  // (Heads are copied out of the pair: clang 14 cannot capture a structured binding in a lambda.)
  // S 40: the CPU's prefill path (query blocks of 32 against one sgemm of keys; a second, partial
  // block whose keys start later than its rows' own).
  for (auto heads : {std::pair<int64_t, int64_t>{3, 1}, {4, 2}})
    for (int64_t s : {1, 3, 40})
      for (int64_t dh : {6, 8})
        for (int64_t past : {0, 4}) {
          const int64_t h = heads.first, hkv = heads.second;
          const int64_t bn = 2, c = past + s + 2;
          Tensor q = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
          Tensor kc = ten({bn, c, hkv, dh}, rnd(bn * c * hkv * dh, ++seed));
          Tensor vc = ten({bn, c, hkv, dh}, rnd(bn * c * hkv * dh, ++seed));
          add("attention_forward_H" + str(h) + "_Hkv" + str(hkv) + "_S" + str(s) + "_Dh" + str(dh) + "_past" +
                  str(past),
              true, kCudaTol, [=](Backend b) {
                Dev g{b};
                Tensor out = g.out({bn, s, h, dh});
                CALL(b, attention_forward(out, g.in(q), g.in(kc), g.in(vc), past));
                return Outs{{"out", out}};
              });
        }

  // Paged KV cache (serving; CPU only): 7 blocks of 4 positions, two rows at different
  // positions whose tables list blocks out of order (row 1's first block after row 0's).
  // The reference copies each row's pages into a per-slot cache and runs attention_forward.
  {
    const int64_t n_blocks = 7, blk = 4;
    const std::vector<int32_t> tab = {5, 2, 0, -1, 6, 1, 3, 4};  // [2,4]; -1: never reached
    for (auto heads : {std::pair<int64_t, int64_t>{3, 1}, {4, 2}})
      for (int64_t s : {1, 3})
        for (int64_t dh : {6, 8}) {
          const int64_t h = heads.first, hkv = heads.second, bn = 2;
          const std::vector<int32_t> past = {s == 1 ? 9 : 6, 3};  // row 0 spans three blocks
          Tensor kp = ten({n_blocks, blk, hkv, dh}, rnd(n_blocks * blk * hkv * dh, ++seed));
          Tensor vp = ten({n_blocks, blk, hkv, dh}, rnd(n_blocks * blk * hkv * dh, ++seed));
          Tensor k = ten({bn, s, hkv, dh}, rnd(bn * s * hkv * dh, ++seed));
          Tensor v = ten({bn, s, hkv, dh}, rnd(bn * s * hkv * dh, ++seed));
          Tensor q = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
          const std::string tag = "_H" + str(h) + "_Hkv" + str(hkv) + "_S" + str(s) + "_Dh" + str(dh);
          add("kv_append_paged" + tag, false, 0.0, [=](Backend b) {
            Dev g{b};
            Tensor kk = g.in(kp), vv = g.in(vp), tb = ints({bn, 4}, tab), ps = ints({bn}, past);
            CALL(b, kv_append_paged(kk, vv, g.in(k), g.in(v), tb, ps));
            return Outs{{"k_pages", kk}, {"v_pages", vv}};
          });
          add("attention_forward_paged" + tag, false, 0.0, [=](Backend b) {
            Dev g{b};
            Tensor out = g.out({bn, s, h, dh});
            Tensor tb = ints({bn, 4}, tab), ps = ints({bn}, past);
            CALL(b, attention_forward_paged(out, g.in(q), g.in(kp), g.in(vp), tb, ps));
            return Outs{{"out", out}};
          });
        }
  }

  // Over 30 blocks of 4, each row's 12 blocks a scattered permutation: at S 40 (a prefill
  // chunk: the CPU's blocked path over keys gathered from their pages), and a decode with 5
  // query heads per kv head and Dh 40 — the CPU's register-blocked weighted sum of values takes
  // 4 heads × 32 columns at a time, the fifth head and the last 8 columns the plain way — over
  // more keys than the prefetch distance (also through the per-slot cache).
  struct PagedCase {
    int64_t s, dh, h, hkv;
    std::vector<int32_t> past;
  };
  for (const PagedCase& pc : {PagedCase{40, 8, 4, 2, {6, 3}}, PagedCase{1, 40, 10, 2, {37, 20}}}) {
    const int64_t n_blocks = 30, blk = 4, s = pc.s, dh = pc.dh, h = pc.h, hkv = pc.hkv, bn = 2;
    std::vector<int32_t> tab(2 * 12);
    for (int64_t i = 0; i < 24; ++i) tab[size_t(i)] = int32_t((i * 7 + 3) % n_blocks);  // 7 coprime to 30: distinct
    const std::vector<int32_t> past = pc.past;
    Tensor kp = ten({n_blocks, blk, hkv, dh}, rnd(n_blocks * blk * hkv * dh, ++seed));
    Tensor vp = ten({n_blocks, blk, hkv, dh}, rnd(n_blocks * blk * hkv * dh, ++seed));
    Tensor q = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
    const std::string tag = "_H" + str(h) + "_Hkv" + str(hkv) + "_S" + str(s) + "_Dh" + str(dh);
    add("attention_forward_paged" + tag, false, 0.0, [=](Backend b) {
      Dev g{b};
      Tensor out = g.out({bn, s, h, dh});
      Tensor tb = ints({bn, 12}, tab), ps = ints({bn}, past);
      CALL(b, attention_forward_paged(out, g.in(q), g.in(kp), g.in(vp), tb, ps));
      return Outs{{"out", out}};
    });
    if (s != 1) continue;
    const int64_t c = past[0] + s + 2;
    Tensor kc = ten({bn, c, hkv, dh}, rnd(bn * c * hkv * dh, ++seed));
    Tensor vc = ten({bn, c, hkv, dh}, rnd(bn * c * hkv * dh, ++seed));
    add("attention_forward" + tag + "_past" + str(past[0]), true, kCudaTol, [=](Backend b) {
      Dev g{b};
      Tensor out = g.out({bn, s, h, dh});
      CALL(b, attention_forward(out, g.in(q), g.in(kc), g.in(vc), past[0]));
      return Outs{{"out", out}};
    });
  }

  // router_topk_forward (row 0 has tied logits: the lower index must win). With a selection
  // bias (aux-loss-free balancing) large enough to reorder the experts: selection follows
  // probability + bias, the weights stay the unbiased probabilities.
  for (int64_t t : {1, 17})
    for (int64_t k : {2, 3})
      for (bool renorm : {false, true})
        for (bool biased : {false, true}) {
          const int64_t e = 5;
          std::vector<double> l = rnd(t * e, ++seed, 2.0);
          if (!biased) l[1] = l[3] = l[4] = 3.0;
          Tensor logits = ten({t, e}, l);
          Tensor bias = biased ? ten({e}, {0.3, -0.2, 0.05, 0.25, -0.4}) : Tensor();
          add("router_topk_forward_T" + str(t) + "_K" + str(k) + (renorm ? "_renorm" : "") + (biased ? "_bias" : ""),
              true, kCudaTol, [=](Backend b) {
                Dev g{b};
                Tensor idx = g.outi({t, k}), w = g.out({t, k});
                CALL(b, router_topk_forward(idx, w, g.in(logits), renorm, g.in(bias)));
                return Outs{{"topk_idx", idx}, {"topk_w", w}};
              });
        }

  // moe_capacity_drop: after a dispatch, each expert keeps its first `cap` assignments.
  for (int64_t t : {1, 17})
    for (int64_t k : {1, 2})
      for (int64_t cap : {0, 1, 3, 100}) {
        const int64_t e = 5;
        std::vector<int32_t> idx = random_topk(t, {0, 1, 2, 4}, k, ++seed);
        Routing r = route(idx, e);
        Tensor off0 = ints({e + 1}, r.offsets), perm0 = ints({t * k}, r.perm), inv0 = ints({t * k}, r.inv);
        add("moe_capacity_drop_T" + str(t) + "_K" + str(k) + "_C" + str(cap), false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor off = g.in(off0), pm = g.in(perm0), iv = g.in(inv0);
          CALL(b, moe_capacity_drop(off, pm, iv, cap));
          return Outs{{"offsets", off}, {"perm", pm}, {"inv", iv}};
        });
      }

  // moe_dispatch, gather_rows, moe_combine, permute_weights (expert 3 gets no rows)
  for (int64_t t : {1, 17})
    for (int64_t k : {2, 3}) {
      const int64_t e = 5, d = 7;
      std::vector<int32_t> idx = random_topk(t, {0, 1, 2, 4}, k, ++seed);
      Routing r = route(idx, e);
      Tensor tidx = ints({t, k}, idx), perm = ints({t * k}, r.perm), inv = ints({t * k}, r.inv);
      Tensor x = ten({t, d}, rnd(t * d, ++seed));
      Tensor yp = ten({t * k, d}, rnd(t * k * d, ++seed));
      Tensor y0 = ten({t, d}, rnd(t * d, ++seed));
      Tensor tw = ten({t, k}, rnd(t * k, ++seed)), drs = ten({t * k}, rnd(t * k, ++seed));
      const std::string sh = "_T" + str(t) + "_K" + str(k);
      add("moe_dispatch" + sh, true, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor off = g.outi({e + 1}), pm = g.outi({t * k}), iv = g.outi({t * k});
        CALL(b, moe_dispatch(off, pm, iv, g.in(tidx), e));
        return Outs{{"offsets", off}, {"perm", pm}, {"inv", iv}};
      });
      add("gather_rows" + sh, true, kCudaTol, [=](Backend b) {
        Dev g{b};
        Tensor xp = g.out({t * k, d});
        CALL(b, gather_rows(xp, g.in(x), g.in(perm), k));
        return Outs{{"xp", xp}};
      });
      for (bool acc : {false, true})
        add("moe_combine" + sh + (acc ? "_accumulate" : ""), true, kCudaTol, [=](Backend b) {
          Dev g{b};
          Tensor y = acc ? g.in(y0) : g.out({t, d});
          CALL(b, moe_combine(y, g.in(yp), g.in(inv), k, acc));
          return Outs{{"y", y}};
        });
      add("permute_weights" + sh, true, kCudaTol, [=](Backend b) {
        Dev g{b};
        Tensor rs = g.out({t * k});
        CALL(b, permute_weights(rs, g.in(tw), g.in(perm)));
        return Outs{{"row_scale", rs}};
      });
      add("permute_weights_backward" + sh, false, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor dtw = g.out({t, k});
        CALL(b, permute_weights_backward(dtw, g.in(drs), g.in(perm)));
        return Outs{{"dtopk_w", dtw}};
      });
    }

  // expert_ffn_forward_train with experts of more rows than the CPU's forward takes in one piece
  // (256): every token to experts 0 and 2 of 3, 300 and 600 tokens (pieces of 150 and 200 rows,
  // in two and three parts), f32 and bf16 weights, with row scales.
  for (DType dt : {DType::F32, DType::BF16})
    for (int64_t t : {300, 600}) {
      const int64_t e = 3, k = 2, f = 12, d = 16, p = t * k;
      const uint32_t s0 = (seed += 8);
      add("expert_ffn_forward_train_pieces_" + wtag(dt) + "_T" + str(t), false, 0.0, [=](Backend b) {
        Routing r = route(random_topk(t, {0, 2}, k, s0), e);
        Dev g{b};
        Tensor yp = g.out({p, d}), h1 = g.out({p, f}), h3 = g.out({p, f});
        CALL(b, expert_ffn_forward_train(yp, h1, h3, g.in(ten({p, d}, rnd(p * d, s0 + 1))), g.in(ints({e + 1}, r.offsets)),
                                         g.in(rnd_w({e, f, d}, s0 + 2, dt).first), g.in(rnd_w({e, f, d}, s0 + 3, dt).first),
                                         g.in(rnd_w({e, d, f}, s0 + 4, dt).first), g.in(ten({p}, rnd(p, s0 + 5)))));
        return Outs{{"yp", yp}, {"h1", h1}, {"h3", h3}};
      });
    }

  // expert_ffn_forward / _train / _backward: E=5, experts 1 and 3 without rows
  for (DType dt : kWdt)
    for (int64_t t : {3, 17})
      for (int64_t d : {7, 33})
        for (bool scaled : {false, true}) {
          const int64_t e = 5, k = 2, f = 11, p = t * k;
          Routing r = route(random_topk(t, {0, 2, 4}, k, ++seed), e);
          Tensor off = ints({e + 1}, r.offsets);
          Tensor xp = ten({p, d}, rnd(p * d, ++seed));
          Tensor w1 = rnd_w({e, f, d}, ++seed, dt).first, w3 = rnd_w({e, f, d}, ++seed, dt).first;
          Tensor w2 = rnd_w({e, d, f}, ++seed, dt).first;
          Tensor rs = scaled ? ten({p}, rnd(p, ++seed)) : Tensor();
          Tensor dyp = ten({p, d}, rnd(p * d, ++seed));
          Tensor dw1 = ten({e, f, d}, rnd(e * f * d, ++seed)), dw3 = ten({e, f, d}, rnd(e * f * d, ++seed));
          Tensor dw2 = ten({e, d, f}, rnd(e * d * f, ++seed));
          const std::string sh = "_" + wtag(dt) + "_T" + str(t) + "_D" + str(d) + (scaled ? "_scaled" : "");
          add("expert_ffn_forward" + sh, dt != DType::F16, ctol(dt), [=](Backend b) {
            Dev g{b};
            Tensor yp = g.out({p, d});
            CALL(b, expert_ffn_forward(yp, g.in(xp), g.in(off), g.in(w1), g.in(w3), g.in(w2), g.in(rs)));
            return Outs{{"yp", yp}};
          });
          add("expert_ffn_forward_train" + sh, false, 0.0, [=](Backend b) {
            Dev g{b};
            Tensor yp = g.out({p, d}), h1 = g.out({p, f}), h3 = g.out({p, f});
            CALL(b, expert_ffn_forward_train(yp, h1, h3, g.in(xp), g.in(off), g.in(w1), g.in(w3), g.in(w2),
                                             g.in(rs)));
            return Outs{{"yp", yp}, {"h1", h1}, {"h3", h3}};
          });
          // Saved activations from the reference forward, the same on both sides.
          Tensor h1 = Tensor::empty({p, f}, DType::F32, kAct), h3 = Tensor::empty({p, f}, DType::F32, kAct);
          Tensor ypr = Tensor::empty({p, d}, DType::F32, kAct);
          ref::expert_ffn_forward_train(ypr, h1, h3, xp, off, w1, w3, w2, rs);
          // The backward from saved pre-activations s1, s3, with the experts' weight gradients
          // and frozen (dx and the row scales' gradient only).
          // assign: the weight gradients of experts 0, 2, 4 assigned (their random starting
          // values not read), those of 1 and 3 (no rows) keep theirs.
          auto add_backward = [&](const std::string& name, const Tensor& s1, const Tensor& s3) {
            for (int mode = 0; mode < 3; ++mode)  // 0: dw accumulate, 1: frozen, 2: dw assign
              add(name + (mode == 1 ? "_frozen" : mode == 2 ? "_assign" : ""), false, 0.0, [=](Backend b) {
                const bool frozen = mode == 1;
                Dev g{b};
                Tensor dx = g.out({p, d});
                Tensor g1 = frozen ? Tensor() : g.in(dw1), g3 = frozen ? Tensor() : g.in(dw3);
                Tensor g2 = frozen ? Tensor() : g.in(dw2);
                Tensor drs = scaled ? g.out({p}) : Tensor();
                CALL(b, expert_ffn_backward(dx, g1, g3, g2, drs, g.in(dyp), g.in(xp), g.in(s1), g.in(s3), g.in(off),
                                            g.in(w1), g.in(w3), g.in(w2), g.in(rs), {}, nullptr, {}, {}, nullptr,
                                            mode == 2));
                Outs o{{"dxp", dx}};
                if (!frozen) o.insert(o.end(), {{"dw1", g1}, {"dw3", g3}, {"dw2", g2}});
                if (scaled) o.push_back({"drow_scale", drs});
                return o;
              });
          };
          add_backward("expert_ffn_backward" + sh, h1, h3);
          if (dt != DType::BF16) continue;
          // Mixed precision saves the pre-activations in bf16: the forward rounds them before the
          // GLU reads them, the backward widens them back.
          add("expert_ffn_forward_train_saved_bf16" + sh, false, 0.0, [=](Backend b) {
            Dev g{b};
            Tensor yp = g.out({p, d}), s1 = g.out({p, f}, DType::BF16), s3 = g.out({p, f}, DType::BF16);
            CALL(b, expert_ffn_forward_train(yp, s1, s3, g.in(xp), g.in(off), g.in(w1), g.in(w3), g.in(w2),
                                             g.in(rs)));
            return Outs{{"yp", yp}, {"h1", s1}, {"h3", s3}};
          });
          add_backward("expert_ffn_backward_saved_bf16" + sh, h1.to_dtype(DType::BF16, kAct),
                       h3.to_dtype(DType::BF16, kAct));
        }
  // Frozen experts at a size where the CPU's backward runs in parallel and cuts the busiest
  // expert's rows into pieces (more than kPieceRows = 256 of them; expert 1 gets none).
  for (DType dt : {DType::F32, DType::BF16}) {
    const int64_t t = 300, e = 4, k = 2, d = 16, f = 72, p = t * k;
    std::vector<int32_t> idx;
    for (int64_t i = 0; i < t; ++i) idx.insert(idx.end(), {0, int32_t(i % 3 == 0 ? 2 : 3)});
    Tensor off = ints({e + 1}, route(idx, e).offsets);
    Tensor xp = ten({p, d}, rnd(p * d, ++seed)), dyp = ten({p, d}, rnd(p * d, ++seed)), rs = ten({p}, rnd(p, ++seed));
    Tensor w1 = rnd_w({e, f, d}, ++seed, dt).first, w3 = rnd_w({e, f, d}, ++seed, dt).first;
    Tensor w2 = rnd_w({e, d, f}, ++seed, dt).first;
    Tensor h1 = Tensor::empty({p, f}, DType::F32, kAct), h3 = Tensor::empty({p, f}, DType::F32, kAct);
    Tensor ypr = Tensor::empty({p, d}, DType::F32, kAct);
    ref::expert_ffn_forward_train(ypr, h1, h3, xp, off, w1, w3, w2, rs);
    add("expert_ffn_backward_frozen_pieces_" + wtag(dt), false, 0.0, [=](Backend b) {
      Dev g{b};
      Tensor dx = g.out({p, d}), drs = g.out({p}), none;
      CALL(b, expert_ffn_backward(dx, none, none, none, drs, g.in(dyp), g.in(xp), g.in(h1), g.in(h3), g.in(off),
                                  g.in(w1), g.in(w3), g.in(w2), g.in(rs)));
      return Outs{{"dxp", dx}, {"drow_scale", drs}};
    });
  }

  // lora_forward / lora_backward: a part of a stacked output (col0 > 0), frozen pieces
  for (int64_t n : {1, 17})
    for (int64_t kd : {7, 33}) {
      const int64_t m = 9, r = 4, width = 20, col0 = 5;
      Lora l{ten({r, kd}, rnd(r * kd, ++seed, 0.5)), ten({m, r}, rnd(m * r, ++seed, 0.5)), 0.625f};
      Tensor x = ten({n, kd}, rnd(n * kd, ++seed)), out0 = ten({n, width}, rnd(n * width, ++seed));
      Tensor dy = ten({n, width}, rnd(n * width, ++seed)), dx0 = ten({n, kd}, rnd(n * kd, ++seed));
      Tensor da0 = ten({r, kd}, rnd(r * kd, ++seed)), db0 = ten({m, r}, rnd(m * r, ++seed));
      const std::string sh = "_N" + str(n) + "_K" + str(kd);
      add("lora_forward" + sh, false, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor out = g.in(out0);
        CALL(b, lora_forward(out, col0, g.in(x), Lora{g.in(l.a), g.in(l.b), l.scale}));
        return Outs{{"out", out}};
      });
      for (int frozen = 0; frozen < 3; ++frozen)  // 0: all, 1: no dx, 2: only db
        add("lora_backward" + sh + "_f" + str(frozen), false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor dx = frozen == 0 ? g.in(dx0) : Tensor(), da = frozen < 2 ? g.in(da0) : Tensor(), db = g.in(db0);
          CALL(b, lora_backward(dx, da, db, g.in(dy), col0, g.in(x), Lora{g.in(l.a), g.in(l.b), l.scale}));
          Outs o{{"db", db}};
          if (dx.defined()) o.push_back({"dx", dx});
          if (da.defined()) o.push_back({"da", da});
          return o;
        });
    }

  // swiglu, sigmoid gate, add, and their backwards
  for (int64_t n : {1, 3, 17})
    for (int64_t d : {7, 33}) {
      Tensor h1 = ten({n, d}, rnd(n * d, ++seed, 3.0)), h3 = ten({n, d}, rnd(n * d, ++seed));
      Tensor dout = ten({n, d}, rnd(n * d, ++seed));
      Tensor gate = ten({n, 1}, rnd(n, ++seed, 2.0));
      const std::string sh = "_N" + str(n) + "_D" + str(d);
      add("swiglu_forward" + sh, true, kCudaTol, [=](Backend b) {
        Dev g{b};
        Tensor out = g.out({n, d});
        CALL(b, swiglu_forward(out, g.in(h1), g.in(h3)));
        return Outs{{"out", out}};
      });
      add("swiglu_backward" + sh, false, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor d1 = g.out({n, d}), d3 = g.out({n, d});
        CALL(b, swiglu_backward(d1, d3, g.in(dout), g.in(h1), g.in(h3)));
        return Outs{{"dh1", d1}, {"dh3", d3}};
      });
      add("sigmoid_gate_add" + sh, true, kCudaTol, [=](Backend b) {
        Dev g{b};
        Tensor y = g.in(dout);
        CALL(b, sigmoid_gate_add(y, g.in(h1), g.in(gate)));
        return Outs{{"y", y}};
      });
      add("sigmoid_gate_backward" + sh, false, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor ds = g.out({n, d}), dg = g.out({n, 1});
        CALL(b, sigmoid_gate_backward(ds, dg, g.in(dout), g.in(h1), g.in(gate)));
        return Outs{{"ds", ds}, {"dgate", dg}};
      });
      add("add_inplace" + sh, true, kCudaTol, [=](Backend b) {
        Dev g{b};
        Tensor y = g.in(dout);
        CALL(b, add_inplace(y, g.in(h1)));
        return Outs{{"y", y}};
      });
    }

  // copy_columns (the stacked q/k/v split and join): dtype-agnostic, exact
  for (DType dt : {DType::F32, DType::BF16})
    for (int64_t rows : {1, 5}) {
      Tensor dst = rnd_w({rows, 20}, ++seed, dt).first, src = rnd_w({rows, 13}, ++seed, dt).first;
      add("copy_columns_" + wtag(dt) + "_rows" + str(rows), true, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor d = g.in(dst);
        CALL(b, copy_columns(d, 3, g.in(src), 2, 7));
        return Outs{{"dst", d}};
      });
    }

  // cast between float dtypes (f16 is CPU only); 300 x 301 values go over the CPU's threads in
  // runs of 4096, the last one partial
  for (auto cast_pair : {std::pair{DType::F32, DType::BF16}, {DType::BF16, DType::F32}, {DType::F32, DType::F16},
                         {DType::F16, DType::F32}, {DType::F16, DType::BF16}})
    for (const Shape& sh : {Shape{3, 33}, Shape{300, 301}}) {
      const DType from = cast_pair.first, to = cast_pair.second;
      Tensor in = rnd_w(sh, ++seed, from, 3.0).first;
      bool cuda = from != DType::F16 && to != DType::F16;
      add("cast_" + wtag(from) + "_to_" + wtag(to) + "_" + str(sh[0]) + "x" + str(sh[1]), cuda, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor out = g.out(sh, to);
        CALL(b, cast(out, g.in(in)));
        return Outs{{"out", out}};
      });
    }

  // cast_bf16_in_place (the LM head's gradient): rows past the first wave's, a row longer than a
  // run of 4096 (row 0 goes run by run over its own bytes), and 300 x 301 over the threads
  for (const Shape& sh : {Shape{1, 33}, Shape{5, 7}, Shape{3, 9000}, Shape{300, 301}}) {
    Tensor in = rnd_w(sh, ++seed, DType::F32, 3.0).first;
    add("cast_bf16_in_place_" + str(sh[0]) + "x" + str(sh[1]), false, 0.0, [=](Backend b) {
      Dev g{b};
      Tensor x = g.in(in), out;
      if (b == Backend::Ref) {
        out = x.reinterpret(DType::BF16, sh);
        ::moe::ref::cast_bf16_in_place(out, x);
      } else {
        out = cast_bf16_in_place(x);
      }
      EXPECT_EQ(out.raw(), x.raw()) << "the bf16 rows must be x's own bytes";
      return Outs{{"out", out}};
    });
  }

  // ---- training ops ----

  // embedding_backward (ids repeat; padding_idx 3 occurs)
  for (int64_t pad : {-1, 3})
    for (int64_t d : {7, 33}) {
      const int64_t v = 37, t = 17;
      std::vector<int32_t> id;
      for (int64_t i = 0; i < t; ++i) id.push_back(int32_t((i * 5) % 11));
      Tensor ids = ints({t}, id);
      Tensor dout = ten({t, d}, rnd(t * d, ++seed)), dt0 = ten({v, d}, rnd(v * d, ++seed));
      add("embedding_backward_pad" + str(pad + 1) + "_D" + str(d), false, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor dtable = g.in(dt0);
        CALL(b, embedding_backward(dtable, g.in(dout), g.in(ids), pad));
        return Outs{{"dtable", dtable}};
      });
    }

  // rmsnorm_forward_train / rmsnorm_backward
  for (DType dt : {DType::F32, DType::BF16})
    for (int64_t n : {1, 3, 17})
      for (int64_t d : {7, 33, 65}) {
        Tensor x = ten({n, d}, rnd(n * d, ++seed, 2.0));
        Tensor w = rnd_w({d}, ++seed, dt, 1.0).first;
        Tensor dy = ten({n, d}, rnd(n * d, ++seed)), dx0 = ten({n, d}, rnd(n * d, ++seed));
        Tensor dw0 = ten({d}, rnd(d, ++seed));
        const std::string sh = "_" + wtag(dt) + "_N" + str(n) + "_D" + str(d);
        add("rmsnorm_forward_train" + sh, false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor out = g.out({n, d}), rstd = g.out({n});
          CALL(b, rmsnorm_forward_train(out, rstd, g.in(x), g.in(w), 1e-5f));
          return Outs{{"out", out}, {"rstd", rstd}};
        });
        Tensor rstd = Tensor::empty({n}, DType::F32, kAct), o = Tensor::empty({n, d}, DType::F32, kAct);
        ref::rmsnorm_forward_train(o, rstd, x, w, 1e-5f);
        for (bool acc : {false, true})
          for (bool want_dw : {false, true})
            add("rmsnorm_backward" + sh + (acc ? "_accumulate" : "") + (want_dw ? "" : "_no_dw"), false, 0.0,
                [=](Backend b) {
                  Dev g{b};
                  Tensor dx = acc ? g.in(dx0) : g.out({n, d});
                  Tensor dw = want_dw ? g.in(dw0) : Tensor();
                  CALL(b, rmsnorm_backward(dx, dw, g.in(dy), g.in(x), g.in(w), g.in(rstd), acc));
                  Outs outs{{"dx", dx}};
                  if (want_dw) outs.push_back({"dw", dw});
                  return outs;
                });
      }

  // linear_backward: every subset pattern of dx/dw/db that matters, accumulate on/off
  for (DType dt : {DType::F32, DType::BF16, DType::F16})
    for (int64_t n : {1, 3, 17})
      for (int64_t kd : {7, 33}) {
        const int64_t m = 11;
        Tensor x = ten({n, kd}, rnd(n * kd, ++seed)), w = rnd_w({m, kd}, ++seed, dt).first;
        Tensor dy = ten({n, m}, rnd(n * m, ++seed));
        Tensor dx0 = ten({n, kd}, rnd(n * kd, ++seed)), dw0 = ten({m, kd}, rnd(m * kd, ++seed));
        Tensor db0 = ten({m}, rnd(m, ++seed));
        // dy also given in bf16 for bf16 weights (the LM head's gradient): taken as it is.
        const Tensor dy16 = dt == DType::BF16 ? dy.to_dtype(DType::BF16, kAct) : Tensor();
        // 0: dx dw db, 1: dx only (frozen), 2: dw db only, 3: dx dw db with dw assigned (its
        // random starting values not read; db still accumulates)
        for (int mode = 0; mode < 4; ++mode)
          for (bool acc : {false, true})
            for (bool bf16_dy : {false, true}) {
              if ((mode == 2 && acc) || (bf16_dy && !dy16.defined())) continue;
              static const char* kMode[] = {"", "_dx_only", "_dw_db_only", "_assign_dw"};
              add("linear_backward_" + wtag(dt) + "_N" + str(n) + "_K" + str(kd) + kMode[mode] +
                      (acc ? "_accumulate" : "") + (bf16_dy ? "_bf16_dy" : ""),
                  false, 0.0, [=](Backend b) {
                    Dev g{b};
                    Tensor dx = mode == 2 ? Tensor() : acc ? g.in(dx0) : g.out({n, kd});
                    Tensor dw = mode == 1 ? Tensor() : g.in(dw0), db = mode == 1 ? Tensor() : g.in(db0);
                    CALL(b, linear_backward(dx, dw, db, g.in(bf16_dy ? dy16 : dy), g.in(x), g.in(w), acc,
                                            mode == 3));
                    Outs o;
                    if (dx.defined()) o.push_back({"dx", dx});
                    if (dw.defined()) o.insert(o.end(), {{"dw", dw}, {"db", db}});
                    return o;
                  });
            }
      }

  // rope_backward
  for (int64_t dh : {6, 8})
    for (int64_t past : {0, 5}) {
      Tensor x = ten({2, 3, 3, dh}, rnd(2 * 3 * 3 * dh, ++seed));
      add("rope_backward_Dh" + str(dh) + "_past" + str(past), false, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor xx = g.in(x);
        CALL(b, rope_backward(xx, past, 10000.f));
        return Outs{{"dx", xx}};
      });
    }

  // attention_forward_train / attention_backward
  for (auto heads : {std::pair<int64_t, int64_t>{3, 1}, {4, 2}})
    for (int64_t s : {1, 3, 17, 150})  // 150: several query tiles of the backward, the last partial
      for (int64_t dh : {6, 8, 24}) {  // 8, 24: the register tiles (24: a 16- and an 8-wide part)
        const int64_t h = heads.first, hkv = heads.second;
        const int64_t bn = 2;
        Tensor q = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
        Tensor k = ten({bn, s, hkv, dh}, rnd(bn * s * hkv * dh, ++seed));
        Tensor v = ten({bn, s, hkv, dh}, rnd(bn * s * hkv * dh, ++seed));
        Tensor dout = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
        const std::string sh = "_H" + str(h) + "_Hkv" + str(hkv) + "_S" + str(s) + "_Dh" + str(dh);
        add("attention_forward_train" + sh, false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor out = g.out({bn, s, h, dh}), lse = g.out({bn, h, s});
          CALL(b, attention_forward_train(out, lse, g.in(q), g.in(k), g.in(v)));
          return Outs{{"out", out}, {"lse", lse}};
        });
        Tensor out = Tensor::empty({bn, s, h, dh}, DType::F32, kAct), lse = Tensor::empty({bn, h, s}, DType::F32, kAct);
        ref::attention_forward_train(out, lse, q, k, v);
        add("attention_backward" + sh, false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor dq = g.out(q.shape()), dk = g.out(k.shape()), dv = g.out(v.shape());
          CALL(b, attention_backward(dq, dk, dv, g.in(dout), g.in(q), g.in(k), g.in(v), g.in(out), g.in(lse)));
          return Outs{{"dq", dq}, {"dk", dk}, {"dv", dv}};
        });
      }

  // router_topk_backward, router_stats, router_balance_backward
  for (int64_t t : {1, 17})
    for (int64_t k : {2, 3}) {
      const int64_t e = 5;
      std::vector<double> l = rnd(t * e, ++seed, 2.0);
      Tensor logits = ten({t, e}, l);
      std::vector<int32_t> idx(static_cast<size_t>(t * k));
      std::vector<double> w(static_cast<size_t>(t * k));
      ref::f64::router_topk_forward(idx.data(), w.data(), l.data(), nullptr, t, e, k, false);
      Tensor tidx = ints({t, k}, idx), dtw = ten({t, k}, rnd(t * k, ++seed));
      Tensor gvec = ten({e}, rnd(e, ++seed)), dl0 = ten({t, e}, rnd(t * e, ++seed));
      const std::string sh = "_T" + str(t) + "_K" + str(k);
      for (bool renorm : {false, true})
        add("router_topk_backward" + sh + (renorm ? "_renorm" : ""), false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor dl = g.out({t, e});
          CALL(b, router_topk_backward(dl, g.in(dtw), g.in(logits), g.in(tidx), renorm));
          return Outs{{"dlogits", dl}};
        });
      add("router_stats" + sh, false, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor ps = g.out({e}), cnt = g.out({e}), z = g.out({1});
        CALL(b, router_stats(ps, cnt, z, g.in(logits), g.in(tidx)));
        return Outs{{"prob_sum", ps}, {"count", cnt}, {"z_sum", z}};
      });
      for (int mode = 0; mode < 3; ++mode) {  // 0: aux + z, 1: aux only, 2: z only (g undefined)
        static const char* kMode[] = {"_aux_z", "_aux", "_z"};
        add("router_balance_backward" + sh + kMode[mode], false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor dl = g.in(dl0);
          CALL(b, router_balance_backward(dl, g.in(logits), mode == 2 ? Tensor() : g.in(gvec), 0.37f,
                                          mode == 1 ? 0.f : 0.011f));
          return Outs{{"dlogits", dl}};
        });
      }
    }

  // cross_entropy_forward / backward (rows 1 and 4 ignored; backward also in place)
  for (int64_t n : {1, 6, 17}) {
    const int64_t v = 37;
    Tensor logits = ten({n, v}, rnd(n * v, ++seed, 3.0));
    std::vector<int32_t> tg;
    for (int64_t i = 0; i < n; ++i) tg.push_back(n > 1 && (i == 1 || i == 4) ? -100 : int32_t((i * 13 + 5) % v));
    Tensor targets = ints({n}, tg);
    add("cross_entropy_forward_N" + str(n), false, 0.0, [=](Backend b) {
      Dev g{b};
      Tensor loss = g.out({n});
      CALL(b, cross_entropy_forward(loss, g.in(logits), g.in(targets)));
      return Outs{{"loss", loss}};
    });
    add("cross_entropy_backward_N" + str(n), false, 0.0, [=](Backend b) {
      Dev g{b};
      Tensor dl = g.out({n, v});
      CALL(b, cross_entropy_backward(dl, g.in(logits), g.in(targets), 0.25f));
      Tensor inplace = g.in(logits);
      CALL(b, cross_entropy_backward(inplace, inplace, g.in(targets), 0.25f));
      return Outs{{"dlogits", dl}, {"dlogits_in_place", inplace}};
    });
  }
  // cross_entropy_forward_backward, and all three at a vocabulary long enough for the CPU's
  // vector loops (8 lanes, blocks of 512, a tail of 1000 - 992); rows 1 and 4 ignored.
  for (const auto& nv : {std::pair<int64_t, int64_t>{6, 37}, {5, 1000}}) {
    const int64_t n = nv.first, v = nv.second;  // (clang 14 lambdas cannot capture structured bindings)
    const uint32_t s0 = ++seed;
    auto make = [n, v, s0](Dev& g) {
      std::vector<int32_t> tg;
      for (int64_t i = 0; i < n; ++i) tg.push_back(i == 1 || i == 4 ? -100 : int32_t((i * 131 + 7) % v));
      return std::pair{g.in(ten({n, v}, rnd(n * v, s0, 3.0))), g.in(ints({n}, tg))};
    };
    add("cross_entropy_forward_backward_N" + str(n) + "_V" + str(v), false, 0.0, [=](Backend b) {
      Dev g{b};
      auto [logits, targets] = make(g);
      Tensor loss = g.out({n}), dl = g.out({n, v}), loss2 = g.out({n});
      CALL(b, cross_entropy_forward_backward(loss, dl, logits, targets, 0.25f));
      Tensor inplace = logits;  // the model's use: the logits become their gradient
      CALL(b, cross_entropy_forward_backward(loss2, inplace, inplace, targets, 0.25f));
      return Outs{{"loss", loss}, {"dlogits", dl}, {"loss_in_place", loss2}, {"dlogits_in_place", inplace}};
    });
    if (v < 1000) continue;
    add("cross_entropy_forward_N" + str(n) + "_V" + str(v), false, 0.0, [=](Backend b) {
      Dev g{b};
      auto [logits, targets] = make(g);
      Tensor loss = g.out({n});
      CALL(b, cross_entropy_forward(loss, logits, targets));
      return Outs{{"loss", loss}};
    });
    add("cross_entropy_backward_N" + str(n) + "_V" + str(v), false, 0.0, [=](Backend b) {
      Dev g{b};
      auto [logits, targets] = make(g);
      Tensor dl = g.out({n, v});
      CALL(b, cross_entropy_backward(dl, logits, targets, 0.25f));
      return Outs{{"dlogits", dl}};
    });
  }

  // Quantized weights (q8_0 q4_0 q4_k q5_k q6_k; CPU inference only), once per kernel variant
  // the CPU has (forced, so AVX2 runs on an AVX-512 machine too). The reference multiplies by
  // the dequantized weights exactly; the kernels round the activations to int8 per 32 or 256
  // values, so they are compared at kQuantTol (test_quant_kernels.cpp bounds it per element).
  // Cases added later draw from their own seeds, so the earlier cases keep their data.
  uint32_t late_seed = 50000;
  for (cpu::QuantIsa isa : {cpu::QuantIsa::Avx2, cpu::QuantIsa::Avx512, cpu::QuantIsa::Avx512Vnni}) {
    if (!cpu::quant_isa_supported(isa)) continue;
    const std::string vt = std::string("_") + cpu::quant_isa_name(isa);
    for (DType qt : {DType::Q8_0, DType::Q4_0, DType::Q4_K, DType::Q5_K, DType::Q6_K}) {
      const int64_t be = dtype_block_elems(qt);
      for (int64_t n : {1, 3, 17})
        for (int64_t kb : {1, 3}) {
          const int64_t kd = kb * be, m = kb == 1 ? 11 : 37;
          const uint32_t s0 = seed;
          seed += 3;
          add("linear_forward_" + wtag(qt) + vt + "_N" + str(n) + "_K" + str(kd) + "_M" + str(m) + (n == 3 ? "_bias" : ""),
              false, 0.0, [=](Backend b) {
                // Inputs made here, not with the case: quantizing is too slow to do for every
                // case in every test process (ctest runs each case in its own process).
                Tensor x = ten({n, kd}, rnd(n * kd, s0 + 1));
                Tensor w = ten({m, kd}, rnd(m * kd, s0 + 2, 0.5)).to_dtype(qt, kAct);
                Tensor bs = n == 3 ? ten({m}, rnd(m, s0 + 3)) : Tensor();
                Dev g{b};
                Tensor out = g.out({n, m});
                cpu::set_quant_isa(isa);
                CALL(b, linear_forward(out, g.in(x), g.in(w), g.in(bs)));
                cpu::set_quant_isa(cpu::QuantIsa::Auto);
                return Outs{{"out", out}};
              });
          cs.back().cpu_tol = kQuantTol;
        }
      // linear_forward_cat: q/k/v side by side. K-quants of two dtypes (one token: one rounding of x,
      // q and k of one dtype as one set of streams); q8_0 beside q4_0 (the activations in two
      // layouts); float weights beside a quantized one (one product per part at any N). N 3 with
      // biases.
      if (qt == DType::Q4_K) {
        const std::vector<std::vector<DType>> mixes = {
            {DType::Q4_K, DType::Q4_K, DType::Q6_K}, {DType::Q8_0, DType::Q4_0, DType::Q8_0},
            {DType::F32, DType::BF16, DType::Q8_0}};
        for (const std::vector<DType>& mix : mixes)
          for (int64_t n : {1, 3}) {
            const int64_t kd = 768;
            const int64_t ms[3] = {93, 37, 37};
            const uint32_t s0 = late_seed;
            late_seed += 7;
            add("linear_forward_cat_" + wtag(mix[0]) + "_" + wtag(mix[1]) + "_" + wtag(mix[2]) + vt + "_N" + str(n) +
                    (n == 3 ? "_bias" : ""),
                false, 0.0, [=](Backend b) {
                  Tensor x = ten({n, kd}, rnd(n * kd, s0 + 1));
                  Tensor w[3], bs[3];
                  for (int i = 0; i < 3; ++i) {
                    w[i] = ten({ms[i], kd}, rnd(ms[i] * kd, s0 + 2 + i, 0.5)).to_dtype(mix[i], kAct);
                    if (n == 3) bs[i] = ten({ms[i]}, rnd(ms[i], s0 + 5 + i));
                  }
                  Dev g{b};
                  Tensor out = g.out({n, ms[0] + ms[1] + ms[2]});
                  Tensor gw[3] = {g.in(w[0]), g.in(w[1]), g.in(w[2])}, gb[3] = {g.in(bs[0]), g.in(bs[1]), g.in(bs[2])};
                  cpu::set_quant_isa(isa);
                  CALL(b, linear_forward_cat(out, g.in(x), {{&gw[0], &gb[0]}, {&gw[1], &gb[1]}, {&gw[2], &gb[2]}}));
                  cpu::set_quant_isa(cpu::QuantIsa::Auto);
                  return Outs{{"out", out}};
                });
            cs.back().cpu_tol = kQuantTol;
          }
      }
      // t 12 with F 768, D 512: decode-sized (every expert <= 16 rows, enough work), the CPU's
      // one-region path of weight-row slices (cpu_moe.cpp), two slices of F and of D; t 1 with
      // D 1024: the same path with one row an expert (gate and up as one product, quant_gemv_parts).
      for (int64_t t : {1, 9, 12, -1}) {
        const bool one_row = t == -1;
        if (one_row) t = 1;
        const int64_t e = 5, k = 2, p = t * k;
        const int64_t d = one_row ? 1024 : t == 12 ? 512 : std::max<int64_t>(be, 64),
                      f = one_row || t == 12 ? 768 : be == 32 ? 96 : 256;
        uint32_t& sd = one_row ? late_seed : seed;
        Routing r = route(random_topk(t, {0, 2, 4}, k, ++sd), e);
        Tensor off = ints({e + 1}, r.offsets);
        const uint32_t s0 = sd;
        sd += 5;
        add("expert_ffn_forward_" + wtag(qt) + vt + "_T" + str(t) + "_D" + str(d), false, 0.0, [=](Backend b) {
          Tensor xp = ten({p, d}, rnd(p * d, s0 + 1));  // (made here, as above)
          Tensor w1 = ten({e, f, d}, rnd(e * f * d, s0 + 2, 0.5)).to_dtype(qt, kAct);
          Tensor w3 = ten({e, f, d}, rnd(e * f * d, s0 + 3, 0.5)).to_dtype(qt, kAct);
          Tensor w2 = ten({e, d, f}, rnd(e * d * f, s0 + 4, 0.5)).to_dtype(qt, kAct);
          Tensor rs = ten({p}, rnd(p, s0 + 5));
          Dev g{b};
          Tensor yp = g.out({p, d});
          cpu::set_quant_isa(isa);
          CALL(b, expert_ffn_forward(yp, g.in(xp), g.in(off), g.in(w1), g.in(w3), g.in(w2), g.in(rs)));
          cpu::set_quant_isa(cpu::QuantIsa::Auto);
          return Outs{{"yp", yp}};
        });
        cs.back().cpu_tol = kQuantTol;
      }
    }
  }
  // ---- op variants (variants.h: DeepSeek) ----
  // rope on interleaved pairs (plain and YaRN tables); attention with a softmax scale (cache,
  // paged-free training forward and backward); the router variant (softmax/sigmoid scores, group
  // selection by max or top-2 sum, selection bias, renormalisation, scaling) and its backward; the
  // MLA absorbed products.
  {
    RopeTable pairs;
    pairs.theta = 10000;
    pairs.interleaved = true;
    RopeTable pairs_yarn = rope_table(10000.0, 8, [] {
      RopeScaling r;
      r.kind = RopeScalingKind::Yarn;
      r.factor = 40;
      r.original_max_position_embeddings = 64;
      r.mscale = 1.0;
      r.mscale_all_dim = 0.5;  // attention_factor != 1
      return r;
    }(), 2048);
    pairs_yarn.interleaved = true;
    for (const RopeTable* rt : {&pairs, &pairs_yarn})
      for (int64_t past : {0, 5}) {
        Tensor x = ten({2, 3, 3, 8}, rnd(2 * 3 * 3 * 8, ++seed));
        const RopeTable table = *rt;
        add(std::string("rope_forward_pairs") + (rt == &pairs ? "" : "_yarn") + "_past" + str(past), false, 0.0,
            [=](Backend b) {
              Dev g{b};
              Tensor xx = g.in(x), gg = g.in(x);
              CALL(b, rope_forward(xx, past, table));
              CALL(b, rope_backward(gg, past, table));
              return Outs{{"x", xx}, {"dx", gg}};
            });
      }
    {
      const int64_t bn = 2, h = 4, hkv = 1, dh = 24;  // 24: the prefill path's 16- and 8-wide value tiles
      AttnVariant av;
      av.scale = 0.37f;
      for (int64_t past : {0, 4})
      for (int64_t s : {3, 40}) {
        const int64_t c = past + s + 1;
        Tensor q = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
        Tensor kc = ten({bn, c, hkv, dh}, rnd(bn * c * hkv * dh, ++seed));
        add("attention_forward_scale_past" + str(past) + (s == 3 ? "" : "_S" + str(s)), false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor out = g.out({bn, s, h, dh});
          Tensor kk = g.in(kc);  // keys and values one tensor, as MLA's latent cache
          AttnVariant v = av;
          CALL(b, attention_forward(out, g.in(q), kk, kk, past, v));
          return Outs{{"out", out}};
        });
      }
      for (int64_t s : {5, 70}) {
        Tensor q = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
        Tensor k = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
        Tensor v = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
        Tensor dout = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
        add("attention_forward_train_scale_S" + str(s), false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor out = g.out({bn, s, h, dh}), lse = g.out({bn, h, s});
          CALL(b, attention_forward_train(out, lse, g.in(q), g.in(k), g.in(v), av));
          return Outs{{"out", out}, {"lse", lse}};
        });
        Tensor out = Tensor::empty({bn, s, h, dh}, DType::F32, kAct), lse = Tensor::empty({bn, h, s}, DType::F32, kAct);
        ref::attention_forward_train(out, lse, q, k, v, av);
        add("attention_backward_scale_S" + str(s), false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor dq = g.out(q.shape()), dk = g.out(k.shape()), dv = g.out(v.shape());
          CALL(b, attention_backward(dq, dk, dv, g.in(dout), g.in(q), g.in(k), g.in(v), g.in(out), g.in(lse), av));
          return Outs{{"dq", dq}, {"dk", dk}, {"dv", dv}};
        });
      }
    }
    struct RvCase {
      const char* name;
      RouterVariant rv;
      bool bias;
    };
    auto rvv = [](bool sig, bool renorm, double eps, int64_t ng, int64_t tg, bool top2, double scale) {
      RouterVariant r;
      r.sigmoid = sig;
      r.renorm = renorm;
      r.renorm_eps = eps;
      r.n_group = ng;
      r.topk_group = tg;
      r.group_top2 = top2;
      r.scale = scale;
      return r;
    };
    const RvCase rcases[] = {
        {"v2_greedy", rvv(false, false, 0, 1, 1, false, 1.5), false},
        {"v2_group", rvv(false, false, 0, 4, 2, false, 2.0), false},
        {"v3_noaux", rvv(true, true, 1e-20, 4, 2, true, 2.5), true},
        {"sigmoid_plain", rvv(true, false, 0, 1, 1, false, 1.0), false},
        {"softmax_renorm_bias", rvv(false, true, 0, 1, 1, false, 0.5), true},
    };
    for (const RvCase& rc : rcases)
      for (int64_t t : {7, 33}) {
        const int64_t e = 8, k = 2;
        Tensor lg = ten({t, e}, rnd(t * e, ++seed, 2.0));
        Tensor bias = rc.bias ? ten({e}, rnd(e, ++seed, 0.3)) : Tensor();
        const RouterVariant rv = rc.rv;
        const std::string sh = std::string("_") + rc.name + "_T" + str(t);
        add("router_topk_forward" + sh, false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor idx = g.outi({t, k}), w = g.out({t, k});
          CALL(b, router_topk_forward(idx, w, g.in(lg), rv, g.in(bias)));
          return Outs{{"idx", idx}, {"w", w}};
        });
        Tensor idx = Tensor::empty({t, k}, DType::I32, kAct), w = Tensor::empty({t, k}, DType::F32, kAct);
        ref::router_topk_forward(idx, w, lg, rv, bias);
        Tensor dw = ten({t, k}, rnd(t * k, ++seed));
        add("router_topk_backward" + sh, false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor dl = g.out({t, e});
          CALL(b, router_topk_backward(dl, g.in(dw), g.in(lg), g.in(idx), rv));
          return Outs{{"dlogits", dl}};
        });
      }
    for (int64_t t : {1, 5}) {
      const int64_t h = 3, dn = 4, dr = 2, dv = 5, r = 6, dq = dn + dr, rc = r + dr;
      Tensor q = ten({t, h, dq}, rnd(t * h * dq, ++seed));
      Tensor kvb = ten({h * (dn + dv), r}, rnd(h * (dn + dv) * r, ++seed));
      Tensor qc0 = ten({t, h, rc}, rnd(t * h * rc, ++seed));
      Tensor oc = ten({t, h, rc}, rnd(t * h * rc, ++seed));
      add("mla_absorb_q_T" + str(t), false, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor qc = g.in(qc0);  // columns past R keep their values
        CALL(b, mla_absorb_q(qc, g.in(q), g.in(kvb), dn, dv));
        return Outs{{"qc", qc}};
      });
      add("mla_absorb_out_T" + str(t), false, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor o = g.out({t, h, dv});
        CALL(b, mla_absorb_out(o, g.in(oc), g.in(kvb), dn, dv));
        return Outs{{"o", o}};
      });
    }
  }
  // ---- op variants (variants.h: gpt-oss) ----
  // rope with a YaRN table; attention with sinks and a sliding window (cache, training forward
  // and backward incl. dsinks); experts with the clamped SwiGLU and biases (limit 0.8 with inputs
  // of unit scale: many units beyond the clamps).
  {
    const RopeTable yarn = rope_table(150000.0, 8, [] {
      RopeScaling r;
      r.kind = RopeScalingKind::Yarn;
      r.factor = 32;
      r.original_max_position_embeddings = 64;
      r.truncate = false;
      return r;
    }(), 2048);
    for (int64_t past : {0, 5}) {
      Tensor x = ten({2, 3, 3, 8}, rnd(2 * 3 * 3 * 8, ++seed));
      add("rope_forward_yarn_past" + str(past), false, 0.0, [=](Backend b) {
        Dev g{b};
        Tensor xx = g.in(x), gg = g.in(x);
        CALL(b, rope_forward(xx, past, yarn));
        CALL(b, rope_backward(gg, past, yarn));
        return Outs{{"x", xx}, {"dx", gg}};
      });
    }
    for (int64_t window : {0, 3})
      for (bool sinks : {false, true}) {
        if (!sinks && window == 0) continue;
        const int64_t bn = 2, h = 4, hkv = 2, dh = 8;  // a multiple of 8: the CPU's prefill path at S 40
        Tensor sk = sinks ? ten({h}, rnd(h, ++seed)) : Tensor();
        const AttnVariant av{sk, window};
        const std::string sh = std::string(sinks ? "_sinks" : "") + "_win" + str(window);
        for (int64_t past : {0, 4})
        for (int64_t s : {3, 40}) {  // 40: the CPU's blocked prefill path, the window inside a block
          const int64_t c = past + s + 1;
          Tensor q = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
          Tensor kc = ten({bn, c, hkv, dh}, rnd(bn * c * hkv * dh, ++seed));
          Tensor vc = ten({bn, c, hkv, dh}, rnd(bn * c * hkv * dh, ++seed));
          add("attention_forward" + sh + "_past" + str(past) + (s == 3 ? "" : "_S" + str(s)), false, 0.0, [=](Backend b) {
            Dev g{b};
            Tensor out = g.out({bn, s, h, dh});
            CALL(b, attention_forward(out, g.in(q), g.in(kc), g.in(vc), past, AttnVariant{g.in(sk), window}));
            return Outs{{"out", out}};
          });
        }
        for (int64_t s : {5, 70}) {
          Tensor q = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
          Tensor k = ten({bn, s, hkv, dh}, rnd(bn * s * hkv * dh, ++seed));
          Tensor v = ten({bn, s, hkv, dh}, rnd(bn * s * hkv * dh, ++seed));
          Tensor dout = ten({bn, s, h, dh}, rnd(bn * s * h * dh, ++seed));
          Tensor ds0 = ten({h}, rnd(h, ++seed));
          add("attention_forward_train" + sh + "_S" + str(s), false, 0.0, [=](Backend b) {
            Dev g{b};
            Tensor out = g.out({bn, s, h, dh}), lse = g.out({bn, h, s});
            CALL(b, attention_forward_train(out, lse, g.in(q), g.in(k), g.in(v), AttnVariant{g.in(sk), window}));
            return Outs{{"out", out}, {"lse", lse}};
          });
          Tensor out = Tensor::empty({bn, s, h, dh}, DType::F32, kAct), lse = Tensor::empty({bn, h, s}, DType::F32, kAct);
          ref::attention_forward_train(out, lse, q, k, v, av);
          add("attention_backward" + sh + "_S" + str(s), false, 0.0, [=](Backend b) {
            Dev g{b};
            Tensor dq = g.out(q.shape()), dk = g.out(k.shape()), dv = g.out(v.shape()), dsk = g.in(ds0);
            CALL(b, attention_backward(dq, dk, dv, g.in(dout), g.in(q), g.in(k), g.in(v), g.in(out), g.in(lse),
                                       AttnVariant{g.in(sk), window}, &dsk));
            Outs o{{"dq", dq}, {"dk", dk}, {"dv", dv}};
            if (sinks) o.push_back({"dsinks", dsk});
            return o;
          });
        }
      }
    // Decode-sized batches (every expert <= 16 rows, enough work): the CPU's one-region path of
    // per-thread weight-row slices (cpu_moe.cpp experts_streamed), F and D not multiples of
    // the slices' 8-row steps, the GEMV's blocks or vector widths.
    for (DType dt : kWdt)
      for (bool variant : {false, true}) {
        const int64_t e = 5, k = 2, t = 6, f = 1031, d = 403, p = t * k;
        Routing r = route(random_topk(t, {0, 2, 4}, k, ++seed), e);
        Tensor off = ints({e + 1}, r.offsets);
        const uint32_t s0 = seed;
        seed += 8;
        const ExpertGlu glu = variant ? ExpertGlu{1.702f, 0.8f} : ExpertGlu{};
        add("expert_ffn_forward_decode_sized_" + wtag(dt) + (variant ? "_clamped_bias" : ""), dt != DType::F16,
            ctol(dt), [=](Backend b) {
              // Inputs made here, not with the case: 6M weights per case would be generated in
              // every test process (ctest runs each case in its own process).
              Tensor xp = ten({p, d}, rnd(p * d, s0 + 1));
              Tensor w1 = rnd_w({e, f, d}, s0 + 2, dt).first, w3 = rnd_w({e, f, d}, s0 + 3, dt).first;
              Tensor w2 = rnd_w({e, d, f}, s0 + 4, dt).first;
              Tensor rs = ten({p}, rnd(p, s0 + 5));
              const ExpertBias bias = variant ? ExpertBias{ten({e, f}, rnd(e * f, s0 + 6)),
                                                           ten({e, f}, rnd(e * f, s0 + 7)),
                                                           ten({e, d}, rnd(e * d, s0 + 8))}
                                              : ExpertBias{};
              Dev g{b};
              Tensor yp = g.out({p, d});
              if (variant)
                CALL(b, expert_ffn_forward(yp, g.in(xp), g.in(off), g.in(w1), g.in(w3), g.in(w2), g.in(rs), glu,
                                           ExpertBias{g.in(bias.b1), g.in(bias.b3), g.in(bias.b2)}));
              else
                CALL(b, expert_ffn_forward(yp, g.in(xp), g.in(off), g.in(w1), g.in(w3), g.in(w2), g.in(rs)));
              return Outs{{"yp", yp}};
            });
      }
    for (DType dt : {DType::F32, DType::BF16})
      for (int64_t t : {3, 17}) {
        const int64_t e = 5, k = 2, f = 11, d = 7, p = t * k;
        Routing r = route(random_topk(t, {0, 2, 4}, k, ++seed), e);
        Tensor off = ints({e + 1}, r.offsets);
        Tensor xp = ten({p, d}, rnd(p * d, ++seed, 2.0));
        Tensor w1 = rnd_w({e, f, d}, ++seed, dt).first, w3 = rnd_w({e, f, d}, ++seed, dt).first;
        Tensor w2 = rnd_w({e, d, f}, ++seed, dt).first;
        const ExpertBias bias{ten({e, f}, rnd(e * f, ++seed)), ten({e, f}, rnd(e * f, ++seed)),
                              ten({e, d}, rnd(e * d, ++seed))};
        const ExpertGlu glu{1.702f, 0.8f};
        Tensor rs = ten({p}, rnd(p, ++seed)), dyp = ten({p, d}, rnd(p * d, ++seed));
        const std::string sh = "_clamped_bias_" + wtag(dt) + "_T" + str(t);
        auto dev_bias = [](const Dev& g, const ExpertBias& bb) { return ExpertBias{g.in(bb.b1), g.in(bb.b3), g.in(bb.b2)}; };
        add("expert_ffn_forward" + sh, false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor yp = g.out({p, d});
          CALL(b, expert_ffn_forward(yp, g.in(xp), g.in(off), g.in(w1), g.in(w3), g.in(w2), g.in(rs), glu,
                                     dev_bias(g, bias)));
          return Outs{{"yp", yp}};
        });
        add("expert_ffn_forward_train" + sh, false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor yp = g.out({p, d}), h1 = g.out({p, f}), h3 = g.out({p, f});
          CALL(b, expert_ffn_forward_train(yp, h1, h3, g.in(xp), g.in(off), g.in(w1), g.in(w3), g.in(w2), g.in(rs),
                                           {}, glu, dev_bias(g, bias)));
          return Outs{{"yp", yp}, {"h1", h1}, {"h3", h3}};
        });
        Tensor h1 = Tensor::empty({p, f}, DType::F32, kAct), h3 = Tensor::empty({p, f}, DType::F32, kAct);
        Tensor ypr = Tensor::empty({p, d}, DType::F32, kAct);
        ref::expert_ffn_forward_train(ypr, h1, h3, xp, off, w1, w3, w2, rs, {}, glu, bias);
        const ExpertBias db0{ten({e, f}, rnd(e * f, ++seed)), ten({e, f}, rnd(e * f, ++seed)),
                             ten({e, d}, rnd(e * d, ++seed))};
        add("expert_ffn_backward" + sh + "_frozen", false, 0.0, [=](Backend b) {  // the biases frozen too
          Dev g{b};
          Tensor dx = g.out({p, d}), drs = g.out({p}), none;
          CALL(b, expert_ffn_backward(dx, none, none, none, drs, g.in(dyp), g.in(xp), g.in(h1), g.in(h3), g.in(off),
                                      g.in(w1), g.in(w3), g.in(w2), g.in(rs), {}, nullptr, glu, dev_bias(g, bias)));
          return Outs{{"dxp", dx}, {"drow_scale", drs}};
        });
        add("expert_ffn_backward" + sh, false, 0.0, [=](Backend b) {
          Dev g{b};
          Tensor dx = g.out({p, d}), drs = g.out({p}), none;
          ExpertBias db = dev_bias(g, db0);
          CALL(b, expert_ffn_backward(dx, none, none, none, drs, g.in(dyp), g.in(xp), g.in(h1), g.in(h3), g.in(off),
                                      g.in(w1), g.in(w3), g.in(w2), g.in(rs), {}, nullptr, glu, dev_bias(g, bias),
                                      &db));
          return Outs{{"dxp", dx}, {"drow_scale", drs}, {"db1", db.b1}, {"db3", db.b3}, {"db2", db.b2}};
        });
      }
  }
  return cs;
}

const std::vector<Case>& cases() {
  static const std::vector<Case> cs = make_cases();
  return cs;
}

std::vector<size_t> case_ids(bool cuda_only) {
  std::vector<size_t> ids;
  for (size_t i = 0; i < cases().size(); ++i)
    if (!cuda_only || cases()[i].cuda) ids.push_back(i);
  return ids;
}

std::string case_name(const testing::TestParamInfo<size_t>& info) { return cases()[info.param].name; }

// Compares one backend's outputs with the reference's: same names, index outputs equal and
// never left poisoned, float outputs finite and within tol (normwise).
void compare(const Outs& got, const Outs& want, double tol, const std::string& what) {
  ASSERT_EQ(got.size(), want.size()) << what;
  for (size_t i = 0; i < got.size(); ++i) {
    const std::string name = what + " " + want[i].first;
    ASSERT_EQ(got[i].first, want[i].first) << what;
    const Tensor& a = got[i].second;
    const Tensor& r = want[i].second;
    ASSERT_EQ(a.shape(), r.shape()) << name;
    ASSERT_EQ(a.dtype(), r.dtype()) << name;
    if (r.dtype() == DType::I32) {
      std::vector<int32_t> ai = ivals(a), ri = ivals(r);
      EXPECT_EQ(std::count(ri.begin(), ri.end(), kIntPoison), 0) << name << ": reference left elements unwritten";
      EXPECT_EQ(ai, ri) << name;
      continue;
    }
    std::vector<double> av = vals(a), rv = vals(r);
    for (size_t j = 0; j < rv.size(); ++j)
      ASSERT_TRUE(std::isfinite(rv[j])) << name << ": reference element " << j << " is " << rv[j];
    const double e = rel_err(av, rv);
    EXPECT_LE(e, tol) << name << ": normwise relative error " << e;
  }
}

class OpsBackend : public testing::TestWithParam<size_t> {
 protected:
  void SetUp() override { set_reference_backend(false); }
};

class CpuVsRef : public OpsBackend {};
class CudaVsRef : public OpsBackend {};

TEST_P(CpuVsRef, Matches) {
  const Case& c = cases()[GetParam()];
  Outs want = c.run(Backend::Ref);
  Outs got = c.run(Backend::Cpu);
  compare(got, want, c.cpu_tol, c.name + " (cpu vs ref)");
}

TEST_P(CudaVsRef, Matches) {
  if (!cuda_available()) GTEST_SKIP() << "no GPU: the CUDA op comparison did not run";
  const Case& c = cases()[GetParam()];
  Outs want = c.run(Backend::Ref);
  Outs got = c.run(Backend::Cuda);
  compare(got, want, c.cuda_tol, c.name + " (cuda vs ref)");
}

INSTANTIATE_TEST_SUITE_P(Ops, CpuVsRef, testing::ValuesIn(case_ids(false)), case_name);
INSTANTIATE_TEST_SUITE_P(Ops, CudaVsRef, testing::ValuesIn(case_ids(true)), case_name);

// ---- finite differences ----

// Central differences of loss() w.r.t. every element of v (v is restored).
std::vector<double> fd_grad(std::vector<double>& v, const std::function<double()>& loss, double h = 1e-5) {
  std::vector<double> g(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const double x0 = v[i];
    v[i] = x0 + h;
    const double lp = loss();
    v[i] = x0 - h;
    const double lm = loss();
    v[i] = x0;
    g[i] = (lp - lm) / (2 * h);
  }
  return g;
}

double dotv(const std::vector<double>& a, const std::vector<double>& b) {
  double s = 0;
  for (size_t i = 0; i < a.size(); ++i) s += a[i] * b[i];
  return s;
}

std::vector<double> sub(const std::vector<double>& a, const std::vector<double>& b) {
  std::vector<double> c(a.size());
  for (size_t i = 0; i < a.size(); ++i) c[i] = a[i] - b[i];
  return c;
}

// The reference gradient (double) against FD to kFdTol, and the CPU's (f32) to kFdF32Tol.
void expect_grad(const std::string& what, const std::vector<double>& fd, const std::vector<double>& ref_g,
                 const std::vector<double>& cpu_g) {
  double n = 0;
  for (double x : fd) n += x * x;
  ASSERT_GT(n, 0) << what << ": the finite-difference gradient is zero (the test checks nothing)";
  const double er = rel_err(ref_g, fd), ec = rel_err(cpu_g, fd);
  EXPECT_LE(er, kFdTol) << what << ": reference backward vs finite differences, rel err " << er;
  EXPECT_LE(ec, kFdF32Tol) << what << ": cpu backward vs finite differences, rel err " << ec;
}

// moe_capacity_drop on a hand-worked example (Switch top-1, E=3, capacity 2): tokens 0,2,3 chose
// expert 0 and 1,4 expert 1. Expert 0 keeps tokens 0 and 2 (the earliest), token 3 is dropped.
TEST(CapacityDrop, HandExample) {
  for (Backend b : {Backend::Cpu, Backend::Ref}) {
    set_reference_backend(false);
    Tensor idx = ints({5, 1}, {0, 1, 0, 0, 1});
    Tensor off = ints({4}, std::vector<int32_t>(4, kIntPoison)), pm = ints({5}, std::vector<int32_t>(5, kIntPoison)),
           iv = ints({5}, std::vector<int32_t>(5, kIntPoison));
    moe_dispatch(off, pm, iv, idx, 3);
    ASSERT_EQ(ivals(off), (std::vector<int32_t>{0, 3, 5, 5}));
    CALL(b, moe_capacity_drop(off, pm, iv, 2));
    const char* tag = b == Backend::Cpu ? "cpu" : "ref";
    EXPECT_EQ(ivals(off), (std::vector<int32_t>{0, 2, 4, 4})) << tag;
    EXPECT_EQ(ivals(pm), (std::vector<int32_t>{0, 2, 1, 4, 3})) << tag;
    EXPECT_EQ(ivals(iv), (std::vector<int32_t>{0, 2, 1, 4, 3})) << tag;
  }
}

TEST(Grad, Embedding) {
  for (int64_t pad : {-1, 3}) {
    const int64_t v = 11, d = 7, t = 9;
    std::vector<int32_t> id = {3, 1, 4, 1, 5, 9, 2, 6, 3};
    std::vector<double> table = rnd(v * d, 1), r = rnd(t * d, 2), dt0 = rnd(v * d, 3);
    auto loss = [&] {
      std::vector<double> out(static_cast<size_t>(t * d));
      ref::f64::embedding_forward(out.data(), id.data(), table.data(), t, v, d);
      return dotv(r, out);
    };
    std::vector<double> fd = fd_grad(table, loss);
    // The padding row gets no gradient (HF nn.Embedding(padding_idx)): not what FD says.
    if (pad >= 0)
      for (int64_t i = 0; i < d; ++i) fd[pad * d + i] = 0;
    std::vector<double> gr = dt0;
    ref::f64::embedding_backward(gr.data(), r.data(), id.data(), pad, t, v, d);
    Tensor dtable = ten({v, d}, dt0);
    embedding_backward(dtable, ten({t, d}, r), ints({t}, id), pad);
    std::vector<double> gc = vals(dtable);
    expect_grad("embedding pad=" + str(pad), fd, sub(gr, dt0), sub(gc, dt0));
    if (pad >= 0) {
      for (int64_t i = 0; i < d; ++i) EXPECT_EQ(gc[pad * d + i], dt0[pad * d + i]) << "padding row touched";
    }
  }
}

TEST(Grad, RmsNorm) {
  for (int64_t d : {7, 33})
    for (bool acc : {false, true}) {
      const int64_t n = 3;
      std::vector<double> x = rnd(n * d, 10 + d, 2.0), w = rnd(d, 11), r = rnd(n * d, 12);
      std::vector<double> dx0 = rnd(n * d, 13), dw0 = rnd(d, 14);
      auto loss = [&] {
        std::vector<double> out(static_cast<size_t>(n * d));
        ref::f64::rmsnorm_forward(out.data(), nullptr, x.data(), w.data(), 1e-5, n, d);
        return dotv(r, out);
      };
      std::vector<double> fdx = fd_grad(x, loss), fdw = fd_grad(w, loss);
      std::vector<double> rstd(static_cast<size_t>(n)), tmp(static_cast<size_t>(n * d));
      ref::f64::rmsnorm_forward(tmp.data(), rstd.data(), x.data(), w.data(), 1e-5, n, d);
      std::vector<double> gx = dx0, gw = dw0;
      ref::f64::rmsnorm_backward(gx.data(), gw.data(), r.data(), x.data(), w.data(), rstd.data(), acc, n, d);
      // CPU: forward_train for rstd, then backward.
      Tensor xt = ten({n, d}, x), wt = ten({d}, w), out = Tensor::empty({n, d}, DType::F32, kAct);
      Tensor rs = Tensor::empty({n}, DType::F32, kAct);
      rmsnorm_forward_train(out, rs, xt, wt, 1e-5f);
      Tensor dx = ten({n, d}, dx0), dw = ten({d}, dw0);
      rmsnorm_backward(dx, dw, ten({n, d}, r), xt, wt, rs, acc);
      const std::string what = "rmsnorm D=" + str(d) + (acc ? " accumulate" : "");
      expect_grad(what + " dx", fdx, acc ? sub(gx, dx0) : gx, acc ? sub(vals(dx), dx0) : vals(dx));
      expect_grad(what + " dw", fdw, sub(gw, dw0), sub(vals(dw), dw0));
    }
}

TEST(Grad, Linear) {
  for (int64_t n : {3, 17})
    for (bool acc : {false, true}) {
      const int64_t m = 11, kd = 7;
      std::vector<double> x = rnd(n * kd, 20 + n), w = rnd(m * kd, 21), bias = rnd(m, 22), r = rnd(n * m, 23);
      std::vector<double> dx0 = rnd(n * kd, 24), dw0 = rnd(m * kd, 25), db0 = rnd(m, 26);
      auto loss = [&] {
        std::vector<double> out(static_cast<size_t>(n * m));
        ref::f64::linear_forward(out.data(), x.data(), w.data(), bias.data(), n, m, kd);
        return dotv(r, out);
      };
      std::vector<double> fdx = fd_grad(x, loss), fdw = fd_grad(w, loss), fdb = fd_grad(bias, loss);
      std::vector<double> gx = dx0, gw = dw0, gb = db0;
      ref::f64::linear_backward(gx.data(), gw.data(), gb.data(), r.data(), x.data(), w.data(), acc, n, m, kd);
      Tensor dx = ten({n, kd}, dx0), dw = ten({m, kd}, dw0), db = ten({m}, db0);
      linear_backward(dx, dw, db, ten({n, m}, r), ten({n, kd}, x), ten({m, kd}, w), acc);
      const std::string what = "linear N=" + str(n) + (acc ? " accumulate" : "");
      expect_grad(what + " dx", fdx, acc ? sub(gx, dx0) : gx, acc ? sub(vals(dx), dx0) : vals(dx));
      expect_grad(what + " dw", fdw, sub(gw, dw0), sub(vals(dw), dw0));
      expect_grad(what + " db", fdb, sub(gb, db0), sub(vals(db), db0));
    }
}

TEST(Grad, Rope) {
  for (int64_t dh : {6, 8}) {
    const int64_t bn = 2, s = 3, h = 3, past = 5, n = bn * s * h * dh;
    std::vector<double> x = rnd(n, 30 + dh), r = rnd(n, 31);
    auto loss = [&] {
      std::vector<double> y = x;
      ref::f64::rope_forward(y.data(), bn, s, h, dh, past, 10000.0);
      return dotv(r, y);
    };
    std::vector<double> fd = fd_grad(x, loss);
    std::vector<double> g = r;
    ref::f64::rope_backward(g.data(), bn, s, h, dh, past, 10000.0);
    Tensor gt = ten({bn, s, h, dh}, r);
    rope_backward(gt, past, 10000.f);
    expect_grad("rope Dh=" + str(dh), fd, g, vals(gt));
  }
}

TEST(Grad, Attention) {
  for (auto heads : {std::pair<int64_t, int64_t>{3, 1}, {4, 2}})
    for (int64_t dh : {6, 8}) {
      const int64_t h = heads.first, hkv = heads.second;
      const int64_t bn = 2, s = 5, nq = bn * s * h * dh, nk = bn * s * hkv * dh;
      std::vector<double> q = rnd(nq, 40 + h), k = rnd(nk, 41 + dh), v = rnd(nk, 42), r = rnd(nq, 43);
      auto fwd = [&](std::vector<double>& out, std::vector<double>& lse) {
        out.assign(static_cast<size_t>(nq), 0);
        lse.assign(static_cast<size_t>(bn * h * s), 0);
        ref::f64::attention_forward_train(out.data(), lse.data(), q.data(), k.data(), v.data(), bn, s, h, hkv, dh);
      };
      auto loss = [&] {
        std::vector<double> out, lse;
        fwd(out, lse);
        return dotv(r, out);
      };
      std::vector<double> fdq = fd_grad(q, loss), fdk = fd_grad(k, loss), fdv = fd_grad(v, loss);
      std::vector<double> out, lse, gq(static_cast<size_t>(nq)), gk(static_cast<size_t>(nk)), gv(static_cast<size_t>(nk));
      fwd(out, lse);
      ref::f64::attention_backward(gq.data(), gk.data(), gv.data(), r.data(), q.data(), k.data(), v.data(),
                                   out.data(), lse.data(), bn, s, h, hkv, dh);
      Tensor qt = ten({bn, s, h, dh}, q), kt = ten({bn, s, hkv, dh}, k), vt = ten({bn, s, hkv, dh}, v);
      Tensor ot = Tensor::empty(qt.shape(), DType::F32, kAct), lt = Tensor::empty({bn, h, s}, DType::F32, kAct);
      attention_forward_train(ot, lt, qt, kt, vt);
      Tensor dq = Tensor::empty(qt.shape(), DType::F32, kAct), dk = Tensor::empty(kt.shape(), DType::F32, kAct);
      Tensor dv = Tensor::empty(vt.shape(), DType::F32, kAct);
      attention_backward(dq, dk, dv, ten(qt.shape(), r), qt, kt, vt, ot, lt);
      const std::string what = "attention H=" + str(h) + " Hkv=" + str(hkv) + " Dh=" + str(dh);
      expect_grad(what + " dq", fdq, gq, vals(dq));
      expect_grad(what + " dk", fdk, gk, vals(dk));
      expect_grad(what + " dv", fdv, gv, vals(dv));
    }
}

TEST(Grad, RouterTopk) {
  for (int64_t k : {2, 3})
    for (bool renorm : {false, true}) {
      const int64_t t = 7, e = 5;
      std::vector<double> l = rnd(t * e, 50 + k, 2.0), r = rnd(t * k, 51);
      std::vector<int32_t> idx0(static_cast<size_t>(t * k));
      std::vector<double> w(static_cast<size_t>(t * k));
      ref::f64::router_topk_forward(idx0.data(), w.data(), l.data(), nullptr, t, e, k, renorm);
      auto loss = [&] {
        std::vector<int32_t> idx(static_cast<size_t>(t * k));
        ref::f64::router_topk_forward(idx.data(), w.data(), l.data(), nullptr, t, e, k, renorm);
        EXPECT_EQ(idx, idx0) << "a perturbation changed the top-k selection (pick other seeds)";
        return dotv(r, w);
      };
      std::vector<double> fd = fd_grad(l, loss);
      std::vector<double> g(static_cast<size_t>(t * e));
      ref::f64::router_topk_backward(g.data(), r.data(), l.data(), idx0.data(), t, e, k, renorm);
      Tensor dl = Tensor::empty({t, e}, DType::F32, kAct);
      router_topk_backward(dl, ten({t, k}, r), ten({t, e}, l), ints({t, k}, idx0), renorm);
      expect_grad("router_topk K=" + str(k) + (renorm ? " renorm" : ""), fd, g, vals(dl));
    }
}

// L = aux_scale * <g, prob_sum> + z_scale * z_sum, with router_stats as the forward: the
// gradient router_balance_backward adds must be dL/dlogits.
TEST(Grad, RouterBalance) {
  for (int mode = 0; mode < 3; ++mode) {  // aux + z, aux only, z only (g undefined)
    const int64_t t = 7, e = 5, k = 2;
    const double aux = mode == 2 ? 0.0 : 0.37, z = mode == 1 ? 0.0 : 0.011;
    std::vector<double> l = rnd(t * e, 60, 2.0), gv = rnd(e, 61), dl0 = rnd(t * e, 62);
    std::vector<int32_t> idx = random_topk(t, {0, 1, 2, 3, 4}, k, 63);
    auto loss = [&] {
      std::vector<double> ps(static_cast<size_t>(e)), cnt(static_cast<size_t>(e)), zs(1);
      ref::f64::router_stats(ps.data(), cnt.data(), zs.data(), l.data(), idx.data(), t, e, k);
      return aux * dotv(gv, ps) + z * zs[0];
    };
    std::vector<double> fd = fd_grad(l, loss);
    std::vector<double> g = dl0;
    ref::f64::router_balance_backward(g.data(), l.data(), mode == 2 ? nullptr : gv.data(), aux, z, t, e);
    Tensor dl = ten({t, e}, dl0);
    router_balance_backward(dl, ten({t, e}, l), mode == 2 ? Tensor() : ten({e}, gv), float(aux), float(z));
    expect_grad("router_balance mode " + str(mode), fd, sub(g, dl0), sub(vals(dl), dl0));
  }
}

TEST(Grad, PermuteWeights) {
  const int64_t t = 7, k = 2, e = 5, p = t * k;
  Routing rt = route(random_topk(t, {0, 1, 2, 3, 4}, k, 70), e);
  std::vector<double> tw = rnd(p, 71), r = rnd(p, 72);
  auto loss = [&] {
    std::vector<double> rs(static_cast<size_t>(p));
    ref::f64::permute_weights(rs.data(), tw.data(), rt.perm.data(), p);
    return dotv(r, rs);
  };
  std::vector<double> fd = fd_grad(tw, loss), g(static_cast<size_t>(p));
  ref::f64::permute_weights_backward(g.data(), r.data(), rt.perm.data(), p);
  Tensor dtw = Tensor::empty({t, k}, DType::F32, kAct);
  permute_weights_backward(dtw, ten({p}, r), ints({p}, rt.perm));
  expect_grad("permute_weights", fd, g, vals(dtw));
}

TEST(Grad, ExpertFfn) {
  for (bool scaled : {false, true}) {
    const int64_t t = 7, k = 2, e = 5, f = 11, d = 7, p = t * k;
    Routing rt = route(random_topk(t, {0, 1, 3, 4}, k, 80), e);  // expert 2 gets no rows
    ASSERT_EQ(rt.offsets[2], rt.offsets[3]);
    std::vector<double> xp = rnd(p * d, 81), w1 = rnd(e * f * d, 82, 0.5), w3 = rnd(e * f * d, 83, 0.5);
    std::vector<double> w2 = rnd(e * d * f, 84, 0.5), rs = rnd(p, 85), r = rnd(p * d, 86);
    std::vector<double> dw10 = rnd(e * f * d, 87), dw30 = rnd(e * f * d, 88), dw20 = rnd(e * d * f, 89);
    const double* rsp = scaled ? rs.data() : nullptr;
    auto loss = [&] {
      std::vector<double> yp(static_cast<size_t>(p * d));
      ref::f64::expert_ffn_forward(yp.data(), nullptr, nullptr, xp.data(), rt.offsets.data(), w1.data(), w3.data(),
                                   w2.data(), rsp, e, f, d);
      return dotv(r, yp);
    };
    std::vector<double> fdx = fd_grad(xp, loss), fd1 = fd_grad(w1, loss), fd3 = fd_grad(w3, loss);
    std::vector<double> fd2 = fd_grad(w2, loss), fds = fd_grad(rs, loss);
    std::vector<double> yp(static_cast<size_t>(p * d)), h1(static_cast<size_t>(p * f)), h3(static_cast<size_t>(p * f));
    ref::f64::expert_ffn_forward(yp.data(), h1.data(), h3.data(), xp.data(), rt.offsets.data(), w1.data(), w3.data(),
                                 w2.data(), rsp, e, f, d);
    std::vector<double> gx(static_cast<size_t>(p * d)), g1 = dw10, g3 = dw30, g2 = dw20, gs(static_cast<size_t>(p));
    ref::f64::expert_ffn_backward(gx.data(), g1.data(), g3.data(), g2.data(), scaled ? gs.data() : nullptr, r.data(),
                                  xp.data(), h1.data(), h3.data(), rt.offsets.data(), w1.data(), w3.data(), w2.data(),
                                  rsp, e, f, d);
    // CPU: forward_train for h1/h3, then backward.
    Tensor off = ints({e + 1}, rt.offsets), xt = ten({p, d}, xp);
    Tensor w1t = ten({e, f, d}, w1), w3t = ten({e, f, d}, w3), w2t = ten({e, d, f}, w2);
    Tensor rst = scaled ? ten({p}, rs) : Tensor();
    Tensor ypt = Tensor::empty({p, d}, DType::F32, kAct), h1t = Tensor::empty({p, f}, DType::F32, kAct);
    Tensor h3t = Tensor::empty({p, f}, DType::F32, kAct);
    expert_ffn_forward_train(ypt, h1t, h3t, xt, off, w1t, w3t, w2t, rst);
    Tensor dx = Tensor::empty({p, d}, DType::F32, kAct), dw1 = ten({e, f, d}, dw10), dw3 = ten({e, f, d}, dw30);
    Tensor dw2 = ten({e, d, f}, dw20), drs = scaled ? Tensor::empty({p}, DType::F32, kAct) : Tensor();
    expert_ffn_backward(dx, dw1, dw3, dw2, drs, ten({p, d}, r), xt, h1t, h3t, off, w1t, w3t, w2t, rst);
    const std::string what = std::string("expert_ffn") + (scaled ? " scaled" : "");
    expect_grad(what + " dxp", fdx, gx, vals(dx));
    expect_grad(what + " dw1", fd1, sub(g1, dw10), sub(vals(dw1), dw10));
    expect_grad(what + " dw3", fd3, sub(g3, dw30), sub(vals(dw3), dw30));
    expect_grad(what + " dw2", fd2, sub(g2, dw20), sub(vals(dw2), dw20));
    if (scaled) expect_grad(what + " drow_scale", fds, gs, vals(drs));
    // The expert without rows: its weight gradients untouched, bit for bit.
    std::vector<double> c1 = vals(dw1), c3 = vals(dw3), c2 = vals(dw2);
    for (int64_t i = 2 * f * d; i < 3 * f * d; ++i) {
      ASSERT_EQ(c1[i], dw10[i]) << "dw1 of the expert without rows was touched";
      ASSERT_EQ(c3[i], dw30[i]) << "dw3 of the expert without rows was touched";
      ASSERT_EQ(c2[i], dw20[i]) << "dw2 of the expert without rows was touched";
    }
  }
}

// LoRA on a projection that is one part of a wider (stacked) output: columns [col0, col0+M).
TEST(Grad, Lora) {
  for (float p : {0.0f, 0.3f}) {
    SCOPED_TRACE(testing::Message() << "dropout " << p);
    const int64_t n = 5, kd = 9, m = 7, r = 3, width = 13, col0 = 4;
    const double scale = 0.75;
    const uint64_t seed = 77;
    std::vector<double> x = rnd(n * kd, 90), a = rnd(r * kd, 91, 0.5), b = rnd(m * r, 92, 0.5), rr = rnd(n * width, 93);
    std::vector<double> out0 = rnd(n * width, 94), da0 = rnd(r * kd, 95), db0 = rnd(m * r, 96), dx0 = rnd(n * kd, 97);
    auto loss = [&] {
      std::vector<double> out = out0;
      ref::f64::LoraF64 l{a.data(), b.data(), scale, r, nullptr, nullptr, p, seed, 0};
      ref::f64::lora_forward(out.data(), width, col0, x.data(), l, n, m, kd);
      return dotv(rr, out);
    };
    std::vector<double> fdx = fd_grad(x, loss), fda = fd_grad(a, loss), fdb = fd_grad(b, loss);
    std::vector<double> gx = dx0, ga = da0, gb = db0;
    ref::f64::LoraF64 l{a.data(), b.data(), scale, r, ga.data(), gb.data(), p, seed, 0};
    ref::f64::lora_backward(gx.data(), rr.data(), width, col0, x.data(), l, n, m, kd);
    Lora lt{ten({r, kd}, a), ten({m, r}, b), static_cast<float>(scale), p, seed};
    Tensor dx = ten({n, kd}, dx0), da = ten({r, kd}, da0), db = ten({m, r}, db0);
    lora_backward(dx, da, db, ten({n, width}, rr), col0, ten({n, kd}, x), lt);
    expect_grad("lora dx", fdx, sub(gx, dx0), sub(vals(dx), dx0));
    expect_grad("lora da", fda, sub(ga, da0), sub(vals(da), da0));
    expect_grad("lora db", fdb, sub(gb, db0), sub(vals(db), db0));
    // The forward adds only into its columns.
    Tensor out = ten({n, width}, out0);
    lora_forward(out, col0, ten({n, kd}, x), lt);
    std::vector<double> o = vals(out);
    for (int64_t t = 0; t < n; ++t)
      for (int64_t j = 0; j < width; ++j)
        if (j < col0 || j >= col0 + m) {
          ASSERT_EQ(o[t * width + j], out0[t * width + j]) << "column " << j << " written";
        }
  }
}

// The dropout mask keeps about 1 − p of the elements, and differs between seeds.
TEST(Grad, LoraDropoutMask) {
  const int64_t n = 100000;
  int64_t kept = 0, same = 0;
  for (int64_t i = 0; i < n; ++i) {
    const bool k1 = lora_keep(5, uint64_t(i), 0.25f), k2 = lora_keep(6, uint64_t(i), 0.25f);
    kept += k1;
    same += k1 == k2;
  }
  EXPECT_NEAR(double(kept) / n, 0.75, 0.01);
  EXPECT_NEAR(double(same) / n, 0.75 * 0.75 + 0.25 * 0.25, 0.01) << "masks of two seeds look correlated";
}

// Split LoRA on the grouped experts with a frozen base: the adapters' gradients against finite
// differences, the base gets none, and the expert without rows keeps its LoRA gradients.
TEST(Grad, ExpertFfnLora) {
  for (float drop : {0.0f, 0.25f}) {
    SCOPED_TRACE(testing::Message() << "dropout " << drop);
    const int64_t t = 7, k = 2, e = 5, f = 11, d = 7, p = t * k, r = 3;
    const double s1 = 0.5, s3 = 1.5, s2 = 2.0;
    Routing rt = route(random_topk(t, {0, 1, 3, 4}, k, 180), e);  // expert 2 gets no rows
    std::vector<double> xp = rnd(p * d, 181), w1 = rnd(e * f * d, 182, 0.5), w3 = rnd(e * f * d, 183, 0.5);
    std::vector<double> w2 = rnd(e * d * f, 184, 0.5), rs = rnd(p, 185), rr = rnd(p * d, 186);
    std::vector<double> a1 = rnd(e * r * d, 187, 0.5), b1 = rnd(e * f * r, 188, 0.5), a3 = rnd(e * r * d, 189, 0.5);
    std::vector<double> b3 = rnd(e * f * r, 190, 0.5), a2 = rnd(e * r * f, 191, 0.5), b2 = rnd(e * d * r, 192, 0.5);
    auto lora3 = [&](double* da1, double* db1, double* da3, double* db3, double* da2, double* db2) {
      return std::vector<ref::f64::LoraF64>{{a1.data(), b1.data(), s1, r, da1, db1, drop, 11, 0},
                                            {a3.data(), b3.data(), s3, r, da3, db3, drop, 13, 0},
                                            {a2.data(), b2.data(), s2, r, da2, db2, drop, 17, 0}};
    };
    auto loss = [&] {
      std::vector<double> yp(static_cast<size_t>(p * d));
      auto ls = lora3(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
      ref::f64::expert_ffn_forward(yp.data(), nullptr, nullptr, xp.data(), rt.offsets.data(), w1.data(), w3.data(),
                                   w2.data(), rs.data(), e, f, d, ls.data());
      return dotv(rr, yp);
    };
    std::vector<double> fdx = fd_grad(xp, loss), fs = fd_grad(rs, loss);
    std::vector<double> fa1 = fd_grad(a1, loss), fb1 = fd_grad(b1, loss), fa3 = fd_grad(a3, loss);
    std::vector<double> fb3 = fd_grad(b3, loss), fa2 = fd_grad(a2, loss), fb2 = fd_grad(b2, loss);
    // reference (double)
    std::vector<double> h1(static_cast<size_t>(p * f)), h3(static_cast<size_t>(p * f)), yp(static_cast<size_t>(p * d));
    {
      auto ls = lora3(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr);
      ref::f64::expert_ffn_forward(yp.data(), h1.data(), h3.data(), xp.data(), rt.offsets.data(), w1.data(), w3.data(),
                                   w2.data(), rs.data(), e, f, d, ls.data());
    }
    std::vector<double> ga1(a1.size()), gb1(b1.size()), ga3(a3.size()), gb3(b3.size()), ga2(a2.size()), gb2(b2.size());
    std::vector<double> gx(static_cast<size_t>(p * d)), gs(static_cast<size_t>(p));
    {
      auto ls = lora3(ga1.data(), gb1.data(), ga3.data(), gb3.data(), ga2.data(), gb2.data());
      ref::f64::expert_ffn_backward(gx.data(), nullptr, nullptr, nullptr, gs.data(), rr.data(), xp.data(), h1.data(),
                                    h3.data(), rt.offsets.data(), w1.data(), w3.data(), w2.data(), rs.data(), e, f, d,
                                    ls.data());
    }
    // CPU (f32), the base frozen (no dw), LoRA gradients poisoned on the idle expert to see them kept.
    Tensor off = ints({e + 1}, rt.offsets), xt = ten({p, d}, xp), rst = ten({p}, rs);
    ExpertLora el{{ten({e, r, d}, a1), ten({e, f, r}, b1), float(s1), drop, 11},
                  {ten({e, r, d}, a3), ten({e, f, r}, b3), float(s3), drop, 13},
                  {ten({e, r, f}, a2), ten({e, d, r}, b2), float(s2), drop, 17}};
    auto zeros = [](const Tensor& like) { return Tensor::zeros(like.shape(), DType::F32, kAct); };
    ExpertLora gl{{zeros(el.w1.a), zeros(el.w1.b)}, {zeros(el.w3.a), zeros(el.w3.b)}, {zeros(el.w2.a), zeros(el.w2.b)}};
    for (Lora* g : {&gl.w1, &gl.w3, &gl.w2})
      for (Tensor* tt : {&g->a, &g->b}) {
        Tensor slice = tt->select(2);
        std::fill(slice.data<float>(), slice.data<float>() + slice.numel(), 7.0f);
      }
    Tensor ypt = Tensor::empty({p, d}, DType::F32, kAct), h1t = Tensor::empty({p, f}, DType::F32, kAct);
    Tensor h3t = Tensor::empty({p, f}, DType::F32, kAct);
    Tensor w1t = ten({e, f, d}, w1), w3t = ten({e, f, d}, w3), w2t = ten({e, d, f}, w2), none;
    expert_ffn_forward_train(ypt, h1t, h3t, xt, off, w1t, w3t, w2t, rst, el);
    EXPECT_LE(rel_err(vals(ypt), yp), kCpuTol) << "expert LoRA forward: cpu vs reference";
    Tensor dx = Tensor::empty({p, d}, DType::F32, kAct), drs = Tensor::empty({p}, DType::F32, kAct);
    expert_ffn_backward(dx, none, none, none, drs, ten({p, d}, rr), xt, h1t, h3t, off, w1t, w3t, w2t, rst, el, &gl);
    auto active = [&](const Tensor& g) {  // the gradient without the idle expert's (poisoned) slice
      std::vector<double> v = vals(g);
      const int64_t per = g.numel() / e;
      for (int64_t i = 2 * per; i < 3 * per; ++i) {
        EXPECT_EQ(v[i], 7.0) << "the idle expert's LoRA gradient was touched";
        v[i] = 0;
      }
      return v;
    };
    expect_grad("expert lora dxp", fdx, gx, vals(dx));
    expect_grad("expert lora drow_scale", fs, gs, vals(drs));
    expect_grad("expert lora da1", fa1, ga1, active(gl.w1.a));
    expect_grad("expert lora db1", fb1, gb1, active(gl.w1.b));
    expect_grad("expert lora da3", fa3, ga3, active(gl.w3.a));
    expect_grad("expert lora db3", fb3, gb3, active(gl.w3.b));
    expect_grad("expert lora da2", fa2, ga2, active(gl.w2.a));
    expect_grad("expert lora db2", fb2, gb2, active(gl.w2.b));
  }
}

TEST(Grad, Swiglu) {
  const int64_t n = 3 * 11;
  std::vector<double> h1 = rnd(n, 90, 3.0), h3 = rnd(n, 91), r = rnd(n, 92);
  auto loss = [&] {
    std::vector<double> out(static_cast<size_t>(n));
    ref::f64::swiglu_forward(out.data(), h1.data(), h3.data(), n);
    return dotv(r, out);
  };
  std::vector<double> fd1 = fd_grad(h1, loss), fd3 = fd_grad(h3, loss);
  std::vector<double> g1(static_cast<size_t>(n)), g3(static_cast<size_t>(n));
  ref::f64::swiglu_backward(g1.data(), g3.data(), r.data(), h1.data(), h3.data(), n);
  Tensor d1 = Tensor::empty({3, 11}, DType::F32, kAct), d3 = Tensor::empty({3, 11}, DType::F32, kAct);
  swiglu_backward(d1, d3, ten({3, 11}, r), ten({3, 11}, h1), ten({3, 11}, h3));
  expect_grad("swiglu dh1", fd1, g1, vals(d1));
  expect_grad("swiglu dh3", fd3, g3, vals(d3));
}

TEST(Grad, SigmoidGate) {
  const int64_t t = 5, d = 7;
  std::vector<double> s = rnd(t * d, 100), gate = rnd(t, 101, 2.0), r = rnd(t * d, 102), y0 = rnd(t * d, 103);
  auto loss = [&] {
    std::vector<double> y = y0;
    ref::f64::sigmoid_gate_add(y.data(), s.data(), gate.data(), t, d);
    return dotv(r, y);
  };
  std::vector<double> fds = fd_grad(s, loss), fdg = fd_grad(gate, loss);
  std::vector<double> gs(static_cast<size_t>(t * d)), gg(static_cast<size_t>(t));
  ref::f64::sigmoid_gate_backward(gs.data(), gg.data(), r.data(), s.data(), gate.data(), t, d);
  Tensor ds = Tensor::empty({t, d}, DType::F32, kAct), dg = Tensor::empty({t, 1}, DType::F32, kAct);
  sigmoid_gate_backward(ds, dg, ten({t, d}, r), ten({t, d}, s), ten({t, 1}, gate));
  expect_grad("sigmoid_gate ds", fds, gs, vals(ds));
  expect_grad("sigmoid_gate dgate", fdg, gg, vals(dg));
}

// L = scale * sum_n loss[n] (ignored rows contribute 0 and get 0 gradient).
TEST(Grad, CrossEntropy) {
  const int64_t n = 6, v = 37;
  const double scale = 0.25;
  std::vector<double> l = rnd(n * v, 110, 3.0);
  std::vector<int32_t> tg = {5, -100, 36, 0, -100, 17};
  auto loss = [&] {
    std::vector<double> ls(static_cast<size_t>(n));
    ref::f64::cross_entropy_forward(ls.data(), l.data(), tg.data(), n, v);
    double s = 0;
    for (double x : ls) s += scale * x;
    return s;
  };
  std::vector<double> fd = fd_grad(l, loss), g(static_cast<size_t>(n * v));
  ref::f64::cross_entropy_backward(g.data(), l.data(), tg.data(), scale, n, v);
  Tensor dl = Tensor::empty({n, v}, DType::F32, kAct);
  cross_entropy_backward(dl, ten({n, v}, l), ints({n}, tg), float(scale));
  std::vector<double> gc = vals(dl);
  expect_grad("cross_entropy", fd, g, gc);
  for (int64_t i = 0; i < v; ++i) {
    EXPECT_EQ(gc[1 * v + i], 0.0) << "ignored row 1 has a gradient";
    EXPECT_EQ(gc[4 * v + i], 0.0) << "ignored row 4 has a gradient";
  }
}

// Each row of the cross-entropy's gradient sums to zero (softmax sums to one): within the
// rounding of its values taken one at a time, at a vocabulary's width. A rounding shared by the
// whole row (the row's normaliser, or log-sum-exp, rounded to f32 and applied to every value)
// moves every value the same way and the sum with them: qwen3's tied-embedding update drifted
// 1.8% from torch's after five AdamW steps from such a bias. A relative bias of 1e-6 on every
// value puts a row's sum at ~1e-6 · scale; rounding each value alone keeps it near 1e-8.
TEST(Grad, CrossEntropyRowsSumToZero) {
  const int64_t n = 4, v = 32000;
  const float scale = 0.25f;
  Tensor logits = ten({n, v}, rnd(n * v, 111, 4.0));
  Tensor targets = ints({n}, {7, 31999, 12345, 0});
  Tensor loss = Tensor::empty({n}, DType::F32, kAct), dl = Tensor::empty({n, v}, DType::F32, kAct);
  cross_entropy_forward_backward(loss, dl, logits, targets, scale);
  for (int64_t r = 0; r < n; ++r) {
    double sum = 0;
    for (int64_t i = 0; i < v; ++i) sum += dl.data<float>()[r * v + i];
    EXPECT_LE(std::fabs(sum), 1e-7 * scale) << "row " << r;
  }
}

// gather_rows (over perm) and moe_combine (over inv) are each other's adjoints:
// <moe_combine(yp), x> = <yp, gather_rows(x)>, on the reference and on the CPU.
TEST(Grad, GatherCombineAdjoint) {
  for (int64_t k : {2, 3}) {
    const int64_t t = 17, e = 5, d = 7, p = t * k;
    Routing rt = route(random_topk(t, {0, 1, 2, 4}, k, 120 + k), e);
    std::vector<double> x = rnd(t * d, 121), yp = rnd(p * d, 122);
    std::vector<double> y(static_cast<size_t>(t * d)), xp(static_cast<size_t>(p * d));
    ref::f64::moe_combine(y.data(), yp.data(), rt.inv.data(), t, d, k, false);
    ref::f64::gather_rows(xp.data(), x.data(), rt.perm.data(), p, d, k);
    const double a = dotv(y, x), b = dotv(yp, xp);
    EXPECT_NEAR(a, b, 1e-12 * (std::abs(a) + 1)) << "reference, K=" << k;
    Tensor yt = Tensor::empty({t, d}, DType::F32, kAct), xpt = Tensor::empty({p, d}, DType::F32, kAct);
    moe_combine(yt, ten({p, d}, yp), ints({p}, rt.inv), k, false);
    gather_rows(xpt, ten({t, d}, x), ints({p}, rt.perm), k);
    const double ac = dotv(vals(yt), x), bc = dotv(yp, vals(xpt));
    EXPECT_NEAR(ac, bc, 1e-5 * (std::abs(ac) + 1)) << "cpu, K=" << k;
  }
}

// ---- the --reference switch ----

// set_reference_backend(true) routes ops.h calls (forward and training) to moe::ref, false to
// moe::cpu: the outputs equal the named backend's bit for bit.
// Attention with sinks and a sliding window: dq, dk, dv and dsinks against finite differences of
// the reference forward (the sink enters every row's softmax; the window drops early keys).
TEST(Grad, AttentionSinksWindow) {
  for (int64_t window : {0, 2}) {
    const int64_t bn = 2, s = 5, h = 4, hkv = 2, dh = 6, nq = bn * s * h * dh, nk = bn * s * hkv * dh;
    std::vector<double> q = rnd(nq, 140 + window), k = rnd(nk, 141), v = rnd(nk, 142), r = rnd(nq, 143);
    std::vector<double> sk = rnd(h, 144);
    auto fwd = [&](std::vector<double>& out, std::vector<double>& lse) {
      out.assign(static_cast<size_t>(nq), 0);
      lse.assign(static_cast<size_t>(bn * h * s), 0);
      ref::f64::attention_forward_train(out.data(), lse.data(), q.data(), k.data(), v.data(), bn, s, h, hkv, dh,
                                        {sk.data(), window});
    };
    auto loss = [&] {
      std::vector<double> out, lse;
      fwd(out, lse);
      return dotv(r, out);
    };
    std::vector<double> fdq = fd_grad(q, loss), fdk = fd_grad(k, loss), fdv = fd_grad(v, loss), fds = fd_grad(sk, loss);
    std::vector<double> out, lse, gq(static_cast<size_t>(nq)), gk(static_cast<size_t>(nk)), gv(static_cast<size_t>(nk));
    std::vector<double> gs(static_cast<size_t>(h), 0.0);
    fwd(out, lse);
    ref::f64::attention_backward(gq.data(), gk.data(), gv.data(), r.data(), q.data(), k.data(), v.data(), out.data(),
                                 lse.data(), bn, s, h, hkv, dh, {sk.data(), window}, gs.data());
    Tensor qt = ten({bn, s, h, dh}, q), kt = ten({bn, s, hkv, dh}, k), vt = ten({bn, s, hkv, dh}, v);
    const AttnVariant av{ten({h}, sk), window};
    Tensor ot = Tensor::empty(qt.shape(), DType::F32, kAct), lt = Tensor::empty({bn, h, s}, DType::F32, kAct);
    attention_forward_train(ot, lt, qt, kt, vt, av);
    Tensor dq = Tensor::empty(qt.shape(), DType::F32, kAct), dk = Tensor::empty(kt.shape(), DType::F32, kAct);
    Tensor dv = Tensor::empty(vt.shape(), DType::F32, kAct), ds = Tensor::zeros({h}, DType::F32, kAct);
    attention_backward(dq, dk, dv, ten(qt.shape(), r), qt, kt, vt, ot, lt, av, &ds);
    const std::string what = "attention sinks window " + str(window);
    expect_grad(what + " dq", fdq, gq, vals(dq));
    expect_grad(what + " dk", fdk, gk, vals(dk));
    expect_grad(what + " dv", fdv, gv, vals(dv));
    expect_grad(what + " dsinks", fds, gs, vals(ds));
  }
}

// The YaRN-scaled rotation (a factor times a rotation): rope_backward is its transpose.
TEST(Grad, RopeYarnTable) {
  RopeScaling rs;
  rs.kind = RopeScalingKind::Yarn;
  rs.factor = 32;
  rs.original_max_position_embeddings = 64;
  rs.truncate = false;
  const RopeTable rt = rope_table(150000.0, 8, rs, 2048);
  ASSERT_EQ(rt.inv_freq.size(), 4u);
  EXPECT_NEAR(rt.attention_factor, 0.1 * std::log(32.0) + 1.0, 1e-15);
  const int64_t n = 2 * 3 * 2 * 8, past = 3;
  std::vector<double> x = rnd(n, 150), r = rnd(n, 151);
  auto loss = [&] {
    std::vector<double> y = x;
    ref::f64::rope_rotate_table(y.data(), 2, 3, 2, 8, past, rt.inv_freq.data(), rt.attention_factor, 1.0);
    return dotv(r, y);
  };
  std::vector<double> fd = fd_grad(x, loss), g = r;
  ref::f64::rope_rotate_table(g.data(), 2, 3, 2, 8, past, rt.inv_freq.data(), rt.attention_factor, -1.0);
  Tensor gt = ten({2, 3, 2, 8}, r);
  rope_backward(gt, past, rt);
  expect_grad("rope yarn", fd, g, vals(gt));
}

// Clamped SwiGLU with expert biases: every input's and bias's gradient, the routing weight's
// (which also scales the down bias), and zero gradient where a clamp binds. Limit 0.8 with
// unit-scale pre-activations puts many units beyond the clamps; none sits within 1e-3 of one.
TEST(Grad, ExpertFfnClampedBias) {
  const int64_t t = 7, k = 2, e = 5, f = 11, d = 7, p = t * k;
  const ref::f64::GluF64 glu{1.702, 0.8};
  Routing rt = route(random_topk(t, {0, 1, 3, 4}, k, 160), e);
  std::vector<double> xp = rnd(p * d, 161), w1 = rnd(e * f * d, 162, 0.5), w3 = rnd(e * f * d, 163, 0.5);
  std::vector<double> w2 = rnd(e * d * f, 164, 0.5), rs = rnd(p, 165), r = rnd(p * d, 166);
  std::vector<double> b1 = rnd(e * f, 167), b3 = rnd(e * f, 168), b2 = rnd(e * d, 169);
  auto fwd = [&](std::vector<double>& yp, std::vector<double>* h1, std::vector<double>* h3) {
    yp.assign(static_cast<size_t>(p * d), 0);
    ref::f64::expert_ffn_forward(yp.data(), h1 ? h1->data() : nullptr, h3 ? h3->data() : nullptr, xp.data(),
                                 rt.offsets.data(), w1.data(), w3.data(), w2.data(), rs.data(), e, f, d, nullptr, glu,
                                 {b1.data(), b3.data(), b2.data()});
  };
  auto loss = [&] {
    std::vector<double> yp;
    fwd(yp, nullptr, nullptr);
    return dotv(r, yp);
  };
  std::vector<double> yp, h1(static_cast<size_t>(p * f)), h3(static_cast<size_t>(p * f));
  fwd(yp, &h1, &h3);
  int gate_clamped = 0, up_clamped = 0;
  for (int64_t i = 0; i < p * f; ++i) {
    ASSERT_GT(std::fabs(h1[size_t(i)] - glu.limit), 1e-3) << "a gate pre-activation sits on the clamp";
    ASSERT_GT(std::fabs(std::fabs(h3[size_t(i)]) - glu.limit), 1e-3) << "an up pre-activation sits on a clamp";
    gate_clamped += h1[size_t(i)] > glu.limit;
    up_clamped += std::fabs(h3[size_t(i)]) > glu.limit;
  }
  EXPECT_GT(gate_clamped, 5);
  EXPECT_GT(up_clamped, 5);
  std::vector<double> fdx = fd_grad(xp, loss), fd1 = fd_grad(w1, loss), fd3 = fd_grad(w3, loss), fd2 = fd_grad(w2, loss);
  std::vector<double> fds = fd_grad(rs, loss), fdb1 = fd_grad(b1, loss), fdb3 = fd_grad(b3, loss), fdb2 = fd_grad(b2, loss);
  std::vector<double> gx(static_cast<size_t>(p * d)), g1(w1.size(), 0.0), g3(w3.size(), 0.0), g2(w2.size(), 0.0);
  std::vector<double> gs(static_cast<size_t>(p)), gb1(b1.size(), 0.0), gb3(b3.size(), 0.0), gb2(b2.size(), 0.0);
  ref::f64::expert_ffn_backward(gx.data(), g1.data(), g3.data(), g2.data(), gs.data(), r.data(), xp.data(), h1.data(),
                                h3.data(), rt.offsets.data(), w1.data(), w3.data(), w2.data(), rs.data(), e, f, d,
                                nullptr, glu, {b1.data(), b3.data(), b2.data(), gb1.data(), gb3.data(), gb2.data()});
  // CPU: forward_train (biased pre-activations saved), then backward.
  const ExpertGlu cglu{1.702f, 0.8f};
  const ExpertBias cb{ten({e, f}, b1), ten({e, f}, b3), ten({e, d}, b2)};
  Tensor off = ints({e + 1}, rt.offsets), xt = ten({p, d}, xp), rst = ten({p}, rs);
  Tensor w1t = ten({e, f, d}, w1), w3t = ten({e, f, d}, w3), w2t = ten({e, d, f}, w2);
  Tensor ypt = Tensor::empty({p, d}, DType::F32, kAct), h1t = Tensor::empty({p, f}, DType::F32, kAct);
  Tensor h3t = Tensor::empty({p, f}, DType::F32, kAct);
  expert_ffn_forward_train(ypt, h1t, h3t, xt, off, w1t, w3t, w2t, rst, {}, cglu, cb);
  Tensor dx = Tensor::empty({p, d}, DType::F32, kAct), dw1 = Tensor::zeros({e, f, d}, DType::F32, kAct);
  Tensor dw3 = Tensor::zeros({e, f, d}, DType::F32, kAct), dw2 = Tensor::zeros({e, d, f}, DType::F32, kAct);
  Tensor drs = Tensor::empty({p}, DType::F32, kAct);
  ExpertBias db{Tensor::zeros({e, f}, DType::F32, kAct), Tensor::zeros({e, f}, DType::F32, kAct),
                Tensor::zeros({e, d}, DType::F32, kAct)};
  expert_ffn_backward(dx, dw1, dw3, dw2, drs, ten({p, d}, r), xt, h1t, h3t, off, w1t, w3t, w2t, rst, {}, nullptr, cglu,
                      cb, &db);
  expect_grad("clamped expert dxp", fdx, gx, vals(dx));
  expect_grad("clamped expert dw1", fd1, g1, vals(dw1));
  expect_grad("clamped expert dw3", fd3, g3, vals(dw3));
  expect_grad("clamped expert dw2", fd2, g2, vals(dw2));
  expect_grad("clamped expert drow_scale", fds, gs, vals(drs));
  expect_grad("clamped expert db1", fdb1, gb1, vals(db.b1));
  expect_grad("clamped expert db3", fdb3, gb3, vals(db.b3));
  expect_grad("clamped expert db2", fdb2, gb2, vals(db.b2));
}

// Interleaved pairs (DeepSeek's RoPE): rope_backward is the transpose of rope_forward, with a
// plain and a YaRN table whose attention factor is not 1.
TEST(Grad, RopeInterleavedPairs) {
  RopeScaling rs;
  rs.kind = RopeScalingKind::Yarn;
  rs.factor = 40;
  rs.original_max_position_embeddings = 64;
  rs.mscale = 1.0;
  rs.mscale_all_dim = 0.5;
  for (bool yarn : {false, true}) {
    RopeTable rt = yarn ? rope_table(10000.0, 8, rs, 2048) : RopeTable{};
    rt.interleaved = true;
    std::vector<double> freq = rt.inv_freq;
    if (freq.empty())
      for (int i = 0; i < 4; ++i) freq.push_back(std::pow(10000.0, -double(2 * i) / 8.0));
    const int64_t n = 2 * 3 * 2 * 8, past = 3;
    std::vector<double> x = rnd(n, 160 + yarn), r = rnd(n, 161);
    auto loss = [&] {
      std::vector<double> y = x;
      ref::f64::rope_rotate_table(y.data(), 2, 3, 2, 8, past, freq.data(), rt.attention_factor, 1.0, true);
      return dotv(r, y);
    };
    std::vector<double> fd = fd_grad(x, loss), g = r;
    ref::f64::rope_rotate_table(g.data(), 2, 3, 2, 8, past, freq.data(), rt.attention_factor, -1.0, true);
    Tensor gt = ten({2, 3, 2, 8}, r);
    rope_backward(gt, past, rt);
    expect_grad(std::string("rope pairs") + (yarn ? " yarn" : ""), fd, g, vals(gt));
    // The pair convention itself: element 2i+1 rotates with element 2i, at angle pos·inv_freq[i].
    std::vector<double> y(8, 0.0);
    y[2] = 1.0;  // pair 1, first element
    ref::f64::rope_rotate_table(y.data(), 1, 1, 1, 8, 7, freq.data(), rt.attention_factor, 1.0, true);
    EXPECT_NEAR(y[2], rt.attention_factor * std::cos(7 * freq[1]), 1e-15);
    EXPECT_NEAR(y[3], rt.attention_factor * std::sin(7 * freq[1]), 1e-15);
  }
}

// A softmax scale other than 1/sqrt(Dh) (MLA): every input's gradient.
TEST(Grad, AttentionScale) {
  const int64_t bn = 2, s = 5, h = 4, hkv = 2, dh = 6, nq = bn * s * h * dh, nk = bn * s * hkv * dh;
  std::vector<double> q = rnd(nq, 170), k = rnd(nk, 171), v = rnd(nk, 172), r = rnd(nq, 173);
  const double scale = 0.61;
  auto fwd = [&](std::vector<double>& out, std::vector<double>& lse) {
    out.assign(static_cast<size_t>(nq), 0);
    lse.assign(static_cast<size_t>(bn * h * s), 0);
    ref::f64::attention_forward_train(out.data(), lse.data(), q.data(), k.data(), v.data(), bn, s, h, hkv, dh,
                                      {nullptr, 0, scale});
  };
  auto loss = [&] {
    std::vector<double> out, lse;
    fwd(out, lse);
    return dotv(r, out);
  };
  std::vector<double> fdq = fd_grad(q, loss), fdk = fd_grad(k, loss), fdv = fd_grad(v, loss);
  std::vector<double> out, lse, gq(static_cast<size_t>(nq)), gk(static_cast<size_t>(nk)), gv(static_cast<size_t>(nk));
  fwd(out, lse);
  ref::f64::attention_backward(gq.data(), gk.data(), gv.data(), r.data(), q.data(), k.data(), v.data(), out.data(),
                               lse.data(), bn, s, h, hkv, dh, {nullptr, 0, scale});
  Tensor qt = ten({bn, s, h, dh}, q), kt = ten({bn, s, hkv, dh}, k), vt = ten({bn, s, hkv, dh}, v);
  AttnVariant av;
  av.scale = float(scale);
  Tensor ot = Tensor::empty(qt.shape(), DType::F32, kAct), lt = Tensor::empty({bn, h, s}, DType::F32, kAct);
  attention_forward_train(ot, lt, qt, kt, vt, av);
  Tensor dq = Tensor::empty(qt.shape(), DType::F32, kAct), dk = Tensor::empty(kt.shape(), DType::F32, kAct);
  Tensor dv = Tensor::empty(vt.shape(), DType::F32, kAct);
  attention_backward(dq, dk, dv, ten(qt.shape(), r), qt, kt, vt, ot, lt, av);
  expect_grad("attention scale dq", fdq, gq, vals(dq));
  expect_grad("attention scale dk", fdk, gk, vals(dk));
  expect_grad("attention scale dv", fdv, gv, vals(dv));
}

// DeepSeek's router variants: the gradient of the (scaled, maybe renormalised) weights w.r.t.
// the logits through softmax or sigmoid scores, with the selection (groups, bias) held fixed.
TEST(Grad, RouterVariant) {
  struct Case {
    const char* name;
    bool sig, renorm;
    double eps;
    int64_t ng, tg;
    bool top2, bias;
    double scale;
  };
  const Case cases[] = {{"v2 greedy", false, false, 0, 1, 1, false, false, 1.5},
                        {"v2 group", false, false, 0, 4, 2, false, false, 2.0},
                        {"v3 noaux_tc", true, true, 1e-20, 4, 2, true, true, 2.5},
                        {"sigmoid no renorm", true, false, 0, 1, 1, false, true, 1.0},
                        {"softmax renorm", false, true, 0, 2, 1, false, false, 0.7}};
  for (const Case& cs : cases) {
    const int64_t t = 6, e = 8, k = 2;
    std::vector<double> l = rnd(t * e, 180, 2.0), r = rnd(t * k, 181), b = rnd(e, 182, 0.3);
    const ref::f64::RouterF64 rv{cs.sig, cs.renorm, cs.eps, cs.ng, cs.tg, cs.top2, cs.scale};
    const double* bias = cs.bias ? b.data() : nullptr;
    std::vector<int32_t> idx0(static_cast<size_t>(t * k));
    std::vector<double> w(static_cast<size_t>(t * k));
    ref::f64::router_topk_variant(idx0.data(), w.data(), l.data(), bias, t, e, k, rv);
    auto loss = [&] {
      std::vector<int32_t> idx(static_cast<size_t>(t * k));
      ref::f64::router_topk_variant(idx.data(), w.data(), l.data(), bias, t, e, k, rv);
      EXPECT_EQ(idx, idx0) << "a perturbation changed the selection (pick other seeds)";
      return dotv(r, w);
    };
    std::vector<double> fd = fd_grad(l, loss);
    std::vector<double> g(static_cast<size_t>(t * e));
    ref::f64::router_topk_variant_backward(g.data(), r.data(), l.data(), idx0.data(), t, e, k, rv);
    RouterVariant tv;
    tv.sigmoid = cs.sig;
    tv.renorm = cs.renorm;
    tv.renorm_eps = cs.eps;
    tv.n_group = cs.ng;
    tv.topk_group = cs.tg;
    tv.group_top2 = cs.top2;
    tv.scale = cs.scale;
    Tensor dl = Tensor::empty({t, e}, DType::F32, kAct);
    router_topk_backward(dl, ten({t, k}, r), ten({t, e}, l), ints({t, k}, idx0), tv);
    expect_grad(std::string("router variant ") + cs.name, fd, g, vals(dl));
  }
}

// The router variant's selection on a hand-made token: 8 experts in 4 groups of 2, sigmoid
// scores plus bias. Group sums of the top 2: {0.9+0.8, 0.95+0.1, 0.7+0.65, 0.3+0.2} -> groups 0
// and 2 kept; the best 2 of experts {0,1,4,5} by biased score are 0 and 1, even though expert 2
// has the single largest score (its group is dropped). Weights: the unbiased scores
// renormalised, × scale.
TEST(RouterVariant, GroupSelectionByHand) {
  const double s_want[8] = {0.9, 0.8, 0.95, 0.1, 0.7, 0.65, 0.3, 0.2};
  std::vector<float> logits(8), bias(8, 0.0f);
  for (int e = 0; e < 8; ++e) logits[size_t(e)] = float(std::log(s_want[e] / (1 - s_want[e])));
  bias[4] = 0.05f;  // 0.75 + 0.65 = 1.40 still < 1.70: group 0 stays first, 2 second
  RouterVariant rv;
  rv.sigmoid = true;
  rv.renorm = true;
  rv.renorm_eps = 1e-20;
  rv.n_group = 4;
  rv.topk_group = 2;
  rv.group_top2 = true;
  rv.scale = 2.5;
  Tensor lg = Tensor::from_f32({1, 8}, logits, kAct), b = Tensor::from_f32({8}, bias, kAct);
  for (bool use_ref : {false, true}) {
    Tensor idx = Tensor::empty({1, 2}, DType::I32, kAct), w = Tensor::empty({1, 2}, DType::F32, kAct);
    if (use_ref)
      ref::router_topk_forward(idx, w, lg, rv, b);
    else
      router_topk_forward(idx, w, lg, rv, b);
    EXPECT_EQ(idx.data<int32_t>()[0], 0);
    EXPECT_EQ(idx.data<int32_t>()[1], 1);
    EXPECT_NEAR(w.data<float>()[0], 2.5 * 0.9 / 1.7, 1e-6);
    EXPECT_NEAR(w.data<float>()[1], 2.5 * 0.8 / 1.7, 1e-6);
  }
}

TEST(ReferenceSwitch, DispatchesToTheNamedBackend) {
  const int64_t bn = 2, s = 17, h = 4, hkv = 2, dh = 8;
  Tensor q = ten({bn, s, h, dh}, rnd(bn * s * h * dh, 130)), k = ten({bn, s, hkv, dh}, rnd(bn * s * hkv * dh, 131));
  Tensor v = ten({bn, s, hkv, dh}, rnd(bn * s * hkv * dh, 132));
  Tensor x = ten({s, 65}, rnd(s * 65, 133)), w = ten({37, 65}, rnd(37 * 65, 134));
  auto run = [&](Backend b) {
    Dev g{b};
    Tensor out = g.out(q.shape()), lse = g.out({bn, h, s}), y = g.out({s, 37});
    CALL(b, attention_forward_train(out, lse, q, k, v));
    CALL(b, linear_forward(y, x, w, Tensor()));
    std::vector<float> r = out.to_f32_vector(), ry = y.to_f32_vector();
    r.insert(r.end(), ry.begin(), ry.end());
    return r;
  };
  set_reference_backend(false);
  const std::vector<float> cpu_out = run(Backend::Cpu), ref_out = run(Backend::Ref);
  ASSERT_NE(cpu_out, ref_out) << "the backends round identically here: the test could not tell them apart";
  set_reference_backend(true);
  EXPECT_TRUE(reference_backend());
  EXPECT_EQ(run(Backend::Cpu), ref_out) << "ops.h with the reference switch on";
  set_reference_backend(false);
  EXPECT_EQ(run(Backend::Cpu), cpu_out) << "ops.h with the reference switch off";
}

// `moe --reference logits` (every op on the reference backend) matches the PyTorch float64
// golden logits and router logits of the fixtures.
TEST(ReferenceSwitch, LogitsCommandMatchesGolden) {
  for (const char* fam : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}) {
    const std::string dir = std::string(MOE_FIXTURES_DIR) + "/" + fam;
    if (!std::filesystem::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
    const std::string moe = std::string(MOE_BINARY_DIR) + "/moe";
    const std::string out = std::string(std::filesystem::temp_directory_path()) + "/moe_ref_logits_" + fam + "_" +
                            std::to_string(::getpid()) + ".safetensors";
    const std::string cmd =
        moe + " --reference logits " + dir + " --input " + dir + "/batch.safetensors --out " + out + " > /dev/null";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    auto got = SafetensorsFile::open(out);
    auto gold = SafetensorsFile::open(dir + "/golden.safetensors");
    std::vector<std::string> keys = {"logits"};
    for (int l = 0; gold->find("router_logits." + std::to_string(l)); ++l) keys.push_back("router_logits." + std::to_string(l));
    for (const std::string& key : keys) {
      ASSERT_NE(got->find(key), nullptr) << fam << " " << key;
      const double e = rel_err(vals(got->tensor(key)), vals(gold->tensor(key, MemCategory::Workspace)));
      EXPECT_LE(e, 1e-5) << fam << " " << key << ": normwise relative error " << e;
    }
    std::filesystem::remove(out);
  }
}

// `moe --reference grad` (every training op on the reference backend): losses and every
// gradient the golden file holds match to 1e-5 (normwise).
TEST(ReferenceSwitch, GradCommandMatchesGolden) {
  for (const char* fam : {"mixtral", "qwen2_moe", "qwen3_moe", "olmoe"}) {
    const std::string dir = std::string(MOE_FIXTURES_DIR) + "/" + fam;
    if (!std::filesystem::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
    const std::string moe = std::string(MOE_BINARY_DIR) + "/moe";
    const std::string out = std::string(std::filesystem::temp_directory_path()) + "/moe_ref_grad_" + fam + "_" +
                            std::to_string(::getpid()) + ".safetensors";
    const std::string cmd =
        moe + " --reference grad " + dir + " --input " + dir + "/batch.safetensors --out " + out + " > /dev/null";
    ASSERT_EQ(std::system(cmd.c_str()), 0) << cmd;
    auto got = SafetensorsFile::open(out);
    auto gold = SafetensorsFile::open(dir + "/golden.safetensors");
    int n_grads = 0;
    for (const SafetensorsInfo& info : got->tensors()) {
      const std::string& key = info.name;
      if (!gold->find(key)) continue;
      n_grads += key.rfind("grad.", 0) == 0;
      const double e = rel_err(vals(got->tensor(key)), vals(gold->tensor(key, MemCategory::Workspace)));
      EXPECT_LE(e, 1e-5) << fam << " " << key << ": normwise relative error " << e;
    }
    EXPECT_GT(n_grads, 10) << fam << ": too few gradients compared";
    for (const char* loss : {"loss_ce", "aux_loss", "total_loss"})
      EXPECT_NE(got->find(loss), nullptr) << fam << " " << loss;
    std::filesystem::remove(out);
  }
}

}  // namespace
}  // namespace moe
