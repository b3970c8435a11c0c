// Gate expressions, their evaluation on typed results, JUnit XML, baseline gates.
#include <cmath>
#include <limits>
#include <regex>
#include <sstream>

#include "moecert/error.h"
#include "moecert/report.h"

namespace moecert {
namespace {

constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

const char* kMetrics =
    "sa | clean_acc | certified_acc@E (= verified_acc@E) | certified_acc[FORM_ESTIMATOR]@E | "
    "empirical_acc@E | ra@E | falsified@E | unknown@E | violations | median_tightness | "
    "median_radius | median_radius[FORM_ESTIMATOR]";

std::string xml_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    switch (c) {
      case '&':
        o += "&amp;";
        break;
      case '<':
        o += "&lt;";
        break;
      case '>':
        o += "&gt;";
        break;
      case '"':
        o += "&quot;";
        break;
      case '\'':
        o += "&apos;";
        break;
      default:
        o += c;
    }
  }
  return o;
}

bool compare(double a, const std::string& op, double b) {
  if (std::isnan(a)) return false;  // a value the run does not have passes no gate
  if (op == ">=") return a >= b;
  if (op == "<=") return a <= b;
  if (op == ">") return a > b;
  if (op == "<") return a < b;
  if (op == "==") return a == b;
  return a != b;
}

std::string number_text(double v) {
  if (std::isnan(v)) return "n/a";
  std::ostringstream s;
  s << v;
  return s.str();
}

}  // namespace

std::string gate_metric_name(GateMetric m) {
  switch (m) {
    case GateMetric::clean_acc:
      return "clean_acc";
    case GateMetric::certified_acc:
      return "certified_acc";
    case GateMetric::empirical_acc:
      return "empirical_acc";
    case GateMetric::violations:
      return "violations";
    case GateMetric::median_tightness:
      return "median_tightness";
    case GateMetric::median_radius:
      return "median_radius";
    case GateMetric::falsified:
      return "falsified";
    case GateMetric::unknown:
      return "unknown";
  }
  return "?";
}

Gate gate_parse(const std::string& expr) {
  static const std::regex re(
      R"(^\s*([a-z_]+)(\[([^\]]*)\])?(@([^\s<>=!]*))?\s*(>=|<=|==|!=|>|<)\s*([-+0-9.eE]+)\s*$)");
  std::smatch m;
  if (expr.size() > 1000 || !std::regex_match(expr, m, re))
    throw ConfigError::invalid("--gate", expr,
                               "METRIC[@EPS] OP VALUE, e.g. certified_acc@0.02>=0.40");
  Gate g;
  g.text = expr, g.op = m[6];
  const std::string metric = m[1];
  const std::vector<std::pair<std::string, GateMetric>> names{
      {"sa", GateMetric::clean_acc},
      {"clean_acc", GateMetric::clean_acc},
      {"certified_acc", GateMetric::certified_acc},
      {"verified_acc", GateMetric::certified_acc},
      {"falsified", GateMetric::falsified},
      {"unknown", GateMetric::unknown},
      {"empirical_acc", GateMetric::empirical_acc},
      {"ra", GateMetric::empirical_acc},
      {"violations", GateMetric::violations},
      {"median_tightness", GateMetric::median_tightness},
      {"median_radius", GateMetric::median_radius}};
  bool known = false;
  for (const auto& [name, metric_of] : names)
    if (name == metric) g.metric = metric_of, known = true;
  if (!known) throw ConfigError::invalid("--gate metric", metric, kMetrics);
  try {
    size_t used = 0;
    g.value = std::stod(m[7], &used);
    if (used != m[7].length() || !std::isfinite(g.value)) throw std::invalid_argument(m[7]);
  } catch (const std::exception&) {
    throw ConfigError::invalid("--gate '" + expr + "' value", m[7], "a number");
  }
  if (m[4].matched) g.eps = eps_parse(m[5], "--gate '" + expr + "' ε");
  if (m[2].matched) g.key = RadiusKey::parse(m[3], "--gate '" + expr + "' key");
  const bool needs_eps = g.metric == GateMetric::certified_acc ||
                         g.metric == GateMetric::empirical_acc ||
                         g.metric == GateMetric::falsified || g.metric == GateMetric::unknown;
  if (needs_eps && !g.eps) throw ConfigError("--gate '" + expr + "': " + metric + " needs @EPS");
  if (!needs_eps && g.eps) throw ConfigError("--gate '" + expr + "': " + metric + " takes no @EPS");
  if (g.key && g.metric != GateMetric::certified_acc && g.metric != GateMetric::median_radius)
    throw ConfigError("--gate '" + expr +
                      "': only certified_acc and median_radius take [FORM_ESTIMATOR]");
  return g;
}

