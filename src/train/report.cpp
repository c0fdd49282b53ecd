// report.cpp — metrics.jsonl -> self-contained HTML with inline SVG charts (see report.h).
#include "train/report.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <map>
#include <sstream>
#include <vector>

#include <nlohmann/json.hpp>

#include "core/error.h"
#include "core/json_util.h"

namespace moe {
namespace {

using nlohmann::json;
namespace fs = std::filesystem;

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

// ---- reading ----

struct Step {
  int64_t step = 0;
  std::map<std::string, double> scalar;            // finite numbers only
  std::vector<std::vector<double>> expert_load;    // [layer][expert]
  std::map<std::string, std::vector<double>> per_layer;  // load_cv, load_max_mean, dropped
  std::vector<int64_t> moe_layers;  // the model's layer index of each expert_load entry
};

const char* const kScalarKeys[] = {"loss",    "loss_ce",   "aux_loss", "z_loss",   "lr",
                                   "tokens_per_s", "grad_norm", "elapsed_s", "val_loss"};
const char* const kLayerKeys[] = {"load_cv", "load_max_mean", "dropped"};

// A number, or NaN for null (non-finite values are written as null by JSON writers).
double number_or_nan(const json& v, const std::string& where, const char* key) {
  if (v.is_null()) return kNaN;
  MOE_CHECK(v.is_number(), "%s: \"%s\" must be a number or null, got %s", where.c_str(), key, v.type_name());
  return v.get<double>();
}

std::vector<Step> read_metrics(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  MOE_CHECK(in.good(), "%s: cannot open (is this a training run directory?)", path.c_str());
  std::vector<Step> steps;
  std::string line;
  int64_t number = 0;
  size_t n_layers = 0;
  while (std::getline(in, line)) {
    ++number;
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.find_first_not_of(" \t") == std::string::npos) continue;
    const std::string where = path + ":" + std::to_string(number);
    json j;
    try {
      j = json::parse(line);
    } catch (const json::exception& e) {
      MOE_FAIL("%s: malformed JSON: %s", where.c_str(), json_error_text(e).c_str());
    }
    MOE_CHECK(j.is_object(), "%s: expected a JSON object, got %s", where.c_str(), j.type_name());
    Step s;
    MOE_CHECK(j.contains("step") && j["step"].is_number_integer(), "%s: \"step\" missing or not an integer",
              where.c_str());
    s.step = j["step"].get<int64_t>();
    for (const char* key : kScalarKeys) {
      if (!j.contains(key)) continue;
      const double v = number_or_nan(j[key], where, key);
      if (std::isfinite(v)) s.scalar[key] = v;
    }
    if (j.contains("expert_load") && !j["expert_load"].is_null()) {
      const json& el = j["expert_load"];
      MOE_CHECK(el.is_array(), "%s: \"expert_load\" must be an array (per layer) of arrays (per expert)",
                where.c_str());
      for (size_t l = 0; l < el.size(); ++l) {
        MOE_CHECK(el[l].is_array() && !el[l].empty(), "%s: expert_load[%zu] must be a non-empty array of numbers",
                  where.c_str(), l);
        std::vector<double> row;
        for (const json& v : el[l]) {
          MOE_CHECK(v.is_number() && v.get<double>() >= 0, "%s: expert_load[%zu] holds %s, expected counts >= 0",
                    where.c_str(), l, v.dump().c_str());
          row.push_back(v.get<double>());
        }
        s.expert_load.push_back(std::move(row));
      }
    }
    for (const char* key : kLayerKeys) {
      if (!j.contains(key) || j[key].is_null()) continue;
      MOE_CHECK(j[key].is_array(), "%s: \"%s\" must be an array (one number per layer), got %s", where.c_str(), key,
                j[key].type_name());
      std::vector<double> v;
      for (const json& x : j[key]) v.push_back(number_or_nan(x, where, key));
      s.per_layer[key] = std::move(v);
    }
    if (j.contains("moe_layers") && !j["moe_layers"].is_null()) {
      MOE_CHECK(j["moe_layers"].is_array(), "%s: \"moe_layers\" must be an array of layer indices", where.c_str());
      for (const json& v : j["moe_layers"]) {
        MOE_CHECK(v.is_number_integer(), "%s: \"moe_layers\" holds %s, expected layer indices", where.c_str(),
                  v.dump().c_str());
        s.moe_layers.push_back(v.get<int64_t>());
      }
    }
    // The layer and expert counts must not change between lines.
    if (!s.expert_load.empty()) {
      if (n_layers == 0) n_layers = s.expert_load.size();
      MOE_CHECK(s.expert_load.size() == n_layers, "%s: expert_load has %zu layers, earlier lines have %zu",
                where.c_str(), s.expert_load.size(), n_layers);
      for (const Step& prev : steps) {
        if (prev.expert_load.empty()) continue;
        for (size_t l = 0; l < n_layers; ++l)
          MOE_CHECK(s.expert_load[l].size() == prev.expert_load[l].size(),
                    "%s: expert_load[%zu] has %zu experts, earlier lines have %zu", where.c_str(), l,
                    s.expert_load[l].size(), prev.expert_load[l].size());
        break;
      }
    }
    steps.push_back(std::move(s));
  }
  MOE_CHECK(!in.bad(), "%s: read error", path.c_str());
  MOE_CHECK(!steps.empty(), "%s: no metrics (the file is empty)", path.c_str());
  return steps;
}

json read_optional_json(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) return nullptr;
  std::ifstream in(path, std::ios::binary);
  MOE_CHECK(in.good(), "%s: cannot open", path.c_str());
  std::stringstream ss;
  ss << in.rdbuf();
  return parse_json_object(ss.str(), path);
}

