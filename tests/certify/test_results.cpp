// The typed results module: ε grids and keys, aggregates, every schema version read,
// hostile files refused with the file and field named, and grid properties.
#include <catch2/catch.hpp>
#include <cmath>
#include <fstream>
#include <limits>
#include <random>

#include "moecert/error.h"
#include "moecert/report.h"
#include "moecert/results.h"
#include "test_util.h"

using namespace moecert;

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

ResultRow row(int64_t index, bool correct, double radius, std::optional<double> empirical,
              const std::string& key = "a_local") {
  ResultRow r;
  r.index = index, r.correct = correct;
  r.radii[RadiusKey::parse(key, "test")] = radius;
  r.headline = radius, r.headline_key = RadiusKey::parse(key, "test");
  r.empirical = empirical;
  return r;
}

Results results_of(std::vector<double> grid, std::vector<ResultRow> rows) {
  Results r;
  r.config.grid = EpsGrid(std::move(grid));
  r.rows = std::move(rows);
  r.aggregate();
  return r;
}

std::string golden(const std::string& name) {
  return std::string(MOECERT_SOURCE_DIR) + "/tests/certify/golden/" + name;
}

}  // namespace

TEST_CASE("aggregates count certified accuracy and soundness violations", "[unit][certify]") {
  auto r = results_of({0.1, 0.01},
                      {row(0, true, 0.05, 0.2), row(1, true, 0.3, 0.2), row(2, false, 0.0, 0.0)});
  const auto& a = r.aggregates;
  const RadiusKey key{"a", Estimator::local};
  CHECK(a.clean_accuracy == Approx(2.0 / 3));
  CHECK(r.certified_at(0.01, key).value() == Approx(2.0 / 3));
  CHECK(r.certified_at(0.1, key).value() == Approx(1.0 / 3));
  CHECK(r.empirical_at(0.1).value() == Approx(2.0 / 3));
  REQUIRE(a.violations.size() == 1);
  CHECK(a.violations[0].index == 1);
  CHECK(a.violations[0].key == key);
  CHECK(a.median_tightness == Approx((0.25 + 1.5) / 2));
  // An ε the run does not have is absent, never 0.
  CHECK_FALSE(r.certified_at(0.02).has_value());
  CHECK_FALSE(r.certified_at(0.01, RadiusKey{"b", Estimator::crown}).has_value());
}

TEST_CASE("verdicts per eps: verified, falsified, unknown, misclassified sum to one",
          "[unit][certify][reports]") {
  // Radii and attack distances against the grid {0.01, 0.1}: certified 0.05 attacked at
  // 0.2; certified 0.005 attacked at 0.05; nothing certified, attacked at 0.005; certified
  // 0.5, no attack succeeded; misclassified.
  auto r = results_of({0.1, 0.01},
                      {row(0, true, 0.05, 0.2), row(1, true, 0.005, 0.05), row(2, true, 0.0, 0.005),
                       row(3, true, 0.5, kInf), row(4, false, 0.0, 0.0)});
  const auto& a = r.aggregates;
  REQUIRE(a.falsified);
  REQUIRE(a.unknown);
  // ε = 0.01 (index 0): verified 0, 3; falsified 2; unknown 1; ε = 0.1: verified 3;
  // falsified 1, 2; unknown 0.
  CHECK(a.headline_certified[0] == Approx(2.0 / 5));
  CHECK((*a.falsified)[0] == Approx(1.0 / 5));
  CHECK((*a.unknown)[0] == Approx(1.0 / 5));
  CHECK(a.headline_certified[1] == Approx(1.0 / 5));
  CHECK((*a.falsified)[1] == Approx(2.0 / 5));
  CHECK((*a.unknown)[1] == Approx(1.0 / 5));
  for (size_t e = 0; e < 2; ++e)
    CHECK(a.headline_certified[e] + (*a.falsified)[e] + (*a.unknown)[e] + (1 - a.clean_accuracy) ==
          Approx(1.0));
  const auto j = nlohmann::json::parse(r.to_json().dump());
  CHECK(j["aggregates"]["verdicts"]["unknown"]["0.1"].get<double>() == Approx(0.2));
  CHECK(j["aggregates"]["verdicts"]["misclassified"]["0.01"].get<double>() == Approx(0.2));
  CHECK(gate_metric(r, gate_parse("unknown@0.1<=0.2")) == Approx(0.2));
  CHECK(gate_metric(r, gate_parse("falsified@0.1<=0.5")) == Approx(0.4));
  CHECK(gate_metric(r, gate_parse("verified_acc@0.01>=0.4")) == Approx(0.4));
  CHECK_THROWS_AS(gate_metric(r, gate_parse("unknown@0.05<=0.2")), ConfigError);  // not in grid
  CHECK(r.falsified_at(0.01).value_or(-1) == Approx(0.2));
  CHECK(r.unknown_at(0.1).value_or(-1) == Approx(0.2));
  CHECK_FALSE(r.unknown_at(0.05));
  // Without the cross-check nothing is falsified or unknown: no verdicts, and gates on them
  // are errors.
  auto blind = results_of({0.1}, {row(0, true, 0.05, std::nullopt)});
  CHECK_FALSE(blind.aggregates.unknown);
  CHECK_FALSE(nlohmann::json::parse(blind.to_json().dump())["aggregates"].contains("verdicts"));
  CHECK_THROWS_AS(gate_metric(blind, gate_parse("unknown@0.1<=0.2")), ConfigError);
  CHECK_FALSE(blind.falsified_at(0.1));
}

