// regex.cpp — see regex.h. Pattern -> AST -> a small backtracking VM program.
//
// Program: CLASS (one code point from a class), SPLIT (try a, back up to b), JMP, REPEAT (a class
// repeated min..max times, greedy or lazy, with one backtrack entry for the whole run), LOOK
// (a lookahead sub-program), BOL/EOL/BOS/EOS anchors, MATCH.
#include "tokenizer/regex.h"

#include <algorithm>
#include <climits>
#include <map>
#include <mutex>
#include <tuple>

#include "core/error.h"
#include "tokenizer/unicode.h"

namespace moe {
namespace {

using Cat = GeneralCategory;

// Limits on hostile patterns (the real pre-tokenizer patterns are < 400 code points, nest < 4
// groups and compile to < 200 instructions). Each error names the pattern and the limit.
constexpr size_t kMaxPatternCodePoints = 16384;
constexpr int kMaxNesting = 64;           // groups/lookaheads inside each other
constexpr size_t kMaxProgram = 1 << 16;   // instructions over all (sub-)programs, after {n,m} expansion
constexpr size_t kMaxSets = 4096;         // character classes (8 KiB bitmap each)
constexpr size_t kMaxGuardClasses = 64;   // a first-character guard unions at most this many classes

uint32_t cat_bit(Cat c) { return 1u << static_cast<unsigned>(c); }

// The BMP bitmap of the property part of a class (categories, white space). Computing one walks
// all 65536 code points, and nearly every class of real patterns uses the same few (\p{L},
// \p{N}, \s), so results are shared through a small process-wide cache.
std::vector<uint64_t> property_bitmap(uint32_t cats, uint32_t not_cats, bool white, bool not_white) {
  using Key = std::tuple<uint32_t, uint32_t, bool, bool>;
  static std::mutex mu;
  static std::map<Key, std::vector<uint64_t>> cache;
  constexpr size_t kMaxCached = 256;  // 2 MiB; a hostile pattern cannot grow it further
  const Key key{cats, not_cats, white, not_white};
  {
    std::lock_guard<std::mutex> lock(mu);
    auto it = cache.find(key);
    if (it != cache.end()) return it->second;
  }
  std::vector<uint64_t> bmp(1024, 0);
  for (uint32_t cp = 0; cp < 0x10000; ++cp) {
    const uint32_t bit = cat_bit(general_category(cp));
    const bool in = (cats & bit) || (not_cats && !(not_cats & bit)) ||
                    ((white || not_white) && (is_white_space(cp) ? white : not_white));
    if (in) bmp[cp >> 6] |= uint64_t(1) << (cp & 63);
  }
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() < kMaxCached) cache.emplace(key, bmp);
  return bmp;
}

// A set of code points: a union of items, optionally negated. Evaluated through a bitmap for the
// BMP and the item list above it.
struct CharClass {
  std::vector<std::pair<uint32_t, uint32_t>> ranges;
  uint32_t cats = 0;       // general categories included
  uint32_t not_cats = 0;   // included: code points whose category is NOT in this mask (\P{..})
  bool white = false, not_white = false;
  bool negated = false;
  std::vector<uint64_t> bmp;  // 65536 bits, built by finalize()
  uint64_t ascii[2] = {0, 0};  // its first 128 bits, inline

