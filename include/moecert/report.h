// Reports and CI gating (SPEC §5): gate expressions over a run's results, JUnit XML,
// regression gates against a baseline, and the Markdown / self-contained HTML report.
#pragma once

#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "moecert/results.h"

namespace moecert {

/// What a gate measures.
enum class GateMetric {
  clean_acc,         ///< `sa`, `clean_acc`
  certified_acc,     ///< `certified_acc@E` (the headline) or `certified_acc[FORM_ESTIMATOR]@E`
  empirical_acc,     ///< `empirical_acc@E`, `ra@E`
  violations,        ///< soundness violations
  median_tightness,  ///< median headline / empirical radius
  median_radius,     ///< `median_radius` (the headline) or `median_radius[FORM_ESTIMATOR]`
  falsified,         ///< `falsified@E`: not verified, an attack succeeded within ε
  unknown,           ///< `unknown@E`: neither verified nor falsified
};

/// `metric[[key]][@eps] op value`, e.g. `certified_acc@0.02>=0.40`, `violations==0`,
/// `certified_acc[candidate_crown]@0.05>0.3`. Ops: >= <= > < == !=.
struct Gate {
  std::string text, op;
  GateMetric metric = GateMetric::clean_acc;
  std::optional<RadiusKey> key;
  std::optional<double> eps;
  double value = 0;
};

/// Parses a gate; a malformed expression, unknown metric or key is a ConfigError (exit 2).
Gate gate_parse(const std::string& expr);
/// The metric's name as gates write it ("certified_acc").
std::string gate_metric_name(GateMetric m);

/// The metric's value in a run. Throws ConfigError when the run does not carry it
/// (an ε not in its grid, a key it lacks, no empirical cross-check).
double gate_metric(const Results& results, const Gate& g);

struct GateResult {
  Gate gate;
  double actual = 0;  ///< NaN: the run has no such value (a failed gate)
  bool passed = false;
};
std::vector<GateResult> gates_evaluate(const Results& results, const std::vector<Gate>& gates);

/// One JUnit <testcase> per gate, failures with the actual value. Valid XML.
std::string junit_xml(const std::vector<GateResult>& results, const std::string& suite);

/// Regression gates against a baseline: at every ε of the baseline's grid, the
/// headline certified accuracy, every certified accuracy of a key both runs have,
/// and the empirical accuracy must not drop by more than max_drop. An ε of the
/// baseline that the run lacks fails (a regression it cannot rule out).
std::vector<GateResult> baseline_gates(const Results& results, const Results& baseline,
                                       double max_drop);

/// The numbers of one `moecert attack --json` run shown beside the certificates:
/// SA, RA, and where present RA-E / RA-R and a dual-model's α-sweep.
struct AttackResult {
  std::string name;  ///< its label in tables and plots (the file path)
  nlohmann::json data;
};

/// Checks an attack object: `sa` and `ra` in [0, 1]; `ra_e`, `ra_r` in [0, 1] when
/// present; `alpha_sweep` an array of {alpha, sa, ra} in [0, 1]. Throws ConfigError
/// naming `name` and the field.
AttackResult attack_validate(const nlohmann::json& data, const std::string& name);
/// Reads and validates an attack JSON file (ConfigError naming the file).
AttackResult attack_read(const std::string& path);

/// Writes report.md and a self-contained report.html (inline SVG plots made with
/// gnuplot) for one run, or a comparison of several (`names` label them); attack
/// results add an RA / RA-E / RA-R table and plot, and α-sweep curves when present.
void report_write(const std::vector<Results>& runs, const std::vector<std::string>& names,
                  const std::vector<AttackResult>& attacks, const std::vector<GateResult>& gates,
                  const std::string& out_dir, const std::string& command);

}  // namespace moecert
