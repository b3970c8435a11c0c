// Merging the results of certification shards.
#include <algorithm>
#include <set>

#include "moecert/certify.h"
#include "moecert/error.h"
#include "moecert/report.h"

namespace moecert {

nlohmann::json results_merge(const std::vector<nlohmann::json>& shards) {
  if (shards.empty()) throw ConfigError("merge: no results to merge");
  nlohmann::json merged = shards[0];
  auto config_of = [](const nlohmann::json& r) {
    auto c = r.at("config");
    c.erase("shard");
    c.erase("samples");
    return c;
  };
  const auto config = config_of(shards[0]);
  std::vector<nlohmann::json> rows;
  std::set<int64_t> seen;
  double certify_s = 0, empirical_s = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    const auto& s = shards[i];
    if (s.value("schema", "") != shards[0].value("schema", ""))
      throw ConfigError("merge: shard " + std::to_string(i) + " has schema " +
                        s.value("schema", "?"));
    if (s.at("fingerprint") != shards[0].at("fingerprint"))
      throw ConfigError("merge: shard " + std::to_string(i) +
                        " certifies a different checkpoint (fingerprint differs)");
    if (s.at("norm") != shards[0].at("norm") || config_of(s) != config)
      throw ConfigError("merge: shard " + std::to_string(i) + " was run with different settings");
    for (const auto& row : s.at("rows")) {
      if (!seen.insert(row.at("index").get<int64_t>()).second)
        throw ConfigError("merge: sample " + std::to_string(row.at("index").get<int64_t>()) +
                          " appears in more than one shard");
      rows.push_back(row);
    }
    certify_s += s.at("timing").value("certify_seconds", 0.0);
    empirical_s += s.at("timing").value("empirical_seconds", 0.0);
  }
  std::sort(rows.begin(), rows.end(), [](const nlohmann::json& a, const nlohmann::json& b) {
    return a.at("index").get<int64_t>() < b.at("index").get<int64_t>();
  });
  merged["rows"] = rows;
  merged["config"]["samples"] = rows.size();
  merged["config"]["shard"] = nullptr;
  merged["timing"]["certify_seconds"] = certify_s;
  merged["timing"]["empirical_seconds"] = empirical_s;
  merged["timing"]["certify_samples_per_s"] =
      certify_s > 0 ? static_cast<double>(rows.size()) / certify_s : 0.0;
  merged["merged_from"] = shards.size();
  certify_aggregate(merged);
  return merged;
}

}  // namespace moecert
