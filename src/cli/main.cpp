// main.cpp — the `moe` command: parses the subcommand and reports errors (the only place that
// turns a moe::Error into an exit code).
#include <cstdio>

#include "cli/commands.h"
#include "core/error.h"
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
  moe::add_bench_command(app);
  moe::add_plan_command(app);
  moe::add_tokenize_command(app);
  moe::add_quantize_command(app);
  moe::add_grad_command(app);
  moe::add_report_command(app);
  moe::add_train_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moe::Error& e) {
    std::fprintf(stderr, "moe: error: %s\n", e.what());
    return 1;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "moe: unexpected error: %s\n", e.what());
    return 2;
  }
  return 0;
}
