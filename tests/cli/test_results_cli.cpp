// End-to-end: the README's CI recipe as written, console vs JSON vs gates for any ε
// grid, per-sample rows that join across commands, and hostile inputs refused early.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <nlohmann/json.hpp>
#include <regex>
#include <sstream>

#include "cli/cli_fixtures.h"
#include "moecert/data.h"
#include "moecert/results.h"
#include "test_util.h"

using moecert_test::read_text;
using moecert_test::run_moecert;
using moecert_test::run_shell;
using moecert_test::TempDir;
using moecert_test::trained_checkpoint;

namespace {

/// The README's CI recipe: the lines between "# ci-recipe: begin" and "# ci-recipe: end",
/// with the values of its settings (lines `name=value`) replaced by `settings`.
std::string ci_recipe(const std::map<std::string, std::string>& settings) {
  const std::string readme = read_text(std::string(MOECERT_SOURCE_DIR) + "/README.md");
  const auto begin = readme.find("# ci-recipe: begin");
  const auto end = readme.find("# ci-recipe: end");
  REQUIRE(begin != std::string::npos);
  REQUIRE(end != std::string::npos);
  std::istringstream in(readme.substr(begin, end - begin));
  std::string line, script;
  std::set<std::string> replaced;
  while (std::getline(in, line)) {
    const auto eq = line.find('=');
    const std::string name = eq == std::string::npos ? "" : line.substr(0, eq);
    if (settings.count(name) && name.find_first_of(" $\"") == std::string::npos) {
      line = name + "=" + settings.at(name);
      replaced.insert(name);
    }
    script += line + "\n";
  }
  CHECK(replaced.size() == settings.size());  // every setting is still in the README
  return script;
}

/// Runs a script with bash in `dir`, stopping at the first failing command (as CI does).
moecert_test::RunResult run_script(const std::string& script, const std::string& dir) {
  {
    std::ofstream f(dir + "/recipe.sh");
    f << "set -euo pipefail\ncd '" << dir << "'\n" << script;
  }
  return run_shell("bash '" + dir + "/recipe.sh'");
}

}  // namespace

TEST_CASE("the README's CI recipe: shards, merge, gates, JUnit, baseline regression",
          "[e2e][cli][reports]") {
  const std::string bin =
      std::string(MOECERT_BINARY) + " --threads " + std::to_string(moecert_test::test_threads());
  TempDir tmp;
  std::map<std::string, std::string> settings{{"moecert", "'" + bin + "'"},
                                              {"ckpt", trained_checkpoint()},
                                              {"n", "120"},
                                              {"grid", "0.1,0.001,0.01"},
                                              {"gate", "'certified_acc@0.001>=0'"}};
  // Passing gates, no baseline yet: exit 0, and the merged shards equal one run.
  auto pass = run_script(ci_recipe(settings), tmp.path());
  INFO(pass.output);
  REQUIRE(pass.code == 0);
  // Blocks of --batch-size (100): shard 0 holds 100 images, shard 1 the other 20.
  CHECK(moecert::Results::read(tmp / "cert-1/results.json").rows.size() == 20);
  auto whole = run_moecert("--samples 120 --quiet certify " + trained_checkpoint() +
                           " --estimator crown --eps-grid 0.1,0.001,0.01 --out " + (tmp / "whole"));
  REQUIRE(whole.code == 0);
  CHECK(moecert_test::results_comparable(tmp / "results.json") ==
        moecert_test::results_comparable(tmp / "whole/results.json"));
  // Without the global estimator nothing brackets its constants: no lower bounds computed.
  CHECK(moecert::Results::read(tmp / "whole/results.json").constants_lower.is_null());
  auto junit = read_text(tmp / "report/junit.xml");
  CHECK(junit.find("tests=\"2\" failures=\"0\"") != std::string::npos);
  CHECK(read_text(tmp / "report/report.html").find("<svg") != std::string::npos);

  // A failing gate: exit 1, the failure in the JUnit file.
  settings["gate"] = "'sa>1'";
  auto fail = run_script(ci_recipe(settings), tmp.path());
  INFO(fail.output);
  CHECK(fail.code == 1);
  CHECK(fail.output.find("FAIL sa>1") != std::string::npos);
  CHECK(read_text(tmp / "report/junit.xml").find("failures=\"1\"") != std::string::npos);

  // A regression against the baseline (the main branch's results): exit 1.
  settings["gate"] = "'violations==0'";
  auto base = moecert::Results::read(tmp / "results.json");
  for (auto& row : base.rows) {
    row.correct = true;
    row.headline = 1.0;
  }
  base.aggregate();
  std::filesystem::create_directories(tmp / "baseline");
  base.write(tmp / "baseline/results.json");
  auto drop = run_script(ci_recipe(settings), tmp.path());
  INFO(drop.output);
  CHECK(drop.code == 1);
  CHECK(drop.output.find("FAIL certified_acc@0.1 >= baseline 1") != std::string::npos);
  // The same results as baseline: no regression.
  std::filesystem::copy_file(tmp / "results.json", tmp / "baseline/results.json",
                             std::filesystem::copy_options::overwrite_existing);
  CHECK(run_script(ci_recipe(settings), tmp.path()).code == 0);
}

