// nf4.cpp — NF4 blocks (see nf4.h).
#include "core/nf4.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "core/error.h"

namespace moe {

const float kNf4Codes[16] = {-1.0f,
                             -0.6961928009986877f,
                             -0.5250730514526367f,
                             -0.39491748809814453f,
                             -0.28444138169288635f,
                             -0.18477343022823334f,
                             -0.09105003625154495f,
                             0.0f,
                             0.07958029955625534f,
                             0.16093020141124725f,
                             0.24611230194568634f,
                             0.33791524171829224f,
                             0.44070982933044434f,
                             0.5626170039176941f,
                             0.7229568362236023f,
                             1.0f};

float nf4_max_error_per_absmax() {
  float m = 0;
  for (int i = 0; i + 1 < 16; ++i) m = std::max(m, (kNf4Codes[i + 1] - kNf4Codes[i]) / 2);
  return m;
}

namespace {

// Index of the nearest code to v in [-1, 1] (ties: the lower code), by the midpoints.
uint8_t nearest_code(float v) {
  uint8_t lo = 0;
  for (uint8_t i = 0; i + 1 < 16; ++i)
    if (v > 0.5f * (kNf4Codes[i] + kNf4Codes[i + 1])) lo = uint8_t(i + 1);
  return lo;
}

}  // namespace

void nf4_quantize(const float* src, uint8_t* dst, int64_t n) {
  MOE_CHECK(n % kNf4Block == 0, "nf4: %lld values are not whole blocks of %lld", (long long)n, (long long)kNf4Block);
  for (int64_t b = 0; b < n / kNf4Block; ++b) {
    const float* x = src + b * kNf4Block;
    uint8_t* out = dst + b * kNf4BlockBytes;
    float absmax = 0;
    for (int64_t i = 0; i < kNf4Block; ++i) {
      MOE_CHECK(std::isfinite(x[i]), "cannot quantize to nf4: value %lld is %g", (long long)(b * kNf4Block + i),
                double(x[i]));
      absmax = std::max(absmax, std::fabs(x[i]));
    }
    std::memcpy(out, &absmax, 4);
    for (int64_t i = 0; i < kNf4Block; i += 2) {
      // x / absmax computed as a division so that x = code · absmax maps back to code exactly.
      const float v0 = absmax > 0 ? x[i] / absmax : 0.0f, v1 = absmax > 0 ? x[i + 1] / absmax : 0.0f;
      out[4 + i / 2] = uint8_t(nearest_code(v0) << 4 | nearest_code(v1));
    }
  }
}

void nf4_dequantize(const uint8_t* src, float* dst, int64_t n) {
  for (int64_t b = 0; b < n / kNf4Block; ++b) {
    const uint8_t* in = src + b * kNf4BlockBytes;
    float absmax;
    std::memcpy(&absmax, in, 4);
    float* y = dst + b * kNf4Block;
    for (int64_t i = 0; i < kNf4Block; i += 2) {
      y[i] = kNf4Codes[in[4 + i / 2] >> 4] * absmax;
      y[i + 1] = kNf4Codes[in[4 + i / 2] & 15] * absmax;
    }
  }
}

}  // namespace moe