TEST_CASE("aggregates count expert usage from the rows' router weights", "[unit][certify]") {
  auto weighted = [](int i, std::vector<std::vector<double>> w, bool dual) {
    auto r = row(i, true, 0.05, std::nullopt);
    r.router_weights = std::move(w), r.dual_weights = dual;
    return r;
  };
  auto r =
      results_of({0.01}, {weighted(0, {{0, 1, 0}}, false), weighted(1, {{0, 1, 0}}, false),
                          weighted(2, {{0.2, 0.1, 0.7}}, false), weighted(3, {{1, 0, 0}}, false)});
  CHECK(r.aggregates.expert_usage == std::vector<int64_t>{1, 2, 1});
  auto j = r.to_json()["aggregates"]["expert_usage"];
  CHECK(j["clean_share"][1].get<double>() == Approx(0.5));
  CHECK(j["max_share"].get<double>() == Approx(0.5));
  // Dual-model rows: one vector per routed member; the last (robust) member counts.
  auto d =
      results_of({0.01}, {weighted(0, {{1, 0}, {0, 1}}, true), weighted(1, {{1, 0}, {0, 1}}, true),
                          weighted(2, {{0, 1}, {1, 0}}, true)});
  CHECK(d.aggregates.expert_usage == std::vector<int64_t>{1, 2});
  // No router: no usage.
  auto n = results_of({0.01}, {row(0, true, 0.05, std::nullopt)});
  CHECK(n.aggregates.expert_usage.empty());
  CHECK_FALSE(n.to_json()["aggregates"].contains("expert_usage"));
}

TEST_CASE("eps keys are the shortest text that reads back as the same double", "[unit][certify]") {
  for (double e : {0.1, 0.05, 1e-5, 0.0123456789, 1.0 / 3, 8.0 / 255, 0.0, 1e-300, 12345.678901234})
    CHECK(eps_parse(eps_key(e), "test") == e);
  CHECK(eps_key(0.1) == "0.1");
  CHECK(eps_key(0.0123456789) == "0.0123456789");
  CHECK(eps_key(1e-5) == "1e-05");
  CHECK(eps_parse("0.10", "x") == 0.1);
  CHECK(eps_parse("1e-5", "x") == eps_parse("0.00001", "x"));
  for (const char* bad : {"", "abc", "-0.1", "0.1x", "inf", "nan", "1e999", " 0.1"}) {
    INFO(bad);
    CHECK_THROWS_WITH(eps_parse(bad, "--eps-grid"), Catch::Contains("--eps-grid"));
  }
}

TEST_CASE("an eps grid is sorted and de-duplicated, lookups are exact", "[unit][certify]") {
  const auto g = EpsGrid::parse("0.1,0.05,0.5,1,0.05,1e-5");
  CHECK(g.values() == std::vector<double>{1e-5, 0.05, 0.1, 0.5, 1});
  CHECK(g.text() == "1e-05, 0.05, 0.1, 0.5, 1");
  CHECK(g.find(0.1).value() == 2);
  CHECK_FALSE(g.find(0.1000001).has_value());
  CHECK(EpsGrid::merged({g, EpsGrid({0.2, 0.1})}).values() ==
        std::vector<double>{1e-5, 0.05, 0.1, 0.2, 0.5, 1});
  for (const char* bad : {"", "0.1,", ",0.1", "0.1,,0.2", "0.1,-1", "x"}) {
    INFO(bad);
    CHECK_THROWS_AS(EpsGrid::parse(bad), ConfigError);
  }
  CHECK_THROWS_AS(EpsGrid(std::vector<double>(100001, 0.1)), ConfigError);
}

