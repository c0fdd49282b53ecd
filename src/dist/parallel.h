// parallel.h — how a job's ranks divide the work: expert parallel (EP) groups inside data-
// parallel (DP) replicas.
//
// N = ep · dp ranks. Rank r is EP rank r % ep of EP group r / ep (its DP index). Every rank
// takes its own slice of each global batch (batch_rows: N slices, in rank order), so a step
// over N ranks computes exactly what one process computes on the whole batch:
//   - dense parameters (attention, norms, routers, shared experts, embedding, head) are
//     replicated; their gradients are summed over all N ranks (`world`);
//   - routed expert e lives on EP rank e / (E/ep) of every EP group; within a group, tokens
//     travel to their expert's owner and back (expert_exchange.h); an expert's gradient is
//     summed over the dp ranks holding it (`expert_dp`).
// Losses are means over the global batch (the trainer divides by global counts) and router
// statistics are summed over all ranks before the balancing losses use them.
#pragma once
#include <cstdint>
#include <memory>
#include <utility>

#include "dist/communicator.h"

namespace moe::dist {

struct Parallel {
  Communicator* world = nullptr;            // all N ranks
  std::unique_ptr<Communicator> ep_group;   // the ep ranks of this rank's replica
  std::unique_ptr<Communicator> expert_dp;  // the dp ranks that hold this rank's experts
  int ep = 1, dp = 1;

  int rank() const { return world ? world->rank() : 0; }
  int size() const { return world ? world->size() : 1; }
  int ep_rank() const { return rank() % ep; }
  bool distributed() const { return size() > 1; }
  // This rank's routed experts of e_n: [begin, begin + count).
  int64_t experts_per_rank(int64_t e_n) const { return e_n / ep; }
  int64_t expert_begin(int64_t e_n) const { return int64_t(ep_rank()) * experts_per_rank(e_n); }
  // Rows [first, second) of a global batch of b_n rows that this rank takes (some ranks take
  // none when b_n < N; they still join every collective).
  std::pair<int64_t, int64_t> batch_rows(int64_t b_n) const;
  // Total bytes sent and seconds spent in collectives by this rank over all three communicators.
  CommStats stats() const;
};

// The layout over world(): ep · dp must equal the number of ranks (0 for either: the other
// divides N and this one takes the rest). Errors name the flags.
std::unique_ptr<Parallel> make_parallel(int ep, int dp);

}  // namespace moe::dist
