// report.md and a self-contained report.html (SPEC §5). Plots are drawn by gnuplot's
// SVG terminal and inlined into the HTML, so the page needs no other file.
#include "moecert/report.h"

#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>

#include "moecert/attacks.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"

namespace moecert {
namespace {

std::string fmt(double v, int digits = 4) {
  if (!std::isfinite(v)) return "∞";
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", digits, v);
  return b;
}

std::string pct(double v) { return fmt(100.0 * v, 2) + "%"; }

double num_or(const nlohmann::json& v, double fallback) {
  return v.is_number() ? v.get<double>() : fallback;
}

std::string html_escape(const std::string& s) {
  std::string o;
  for (char c : s) {
    if (c == '&')
      o += "&amp;";
    else if (c == '<')
      o += "&lt;";
    else if (c == '>')
      o += "&gt;";
    else if (c == '"')
      o += "&quot;";
    else
      o += c;
  }
  return o;
}

std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

bool have_gnuplot() { return std::system("command -v gnuplot >/dev/null 2>&1") == 0; }

/// Runs a gnuplot script that writes `svg_path`; returns the SVG text (empty on failure).
std::string gnuplot_svg(const std::string& script, const std::string& svg_path,
                        const std::string& dir) {
  const std::string script_path = dir + "/.plot.gp";
  {
    std::ofstream f(script_path);
    f << "set terminal svg size 720,420 dynamic noenhanced font 'sans,12' background '#ffffff'\n"
      << "set output '" << svg_path << "'\n"
      << script << "\nunset output\n";
  }
  const int rc = std::system(("gnuplot '" + script_path + "' 2>'" + dir + "/.plot.err'").c_str());
  std::remove(script_path.c_str());
  if (rc != 0) return "";
  std::remove((dir + "/.plot.err").c_str());
  auto svg = read_file(svg_path);
  const auto start = svg.find("<svg");
  return start == std::string::npos ? "" : svg.substr(start);
}

/// Rank of a form's estimator: the bound-propagation ones first (tightest first).
int estimator_rank(const std::string& form) {
  const std::pair<const char*, int> order[] = {
      {"_alpha-crown", 0}, {"_crown", 1}, {"_ibp", 2}, {"_local", 3}, {"_global", 4}};
  for (const auto& [suffix, rank] : order) {
    const std::string s = suffix;
    if (form.size() > s.size() && form.compare(form.size() - s.size(), s.size(), s) == 0)
      return rank;
  }
  return 5;
}

/// The forms of a run whose radii are reported, bound propagation first.
std::vector<std::string> forms_of(const nlohmann::json& r) {
  std::vector<std::string> forms;
  for (const auto& [form, v] : r.at("aggregates").at("certified_accuracy").items())
    forms.push_back(form);
  std::stable_sort(forms.begin(), forms.end(), [](const std::string& a, const std::string& b) {
    return estimator_rank(a) < estimator_rank(b);
  });
  return forms;
}

/// The headline radius of a row: the best sound radius of any form.
double best_radius(const nlohmann::json& row) {
  if (row.contains("headline")) return num_or(row["headline"]["radius"], 0.0);
  double best = 0;
  for (const auto& [f, v] : row.at("radii").items()) best = std::max(best, num_or(v, 0.0));
  return best;
}

struct Plot {
  std::string title, file, svg;
};

/// Short labels of attack results: the file name without ".json", or the whole name
/// where two would coincide.
std::vector<std::string> attack_labels(const std::vector<AttackResult>& attacks) {
  std::vector<std::string> labels;
  for (const auto& a : attacks) {
    const auto slash = a.name.find_last_of('/');
    std::string l = slash == std::string::npos ? a.name : a.name.substr(slash + 1);
    if (l.size() > 5 && l.compare(l.size() - 5, 5, ".json") == 0) l.resize(l.size() - 5);
    labels.push_back(l.empty() ? a.name : l);
  }
  for (size_t i = 0; i < labels.size(); ++i)
    for (size_t j = 0; j < labels.size(); ++j)
      if (i != j && labels[i] == labels[j]) labels[i] = attacks[i].name;
  return labels;
}

/// A gnuplot data value: the number, or NaN (drawn as missing) when absent.
std::string value_or_nan(const nlohmann::json& o, const char* key) {
  if (!o.contains(key) || !o[key].is_number()) return "NaN";
  std::ostringstream s;
  s << o[key].get<double>();
  return s.str();
}

std::vector<Plot> make_plots(const std::vector<nlohmann::json>& runs,
                             const std::vector<std::string>& names,
                             const std::vector<AttackResult>& attacks,
                             const std::vector<std::string>& labels, const std::string& dir) {
  std::vector<Plot> plots;
  const char* colours[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"};
  // 1. certified vs empirical radius
  {
    std::ostringstream s;
    double hi = 0;
    s << "set title 'Certified vs empirical radius (best sound form per sample)'\n"
      << "set xlabel 'empirical radius (FMN, APGD bisection)'\nset ylabel 'certified radius'\nset "
         "key top left\n"
      << "set grid\n";
    std::string plot = "plot ";
    for (size_t i = 0; i < runs.size(); ++i) {
      s << "$d" << i << " << EOD\n";
      for (const auto& row : runs[i].at("rows")) {
        if (!row.at("correct").get<bool>() || !row.contains("empirical_radius") ||
            row["empirical_radius"].is_null())
          continue;
        const double e = row["empirical_radius"], c = best_radius(row);
        hi = std::max(hi, e);
        s << e << " " << c << "\n";
      }
      s << "EOD\n";
      plot += "$d" + std::to_string(i) + " using 1:2 with points pt 7 ps 0.5 lc rgb '" +
              colours[i % 6] + "' title '" + names[i] + "', ";
    }
    s << "set xrange [0:" << (hi > 0 ? hi * 1.05 : 1)
      << "]\nset yrange [0:" << (hi > 0 ? hi * 1.05 : 1) << "]\n";
    s << plot << "x with lines dt 2 lc rgb '#555555' title 'y = x (above: violation)'\n";
    plots.push_back({"Certified vs empirical radius", "plot-radius.svg", s.str()});
  }
  // 2. accuracy vs eps
  {
    std::ostringstream s;
    s << "set title 'Certified and empirical accuracy vs ε'\nset xlabel 'ε'\nset ylabel "
         "'accuracy'\n"
      << "set yrange [0:1]\nset key outside right\nset grid\n";
    std::string plot = "plot ";
    int block = 0;
    for (size_t i = 0; i < runs.size(); ++i) {
      const auto& agg = runs[i].at("aggregates");
      auto series = [&](const nlohmann::json& per, const std::string& label,
                        const std::string& style) {
        std::vector<std::pair<double, double>> pts;
        for (const auto& [k, v] : per.items()) pts.emplace_back(std::stod(k), v.get<double>());
        std::sort(pts.begin(), pts.end());
        s << "$a" << block << " << EOD\n";
        for (auto [x, y] : pts) s << x << " " << y << "\n";
        s << "EOD\n";
        plot += "$a" + std::to_string(block++) + " using 1:2 with linespoints " + style +
                " lc rgb '" + colours[i % 6] + "' title '" + label + "', ";
      };
      const std::string prefix = runs.size() > 1 ? names[i] + ": " : "";
      if (agg.contains("empirical_accuracy"))
        series(agg["empirical_accuracy"], prefix + "empirical (attacks)", "dt 1 pt 7");
      if (agg.contains("headline"))
        series(agg["headline"]["certified_accuracy"], prefix + "certified (headline)",
               "dt 1 pt 5 lw 2");
      int dash = 2;
      for (const auto& form : forms_of(runs[i]))
        if (form.find("tight") != std::string::npos ||
            form.find("candidate") != std::string::npos ||
            form.find("margin") != std::string::npos || form.find("mixture") != std::string::npos ||
            form.rfind("dual_", 0) == 0)
          series(agg["certified_accuracy"][form], prefix + form,
                 "dt " + std::to_string(dash++) + " pt 6");
    }
    plot.resize(plot.size() - 2);
    s << plot << "\n";
    plots.push_back({"Accuracy vs ε", "plot-accuracy.svg", s.str()});
  }
  // 3. Lipschitz constants: [lower, global] intervals and the mean local constant
  {
    std::ostringstream s;
    s << "set title 'Lipschitz constants per component: [lower, global] and mean local'\n"
      << "set logscale y\nset ylabel 'L (‖·‖_p → ‖·‖_∞)'\nset grid ytics\nset key top left\n"
      << "set xtics rotate by -30\nset style fill solid 0.4\n";
    const auto& r = runs[0];
    s << "$l << EOD\n";
    int x = 0;
    auto emit = [&](const nlohmann::json& c, const nlohmann::json& lower, const std::string& prefix,
                    const std::map<std::string, double>& local) {
      if (c.is_null()) return;
      if (c.contains("router") && c["router"].is_number() && c["router"].get<double>() > 0) {
        const double lo =
            lower.is_object() ? num_or(lower.value("router", nlohmann::json()), 0) : 0;
        s << x++ << " \"" << prefix << "router\" " << std::max(lo, 1e-12) << " "
          << c["router"].get<double>() << " "
          << (local.count(prefix + "router") ? local.at(prefix + "router")
                                             : c["router"].get<double>())
          << "\n";
      }
      for (size_t i = 0; i < c.at("experts").size(); ++i) {
        const double g = c["experts"][i];
        const double lo =
            lower.is_object() && lower.contains("experts") ? num_or(lower["experts"][i], 0) : 0;
        const std::string name = prefix + "expert " + std::to_string(i);
        s << x++ << " \"" << name << "\" " << std::max(lo, 1e-12) << " " << g << " "
          << (local.count(name) ? local.at(name) : g) << "\n";
      }
    };
    // mean local constants over rows
    std::map<std::string, double> local;
    std::map<std::string, int> count;
    for (const auto& row : r.at("rows")) {
      if (!row.contains("constants_local")) continue;
      const auto& c = row["constants_local"]["constants"];
      auto acc = [&](const nlohmann::json& m, const std::string& prefix) {
        if (m.contains("router"))
          local[prefix + "router"] += num_or(m["router"], 0), ++count[prefix + "router"];
        for (size_t i = 0; i < m.at("experts").size(); ++i) {
          const std::string n = prefix + "expert " + std::to_string(i);
          local[n] += num_or(m["experts"][i], 0), ++count[n];
        }
      };
      if (c.contains("robust"))
        acc(c["standard"], "S "), acc(c["robust"], "R ");
      else
        acc(c, "");
    }
    for (auto& [k, v] : local) v /= count[k];
    const auto& cg = r.value("constants_global", nlohmann::json());
    const auto& lw = r.value("constants_lower", nlohmann::json());
    if (cg.is_object() && cg.contains("robust")) {
      emit(cg["standard"],
           lw.is_object() ? lw.value("standard", nlohmann::json()) : nlohmann::json(), "S ", local);
      emit(cg["robust"], lw.is_object() ? lw.value("robust", nlohmann::json()) : nlohmann::json(),
           "R ", local);
    } else {
      emit(cg, lw, "", local);
    }
    s << "EOD\n";
    if (x > 0) {
      s << "set xrange [-0.7:" << x - 0.3 << "]\n"
        << "plot $l using 1:(sqrt($3*$4)):3:4:xtic(2) with yerrorbars lc rgb '#1f77b4' pt 7 ps 0.4 "
           "lw 2 title "
           "'[lower, global]', $l using 1:5 with points pt 9 ps 1.2 lc rgb '#d62728' title 'mean "
           "local'\n";
      plots.push_back({"Lipschitz constants", "plot-lipschitz.svg", s.str()});
    }
  }
  // 4. RA / RA-E / RA-R bars, one cluster per attack result
  if (!attacks.empty()) {
    std::ostringstream s;
    s << "set title 'Empirical robustness: whole model (RA), experts under frozen routing (RA-E), "
         "router (RA-R)'\n"
      << "set style data histogram\nset style histogram cluster gap 1\nset style fill solid 0.85 "
         "border -1\n"
      << "set boxwidth 0.9\nset yrange [0:1]\nset ylabel 'accuracy'\nset grid ytics\nset key "
         "outside right\n"
      << "set xtics rotate by -20\n$r << EOD\n";
    for (size_t i = 0; i < attacks.size(); ++i) {
      const auto& d = attacks[i].data;
      s << "\"" << labels[i] << "\" " << value_or_nan(d, "sa") << " " << value_or_nan(d, "ra")
        << " " << value_or_nan(d, "ra_e") << " " << value_or_nan(d, "ra_r") << "\n";
    }
    s << "EOD\nplot $r using 2:xtic(1) title 'SA' lc rgb '#7f7f7f', $r using 3 title 'RA' lc rgb "
         "'#1f77b4', "
      << "$r using 4 title 'RA-E' lc rgb '#d62728', $r using 5 title 'RA-R' lc rgb '#2ca02c'\n";
    plots.push_back({"RA / RA-E / RA-R", "plot-ra-components.svg", s.str()});
  }
  // 5. α-sweep SA / RA curves of dual-models
  {
    std::ostringstream s;
    std::string plot = "plot ";
    for (size_t i = 0; i < attacks.size(); ++i) {
      const auto& d = attacks[i].data;
      if (!d.contains("alpha_sweep")) continue;
      s << "$s" << i << " << EOD\n";
      for (const auto& row : d["alpha_sweep"])
        s << row["alpha"] << " " << row["sa"] << " " << row["ra"] << "\n";
      s << "EOD\n";
      const std::string c = colours[i % 6];
      plot += "$s" + std::to_string(i) + " using 1:2 with linespoints dt 1 pt 7 lc rgb '" + c +
              "' title '" + labels[i] + ": SA', $s" + std::to_string(i) +
              " using 1:3 with linespoints dt 2 pt 6 lc rgb '" + c + "' title '" + labels[i] +
              ": RA', ";
    }
    if (plot.size() > 5) {
      plot.resize(plot.size() - 2);
      std::ostringstream head;
      head << "set title 'Dual-model α-sweep: F_D = (1 − α) F_S + α F_R'\nset xlabel 'α'\nset "
              "ylabel 'accuracy'\n"
           << "set yrange [0:1]\nset key outside right\nset grid\n";
      plots.push_back(
          {"α-sweep SA / RA", "plot-alpha-sweep.svg", head.str() + s.str() + plot + "\n"});
    }
  }
  if (!have_gnuplot()) {
    for (auto& p : plots) p.svg.clear();
    return plots;
  }
  for (auto& p : plots) p.svg = gnuplot_svg(p.svg, dir + "/" + p.file, dir);
  return plots;
}

/// The attack of an attack file in one phrase: "PGD-20" (suite pgd or an older
/// file without a suite), "standard suite", "fast suite".
std::string attack_config_name(const nlohmann::json& d) {
  const std::string suite = d.value("suite", "pgd");
  if (suite == "pgd") return "PGD-" + d.value("steps", nlohmann::json("?")).dump();
  return suite + " suite";
}

}  // namespace

AttackResult attack_validate(const nlohmann::json& data, const std::string& name) {
  auto fail = [&](const std::string& what) -> void { throw ConfigError(name + ": " + what); };
  if (!data.is_object()) fail("not an attack result (the JSON object of `moecert attack --json`)");
  auto unit = [&](const nlohmann::json& o, const char* key, bool required,
                  const std::string& where) {
    if (!o.contains(key)) {
      if (required) fail("missing field '" + where + key + "'");
      return;
    }
    const auto& v = o[key];
    if (!v.is_number() || !(v.get<double>() >= 0 && v.get<double>() <= 1))
      fail("field '" + where + key + "' must be a number in [0, 1], got " + v.dump());
  };
  for (const char* key : {"sa", "ra"}) unit(data, key, true, "");
  for (const char* key : {"ra_e", "ra_r"}) unit(data, key, false, "");
  if (data.contains("expert_usage")) {
    const auto& u = data["expert_usage"];
    if (!u.is_object()) fail("field 'expert_usage' must be an object");
    for (const char* key : {"clean", "adversarial"}) {
      if (!u.contains(key) || !u[key].is_array())
        fail(std::string("field 'expert_usage.") + key + "' must be an array");
      for (const auto& c : u[key])
        if (!c.is_number_integer() || c.get<int64_t>() < 0)
          fail(std::string("field 'expert_usage.") + key +
               "' must hold sample counts (integers >= 0), got " + c.dump());
    }
  }
  if (data.contains("alpha_sweep")) {
    const auto& sweep = data["alpha_sweep"];
    if (!sweep.is_array() || sweep.empty()) fail("field 'alpha_sweep' must be a non-empty array");
    for (size_t i = 0; i < sweep.size(); ++i) {
      const std::string where = "alpha_sweep[" + std::to_string(i) + "].";
      if (!sweep[i].is_object())
        fail("field 'alpha_sweep[" + std::to_string(i) + "]' must be an object");
      for (const char* key : {"alpha", "sa", "ra"}) unit(sweep[i], key, true, where);
    }
  }
  return {name, data};
}

AttackResult attack_read(const std::string& path) {
  std::ifstream in(path);
  if (!in) throw ConfigError("cannot open attack file " + path);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError(path + ": not valid JSON (" + e.what() + ")");
  }
  return attack_validate(j, path);
}

void report_write(const std::vector<nlohmann::json>& runs, const std::vector<std::string>& names,
                  const std::vector<AttackResult>& attacks, const std::vector<GateResult>& gates,
                  const std::string& out_dir, const std::string& command) {
  if (runs.empty()) throw ConfigError("report: no results given");
  ::mkdir(out_dir.c_str(), 0755);
  const auto labels = attack_labels(attacks);
  const auto plots = make_plots(runs, names, attacks, labels, out_dir);
  std::ostringstream md, html;
  const bool compare = runs.size() > 1;
  md << "# moecert robustness report\n\n";
  html << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>moecert "
          "report</title>\n"
       << "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
          "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;"
          "text-align:right}th{background:#eee}td:first-child,th:first-child{text-align:left}"
          ".pass{color:#1a7f37;font-weight:bold}.fail{color:#cf222e;font-weight:bold}"
          "code{background:#f4f4f4;padding:1px 4px;overflow-wrap:anywhere}figure{margin:1em 0}"
          "svg{max-width:100%;height:auto}</style></head><body>\n"
       << "<h1>moecert robustness report</h1>\n";
  // model cards
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    const auto& fp = r.at("fingerprint");
    const auto training = fp.value("training", nlohmann::json());
    const std::string method = training.is_object() ? training.value("method", "?") : "?";
    md << "## Model" << (compare ? " `" + names[i] + "`" : "") << "\n\n"
       << "- model: " << r.value("model", "?") << "\n- checkpoint: `" << r.value("checkpoint", "?")
       << "`\n"
       << "- weights SHA-256: `" << fp.value("weights_sha256", "?") << "`\n- training method: `"
       << method << "`\n"
       << "- training config: `" << training.dump() << "`\n- norm: p = " << r.value("norm", "?")
       << ", samples: " << r["aggregates"]["samples"] << " of "
       << r.at("dataset").value("name", "?") << "\n\n";
    html << "<h2>Model" << (compare ? " " + html_escape(names[i]) : "") << "</h2><ul>"
         << "<li>model: " << html_escape(r.value("model", "?")) << "</li><li>checkpoint: <code>"
         << html_escape(r.value("checkpoint", "?")) << "</code></li><li>weights SHA-256: <code>"
         << html_escape(fp.value("weights_sha256", "?"))
         << "</code></li><li>training method: <code>" << html_escape(method)
         << "</code></li><li>training config: <code>" << html_escape(training.dump())
         << "</code></li><li>norm: p = " << html_escape(r.value("norm", "?"))
         << ", samples: " << r["aggregates"]["samples"] << " of "
         << html_escape(r.at("dataset").value("name", "?")) << "</li></ul>\n";
  }
  // headline table
  std::vector<std::string> eps;
  for (const auto& e : runs[0].at("config").at("eps_grid")) {
    std::ostringstream k;
    k << e.get<double>();
    eps.push_back(k.str());
  }
  md << "## Headline\n\n| " << (compare ? "run | " : "") << "metric | ";
  html << "<h2>Headline</h2><table><tr>" << (compare ? "<th>run</th>" : "") << "<th>metric</th>";
  for (const auto& e : eps) md << "ε = " << e << " | ", html << "<th>ε = " << e << "</th>";
  md << "\n|" << (compare ? "---|" : "") << "---|";
  for (size_t i = 0; i < eps.size(); ++i) md << "---|";
  md << "\n";
  html << "</tr>\n";
  auto row_out = [&](const std::string& run, const std::string& metric,
                     const std::vector<std::string>& cells) {
    md << "| " << (compare ? run + " | " : "") << metric << " | ";
    html << "<tr>" << (compare ? "<td>" + html_escape(run) + "</td>" : "") << "<td>"
         << html_escape(metric) << "</td>";
    for (const auto& c : cells) md << c << " | ", html << "<td>" << c << "</td>";
    md << "\n";
    html << "</tr>\n";
  };
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& agg = runs[i].at("aggregates");
    row_out(names[i], "clean accuracy (SA)",
            std::vector<std::string>(eps.size(), pct(agg["clean_accuracy"])));
    if (agg.contains("empirical_accuracy")) {
      std::vector<std::string> c;
      for (const auto& e : eps)
        c.push_back(pct(num_or(agg["empirical_accuracy"].value(e, nlohmann::json()), 0)));
      row_out(names[i], "empirical accuracy (RA, FMN + APGD)", c);
    }
    if (agg.contains("headline")) {
      std::vector<std::string> c;
      for (const auto& e : eps)
        c.push_back(
            pct(num_or(agg["headline"]["certified_accuracy"].value(e, nlohmann::json()), 0)));
      row_out(names[i], "certified (headline: best sound form per sample)", c);
    }
    for (const auto& form : forms_of(runs[i])) {
      std::vector<std::string> c;
      for (const auto& e : eps)
        c.push_back(pct(num_or(agg["certified_accuracy"][form].value(e, nlohmann::json()), 0)));
      row_out(names[i], "certified: " + form, c);
    }
  }
  html << "</table>\n";
  md << "\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& agg = runs[i].at("aggregates");
    const auto& t = agg["median_tightness"];
    md << (compare ? "- `" + names[i] + "`: " : "- ")
       << "median tightness (certified / empirical): "
       << (t.is_null() ? "n/a" : fmt(t.get<double>())) << " over "
       << agg.value("tightness_samples", 0) << " samples\n";
    html << "<p>" << (compare ? html_escape(names[i]) + ": " : "")
         << "median tightness (certified / empirical): "
         << (t.is_null() ? "n/a" : fmt(t.get<double>())) << " over "
         << agg.value("tightness_samples", 0) << " samples</p>\n";
  }
  // attacks
  if (!attacks.empty()) {
    md << "\n## Empirical robustness (attacks)\n\nRA: the whole model attacked; RA-E: the experts "
          "attacked with "
          "the routing frozen at the clean input's choice; RA-R: the router attacked with the "
          "experts fed the "
          "clean input. Experts: share of the samples per top-ranked expert, on the clean inputs / "
          "at the first "
          "attack run's points (a dual-model: its robust member's router).\n\n| attack | "
          "checkpoint | attack config | SA | RA | RA-E | RA-R | experts (clean / attacked) "
          "|\n|---|---|---|---|---|---|---|---|\n";
    html << "<h2>Empirical robustness (attacks)</h2><p>RA: the whole model attacked; RA-E: the "
            "experts attacked "
            "with the routing frozen at the clean input's choice; RA-R: the router attacked with "
            "the experts fed "
            "the clean input. Experts: share of the samples per top-ranked expert, on the clean "
            "inputs / at the first "
            "attack run's points.</p><table><tr><th>attack</th><th>checkpoint</th><th>attack "
            "config</th><th>SA</th>"
            "<th>RA</th><th>RA-E</th><th>RA-R</th><th>experts (clean / attacked)</th></tr>\n";
    auto cell = [](const nlohmann::json& d, const char* key) {
      return d.contains(key) ? pct(d[key].get<double>()) : std::string("—");
    };
    auto usage = [](const nlohmann::json& d) {
      if (!d.contains("expert_usage")) return std::string("—");
      auto shares = [](const nlohmann::json& counts) {
        return ExpertUsage::text(ExpertUsage::shares(counts.get<std::vector<int64_t>>()));
      };
      return shares(d["expert_usage"]["clean"]) + " / " + shares(d["expert_usage"]["adversarial"]);
    };
    for (size_t i = 0; i < attacks.size(); ++i) {
      const auto& d = attacks[i].data;
      std::ostringstream cfg;
      cfg << "p = " << d.value("norm", "?")
          << ", ε = " << d.value("eps", nlohmann::json("?")).dump() << ", " << attack_config_name(d)
          << ", " << d.value("samples", nlohmann::json("?")).dump() << " samples";
      if (d.contains("alpha")) cfg << ", α = " << d["alpha"].dump();
      const std::string ckpt = d.value("checkpoint", "?");
      md << "| " << labels[i] << " | `" << ckpt << "` | " << cfg.str() << " | " << cell(d, "sa")
         << " | " << cell(d, "ra") << " | " << cell(d, "ra_e") << " | " << cell(d, "ra_r") << " | "
         << usage(d) << " |\n";
      html << "<tr><td>" << html_escape(labels[i]) << "</td><td><code>" << html_escape(ckpt)
           << "</code></td><td>" << html_escape(cfg.str()) << "</td><td>" << cell(d, "sa")
           << "</td><td>" << cell(d, "ra") << "</td><td>" << cell(d, "ra_e") << "</td><td>"
           << cell(d, "ra_r") << "</td><td>" << html_escape(usage(d)) << "</td></tr>\n";
    }
    html << "</table>\n";
    for (size_t i = 0; i < attacks.size(); ++i) {
      const auto& d = attacks[i].data;
      if (!d.contains("alpha_sweep")) continue;
      md << "\nα-sweep of `" << labels[i] << "`:\n\n| α | SA | RA |\n|---|---|---|\n";
      html << "<p>α-sweep of " << html_escape(labels[i])
           << ":</p><table><tr><th>α</th><th>SA</th><th>RA</th></tr>\n";
      for (const auto& row : d["alpha_sweep"]) {
        md << "| " << fmt(row["alpha"], 2) << " | " << pct(row["sa"]) << " | " << pct(row["ra"])
           << " |\n";
        html << "<tr><td>" << fmt(row["alpha"], 2) << "</td><td>" << pct(row["sa"]) << "</td><td>"
             << pct(row["ra"]) << "</td></tr>\n";
      }
      html << "</table>\n";
    }
  }
  // gates
  md << "\n## Gates\n\n";
  html << "<h2>Gates</h2>\n";
  if (gates.empty()) {
    md << "No gates were given.\n";
    html << "<p>No gates were given.</p>\n";
  } else {
    md << "| gate | actual | result |\n|---|---|---|\n";
    html << "<table><tr><th>gate</th><th>actual</th><th>result</th></tr>\n";
    for (const auto& g : gates) {
      md << "| `" << g.gate.text << "` | " << fmt(g.actual) << " | "
         << (g.passed ? "pass" : "**FAIL**") << " |\n";
      html << "<tr><td><code>" << html_escape(g.gate.text) << "</code></td><td>" << fmt(g.actual)
           << "</td><td class=\"" << (g.passed ? "pass\">pass" : "fail\">FAIL") << "</td></tr>\n";
    }
    html << "</table>\n";
  }
  // violations
  md << "\n## Soundness violations\n\n";
  html << "<h2>Soundness violations</h2>\n";
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& agg = runs[i].at("aggregates");
    const auto& v = agg.at("violations");
    const std::string who = compare ? names[i] + ": " : "";
    if (v.empty()) {
      md << "- " << who << "none: no attack succeeded inside any certified radius ("
         << agg["samples"] << " samples).\n";
      html << "<p class=\"pass\">" << html_escape(who)
           << "None: no attack succeeded inside any certified radius (" << agg["samples"]
           << " samples).</p>\n";
    } else {
      md << "- " << who << v.size() << " violation(s):\n";
      html << "<p class=\"fail\">" << html_escape(who) << v.size() << " violation(s)</p><ul>\n";
      for (const auto& x : v) {
        md << "  - sample " << x["index"] << ", form `" << x["form"].get<std::string>()
           << "`: certified " << x["certified"].dump() << " > empirical " << x["empirical"].dump()
           << "\n";
        html << "<li>sample " << x["index"] << ", form <code>"
             << html_escape(x["form"].get<std::string>()) << "</code>: certified "
             << x["certified"].dump() << " &gt; empirical " << x["empirical"].dump() << "</li>\n";
      }
      html << "</ul>\n";
    }
  }
  // plots
  md << "\n## Plots\n\n";
  html << "<h2>Plots</h2>\n";
  for (const auto& p : plots) {
    if (p.svg.empty()) {
      md << "- " << p.title << ": not drawn (gnuplot not found or failed)\n";
      html << "<p>" << p.title << ": not drawn (gnuplot not found or failed)</p>\n";
      continue;
    }
    md << "![" << p.title << "](" << p.file << ")\n\n";
    html << "<figure id=\"" << p.file << "\">" << p.svg << "<figcaption>" << html_escape(p.title)
         << "</figcaption></figure>\n";
  }
  const std::string version = runs[0].value("moecert_version", "?");
  md << "\n## Provenance\n\nGenerated by moecert " << version << " with `" << command << "`.\n";
  for (size_t i = 0; i < runs.size(); ++i)
    md << (compare ? "- `" + names[i] + "` certified with `" : "Certified with `")
       << runs[i].value("command", "?") << "`\n";
  html << "<h2>Provenance</h2><p>Generated by moecert " << html_escape(version) << " with <code>"
       << html_escape(command) << "</code>.</p>\n";
  for (size_t i = 0; i < runs.size(); ++i)
    html << "<p>" << (compare ? html_escape(names[i]) + " certified" : "Certified")
         << " with <code>" << html_escape(runs[i].value("command", "?")) << "</code></p>\n";
  html << "</body></html>\n";
  write_file_atomic(out_dir + "/report.md", md.str());
  write_file_atomic(out_dir + "/report.html", html.str());
}

}  // namespace moecert
