// commands.h — the `moe` subcommands. Each registers its options on a CLI11 App and returns the
// callback that runs it; errors are thrown as moe::Error and reported by main().
#pragma once
#include <CLI/CLI.hpp>

namespace moe {

void add_init_command(CLI::App& app);
void add_inspect_command(CLI::App& app);
void add_logits_command(CLI::App& app);
void add_generate_command(CLI::App& app);
void add_bench_command(CLI::App& app);
void add_plan_command(CLI::App& app);
void add_tokenize_command(CLI::App& app);
void add_quantize_command(CLI::App& app);
void add_grad_command(CLI::App& app);
void add_train_command(CLI::App& app);
void add_finetune_command(CLI::App& app);
void add_merge_command(CLI::App& app);
void add_tokenize_bench(CLI::App* bench);
void add_train_bench(CLI::App* bench);
void add_serve_bench(CLI::App* bench);
void add_dist_bench(CLI::App* bench);  // cmd_bench_dist.cpp
void add_report_command(CLI::App& app);
void add_perplexity_command(CLI::App& app);
void add_serve_command(CLI::App& app);

}  // namespace moe
