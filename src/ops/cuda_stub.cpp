// cuda_stub.cpp — the CUDA entry points when the build has no CUDA backend (MOE_CUDA=OFF).
// Every call says so; cuda_available() is false.
#include "ops/backend.h"
#include "ops/ops.h"

namespace moe {
namespace cuda {
namespace {
[[noreturn]] void no_cuda() { MOE_FAIL("this build has no CUDA backend (configure with -DMOE_CUDA=ON)"); }
}  // namespace
void embedding_forward(Tensor&, const Tensor&, const Tensor&) { no_cuda(); }
void rmsnorm_forward(Tensor&, const Tensor&, const Tensor&, float) { no_cuda(); }
void linear_forward(Tensor&, const Tensor&, const Tensor&, const Tensor&) { no_cuda(); }
void linear_forward_cat(Tensor&, const Tensor&, std::initializer_list<LinearPart>) { no_cuda(); }
void rope_forward(Tensor&, int64_t, float) { no_cuda(); }
void kv_append(Tensor&, Tensor&, const Tensor&, const Tensor&, int64_t) { no_cuda(); }
void attention_forward(Tensor&, const Tensor&, const Tensor&, const Tensor&, int64_t) { no_cuda(); }
void router_topk_forward(Tensor&, Tensor&, const Tensor&, bool, const Tensor&) { no_cuda(); }
void moe_dispatch(Tensor&, Tensor&, Tensor&, const Tensor&, int64_t) { no_cuda(); }
void gather_rows(Tensor&, const Tensor&, const Tensor&, int64_t) { no_cuda(); }
void expert_ffn_forward(Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                        const Tensor&) { no_cuda(); }
void moe_combine(Tensor&, const Tensor&, const Tensor&, int64_t, bool) { no_cuda(); }
void permute_weights(Tensor&, const Tensor&, const Tensor&) { no_cuda(); }
void swiglu_forward(Tensor&, const Tensor&, const Tensor&) { no_cuda(); }
void sigmoid_gate_add(Tensor&, const Tensor&, const Tensor&) { no_cuda(); }
void add_inplace(Tensor&, const Tensor&) { no_cuda(); }
void cast(Tensor&, const Tensor&) { no_cuda(); }
void copy_columns(Tensor&, int64_t, const Tensor&, int64_t, int64_t) { no_cuda(); }
bool init() { return false; }
void synchronize() {}
}  // namespace cuda
bool cuda_available() { return false; }
}  // namespace moe
