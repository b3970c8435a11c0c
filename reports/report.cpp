// report.md and a self-contained report.html (SPEC §5): the same tables rendered in
// Markdown and HTML (one table model), and the plots of plots.cpp inlined as SVG.
#include "moecert/report.h"

#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <functional>
#include <sstream>

#include "moecert/attacks.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "report-impl.h"

namespace moecert {
namespace report_impl {

std::string fmt(double v, int digits) {
  if (std::isnan(v)) return "n/a";
  if (!std::isfinite(v)) return "∞";
  char b[64];
  std::snprintf(b, sizeof b, "%.*f", digits, v);
  return b;
}

std::string pct(double v) { return std::isnan(v) ? "n/a" : fmt(100.0 * v, 2) + "%"; }

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

namespace {

/// A Markdown cell: pipes escaped, newlines flattened.
std::string md_cell(const std::string& s, bool code) {
  std::string o;
  for (char c : s)
    o += c == '|' ? std::string("\\|") : c == '\n' ? std::string(" ") : std::string(1, c);
  return code ? "`" + o + "`" : o;
}

}  // namespace

std::string Table::markdown() const {
  auto is_code = [&](size_t c) { return c < code.size() && code[c]; };
  std::ostringstream md;
  md << "|";
  for (const auto& h : header) md << " " << md_cell(h, false) << " |";
  md << "\n|";
  for (size_t c = 0; c < header.size(); ++c) md << "---|";
  md << "\n";
  for (const auto& row : rows) {
    md << "|";
    for (size_t c = 0; c < row.size(); ++c) md << " " << md_cell(row[c], is_code(c)) << " |";
    md << "\n";
  }
  return md.str();
}

std::string Table::html() const {
  auto is_code = [&](size_t c) { return c < code.size() && code[c]; };
  std::ostringstream h;
  h << "<table><tr>";
  for (const auto& x : header) h << "<th>" << html_escape(x) << "</th>";
  h << "</tr>\n";
  for (const auto& row : rows) {
    h << "<tr>";
    for (size_t c = 0; c < row.size(); ++c)
      h << "<td>" << (is_code(c) ? "<code>" + html_escape(row[c]) + "</code>" : html_escape(row[c]))
        << "</td>";
    h << "</tr>\n";
  }
  h << "</table>\n";
  return h.str();
}

}  // namespace report_impl

namespace {

using report_impl::fmt;
using report_impl::html_escape;
using report_impl::pct;
using report_impl::Table;

/// The two renderings of one document, written side by side.
struct Page {
  std::ostringstream md, html;
  void heading(const std::string& text) {
    md << "\n## " << text << "\n\n";
    html << "<h2>" << html_escape(text) << "</h2>\n";
  }
  void paragraph(const std::string& text, const std::string& html_class = "") {
    md << text << "\n\n";
    html << "<p" << (html_class.empty() ? "" : " class=\"" + html_class + "\"") << ">"
         << html_escape(text) << "</p>\n";
  }
  void table(const Table& t) {
    md << t.markdown() << "\n";
    html << t.html();
  }
};

/// A JSON field as text: a string as it is, anything else as JSON, "?" when absent.
std::string text_of(const nlohmann::json& o, const char* key) {
  if (!o.is_object() || !o.contains(key)) return "?";
  return o[key].is_string() ? o[key].get<std::string>() : o[key].dump();
}

void model_cards(Page& page, const std::vector<Results>& runs,
                 const std::vector<std::string>& names) {
  const bool compare = runs.size() > 1;
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    const auto training = r.fingerprint.value("training", nlohmann::json());
    page.heading("Model" + (compare ? " " + names[i] : ""));
    Table t{{"field", "value"}, {}, {false, true}};
    t.rows = {
        {"model", r.model},
        {"checkpoint", r.checkpoint},
        {"weights SHA-256", text_of(r.fingerprint, "weights_sha256")},
        {"training method", text_of(training, "method")},
        {"training config", training.dump()},
        {"norm", "p = " + r.config.norm + (r.config.box ? ", ball ∩ [0, 1]^d" : ", whole ball")},
        {"samples", std::to_string(r.aggregates.samples) + " of " + r.data.name + " (" +
                        r.data.split + " split, " + std::to_string(r.data.size) + " images)"}};
    page.table(t);
  }
}

/// Certified and empirical accuracy per ε of the union of the runs' grids; "n/a" where
/// a run has no such ε (never 0).
void headline_table(Page& page, const std::vector<Results>& runs,
                    const std::vector<std::string>& names) {
  const bool compare = runs.size() > 1;
  std::vector<EpsGrid> grids;
  for (const auto& r : runs) grids.push_back(r.config.grid);
  const auto grid = EpsGrid::merged(grids);
  Table t;
  if (compare) t.header.push_back("run");
  t.header.push_back("metric");
  for (double e : grid.values()) t.header.push_back("ε = " + eps_key(e));
  auto add = [&](size_t i, const std::string& metric,
                 const std::function<std::optional<double>(double)>& at) {
    std::vector<std::string> row;
    if (compare) row.push_back(names[i]);
    row.push_back(metric);
    for (double e : grid.values()) {
      const auto v = at(e);
      row.push_back(v ? pct(*v) : "n/a");
    }
    t.rows.push_back(row);
  };
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& r = runs[i];
    add(i, "clean accuracy (SA)",
        [&](double) { return std::optional<double>(r.aggregates.clean_accuracy); });
    if (r.aggregates.empirical)
      add(i, "empirical accuracy (RA, FMN + APGD)", [&](double e) { return r.empirical_at(e); });
    add(i, "certified (headline: best sound form per sample)",
        [&](double e) { return r.certified_at(e); });
    if (r.aggregates.unknown) {
      add(i, "unknown (neither certified nor attacked)", [&](double e) { return r.unknown_at(e); });
      add(i, "falsified (attack succeeded, not certified)",
          [&](double e) { return r.falsified_at(e); });
    }
    for (const auto& key : r.keys())
      add(i, "certified: " + key.text(), [&](double e) { return r.certified_at(e, key); });
  }
  page.heading("Headline");
  page.table(t);
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& a = runs[i].aggregates;
    page.paragraph((compare ? names[i] + ": " : "") +
                   "median tightness (certified / empirical): " + fmt(a.median_tightness) +
                   " over " + std::to_string(a.tightness_samples) + " samples");
  }
}

