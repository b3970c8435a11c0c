// results.json: reading every schema version with errors that name the file and field,
// and writing the current one (include/moecert/results.h).
#include <charconv>
#include <cmath>
#include <fstream>
#include <limits>
#include <set>

#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/limits.h"
#include "results-impl.h"

namespace moecert {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

/// A JSON number, or null for +inf / NaN (an unbounded or missing radius).
nlohmann::json number_or_null(double v) {
  return std::isfinite(v) ? nlohmann::json(v) : nlohmann::json();
}

// --- reading with errors that name the file and field ---------------------------------

/// Reads fields of one JSON object; every error names the file and the field's path.
class Fields {
 public:
  Fields(const nlohmann::json& j, std::string source, std::string path)
      : j_(j), source_(std::move(source)), path_(std::move(path)) {
    if (!j_.is_object()) fail("", "must be an object, got " + type_of(j_));
  }
  [[noreturn]] void fail(const std::string& field, const std::string& why) const {
    throw ConfigError(source_ + ": field '" + where(field) + "' " + why);
  }
  std::string where(const std::string& field) const {
    return path_.empty() ? field : field.empty() ? path_ : path_ + "." + field;
  }
  bool has(const std::string& f) const { return j_.contains(f); }
  const nlohmann::json& at(const std::string& f) const {
    if (!j_.contains(f)) fail(f, "is missing");
    return j_[f];
  }
  Fields object(const std::string& f) const { return Fields(at(f), source_, where(f)); }
  int64_t integer(const std::string& f, int64_t lo, int64_t hi) const {
    const auto& v = at(f);
    if (!v.is_number_integer()) fail(f, "must be an integer, got " + type_of(v));
    const int64_t x = v.is_number_unsigned() && v.get<uint64_t>() > uint64_t(INT64_MAX)
                          ? INT64_MAX
                          : v.get<int64_t>();
    if (x < lo || x > hi)
      fail(f, "must be in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got " +
                  std::to_string(x));
    return x;
  }
  bool boolean(const std::string& f) const {
    const auto& v = at(f);
    if (!v.is_boolean()) fail(f, "must be true or false, got " + type_of(v));
    return v.get<bool>();
  }
  /// A number, or +inf for null where `null_is_inf`.
  double number(const std::string& f, bool null_is_inf = false) const {
    const auto& v = at(f);
    if (v.is_null() && null_is_inf) return kInf;
    if (!v.is_number())
      fail(f,
           "must be a number" + std::string(null_is_inf ? " or null" : "") + ", got " + type_of(v));
    const double x = v.get<double>();
    if (!std::isfinite(x)) fail(f, "must be finite");
    return x;
  }
  std::string string(const std::string& f) const {
    const auto& v = at(f);
    if (!v.is_string()) fail(f, "must be a string, got " + type_of(v));
    return v.get<std::string>();
  }
  std::string string_or(const std::string& f, const std::string& fallback) const {
    return has(f) && !j_[f].is_null() ? string(f) : fallback;
  }
  const nlohmann::json& json() const { return j_; }
  const std::string& source() const { return source_; }

  static std::string type_of(const nlohmann::json& v) {
    std::string t = v.type_name();
    if (v.is_primitive()) {
      std::string d = v.dump();
      if (d.size() > 40) d = d.substr(0, 40) + "...";
      t += " " + d;
    }
    return t;
  }

