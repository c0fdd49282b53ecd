// test_report.cpp — the training report (train/report.h): a synthetic metrics.jsonl becomes one
// self-contained HTML file with the documented charts, series, heatmaps and summary; bad input
// is an error naming the file and line, and never replaces an existing report.
#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>
#include <functional>
#include <regex>
#include <sstream>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "train/report.h"

namespace fs = std::filesystem;
using namespace moe;
using nlohmann::json;

namespace {

void expect_error(const std::function<void()>& fn, std::initializer_list<std::string> parts) {
  try {
    fn();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const auto& p : parts) EXPECT_NE(msg.find(p), std::string::npos) << "'" << p << "' not in: " << msg;
    return;
  }
  ADD_FAILURE() << "expected moe::Error";
}

std::string read(const std::string& p) {
  std::ifstream in(p, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

size_t count(const std::string& s, const std::string& what) {
  size_t n = 0;
  for (size_t at = s.find(what); at != std::string::npos; at = s.find(what, at + 1)) ++n;
  return n;
}

// The text of the element that starts with `open_tag_prefix` up to the matching `close`.
std::string element(const std::string& html, const std::string& open_tag_prefix, const std::string& close) {
  const size_t a = html.find(open_tag_prefix);
  if (a == std::string::npos) return "";
  const size_t b = html.find(close, a);
  return html.substr(a, b == std::string::npos ? std::string::npos : b + close.size() - a);
}

class ReportTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/moe_report_test.XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  void write(const std::string& name, const std::string& text) { std::ofstream(dir_ + "/" + name) << text; }
  std::string dir_;
};

// 30 steps, 2 MoE layers of 4 experts. Layer 0: expert 2 receives every token; layer 1: uniform.
// Validation every 10 steps; step 7 has a NaN loss written as null. The MoE layers are the model's
// layers 1 and 3.
std::string synthetic_metrics() {
  std::string out;
  for (int s = 0; s < 30; ++s) {
    json j = {{"step", s},
              {"loss", s == 7 ? json(nullptr) : json(4.0 - 0.1 * s)},
              {"loss_ce", 3.9 - 0.1 * s},
              {"aux_loss", 1.0 + 0.01 * s},
              {"z_loss", 0.0},
              {"lr", 1e-3},
              {"tokens_per_s", 5000.0 + 2 * s},  // mean 5029
              {"grad_norm", 1.5},
              {"elapsed_s", 0.5 * s},
              {"expert_load", {{0, 0, 64, 0}, {16, 16, 16, 16}}},
              {"load_cv", {1.7320508, 0.0}},
              {"load_max_mean", {4.0, 1.0}},
              {"dropped", {0, 0}},
              {"moe_layers", {1, 3}}};  // layers 0 and 2 of the model are dense
    if (s % 10 == 9) j["val_loss"] = 5.0 - 0.2 * s;  // steps 9, 19, 29; best at 29: -0.8
    out += j.dump() + "\n";
  }
  return out;
}

TEST_F(ReportTest, WritesSelfContainedHtmlWithEveryChart) {
  write("metrics.jsonl", synthetic_metrics());
  write("config.json", R"({"model_type": "mixtral", "num_hidden_layers": 2, "num_local_experts": 4})");
  write("train_config.json", R"({"lr": 0.001, "batch_size": 8, "initial_val_loss": 8.0})");
  const std::string out = dir_ + "/report.html";
  const ReportSummary sum = write_report(dir_, out);
  EXPECT_EQ(sum.n_steps, 30);
  EXPECT_EQ(sum.n_layers, 2);
  EXPECT_EQ(sum.n_val, 3);
  const std::string html = read(out);
  EXPECT_EQ(int64_t(html.size()), sum.bytes);
  EXPECT_EQ(html.rfind("<!DOCTYPE html>", 0), 0u);
  EXPECT_NE(html.find("</html>"), std::string::npos);

  // Self-contained: nothing fetched from elsewhere (the only URL is the SVG namespace name).
  EXPECT_EQ(count(html, "<script"), 0u);
  EXPECT_EQ(count(html, "<link"), 0u);
  EXPECT_EQ(count(html, " src="), 0u);
  EXPECT_EQ(count(html, "@import"), 0u);
  EXPECT_EQ(count(html, "http"), count(html, "xmlns=\"http://www.w3.org/2000/svg\""));

  // Title from config.json, settings from train_config.json.
  EXPECT_NE(html.find("model mixtral"), std::string::npos);
  EXPECT_NE(html.find("id=\"train-config\""), std::string::npos);
  EXPECT_NE(html.find("batch_size"), std::string::npos);

  for (const char* id : {"chart-loss", "chart-aux", "chart-lr", "chart-tokens", "chart-grad-norm", "chart-balance"}) {
    const std::string svg = element(html, std::string("<svg id=\"") + id + "\"", "</svg>");
    ASSERT_FALSE(svg.empty()) << id;
    EXPECT_NE(svg.find("class=\"chart-title\""), std::string::npos) << id;
    EXPECT_NE(svg.find("class=\"axis x-axis\""), std::string::npos) << id;
    EXPECT_NE(svg.find("class=\"axis y-axis\""), std::string::npos) << id;
    EXPECT_GE(count(svg, "class=\"tick\""), 4u) << id << ": tick labels";
    EXPECT_EQ(svg.find("no-data"), std::string::npos) << id;
  }
  const std::string loss = element(html, "<svg id=\"chart-loss\"", "</svg>");
  // Train loss: 29 points (step 7 was null); loss_ce differs from loss, so it is drawn too.
  EXPECT_NE(loss.find("data-name=\"train loss\" data-points=\"29\""), std::string::npos);
  EXPECT_NE(loss.find("data-name=\"train cross-entropy\" data-points=\"30\""), std::string::npos);
  // Validation: the initial loss of train_config.json (before step 0) and steps 9, 19, 29.
  EXPECT_NE(loss.find("data-name=\"validation loss\" data-points=\"4\""), std::string::npos);
  // The z-loss is all zero: not drawn beside the aux loss.
  const std::string aux = element(html, "<svg id=\"chart-aux\"", "</svg>");
  EXPECT_NE(aux.find("data-name=\"router aux loss\" data-points=\"30\""), std::string::npos);
  EXPECT_EQ(aux.find("z-loss"), std::string::npos);
  const std::string bal = element(html, "<svg id=\"chart-balance\"", "</svg>");
  EXPECT_NE(bal.find("data-name=\"layer 1\""), std::string::npos);  // the model's layer numbers
  EXPECT_NE(bal.find("data-name=\"layer 3\""), std::string::npos);

  // Heatmaps: one per layer, 4 expert rows x 30 step columns, with a legend.
  for (int layer : {0, 1}) {
    const std::string tag = "<svg class=\"heatmap\" id=\"heatmap-layer-" + std::to_string(layer) + "\" data-layer=\"" +
                            std::to_string(layer) + "\"";
    const std::string svg = element(html, tag, "</svg>");
    ASSERT_FALSE(svg.empty()) << "layer " << layer;
    EXPECT_NE(svg.find("data-experts=\"4\" data-columns=\"30\" data-model-layer=\"" + std::to_string(2 * layer + 1)),
              std::string::npos);
    EXPECT_NE(svg.find("Expert load, layer " + std::to_string(2 * layer + 1)), std::string::npos);
    const std::string cells = element(svg, "<g class=\"cells\"", "</g>");
    EXPECT_EQ(count(cells, "<rect"), 120u);
    EXPECT_NE(svg.find("class=\"legend\""), std::string::npos);
    EXPECT_NE(svg.find("linearGradient"), std::string::npos);
    EXPECT_NE(svg.find("1/E"), std::string::npos);
    EXPECT_GE(count(svg, "class=\"tick\""), 6u);
  }
  // Layer 0: expert 2 holds every token, so its cells are the top of the colour scale (#fde725)
  // and the other 90 cells the bottom (#440154); layer 1 is uniform: all cells one colour.
  const std::string cells0 = element(element(html, "id=\"heatmap-layer-0\"", "</svg>"), "<g class=\"cells\"", "</g>");
  EXPECT_EQ(count(cells0, "fill=\"#fde725\""), 30u);
  EXPECT_EQ(count(cells0, "fill=\"#440154\""), 90u);
  const std::string cells1 = element(element(html, "id=\"heatmap-layer-1\"", "</svg>"), "<g class=\"cells\"", "</g>");
  std::smatch m;
  ASSERT_TRUE(std::regex_search(cells1, m, std::regex("fill=\"(#[0-9a-f]{6})\"")));
  EXPECT_EQ(count(cells1, "fill=\"" + m[1].str() + "\""), 120u);

  // Summary.
  const std::string summary = element(html, "<table id=\"summary\"", "</table>");
  EXPECT_NE(element(summary, "<tr id=\"sum-best-val-loss\"", "</tr>").find("-0.8 (step 29)"), std::string::npos);
  EXPECT_NE(element(summary, "<tr id=\"sum-final-loss\"", "</tr>").find("1.1 (step 29)"), std::string::npos);
  EXPECT_NE(element(summary, "<tr id=\"sum-initial-val-loss\"", "</tr>").find("8 (step -1)"), std::string::npos);
  EXPECT_NE(element(summary, "<tr id=\"sum-val-ratio\"", "</tr>").find("-0.1"), std::string::npos);  // -0.8 / 8
  EXPECT_NE(element(summary, "<tr id=\"sum-mean-tokens-per-s\"", "</tr>").find("5029"), std::string::npos);
  const std::string layers = element(html, "<table id=\"layer-summary\"", "</table>");
  EXPECT_EQ(count(layers, "<tr>"), 3u);  // header + 2 layers
  EXPECT_NE(layers.find("<tr><td>1</td><td>4</td><td>1.732</td><td>4</td>"), std::string::npos);
  EXPECT_NE(layers.find("<tr><td>3</td><td>4</td><td>0</td><td>1</td>"), std::string::npos);

  // Atomic write: no temp file left beside it.
  for (const auto& e : fs::directory_iterator(dir_))
    EXPECT_EQ(e.path().filename().string().find(".tmp"), std::string::npos) << e.path();
}

TEST_F(ReportTest, ChartsWithoutDataSayNoData) {
  write("metrics.jsonl", "{\"step\": 1, \"loss\": 2.0}\n{\"step\": 2, \"loss\": 1.5}\n");
  fs::create_directories(dir_ + "/final");  // the final checkpoint's config names the model
  write("final/config.json", R"({"model_type": "qwen3_moe", "num_experts": 16})");
  const std::string out = dir_ + "/r.html";
  const ReportSummary sum = write_report(dir_, out);
  EXPECT_EQ(sum.n_layers, 0);
  const std::string html = read(out);
  EXPECT_NE(element(html, "<svg id=\"chart-loss\"", "</svg>").find("data-points=\"2\""), std::string::npos);
  for (const char* id : {"chart-aux", "chart-lr", "chart-tokens"})
    EXPECT_NE(element(html, std::string("<svg id=\"") + id + "\"", "</svg>").find("no-data"), std::string::npos)
        << id;
  EXPECT_EQ(html.find("class=\"heatmap\""), std::string::npos);
  EXPECT_NE(html.find("model qwen3_moe · experts 16"), std::string::npos);
}

TEST_F(ReportTest, LongRunsAreDecimatedKeepingSpikes) {
  // 20000 steps of loss 1 with one spike of 100 at step 12345: the polyline is thinned to a few
  // points per pixel column, and the spike still reaches the top of the plot frame (y range [0,100]).
  std::string text;
  for (int s = 0; s < 20000; ++s) text += "{\"step\":" + std::to_string(s) + ",\"loss\":" + (s == 12345 ? "100" : "1") + "}\n";
  write("metrics.jsonl", text);
  write_report(dir_, dir_ + "/r.html");
  const std::string svg = element(read(dir_ + "/r.html"), "<svg id=\"chart-loss\"", "</svg>");
  EXPECT_NE(svg.find("data-points=\"20000\""), std::string::npos);
  std::smatch m;
  ASSERT_TRUE(std::regex_search(svg, m, std::regex("<rect class=\"frame\" x=\"[0-9.]+\" y=\"([0-9.]+)\"")));
  const double frame_top = std::stod(m[1].str());
  const std::string pts = element(svg, "points=\"", "\"/>");
  size_t n_points = 0;
  double min_y = 1e9;
  const std::regex pt("([0-9.]+),([0-9.]+)");
  for (auto it = std::sregex_iterator(pts.begin(), pts.end(), pt); it != std::sregex_iterator(); ++it) {
    ++n_points;
    min_y = std::min(min_y, std::stod((*it)[2].str()));
  }
  EXPECT_LT(n_points, 3000u);
  EXPECT_GT(n_points, 500u);
  EXPECT_NEAR(min_y, frame_top, 0.05);
}

TEST_F(ReportTest, BadInputNamesFileAndLineAndKeepsTheOldReport) {
  const std::string out = dir_ + "/report.html";
  const std::string metrics = dir_ + "/metrics.jsonl";
  expect_error([&] { write_report(dir_, out); }, {metrics, "cannot open"});
  write("metrics.jsonl", "");
  expect_error([&] { write_report(dir_, out); }, {metrics, "empty"});
  write("metrics.jsonl", "\n  \n");
  expect_error([&] { write_report(dir_, out); }, {metrics, "empty"});

  write("report.html", "old report");
  write("metrics.jsonl", "{\"step\": 0, \"loss\": 1}\n{\"step\": 1, \"loss\": 1}\n{\"step\": 2, \"loss\": \n");
  expect_error([&] { write_report(dir_, out); }, {metrics + ":3", "malformed JSON"});
  write("metrics.jsonl", "{\"step\": 0}\n[1]\n");
  expect_error([&] { write_report(dir_, out); }, {metrics + ":2", "object"});
  write("metrics.jsonl", "{\"loss\": 1}\n");
  expect_error([&] { write_report(dir_, out); }, {metrics + ":1", "\"step\""});
  write("metrics.jsonl", "{\"step\": 0, \"loss\": \"high\"}\n");
  expect_error([&] { write_report(dir_, out); }, {metrics + ":1", "\"loss\"", "number"});
  write("metrics.jsonl", "{\"step\": 0, \"expert_load\": [[1, 2]]}\n{\"step\": 1, \"expert_load\": [[1, 2, 3]]}\n");
  expect_error([&] { write_report(dir_, out); }, {metrics + ":2", "expert_load[0]", "3 experts"});
  write("metrics.jsonl", "{\"step\": 0, \"expert_load\": [[1, 2]]}\n{\"step\": 1, \"expert_load\": [[1, 2], [3, 4]]}\n");
  expect_error([&] { write_report(dir_, out); }, {metrics + ":2", "2 layers"});
  write("metrics.jsonl", "{\"step\": 0, \"expert_load\": [[1, -2]]}\n");
  expect_error([&] { write_report(dir_, out); }, {metrics + ":1", "expert_load[0]"});
  write("metrics.jsonl", "{\"step\": 0, \"load_cv\": 3}\n");
  expect_error([&] { write_report(dir_, out); }, {metrics + ":1", "load_cv"});
  write("metrics.jsonl", "{\"step\": 0, \"moe_layers\": [1.5]}\n");
  expect_error([&] { write_report(dir_, out); }, {metrics + ":1", "moe_layers"});
  write("metrics.jsonl", "{\"step\": 0, \"loss\": 1}\n");
  write("config.json", "{not json");
  expect_error([&] { write_report(dir_, out); }, {"config.json", "malformed JSON"});
  EXPECT_EQ(read(out), "old report");
  fs::remove(dir_ + "/config.json");
  write_report(dir_, out);
  EXPECT_NE(read(out), "old report");
}

}  // namespace
