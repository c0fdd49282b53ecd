// test_ops_cross.cpp — the cross-backend op runner (DESIGN.md invariant 2): every op in ops.h is
// run on the CPU reference and on CUDA over odd shapes and dtypes, and the results compared by
// normalised error ||cuda - cpu|| / ||cpu|| (f32: 1e-5, bf16: 2e-2); index outputs must match
// exactly. Inputs are fresh random values (fixed seeds), never zeros; CUDA outputs are poisoned
// with NaN first so an unwritten element fails. For bf16 cases the inputs are rounded to bf16
// first and the CPU gets f32 copies of the rounded values.
//
// Without a GPU (or in a build without the CUDA backend) every test reports SKIPPED.
#include <gtest/gtest.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "core/tensor.h"
#include "ops/backend.h"  // cuda::synchronize for the timings at the end
#include "ops/ops.h"

namespace moe {
namespace {

#define REQUIRE_CUDA() \
  if (!cuda_available()) GTEST_SKIP() << "no CUDA GPU: cross-backend test SKIPPED"

constexpr MemCategory kAct = MemCategory::Activations;

double tol_for(DType dt) { return dt == DType::F32 ? 1e-5 : 2e-2; }

std::vector<float> randn(int64_t n, uint32_t seed, float scale = 1.f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.f, scale);
  std::vector<float> v(static_cast<size_t>(n));
  for (auto& x : v) {
    x = nd(rng);
    if (x == 0.f) x = 1e-3f;
  }
  return v;
}

// Rounds values through `dt` (identity for f32).
std::vector<float> round_to(DType dt, std::vector<float> v) {
  if (dt == DType::BF16)
    for (auto& x : v) x = bf16_to_f32(f32_to_bf16(x));
  return v;
}

// A CPU f32 tensor of random values already rounded through `dt`.
Tensor rand_cpu(const Shape& s, uint32_t seed, DType dt, float scale = 1.f) {
  return Tensor::from_f32(s, round_to(dt, randn(shape_numel(s), seed, scale)), kAct);
}

// The CUDA copy of a CPU f32 tensor, stored as `dt`.
Tensor gpu(const Tensor& cpu_f32, DType dt) { return cpu_f32.to_dtype(dt, kAct).to(Device::CUDA, kAct); }

// An output tensor on CUDA filled with NaN.
Tensor poisoned(const Shape& s, DType dt) {
  std::vector<float> nan(static_cast<size_t>(shape_numel(s)), std::nanf(""));
  return gpu(Tensor::from_f32(s, nan, kAct), dt);
}

Tensor ints_cpu(const Shape& s, const std::vector<int32_t>& v) {
  Tensor t = Tensor::empty(s, DType::I32, kAct);
  std::copy(v.begin(), v.end(), t.data<int32_t>());
  return t;
}

std::vector<int32_t> ints_of(const Tensor& t) {
  Tensor c = t.device() == Device::CPU ? t : t.to(Device::CPU, kAct);
  return std::vector<int32_t>(c.data<int32_t>(), c.data<int32_t>() + c.numel());
}

double rel_err(const std::vector<float>& a, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    double d = double(a[i]) - double(ref[i]);
    if (std::isnan(a[i])) return INFINITY;
    num += d * d;
    den += double(ref[i]) * ref[i];
  }
  return std::sqrt(num / std::max(den, 1e-30));
}

void expect_close(const Tensor& cuda_out, const Tensor& cpu_out, DType dt, const std::string& what) {
  std::vector<float> a = cuda_out.to_f32_vector(), b = cpu_out.to_f32_vector();
  ASSERT_EQ(a.size(), b.size()) << what;
  double e = rel_err(a, b);
  EXPECT_LE(e, tol_for(dt)) << what << ": rel err " << e;
}

const DType kDtypes[] = {DType::F32, DType::BF16};

std::string tag(DType dt) { return dtype_name(dt); }

// Random top-k expert choices: K distinct experts per token.
std::vector<int32_t> random_topk(int64_t t_n, int64_t e_n, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int32_t> out;
  std::vector<int32_t> ids(static_cast<size_t>(e_n));
  for (int64_t t = 0; t < t_n; ++t) {
    std::iota(ids.begin(), ids.end(), 0);
    std::shuffle(ids.begin(), ids.end(), rng);
    for (int64_t j = 0; j < k; ++j) out.push_back(ids[j]);
  }
  return out;
}

// ----------------------------------------------------------------------------------------------

