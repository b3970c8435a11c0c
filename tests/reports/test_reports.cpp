#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <fstream>

#include "fixtures.h"
#include "moecert/certify.h"
#include "moecert/error.h"
#include "moecert/model_io.h"
#include "moecert/report.h"
#include "test_util.h"

using namespace moecert;
using moecert_test::read_text;
using moecert_test::run_shell;
using moecert_test::TempDir;

namespace {

/// A small real results object: the cached synthetic MoE, certified on `indices`.
Results certify_indices(const std::vector<int64_t>& indices, const std::string& shard = "") {
  static Dataset test = moecert_test::synthetic(30, 0, /*train=*/false);
  LoadedModel loaded;
  // A fresh copy each time: certify_run puts the model in eval mode.
  torch::manual_seed(0);
  auto& trained = moecert_test::trained_moe();
  Moe copy(trained->spec());
  {
    torch::NoGradGuard ng;
    auto src = trained->named_parameters(), dst = copy->named_parameters();
    for (auto& p : dst) p.value().copy_(src[p.key()]);
  }
  loaded.model = copy;
  loaded.manifest = {{"architecture", copy->spec().to_json()}, {"weights_sha256", "test"}};
  loaded.dir = "trained_moe";
  CertifyConfig cfg;
  cfg.estimators = {Estimator::global, Estimator::local, Estimator::crown};
  cfg.eps_grid = EpsGrid({0.001, 0.01, 0.05});
  cfg.jacobian_crown = false;  // the interval Jacobian: what reports read, a third of the time
  cfg.attack.steps = 5;
  cfg.shard = shard;
  cfg.batch_size = 4;
  return certify_run(loaded, test, indices, cfg, torch::kCPU, false);
}

nlohmann::json without_timing(const Results& r) {
  auto j = r.to_json();
  j.erase("timing");
  j.erase("merged_from");
  j["config"].erase("shard");
  return j;
}

}  // namespace

TEST_CASE("gate expressions parse, and malformed ones are usage errors", "[unit][reports]") {
  auto g = gate_parse("certified_acc@0.02>=0.40");
  CHECK(g.metric == GateMetric::certified_acc);
  CHECK(g.eps.value() == 0.02);
  CHECK(g.op == ">=");
  CHECK(g.value == Approx(0.40));
  auto f = gate_parse(" certified_acc[thm54_tight_local]@0.05 > 0.1 ");
  CHECK(f.key->text() == "thm54_tight_local");
  CHECK(gate_parse("violations==0").op == "==");
  CHECK(gate_parse("median_tightness>=0.05").value == Approx(0.05));
  CHECK(gate_parse("ra@0.1>=0.6").metric == GateMetric::empirical_acc);
  CHECK(gate_parse("verified_acc@0.1>=0.6").metric == GateMetric::certified_acc);
  CHECK(gate_parse("unknown@0.1<=0.3").metric == GateMetric::unknown);
  CHECK(gate_parse("falsified@0.1<=0.3").metric == GateMetric::falsified);
  CHECK(gate_parse("certified_acc@1e-5>=0").eps.value() == 0.00001);
  CHECK(gate_parse("certified_acc@0.0123456789>=0").eps.value() == 0.0123456789);
  for (const char* bad :
       {"certified_acc>=0.4", "accuracy@0.1>=0.5", "violations@0.1==0", "ra@0.1=>0.6",
        "ra@0.1>=", "", "sa>=0.5 extra", "violations[x]==0", "certified_acc[nope]@0.01>=0",
        "certified_acc@-1>=0", "certified_acc@x>=0", "sa>=1e999",
        "median_radius[candidate_exact]>0", "unknown<=0.3", "falsified[margin_crown]@0.1<=0"}) {
    INFO(bad);
    CHECK_THROWS_AS(gate_parse(bad), ConfigError);
  }
  CHECK(ConfigError("x").exit_code() == 2);
}

