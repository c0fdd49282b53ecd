// regex.h — a small backtracking regex engine over Unicode code points, for the pre-tokenizer
// patterns of tokenizer.json files (Split with a Regex, the ByteLevel pattern).
//
// Semantics are those of the JavaScript reference (RegExp with the u flag, after the reference's
// Oniguruma-to-JS rewrite): leftmost-first alternation, greedy quantifiers with backtracking,
// \s = \p{White_Space}, \d = \p{Nd}, (?i:..) folds ASCII letters only, `.` excludes only \n.
// Supported: literals, escapes \r \n \t \f \v \0 \xHH \x{H..} \uHHHH, classes [...] with ranges,
// negation and \p{..}/\P{..}/\s/\S/\d/\D/\w/\W inside, general-category properties (L, Lu, N,
// Nd, P, S, M, Z, C, ... and long names, gc=..), White_Space, groups (?:..) (..) (?i:..),
// lookahead (?=..) (?!..), quantifiers ? * + {n} {n,} {n,m} (greedy and lazy), anchors ^ $ \A \z.
// Anything else (backreferences, lookbehind, scripts, named groups, ...) is rejected by the
// constructor with a moe::Error naming the construct and its offset, as are patterns beyond the
// limits of regex.cpp (length, nesting, program size, number of classes).
//
// Thread-safety: a compiled Regex is immutable; find() may be called concurrently.
#pragma once
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace moe {

class Regex {
 public:
  explicit Regex(std::string_view pattern);
  ~Regex();
  Regex(Regex&&) noexcept;
  Regex& operator=(Regex&&) noexcept;

  // Matching work is bounded: a find() may take budget_for(n) steps (instructions, backtracks,
  // code points scanned), and throws moe::Error naming the pattern when it needs more (a pattern
  // such as (?:a|a)*b backtracks exponentially). Real pre-tokenizer patterns need a few steps
  // per code point.
  static constexpr uint64_t kBaseSteps = uint64_t(1) << 20;
  static constexpr uint64_t kStepsPerCodePoint = 1024;
  static uint64_t budget_for(size_t n);

  // Finds the leftmost match in cps[from..]; on success stores [begin, end) (code point
  // indices) and returns true. `budget` (steps left, decremented) lets successive calls over one
  // text share budget_for(n); null: budget_for(n - from) for this call alone.
  bool find(const uint32_t* cps, size_t n, size_t from, size_t* begin, size_t* end,
            uint64_t* budget = nullptr) const;
  bool find(const std::vector<uint32_t>& cps, size_t from, size_t* begin, size_t* end) const {
    return find(cps.data(), cps.size(), from, begin, end);
  }

  const std::string& pattern() const { return pattern_; }

 private:
  struct Impl;
  std::string pattern_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace moe