// ---- formatting ----

std::string esc(const std::string& s) {
  std::string o;
  o.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      case '\'': o += "&#39;"; break;
      default: o += c;
    }
  }
  return o;
}

// A number for humans: 4 significant digits, no trailing zeros.
std::string fmt(double v) {
  if (!std::isfinite(v)) return "–";
  if (v == 0) return "0";
  char buf[64];
  const double a = std::fabs(v);
  if (a >= 1e7 || a < 1e-3)
    std::snprintf(buf, sizeof buf, "%.3g", v);
  else if (a >= 1000)
    std::snprintf(buf, sizeof buf, "%.0f", v);
  else
    std::snprintf(buf, sizeof buf, "%.4g", v);
  return buf;
}

// Coordinates with one decimal (keeps the SVG small).
std::string px(double v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.1f", v);
  return buf;
}

// "Nice" tick values (1, 2, 2.5, 5 x 10^k) covering [lo, hi], about `target` of them.
std::vector<double> nice_ticks(double lo, double hi, int target) {
  if (!(hi > lo)) return {lo};
  const double raw = (hi - lo) / std::max(1, target);
  const double mag = std::pow(10.0, std::floor(std::log10(raw)));
  double step = mag;
  for (double m : {1.0, 2.0, 2.5, 5.0, 10.0})
    if (m * mag >= raw) {
      step = m * mag;
      break;
    }
  std::vector<double> t;
  for (double v = std::ceil(lo / step - 1e-9) * step; v <= hi + step * 1e-9; v += step)
    t.push_back(std::fabs(v) < step * 1e-9 ? 0.0 : v);
  return t;
}

// Expands [lo, hi] outward to nice tick boundaries (and away from a zero-width range).
void nice_range(double* lo, double* hi) {
  if (!(*hi > *lo)) {
    const double pad = *lo == 0 ? 1.0 : std::fabs(*lo) * 0.1;
    *lo -= pad;
    *hi += pad;
  }
  const auto t = nice_ticks(*lo, *hi, 5);
  if (t.size() >= 2) {
    const double step = t[1] - t[0];
    *lo = std::floor(*lo / step + 1e-9) * step;
    *hi = std::ceil(*hi / step - 1e-9) * step;
  }
}

// ---- line charts ----

struct Series {
  std::string name, color;
  std::vector<double> x, y;
  bool markers = false;  // dots at each point (sparse series such as validation loss)
};

// The points of a series worth drawing: all of them when there are few; else, per horizontal
// pixel, the first, lowest, highest and last point (in step order), so the line keeps its shape
// (spikes included) while the file stays small for runs of many thousands of steps.
template <class XFn>
std::vector<size_t> decimate(const Series& s, XFn X) {
  std::vector<size_t> keep;
  if (s.x.size() <= 2000) {
    for (size_t i = 0; i < s.x.size(); ++i) keep.push_back(i);
    return keep;
  }
  size_t i = 0;
  while (i < s.x.size()) {
    const long column = std::lround(X(s.x[i]));
    size_t j = i, lo = i, hi = i;
    while (j < s.x.size() && std::lround(X(s.x[j])) == column) {
      if (s.y[j] < s.y[lo]) lo = j;
      if (s.y[j] > s.y[hi]) hi = j;
      ++j;
    }
    std::vector<size_t> pick = {i, lo, hi, j - 1};
    std::sort(pick.begin(), pick.end());
    pick.erase(std::unique(pick.begin(), pick.end()), pick.end());
    keep.insert(keep.end(), pick.begin(), pick.end());
    i = j;
  }
  return keep;
}

