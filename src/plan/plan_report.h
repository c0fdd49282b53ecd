// plan_report.h — `moe plan`: a job on a GPU type (or every GPU type), the best parallel layout,
// time and cost, rendered as a table, JSON, or with the formula behind every number.
//
// Prices are user input (load_prices): nothing here presents a price as fact.
#pragma once
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "plan/hardware.h"
#include "plan/planner.h"

namespace moe {

// {"currency": "USD", "gpu_hour": {"H100-80GB": 2.0, ...}, "note": "..."}
struct PriceTable {
  std::string currency = "USD";
  std::map<std::string, double> gpu_hour;  // by catalog GPU name
  std::string note;
  std::string path;
};
PriceTable parse_prices(const std::string& json_text, const std::string& what);
PriceTable load_prices(const std::string& path);

struct PlanRequest {
  JobSpec job;
  std::string gpu;        // "" = compare every catalog GPU
  int64_t gpus = 0;       // 0 = the fewest that fit
  Parallel par;           // used as given when layout_given
  bool layout_given = false;  // --dp/--tp/--ep given: evaluate exactly that layout
  int zero = -1;          // -1 = choose (training); else as given
  int64_t tokens = 0;     // training tokens (0 = no training time)
  double mfu = 0.4;       // model FLOPs utilisation for compute-bound phases
  double mbu = 0.7;       // memory-bandwidth utilisation for decode
  std::optional<PriceTable> prices;
};

struct GpuPlan {
  const GpuSpec* gpu = nullptr;
  bool fits = false;
  std::string why_not;       // when !fits
  Parallel par;
  MemoryPlan mem;
  double usable_bytes = 0;   // memory the job may use per GPU
  double a2a_bytes = 0;      // expert-parallel all-to-all per GPU per micro-batch
  double flops_per_token = 0;
  double train_seconds = 0;  // tokens given
  double gpu_hours = 0;
  double decode_tok_s = 0, prefill_tok_s = 0;  // inference
  double decode_bytes_per_step = 0;
  std::optional<double> price_per_gpu_hour;
  std::optional<double> cost;                  // training: total; inference: per 1M output tokens
};

struct PlanReport {
  PlanModel model;
  ParamCounts params;
  PlanRequest req;
  int64_t kv_bytes_per_token = 0;    // all layers, bf16-or-act_bytes elements
  std::vector<std::pair<std::string, int64_t>> weight_bytes;  // per format, whole model
  std::vector<GpuPlan> options;      // one per GPU type considered (best layout each)
};

// Throws moe::Error for bad requests (batch 0, impossible layouts, unknown GPU).
PlanReport make_plan(const PlanModel& m, const PlanRequest& req);
std::string report_text(const PlanReport& r, bool explain);
std::string report_json(const PlanReport& r);

// The model argument: a directory / config.json path, or a catalog name.
PlanModel resolve_plan_model(const std::string& arg);

}  // namespace moe
