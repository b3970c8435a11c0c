// Reports and CI gating (SPEC §5): gate expressions over results.json, JUnit XML,
// merging of shard results, and the Markdown / self-contained HTML report.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace moecert {

/// `metric[@eps] op value`, e.g. `certified_acc@0.02>=0.40`, `violations==0`.
/// Metrics: sa | clean_acc, certified_acc@E (the headline: per sample the best sound
/// radius of any form; or certified_acc[form]@E), empirical_acc@E | ra@E, violations,
/// median_tightness, median_radius (the headline; or median_radius[form]).
/// Ops: >= <= > < == !=.
struct Gate {
  std::string text, metric, form, op;
  double eps = -1;  ///< < 0: none
  double value = 0;
};

/// Parses a gate; a malformed expression or unknown metric is a ConfigError (exit 2).
Gate gate_parse(const std::string& expr);

/// The metric's value in a results object. Throws ConfigError when the results do
/// not carry it (an ε not in the grid, an unknown form, no empirical cross-check).
double gate_metric(const nlohmann::json& results, const Gate& g);

struct GateResult {
  Gate gate;
  double actual = 0;
  bool passed = false;
};
std::vector<GateResult> gates_evaluate(const nlohmann::json& results,
                                       const std::vector<Gate>& gates);

/// One JUnit <testcase> per gate, failures with the actual value. Valid XML.
std::string junit_xml(const std::vector<GateResult>& results, const std::string& suite);

/// Regression gates against a baseline: for every certified and empirical accuracy
/// at every ε of both grids, fails when the value dropped by more than max_drop.
std::vector<GateResult> baseline_gates(const nlohmann::json& results,
                                       const nlohmann::json& baseline, double max_drop);

/// Combines shard results (`certify --shard i/n`) into one results object: rows in
/// index order, aggregates recomputed. Throws ConfigError naming the disagreement
/// when the shards come from different checkpoints or settings, or overlap.
nlohmann::json results_merge(const std::vector<nlohmann::json>& shards);

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
void report_write(const std::vector<nlohmann::json>& runs, const std::vector<std::string>& names,
                  const std::vector<AttackResult>& attacks, const std::vector<GateResult>& gates,
                  const std::string& out_dir, const std::string& command);

}  // namespace moecert