  // Membership without the bitmap (code points above the BMP); ranges are sorted and merged by
  // finalize(), so the search is logarithmic whatever the class.
  bool eval(uint32_t cp) const {
    bool in = false;
    const uint32_t bit = cat_bit(general_category(cp));
    if (cats & bit) in = true;
    else if (not_cats && !(not_cats & bit)) in = true;
    else if ((white || not_white) && (is_white_space(cp) ? white : not_white)) in = true;
    else {
      auto it = std::upper_bound(ranges.begin(), ranges.end(), std::make_pair(cp, UINT32_MAX));
      in = it != ranges.begin() && cp <= std::prev(it)->second;
    }
    return in != negated;
  }
  void finalize() {
    std::sort(ranges.begin(), ranges.end());
    std::vector<std::pair<uint32_t, uint32_t>> merged;
    for (auto& r : ranges) {
      if (!merged.empty() && r.first <= merged.back().second + 1) merged.back().second = std::max(merged.back().second, r.second);
      else merged.push_back(r);
    }
    ranges.swap(merged);
    if (cats || not_cats || white || not_white) bmp = property_bitmap(cats, not_cats, white, not_white);
    else bmp.assign(1024, 0);
    for (auto& r : ranges) {
      if (r.first >= 0x10000) break;
      const uint32_t hi = std::min(r.second, uint32_t(0xFFFF));
      for (uint32_t cp = r.first; cp <= hi;) {
        if ((cp & 63) == 0 && cp + 63 <= hi) {
          bmp[cp >> 6] = ~uint64_t(0);
          cp += 64;
        } else {
          bmp[cp >> 6] |= uint64_t(1) << (cp & 63);
          ++cp;
        }
      }
    }
    if (negated)
      for (auto& w : bmp) w = ~w;
    ascii[0] = bmp[0], ascii[1] = bmp[1];
  }
  bool match(uint32_t cp) const {
    if (cp < 128) return (ascii[cp >> 6] >> (cp & 63)) & 1;
    if (cp < 0x10000) return (bmp[cp >> 6] >> (cp & 63)) & 1;
    return eval(cp);
  }
};

enum class NodeKind { Empty, Class, Seq, Alt, Repeat, Look, Bol, Eol, Bos, Eos };

struct Node {
  NodeKind kind = NodeKind::Empty;
  int cls = -1;                          // Class
  std::vector<std::unique_ptr<Node>> kids;  // Seq, Alt, Repeat (1), Look (1)
  int min = 0, max = 0;                  // Repeat; max -1 = unbounded
  bool greedy = true;
  bool negative = false;                 // Look
};
using NodePtr = std::unique_ptr<Node>;

enum class Op : uint8_t { Class, Split, Jmp, Repeat, Look, Bol, Eol, Bos, Eos, Match };

struct Inst {
  Op op;
  int a = 0, b = 0;       // Class: class; Split: first, second; Jmp: target; Look: sub-program
  int min = 0, max = 0;   // Repeat (class in a)
  bool greedy = true, negative = false;
  int guard = -1;         // Split: a guard (see Guard) that the code point at pos must be in for
                          // branch a to have a chance; -1: none
};

// The code points that can begin a match of a non-empty expression: the union of its possible
// first classes. A Split whose branch a must consume a code point in the guard skips that branch
// at once when the code point is not in it (first-character dispatch for alternations).
struct Guard {
  uint64_t ascii[2] = {0, 0};  // bmp's first 128 bits, inline
  std::vector<uint64_t> bmp;  // 65536 bits
  std::vector<int> classes;   // evaluated above the BMP
};

// Property name -> category mask (0 and white=true for White_Space).
bool property_mask(const std::string& raw, uint32_t* mask, bool* white) {
  std::string name = raw;
  for (std::string pre : {"gc=", "General_Category="})
    if (name.rfind(pre, 0) == 0) name = name.substr(pre.size());
  *white = false;
  *mask = 0;
  struct P {
    const char* n;
    std::initializer_list<Cat> c;
  };
  static const P props[] = {
      {"L", {Cat::Lu, Cat::Ll, Cat::Lt, Cat::Lm, Cat::Lo}},
      {"Letter", {Cat::Lu, Cat::Ll, Cat::Lt, Cat::Lm, Cat::Lo}},
      {"LC", {Cat::Lu, Cat::Ll, Cat::Lt}},
      {"Cased_Letter", {Cat::Lu, Cat::Ll, Cat::Lt}},
      {"Lu", {Cat::Lu}}, {"Uppercase_Letter", {Cat::Lu}},
      {"Ll", {Cat::Ll}}, {"Lowercase_Letter", {Cat::Ll}},
      {"Lt", {Cat::Lt}}, {"Titlecase_Letter", {Cat::Lt}},
      {"Lm", {Cat::Lm}}, {"Modifier_Letter", {Cat::Lm}},
      {"Lo", {Cat::Lo}}, {"Other_Letter", {Cat::Lo}},
      {"M", {Cat::Mn, Cat::Mc, Cat::Me}}, {"Mark", {Cat::Mn, Cat::Mc, Cat::Me}},
      {"Mn", {Cat::Mn}}, {"Nonspacing_Mark", {Cat::Mn}},
      {"Mc", {Cat::Mc}}, {"Spacing_Mark", {Cat::Mc}},
      {"Me", {Cat::Me}}, {"Enclosing_Mark", {Cat::Me}},
      {"N", {Cat::Nd, Cat::Nl, Cat::No}}, {"Number", {Cat::Nd, Cat::Nl, Cat::No}},
      {"Nd", {Cat::Nd}}, {"Decimal_Number", {Cat::Nd}},
      {"Nl", {Cat::Nl}}, {"Letter_Number", {Cat::Nl}},
      {"No", {Cat::No}}, {"Other_Number", {Cat::No}},
      {"P", {Cat::Pc, Cat::Pd, Cat::Ps, Cat::Pe, Cat::Pi, Cat::Pf, Cat::Po}},
      {"Punctuation", {Cat::Pc, Cat::Pd, Cat::Ps, Cat::Pe, Cat::Pi, Cat::Pf, Cat::Po}},
      {"Pc", {Cat::Pc}}, {"Pd", {Cat::Pd}}, {"Ps", {Cat::Ps}}, {"Pe", {Cat::Pe}},
      {"Pi", {Cat::Pi}}, {"Pf", {Cat::Pf}}, {"Po", {Cat::Po}},
      {"S", {Cat::Sm, Cat::Sc, Cat::Sk, Cat::So}}, {"Symbol", {Cat::Sm, Cat::Sc, Cat::Sk, Cat::So}},
      {"Sm", {Cat::Sm}}, {"Sc", {Cat::Sc}}, {"Sk", {Cat::Sk}}, {"So", {Cat::So}},
      {"Z", {Cat::Zs, Cat::Zl, Cat::Zp}}, {"Separator", {Cat::Zs, Cat::Zl, Cat::Zp}},
      {"Zs", {Cat::Zs}}, {"Zl", {Cat::Zl}}, {"Zp", {Cat::Zp}},
      {"C", {Cat::Cc, Cat::Cf, Cat::Cs, Cat::Co, Cat::Cn}}, {"Other", {Cat::Cc, Cat::Cf, Cat::Cs, Cat::Co, Cat::Cn}},
      {"Cc", {Cat::Cc}}, {"Control", {Cat::Cc}}, {"Cf", {Cat::Cf}}, {"Format", {Cat::Cf}},
      {"Cs", {Cat::Cs}}, {"Co", {Cat::Co}}, {"Private_Use", {Cat::Co}},
      {"Cn", {Cat::Cn}}, {"Unassigned", {Cat::Cn}},
  };
  if (name == "White_Space" || name == "space" || name == "WSpace") {
    *white = true;
    return true;
  }
  for (const auto& p : props)
    if (name == p.n) {
      for (Cat c : p.c) *mask |= cat_bit(c);
      return true;
    }
  return false;
}

class Parser {
 public:
  Parser(std::string_view pattern, std::vector<CharClass>* classes) : pattern_(pattern), classes_(classes) {
    for (size_t i = 0; i < pattern.size();) {
      offsets_.push_back(i);
      p_.push_back(utf8_next(pattern, i));
    }
    offsets_.push_back(pattern.size());
  }

