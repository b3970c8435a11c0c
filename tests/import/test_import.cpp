// `moecert import` end to end, against files PyTorch writes: the two papers' MoE layouts
// (built in Python from the layouts their codes use, random weights, saved as the codes
// save them) import and reproduce PyTorch's logits and routes on 100 images, then certify;
// a wrong layout, normalisation or reference is refused with nothing written; hostile
// files (a pickle that calls os.system, a storage shorter than its tensor, a 10^12-element
// shape, a truncated zip, a legacy file) are refused with exit 2 and nothing run.
#include <sys/stat.h>

#include <catch2/catch.hpp>
#include <fstream>
#include <map>
#include <memory>
#include <nlohmann/json.hpp>

#include "moecert/torch_file.h"
#include "test_util.h"

using moecert_test::read_text;
using moecert_test::run_moecert;
using moecert_test::run_shell;
using moecert_test::TempDir;

namespace {

void write_text(const std::string& path, const std::string& text) { std::ofstream(path) << text; }

bool exists(const std::string& p) {
  struct stat st {};
  return ::stat(p.c_str(), &st) == 0;
}

/// Runs tests/import/make_torch_files.py for `what` once per process (sections re-enter
/// their test case) into a directory of its own; empty when python3-torch is missing (the
/// test then warns and stops).
std::string torch_files(const std::string& what) {
  static std::map<std::string, std::pair<std::unique_ptr<TempDir>, std::string>> made;
  auto& slot = made[what];
  if (slot.first) return slot.second;
  slot.first = std::make_unique<TempDir>();
  if (run_shell("/usr/bin/python3 -c 'import torch'").code != 0) return {};
  auto r = run_shell("/usr/bin/python3 " + std::string(MOECERT_SOURCE_DIR) +
                     "/tests/import/make_torch_files.py " + slot.first->path() + " " + what);
  INFO(r.output);
  REQUIRE(r.code == 0);
  slot.second = slot.first->path();
  return slot.second;
}

const char* kPaper1Norm = " --mean 0.491400,0.482200,0.446500 --std 0.202300,0.199400,0.201000 ";

nlohmann::json check_of(const std::string& ckpt) {
  return nlohmann::json::parse(read_text(ckpt + "/model.json"))["import"]["check"];
}

}  // namespace

