// communicator.h — the collectives that distributed training and inference use, behind one
// interface with two implementations: Open MPI (mpi_communicator.cpp, built when MPI is found)
// and a single process (here: every collective is a copy). Nothing above src/dist/ calls MPI.
//
// Every call is collective: all ranks of the communicator make the same calls in the same order
// (a rank with nothing to send still calls, with zero counts). Buffers are host memory. Each
// communicator counts the bytes this rank sends and the wall time it spends per kind of
// collective (stats()), for the progress line, metrics and `moe bench dist`.
//
// A rank that fails must not leave its peers blocked in a collective: abort_job() ends every
// rank of the job (MPI_Abort), and a watchdog aborts it, naming the rank and the collective,
// when one call waits longer than the timeout (set_timeout; a peer that died or hangs).
#pragma once
#include <array>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moe::dist {

enum class Coll : int { AllReduce = 0, ReduceScatter, AllGather, AllToAll, Broadcast, Barrier, Reduce, kCount };
constexpr int kNumColl = static_cast<int>(Coll::kCount);
const char* coll_name(Coll c);

struct CommStats {
  std::array<int64_t, kNumColl> bytes{};  // bytes this rank sent to other ranks
  std::array<double, kNumColl> seconds{};  // wall time inside the calls
  std::array<int64_t, kNumColl> calls{};
  int64_t total_bytes() const;
  double total_seconds() const;
  CommStats operator-(const CommStats& o) const;
  CommStats& operator+=(const CommStats& o);
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;

  // x[0..n) = the elementwise sum over ranks (in place). Sums are taken in rank order, so every
  // rank gets the same bits.
  virtual void all_reduce_sum(float* x, int64_t n) = 0;
  virtual void all_reduce_sum(double* x, int64_t n) = 0;
  // x[0..n) on `root` = the elementwise sum over ranks (in place; other ranks' x unchanged).
  virtual void reduce_sum(float* x, int64_t n, int root) = 0;
  // recv[0..n) = the sum over ranks of send[rank()·n .. (rank()+1)·n) (send holds size()·n).
  virtual void reduce_scatter_sum(const float* send, float* recv, int64_t n) = 0;
  // recv (size()·bytes) = every rank's `bytes` bytes, in rank order.
  virtual void all_gather(const void* send, int64_t bytes, void* recv) = 0;
  // send holds size() blocks of `bytes` (block q for rank q); recv receives block rank() of
  // every rank, in rank order.
  virtual void all_to_all(const void* send, int64_t bytes, void* recv) = 0;
  // Variable blocks: send_bytes[q] bytes for rank q, contiguous in rank order; recv_bytes[q] from
  // rank q (the caller knows them, e.g. from an all_to_all of counts), contiguous in rank order.
  virtual void all_to_allv(const void* send, const std::vector<int64_t>& send_bytes, void* recv,
                           const std::vector<int64_t>& recv_bytes) = 0;
  virtual void broadcast(void* x, int64_t bytes, int root) = 0;
  virtual void barrier() = 0;
  // A sub-communicator of the ranks that pass the same color, ordered by key (collective).
  virtual std::unique_ptr<Communicator> split(int color, int key) = 0;

  const CommStats& stats() const { return stats_; }

 protected:
  CommStats stats_;
};

// The single-process communicator (rank 0 of 1).
std::unique_ptr<Communicator> make_single_process();

// Whether this process was started by mpirun/mpiexec (Open MPI's or a PMI launcher's
// environment), and whether this build has MPI.
bool launched_by_mpi();
bool have_mpi();
// This process's rank in the launcher's world, from its environment (0 when not launched by
// mpirun); usable before MPI is initialised, e.g. in an error message.
int launch_rank();

// The job's world communicator: MPI's when launched by mpirun (MPI is initialised on the first
// call), else a single process. Open MPI without the MPI build is an error naming the cause.
Communicator& world();

// Seconds a collective may wait before the watchdog ends the job (default 600; 0 = never).
void set_timeout(double seconds);

// Ends every rank of the job with `code` after printing `message` (MPI_Abort), or exits this
// process when it is alone. Never returns.
[[noreturn]] void abort_job(const std::string& message, int code);

// Shuts MPI down cleanly at the end of a successful run (no-op without MPI).
void finalize();

}  // namespace moe::dist