TEST(CrossOps, Embedding) {
  REQUIRE_CUDA();
  for (DType dt : kDtypes)
    for (int64_t t : {1, 7, 19, 111})
      for (int64_t d : {64, 96, 200}) {
        const int64_t v = 53;
        Tensor table = rand_cpu({v, d}, 1 + t + d, dt);
        std::mt19937 rng(uint32_t(t * 31 + d));
        std::vector<int32_t> id(static_cast<size_t>(t));
        for (auto& x : id) x = int32_t(rng() % v);
        Tensor ids = ints_cpu({t}, id);
        Tensor ref = Tensor::empty({t, d}, DType::F32, kAct);
        embedding_forward(ref, ids, table);
        Tensor out = poisoned({t, d}, dt);
        embedding_forward(out, ids.to(Device::CUDA, kAct), gpu(table, dt));
        expect_close(out, ref, dt, "embedding " + tag(dt) + " T=" + std::to_string(t) + " D=" + std::to_string(d));
      }
}

TEST(CrossOps, RmsNorm) {
  REQUIRE_CUDA();
  for (DType dt : kDtypes)
    for (int64_t t : {1, 7, 19, 111})
      for (int64_t d : {64, 96, 200, 4096}) {
        Tensor x = rand_cpu({t, d}, 2 + uint32_t(t * d), dt, 2.f);
        Tensor w = rand_cpu({d}, 3 + uint32_t(d), dt);
        Tensor ref = Tensor::empty({t, d}, DType::F32, kAct);
        rmsnorm_forward(ref, x, w, 1e-5f);
        Tensor out = poisoned({t, d}, dt);
        rmsnorm_forward(out, gpu(x, dt), gpu(w, dt), 1e-5f);
        std::string what = "rmsnorm " + tag(dt) + " T=" + std::to_string(t) + " D=" + std::to_string(d);
        expect_close(out, ref, dt, what);
        Tensor xa = gpu(x, dt);  // in place (out aliases x)
        rmsnorm_forward(xa, xa, gpu(w, dt), 1e-5f);
        expect_close(xa, ref, dt, what + " in place");
      }
}

TEST(CrossOps, Rope) {
  REQUIRE_CUDA();
  for (DType dt : kDtypes)
    for (int64_t s : {1, 7, 19})
      for (int64_t dh : {32, 64, 128})
        for (int64_t past : {0, 5, 3000}) {
          Tensor x = rand_cpu({2, s, 3, dh}, 4 + uint32_t(s * dh + past), dt);
          Tensor ref = x.clone();
          rope_forward(ref, past, 1e6f);
          Tensor xg = gpu(x, dt);
          rope_forward(xg, past, 1e6f);
          expect_close(xg, ref, dt,
                       "rope " + tag(dt) + " S=" + std::to_string(s) + " Dh=" + std::to_string(dh) +
                           " past=" + std::to_string(past));
        }
}

TEST(CrossOps, KvAppend) {
  REQUIRE_CUDA();
  for (DType dt : kDtypes)
    for (int64_t s : {1, 7}) {
      const int64_t b = 2, c = 23, hkv = 3, dh = 32, past = 9;
      Tensor kc = rand_cpu({b, c, hkv, dh}, 5, dt), vc = rand_cpu({b, c, hkv, dh}, 6, dt);
      Tensor k = rand_cpu({b, s, hkv, dh}, 7, dt), v = rand_cpu({b, s, hkv, dh}, 8, dt);
      Tensor kg = gpu(kc, dt), vg = gpu(vc, dt);
      kv_append(kc, vc, k, v, past);
      kv_append(kg, vg, gpu(k, dt), gpu(v, dt), past);
      EXPECT_EQ(kg.to_f32_vector(), kc.to_f32_vector()) << "kv_append k " << tag(dt);
      EXPECT_EQ(vg.to_f32_vector(), vc.to_f32_vector()) << "kv_append v " << tag(dt);
    }
}

TEST(CrossOps, Elementwise) {
  REQUIRE_CUDA();
  for (DType dt : kDtypes)
    for (int64_t t : {1, 7, 111})
      for (int64_t d : {64, 200}) {
        std::string sh = tag(dt) + " T=" + std::to_string(t) + " D=" + std::to_string(d);
        Tensor h1 = rand_cpu({t, d}, 9 + uint32_t(t * d), dt, 3.f), h3 = rand_cpu({t, d}, 10 + uint32_t(t), dt);
        Tensor ref = Tensor::empty({t, d}, DType::F32, kAct);
        swiglu_forward(ref, h1, h3);
        Tensor out = poisoned({t, d}, dt);
        swiglu_forward(out, gpu(h1, dt), gpu(h3, dt));
        expect_close(out, ref, dt, "swiglu " + sh);

        Tensor y = rand_cpu({t, d}, 11, dt), s = rand_cpu({t, d}, 12, dt), g = rand_cpu({t, 1}, 13, dt);
        Tensor yg = gpu(y, dt);
        sigmoid_gate_add(y, s, g);
        sigmoid_gate_add(yg, gpu(s, dt), gpu(g, dt));
        expect_close(yg, y, dt, "sigmoid_gate_add " + sh);

        Tensor a = rand_cpu({t, d}, 14, dt), b = rand_cpu({t, d}, 15, dt);
        Tensor ag = gpu(a, dt);
        add_inplace(a, b);
        add_inplace(ag, gpu(b, dt));
        expect_close(ag, a, dt, "add_inplace " + sh);
      }
}