 private:
  const nlohmann::json& j_;
  std::string source_, path_;
};

/// A radius: a number >= 0, or null (+inf).
double radius_value(const Fields& f, const std::string& field) {
  const double r = f.number(field, /*null_is_inf=*/true);
  if (r < 0) f.fail(field, "must be >= 0, got " + std::to_string(r));
  return r;
}

ResultRow row_from_json(const Fields& f) {
  ResultRow row;
  row.index = f.integer("index", 0, limits::max_samples);
  row.label = f.has("label") ? f.integer("label", 0, limits::max_classes) : 0;
  row.pred = f.has("pred") && !f.json()["pred"].is_null()
                 ? f.integer("pred", -1, limits::max_classes)
                 : -1;
  row.correct = f.boolean("correct");
  const auto radii = f.object("radii");
  for (const auto& [key, v] : radii.json().items()) {
    const auto k = RadiusKey::parse(key, f.source() + ": key '" + radii.where(key) + "'");
    row.radii[k] = radius_value(radii, key);
  }
  if (f.has("headline") && !f.json()["headline"].is_null()) {
    const auto h = f.object("headline");
    row.headline = radius_value(h, "radius");
    const std::string form = h.string_or("form", "");
    if (!form.empty())
      row.headline_key = RadiusKey::parse(form, f.source() + ": " + h.where("form"));
  } else {  // written before rows had a headline: every radius was sound, the largest is it
    for (const auto& [k, r] : row.radii)
      if (!row.headline_key || r > row.headline) row.headline = r, row.headline_key = k;
  }
  if (f.has("empirical_radius")) row.empirical = radius_value(f, "empirical_radius");
  if (f.has("router_weights") && !f.json()["router_weights"].is_null()) {
    const auto& w = f.json()["router_weights"];
    auto vec = [&](const nlohmann::json& v) {
      if (!v.is_array()) f.fail("router_weights", "must be an array of numbers or of arrays");
      std::vector<double> out;
      for (const auto& x : v) {
        if (!x.is_number())
          f.fail("router_weights", "must hold numbers, got " + Fields::type_of(x));
        out.push_back(x.get<double>());
      }
      return out;
    };
    if (!w.is_array()) f.fail("router_weights", "must be an array");
    row.dual_weights = !w.empty() && w[0].is_array();
    if (row.dual_weights)
      for (const auto& m : w) row.router_weights.push_back(vec(m));
    else if (!w.empty())
      row.router_weights.push_back(vec(w));
  }
  static const std::set<std::string> known{
      "index",         "label", "pred", "correct", "radii", "headline", "empirical_radius",
      "router_weights"};
  for (const auto& [k, v] : f.json().items())
    if (!known.count(k)) row.extra[k] = v;
  return row;
}

nlohmann::json row_to_json(const ResultRow& row) {
  nlohmann::json j = row.extra;
  j["index"] = row.index, j["label"] = row.label, j["correct"] = row.correct;
  if (row.pred >= 0) j["pred"] = row.pred;
  nlohmann::json radii = nlohmann::json::object();
  for (const auto& [k, r] : row.radii) radii[k.text()] = number_or_null(r);
  j["radii"] = radii;
  j["headline"] = {{"form", row.headline_key ? row.headline_key->text() : ""},
                   {"radius", number_or_null(row.headline)}};
  if (row.empirical) j["empirical_radius"] = number_or_null(*row.empirical);
  if (row.router_weights.empty())
    j["router_weights"] = nullptr;
  else if (row.dual_weights)
    j["router_weights"] = row.router_weights;
  else
    j["router_weights"] = row.router_weights[0];
  return j;
}

ResultsConfig config_from_json(const Fields& f, int schema, const std::string& top_norm) {
  ResultsConfig c;
  c.raw = f.json();
  const auto& g = f.at("eps_grid");
  if (!g.is_array()) f.fail("eps_grid", "must be an array of numbers");
  std::vector<double> grid;
  for (const auto& e : g) {
    if (!e.is_number()) f.fail("eps_grid", "must hold numbers, got " + Fields::type_of(e));
    grid.push_back(e.get<double>());
  }
  c.grid = EpsGrid(grid, f.source() + ": field '" + f.where("eps_grid") + "'");
  if (f.has("estimators")) {
    const auto& es = f.at("estimators");
    if (!es.is_array()) f.fail("estimators", "must be an array of names");
    for (const auto& e : es) {
      const auto est = e.is_string() ? estimator_from_name(e.get<std::string>()) : std::nullopt;
      if (!est) f.fail("estimators", "holds an unknown estimator " + e.dump());
      c.estimators.push_back(*est);
    }
  }
  c.norm = top_norm;
  // Schema 1 certified the whole ball; schema 2 added the pixel box, on by default.
  c.box = schema >= 2 && f.has("domain") ? f.object("domain").boolean("box") : false;
  c.empirical = f.has("empirical") ? f.boolean("empirical") : true;
  c.shard = f.string_or("shard", "");
  return c;
}

nlohmann::json per_eps_json(const std::vector<double>& v, const EpsGrid& grid) {
  nlohmann::json j = nlohmann::json::object();
  for (size_t i = 0; i < grid.size(); ++i) j[eps_key(grid[i])] = v[i];
  return j;
}

nlohmann::json aggregates_json(const Aggregates& a, const EpsGrid& grid) {
  nlohmann::json j;
  j["samples"] = a.samples;
  j["clean_accuracy"] = a.clean_accuracy;
  nlohmann::json cert = nlohmann::json::object(), med = nlohmann::json::object();
  for (const auto& [k, v] : a.certified) cert[k.text()] = per_eps_json(v, grid);
  for (const auto& [k, m] : a.median_radius) med[k.text()] = number_or_null(m);
  j["certified_accuracy"] = cert;
  j["median_radius"] = med;
  nlohmann::json forms = nlohmann::json::object();
  for (const auto& [k, n] : a.headline_forms) forms[k.text()] = n;
  j["headline"] = {{"certified_accuracy", per_eps_json(a.headline_certified, grid)},
                   {"median_radius", number_or_null(a.headline_median)},
                   {"forms", forms}};
  if (a.empirical) {
    j["empirical_accuracy"] = per_eps_json(*a.empirical, grid);
    j["median_empirical_radius"] = number_or_null(a.median_empirical);
  }
  if (a.falsified && a.unknown)
    j["verdicts"] = {
        {"verified", per_eps_json(a.headline_certified, grid)},
        {"falsified", per_eps_json(*a.falsified, grid)},
        {"unknown", per_eps_json(*a.unknown, grid)},
        {"misclassified",
         per_eps_json(std::vector<double>(grid.size(), 1.0 - a.clean_accuracy), grid)}};
  j["median_tightness"] = number_or_null(a.median_tightness);
  j["tightness_samples"] = a.tightness_samples;
  nlohmann::json v = nlohmann::json::array();
  for (const auto& x : a.violations)
    v.push_back({{"index", x.index},
                 {"form", x.key.text()},
                 {"certified", number_or_null(x.certified)},
                 {"empirical", number_or_null(x.empirical)}});
  j["violations"] = v;
  j["violation_count"] = a.violations.size();
  if (!a.expert_usage.empty()) {
    double total = 0, top = 0;
    for (auto c : a.expert_usage) total += static_cast<double>(c);
    std::vector<double> shares;
    for (auto c : a.expert_usage) {
      shares.push_back(total > 0 ? static_cast<double>(c) / total : 0.0);
      top = std::max(top, shares.back());
    }
    j["expert_usage"] = {{"clean", a.expert_usage}, {"clean_share", shares}, {"max_share", top}};
  }
  return j;
}

int schema_version_of(const nlohmann::json& j, const std::string& source) {
  if (!j.is_object())
    throw ConfigError(source + ": not a moecert results file (not a JSON object)");
  const std::string schema =
      j.contains("schema") && j["schema"].is_string() ? j["schema"].get<std::string>() : "";
  const std::string prefix = results_schema_prefix;
  const std::string reads = results_schema_name(results_schema_oldest) + " to " +
                            results_schema_name(results_schema_version);
  if (schema.rfind(prefix, 0) != 0)
    throw ConfigError(source + ": not a moecert certify results file (schema '" + schema +
                      "'; this moecert reads " + reads + ")");
  int version = 0;
  const char* first = schema.data() + prefix.size();
  const char* last = schema.data() + schema.size();
  const auto [end, ec] = std::from_chars(first, last, version);
  if (ec != std::errc() || end != last || version < results_schema_oldest ||
      version > results_schema_version)
    throw ConfigError(source + ": results schema '" + schema + "' is not one this moecert " +
                      MOECERT_VERSION + " reads (" + reads + ")" +
                      (ec == std::errc() && version > results_schema_version
                           ? ": it was written by a newer moecert"
                           : ""));
  return version;
}

}  // namespace