  NodePtr parse() {
    if (p_.size() > kMaxPatternCodePoints)
      fail("pattern of " + std::to_string(p_.size()) + " code points is above the limit of " +
           std::to_string(kMaxPatternCodePoints));
    NodePtr n = parse_alt();
    if (i_ < p_.size()) fail("unbalanced ')'");
    return n;
  }

 private:
  [[noreturn]] void fail(const std::string& what) const {
    const size_t off = offsets_[std::min(i_, offsets_.size() - 1)];
    const std::string shown =
        pattern_.size() > 200 ? std::string(pattern_.substr(0, 200)) + "..." : std::string(pattern_);
    MOE_FAIL("regex /%s/: %s at offset %zu", shown.c_str(), what.c_str(), off);
  }
  bool eof() const { return i_ >= p_.size(); }
  uint32_t peek(size_t k = 0) const { return i_ + k < p_.size() ? p_[i_ + k] : 0; }
  bool accept(uint32_t c) {
    if (!eof() && p_[i_] == c) {
      ++i_;
      return true;
    }
    return false;
  }

  int add_class(CharClass c) {
    if (classes_->size() >= kMaxSets) fail("more than " + std::to_string(kMaxSets) + " character classes");
    classes_->push_back(std::move(c));
    return static_cast<int>(classes_->size() - 1);
  }
  NodePtr class_node(CharClass c) {
    auto n = std::make_unique<Node>();
    n->kind = NodeKind::Class;
    n->cls = add_class(std::move(c));
    return n;
  }
  static void add_fold(CharClass& c, uint32_t lo, uint32_t hi) {
    c.ranges.emplace_back(lo, hi);
    // ASCII case folding, as the reference's (?i:..) rewrite does.
    uint32_t a = std::max(lo, uint32_t('a')), b = std::min(hi, uint32_t('z'));
    if (a <= b) c.ranges.emplace_back(a - 32, b - 32);
    a = std::max(lo, uint32_t('A')), b = std::min(hi, uint32_t('Z'));
    if (a <= b) c.ranges.emplace_back(a + 32, b + 32);
  }
  void add_range(CharClass& c, uint32_t lo, uint32_t hi) {
    if (icase_) add_fold(c, lo, hi);
    else c.ranges.emplace_back(lo, hi);
  }

