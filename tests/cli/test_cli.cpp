// End-to-end: the moecert binary, its exit codes and its files.
#include <catch2/catch.hpp>
#include <cmath>
#include <nlohmann/json.hpp>

#include "cli/cli_fixtures.h"
#include "moecert/results.h"
#include "test_util.h"

using moecert_test::read_text;
using moecert_test::run_moecert;
using moecert_test::run_shell;
using moecert_test::TempDir;
using moecert_test::trained_checkpoint;

namespace {

const char* kFashion = "/usr/share/datasets/fashion-mnist";

}  // namespace

TEST_CASE("train, info and attack --json work end to end", "[e2e][cli]") {
  const auto& ckpt = trained_checkpoint();
  auto info = run_moecert("info " + ckpt);
  INFO(info.output);
  CHECK(info.code == 0);
  CHECK(info.output.find("MoE E=2 cnn-s experts") != std::string::npos);
  CHECK(info.output.find("sha256") != std::string::npos);

  TempDir tmp;
  auto r = run_moecert("--dataset synthetic --samples 200 --quiet attack " + ckpt +
                       " --suite pgd --eps 0.1 --steps 5 --json " + (tmp / "a.json"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("RA-E") != std::string::npos);
  auto j = nlohmann::json::parse(read_text(tmp / "a.json"));
  for (const char* key : {"sa", "ra", "ra_e", "ra_r"}) {
    REQUIRE(j.contains(key));
    CHECK(j[key].get<double>() >= 0.0);
    CHECK(j[key].get<double>() <= 1.0);
  }
  CHECK(j["eps"] == 0.1);
  CHECK(j["norm"] == "inf");
  CHECK(j["steps"] == 5);
  CHECK(j["samples"] == 200);
  CHECK(j["ra"].get<double>() <= j["sa"].get<double>());
}

TEST_CASE("attack --suite standard: per-sample JSON, adversarial examples PyTorch opens",
          "[e2e][cli]") {
  const auto& ckpt = trained_checkpoint();
  TempDir tmp;
  const std::string common =
      "--dataset synthetic --samples 40 --quiet attack " + ckpt + " --eps 0.1 ";
  auto pgd =
      run_moecert(common + "--suite pgd --steps 20 --no-components --json " + (tmp / "pgd.json"));
  auto r = run_moecert(common + "--square-queries 300 --json " + (tmp / "s.json") + " --save-adv " +
                       (tmp / "adv.pt"));
  INFO(r.output);
  REQUIRE(pgd.code == 0);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("broken by: apgd-ce") != std::string::npos);
  auto j = nlohmann::json::parse(read_text(tmp / "s.json"));
  auto p = nlohmann::json::parse(read_text(tmp / "pgd.json"));
  CHECK(j["suite"] == "standard");
  CHECK(j["ra"].get<double>() <= p["ra"].get<double>());  // at least as strong as PGD-20
  REQUIRE(j["rows"].size() == 40);
  int robust = 0;
  for (const auto& row : j["rows"]) {
    if (row["robust"].get<bool>()) {
      ++robust;
      CHECK(row["broken_by"].is_null());
      CHECK(row["norm"] == 0.0);
    } else if (row["clean_correct"].get<bool>()) {
      CHECK(row["broken_by"].is_string());
      CHECK(row["norm"].get<double>() > 0.0);
      CHECK(row["norm"].get<double>() <= 0.1 + 1e-6);
    } else {
      CHECK(row["broken_by"] == "clean");
    }
  }
  CHECK(robust == static_cast<int>(std::lround(j["ra"].get<double>() * 40)));
  int64_t broken = 0;
  for (const auto& run : j["runs"]) broken += run["broken"].get<int64_t>();
  CHECK(broken ==
        static_cast<int64_t>(std::lround((j["sa"].get<double>() - j["ra"].get<double>()) * 40)));
  CHECK(run_moecert(common + "--suite autoattack").code == 2);
  CHECK(run_moecert(common + "--square-queries 0").code == 2);
  if (run_shell("/usr/bin/python3 -c 'import torch'").code != 0) {
    WARN("python3-torch is not installed; skipping the torch.load check");
    return;
  }
  auto py = run_shell(
      "/usr/bin/python3 -c \"import torch; d = torch.load('" + (tmp / "adv.pt") +
      "'); x = d['x_adv']; assert x.shape == (40, 1, 28, 28), x.shape; "
      "assert d['label'].shape == (40,) and d['robust'].dtype == torch.bool; "
      "assert float(x.min()) >= 0 and float(x.max()) <= 1; print('ok', int(d['robust'].sum()))\"");
  INFO(py.output);
  CHECK(py.code == 0);
  CHECK(py.output.find("ok " + std::to_string(robust)) != std::string::npos);
}

