// dtype_avx512.h — the f32 -> bf16 rounding of convert_from_f32 on sixteen lanes (AVX-512 F/BW),
// for CPUs that have it (cpu_features.h); dtype.cpp chooses it at run time.
#pragma once
#include <cstddef>
#include <cstdint>

namespace moe {

// dst[i] = f32_to_bf16(src[i]) for i < n: the same bits as the scalar rounding (nearest-even,
// a NaN keeps its top half and is made quiet). Call only where cpu_has_avx512().
void bf16_from_f32_avx512(uint16_t* dst, const float* src, size_t n);

}  // namespace moe