TEST_CASE("gates evaluate on results, and JUnit XML parses back", "[integration][reports]") {
  std::vector<int64_t> all(12);
  std::iota(all.begin(), all.end(), 0);
  auto r = certify_indices(all);
  const double sa = r.aggregates.clean_accuracy;
  auto results =
      gates_evaluate(r, {gate_parse("sa>=0"), gate_parse("sa>1"), gate_parse("violations==0"),
                         gate_parse("certified_acc@0.001>=0"), gate_parse("ra@0.05<=1")});
  REQUIRE(results.size() == 5);
  CHECK(results[0].passed);
  CHECK(results[0].actual == Approx(sa));
  CHECK_FALSE(results[1].passed);
  CHECK(results[2].passed);
  CHECK(results[3].passed);
  CHECK(results[4].passed);
  // A metric the results do not carry is a usage error, not a silent pass.
  CHECK_THROWS_AS(gates_evaluate(r, {gate_parse("certified_acc@0.5>=0")}), ConfigError);
  CHECK_THROWS_AS(gates_evaluate(r, {gate_parse("certified_acc[nope_crown]@0.01>=0")}),
                  ConfigError);
  CHECK_THROWS_AS(gates_evaluate(r, {gate_parse("certified_acc[candidate_alpha-crown]@0.01>=0")}),
                  ConfigError);

  TempDir tmp;
  { std::ofstream(tmp / "junit.xml") << junit_xml(results, "suite <&> \"x\""); }
  auto check = run_shell(
      "python3 -c \"import sys,xml.etree.ElementTree as E; r=E.parse(sys.argv[1]).getroot(); "
      "s=r.find('testsuite'); cs=s.findall('testcase'); "
      "print(len(cs), s.get('failures'), len([c for c in cs if c.find('failure') is not "
      "None]))\" " +
      (tmp / "junit.xml"));
  INFO(check.output);
  REQUIRE(check.code == 0);
  CHECK(check.output.find("5 1 1") != std::string::npos);

  // Baseline regression gates: a copy of itself passes; a better baseline fails.
  auto same = baseline_gates(r, r, 0.02);
  CHECK(!same.empty());
  for (const auto& b : same) CHECK(b.passed);
  auto better = r;
  (*better.aggregates.empirical)[0] = sa + 0.5;
  auto worse = baseline_gates(r, better, 0.02);
  CHECK(std::any_of(worse.begin(), worse.end(), [](const GateResult& g) { return !g.passed; }));
  // A baseline with an ε this run lacks fails that gate ("n/a"), never passes silently.
  auto wider = r;
  wider.config.grid = EpsGrid({0.001, 0.01, 0.05, 0.2});
  wider.aggregate();
  auto missing = baseline_gates(r, wider, 0.02);
  const auto at = std::find_if(missing.begin(), missing.end(), [](const GateResult& g) {
    return g.gate.text.find("@0.2 ") != std::string::npos;
  });
  REQUIRE(at != missing.end());
  CHECK_FALSE(at->passed);
  CHECK(std::isnan(at->actual));
  CHECK(junit_xml(missing, "s").find("n/a (not in this run)") != std::string::npos);
}

TEST_CASE("merging 3 shards equals the unsharded run", "[integration][reports]") {
  std::vector<int64_t> all(22);
  std::iota(all.begin(), all.end(), 0);
  auto whole = certify_indices(all);
  std::vector<Results> shards;
  for (int i = 0; i < 3; ++i) {
    // `certify --shard i/3`: blocks of --batch-size (4) samples, block numbers i, i+3, ...
    std::vector<int64_t> part;
    for (int64_t block = i; block * 4 < 22; block += 3)
      for (int64_t k = block * 4; k < std::min<int64_t>(22, block * 4 + 4); ++k) part.push_back(k);
    shards.push_back(certify_indices(part, std::to_string(i) + "/3"));
  }
  // Shard order does not matter.
  std::swap(shards[0], shards[2]);
  auto merged = results_merge(shards);
  CHECK(merged.rows.size() == 22);
  INFO("differences: "
       << nlohmann::json::diff(without_timing(whole), without_timing(merged)).dump());
  CHECK(without_timing(merged) == without_timing(whole));
  // Overlapping or foreign shards are refused.
  CHECK_THROWS_AS(results_merge({shards[0], shards[0]}), ConfigError);
  auto foreign = shards[1];
  foreign.fingerprint["weights_sha256"] = "other";
  CHECK_THROWS_WITH(results_merge({shards[0], foreign}), Catch::Contains("different checkpoint"));
}