/// The config as written: what was read, with the typed fields in their current form.
nlohmann::json results_config_json(const ResultsConfig& c) {
  nlohmann::json j = c.raw;
  j["eps_grid"] = c.grid.values();
  nlohmann::json est = nlohmann::json::array();
  for (auto e : c.estimators) est.push_back(estimator_name(e));
  j["estimators"] = est;
  j["domain"] = {{"norm", c.norm}, {"box", c.box}};
  j["empirical"] = c.empirical;
  j["shard"] = c.shard.empty() ? nlohmann::json() : nlohmann::json(c.shard);
  return j;
}

// --- JSON --------------------------------------------------------------------------------

nlohmann::json Results::to_json() const {
  nlohmann::json j = extra;
  j["schema"] = results_schema_name(results_schema_version);
  j["moecert_version"] = moecert_version;
  j["checkpoint"] = checkpoint;
  j["fingerprint"] = fingerprint;
  j["model"] = model;
  j["kind"] = kind;
  j["norm"] = config.norm;
  j["alpha"] = alpha ? nlohmann::json(*alpha) : nlohmann::json();
  j["dataset"] = {{"name", data.name}, {"split", data.split}, {"size", data.size}};
  j["config"] = results_config_json(config);
  j["config"]["samples"] = rows.size();
  j["constants_global"] = constants_global;
  j["constants_lower"] = constants_lower;
  if (!command.empty()) j["command"] = command;
  j["timing"] = timing;
  nlohmann::json r = nlohmann::json::array();
  for (const auto& row : rows) r.push_back(row_to_json(row));
  j["rows"] = r;
  if (merged_from > 0) j["merged_from"] = merged_from;
  j["aggregates"] = aggregates_json(aggregates, config.grid);
  return j;
}

