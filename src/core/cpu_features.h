// cpu_features.h — what this CPU can run, asked once, for the kernels compiled per instruction
// set (the build targets AVX2; the AVX-512 copies are chosen at run time by these).
#pragma once

namespace moe {

// AVX-512 F, BW, DQ and VL: what every AVX-512 kernel here assumes.
inline bool cpu_has_avx512() {
#if defined(__x86_64__)
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return ok;
#else
  return false;
#endif
}

// With VNNI (vpdpbusd) or BF16 (vdpbf16ps) on top.
inline bool cpu_has_avx512_vnni() {
#if defined(__x86_64__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni");
#else
  return false;
#endif
}
inline bool cpu_has_avx512_bf16() {
#if defined(__x86_64__)
  return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16");
#else
  return false;
#endif
}

}  // namespace moe
