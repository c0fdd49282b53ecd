// test_hostile_input.cpp — regression tests for hostile model directories, templates and request
// bodies (issue 13): each input that used to crash, hang or exhaust memory must now fail with a
// clear moe::Error, within a bounded time and memory.
//
// Each case runs in a forked child (run_bounded) with an alarm (time bound) and, except under
// AddressSanitizer, an RLIMIT_AS of the current address space plus a small budget (memory bound).
// ASan reserves terabytes of shadow address space up front, so under ASan only the time bound
// applies (its own allocator still reports any oversized allocation as an error).
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <string>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_util.h"
#include "core/sanitizer.h"
#include "io/hf_config.h"
#include "io/safetensors.h"
#include "plan/plan_model.h"
#include "plan/plan_report.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/jinja.h"
#include "tokenizer/regex.h"
#include "tokenizer/tokenizer.h"

namespace moe {
namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;

constexpr unsigned kSeconds = 60;                    // generous: ASan builds on a busy 2-core CI machine
#if !MOE_ASAN  // (ASan reserves terabytes of shadow address space: no RLIMIT_AS there)
constexpr size_t kMemoryBudget = size_t(768) << 20;  // address space a case may add

size_t current_address_space() {
  std::ifstream f("/proc/self/statm");
  size_t pages = 0;
  f >> pages;
  return pages * size_t(sysconf(_SC_PAGESIZE));
}
#endif

// Runs f in a child process under the bounds above. The case passes when f throws moe::Error whose
// message contains `needle`; returns "" then, else a description of what happened instead.
std::string run_bounded(const std::function<void()>& f, const std::string& needle) {
  int fds[2];
  if (pipe(fds) != 0) return "pipe failed";
  std::fflush(nullptr);
  const pid_t pid = fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    close(fds[0]);
#if !MOE_ASAN
    const rlimit lim{current_address_space() + kMemoryBudget, current_address_space() + kMemoryBudget};
    setrlimit(RLIMIT_AS, &lim);
#endif
    alarm(kSeconds);
    std::string msg;
    int code = 0;
    try {
      f();
      msg = "returned normally, expected an error containing '" + needle + "'";
      code = 1;
    } catch (const Error& e) {
      msg = e.what();
      code = msg.find(needle) == std::string::npos ? 3 : 0;
    } catch (const std::bad_alloc&) {
      msg = "std::bad_alloc (memory bound exceeded)";
      code = 2;
    } catch (const std::exception& e) {
      msg = std::string("non-moe exception: ") + e.what();
      code = 2;
    } catch (...) {
      msg = "non-std exception";
      code = 2;
    }
    if (write(fds[1], msg.data(), msg.size()) < 0) code = 4;
    _exit(code);
  }
  close(fds[1]);
  std::string msg;
  char buf[4096];
  for (ssize_t r; (r = read(fds[0], buf, sizeof buf)) > 0;) msg.append(buf, size_t(r));
  close(fds[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFSIGNALED(status))
    return std::string("killed by signal ") + std::to_string(WTERMSIG(status)) +
           (WTERMSIG(status) == SIGALRM ? " (time bound exceeded)" : " (crash)");
  if (WEXITSTATUS(status) == 0) return "";
  if (WEXITSTATUS(status) == 3) return "error without '" + needle + "': " + msg;
  return msg.empty() ? "exit code " + std::to_string(WEXITSTATUS(status)) : msg;
}

#define EXPECT_BOUNDED_ERROR(body, needle) EXPECT_EQ(run_bounded([&] { body; }, needle), "")

std::string repeat(const std::string& s, size_t n) {
  std::string r;
  r.reserve(s.size() * n);
  for (size_t i = 0; i < n; ++i) r += s;
  return r;
}

std::string render(const std::string& tmpl, const ojson& ctx = ojson::object()) {
  return JinjaTemplate(tmpl).render(ctx);
}

json tiny_tokenizer() {
  return json::parse(R"({"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": ["a b"]}})");
}

std::string temp_dir(const std::string& name) {
  const std::string d = std::string(MOE_BINARY_DIR) + "/hostile-" + name;
  std::system(("rm -rf '" + d + "' && mkdir -p '" + d + "'").c_str());
  return d;
}

// ---- chat templates ------------------------------------------------------------------------

TEST(HostileInput, BreakOutsideLoop) {
  EXPECT_BOUNDED_ERROR(render("a{% break %}b"), "{% break %} outside a loop");
  EXPECT_BOUNDED_ERROR(render("{% if true %}{% continue %}{% endif %}"), "{% continue %} outside a loop");
  // Inside a loop both still work.
  EXPECT_EQ(render("{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}"), "012");
}

TEST(HostileInput, TemplateDeepParentheses) {
  EXPECT_BOUNDED_ERROR(render("{{ " + repeat("(", 100000) + "1" + repeat(")", 100000) + " }}"), "nest deeper");
  EXPECT_BOUNDED_ERROR(render("{{ " + repeat("[", 100000) + repeat("]", 100000) + " }}"), "nest deeper");
  EXPECT_BOUNDED_ERROR(render(repeat("{% if true %}", 20000) + repeat("{% endif %}", 20000)), "nest deeper");
  EXPECT_BOUNDED_ERROR(render("{{ " + repeat("not ", 100000) + "x }}"), "nest deeper");
  EXPECT_BOUNDED_ERROR(render("{{ f" + repeat("()", 100000) + " }}"), "nest deeper");
  EXPECT_BOUNDED_ERROR(render("{% if a %}" + repeat("{% elif a %}", 20000) + "{% endif %}"), "nest deeper");
  // Long chains are deep trees without parser recursion.
  EXPECT_BOUNDED_ERROR(render("{{ 1" + repeat(" + 1", 200000) + " }}"), "nests deeper");
  EXPECT_BOUNDED_ERROR(render("{{ x" + repeat(" | length", 80000) + " }}"), "nests deeper");
  EXPECT_BOUNDED_ERROR(render("{{ x" + repeat(".a", 200000) + " }}"), "nests deeper");
  // Size.
  EXPECT_BOUNDED_ERROR(render(std::string(size_t(2) << 20, 'x')), "above the limit of");
  // Moderate nesting still renders.
  EXPECT_EQ(render("{{ " + repeat("(", 20) + "1" + repeat(")", 20) + " }}"), "1");
}

TEST(HostileInput, TemplateSelfRecursiveMacro) {
  EXPECT_BOUNDED_ERROR(render("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}"), "nests deeper");
  EXPECT_BOUNDED_ERROR(render("{% macro f(n) %}x{{ f(n + 1) }}{% endmacro %}{{ f(0) }}"), "nests deeper");
  // Bounded recursion is fine.
  EXPECT_EQ(render("{% macro f(n) %}{% if n > 0 %}{{ n }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(5) }}"), "54321");
}

TEST(HostileInput, TemplateSelfReferencingNamespace) {
  EXPECT_BOUNDED_ERROR(render("{% set ns = namespace(a=1) %}{% set ns.self = ns %}{{ ns | tojson }}"),
                       "nests deeper");
  EXPECT_BOUNDED_ERROR(render("{% set ns = namespace(a=1) %}{% set ns.self = ns %}{{ ns }}"), "nests deeper");
  // A cycle that is never printed renders, and (LeakSanitizer in the ASan build) leaks nothing.
  EXPECT_EQ(render("{% set ns = namespace(a=1) %}{% set ns.self = ns %}{% set ns.list = [ns, ns] %}ok"), "ok");
}

TEST(HostileInput, TemplateRangeAndLoops) {
  EXPECT_BOUNDED_ERROR(render("{{ range(2000000000) | length }}"), "range() of");
  EXPECT_BOUNDED_ERROR(render("{% for i in range(2000000000) %}{% endfor %}"), "range() of");
  // A step too small to move the start: counted, not looped.
  EXPECT_EQ(render("{{ range(100000000000000000000, 100000000000000000010) | length }}"), "0");
  EXPECT_BOUNDED_ERROR(
      render("{% for i in range(1000) %}{% for j in range(1000) %}{% for k in range(1000) %}{% endfor %}"
             "{% endfor %}{% endfor %}"),
      "loop iterations");
  // String doubling: the output/string limits end it.
  EXPECT_BOUNDED_ERROR(
      render("{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}"
             "{% endfor %}{{ ns.s | length }}"),
      "limit");
  // List doubling too.
  EXPECT_BOUNDED_ERROR(render("{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}"
                              "{% endfor %}{{ ns.l | length }}"),
                       "limit");
  EXPECT_EQ(render("{{ range(3) | length }}"), "3");
}

TEST(HostileInput, ChatMessagesDeeplyNested) {
  const std::string deep = repeat("[", 100000) + repeat("]", 100000);
  // Through the one JSON entry point (the CLI's --chat file, later the server's request body).
  EXPECT_BOUNDED_ERROR(parse_ordered_json("[{\"role\": \"user\", \"content\": " + deep + "}]", "request"),
                       "nests deeper than");
  // A value built some other way is refused before any copy or conversion recurses into it.
  EXPECT_BOUNDED_ERROR(
      {
        const ojson messages = ojson::parse("[{\"role\": \"user\", \"content\": " + deep + "}]");
        ChatTemplate("{{ messages }}", json::object()).apply(messages, true);
      },
      "nests deeper than");
}

// ---- JSON files ---------------------------------------------------------------------------

TEST(HostileInput, ConfigJsonDeeplyNested) {
  const std::string deep = repeat("[", 100000) + repeat("]", 100000);
  EXPECT_BOUNDED_ERROR(parse_hf_config("{\"model_type\": \"mixtral\", \"vocab_size\": " + deep + "}", "config.json"),
                       "config.json: JSON nests deeper than");
  EXPECT_BOUNDED_ERROR(plan_model_from_hf_json("{\"model_type\": \"dbrx\", \"n_heads\": " + deep + "}", "config.json"),
                       "config.json: JSON nests deeper than");
  // Moderately deep values in the wrong place get an error naming the field (no recursion trouble).
  const std::string mid = repeat("[", 100) + repeat("]", 100);
  EXPECT_BOUNDED_ERROR(parse_hf_config("{\"model_type\": \"mixtral\", \"vocab_size\": " + mid + "}", "config.json"),
                       "field 'vocab_size' must be an integer");
}

TEST(HostileInput, SafetensorsIndexDeeplyNested) {
  const std::string d = temp_dir("index");
  std::ofstream(d + "/model.safetensors.index.json")
      << "{\"weight_map\": {\"a\": " << repeat("[", 100000) << repeat("]", 100000) << "}}";
  EXPECT_BOUNDED_ERROR(Checkpoint::open_dir(d), "model.safetensors.index.json: JSON nests deeper than");
  EXPECT_BOUNDED_ERROR(parse_safetensors_index("{\"weight_map\": {\"a\": \"../x\"}}", "index.json"),
                       "is not a plain file name");
}

TEST(HostileInput, SafetensorsHeaderLimits) {
  auto file = [](const std::string& header) {
    std::string f(8, '\0');
    const uint64_t n = header.size();
    std::memcpy(f.data(), &n, 8);
    return f + header;
  };
  EXPECT_BOUNDED_ERROR(
      {
        const std::string f = file(repeat("[", 100000));
        parse_safetensors_header(reinterpret_cast<const uint8_t*>(f.data()), f.size(), "x.safetensors", nullptr, nullptr);
      },
      "nests deeper than");
  EXPECT_BOUNDED_ERROR(
      {
        const std::string f = file("{\"t\": {\"dtype\": \"F32\", \"shape\": [" + repeat("1,", 100) +
                                   "1], \"data_offsets\": [0, 4]}}");
        parse_safetensors_header(reinterpret_cast<const uint8_t*>(f.data()), f.size(), "x.safetensors", nullptr, nullptr);
      },
      "dimensions, above the limit");
  EXPECT_BOUNDED_ERROR(
      {
        std::string f(8, '\0');
        const uint64_t n = uint64_t(1) << 40;
        std::memcpy(f.data(), &n, 8);
        parse_safetensors_header(reinterpret_cast<const uint8_t*>(f.data()), f.size(), "x.safetensors", nullptr, nullptr);
      },
      "implausibly large");
}

// ---- tokenizer.json -----------------------------------------------------------------------

TEST(HostileInput, TokenizerHugeVocabularyId) {
  json j = tiny_tokenizer();
  j["model"]["vocab"]["z"] = (int64_t(1) << 30) - 5;
  EXPECT_BOUNDED_ERROR(Tokenizer::from_json(j, json::object()), "model.vocab['z'] must be an integer id in [0, ");
  j["model"]["vocab"]["z"] = 4;  // a small gap is fine
  EXPECT_EQ(Tokenizer::from_json(j, json::object()).vocab_size(), 5);
}

TEST(HostileInput, TokenizerAddedTokenIdDoesNotWrap) {
  json j = tiny_tokenizer();
  j["added_tokens"] = json::array({{{"id", int64_t(1) << 32}, {"content", "<x>"}, {"special", true}}});
  EXPECT_BOUNDED_ERROR(Tokenizer::from_json(j, json::object()), "added_tokens[0].id = 4294967296 is not a token id");
  j["added_tokens"][0]["id"] = -1;
  EXPECT_BOUNDED_ERROR(Tokenizer::from_json(j, json::object()), "added_tokens[0].id = -1 is not a token id");
  // Token 0 is untouched by the rejected file and a valid id works.
  j["added_tokens"][0]["id"] = 3;
  const Tokenizer tok = Tokenizer::from_json(j, json::object());
  EXPECT_EQ(tok.id_to_token(0), "a");
  EXPECT_EQ(tok.encode("<x>a"), (std::vector<int32_t>{3, 0}));
}

TEST(HostileInput, TokenizerRegexDeepParentheses) {
  const std::string pattern = repeat("(", 5000) + "a" + repeat(")", 5000);
  EXPECT_BOUNDED_ERROR(Regex r(pattern), "nest deeper than");
  json j = tiny_tokenizer();
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", pattern}}}, {"behavior", "Isolated"}};
  EXPECT_BOUNDED_ERROR(Tokenizer::from_json(j, json::object()), "nest deeper than");
  EXPECT_BOUNDED_ERROR(Regex r(repeat("(?=", 4000) + "a" + repeat(")", 4000)), "nest deeper than");
  EXPECT_BOUNDED_ERROR(Regex r(repeat("(", 100000) + "a" + repeat(")", 100000)), "above the limit of 16384");
  EXPECT_BOUNDED_ERROR(Regex r(std::string(5000, 'a')), "character classes");
  EXPECT_BOUNDED_ERROR(Regex r("((((ab){100}){100}){100})"), "instructions");
  EXPECT_BOUNDED_ERROR(Regex r("a**"), "nothing to repeat");
}

TEST(HostileInput, TokenizerRegexCatastrophicBacktracking) {
  // (?:a|a)*b backtracks 2^n ways on a run of a's without a b.
  EXPECT_BOUNDED_ERROR(
      {
        Regex re("(?:a|a)*b");
        std::vector<uint32_t> cps(64, 'a');
        size_t b = 0; size_t e = 0;
        re.find(cps, 0, &b, &e);
      },
      "catastrophic backtracking");
  json j = tiny_tokenizer();
  j["pre_tokenizer"] = {{"type", "Split"}, {"pattern", {{"Regex", "(?:a|a)*b"}}}, {"behavior", "Isolated"}};
  const Tokenizer tok = Tokenizer::from_json(j, json::object());
  EXPECT_EQ(tok.encode("ab"), (std::vector<int32_t>{2}));  // fine on short input
  EXPECT_BOUNDED_ERROR(tok.encode(std::string(10000, 'a')), "catastrophic backtracking");
  // Nested quantifiers of the same kind.
  EXPECT_BOUNDED_ERROR(
      {
        Regex re("(?:(?:a+)+)+c");
        std::vector<uint32_t> cps(5000, 'a');
        size_t b = 0; size_t e = 0;
        re.find(cps, 0, &b, &e);
      },
      "catastrophic backtracking");
}

// ---- config.json sizes ----------------------------------------------------------------------

TEST(HostileInput, ConfigSizesBounded) {
  const std::string base = R"("model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 8,
      "num_experts_per_tok": 2)";
  EXPECT_NO_THROW(parse_hf_config("{" + base + R"(, "vocab_size": 32000})", "config.json"));
  EXPECT_BOUNDED_ERROR(parse_hf_config("{" + base + R"(, "vocab_size": 1000000000000})", "config.json"),
                       "field 'vocab_size' is 1000000000000, above the limit of");
  EXPECT_BOUNDED_ERROR(parse_hf_config(R"({"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
      "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "num_local_experts": 100000000,
      "num_experts_per_tok": 2, "vocab_size": 32000})", "config.json"),
                       "field 'num_local_experts' is 100000000, above the limit of");
}