  NodePtr parse_alt() {
    std::vector<NodePtr> alts;
    alts.push_back(parse_seq());
    while (accept('|')) alts.push_back(parse_seq());
    if (alts.size() == 1) return std::move(alts[0]);
    auto n = std::make_unique<Node>();
    n->kind = NodeKind::Alt;
    n->kids = std::move(alts);
    return n;
  }

  NodePtr parse_seq() {
    auto n = std::make_unique<Node>();
    n->kind = NodeKind::Seq;
    while (!eof() && peek() != '|' && peek() != ')') {
      NodePtr atom = parse_atom();
      atom = parse_quantifier(std::move(atom));
      n->kids.push_back(std::move(atom));
    }
    return n;
  }

  bool parse_int(int* v) {
    if (eof() || peek() < '0' || peek() > '9') return false;
    long x = 0;
    while (!eof() && peek() >= '0' && peek() <= '9') {
      x = x * 10 + (p_[i_++] - '0');
      if (x > 100000) fail("repeat count too large");
    }
    *v = static_cast<int>(x);
    return true;
  }

  NodePtr parse_quantifier(NodePtr atom) {
    for (int nq = 0;; ++nq) {
      int lo, hi;
      const size_t save = i_;
      if (accept('?')) lo = 0, hi = 1;
      else if (accept('*')) lo = 0, hi = -1;
      else if (accept('+')) lo = 1, hi = -1;
      else if (peek() == '{') {
        ++i_;
        if (!parse_int(&lo)) {
          i_ = save;  // a literal '{'
          return atom;
        }
        hi = lo;
        if (accept(',')) {
          if (!parse_int(&hi)) hi = -1;
        }
        if (!accept('}')) {
          i_ = save;
          return atom;
        }
        if (hi != -1 && hi < lo) fail("repeat range {n,m} with m < n");
      } else {
        return atom;
      }
      // JavaScript (u flag) refuses a quantifier on a quantifier ("nothing to repeat"); it would
      // also nest Repeat nodes without bound.
      if (nq > 0) fail("nothing to repeat (a quantifier follows a quantifier)");
      if (atom->kind == NodeKind::Bol || atom->kind == NodeKind::Eol || atom->kind == NodeKind::Bos ||
          atom->kind == NodeKind::Eos || atom->kind == NodeKind::Look)
        fail("quantifier on an assertion");
      bool greedy = true;
      if (accept('?')) greedy = false;
      else if (peek() == '+') fail("possessive quantifier (unsupported)");
      auto r = std::make_unique<Node>();
      r->kind = NodeKind::Repeat;
      r->min = lo;
      r->max = hi;
      r->greedy = greedy;
      r->kids.push_back(std::move(atom));
      atom = std::move(r);
    }
  }

  NodePtr parse_atom() {
    const uint32_t c = p_[i_];
    if (c == '(') return parse_group();
    if (c == '[') {
      ++i_;
      return class_node(parse_class());
    }
    if (c == '*' || c == '+' || c == '?') fail("nothing to repeat");
    ++i_;
    if (c == '.') {
      CharClass cc;
      cc.ranges.emplace_back('\n', '\n');
      cc.negated = true;
      return class_node(std::move(cc));
    }
    if (c == '^' || c == '$') {
      auto n = std::make_unique<Node>();
      n->kind = c == '^' ? NodeKind::Bol : NodeKind::Eol;
      return n;
    }
    if (c == '\\') {
      CharClass cc;
      NodeKind anchor;
      if (parse_escape(&cc, /*in_class=*/false, &anchor)) return class_node(std::move(cc));
      auto n = std::make_unique<Node>();
      n->kind = anchor;
      return n;
    }
    CharClass cc;
    add_range(cc, c, c);
    return class_node(std::move(cc));
  }

  NodePtr parse_group() {
    if (++depth_ > kMaxNesting) fail("groups nest deeper than " + std::to_string(kMaxNesting) + " levels");
    ++i_;  // (
    const bool save_icase = icase_;
    NodePtr look;
    if (accept('?')) {
      if (accept(':')) {
      } else if (peek() == '=' || peek() == '!') {
        look = std::make_unique<Node>();
        look->kind = NodeKind::Look;
        look->negative = p_[i_++] == '!';
      } else if (peek() == 'i' && peek(1) == ':') {
        i_ += 2;
        icase_ = true;
      } else if (peek() == '<' && (peek(1) == '=' || peek(1) == '!')) {
        fail("lookbehind (unsupported)");
      } else if (peek() == '<' || peek() == 'P') {
        fail("named group (unsupported)");
      } else if (peek() == '>') {
        fail("atomic group (unsupported)");
      } else {
        fail("group flags (unsupported; only (?:..), (?i:..), (?=..), (?!..))");
      }
    }
    NodePtr body = parse_alt();
    icase_ = save_icase;
    if (!accept(')')) fail("missing ')'");
    --depth_;
    if (look) {
      look->kids.push_back(std::move(body));
      return look;
    }
    return body;
  }