TEST_CASE("radius keys split into form and estimator", "[unit][certify]") {
  const auto k = RadiusKey::parse("candidate_alpha-crown", "x");
  CHECK(k.form == "candidate");
  CHECK(k.estimator == Estimator::alpha_crown);
  CHECK(k.text() == "candidate_alpha-crown");
  CHECK(RadiusKey::parse("thm54_tight_local", "x").form == "thm54_tight");
  const auto c = RadiusKey::parse("margin_crown-ibp", "x");
  CHECK(c.form == "margin");
  CHECK(c.estimator == Estimator::crown_ibp);
  auto names = [](const std::string& text) {
    std::vector<std::string> out;
    for (Estimator e : estimators_parse(text)) out.push_back(estimator_name(e));
    return out;
  };
  CHECK(names("bp") == std::vector<std::string>{"ibp", "crown-ibp", "crown", "alpha-crown"});
  CHECK(names("crown,crown-ibp") == std::vector<std::string>{"crown-ibp", "crown"});
  CHECK(estimators_parse("all").size() == 6);
  CHECK_THROWS_AS(estimators_parse("crown_ibp"), ConfigError);
  CHECK(k.is_main_form());
  CHECK_FALSE(RadiusKey::parse("thm54_paper_global", "x").is_main_form());
  for (const char* bad :
       {"candidate", "candidate_exact", "_crown", "Tight_crown", "a b_crown", ""}) {
    INFO(bad);
    CHECK_THROWS_WITH(RadiusKey::parse(bad, "the key"), Catch::Contains("the key"));
  }
}

// Property: for any grid order and any ε (7+ significant digits, 1e-5), the JSON keys,
// the typed values read back and the gates written with the key text agree with a
// direct count over the rows.
TEST_CASE("any grid order and any eps: JSON, read-back and gates agree", "[unit][certify]") {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> unit(0, 1);
  for (int trial = 0; trial < 50; ++trial) {
    std::vector<double> grid{1e-5, 0.0123456789};
    for (int i = 0; i < 4; ++i) grid.push_back(std::pow(10.0, -4 * unit(rng)) * unit(rng));
    std::shuffle(grid.begin(), grid.end(), rng);
    std::vector<ResultRow> rows;
    std::vector<double> radius;
    for (int i = 0; i < 20; ++i) {
      // Radii on and around the grid values, so that >= at the boundary matters.
      double r = trial % 2 ? grid[static_cast<size_t>(i) % grid.size()] : 0.2 * unit(rng);
      rows.push_back(row(i, true, r, 1.0, "candidate_crown"));
      radius.push_back(r);
    }
    const auto results = results_of(grid, rows);
    const auto back = Results::from_json(nlohmann::json::parse(results.to_json().dump()), "mem");
    const auto j = results.to_json();
    for (double e : grid) {
      const double want =
          std::count_if(radius.begin(), radius.end(), [&](double r) { return r >= e && r > 0; }) /
          20.0;
      INFO("eps " << eps_key(e));
      CHECK(j["aggregates"]["headline"]["certified_accuracy"][eps_key(e)].get<double>() == want);
      CHECK(j["aggregates"]["certified_accuracy"]["candidate_crown"][eps_key(e)].get<double>() ==
            want);
      CHECK(back.certified_at(e).value() == want);
      const auto g = gate_parse("certified_acc@" + eps_key(e) + ">=" + std::to_string(want - 1e-9));
      CHECK(gate_metric(back, g) == want);
      CHECK(gates_evaluate(back, {g})[0].passed);
    }
  }
}

TEST_CASE("results of every schema version read, others are refused naming the version",
          "[unit][certify]") {
  // Schema 1: no headline (the largest radius is it), the whole ball, no domain.
  const auto v1 = Results::read(golden("results_v1.json"));
  CHECK(v1.schema == 1);
  CHECK_FALSE(v1.config.box);
  REQUIRE(v1.rows.size() == 3);
  CHECK(v1.rows[0].headline_key->text() == "thm54_tight_local");
  CHECK(v1.certified_at(0.01).value() == Approx(2.0 / 3));
  // Schema 2: what certify wrote before the typed module (keys with 6 digits).
  const auto v2 = Results::read(golden("results_v2.json"));
  CHECK(v2.schema == 2);
  CHECK(v2.config.box);
  CHECK(v2.rows[1].headline_key->text() == "candidate_alpha-crown");
  CHECK(v2.certified_at(0.05).value() == Approx(0.5));
  CHECK(gate_metric(v2, gate_parse("certified_acc[candidate_crown]@0.01>=0")) == Approx(0.5));
  // Reports render files of every schema (no plots needed: the tables alone).
  moecert_test::TempDir tmp;
  report_write({v1, v2}, {"v1", "v2"}, {}, {}, tmp / "rep", "test");
  const auto md = moecert_test::read_text(tmp / "rep/report.md");
  CHECK(md.find("| v1 | certified (headline: best sound form per sample) | 66.67% |") !=
        std::string::npos);
  // Written back at the current schema, and read again to the same values.
  const auto again = Results::from_json(v2.to_json(), "mem");
  CHECK(again.to_json()["schema"] == results_schema_name(results_schema_version));
  CHECK(again.to_json()["aggregates"] == v2.to_json()["aggregates"]);
  auto j = v2.to_json();
  for (const std::string s : {"moecert.certify/4", "moecert.certify/0", "moecert.certify/x"}) {
    j["schema"] = s;
    CHECK_THROWS_WITH(Results::from_json(j, "r.json"),
                      Catch::Contains("r.json") && Catch::Contains(s) &&
                          Catch::Contains("moecert.certify/1 to moecert.certify/3"));
  }
  j["schema"] = "something.else/1";
  CHECK_THROWS_WITH(Results::from_json(j, "r.json"),
                    Catch::Contains("not a moecert certify results file"));
}

