// expert_exchange.cpp — EP dispatch / return of token rows (expert_exchange.h).
#include "dist/expert_exchange.h"

#include <cstring>

#include "core/error.h"

namespace moe::dist {
namespace {

// Bytes of one row (a [N] tensor has rows of one element).
int64_t row_bytes(const Tensor& t) {
  int64_t w = 1;
  for (int i = 1; i < t.ndim(); ++i) w *= t.dim(i);
  return int64_t(dtype_nbytes(t.dtype(), w));
}

// Moves rows between the received (source-major) order and the expert-major order the owner
// computes in. to_grouped: staging (q-major) -> grouped; else grouped -> staging.
void regroup(const ExpertExchange& x, char* staging, char* grouped, int64_t rb, bool to_grouped) {
  const int64_t p_n = int64_t(x.recv_rows.size()), el = x.n_local;
  int64_t src_pos = 0;  // row in the staging buffer
  for (int64_t q = 0; q < p_n; ++q) {
    for (int64_t j = 0; j < el; ++j) {
      const int64_t n = x.recv_counts[size_t(q * el + j)];
      // Position within expert j's group: rows from ranks before q come first.
      int64_t at = x.local_offsets[size_t(j)];
      for (int64_t qq = 0; qq < q; ++qq) at += x.recv_counts[size_t(qq * el + j)];
      if (n > 0) {
        char* s = staging + src_pos * rb;
        char* g = grouped + at * rb;
        if (to_grouped) std::memcpy(g, s, size_t(n * rb));
        else std::memcpy(s, g, size_t(n * rb));
      }
      src_pos += n;
    }
  }
}

}  // namespace

int64_t ExpertExchange::sent() const {
  int64_t s = 0;
  for (int64_t r : send_rows) s += r;
  return s;
}

ExpertExchange plan_exchange(Communicator& ep, const Tensor& offsets, int64_t e_n) {
  const int p_n = ep.size();
  MOE_CHECK(e_n % p_n == 0, "expert parallel: %lld experts do not divide over %d ranks", (long long)e_n, p_n);
  MOE_CHECK(offsets.dtype() == DType::I32 && offsets.numel() == e_n + 1, "plan_exchange: offsets must be i32 [%lld]",
            (long long)(e_n + 1));
  ExpertExchange x;
  x.n_local = e_n / p_n;
  const int32_t* off = offsets.data<int32_t>();
  // Counts for each owner's experts, q-major: exactly the all-to-all's send layout.
  std::vector<int64_t> counts(static_cast<size_t>(e_n));
  for (int64_t e = 0; e < e_n; ++e) counts[size_t(e)] = off[e + 1] - off[e];
  x.send_rows.assign(size_t(p_n), 0);
  for (int q = 0; q < p_n; ++q)
    for (int64_t j = 0; j < x.n_local; ++j) x.send_rows[size_t(q)] += counts[size_t(q * x.n_local + j)];
  x.recv_counts.assign(size_t(e_n), 0);
  ep.all_to_all(counts.data(), x.n_local * int64_t(sizeof(int64_t)), x.recv_counts.data());
  x.recv_rows.assign(size_t(p_n), 0);
  x.local_offsets.assign(size_t(x.n_local + 1), 0);
  for (int q = 0; q < p_n; ++q)
    for (int64_t j = 0; j < x.n_local; ++j) {
      const int64_t n = x.recv_counts[size_t(q * x.n_local + j)];
      MOE_CHECK(n >= 0 && n < (int64_t(1) << 31), "expert parallel: rank %d sent a bad row count %lld", q, (long long)n);
      x.recv_rows[size_t(q)] += n;
      x.local_offsets[size_t(j + 1)] += int32_t(n);
    }
  for (int64_t j = 0; j < x.n_local; ++j) x.local_offsets[size_t(j + 1)] += x.local_offsets[size_t(j)];
  return x;
}

void dispatch_rows(Communicator& ep, const ExpertExchange& x, const Tensor& src, Tensor& dst) {
  const int64_t rb = row_bytes(src);
  MOE_CHECK(src.dim(0) >= x.sent() && dst.dim(0) == x.received() && row_bytes(dst) == rb,
            "dispatch_rows: %s -> %s for %lld sent / %lld received rows", src.shape_str().c_str(),
            dst.shape_str().c_str(), (long long)x.sent(), (long long)x.received());
  std::vector<int64_t> sb(x.send_rows.size()), rbytes(x.recv_rows.size());
  for (size_t q = 0; q < sb.size(); ++q) {
    sb[q] = x.send_rows[q] * rb;
    rbytes[q] = x.recv_rows[q] * rb;
  }
  Tensor staging = Tensor::empty({std::max<int64_t>(x.received() * rb, 1)}, DType::U8, MemCategory::Comm);
  ep.all_to_allv(src.raw(), sb, staging.raw(), rbytes);
  if (x.received() > 0) regroup(x, staging.data<char>(), static_cast<char*>(dst.raw()), rb, true);
}

void return_rows(Communicator& ep, const ExpertExchange& x, const Tensor& src, Tensor& dst) {
  const int64_t rb = row_bytes(src);
  MOE_CHECK(src.dim(0) == x.received() && dst.dim(0) >= x.sent() && row_bytes(dst) == rb,
            "return_rows: %s -> %s for %lld received / %lld sent rows", src.shape_str().c_str(),
            dst.shape_str().c_str(), (long long)x.received(), (long long)x.sent());
  Tensor staging = Tensor::empty({std::max<int64_t>(x.received() * rb, 1)}, DType::U8, MemCategory::Comm);
  if (x.received() > 0) regroup(x, staging.data<char>(), static_cast<char*>(src.raw()), rb, false);
  std::vector<int64_t> sb(x.recv_rows.size()), rbytes(x.send_rows.size());
  for (size_t q = 0; q < sb.size(); ++q) {
    sb[q] = x.recv_rows[q] * rb;
    rbytes[q] = x.send_rows[q] * rb;
  }
  ep.all_to_allv(staging.raw(), sb, dst.raw(), rbytes);
}

namespace {

int64_t total_row_bytes(const std::vector<const Tensor*>& ts) {
  int64_t rb = 0;
  for (const Tensor* t : ts) rb += row_bytes(*t);
  return rb;
}

// Rows [0, n) of several tensors side by side, row by row: [n, their row bytes summed] bytes.
Tensor pack(const std::vector<const Tensor*>& ts, int64_t n) {
  Tensor p = Tensor::empty({n, total_row_bytes(ts)}, DType::U8, MemCategory::Comm);
  char* o = p.data<char>();
  for (int64_t i = 0; i < n; ++i)
    for (const Tensor* t : ts) {
      const int64_t b = row_bytes(*t);
      std::memcpy(o, static_cast<const char*>(t->raw()) + i * b, size_t(b));
      o += b;
    }
  return p;
}

// pack's inverse into rows [0, n) of each tensor.
void unpack(const Tensor& p, const std::vector<Tensor*>& ts, int64_t n) {
  const char* s = p.data<char>();
  for (int64_t i = 0; i < n; ++i)
    for (Tensor* t : ts) {
      const int64_t b = row_bytes(*t);
      std::memcpy(static_cast<char*>(t->raw()) + i * b, s, size_t(b));
      s += b;
    }
}

void check_rows(const std::vector<const Tensor*>& src, const std::vector<Tensor*>& dst, int64_t n_src, int64_t n_dst,
                const char* what) {
  MOE_CHECK(!src.empty() && src.size() == dst.size(), "%s: %zu source and %zu destination tensors", what, src.size(),
            dst.size());
  for (size_t k = 0; k < src.size(); ++k)
    MOE_CHECK(src[k]->dim(0) >= n_src && dst[k]->dim(0) >= n_dst && row_bytes(*src[k]) == row_bytes(*dst[k]),
              "%s: tensor %zu: %s -> %s for %lld -> %lld rows", what, k, src[k]->shape_str().c_str(),
              dst[k]->shape_str().c_str(), (long long)n_src, (long long)n_dst);
}

}  // namespace

void dispatch_rows(Communicator& ep, const ExpertExchange& x, const std::vector<const Tensor*>& src,
                   const std::vector<Tensor*>& dst) {
  check_rows(src, dst, x.sent(), x.received(), "dispatch_rows");
  Tensor out = Tensor::empty({x.received(), total_row_bytes(src)}, DType::U8, MemCategory::Comm);
  dispatch_rows(ep, x, pack(src, x.sent()), out);
  unpack(out, dst, x.received());
}

void return_rows(Communicator& ep, const ExpertExchange& x, const std::vector<const Tensor*>& src,
                 const std::vector<Tensor*>& dst) {
  check_rows(src, dst, x.received(), x.sent(), "return_rows");
  Tensor out = Tensor::empty({x.sent(), total_row_bytes(src)}, DType::U8, MemCategory::Comm);
  return_rows(ep, x, pack(src, x.received()), out);
  unpack(out, dst, x.sent());
}

}  // namespace moe::dist