  uint32_t parse_hex(size_t ndigits, bool braced) {
    uint32_t v = 0;
    size_t n = 0;
    while (!eof() && (braced || n < ndigits)) {
      const uint32_t c = peek();
      int d = c >= '0' && c <= '9' ? int(c - '0') : c >= 'a' && c <= 'f' ? int(c - 'a' + 10) : c >= 'A' && c <= 'F' ? int(c - 'A' + 10) : -1;
      if (d < 0) break;
      v = v * 16 + uint32_t(d);
      ++i_;
      ++n;
      if (v > 0x10FFFF) fail("code point above U+10FFFF");
    }
    if (n == 0 || (!braced && n != ndigits)) fail("bad hex escape");
    return v;
  }

  // Parses the escape after '\'. Returns true with the set in *cc, or false with an anchor kind.
  bool parse_escape(CharClass* cc, bool in_class, NodeKind* anchor) {
    if (eof()) fail("trailing backslash");
    const uint32_t c = p_[i_++];
    auto single = [&](uint32_t cp) {
      add_range(*cc, cp, cp);
      return true;
    };
    switch (c) {
      case 'n': return single('\n');
      case 'r': return single('\r');
      case 't': return single('\t');
      case 'f': return single('\f');
      case 'v': return single('\v');
      case 'a': return single(0x07);
      case 'e': return single(0x1B);
      case '0': return single(0);
      case 'x':
        if (accept('{')) {
          uint32_t v = parse_hex(0, true);
          if (!accept('}')) fail("missing '}' in \\x{..}");
          return single(v);
        }
        return single(parse_hex(2, false));
      case 'u':
        if (accept('{')) {
          uint32_t v = parse_hex(0, true);
          if (!accept('}')) fail("missing '}' in \\u{..}");
          return single(v);
        }
        return single(parse_hex(4, false));
      case 's': cc->white = true; return true;
      case 'S': cc->not_white = true; return true;
      case 'd': cc->cats |= cat_bit(Cat::Nd); return true;
      case 'D': cc->not_cats |= cat_bit(Cat::Nd); return true;
      case 'p':
      case 'P': {
        if (!accept('{')) fail("expected '{' after \\p");
        std::string name;
        while (!eof() && peek() != '}') utf8_append(name, p_[i_++]);
        if (!accept('}')) fail("missing '}' in \\p{..}");
        uint32_t mask;
        bool white;
        if (!property_mask(name, &mask, &white)) fail("unsupported Unicode property \\p{" + name + "}");
        if (white) (c == 'p' ? cc->white : cc->not_white) = true;
        else (c == 'p' ? cc->cats : cc->not_cats) |= mask;
        return true;
      }
      case 'A':
      case 'z':
        if (in_class) fail(std::string("\\") + char(c) + " inside a class");
        *anchor = c == 'A' ? NodeKind::Bos : NodeKind::Eos;
        return false;
      case 'w': case 'W': case 'b': case 'B': case 'G': case 'Z': case 'h': case 'H': case 'k': case 'K':
      case 'R': case 'X': case 'c':
        fail(std::string("escape \\") + char(c) + " (unsupported)");
      default:
        if (c >= '1' && c <= '9') fail("backreference (unsupported)");
        if ((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z')) fail(std::string("unknown escape \\") + char(c));
        return single(c);  // identity escape of punctuation
    }
  }

  CharClass parse_class() {
    CharClass cc;
    if (accept('^')) cc.negated = true;
    bool first = true;
    for (;;) {
      if (eof()) fail("missing ']'");
      uint32_t c = p_[i_];
      if (c == ']' && !first) {
        ++i_;
        break;
      }
      first = false;
      if (c == '[') fail("nested character class (unsupported)");
      if (c == '&' && peek(1) == '&') fail("class intersection && (unsupported)");
      uint32_t lo;
      if (c == '\\') {
        ++i_;
        CharClass item;
        const bool save = icase_;
        icase_ = false;
        NodeKind anchor;
        parse_escape(&item, true, &anchor);
        icase_ = save;
        if (item.ranges.size() == 1 && !item.cats && !item.not_cats && !item.white && !item.not_white) {
          lo = item.ranges[0].first;
        } else {
          cc.cats |= item.cats;
          cc.not_cats |= item.not_cats;
          cc.white |= item.white;
          cc.not_white |= item.not_white;
          if (peek() == '-' && peek(1) != ']') fail("range with a set-valued endpoint");
          continue;
        }
      } else {
        lo = c;
        ++i_;
      }
      uint32_t hi = lo;
      if (peek() == '-' && peek(1) != ']' && i_ + 1 < p_.size()) {
        ++i_;
        uint32_t d = p_[i_];
        if (d == '\\') {
          ++i_;
          CharClass item;
          NodeKind anchor;
          parse_escape(&item, true, &anchor);
          if (item.ranges.size() != 1 || item.cats || item.not_cats || item.white || item.not_white)
            fail("range with a set-valued endpoint");
          hi = item.ranges[0].first;
        } else {
          if (d == '[') fail("nested character class (unsupported)");
          hi = d;
          ++i_;
        }
        if (hi < lo) fail("range out of order in character class");
      }
      add_range(cc, lo, hi);
    }
    return cc;
  }

  std::string_view pattern_;
  std::vector<CharClass>* classes_;
  std::vector<uint32_t> p_;
  std::vector<size_t> offsets_;
  size_t i_ = 0;
  int depth_ = 0;
  bool icase_ = false;
};

bool can_be_empty(const Node& n) {
  switch (n.kind) {
    case NodeKind::Class: return false;
    case NodeKind::Seq:
      for (auto& k : n.kids)
        if (!can_be_empty(*k)) return false;
      return true;
    case NodeKind::Alt:
      for (auto& k : n.kids)
        if (can_be_empty(*k)) return true;
      return false;
    case NodeKind::Repeat: return n.min == 0 || can_be_empty(*n.kids[0]);
    default: return true;
  }
}

// Adds to *out the classes that can match the first code point consumed by n; returns whether n
// can match the empty string (then what follows n may supply the first code point instead).
bool first_classes(const Node& n, std::vector<int>* out) {
  switch (n.kind) {
    case NodeKind::Class: out->push_back(n.cls); return false;
    case NodeKind::Seq:
      for (auto& k : n.kids)
        if (!first_classes(*k, out)) return false;
      return true;
    case NodeKind::Alt: {
      bool nullable = false;
      for (auto& k : n.kids) nullable |= first_classes(*k, out);
      return nullable;
    }
    case NodeKind::Repeat: return first_classes(*n.kids[0], out) || n.min == 0;
    default: return true;  // Empty, lookahead, anchors: zero-width
  }
}

}  // namespace

struct Regex::Impl {
  std::vector<CharClass> classes;
  std::vector<std::vector<Inst>> progs;  // progs[0] is the pattern; others are lookaheads
  std::vector<Guard> guards;
  int start_guard = -1;  // the whole pattern's guard (match start positions), or -1