TEST_CASE("paper 1's MoE ResNet-18 (torch.save .t7) imports bit-faithfully and certifies",
          "[e2e][import]") {
  TempDir tmp;
  const std::string d = torch_files("paper1");
  if (d.empty()) {
    WARN("python3-torch is not installed; skipping the paper-1 import test");
    return;
  }
  SECTION("the RT-ER checkpoint: 4 experts, logits within 1e-4, every route equal") {
    auto r = run_moecert("--dataset cifar10 import " + d +
                         "/res18_moe-RT_ER-6.t7 --preset paper1-moe-resnet18" + kPaper1Norm +
                         "--reference " + d + "/paper1_reference.pt --out " + (tmp / "m"));
    INFO(r.output);
    REQUIRE(r.code == 0);
    const auto m = nlohmann::json::parse(read_text(tmp / "m/model.json"));
    CHECK(m["architecture"]["experts"] == 4);
    CHECK(m["architecture"]["expert"] == "resnet18");
    CHECK(m["architecture"]["router"] == "linear");
    CHECK(m["import"]["source_scalars"]["epoch"] == 199);
    CHECK(m["import"]["source_sha256"].get<std::string>().size() == 64);
    CHECK(m["import"]["check"]["max_abs_logit_diff"].get<double>() <= 1e-4);
    CHECK(m["import"]["check"]["routes_agree"] == 100);
    CHECK(m["dataset"]["name"] == "cifar10");
    // The imported model certifies (IBP and CROWN over its compiled graph).
    auto c = run_moecert("--dataset synthetic-cifar --quiet --samples 2 certify " + (tmp / "m") +
                         " --estimator ibp --steps 2 --eps-grid 0.0001 --out " + (tmp / "c"));
    INFO(c.output);
    CHECK(c.code == 0);
    CHECK(c.output.find("soundness violations: 0") != std::string::npos);
  }
  SECTION("DataParallel's module. prefix is stripped; the dual's members import one at a time") {
    auto r =
        run_moecert("import " + d + "/res18_moe_dp.t7 --preset paper1-moe-resnet18" + kPaper1Norm +
                    "--reference " + d + "/paper1_smoe_reference.pt --out " + (tmp / "dp"));
    INFO(r.output);
    REQUIRE(r.code == 0);
    CHECK(check_of(tmp / "dp")["routes_agree"] == 100);
    auto whole = run_moecert("import " + d + "/dual_model_res18-JTDMoE.t7 --preset paper1-dual" +
                             kPaper1Norm + "--allow-unchecked --out " + (tmp / "dual"));
    CHECK(whole.code == 2);
    CHECK(whole.output.find("blends its members' logits") != std::string::npos);
    CHECK_FALSE(exists(tmp / "dual"));
    auto member = run_moecert(
        "import " + d + "/dual_model_res18-JTDMoE.t7 --preset paper1-dual --member Rmoe" +
        kPaper1Norm + "--reference " + d + "/paper1_rmoe_reference.pt --out " + (tmp / "r"));
    INFO(member.output);
    REQUIRE(member.code == 0);
    CHECK(check_of(tmp / "r")["max_abs_logit_diff"].get<double>() <= 1e-4);
    // The other member's reference does not match: refused, nothing written.
    auto wrong = run_moecert(
        "import " + d + "/dual_model_res18-JTDMoE.t7 --preset paper1-dual --member Smoe" +
        kPaper1Norm + "--reference " + d + "/paper1_rmoe_reference.pt --out " + (tmp / "w"));
    CHECK(wrong.code == 2);
    CHECK(wrong.output.find("does not reproduce") != std::string::npos);
    CHECK_FALSE(exists(tmp / "w"));
  }
  SECTION("a JSON key map imports the same file as the preset; a bad key map is refused") {
    const nlohmann::json map = {
        {"architecture",
         {{"kind", "moe"},
          {"experts", 2},
          {"expert", "resnet18"},
          {"router", "linear"},
          {"in_channels", 3},
          {"height", 32},
          {"width", 32},
          {"num_classes", 10}}},
        {"state_dict", "net"},
        {"rules",
         {{{"to", R"(router\.fc\.(.+))"}, {"from", "router.gate.$1"}},
          {{"to", R"(experts\.(\d+)\.(.+))"}, {"from", "experts.$1.net.$2"}}}}};
    write_text(tmp / "map.json", map.dump());
    auto r = run_moecert("import " + d + "/res18_moe_dp.t7 --key-map " + (tmp / "map.json") +
                         kPaper1Norm + "--reference " + d + "/paper1_smoe_reference.pt --out " +
                         (tmp / "km"));
    INFO(r.output);
    REQUIRE(r.code == 0);
    CHECK(check_of(tmp / "km")["routes_agree"] == 100);
    auto bad = map;
    bad["rules"].erase(1);  // the experts' tensors now have no rule
    write_text(tmp / "bad.json", bad.dump());
    auto b = run_moecert("import " + d + "/res18_moe_dp.t7 --key-map " + (tmp / "bad.json") +
                         kPaper1Norm + "--allow-unchecked --out " + (tmp / "kb"));
    CHECK(b.code == 2);
    CHECK(b.output.find("no rule of layout") != std::string::npos);
    auto unknown = map;
    unknown["rename"] = 1;
    write_text(tmp / "unknown.json", unknown.dump());
    auto u = run_moecert("import " + d + "/res18_moe_dp.t7 --key-map " + (tmp / "unknown.json") +
                         kPaper1Norm + "--allow-unchecked --out " + (tmp / "ku"));
    CHECK(u.code == 2);
    CHECK(u.output.find("unknown field 'rename'") != std::string::npos);
  }
  SECTION("a wrong normalisation, layout or missing check is refused") {
    auto norm = run_moecert("import " + d +
                            "/res18_moe_dp.t7 --preset paper1-moe-resnet18 --mean 0.5 --std 0.5 "
                            "--reference " +
                            d + "/paper1_smoe_reference.pt --out " + (tmp / "n"));
    CHECK(norm.code == 2);
    CHECK(norm.output.find("max |") != std::string::npos);
    CHECK_FALSE(exists(tmp / "n"));
    auto no_norm = run_moecert(
        "import " + d + "/res18_moe_dp.t7 --preset paper1-moe-resnet18 --allow-unchecked --out " +
        (tmp / "x"));
    CHECK(no_norm.code == 2);
    CHECK(no_norm.output.find("--mean and --std are required") != std::string::npos);
    auto layout = run_moecert(
        "import " + d +
        "/res18_moe_dp.t7 --preset paper2-moe-cnn-resnet18 --allow-unchecked --out " + (tmp / "l"));
    CHECK(layout.code == 2);
    CHECK(layout.output.find("router.fc.weight") != std::string::npos);
    auto unchecked = run_moecert("import " + d + "/res18_moe_dp.t7 --preset paper1-moe-resnet18" +
                                 kPaper1Norm + "--out " + (tmp / "u"));
    CHECK(unchecked.code == 2);
    CHECK(unchecked.output.find("--reference") != std::string::npos);
    auto allowed = run_moecert("import " + d + "/res18_moe_dp.t7 --preset paper1-moe-resnet18" +
                               kPaper1Norm + "--allow-unchecked --out " + (tmp / "u"));
    INFO(allowed.output);
    REQUIRE(allowed.code == 0);
    CHECK(check_of(tmp / "u")["kind"] == "none");
  }
}

