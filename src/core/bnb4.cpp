// bnb4.cpp — see bnb4.h.
#include "core/bnb4.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_util.h"
#include "core/nf4.h"

namespace moe {

Bnb4State parse_bnb4_state(std::string_view json_text, const std::string& what) {
  const nlohmann::json j = parse_json_object(json_text, what);
  Bnb4State s;
  auto str = [&](const char* k, std::string* out, bool required) {
    if (!j.contains(k)) {
      MOE_CHECK(!required, "%s: quant_state has no '%s'", what.c_str(), k);
      return;
    }
    MOE_CHECK(j[k].is_string(), "%s: quant_state '%s' must be a string", what.c_str(), k);
    *out = j[k].get<std::string>();
  };
  auto integer = [&](const char* k, int64_t* out, bool required) {
    if (!j.contains(k)) {
      MOE_CHECK(!required, "%s: quant_state has no '%s'", what.c_str(), k);
      return;
    }
    MOE_CHECK(j[k].is_number_integer() && j[k].get<int64_t>() > 0 && j[k].get<int64_t>() <= (int64_t(1) << 20),
              "%s: quant_state '%s' must be a positive block size", what.c_str(), k);
    *out = j[k].get<int64_t>();
  };
  str("quant_type", &s.quant_type, true);
  integer("blocksize", &s.blocksize, true);
  str("dtype", &s.dtype, false);
  MOE_CHECK(j.contains("shape") && j["shape"].is_array() && !j["shape"].empty() && j["shape"].size() <= 4,
            "%s: quant_state 'shape' must be a list of 1 to 4 sizes", what.c_str());
  for (const auto& d : j["shape"]) {
    MOE_CHECK(d.is_number_integer() && d.get<int64_t>() >= 0 && d.get<int64_t>() <= (int64_t(1) << 40),
              "%s: quant_state 'shape' holds a size that is not a non-negative integer", what.c_str());
    s.shape.push_back(d.get<int64_t>());
  }
  s.nested = j.contains("nested_offset") || j.contains("nested_blocksize");
  if (s.nested) {
    integer("nested_blocksize", &s.nested_blocksize, true);
    str("nested_dtype", &s.nested_dtype, false);
    MOE_CHECK(j.contains("nested_offset") && j["nested_offset"].is_number(),
              "%s: quant_state 'nested_offset' must be a number", what.c_str());
    s.nested_offset = j["nested_offset"].get<double>();
  }
  return s;
}

std::string bnb4_state_json(const Bnb4State& s) {
  nlohmann::ordered_json j = {{"quant_type", s.quant_type}, {"blocksize", s.blocksize}, {"dtype", s.dtype},
                              {"shape", s.shape}};
  if (s.nested) {
    j["nested_blocksize"] = s.nested_blocksize;
    j["nested_dtype"] = s.nested_dtype;
    j["nested_offset"] = s.nested_offset;
  }
  return j.dump();
}

const std::array<float, 256>& bnb_dynamic_map() {
  // Seven decades (10^-6 .. 10^0) of 2^i fractions each: the midpoints of linspace(0.1, 1, 2^i + 1),
  // both signs; then 0 and 1. Computed in f32 as torch does.
  static const std::array<float, 256> map = [] {
    std::vector<float> v;
    for (int i = 0; i < 7; ++i) {
      const int items = (1 << i) + 1;
      const float start = 0.1f, end = 1.0f, step = (end - start) / static_cast<float>(items - 1);
      std::vector<float> bounds(items);
      for (int b = 0; b < items; ++b)  // torch.linspace: from the start for the first half, from the end after
        bounds[b] = b < items / 2 ? start + step * static_cast<float>(b) : end - step * static_cast<float>(items - 1 - b);
      const float scale = static_cast<float>(std::pow(10.0, i - 6));
      for (int b = 0; b + 1 < items; ++b) {
        const float mean = (bounds[b] + bounds[b + 1]) / 2.0f;
        v.push_back(scale * mean);
        v.push_back(-scale * mean);
      }
    }
    v.push_back(0.0f);
    v.push_back(1.0f);
    std::sort(v.begin(), v.end());
    std::array<float, 256> out{};
    std::copy(v.begin(), v.end(), out.begin());
    return out;
  }();
  return map;
}

void bnb4_decode_absmax(float* out, const uint8_t* codes, int64_t blocks, const float* nested_absmax,
                        const float* map, int64_t nested_block, float offset) {
  for (int64_t b = 0; b < blocks; ++b) out[b] = map[codes[b]] * nested_absmax[b / nested_block] + offset;
}

Bnb4Tensors bnb4_quantize(const float* w, int64_t n, bool double_quant) {
  MOE_CHECK(n % kNf4Block == 0, "bnb4: %lld values are not whole blocks of %lld", (long long)n, (long long)kNf4Block);
  const int64_t blocks = n / kNf4Block;
  std::vector<uint8_t> nf4(static_cast<size_t>(blocks) * kNf4BlockBytes);
  nf4_quantize(w, nf4.data(), n);
  Bnb4Tensors t;
  t.packed.resize(static_cast<size_t>(n / 2));
  t.absmax.resize(static_cast<size_t>(blocks));
  for (int64_t b = 0; b < blocks; ++b) {
    std::memcpy(&t.absmax[b], nf4.data() + b * kNf4BlockBytes, 4);
    std::memcpy(t.packed.data() + b * (kNf4Block / 2), nf4.data() + b * kNf4BlockBytes + 4, kNf4Block / 2);
  }
  if (!double_quant) return t;
  // bitsandbytes: subtract the mean, then blockwise 8-bit codes of the dynamic map (nearest).
  double sum = 0;
  for (float a : t.absmax) sum += a;
  t.offset = blocks ? static_cast<float>(sum / static_cast<double>(blocks)) : 0.0f;
  const std::array<float, 256>& map = bnb_dynamic_map();
  const int64_t nested = (blocks + kBnbNestedBlock - 1) / kBnbNestedBlock;
  t.nested_absmax.assign(static_cast<size_t>(nested), 0.0f);
  t.absmax_codes.resize(static_cast<size_t>(blocks));
  for (int64_t g = 0; g < nested; ++g) {
    const int64_t b0 = g * kBnbNestedBlock, b1 = std::min(blocks, b0 + kBnbNestedBlock);
    float amax = 0;
    for (int64_t b = b0; b < b1; ++b) amax = std::max(amax, std::fabs(t.absmax[b] - t.offset));
    t.nested_absmax[g] = amax;
    for (int64_t b = b0; b < b1; ++b) {
      const float v = amax > 0 ? (t.absmax[b] - t.offset) / amax : 0.0f;
      size_t i = static_cast<size_t>(std::lower_bound(map.begin(), map.end(), v) - map.begin());  // map[i] >= v
      if (i == map.size()) i = map.size() - 1;
      else if (i > 0 && v - map[i - 1] <= map[i] - v) i -= 1;  // the nearer neighbour (ties: the lower)
      t.absmax_codes[b] = static_cast<uint8_t>(i);
    }
  }
  t.absmax.clear();
  return t;
}

void bnb4_dequantize(float* out, const uint8_t* packed, int64_t n, const float* absmax, const float* quant_map,
                     int64_t blocksize) {
  for (int64_t i = 0; i < n; ++i) {
    const uint8_t byte = packed[i / 2];
    const int code = (i % 2 == 0) ? byte >> 4 : byte & 15;
    out[i] = quant_map[code] * absmax[i / blocksize];
  }
}

void bnb4_to_nf4_blocks(uint8_t* dst, const uint8_t* packed, const float* absmax, int64_t n) {
  MOE_CHECK(n % kNf4Block == 0, "bnb4: %lld values are not whole blocks of %lld", (long long)n, (long long)kNf4Block);
  for (int64_t b = 0; b < n / kNf4Block; ++b) {
    std::memcpy(dst + b * kNf4BlockBytes, &absmax[b], 4);
    std::memcpy(dst + b * kNf4BlockBytes + 4, packed + b * (kNf4Block / 2), kNf4Block / 2);
  }
}

}  // namespace moe
