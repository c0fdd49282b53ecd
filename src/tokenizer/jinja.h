// jinja.h — a Jinja subset interpreter for chat templates, rendering byte-identical to the
// JavaScript reference (@huggingface/jinja, with lstrip_blocks and trim_blocks as transformers
// uses them).
//
// Statements: set (incl. ns.attr, tuple unpacking, block set), if/elif/else, for (tuple
// unpacking, `if` filter, else, loop.index/index0/revindex/first/last/length/previtem/nextitem),
// macro (positional, keyword and default arguments), break, continue, comments, whitespace
// control (-). Expressions: literals (string, int, float, list, tuple, dict), and/or/not,
// comparisons, in / not in, + - * / // % ** ~, a if b else c, member access and [i], slicing
// [a:b:c], calls with keyword arguments, filters, `is` tests. Built-ins: namespace(),
// raise_exception(), range(), strftime_now(); string methods (upper, lower, strip, lstrip,
// rstrip, title, capitalize, startswith, endswith, split, replace), dict methods (get, items,
// keys, values, dictsort); filters (tojson, trim, length, first, last, reverse, sort, join, list,
// string, int, float, abs, default, upper, lower, title, capitalize, indent, items, unique, map,
// selectattr, rejectattr, replace, safe); tests (defined, undefined, none, string, number,
// integer, boolean, mapping, iterable, sequence, callable, odd, even, true, false, lower, upper,
// eq/equalto).
// As in the reference, strip/lstrip/rstrip ignore their argument (they trim white space), and
// true/false/none print as "true"/"false"/"" (JavaScript spelling).
// Unsupported constructs (call blocks, filter blocks, include, extends, ...) and runtime errors
// throw moe::Error naming the construct; raise_exception("msg") throws moe::Error with msg.
#pragma once
#include <memory>
#include <string>

#include <nlohmann/json.hpp>

namespace moe {

class JinjaTemplate {
 public:
  explicit JinjaTemplate(const std::string& source);  // parses; throws moe::Error on syntax errors
  ~JinjaTemplate();
  JinjaTemplate(JinjaTemplate&&) noexcept;
  JinjaTemplate& operator=(JinjaTemplate&&) noexcept;

  // Renders with the top-level keys of `context` as variables (key order is kept).
  std::string render(const nlohmann::ordered_json& context) const;

  struct Node;

 private:
  std::shared_ptr<Node> root_;
};

}  // namespace moe
