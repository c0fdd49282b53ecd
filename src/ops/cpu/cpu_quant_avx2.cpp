// cpu_quant_avx2.cpp — the quantized CPU kernels (cpu_quant_kernels.h) compiled for
// AVX2 (the build's baseline, x86-64-v3): 256-bit maddubs/madd.
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "core/error.h"
#include "ops/cpu/cpu_quant_impl.h"

#define MOE_QK_NS qk_avx2
#define MOE_QK_512 0
#define MOE_QK_VNNI 0
#include "ops/cpu/cpu_quant_kernels.h"  // NOLINT(build/include): compiled once per variant
