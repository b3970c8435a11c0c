// What the report's parts share (private to reports/): number formats, escaping, the
// table model that Markdown and HTML both render, and the plots.
#pragma once

#include <string>
#include <vector>

#include "moecert/report.h"

namespace moecert::report_impl {

/// A number with `digits` decimals; "∞" for +inf, "n/a" for NaN.
std::string fmt(double v, int digits = 4);
/// A fraction as a percentage, "83.50%"; "n/a" for NaN.
std::string pct(double v);
std::string html_escape(const std::string& s);

/// One table, rendered the same way in Markdown and HTML. Cells are plain text;
/// `code` cells render as code.
struct Table {
  std::vector<std::string> header;
  std::vector<std::vector<std::string>> rows;
  std::vector<bool> code;  ///< per column: render as code
  std::string markdown() const;
  std::string html() const;
};

struct Plot {
  std::string title, file, svg;  ///< svg empty: not drawn
};

/// Short labels of attack results: the file name without ".json", or the whole name
/// where two would coincide.
std::vector<std::string> attack_labels(const std::vector<AttackResult>& attacks);

/// The report's plots (gnuplot SVG written into `dir`; svg left empty where gnuplot is
/// missing or fails): radius scatter, accuracy vs ε, Lipschitz intervals, RA
/// components, α-sweeps.
std::vector<Plot> make_plots(const std::vector<Results>& runs,
                             const std::vector<std::string>& names,
                             const std::vector<AttackResult>& attacks,
                             const std::vector<std::string>& labels, const std::string& dir);

/// The report's Markdown and HTML for given plots (what report_write writes).
struct ReportText {
  std::string markdown, html;
};
ReportText report_render(const std::vector<Results>& runs, const std::vector<std::string>& names,
                         const std::vector<AttackResult>& attacks,
                         const std::vector<GateResult>& gates, const std::vector<Plot>& plots,
                         const std::string& command);

}  // namespace moecert::report_impl