TEST(HostileInput, PlannerProductsDoNotOverflow) {
  // Every size at (or just below) its limit: the planner must refuse the total, not report a
  // negative size that "fits".
  const std::string huge = R"({"model_type": "deepseek_v3", "vocab_size": 4194304, "hidden_size": 65536,
      "num_attention_heads": 1024, "q_lora_rank": 65536, "kv_lora_rank": 65536, "qk_rope_head_dim": 4096,
      "qk_nope_head_dim": 4096, "v_head_dim": 4096, "intermediate_size": 262144, "moe_intermediate_size": 262144,
      "n_routed_experts": 16384, "num_experts_per_tok": 16384, "n_shared_experts": 64, "num_hidden_layers": 1024,
      "num_nextn_predict_layers": 1024})";
  EXPECT_BOUNDED_ERROR(plan_model_from_hf_json(huge, "config.json"), "above the planner's limit");
  const std::string too_many_layers =
      R"({"model_type": "olmoe", "vocab_size": 100, "hidden_size": 64, "num_attention_heads": 4,
      "intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2, "num_hidden_layers": 1000000000000000})";
  EXPECT_BOUNDED_ERROR(plan_model_from_hf_json(too_many_layers, "config.json"), "num_hidden_layers");
  const std::string float_cast = R"({"model_type": "olmoe", "vocab_size": 1e300, "hidden_size": 64,
      "num_attention_heads": 4, "intermediate_size": 32, "num_experts": 4, "num_experts_per_tok": 2,
      "num_hidden_layers": 2})";
  EXPECT_BOUNDED_ERROR(plan_model_from_hf_json(float_cast, "config.json"), "field 'vocab_size' must be an integer");
  const std::string zero_heads = R"({"model_type": "gpt_oss", "vocab_size": 100, "hidden_size": 64,
      "num_attention_heads": 0, "intermediate_size": 32, "num_local_experts": 4, "num_experts_per_tok": 2,
      "num_hidden_layers": 2})";
  EXPECT_BOUNDED_ERROR(plan_model_from_hf_json(zero_heads, "config.json"), "num_attention_heads");
}

