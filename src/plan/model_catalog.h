// model_catalog.h — built-in configs of well-known MoE models, for `moe plan NAME`.
//
// Each entry holds the architecture fields of the model's HuggingFace config.json, verbatim in
// name and value (so the same parser reads a catalog entry and a downloaded config.json), plus
// the repository it comes from and the published headline sizes. Sources are cited per entry in
// model_catalog.cpp.
#pragma once
#include <string>
#include <vector>

#include "plan/plan_model.h"

namespace moe {

struct CatalogModel {
  const char* name;         // "Mixtral-8x7B"
  const char* hf_repo;      // "mistralai/Mixtral-8x7B-v0.1"
  const char* headline;     // published size, e.g. "46.7B total / 12.9B active"
  const char* config_json;  // the config.json fields that determine sizes
};

const std::vector<CatalogModel>& model_catalog();

// Case-insensitive lookup by name, HF repo id or its last path part. Throws moe::Error for an
// unknown name, suggesting the closest catalog names (edit distance).
PlanModel catalog_model(const std::string& name);
// nullptr if unknown.
const CatalogModel* find_catalog_model(const std::string& name);

// Levenshtein distance, case-insensitive.
int edit_distance(const std::string& a, const std::string& b);
// Lower-case letters and digits of a name: the key names are compared on.
std::string name_key(const std::string& s);
// Up to `n` candidates closest to `query`, best first (ties keep the order given).
std::vector<std::string> closest_names(const std::string& query, const std::vector<std::string>& candidates,
                                       size_t n = 3);

}  // namespace moe