  // The guard of n, or -1 when n can match empty.
  int make_guard(const Node& n) {
    std::vector<int> cls;
    if (first_classes(n, &cls)) return -1;
    std::sort(cls.begin(), cls.end());
    cls.erase(std::unique(cls.begin(), cls.end()), cls.end());
    // A guard only saves time; past a few classes (or too many guards) it would cost more than it
    // saves, so the split simply has none.
    if (cls.size() > kMaxGuardClasses || guards.size() >= kMaxSets) return -1;
    Guard g;
    g.bmp.assign(1024, 0);
    for (int c : cls)
      for (size_t w = 0; w < 1024; ++w) g.bmp[w] |= classes[size_t(c)].bmp[w];
    g.classes = std::move(cls);
    g.ascii[0] = g.bmp[0], g.ascii[1] = g.bmp[1];
    guards.push_back(std::move(g));
    return int(guards.size() - 1);
  }
  bool guard_match(int g, uint32_t cp) const {
    const Guard& gd = guards[size_t(g)];
    if (cp < 128) return (gd.ascii[cp >> 6] >> (cp & 63)) & 1;
    if (cp < 0x10000) return (gd.bmp[cp >> 6] >> (cp & 63)) & 1;
    for (int c : gd.classes)
      if (classes[size_t(c)].match(cp)) return true;
    return false;
  }

  size_t n_insts = 0;  // over all programs, for kMaxProgram
  std::string pattern;  // for error messages

  int compile_prog(const Node& n) {
    const int id = static_cast<int>(progs.size());
    progs.emplace_back();
    std::vector<Inst> code;
    emit(n, code);
    code.push_back(Inst{Op::Match});
    n_insts += code.size();
    progs[id] = std::move(code);
    return id;
  }

