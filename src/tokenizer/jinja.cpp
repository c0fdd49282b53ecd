// jinja.cpp — see jinja.h. Lexer, parser and tree-walking interpreter, each following the
// reference (@huggingface/jinja) closely so that output is byte-identical.
#include "tokenizer/jinja.h"

// GCC 12 reports a false -Wrestrict inside std::string concatenation (GCC bug 105329).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wrestrict"
#endif

#include <cmath>
#include <cstring>
#include <ctime>
#include <functional>
#include <map>
#include <unordered_map>

#include "core/error.h"
#include "core/json_util.h"
#include "tokenizer/unicode.h"

namespace moe {
namespace {

using ojson = nlohmann::ordered_json;

// Limits for hostile templates and contexts (templates arrive with model directories, contexts
// with HTTP requests). Real chat templates are < 50 KB, nest < 10 levels and render in well under
// 100k steps; every limit is far above that and far below a crash, a hang or memory exhaustion.
// Each error names the limit.
constexpr size_t kMaxTemplateBytes = size_t(1) << 20;       // template source
constexpr int kMaxParseNesting = 64;                         // parser recursion (parentheses, blocks, elif, calls)
constexpr int kMaxAstDepth = 256;                            // depth of the parsed tree (incl. a+b+c.. chains)
constexpr int kMaxEvalDepth = 200;                           // nested evaluation (incl. macro recursion)
constexpr int kMaxValueDepth = 256;                          // nested lists/dicts built at run time
constexpr size_t kMaxStringBytes = size_t(8) << 20;          // any one string, the output included
constexpr size_t kMaxArrayItems = size_t(1) << 18;           // any one list (range() included)
constexpr uint64_t kMaxLoopIterations = uint64_t(1) << 18;   // for-loop iterations per render
constexpr uint64_t kMaxRenderSteps = uint64_t(1) << 23;      // evaluations per render
constexpr uint64_t kMaxRenderBytes = uint64_t(1) << 27;      // string bytes made or copied per render

[[noreturn]] void jfail(const std::string& msg) { MOE_FAIL("chat template: %s", msg.c_str()); }

// What one render() has used so far (thread_local: a render runs on one thread).
struct RenderState {
  uint64_t steps = 0, bytes = 0, iterations = 0;
  int depth = 0;
  // Every namespace made during the render: namespaces are the only mutable values, so the only
  // way to build a reference cycle (ns.x = ns); their contents are cleared when the render ends.
  std::vector<std::shared_ptr<void>> namespaces;
};
thread_local RenderState* g_render = nullptr;

void charge_bytes(size_t n) {
  if (!g_render || n == 0) return;
  g_render->bytes += n;
  if (g_render->bytes > kMaxRenderBytes)
    jfail("rendering made or copied more than " + std::to_string(kMaxRenderBytes) + " bytes of strings (limit)");
}

bool js_space(uint32_t cp) {
  return (cp >= 9 && cp <= 13) || cp == 0x20 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
         cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000 || cp == 0xFEFF;
}
std::string trim_end(const std::string& s) {
  size_t i = 0, keep = 0;
  while (i < s.size()) {
    const uint32_t cp = utf8_next(s, i);
    if (!js_space(cp)) keep = i;
  }
  return s.substr(0, keep);
}
std::string trim_start(const std::string& s) {
  size_t i = 0;
  while (i < s.size()) {
    size_t j = i;
    if (!js_space(utf8_next(s, j))) break;
    i = j;
  }
  return s.substr(i);
}
std::string trim(const std::string& s) { return trim_start(trim_end(s)); }
std::vector<std::string> code_points(const std::string& s) {
  std::vector<std::string> out;
  for (size_t i = 0; i < s.size();) {
    const size_t b = i;
    utf8_next(s, i);
    out.push_back(s.substr(b, i - b));
  }
  return out;
}
bool is_word(char c) { return std::isalnum(static_cast<unsigned char>(c)) || c == '_'; }

// JavaScript Number -> string (Number.prototype.toString / JSON.stringify).
std::string js_number(double v) {
  if (std::isnan(v)) return "NaN";
  if (std::isinf(v)) return v > 0 ? "Infinity" : "-Infinity";
  if (v == 0) return "0";
  char buf[40];
  int prec = 1;
  for (; prec <= 17; ++prec) {
    std::snprintf(buf, sizeof buf, "%.*e", prec - 1, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  // buf = d.ddddde[+-]XX: digits and exponent.
  std::string s = buf;
  const bool neg = s[0] == '-';
  if (neg) s = s.substr(1);
  const size_t e = s.find('e');
  std::string digits = s.substr(0, 1) + (e > 2 ? s.substr(2, e - 2) : "");
  const int exp = std::atoi(s.c_str() + e + 1);
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  const int k = int(digits.size()), n = exp + 1;
  std::string r;
  if (k <= n && n <= 21) {
    r = digits + std::string(size_t(n - k), '0');
  } else if (0 < n && n <= 21) {
    r = digits.substr(0, size_t(n)) + "." + digits.substr(size_t(n));
  } else if (-6 < n && n <= 0) {
    r = "0." + std::string(size_t(-n), '0') + digits;
  } else {
    r = digits.substr(0, 1) + (k > 1 ? "." + digits.substr(1) : "") + "e" + (n - 1 >= 0 ? "+" : "-") +
        std::to_string(std::abs(n - 1));
  }
  return neg ? "-" + r : r;
}

std::string json_quote(const std::string& s, bool ascii) {
  std::string r = "\"";
  for (size_t i = 0; i < s.size();) {
    const size_t b = i;
    const uint32_t cp = utf8_next(s, i);
    switch (cp) {
      case '"': r += "\\\""; break;
      case '\\': r += "\\\\"; break;
      case '\b': r += "\\b"; break;
      case '\f': r += "\\f"; break;
      case '\n': r += "\\n"; break;
      case '\r': r += "\\r"; break;
      case '\t': r += "\\t"; break;
      default:
        if (cp < 0x20) {
          char buf[8];
          std::snprintf(buf, sizeof buf, "\\u%04x", cp);
          r += buf;
        } else if (ascii && cp >= 0x7F) {
          char buf[16];
          if (cp < 0x10000) {
            std::snprintf(buf, sizeof buf, "\\u%04x", cp);
          } else {
            const uint32_t v = cp - 0x10000;
            std::snprintf(buf, sizeof buf, "\\u%04x\\u%04x", 0xD800 + (v >> 10), 0xDC00 + (v & 0x3FF));
          }
          r += buf;
        } else {
          r.append(s, b, i - b);
        }
    }
  }
  return r + "\"";
}

// ---------------------------------------------------------------- values

struct Env;
struct Value;
using Args = std::vector<Value>;
using Fn = std::function<Value(Args&, Env&)>;

struct Value {
  enum Kind { Undefined, Null, Bool, Int, Float, Str, Array, Tuple, Object, KwArgs, Namespace, Function } kind = Undefined;
  bool b = false;
  double num = 0;  // Int and Float (JavaScript numbers)
  std::string s;
  std::shared_ptr<std::vector<Value>> arr;
  std::shared_ptr<std::vector<std::pair<std::string, Value>>> obj;
  std::shared_ptr<Fn> fn;
  int depth = 0;  // nesting of lists/dicts (kMaxValueDepth); destroying a value recurses this deep

  Value() = default;
  // Copies count against kMaxRenderBytes: a template could otherwise copy a large string
  // millions of times.
  Value(const Value& o)
      : kind(o.kind), b(o.b), num(o.num), s(o.s), arr(o.arr), obj(o.obj), fn(o.fn), depth(o.depth) {
    charge_bytes(s.size());
  }
  Value(Value&&) noexcept = default;
  Value& operator=(const Value& o) {
    if (this != &o) {
      kind = o.kind, b = o.b, num = o.num, s = o.s, arr = o.arr, obj = o.obj, fn = o.fn, depth = o.depth;
      charge_bytes(s.size());
    }
    return *this;
  }
  Value& operator=(Value&&) noexcept = default;

  static void check_depth(int d) {
    if (d > kMaxValueDepth) jfail("lists/dicts nest deeper than " + std::to_string(kMaxValueDepth) + " levels");
  }

  static Value undef() { return Value(); }
  static Value null() { Value v; v.kind = Null; return v; }
  static Value boolean(bool x) { Value v; v.kind = Bool; v.b = x; return v; }
  static Value integer(double x) { Value v; v.kind = Int; v.num = x; return v; }
  static Value floating(double x) { Value v; v.kind = Float; v.num = x; return v; }
  static Value str(std::string x) {
    if (x.size() > kMaxStringBytes)
      jfail("a string of " + std::to_string(x.size()) + " bytes is above the limit of " +
            std::to_string(kMaxStringBytes));
    charge_bytes(x.size());
    Value v; v.kind = Str; v.s = std::move(x); return v;
  }
  static Value array(std::vector<Value> a, Kind k = Array) {
    if (a.size() > kMaxArrayItems)
      jfail("a list of " + std::to_string(a.size()) + " items is above the limit of " + std::to_string(kMaxArrayItems));
    Value v; v.kind = k;
    for (const Value& x : a) v.depth = std::max(v.depth, x.depth + 1);
    if (v.depth == 0) v.depth = 1;
    check_depth(v.depth);
    v.arr = std::make_shared<std::vector<Value>>(std::move(a)); return v;
  }
  static Value object(Kind k = Object) {
    Value v; v.kind = k; v.depth = 1; v.obj = std::make_shared<std::vector<std::pair<std::string, Value>>>();
    if (k == Namespace && g_render) g_render->namespaces.push_back(v.obj);
    return v;
  }
  static Value function(Fn f) { Value v; v.kind = Function; v.fn = std::make_shared<Fn>(std::move(f)); return v; }

  bool is_array() const { return kind == Array || kind == Tuple; }
  bool is_object() const { return kind == Object || kind == KwArgs; }
  bool is_container() const { return is_object() || kind == Namespace; }
  bool is_number() const { return kind == Int || kind == Float; }
  const Value* get(const std::string& k) const {
    for (auto& [key, v] : *obj)
      if (key == k) return &v;
    return nullptr;
  }
  void set(const std::string& k, Value v) {
    depth = std::max(depth, v.depth + 1);
    check_depth(depth);
    if (obj->size() >= kMaxArrayItems) jfail("a dict above the limit of " + std::to_string(kMaxArrayItems) + " items");
    for (auto& [key, old] : *obj)
      if (key == k) {
        old = std::move(v);
        return;
      }
    obj->emplace_back(k, std::move(v));
  }
  bool truthy() const {
    switch (kind) {
      case Undefined: case Null: return false;
      case Bool: return b;
      case Int: case Float: return num != 0 && !std::isnan(num);
      case Str: return !s.empty();
      case Array: case Tuple: return !arr->empty();
      case Object: case KwArgs: return !obj->empty();
      default: return true;
    }
  }
  const char* type_name() const {
    static const char* names[] = {"UndefinedValue", "NullValue", "BooleanValue", "IntegerValue", "FloatValue",
                                  "StringValue", "ArrayValue", "TupleValue", "ObjectValue", "KeywordArgumentsValue",
                                  "NamespaceValue", "FunctionValue"};
    return names[kind];
  }
};

struct JsonOpts {
  int indent = 0;
  bool ascii = false, sort_keys = false, has_seps = false;
  std::string item_sep, key_sep;
};

std::string to_json(const Value& v, const JsonOpts& o, int depth, bool undef_null) {
  // Namespaces can contain themselves (ns.x = ns): the depth bound also ends such cycles.
  if (depth > kMaxValueDepth)
    jfail("value nests deeper than " + std::to_string(kMaxValueDepth) + " levels (a namespace that contains itself?)");
  std::string item_sep = o.has_seps ? o.item_sep : o.indent ? "," : ", ";
  std::string key_sep = o.has_seps ? o.key_sep : ": ";
  switch (v.kind) {
    case Value::Null: return "null";
    case Value::Undefined: return undef_null ? "null" : "undefined";
    case Value::Int: case Value::Float: return js_number(v.num);
    case Value::Bool: return v.b ? "true" : "false";
    case Value::Str: return json_quote(v.s, o.ascii);
    case Value::Array: case Value::Tuple: case Value::Object: case Value::KwArgs: case Value::Namespace: {
      const std::string ind(size_t(o.indent), ' ');
      std::string base = "\n";
      for (int d = 0; d < depth; ++d) base += ind;
      const std::string child = base + ind;
      std::vector<std::string> core;
      if (v.is_array()) {
        size_t total = 0;
        for (auto& x : *v.arr) {
          core.push_back(to_json(x, o, depth + 1, undef_null));
          total += core.back().size() + child.size();
          if (total > kMaxStringBytes)
            jfail("JSON text above the limit of " + std::to_string(kMaxStringBytes) + " bytes");
        }
        std::string r = "[";
        if (o.indent && !core.empty()) {
          r += child;
          for (size_t i = 0; i < core.size(); ++i) r += (i ? item_sep + child : "") + core[i];
          return r + base + "]";
        }
        for (size_t i = 0; i < core.size(); ++i) r += (i ? item_sep : "") + core[i];
        return r + "]";
      }
      auto entries = *v.obj;
      if (o.sort_keys)
        std::stable_sort(entries.begin(), entries.end(), [](auto& a, auto& b) { return a.first < b.first; });
      size_t total = 0;
      for (auto& [k, x] : entries) {
        std::string e = json_quote(k, o.ascii) + key_sep + to_json(x, o, depth + 1, undef_null);
        total += e.size() + child.size();
        if (total > kMaxStringBytes) jfail("JSON text above the limit of " + std::to_string(kMaxStringBytes) + " bytes");
        core.push_back(o.indent ? child + e : e);
      }
      std::string r = "{";
      for (size_t i = 0; i < core.size(); ++i) r += (i ? item_sep : "") + core[i];
      return r + (o.indent && !core.empty() ? base : "") + "}";
    }
    default: jfail(std::string("cannot convert to JSON: ") + v.type_name());
  }
}

std::string to_string(const Value& v) {
  switch (v.kind) {
    case Value::Str: return v.s;
    case Value::Int: return js_number(v.num);
    case Value::Float:
      if (v.num == 0 && std::signbit(v.num)) return "-0.0";
      if (std::floor(v.num) == v.num && std::isfinite(v.num)) {
        char buf[64];
        std::snprintf(buf, sizeof buf, "%.1f", v.num);
        return buf;
      }
      return js_number(v.num);
    case Value::Bool: return v.b ? "true" : "false";
    case Value::Null: return "null";
    case Value::Undefined: return "undefined";
    case Value::Function: return "[function]";
    default: return to_json(v, JsonOpts{}, 0, false);
  }
}

Value from_json(const ojson& j) {
  switch (j.type()) {
    case ojson::value_t::null: return Value::null();
    case ojson::value_t::boolean: return Value::boolean(j.get<bool>());
    case ojson::value_t::number_integer:
    case ojson::value_t::number_unsigned: return Value::integer(j.get<double>());
    case ojson::value_t::number_float: {
      const double d = j.get<double>();
      return std::floor(d) == d && std::isfinite(d) ? Value::integer(d) : Value::floating(d);
    }
    case ojson::value_t::string: return Value::str(j.get<std::string>());
    case ojson::value_t::array: {
      std::vector<Value> a;
      for (auto& x : j) a.push_back(from_json(x));
      return Value::array(std::move(a));
    }
    case ojson::value_t::object: {
      Value o = Value::object();
      for (auto it = j.begin(); it != j.end(); ++it) o.set(it.key(), from_json(it.value()));
      return o;
    }
    default: return Value::undef();
  }
}

// JavaScript loose equality (==) on the reference's `.value`s.
bool loose_eq(const Value& a, const Value& b) {
  auto nullish = [](const Value& v) { return v.kind == Value::Null || v.kind == Value::Undefined; };
  if (nullish(a) || nullish(b)) return nullish(a) && nullish(b);
  auto numeric = [](const Value& v, double* out) {
    if (v.is_number()) *out = v.num;
    else if (v.kind == Value::Bool) *out = v.b;
    else if (v.kind == Value::Str) {
      const std::string t = trim(v.s);
      if (t.empty()) *out = 0;
      else {
        char* end;
        *out = std::strtod(t.c_str(), &end);
        if (*end) *out = NAN;
      }
    } else return false;
    return true;
  };
  if (a.kind == Value::Str && b.kind == Value::Str) return a.s == b.s;
  double x, y;
  if (numeric(a, &x) && numeric(b, &y) && !(a.kind == Value::Str && b.kind == Value::Str)) return x == y;
  if (a.arr && b.arr) return a.arr == b.arr;
  if (a.obj && b.obj) return a.obj == b.obj;
  if (a.fn && b.fn) return a.fn == b.fn;
  return false;
}
bool strict_eq(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) return a.num == b.num;
  if (a.kind != b.kind) return false;
  return loose_eq(a, b);
}

int compare_values(const Value& a, const Value& b, bool case_sensitive) {
  if (a.is_number() && b.is_number()) return a.num < b.num ? -1 : a.num > b.num ? 1 : 0;
  if (a.kind == Value::Bool && b.kind == Value::Bool) return int(a.b) - int(b.b);
  if (a.kind == Value::Str && b.kind == Value::Str) {
    std::string x = a.s, y = b.s;
    if (!case_sensitive) {
      for (auto& c : x) c = char(std::tolower((unsigned char)c));
      for (auto& c : y) c = char(std::tolower((unsigned char)c));
    }
    return x < y ? -1 : x > y ? 1 : 0;
  }
  jfail(std::string("cannot compare ") + a.type_name() + " with " + b.type_name());
}

// ---------------------------------------------------------------- environment

struct Env {
  std::unordered_map<std::string, Value> vars;
  Env* parent = nullptr;
  explicit Env(Env* p = nullptr) : parent(p) {}
  Value lookup(const std::string& name) const {
    for (const Env* e = this; e; e = e->parent) {
      auto it = e->vars.find(name);
      if (it != e->vars.end()) return it->second;
    }
    return Value::undef();
  }
  void set(const std::string& name, Value v) { vars[name] = std::move(v); }
};

struct BreakSignal {};
struct ContinueSignal {};

// ---------------------------------------------------------------- lexer

enum class Tok {
  Text, Number, String, Ident, Equals, LParen, RParen, OpenStmt, CloseStmt, OpenExpr, CloseExpr, LBracket, RBracket,
  LBrace, RBrace, Comma, Dot, Colon, Pipe, Add, Mul, Pow, Cmp, Unary, Comment
};
struct Token {
  Tok type;
  std::string v;
  int line;
};

std::string preprocess(std::string t) {
  if (!t.empty() && t.back() == '\n') t.pop_back();
  // lstrip_blocks: /^[ \t]*({[#%-])/gm -> "$1" (line starts: after \n, \r, U+2028, U+2029).
  std::string r;
  r.reserve(t.size());
  size_t i = 0;
  auto at_line_start = [&](size_t p) {
    if (p == 0) return true;
    const char c = t[p - 1];
    if (c == '\n' || c == '\r') return true;
    return p >= 3 && t.compare(p - 3, 3, "\xE2\x80\xA8") == 0 ? true : p >= 3 && t.compare(p - 3, 3, "\xE2\x80\xA9") == 0;
  };
  while (i < t.size()) {
    if (at_line_start(i)) {
      size_t j = i;
      while (j < t.size() && (t[j] == ' ' || t[j] == '\t')) ++j;
      if (j > i && j + 1 < t.size() && t[j] == '{' && (t[j + 1] == '#' || t[j + 1] == '%' || t[j + 1] == '-')) i = j;
    }
    r += t[i++];
    // (the character copied can itself begin a line for the next position)
  }
  // trim_blocks: /([#%-]})\n/g -> "$1"
  std::string out;
  out.reserve(r.size());
  for (size_t k = 0; k < r.size(); ++k) {
    out += r[k];
    if (r[k] == '}' && k > 0 && (r[k - 1] == '#' || r[k - 1] == '%' || r[k - 1] == '-') && k + 1 < r.size() &&
        r[k + 1] == '\n')
      ++k;
  }
  return out;
}

std::vector<Token> tokenize(const std::string& source) {
  const std::string src = preprocess(source);
  std::vector<Token> toks;
  size_t pos = 0;
  int depth = 0;
  // Line of byte p; positions mostly only grow, so counting resumes where the last call stopped
  // (counting from the start each time made long templates quadratic).
  size_t counted_to = 0;
  int counted_lines = 1;
  auto line_at = [&](size_t p) {
    p = std::min(p, src.size());
    if (p < counted_to) return 1 + int(std::count(src.begin(), src.begin() + long(p), '\n'));
    counted_lines += int(std::count(src.begin() + long(counted_to), src.begin() + long(p), '\n'));
    counted_to = p;
    return counted_lines;
  };
  auto fail = [&](const std::string& m) { jfail("line " + std::to_string(line_at(pos)) + ": " + m); };
  auto push = [&](Tok t, std::string v) { toks.push_back(Token{t, std::move(v), line_at(pos)}); };
  auto is_ws = [&](size_t p) {
    if (p >= src.size()) return false;
    size_t q = p;
    return js_space(utf8_next(src, q));
  };
  auto skip_ws = [&] {
    while (pos < src.size() && is_ws(pos)) {
      size_t q = pos;
      utf8_next(src, q);
      pos = q;
    }
  };
  auto strip_trailing = [&] {
    if (!toks.empty() && toks.back().type == Tok::Text) {
      toks.back().v = trim_end(toks.back().v);
      if (toks.back().v.empty()) toks.pop_back();
    }
  };
  auto read_string = [&](char quote) {
    std::string s;
    while (true) {
      if (pos >= src.size()) fail("unterminated string literal");
      char c = src[pos];
      if (c == quote) break;
      if (c == '\\') {
        ++pos;
        if (pos >= src.size()) fail("unexpected end of input");
        const char e = src[pos++];
        switch (e) {
          case 'n': s += '\n'; break;
          case 't': s += '\t'; break;
          case 'r': s += '\r'; break;
          case 'b': s += '\b'; break;
          case 'f': s += '\f'; break;
          case 'v': s += '\v'; break;
          case '\'': s += '\''; break;
          case '"': s += '"'; break;
          case '\\': s += '\\'; break;
          case 'x': case 'u': {
            const size_t n = e == 'x' ? 2 : 4;
            if (pos + n > src.size()) fail("invalid hexadecimal escape");
            uint32_t v = 0;
            for (size_t k = 0; k < n; ++k) {
              const char h = src[pos + k];
              if (!std::isxdigit((unsigned char)h)) fail("invalid hexadecimal escape");
              v = v * 16 + uint32_t(std::isdigit((unsigned char)h) ? h - '0' : std::tolower(h) - 'a' + 10);
            }
            pos += n;
            utf8_append(s, v);
            break;
          }
          default: fail(std::string("unexpected escaped character: ") + e);
        }
        continue;
      }
      s += c;
      ++pos;
    }
    ++pos;
    return s;
  };
  static const std::pair<const char*, Tok> table[] = {
      {"{%", Tok::OpenStmt}, {"%}", Tok::CloseStmt}, {"{{", Tok::OpenExpr}, {"}}", Tok::CloseExpr},
      {"(", Tok::LParen}, {")", Tok::RParen}, {"{", Tok::LBrace}, {"}", Tok::RBrace}, {"[", Tok::LBracket},
      {"]", Tok::RBracket}, {",", Tok::Comma}, {".", Tok::Dot}, {":", Tok::Colon}, {"|", Tok::Pipe},
      {"<=", Tok::Cmp}, {">=", Tok::Cmp}, {"==", Tok::Cmp}, {"!=", Tok::Cmp}, {"<", Tok::Cmp}, {">", Tok::Cmp},
      {"+", Tok::Add}, {"-", Tok::Add}, {"~", Tok::Add}, {"**", Tok::Pow}, {"*", Tok::Mul}, {"//", Tok::Mul},
      {"/", Tok::Mul}, {"%", Tok::Mul}, {"=", Tok::Equals}};
  while (pos < src.size()) {
    const Tok last = toks.empty() ? Tok::CloseStmt : toks.back().type;
    if (toks.empty() || last == Tok::CloseStmt || last == Tok::CloseExpr || last == Tok::Comment) {
      size_t start = pos;
      while (pos < src.size() && !(src[pos] == '{' && pos + 1 < src.size() &&
                                   (src[pos + 1] == '%' || src[pos + 1] == '{' || src[pos + 1] == '#')))
        ++pos;
      if (pos > start) {
        toks.push_back(Token{Tok::Text, src.substr(start, pos - start), line_at(start)});
        continue;
      }
    }
    if (src.compare(pos, 2, "{#") == 0) {
      pos += 2;
      const bool strip_before = pos < src.size() && src[pos] == '-';
      if (strip_before) ++pos;
      const size_t end = src.find("#}", pos);
      if (end == std::string::npos) fail("missing end of comment tag");
      std::string comment = src.substr(pos, end - pos);
      const bool strip_after = !comment.empty() && comment.back() == '-';
      if (strip_before) strip_trailing();
      push(Tok::Comment, comment);
      pos = end + 2;
      if (strip_after) skip_ws();
      continue;
    }
    if (src.compare(pos, 3, "{%-") == 0) {
      strip_trailing();
      push(Tok::OpenStmt, "{%");
      pos += 3;
      continue;
    }
    if (src.compare(pos, 3, "{{-") == 0) {
      strip_trailing();
      push(Tok::OpenExpr, "{{");
      depth = 0;
      pos += 3;
      continue;
    }
    skip_ws();
    if (pos >= src.size()) break;
    if (src.compare(pos, 3, "-%}") == 0) {
      push(Tok::CloseStmt, "%}");
      pos += 3;
      skip_ws();
      continue;
    }
    if (src.compare(pos, 3, "-}}") == 0) {
      push(Tok::CloseExpr, "}}");
      pos += 3;
      skip_ws();
      continue;
    }
    const char c = src[pos];
    if (c == '-' || c == '+') {
      if (toks.empty() || toks.back().type == Tok::Text) fail(std::string("unexpected character: ") + c);
      const Tok lt = toks.back().type;
      if (!(lt == Tok::Ident || lt == Tok::Number || lt == Tok::String || lt == Tok::RParen || lt == Tok::RBracket)) {
        ++pos;
        std::string num;
        while (pos < src.size() && std::isdigit((unsigned char)src[pos])) num += src[pos++];
        if (!num.empty() && pos + 1 < src.size() && src[pos] == '.' && std::isdigit((unsigned char)src[pos + 1])) {
          ++pos;
          num += '.';
          while (pos < src.size() && std::isdigit((unsigned char)src[pos])) num += src[pos++];
        }
        push(num.empty() ? Tok::Unary : Tok::Number, std::string(1, c) + num);
        continue;
      }
    }
    bool matched = false;
    for (auto& [seq, type] : table) {
      const size_t n = std::strlen(seq);
      if (type == Tok::CloseExpr && depth > 0) continue;
      if (src.compare(pos, n, seq) == 0) {
        push(type, seq);
        if (type == Tok::OpenExpr) depth = 0;
        else if (type == Tok::LBrace) ++depth;
        else if (type == Tok::RBrace) --depth;
        pos += n;
        matched = true;
        break;
      }
    }
    if (matched) continue;
    if (c == '\'' || c == '"') {
      ++pos;
      push(Tok::String, read_string(c));
      continue;
    }
    if (std::isdigit((unsigned char)c)) {
      std::string num;
      while (pos < src.size() && std::isdigit((unsigned char)src[pos])) num += src[pos++];
      if ((toks.empty() || toks.back().type != Tok::Dot) && pos + 1 < src.size() && src[pos] == '.' &&
          std::isdigit((unsigned char)src[pos + 1])) {
        ++pos;
        num += '.';
        while (pos < src.size() && std::isdigit((unsigned char)src[pos])) num += src[pos++];
      }
      push(Tok::Number, num);
      continue;
    }
    if (is_word(c)) {
      std::string w;
      while (pos < src.size() && is_word(src[pos])) w += src[pos++];
      push(Tok::Ident, w);
      continue;
    }
    fail(std::string("unexpected character: '") + c + "'");
  }
  return toks;
}

}  // namespace

// ---------------------------------------------------------------- AST

struct JinjaTemplate::Node {
  enum Kind {
    Program, Text, Output, If, For, Set, Macro, Break, Continue, Comment,
    // expressions
    IntLit, FloatLit, StrLit, ArrayLit, TupleLit, ObjectLit, Ident, Member, Slice, Call, Unary, Binary, Filter,
    Test, Select, Ternary, KwArg
  } kind;
  std::string str;  // Text, StrLit, Ident, operator names, test/filter names, KwArg key
  double num = 0;
  bool flag = false;  // Member: computed; Test: negate
  int line = 0;
  std::vector<std::shared_ptr<Node>> a, b, c;  // children lists (body/alternate/args ...)
  std::shared_ptr<Node> x, y, z;                // operands

