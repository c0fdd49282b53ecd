// cmd_tokenize.cpp — `moe tokenize DIR` (encode/decode/chat template) and `moe bench tokenize`
// (encode throughput against the JavaScript reference, @huggingface/tokenizers, in the same run).
// DIR holds tokenizer.json (+ tokenizer_config.json), or a SentencePiece tokenizer.model.
//
//   moe tokenize DIR --text "..."            ids of the text as a JSON array
//   moe tokenize DIR --file F                F: one JSON string per line -> one JSON array per line
//   moe tokenize DIR --decode --text "[..]"  ids (JSON array) -> JSON string; with --file, per line
//   moe tokenize DIR --chat M.json [--add-generation-prompt]   render the chat template for the
//                                            messages in M.json (a JSON array), print a JSON string
//   --no-special-tokens                      encode with add_special_tokens = false
//   --skip-special-tokens                    decode without special tokens
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>
#include <unistd.h>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "core/file_util.h"
#include "core/json_util.h"
#include "tokenizer/chat_template.h"
#include "tokenizer/tokenizer.h"
#include "tokenizer/tokenizer_bench.h"

namespace moe {
namespace {

std::vector<int32_t> parse_id_array(const std::string& text, const std::string& where) {
  const nlohmann::json j = parse_json(text, where);
  MOE_CHECK(j.is_array(), "%s: expected a JSON array of token ids, got %s", where.c_str(), json_brief(j).c_str());
  std::vector<int32_t> ids;
  for (const auto& v : j) {
    MOE_CHECK(v.is_number_integer() && v.get<int64_t>() >= 0 && v.get<int64_t>() <= INT32_MAX,
              "%s: '%s' is not a token id", where.c_str(), json_brief(v).c_str());
    ids.push_back(v.get<int32_t>());
  }
  return ids;
}

std::string json_string(const std::string& s) {
  return nlohmann::json(s).dump(-1, ' ', false, nlohmann::json::error_handler_t::replace);
}

std::string source_root() {
  std::string f = __FILE__;  // <root>/src/cli/cmd_tokenize.cpp
  for (int k = 0; k < 3 && f.rfind('/') != std::string::npos; ++k) f = f.substr(0, f.rfind('/'));
  return f;
}

}  // namespace

void add_tokenize_command(CLI::App& app) {
  struct Opts {
    std::string dir, text, file, chat;
    bool decode = false, no_special = false, skip_special = false, gen_prompt = false, have_text = false;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand("tokenize", "encode/decode text with a HF tokenizer directory (tokenizer.json or tokenizer.model)");
  cmd->add_option("dir", o->dir, "directory with tokenizer.json or a SentencePiece tokenizer.model (and "
                                 "tokenizer_config.json)")->required();
  auto* text = cmd->add_option("--text", o->text, "the text (or, with --decode, a JSON array of ids)");
  auto* file = cmd->add_option("--file", o->file, "one JSON string (or, with --decode, JSON array) per line");
  auto* chat = cmd->add_option("--chat", o->chat, "JSON file with a messages array: render the chat template");
  text->excludes(file)->excludes(chat);
  file->excludes(chat);
  cmd->add_flag("--decode", o->decode, "decode ids to text");
  cmd->add_flag("--no-special-tokens", o->no_special, "encode with add_special_tokens=False");
  cmd->add_flag("--skip-special-tokens", o->skip_special, "decode without special tokens");
  cmd->add_flag("--add-generation-prompt", o->gen_prompt, "with --chat: end with the assistant prompt");
  cmd->callback([o, text]() {
    if (!o->chat.empty()) {
      const nlohmann::ordered_json messages = parse_ordered_json(read_file(o->chat), o->chat);
      std::printf("%s\n", json_string(ChatTemplate::from_dir(o->dir).apply(messages, o->gen_prompt)).c_str());
      return;
    }
    MOE_CHECK(text->count() > 0 || !o->file.empty(), "tokenize: give --text, --file or --chat");
    Tokenizer tok = Tokenizer::from_dir(o->dir);
    auto one = [&](const std::string& input, const std::string& where) {
      if (o->decode) return json_string(tok.decode(parse_id_array(input, where), o->skip_special));
      return ids_to_json(tok.encode(input, !o->no_special));
    };
    if (text->count() > 0) {
      std::printf("%s\n", one(o->text, "--text").c_str());
      return;
    }
    std::ifstream f(o->file);
    MOE_CHECK(f.good(), "--file: cannot open %s", o->file.c_str());
    std::string line;
    size_t n = 0;
    while (std::getline(f, line)) {
      ++n;
      if (line.empty()) continue;
      const std::string where = o->file + ":" + std::to_string(n);
      if (o->decode) {
        std::printf("%s\n", one(line, where).c_str());
        continue;
      }
      const nlohmann::json j = parse_json(line, where);
      MOE_CHECK(j.is_string(), "%s: expected a JSON string, got %s", where.c_str(), j.type_name());
      std::printf("%s\n", one(j.get<std::string>(), where).c_str());
    }
  });
}

void add_tokenize_bench(CLI::App* bench) {
  struct Opts {
    std::string dir, js, node = "node";
    double seconds = 2.0, megabytes = 1.0;
    bool json = false;
  };
  auto o = std::make_shared<Opts>();
  o->js = source_root() + "/tests/tokenizer/bench_js.mjs";
  CLI::App* cmd = bench->add_subcommand("tokenize", "encode MB/s against the JavaScript reference in the same run");
  cmd->add_option("dir", o->dir, "tokenizer directory (tokenizer.json or tokenizer.model, + tokenizer_config.json)")
      ->required();
  cmd->add_option("--seconds", o->seconds, "minimum timed seconds per implementation")->capture_default_str()
      ->check(CLI::Range(0.1, 600.0));
  cmd->add_option("--mb", o->megabytes, "corpus size in MB")->capture_default_str()->check(CLI::Range(0.01, 1000.0));
  cmd->add_option("--js-bench", o->js, "path of bench_js.mjs (needs tests/tokenizer/setup.sh's npm install); "
                                       "'' to skip the reference")->capture_default_str();
  cmd->add_option("--node", o->node, "node executable")->capture_default_str();
  cmd->add_flag("--json", o->json, "also print one JSON line");
  cmd->callback([o]() {
    Tokenizer tok = Tokenizer::from_dir(o->dir);
    const auto corpus = tokenizer_bench_corpus(size_t(o->megabytes * 1e6));
    const EncodeBenchResult r = bench_encode(tok, corpus, o->seconds);
    std::printf("moe encode: %.1f MB in %.2f s = %.2f MB/s (%.2f Mtokens/s)\n", r.bytes / 1e6, r.seconds, r.mb_per_s(),
                double(r.tokens) / r.seconds / 1e6);
    double js_mbs = 0;
    const bool has_json = std::ifstream(o->dir + "/tokenizer.json").good();
    if (!o->js.empty() && !has_json)
      std::printf("reference: skipped (no tokenizer.json: a SentencePiece tokenizer.model directory)\n");
    if (!o->js.empty() && has_json) {
      char tmpl[] = "/tmp/moe-tokbench-XXXXXX";
      const int fd = mkstemp(tmpl);
      MOE_CHECK(fd >= 0, "cannot create a temporary file");
      {
        std::ofstream f(tmpl);
        for (const auto& t : corpus) f << json_string(t) << "\n";
      }
      ::close(fd);
      const std::string cmdline = "'" + o->node + "' '" + o->js + "' '" + o->dir + "' '" + tmpl + "' " +
                                  std::to_string(o->seconds) + " 2>&1";
      std::string out;
      if (FILE* p = popen(cmdline.c_str(), "r")) {
        char buf[4096];
        while (size_t n = fread(buf, 1, sizeof buf, p)) out.append(buf, n);
        const int rc = pclose(p);
        std::remove(tmpl);
        const size_t brace = out.rfind('{');
        if (rc == 0 && brace != std::string::npos) {
          const auto j = nlohmann::json::parse(out.substr(brace), nullptr, false);
          if (!j.is_discarded() && j.contains("mb_per_s")) js_mbs = j["mb_per_s"].get<double>();
        }
        if (js_mbs <= 0) std::printf("reference: failed (%s): %s\n", cmdline.c_str(), out.c_str());
      }
    }
    if (js_mbs > 0)
      std::printf("reference (@huggingface/tokenizers, node): %.2f MB/s; speedup %.1fx (target >= 10x)\n", js_mbs,
                  r.mb_per_s() / js_mbs);
    if (o->json)
      std::printf("{\"bench\":\"tokenize\",\"dir\":%s,\"bytes\":%.0f,\"seconds\":%.6f,\"tokens\":%lld,\"mb_per_s\":%.4f,"
                  "\"reference_mb_per_s\":%.4f,\"speedup\":%.3f}\n",
                  json_string(o->dir).c_str(), r.bytes, r.seconds, (long long)r.tokens, r.mb_per_s(), js_mbs,
                  js_mbs > 0 ? r.mb_per_s() / js_mbs : 0.0);
  });
}

}  // namespace moe
