// unicode.cpp — see unicode.h. Tables are expanded once, on first use, into flat lookups.
#include "tokenizer/unicode.h"

#include <algorithm>
#include <array>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace moe {
namespace {

struct UnicodeRange {
  uint32_t lo, hi, value;
};

#include "tokenizer/unicode_data.inc"

constexpr uint32_t kMaxCp = 0x110000;
constexpr uint32_t kSBase = 0xAC00, kLBase = 0x1100, kVBase = 0x1161, kTBase = 0x11A7;
constexpr uint32_t kLCount = 19, kVCount = 21, kTCount = 28, kNCount = kVCount * kTCount, kSCount = kLCount * kNCount;

// Flat per-code-point tables (1.1 MB each byte table); built once.
struct Tables {
  std::vector<uint8_t> category;  // GeneralCategory per code point
  std::vector<uint8_t> ccc;       // combining class rank per code point (0 = starter)
  std::unordered_map<uint32_t, uint32_t> decomp_index;  // cp -> row in kDecompositions
  std::unordered_map<uint64_t, uint32_t> compose;       // (first << 21 | second) -> composite
  uint32_t nfc_stable_below = 0;  // every code point below this is an NFC-inert starter
  // The NFC_Quick_Check property (UAX #15), derived from the tables: 0 Yes, 1 Maybe (may combine
  // with a preceding character), 2 No (never occurs in NFC).
  std::vector<uint8_t> nfc_qc;

  Tables() : category(kMaxCp, 0), ccc(kMaxCp, 0), nfc_qc(kMaxCp, 0) {
    for (const auto& r : kGeneralCategoryRanges)
      std::fill(category.begin() + r.lo, category.begin() + r.hi + 1, static_cast<uint8_t>(r.value));
    uint32_t stable = kMaxCp;
    for (const auto& m : kCombiningRanks) {
      ccc[m[0]] = static_cast<uint8_t>(m[1]);
      stable = std::min(stable, m[0]);
    }
    for (uint32_t i = 0; i < std::size(kDecompositions); ++i) decomp_index[kDecompositions[i][0]] = i;
    std::unordered_map<uint32_t, bool> composite;
    for (const auto& c : kCompositions) {
      compose[(uint64_t(c[0]) << 21) | c[1]] = c[2];
      composite[c[2]] = true;
      stable = std::min(stable, c[1]);
    }
    for (const auto& d : kDecompositions)
      if (!composite.count(d[0])) stable = std::min(stable, d[0]);
    nfc_stable_below = stable;
    // Maybe: the second character of a primary composite (Hangul: V and T jamo).
    for (const auto& c : kCompositions) nfc_qc[c[1]] = 1;
    for (uint32_t cp = kVBase; cp < kVBase + kVCount; ++cp) nfc_qc[cp] = 1;
    for (uint32_t cp = kTBase + 1; cp < kTBase + kTCount; ++cp) nfc_qc[cp] = 1;
    // No: decomposable but not a primary composite (singletons, exclusions, non-starter
    // decompositions): NFC never contains it.
    for (const auto& d : kDecompositions)
      if (!composite.count(d[0])) nfc_qc[d[0]] = 2;
  }
};

const Tables& tables() {
  static const Tables t;
  return t;
}

inline bool is_cont(unsigned char c) { return (c & 0xC0) == 0x80; }

// Length of a valid UTF-8 sequence at s[i], or 0 when invalid/truncated.
size_t utf8_valid_len(std::string_view s, size_t i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  const size_t n = s.size() - i;
  if (c < 0x80) return 1;
  if (c < 0xC2) return 0;
  if (c < 0xE0) return n >= 2 && is_cont(s[i + 1]) ? 2 : 0;
  if (c < 0xF0) {
    if (n < 3) return 0;
    const unsigned char c1 = static_cast<unsigned char>(s[i + 1]);
    if (c == 0xE0 && c1 < 0xA0) return 0;
    if (c == 0xED && c1 >= 0xA0) return 0;
    return is_cont(c1) && is_cont(s[i + 2]) ? 3 : 0;
  }
  if (c < 0xF5) {
    if (n < 4) return 0;
    const unsigned char c1 = static_cast<unsigned char>(s[i + 1]);
    if (c == 0xF0 && c1 < 0x90) return 0;
    if (c == 0xF4 && c1 >= 0x90) return 0;
    return is_cont(c1) && is_cont(s[i + 2]) && is_cont(s[i + 3]) ? 4 : 0;
  }
  return 0;
}

}  // namespace