constexpr double kW = 640, kH = 300, kL = 76, kR = 20, kT = 34, kB = 46;

std::string line_chart(const std::string& id, const std::string& title, const std::string& y_label,
                       const std::vector<Series>& series_in) {
  std::vector<Series> series;
  for (const Series& s : series_in)
    if (!s.x.empty()) series.push_back(s);
  std::ostringstream o;
  o << "<svg id=\"" << id << "\" class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"" << kW
    << "\" height=\"" << kH << "\" viewBox=\"0 0 " << kW << " " << kH << "\" role=\"img\" aria-label=\""
    << esc(title) << "\">\n";
  o << "<title>" << esc(title) << "</title>\n";
  o << "<text class=\"chart-title\" x=\"" << kW / 2 << "\" y=\"20\" text-anchor=\"middle\">" << esc(title)
    << "</text>\n";
  if (series.empty()) {
    o << "<text class=\"no-data\" x=\"" << kW / 2 << "\" y=\"" << kH / 2
      << "\" text-anchor=\"middle\">no data in metrics.jsonl</text>\n</svg>\n";
    return o.str();
  }
  double x0 = INFINITY, x1 = -INFINITY, y0 = INFINITY, y1 = -INFINITY;
  for (const Series& s : series)
    for (size_t i = 0; i < s.x.size(); ++i) {
      x0 = std::min(x0, s.x[i]);
      x1 = std::max(x1, s.x[i]);
      y0 = std::min(y0, s.y[i]);
      y1 = std::max(y1, s.y[i]);
    }
  if (!(x1 > x0)) x1 = x0 + 1;
  nice_range(&y0, &y1);
  const double pw = kW - kL - kR, ph = kH - kT - kB;
  auto X = [&](double v) { return kL + (v - x0) / (x1 - x0) * pw; };
  auto Y = [&](double v) { return kT + ph - (v - y0) / (y1 - y0) * ph; };

  // Grid and axes.
  o << "<g class=\"axis y-axis\">\n";
  for (double t : nice_ticks(y0, y1, 5)) {
    o << "<line class=\"grid\" x1=\"" << kL << "\" x2=\"" << kW - kR << "\" y1=\"" << px(Y(t)) << "\" y2=\""
      << px(Y(t)) << "\"/><text class=\"tick\" x=\"" << kL - 6 << "\" y=\"" << px(Y(t) + 4)
      << "\" text-anchor=\"end\">" << fmt(t) << "</text>\n";
  }
  o << "<text class=\"axis-label\" transform=\"translate(14," << px(kT + ph / 2)
    << ") rotate(-90)\" text-anchor=\"middle\">" << esc(y_label) << "</text>\n</g>\n";
  o << "<g class=\"axis x-axis\">\n";
  for (double t : nice_ticks(x0, x1, 8)) {
    if (std::fabs(t - std::round(t)) > 1e-9) continue;  // steps are integers
    o << "<line class=\"tickmark\" x1=\"" << px(X(t)) << "\" x2=\"" << px(X(t)) << "\" y1=\"" << kT + ph
      << "\" y2=\"" << kT + ph + 5 << "\"/><text class=\"tick\" x=\"" << px(X(t)) << "\" y=\"" << kT + ph + 18
      << "\" text-anchor=\"middle\">" << fmt(t) << "</text>\n";
  }
  o << "<text class=\"axis-label\" x=\"" << px(kL + pw / 2) << "\" y=\"" << kH - 6
    << "\" text-anchor=\"middle\">step</text>\n</g>\n";
  o << "<rect class=\"frame\" x=\"" << kL << "\" y=\"" << kT << "\" width=\"" << pw << "\" height=\"" << ph
    << "\"/>\n";

  // Series.
  for (const Series& s : series) {
    o << "<g class=\"series\" data-name=\"" << esc(s.name) << "\" data-points=\"" << s.x.size() << "\">\n";
    o << "<polyline fill=\"none\" stroke=\"" << s.color << "\" stroke-width=\"1.6\" points=\"";
    bool first = true;
    for (size_t i : decimate(s, X)) {
      o << (first ? "" : " ") << px(X(s.x[i])) << "," << px(Y(s.y[i]));
      first = false;
    }
    o << "\"/>\n";
    if (s.markers || s.x.size() == 1)
      for (size_t i = 0; i < s.x.size(); ++i)
        o << "<circle cx=\"" << px(X(s.x[i])) << "\" cy=\"" << px(Y(s.y[i])) << "\" r=\"3\" fill=\"" << s.color
          << "\"/>";
    o << "</g>\n";
  }
  // Legend (top right, inside the plot).
  o << "<g class=\"legend\">\n";
  double ly = kT + 14;
  for (const Series& s : series) {
    const double lx = kW - kR - 150;
    o << "<rect x=\"" << lx << "\" y=\"" << px(ly - 9) << "\" width=\"12\" height=\"10\" fill=\"" << s.color
      << "\"/><text class=\"legend-text\" x=\"" << lx + 18 << "\" y=\"" << px(ly) << "\">" << esc(s.name)
      << "</text>\n";
    ly += 16;
  }
  o << "</g>\n</svg>\n";
  return o.str();
}