TEST_CASE("report.md and a self-contained report.html with plots", "[integration][reports]") {
  std::vector<int64_t> all(12);
  std::iota(all.begin(), all.end(), 0);
  auto r = certify_indices(all);
  TempDir tmp;
  auto gates = gates_evaluate(r, {gate_parse("violations==0"), gate_parse("sa>1")});
  report_write({r}, {"run"}, {}, gates, tmp / "rep", "test");
  auto md = read_text(tmp / "rep/report.md");
  auto html = read_text(tmp / "rep/report.html");
  CHECK(md.find("## Soundness violations") != std::string::npos);
  CHECK(md.find("none: no attack succeeded") != std::string::npos);
  CHECK(md.find("**FAIL**") != std::string::npos);
  CHECK(md.find("thm54_candidate_local") != std::string::npos);
  // Every sample's verdict per ε, in the table and as stacked bars.
  REQUIRE(r.aggregates.unknown);
  CHECK(md.find("| unknown (neither certified nor attacked) |") != std::string::npos);
  CHECK(md.find("| falsified (attack succeeded, not certified) |") != std::string::npos);
  CHECK(md.find("![Verdicts per ε](plot-verdicts.svg)") != std::string::npos);
  // Self-contained: four inline SVG plots, no external references, no scripts.
  size_t svgs = 0;
  for (size_t pos = html.find("<svg"); pos != std::string::npos; pos = html.find("<svg", pos + 1))
    ++svgs;
  CHECK(svgs == 4);
  CHECK(html.find("not drawn") == std::string::npos);
  CHECK(html.find("<script") == std::string::npos);
  CHECK(html.find("src=\"http") == std::string::npos);
  CHECK(html.find("<img") == std::string::npos);
  // A comparison of two runs in one report.
  report_write({r, r}, {"before", "after"}, {}, {}, tmp / "cmp", "test");
  auto cmp = read_text(tmp / "cmp/report.md");
  CHECK(cmp.find("| before | clean accuracy") != std::string::npos);
  CHECK(cmp.find("| after | clean accuracy") != std::string::npos);
  CHECK(cmp.find("(plot-verdicts-1.svg)") != std::string::npos);
  // Runs with different grids: one column per ε of either, "n/a" where a run lacks it.
  auto other = r;
  other.config.grid = EpsGrid({0.001, 0.2});
  other.aggregate();
  report_write({r, other}, {"a", "b"}, {}, {}, tmp / "grids", "test");
  auto grids = read_text(tmp / "grids/report.md");
  CHECK(grids.find("| ε = 0.001 | ε = 0.01 | ε = 0.05 | ε = 0.2 |") != std::string::npos);
  const auto line_b = grids.substr(grids.find("| b | certified (headline"));
  const auto cells = line_b.substr(0, line_b.find('\n'));
  INFO(cells);
  CHECK(cells.find("| n/a | n/a |") != std::string::npos);  // b has no 0.01, 0.05
  auto line_a = grids.substr(grids.find("| a | certified (headline"));
  line_a = line_a.substr(0, line_a.find('\n'));
  INFO(line_a);
  CHECK(line_a.size() > 8);
  CHECK(line_a.compare(line_a.size() - 7, 7, "| n/a |") == 0);  // a has no 0.2
  CHECK(line_a.find("| n/a | n/a |") == std::string::npos);
}

