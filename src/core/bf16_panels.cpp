// bf16_panels.cpp — packing bf16 weights into 16-row panels and back (bf16_panels.h).
#include "core/bf16_panels.h"

#include "core/error.h"

namespace moe {

void pack_bf16_panels(uint16_t* dst, const uint16_t* src, int64_t rows, int64_t k) {
  MOE_CHECK(bf16_panels_fit(rows, k), "bf16 panels: a [%lld, %lld] weight is not whole panels of 16 rows and pairs",
            (long long)rows, (long long)k);
  const int64_t kh = k / 2;
#pragma omp parallel for schedule(static) if(rows * k > (int64_t(1) << 20))
  for (int64_t p = 0; p < rows / 16; ++p)
    for (int64_t r = 0; r < 16; ++r) {
      const uint16_t* s = src + (p * 16 + r) * k;
      uint16_t* d = dst + p * 16 * k + 2 * r;
      for (int64_t j = 0; j < kh; ++j) {
        d[j * 32] = s[2 * j];
        d[j * 32 + 1] = s[2 * j + 1];
      }
    }
}

void unpack_bf16_panels(uint16_t* dst, const uint16_t* src, int64_t rows, int64_t k) {
  MOE_CHECK(bf16_panels_fit(rows, k), "bf16 panels: a [%lld, %lld] weight is not whole panels of 16 rows and pairs",
            (long long)rows, (long long)k);
  const int64_t kh = k / 2;
  for (int64_t p = 0; p < rows / 16; ++p)
    for (int64_t r = 0; r < 16; ++r) {
      const uint16_t* s = src + p * 16 * k + 2 * r;
      uint16_t* d = dst + (p * 16 + r) * k;
      for (int64_t j = 0; j < kh; ++j) {
        d[2 * j] = s[j * 32];
        d[2 * j + 1] = s[j * 32 + 1];
      }
    }
}

}  // namespace moe