// ---- heatmaps ----

// Viridis-like colour ramp, t in [0, 1].
std::string ramp(double t) {
  static const double stops[][3] = {{68, 1, 84},    {59, 82, 139},  {33, 145, 140},
                                    {94, 201, 98},  {253, 231, 37}};
  t = std::clamp(t, 0.0, 1.0) * 4;
  const int i = std::min(3, int(t));
  const double f = t - i;
  char buf[16];
  std::snprintf(buf, sizeof buf, "#%02x%02x%02x", int(std::lround(stops[i][0] + f * (stops[i + 1][0] - stops[i][0]))),
                int(std::lround(stops[i][1] + f * (stops[i + 1][1] - stops[i][1]))),
                int(std::lround(stops[i][2] + f * (stops[i + 1][2] - stops[i][2]))));
  return buf;
}

std::string heatmap(const std::vector<Step>& steps, size_t layer, int64_t model_layer) {
  // Columns: the steps with expert-load data, averaged into at most kCols buckets.
  std::vector<const Step*> with;
  for (const Step& s : steps)
    if (!s.expert_load.empty()) with.push_back(&s);
  const size_t n_expert = with.front()->expert_load[layer].size();
  const size_t max_cells = 8000;
  const size_t n_cols = std::min<size_t>(with.size(), std::clamp<size_t>(max_cells / n_expert, 20, 160));
  std::vector<std::vector<double>> share(n_cols, std::vector<double>(n_expert, 0.0));
  std::vector<int64_t> col_first(n_cols), col_last(n_cols);
  double max_share = 0;
  for (size_t c = 0; c < n_cols; ++c) {
    const size_t b = c * with.size() / n_cols, e = (c + 1) * with.size() / n_cols;
    col_first[c] = with[b]->step;
    col_last[c] = with[e - 1]->step;
    for (size_t i = b; i < e; ++i) {
      const auto& load = with[i]->expert_load[layer];
      double total = 0;
      for (double v : load) total += v;
      if (total <= 0) continue;
      for (size_t x = 0; x < n_expert; ++x) share[c][x] += load[x] / total / double(e - b);
    }
    for (double v : share[c]) max_share = std::max(max_share, v);
  }
  const double uniform = 1.0 / double(n_expert);
  const double top = std::max(max_share, 2 * uniform);  // colour scale [0, top]

  const double cell_h = std::clamp(240.0 / double(n_expert), 3.0, 22.0);
  const double pw = kW - kL - kR - 90, ph = cell_h * double(n_expert);
  const double h = kT + ph + kB;
  const double cw = pw / double(n_cols);
  std::ostringstream o;
  const std::string title = "Expert load, layer " + std::to_string(model_layer) + " (share of routed tokens)";
  o << "<svg class=\"heatmap\" id=\"heatmap-layer-" << layer << "\" data-layer=\"" << layer << "\" data-experts=\""
    << n_expert << "\" data-columns=\"" << n_cols << "\" data-model-layer=\"" << model_layer << "\" xmlns=\"http://www.w3.org/2000/svg\" width=\"" << kW
    << "\" height=\"" << px(h) << "\" viewBox=\"0 0 " << kW << " " << px(h) << "\" role=\"img\" aria-label=\""
    << esc(title) << "\">\n<title>" << esc(title) << "</title>\n";
  o << "<text class=\"chart-title\" x=\"" << kW / 2 << "\" y=\"20\" text-anchor=\"middle\">" << esc(title)
    << "</text>\n";
  o << "<g class=\"cells\" shape-rendering=\"crispEdges\">\n";
  for (size_t c = 0; c < n_cols; ++c)
    for (size_t x = 0; x < n_expert; ++x)
      o << "<rect x=\"" << px(kL + c * cw) << "\" y=\"" << px(kT + x * cell_h) << "\" width=\"" << px(cw + 0.3)
        << "\" height=\"" << px(cell_h + 0.3) << "\" fill=\"" << ramp(share[c][x] / top) << "\"/>";
  o << "\n</g>\n";
  // y axis: expert ids.
  o << "<g class=\"axis y-axis\">\n";
  const size_t y_every = std::max<size_t>(1, n_expert / 16);
  for (size_t x = 0; x < n_expert; x += y_every)
    o << "<text class=\"tick\" x=\"" << kL - 6 << "\" y=\"" << px(kT + (x + 0.5) * cell_h + 4)
      << "\" text-anchor=\"end\">" << x << "</text>";
  o << "\n<text class=\"axis-label\" transform=\"translate(14," << px(kT + ph / 2)
    << ") rotate(-90)\" text-anchor=\"middle\">expert</text>\n</g>\n";
  // x axis: steps (a column covers [col_first, col_last]).
  o << "<g class=\"axis x-axis\">\n";
  const double s0 = double(col_first.front()), s1 = double(col_last.back());
  for (double t : nice_ticks(s0, std::max(s1, s0 + 1), 8)) {
    if (std::fabs(t - std::round(t)) > 1e-9) continue;
    // The column containing step t, placed proportionally within it.
    size_t c = 0;
    while (c + 1 < n_cols && double(col_first[c + 1]) <= t) ++c;
    const double span = double(col_last[c] - col_first[c]) + 1;
    const double xpos = kL + (double(c) + std::clamp((t - double(col_first[c]) + 0.5) / span, 0.0, 1.0)) * cw;
    if (t < s0 || t > s1) continue;
    o << "<line class=\"tickmark\" x1=\"" << px(xpos) << "\" x2=\"" << px(xpos) << "\" y1=\"" << px(kT + ph)
      << "\" y2=\"" << px(kT + ph + 5) << "\"/><text class=\"tick\" x=\"" << px(xpos) << "\" y=\"" << px(kT + ph + 18)
      << "\" text-anchor=\"middle\">" << fmt(t) << "</text>\n";
  }
  o << "<text class=\"axis-label\" x=\"" << px(kL + pw / 2) << "\" y=\"" << px(h - 6)
    << "\" text-anchor=\"middle\">step</text>\n</g>\n";
  // Legend: a vertical colour bar [0, top] with ticks, and the uniform share 1/E marked.
  const std::string grad_id = "heat-grad-" + std::to_string(layer);
  const double lx = kW - kR - 60, lw = 14, ly = kT, lh = std::max(ph, 80.0);
  o << "<g class=\"legend\">\n<defs><linearGradient id=\"" << grad_id << "\" x1=\"0\" y1=\"1\" x2=\"0\" y2=\"0\">";
  for (int k = 0; k <= 8; ++k) o << "<stop offset=\"" << k / 8.0 << "\" stop-color=\"" << ramp(k / 8.0) << "\"/>";
  o << "</linearGradient></defs>\n<rect x=\"" << lx << "\" y=\"" << ly << "\" width=\"" << lw << "\" height=\""
    << px(lh) << "\" fill=\"url(#" << grad_id << ")\"/>\n";
  for (double t : nice_ticks(0, top, 4)) {
    const double yy = ly + lh - t / top * lh;
    o << "<text class=\"tick\" x=\"" << lx + lw + 4 << "\" y=\"" << px(yy + 4) << "\">" << fmt(t) << "</text>";
  }
  const double uy = ly + lh - uniform / top * lh;
  o << "\n<line class=\"uniform\" x1=\"" << lx - 4 << "\" x2=\"" << lx + lw + 2 << "\" y1=\"" << px(uy)
    << "\" y2=\"" << px(uy) << "\" stroke=\"#d00\" stroke-width=\"2\"/><text class=\"tick uniform-label\" x=\""
    << lx - 6 << "\" y=\"" << px(uy + 4) << "\" text-anchor=\"end\" fill=\"#d00\">1/E</text>\n</g>\n</svg>\n";
  return o.str();
}

