// Graph components (expert / router kind "graph", what `moecert import` writes for ONNX
// files and assembled MoEs): a model rebuilt from its own components' graphs computes
// and certifies as the model does; structures of every operator survive the JSON round
// trip; malformed structures are refused, naming the node, before anything is allocated.
#include <catch2/catch.hpp>
#include <numeric>

#include "fixtures.h"
#include "moecert/certify.h"
#include "moecert/error.h"
#include "moecert/model_io.h"
#include "moecert/models.h"

using namespace moecert;

namespace {

std::vector<int64_t> image_of(const ModelSpec& s) { return {s.in_channels, s.height, s.width}; }

/// `m` rebuilt with every router and expert as a graph component of its own graph.
Moe as_graph_components(MoeImpl& m) {
  ModelSpec spec = m.spec();
  spec.expert = "graph", spec.router = "graph";
  spec.graphs = {{"experts", nlohmann::json::array()}};
  for (int64_t i = 0; i < spec.experts; ++i)
    spec.graphs["experts"].push_back(graph_structure(m.expert(i).graph(), image_of(spec)));
  if (spec.experts > 1)
    spec.graphs["router"] = graph_structure(m.router()->graph(), image_of(spec));
  // Through JSON, as a checkpoint stores it.
  Moe g(ModelSpec::from_json(nlohmann::json::parse(spec.to_json().dump())));
  for (int64_t i = 0; i < spec.experts; ++i) graph_net_fill(g->expert(i), m.expert(i).graph());
  if (spec.experts > 1) graph_net_fill(*g->router(), m.router()->graph());
  g->eval();
  return g;
}

}  // namespace

TEST_CASE("a model rebuilt from its components' graphs computes and certifies as the model",
          "[unit][import][certify]") {
  auto& m = moecert_test::trained_moe();
  auto g = as_graph_components(*m);
  auto data = moecert_test::synthetic(12, 3, /*train=*/false);
  {
    torch::NoGradGuard no_grad;
    const auto x = data.batch_images(torch::arange(12));
    CHECK((g->forward(x) - m->forward(x)).abs().max().item<double>() <= 1e-6);
    CHECK(torch::equal(g->route(x).selected, m->route(x).selected));
  }

  CertifyConfig cfg;
  cfg.estimators = {Estimator::ibp, Estimator::crown};
  cfg.eps_grid = EpsGrid({0.01, 0.05});
  cfg.empirical = false;
  std::vector<int64_t> idx(12);
  std::iota(idx.begin(), idx.end(), 0);
  LoadedModel a, b;
  a.model = m, b.model = g;
  a.manifest = b.manifest = nlohmann::json::object();
  const auto ra = certify_run(a, data, idx, cfg, torch::kCPU, false).to_json();
  const auto rb = certify_run(b, data, idx, cfg, torch::kCPU, false).to_json();
  REQUIRE(ra["rows"].size() == rb["rows"].size());
  int certified = 0;
  for (size_t i = 0; i < ra["rows"].size(); ++i) {
    const auto& x1 = ra["rows"][i]["radii"];
    const auto& x2 = rb["rows"][i]["radii"];
    for (const auto& [form, r] : x1.items()) {
      if (!r.is_number()) continue;
      INFO("row " << i << " form " << form);
      REQUIRE(x2.contains(form));
      CHECK(x2[form].get<double>() == Approx(r.get<double>()).margin(1e-7).epsilon(1e-5));
      certified += r.get<double>() > 0;
    }
  }
  CHECK(certified > 0);  // the comparison is not between empty certificates
}