/// The attack of an attack file in one phrase: "PGD-20" (suite pgd or an older
/// file without a suite), "standard suite", "fast suite".
std::string attack_config_name(const nlohmann::json& d) {
  const std::string suite =
      d.contains("suite") && d["suite"].is_string() ? d["suite"].get<std::string>() : "pgd";
  if (suite == "pgd") return "PGD-" + text_of(d, "steps");
  return suite + " suite";
}

void attack_tables(Page& page, const std::vector<AttackResult>& attacks,
                   const std::vector<std::string>& labels) {
  if (attacks.empty()) return;
  page.heading("Empirical robustness (attacks)");
  page.paragraph(
      "RA: the whole model attacked; RA-E: the experts attacked with the routing frozen at the "
      "clean "
      "input's choice; RA-R: the router attacked with the experts fed the clean input. Experts: "
      "share of "
      "the samples per top-ranked expert, on the clean inputs / at the first attack run's points "
      "(a "
      "dual-model: its robust member's router).");
  Table t{{"attack", "checkpoint", "attack config", "SA", "RA", "RA-E", "RA-R",
           "experts (clean / attacked)"},
          {},
          {false, true}};
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
    std::string cfg = "p = " + text_of(d, "norm") + ", ε = " + text_of(d, "eps") + ", " +
                      attack_config_name(d) + ", " + text_of(d, "samples") + " samples";
    if (d.contains("alpha")) cfg += ", α = " + d["alpha"].dump();
    t.rows.push_back({labels[i], text_of(d, "checkpoint"), cfg, cell(d, "sa"), cell(d, "ra"),
                      cell(d, "ra_e"), cell(d, "ra_r"), usage(d)});
  }
  page.table(t);
  for (size_t i = 0; i < attacks.size(); ++i) {
    const auto& d = attacks[i].data;
    if (!d.contains("alpha_sweep")) continue;
    page.paragraph("α-sweep of " + labels[i] + ":");
    Table s{{"α", "SA", "RA"}, {}, {}};
    for (const auto& row : d["alpha_sweep"])
      s.rows.push_back({fmt(row["alpha"].get<double>(), 2), pct(row["sa"].get<double>()),
                        pct(row["ra"].get<double>())});
    page.table(s);
  }
}

