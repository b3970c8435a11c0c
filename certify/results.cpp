// The typed results of a certification run (include/moecert/results.h): ε grids and
// radius keys, the aggregates and merging shards. results_json.cpp reads and writes them.
#include <algorithm>
#include <charconv>
#include <cmath>
#include <limits>
#include <set>
#include <sstream>

#include "moecert/error.h"
#include "moecert/limits.h"
#include "results-impl.h"

namespace moecert {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

double median(std::vector<double> v) {
  if (v.empty()) return kNaN;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// Fraction of radii >= ε (and > 0) at each ε of the grid.
std::vector<double> accuracy(const std::vector<double>& radii, const EpsGrid& grid, double n) {
  std::vector<double> out;
  for (double eps : grid.values())
    out.push_back(
        std::count_if(radii.begin(), radii.end(), [&](double r) { return r >= eps && r > 0; }) / n);
  return out;
}

/// Per expert, the rows whose top router weight it has; a dual-model's rows hold one
/// weight vector per routed member and the last one (the robust member's router, as
/// `attack` reports) counts. Empty when a row has no router or the rows disagree on E.
std::vector<int64_t> usage_of(const std::vector<ResultRow>& rows) {
  std::vector<int64_t> counts;
  for (const auto& row : rows) {
    if (row.router_weights.empty() || row.router_weights.back().empty()) return {};
    const auto& w = row.router_weights.back();
    if (counts.empty()) counts.assign(w.size(), 0);
    if (counts.size() != w.size()) return {};
    ++counts[static_cast<size_t>(std::max_element(w.begin(), w.end()) - w.begin())];
  }
  return counts;
}

}  // namespace

std::string results_schema_name(int version) {
  return results_schema_prefix + std::to_string(version);
}

// --- ε -----------------------------------------------------------------------------------

std::string eps_key(double eps) {
  char buf[64];
  const auto r = std::to_chars(buf, buf + sizeof buf, eps);
  return std::string(buf, r.ptr);
}

double eps_parse(const std::string& text, const std::string& what) {
  double v = 0;
  const char* first = text.data();
  const char* last = text.data() + text.size();
  if (first != last && *first == '+') ++first;  // from_chars takes no '+'
  const auto [end, ec] = std::from_chars(first, last, v);
  if (text.empty() || ec != std::errc() || end != last || !std::isfinite(v) || v < 0)
    throw ConfigError::invalid(what, text, "a finite number >= 0, e.g. 0.05 or 8e-3");
  return v;
}

EpsGrid::EpsGrid(std::vector<double> values, const std::string& what) {
  if (values.empty()) throw ConfigError::invalid(what, "", "at least one radius");
  if (static_cast<int64_t>(values.size()) > limits::max_grid)
    throw ConfigError::invalid(what, std::to_string(values.size()) + " values",
                               "at most " + std::to_string(limits::max_grid));
  for (double v : values)
    if (!std::isfinite(v) || v < 0)
      throw ConfigError::invalid(what, eps_key(v), "finite radii >= 0");
  std::sort(values.begin(), values.end());
  values.erase(std::unique(values.begin(), values.end()), values.end());
  values_ = std::move(values);
}

EpsGrid EpsGrid::parse(const std::string& text, const std::string& what) {
  std::vector<double> values;
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    item.erase(0, item.find_first_not_of(' '));
    item.erase(item.find_last_not_of(' ') + 1);
    values.push_back(eps_parse(item, what));
  }
  if (!text.empty() && text.back() == ',') eps_parse("", what);
  return EpsGrid(values, what);
}

std::optional<size_t> EpsGrid::find(double eps) const {
  const auto it = std::lower_bound(values_.begin(), values_.end(), eps);
  if (it == values_.end() || *it != eps) return std::nullopt;
  return static_cast<size_t>(it - values_.begin());
}

std::string EpsGrid::text() const {
  std::string t;
  for (double v : values_) t += (t.empty() ? "" : ", ") + eps_key(v);
  return t;
}

EpsGrid EpsGrid::merged(const std::vector<EpsGrid>& grids) {
  std::vector<double> all;
  for (const auto& g : grids) all.insert(all.end(), g.values().begin(), g.values().end());
  return EpsGrid(all);
}

// --- radius keys -----------------------------------------------------------------------

std::string estimator_name(Estimator e) {
  switch (e) {
    case Estimator::global:
      return "global";
    case Estimator::local:
      return "local";
    case Estimator::ibp:
      return "ibp";
    case Estimator::crown_ibp:
      return "crown-ibp";
    case Estimator::crown:
      return "crown";
    case Estimator::alpha_crown:
      return "alpha-crown";
    case Estimator::bab:
      return "bab";
  }
  return "?";
}