  Node() = default;
  Node(const Node&) = delete;
  Node& operator=(const Node&) = delete;
  // Iterative: a long chain (a+a+...+a parses left-deep) must not recurse once per level.
  ~Node() {
    std::vector<std::shared_ptr<Node>> doomed;
    take_children(&doomed);
    while (!doomed.empty()) {
      std::shared_ptr<Node> n = std::move(doomed.back());
      doomed.pop_back();
      if (n && n.use_count() == 1) n->take_children(&doomed);
    }
  }
  void take_children(std::vector<std::shared_ptr<Node>>* out) {
    for (auto* v : {&a, &b, &c}) {
      for (auto& k : *v) out->push_back(std::move(k));
      v->clear();
    }
    for (auto* p : {&x, &y, &z}) out->push_back(std::move(*p));
  }
};

namespace {

using Node = JinjaTemplate::Node;
using NodeP = std::shared_ptr<Node>;

NodeP mk(Node::Kind k, int line) {
  auto n = std::make_shared<Node>();
  n->kind = k;
  n->line = line;
  return n;
}

// The depth of a parsed tree, iteratively (chains such as a+b+c+... are deep without any parser
// recursion); throws beyond kMaxAstDepth.
void check_ast_depth(const NodeP& root) {
  std::vector<std::pair<const Node*, int>> stack{{root.get(), 1}};
  while (!stack.empty()) {
    auto [n, d] = stack.back();
    stack.pop_back();
    if (d > kMaxAstDepth)
      jfail("line " + std::to_string(n->line) + ": the template nests deeper than " + std::to_string(kMaxAstDepth) +
            " levels (limit)");
    for (auto* v : {&n->a, &n->b, &n->c})
      for (auto& k : *v)
        if (k) stack.emplace_back(k.get(), d + 1);
    for (auto* p : {&n->x, &n->y, &n->z})
      if (*p) stack.emplace_back(p->get(), d + 1);
  }
}

class Parser {
 public:
  explicit Parser(std::vector<Token> t) : t_(std::move(t)) {}

