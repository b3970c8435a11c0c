// The backbone registry: every registered backbone's float32 forward equals its
// operator graph (the graph certify bounds) at every input size it accepts, as an
// expert, a router, a trunk and a MoE-CNN path; the registry drives validation and
// help; family names parse and bad ones are refused naming the field.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "moecert/backbones.h"
#include "moecert/error.h"
#include "moecert/rules.h"

using namespace moecert;

namespace {

/// Non-trivial BatchNorm statistics, so that eval-mode BatchNorm is a real affine map.
void randomise_batchnorm(torch::nn::Module& m) {
  torch::NoGradGuard ng;
  for (auto& b : m.named_buffers())
    if (b.key().find("running_var") != std::string::npos)
      b.value().uniform_(0.5, 2.0);
    else if (b.key().find("running_mean") != std::string::npos)
      b.value().uniform_(-0.2, 0.2);
  for (auto& sub : m.modules())
    if (auto* bn = dynamic_cast<torch::nn::BatchNorm2dImpl*>(sub.get()))
      bn->weight.uniform_(0.5, 1.5), bn->bias.uniform_(-0.1, 0.1);
}

/// Input sizes [C, H, W] the tests try: MNIST-, CIFAR- and TinyImageNet-shaped, and
/// an odd size.
const std::vector<std::vector<int64_t>> kSizes = {
    {1, 28, 28}, {3, 32, 32}, {3, 36, 36}, {3, 64, 64}};

/// Whether `kind` accepts inputs of `size` (its validation passes).
bool accepts(const BackboneEntry& e, const BackboneArgs& a) {
  if (!e.validate) return true;
  try {
    e.validate(a);
    return true;
  } catch (const ConfigError&) {
    return false;
  }
}

/// max |forward(x) − graph(x)| relative to max |forward(x)|, in eval mode.
double forward_graph_gap(BackboneImpl& net, const torch::Tensor& x) {
  net.eval();
  torch::NoGradGuard ng;
  auto y = net.forward(x).to(torch::kFloat64);
  auto g = graph_forward(net.graph(), x.to(torch::kFloat64));
  REQUIRE(g.sizes() == y.sizes());
  return ((y - g).abs().max() / y.abs().max().clamp_min(1e-6)).item<double>();
}

}  // namespace

TEST_CASE("every registered backbone: forward equals its graph at every accepted input size",
          "[unit][models][backbones]") {
  for (const auto& e : backbone_registry()) {
    for (const auto& size : kSizes) {
      BackboneArgs a;
      a.kind = e.example ? e.example : e.name;
      a.in_channels = size[0], a.height = size[1], a.width_px = size[2], a.outputs = 7;
      a.width = 0.25;  // narrow, to keep the test quick; the layout is the same
      if (!accepts(e, a)) continue;
      INFO(a.kind << " on " << size[0] << "x" << size[1] << "x" << size[2]);
      torch::manual_seed(5);
      auto net = e.make(a);
      randomise_batchnorm(*net);
      auto x = torch::rand({3, size[0], size[1], size[2]});
      CHECK(forward_graph_gap(*net, x) < 1e-5);
      // the shape the graph compiles to is the forward's
      CHECK(graph_out_shape(net->graph(), {size[0], size[1], size[2]}) == Shape{7});
      if (e.trunk_features) {  // the trunk: pooled features, as many as declared
        a.outputs = 0;
        auto trunk = e.make(a);
        randomise_batchnorm(*trunk);
        CHECK(forward_graph_gap(*trunk, x) < 1e-5);
        CHECK(trunk->forward(x).size(1) == e.trunk_features(a));
      }
      // the declared cost counts the parameters exactly
      a.outputs = 7;
      CHECK(e.cost(a).parameters == Approx(module_parameter_count(*net)).epsilon(1e-12));
    }
  }
}

