// mpi_communicator.cpp — the Communicator over Open MPI (built when CMake finds MPI).
//
// All-reduce is not MPI_Allreduce: MPI does not promise that it gives every rank the same bits,
// and replicated parameters updated from slightly different gradients would drift apart step by
// step. Instead each element is summed once, by one rank, and the sums are copied to everyone:
// large vectors as a reduce-scatter (rank q sums chunk q) then an all-gather — every rank sends
// 2(G-1)/G of the vector, no rank is a bottleneck — and small ones as a reduce to rank 0 then a
// broadcast. Either way the group sends 2(G-1)·n elements in all.
// Counts are int in MPI 3: large reductions go in chunks; an exchange over 2 GiB is an error.
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <climits>
#include <cstring>
#include <cstdio>
#include <thread>
#include <vector>
#include <unistd.h>

#include "core/error.h"
#include "core/tensor.h"
#include "dist/mpi_backend.h"

namespace moe::dist {
namespace {

double now_s() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// The watchdog: the collective in progress (its name and start) and the limit.
std::atomic<double> g_wait_since{0.0};
std::atomic<const char*> g_wait_what{nullptr};
std::atomic<double> g_timeout{600.0};
int g_world_rank = 0;

void watchdog() {
  for (;;) {
    std::this_thread::sleep_for(std::chrono::milliseconds(250));
    const double since = g_wait_since.load(), limit = g_timeout.load();
    if (since > 0 && limit > 0 && now_s() - since > limit) {
      const char* what = g_wait_what.load();
      std::fprintf(stderr,
                   "moe: error: rank %d: %s has waited %.0f s for the other ranks (one died or hangs; the limit is "
                   "--dist-timeout); ending the job\n",
                   g_world_rank, what ? what : "a collective", now_s() - since);
      std::fflush(stderr);
      _exit(3);  // mpirun sees a rank leave without MPI_Finalize and ends the others
    }
  }
}

int to_int(int64_t n, const char* what) {
  MOE_CHECK(n >= 0 && n <= INT_MAX, "%s: %lld bytes in one exchange exceeds MPI's 2 GiB count limit", what, (long long)n);
  return static_cast<int>(n);
}

void check(int rc, const char* what) {
  if (rc != MPI_SUCCESS) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    MPI_Error_string(rc, msg, &len);
    MOE_FAIL("MPI %s failed: %s", what, msg);
  }
}

class MpiComm final : public Communicator {
 public:
  explicit MpiComm(MPI_Comm c) : comm_(c) {
    MPI_Comm_rank(comm_, &rank_);
    MPI_Comm_size(comm_, &size_);
  }
  ~MpiComm() override {
    if (comm_ != MPI_COMM_WORLD) {
      int fin = 0;
      MPI_Finalized(&fin);
      if (!fin) MPI_Comm_free(&comm_);
    }
  }
  int rank() const override { return rank_; }
  int size() const override { return size_; }

  void all_reduce_sum(float* x, int64_t n) override { reduce(x, n, MPI_FLOAT, sizeof(float)); }
  void all_reduce_sum(double* x, int64_t n) override { reduce(x, n, MPI_DOUBLE, sizeof(double)); }

  void reduce_sum(float* x, int64_t n, int root) override {
    Timer t(this, Coll::Reduce, rank_ == root ? 0 : n * int64_t(sizeof(float)));
    constexpr int64_t kChunk = int64_t(1) << 28;
    for (int64_t i = 0; i < n; i += kChunk) {
      const int cnt = static_cast<int>(std::min(kChunk, n - i));
      check(MPI_Reduce(rank_ == root ? MPI_IN_PLACE : x + i, rank_ == root ? x + i : nullptr, cnt, MPI_FLOAT, MPI_SUM,
                       root, comm_),
            "reduce");
    }
  }
  void reduce_scatter_sum(const float* send, float* recv, int64_t n) override {
    Timer t(this, Coll::ReduceScatter, int64_t(size_ - 1) * n * int64_t(sizeof(float)));
    std::vector<int> counts(size_t(size_), to_int(n, "reduce-scatter"));
    check(MPI_Reduce_scatter(send, recv, counts.data(), MPI_FLOAT, MPI_SUM, comm_), "reduce-scatter");
  }
  void all_gather(const void* send, int64_t bytes, void* recv) override {
    Timer t(this, Coll::AllGather, int64_t(size_ - 1) * bytes);
    check(MPI_Allgather(send, to_int(bytes, "all-gather"), MPI_BYTE, recv, to_int(bytes, "all-gather"), MPI_BYTE, comm_),
          "all-gather");
  }
  void all_to_all(const void* send, int64_t bytes, void* recv) override {
    Timer t(this, Coll::AllToAll, int64_t(size_ - 1) * bytes);
    check(MPI_Alltoall(send, to_int(bytes, "all-to-all"), MPI_BYTE, recv, to_int(bytes, "all-to-all"), MPI_BYTE, comm_),
          "all-to-all");
  }
  void all_to_allv(const void* send, const std::vector<int64_t>& send_bytes, void* recv,
                   const std::vector<int64_t>& recv_bytes) override {
    MOE_CHECK(int(send_bytes.size()) == size_ && int(recv_bytes.size()) == size_,
              "all_to_allv: %zu send and %zu receive counts for %d ranks", send_bytes.size(), recv_bytes.size(), size_);
    const size_t np = static_cast<size_t>(size_);
    std::vector<int> sc(np), sd(np), rc(np), rd(np);
    int64_t so = 0, ro = 0, sent = 0;
    for (int q = 0; q < size_; ++q) {
      sc[size_t(q)] = to_int(send_bytes[size_t(q)], "all-to-allv");
      rc[size_t(q)] = to_int(recv_bytes[size_t(q)], "all-to-allv");
      sd[size_t(q)] = to_int(so, "all-to-allv");
      rd[size_t(q)] = to_int(ro, "all-to-allv");
      so += send_bytes[size_t(q)];
      ro += recv_bytes[size_t(q)];
      if (q != rank_) sent += send_bytes[size_t(q)];
    }
    Timer t(this, Coll::AllToAll, sent);
    check(MPI_Alltoallv(send, sc.data(), sd.data(), MPI_BYTE, recv, rc.data(), rd.data(), MPI_BYTE, comm_),
          "all-to-allv");
  }
  void broadcast(void* x, int64_t bytes, int root) override {
    Timer t(this, Coll::Broadcast, rank_ == root ? int64_t(size_ - 1) * bytes : 0);
    check(MPI_Bcast(x, to_int(bytes, "broadcast"), MPI_BYTE, root, comm_), "broadcast");
  }
  void barrier() override {
    Timer t(this, Coll::Barrier, 0);
    check(MPI_Barrier(comm_), "barrier");
  }
  std::unique_ptr<Communicator> split(int color, int key) override {
    MPI_Comm c;
    check(MPI_Comm_split(comm_, color, key, &c), "comm split");
    return std::make_unique<MpiComm>(c);
  }