  NodeP program() {
    auto p = mk(Node::Program, 1);
    while (i_ < t_.size()) p->a.push_back(any());
    check_ast_depth(p);
    return p;
  }

 private:
  [[noreturn]] void fail(const std::string& m) const {
    const int line = i_ < t_.size() ? t_[i_].line : t_.empty() ? 1 : t_.back().line;
    jfail("line " + std::to_string(line) + ": " + m);
  }
  bool is(Tok k) const { return i_ < t_.size() && t_[i_].type == k; }
  bool is_ident(const char* w, size_t off = 0) const {
    return i_ + off < t_.size() && t_[i_ + off].type == Tok::Ident && t_[i_ + off].v == w;
  }
  bool is_stmt(std::initializer_list<const char*> names) const {
    if (!(is(Tok::OpenStmt) && i_ + 1 < t_.size() && t_[i_ + 1].type == Tok::Ident)) return false;
    for (auto n : names)
      if (t_[i_ + 1].v == n) return true;
    return false;
  }
  void expect(Tok k, const std::string& what) {
    if (!is(k)) fail("expected " + what + (i_ < t_.size() ? ", got '" + t_[i_].v + "'" : ", got end of template"));
    ++i_;
  }
  int line() const { return i_ < t_.size() ? t_[i_].line : 0; }

