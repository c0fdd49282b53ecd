// test_quant_kernels.cpp — quantized CPU inference (ops/cpu/cpu_quant_gemm.h): every kernel
// variant the CPU has, forced one at a time (so AVX2 is tested on an AVX-512 machine too),
// against the naive references of ops/ref/ref_quant.h, then through the ops and a model.
//
// Stated bounds.
//  - Kernel vs the int8 reference (the same activation rounding, products in double): per
//    output |y - r| <= 1e-5 · Σ_j |w_j|·|x̂_j| + 1e-30 (f32 summation only).
//  - Kernel vs the exact product with the dequantized weights (the reference backend): per
//    output |y - y_exact| <= (1 + 1e-3) · Σ_blocks (d_b/2) Σ|w| + 1e-5 · Σ|w|·|x|, the first term
//    being the activation int8 rounding (|x - d·q| <= d/2, d = amax/127 per 32 or 256 values).
//  - Model (the mixtral/qwen2_moe/qwen3_moe fixtures, D = 64): q8_0 weights vs f32, logits
//    max |Δ| / max |logit| <= 3e-2 (weight rounding ~ amax/254 per value plus the activation
//    rounding, through 2 layers), greedy tokens equal for 8 steps.
// Weights are random BLOCK BYTES (every bit pattern: q8 -128, negative q6_K scales, all 6-bit
// K scales and mins) with sane f16 scales, so the kernels see more than our quantizer writes.
#include <gtest/gtest.h>

#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <random>
#include <string>
#include <vector>

#include "fixture_util.h"
#include "core/dtype.h"
#include "core/quant.h"
#include "core/tensor.h"
#include "io/gguf_model.h"
#include "model/model.h"
#include "ops/cpu/cpu_quant_gemm.h"
#include "ops/cpu/cpu_quant_impl.h"
#include "ops/ops.h"
#include "ops/ref/ref_quant.h"