  void emit(const Node& n, std::vector<Inst>& code) {
    if (n_insts + code.size() > kMaxProgram)
      MOE_FAIL("regex /%s/: compiles to more than %zu instructions (large {n,m} repeats?)", pattern.c_str(),
               kMaxProgram);
    switch (n.kind) {
      case NodeKind::Empty: break;
      case NodeKind::Class: code.push_back(Inst{Op::Class, n.cls}); break;
      case NodeKind::Bol: code.push_back(Inst{Op::Bol}); break;
      case NodeKind::Eol: code.push_back(Inst{Op::Eol}); break;
      case NodeKind::Bos: code.push_back(Inst{Op::Bos}); break;
      case NodeKind::Eos: code.push_back(Inst{Op::Eos}); break;
      case NodeKind::Seq:
        for (auto& k : n.kids) emit(*k, code);
        break;
      case NodeKind::Alt: {
        std::vector<size_t> jumps;
        for (size_t k = 0; k < n.kids.size(); ++k) {
          if (k + 1 < n.kids.size()) {
            const size_t split = code.size();
            code.push_back(Inst{Op::Split});
            code[split].a = static_cast<int>(code.size());
            code[split].guard = make_guard(*n.kids[k]);
            emit(*n.kids[k], code);
            jumps.push_back(code.size());
            code.push_back(Inst{Op::Jmp});
            code[split].b = static_cast<int>(code.size());
          } else {
            emit(*n.kids[k], code);
          }
        }
        for (size_t j : jumps) code[j].a = static_cast<int>(code.size());
        break;
      }
      case NodeKind::Look: {
        Inst in{Op::Look};
        in.negative = n.negative;
        in.a = compile_prog(*n.kids[0]);
        code.push_back(in);
        break;
      }
      case NodeKind::Repeat: {
        const Node& body = *n.kids[0];
        if (body.kind == NodeKind::Class) {
          Inst in{Op::Repeat, body.cls};
          in.min = n.min;
          in.max = n.max;
          in.greedy = n.greedy;
          code.push_back(in);
          break;
        }
        if (n.max == -1 && can_be_empty(body))
          MOE_FAIL("regex: unbounded repeat of an expression that can match empty (unsupported)");
        for (int k = 0; k < n.min; ++k) emit(body, code);
        if (n.max == -1) {
          const size_t loop = code.size();
          code.push_back(Inst{Op::Split});
          const size_t body_at = code.size();
          emit(body, code);
          code.push_back(Inst{Op::Jmp, static_cast<int>(loop)});
          const int exit = static_cast<int>(code.size());
          code[loop].a = n.greedy ? static_cast<int>(body_at) : exit;
          code[loop].b = n.greedy ? exit : static_cast<int>(body_at);
          if (n.greedy) code[loop].guard = make_guard(body);
        } else {
          std::vector<size_t> splits;
          for (int k = n.min; k < n.max; ++k) {
            splits.push_back(code.size());
            code.push_back(Inst{Op::Split});
            code.back().a = static_cast<int>(code.size());  // provisional: body
            emit(body, code);
          }
          const int exit = static_cast<int>(code.size());
          const int g = n.greedy ? make_guard(body) : -1;
          for (size_t s : splits) {
            const int body_at = static_cast<int>(s + 1);
            code[s].a = n.greedy ? body_at : exit;
            code[s].b = n.greedy ? exit : body_at;
            code[s].guard = g;
          }
        }
        break;
      }
    }
  }

  struct Backtrack {
    int pc;
    int kind;      // 0: resume at pc, pos; 1: greedy repeat (shrink); 2: lazy repeat (grow)
    size_t pos;    // kind 0: position; 1: current end; 2: current end
    size_t bound;  // kind 1: lowest end; 2: highest end
    int cls;
  };

  [[noreturn]] void out_of_budget(size_t n, const char* what) const {
    MOE_FAIL("regex /%s/: matching a text of %zu code points exceeded the %s (catastrophic backtracking; "
             "limits: %llu steps per code point, %zu backtrack entries)",
             pattern.c_str(), n, what, static_cast<unsigned long long>(Regex::kStepsPerCodePoint), kMaxBacktrack);
  }
  static constexpr size_t kMaxBacktrack = size_t(1) << 20;