TEST_CASE("hostile results files are refused naming the file and field", "[unit][certify]") {
  const auto good = Results::read(golden("results_v2.json")).to_json();
  auto bad = [&](const std::function<void(nlohmann::json&)>& edit, const std::string& field) {
    auto j = good;
    edit(j);
    INFO(field);
    CHECK_THROWS_WITH(Results::from_json(j, "x.json"),
                      Catch::Contains("x.json") && Catch::Contains(field));
  };
  bad([](auto& j) { j["rows"][0]["radii"]["candidate_exact"] = 0.1; }, "candidate_exact");
  bad([](auto& j) { j["rows"][0]["radii"]["candidate_crown"] = -1; },
      "rows[0].radii.candidate_crown");
  bad([](auto& j) { j["rows"][0]["radii"]["candidate_crown"] = "big"; },
      "rows[0].radii.candidate_crown");
  bad([](auto& j) { j["rows"][1]["index"] = j["rows"][0]["index"]; }, "rows[1].index");
  bad([](auto& j) { j["rows"][0]["index"] = -3; }, "rows[0].index");
  bad([](auto& j) { j["rows"][0]["index"] = 1e300; }, "rows[0].index");
  bad([](auto& j) { j["rows"][0].erase("correct"); }, "rows[0].correct");
  bad([](auto& j) { j["rows"] = 5; }, "'rows'");
  bad([](auto& j) { j["config"]["eps_grid"] = {0.1, -1}; }, "config.eps_grid");
  bad([](auto& j) { j["config"]["eps_grid"] = nlohmann::json::array(); }, "config.eps_grid");
  bad([](auto& j) { j["config"]["estimators"] = {"exact"}; }, "config.estimators");
  bad([](auto& j) { j["kind"] = "triple"; }, "kind");
  bad([](auto& j) { j["rows"][0]["router_weights"] = {"a"}; }, "rows[0].router_weights");
  bad([](auto& j) { j["rows"][0] = 7; }, "rows[0]");
  CHECK_THROWS_WITH(Results::from_json(nlohmann::json::array(), "x.json"),
                    Catch::Contains("x.json"));
  moecert_test::TempDir tmp;
  { std::ofstream(tmp / "cut.json") << good.dump().substr(0, 100); }
  { std::ofstream(tmp / "huge.json") << "{\"schema\": 1e809}"; }  // found by fuzzing
  CHECK_THROWS_WITH(Results::read(tmp / "huge.json"),
                    Catch::Contains("huge.json") && Catch::Contains("not valid JSON"));
  CHECK_THROWS_WITH(Results::read(tmp / "cut.json"),
                    Catch::Contains("cut.json") && Catch::Contains("not valid JSON"));
  CHECK_THROWS_WITH(Results::read(tmp / "absent.json"), Catch::Contains("absent.json"));
  // Unknown fields are kept (a newer writer's extras survive a merge).
  auto extra = good;
  extra["rows"][0]["note"] = "kept";
  extra["provenance"] = {{"ci", "x"}};
  const auto back = Results::from_json(extra, "x.json").to_json();
  CHECK(back["rows"][0]["note"] == "kept");
  CHECK(back["provenance"]["ci"] == "x");
  // Unbounded radii (null) read as +inf and are written back as null.
  auto unbounded = good;
  unbounded["rows"][0]["radii"]["candidate_crown"] = nullptr;
  const auto u = Results::from_json(unbounded, "x.json");
  CHECK(u.rows[0].radii.at(RadiusKey{"candidate", Estimator::crown}) == kInf);
  CHECK(u.to_json()["rows"][0]["radii"]["candidate_crown"].is_null());
}