TEST(CrossOps, Cast) {
  REQUIRE_CUDA();
  Tensor x = rand_cpu({19, 200}, 16, DType::F32);
  Tensor b_cpu = Tensor::empty({19, 200}, DType::BF16, kAct);
  cast(b_cpu, x);
  Tensor b_gpu = poisoned({19, 200}, DType::BF16);
  cast(b_gpu, gpu(x, DType::F32));
  EXPECT_EQ(b_gpu.to_f32_vector(), b_cpu.to_f32_vector()) << "cast f32->bf16";
  Tensor f_gpu = poisoned({19, 200}, DType::F32);
  cast(f_gpu, b_gpu);
  EXPECT_EQ(f_gpu.to_f32_vector(), b_cpu.to_f32_vector()) << "cast bf16->f32";
}

TEST(CrossOps, Linear) {
  REQUIRE_CUDA();
  struct Case {
    DType x, w;
  };
  for (Case c : {Case{DType::F32, DType::F32}, Case{DType::BF16, DType::BF16}, Case{DType::F32, DType::BF16}})
    for (int64_t n : {1, 3, 7, 8, 19, 111})
      for (int64_t kd : {64, 96, 200})
        for (int64_t m : {64, 200})
          for (bool with_bias : {false, true}) {
            DType act = c.x == DType::BF16 || c.w == DType::BF16 ? DType::BF16 : DType::F32;
            Tensor x = rand_cpu({n, kd}, 17 + uint32_t(n * kd), c.x);
            Tensor w = rand_cpu({m, kd}, 18 + uint32_t(m * kd), c.w, 0.1f);
            Tensor bias = with_bias ? rand_cpu({m}, 19, c.w) : Tensor();
            Tensor ref = Tensor::empty({n, m}, DType::F32, kAct);
            linear_forward(ref, x, w, bias);
            Tensor out = poisoned({n, m}, c.x);
            linear_forward(out, gpu(x, c.x), gpu(w, c.w), with_bias ? gpu(bias, c.w) : Tensor());
            expect_close(out, ref, act,
                         "linear x=" + tag(c.x) + " w=" + tag(c.w) + " N=" + std::to_string(n) +
                             " K=" + std::to_string(kd) + " M=" + std::to_string(m) + (with_bias ? " bias" : ""));
          }
}

struct EnvScope {
  std::string name;
  EnvScope(const char* n, const char* v) : name(n) {
    if (v)
      setenv(n, v, 1);
    else
      unsetenv(n);
  }
  ~EnvScope() { unsetenv(name.c_str()); }
};

TEST(CrossOps, Attention) {
  REQUIRE_CUDA();
  struct Case {
    int64_t b, s, past, h, hkv;
  };
  const Case cases[] = {{1, 1, 0, 4, 2},    {2, 1, 17, 4, 2},   {1, 1, 700, 8, 2}, {2, 3, 40, 4, 1},
                        {1, 8, 9, 4, 4},    {2, 19, 0, 4, 2},   {1, 111, 0, 8, 2}, {2, 111, 37, 4, 2},
                        {1, 40, 300, 2, 1}, {1, 1, 4000, 4, 2}, {1, 1, 50, 16, 1}, {2, 2, 33, 12, 1}};
  for (DType dt : kDtypes)
    for (int64_t dh : {32, 64, 96, 128, 256})
      for (const Case& c : cases) {
        if (dh == 256 && c.s == 111 && c.b == 2) continue;  // keep the CPU reference quick
        const int64_t cap = c.past + c.s + 3;
        uint32_t seed = uint32_t(dh * 1000 + c.s * 10 + c.past);
        Tensor q = rand_cpu({c.b, c.s, c.h, dh}, seed, dt);
        Tensor kc = rand_cpu({c.b, cap, c.hkv, dh}, seed + 1, dt);
        Tensor vc = rand_cpu({c.b, cap, c.hkv, dh}, seed + 2, dt);
        Tensor ref = Tensor::empty(q.shape(), DType::F32, kAct);
        attention_forward(ref, q, kc, vc, c.past);
        Tensor out = poisoned(q.shape(), dt);
        attention_forward(out, gpu(q, dt), gpu(kc, dt), gpu(vc, dt), c.past);
        expect_close(out, ref, dt,
                     "attention " + tag(dt) + " B=" + std::to_string(c.b) + " S=" + std::to_string(c.s) +
                         " past=" + std::to_string(c.past) + " H=" + std::to_string(c.h) + "/" +
                         std::to_string(c.hkv) + " Dh=" + std::to_string(dh));
      }
}

