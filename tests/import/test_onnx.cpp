// ONNX models and VNN-COMP properties: torch.onnx.export of cnn-s, an MLP, a ResNet-18
// and a BatchNorm network convert to operator graphs that reproduce PyTorch's outputs;
// an operator without a bound rule is refused by name; `moecert verify` answers
// properties with known answers in the competition's format; `moecert import` writes
// checkpoints from ONNX exports and from an MoE assembled of ONNX and state-dict
// components that reproduce PyTorch's logits and routes.
#include <catch2/catch.hpp>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <regex>

#include "moecert/compiled_graph.h"
#include "moecert/error.h"
#include "moecert/model_io.h"
#include "moecert/onnx_model.h"
#include "moecert/torch_file.h"
#include "moecert/vnnlib.h"
#include "test_util.h"

using moecert_test::run_moecert;
using moecert_test::run_shell;
using moecert_test::TempDir;

namespace {

/// tests/import/make_onnx_files.py's output, made once per process; empty without
/// python3-torch.
std::string onnx_files() {
  static std::unique_ptr<TempDir> dir;
  static std::string made;
  if (dir) return made;
  dir = std::make_unique<TempDir>();
  if (run_shell("/usr/bin/python3 -c 'import torch'").code != 0) return {};
  auto r = run_shell("/usr/bin/python3 " + std::string(MOECERT_SOURCE_DIR) +
                     "/tests/import/make_onnx_files.py " + dir->path());
  INFO(r.output);
  REQUIRE(r.code == 0);
  made = dir->path();
  return made;
}

}  // namespace

TEST_CASE("ONNX exports convert to graphs that reproduce PyTorch's outputs", "[e2e][onnx]") {
  const auto d = onnx_files();
  if (d.empty()) {
    WARN("python3-torch is not installed; skipping the ONNX test");
    return;
  }
  for (const char* name : {"cnn_s", "mlp", "bn_net", "resnet18"}) {
    INFO(name);
    const auto m = moecert::onnx_load(d + "/" + name + ".onnx");
    moecert::TorchFile ref(d + "/" + name + "_reference.pt");
    std::map<std::string, moecert::TorchTensorRef> t(ref.tensors().begin(), ref.tensors().end());
    auto x = ref.load(t.at("inputs")).to(torch::kFloat64);
    const auto want = ref.load(t.at("logits")).to(torch::kFloat64);
    std::vector<int64_t> shape{x.size(0)};
    shape.insert(shape.end(), m.input_shape.begin(), m.input_shape.end());
    const moecert::CompiledGraph g(m.graph, m.input_shape);
    const auto got = g.forward(x.reshape(shape)).reshape(want.sizes());
    CHECK(m.outputs == want.size(1));
    CHECK((got - want).abs().max().item<double>() <= 1e-4);
  }
  CHECK_THROWS_WITH(
      moecert::onnx_load(d + "/unsupported.onnx"),
      Catch::Contains("(Sigmoid): is not supported: an operator moecert has no bound rule"));
  auto cli = run_moecert("verify " + d + "/unsupported.onnx " + d + "/holds.vnnlib");
  CHECK(cli.code == 2);
  CHECK(cli.output.find("Sigmoid") != std::string::npos);
  // Not an ONNX file at all.
  CHECK_THROWS_AS(moecert::onnx_load(d + "/mlp_reference.pt"), moecert::DataError);
}

TEST_CASE("verify answers VNN-COMP properties with known answers", "[e2e][onnx][verify]") {
  const auto d = onnx_files();
  if (d.empty()) {
    WARN("python3-torch is not installed; skipping the verify test");
    return;
  }
  TempDir tmp;
  auto holds = run_moecert("verify " + d + "/mlp.onnx " + d +
                           "/holds.vnnlib --timeout 60 --results " + (tmp / "holds.txt"));
  INFO(holds.output);
  CHECK(holds.code == 0);
  CHECK(moecert_test::read_text(tmp / "holds.txt") == "unsat\n");

  auto violated = run_moecert("verify " + d + "/mlp.onnx " + d +
                              "/violated.vnnlib --timeout 60 --results " + (tmp / "violated.txt"));
  INFO(violated.output);
  CHECK(violated.code == 0);
  const auto text = moecert_test::read_text(tmp / "violated.txt");
  REQUIRE(text.rfind("sat\n((X_0 ", 0) == 0);
  // The counterexample lies in the box and satisfies the property on the model's outputs.
  std::vector<double> x, y;
  const std::regex entry(R"(\(([XY])_(\d+) ([^)]+)\))");
  for (auto it = std::sregex_iterator(text.begin(), text.end(), entry);
       it != std::sregex_iterator(); ++it)
    ((*it)[1] == "X" ? x : y).push_back(std::stod((*it)[3]));
  const auto p = moecert::vnnlib_parse(d + "/violated.vnnlib");
  REQUIRE(x.size() == 20);
  REQUIRE(y.size() == 5);
  CHECK(moecert::vnnlib_case_satisfied(p.cases.at(0), x, y, 0));

  // A property whose sizes do not match the model is refused.
  auto wrong = run_moecert("verify " + d + "/cnn_s.onnx " + d + "/holds.vnnlib");
  CHECK(wrong.code == 2);
  CHECK(wrong.output.find("the property has 20 inputs") != std::string::npos);
}