 private:
  // Times one collective into the statistics and arms the watchdog while it runs.
  struct Timer {
    Timer(MpiComm* c, Coll k, int64_t bytes) : c_(c), k_(k), t0_(now_s()) {
      c_->stats_.bytes[int(k)] += bytes;
      ++c_->stats_.calls[int(k)];
      g_wait_what.store(coll_name(k));
      g_wait_since.store(t0_);
    }
    ~Timer() {
      g_wait_since.store(0.0);
      c_->stats_.seconds[int(k_)] += now_s() - t0_;
    }
    MpiComm* c_;
    Coll k_;
    double t0_;
  };

  // Every element summed once, then copied to all ranks: the same bits everywhere (see the file
  // comment).
  void reduce(void* x, int64_t n, MPI_Datatype dt, size_t elem) {
    constexpr int64_t kChunk = int64_t(1) << 28;  // elements per round (MPI's int counts)
    char* p = static_cast<char*>(x);
    for (int64_t i = 0; i < n; i += kChunk) {
      const int64_t cnt = std::min(kChunk, n - i);
      void* at = p + size_t(i) * elem;
      if (cnt < int64_t(size_) * 256) {
        // Bytes sent: rank 0 its broadcast, the others their contribution.
        Timer t(this, Coll::AllReduce, rank_ == 0 ? int64_t(size_ - 1) * cnt * int64_t(elem) : cnt * int64_t(elem));
        check(MPI_Reduce(rank_ == 0 ? MPI_IN_PLACE : at, rank_ == 0 ? at : nullptr, int(cnt), dt, MPI_SUM, 0, comm_),
              "all-reduce");
        check(MPI_Bcast(at, int(cnt), dt, 0, comm_), "all-reduce");
        continue;
      }
      // Rank q's chunk: [q·cnt/G, (q+1)·cnt/G).
      std::vector<int> counts(static_cast<size_t>(size_)), displs(static_cast<size_t>(size_));
      for (int q = 0; q < size_; ++q) {
        const int64_t b = cnt * q / size_, e = cnt * (q + 1) / size_;
        counts[size_t(q)] = int(e - b);
        displs[size_t(q)] = int(b);
      }
      const int64_t mine = counts[size_t(rank_)];
      // Bytes sent: the other ranks' chunks of this rank's vector, then its own chunk to each.
      Timer t(this, Coll::AllReduce, (cnt - mine) * int64_t(elem) + int64_t(size_ - 1) * mine * int64_t(elem));
      char* own = static_cast<char*>(at) + size_t(displs[size_t(rank_)]) * elem;
      Tensor sum = Tensor::empty({std::max<int64_t>(mine, 1) * int64_t(elem)}, DType::U8, MemCategory::Comm);
      check(MPI_Reduce_scatter(at, sum.raw(), counts.data(), dt, MPI_SUM, comm_), "all-reduce (reduce-scatter)");
      std::memcpy(own, sum.raw(), size_t(mine) * elem);
      check(MPI_Allgatherv(MPI_IN_PLACE, 0, dt, at, counts.data(), displs.data(), dt, comm_), "all-reduce (all-gather)");
    }
  }

  MPI_Comm comm_;
  int rank_ = 0, size_ = 1;
};

}  // namespace

bool mpi_backend_available() { return true; }

std::unique_ptr<Communicator> mpi_world() {
  int inited = 0;
  MPI_Initialized(&inited);
  if (!inited) {
    int provided = 0;
    check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_FUNNELED, &provided), "init");
  }
  MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  MPI_Comm_rank(MPI_COMM_WORLD, &g_world_rank);
  std::thread(watchdog).detach();
  return std::make_unique<MpiComm>(MPI_COMM_WORLD);
}

void mpi_set_timeout(double seconds) { g_timeout.store(seconds); }

void mpi_abort(int code) {
  int inited = 0;
  MPI_Initialized(&inited);
  if (inited) MPI_Abort(MPI_COMM_WORLD, code);
  _exit(code);
}

void mpi_finalize() {
  int inited = 0, fin = 0;
  MPI_Initialized(&inited);
  MPI_Finalized(&fin);
  if (inited && !fin) MPI_Finalize();
}

}  // namespace moe::dist