// The fast paths for bf16 with Dh 64/128: the tensor-core prefill (S > 8: several 64-query blocks
// and 64-key tiles, partial last blocks, past > 0 and not a multiple of the tile, GQA groups
// 1/4/8) and the 16-byte decode (S <= 8, groups 1..8 incl. 3, long caches split over blocks). The
// cache rows past past+S are NaN: they must never be read as keys. Mode "old" reruns the shapes
// on the f32-core kernels (MOE_CUDA_ATTN_PREFILL=simt, MOE_CUDA_ATTN_DECODE=old) as a control.
TEST(CrossOps, AttentionFastPaths) {
  REQUIRE_CUDA();
  struct Case {
    int64_t b, s, past, h, hkv;
  };
  const Case cases[] = {{1, 128, 0, 4, 4},  {2, 130, 0, 8, 8},  {1, 200, 70, 8, 2}, {2, 257, 5, 8, 1},
                        {1, 64, 64, 4, 1},  {1, 9, 200, 8, 1},  {3, 77, 1, 4, 1},   {1, 600, 300, 8, 1},
                        {2, 191, 129, 4, 4}, {1, 1, 1000, 8, 1}, {2, 5, 300, 6, 2}, {1, 8, 64, 4, 4},
                        {3, 1, 5000, 32, 8}, {1, 1, 0, 4, 2},   {2, 2, 100, 2, 1}};
  for (const char* mode : {"", "old"})
    for (int64_t dh : {64, 128})
      for (const Case& c : cases) {
        if (*mode && c.s == 600) continue;  // keep the control quick
        EnvScope env1("MOE_CUDA_ATTN_PREFILL", *mode ? "simt" : nullptr);
        EnvScope env2("MOE_CUDA_ATTN_DECODE", *mode ? "old" : nullptr);
        const DType dt = DType::BF16;
        const int64_t cap = c.past + c.s + 5;
        uint32_t seed = uint32_t(dh * 7919 + c.s * 31 + c.past + c.h);
        Tensor q = rand_cpu({c.b, c.s, c.h, dh}, seed, dt);
        Tensor kc = rand_cpu({c.b, cap, c.hkv, dh}, seed + 1, dt);
        Tensor vc = rand_cpu({c.b, cap, c.hkv, dh}, seed + 2, dt);
        // Poison the cache rows past past+S: they must never contribute.
        {
          Tensor kg = gpu(kc, dt), vg = gpu(vc, dt);
          std::vector<float> nan(static_cast<size_t>(c.b * 5 * c.hkv * dh), std::nanf(""));
          Tensor pois = gpu(Tensor::from_f32({c.b, 5, c.hkv, dh}, nan, kAct), dt);
          for (int64_t bi = 0; bi < c.b; ++bi) {
            Tensor kd = kg.select(bi).rows(c.past + c.s, cap), vd = vg.select(bi).rows(c.past + c.s, cap);
            kd.copy_from(pois.select(bi));
            vd.copy_from(pois.select(bi));
          }
          Tensor ref = Tensor::empty(q.shape(), DType::F32, kAct);
          attention_forward(ref, q, kc, vc, c.past);
          Tensor out = poisoned(q.shape(), dt);
          attention_forward(out, gpu(q, dt), kg, vg, c.past);
          expect_close(out, ref, dt,
                       std::string("attention fast paths ") + (*mode ? mode : "new") + " B=" + std::to_string(c.b) +
                           " S=" + std::to_string(c.s) + " past=" + std::to_string(c.past) + " H=" +
                           std::to_string(c.h) + "/" + std::to_string(c.hkv) + " Dh=" + std::to_string(dh));
        }
      }
}

