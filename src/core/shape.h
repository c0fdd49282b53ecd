// shape.h — a tensor's dimensions, held inline.
//
// Every view (rows, select, view) and every shape check makes a Shape; a decode step makes
// hundreds. Held inline, they never touch the heap, which is what lets the decode loop run
// without allocating (tests/test_decode_alloc.cpp). The interface is the subset of
// std::vector<int64_t> the engine uses. Ranks above kMaxRank are refused with moe::Error
// (file parsers check their rank against it first, naming the file and tensor).
#pragma once
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <iterator>
#include <type_traits>
#include <vector>

#include "core/error.h"

namespace moe {

class Shape {
 public:
  static constexpr size_t kMaxRank = 8;
  using value_type = int64_t;
  using size_type = size_t;
  using iterator = int64_t*;
  using const_iterator = const int64_t*;

  Shape() = default;
  Shape(std::initializer_list<int64_t> dims) { assign(dims.begin(), dims.end()); }
  Shape(size_t n, int64_t v) { resize(n, v); }
  template <class It, class = std::enable_if_t<!std::is_integral_v<It>>>
  Shape(It first, It last) {
    assign(first, last);
  }
  Shape(const std::vector<int64_t>& v) { assign(v.begin(), v.end()); }  // NOLINT: implicit, like the old alias

  size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }
  int64_t& operator[](size_t i) { return d_[i]; }
  int64_t operator[](size_t i) const { return d_[i]; }
  int64_t* data() { return d_; }
  const int64_t* data() const { return d_; }
  iterator begin() { return d_; }
  iterator end() { return d_ + n_; }
  const_iterator begin() const { return d_; }
  const_iterator end() const { return d_ + n_; }
  std::reverse_iterator<const int64_t*> rbegin() const { return std::reverse_iterator<const int64_t*>(end()); }
  std::reverse_iterator<const int64_t*> rend() const { return std::reverse_iterator<const int64_t*>(begin()); }
  int64_t& front() { return d_[0]; }
  int64_t front() const { return d_[0]; }
  int64_t& back() { return d_[n_ - 1]; }
  int64_t back() const { return d_[n_ - 1]; }

  void clear() { n_ = 0; }
  void push_back(int64_t v) {
    check_rank(n_ + 1);
    d_[n_++] = v;
  }
  void pop_back() { --n_; }
  void resize(size_t n, int64_t v = 0) {
    check_rank(n);
    for (size_t i = n_; i < n; ++i) d_[i] = v;
    n_ = n;
  }
  iterator insert(const_iterator pos, int64_t v) {
    const size_t at = static_cast<size_t>(pos - d_);
    check_rank(n_ + 1);
    for (size_t i = n_; i > at; --i) d_[i] = d_[i - 1];
    d_[at] = v;
    ++n_;
    return d_ + at;
  }
  iterator erase(const_iterator pos) {
    const size_t at = static_cast<size_t>(pos - d_);
    for (size_t i = at; i + 1 < n_; ++i) d_[i] = d_[i + 1];
    --n_;
    return d_ + at;
  }
  template <class It>
  void assign(It first, It last) {
    n_ = 0;
    for (; first != last; ++first) push_back(static_cast<int64_t>(*first));
  }
  std::vector<int64_t> to_vector() const { return std::vector<int64_t>(begin(), end()); }

  friend bool operator==(const Shape& a, const Shape& b) {
    if (a.n_ != b.n_) return false;
    for (size_t i = 0; i < a.n_; ++i)
      if (a.d_[i] != b.d_[i]) return false;
    return true;
  }
  friend bool operator!=(const Shape& a, const Shape& b) { return !(a == b); }

 private:
  static void check_rank(size_t n) {
    MOE_CHECK(n <= kMaxRank, "a tensor of %zu dimensions: at most %zu are supported", n, kMaxRank);
  }
  int64_t d_[kMaxRank] = {};
  size_t n_ = 0;
};

}  // namespace moe
