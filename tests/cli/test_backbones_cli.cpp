// End-to-end: train, attack and certify run with the papers' CIFAR backbones (WRN,
// VGG, DenseNet-BC, ViT; ResNet-20 as paper 2's router) on CIFAR-shaped data, with the
// papers' augmentations; the help lists every registered backbone and data set.
#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include "moecert/backbones.h"
#include "moecert/data.h"
#include "test_util.h"

using moecert_test::read_text;
using moecert_test::run_moecert;
using moecert_test::TempDir;

TEST_CASE("train / attack / certify with WRN, VGG and DenseNet-BC MoEs on CIFAR-shaped data",
          "[e2e][cli][backbones]") {
  struct Arch {
    const char* expert;
    const char* flags;
  };
  const Arch archs[] = {
      {"wrn-10-1", "--arch moe-cnn --experts 2 --scale 0.25 --router resnet20"},
      {"vgg11-bn", "--arch moe-cnn --experts 2 --scale 0.0625 --router linear"},
      {"densenet-bc-10-2", "--arch moe --experts 2 --router cnn"},
      {"vit-1-16-2-p8", "--arch moe --experts 2 --router linear"},
  };
  for (const auto& a : archs) {
    INFO(a.expert);
    TempDir tmp;
    const std::string data = "--dataset synthetic-cifar --quiet ";
    auto t = run_moecert(data + "--samples 96 train --expert " + a.expert + " " + a.flags +
                         " --epochs 1 --batch-size 32 --method at --steps 1 --val-samples 16 "
                         "--eval-steps 1 --crop-pad 4 --flip --out " +
                         (tmp / "m"));
    INFO(t.output);
    REQUIRE(t.code == 0);
    auto manifest = nlohmann::json::parse(read_text(tmp / "m/model.json"));
    CHECK(manifest["architecture"]["expert"] == a.expert);
    CHECK(manifest["architecture"]["in_channels"] == 3);
    CHECK(manifest["training"]["augment"]["crop_pad"] == 4);
    if (std::string(a.flags).find("moe-cnn") != std::string::npos)  // paper 2's layout by default
      CHECK(manifest["architecture"]["batch_norm"] == "shared");
    auto at = run_moecert(data + "--samples 6 attack " + (tmp / "m") +
                          " --suite pgd --steps 3 --no-components --json " + (tmp / "a.json"));
    INFO(at.output);
    CHECK(at.code == 0);
    // CROWN's per-unit walks on a 32×32 convolutional path take minutes per correctly
    // classified sample on 2 cores (docs/results.md): CROWN-IBP walks the same rules' lines.
    const bool vit = std::string(a.expert).rfind("vit", 0) == 0;
    auto c = run_moecert(data + "--samples 2 certify " + (tmp / "m") + " --estimator ibp," +
                         (vit ? "crown" : "crown-ibp") + " --steps 3 --eps-grid 0.0005 --out " +
                         (tmp / "c"));
    INFO(c.output);
    CHECK(c.code == 0);
    CHECK(c.output.find("soundness violations: 0") != std::string::npos);
    if (vit) {
      CHECK(c.output.find("no linear relaxation") == std::string::npos);  // CROWN relaxes all
      // The default estimators: the local one (Jacobian bounds) is left out, by name.
      auto d = run_moecert(data + "--samples 1 certify " + (tmp / "m") +
                           " --steps 3 --eps-grid 0.0005 --no-empirical --out " + (tmp / "d"));
      INFO(d.output);
      CHECK(d.code == 0);
      CHECK(d.output.find("local estimator needs Jacobian bounds, which layernorm") !=
            std::string::npos);
    }
  }
}

TEST_CASE("train --help lists every registered backbone, method and data set",
          "[e2e][cli][backbones]") {
  auto h = run_moecert("train --help");
  REQUIRE(h.code == 0);
  for (const auto& e : moecert::backbone_registry())
    CHECK(h.output.find(e.name) != std::string::npos);
  auto top = run_moecert("--help");  // --dataset is a global option
  for (const auto& d : moecert::data_registry())
    CHECK(top.output.find(d.name) != std::string::npos);
  for (const char* m : {"st", "trades", "rt-er", "advmoe", "jtdmoe", "crown-ibp"})
    CHECK(h.output.find(m) != std::string::npos);
  auto bad = run_moecert("--dataset synthetic-cifar train --expert wrn-27-10 --out x");
  CHECK(bad.code == 2);
  CHECK(bad.output.find("6n + 4") != std::string::npos);
  auto small = run_moecert("--dataset synthetic train --expert vgg16-bn --out x");
  CHECK(small.code == 2);
  CHECK(small.output.find("at least 32x32") != std::string::npos);
  auto patch = run_moecert("--dataset synthetic-cifar train --expert vit-small-p5 --out x");
  CHECK(patch.code == 2);
  CHECK(patch.output.find("patch 5") != std::string::npos);
  auto heads = run_moecert("--dataset synthetic-cifar train --expert vit-2-10-3 --out x");
  CHECK(heads.code == 2);
  CHECK(heads.output.find("multiple of heads") != std::string::npos);
}
