// test_adamw_lanes.cpp — AdamW's element loops (adamw_lanes.h) are compiled twice: eight f32
// lanes (AVX2) and sixteen (AVX-512, used where the CPU has it). Both must give exactly the bits
// of the scalar loop, element by element — weights, both moments and the split master halves —
// or a run's weights would depend on the machine it ran on. The scalar result is each element
// updated alone (a one-element range runs only the scalar loop); the sums of squares of the
// two vector copies must be equal bit for bit too (the same per-lane order).
#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "core/dtype.h"
#include "core/rng.h"
#include "model/model_train.h"
#include "train/adamw_rule.h"

namespace moe {
namespace {

using adamw::Betas;
using adamw::ParamUpdate;

// One parameter's storage, in one of the four layouts the loops see.
struct Param {
  bool split = false, bf16 = false;
  std::vector<float> w, g, m32, v32;
  std::vector<uint16_t> hi, lo, m16, v16;

  ParamUpdate update(int64_t n) {
    ParamUpdate u;
    if (split) {
      u.hi = hi.data();
      u.lo = lo.data();
    } else {
      u.w = w.data();
    }
    u.g = g.data();
    u.m = bf16 ? static_cast<void*>(m16.data()) : static_cast<void*>(m32.data());
    u.v = bf16 ? static_cast<void*>(v16.data()) : static_cast<void*>(v32.data());
    u.n = n;
    u.step_size = 1e-3 / (1 - 0.9 * 0.9);
    u.bc2 = std::sqrt(1 - 0.999 * 0.999);
    u.decay = 1 - 1e-3 * 0.01;
    return u;
  }
  bool operator==(const Param& o) const {
    auto same = [](const auto& a, const auto& b) {
      return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(a[0])) == 0);
    };
    return same(w, o.w) && same(hi, o.hi) && same(lo, o.lo) && same(m32, o.m32) && same(v32, o.v32) &&
           same(m16, o.m16) && same(v16, o.v16);
  }
};

// n elements of random magnitudes over many binades, with a zero, a subnormal and a NaN gradient
// (its moments must become the same NaNs in every copy: bf16 rounding must not carry its
// payload into the sign bit).
Param make_param(int64_t n, bool split, bool bf16, uint64_t seed) {
  Rng r(seed);
  Param p;
  p.split = split;
  p.bf16 = bf16;
  auto val = [&](double scale) { return float(r.normal() * scale * std::pow(10.0, r.uniform() * 6 - 3)); };
  for (int64_t j = 0; j < n; ++j) {
    const float w = val(0.05), g = val(1e-2);
    const float m = val(1e-3), v = std::fabs(val(1e-5));
    p.w.push_back(w);
    p.g.push_back(g);
    if (split) {
      const uint32_t b = std::bit_cast<uint32_t>(w);
      p.hi.push_back(master_high(b));
      p.lo.push_back(static_cast<uint16_t>(b));
    }
    if (bf16) {
      p.m16.push_back(f32_to_bf16(m));
      p.v16.push_back(f32_to_bf16(v));
    } else {
      p.m32.push_back(m);
      p.v32.push_back(v);
    }
  }
  if (split) p.w.clear();
  if (n > 5) p.g[5] = 0.0f;
  if (n > 9) p.g[9] = std::numeric_limits<float>::denorm_min();
  if (n > 30) p.g[30] = std::bit_cast<float>(0x7fffffffu);  // a NaN whose rounding would carry into the sign
  return p;
}

using RangeFn = double (*)(const Betas&, const ParamUpdate&, int64_t, int64_t, bool);

// The parameter after each element is updated alone (the scalar loop), and after ranges
// [j0, n) through fn, for the layouts and lengths that leave every tail length of both loops.
void expect_same_as_scalar(RangeFn fn, const char* name, double* ss_out) {
  const Betas bt{0.9, 0.999, 1e-8};
  int checked = 0;
  for (int layout = 0; layout < 4; ++layout) {
    const bool split = layout & 1, bf16 = layout & 2;
    for (int64_t n : {1, 3, 4, 7, 8, 9, 15, 16, 17, 31, 64, 67, 1000}) {
      for (int64_t j0 : {int64_t(0), int64_t(1), int64_t(5)}) {
        if (j0 >= n) continue;
        Param scalar = make_param(n, split, bf16, uint64_t(100 * n + layout));
        Param vec = scalar;
        ParamUpdate us = scalar.update(n), uv = vec.update(n);
        for (int64_t j = j0; j < n; ++j) adamw::update_range_avx2(bt, us, j, j + 1, bf16);
        const double ss = fn(bt, uv, j0, n, bf16);
        EXPECT_TRUE(vec == scalar) << name << ": layout split=" << split << " bf16=" << bf16 << " n=" << n
                                   << " j0=" << j0;
        if (n == 1000 && j0 == 1) ss_out[layout] = ss;
        ++checked;
      }
    }
  }
  EXPECT_GT(checked, 100);
}

TEST(AdamWLanes, EightLanesGiveTheScalarBits) {
  double ss[4] = {};
  expect_same_as_scalar(adamw::update_range_avx2, "avx2", ss);
  for (double s : ss) EXPECT_TRUE(std::isnan(s));  // element 30's NaN gradient reaches the sum
}

TEST(AdamWLanes, SixteenLanesGiveTheEightLaneBits) {
  if (!adamw::avx512_available()) GTEST_SKIP() << "SKIPPED: this CPU has no AVX-512 (the sixteen-lane copy is unused here)";
  double ss4[4] = {}, ss8[4] = {};
  expect_same_as_scalar(adamw::update_range_avx512, "avx512", ss8);
  expect_same_as_scalar(adamw::update_range_avx2, "avx2", ss4);
  // Sums of squares without the NaN: the per-lane order must match bit for bit.
  const Betas bt{0.9, 0.999, 1e-8};
  for (int layout = 0; layout < 4; ++layout) {
    const bool split = layout & 1, bf16 = layout & 2;
    for (int64_t n : {8, 12, 13, 24, 40, 1000, 4099}) {
      Param a = make_param(n, split, bf16, uint64_t(7 + n));
      if (n > 30) a.g[30] = 1.0f;
      Param b = a;
      ParamUpdate ua = a.update(n), ub = b.update(n);
      const double s4 = adamw::update_range_avx2(bt, ua, 0, n, bf16);
      const double s8 = adamw::update_range_avx512(bt, ub, 0, n, bf16);
      EXPECT_EQ(std::bit_cast<uint64_t>(s4), std::bit_cast<uint64_t>(s8)) << "n=" << n << " layout " << layout;
      EXPECT_TRUE(a == b) << "n=" << n << " layout " << layout;
    }
  }
}

}  // namespace
}  // namespace moe
