// ONNX models and VNN-COMP properties: torch.onnx.export of cnn-s, an MLP, a ResNet-18
// and a BatchNorm network convert to operator graphs that reproduce PyTorch's outputs;
// an operator without a bound rule is refused by name; `moecert verify` answers
// properties with known answers in the competition's format.
#include <catch2/catch.hpp>
#include <map>
#include <memory>
#include <regex>

#include "moecert/compiled_graph.h"
#include "moecert/error.h"
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