std::optional<Estimator> estimator_from_name(const std::string& name) {
  for (Estimator e : {Estimator::global, Estimator::local, Estimator::ibp, Estimator::crown_ibp,
                      Estimator::crown, Estimator::alpha_crown, Estimator::bab})
    if (name == estimator_name(e)) return e;
  return std::nullopt;
}

std::vector<Estimator> estimators_parse(const std::string& text) {
  const std::vector<Estimator> all{Estimator::global,    Estimator::local, Estimator::ibp,
                                   Estimator::crown_ibp, Estimator::crown, Estimator::alpha_crown};
  std::vector<Estimator> out;
  auto add = [&](Estimator e) {
    if (std::find(out.begin(), out.end(), e) == out.end()) out.push_back(e);
  };
  std::stringstream ss(text);
  std::string item;
  while (std::getline(ss, item, ',')) {
    bool known = false;
    if (auto e = estimator_from_name(item)) add(*e), known = true;
    if (item == "lipschitz" || item == "both")
      add(Estimator::global), add(Estimator::local), known = true;
    if (item == "bp")
      add(Estimator::ibp), add(Estimator::crown_ibp), add(Estimator::crown),
          add(Estimator::alpha_crown), known = true;
    if (item == "all") out = all, known = true;
    if (!known)
      throw ConfigError::invalid(
          "--estimator", text,
          "a comma-separated list of global, local, ibp, crown-ibp, crown, alpha-crown, bab, "
          "lipschitz (= global,local), bp (= ibp,crown-ibp,crown,alpha-crown), all (every one "
          "but bab)");
  }
  if (out.empty()) throw ConfigError::invalid("--estimator", text, "at least one estimator");
  std::sort(out.begin(), out.end());
  return out;
}

std::string RadiusKey::text() const { return form + "_" + estimator_name(estimator); }

RadiusKey RadiusKey::parse(const std::string& text, const std::string& what) {
  const auto cut = text.rfind('_');
  const auto est =
      cut == std::string::npos ? std::nullopt : estimator_from_name(text.substr(cut + 1));
  const std::string form = cut == std::string::npos ? "" : text.substr(0, cut);
  const bool form_ok =
      !form.empty() && form.size() <= 64 &&
      form.find_first_not_of("abcdefghijklmnopqrstuvwxyz0123456789_") == std::string::npos;
  if (!est || !form_ok)
    throw ConfigError::invalid(
        what, text,
        "FORM_ESTIMATOR, e.g. candidate_crown or thm54_tight_local (estimators: "
        "global, local, ibp, crown-ibp, crown, alpha-crown, bab)");
  return {form, *est};
}

bool RadiusKey::is_main_form() const {
  static const std::set<std::string> main{"margin",      "candidate",       "mixture",    "dual",
                                          "thm54_tight", "thm54_candidate", "thm55_tight"};
  return main.count(form) > 0;
}

bool RadiusKey::operator<(const RadiusKey& o) const {
  return form != o.form ? form < o.form : estimator < o.estimator;
}

// --- aggregates --------------------------------------------------------------------------

void Results::aggregate() {
  const auto& grid = config.grid;
  Aggregates a;
  std::map<RadiusKey, std::vector<double>> radii;  // key -> per-sample radius (0 if wrong)
  std::vector<double> empirical, tightness, headline;
  bool any_empirical = false;
  int64_t correct = 0;
  for (const auto& row : rows) {
    const bool ok = row.correct;
    correct += ok;
    const double e = row.empirical.value_or(kInf);
    if (row.empirical) empirical.push_back(ok ? e : 0.0), any_empirical = true;
    for (const auto& [k, r] : row.radii) {
      radii[k].push_back(ok ? r : 0.0);
      if (row.empirical && ok && e < r) a.violations.push_back({row.index, k, r, e});
    }
    headline.push_back(ok ? row.headline : 0.0);
    if (ok && row.headline > 0 && row.headline_key) ++a.headline_forms[*row.headline_key];
    if (ok && row.headline > 0 && std::isfinite(e) && e > 0) tightness.push_back(row.headline / e);
  }
  const double n = std::max<double>(1.0, static_cast<double>(rows.size()));
  a.samples = static_cast<int64_t>(rows.size());
  a.clean_accuracy = static_cast<double>(correct) / n;
  for (const auto& [k, v] : radii) {
    a.certified[k] = accuracy(v, grid, n);
    a.median_radius[k] = median(v);
  }
  a.headline_certified = accuracy(headline, grid, n);
  a.headline_median = median(headline);
  if (any_empirical) {
    std::vector<double> per;
    for (double eps : grid.values())
      per.push_back(
          std::count_if(empirical.begin(), empirical.end(), [&](double r) { return r > eps; }) / n);
    a.empirical = per;
    a.median_empirical = median(empirical);
    std::vector<double> falsified, unknown;
    for (double eps : grid.values()) {
      int64_t f = 0, u = 0;
      for (const auto& row : rows) {
        if (!row.correct || row.headline >= eps) continue;  // misclassified or verified
        ++(row.empirical.value_or(kInf) <= eps ? f : u);
      }
      falsified.push_back(static_cast<double>(f) / n),
          unknown.push_back(static_cast<double>(u) / n);
    }
    a.falsified = falsified, a.unknown = unknown;
  }
  a.median_tightness = median(tightness);
  a.tightness_samples = static_cast<int64_t>(tightness.size());
  a.expert_usage = usage_of(rows);
  aggregates = std::move(a);
}