namespace moe {
namespace {

using testutil::greedy;
using testutil::ids_tensor;
using testutil::logits_of;
using testutil::max_rel;

// The types the engine quantises to, and (kKernelTypes) every type the kernels run: q2_K, q3_K
// and the iq4 types come only from llama.cpp's files.
const DType kQuantTypes[] = {DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0,
                             DType::Q5_1, DType::Q4_K, DType::Q5_K, DType::Q6_K};
const DType kKernelTypes[] = {DType::Q8_0, DType::Q4_0, DType::Q4_1, DType::Q5_0,   DType::Q5_1,  DType::Q2_K,
                              DType::Q3_K, DType::Q4_K, DType::Q5_K, DType::Q6_K, DType::IQ4_NL, DType::IQ4_XS};

std::vector<cpu::QuantIsa> variants() {
  std::vector<cpu::QuantIsa> v;
  for (cpu::QuantIsa i : {cpu::QuantIsa::Avx2, cpu::QuantIsa::Avx512, cpu::QuantIsa::Avx512Vnni})
    if (cpu::quant_isa_supported(i)) v.push_back(i);
  return v;
}

// Restores the automatic variant choice when a test ends.
struct IsaGuard {
  ~IsaGuard() { cpu::set_quant_isa(cpu::QuantIsa::Auto); }
};

void put_f16(uint8_t* p, float v) {
  const uint16_t h = f32_to_f16(v);
  std::memcpy(p, &h, 2);
}

// m rows of k values of random block bytes with f16 scales set to sane magnitudes.
std::vector<uint8_t> random_blocks(DType t, int64_t m, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_int_distribution<int> byte(0, 255);
  std::uniform_real_distribution<float> u(0.5f, 1.5f);
  const int64_t be = dtype_block_elems(t), nb = m * k / be;
  const size_t bb = dtype_nbytes(t, be);
  std::vector<uint8_t> w(static_cast<size_t>(nb) * bb);
  for (auto& b : w) b = static_cast<uint8_t>(byte(rng));
  for (int64_t i = 0; i < nb; ++i) {
    uint8_t* p = w.data() + i * bb;
    const float sgn = byte(rng) & 1 ? 1.0f : -1.0f;
    switch (t) {
      case DType::Q8_0: put_f16(p, sgn * u(rng) / 127.0f); break;
      case DType::Q4_0: put_f16(p, sgn * u(rng) / 8.0f); break;
      case DType::Q5_0: put_f16(p, sgn * u(rng) / 16.0f); break;
      case DType::Q4_1:  // the minimum about the value range's size, of either sign
      case DType::Q5_1:
        put_f16(p, u(rng) / (t == DType::Q4_1 ? 15.0f : 31.0f));
        put_f16(p + 2, -sgn * u(rng));
        break;
      case DType::Q4_K:
      case DType::Q5_K:
        put_f16(p, u(rng) / 63.0f / 15.0f);
        put_f16(p + 2, u(rng) / 63.0f / 2.0f);
        break;
      case DType::Q6_K: put_f16(p + 208, sgn * u(rng) / 127.0f / 32.0f); break;
      case DType::Q3_K: put_f16(p + 108, sgn * u(rng) / 32.0f / 4.0f); break;
      case DType::IQ4_NL: put_f16(p, sgn * u(rng) / 127.0f); break;
      case DType::IQ4_XS: put_f16(p, sgn * u(rng) / 127.0f / 32.0f); break;
      case DType::Q2_K:
        put_f16(p + 80, u(rng) / 15.0f / 3.0f);
        put_f16(p + 82, u(rng) / 15.0f / 2.0f);
        break;
      default: break;
    }
  }
  return w;
}

std::vector<float> random_x(int64_t n, int64_t k, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> nd(0.0f, 1.0f);
  std::vector<float> x(static_cast<size_t>(n * k));
  for (auto& v : x) v = nd(rng);
  // A block of zeros (scale 0) and a large outlier exercise the edge cases of the rounding.
  if (k >= 64) {
    for (int64_t j = 0; j < 32; ++j) x[static_cast<size_t>(j)] = 0.0f;
    x[static_cast<size_t>(40)] = 37.0f;
  }
  return x;
}

// Σ_j |dequant(w)| · |x̂|  and  Σ_j |dequant(w)| · |x| per output: the scales of the f32 slack.
void abs_products(std::vector<double>* s_hat, std::vector<double>* s_x, const std::vector<float>& x,
                  const std::vector<uint8_t>& w, DType t, int64_t n, int64_t m, int64_t k) {
  const int64_t blk = cpu::quant_act_block(t);
  std::vector<float> wd(static_cast<size_t>(m * k));
  for (int64_t r = 0; r < m; ++r)
    dequantize_row(dtype_ggml_type(t), w.data() + r * dtype_nbytes(t, k), wd.data() + r * k, k);
  std::vector<int8_t> q(static_cast<size_t>(k));
  std::vector<float> d(static_cast<size_t>(k / blk));
  s_hat->assign(static_cast<size_t>(n * m), 0.0);
  s_x->assign(static_cast<size_t>(n * m), 0.0);
  for (int64_t i = 0; i < n; ++i) {
    ref::quantize_act_row(x.data() + i * k, k, blk, q.data(), d.data());
    for (int64_t r = 0; r < m; ++r)
      for (int64_t j = 0; j < k; ++j) {
        (*s_hat)[i * m + r] += std::fabs(double(wd[r * k + j]) * d[j / blk] * q[j]);
        (*s_x)[i * m + r] += std::fabs(double(wd[r * k + j]) * x[i * k + j]);
      }
  }
}

struct Shape3 {
  int64_t n, m, kb;  // kb: k in blocks
};

// Every type x variant x shape: the kernel equals the int8 reference up to f32 summation and
// stays within the activation-rounding bound of the exact product; accumulate adds.
TEST(QuantKernels, EveryVariantMatchesReferences) {
  IsaGuard guard;
  const std::vector<cpu::QuantIsa> vs = variants();
  ASSERT_FALSE(vs.empty()) << "the build targets AVX2; this CPU runs none of the variants";
  // n = 1 (decode), 3 (a remainder tile), 5, 67 (crosses the 64-row activation chunk);
  // odd block counts exercise the 512-bit loops' tails; m = 1 and 7 partial weight tiles;
  // decode with 9 blocks runs the 4-block groups of the one-row q8_0/q4_0 kernels and a tail;
  // from kPackedMinRows (8) rows the packed tiles (cpu_quant_packed.h): n 8 with whole 8-row
  // tiles (m 16), n 19 and 67 with partial ones (m 17, 9) and 1-3 activation rows left over.
  static_assert(cpu::kPackedMinRows == 8, "the shapes below straddle the packed path's threshold");
  // n 1 m 301 k 9 blocks: decode split over the threads (m·k > 65536 for every type), each
  // thread's rows in 4 streams with a remainder, the K-quant row pairs (tile_qk45_pairs for
  // q4_K/q5_K and tile_q6k_pairs for q6_K on AVX2, tile_qk45_quads / tile_q6k_quads on the
  // 512-bit variants) included.
  const Shape3 shapes[] = {{1, 7, 1}, {1, 37, 3}, {1, 13, 9}, {1, 301, 9}, {1, 23, 4}, {3, 5, 2}, {5, 11, 5}, {7, 9, 2},
                           {8, 16, 2}, {19, 17, 1}, {67, 9, 3}, {2, 1, 4}};
  uint32_t seed = 1;
  for (DType t : kKernelTypes) {
    const int64_t be = dtype_block_elems(t);
    for (const Shape3& s : shapes) {
      const int64_t n = s.n, m = s.m, k = s.kb * be;
      const std::vector<uint8_t> w = random_blocks(t, m, k, ++seed);
      const std::vector<float> x = random_x(n, k, ++seed);
      std::vector<double> r8(static_cast<size_t>(n * m)), rex(r8.size()), bound(r8.size()), s_hat, s_x;
      ref::quant_gemm_xwt_int8(r8.data(), x.data(), w.data(), t, n, m, k);
      ref::quant_gemm_xwt_exact(rex.data(), x.data(), w.data(), t, n, m, k);
      ref::act_rounding_bound(bound.data(), x.data(), w.data(), t, n, m, k);
      abs_products(&s_hat, &s_x, x, w, t, n, m, k);
      for (cpu::QuantIsa v : vs) {
        cpu::set_quant_isa(v);
        const std::string what = std::string(dtype_name(t)) + " " + cpu::quant_isa_name(v) + " n" +
                                 std::to_string(n) + " m" + std::to_string(m) + " k" + std::to_string(k);
        const int64_t ldo = m + 3;  // a wider output row: columns past m stay untouched
        std::vector<float> y(static_cast<size_t>(n * ldo), -5.0f);
        cpu::quant_gemm_xwt(y.data(), ldo, x.data(), w.data(), t, n, m, k, false);
        double worst8 = 0, worst_ex = 0;
        for (int64_t i = 0; i < n; ++i) {
          for (int64_t r = 0; r < m; ++r) {
            const size_t o = static_cast<size_t>(i * m + r);
            const double got = y[static_cast<size_t>(i * ldo + r)];
            const double tol8 = 1e-5 * s_hat[o] + 1e-30;
            const double tol_ex = (1 + 1e-3) * bound[o] + 1e-5 * s_x[o] + 1e-30;
            worst8 = std::max(worst8, std::fabs(got - r8[o]) / tol8);
            worst_ex = std::max(worst_ex, std::fabs(got - rex[o]) / tol_ex);
          }
          for (int64_t r = m; r < ldo; ++r) ASSERT_EQ(y[static_cast<size_t>(i * ldo + r)], -5.0f) << what;
        }
        EXPECT_LE(worst8, 1.0) << what << ": vs the int8 reference (1 = the f32 tolerance)";
        EXPECT_LE(worst_ex, 1.0) << what << ": vs the exact product (1 = the activation-rounding bound)";
        // accumulate: y += x·Wᵀ
        std::vector<float> y2 = y;
        cpu::quant_gemm_xwt(y2.data(), ldo, x.data(), w.data(), t, n, m, k, true);
        for (int64_t i = 0; i < n; ++i)
          for (int64_t r = 0; r < m; ++r) {
            const size_t j = static_cast<size_t>(i * ldo + r);
            EXPECT_NEAR(y2[j], 2.0 * y[j], 1e-5 * (2 * s_hat[static_cast<size_t>(i * m + r)]) + 1e-30) << what;
          }
      }
    }
  }
}

// The variants agree with each other bit for bit on the int8 sums; outputs differ only by f32
// summation order (512-bit lanes pair blocks): within 1e-6 relative of Σ|w||x̂|.
TEST(QuantKernels, VariantsAgree) {
  IsaGuard guard;
  const std::vector<cpu::QuantIsa> vs = variants();
  if (vs.size() < 2) GTEST_SKIP() << "SKIPPED: only " << vs.size() << " kernel variant runs on this CPU";
  for (DType t : kKernelTypes)
    for (int64_t n : {4, 12}) {  // the row kernels and the packed tiles
      const int64_t m = 13, k = 6 * dtype_block_elems(t);
      const std::vector<uint8_t> w = random_blocks(t, m, k, 77);
      const std::vector<float> x = random_x(n, k, 78);
      std::vector<double> s_hat, s_x;
      abs_products(&s_hat, &s_x, x, w, t, n, m, k);
      std::vector<std::vector<float>> ys;
      for (cpu::QuantIsa v : vs) {
        cpu::set_quant_isa(v);
        ys.emplace_back(static_cast<size_t>(n * m));
        cpu::quant_gemm_xwt(ys.back().data(), m, x.data(), w.data(), t, n, m, k, false);
      }
      for (size_t a = 1; a < ys.size(); ++a)
        for (size_t j = 0; j < ys[0].size(); ++j)
          EXPECT_NEAR(ys[a][j], ys[0][j], 1e-6 * s_hat[j]) << dtype_name(t) << " " << cpu::quant_isa_name(vs[a]);
    }
}

// q8_0 decode: the 512-bit rows of the VNNI variant (weights as w + 128, 128·Σa taken off)
// reach the same int32 block sums as the 256-bit sign-trick rows and reduce and scale them in
// the same order, so every variant's output is the same float, bit for bit (odd and even block
// counts; 301 rows split over the threads and 4 streams).
TEST(QuantKernels, Q8DecodeVariantsBitEqual) {
  IsaGuard guard;
  const std::vector<cpu::QuantIsa> vs = variants();
  if (vs.size() < 2) GTEST_SKIP() << "SKIPPED: only " << vs.size() << " kernel variant runs on this CPU";
  for (int64_t kb : {9, 10}) {
    const int64_t m = 301, k = kb * 32;
    const std::vector<uint8_t> w = random_blocks(DType::Q8_0, m, k, 91);
    const std::vector<float> x = random_x(1, k, 92);
    std::vector<std::vector<float>> ys;
    for (cpu::QuantIsa v : vs) {
      cpu::set_quant_isa(v);
      ys.emplace_back(static_cast<size_t>(m));
      cpu::quant_gemm_xwt(ys.back().data(), m, x.data(), w.data(), DType::Q8_0, 1, m, k, false);
    }
    for (size_t a = 1; a < ys.size(); ++a)
      for (int64_t j = 0; j < m; ++j)
        ASSERT_EQ(ys[a][static_cast<size_t>(j)], ys[0][static_cast<size_t>(j)])
            << cpu::quant_isa_name(vs[a]) << " row " << j << " k " << k;
  }
}

// One token's products with several weights (quant_gemv_parts: attention's q/k/v of a Q4_K_M
// file, an expert's gate and up) equal the separate products bit for bit, in every variant:
// parts of one dtype read as one set of streams whose rows cross from one part to the next
// (q4_K q and k below: 93 + 37 rows over 2 threads and 4 streams), more same-dtype parts than one
// job takes (nine), parts whose kernels want the activations in different layouts (q8_0 and
// q4_0: one product each), and the call made inside a parallel region (the experts' slices).
TEST(QuantKernels, GemvPartsEqualTheSeparateProducts) {
  IsaGuard guard;
  struct Case {
    std::vector<DType> types;
    std::vector<int64_t> rows;
    int64_t k;
  };
  const std::vector<Case> cases = {
      {{DType::Q4_K, DType::Q4_K, DType::Q6_K}, {93, 37, 37}, 768},
      {std::vector<DType>(9, DType::Q4_K), {61, 3, 40, 17, 9, 33, 1, 70, 25}, 512},
      {{DType::Q8_0, DType::Q4_0, DType::Q8_0}, {90, 41, 7}, 1024},
      {{DType::Q5_K, DType::Q6_K, DType::Q5_K, DType::Q5_K}, {45, 51, 8, 64}, 1280},
  };
  uint32_t seed = 300;
  for (const Case& c : cases) {
    const size_t np = c.types.size();
    std::vector<std::vector<uint8_t>> w(np);
    for (size_t i = 0; i < np; ++i) w[i] = random_blocks(c.types[i], c.rows[i], c.k, ++seed);
    const std::vector<float> x = random_x(1, c.k, ++seed);
    for (cpu::QuantIsa v : variants()) {
      cpu::set_quant_isa(v);
      for (bool nested : {false, true}) {
        int64_t total = 0;
        for (int64_t m : c.rows) total += m;
        std::vector<float> want(static_cast<size_t>(total)), got(static_cast<size_t>(total), -7.0f);
        std::vector<cpu::QuantPart> parts;
        int64_t col = 0;
        for (size_t i = 0; i < np; ++i) {
          cpu::quant_gemm_xwt(want.data() + col, c.rows[i], x.data(), w[i].data(), c.types[i], 1, c.rows[i], c.k,
                              false);
          parts.push_back({w[i].data(), c.types[i], c.rows[i], got.data() + col});
          col += c.rows[i];
        }
        if (nested) {
#pragma omp parallel num_threads(2)
          {
#pragma omp single
            cpu::quant_gemv_parts(x.data(), c.k, parts.data(), static_cast<int>(np));
          }
        } else {
          cpu::quant_gemv_parts(x.data(), c.k, parts.data(), static_cast<int>(np));
        }
        for (int64_t j = 0; j < total; ++j)
          ASSERT_EQ(got[static_cast<size_t>(j)], want[static_cast<size_t>(j)])
              << dtype_name(c.types[0]) << " x" << np << " " << cpu::quant_isa_name(v) << (nested ? " nested" : "")
              << " output " << j;
      }
    }
  }
}

TEST(QuantKernels, IsaNamesAndForcing) {
  IsaGuard guard;
  cpu::QuantIsa v;
  EXPECT_TRUE(cpu::quant_isa_from_name("avx512vnni", &v));
  EXPECT_EQ(v, cpu::QuantIsa::Avx512Vnni);
  EXPECT_FALSE(cpu::quant_isa_from_name("sse2", &v));
  for (cpu::QuantIsa i : variants()) {
    cpu::set_quant_isa(i);
    EXPECT_EQ(cpu::quant_isa(), i);
  }
  cpu::set_quant_isa(cpu::QuantIsa::Auto);
  EXPECT_NE(cpu::quant_isa(), cpu::QuantIsa::Auto);
  if (!cpu::quant_isa_supported(cpu::QuantIsa::Avx512Vnni)) {
    EXPECT_THROW(cpu::set_quant_isa(cpu::QuantIsa::Avx512Vnni), Error);
  }
}

// ---- tensors and ops ----

Tensor quant_tensor(const Shape& s, DType t, uint32_t seed) {
  const int64_t k = s.back(), m = shape_numel(s) / k;
  const std::vector<uint8_t> w = random_blocks(t, m, k, seed);
  Tensor q = Tensor::empty(s, t, MemCategory::QuantWeights);
  EXPECT_EQ(q.nbytes(), w.size());
  std::memcpy(q.raw(), w.data(), w.size());
  return q;
}

Tensor f32_tensor(const Shape& s, uint32_t seed) {
  std::vector<float> v = random_x(1, shape_numel(s), seed);
  return Tensor::from_f32(s, v, MemCategory::Activations);
}

TEST(QuantTensor, BlockDtypes) {
  for (DType t : kQuantTypes) {
    const int64_t be = dtype_block_elems(t);
    EXPECT_TRUE(dtype_is_quant(t));
    EXPECT_THROW(dtype_size(t), Error);
    EXPECT_THROW(Tensor::empty({3, be + 1}, t, MemCategory::QuantWeights), Error) << dtype_name(t);
    DType back;
    EXPECT_TRUE(dtype_from_quant_name(dtype_name(t), &back));
    EXPECT_EQ(back, t);
    // rows/select cut on blocks; to_dtype(f32) dequantizes exactly as core/quant does.
    Tensor q = quant_tensor({3, 2, 2 * be}, t, 5);
    EXPECT_EQ(q.nbytes(), 3 * 2 * ggml_row_bytes(dtype_ggml_type(t), 2 * be));
    Tensor s = q.select(1);
    EXPECT_EQ(static_cast<const uint8_t*>(s.raw()) - static_cast<const uint8_t*>(q.raw()),
              static_cast<ptrdiff_t>(2 * ggml_row_bytes(dtype_ggml_type(t), 2 * be)));
    std::vector<float> want(static_cast<size_t>(2 * 2 * be));
    dequantize_row(dtype_ggml_type(t), s.raw(), want.data(), 2 * 2 * be);
    EXPECT_EQ(s.to_dtype(DType::F32).to_f32_vector(), want);
    // f32 -> block type -> f32 is quantize_row / dequantize_row.
    Tensor f = f32_tensor({2, 2 * be}, 9);
    Tensor fq = f.to_dtype(t, MemCategory::QuantWeights);
    std::vector<uint8_t> blocks(fq.nbytes());
    quantize_row(dtype_ggml_type(t), f.data<float>(), blocks.data(), 2 * 2 * be);
    EXPECT_EQ(0, std::memcmp(blocks.data(), fq.raw(), blocks.size())) << dtype_name(t);
  }
  DType d;
  EXPECT_FALSE(dtype_from_quant_name("q3_k", &d));
  EXPECT_FALSE(dtype_from_name("q8_0", &d));  // the float spelling stays float-only
}

// The op boundary accepts exactly (quantized weight, f32 activations) on the CPU.
TEST(QuantOps, ValidationNamesTheProblem) {
  Tensor w = quant_tensor({5, 64}, DType::Q8_0, 3);
  Tensor x = f32_tensor({2, 64}, 4);
  Tensor y = Tensor::empty({2, 5}, DType::F32, MemCategory::Activations);
  EXPECT_NO_THROW(linear_forward(y, x, w, Tensor()));
  Tensor xb = x.to_dtype(DType::BF16);
  try {
    linear_forward(y, xb, w, Tensor());
    ADD_FAILURE() << "bf16 activations with a q8_0 weight were accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("must be f32"), std::string::npos) << e.what();
  }
  // Training ops take a quantized weight only frozen (QLoRA): the input gradient is computed
  // (from the exactly dequantized rows), a weight gradient is refused.
  Tensor dx = Tensor::empty({2, 64}, DType::F32, MemCategory::Activations), dw, db;
  EXPECT_NO_THROW(linear_backward(dx, dw, db, y, x, w, false));
  Tensor dx_ref = Tensor::empty({2, 64}, DType::F32, MemCategory::Activations);
  linear_backward(dx_ref, dw, db, y, x, w.to_dtype(DType::F32), false);
  EXPECT_EQ(dx.to_f32_vector(), dx_ref.to_f32_vector()) << "dX through a q8_0 weight = through its dequantized copy";
  Tensor dw_q = Tensor::zeros({5, 64}, DType::F32, MemCategory::Activations);
  try {
    linear_backward(dx, dw_q, db, y, x, w, false);
    ADD_FAILURE() << "a gradient for a quantized weight was accepted";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("frozen"), std::string::npos) << e.what();
  }
  // Experts: w1/w3 one type, w2 may differ (a Q4_K_M mix); w1 != w3 is refused.
  const int64_t e = 3, f = 64, dd = 256;
  Tensor w1 = quant_tensor({e, f, dd}, DType::Q4_K, 5), w3 = quant_tensor({e, f, dd}, DType::Q4_K, 6);
  Tensor w2 = quant_tensor({e, dd, f}, DType::Q8_0, 7), w3b = quant_tensor({e, f, dd}, DType::Q8_0, 8);
  Tensor off = Tensor::empty({e + 1}, DType::I32, MemCategory::Activations);
  const int32_t offs[] = {0, 1, 1, 2};
  std::memcpy(off.raw(), offs, sizeof offs);
  Tensor xp = f32_tensor({2, dd}, 9), yp = Tensor::empty({2, dd}, DType::F32, MemCategory::Activations);
  EXPECT_NO_THROW(expert_ffn_forward(yp, xp, off, w1, w3, w2, Tensor()));
  EXPECT_THROW(expert_ffn_forward(yp, xp, off, w1, w3b, w2, Tensor()), Error);
  if (cuda_available()) {
    Tensor wc = w.to(Device::CUDA), xc = x.to(Device::CUDA), yc = y.to(Device::CUDA);
    try {
      linear_forward(yc, xc, wc, Tensor());
      ADD_FAILURE() << "a quantized weight was accepted on CUDA";
    } catch (const Error& ex) {
      EXPECT_NE(std::string(ex.what()).find("CPU only"), std::string::npos) << ex.what();
    }
  }
}

// expert_ffn_forward with quantized experts (w2 of another type) through the op, for every
// variant, against the reference backend (exact dequantized product in double): experts without
// rows are never read (their blocks are NaN scales here), the error is the activation rounding.
TEST(QuantOps, ExpertFfnEveryVariant) {
  IsaGuard guard;
  const int64_t e = 4, f = 256, d = 512, t = 3, k = 2, p = t * k;
  for (auto [wt, w2t] : {std::pair{DType::Q4_K, DType::Q6_K}, {DType::Q8_0, DType::Q8_0}, {DType::Q4_0, DType::Q5_K}}) {
    Tensor w1 = quant_tensor({e, f, d}, wt, 11), w3 = quant_tensor({e, f, d}, wt, 12);
    Tensor w2 = quant_tensor({e, d, f}, w2t, 13);
    // Expert 2 gets no rows: poison its blocks (all bytes 0xFF: NaN f16 scales).
    for (Tensor* wp : {&w1, &w3, &w2}) {
      Tensor s = wp->select(2);
      std::memset(s.raw(), 0xFF, s.nbytes());
    }
    Tensor off = Tensor::empty({e + 1}, DType::I32, MemCategory::Activations);
    const int32_t offs[] = {0, 2, 4, 4, 6};
    std::memcpy(off.raw(), offs, sizeof offs);
    Tensor xp = f32_tensor({p, d}, 14);
    Tensor rs = f32_tensor({p}, 15);
    Tensor want = Tensor::zeros({p, d}, DType::F32, MemCategory::Activations);
    set_reference_backend(true);
    expert_ffn_forward(want, xp, off, w1, w3, w2, rs);
    set_reference_backend(false);
    const std::vector<float> wv = want.to_f32_vector();
    double den = 0;
    for (float v : wv) den += double(v) * v;
    for (cpu::QuantIsa v : variants()) {
      cpu::set_quant_isa(v);
      Tensor got = Tensor::zeros({p, d}, DType::F32, MemCategory::Activations);
      expert_ffn_forward(got, xp, off, w1, w3, w2, rs);
      const std::vector<float> gv = got.to_f32_vector();
      double num = 0;
      for (size_t i = 0; i < gv.size(); ++i) {
        ASSERT_TRUE(std::isfinite(gv[i])) << "a poisoned expert was read";
        num += (double(gv[i]) - wv[i]) * (double(gv[i]) - wv[i]);
      }
      // Two chained products with int8 activations: normwise ~0.5% each (d/sqrt(12) per value).
      EXPECT_LE(std::sqrt(num / den), 3e-2) << dtype_name(wt) << "/" << dtype_name(w2t) << " " << cpu::quant_isa_name(v);
    }
  }
}

// ---- the model ----

const std::string kFixtures = MOE_FIXTURES_DIR;

class QuantModel : public ::testing::TestWithParam<std::string> {};

// Loading with quant_dtype Q8_0 quantizes every projection (QuantWeights), keeps embeddings,
// norms and routers float; the logits stay within 3e-2 of f32 and greedy decoding agrees.
TEST_P(QuantModel, Q8_0LogitsAndGreedyTokensMatchF32) {
  const std::string dir = kFixtures + "/" + GetParam();
  if (!std::filesystem::exists(dir)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << dir;
  Model base = Model::load(dir);
  LoadOptions lo;
  lo.quant_dtype = DType::Q8_0;
  Model q = Model::load(dir, lo);
  const LayerWeights& lw = q.weights().layers[0];
  EXPECT_EQ(lw.wqkv.dtype(), DType::Q8_0);
  EXPECT_EQ(lw.wo.dtype(), DType::Q8_0);
  EXPECT_EQ(lw.w1.dtype(), DType::Q8_0);
  EXPECT_EQ(lw.w2.dtype(), DType::Q8_0);
  EXPECT_EQ(lw.w1.category(), MemCategory::QuantWeights);
  EXPECT_EQ(lw.router.dtype(), DType::F32);
  EXPECT_EQ(q.weights().embed.dtype(), DType::F32);
  const std::vector<int32_t> ids = {1, 5, 9, 200, 3, 77, 31, 8};
  const double e = max_rel(logits_of(q, ids), logits_of(base, ids));
  EXPECT_LE(e, 3e-2) << GetParam() << ": q8_0 logits vs f32";
  EXPECT_GT(e, 0.0) << "the quantized model computed exactly the f32 logits: were the weights quantized?";
  EXPECT_EQ(greedy(q, {1, 5, 9}, 8), greedy(base, {1, 5, 9}, 8)) << GetParam();
  // Q4_K does not fit the fixture's rows (D = 64 < 256): those weights fall back to Q8_0.
  LoadOptions l4;
  l4.quant_dtype = DType::Q4_K;
  Model q4 = Model::load(dir, l4);
  EXPECT_EQ(q4.weights().layers[0].wo.dtype(), DType::Q8_0);
  // Quantized weights are refused for CUDA at load, with a clear message.
  LoadOptions lc = lo;
  lc.device = Device::CUDA;
  EXPECT_THROW(Model::load(dir, lc), Error);
}

// A q8_0 GGUF loaded with keep_quantized runs on the file's blocks (no dequantisation): the
// projections hold Q8_0, and the logits match the same file dequantized to f32 within the
// activation-rounding tolerance.
TEST_P(QuantModel, GgufKeepsQuantizedBlocks) {
  const std::string src = kFixtures + "/" + GetParam();
  if (!std::filesystem::exists(src)) GTEST_SKIP() << "SKIPPED: fixtures not found at " << src;
  char tmpl[] = "/tmp/moe_qk_XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  const std::string path = std::string(tmpl) + "/m.gguf";
  GgufWriteOptions wo;
  wo.type = GgufFileType::Q8_0;
  write_gguf(src, path, wo);
  GgufLoadOptions keep;
  keep.keep_quantized = true;
  GgufModel gq = load_gguf_model(path, keep), gf = load_gguf_model(path);
  Model mq = Model::from_tensors(gq.config, gq.tensors), mf = Model::from_tensors(gf.config, gf.tensors);
  EXPECT_EQ(mq.weights().layers[0].wqkv.dtype(), DType::Q8_0);
  EXPECT_EQ(mq.weights().layers[0].w1.dtype(), DType::Q8_0);
  EXPECT_EQ(mq.weights().embed.dtype(), DType::F32);
  EXPECT_EQ(mf.weights().layers[0].w1.dtype(), DType::F32);
  const std::vector<int32_t> ids = {1, 5, 9, 200, 3, 77};
  EXPECT_LE(max_rel(logits_of(mq, ids), logits_of(mf, ids)), 3e-2) << GetParam();
  // The reference backend on the kept blocks computes the exact dequantized product: it equals
  // the f32 model of the dequantized file up to f32 rounding.
  set_reference_backend(true);
  const std::vector<float> exact_q = logits_of(mq, ids);
  set_reference_backend(false);
  EXPECT_LE(max_rel(exact_q, logits_of(mf, ids)), 1e-4) << GetParam();
  // The CPU's exact path (moe logits without --fast): the kept blocks dequantized row chunk by
  // row chunk give the f32 model's logits up to summation order, far inside the int8 rounding.
  cpu::set_quant_exact(true);
  const std::vector<float> exact_cpu = logits_of(mq, ids);
  cpu::set_quant_exact(false);
  const double exact_err = max_rel(exact_cpu, logits_of(mf, ids)), fast_err = max_rel(logits_of(mq, ids), logits_of(mf, ids));
  EXPECT_LE(exact_err, 1e-5) << GetParam();
  EXPECT_GT(fast_err, 10 * exact_err) << GetParam();  // the two paths really differ
  std::filesystem::remove_all(tmpl);
}

INSTANTIATE_TEST_SUITE_P(Fixtures, QuantModel, ::testing::Values("mixtral", "qwen2_moe", "qwen3_moe"));

}  // namespace
}  // namespace moe