void gates_table(Page& page, const std::vector<GateResult>& gates) {
  page.heading("Gates");
  if (gates.empty()) return page.paragraph("No gates were given.");
  Table t{{"gate", "actual", "result"}, {}, {true}};
  for (const auto& g : gates)
    t.rows.push_back({g.gate.text, fmt(g.actual), g.passed ? "pass" : "**FAIL**"});
  page.md << t.markdown() << "\n";
  // HTML: the result column coloured.
  page.html << "<table><tr><th>gate</th><th>actual</th><th>result</th></tr>\n";
  for (const auto& g : gates)
    page.html << "<tr><td><code>" << html_escape(g.gate.text) << "</code></td><td>" << fmt(g.actual)
              << "</td><td class=\"" << (g.passed ? "pass\">pass" : "fail\">FAIL")
              << "</td></tr>\n";
  page.html << "</table>\n";
}

void violations_section(Page& page, const std::vector<Results>& runs,
                        const std::vector<std::string>& names) {
  page.heading("Soundness violations");
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto& a = runs[i].aggregates;
    const std::string who = runs.size() > 1 ? names[i] + ": " : "";
    if (a.violations.empty()) {
      page.paragraph(who + "none: no attack succeeded inside any certified radius (" +
                         std::to_string(a.samples) + " samples).",
                     "pass");
      continue;
    }
    page.paragraph(who + std::to_string(a.violations.size()) + " violation(s):", "fail");
    Table t{{"sample", "radius", "certified", "empirical"}, {}, {false, true}};
    for (const auto& v : a.violations)
      t.rows.push_back(
          {std::to_string(v.index), v.key.text(), fmt(v.certified, 6), fmt(v.empirical, 6)});
    page.table(t);
  }
}

void plots_section(Page& page, const std::vector<report_impl::Plot>& plots) {
  page.heading("Plots");
  for (const auto& p : plots) {
    if (p.svg.empty()) {
      page.paragraph(p.title + ": not drawn (gnuplot not found or failed)");
      continue;
    }
    page.md << "![" << p.title << "](" << p.file << ")\n\n";
    page.html << "<figure id=\"" << p.file << "\">" << p.svg << "<figcaption>"
              << html_escape(p.title) << "</figcaption></figure>\n";
  }
}

const char* kStyle =
    "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:4px 8px;"
    "text-align:right}th{background:#eee}td:first-child,th:first-child{text-align:left}"
    ".pass{color:#1a7f37;font-weight:bold}.fail{color:#cf222e;font-weight:bold}"
    "code{background:#f4f4f4;padding:1px 4px;overflow-wrap:anywhere}figure{margin:1em 0}"
    "svg{max-width:100%;height:auto}</style>";

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

namespace report_impl {

ReportText report_render(const std::vector<Results>& runs, const std::vector<std::string>& names,
                         const std::vector<AttackResult>& attacks,
                         const std::vector<GateResult>& gates, const std::vector<Plot>& plots,
                         const std::string& command) {
  if (runs.empty() || names.size() != runs.size()) throw ConfigError("report: no results given");
  const auto labels = attack_labels(attacks);
  Page page;
  page.md << "# moecert robustness report\n";
  page.html << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>moecert "
               "report</title>\n"
            << kStyle << "</head><body>\n<h1>moecert robustness report</h1>\n";
  model_cards(page, runs, names);
  headline_table(page, runs, names);
  attack_tables(page, attacks, labels);
  gates_table(page, gates);
  violations_section(page, runs, names);
  plots_section(page, plots);
  page.heading("Provenance");
  page.paragraph("Generated by moecert " +
                 (runs[0].moecert_version.empty() ? "?" : runs[0].moecert_version) +
                 " with: " + command);
  for (size_t i = 0; i < runs.size(); ++i)
    page.paragraph((runs.size() > 1 ? names[i] + " certified" : std::string("Certified")) +
                   " with: " + (runs[i].command.empty() ? "?" : runs[i].command));
  page.html << "</body></html>\n";
  return {page.md.str(), page.html.str()};
}

}  // namespace report_impl

void report_write(const std::vector<Results>& runs, const std::vector<std::string>& names,
                  const std::vector<AttackResult>& attacks, const std::vector<GateResult>& gates,
                  const std::string& out_dir, const std::string& command) {
  if (runs.empty()) throw ConfigError("report: no results given");
  if (::mkdir(out_dir.c_str(), 0755) != 0 && errno != EEXIST)
    throw ConfigError("report: cannot create directory " + out_dir + ": " + std::strerror(errno));
  const auto plots =
      report_impl::make_plots(runs, names, attacks, report_impl::attack_labels(attacks), out_dir);
  const auto text = report_impl::report_render(runs, names, attacks, gates, plots, command);
  write_file_atomic(out_dir + "/report.md", text.markdown);
  write_file_atomic(out_dir + "/report.html", text.html);
}

}  // namespace moecert