TEST(CrossOps, RouterTopk) {
  REQUIRE_CUDA();
  for (int64_t t : {1, 7, 19, 111})
    for (int64_t e : {4, 8, 60})
      for (int64_t k : {1, 2, 4})
        for (bool renorm : {false, true}) {
          // Well separated logits: a random permutation of 0.1 * [0, E) plus small noise.
          std::mt19937 rng(uint32_t(t * 100 + e * 10 + k));
          std::vector<float> lg;
          std::vector<int> order(static_cast<size_t>(e));
          std::uniform_real_distribution<float> noise(-0.02f, 0.02f);
          for (int64_t i = 0; i < t; ++i) {
            std::iota(order.begin(), order.end(), 0);
            std::shuffle(order.begin(), order.end(), rng);
            for (int64_t j = 0; j < e; ++j) lg.push_back(0.1f * float(order[j]) - 2.f + noise(rng));
          }
          Tensor logits = Tensor::from_f32({t, e}, lg, kAct);
          Tensor idx = Tensor::empty({t, k}, DType::I32, kAct), w = Tensor::empty({t, k}, DType::F32, kAct);
          router_topk_forward(idx, w, logits, renorm);
          Tensor idx_g = Tensor::empty({t, k}, DType::I32, kAct, Device::CUDA);
          Tensor w_g = poisoned({t, k}, DType::F32);
          router_topk_forward(idx_g, w_g, logits.to(Device::CUDA, kAct), renorm);
          std::string what = "router T=" + std::to_string(t) + " E=" + std::to_string(e) + " K=" + std::to_string(k);
          EXPECT_EQ(ints_of(idx_g), ints_of(idx)) << what;
          expect_close(w_g, w, DType::F32, what);
        }
}

TEST(CrossOps, DispatchGatherCombine) {
  REQUIRE_CUDA();
  for (int64_t t : {1, 7, 19, 111, 1500})
    for (int64_t e : {4, 8, 60})
      for (int64_t k : {1, 2, 4}) {
        std::string what = "T=" + std::to_string(t) + " E=" + std::to_string(e) + " K=" + std::to_string(k);
        const int64_t p = t * k;
        Tensor topk = ints_cpu({t, k}, random_topk(t, e, k, uint32_t(t + e + k)));
        Tensor off = Tensor::empty({e + 1}, DType::I32, kAct), perm = Tensor::empty({p}, DType::I32, kAct),
               inv = Tensor::empty({p}, DType::I32, kAct);
        moe_dispatch(off, perm, inv, topk, e);
        Tensor off_g = Tensor::empty({e + 1}, DType::I32, kAct, Device::CUDA);
        Tensor perm_g = Tensor::empty({p}, DType::I32, kAct, Device::CUDA);
        Tensor inv_g = Tensor::empty({p}, DType::I32, kAct, Device::CUDA);
        moe_dispatch(off_g, perm_g, inv_g, topk.to(Device::CUDA, kAct), e);
        EXPECT_EQ(ints_of(off_g), ints_of(off)) << "dispatch offsets " << what;
        EXPECT_EQ(ints_of(perm_g), ints_of(perm)) << "dispatch perm " << what;
        EXPECT_EQ(ints_of(inv_g), ints_of(inv)) << "dispatch inv " << what;

        Tensor tw = rand_cpu({t, k}, 20, DType::F32);
        Tensor rs = Tensor::empty({p}, DType::F32, kAct);
        permute_weights(rs, tw, perm);
        Tensor rs_g = poisoned({p}, DType::F32);
        permute_weights(rs_g, gpu(tw, DType::F32), perm_g);
        EXPECT_EQ(rs_g.to_f32_vector(), rs.to_f32_vector()) << "permute_weights " << what;

        for (DType dt : kDtypes) {
          const int64_t d = 96;
          Tensor x = rand_cpu({t, d}, 21, dt);
          Tensor xp = Tensor::empty({p, d}, DType::F32, kAct);
          gather_rows(xp, x, perm, k);
          Tensor xp_g = poisoned({p, d}, dt);
          gather_rows(xp_g, gpu(x, dt), perm_g, k);
          expect_close(xp_g, xp, dt, "gather_rows " + tag(dt) + " " + what);

          Tensor yp = rand_cpu({p, d}, 22, dt);
          for (bool acc : {false, true}) {
            Tensor y = rand_cpu({t, d}, 23, dt);
            Tensor y_g = acc ? gpu(y, dt) : poisoned({t, d}, dt);
            moe_combine(y, yp, inv, k, acc);
            moe_combine(y_g, gpu(yp, dt), inv_g, k, acc);
            expect_close(y_g, y, dt, std::string("moe_combine ") + (acc ? "acc " : "") + tag(dt) + " " + what);
          }
        }
      }
}