  NodeP any() {
    Nest nest(*this);
    if (i_ >= t_.size()) fail("unexpected end of template (missing end tag?)");
    const Token& k = t_[i_];
    switch (k.type) {
      case Tok::Comment: {
        ++i_;
        return mk(Node::Comment, k.line);
      }
      case Tok::Text: {
        auto n = mk(Node::Text, k.line);
        n->str = k.v;
        ++i_;
        return n;
      }
      case Tok::OpenStmt: return statement();
      case Tok::OpenExpr: {
        ++i_;
        auto n = mk(Node::Output, k.line);
        n->x = expression();
        expect(Tok::CloseExpr, "'}}'");
        return n;
      }
      default: fail("unexpected token '" + k.v + "'");
    }
  }

  std::vector<NodeP> body_until(std::initializer_list<const char*> ends) {
    std::vector<NodeP> body;
    while (!is_stmt(ends)) {
      if (i_ >= t_.size()) {
        std::string names;
        for (auto e : ends) names += std::string(names.empty() ? "" : " or ") + "{% " + e + " %}";
        fail("missing " + names);
      }
      body.push_back(any());
    }
    return body;
  }

  NodeP statement() {
    const int ln = line();
    expect(Tok::OpenStmt, "'{%'");
    if (!is(Tok::Ident)) fail("expected a statement name");
    const std::string name = t_[i_++].v;
    if (name == "set") {
      auto n = mk(Node::Set, ln);
      n->x = expression_sequence(false);
      if (is(Tok::Equals)) {
        ++i_;
        n->y = expression_sequence(false);
        expect(Tok::CloseStmt, "'%}'");
      } else {
        expect(Tok::CloseStmt, "'%}'");
        n->a = body_until({"endset"});
        i_ += 2;
        expect(Tok::CloseStmt, "'%}'");
      }
      return n;
    }
    if (name == "if") return if_statement(ln);
    if (name == "for") {
      auto n = mk(Node::For, ln);
      n->x = expression_sequence(true);
      if (n->x->kind != Node::Ident && n->x->kind != Node::TupleLit) fail("expected a loop variable");
      if (!is_ident("in")) fail("expected 'in' after the loop variable");
      ++i_;
      n->y = expression();
      expect(Tok::CloseStmt, "'%}'");
      n->a = body_until({"endfor", "else"});
      if (is_stmt({"else"})) {
        i_ += 2;
        expect(Tok::CloseStmt, "'%}'");
        n->b = body_until({"endfor"});
      }
      i_ += 2;
      expect(Tok::CloseStmt, "'%}'");
      return n;
    }
    if (name == "macro") {
      auto n = mk(Node::Macro, ln);
      if (!is(Tok::Ident)) fail("expected a macro name");
      n->str = t_[i_++].v;
      expect(Tok::LParen, "'(' after the macro name");
      n->c = args_list();
      expect(Tok::CloseStmt, "'%}'");
      n->a = body_until({"endmacro"});
      i_ += 2;
      expect(Tok::CloseStmt, "'%}'");
      return n;
    }
    if (name == "break" || name == "continue") {
      expect(Tok::CloseStmt, "'%}'");
      return mk(name == "break" ? Node::Break : Node::Continue, ln);
    }
    fail("unsupported statement '{% " + name + " %}'");
  }

  NodeP if_statement(int ln) {
    Nest nest(*this);
    auto n = mk(Node::If, ln);
    n->x = expression();
    expect(Tok::CloseStmt, "'%}'");
    n->a = body_until({"elif", "else", "endif"});
    if (is_stmt({"elif"})) {
      const int l2 = line();
      i_ += 2;
      n->b.push_back(if_statement(l2));
      return n;  // the nested if consumed {% endif %}
    }
    if (is_stmt({"else"})) {
      i_ += 2;
      expect(Tok::CloseStmt, "'%}'");
      n->b = body_until({"endif"});
    }
    i_ += 2;
    expect(Tok::CloseStmt, "'%}'");
    return n;
  }

  NodeP expression_sequence(bool primary) {
    auto first = primary ? primary_expr() : expression();
    if (!is(Tok::Comma)) return first;
    auto t = mk(Node::TupleLit, first->line);
    t->a.push_back(first);
    while (is(Tok::Comma)) {
      ++i_;
      t->a.push_back(primary ? primary_expr() : expression());
    }
    return t;
  }

  NodeP expression() {
    Nest nest(*this);
    auto a = or_expr();
    if (is_ident("if")) {
      ++i_;
      auto test = or_expr();
      if (is_ident("else")) {
        ++i_;
        auto n = mk(Node::Ternary, a->line);
        n->x = test;
        n->y = a;
        n->z = expression();
        return n;
      }
      auto n = mk(Node::Select, a->line);
      n->x = a;
      n->y = test;
      return n;
    }
    return a;
  }
  NodeP binary(const std::string& op, NodeP l, NodeP r) {
    auto n = mk(Node::Binary, l->line);
    n->str = op;
    n->x = l;
    n->y = r;
    return n;
  }
  NodeP or_expr() {
    auto l = and_expr();
    while (is_ident("or")) {
      ++i_;
      l = binary("or", l, and_expr());
    }
    return l;
  }
  NodeP and_expr() {
    auto l = not_expr();
    while (is_ident("and")) {
      ++i_;
      l = binary("and", l, not_expr());
    }
    return l;
  }
  NodeP not_expr() {
    Nest nest(*this);
    if (is_ident("not")) {
      const int ln = line();
      ++i_;
      auto n = mk(Node::Unary, ln);
      n->str = "not";
      n->x = not_expr();
      return n;
    }
    return cmp_expr();
  }
  NodeP cmp_expr() {
    auto l = add_expr();
    for (;;) {
      std::string op;
      if (is_ident("not") && is_ident("in", 1)) {
        op = "not in";
        i_ += 2;
      } else if (is_ident("in")) {
        op = "in";
        ++i_;
      } else if (is(Tok::Cmp)) {
        op = t_[i_++].v;
      } else {
        break;
      }
      l = binary(op, l, add_expr());
    }
    return l;
  }
  NodeP add_expr() {
    auto l = mul_expr();
    while (is(Tok::Add)) {
      const std::string op = t_[i_++].v;
      l = binary(op, l, mul_expr());
    }
    return l;
  }
  NodeP mul_expr() {
    auto l = pow_expr();
    while (is(Tok::Mul)) {
      const std::string op = t_[i_++].v;
      l = binary(op, l, pow_expr());
    }
    return l;
  }
  NodeP pow_expr() {
    auto l = test_expr();
    while (is(Tok::Pow)) {
      ++i_;
      l = binary("**", l, test_expr());
    }
    return l;
  }
  NodeP test_expr() {
    auto operand = filter_expr();
    while (is_ident("is")) {
      ++i_;
      const bool negate = is_ident("not");
      if (negate) ++i_;
      auto t = primary_expr();
      if (t->kind != Node::Ident) fail("expected a test name after 'is'");
      auto n = mk(Node::Test, operand->line);
      n->x = operand;
      n->str = t->str;
      n->flag = negate;
      operand = n;
    }
    return operand;
  }
  NodeP filter_expr() {
    auto operand = unary_expr();
    while (is(Tok::Pipe)) {
      ++i_;
      auto f = primary_expr();
      if (f->kind != Node::Ident) fail("expected a filter name after '|'");
      auto n = mk(Node::Filter, operand->line);
      n->x = operand;
      n->str = f->str;
      if (is(Tok::LParen)) {
        ++i_;
        n->a = args_list();
        n->flag = true;  // called with arguments
      }
      operand = n;
    }
    return operand;
  }
  NodeP unary_expr() {
    Nest nest(*this);
    if ((is(Tok::Unary) || is(Tok::Add)) && (t_[i_].v == "-" || t_[i_].v == "+")) {
      auto n = mk(Node::Unary, line());
      n->str = t_[i_++].v;
      n->x = unary_expr();
      return n;
    }
    return call_member_expr();
  }
  NodeP call_member_expr() {
    auto m = member_expr(primary_expr());
    if (is(Tok::LParen)) return call_expr(m);
    return m;
  }
  NodeP call_expr(NodeP callee) {
    Nest nest(*this);
    ++i_;  // (
    auto n = mk(Node::Call, callee->line);
    n->x = callee;
    n->a = args_list();
    n = member_expr(n);
    if (is(Tok::LParen)) return call_expr(n);
    return n;
  }
  // After '(' : arguments up to ')'.
  std::vector<NodeP> args_list() {
    std::vector<NodeP> args;
    while (!is(Tok::RParen)) {
      if (i_ >= t_.size()) fail("missing ')'");
      if (is(Tok::Mul) || is(Tok::Pow)) fail("argument unpacking (* / **) is not supported");
      NodeP arg = expression();
      if (is(Tok::Equals)) {
        ++i_;
        if (arg->kind != Node::Ident) fail("expected an identifier before '=' in arguments");
        auto kw = mk(Node::KwArg, arg->line);
        kw->str = arg->str;
        kw->x = expression();
        arg = kw;
      }
      args.push_back(arg);
      if (is(Tok::Comma)) ++i_;
    }
    ++i_;
    return args;
  }
  NodeP member_expr(NodeP object) {
    while (is(Tok::Dot) || is(Tok::LBracket)) {
      const bool computed = is(Tok::LBracket);
      ++i_;
      auto n = mk(Node::Member, object->line);
      n->x = object;
      n->flag = computed;
      if (computed) {
        std::vector<NodeP> parts;
        bool slice = false;
        while (!is(Tok::RBracket)) {
          if (i_ >= t_.size()) fail("missing ']'");
          if (is(Tok::Colon)) {
            parts.push_back(nullptr);
            ++i_;
            slice = true;
          } else {
            parts.push_back(expression());
            if (is(Tok::Colon)) {
              ++i_;
              slice = true;
            }
          }
        }
        if (parts.empty()) fail("expected an index or slice in []");
        if (slice) {
          if (parts.size() > 3) fail("a slice takes at most 3 parts");
          auto s = mk(Node::Slice, object->line);
          parts.resize(3);
          s->x = parts[0], s->y = parts[1], s->z = parts[2];
          n->y = s;
        } else {
          n->y = parts[0];
        }
        expect(Tok::RBracket, "']'");
      } else {
        auto p = primary_expr();
        if (p->kind != Node::Ident && p->kind != Node::IntLit) fail("expected a name after '.'");
        n->y = p;
      }
      object = n;
    }
    return object;
  }
  NodeP primary_expr() {
    if (i_ >= t_.size()) fail("unexpected end of template in an expression");
    const Token k = t_[i_++];
    switch (k.type) {
      case Tok::Number: {
        auto n = mk(k.v.find('.') != std::string::npos ? Node::FloatLit : Node::IntLit, k.line);
        n->num = std::strtod(k.v.c_str(), nullptr);
        return n;
      }
      case Tok::String: {
        auto n = mk(Node::StrLit, k.line);
        n->str = k.v;
        while (is(Tok::String)) n->str += t_[i_++].v;
        return n;
      }
      case Tok::Ident: {
        auto n = mk(Node::Ident, k.line);
        n->str = k.v;
        return n;
      }
      case Tok::LParen: {
        auto e = expression_sequence(false);
        expect(Tok::RParen, "')'");
        return e;
      }
      case Tok::LBracket: {
        auto n = mk(Node::ArrayLit, k.line);
        while (!is(Tok::RBracket)) {
          if (i_ >= t_.size()) fail("missing ']'");
          n->a.push_back(expression());
          if (is(Tok::Comma)) ++i_;
        }
        ++i_;
        return n;
      }
      case Tok::LBrace: {
        auto n = mk(Node::ObjectLit, k.line);
        while (!is(Tok::RBrace)) {
          if (i_ >= t_.size()) fail("missing '}'");
          n->a.push_back(expression());
          expect(Tok::Colon, "':' in a dict literal");
          n->b.push_back(expression());
          if (is(Tok::Comma)) ++i_;
        }
        ++i_;
        return n;
      }
      default: fail("unexpected token '" + k.v + "' in an expression");
    }
  }