TEST_CASE("graph structures of every operator survive the JSON round trip", "[unit][import]") {
  torch::manual_seed(4);
  // A ViT (tokens, LayerNorm, GELU, softmax, both attention products), a DenseNet
  // (concatenation, BatchNorm as an affine map) and a ResNet (residual sums, global pooling).
  for (const char* kind : {"vit-1-32-2-p4", "densenet-bc-10-4", "resnet20"}) {
    INFO(kind);
    auto net = backbone_make(kind, 3, 16, 16, 5);
    net->eval();
    const auto graph = net->graph();
    const auto structure = graph_structure(graph, {3, 16, 16});
    const auto info = graph_structure_check(structure, "test");
    CHECK(info.output_shape == std::vector<int64_t>{5});
    CHECK(info.cost.parameters > 0);
    auto g = graph_net_make(nlohmann::json::parse(structure.dump()), "test");
    graph_net_fill(*g, graph);
    torch::NoGradGuard no_grad;
    auto x = torch::randn({6, 3, 16, 16});
    CHECK((g->forward(x) - net->forward(x)).abs().max().item<double>() <= 1e-4);
    // Its float64 graph holds exactly the float32 values it evaluates.
    const auto back = g->graph();
    REQUIRE(back.size() == graph.size());
    for (size_t k = 0; k < graph.size(); ++k) {
      CHECK(back[k].inputs == graph[k].inputs);
      CHECK(back[k].layer.kind == graph[k].layer.kind);
      if (graph[k].layer.weight.defined())
        CHECK(torch::equal(back[k].layer.weight,
                           graph[k].layer.weight.to(torch::kFloat32).to(torch::kFloat64)));
    }
  }
}

TEST_CASE("malformed graph structures are refused naming the node", "[unit][import]") {
  auto net = backbone_make("cnn-s", 1, 28, 28, 10);
  const auto good = graph_structure(net->graph(), {1, 28, 28});
  REQUIRE_NOTHROW(graph_structure_check(good, "s"));
  auto refused = [&](const std::function<void(nlohmann::json&)>& edit, const std::string& says) {
    auto s = good;
    edit(s);
    INFO(s.dump().substr(0, 300));
    CHECK_THROWS_WITH(graph_structure_check(s, "s"), Catch::Contains(says));
    CHECK_THROWS_AS(graph_net_make(s, "s"), ConfigError);
  };
  refused([](auto& s) { s["nodes"][1]["op"] = "sigmoid"; }, "node 1: op 'sigmoid' is not one of");
  refused([](auto& s) { s["nodes"][1]["inputs"] = {3}; }, "node 1: reads 3");
  refused(
      [](auto& s) {
        s["nodes"][0]["tensors"]["weight"] = {16, 1, 3};
      },
      "node 0: tensor 'weight'");
  refused([](auto& s) { s["nodes"][0]["tensors"].erase("weight"); }, "node 0: op 'conv");
  refused([](auto& s) { s["nodes"][0]["tensors"]["gamma"] = {3}; }, "holds no tensor 'gamma'");
  refused([](auto& s) { s["nodes"][0]["stride"] = -2; }, "field 'stride'");
  refused([](auto& s) { s.erase("nodes"); }, "\"input_shape\" and \"nodes\"");
  refused([](auto& s) { s["input_shape"] = {3, 28, 28}; }, "s:");  // channels do not fit
  // Tensors that fit the ranks but not each other, and geometry the forward cannot run
  // (found by the graph fuzz harness: they used to pass the check and crash the forward).
  refused([](auto& s) { s["nodes"][7]["tensors"]["bias"] = {20}; }, "bias of linear");
  refused([](auto& s) { s["nodes"][0]["tensors"]["bias"] = {15}; }, "bias of conv");
  refused([](auto& s) { s["nodes"][0]["stride"] = 0; }, "stride >= 1");
  refused([](auto& s) { s["nodes"][0]["tensors"]["weight"] = {16, 1, 3, 2}; }, "square kernel");
  refused(
      [](auto& s) {
        s["nodes"][0]["tensors"]["weight"] = {16, 1, 31, 31};
      },
      "no larger than the padded input");
  // 2^31 x 2^31 values: refused by the memory budget, before any allocation.
  auto huge = good;
  huge["nodes"][0]["tensors"]["weight"] = {int64_t{1} << 31, int64_t{1} << 31, 1, 1};
  CHECK_THROWS_AS(graph_structure_check(huge, "s"), Error);
  CHECK_THROWS_AS(graph_net_make(huge, "s"), Error);

  // A spec whose graph expert gives another class count, or lacks its structures.
  ModelSpec spec;
  spec.experts = 1, spec.expert = "graph";
  spec.graphs = {{"experts", {good}}};
  spec.mean = {0.5}, spec.std = {0.5};
  spec.num_classes = 7;
  CHECK_THROWS_WITH(spec.validate(), Catch::Contains("gives outputs of shape [10], 7 values"));
  spec.num_classes = 10;
  CHECK_NOTHROW(spec.validate());
  spec.graphs = nlohmann::json::object();
  CHECK_THROWS_WITH(spec.validate(), Catch::Contains("needs graphs.experts"));
}
