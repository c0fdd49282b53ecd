// cpu_features.h — what this CPU can run, asked once, for the kernels compiled per instruction
// set (the build targets AVX2; the AVX-512 copies are chosen at run time by these).
#pragma once

namespace moe {

#if defined(__x86_64__)
// AVX-512 F, BW, DQ and VL: what every AVX-512 kernel here assumes.
inline bool cpu_has_avx512() {
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  return ok;
}
// With VNNI (vpdpbusd) or BF16 (vdpbf16ps) on top.
inline bool cpu_has_avx512_vnni() { return cpu_has_avx512() && __builtin_cpu_supports("avx512vnni"); }
inline bool cpu_has_avx512_bf16() { return cpu_has_avx512() && __builtin_cpu_supports("avx512bf16"); }
#else
inline bool cpu_has_avx512() { return false; }
inline bool cpu_has_avx512_vnni() { return false; }
inline bool cpu_has_avx512_bf16() { return false; }
#endif

}  // namespace moe
