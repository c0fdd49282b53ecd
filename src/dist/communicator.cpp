// communicator.cpp — the single-process communicator, the statistics and the world's choice.
#include "dist/communicator.h"

#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "core/error.h"
#include "dist/mpi_backend.h"

namespace moe::dist {

const char* coll_name(Coll c) {
  switch (c) {
    case Coll::AllReduce: return "all-reduce";
    case Coll::ReduceScatter: return "reduce-scatter";
    case Coll::AllGather: return "all-gather";
    case Coll::AllToAll: return "all-to-all";
    case Coll::Broadcast: return "broadcast";
    case Coll::Barrier: return "barrier";
    case Coll::Reduce: return "reduce";
    case Coll::kCount: break;
  }
  return "?";
}

int64_t CommStats::total_bytes() const {
  int64_t s = 0;
  for (int64_t b : bytes) s += b;
  return s;
}

double CommStats::total_seconds() const {
  double s = 0;
  for (double t : seconds) s += t;
  return s;
}

CommStats CommStats::operator-(const CommStats& o) const {
  CommStats r = *this;
  for (int i = 0; i < kNumColl; ++i) {
    r.bytes[i] -= o.bytes[i];
    r.seconds[i] -= o.seconds[i];
    r.calls[i] -= o.calls[i];
  }
  return r;
}

CommStats& CommStats::operator+=(const CommStats& o) {
  for (int i = 0; i < kNumColl; ++i) {
    bytes[i] += o.bytes[i];
    seconds[i] += o.seconds[i];
    calls[i] += o.calls[i];
  }
  return *this;
}

namespace {

// Rank 0 of 1: reductions are the identity, exchanges copy the one block to itself.
class SingleProcess final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  void all_reduce_sum(float*, int64_t) override { ++stats_.calls[int(Coll::AllReduce)]; }
  void all_reduce_sum(double*, int64_t) override { ++stats_.calls[int(Coll::AllReduce)]; }
  void reduce_sum(float*, int64_t, int root) override {
    MOE_CHECK(root == 0, "reduce: root %d of a single process", root);
    ++stats_.calls[int(Coll::Reduce)];
  }
  void reduce_scatter_sum(const float* send, float* recv, int64_t n) override {
    if (n > 0 && send != recv) std::memmove(recv, send, size_t(n) * sizeof(float));
    ++stats_.calls[int(Coll::ReduceScatter)];
  }
  void all_gather(const void* send, int64_t bytes, void* recv) override {
    if (bytes > 0 && send != recv) std::memmove(recv, send, size_t(bytes));
    ++stats_.calls[int(Coll::AllGather)];
  }
  void all_to_all(const void* send, int64_t bytes, void* recv) override { all_gather(send, bytes, recv); }
  void all_to_allv(const void* send, const std::vector<int64_t>& send_bytes, void* recv,
                   const std::vector<int64_t>& recv_bytes) override {
    MOE_CHECK(send_bytes.size() == 1 && recv_bytes.size() == 1 && send_bytes[0] == recv_bytes[0],
              "all_to_allv: one rank sends %lld bytes to itself but expects %lld",
              send_bytes.empty() ? -1LL : (long long)send_bytes[0], recv_bytes.empty() ? -1LL : (long long)recv_bytes[0]);
    if (send_bytes[0] > 0 && send != recv) std::memmove(recv, send, size_t(send_bytes[0]));
    ++stats_.calls[int(Coll::AllToAll)];
  }
  void broadcast(void*, int64_t, int root) override {
    MOE_CHECK(root == 0, "broadcast: root %d of a single process", root);
  }
  void barrier() override {}
  std::unique_ptr<Communicator> split(int, int) override { return std::make_unique<SingleProcess>(); }
};

}  // namespace

std::unique_ptr<Communicator> make_single_process() { return std::make_unique<SingleProcess>(); }

bool launched_by_mpi() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS"})
    if (std::getenv(v) != nullptr) return true;
  return false;
}

int launch_rank() {
  for (const char* v : {"OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK"})
    if (const char* s = std::getenv(v)) return std::atoi(s);
  return 0;
}

bool have_mpi() { return mpi_backend_available(); }

Communicator& world() {
  static std::unique_ptr<Communicator> w = [] {
    if (!launched_by_mpi()) return make_single_process();
    MOE_CHECK(have_mpi(),
              "this process was started by mpirun, but this build of moe has no MPI (install libopenmpi-dev and "
              "rebuild; CMake reports 'MPI: found')");
    return mpi_world();
  }();
  return *w;
}

void set_timeout(double seconds) { mpi_set_timeout(seconds); }

void abort_job(const std::string& message, int code) {
  std::fprintf(stderr, "%s\n", message.c_str());
  std::fflush(stderr);
  if (launched_by_mpi() && have_mpi()) mpi_abort(code);
  std::exit(code);
}

void finalize() { mpi_finalize(); }

}  // namespace moe::dist