// ---- price files (moe plan --prices) ------------------------------------------------------------

TEST(HostileInput, PriceFileErrorsNameTheFile) {
  const std::string d = temp_dir("prices");
  EXPECT_BOUNDED_ERROR(load_prices(d + "/missing.json"), d + "/missing.json: cannot open");
  EXPECT_BOUNDED_ERROR(load_prices(d), d + ": is a directory");
  std::ofstream(d + "/deep.json") << repeat("[", 100000) << repeat("]", 100000);
  EXPECT_BOUNDED_ERROR(load_prices(d + "/deep.json"), d + "/deep.json: JSON nests deeper than");
  std::ofstream(d + "/bad.json") << R"({"gpu_hour": {"H100-80GB": "cheap"}})";
  EXPECT_BOUNDED_ERROR(load_prices(d + "/bad.json"), d + "/bad.json: gpu_hour.H100-80GB must be a non-negative");
}

// ---- the CLI: one clear line and a non-zero exit ------------------------------------------------

TEST(HostileInput, CliReportsOneLine) {
  const std::string d = temp_dir("cli");
  std::ofstream(d + "/config.json") << "{\"model_type\": \"mixtral\", \"vocab_size\": " << repeat("[", 100000)
                                    << repeat("]", 100000) << "}";
  const std::string cmd = std::string(MOE_BINARY_DIR) + "/moe plan '" + d + "' > '" + d + "/out.txt' 2> '" + d +
                          "/err.txt'";
  const int rc = std::system(cmd.c_str());
  ASSERT_TRUE(WIFEXITED(rc));
  EXPECT_EQ(WEXITSTATUS(rc), 1);
  std::ifstream err(d + "/err.txt");
  std::string line, rest;
  std::getline(err, line);
  std::getline(err, rest, '\0');
  EXPECT_EQ(line.rfind("moe: error: ", 0), 0u) << line;
  EXPECT_NE(line.find("config.json: JSON nests deeper than"), std::string::npos) << line;
  EXPECT_EQ(rest, "");
}

}  // namespace
}  // namespace moe
