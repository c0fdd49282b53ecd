// panel_weights.h — the inference commands' bf16 weights rearranged into 16-row panels (core/bf16_panels.h).
//
// Batched decode multiplies 2-64 rows of x against every projection and expert a step. With
// weights in row order the AVX512-BF16 dot kernel spends a quarter of its instructions on
// horizontal sums and ran 406-545 GFLOP/s at 16 rows on Zen 5 (2 threads, from memory); on
// panels the sums stay in registers: 636-697 at 16 rows, 786-846 at 64, and 931-943 at 256-512
// (prefill; oneDNN on rows 905-918). The panels replace the rows (the bytes are the same), so a
// packed model runs inference on the CPU only: gemm_xwt is the one reader (cpu_gemm.h), and the
// training products refuse bf16p.
#pragma once
#include <cstdint>

namespace moe {

class Model;

// Packs the model's bf16 attention projections (stacked q/k/v and o), experts (routed and
// shared) and untied LM head whose shapes fit (bf16_panels_fit; experts: whole panels per
// expert), where this process's products round x to bf16 (Bf16Gemm::Matrix, not the exact or
// --reference path) on a CPU with AVX512-BF16. Returns the bytes packed (0: none).
int64_t pack_bf16_panels(Model& m);

}  // namespace moe