TEST_CASE("a corrupt checkpoint is exit code 2 naming the problem", "[e2e][cli]") {
  TempDir tmp;
  REQUIRE(run_shell("cp -r " + trained_checkpoint() + " " + (tmp / "c")).code == 0);
  REQUIRE(run_shell("truncate -s 1000 " + (tmp / "c/weights.pt")).code == 0);
  auto r = run_moecert("attack " + (tmp / "c"));
  CHECK(r.code == 2);
  CHECK(r.output.find("SHA-256") != std::string::npos);
  auto missing = run_moecert("info " + (tmp / "nowhere"));
  CHECK(missing.code == 2);
  CHECK(missing.output.find("nowhere") != std::string::npos);
}

TEST_CASE("a truncated IDX file is exit code 2 naming the file", "[e2e][cli]") {
  TempDir tmp;
  const std::string d = tmp.path();
  REQUIRE(run_shell("zcat " + std::string(kFashion) +
                    "/t10k-images-idx3-ubyte.gz | head -c 100000 | gzip > " + d +
                    "/t10k-images-idx3-ubyte.gz && cp " + kFashion + "/t10k-labels-idx1-ubyte.gz " +
                    d)
              .code == 0);
  auto r = run_moecert("--dataset fashion-mnist --data " + d + " attack " + trained_checkpoint());
  CHECK(r.code == 2);
  CHECK(r.output.find("t10k-images-idx3-ubyte.gz") != std::string::npos);
  CHECK(r.output.find("truncated") != std::string::npos);
}

TEST_CASE("a wrong-shape input is exit code 2 naming the shapes", "[e2e][cli]") {
  TempDir tmp;
  // Two CIFAR-10 records (label 0, black 3x32x32 image) against a 1x28x28 model.
  REQUIRE(run_shell("head -c 6146 /dev/zero > " + (tmp / "test_batch.bin")).code == 0);
  auto r =
      run_moecert("--dataset cifar10 --data " + tmp.path() + " attack " + trained_checkpoint());
  CHECK(r.code == 2);
  CHECK(r.output.find("expected shape [B, 1, 28, 28]") != std::string::npos);
}

TEST_CASE("bad options are exit code 2", "[e2e][cli]") {
  TempDir tmp;
  CHECK(run_moecert("train --out " + (tmp / "x") + " --method bogus").code == 2);
  CHECK(run_moecert("attack " + trained_checkpoint() + " --norm 3").code == 2);
  CHECK(run_moecert("frobnicate").code == 2);
  auto jac = run_moecert("certify " + trained_checkpoint() +
                         " --jacobian exact --no-empirical --out " + (tmp / "jac"));
  CHECK(jac.code == 2);
  CHECK(jac.output.find("--jacobian") != std::string::npos);
  CHECK(run_moecert("--help").code == 0);
  auto exists = run_moecert("--dataset synthetic train --out " + trained_checkpoint());
  CHECK(exists.code == 2);
  CHECK(exists.output.find("--resume") != std::string::npos);
}