TEST_CASE("attack results: validated, tabled and plotted (RA / RA-E / RA-R, alpha-sweep)",
          "[integration][reports]") {
  const nlohmann::json single = {{"sa", 0.84},
                                 {"ra", 0.71},
                                 {"ra_e", 0.52},
                                 {"ra_r", 0.80},
                                 {"eps", 0.1},
                                 {"norm", "inf"},
                                 {"steps", 20},
                                 {"samples", 1000},
                                 {"checkpoint", "runs/at"},
                                 {"expert_usage", {{"clean", {3, 1}}, {"adversarial", {2, 2}}}}};
  nlohmann::json dual = {{"sa", 0.86}, {"ra", 0.58}, {"alpha", 0.8}, {"checkpoint", "runs/dual"}};
  dual["alpha_sweep"] = nlohmann::json::array();
  for (int a = 5; a <= 10; ++a)
    dual["alpha_sweep"].push_back({{"alpha", a / 10.0}, {"sa", 0.9 - 0.01 * a}, {"ra", 0.05 * a}});
  CHECK(attack_validate(single, "a.json").data == single);
  CHECK(attack_validate(dual, "d.json").name == "d.json");
  // Bad attack objects name the file and the field.
  auto bad = [](nlohmann::json j, const char* message) {
    INFO(message);
    CHECK_THROWS_WITH(attack_validate(j, "x.json"),
                      Catch::Contains("x.json") && Catch::Contains(message));
  };
  auto no_ra = single;
  no_ra.erase("ra");
  bad(no_ra, "missing field 'ra'");
  auto big = single;
  big["ra_e"] = 1.5;
  bad(big, "'ra_e' must be a number in [0, 1]");
  auto text = single;
  text["sa"] = "high";
  bad(text, "'sa' must be a number");
  auto sweep = dual;
  sweep["alpha_sweep"][2].erase("ra");
  bad(sweep, "alpha_sweep[2].ra");
  auto usage = single;
  usage["expert_usage"]["clean"][1] = -1;
  bad(usage, "'expert_usage.clean' must hold sample counts");
  usage.erase("expert_usage");
  usage["expert_usage"] = {{"clean", {1}}};
  bad(usage, "'expert_usage.adversarial' must be an array");
  bad(nlohmann::json::array(), "not an attack result");
  TempDir tmp;
  {
    std::ofstream f(tmp / "broken.json");
    f << "{\"sa\": 0.5,";
  }
  CHECK_THROWS_WITH(attack_read(tmp / "broken.json"),
                    Catch::Contains("broken.json") && Catch::Contains("not valid JSON"));
  CHECK_THROWS_WITH(attack_read(tmp / "absent.json"), Catch::Contains("absent.json"));

  std::vector<int64_t> all(8);
  std::iota(all.begin(), all.end(), 0);
  auto r = certify_indices(all);
  report_write(
      {r}, {"run"},
      {attack_validate(single, "runs/at/attack.json"), attack_validate(dual, "runs/dual.json")}, {},
      tmp / "rep", "test");
  auto md = read_text(tmp / "rep/report.md");
  auto html = read_text(tmp / "rep/report.html");
  CHECK(md.find("## Empirical robustness (attacks)") != std::string::npos);
  CHECK(md.find("| attack | `runs/at` | p = inf, ε = 0.1, PGD-20, 1000 samples | 84.00% | 71.00% | "
                "52.00% | 80.00% "
                "| 0.75/0.25 / 0.50/0.50 |") != std::string::npos);
  CHECK(md.find("| dual | `runs/dual` |") != std::string::npos);  // RA-E / RA-R absent: shown as —
  CHECK(md.find("| 0.80 | 82.00% | 40.00% |") != std::string::npos);  // a row of the α-sweep table
  // Six inline plots: radius, accuracy, verdicts, Lipschitz, RA components, α-sweep.
  size_t svgs = 0;
  for (size_t pos = html.find("<svg"); pos != std::string::npos; pos = html.find("<svg", pos + 1))
    ++svgs;
  CHECK(svgs == 6);
  CHECK(html.find("<figure id=\"plot-ra-components.svg\">") != std::string::npos);
  CHECK(html.find("<figure id=\"plot-alpha-sweep.svg\">") != std::string::npos);
  // Without a sweep there is no α-sweep plot.
  report_write({r}, {"run"}, {attack_validate(single, "a.json")}, {}, tmp / "one", "test");
  CHECK(read_text(tmp / "one/report.html").find("plot-alpha-sweep") == std::string::npos);
}
