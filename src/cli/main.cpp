// main.cpp — the `moe` command: parses the subcommand and reports errors (the only place that
// turns a moe::Error into an exit code).
#include <cstdio>
#include <filesystem>
#include <new>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "core/json_util.h"
#include "ops/ops.h"

int main(int argc, char** argv) {
  CLI::App app{"MoE Engine: run, fine-tune and train Mixture-of-Experts models"};
  app.require_subcommand(1);
  // Global flags (before add_*_command: subcommands inherit fallthrough, so the flag may also
  // come after the subcommand name).
  app.fallthrough();
  app.add_flag_callback("--reference", [] { moe::set_reference_backend(true); },
                        "run every op on the naive reference backend (slow; for telling a kernel bug from a model "
                        "bug)");
  moe::add_init_command(app);
  moe::add_inspect_command(app);
  moe::add_logits_command(app);
  moe::add_generate_command(app);
  moe::add_perplexity_command(app);
  moe::add_serve_command(app);
  moe::add_bench_command(app);
  moe::add_plan_command(app);
  moe::add_tokenize_command(app);
  moe::add_quantize_command(app);
  moe::add_grad_command(app);
  moe::add_report_command(app);
  moe::add_train_command(app);
  moe::add_finetune_command(app);
  moe::add_merge_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moe::Error& e) {
    std::fprintf(stderr, "moe: error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    // The library bounds what hostile input may allocate; this is a real shortage (or a bug).
    std::fprintf(stderr, "moe: error: out of memory\n");
    return 1;
  } catch (const std::filesystem::filesystem_error& e) {
    std::fprintf(stderr, "moe: error: %s\n", e.what());
    return 1;
  } catch (const nlohmann::json::exception& e) {
    std::fprintf(stderr, "moe: error: JSON: %s (this is a bug: it should have been reported with the file name)\n",
                 moe::json_error_text(e).c_str());
    return 2;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe: error: unexpected %s (this is a bug)\n", e.what());
    return 2;
  } catch (...) {
    std::fprintf(stderr, "moe: error: unknown exception (this is a bug)\n");
    return 2;
  }
  return 0;
}