TEST_CASE("every MoE-CNN backbone: each path's graph equals the model's own expert output",
          "[unit][models][backbones]") {
  for (const auto& e : backbone_registry())
    for (bool shared : {false, true}) {  // BatchNorm per group, or shared (paper 2)
      if (!e.make_groups && !e.trunk_features) continue;
      ModelSpec s;
      s.kind = "moe-cnn", s.expert = e.example ? e.example : e.name, s.experts = 2, s.scale = 0.125;
      s.in_channels = 3, s.height = 32, s.width = 32, s.mean = {0.5, 0.4, 0.3},
      s.std = {0.25, 0.2, 0.3};
      s.shared_batch_norm = shared;
      INFO(s.expert << (shared ? ", shared BatchNorm" : ""));
      torch::manual_seed(7);
      Moe model(s);
      randomise_batchnorm(*model);
      model->eval();
      torch::NoGradGuard ng;
      auto x = torch::rand({4, 3, 32, 32});
      for (int64_t g = 0; g < 2; ++g) {
        auto h = model->expert_logits(g, x).to(torch::kFloat64);
        auto graph = graph_forward(model->component_graph(g), x.to(torch::kFloat64));
        CHECK(((h - graph).abs().max() / h.abs().max()).item<double>() < 1e-5);
      }
      CHECK((model->forward(x).exp() - moe_reference_probs(*model, x)).abs().max().item<double>() <
            1e-5);
      if (shared)  // the cost counts a shared BatchNorm once per group: an upper bound
        CHECK(s.cost().parameters >= module_parameter_count(*model));
      else
        CHECK(s.cost().parameters == Approx(module_parameter_count(*model)).epsilon(1e-12));
    }
}

TEST_CASE("family names parse, bad names and sizes are ConfigErrors naming the field",
          "[unit][models][backbones]") {
  ModelSpec s;
  s.in_channels = 3, s.height = 32, s.width = 32, s.mean = {0.5, 0.5, 0.5}, s.std = {0.5, 0.5, 0.5};
  for (const char* ok : {"wrn-16-4", "wrn-28-10", "vgg16-bn", "densenet", "densenet-bc-40-12",
                         "resnet18", "resnet20"}) {
    s.expert = ok;
    CHECK_NOTHROW(s.validate());
  }
  auto refused = [&](const std::string& expert, const std::string& router, const char* needle) {
    ModelSpec b = s;
    b.expert = expert, b.router = router;
    try {
      b.validate();
      FAIL("accepted " << expert << " / " << router);
    } catch (const ConfigError& err) {
      INFO(err.what());
      CHECK(std::string(err.what()).find(needle) != std::string::npos);
      CHECK(err.exit_code() == 2);
    }
  };
  refused("wrn-27-10", "linear", "depth = 6n + 4");
  refused("wrn-28", "linear", "wrn-<depth>-<k>");
  refused("vgg15-bn", "linear", "vgg16-bn");
  refused("densenet-bc-100", "linear", "densenet-bc-<depth>-<k>");
  refused("resnet50", "linear", "--expert");
  refused("cnn-s", "vgg16-bn", "--router");  // not a router
  refused("linear", "linear", "--expert");   // a router only
  s.height = 28, s.width = 28;
  refused("vgg16-bn", "linear", "at least 32x32");
  s.in_channels = 1, s.mean = {0.5}, s.std = {0.5};
  s.expert = "densenet-bc-10-2";
  CHECK_NOTHROW(s.validate());
}

TEST_CASE("the CLI help and error messages list every registered backbone",
          "[unit][models][backbones]") {
  const std::string experts = backbone_help(BackboneRole::expert);
  const std::string routers = backbone_names(BackboneRole::router);
  for (const auto& e : backbone_registry()) {
    if (e.expert) CHECK(experts.find(e.name) != std::string::npos);
    if (e.router) CHECK(routers.find(e.name) != std::string::npos);
  }
  CHECK(routers.find("mlp") != std::string::npos);
  CHECK(routers.find("cnn-s") == std::string::npos);
  CHECK(backbone_names(BackboneRole::channel_groups).find("mlp") == std::string::npos);
}
