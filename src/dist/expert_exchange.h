// expert_exchange.h — expert-parallel dispatch and return of token rows within an EP group.
//
// Before: each rank holds its routed rows sorted by (global) expert, offsets[E+1] (a stable
// dispatch, ops.h moe_dispatch). EP rank q owns experts [q·El, (q+1)·El), so its rows are the
// contiguous block offsets[q·El] .. offsets[(q+1)·El).
// The plan: an all-to-all of per-expert counts tells every owner how many rows each rank sends
// for each of its experts. dispatch_rows sends the blocks (all-to-allv) and regroups what
// arrives expert-major (expert j's rows from rank 0, then rank 1, ...), so the owner runs one
// grouped GEMM over its El experts with local_offsets. return_rows is the exact inverse: results
// go back to the rank and position they came from. Backward sends gradients along the same
// plan: dispatch_rows for dY, return_rows for dX and the routing-weight gradient.
// Row payloads are any fixed-size rows (f32 activations, the per-row routing weight).
#pragma once
#include <cstdint>
#include <vector>

#include "core/tensor.h"
#include "dist/communicator.h"

namespace moe::dist {

struct ExpertExchange {
  int64_t n_local = 0;                 // El: experts per rank
  std::vector<int64_t> send_rows;      // [P] rows this rank sends to rank q
  std::vector<int64_t> recv_counts;    // [P·El] rows from rank q for local expert j (q-major)
  std::vector<int64_t> recv_rows;      // [P] rows from rank q
  std::vector<int32_t> local_offsets;  // [El+1] offsets of the regrouped received rows
  int64_t sent() const;                // rows this rank routes (to itself included)
  int64_t received() const { return local_offsets.empty() ? 0 : local_offsets.back(); }
};

// The plan from this rank's offsets [E+1] (i32) over e_n experts (collective over `ep`).
ExpertExchange plan_exchange(Communicator& ep, const Tensor& offsets, int64_t e_n);

// src [sent(),W] (or more rows: the rest are ignored) rows sorted by expert -> dst
// [received(),W] regrouped expert-major on the owners. Any dtype; W may be 1 ([N] tensors).
void dispatch_rows(Communicator& ep, const ExpertExchange& x, const Tensor& src, Tensor& dst);
// The inverse: src [received(),W] on the owners -> dst rows [0, sent()) at their origin.
void return_rows(Communicator& ep, const ExpertExchange& x, const Tensor& src, Tensor& dst);
// The same for several tensors with the same rows in ONE exchange (each row travels as its rows
// in every tensor side by side, e.g. a token's activations and its routing weight): one
// collective's latency instead of several, the same bytes.
void dispatch_rows(Communicator& ep, const ExpertExchange& x, const std::vector<const Tensor*>& src,
                   const std::vector<Tensor*>& dst);
void return_rows(Communicator& ep, const ExpertExchange& x, const std::vector<const Tensor*>& src,
                 const std::vector<Tensor*>& dst);

}  // namespace moe::dist