TEST_CASE("paper 2's MoE-CNN ResNet-18 (checkpoint.pth.tar) imports bit-faithfully",
          "[e2e][import]") {
  TempDir tmp;
  const std::string d = torch_files("paper2");
  if (d.empty()) {
    WARN("python3-torch is not installed; skipping the paper-2 import test");
    return;
  }
  auto r = run_moecert("import " + d +
                       "/checkpoint.pth.tar --preset paper2-moe-cnn-resnet18 --reference " + d +
                       "/paper2_reference.pt --out " + (tmp / "m"));
  INFO(r.output);
  REQUIRE(r.code == 0);
  CHECK(r.output.find("self-check   100 reference inputs: max |logit difference|") !=
        std::string::npos);
  const auto m = nlohmann::json::parse(read_text(tmp / "m/model.json"));
  CHECK(m["architecture"]["kind"] == "moe-cnn");
  CHECK(m["architecture"]["experts"] == 2);
  CHECK(m["architecture"]["scale"] == 0.5);
  CHECK(m["architecture"]["router"] == "resnet20");
  CHECK(m["import"]["check"]["max_abs_logit_diff"].get<double>() <= 1e-4);
  CHECK(m["import"]["check"]["routes_agree"] == 100);
  CHECK(m["import"]["source_scalars"]["arch"] == "resnet18_moe");
  auto c = run_moecert("--dataset synthetic-cifar --quiet --samples 2 certify " + (tmp / "m") +
                       " --estimator ibp --steps 2 --eps-grid 0.0001 --out " + (tmp / "c"));
  INFO(c.output);
  CHECK(c.code == 0);
  CHECK(c.output.find("soundness violations: 0") != std::string::npos);
}

TEST_CASE("paper 2's Wide ResNet and VGG-16 MoE-CNNs import as graph experts, one per group",
          "[e2e][import]") {
  TempDir tmp;
  const std::string d = torch_files("paper2");
  if (d.empty()) {
    WARN("python3-torch is not installed; skipping the paper-2 WRN / VGG import test");
    return;
  }
  for (const std::string name : {"wrn", "vgg16"}) {
    INFO(name);
    const std::string out = tmp / name;
    auto r =
        run_moecert("import " + d + "/paper2_" + name + ".pth.tar --preset paper2-moe-cnn-" + name +
                    " --reference " + d + "/paper2_" + name + "_reference.pt --out " + out);
    INFO(r.output);
    REQUIRE(r.code == 0);
    CHECK(r.output.find("self-check   router: 64 random inputs against its source") !=
          std::string::npos);
    CHECK(r.output.find("self-check   100 reference inputs") != std::string::npos);
    const auto m = nlohmann::json::parse(read_text(out + "/model.json"));
    CHECK(m["architecture"]["expert"] == "graph");
    CHECK(m["architecture"]["experts"] == 2);
    CHECK(m["import"]["layout"] == "paper2-moe-cnn-" + name);
    const auto& ref = m["import"]["check"]["reference"];
    CHECK(ref["max_abs_logit_diff"].get<double>() <= 1e-4);
    CHECK(ref["routes_agree"] == 100);
    auto c = run_moecert("--dataset synthetic-cifar --quiet --samples 2 certify " + out +
                         " --estimator ibp,crown --eps-grid 0.0001 --out " + (tmp / (name + "_c")));
    INFO(c.output);
    CHECK(c.code == 0);
    CHECK(c.output.find("soundness violations: 0") != std::string::npos);
  }
  // The other preset does not describe the file; nothing is written.
  auto wrong = run_moecert("import " + d + "/paper2_vgg16.pth.tar --preset paper2-moe-cnn-wrn " +
                           "--allow-unchecked --out " + (tmp / "wrong"));
  CHECK(wrong.code == 2);
  CHECK(wrong.output.find("preset needs key 'fc.weight'") != std::string::npos);
  CHECK_FALSE(std::ifstream(tmp / "wrong/model.json").good());
}

TEST_CASE("the torch.save reader runs nothing and allocates nothing a hostile file asks for",
          "[e2e][import][security]") {
  TempDir tmp;
  const std::string d = torch_files("evil");
  if (d.empty()) {
    WARN("python3-torch is not installed; skipping the hostile-file test");
    return;
  }
  struct Case {
    const char* file;
    const char* says;
  };
  const Case cases[] = {
      {"evil.pt", "refused global 'posix.system'"},
      {"short_storage.pt", "but its record holds 100 bytes"},
      {"huge_shape.pt", "a tensor of size [1000000, 1000000] reaches element"},
      {"truncated.pt", "no zip directory at its end"},
      {"legacy.pt", "_use_new_zipfile_serialization"},
  };
  for (const auto& c : cases) {
    INFO(c.file);
    auto r = run_moecert("import " + d + "/" + c.file + " --preset paper1-moe-resnet18" +
                         kPaper1Norm + "--allow-unchecked --out " + (tmp / "out"));
    INFO(r.output);
    CHECK(r.code == 2);
    CHECK(r.output.find(c.says) != std::string::npos);
    CHECK_FALSE(exists(tmp / "out"));
    // The library refuses the same files with the same error.
    CHECK_THROWS_WITH(moecert::TorchFile(d + "/" + c.file), Catch::Contains(c.says));
  }
  CHECK_FALSE(exists(d + "/PWNED"));  // the pickle's os.system never ran
}