const char* unicode_version() { return MOE_UNICODE_VERSION; }

GeneralCategory general_category(uint32_t cp) {
  if (cp >= kMaxCp) return GeneralCategory::Cn;
  return static_cast<GeneralCategory>(tables().category[cp]);
}

bool is_white_space(uint32_t cp) {
  for (const auto& r : kWhiteSpaceRanges)
    if (cp >= r.lo && cp <= r.hi) return true;
  return false;
}

uint32_t utf8_next(std::string_view s, size_t& i) {
  const unsigned char c = static_cast<unsigned char>(s[i]);
  if (c < 0x80) {
    ++i;
    return c;
  }
  const size_t n = utf8_valid_len(s, i);
  if (n == 0) {
    ++i;
    return 0xFFFD;
  }
  uint32_t cp = n == 2 ? (c & 0x1F) : n == 3 ? (c & 0x0F) : (c & 0x07);
  for (size_t k = 1; k < n; ++k) cp = (cp << 6) | (static_cast<unsigned char>(s[i + k]) & 0x3F);
  i += n;
  return cp;
}

void utf8_append(std::string& out, uint32_t cp) {
  if (cp < 0x80) {
    out += static_cast<char>(cp);
  } else if (cp < 0x800) {
    out += static_cast<char>(0xC0 | (cp >> 6));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else if (cp < 0x10000) {
    out += static_cast<char>(0xE0 | (cp >> 12));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  } else {
    out += static_cast<char>(0xF0 | (cp >> 18));
    out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
    out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
    out += static_cast<char>(0x80 | (cp & 0x3F));
  }
}

// Length of the all-ASCII prefix of s[i..] rounded down to 8 bytes, plus i.
inline size_t skip_ascii8(std::string_view s, size_t i) {
  while (i + 8 <= s.size()) {
    uint64_t v;
    std::memcpy(&v, s.data() + i, 8);
    if (v & 0x8080808080808080ULL) break;
    i += 8;
  }
  return i;
}

bool utf8_valid(std::string_view s) {
  for (size_t i = 0; i < s.size();) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {
      i = skip_ascii8(s, i + 1);
      continue;
    }
    const size_t n = utf8_valid_len(s, i);
    if (n == 0) return false;
    i += n;
  }
  return true;
}

std::string utf8_sanitize(std::string_view s) {
  if (utf8_valid(s)) return std::string(s);
  // WHATWG UTF-8 decoder: consume the maximal prefix of a valid sequence, then emit U+FFFD.
  std::string out;
  size_t i = 0;
  while (i < s.size()) {
    const unsigned char c = static_cast<unsigned char>(s[i]);
    const size_t n = utf8_valid_len(s, i);
    if (n) {
      out.append(s.substr(i, n));
      i += n;
      continue;
    }
    size_t need = 0;
    unsigned char lo = 0x80, hi = 0xBF;
    if (c >= 0xC2 && c <= 0xDF) need = 1;
    else if (c >= 0xE0 && c <= 0xEF) {
      need = 2;
      if (c == 0xE0) lo = 0xA0;
      if (c == 0xED) hi = 0x9F;
    } else if (c >= 0xF0 && c <= 0xF4) {
      need = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;
    }
    ++i;
    for (size_t k = 0; k < need && i < s.size(); ++k) {
      const unsigned char b = static_cast<unsigned char>(s[i]);
      if (b < lo || b > hi) break;
      lo = 0x80, hi = 0xBF;
      ++i;
    }
    out += "\xEF\xBF\xBD";
  }
  return out;
}

size_t utf8_complete_prefix(std::string_view s) {
  // Walk back over at most 3 continuation bytes to the last lead byte.
  size_t n = s.size();
  size_t k = 0;
  while (k < 3 && k < n && is_cont(s[n - 1 - k])) ++k;
  if (k == n) return n;
  const unsigned char lead = static_cast<unsigned char>(s[n - 1 - k]);
  size_t want = lead >= 0xF0 ? 4 : lead >= 0xE0 ? 3 : lead >= 0xC0 ? 2 : 1;
  if (want > k + 1 && lead >= 0xC2 && lead <= 0xF4) return n - 1 - k;  // incomplete tail
  return n;
}