TEST_CASE("a killed training run resumes from its last epoch", "[e2e][cli]") {
  TempDir tmp;
  const std::string args =
      "--dataset synthetic --samples 1500 --quiet train --experts 2 --epochs 8 "
      "--val-samples 100 --steps 3 --eval-steps 1 --out " +
      (tmp / "run");
  // Start, wait for the first checkpoint, then SIGKILL the process mid-run.
  auto killed = run_shell("(" + std::string(MOECERT_BINARY) + " " + args + " & pid=$!; " +
                          "while [ ! -f " + (tmp / "run/model.json") + " ]; do sleep 0.05; done; " +
                          "sleep 0.3; kill -9 $pid; wait $pid; echo exit=$?)");
  INFO(killed.output);
  REQUIRE(killed.output.find("exit=137") != std::string::npos);
  auto manifest = nlohmann::json::parse(read_text(tmp / "run/model.json"));
  const int saved = manifest["metrics"]["epochs_done"];
  REQUIRE(saved >= 1);
  REQUIRE(saved < 8);
  auto resumed = run_moecert(args + " --resume");
  INFO(resumed.output);
  CHECK(resumed.code == 0);
  CHECK(resumed.output.find("after epoch " + std::to_string(saved)) != std::string::npos);
  auto done = nlohmann::json::parse(read_text(tmp / "run/model.json"));
  CHECK(done["metrics"]["epochs_done"] == 8);
  CHECK(done["metrics"]["history"].size() == 8);
}

TEST_CASE("weights.pt opens in PyTorch with the registered names", "[e2e][cli]") {
  if (run_shell("/usr/bin/python3 -c 'import torch'").code != 0) {
    WARN("python3-torch is not installed; skipping the torch.jit.load check");
    return;
  }
  auto r =
      run_shell("/usr/bin/python3 -c \"import torch; m = torch.jit.load('" + trained_checkpoint() +
                "/weights.pt'); names = dict(m.named_parameters()); "
                "print(sorted(names)); assert 'router.fc.weight' in names; "
                "assert names['experts.1.fc2.weight'].shape == (10, 128); print('ok')\"");
  INFO(r.output);
  CHECK(r.code == 0);
  CHECK(r.output.find("ok") != std::string::npos);
}

