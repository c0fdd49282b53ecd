// test_dtype.cpp — element conversions. convert_from_f32 to bf16 has a sixteen-lane copy chosen
// at run time (dtype_avx512.h): it must give f32_to_bf16's bits for every input — ties to even,
// the largest finite values rounding to infinity, denormals, and NaNs (whose payload must not
// carry into the exponent or sign) — at every tail length.
#include <gtest/gtest.h>

#include <bit>
#include <cstdint>
#include <vector>

#include "core/dtype.h"
#include "core/rng.h"

namespace moe {
namespace {

std::vector<uint32_t> bf16_edge_bits() {
  std::vector<uint32_t> bits = {0x00000000u, 0x80000000u, 0x00000001u, 0x0000ffffu, 0x00008000u, 0x00018000u,
                                0x3f808000u, 0x3f818000u, 0x3f807fffu, 0x3f808001u, 0x7f7fffffu, 0xff7fffffu,
                                0x7f800000u, 0xff800000u, 0x7f800001u, 0x7fffffffu, 0xffffffffu, 0x7fc00000u,
                                0xff80ffffu, 0x007fffffu};
  Rng r(7);
  while (bits.size() < 1000) bits.push_back(static_cast<uint32_t>(r.next()));
  return bits;
}

TEST(DtypeConvert, Bf16RoundingIsTheScalarsAtEveryLength) {
  const std::vector<uint32_t> bits = bf16_edge_bits();
  std::vector<float> src;
  for (uint32_t b : bits) src.push_back(std::bit_cast<float>(b));
  int checked = 0;
  for (size_t n : {size_t(1), size_t(15), size_t(64), size_t(65), size_t(79), size_t(80), size_t(1000)}) {
    for (size_t off : {size_t(0), size_t(3)}) {
      if (off + n > src.size()) continue;
      std::vector<uint16_t> got(n + 1, 0xabcd);
      convert_from_f32(got.data(), src.data() + off, DType::BF16, n);
      for (size_t i = 0; i < n; ++i) {
        EXPECT_EQ(got[i], f32_to_bf16(src[off + i])) << "n " << n << " element " << i << " bits 0x" << std::hex
                                                      << bits[off + i];
        ++checked;
      }
      EXPECT_EQ(got[n], 0xabcd) << "wrote past n " << n;  // nothing past the end
    }
  }
  EXPECT_EQ(checked, 1608);
  // The edge values' expected results, spelled out (ties to even, overflow, quiet NaN).
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3f808000u)), 0x3f80);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x3f818000u)), 0x3f82);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x7f7fffffu)), 0x7f80);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x7fffffffu)), 0x7fff);
  EXPECT_EQ(f32_to_bf16(std::bit_cast<float>(0x7f800001u)), 0x7fc0);
}

}  // namespace
}  // namespace moe