TEST_CASE("any grid order and any eps: console, results.json and gates agree",
          "[e2e][cli][certify]") {
  TempDir tmp;
  const std::string grid = "0.1,0.05,0.5,1,0.0123456789,1e-5";
  auto r =
      run_moecert("--samples 12 --quiet certify " + trained_checkpoint() +
                  " --estimator ibp,crown --eps-grid " + grid + " --steps 3 --out " + (tmp / "c"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  const auto results = moecert::Results::read(tmp / "c/results.json");
  const auto j = nlohmann::json::parse(read_text(tmp / "c/results.json"));
  const auto& values = results.config.grid.values();
  REQUIRE(values == std::vector<double>{1e-5, 0.0123456789, 0.05, 0.1, 0.5, 1});
  // The console: headers in grid order, each column the value results.json has at that ε.
  std::istringstream out(r.output);
  std::string line;
  std::vector<std::string> headers;
  std::map<std::string, std::vector<double>> rows;
  while (std::getline(out, line)) {
    std::istringstream cells(line);
    std::vector<std::string> words;
    for (std::string w; cells >> w;) words.push_back(w);
    if (line.rfind("certified accuracy at eps", 0) == 0)
      headers.assign(words.begin() + 4, words.end() - 2);  // minus "median r"
    else if (!headers.empty() && words.size() == headers.size() + 2 && words[0] != "headline")
      for (size_t i = 1; i <= headers.size(); ++i) rows[words[0]].push_back(std::stod(words[i]));
  }
  REQUIRE(headers == std::vector<std::string>{"1e-05", "0.0123456789", "0.05", "0.1", "0.5", "1"});
  REQUIRE(rows.count("candidate_crown"));
  for (size_t i = 0; i < headers.size(); ++i) {
    const double json = j["aggregates"]["certified_accuracy"]["candidate_crown"][headers[i]];
    CHECK(rows["candidate_crown"][i] == Approx(json).margin(5e-5));
    CHECK(
        results.certified_at(values[i], moecert::RadiusKey{"candidate", moecert::Estimator::crown})
            .value() == json);
  }
  // Gates at every ε, written as the grid was: the value results.json has (== passes).
  for (const char* eps : {"0.0123456789", "1e-5", "0.1", "1"}) {
    const double v = results.certified_at(moecert::eps_parse(eps, "test")).value();
    std::ostringstream gate;
    gate.precision(17);
    gate << "certified_acc@" << eps << "==" << v;
    auto g = run_moecert("report " + (tmp / "c/results.json") + " --gate '" + gate.str() + "'");
    INFO(g.output);
    CHECK(g.code == 0);
  }
  auto missing =
      run_moecert("report " + (tmp / "c/results.json") + " --gate 'certified_acc@0.2>=0'");
  CHECK(missing.code == 2);
  CHECK(missing.output.find("0.2 is not in the run's grid") != std::string::npos);
  // certify refuses a gate at an ε outside its grid before any work.
  auto early = run_moecert("--samples 12 certify " + trained_checkpoint() +
                           " --eps-grid 0.1 --gate "
                           "'certified_acc@0.05>=0' --out " +
                           (tmp / "d"));
  CHECK(early.code == 2);
  CHECK(early.output.find("not in --eps-grid") != std::string::npos);
}

TEST_CASE("attack, certify and --save-adv rows carry the image's index and join on it",
          "[e2e][cli]") {
  TempDir tmp;
  auto a = run_moecert("--samples 12 --quiet attack " + trained_checkpoint() +
                       " --suite pgd --eps 0.05 --steps 3 --no-components --json " +
                       (tmp / "a.json") + " --save-adv " + (tmp / "adv.pt"));
  INFO(a.output);
  REQUIRE(a.code == 0);
  auto c = run_moecert("--samples 12 --quiet certify " + trained_checkpoint() +
                       " --estimator crown --steps 3 --eps-grid 0.05 --out " + (tmp / "c"));
  INFO(c.output);
  REQUIRE(c.code == 0);
  const auto attack = nlohmann::json::parse(read_text(tmp / "a.json"));
  const auto cert = moecert::Results::read(tmp / "c/results.json");
  moecert::DataSpec spec;
  spec.name = "synthetic";
  spec.train = false;
  const auto split = moecert::data_load(spec);  // the test split the rows index
  std::map<int64_t, nlohmann::json> by_index;
  for (const auto& row : attack["rows"]) by_index[row["index"].get<int64_t>()] = row;
  REQUIRE(by_index.size() == 12);
  REQUIRE(cert.rows.size() == 12);
  for (const auto& row : cert.rows) {
    INFO("index " << row.index);
    REQUIRE(by_index.count(row.index));
    CHECK(by_index[row.index]["label"].get<int64_t>() == row.label);
    CHECK(split.labels[row.index].item<int64_t>() == row.label);
    // A certified sample at 0.05 is not broken by the attack at 0.05.
    if (row.correct && row.headline >= 0.05) CHECK(by_index[row.index]["robust"].get<bool>());
  }
  CHECK(attack["selection"]["rule"] == "first");
  CHECK(attack["selection"]["samples"] == 12);
  // The saved examples name the same images (what torch.load reads, read back here).
  const std::string bytes = read_text(tmp / "adv.pt");
  const auto saved =
      torch::pickle_load(std::vector<char>(bytes.begin(), bytes.end())).toGenericDict();
  const auto index = saved.at("index").toTensor();
  REQUIRE(index.numel() == 12);
  for (int64_t i = 0; i < 12; ++i)
    CHECK(index[i].item<int64_t>() == attack["rows"][i]["index"].get<int64_t>());

  // A seeded random subset: the rows name data-set indices, not positions in the subset.
  auto r = run_moecert("--samples 12 --subset random --seed 5 --quiet attack " +
                       trained_checkpoint() + " --suite pgd --eps 0.05 --steps 1 " +
                       "--no-components --json " + (tmp / "r.json"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  const auto random = nlohmann::json::parse(read_text(tmp / "r.json"));
  CHECK(random["selection"]["rule"] == "random");
  CHECK(random["selection"]["seed"] == 5);
  spec.seed = 5;  // the synthetic set is generated from --seed too
  const auto split5 = moecert::data_load(spec);
  int64_t beyond = 0;
  for (const auto& row : random["rows"]) {
    const int64_t i = row["index"].get<int64_t>();
    REQUIRE(i >= 0);
    REQUIRE(i < split5.labels.size(0));
    CHECK(split5.labels[i].item<int64_t>() == row["label"].get<int64_t>());
    beyond += i >= 12;
  }
  CHECK(beyond > 0);  // 12 of 2,000 drawn uniformly are not the first 12
}

TEST_CASE("hostile manifests and options are refused with exit 2 before any allocation",
          "[e2e][cli]") {
  TempDir tmp;
  // A manifest asking for a billion experts: the field is named, nothing is built.
  std::filesystem::copy(trained_checkpoint(), tmp / "ckpt",
                        std::filesystem::copy_options::recursive);
  auto manifest = nlohmann::json::parse(read_text(tmp / "ckpt/model.json"));
  for (const auto& [field, value] :
       std::vector<std::pair<std::string, nlohmann::json>>{{"experts", 1000000000},
                                                           {"height", 1000000},
                                                           {"in_channels", 1e300},
                                                           {"num_classes", -5},
                                                           {"top_k", "many"}}) {
    auto m = manifest;
    m["architecture"][field] = value;
    { std::ofstream(tmp / "ckpt/model.json") << m.dump(); }
    auto r = run_shell("timeout 60 " + std::string(MOECERT_BINARY) + " info " + (tmp / "ckpt"));
    INFO(field << ": " << r.output);
    CHECK(r.code == 2);
    CHECK(r.output.find(field) != std::string::npos);
    CHECK(r.output.find("model.json") != std::string::npos);
  }
  { std::ofstream(tmp / "ckpt/model.json") << manifest.dump(); }
  // Options: sizes past their limits, and --samples that is not a count.
  for (const std::string& args :
       {"train --experts 1000000 --out " + (tmp / "x"), "train --top-k 100000 --out " + (tmp / "x"),
        "train --epochs 100000000 --out " + (tmp / "x"),
        "train --batch-size 1000000000 --out " + (tmp / "x"),
        "--samples -1 certify " + (tmp / "ckpt") + " --out " + (tmp / "c"),
        "--samples 0 attack " + (tmp / "ckpt"), "--samples many attack " + (tmp / "ckpt"),
        "attack " + (tmp / "ckpt") + " --square-queries 2000000000",
        "certify " + (tmp / "ckpt") + " --steps 100000000 --out " + (tmp / "c"),
        "certify " + (tmp / "ckpt") + " --shard 0/100000000 --out " + (tmp / "c")}) {
    auto r = run_shell("timeout 60 " + std::string(MOECERT_BINARY) + " " + args);
    INFO(args << ": " << r.output);
    CHECK(r.code == 2);
    CHECK(r.output.find("error") != std::string::npos);
  }
  // More threads than cores: capped with a warning, not refused, not hung.
  auto capped = run_shell("timeout 60 " + std::string(MOECERT_BINARY) +
                          " --threads 100000 --dataset synthetic --samples 4 --quiet certify " +
                          (tmp / "ckpt") +
                          " --estimator ibp --no-empirical --eps-grid 0.01 --out " + (tmp / "t"));
  INFO(capped.output);
  CHECK(capped.code == 0);
  CHECK(capped.output.find("warning: --threads 100000 is more than") != std::string::npos);
  // A model or batch that does not fit the memory budget: refused naming the size.
  auto small = run_shell("MOECERT_MEMORY_LIMIT=1M timeout 60 " + std::string(MOECERT_BINARY) +
                         " info " + (tmp / "ckpt"));
  INFO(small.output);
  CHECK(small.code == 2);
  CHECK(small.output.find("needs about") != std::string::npos);
  CHECK(small.output.find("MOECERT_MEMORY_LIMIT") != std::string::npos);
  auto batch = run_shell("MOECERT_MEMORY_LIMIT=64M timeout 60 " + std::string(MOECERT_BINARY) +
                         " --samples 4 attack " + (tmp / "ckpt") + " --batch-size 60000");
  INFO(batch.output);
  CHECK(batch.code == 2);
  CHECK(batch.output.find("--batch-size = 60000") != std::string::npos);
}