// ---- helpers over steps ----

Series scalar_series(const std::vector<Step>& steps, const char* key, const std::string& name,
                     const std::string& color) {
  Series s{name, color, {}, {}, false};
  for (const Step& st : steps) {
    auto it = st.scalar.find(key);
    if (it == st.scalar.end()) continue;
    s.x.push_back(double(st.step));
    s.y.push_back(it->second);
  }
  return s;
}

const char* const kPalette[] = {"#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd",
                                "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"};

// Coefficient of variation of one layer's load: from load_cv when given, else from expert_load.
double layer_cv(const Step& s, size_t layer) {
  auto it = s.per_layer.find("load_cv");
  if (it != s.per_layer.end() && layer < it->second.size()) return it->second[layer];
  if (layer >= s.expert_load.size()) return kNaN;
  const auto& v = s.expert_load[layer];
  double mean = 0, var = 0;
  for (double x : v) mean += x;
  mean /= double(v.size());
  if (mean <= 0) return kNaN;
  for (double x : v) var += (x - mean) * (x - mean);
  return std::sqrt(var / double(v.size())) / mean;
}

double layer_max_mean(const Step& s, size_t layer) {
  auto it = s.per_layer.find("load_max_mean");
  if (it != s.per_layer.end() && layer < it->second.size()) return it->second[layer];
  if (layer >= s.expert_load.size()) return kNaN;
  const auto& v = s.expert_load[layer];
  double mean = 0, mx = 0;
  for (double x : v) {
    mean += x;
    mx = std::max(mx, x);
  }
  mean /= double(v.size());
  return mean > 0 ? mx / mean : kNaN;
}

