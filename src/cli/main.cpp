// main.cpp — the `moe` command: parses the subcommand and reports errors (the only place that
// turns a moe::Error into an exit code).
#include <cstdio>
#include <filesystem>
#include <new>
#include <string>

#include <nlohmann/json.hpp>

#include "cli/commands.h"
#include "core/error.h"
#include "core/json_util.h"
#include "dist/communicator.h"
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
  // Under mpirun a failing rank ends the whole job (its peers would wait in a collective);
  // the message names the rank.
  auto fail = [](int code, const std::string& msg) {
    if (moe::dist::launched_by_mpi())
      moe::dist::abort_job("moe: error (rank " + std::to_string(moe::dist::launch_rank()) + "): " + msg, code);
    std::fprintf(stderr, "moe: error: %s\n", msg.c_str());
    return code;
  };
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  } catch (const moe::Error& e) {
    return fail(1, e.what());
  } catch (const std::bad_alloc&) {
    // The library bounds what hostile input may allocate; this is a real shortage (or a bug).
    return fail(1, "out of memory");
  } catch (const std::filesystem::filesystem_error& e) {
    return fail(1, e.what());
  } catch (const nlohmann::json::exception& e) {
    return fail(2, "JSON: " + moe::json_error_text(e) +
                       " (this is a bug: it should have been reported with the file name)");
  } catch (const std::exception& e) {
    return fail(2, std::string("unexpected ") + e.what() + " (this is a bug)");
  } catch (...) {
    return fail(2, "unknown exception (this is a bug)");
  }
  moe::dist::finalize();
  return 0;
}