  // Counts the recursion of the parse functions that can nest (kMaxParseNesting).
  struct Nest {
    Parser& p;
    explicit Nest(Parser& parser) : p(parser) {
      if (++p.nesting_ > kMaxParseNesting)
        p.fail("expressions or blocks nest deeper than " + std::to_string(kMaxParseNesting) + " levels (limit)");
    }
    ~Nest() { --p.nesting_; }
  };

  std::vector<Token> t_;
  size_t i_ = 0;
  int nesting_ = 0;
};

// ---------------------------------------------------------------- interpreter

class Interp {
 public:
  Value eval(const NodeP& n, Env& env);
  std::string block(const std::vector<NodeP>& body, Env& env) {
    std::string out;
    for (auto& s : body) {
      Value v = eval(s, env);
      if (v.kind != Value::Null && v.kind != Value::Undefined) out += to_string(v);
      if (out.size() > kMaxStringBytes)
        fail(s, "output above the limit of " + std::to_string(kMaxStringBytes) + " bytes");
    }
    return out;
  }

 private:
  [[noreturn]] void fail(const NodeP& n, const std::string& m) { jfail("line " + std::to_string(n->line) + ": " + m); }
  void eval_args(const std::vector<NodeP>& args, Env& env, Args* pos, Value* kw) {
    *kw = Value::object(Value::KwArgs);
    for (auto& a : args) {
      if (a->kind == Node::KwArg) {
        if (kw->get(a->str)) fail(a, "got multiple values for keyword argument '" + a->str + "'");
        kw->set(a->str, eval(a->x, env));
      } else {
        pos->push_back(eval(a, env));
      }
    }
  }
  Value member(const NodeP& n, Env& env);
  Value binary(const NodeP& n, Env& env);
  Value filter(const NodeP& n, Env& env);
  Value test(const NodeP& n, Env& env);
  Value builtin(const Value& obj, const std::string& name);
  Value for_loop(const NodeP& n, Env& env);
  void assign(const NodeP& target, const Value& v, Env& env);
};

Value slice_of(const Value& obj, const Value& start, const Value& stop, const Value& step) {
  auto opt = [](const Value& v, const char* what) -> std::optional<long> {
    if (v.kind == Value::Undefined) return std::nullopt;
    if (v.kind != Value::Int) jfail(std::string("slice ") + what + " must be an integer");
    return long(v.num);
  };
  std::vector<Value> items;
  std::vector<std::string> chars;
  long len;
  if (obj.is_array()) len = long(obj.arr->size());
  else if (obj.kind == Value::Str) chars = code_points(obj.s), len = long(chars.size());
  else jfail("slice object must be an array or string");
  auto st = opt(start, "start"), sp = opt(stop, "stop"), se = opt(step, "step");
  const long stepv = se.value_or(1);
  if (stepv == 0) jfail("slice step cannot be zero");
  long b, e;
  if (stepv > 0) {
    b = st.value_or(0);
    b = b < 0 ? std::max(len + b, 0L) : std::min(b, len);
    e = sp.value_or(len);
    e = e < 0 ? std::max(len + e, 0L) : std::min(e, len);
  } else {
    b = st.value_or(len - 1);
    b = b < 0 ? std::max(len + b, -1L) : std::min(b, len - 1);
    e = sp.value_or(-1);
    e = e < -1 ? std::max(len + e, -1L) : std::min(e, len - 1);
  }
  const long dir = stepv > 0 ? 1 : -1;
  if (obj.is_array()) {
    for (long i = b; dir * i < dir * e; i += stepv) items.push_back((*obj.arr)[size_t(i)]);
    return Value::array(std::move(items));
  }
  std::string s;
  for (long i = b; dir * i < dir * e; i += stepv) s += chars[size_t(i)];
  return Value::str(s);
}

std::string py_replace(const std::string& s, const std::string& from, const std::string& to, long count) {
  if (count == 0) return s;
  std::string r;
  if (from.empty()) {
    // JavaScript/Python: insert `to` before every character and at the end (up to count).
    auto cps = code_points(s);
    long n = 0;
    for (auto& c : cps) {
      if (count < 0 || n < count) r += to, ++n;
      r += c;
    }
    if (count < 0 || n < count) r += to;
    return r;
  }
  size_t prev = 0;
  long n = 0;
  for (size_t at = s.find(from); at != std::string::npos && (count < 0 || n < count); at = s.find(from, prev)) {
    r.append(s, prev, at - prev);
    r += to;
    prev = at + from.size();
    ++n;
  }
  r.append(s, prev);
  return r;
}

std::string ascii_case(std::string s, bool upper) {
  for (auto& c : s) c = char(upper ? std::toupper((unsigned char)c) : std::tolower((unsigned char)c));
  return s;
}

// The methods of strings and dicts (and `length` of strings and arrays).
Value Interp::builtin(const Value& obj, const std::string& name) {
  if (obj.kind == Value::Str) {
    const std::string s = obj.s;
    auto fn0 = [](std::function<Value()> f) { return Value::function([f](Args&, Env&) { return f(); }); };
    if (name == "upper") return fn0([s] { return Value::str(ascii_case(s, true)); });
    if (name == "lower") return fn0([s] { return Value::str(ascii_case(s, false)); });
    if (name == "strip") return fn0([s] { return Value::str(trim(s)); });
    if (name == "lstrip") return fn0([s] { return Value::str(trim_start(s)); });
    if (name == "rstrip") return fn0([s] { return Value::str(trim_end(s)); });
    if (name == "title")
      return fn0([s] {
        std::string r = s;
        bool prev_word = false;
        for (auto& c : r) {
          const bool w = is_word(c);
          if (w && !prev_word) c = char(std::toupper((unsigned char)c));
          prev_word = w;
        }
        return Value::str(r);
      });
    if (name == "capitalize")
      return fn0([s] {
        std::string r = s;
        if (!r.empty()) r[0] = char(std::toupper((unsigned char)r[0]));
        return Value::str(r);
      });
    if (name == "length") {
      double n = 0;
      for (size_t i = 0; i < s.size();) n += utf8_next(s, i) >= 0x10000 ? 2 : 1;  // UTF-16 units
      return Value::integer(n);
    }
    if (name == "startswith" || name == "endswith") {
      const bool start = name == "startswith";
      return Value::function([s, start, name](Args& a, Env&) {
        if (a.empty()) jfail(name + "() requires at least one argument");
        auto test = [&](const std::string& p) {
          return p.size() <= s.size() && (start ? s.compare(0, p.size(), p) == 0 : s.compare(s.size() - p.size(), p.size(), p) == 0);
        };
        if (a[0].kind == Value::Str) return Value::boolean(test(a[0].s));
        if (a[0].is_array()) {
          for (auto& x : *a[0].arr) {
            if (x.kind != Value::Str) jfail(name + "() tuple elements must be strings");
            if (test(x.s)) return Value::boolean(true);
          }
          return Value::boolean(false);
        }
        jfail(name + "() argument must be a string or tuple of strings");
      });
    }
    if (name == "split")
      return Value::function([s](Args& a, Env&) {
        Value sep = a.size() > 0 ? a[0] : Value::null();
        Value maxv = a.size() > 1 ? a[1] : Value::integer(-1);
        if (sep.kind != Value::Str && sep.kind != Value::Null) jfail("split(): sep must be a string or none");
        if (maxv.kind != Value::Int) jfail("split(): maxsplit must be an integer");
        const long maxsplit = long(maxv.num);
        std::vector<Value> out;
        if (sep.kind == Value::Null) {
          const std::string t = trim_start(s);
          size_t i = 0;
          while (i < t.size()) {
            size_t j = i;
            while (j < t.size()) {  // skip white space
              size_t q = j;
              if (!js_space(utf8_next(t, q))) break;
              j = q;
            }
            if (j >= t.size()) break;
            size_t k = j;
            while (k < t.size()) {
              size_t q = k;
              if (js_space(utf8_next(t, q))) break;
              k = q;
            }
            if (maxsplit != -1 && long(out.size()) >= maxsplit) {
              out.push_back(Value::str(t.substr(j)));
              break;
            }
            out.push_back(Value::str(t.substr(j, k - j)));
            i = k;
          }
        } else {
          if (sep.s.empty()) jfail("split(): empty separator");
          std::vector<std::string> parts;
          size_t prev = 0;
          for (size_t at = s.find(sep.s); at != std::string::npos; at = s.find(sep.s, prev)) {
            parts.push_back(s.substr(prev, at - prev));
            prev = at + sep.s.size();
          }
          parts.push_back(s.substr(prev));
          if (maxsplit != -1 && long(parts.size()) > maxsplit) {
            std::string rest;
            for (size_t k = size_t(maxsplit); k < parts.size(); ++k) rest += (k > size_t(maxsplit) ? sep.s : "") + parts[k];
            parts.resize(size_t(maxsplit));
            parts.push_back(rest);
          }
          for (auto& p : parts) out.push_back(Value::str(p));
        }
        return Value::array(std::move(out));
      });
    if (name == "replace")
      return Value::function([s](Args& a, Env&) {
        if (a.size() < 2) jfail("replace() requires at least two arguments");
        if (a[0].kind != Value::Str || a[1].kind != Value::Str) jfail("replace() arguments must be strings");
        Value count = Value::null();
        if (a.size() > 2) {
          if (a[2].kind == Value::KwArgs) {
            const Value* c = a[2].get("count");
            if (c) count = *c;
          } else {
            count = a[2];
          }
        }
        if (count.kind != Value::Int && count.kind != Value::Null) jfail("replace() count must be an integer or none");
        return Value::str(py_replace(s, a[0].s, a[1].s, count.kind == Value::Int ? long(count.num) : -1));
      });
    return Value::undef();
  }
  if (obj.is_array()) {
    if (name == "length") return Value::integer(double(obj.arr->size()));
    return Value::undef();
  }
  if (obj.is_object()) {
    const Value self = obj;
    if (name == "get")
      return Value::function([self](Args& a, Env&) {
        if (a.empty() || a[0].kind != Value::Str) jfail("dict.get(): key must be a string");
        const Value* v = self.get(a[0].s);
        if (v) return *v;
        return a.size() > 1 ? a[1] : Value::null();
      });
    auto items = [self] {
      std::vector<Value> out;
      for (auto& [k, v] : *self.obj) out.push_back(Value::array({Value::str(k), v}));
      return Value::array(std::move(out));
    };
    if (name == "items") return Value::function([items](Args&, Env&) { return items(); });
    if (name == "keys")
      return Value::function([self](Args&, Env&) {
        std::vector<Value> out;
        for (auto& [k, v] : *self.obj) out.push_back(Value::str(k));
        return Value::array(std::move(out));
      });
    if (name == "values")
      return Value::function([self](Args&, Env&) {
        std::vector<Value> out;
        for (auto& [k, v] : *self.obj) out.push_back(v);
        return Value::array(std::move(out));
      });
    if (name == "dictsort")
      return Value::function([self](Args& a, Env&) {
        Value kw = Value::object(Value::KwArgs);
        Args pos;
        for (auto& x : a) {
          if (x.kind == Value::KwArgs) kw = x;
          else pos.push_back(x);
        }
        auto arg = [&](size_t i, const char* k, Value d) {
          if (pos.size() > i) return pos[i];
          const Value* v = kw.get(k);
          return v ? *v : d;
        };
        const bool cs = arg(0, "case_sensitive", Value::boolean(false)).truthy();
        const std::string by = arg(1, "by", Value::str("key")).s;
        const bool rev = arg(2, "reverse", Value::boolean(false)).truthy();
        if (by != "key" && by != "value") jfail("dictsort: by must be 'key' or 'value'");
        std::vector<Value> out;
        for (auto& [k, v] : *self.obj) out.push_back(Value::array({Value::str(k), v}));
        const size_t idx = by == "key" ? 0 : 1;
        std::stable_sort(out.begin(), out.end(), [&](const Value& x, const Value& y) {
          const int r = compare_values((*x.arr)[idx], (*y.arr)[idx], cs);
          return rev ? r > 0 : r < 0;
        });
        return Value::array(std::move(out));
      });
  }
  return Value::undef();
}

Value Interp::member(const NodeP& n, Env& env) {
  Value obj = eval(n->x, env);
  if (n->flag && n->y->kind == Node::Slice)
    return slice_of(obj, eval(n->y->x, env), eval(n->y->y, env), eval(n->y->z, env));
  Value prop;
  if (n->flag) prop = eval(n->y, env);
  else if (n->y->kind == Node::IntLit) prop = Value::integer(n->y->num);
  else prop = Value::str(n->y->str);
  if (obj.is_container()) {
    if (prop.kind != Value::Str) fail(n, std::string("cannot access a property with ") + prop.type_name());
    if (const Value* v = obj.get(prop.s)) return *v;
    return obj.is_object() ? builtin(obj, prop.s) : Value::undef();
  }
  if (obj.is_array() || obj.kind == Value::Str) {
    if (prop.kind == Value::Int) {
      long i = long(prop.num);
      if (obj.is_array()) {
        const long len = long(obj.arr->size());
        if (i < 0) i += len;
        return i >= 0 && i < len ? (*obj.arr)[size_t(i)] : Value::undef();
      }
      auto cps = code_points(obj.s);
      const long len = long(cps.size());
      if (i < 0) i += len;
      return i >= 0 && i < len ? Value::str(cps[size_t(i)]) : Value::undef();
    }
    if (prop.kind == Value::Str) return builtin(obj, prop.s);
    fail(n, std::string("cannot index with ") + prop.type_name());
  }
  if (prop.kind != Value::Str) fail(n, std::string("cannot access a property with ") + prop.type_name());
  if (obj.kind == Value::Undefined)
    fail(n, "cannot read property '" + prop.s + "' of an undefined value");
  return builtin(obj, prop.s);
}

Value Interp::binary(const NodeP& n, Env& env) {
  const std::string& op = n->str;
  Value l = eval(n->x, env);
  if (op == "and") return l.truthy() ? eval(n->y, env) : l;
  if (op == "or") return l.truthy() ? l : eval(n->y, env);
  Value r = eval(n->y, env);
  if (op == "==") return Value::boolean(loose_eq(l, r));
  if (op == "!=") return Value::boolean(!loose_eq(l, r));
  if (l.kind == Value::Undefined || r.kind == Value::Undefined) {
    if (r.kind == Value::Undefined && (op == "in" || op == "not in")) return Value::boolean(op == "not in");
    fail(n, "cannot perform operation " + op + " on undefined values");
  }
  if (l.kind == Value::Null || r.kind == Value::Null) fail(n, "cannot perform operation " + op + " on null values");
  if (op == "~") return Value::str(to_string(l) + to_string(r));
  auto numeric_like = [](const Value& v) { return v.is_number() || v.kind == Value::Bool; };
  if (op == "**" && numeric_like(l) && numeric_like(r)) {
    const double a = l.kind == Value::Bool ? l.b : l.num, b = r.kind == Value::Bool ? r.b : r.num;
    if (a == 0 && b < 0) fail(n, "0.0 cannot be raised to a negative power");
    const double res = std::pow(a, b);
    if (!std::isfinite(res)) fail(n, "exponentiation result is not finite");
    return l.kind == Value::Float || r.kind == Value::Float || b < 0 ? Value::floating(res) : Value::integer(res);
  }
  if (l.is_number() && r.is_number()) {
    const double a = l.num, b = r.num;
    const bool f = l.kind == Value::Float || r.kind == Value::Float;
    auto num = [&](double v) { return f ? Value::floating(v) : Value::integer(v); };
    if (op == "+") return num(a + b);
    if (op == "-") return num(a - b);
    if (op == "*") return num(a * b);
    if (op == "/") return Value::floating(a / b);
    if (op == "//") return num(std::floor(a / b));
    if (op == "%") return num(std::fmod(a, b));
    if (op == "<") return Value::boolean(a < b);
    if (op == ">") return Value::boolean(a > b);
    if (op == "<=") return Value::boolean(a <= b);
    if (op == ">=") return Value::boolean(a >= b);
  } else if (l.is_array() && r.is_array()) {
    if (op == "+") {
      std::vector<Value> v = *l.arr;
      v.insert(v.end(), r.arr->begin(), r.arr->end());
      return Value::array(std::move(v));
    }
  } else if (r.is_array()) {
    bool member = false;
    for (auto& x : *r.arr)
      if (strict_eq(x, l)) member = true;
    if (op == "in") return Value::boolean(member);
    if (op == "not in") return Value::boolean(!member);
  }
  if ((l.kind == Value::Str || r.kind == Value::Str) && op == "+") return Value::str(to_string(l) + to_string(r));
  if (l.kind == Value::Str && r.kind == Value::Str) {
    if (op == "in") return Value::boolean(r.s.find(l.s) != std::string::npos);
    if (op == "not in") return Value::boolean(r.s.find(l.s) == std::string::npos);
  }
  if (l.kind == Value::Str && r.is_object()) {
    if (op == "in") return Value::boolean(r.get(l.s) != nullptr);
    if (op == "not in") return Value::boolean(r.get(l.s) == nullptr);
  }
  fail(n, "unsupported operator '" + op + "' between " + l.type_name() + " and " + r.type_name());
}

Value Interp::test(const NodeP& n, Env& env) {
  Value v = eval(n->x, env);
  const std::string& t = n->str;
  bool r;
  if (t == "boolean") r = v.kind == Value::Bool;
  else if (t == "callable") r = v.kind == Value::Function;
  else if (t == "odd" || t == "even") {
    if (v.kind != Value::Int) fail(n, "cannot " + t + " on " + v.type_name());
    const bool odd = std::fmod(v.num, 2) != 0;
    r = t == "odd" ? odd : !odd;
  } else if (t == "false") r = v.kind == Value::Bool && !v.b;
  else if (t == "true") r = v.kind == Value::Bool && v.b;
  else if (t == "none") r = v.kind == Value::Null;
  else if (t == "string") r = v.kind == Value::Str;
  else if (t == "number") r = v.is_number();
  else if (t == "integer") r = v.kind == Value::Int;
  else if (t == "iterable") r = v.kind == Value::Array || v.kind == Value::Str;
  else if (t == "mapping") r = v.is_object();
  else if (t == "sequence") r = v.is_array() || v.is_object() || v.kind == Value::Str;
  else if (t == "lower") r = v.kind == Value::Str && v.s == ascii_case(v.s, false);
  else if (t == "upper") r = v.kind == Value::Str && v.s == ascii_case(v.s, true);
  else if (t == "defined") r = v.kind != Value::Undefined;
  else if (t == "undefined") r = v.kind == Value::Undefined;
  else fail(n, "unknown test '" + t + "'");
  return Value::boolean(n->flag ? !r : r);
}

Value Interp::filter(const NodeP& n, Env& env) {
  Value v = eval(n->x, env);
  const std::string& f = n->str;
  auto bad = [&]() -> Value { fail(n, "unsupported filter '" + f + "' on " + v.type_name()); };
  if (!n->flag) {
    if (f == "safe") return v;
    if (f == "tojson") return Value::str(to_json(v, JsonOpts{}, 0, true));
    if (v.is_array()) {
      auto& a = *v.arr;
      if (f == "list") return v;
      if (f == "first") return a.empty() ? Value::undef() : a.front();
      if (f == "last") return a.empty() ? Value::undef() : a.back();
      if (f == "length") return Value::integer(double(a.size()));
      if (f == "reverse") return Value::array(std::vector<Value>(a.rbegin(), a.rend()));
      if (f == "sort") {
        std::vector<Value> s = a;
        std::stable_sort(s.begin(), s.end(), [](const Value& x, const Value& y) { return compare_values(x, y, false) < 0; });
        return Value::array(std::move(s));
      }
      if (f == "join") {
        std::string r;
        for (auto& x : a) r += to_string(x);
        return Value::str(r);
      }
      if (f == "string") return Value::str(to_json(v, JsonOpts{}, 0, false));
      if (f == "unique") {
        std::vector<Value> out;
        for (auto& x : a) {
          bool seen = false;
          for (auto& y : out) seen |= strict_eq(x, y);
          if (!seen) out.push_back(x);
        }
        return Value::array(std::move(out));
      }
      return bad();
    }
    if (v.kind == Value::Str) {
      if (f == "length" || f == "upper" || f == "lower" || f == "title" || f == "capitalize") {
        Value b = builtin(v, f);
        if (b.kind == Value::Function) {
          Args none;
          return (*b.fn)(none, env);
        }
        return b;
      }
      if (f == "trim") return Value::str(trim(v.s));
      if (f == "indent") {
        std::string r;
        size_t prev = 0, k = 0;
        for (;; ++k) {
          const size_t at = v.s.find('\n', prev);
          const std::string line = v.s.substr(prev, at == std::string::npos ? std::string::npos : at - prev);
          r += (k ? "\n" : "") + (k == 0 || line.empty() ? line : "    " + line);
          if (at == std::string::npos) break;
          prev = at + 1;
        }
        return Value::str(r);
      }
      if (f == "join" || f == "string") return v;
      if (f == "int") {
        char* end;
        const long x = std::strtol(trim(v.s).c_str(), &end, 10);
        return Value::integer(end == trim(v.s).c_str() ? 0 : double(x));
      }
      if (f == "float") {
        char* end;
        const double x = std::strtod(trim(v.s).c_str(), &end);
        return Value::floating(end == trim(v.s).c_str() ? 0 : x);
      }
      return bad();
    }
    if (v.is_number()) {
      if (f == "abs") return v.kind == Value::Int ? Value::integer(std::fabs(v.num)) : Value::floating(std::fabs(v.num));
      if (f == "int") return Value::integer(std::floor(v.num));
      if (f == "float") return Value::floating(v.num);
      if (f == "string") return Value::str(to_string(v));
      return bad();
    }
    if (v.is_object()) {
      if (f == "items" || f == "length") {
        if (f == "length") return Value::integer(double(v.obj->size()));
      }
      Value b = builtin(v, f);
      if (b.kind == Value::Function) {
        Args none;
        return (*b.fn)(none, env);
      }
      if (b.kind != Value::Undefined) return b;
      return bad();
    }
    if (v.kind == Value::Bool) {
      if (f == "bool") return v;
      if (f == "int") return Value::integer(v.b);
      if (f == "float") return Value::floating(v.b);
      if (f == "string") return Value::str(v.b ? "true" : "false");
      return bad();
    }
    return bad();
  }
  // Filters with arguments.
  Args pos;
  Value kw;
  eval_args(n->a, env, &pos, &kw);
  auto arg = [&](size_t i, const char* k, Value d) {
    if (pos.size() > i) return pos[i];
    const Value* x = kw.get(k);
    return x ? *x : d;
  };
  if (f == "tojson") {
    JsonOpts o;
    const Value* ind = kw.get("indent");
    if (ind && ind->kind != Value::Int && ind->kind != Value::Null) fail(n, "tojson: indent must be an integer");
    if (ind && ind->kind == Value::Int) o.indent = int(ind->num);
    if (const Value* a = kw.get("ensure_ascii")) o.ascii = a->truthy();
    if (const Value* s = kw.get("sort_keys")) o.sort_keys = s->truthy();
    if (const Value* s = kw.get("separators"); s && s->kind != Value::Null) {
      if (!s->is_array() || s->arr->size() != 2 || (*s->arr)[0].kind != Value::Str || (*s->arr)[1].kind != Value::Str)
        fail(n, "tojson: separators must be a tuple of two strings");
      o.has_seps = true;
      o.item_sep = (*s->arr)[0].s;
      o.key_sep = (*s->arr)[1].s;
    }
    return Value::str(to_json(v, o, 0, true));
  }
  if (f == "join") {
    std::vector<std::string> parts;
    if (v.kind == Value::Str) parts = code_points(v.s);
    else if (v.is_array())
      for (auto& x : *v.arr) parts.push_back(to_string(x));
    else return bad();
    const Value sep = arg(0, "separator", Value::str(""));
    if (sep.kind != Value::Str) fail(n, "join: separator must be a string");
    std::string r;
    for (size_t i = 0; i < parts.size(); ++i) r += (i ? sep.s : "") + parts[i];
    return Value::str(r);
  }
  if (f == "default") {
    const Value d = pos.size() > 0 ? pos[0] : Value::str("");
    const bool boolean = arg(1, "boolean", Value::boolean(false)).truthy();
    if (v.kind == Value::Undefined || (boolean && !v.truthy())) return d;
    return v;
  }
  if (f == "int" || f == "float") {
    const Value d = arg(0, "default", f == "int" ? Value::integer(0) : Value::floating(0));
    if (v.kind == Value::Str) {
      char* end;
      const std::string t = trim(v.s);
      const double x = f == "int" ? double(std::strtol(t.c_str(), &end, 10)) : std::strtod(t.c_str(), &end);
      if (end == t.c_str()) return d;
      return f == "int" ? Value::integer(x) : Value::floating(x);
    }
    if (v.is_number()) return v;
    if (v.kind == Value::Bool) return f == "int" ? Value::integer(v.b) : Value::floating(v.b);
    return bad();
  }
  if (v.is_array()) {
    if (f == "sort") {
      const bool rev = arg(0, "reverse", Value::boolean(false)).truthy();
      const bool cs = arg(1, "case_sensitive", Value::boolean(false)).truthy();
      const Value attr = arg(2, "attribute", Value::null());
      std::vector<Value> s = *v.arr;
      auto key = [&](const Value& x) {
        if (attr.kind == Value::Null) return x;
        Value cur = x;
        const std::string path = attr.kind == Value::Int ? js_number(attr.num) : attr.s;
        size_t prev = 0;
        while (true) {
          const size_t dot = path.find('.', prev);
          const std::string part = path.substr(prev, dot == std::string::npos ? std::string::npos : dot - prev);
          if (cur.is_container()) {
            const Value* nx = cur.get(part);
            cur = nx ? *nx : Value::undef();
          } else if (cur.is_array()) {
            const long i = std::atol(part.c_str());
            cur = i >= 0 && size_t(i) < cur.arr->size() ? (*cur.arr)[size_t(i)] : Value::undef();
          } else {
            cur = Value::undef();
          }
          if (dot == std::string::npos) break;
          prev = dot + 1;
        }
        return cur;
      };
      std::stable_sort(s.begin(), s.end(), [&](const Value& x, const Value& y) {
        const int r = compare_values(key(x), key(y), cs);
        return rev ? r > 0 : r < 0;
      });
      return Value::array(std::move(s));
    }
    if (f == "selectattr" || f == "rejectattr") {
      const bool sel = f == "selectattr";
      if (pos.empty() || pos[0].kind != Value::Str) fail(n, f + ": expected an attribute name");
      std::vector<Value> out;
      for (auto& item : *v.arr) {
        if (!item.is_container()) fail(n, f + " can only be applied to a list of objects");
        const Value* a = item.get(pos[0].s);
        bool r = false;
        if (a && a->truthy()) {
          if (pos.size() > 1) {
            const std::string t = pos[1].s;
            if (t == "equalto" || t == "eq" || t == "==") r = pos.size() > 2 && strict_eq(*a, pos[2]);
            else if (t == "defined") r = true;
            else if (t == "none") r = a->kind == Value::Null;
            else if (t == "string") r = a->kind == Value::Str;
            else if (t == "true") r = a->kind == Value::Bool && a->b;
            else fail(n, f + ": unsupported test '" + t + "'");
          } else {
            r = true;
          }
        }
        if (r == sel) out.push_back(item);
      }
      return Value::array(std::move(out));
    }
    if (f == "map") {
      const Value* attr = kw.get("attribute");
      if (!attr || attr->kind != Value::Str) fail(n, "map: only map(attribute=...) is supported");
      const Value* d = kw.get("default");
      std::vector<Value> out;
      for (auto& item : *v.arr) {
        if (!item.is_container()) fail(n, "map: items must be objects");
        const Value* x = item.get(attr->s);
        out.push_back(x ? *x : d ? *d : Value::undef());
      }
      return Value::array(std::move(out));
    }
    return bad();
  }
  if (v.kind == Value::Str) {
    if (f == "indent") {
      const Value w = arg(0, "width", Value::integer(4));
      if (w.kind != Value::Int) fail(n, "indent: width must be an integer");
      const bool first = arg(1, "first", Value::boolean(false)).truthy();
      const bool blank = arg(2, "blank", Value::boolean(false)).truthy();
      const std::string ind(size_t(w.num), ' ');
      std::string r;
      size_t prev = 0, k = 0;
      for (;; ++k) {
        const size_t at = v.s.find('\n', prev);
        const std::string line = v.s.substr(prev, at == std::string::npos ? std::string::npos : at - prev);
        r += (k ? "\n" : "") + ((!first && k == 0) || (!blank && line.empty()) ? line : ind + line);
        if (at == std::string::npos) break;
        prev = at + 1;
      }
      return Value::str(r);
    }
    if (f == "replace") {
      Value b = builtin(v, "replace");
      Args a = pos;
      a.push_back(kw);
      return (*b.fn)(a, env);
    }
    return bad();
  }
  if (v.is_object()) {
    Value b = builtin(v, f);
    if (b.kind == Value::Function) {
      Args a = pos;
      if (!kw.obj->empty()) a.push_back(kw);
      return (*b.fn)(a, env);
    }
  }
  return bad();
}

void Interp::assign(const NodeP& target, const Value& v, Env& env) {
  if (target->kind == Node::Ident) {
    env.set(target->str, v);
  } else if (target->kind == Node::TupleLit) {
    if (!v.is_array()) fail(target, std::string("cannot unpack ") + v.type_name());
    if (v.arr->size() != target->a.size())
      fail(target, std::string("too ") + (target->a.size() > v.arr->size() ? "few" : "many") + " items to unpack");
    for (size_t i = 0; i < target->a.size(); ++i) {
      if (target->a[i]->kind != Node::Ident) fail(target, "cannot unpack to a non-identifier");
      env.set(target->a[i]->str, (*v.arr)[i]);
    }
  } else if (target->kind == Node::Member && !target->flag) {
    Value obj = eval(target->x, env);
    if (obj.kind != Value::Namespace) fail(target, "cannot assign an attribute of a non-namespace object");
    if (target->y->kind != Node::Ident) fail(target, "cannot assign to a non-identifier member");
    obj.set(target->y->str, v);
  } else {
    fail(target, "invalid assignment target");
  }
}

Value Interp::for_loop(const NodeP& n, Env& env) {
  Env scope(&env);
  NodeP cond;
  Value iterable;
  if (n->y->kind == Node::Select) {
    iterable = eval(n->y->x, scope);
    cond = n->y->y;
  } else {
    iterable = eval(n->y, scope);
  }
  std::vector<Value> items;
  if (iterable.is_array()) items = *iterable.arr;
  else if (iterable.is_object())
    for (auto& [k, x] : *iterable.obj) items.push_back(Value::str(k));
  else fail(n, std::string("cannot iterate over ") + iterable.type_name());
  if (cond) {
    std::vector<Value> kept;
    for (auto& it : items) {
      if (++g_render->iterations > kMaxLoopIterations)
        fail(n, "more than " + std::to_string(kMaxLoopIterations) + " loop iterations (limit)");
      Env ls(&scope);
      assign(n->x, it, ls);
      if (eval(cond, ls).truthy()) kept.push_back(it);
    }
    items.swap(kept);
  }
  std::string out;
  bool none = true;
  for (size_t i = 0; i < items.size(); ++i) {
    if (++g_render->iterations > kMaxLoopIterations)
      fail(n, "more than " + std::to_string(kMaxLoopIterations) + " loop iterations (limit)");
    if (out.size() > kMaxStringBytes) fail(n, "output above the limit of " + std::to_string(kMaxStringBytes) + " bytes");
    Value loop = Value::object();
    const double len = double(items.size());
    loop.set("index", Value::integer(double(i + 1)));
    loop.set("index0", Value::integer(double(i)));
    loop.set("revindex", Value::integer(len - double(i)));
    loop.set("revindex0", Value::integer(len - double(i) - 1));
    loop.set("first", Value::boolean(i == 0));
    loop.set("last", Value::boolean(i + 1 == items.size()));
    loop.set("length", Value::integer(len));
    loop.set("previtem", i > 0 ? items[i - 1] : Value::undef());
    loop.set("nextitem", i + 1 < items.size() ? items[i + 1] : Value::undef());
    scope.set("loop", loop);
    assign(n->x, items[i], scope);
    try {
      out += block(n->a, scope);
    } catch (const ContinueSignal&) {
      continue;
    } catch (const BreakSignal&) {
      break;
    }
    none = false;
  }
  if (none) out += block(n->b, scope);
  return Value::str(out);
}

Value Interp::eval(const NodeP& n, Env& env) {
  if (!n) return Value::undef();
  struct Depth {
    RenderState& st;
    explicit Depth(RenderState& s) : st(s) { ++st.depth; }
    ~Depth() { --st.depth; }
  };
  RenderState& st = *g_render;  // set by render()
  Depth guard(st);
  if (st.depth > kMaxEvalDepth)
    fail(n, "evaluation nests deeper than " + std::to_string(kMaxEvalDepth) + " levels (recursive macro?)");
  if (++st.steps > kMaxRenderSteps) fail(n, "rendering took more than " + std::to_string(kMaxRenderSteps) + " steps (limit)");
  switch (n->kind) {
    case Node::Program: return Value::str(block(n->a, env));
    case Node::Text: return Value::str(n->str);
    case Node::Comment: return Value::null();
    case Node::Output: return eval(n->x, env);
    case Node::If: return Value::str(block(eval(n->x, env).truthy() ? n->a : n->b, env));
    case Node::For: return for_loop(n, env);
    case Node::Set: {
      Value v = n->y ? eval(n->y, env) : Value::str(block(n->a, env));
      assign(n->x, v, env);
      return Value::null();
    }
    case Node::Macro: {
      NodeP m = n;
      Interp* self = this;
      env.set(n->str, Value::function([m, self](Args& args, Env& caller) {
        Env scope(&caller);
        Args pos = args;
        Value kw = Value::object(Value::KwArgs);
        if (!pos.empty() && pos.back().kind == Value::KwArgs) {
          kw = pos.back();
          pos.pop_back();
        }
        std::vector<std::pair<std::string, NodeP>> defaults;
        for (size_t i = 0; i < m->c.size(); ++i) {
          const NodeP& p = m->c[i];
          const std::string name = p->kind == Node::KwArg ? p->str : p->kind == Node::Ident ? p->str : "";
          if (name.empty()) jfail("line " + std::to_string(m->line) + ": macro parameters must be identifiers");
          Value v;
          bool have = false;
          if (i < pos.size()) v = pos[i], have = true;
          else if (const Value* k = kw.get(name)) v = *k, have = true;
          if (!have && p->kind == Node::KwArg) defaults.emplace_back(name, p->x);
          scope.set(name, have ? v : Value::undef());
        }
        if (pos.size() > m->c.size())
          jfail("macro '" + m->str + "' takes not more than " + std::to_string(m->c.size()) + " argument(s)");
        for (auto& [name, expr] : defaults) scope.set(name, self->eval(expr, scope));
        return Value::str(self->block(m->a, scope));
      }));
      return Value::null();
    }
    case Node::Break: throw BreakSignal();
    case Node::Continue: throw ContinueSignal();
    case Node::IntLit: return Value::integer(n->num);
    case Node::FloatLit: return Value::floating(n->num);
    case Node::StrLit: return Value::str(n->str);
    case Node::ArrayLit:
    case Node::TupleLit: {
      std::vector<Value> v;
      for (auto& x : n->a) v.push_back(eval(x, env));
      return Value::array(std::move(v), n->kind == Node::TupleLit ? Value::Tuple : Value::Array);
    }
    case Node::ObjectLit: {
      Value o = Value::object();
      for (size_t i = 0; i < n->a.size(); ++i) {
        Value k = eval(n->a[i], env);
        if (k.kind != Value::Str) fail(n, "dict keys must be strings");
        o.set(k.s, eval(n->b[i], env));
      }
      return o;
    }
    case Node::Ident: return env.lookup(n->str);
    case Node::Member: return member(n, env);
    case Node::Call: {
      Args pos;
      Value kw;
      eval_args(n->a, env, &pos, &kw);
      if (!kw.obj->empty()) pos.push_back(kw);
      Value f = eval(n->x, env);
      if (f.kind != Value::Function) {
        std::string what = n->x->kind == Node::Ident ? "'" + n->x->str + "'"
                           : n->x->kind == Node::Member && !n->x->flag ? "'." + n->x->y->str + "()'"
                                                                        : "expression";
        fail(n, "cannot call " + what + ": it is " + f.type_name() + " (unsupported function or method?)");
      }
      return (*f.fn)(pos, env);
    }
    case Node::Unary: {
      Value v = eval(n->x, env);
      if (n->str == "not") return Value::boolean(!v.truthy());
      const double sign = n->str == "-" ? -1 : 1;
      if (v.is_number() || v.kind == Value::Bool) {
        const double x = sign * (v.kind == Value::Bool ? double(v.b) : v.num);
        return v.kind == Value::Float ? Value::floating(x) : Value::integer(x);
      }
      fail(n, "unary " + n->str + " on " + v.type_name());
    }
    case Node::Binary: return binary(n, env);
    case Node::Filter: return filter(n, env);
    case Node::Test: return test(n, env);
    case Node::Select: return eval(n->y, env).truthy() ? eval(n->x, env) : Value::undef();
    case Node::Ternary: return eval(n->x, env).truthy() ? eval(n->y, env) : eval(n->z, env);
    case Node::Slice:
    case Node::KwArg: fail(n, "unexpected expression");
  }
  return Value::undef();
}

void setup_globals(Env& env) {
  env.set("false", Value::boolean(false));
  env.set("true", Value::boolean(true));
  env.set("none", Value::null());
  env.set("False", Value::boolean(false));
  env.set("True", Value::boolean(true));
  env.set("None", Value::null());
  env.set("raise_exception", Value::function([](Args& a, Env&) -> Value {
            std::string msg;
            for (size_t i = 0; i < a.size(); ++i) msg += (i ? "," : "") + to_string(a[i]);
            MOE_FAIL("chat template raised an exception: %s", msg.c_str());
          }));
  env.set("range", Value::function([](Args& a, Env&) {
            if (a.empty() || a.size() > 3) jfail("range() takes 1 to 3 arguments");
            for (auto& x : a)
              if (!x.is_number()) jfail("range() arguments must be numbers");
            double start = 0, stop, step = 1;
            if (a.size() == 1) stop = a[0].num;
            else start = a[0].num, stop = a[1].num;
            if (a.size() == 3) step = a[2].num;
            if (step == 0) jfail("range() step must not be zero");
            if (!std::isfinite(start) || !std::isfinite(stop) || !std::isfinite(step))
              jfail("range() arguments must be finite");
            // The count first: range(2e9) must fail before it allocates, and a step too small to
            // change start (1e20 + 1) must not loop forever.
            const double count = std::ceil((stop - start) / step);
            if (count > double(kMaxArrayItems))
              jfail("range() of " + js_number(count) + " items is above the limit of " + std::to_string(kMaxArrayItems));
            std::vector<Value> out;
            for (size_t k = 0; double(k) < count; ++k) out.push_back(Value::integer(start + double(k) * step));
            return Value::array(std::move(out));
          }));
  env.set("strftime_now", Value::function([](Args& a, Env&) {
            if (a.empty() || a[0].kind != Value::Str) jfail("strftime_now() expects a format string");
            std::time_t t = std::time(nullptr);
            std::tm tm{};
            localtime_r(&t, &tm);
            char buf[256];
            const size_t n = std::strftime(buf, sizeof buf, a[0].s.c_str(), &tm);
            return Value::str(std::string(buf, n));
          }));
  env.set("namespace", Value::function([](Args& a, Env&) {
            Value ns = Value::object(Value::Namespace);
            Args pos = a;
            Value kw;
            if (!pos.empty() && pos.back().kind == Value::KwArgs) kw = pos.back(), pos.pop_back();
            if (pos.size() > 1) jfail("namespace() takes at most 1 positional argument");
            if (pos.size() == 1) {
              if (pos[0].is_object())
                for (auto& [k, v] : *pos[0].obj) ns.set(k, v);
              else jfail("namespace(): argument is not a mapping");
            }
            if (kw.obj)
              for (auto& [k, v] : *kw.obj) ns.set(k, v);
            return ns;
          }));
}

}  // namespace

JinjaTemplate::JinjaTemplate(const std::string& source) {
  MOE_CHECK(source.size() <= kMaxTemplateBytes, "chat template: %zu bytes, above the limit of %zu", source.size(),
            kMaxTemplateBytes);
  MOE_CHECK(utf8_valid(source), "chat template: not valid UTF-8");
  root_ = Parser(tokenize(source)).program();
}
JinjaTemplate::~JinjaTemplate() = default;
JinjaTemplate::JinjaTemplate(JinjaTemplate&&) noexcept = default;
JinjaTemplate& JinjaTemplate::operator=(JinjaTemplate&&) noexcept = default;

std::string JinjaTemplate::render(const nlohmann::ordered_json& context) const {
  // from_json recurses once per level of the context.
  check_json_depth(context, "chat template context", kMaxJsonDepth);
  RenderState state;
  struct Scope {
    RenderState* saved;
    RenderState& st;
    explicit Scope(RenderState& s) : saved(g_render), st(s) { g_render = &s; }
    ~Scope() {
      // Break reference cycles through namespaces (ns.x = ns): empty every namespace made.
      g_render = nullptr;  // no charging while tearing down
      for (auto& ns : st.namespaces)
        static_cast<std::vector<std::pair<std::string, Value>>*>(ns.get())->clear();
      st.namespaces.clear();
      g_render = saved;
    }
  } scope(state);
  Env globals;
  setup_globals(globals);
  if (context.is_object())
    for (auto it = context.begin(); it != context.end(); ++it) globals.set(it.key(), from_json(it.value()));
  Interp in;
  try {
    return in.block(root_->a, globals);
  } catch (const BreakSignal&) {
    jfail("{% break %} outside a loop");
  } catch (const ContinueSignal&) {
    jfail("{% continue %} outside a loop");
  }
}

}  // namespace moe