TEST_CASE("dual combines two checkpoints and attack sweeps alpha", "[e2e][cli]") {
  TempDir tmp;
  auto made = run_moecert("dual --standard " + trained_checkpoint() + " --robust " +
                          trained_checkpoint() + " --alpha 0.7 --out " + (tmp / "dual"));
  INFO(made.output);
  REQUIRE(made.code == 0);
  auto info = run_moecert("info " + (tmp / "dual"));
  CHECK(info.code == 0);
  CHECK(info.output.find("dual-model alpha=0.700") != std::string::npos);
  auto r = run_moecert("--dataset synthetic --samples 100 --quiet attack " + (tmp / "dual") +
                       " --suite pgd --steps 2 --alpha-sweep --json " + (tmp / "sweep.json"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  auto j = nlohmann::json::parse(read_text(tmp / "sweep.json"));
  CHECK(j["alpha"] == 0.7);
  REQUIRE(j["alpha_sweep"].size() == 6);
  CHECK(j["alpha_sweep"][0]["alpha"] == 0.5);
  CHECK(j["alpha_sweep"][5]["alpha"] == 1.0);
  // Both members are the same model here, so every alpha gives the same SA.
  for (const auto& row : j["alpha_sweep"]) CHECK(row["sa"] == j["sa"]);
  CHECK(run_moecert("dual --standard " + trained_checkpoint() + " --robust " +
                    trained_checkpoint() + " --alpha 1.5 --out " + (tmp / "bad"))
            .code == 2);
  CHECK(run_moecert("attack " + trained_checkpoint() + " --alpha-sweep").code == 2);
}

TEST_CASE("train --method jtdmoe writes a dual-model checkpoint", "[e2e][cli]") {
  TempDir tmp;
  auto r = run_moecert(
      "--dataset synthetic --samples 400 --quiet train --method jtdmoe --experts 2 "
      "--epochs 1 --val-samples 64 --steps 1 --eval-steps 1 --alpha 0.9 "
      "--init-robust " +
      trained_checkpoint() + " --out " + (tmp / "jtd"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  auto info = run_moecert("info " + (tmp / "jtd"));
  CHECK(info.output.find("dual-model alpha=0.900") != std::string::npos);
  auto resumed = run_moecert(
      "--dataset synthetic --samples 400 --quiet train --method jtdmoe --experts 2 "
      "--epochs 2 --val-samples 64 --steps 1 --eval-steps 1 --resume --out " +
      (tmp / "jtd"));
  INFO(resumed.output);
  CHECK(resumed.code == 0);
  CHECK(resumed.output.find("after epoch 1") != std::string::npos);
}

TEST_CASE("train --arch moe-cnn --method advmoe: defaults of paper 2 and a loadable checkpoint",
          "[e2e][cli]") {
  TempDir tmp;
  auto r = run_moecert(
      "--dataset synthetic --samples 300 train --arch moe-cnn --method advmoe "
      "--epochs 1 --val-samples 50 --eval-steps 2 --log-every 1 --out " +
      (tmp / "m"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("training attack PGD-2 ") != std::string::npos);  // paper 2: 2 steps
  auto manifest = nlohmann::json::parse(read_text(tmp / "m/model.json"));
  CHECK(manifest["architecture"]["kind"] == "moe-cnn");
  CHECK(manifest["architecture"]["experts"] == 2);  // N = 2 unless --experts says otherwise
  CHECK(manifest["architecture"]["scale"] == 0.5);
  CHECK(manifest["training"]["method"] == "advmoe");
  auto info = run_moecert("info " + (tmp / "m"));
  CHECK(info.output.find("MoE-CNN cnn-s with N=2 channel groups") != std::string::npos);
  auto a = run_moecert("--dataset synthetic --samples 64 --quiet attack " + (tmp / "m") +
                       " --suite pgd --steps 2");
  INFO(a.output);
  CHECK(a.code == 0);
  CHECK(a.output.find("RA-R") != std::string::npos);

  auto bad = run_moecert(
      "--dataset synthetic --samples 64 train --arch moe-cnn --routing soft "
      "--epochs 1 --out " +
      (tmp / "b"));
  CHECK(bad.code == 2);
  CHECK(bad.output.find("top-1") != std::string::npos);
  auto bad_arch = run_moecert(
      "--dataset synthetic --samples 64 train --arch moe-vit --epochs 1 "
      "--out " +
      (tmp / "b"));
  CHECK(bad_arch.code == 2);
  CHECK(bad_arch.output.find("--arch") != std::string::npos);
}

TEST_CASE(
    "train --method ibp / crown-ibp / st names what a step trains against, progress shows eps and "
    "kappa",
    "[e2e][cli]") {
  TempDir tmp;
  for (std::string method : {"ibp", "crown-ibp"}) {
    auto r = run_moecert(
        "--dataset synthetic --samples 300 train --method " + method +
        " --experts 2 --epochs 2 --val-samples 50 --eval-steps 1 --log-every 1 --eps 0.1"
        " --train-eps 0.05 --kappa-end 0.7 --out " +
        (tmp / method));
    INFO(r.output);
    REQUIRE(r.code == 0);
    const std::string bound = method == "ibp" ? "IBP" : "CROWN-IBP";
    CHECK(r.output.find("training bound " + bound + " Linf eps 0 -> 0.0500, kappa 1.00 -> 0.70") !=
          std::string::npos);
    CHECK(r.output.find("training attack") == std::string::npos);          // no attack trains it
    CHECK(r.output.find("eps 0.0000  kappa 1.000") != std::string::npos);  // the warm-up
    CHECK(r.output.find("eps 0.0500  kappa 0.700") != std::string::npos);  // after the ramp
    CHECK((r.output.find("beta 0.000") != std::string::npos) == (method == "crown-ibp"));
  }
  auto st = run_moecert(
      "--dataset synthetic --samples 300 train --method st --experts 2 --epochs 1 "
      "--val-samples 50 --eval-steps 1 --out " +
      (tmp / "st"));
  INFO(st.output);
  REQUIRE(st.code == 0);
  CHECK(st.output.find("; no training attack") != std::string::npos);
}

TEST_CASE("certify writes results.json with the documented fields, lipschitz prints the table",
          "[e2e][cli][certify]") {
  const auto& ckpt = trained_checkpoint();
  TempDir tmp;
  auto r = run_moecert("--dataset synthetic --samples 12 --quiet certify " + ckpt +
                       " --steps 5 --eps-grid 0.001,0.01 --out " + (tmp / "c"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("soundness violations: 0") != std::string::npos);
  auto j = nlohmann::json::parse(read_text(tmp / "c/results.json"));
  CHECK(j["schema"] == moecert::results_schema_name(moecert::results_schema_version));
  CHECK(j["config"]["domain"]["box"] == true);
  CHECK(j["config"]["float32"] == true);
  CHECK(j["config"]["estimators"].size() == 6);  // the default: all
  CHECK(j["norm"] == "inf");
  CHECK(j["checkpoint"] == ckpt);
  CHECK(j["fingerprint"]["weights_sha256"].get<std::string>().size() == 64);
  REQUIRE(j["rows"].size() == 12);
  const auto& row = j["rows"][3];
  CHECK(row["index"] == 3);
  for (const char* key : {"label", "pred", "radii", "empirical_radius", "router_weights", "margin"})
    CHECK(row.contains(key));
  for (const char* form :
       {"thm54_paper_global", "thm54_tight_global", "thm54_candidate_global", "thm54_paper_local",
        "thm54_tight_local", "thm54_candidate_local", "candidate_ibp", "candidate_crown-ibp",
        "candidate_crown", "candidate_alpha-crown"})
    CHECK(row["radii"].contains(form));
  // The headline is the best sound radius of the row, named by form and estimator.
  double best = 0;
  for (const auto& [form, v] : row["radii"].items()) best = std::max(best, v.get<double>());
  CHECK(row["headline"]["radius"].get<double>() == best);
  CHECK(row["radii"][row["headline"]["form"].get<std::string>()].get<double>() == best);
  CHECK(j["aggregates"]["headline"]["certified_accuracy"].contains("0.01"));
  CHECK(j["aggregates"]["violations"].is_array());
  CHECK(j["aggregates"]["violations"].empty());
  CHECK(j["aggregates"]["certified_accuracy"]["thm54_candidate_local"].contains("0.01"));
  CHECK(j["config"]["input_planes"] == true);

  // --no-input-planes: chords for every ReLU, recorded; the CROWN radii do not grow.
  double sum[2] = {0, 0};
  for (int planes = 0; planes < 2; ++planes) {
    const std::string dir = tmp / (planes ? "planes" : "chords");
    auto run = run_moecert("--dataset synthetic --samples 12 --quiet certify " + ckpt +
                           " --estimator crown --no-empirical --eps-grid 0.001,0.01" +
                           (planes ? "" : " --no-input-planes") + " --out " + dir);
    INFO(run.output);
    REQUIRE(run.code == 0);
    auto jr = nlohmann::json::parse(read_text(dir + "/results.json"));
    CHECK(jr["config"]["input_planes"] == (planes == 1));
    for (const auto& row : jr["rows"]) sum[planes] += row["radii"]["candidate_crown"].get<double>();
  }
  CHECK(sum[0] <= sum[1] + 1e-9);

  auto bad = run_moecert("--dataset synthetic --samples 4 certify " + ckpt +
                         " --eps-grid 0.01,abc --out " + (tmp / "b"));
  CHECK(bad.code == 2);
  CHECK(bad.output.find("--eps-grid") != std::string::npos);
  auto bad_est = run_moecert("--dataset synthetic --samples 4 certify " + ckpt +
                             " --estimator crown,exact --out " + (tmp / "b"));
  CHECK(bad_est.code == 2);
  CHECK(bad_est.output.find("--estimator") != std::string::npos);
  auto bad_shard = run_moecert("--dataset synthetic --samples 4 certify " + ckpt +
                               " --shard 3/3 --out " + (tmp / "b"));
  CHECK(bad_shard.code == 2);

  auto l = run_moecert("--dataset synthetic lipschitz " + ckpt + " --points 8 --eps 0.01");
  INFO(l.output);
  REQUIRE(l.code == 0);
  for (const char* s : {"router", "expert 0", "expert 1", "global", "local@0.010", "not a bound"})
    CHECK(l.output.find(s) != std::string::npos);
}

TEST_CASE("certify a dual-model end to end: Theorem 5.5 radii, sound, eps_b independent of F_S",
          "[e2e][cli][certify]") {
  TempDir tmp;
  // One robust member F_R and two differently trained standard members F_S.
  const std::string data = "--dataset synthetic --samples 1000 --quiet ";
  for (const std::string& cmd :
       {data +
            "train --method at --experts 2 --epochs 8 --steps 2 --eps 0.03 --val-samples 64 "
            "--eval-steps 1 --out " +
            (tmp / "robust"),
        data +
            "--seed 7 train --method st --experts 2 --epochs 3 --val-samples 64 --eval-steps 1 "
            "--out " +
            (tmp / "st-a"),
        data +
            "--seed 8 train --method st --experts 2 --epochs 2 --val-samples 64 --eval-steps 1 "
            "--out " +
            (tmp / "st-b")}) {
    auto r = run_moecert(cmd);
    INFO(r.output);
    REQUIRE(r.code == 0);
  }
  for (const std::string name : {"a", "b"}) {
    REQUIRE(run_moecert("dual --standard " + (tmp / ("st-" + name)) + " --robust " +
                        (tmp / "robust") + " --alpha 0.8 --out " + (tmp / ("dual-" + name)))
                .code == 0);
    auto r = run_moecert(
        "--dataset synthetic --samples 24 --quiet certify " + (tmp / ("dual-" + name)) +
        " --estimator lipschitz,crown --jacobian interval --steps 5 --bisect-steps 20 --eps-grid "
        "0.001,0.01 --out " +
        (tmp / ("c-" + name)));
    INFO(r.output);
    REQUIRE(r.code == 0);
    CHECK(r.output.find("soundness violations: 0") != std::string::npos);
  }
  auto ja = nlohmann::json::parse(read_text(tmp / "c-a/results.json"));
  auto jb = nlohmann::json::parse(read_text(tmp / "c-b/results.json"));
  CHECK(ja["kind"] == "dual");
  CHECK(ja["alpha"] == 0.8);
  CHECK(ja["constants_global"].contains("standard"));
  CHECK(ja["constants_global"].contains("robust"));
  CHECK(ja["aggregates"]["violations"].empty());
  REQUIRE(ja["rows"].size() == 24);
  REQUIRE(jb["rows"].size() == 24);
  int eps_b_positive = 0, dual_bp_positive = 0, correct = 0;
  for (size_t i = 0; i < 24; ++i) {
    const auto& row = ja["rows"][i];
    if (row["label"] == row["pred"]) ++correct;
    const auto& radii = row["radii"];
    for (const std::string est : {"global", "local"}) {
      const double a = radii["thm55_a_" + est], b = radii["thm55_b_" + est];
      CHECK(radii["thm55_" + est].get<double>() == std::max(a, b));
      CHECK(radii["thm55_tight_" + est].get<double>() >= std::max(a, b));
      CHECK(radii["thm55_tight_" + est].get<double>() <= row["empirical_radius"].get<double>());
      // ε_b is a property of F_R and α alone: another F_S gives it again, bit for bit
      // with global constants. A local radius is a bisection whose probes are shared
      // with the other forms (any certifying probe counts), so it may differ within the
      // bisection gap, (hi - lo) / 2^20 here.
      if (est == "global")
        CHECK(jb["rows"][i]["radii"]["thm55_b_" + est].get<double>() == b);
      else
        CHECK(jb["rows"][i]["radii"]["thm55_b_" + est].get<double>() == Approx(b).margin(1e-7));
    }
    if (radii["thm55_b_local"].get<double>() > 0) ++eps_b_positive;
    // The bound-propagation dual form, (1 − α)·max(−1, LB_S) + α·LB_R, cross-checked like
    // the others (no violations above); the headline is the best of all of them.
    if (radii["dual_crown"].get<double>() > 0) ++dual_bp_positive;
    CHECK(row["headline"]["radius"].get<double>() >= radii["dual_crown"].get<double>());
    CHECK(row["headline"]["radius"].get<double>() >= radii["thm55_tight_local"].get<double>());
  }
  CHECK(correct >= 18);
  CHECK(eps_b_positive >= correct / 2);  // the comparison above is not between zeros
  CHECK(dual_bp_positive >= correct / 2);
}

TEST_CASE("certify --bab: a verdict per sample and eps, the bab radius, gates on verdicts",
          "[e2e][cli][certify]") {
  const auto& ckpt = trained_checkpoint();
  TempDir tmp;
  auto r = run_moecert("--dataset synthetic --samples 10 certify " + ckpt +
                       " --estimator crown --bab --timeout-per-sample 3 --bab-batch 8 --bab-fsb 4"
                       " --bab-row-carry 2.5 --bab-steps 3 --steps 5 --eps-grid 0.01,0.05,0.2 "
                       "--gate 'unknown@0.2<=1'"
                       " --gate 'verified_acc@0.01>=0'"
                       " --out " +
                       (tmp / "c"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("soundness violations: 0") != std::string::npos);
  auto j = nlohmann::json::parse(read_text(tmp / "c/results.json"));
  CHECK(j["config"]["estimators"] == nlohmann::json({"crown", "bab"}));
  CHECK(j["config"]["bab"]["timeout_per_sample"] == 3.0);
  CHECK(j["config"]["bab"]["fsb"] == 4);
  CHECK(j["config"]["bab"]["warm_start"] == true);
  CHECK(j["config"]["bab"]["row_carry"] == 2.5);
  CHECK(j["config"]["bab"]["steps"] == 3);
  int decided = 0, searched = 0;
  for (const auto& row : j["rows"]) {
    REQUIRE(row["radii"].contains("candidate_bab"));
    const double r_bab = row["radii"]["candidate_bab"].get<double>();
    const double r_crown = row["radii"]["candidate_crown"].get<double>();
    if (!row["correct"].get<bool>()) {
      CHECK(r_bab == 0);
      continue;
    }
    REQUIRE(row.contains("bab"));
    CHECK(row["bab"]["subproblems"].get<int64_t>() >= 0);
    for (const auto& s : row["bab"]["searches"]) {  // a route split makes subproblems
      CHECK(s["route_splits"].get<int64_t>() >= 0);
      CHECK(s["route_splits"].get<int64_t>() <= s["subproblems"].get<int64_t>());
      CHECK(s["screened"].get<int64_t>() >= 0);
      CHECK(s["carried"].get<int64_t>() == 0);  // a top-1 MoE: no mixture experts to carry
      CHECK_FALSE(s.contains("open_program"));  // nor a mixture's program
      // Its course, ending at its outcome, when it ran rounds of splits (a top-1 MoE's
      // search bounds more than its root only in rounds).
      REQUIRE(s.contains("trace") == (s["subproblems"].get<int64_t>() > 1));
      if (s.contains("trace")) {
        const auto& t = s["trace"];
        REQUIRE_FALSE(t.empty());
        CHECK(t.size() <= 32);
        for (size_t i = 1; i < t.size(); ++i)
          CHECK(t[i]["subproblems"].get<int64_t>() > t[i - 1]["subproblems"].get<int64_t>());
        CHECK(t.back()["subproblems"] == s["subproblems"]);
        CHECK(t.back()["verified_share"] == s["verified_share"]);
        CHECK(t.back()["worst_slack"] == s["worst_slack"]);
        CHECK(t.back()["seconds"] == s["seconds"]);
      }
      // The root's share of the search's time, and how far an open search is from closing:
      // none open when verified, an open subproblem (slack <= 0) when unknown.
      CHECK(s["root_seconds"].get<double>() >= 0);
      CHECK(s["root_seconds"].get<double>() <= s["seconds"].get<double>());
      if (s["verdict"] == "verified") CHECK(s["worst_slack"].is_null());
      // A counterexample names what found it.
      REQUIRE(s.contains("found_by") == (s["verdict"] == "falsified"));
      if (s.contains("found_by")) {
        const auto by = s["found_by"].get<std::string>();
        CHECK((by.rfind("attack round ", 0) == 0 || by == "bound minimiser"));
      }
      if (s["verdict"] == "unknown") {
        REQUIRE(s["worst_slack"].is_number());
        CHECK(s["worst_slack"].get<double>() <= 0);
      }
      ++searched;
    }
    for (const char* eps : {"0.01", "0.05", "0.2"}) {
      const std::string v = row["bab"]["verdicts"][eps].get<std::string>();
      const double e = std::stod(eps);
      CHECK((v == "verified" || v == "falsified" || v == "unknown"));
      CHECK((v == "verified") == (r_bab >= e));
      if (r_crown >= e) CHECK(v == "verified");  // what CROWN proves needs no search
      if (v == "falsified") CHECK(row["empirical_radius"].get<double>() <= e);
      decided += v != "unknown";
    }
  }
  CHECK(decided > 0);
  CHECK(searched > 0);
  auto gated = run_moecert("--dataset synthetic --samples 4 certify " + ckpt +
                           " --estimator crown --bab --timeout-per-sample 1 --steps 5"
                           " --eps-grid 0.2 --gate 'unknown@0.2<-1' --out " +
                           (tmp / "g"));
  CHECK(gated.code == 1);
  for (const char* bad :
       {"--bab-split sideways", "--timeout-per-sample 0", "--bab-batch 1",
        "--bab-intermediate-steps -1", "--bab-steps -1", "--bab-steps 1001", "--bab-bisect 61",
        "--bab-fsb 65", "--bab-row-carry -1", "--bab-row-carry nan", "--estimator crown,babel"}) {
    auto b = run_moecert("--dataset synthetic --samples 2 certify " + ckpt + " --bab " + bad +
                         " --out " + (tmp / "b"));
    INFO(bad << ": " << b.output);
    CHECK(b.code == 2);
  }
}

// --bab-bisect: the bab radius is verified by a search (or another estimator), lies at or
// above the largest verified grid eps and below the first grid eps not verified and the
// empirical radius, the cross-check finds no attack inside it, and the bisection goes
// beyond CROWN's radius somewhere.
TEST_CASE("certify --bab-bisect: a verified radius between the grid's points",
          "[e2e][cli][certify]") {
  const auto& ckpt = trained_checkpoint();
  TempDir tmp;
  auto r = run_moecert("--dataset synthetic --samples 10 certify " + ckpt +
                       " --estimator crown --bab --bab-bisect 5 --timeout-per-sample 20"
                       " --bab-batch 8 --steps 5 --eps-grid 0.002,0.3 --out " +
                       (tmp / "c"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("soundness violations: 0") != std::string::npos);
  auto j = nlohmann::json::parse(read_text(tmp / "c/results.json"));
  CHECK(j["config"]["bab"]["bisect"] == 5);
  int raised = 0, bisections = 0;
  for (const auto& row : j["rows"]) {
    if (!row["correct"].get<bool>()) continue;
    const double r_bab = row["radii"]["candidate_bab"].get<double>();
    double other = 0, first_open = 1e9;
    for (const auto& [key, value] : row["radii"].items())
      if (key != "candidate_bab") other = std::max(other, value.get<double>());
    double best_verified = other;
    for (const auto& s : row["bab"]["searches"]) {
      bisections += s["bisect"].get<bool>();
      if (s["verdict"] == "verified")
        best_verified = std::max(best_verified, s["eps"].get<double>());
    }
    for (const char* eps : {"0.002", "0.3"}) {
      const double e = std::stod(eps);
      if (row["bab"]["verdicts"][eps] == "verified")
        CHECK(r_bab >= e);
      else
        first_open = std::min(first_open, e);
    }
    CHECK(r_bab == best_verified);  // a radius some search (or another estimator) proved
    CHECK(r_bab < first_open);
    CHECK(r_bab <= row["empirical_radius"].get<double>());
    raised += r_bab > other;
  }
  CHECK(bisections > 0);
  CHECK(raised > 0);  // the bisection verified beyond what CROWN certifies
}
