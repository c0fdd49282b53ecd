// parallel.cpp — the EP × DP layout of a job's ranks (parallel.h).
#include "dist/parallel.h"

#include "core/error.h"

namespace moe::dist {

std::pair<int64_t, int64_t> Parallel::batch_rows(int64_t b_n) const {
  const int64_t n = size(), r = rank();
  return {b_n * r / n, b_n * (r + 1) / n};
}

CommStats Parallel::stats() const {
  CommStats s;
  if (world) s += world->stats();
  if (ep_group) s += ep_group->stats();
  if (expert_dp) s += expert_dp->stats();
  return s;
}

std::unique_ptr<Parallel> make_parallel(int ep, int dp) {
  Communicator& w = world();
  const int n = w.size();
  MOE_CHECK(ep >= 0 && dp >= 0, "--ep and --dp must be positive (got --ep %d --dp %d)", ep, dp);
  if (ep == 0 && dp == 0) dp = n;
  if (ep == 0) {
    MOE_CHECK(n % dp == 0, "--dp %d does not divide the %d rank(s) of this job (start it with mpirun -np %d, or a "
              "multiple)", dp, n, dp);
    ep = n / dp;
  }
  if (dp == 0) {
    MOE_CHECK(n % ep == 0, "--ep %d does not divide the %d rank(s) of this job (start it with mpirun -np %d, or a "
              "multiple)", ep, n, ep);
    dp = n / ep;
  }
  MOE_CHECK(ep * dp == n,
            "--ep %d x --dp %d = %d ranks, but this job has %d (start it with mpirun -np %d, or change the flags)", ep,
            dp, ep * dp, n, ep * dp);
  auto p = std::make_unique<Parallel>();
  p->world = &w;
  p->ep = ep;
  p->dp = dp;
  const int r = w.rank();
  p->ep_group = w.split(r / ep, r % ep);
  p->expert_dp = w.split(r % ep, r / ep);
  return p;
}

}  // namespace moe::dist