bool nfc_quick_check(std::string_view s) {
  const Tables& t = tables();
  uint8_t last_cc = 0;
  for (size_t i = 0; i < s.size();) {
    if (static_cast<unsigned char>(s[i]) < 0x80) {  // ASCII: a starter, NFC_QC = Yes
      i = skip_ascii8(s, i + 1);
      last_cc = 0;
      continue;
    }
    const uint32_t cp = utf8_next(s, i);
    if (cp < t.nfc_stable_below) {
      last_cc = 0;
      continue;
    }
    const uint8_t cc = t.ccc[cp];
    if ((cc != 0 && last_cc > cc) || t.nfc_qc[cp] != 0) return false;
    last_cc = cc;
  }
  return true;
}

bool nfc_quick_ascii(std::string_view s) {
  for (char c : s)
    if (static_cast<unsigned char>(c) >= 0x80) return false;
  return true;
}

std::string nfc(std::string_view s) {
  const Tables& t = tables();
  if (nfc_quick_check(s)) return std::string(s);
  // 1. Full canonical decomposition.
  std::vector<uint32_t> cps;
  cps.reserve(s.size());
  for (size_t i = 0; i < s.size();) {
    const uint32_t cp = utf8_next(s, i);
    if (cp >= kSBase && cp < kSBase + kSCount) {
      const uint32_t si = cp - kSBase;
      cps.push_back(kLBase + si / kNCount);
      cps.push_back(kVBase + (si % kNCount) / kTCount);
      if (si % kTCount) cps.push_back(kTBase + si % kTCount);
      continue;
    }
    auto it = t.decomp_index.find(cp);
    if (it == t.decomp_index.end()) {
      cps.push_back(cp);
    } else {
      const auto& d = kDecompositions[it->second];
      for (uint32_t k = 0; k < d[1]; ++k) cps.push_back(d[2 + k]);
    }
  }
  auto ccc = [&](uint32_t cp) -> uint8_t { return cp < kMaxCp ? t.ccc[cp] : 0; };
  // 2. Canonical ordering: stable sort of each run of non-starters by class.
  for (size_t i = 0; i < cps.size();) {
    if (ccc(cps[i]) == 0) {
      ++i;
      continue;
    }
    size_t j = i;
    while (j < cps.size() && ccc(cps[j]) != 0) ++j;
    std::stable_sort(cps.begin() + i, cps.begin() + j, [&](uint32_t a, uint32_t b) { return ccc(a) < ccc(b); });
    i = j;
  }
  // 3. Canonical composition.
  std::vector<uint32_t> out;
  out.reserve(cps.size());
  size_t starter = SIZE_MAX;  // index in out of the last starter
  for (uint32_t cp : cps) {
    const uint8_t cc = ccc(cp);
    if (starter != SIZE_MAX) {
      const uint32_t st = out[starter];
      const uint8_t last_cc = out.size() - 1 == starter ? 0 : ccc(out.back());
      const bool blocked = out.size() - 1 != starter && (last_cc == 0 || last_cc >= cc);
      if (!blocked) {
        // Hangul LV and LVT.
        if (st >= kLBase && st < kLBase + kLCount && cp >= kVBase && cp < kVBase + kVCount && out.size() - 1 == starter) {
          out[starter] = kSBase + ((st - kLBase) * kVCount + (cp - kVBase)) * kTCount;
          continue;
        }
        if (st >= kSBase && st < kSBase + kSCount && (st - kSBase) % kTCount == 0 && cp > kTBase &&
            cp < kTBase + kTCount && out.size() - 1 == starter) {
          out[starter] = st + (cp - kTBase);
          continue;
        }
        auto it = t.compose.find((uint64_t(st) << 21) | cp);
        if (it != t.compose.end()) {
          out[starter] = it->second;
          continue;
        }
      }
    }
    if (cc == 0) starter = out.size();
    out.push_back(cp);
  }
  std::string r;
  r.reserve(s.size());
  for (uint32_t cp : out) utf8_append(r, cp);
  return r;
}

}  // namespace moe
