// cpu_quant_vnni.cpp — the quantized CPU kernels (cpu_quant_kernels.h) compiled for
// AVX-512 VNNI: 512-bit vpdpbusd/vpdpwssd.
// Every function here gets the target
//   avx512f,avx512bw,avx512dq,avx512vl,avx512vnni
// (pragma below), so only this file uses those instructions; cpu_quant_gemm.cpp calls it only
// when the CPU has them.
// GCC 12's AVX-512 intrinsics build vectors from deliberately undefined registers
// (_mm512_undefined_*), which -Wuninitialized reports once inlined here; the warning is
// located in the intrinsics header, so it is switched off before that is included.
#if !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "ops/cpu/cpu_quant_impl.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx512vnni")
#endif

#define MOE_QK_NS qk_vnni
#define MOE_QK_512 1
#define MOE_QK_VNNI 1
#include "ops/cpu/cpu_quant_kernels.h"  // NOLINT(build/include): compiled once per variant

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