  // *budget: steps left (instructions, backtracks and code points scanned by repeats).
  bool run(int prog, const uint32_t* s, size_t n, size_t start, size_t* end_out, std::vector<Backtrack>& stack,
           uint64_t* budget) const {
    const std::vector<Inst>& code = progs[prog];
    const size_t base = stack.size();
    int pc = 0;
    size_t pos = start;
    uint64_t left = *budget;
    for (;;) {
      const Inst& in = code[pc];
      bool ok = true;
      if (left == 0) out_of_budget(n, "work limit");
      --left;
      switch (in.op) {
        case Op::Class:
          if (pos < n && classes[in.a].match(s[pos])) ++pos, ++pc;
          else ok = false;
          break;
        case Op::Split:
          if (in.guard >= 0 && (pos >= n || !guard_match(in.guard, s[pos]))) {
            pc = in.b;  // branch a cannot match here
            break;
          }
          if (stack.size() >= kMaxBacktrack) out_of_budget(n, "backtrack stack limit");
          stack.push_back(Backtrack{in.b, 0, pos, 0, 0});
          pc = in.a;
          break;
        case Op::Jmp: pc = in.a; break;
        case Op::Repeat: {
          const CharClass& cc = classes[in.a];
          const size_t lo = pos + size_t(in.min);
          const size_t cap = in.max < 0 ? n : std::min(n, pos + size_t(in.max));
          if (stack.size() >= kMaxBacktrack) out_of_budget(n, "backtrack stack limit");
          if (in.greedy) {
            size_t e = pos;
            while (e < cap && cc.match(s[e])) ++e;
            if (e - pos >= left) out_of_budget(n, "work limit");
            left -= e - pos;
            if (e < lo) {
              ok = false;
              break;
            }
            if (e > lo) stack.push_back(Backtrack{pc + 1, 1, e, lo, 0});
            pos = e;
          } else {
            size_t e = pos;
            while (e < lo && e < n && cc.match(s[e])) ++e;
            if (e < lo) {
              ok = false;
              break;
            }
            if (e < cap) stack.push_back(Backtrack{pc + 1, 2, e, cap, in.a});
            pos = e;
          }
          ++pc;
          break;
        }
        case Op::Look: {
          size_t e;
          *budget = left;
          const bool m = run(in.a, s, n, pos, &e, stack, budget);
          left = *budget;
          if (m == in.negative) ok = false;
          else ++pc;
          break;
        }
        case Op::Bol: ok = pos == 0 || s[pos - 1] == '\n'; ++pc; break;
        case Op::Eol: ok = pos == n || s[pos] == '\n'; ++pc; break;
        case Op::Bos: ok = pos == 0; ++pc; break;
        case Op::Eos: ok = pos == n; ++pc; break;
        case Op::Match:
          *end_out = pos;
          stack.resize(base);
          *budget = left;
          return true;
      }
      if (ok) continue;
      // Backtrack.
      for (;;) {
        if (stack.size() == base) {
          *budget = left;
          return false;
        }
        if (left == 0) out_of_budget(n, "work limit");
        --left;
        Backtrack& b = stack.back();
        if (b.kind == 0) {
          pc = b.pc;
          pos = b.pos;
          stack.pop_back();
          break;
        }
        if (b.kind == 1) {
          pos = --b.pos;
          pc = b.pc;
          if (b.pos == b.bound) stack.pop_back();
          break;
        }
        // Lazy: take one more.
        if (b.pos < b.bound && classes[b.cls].match(s[b.pos])) {
          pos = ++b.pos;
          pc = b.pc;
          if (b.pos == b.bound) stack.pop_back();
          break;
        }
        stack.pop_back();
      }
    }
  }
};

Regex::Regex(std::string_view pattern) : pattern_(pattern), impl_(std::make_unique<Impl>()) {
  MOE_CHECK(utf8_valid(pattern), "regex: pattern is not valid UTF-8");
  impl_->pattern = pattern.size() > 200 ? std::string(pattern.substr(0, 200)) + "..." : std::string(pattern);
  Parser parser(pattern, &impl_->classes);
  NodePtr root = parser.parse();
  for (auto& c : impl_->classes) c.finalize();
  impl_->compile_prog(*root);
  impl_->start_guard = impl_->make_guard(*root);
}

Regex::~Regex() = default;
Regex::Regex(Regex&&) noexcept = default;
Regex& Regex::operator=(Regex&&) noexcept = default;

uint64_t Regex::budget_for(size_t n) { return kBaseSteps + kStepsPerCodePoint * (uint64_t(n) + 1); }

bool Regex::find(const uint32_t* cps, size_t n, size_t from, size_t* begin, size_t* end, uint64_t* budget) const {
  thread_local std::vector<Impl::Backtrack> stack;
  stack.clear();
  uint64_t own = 0;
  if (!budget) {
    own = budget_for(n - std::min(from, n));
    budget = &own;
  }
  const int g = impl_->start_guard;
  for (size_t start = from; start <= n; ++start) {
    if (g >= 0 && (start == n || !impl_->guard_match(g, cps[start]))) continue;
    if (impl_->run(0, cps, n, start, end, stack, budget)) {
      *begin = start;
      return true;
    }
  }
  return false;
}

}  // namespace moe
