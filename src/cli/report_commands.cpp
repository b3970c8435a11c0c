// `moecert report` and `moecert merge`.
#include <fstream>
#include <iostream>
#include <map>
#include <set>
#include <sstream>

#include "commands.h"
#include "moecert/attacks.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/report.h"
#include "moecert/runtime.h"

namespace moecert {
namespace {

std::string join_args(int argc, char** argv) {
  std::string s;
  for (int i = 0; i < argc; ++i) s += (i ? " " : "") + std::string(argv[i]);
  return s;
}

/// A JSON file's contents; ConfigError naming the file when it cannot be read.
nlohmann::json read_json_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("merge: cannot read " + path);
  try {
    return nlohmann::json::parse(in);
  } catch (const nlohmann::json::exception& e) {
    throw ConfigError("merge: " + path + " is not valid JSON: " + e.what());
  }
}

/// `attack --json` output (rows of per-sample verdicts and the suite's settings), as
/// opposed to certify's results.json.
bool is_attack_json(const nlohmann::json& j) {
  return j.is_object() && j.contains("suite") && j.contains("ra") && j.contains("rows");
}

/// Joins the --json files of `attack --shard` runs: rows in index order, SA and RA
/// from the rows, RA-E / RA-R weighted by the shards' samples, counts summed. The
/// shards must agree on every setting and hold disjoint samples.
nlohmann::json attack_merge(const std::vector<nlohmann::json>& shards,
                            const std::vector<std::string>& files) {
  static const std::set<std::string> per_shard{"sa",   "ra",   "ra_e",  "ra_r",         "seconds",
                                               "rows", "runs", "shard", "expert_usage", "samples"};
  auto settings = [](const nlohmann::json& j) {
    nlohmann::json out = nlohmann::json::object();
    for (const auto& [k, v] : j.items())
      if (!per_shard.count(k)) out[k] = v;
    return out;
  };
  nlohmann::json merged = settings(shards[0]);
  std::map<int64_t, nlohmann::json> rows;
  double samples = 0, ra_e = 0, ra_r = 0, seconds = 0;
  nlohmann::json runs = shards[0].value("runs", nlohmann::json::array());
  for (auto& r : runs) r["broken"] = 0, r["seconds"] = 0.0;
  nlohmann::json usage;
  for (size_t s = 0; s < shards.size(); ++s) {
    const auto& j = shards[s];
    if (!is_attack_json(j))
      throw ConfigError("merge: " + files[s] + " is not `attack --json` output like " + files[0]);
    if (settings(j) != merged)
      throw ConfigError("merge: " + files[s] + " was attacked with other settings than " +
                        files[0] + " (eps, suite, checkpoint, seed, ... must be equal)");
    for (const auto& row : j.at("rows")) {
      const int64_t index = row.at("index").get<int64_t>();
      if (!rows.emplace(index, row).second)
        throw ConfigError("merge: sample " + std::to_string(index) + " is in two shards (" +
                          files[s] + ")");
    }
    const double n = static_cast<double>(j.at("rows").size());
    samples += n, seconds += j.value("seconds", 0.0);
    if (j.contains("ra_e")) ra_e += j.at("ra_e").get<double>() * n;
    if (j.contains("ra_r")) ra_r += j.at("ra_r").get<double>() * n;
    const auto& shard_runs = j.value("runs", nlohmann::json::array());
    if (shard_runs.size() != runs.size())
      throw ConfigError("merge: " + files[s] + " ran other attacks than " + files[0]);
    for (size_t i = 0; i < runs.size(); ++i) {
      if (shard_runs[i].at("name") != runs[i].at("name"))
        throw ConfigError("merge: " + files[s] + " ran other attacks than " + files[0]);
      runs[i]["broken"] =
          runs[i]["broken"].get<int64_t>() + shard_runs[i].at("broken").get<int64_t>();
      runs[i]["seconds"] =
          runs[i]["seconds"].get<double>() + shard_runs[i].at("seconds").get<double>();
    }
    if (j.contains("expert_usage")) {
      const auto& u = j.at("expert_usage");
      if (usage.is_null()) {
        usage = {{"clean", u.at("clean")}, {"adversarial", u.at("adversarial")}};
        continue;
      }
      for (const char* set : {"clean", "adversarial"}) {
        if (u.at(set).size() != usage[set].size())
          throw ConfigError("merge: " + files[s] + " has another number of experts");
        for (size_t e = 0; e < usage[set].size(); ++e)
          usage[set][e] = usage[set][e].get<int64_t>() + u.at(set)[e].get<int64_t>();
      }
    }
  }
  if (samples == 0) throw ConfigError("merge: the attack shards hold no samples");
  double clean = 0, robust = 0;
  merged["rows"] = nlohmann::json::array();
  for (auto& [index, row] : rows) {
    clean += row.value("clean_correct", false) ? 1 : 0;
    robust += row.value("robust", false) ? 1 : 0;
    merged["rows"].push_back(std::move(row));
  }
  merged["samples"] = static_cast<int64_t>(samples);
  merged["sa"] = clean / samples, merged["ra"] = robust / samples;
  if (shards[0].contains("ra_e")) merged["ra_e"] = ra_e / samples;
  if (shards[0].contains("ra_r")) merged["ra_r"] = ra_r / samples;
  merged["seconds"] = seconds;
  merged["runs"] = runs;
  if (!usage.is_null())
    merged["expert_usage"] = expert_usage_json({usage["clean"].get<std::vector<int64_t>>(),
                                                usage["adversarial"].get<std::vector<int64_t>>()});
  merged["merged_from"] = shards.size();
  return merged;
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
  auto* cmd = app.add_subcommand(
      "merge",
      "combine the results.json of certify --shard runs (or the --json of attack --shard runs) "
      "into one");
  cmd->add_option("results", *files, "shard results.json (or attack --json) files")->required();
  cmd->add_option("--out", *out, "merged file")->required();
  cmd->callback([files, out] {
    const auto first = read_json_file(files->front());
    if (is_attack_json(first)) {
      std::vector<nlohmann::json> shards{first};
      for (size_t i = 1; i < files->size(); ++i) shards.push_back(read_json_file((*files)[i]));
      const auto merged = attack_merge(shards, *files);
      write_file_atomic(*out, merged.dump(2) + "\n");
      std::cout << "merged " << shards.size() << " attack shards, " << merged["samples"]
                << " samples: SA " << fmt_fixed(merged["sa"].get<double>(), 4) << ", RA "
                << fmt_fixed(merged["ra"].get<double>(), 4) << ": " << *out << "\n";
      return;
    }
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