// Sets an environment variable for the scope of one expert-FFN path.
TEST(CrossOps, ExpertFfn) {
  REQUIRE_CUDA();
  struct Case {
    int64_t t, e, k, d, f;
  };
  const Case cases[] = {{1, 8, 2, 64, 96},    {7, 4, 1, 96, 64},    {19, 8, 2, 200, 160},
                        {111, 60, 4, 64, 96}, {111, 4, 4, 96, 200}, {300, 4, 2, 256, 384},
                        {2, 60, 4, 200, 64},  {40, 8, 2, 128, 256}};
  struct Path {
    const char* name;
    const char* gemv_max_p;
    const char* gemm;
  };
  const Path paths[] = {{"default", nullptr, nullptr}, {"own", "0", "own"}, {"cublas", "0", "cublas"}};
  struct Types {
    DType x, w;
  };
  for (Types ty : {Types{DType::F32, DType::F32}, Types{DType::BF16, DType::BF16}, Types{DType::F32, DType::BF16}})
    for (const Case& c : cases) {
      const int64_t p = c.t * c.k;
      Tensor topk = ints_cpu({c.t, c.k}, random_topk(c.t, c.e, c.k, uint32_t(c.t * 7 + c.e)));
      Tensor off = Tensor::empty({c.e + 1}, DType::I32, kAct), perm = Tensor::empty({p}, DType::I32, kAct),
             inv = Tensor::empty({p}, DType::I32, kAct);
      moe_dispatch(off, perm, inv, topk, c.e);
      uint32_t seed = uint32_t(c.t * 13 + c.d + c.f);
      Tensor xp = rand_cpu({p, c.d}, seed, ty.x);
      Tensor w1 = rand_cpu({c.e, c.f, c.d}, seed + 1, ty.w, 0.1f);
      Tensor w3 = rand_cpu({c.e, c.f, c.d}, seed + 2, ty.w, 0.1f);
      Tensor w2 = rand_cpu({c.e, c.d, c.f}, seed + 3, ty.w, 0.1f);
      Tensor rs = rand_cpu({p}, seed + 4, DType::F32);
      Tensor ref = Tensor::empty({p, c.d}, DType::F32, kAct);
      expert_ffn_forward(ref, xp, off, w1, w3, w2, rs);
      Tensor off_g = off.to(Device::CUDA, kAct), xp_g = gpu(xp, ty.x), rs_g = gpu(rs, DType::F32);
      Tensor w1_g = gpu(w1, ty.w), w3_g = gpu(w3, ty.w), w2_g = gpu(w2, ty.w);
      DType act = ty.x == DType::BF16 || ty.w == DType::BF16 ? DType::BF16 : DType::F32;
      for (const Path& path : paths) {
        EnvScope e1("MOE_CUDA_EXPERT_GEMV_MAX_P", path.gemv_max_p), e2("MOE_CUDA_EXPERT_GEMM", path.gemm);
        Tensor out = poisoned({p, c.d}, ty.x);
        expert_ffn_forward(out, xp_g, off_g, w1_g, w3_g, w2_g, rs_g);
        expect_close(out, ref, act,
                     std::string("expert_ffn ") + path.name + " x=" + tag(ty.x) + " w=" + tag(ty.w) +
                         " T=" + std::to_string(c.t) + " E=" + std::to_string(c.e) + " K=" + std::to_string(c.k) +
                         " D=" + std::to_string(c.d) + " F=" + std::to_string(c.f));
      }
    }
}

}  // namespace
}  // namespace moe

// ----------------------------------------------------------------------------------------------
// Timings (not a test: never asserts on time). Run on a GPU machine with
//   moe_tests --gtest_also_run_disabled_tests --gtest_filter='CrossOpsPerf.*'
// Mixtral-8x7B-shaped layer pieces, bf16: expert FFN (prefill grouped GEMM on both paths, decode
// GEMV), decode attention, decode linear. Prints "TIMING name ms GB/s TFLOP/s".

