// spm_proto.cpp — see spm_proto.h.
#include "tokenizer/spm_proto.h"

#include <cstring>

#include "core/error.h"

namespace moe {
namespace {

// Protobuf wire types.
constexpr int kVarint = 0, kFixed64 = 1, kBytes = 2, kFixed32 = 5;

struct Reader {
  std::string_view b;
  size_t pos = 0;
  const std::string& origin;

  bool done() const { return pos >= b.size(); }
  uint64_t varint() {
    uint64_t v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      MOE_CHECK(pos < b.size(), "%s: SentencePiece model truncated inside a varint", origin.c_str());
      const uint8_t c = static_cast<uint8_t>(b[pos++]);
      v |= static_cast<uint64_t>(c & 0x7f) << shift;
      if (!(c & 0x80)) return v;
    }
    MOE_FAIL("%s: SentencePiece model has a varint longer than 10 bytes", origin.c_str());
  }
  std::string_view bytes() {
    const uint64_t n = varint();
    MOE_CHECK(n <= b.size() - pos, "%s: SentencePiece model field of %llu bytes runs past the end", origin.c_str(),
              static_cast<unsigned long long>(n));
    std::string_view s = b.substr(pos, n);
    pos += n;
    return s;
  }
  float fixed32_float() {
    MOE_CHECK(b.size() - pos >= 4, "%s: SentencePiece model truncated inside a float", origin.c_str());
    float f;
    std::memcpy(&f, b.data() + pos, 4);
    pos += 4;
    return f;
  }
  void skip(int wire) {
    switch (wire) {
      case kVarint: varint(); return;
      case kFixed64: MOE_CHECK(b.size() - pos >= 8, "%s: truncated", origin.c_str()); pos += 8; return;
      case kBytes: bytes(); return;
      case kFixed32: MOE_CHECK(b.size() - pos >= 4, "%s: truncated", origin.c_str()); pos += 4; return;
      default: MOE_FAIL("%s: not a SentencePiece model (protobuf wire type %d)", origin.c_str(), wire);
    }
  }
  // Next (field, wire type).
  std::pair<uint32_t, int> tag() {
    const uint64_t t = varint();
    return {static_cast<uint32_t>(t >> 3), static_cast<int>(t & 7)};
  }
};

// int32 fields are sign-extended to 64 bits on the wire.
int32_t as_int32(uint64_t v) { return static_cast<int32_t>(static_cast<int64_t>(v)); }

void put_varint(std::string& out, uint64_t v) {
  while (v >= 0x80) {
    out.push_back(static_cast<char>((v & 0x7f) | 0x80));
    v >>= 7;
  }
  out.push_back(static_cast<char>(v));
}
void put_tag(std::string& out, uint32_t field, int wire) { put_varint(out, (uint64_t{field} << 3) | wire); }
void put_int(std::string& out, uint32_t field, int64_t v) {
  put_tag(out, field, kVarint);
  put_varint(out, static_cast<uint64_t>(v));
}
void put_bytes(std::string& out, uint32_t field, std::string_view s) {
  put_tag(out, field, kBytes);
  put_varint(out, s.size());
  out.append(s);
}

}  // namespace

SpmProto parse_spm_proto(std::string_view bytes, const std::string& origin) {
  SpmProto p;
  Reader top{bytes, 0, origin};
  while (!top.done()) {
    const auto [field, wire] = top.tag();
    if (wire != kBytes || (field != 1 && field != 2 && field != 3)) {
      top.skip(wire);
      continue;
    }
    Reader r{top.bytes(), 0, origin};
    if (field == 1) {
      SpmPiece piece;
      while (!r.done()) {
        const auto [f, w] = r.tag();
        if (f == 1 && w == kBytes) piece.piece = std::string(r.bytes());
        else if (f == 2 && w == kFixed32) piece.score = r.fixed32_float();
        else if (f == 3 && w == kVarint) piece.type = as_int32(r.varint());
        else r.skip(w);
      }
      MOE_CHECK(piece.type >= kSpmNormal && piece.type <= kSpmByte, "%s: piece %zu '%s' has type %d (not 1..6)",
                origin.c_str(), p.pieces.size(), piece.piece.c_str(), piece.type);
      p.pieces.push_back(std::move(piece));
    } else if (field == 2) {
      while (!r.done()) {
        const auto [f, w] = r.tag();
        if (w != kVarint) {
          r.skip(w);
          continue;
        }
        const uint64_t v = r.varint();
        switch (f) {
          case 3: p.model_type = as_int32(v); break;
          case 35: p.byte_fallback = v != 0; break;
          case 40: p.unk_id = as_int32(v); break;
          case 41: p.bos_id = as_int32(v); break;
          case 42: p.eos_id = as_int32(v); break;
          case 43: p.pad_id = as_int32(v); break;
          default: break;
        }
      }
    } else {
      while (!r.done()) {
        const auto [f, w] = r.tag();
        if (f == 1 && w == kBytes) p.normalizer_name = std::string(r.bytes());
        else if (f == 2 && w == kBytes) p.has_charsmap = !r.bytes().empty();
        else if (f == 3 && w == kVarint) p.add_dummy_prefix = r.varint() != 0;
        else if (f == 4 && w == kVarint) p.remove_extra_whitespaces = r.varint() != 0;
        else if (f == 5 && w == kVarint) p.escape_whitespaces = r.varint() != 0;
        else r.skip(w);
      }
    }
  }
  MOE_CHECK(!p.pieces.empty(), "%s: the SentencePiece model has no pieces", origin.c_str());
  return p;
}

std::string serialize_spm_proto(const SpmProto& p) {
  std::string out, sub;
  for (const SpmPiece& piece : p.pieces) {
    sub.clear();
    put_bytes(sub, 1, piece.piece);
    put_tag(sub, 2, kFixed32);
    char f[4];
    std::memcpy(f, &piece.score, 4);
    sub.append(f, 4);
    put_int(sub, 3, piece.type);
    put_bytes(out, 1, sub);
  }
  sub.clear();
  put_int(sub, 3, p.model_type);
  put_int(sub, 4, static_cast<int64_t>(p.pieces.size()));  // vocab_size
  put_int(sub, 35, p.byte_fallback ? 1 : 0);
  put_int(sub, 40, p.unk_id);
  put_int(sub, 41, p.bos_id);
  put_int(sub, 42, p.eos_id);
  put_int(sub, 43, p.pad_id);
  put_bytes(out, 2, sub);
  sub.clear();
  if (!p.normalizer_name.empty()) put_bytes(sub, 1, p.normalizer_name);
  put_int(sub, 3, p.add_dummy_prefix ? 1 : 0);
  put_int(sub, 4, p.remove_extra_whitespaces ? 1 : 0);
  put_int(sub, 5, p.escape_whitespaces ? 1 : 0);
  put_bytes(out, 3, sub);
  return out;
}

}  // namespace moe