std::optional<double> Results::certified_at(double eps, const std::optional<RadiusKey>& key) const {
  const auto i = config.grid.find(eps);
  if (!i) return std::nullopt;
  if (!key) return aggregates.headline_certified.at(*i);
  const auto it = aggregates.certified.find(*key);
  if (it == aggregates.certified.end()) return std::nullopt;
  return it->second.at(*i);
}

namespace {

/// A per-ε aggregate of the run at ε (nullopt: no such aggregate, or no such ε).
std::optional<double> per_eps_at(const Results& r, const std::optional<std::vector<double>>& per,
                                 double eps) {
  const auto i = r.config.grid.find(eps);
  if (!i || !per) return std::nullopt;
  return per->at(*i);
}

}  // namespace

std::optional<double> Results::empirical_at(double eps) const {
  return per_eps_at(*this, aggregates.empirical, eps);
}
std::optional<double> Results::falsified_at(double eps) const {
  return per_eps_at(*this, aggregates.falsified, eps);
}
std::optional<double> Results::unknown_at(double eps) const {
  return per_eps_at(*this, aggregates.unknown, eps);
}

std::vector<RadiusKey> Results::keys() const {
  std::vector<RadiusKey> out;
  for (const auto& [k, v] : aggregates.certified) out.push_back(k);
  // Tightest estimator first: bab, alpha-crown, crown, crown-ibp, ibp, local, global.
  auto rank = [](Estimator e) { return -static_cast<int>(e); };
  std::stable_sort(out.begin(), out.end(), [&](const RadiusKey& a, const RadiusKey& b) {
    if (a.is_main_form() != b.is_main_form()) return a.is_main_form();
    return rank(a.estimator) < rank(b.estimator);
  });
  return out;
}

// --- merging shards -----------------------------------------------------------------------

Results results_merge(const std::vector<Results>& shards) {
  if (shards.empty()) throw ConfigError("merge: no results to merge");
  auto settings = [](const Results& r) {
    auto c = results_config_json(r.config);
    c.erase("shard");
    c.erase("samples");
    return c;
  };
  const auto config = settings(shards[0]);
  Results merged = shards[0];
  merged.rows.clear();
  std::set<int64_t> seen;
  double certify_s = 0, empirical_s = 0;
  for (size_t i = 0; i < shards.size(); ++i) {
    const auto& s = shards[i];
    const std::string which = "merge: shard " + std::to_string(i);
    if (s.schema != shards[0].schema)
      throw ConfigError(which + " has schema " + results_schema_name(s.schema) + ", shard 0 " +
                        results_schema_name(shards[0].schema));
    if (s.fingerprint != shards[0].fingerprint)
      throw ConfigError(which + " certifies a different checkpoint (fingerprint differs)");
    if (settings(s) != config) throw ConfigError(which + " was run with different settings");
    for (const auto& row : s.rows) {
      if (!seen.insert(row.index).second)
        throw ConfigError("merge: sample " + std::to_string(row.index) +
                          " appears in more than one shard");
      merged.rows.push_back(row);
    }
    certify_s += s.timing.value("certify_seconds", 0.0);
    empirical_s += s.timing.value("empirical_seconds", 0.0);
  }
  std::sort(merged.rows.begin(), merged.rows.end(),
            [](const ResultRow& a, const ResultRow& b) { return a.index < b.index; });
  merged.config.shard.clear();
  merged.timing["certify_seconds"] = certify_s;
  merged.timing["empirical_seconds"] = empirical_s;
  merged.timing["certify_samples_per_s"] =
      certify_s > 0 ? static_cast<double>(merged.rows.size()) / certify_s : 0.0;
  merged.merged_from = static_cast<int64_t>(shards.size());
  merged.aggregate();
  return merged;
}

}  // namespace moecert