std::string scalar_str(const json& v) {
  if (v.is_string()) return v.get<std::string>();
  return v.dump();
}

void write_atomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp." + std::to_string(::getpid());
  FILE* f = std::fopen(tmp.c_str(), "wb");
  MOE_CHECK(f != nullptr, "%s: cannot create temp file %s: %s", path.c_str(), tmp.c_str(), std::strerror(errno));
  const bool ok = std::fwrite(text.data(), 1, text.size(), f) == text.size() && std::fflush(f) == 0 &&
                  ::fsync(fileno(f)) == 0;
  const int err = errno;
  std::fclose(f);
  if (!ok) {
    std::remove(tmp.c_str());
    MOE_FAIL("%s: write to %s failed: %s", path.c_str(), tmp.c_str(), std::strerror(err));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    const int e = errno;
    std::remove(tmp.c_str());
    MOE_FAIL("%s: cannot rename %s into place: %s", path.c_str(), tmp.c_str(), std::strerror(e));
  }
}

const char* kStyle = R"(
body { font-family: sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px 0; } h2 { font-size: 17px; margin: 24px 0 8px 0; }
.sub { color: #555; margin-bottom: 16px; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg { background: #fff; border: 1px solid #ddd; font-size: 11px; }
.chart-title { font-size: 13px; font-weight: bold; }
.axis-label { font-size: 11px; fill: #444; }
.tick { fill: #333; }
.grid { stroke: #e4e4e4; stroke-width: 1; }
.tickmark { stroke: #666; }
.frame { fill: none; stroke: #999; }
.no-data { fill: #999; font-size: 14px; }
table { border-collapse: collapse; margin: 4px 0 12px 0; font-size: 13px; }
td, th { border: 1px solid #ccc; padding: 3px 8px; text-align: right; }
th { background: #f2f2f2; } td.k { text-align: left; }
)";

// The model's layer index of expert_load entry `l` (from the last line that has moe_layers), else l.
int64_t model_layer_of(const std::vector<Step>& steps, size_t l) {
  for (auto it = steps.rbegin(); it != steps.rend(); ++it)
    if (!it->moe_layers.empty()) return l < it->moe_layers.size() ? it->moe_layers[l] : int64_t(l);
  return int64_t(l);
}

}  // namespace

ReportSummary write_report(const std::string& run_dir, const std::string& out_html) {
  const std::string metrics_path = (fs::path(run_dir) / "metrics.jsonl").string();
  const std::vector<Step> steps = read_metrics(metrics_path);
  // The model's config: RUN_DIR/config.json, else the final checkpoint's (moe train writes it there).
  json config = read_optional_json((fs::path(run_dir) / "config.json").string());
  if (config.is_null()) config = read_optional_json((fs::path(run_dir) / "final" / "config.json").string());
  const json train_config = read_optional_json((fs::path(run_dir) / "train_config.json").string());

  ReportSummary sum;
  sum.n_steps = int64_t(steps.size());
  for (const Step& s : steps) {
    sum.n_layers = std::max(sum.n_layers, int64_t(s.expert_load.size()));
    sum.n_val += s.scalar.count("val_loss") ? 1 : 0;
  }

  // Title: the run directory's name, the model type and shape from config.json.
  fs::path run_path = fs::absolute(run_dir).lexically_normal();
  if (run_path.filename().empty()) run_path = run_path.parent_path();  // "dir/" -> "dir"
  const std::string run_name = run_path.filename().string();
  std::string subtitle;
  if (config.is_object()) {
    auto add = [&](const char* label, const char* key) {
      if (config.contains(key) && !config[key].is_null() && !config[key].is_object() && !config[key].is_array())
        subtitle += (subtitle.empty() ? "" : " · ") + std::string(label) + " " + scalar_str(config[key]);
    };
    add("model", "model_type");
    add("layers", "num_hidden_layers");
    add("hidden", "hidden_size");
    add("experts", "num_local_experts");
    add("experts", "num_experts");
    add("top-k", "num_experts_per_tok");
    add("vocab", "vocab_size");
  }

  std::ostringstream h;
  h << "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Training report: "
    << esc(run_name) << "</title>\n<style>" << kStyle << "</style>\n</head>\n<body>\n";
  h << "<h1>Training report: " << esc(run_name) << "</h1>\n<div class=\"sub\">"
    << esc(subtitle.empty() ? std::string("(no config.json in the run directory)") : subtitle) << " · "
    << steps.size() << " steps (" << steps.front().step << " to " << steps.back().step << ")</div>\n";

  // Summary table.
  auto last_of = [&](const char* key) {
    for (auto it = steps.rbegin(); it != steps.rend(); ++it)
      if (auto f = it->scalar.find(key); f != it->scalar.end()) return std::make_pair(it->step, f->second);
    return std::make_pair(int64_t(-1), kNaN);
  };
  auto first_of = [&](const char* key) {
    for (const Step& s : steps)
      if (auto f = s.scalar.find(key); f != s.scalar.end()) return std::make_pair(s.step, f->second);
    return std::make_pair(int64_t(-1), kNaN);
  };
  // The initial validation loss: train_config.json's initial_val_loss (measured before step one,
  // drawn at the step before the first line), else the first val_loss line.
  std::pair<int64_t, double> initial_val = first_of("val_loss");
  const bool initial_val_from_config = train_config.is_object() && train_config.contains("initial_val_loss") &&
                                       train_config["initial_val_loss"].is_number();
  if (initial_val_from_config)
    initial_val = {steps.front().step - 1, train_config["initial_val_loss"].get<double>()};
  double best_val = kNaN, tps_sum = 0;
  int64_t best_val_step = -1, tps_n = 0;
  for (const Step& s : steps) {
    if (auto f = s.scalar.find("val_loss"); f != s.scalar.end() && !(f->second >= best_val)) {
      best_val = f->second;
      best_val_step = s.step;
    }
    if (auto f = s.scalar.find("tokens_per_s"); f != s.scalar.end()) {
      tps_sum += f->second;
      ++tps_n;
    }
  }
  h << "<h2>Summary</h2>\n<table id=\"summary\">\n";
  auto row = [&](const std::string& k, const std::string& v, const char* id) {
    h << "<tr id=\"" << id << "\"><td class=\"k\">" << esc(k) << "</td><td>" << esc(v) << "</td></tr>\n";
  };
  auto at_step = [](std::pair<int64_t, double> p) {
    return !std::isfinite(p.second) ? std::string("–") : fmt(p.second) + " (step " + std::to_string(p.first) + ")";
  };
  row("steps", std::to_string(steps.size()), "sum-steps");
  row("initial loss", at_step(first_of("loss")), "sum-initial-loss");
  row("final loss", at_step(last_of("loss")), "sum-final-loss");
  row("final cross-entropy", at_step(last_of("loss_ce")), "sum-final-loss-ce");
  row("initial validation loss", at_step(initial_val), "sum-initial-val-loss");
  row("best validation loss", at_step({best_val_step, best_val}), "sum-best-val-loss");
  row("best / initial validation loss",
      std::isfinite(best_val) && std::isfinite(initial_val.second) && initial_val.second != 0
          ? fmt(best_val / initial_val.second) : "–",
      "sum-val-ratio");
  row("final aux loss", at_step(last_of("aux_loss")), "sum-final-aux-loss");
  row("mean tokens/s", tps_n ? fmt(tps_sum / double(tps_n)) : "–", "sum-mean-tokens-per-s");
  row("elapsed (s)", at_step(last_of("elapsed_s")), "sum-elapsed");
  h << "</table>\n";

  // Per-layer balance table, from the last step with load data.
  if (sum.n_layers > 0) {
    const Step* last = nullptr;
    for (auto it = steps.rbegin(); it != steps.rend() && !last; ++it)
      if (!it->expert_load.empty()) last = &*it;
    h << "<table id=\"layer-summary\">\n<tr><th>layer</th><th>experts</th><th>final CV</th><th>final max/mean</th>"
         "<th>mean CV</th><th>dropped (total)</th></tr>\n";
    for (size_t l = 0; l < size_t(sum.n_layers); ++l) {
      double cv_sum = 0, dropped = 0;
      int64_t cv_n = 0;
      bool any_dropped = false;
      for (const Step& s : steps) {
        const double cv = layer_cv(s, l);
        if (std::isfinite(cv)) {
          cv_sum += cv;
          ++cv_n;
        }
        if (auto it = s.per_layer.find("dropped"); it != s.per_layer.end() && l < it->second.size() &&
                                                   std::isfinite(it->second[l])) {
          dropped += it->second[l];
          any_dropped = true;
        }
      }
      h << "<tr><td>" << model_layer_of(steps, l) << "</td><td>" << last->expert_load[l].size() << "</td><td>" << fmt(layer_cv(*last, l))
        << "</td><td>" << fmt(layer_max_mean(*last, l)) << "</td><td>" << (cv_n ? fmt(cv_sum / double(cv_n)) : "–")
        << "</td><td>" << (any_dropped ? fmt(dropped) : "–") << "</td></tr>\n";
    }
    h << "</table>\n";
  }

  // Line charts.
  h << "<h2>Training</h2>\n<div class=\"charts\">\n";
  {
    std::vector<Series> loss = {scalar_series(steps, "loss", "train loss", kPalette[0])};
    Series ce = scalar_series(steps, "loss_ce", "train cross-entropy", kPalette[2]);
    bool ce_differs = false;
    for (const Step& s : steps) {
      auto a = s.scalar.find("loss"), b = s.scalar.find("loss_ce");
      if (a != s.scalar.end() && b != s.scalar.end() && std::fabs(a->second - b->second) > 1e-12 * std::fabs(a->second))
        ce_differs = true;
    }
    if (ce_differs || loss[0].x.empty()) loss.push_back(ce);
    Series val = scalar_series(steps, "val_loss", "validation loss", kPalette[1]);
    val.markers = true;
    if (initial_val_from_config && std::isfinite(initial_val.second)) {  // before the first step
      val.x.insert(val.x.begin(), double(initial_val.first));
      val.y.insert(val.y.begin(), initial_val.second);
    }
    loss.push_back(val);
    h << line_chart("chart-loss", "Loss", "loss", loss);
  }
  {
    Series z = scalar_series(steps, "z_loss", "router z-loss", kPalette[4]);
    bool z_nonzero = false;
    for (double v : z.y) z_nonzero |= v != 0;
    std::vector<Series> aux = {scalar_series(steps, "aux_loss", "router aux loss", kPalette[3])};
    if (z_nonzero) aux.push_back(z);
    h << line_chart("chart-aux", "Router auxiliary loss", "aux loss", aux);
  }
  h << line_chart("chart-lr", "Learning rate", "lr", {scalar_series(steps, "lr", "lr", kPalette[0])});
  h << line_chart("chart-tokens", "Throughput", "tokens/s",
                  {scalar_series(steps, "tokens_per_s", "tokens/s", kPalette[2])});
  h << line_chart("chart-grad-norm", "Gradient norm (before clipping)", "grad norm",
                  {scalar_series(steps, "grad_norm", "grad norm", kPalette[5])});
  {
    std::vector<Series> cv;
    for (size_t l = 0; l < size_t(sum.n_layers); ++l) {
      Series s{"layer " + std::to_string(model_layer_of(steps, l)), kPalette[l % 10], {}, {}, false};
      for (const Step& st : steps) {
        const double v = layer_cv(st, l);
        if (!std::isfinite(v)) continue;
        s.x.push_back(double(st.step));
        s.y.push_back(v);
      }
      cv.push_back(std::move(s));
    }
    if (cv.size() > 8) cv.resize(8);  // keep the legend readable; the table has every layer
    h << line_chart("chart-balance", "Expert load imbalance (coefficient of variation)", "CV of tokens per expert",
                    cv);
  }
  h << "</div>\n";

  // Heatmaps.
  h << "<h2>Expert load per layer</h2>\n<div class=\"charts heatmaps\">\n";
  if (sum.n_layers == 0) h << "<p class=\"no-data\">no expert_load in metrics.jsonl</p>\n";
  for (size_t l = 0; l < size_t(sum.n_layers); ++l) h << heatmap(steps, l, model_layer_of(steps, l));
  h << "</div>\n";

  // Settings.
  if (train_config.is_object() && !train_config.empty()) {
    h << "<h2>Training settings</h2>\n<table id=\"train-config\">\n";
    for (auto it = train_config.begin(); it != train_config.end(); ++it)
      h << "<tr><td class=\"k\">" << esc(it.key()) << "</td><td>" << esc(scalar_str(it.value())) << "</td></tr>\n";
    h << "</table>\n";
  }
  h << "<p class=\"sub\">Source: " << esc(metrics_path) << "</p>\n</body>\n</html>\n";

  const std::string html = h.str();
  write_atomic(out_html, html);
  sum.bytes = int64_t(html.size());
  return sum;
}

}  // namespace moe
