// Gate expressions, their evaluation, JUnit XML, baseline regression gates.
#include <cmath>
#include <regex>
#include <sstream>

#include "moecert/error.h"
#include "moecert/report.h"

namespace moecert {
namespace {

const char* kMetrics =
    "sa | clean_acc | certified_acc@E | certified_acc[form]@E | empirical_acc@E | "
    "ra@E | violations | median_tightness | median_radius | median_radius[form]";

/// The value of `per[eps]` where the key parses to eps.
const nlohmann::json* at_eps(const nlohmann::json& per, double eps) {
  for (const auto& [k, v] : per.items())
    if (std::abs(std::stod(k) - eps) <= 1e-12 * std::max(1.0, eps)) return &v;
  return nullptr;
}

std::string grid_text(const nlohmann::json& per) {
  std::string t;
  for (const auto& [k, v] : per.items()) t += (t.empty() ? "" : ", ") + k;
  return t;
}

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
  if (op == ">=") return a >= b;
  if (op == "<=") return a <= b;
  if (op == ">") return a > b;
  if (op == "<") return a < b;
  if (op == "==") return a == b;
  return a != b;
}

}  // namespace

Gate gate_parse(const std::string& expr) {
  static const std::regex re(
      R"(^\s*([a-z_]+)(\[([a-z0-9_-]+)\])?(@([0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?))?\s*(>=|<=|==|!=|>|<)\s*(-?[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?)\s*$)");
  std::smatch m;
  if (!std::regex_match(expr, m, re))
    throw ConfigError::invalid("--gate", expr,
                               "METRIC[@EPS] OP VALUE, e.g. certified_acc@0.02>=0.40");
  Gate g;
  g.text = expr, g.metric = m[1], g.form = m[3], g.op = m[7];
  g.value = std::stod(m[8]);
  if (m[5].matched) g.eps = std::stod(m[5]);
  static const std::vector<std::string> with_eps{"certified_acc", "empirical_acc", "ra"};
  static const std::vector<std::string> without{"sa", "clean_acc", "violations", "median_tightness",
                                                "median_radius"};
  const bool needs = std::find(with_eps.begin(), with_eps.end(), g.metric) != with_eps.end();
  const bool plain = std::find(without.begin(), without.end(), g.metric) != without.end();
  if (!needs && !plain) throw ConfigError::invalid("--gate metric", g.metric, kMetrics);
  if (needs && g.eps < 0) throw ConfigError("--gate '" + expr + "': " + g.metric + " needs @EPS");
  if (plain && g.eps >= 0)
    throw ConfigError("--gate '" + expr + "': " + g.metric + " takes no @EPS");
  if (!g.form.empty() && g.metric != "certified_acc" && g.metric != "median_radius")
    throw ConfigError("--gate '" + expr + "': only certified_acc and median_radius take [form]");
  return g;
}

double gate_metric(const nlohmann::json& results, const Gate& g) {
  const auto& agg = results.at("aggregates");
  if (g.metric == "sa" || g.metric == "clean_acc") return agg.at("clean_accuracy");
  if (g.metric == "violations") return agg.at("violation_count");
  if (g.metric == "median_tightness") {
    const auto& t = agg.at("median_tightness");
    return t.is_null() ? 0.0 : t.get<double>();
  }
  if (g.metric == "empirical_acc" || g.metric == "ra") {
    if (!agg.contains("empirical_accuracy"))
      throw ConfigError("--gate '" + g.text + "': the results have no empirical cross-check");
    const auto* v = at_eps(agg["empirical_accuracy"], g.eps);
    if (!v)
      throw ConfigError("--gate '" + g.text + "': eps not in the grid (" +
                        grid_text(agg["empirical_accuracy"]) + ")");
    return *v;
  }
  // Without [form]: the headline (per sample the best sound radius of any form), or, in
  // results written before it existed, the best single form.
  if (g.form.empty() && agg.contains("headline")) {
    const auto& h = agg["headline"];
    if (g.metric == "median_radius")
      return h.at("median_radius").is_null() ? INFINITY : h["median_radius"].get<double>();
    const auto* e = at_eps(h.at("certified_accuracy"), g.eps);
    if (!e)
      throw ConfigError("--gate '" + g.text + "': eps not in the grid (" +
                        grid_text(h["certified_accuracy"]) + ")");
    return *e;
  }
  const auto& table =
      g.metric == "certified_acc" ? agg.at("certified_accuracy") : agg.at("median_radius");
  if (!g.form.empty() && !table.contains(g.form))
    throw ConfigError("--gate '" + g.text + "': no form '" + g.form + "' in the results");
  double best = -1;
  for (const auto& [form, v] : table.items()) {
    if (!g.form.empty() && form != g.form) continue;
    double x;
    if (g.metric == "certified_acc") {
      const auto* e = at_eps(v, g.eps);
      if (!e)
        throw ConfigError("--gate '" + g.text + "': eps not in the grid (" + grid_text(v) + ")");
      x = *e;
    } else {
      x = v.is_null() ? INFINITY : v.get<double>();
    }
    best = std::max(best, x);
  }
  return best;
}

std::vector<GateResult> gates_evaluate(const nlohmann::json& results,
                                       const std::vector<Gate>& gates) {
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

std::vector<GateResult> baseline_gates(const nlohmann::json& results,
                                       const nlohmann::json& baseline, double max_drop) {
  std::vector<GateResult> out;
  const auto& now = results.at("aggregates");
  const auto& old = baseline.at("aggregates");
  auto add = [&](const std::string& name, double eps, double a, double b) {
    GateResult r;
    std::ostringstream text;
    text << name << "@" << eps << " >= baseline " << b << " - " << max_drop;
    r.gate.text = text.str(), r.gate.metric = name, r.gate.eps = eps, r.gate.op = ">=";
    r.gate.value = b - max_drop;
    r.actual = a;
    r.passed = a >= b - max_drop - 1e-12;
    out.push_back(r);
  };
  if (old.contains("headline") && now.contains("headline"))
    for (const auto& [k, v] : old["headline"]["certified_accuracy"].items())
      if (const auto* a = at_eps(now["headline"]["certified_accuracy"], std::stod(k)))
        add("certified_acc", std::stod(k), *a, v);
  for (const auto& [form, per] : old.at("certified_accuracy").items()) {
    if (!now.at("certified_accuracy").contains(form)) continue;
    for (const auto& [k, v] : per.items())
      if (const auto* a = at_eps(now["certified_accuracy"][form], std::stod(k)))
        add("certified_acc[" + form + "]", std::stod(k), *a, v);
  }
  if (old.contains("empirical_accuracy") && now.contains("empirical_accuracy"))
    for (const auto& [k, v] : old["empirical_accuracy"].items())
      if (const auto* a = at_eps(now["empirical_accuracy"], std::stod(k)))
        add("empirical_acc", std::stod(k), *a, v);
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
      std::ostringstream msg;
      msg << r.gate.metric << " = " << r.actual << ", required " << r.gate.op << " "
          << r.gate.value;
      x << ">\n      <failure message=\"" << xml_escape(msg.str()) << "\" type=\"gate\">"
        << xml_escape(msg.str()) << "</failure>\n    </testcase>\n";
    }
  }
  x << "  </testsuite>\n</testsuites>\n";
  return x.str();
}

}  // namespace moecert