double gate_metric(const Results& results, const Gate& g) {
  const auto& agg = results.aggregates;
  const auto& grid = results.config.grid;
  auto missing_eps = [&](const std::string& why = "") -> double {
    throw ConfigError("--gate '" + g.text + "': ε " + eps_key(*g.eps) +
                      " is not in the run's grid (" + grid.text() + ")" + why);
  };
  switch (g.metric) {
    case GateMetric::clean_acc:
      return agg.clean_accuracy;
    case GateMetric::violations:
      return static_cast<double>(agg.violations.size());
    case GateMetric::median_tightness:
      return std::isnan(agg.median_tightness) ? 0.0 : agg.median_tightness;
    case GateMetric::empirical_acc: {
      if (!agg.empirical)
        throw ConfigError("--gate '" + g.text + "': the results have no empirical cross-check");
      const auto v = results.empirical_at(*g.eps);
      return v ? *v : missing_eps();
    }
    case GateMetric::certified_acc: {
      if (g.key && !agg.certified.count(*g.key))
        throw ConfigError("--gate '" + g.text + "': no radius '" + g.key->text() +
                          "' in the results");
      const auto v = results.certified_at(*g.eps, g.key);
      return v ? *v : missing_eps();
    }
    case GateMetric::falsified:
    case GateMetric::unknown: {
      if (!agg.unknown)
        throw ConfigError("--gate '" + g.text +
                          "': the results have no empirical cross-check, which decides it");
      const auto v = g.metric == GateMetric::falsified ? results.falsified_at(*g.eps)
                                                       : results.unknown_at(*g.eps);
      return v ? *v : missing_eps();
    }
    case GateMetric::median_radius: {
      if (!g.key) return agg.headline_median;
      const auto it = agg.median_radius.find(*g.key);
      if (it == agg.median_radius.end())
        throw ConfigError("--gate '" + g.text + "': no radius '" + g.key->text() +
                          "' in the results");
      return it->second;
    }
  }
  return kNaN;
}

std::vector<GateResult> gates_evaluate(const Results& results, const std::vector<Gate>& gates) {
  std::vector<GateResult> out;
  for (const auto& g : gates) {
    GateResult r;
    r.gate = g;
    r.actual = gate_metric(results, g);
    r.passed = compare(r.actual, g.op, g.value);
    out.push_back(r);
  }
  return out;
}

std::vector<GateResult> baseline_gates(const Results& results, const Results& baseline,
                                       double max_drop) {
  std::vector<GateResult> out;
  auto add = [&](const std::string& name, double eps, std::optional<double> now, double before) {
    GateResult r;
    r.gate.text = name + "@" + eps_key(eps) + " >= baseline " + number_text(before) + " - " +
                  number_text(max_drop);
    r.gate.metric = GateMetric::certified_acc, r.gate.eps = eps, r.gate.op = ">=";
    r.gate.value = before - max_drop;
    r.actual = now ? *now : kNaN;
    r.passed = now && *now >= before - max_drop - 1e-12;
    out.push_back(r);
  };
  const auto& grid = baseline.config.grid;
  for (size_t i = 0; i < grid.size(); ++i)
    add("certified_acc", grid[i], results.certified_at(grid[i]),
        baseline.aggregates.headline_certified[i]);
  for (const auto& [key, per] : baseline.aggregates.certified) {
    if (!results.aggregates.certified.count(key))
      continue;  // another estimator set: nothing to compare
    for (size_t i = 0; i < grid.size(); ++i)
      add("certified_acc[" + key.text() + "]", grid[i], results.certified_at(grid[i], key), per[i]);
  }
  if (baseline.aggregates.empirical && results.aggregates.empirical)
    for (size_t i = 0; i < grid.size(); ++i) {
      add("empirical_acc", grid[i], results.empirical_at(grid[i]),
          (*baseline.aggregates.empirical)[i]);
      out.back().gate.metric = GateMetric::empirical_acc;
    }
  return out;
}

std::string junit_xml(const std::vector<GateResult>& results, const std::string& suite) {
  int failures = 0;
  for (const auto& r : results) failures += !r.passed;
  std::ostringstream x;
  x << "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n"
    << "<testsuites name=\"moecert\" tests=\"" << results.size() << "\" failures=\"" << failures
    << "\">\n"
    << "  <testsuite name=\"" << xml_escape(suite) << "\" tests=\"" << results.size()
    << "\" failures=\"" << failures << "\" errors=\"0\">\n";
  for (const auto& r : results) {
    x << "    <testcase classname=\"moecert.gates\" name=\"" << xml_escape(r.gate.text) << "\"";
    if (r.passed) {
      x << "/>\n";
    } else {
      const std::string msg = gate_metric_name(r.gate.metric) + " = " + number_text(r.actual) +
                              (std::isnan(r.actual) ? " (not in this run)" : "") + ", required " +
                              r.gate.op + " " + number_text(r.gate.value);
      x << ">\n      <failure message=\"" << xml_escape(msg) << "\" type=\"gate\">"
        << xml_escape(msg) << "</failure>\n    </testcase>\n";
    }
  }
  x << "  </testsuite>\n</testsuites>\n";
  return x.str();
}

}  // namespace moecert