Results Results::from_json(const nlohmann::json& j, const std::string& source) {
  Results r;
  r.schema = schema_version_of(j, source);
  const Fields f(j, source, "");
  r.moecert_version = f.string_or("moecert_version", "");
  r.checkpoint = f.string_or("checkpoint", "");
  r.model = f.string_or("model", "");
  r.kind = f.string_or("kind", "moe");
  if (r.kind != "moe" && r.kind != "dual")
    f.fail("kind", "must be 'moe' or 'dual', got '" + r.kind + "'");
  r.command = f.string_or("command", "");
  if (f.has("fingerprint")) r.fingerprint = f.object("fingerprint").json();
  if (f.has("alpha") && !j["alpha"].is_null()) r.alpha = f.number("alpha");
  if (f.has("dataset")) {
    const auto d = f.object("dataset");
    r.data.name = d.string_or("name", "");
    r.data.split = d.string_or("split", "test");
    r.data.size = d.has("size") ? d.integer("size", 0, limits::max_samples) : 0;
  }
  const std::string norm = f.string_or("norm", "inf");
  if (norm != "inf" && norm != "2") f.fail("norm", "must be 'inf' or '2', got '" + norm + "'");
  r.config = config_from_json(f.object("config"), r.schema, norm);
  if (f.has("constants_global")) r.constants_global = j["constants_global"];
  if (f.has("constants_lower")) r.constants_lower = j["constants_lower"];
  if (f.has("timing") && j["timing"].is_object()) r.timing = j["timing"];
  if (f.has("merged_from") && !j["merged_from"].is_null())
    r.merged_from = f.integer("merged_from", 0, limits::max_shards);
  const auto& rows = f.at("rows");
  if (!rows.is_array()) f.fail("rows", "must be an array");
  std::set<int64_t> seen;
  for (size_t i = 0; i < rows.size(); ++i) {
    auto row = row_from_json(Fields(rows[i], source, "rows[" + std::to_string(i) + "]"));
    if (!seen.insert(row.index).second)
      f.fail("rows[" + std::to_string(i) + "].index",
             "repeats sample " + std::to_string(row.index));
    r.rows.push_back(std::move(row));
  }
  static const std::set<std::string> known{"schema",
                                           "moecert_version",
                                           "checkpoint",
                                           "fingerprint",
                                           "model",
                                           "kind",
                                           "norm",
                                           "alpha",
                                           "dataset",
                                           "config",
                                           "constants_global",
                                           "constants_lower",
                                           "command",
                                           "timing",
                                           "rows",
                                           "merged_from",
                                           "aggregates"};
  for (const auto& [k, v] : j.items())
    if (!known.count(k)) r.extra[k] = v;
  r.aggregate();
  return r;
}

Results Results::read(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("cannot open results file " + path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError(path + ": not valid JSON (" + e.what() + ")");
  }
  return from_json(j, path);
}

void Results::write(const std::string& path) const {
  write_file_atomic(path, to_json().dump(1) + "\n");
}

}  // namespace moecert
