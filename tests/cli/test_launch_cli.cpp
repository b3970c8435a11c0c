// The launchers of docs/distributed.md as users run them: scripts/slurm-env.sh under
// srun's variables, torchrun (Debian's python3-torch), and scripts/shard-run.sh
// sharding `certify` as an array job's or torchrun's tasks, merged.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "checkpoint_compare.h"
#include "cli/cli_fixtures.h"
#include "moecert/model_io.h"
#include "moecert/results.h"
#include "test_util.h"

using namespace moecert_test;

namespace {

const std::string kSource = MOECERT_SOURCE_DIR;

const char* kTrain =
    "--dataset synthetic --samples 256 --quiet train --experts 2 --epochs 1 --val-samples 64 "
    "--batch-size 32 --steps 1 --eval-steps 1 --optimizer sgd --lr 0.05 --out ";

}  // namespace

TEST_CASE("scripts/slurm-env.sh turns srun's variables into a group of two ranks",
          "[e2e][cli][training]") {
  TempDir dir;
  const int port = free_port();
  const std::string script = kSource + "/scripts/slurm-env.sh ";
  std::string cmd;
  for (int r = 0; r < 2; ++r)
    cmd += "(SLURM_PROCID=" + std::to_string(r) + " SLURM_LOCALID=" + std::to_string(r) +
           " SLURM_NTASKS=2 SLURM_TASKS_PER_NODE='2(x1)' SLURM_JOB_ID=7 MASTER_ADDR=127.0.0.1 "
           "MASTER_PORT=" +
           std::to_string(port) + " " + script + moecert_cmd(kTrain + (dir / "two")) + " > " +
           (dir / ("log" + std::to_string(r))) + " 2>&1; echo $? > " +
           (dir / ("rc" + std::to_string(r))) + ") & ";
  run_shell(cmd + "wait");
  INFO(read_text(dir / "log0") + read_text(dir / "log1"));
  CHECK(read_text(dir / "rc0") == "0\n");
  CHECK(read_text(dir / "rc1") == "0\n");
  CHECK(moecert::model_load(dir / "two", torch::kCPU).manifest.at("world_size") == 2);
  auto one = run_shell(moecert_cmd(kTrain + (dir / "one")));
  REQUIRE(one.code == 0);
  CHECK(max_relative_difference(dir / "one", dir / "two") <= 1e-5);

  auto outside = run_shell(script + "true");
  CHECK(outside.code == 2);
  CHECK(outside.output.find("SLURM_PROCID") != std::string::npos);
}

TEST_CASE("torchrun --no_python starts two ranks that train as one process does",
          "[e2e][cli][training]") {
  if (run_shell("command -v torchrun").code != 0) {
    WARN("torchrun (python3-torch) is not installed: skipped");
    return;
  }
  TempDir dir;
  // --redirects/--tee 2: Debian's torchrun on Python 3.11 fails on the default 0
  // (docs/distributed.md).
  auto two = run_shell(
      "torchrun --no_python --nproc_per_node=2 --redirects 2 --tee 2 "
      "--master_port " +
      std::to_string(free_port()) + " --log_dir " + (dir / "logs") + " " +
      moecert_cmd(kTrain + (dir / "two")));
  INFO(two.output);
  REQUIRE(two.code == 0);
  CHECK(moecert::model_load(dir / "two", torch::kCPU).manifest.at("world_size") == 2);
  auto one = run_shell(moecert_cmd(kTrain + (dir / "one")));
  REQUIRE(one.code == 0);
  CHECK(max_relative_difference(dir / "one", dir / "two") <= 1e-5);
}

TEST_CASE("scripts/shard-run.sh: array-job and torchrun-style shards merge into one run",
          "[e2e][cli][reports]") {
  TempDir dir;
  const std::string script = kSource + "/scripts/shard-run.sh ";
  const std::string certify = moecert_cmd("--samples 60 --quiet certify " + trained_checkpoint() +
                                          " --estimator ibp --eps-grid 0.01 --batch-size 20 ");
  // Three tasks of an array numbered from 5, and two torchrun-style ranks.
  for (int t = 5; t < 8; ++t) {
    auto r = run_shell("SLURM_ARRAY_TASK_ID=" + std::to_string(t) +
                       " SLURM_ARRAY_TASK_MIN=5 SLURM_ARRAY_TASK_COUNT=3 " + script +
                       (dir / "array") + " " + certify);
    INFO(r.output);
    REQUIRE(r.code == 0);
  }
  for (int r = 0; r < 2; ++r) {
    auto run = run_shell("RANK=" + std::to_string(r) + " WORLD_SIZE=2 " + script + (dir / "ranks") +
                         " " + certify);
    INFO(run.output);
    REQUIRE(run.code == 0);
  }
  auto whole = run_shell(certify + "--out " + (dir / "whole"));
  REQUIRE(whole.code == 0);
  const auto expected = results_comparable(dir / "whole/results.json");
  for (const std::string kind : {"array", "ranks"}) {
    auto merged = run_shell(moecert_cmd("merge " + (dir / kind) + "/shard-*/results.json --out " +
                                        (dir / (kind + ".json"))));
    INFO(merged.output);
    REQUIRE(merged.code == 0);
    CHECK(moecert::Results::read(dir / (kind + ".json")).rows.size() == 60);
    CHECK(results_comparable(dir / (kind + ".json")) == expected);
  }
  // attack: the same over ranks, merged into what one run reports (timings aside).
  const std::string attack = moecert_cmd("--samples 50 --quiet attack " + trained_checkpoint() +
                                         " --eps 0.05 --apgd-steps 5 --square-queries 20 "
                                         "--min-norm-steps 5 --batch-size 20 ");
  for (int r = 0; r < 2; ++r) {
    auto run = run_shell("RANK=" + std::to_string(r) + " WORLD_SIZE=2 " + script +
                         (dir / "attack") + " " + attack);
    INFO(run.output);
    REQUIRE(run.code == 0);
  }
  REQUIRE(run_shell(attack + "--json " + (dir / "attack-whole.json")).code == 0);
  auto merged = run_shell(
      moecert_cmd("merge " + (dir / "attack") + "/shard-*.json --out " + (dir / "attack.json")));
  INFO(merged.output);
  REQUIRE(merged.code == 0);
  auto timeless = [](const std::string& path) {
    auto j = nlohmann::json::parse(read_text(path));
    for (const char* k : {"seconds", "merged_from"}) j.erase(k);
    for (auto& run : j["runs"]) run.erase("seconds");
    return j;
  };
  const auto attack_whole = timeless(dir / "attack-whole.json");
  CHECK(attack_whole.at("rows").size() == 50);
  CHECK(timeless(dir / "attack.json") == attack_whole);
  // Shards of other settings, or overlapping ones, are refused.
  auto twice =
      run_shell(moecert_cmd("merge " + (dir / "attack/shard-0-of-2.json") + " " +
                            (dir / "attack/shard-0-of-2.json") + " --out " + (dir / "bad.json")));
  CHECK(twice.code == 2);
  CHECK(twice.output.find("in two shards") != std::string::npos);

  auto no_task = run_shell(script + (dir / "x") + " " + certify);
  CHECK(no_task.code == 2);
  CHECK(no_task.output.find("RANK") != std::string::npos);
}