TEST_CASE("import writes checkpoints from ONNX exports and assembled MoEs that reproduce PyTorch",
          "[e2e][onnx][import]") {
  const auto d = onnx_files();
  if (d.empty()) {
    WARN("python3-torch is not installed; skipping the ONNX import test");
    return;
  }
  TempDir tmp;
  auto reference = [&](const std::string& file) {
    moecert::TorchFile ref(d + "/" + file);
    std::map<std::string, torch::Tensor> t;
    for (const auto& [k, r] : ref.tensors()) t[k] = ref.load(r);
    return t;
  };
  // Whole classifiers: the loaded checkpoint's logits are PyTorch's (checked here, apart
  // from the import's own check).
  for (const char* name : {"cnn_s", "bn_net", "resnet18"}) {
    INFO(name);
    const std::string out = tmp / name;
    auto r = run_moecert("import " + d + "/" + name + ".onnx --out " + out + " --reference " + d +
                         "/" + name + "_reference.pt");
    INFO(r.output);
    REQUIRE(r.code == 0);
    CHECK(r.output.find("self-check   model: 64 random inputs against its source") !=
          std::string::npos);
    CHECK(r.output.find("self-check   20 reference inputs: max |logit difference|") !=
          std::string::npos);
    auto loaded = moecert::model_load(out, torch::kCPU);
    auto t = reference(std::string(name) + "_reference.pt");
    torch::NoGradGuard no_grad;
    const auto got = loaded.model->expert_logits(0, t["inputs"]);
    CHECK((got - t["logits"]).abs().max().item<double>() <= 1e-4);
    CHECK(loaded.model->spec().expert == "graph");
  }
  // An MoE from an ONNX router, two ONNX experts and a state-dict expert.
  const std::string moe = tmp / "moe";
  auto r = run_moecert("import " + d + "/moe.json --out " + moe + " --reference " + d +
                       "/moe_reference.pt");
  INFO(r.output);
  REQUIRE(r.code == 0);
  for (const char* part : {"experts[0]", "experts[1]", "experts[2]", "router"})
    CHECK(r.output.find(std::string("self-check   ") + part + ":") != std::string::npos);
  {
    auto loaded = moecert::model_load(moe, torch::kCPU);
    auto t = reference("moe_reference.pt");
    torch::NoGradGuard no_grad;
    auto& m = *loaded.model;
    CHECK(m.num_experts() == 3);
    const auto routes = m.route(t["inputs"]).selected.select(1, 0);
    CHECK(torch::equal(routes, t["routes"]));
    for (int64_t i = 0; i < routes.size(0); ++i) {
      const auto xi = t["inputs"].narrow(0, i, 1);
      const auto li = m.expert_logits(routes[i].item<int64_t>(), xi)[0];
      CHECK((li - t["logits"][i]).abs().max().item<double>() <= 1e-4);
    }
  }
  // Every command works on it: certify with bound propagation, without violations.
  auto cert = run_moecert("-q --dataset synthetic-cifar --samples 4 certify " + moe +
                          " --estimator ibp,crown --out " + (tmp / "cert"));
  INFO(cert.output);
  CHECK(cert.code == 0);
  CHECK(cert.output.find("soundness violations: 0") != std::string::npos);

  // Refusals, each exit 2 with nothing written.
  auto refused = [&](const std::string& args, const std::string& says) {
    const std::string out = tmp / "refused";
    auto x = run_moecert("import " + args + " --out " + out);
    INFO(args << "\n" << x.output);
    CHECK(x.code == 2);
    CHECK(x.output.find(says) != std::string::npos);
    CHECK_FALSE(std::ifstream(out + "/model.json").good());
  };
  refused(d + "/unsupported.onnx", "(Sigmoid): is not supported");
  refused(d + "/cnn_s.onnx --mean 0.3 --reference " + d + "/cnn_s_reference.pt",
          "does not reproduce");
  refused(d + "/cnn_s.onnx --preset paper1-moe-resnet18", "is an ONNX model");
  refused(d + "/cnn_s.onnx --reference " + d + "/bn_net_reference.pt", "inputs have shape");
  auto edit = [&](const std::string& name, const std::function<void(nlohmann::json&)>& f) {
    auto j = nlohmann::json::parse(moecert_test::read_text(d + "/moe.json"));
    f(j);
    const std::string path = d + "/" + name;
    std::ofstream(path) << j.dump();
    return path;
  };
  refused(edit("bad_field.json", [](auto& j) { j["expert"] = 1; }), "unknown field 'expert'");
  refused(edit("bad_prefix.json", [](auto& j) { j["experts"][2]["prefix"] = "experts.1."; }),
          "no tensors under");
  refused(edit("bad_backbone.json", [](auto& j) { j["experts"][2]["backbone"] = "resnet18"; }),
          "which cannot give model tensor");
  refused(edit("no_router.json", [](auto& j) { j.erase("router"); }),
          "several experts need a \"router\"");
  refused(edit("swapped.json",
               [](auto& j) {
                 j["router"] = {{"onnx", "moe_expert1.onnx"}};
               }),
          "gives outputs of shape [10], 3 values expected");

  // A tampered architecture is refused when the checkpoint is loaded.
  auto manifest = nlohmann::json::parse(moecert_test::read_text(moe + "/model.json"));
  manifest["architecture"]["graphs"]["experts"][1]["nodes"][0]["op"] = "sigmoid";
  std::ofstream(moe + "/model.json") << manifest.dump();
  auto info = run_moecert("info " + moe);
  CHECK(info.code == 2);
  CHECK(info.output.find("op 'sigmoid' is not one of") != std::string::npos);
}
