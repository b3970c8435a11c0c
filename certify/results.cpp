// Aggregates of a results object (SPEC §5): certified accuracy per form and ε, the
// headline (per sample the best sound radius of any form and estimator), empirical
// accuracy, medians, tightness and soundness violations.
#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <sstream>

#include "run-impl.h"

namespace moecert {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

std::string eps_key(double e) {
  std::ostringstream s;
  s << e;
  return s.str();
}

double median(std::vector<double> v) {
  if (v.empty()) return std::numeric_limits<double>::quiet_NaN();
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

double radius_of(const nlohmann::json& v) { return v.is_null() ? kInf : v.get<double>(); }

/// A row's headline: its own field, or (results written before it existed) the
/// largest radius of any form.
std::pair<std::string, double> headline_of(const nlohmann::json& row) {
  if (row.contains("headline")) {
    const auto& h = row["headline"];
    return {h.value("form", ""), radius_of(h.at("radius"))};
  }
  std::pair<std::string, double> best{"", 0.0};
  for (const auto& [form, v] : row.at("radii").items())
    if (radius_of(v) > best.second || best.first.empty()) best = {form, radius_of(v)};
  return best;
}

/// Fraction of radii >= ε (and > 0) for every ε of the grid.
nlohmann::json accuracy(const std::vector<double>& radii, const std::vector<double>& grid,
                        double n) {
  nlohmann::json per = nlohmann::json::object();
  for (double eps : grid)
    per[eps_key(eps)] =
        std::count_if(radii.begin(), radii.end(), [&](double r) { return r >= eps && r > 0; }) / n;
  return per;
}

/// Expert usage at the clean points from the rows' router weights: each sample counts
/// for its top expert (the largest weight). A dual-model's rows hold one weight vector
/// per routed member; the last one (the robust member's router, as `attack` reports) is
/// used. Null when the model has no router.
nlohmann::json usage_of(const nlohmann::json& rows) {
  std::vector<int64_t> counts;
  for (const auto& row : rows) {
    if (!row.contains("router_weights") || row["router_weights"].is_null()) return nullptr;
    const auto& w = row["router_weights"];
    if (w.empty()) return nullptr;
    const auto& v = w[0].is_array() ? w.back() : w;
    if (v.empty()) return nullptr;
    if (counts.empty()) counts.assign(v.size(), 0);
    if (counts.size() != v.size()) return nullptr;
    size_t top = 0;
    for (size_t i = 1; i < v.size(); ++i)
      if (v[i].get<double>() > v[top].get<double>()) top = i;
    ++counts[top];
  }
  if (counts.empty()) return nullptr;
  ExpertUsage u;
  u.clean = counts;
  return {{"clean", counts},
          {"clean_share", ExpertUsage::shares(counts)},
          {"max_share", u.max_share()}};
}

}  // namespace

void certify_aggregate(nlohmann::json& results) {
  const auto& rows = results.at("rows");
  const auto grid = results.at("config").at("eps_grid").get<std::vector<double>>();
  std::map<std::string, std::vector<double>> radii;  // form -> per-sample radius
  std::vector<double> empirical, tightness, headline;
  std::map<std::string, int64_t> headline_forms;
  nlohmann::json violations = nlohmann::json::array();
  int64_t correct = 0;
  for (const auto& row : rows) {
    const bool ok = row.at("correct").get<bool>();
    correct += ok;
    const auto& emp = row.value("empirical_radius", nlohmann::json());
    const double e = emp.is_null() ? kInf : emp.get<double>();
    if (row.contains("empirical_radius")) empirical.push_back(ok ? e : 0.0);
    for (const auto& [form, v] : row.at("radii").items()) {
      const double r = radius_of(v);
      radii[form].push_back(ok ? r : 0.0);
      if (row.contains("empirical_radius") && ok && e < r)
        violations.push_back(
            {{"index", row.at("index")}, {"form", form}, {"certified", v}, {"empirical", emp}});
    }
    const auto [form, best] = headline_of(row);
    headline.push_back(ok ? best : 0.0);
    if (ok && best > 0) ++headline_forms[form];
    if (ok && best > 0 && std::isfinite(e) && e > 0) tightness.push_back(best / e);
  }
  const double N = std::max<double>(1.0, static_cast<double>(rows.size()));
  nlohmann::json agg;
  agg["samples"] = rows.size();
  agg["clean_accuracy"] = correct / N;
  nlohmann::json cert = nlohmann::json::object(), med = nlohmann::json::object();
  for (const auto& [form, v] : radii) {
    cert[form] = accuracy(v, grid, N);
    med[form] = run::json_number(median(v));
  }
  agg["certified_accuracy"] = cert;
  agg["median_radius"] = med;
  agg["headline"] = {{"certified_accuracy", accuracy(headline, grid, N)},
                     {"median_radius", run::json_number(median(headline))},
                     {"forms", headline_forms}};
  if (!empirical.empty()) {
    nlohmann::json emp = nlohmann::json::object();
    for (double eps : grid)
      emp[eps_key(eps)] =
          std::count_if(empirical.begin(), empirical.end(), [&](double r) { return r > eps; }) / N;
    agg["empirical_accuracy"] = emp;
    agg["median_empirical_radius"] = run::json_number(median(empirical));
  }
  agg["median_tightness"] = run::json_number(median(tightness));
  agg["tightness_samples"] = tightness.size();
  agg["violations"] = violations;
  agg["violation_count"] = violations.size();
  if (auto usage = usage_of(rows); !usage.is_null()) agg["expert_usage"] = usage;
  results["aggregates"] = agg;
}

}  // namespace moecert
