// test_memory.cpp — host memory primitives: mem_zero (serial below 1 MiB, over the threads in
// 256 KiB pieces above, serial again inside a parallel region) zeroes exactly the bytes asked
// for, and Tensor::reinterpret views a tensor's own bytes under another dtype.
#include <gtest/gtest.h>
#include <omp.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "core/error.h"
#include "core/memory.h"
#include "core/tensor.h"

namespace moe {
namespace {

constexpr unsigned char kFill = 0xAB;
constexpr size_t kGuard = 4096;

// Zeroes n bytes in the middle of a buffer filled with kFill (guard bytes before and after), on
// the calling thread or from inside a parallel region, and checks every byte.
void check_zero(size_t n, bool in_region) {
  std::vector<unsigned char> buf(n + 2 * kGuard, kFill);
  unsigned char* p = buf.data() + kGuard;
  if (in_region) {
#pragma omp parallel num_threads(2)
    {
#pragma omp single
      mem_zero(p, Device::CPU, n);
    }
  } else {
    mem_zero(p, Device::CPU, n);
  }
  for (size_t i = 0; i < kGuard; ++i) ASSERT_EQ(buf[i], kFill) << "byte " << i << " before the block, n " << n;
  for (size_t i = 0; i < n; ++i) ASSERT_EQ(p[i], 0) << "byte " << i << " of " << n;
  for (size_t i = 0; i < kGuard; ++i) ASSERT_EQ(p[n + i], kFill) << "byte " << i << " after the block, n " << n;
}

TEST(MemZero, ZeroesExactlyTheBlockAtEverySize) {
  // Below the parallel threshold, at it, whole pieces, and a partial last piece.
  for (size_t n : {size_t(0), size_t(100), (size_t(1) << 20) - 1, size_t(1) << 20, size_t(4) << 20,
                   (size_t(3) << 20) + 123})
    for (bool in_region : {false, true}) {
      SCOPED_TRACE(testing::Message() << "n " << n << (in_region ? " in a parallel region" : ""));
      check_zero(n, in_region);
    }
}

TEST(TensorReinterpret, ViewsTheSameBytesUnderAnotherDtype) {
  Tensor x = Tensor::from_f32({2, 3}, {1, 2, 3, 4, 5, 6});
  Tensor h = x.reinterpret(DType::BF16, {2, 3});
  EXPECT_EQ(h.raw(), x.raw());
  EXPECT_EQ(h.dtype(), DType::BF16);
  EXPECT_EQ(h.nbytes(), x.nbytes() / 2);
  h.data<uint16_t>()[0] = 0x3f80;  // bf16 1.0 written through the view lands in x's first bytes
  uint16_t first;
  std::memcpy(&first, x.raw(), 2);
  EXPECT_EQ(first, 0x3f80);
  EXPECT_THROW(x.reinterpret(DType::F32, {2, 4}), Error);  // more bytes than x has
}

}  // namespace
}  // namespace moe
