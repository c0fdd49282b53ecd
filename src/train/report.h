// report.h — the training report: RUN_DIR/metrics.jsonl -> one self-contained HTML file with
// inline SVG charts (no scripts, fonts, stylesheets or URLs from outside the file).
//
// Input: RUN_DIR/metrics.jsonl, one JSON object per optimizer step. "step" (integer) is required
// on every line; every other key is optional and charted where present:
//   loss, loss_ce, aux_loss, z_loss, lr, tokens_per_s, grad_norm, elapsed_s, val_loss (numbers;
//   null or absent = no point), expert_load [[tokens per expert] per MoE layer], load_cv,
//   load_max_mean, dropped ([per layer]), moe_layers (the model's layer index of each
//   expert_load entry, used in titles and labels).
// RUN_DIR/config.json (the model's HF config; else RUN_DIR/final/config.json, the final checkpoint's)
// and RUN_DIR/train_config.json, when present, give
// the title and a settings table; train_config.json's "initial_val_loss" (measured before the
// first step) is drawn as the first validation point, at the step before the first line.
//
// Output, with ids/classes a test can find:
//   <svg id="chart-loss">        train loss (and loss_ce when it differs) and validation loss
//   <svg id="chart-aux">         router aux loss (and z-loss)
//   <svg id="chart-lr">          learning rate
//   <svg id="chart-tokens">      tokens/s
//   <svg id="chart-grad-norm">   gradient norm
//   <svg id="chart-balance">     coefficient of variation of expert load, one line per layer
//   <svg class="heatmap" id="heatmap-layer-L" data-layer="L" data-model-layer="M">  per MoE layer L
//                                (M: its index among all layers, from "moe_layers"): experts (rows) x
//                                steps (columns, averaged into at most ~160 buckets), colour =
//                                that expert's share of the layer's routed tokens, with a legend
//                                (marking the uniform share 1/E)
//   <table id="summary">         final loss, best validation loss, mean tokens/s, ...
//   <table id="layer-summary">   final CV, max/mean load and dropped tokens per layer
// A chart whose key never appears is still present, with a "no data" note. Every chart has a
// title, axes with tick labels, and a <g class="series" data-name=...> per series.
//
// Errors (moe::Error): missing or empty metrics.jsonl, a malformed line or a wrong-typed field
// (naming file and line), malformed config.json / train_config.json. The HTML is written to a
// temp file in the same directory and renamed into place: a failed run never leaves a partial
// report, and an old report survives until the new one is complete.
#pragma once
#include <cstdint>
#include <string>

namespace moe {

struct ReportSummary {
  int64_t n_steps = 0;     // metrics lines
  int64_t n_layers = 0;    // MoE layers with expert-load data
  int64_t n_val = 0;       // steps with a validation loss
  int64_t bytes = 0;       // size of the HTML written
};

ReportSummary write_report(const std::string& run_dir, const std::string& out_html);

}  // namespace moe
