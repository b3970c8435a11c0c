// The report's plots, drawn by gnuplot's SVG terminal and inlined into the HTML.
#include <sys/stat.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <map>
#include <sstream>

#include "report-impl.h"

namespace moecert::report_impl {
namespace {

const char* kColours[] = {"#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"};
const char* colour(size_t i) { return kColours[i % 6]; }

/// A label safe inside a gnuplot single-quoted string.
std::string quoted(const std::string& s) {
  std::string o;
  for (char c : s)
    if (c != '\'' && c != '\n' && c != '\\') o += c;
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

/// A number of a JSON blob, or `fallback` where it is not one.
double num(const nlohmann::json& o, const char* key, double fallback) {
  return o.is_object() && o.contains(key) && o[key].is_number() ? o[key].get<double>() : fallback;
}
double num_at(const nlohmann::json& a, size_t i, double fallback) {
  return a.is_array() && i < a.size() && a[i].is_number() ? a[i].get<double>() : fallback;
}

/// The components of one member's constants blob {router, experts[]}: (name, value).
std::vector<std::pair<std::string, double>> components(const nlohmann::json& c,
                                                       const std::string& prefix) {
  std::vector<std::pair<std::string, double>> out;
  if (!c.is_object()) return out;
  if (num(c, "router", 0) > 0) out.emplace_back(prefix + "router", num(c, "router", 0));
  if (c.contains("experts") && c["experts"].is_array())
    for (size_t i = 0; i < c["experts"].size(); ++i)
      out.emplace_back(prefix + "expert " + std::to_string(i), num_at(c["experts"], i, 0));
  return out;
}

/// Per member ("" for one MoE, "S " / "R " for a dual-model's): its part of a blob.
std::vector<std::pair<std::string, nlohmann::json>> members(const nlohmann::json& blob) {
  if (blob.is_object() && blob.contains("robust"))
    return {{"S ", blob.value("standard", nlohmann::json())}, {"R ", blob["robust"]}};
  return {{"", blob}};
}

std::string radius_plot(const std::vector<Results>& runs, const std::vector<std::string>& names) {
  std::ostringstream s;
  double hi = 0;
  s << "set title 'Certified vs empirical radius (best sound form per sample)'\n"
    << "set xlabel 'empirical radius (FMN, APGD bisection)'\nset ylabel 'certified radius'\n"
    << "set key top left\nset grid\n";
  std::string plot = "plot ";
  for (size_t i = 0; i < runs.size(); ++i) {
    s << "$d" << i << " << EOD\n";
    for (const auto& row : runs[i].rows) {
      if (!row.correct || !row.empirical || !std::isfinite(*row.empirical) ||
          !std::isfinite(row.headline))
        continue;
      hi = std::max(hi, *row.empirical);
      s << *row.empirical << " " << row.headline << "\n";
    }
    s << "EOD\n";
    plot += "$d" + std::to_string(i) + " using 1:2 with points pt 7 ps 0.5 lc rgb '" + colour(i) +
            "' title '" + quoted(names[i]) + "', ";
  }
  const double top = hi > 0 ? hi * 1.05 : 1;
  s << "set xrange [0:" << top << "]\nset yrange [0:" << top << "]\n";
  s << plot << "x with lines dt 2 lc rgb '#555555' title 'y = x (above: violation)'\n";
  return s.str();
}

std::string accuracy_plot(const std::vector<Results>& runs, const std::vector<std::string>& names) {
  std::ostringstream s;
  s << "set title 'Certified and empirical accuracy vs ε'\nset xlabel 'ε'\nset ylabel 'accuracy'\n"
    << "set yrange [0:1]\nset key outside right\nset grid\n";
  std::string plot = "plot ";
  int block = 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    auto series = [&](const std::vector<double>& per, const std::string& label,
                      const std::string& style) {
      s << "$a" << block << " << EOD\n";
      for (size_t e = 0; e < r.config.grid.size(); ++e)
        s << r.config.grid[e] << " " << per[e] << "\n";
      s << "EOD\n";
      plot += "$a" + std::to_string(block++) + " using 1:2 with linespoints " + style +
              " lc rgb '" + colour(i) + "' title '" + quoted(label) + "', ";
    };
    const std::string prefix = runs.size() > 1 ? names[i] + ": " : "";
    if (r.aggregates.empirical)
      series(*r.aggregates.empirical, prefix + "empirical (attacks)", "dt 1 pt 7");
    series(r.aggregates.headline_certified, prefix + "certified (headline)", "dt 1 pt 5 lw 2");
    int dash = 2;
    for (const auto& key : r.keys())
      if (key.is_main_form())
        series(r.aggregates.certified.at(key), prefix + key.text(),
               "dt " + std::to_string(dash++) + " pt 6");
  }
  plot.resize(plot.size() - 2);
  s << plot << "\n";
  return s.str();
}

/// Per ε, the samples' verdicts as stacked bars: verified, unknown, falsified,
/// misclassified; "" without the cross-check (which decides falsified and unknown).
std::string verdict_plot(const Results& r, const std::string& name) {
  const auto& a = r.aggregates;
  if (!a.unknown || !a.falsified) return "";
  std::ostringstream s;
  s << "set title '" << quoted((name.empty() ? "" : name + ": ") + "Verdicts per ε") << "'\n"
    << "set ylabel 'fraction of samples'\nset yrange [0:1]\nset style data histograms\n"
    << "set style histogram rowstacked\nset style fill solid 0.8 border -1\nset boxwidth 0.6\n"
    << "set key outside right\nset grid ytics\n$v << EOD\n";
  for (size_t e = 0; e < r.config.grid.size(); ++e)
    s << "\"" << eps_key(r.config.grid[e]) << "\" " << a.headline_certified[e] << " "
      << (*a.unknown)[e] << " " << (*a.falsified)[e] << " " << 1.0 - a.clean_accuracy << "\n";
  s << "EOD\nset xlabel 'ε'\n"
    << "plot $v using 2:xtic(1) lc rgb '#2ca02c' title 'verified', '' using 3 lc rgb '#bbbbbb' "
       "title 'unknown', '' using 4 lc rgb '#d62728' title 'falsified', '' using 5 lc rgb "
       "'#555555' title 'misclassified'\n";
  return s.str();
}

/// [lower, global] per component and the mean local constant over the rows; "" when
/// the run has no global constants.
std::string lipschitz_plot(const Results& r) {
  std::map<std::string, double> local;
  std::map<std::string, int> count;
  for (const auto& row : r.rows) {
    const auto& local_json = row.extra.value("constants_local", nlohmann::json());
    const auto c =
        local_json.is_object() ? local_json.value("constants", nlohmann::json()) : nlohmann::json();
    for (const auto& [prefix, m] : members(c))
      for (const auto& [name, v] : components(m, prefix)) local[name] += v, ++count[name];
  }
  for (auto& [k, v] : local) v /= count[k];
  std::ostringstream data;
  int x = 0;
  const auto lower = members(r.constants_lower);
  for (const auto& [prefix, global] : members(r.constants_global)) {
    std::map<std::string, double> lo;
    for (const auto& [p, blob] : lower)
      if (p == prefix)
        for (const auto& [name, v] : components(blob, p)) lo[name] = v;
    for (const auto& [name, g] : components(global, prefix))
      data << x++ << " \"" << name << "\" " << std::max(lo.count(name) ? lo[name] : 0.0, 1e-12)
           << " " << g << " " << (local.count(name) ? local[name] : g) << "\n";
  }
  if (x == 0) return "";
  std::ostringstream s;
  s << "set title 'Lipschitz constants per component: [lower, global] and mean local'\n"
    << "set logscale y\nset ylabel 'L (‖·‖_p → ‖·‖_∞)'\nset grid ytics\nset key top left\n"
    << "set xtics rotate by -30\nset style fill solid 0.4\n$l << EOD\n"
    << data.str() << "EOD\nset xrange [-0.7:" << x - 0.3 << "]\n"
    << "plot $l using 1:(sqrt($3*$4)):3:4:xtic(2) with yerrorbars lc rgb '#1f77b4' pt 7 ps 0.4 lw "
       "2 "
       "title '[lower, global]', $l using 1:5 with points pt 9 ps 1.2 lc rgb '#d62728' title 'mean "
       "local'\n";
  return s.str();
}

/// A gnuplot data value: the number, or NaN (drawn as missing) when absent.
std::string value_or_nan(const nlohmann::json& o, const char* key) {
  const double v = num(o, key, NAN);
  if (std::isnan(v)) return "NaN";
  std::ostringstream s;
  s << v;
  return s.str();
}

std::string components_plot(const std::vector<AttackResult>& attacks,
                            const std::vector<std::string>& labels) {
  std::ostringstream s;
  s << "set title 'Empirical robustness: whole model (RA), experts under frozen routing (RA-E), "
       "router (RA-R)'\nset style data histogram\nset style histogram cluster gap 1\n"
    << "set style fill solid 0.85 border -1\nset boxwidth 0.9\nset yrange [0:1]\nset ylabel "
       "'accuracy'\n"
    << "set grid ytics\nset key outside right\nset xtics rotate by -20\n$r << EOD\n";
  for (size_t i = 0; i < attacks.size(); ++i) {
    const auto& d = attacks[i].data;
    s << "\"" << quoted(labels[i]) << "\" " << value_or_nan(d, "sa") << " " << value_or_nan(d, "ra")
      << " " << value_or_nan(d, "ra_e") << " " << value_or_nan(d, "ra_r") << "\n";
  }
  s << "EOD\nplot $r using 2:xtic(1) title 'SA' lc rgb '#7f7f7f', $r using 3 title 'RA' lc rgb "
       "'#1f77b4', $r using 4 title 'RA-E' lc rgb '#d62728', $r using 5 title 'RA-R' lc rgb "
       "'#2ca02c'\n";
  return s.str();
}

std::string sweep_plot(const std::vector<AttackResult>& attacks,
                       const std::vector<std::string>& labels) {
  std::ostringstream s;
  std::string plot = "plot ";
  for (size_t i = 0; i < attacks.size(); ++i) {
    const auto& d = attacks[i].data;
    if (!d.contains("alpha_sweep")) continue;
    s << "$s" << i << " << EOD\n";
    for (const auto& row : d["alpha_sweep"])
      s << num(row, "alpha", 0) << " " << num(row, "sa", 0) << " " << num(row, "ra", 0) << "\n";
    s << "EOD\n";
    const std::string c = colour(i), n = std::to_string(i), l = quoted(labels[i]);
    plot += "$s" + n + " using 1:2 with linespoints dt 1 pt 7 lc rgb '" + c + "' title '" + l +
            ": SA', $s" + n + " using 1:3 with linespoints dt 2 pt 6 lc rgb '" + c + "' title '" +
            l + ": RA', ";
  }
  if (plot.size() <= 5) return "";
  plot.resize(plot.size() - 2);
  return "set title 'Dual-model α-sweep: F_D = (1 − α) F_S + α F_R'\nset xlabel 'α'\n"
         "set ylabel 'accuracy'\nset yrange [0:1]\nset key outside right\nset grid\n" +
         s.str() + plot + "\n";
}

}  // namespace

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

std::vector<Plot> make_plots(const std::vector<Results>& runs,
                             const std::vector<std::string>& names,
                             const std::vector<AttackResult>& attacks,
                             const std::vector<std::string>& labels, const std::string& dir) {
  std::vector<Plot> plots{
      {"Certified vs empirical radius", "plot-radius.svg", radius_plot(runs, names)},
      {"Accuracy vs ε", "plot-accuracy.svg", accuracy_plot(runs, names)}};
  for (size_t i = 0; i < runs.size(); ++i)
    if (auto s = verdict_plot(runs[i], runs.size() > 1 ? names[i] : ""); !s.empty())
      plots.push_back({(runs.size() > 1 ? names[i] + ": v" : std::string("V")) + "erdicts per ε",
                       "plot-verdicts" + (runs.size() > 1 ? "-" + std::to_string(i) : "") + ".svg",
                       s});
  if (auto s = lipschitz_plot(runs[0]); !s.empty())
    plots.push_back({"Lipschitz constants", "plot-lipschitz.svg", s});
  if (!attacks.empty())
    plots.push_back(
        {"RA / RA-E / RA-R", "plot-ra-components.svg", components_plot(attacks, labels)});
  if (auto s = sweep_plot(attacks, labels); !s.empty())
    plots.push_back({"α-sweep SA / RA", "plot-alpha-sweep.svg", s});
  const bool gnuplot = have_gnuplot();
  for (auto& p : plots) p.svg = gnuplot ? gnuplot_svg(p.svg, dir + "/" + p.file, dir) : "";
  return plots;
}

}  // namespace moecert::report_impl