namespace moe {
namespace {

// Fills a CUDA tensor with random values (a 4M-element random block, repeated).
void fill_random(Tensor& t, uint32_t seed, float scale) {
  const int64_t block = int64_t(1) << 22;
  Tensor src = gpu(Tensor::from_f32({block}, randn(block, seed, scale), kAct), t.dtype());
  Tensor flat = t.view({t.numel()});
  for (int64_t i = 0; i < t.numel(); i += block) {
    int64_t n = std::min(block, t.numel() - i);
    Tensor dst = flat.rows(i, i + n);
    dst.copy_from(src.rows(0, n));
  }
}

template <class F>
double time_ms(F&& fn, int iters) {
  fn();
  cuda::synchronize();
  auto t0 = std::chrono::steady_clock::now();
  for (int i = 0; i < iters; ++i) fn();
  cuda::synchronize();
  auto t1 = std::chrono::steady_clock::now();
  return std::chrono::duration<double, std::milli>(t1 - t0).count() / iters;
}

void report(const char* name, double ms, double bytes, double flops) {
  std::printf("TIMING %-44s %9.3f ms %8.1f GB/s %8.1f TFLOP/s\n", name, ms, bytes / ms / 1e6, flops / ms / 1e9);
  std::fflush(stdout);
}

TEST(CrossOpsPerf, DISABLED_MixtralLayer) {
  REQUIRE_CUDA();
  const int64_t e = 8, d = 4096, f = 14336, k = 2;
  const DType bf = DType::BF16;
  Tensor w1 = Tensor::empty({e, f, d}, bf, MemCategory::Weights, Device::CUDA);
  Tensor w3 = Tensor::empty({e, f, d}, bf, MemCategory::Weights, Device::CUDA);
  Tensor w2 = Tensor::empty({e, d, f}, bf, MemCategory::Weights, Device::CUDA);
  fill_random(w1, 1, 0.02f);
  fill_random(w3, 2, 0.02f);
  fill_random(w2, 3, 0.02f);
  for (int64_t t : {1, 4, 16, 512, 4096}) {
    const int64_t p = t * k;
    Tensor topk = ints_cpu({t, k}, random_topk(t, e, k, uint32_t(t)));
    Tensor off = Tensor::empty({e + 1}, DType::I32, kAct), perm = Tensor::empty({p}, DType::I32, kAct),
           inv = Tensor::empty({p}, DType::I32, kAct);
    moe_dispatch(off, perm, inv, topk, e);
    std::vector<int32_t> o = ints_of(off);
    int used = 0;
    for (int64_t i = 0; i < e; ++i) used += o[i + 1] > o[i];
    Tensor off_g = off.to(Device::CUDA, kAct);
    Tensor xp = Tensor::empty({p, d}, bf, kAct, Device::CUDA);
    fill_random(xp, 4, 1.f);
    Tensor rs = gpu(rand_cpu({p}, 5, DType::F32), DType::F32);
    Tensor yp = Tensor::empty({p, d}, bf, kAct, Device::CUDA);
    double bytes = double(used) * 3 * f * d * 2 + 2.0 * p * d * 2;
    double flops = double(p) * 6 * d * f;
    const char* gemv_max = p <= 32 ? "32" : "0";
    for (const char* mode : {"own", "cublas"}) {
      if (p <= 32 && std::string(mode) == "cublas") continue;
      EnvScope e1("MOE_CUDA_EXPERT_GEMV_MAX_P", gemv_max), e2("MOE_CUDA_EXPERT_GEMM", mode);
      int iters = p <= 32 ? 50 : (t >= 4096 ? 5 : 20);
      double ms = time_ms([&] { expert_ffn_forward(yp, xp, off_g, w1, w3, w2, rs); }, iters);
      std::string name = "expert_ffn T=" + std::to_string(t) + " P=" + std::to_string(p) + " " +
                         (p <= 32 ? std::string("gemv") : std::string(mode));
      report(name.c_str(), ms, bytes, flops);
    }
  }
  // Decode linear: x [1, 4096] w [14336, 4096].
  {
    Tensor w = w1.select(0);
    Tensor x = Tensor::empty({1, d}, bf, kAct, Device::CUDA);
    fill_random(x, 6, 1.f);
    Tensor out = Tensor::empty({1, f}, bf, kAct, Device::CUDA);
    double ms = time_ms([&] { linear_forward(out, x, w, Tensor()); }, 100);
    report("linear gemv N=1 K=4096 M=14336", ms, double(f) * d * 2, 2.0 * f * d);
    Tensor x2 = Tensor::empty({2048, d}, bf, kAct, Device::CUDA);
    fill_random(x2, 7, 1.f);
    Tensor out2 = Tensor::empty({2048, f}, bf, kAct, Device::CUDA);
    ms = time_ms([&] { linear_forward(out2, x2, w, Tensor()); }, 20);
    report("linear cublas N=2048 K=4096 M=14336", ms, double(f) * d * 2, 2.0 * 2048 * f * d);
  }
  w1 = w3 = w2 = Tensor();
  // Attention: decode (S=1) over long caches and a 2048-token prefill. H=32, Hkv=8, Dh=128.
  for (int64_t b : {1, 8}) {
    const int64_t past = 8191, cap = 8192, h = 32, hkv = 8, dh = 128;
    Tensor kc = Tensor::empty({b, cap, hkv, dh}, bf, MemCategory::KvCache, Device::CUDA);
    Tensor vc = Tensor::empty({b, cap, hkv, dh}, bf, MemCategory::KvCache, Device::CUDA);
    fill_random(kc, 8, 1.f);
    fill_random(vc, 9, 1.f);
    Tensor q = Tensor::empty({b, 1, h, dh}, bf, kAct, Device::CUDA);
    fill_random(q, 10, 1.f);
    Tensor out = Tensor::empty(q.shape(), bf, kAct, Device::CUDA);
    double ms = time_ms([&] { attention_forward(out, q, kc, vc, past); }, 50);
    std::string name = "attention decode B=" + std::to_string(b) + " L=8192";
    report(name.c_str(), ms, 2.0 * b * cap * hkv * dh * 2, 4.0 * b * h * cap * dh);
  }
  {
    const int64_t b = 1, s = 2048, h = 32, hkv = 8, dh = 128;
    Tensor kc = Tensor::empty({b, s, hkv, dh}, bf, MemCategory::KvCache, Device::CUDA);
    Tensor vc = Tensor::empty({b, s, hkv, dh}, bf, MemCategory::KvCache, Device::CUDA);
    fill_random(kc, 11, 1.f);
    fill_random(vc, 12, 1.f);
    Tensor q = Tensor::empty({b, s, h, dh}, bf, kAct, Device::CUDA);
    fill_random(q, 13, 1.f);
    Tensor out = Tensor::empty(q.shape(), bf, kAct, Device::CUDA);
    double ms = time_ms([&] { attention_forward(out, q, kc, vc, 0); }, 5);
    report("attention prefill B=1 S=2048", ms, 0, 2.0 * b * h * s * s * dh);  // causal: half of 4*S*S*Dh
  }
}

// Attention alone, Mixtral shapes (H=32, Hkv=8, Dh=128; also Dh=64), bf16: causal prefill on
// the tensor-core kernel and on the f32-core fallback (MOE_CUDA_ATTN_PREFILL=simt), FLOPs counted
// as 4*B*H*Dh*S^2/2; decode (S=1) over caches of several lengths, bytes = K+V read once.
TEST(CrossOpsPerf, DISABLED_Attention) {
  REQUIRE_CUDA();
  const DType bf = DType::BF16;
  const int64_t h = 32, hkv = 8;
  struct Pf {
    int64_t b, s, dh;
  };
  for (const Pf& c : {Pf{4, 2048, 128}, Pf{1, 2048, 128}, Pf{4, 2048, 64}, Pf{1, 8192, 128}})
    for (const char* mode : {"mma", "simt"}) {
      if (std::string(mode) == "simt" && (c.dh != 128 || c.s > 2048)) continue;
      EnvScope env("MOE_CUDA_ATTN_PREFILL", mode);
      Tensor kc = Tensor::empty({c.b, c.s, hkv, c.dh}, bf, MemCategory::KvCache, Device::CUDA);
      Tensor vc = Tensor::empty({c.b, c.s, hkv, c.dh}, bf, MemCategory::KvCache, Device::CUDA);
      fill_random(kc, 11, 1.f);
      fill_random(vc, 12, 1.f);
      Tensor q = Tensor::empty({c.b, c.s, h, c.dh}, bf, kAct, Device::CUDA);
      fill_random(q, 13, 1.f);
      Tensor out = Tensor::empty(q.shape(), bf, kAct, Device::CUDA);
      const int iters = std::string(mode) == "mma" ? 20 : 3;
      double ms = time_ms([&] { attention_forward(out, q, kc, vc, 0); }, iters);
      std::string name = std::string("attn prefill ") + mode + " B=" + std::to_string(c.b) + " S=" +
                         std::to_string(c.s) + " Dh=" + std::to_string(c.dh);
      report(name.c_str(), ms, 0, 2.0 * c.b * h * c.s * c.s * c.dh);
    }
  struct Dc {
    int64_t b, len;
  };
  for (const Dc& c : {Dc{1, 128}, Dc{1, 2048}, Dc{1, 8192}, Dc{4, 2048}, Dc{8, 8192}, Dc{32, 1024}}) {
    for (const char* mode : {"new", "old"}) {
      EnvScope env("MOE_CUDA_ATTN_DECODE", mode);
      const int64_t dh = 128;
      Tensor kc = Tensor::empty({c.b, c.len, hkv, dh}, bf, MemCategory::KvCache, Device::CUDA);
      Tensor vc = Tensor::empty({c.b, c.len, hkv, dh}, bf, MemCategory::KvCache, Device::CUDA);
      fill_random(kc, 8, 1.f);
      fill_random(vc, 9, 1.f);
      Tensor q = Tensor::empty({c.b, 1, h, dh}, bf, kAct, Device::CUDA);
      fill_random(q, 10, 1.f);
      Tensor out = Tensor::empty(q.shape(), bf, kAct, Device::CUDA);
      double ms = time_ms([&] { attention_forward(out, q, kc, vc, c.len - 1); }, 200);
      std::string name =
          std::string("attn decode ") + mode + " B=" + std::to_string(c.b) + " L=" + std::to_string(c.len);
      report(name.c_str(), ms, 2.0 * c.b * c.len * hkv * dh * 2, 4.0 * c.b * h * c.len * dh);
    }
  }
}

}  // namespace
}  // namespace moe
