// `moecert report` and `moecert merge`.
#include <fstream>
#include <iostream>
#include <sstream>

#include "commands.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/report.h"

namespace moecert {
namespace {

std::string join_args(int argc, char** argv) {
  std::string s;
  for (int i = 0; i < argc; ++i) s += (i ? " " : "") + std::string(argv[i]);
  return s;
}

}  // namespace

int report_and_gate(const std::vector<Results>& runs, const std::vector<std::string>& names,
                    const ReportOptions& o, const std::string& command) {
  std::vector<Gate> gates;
  for (const auto& g : o.gates) gates.push_back(gate_parse(g));
  auto results = gates_evaluate(runs[0], gates);
  if (!o.baseline.empty()) {
    auto base = baseline_gates(runs[0], Results::read(o.baseline), o.max_drop);
    results.insert(results.end(), base.begin(), base.end());
  }
  std::vector<AttackResult> attacks;
  for (const auto& a : o.attacks) attacks.push_back(attack_read(a));
  if (!o.out.empty()) {
    report_write(runs, names, attacks, results, o.out, command);
    std::cout << "report: " << o.out << "/report.html (and report.md)\n";
  }
  if (!o.junit.empty()) write_file_atomic(o.junit, junit_xml(results, names[0]));
  int failed = 0;
  for (const auto& r : results) {
    std::cout << (r.passed ? "PASS " : "FAIL ") << r.gate.text << " (actual " << r.actual << ")\n";
    failed += !r.passed;
  }
  return failed;
}

void cli_register_report(CLI::App& app, const CommonOptions& common, int argc, char** argv) {
  auto o = std::make_shared<ReportOptions>();
  auto files = std::make_shared<std::vector<std::string>>();
  auto* cmd = app.add_subcommand("report",
                                 "Markdown/HTML report of one results.json, or a comparison of "
                                 "several; CI gates (exit 1 on a failed gate)");
  cmd->add_option("results", *files, "results.json files (the first is gated)")->required();
  add_report_options(cmd, *o, /*out_required=*/false);
  const std::string command = join_args(argc, argv);
  cmd->callback([o, files, command] {
    std::vector<Results> runs;
    std::vector<std::string> names;
    for (const auto& f : *files) runs.push_back(Results::read(f)), names.push_back(f);
    if (o->out.empty() && o->gates.empty() && o->baseline.empty())
      throw ConfigError("report: give --out DIR, --gate EXPR or --baseline FILE");
    const int failed = report_and_gate(runs, names, *o, command);
    if (failed > 0) throw Error(ExitCode::gate_failed, std::to_string(failed) + " gate(s) failed");
  });
  (void)common;
}

void cli_register_merge(CLI::App& app, const CommonOptions& common) {
  auto files = std::make_shared<std::vector<std::string>>();
  auto out = std::make_shared<std::string>();
  auto* cmd =
      app.add_subcommand("merge", "combine the results.json of certify --shard runs into one");
  cmd->add_option("results", *files, "shard results.json files")->required();
  cmd->add_option("--out", *out, "merged results.json")->required();
  cmd->callback([files, out] {
    std::vector<Results> shards;
    for (const auto& f : *files) shards.push_back(Results::read(f));
    const auto merged = results_merge(shards);
    merged.write(*out);
    std::cout << "merged " << shards.size() << " shards, " << merged.rows.size() << " samples, "
              << merged.aggregates.violations.size() << " violations: " << *out << "\n";
  });
  (void)common;
}

void add_report_options(CLI::App* cmd, ReportOptions& o, bool for_certify) {
  cmd->add_option(for_certify ? "--report" : "--out", o.out,
                  "write report.md and report.html into this directory");
  cmd->add_option("--gate", o.gates, "CI gate, e.g. 'certified_acc@0.02>=0.40' (repeatable)");
  cmd->add_option("--attack", o.attacks,
                  "JSON of `moecert attack --json` (repeatable): RA / RA-E / RA-R and alpha-sweep "
                  "in the report");
  cmd->add_option("--junit", o.junit, "write the gates as JUnit XML");
  cmd->add_option("--baseline", o.baseline,
                  "results.json of an earlier run: gate regressions against it");
  cmd->add_option("--max-drop", o.max_drop, "largest allowed accuracy drop vs --baseline")
      ->capture_default_str();
}

}  // namespace moecert
