// cmd_report.cpp — `moe report RUN_DIR [--out FILE]`: the training report (train/report.h) of a
// `moe train` run directory as one self-contained HTML file (default RUN_DIR/report.html).
#include <cstdio>
#include <filesystem>
#include <memory>
#include <string>

#include "cli/commands.h"
#include "train/report.h"

namespace moe {

void add_report_command(CLI::App& app) {
  struct Opts {
    std::string run_dir, out;
  };
  auto o = std::make_shared<Opts>();
  CLI::App* cmd = app.add_subcommand(
      "report", "write a training run's report: one self-contained HTML file with SVG charts (loss, validation "
                "loss, aux loss, lr, tokens/s, expert-load heatmaps)");
  cmd->add_option("run_dir", o->run_dir, "run directory of `moe train` (holds metrics.jsonl)")->required();
  cmd->add_option("--out", o->out, "output HTML file (default RUN_DIR/report.html)");
  cmd->callback([o]() {
    const std::string out =
        o->out.empty() ? (std::filesystem::path(o->run_dir) / "report.html").string() : o->out;
    const ReportSummary s = write_report(o->run_dir, out);
    std::printf("%s\n", out.c_str());
    std::fprintf(stderr, "report: %lld steps, %lld validation points, %lld MoE layers, %lld bytes\n",
                 (long long)s.n_steps, (long long)s.n_val, (long long)s.n_layers, (long long)s.bytes);
  });
}

}  // namespace moe
