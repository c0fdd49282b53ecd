// panel_weights.cpp — packing a model's bf16 weights into 16-row panels (panel_weights.h).
#include "model/panel_weights.h"

#include "core/bf16_panels.h"
#include "model/model.h"
#include "ops/cpu/cpu_gemm_bf16dot.h"
#include "ops/cpu/cpu_gemm_onednn.h"
#include "ops/cpu/cpu_quant_gemm.h"
#include "ops/ops.h"

namespace moe {

namespace {

bool bf16_panels_available() {
  return !reference_backend() && cpu::bf16_gemm() == cpu::Bf16Gemm::Matrix && !cpu::quant_exact() &&
         cpu::bf16dot_available();
}

// Whether t is a bf16 CPU tensor whose slices of `unit_rows` rows (what a kernel takes alone:
// one expert's) are whole panels.
bool fits(const Tensor& t, int64_t unit_rows) {
  if (!t.defined() || t.dtype() != DType::BF16 || t.device() != Device::CPU || t.ndim() < 2) return false;
  const int64_t k = t.shape().back();
  return bf16_panels_fit(t.numel() / k, k) && unit_rows % 16 == 0;
}

// t := its panels; the file-mapped original's pages are released.
int64_t pack(Tensor& t) {
  Tensor p = t.to_dtype(DType::BF16P, MemCategory::Weights);
  release_mapped(t);
  t = p;
  return int64_t(p.nbytes());
}

// A gate/up/down triple packs whole or not at all (the experts' kernels take one dtype).
int64_t pack_triple(Tensor& w1, Tensor& w3, Tensor& w2, bool stacked) {
  if (!fits(w1, stacked ? w1.dim(1) : 16) || !fits(w3, stacked ? w3.dim(1) : 16) || !fits(w2, stacked ? w2.dim(1) : 16))
    return 0;
  return pack(w1) + pack(w3) + pack(w2);
}

}  // namespace

int64_t pack_bf16_panels(Model& m) {
  if (!bf16_panels_available() || m.device() != Device::CPU) return 0;
  const ModelConfig& c = m.config();
  ModelWeights& w = m.mutable_weights();
  int64_t bytes = 0;
  const int64_t qd = c.n_head * c.head_dim, kvd = c.n_head_kv * c.head_dim;
  for (LayerWeights& lw : w.layers) {
    // q, k and v are row views of the stacked weight: each must start on a panel.
    if (fits(lw.wqkv, 16) && qd % 16 == 0 && kvd % 16 == 0) {
      bytes += pack(lw.wqkv);
      set_qkv_views(c, lw);
    }
    if (fits(lw.wo, 16)) bytes += pack(lw.wo);
    if (lw.w1.defined()) bytes += pack_triple(lw.w1, lw.w3, lw.w2, lw.w1.ndim() == 3);
    if (lw.shared_w1.defined()) bytes += pack_triple(lw.shared_w1, lw.shared_w3, lw.shared_w2, false);
  }
  if (!c.tie_word_embeddings && w.lm_head.raw() != w.embed.raw() && fits(w.lm_head, 16)) bytes += pack(w.lm_head);
  return bytes;
}

}  // namespace moe
