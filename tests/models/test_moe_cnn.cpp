#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "moecert/error.h"
#include "moecert/models.h"

using namespace moecert;

namespace {

ModelSpec moe_cnn_spec(const std::string& backbone = "cnn-s", int64_t groups = 2,
                       double scale = 0.5) {
  ModelSpec s;
  s.kind = "moe-cnn", s.expert = backbone, s.experts = groups, s.scale = scale;
  s.routing = Routing::top_k, s.top_k = 1;
  if (backbone == "resnet18") {
    s.in_channels = 3, s.height = 32, s.width = 32;
    s.mean = {0.5, 0.5, 0.5}, s.std = {0.25, 0.25, 0.25};
  }
  return s;
}

double sum_abs_grad(const std::vector<torch::Tensor>& params) {
  double n = 0;
  for (auto& p : params)
    if (p.grad().defined()) n += p.grad().abs().sum().item<double>();
  return n;
}

}  // namespace

TEST_CASE("MoE-CNN: batched channel-group dispatch equals the per-sample reference",
          "[unit][models]") {
  for (const auto& backbone : {std::string("cnn-s"), std::string("resnet18")}) {
    torch::manual_seed(3);
    Moe model(moe_cnn_spec(backbone));
    model->eval();
    torch::NoGradGuard g;
    const auto& s = model->spec();
    auto x = torch::rand({backbone == "cnn-s" ? 48 : 6, s.in_channels, s.height, s.width});
    auto batched = model->forward(x).exp();
    CHECK((batched - moe_reference_probs(*model, x)).abs().max().item<double>() < 1e-5);
  }
}

TEST_CASE("MoE-CNN: group widths follow the scale, and only the head is shared", "[unit][models]") {
  Moe model(moe_cnn_spec("cnn-s", 2, 0.5));
  auto p = model->named_parameters();
  CHECK(p["body.groups.0.conv1.weight"].sizes().vec() == std::vector<int64_t>{8, 1, 3, 3});
  CHECK(p["body.groups.1.conv2.weight"].sizes().vec() == std::vector<int64_t>{16, 8, 3, 3});
  // fc1 reads N·16·7·7 = 1568 features: the dense cnn-s's width, one block per group.
  CHECK(p["body.fc1.weight"].sizes().vec() == std::vector<int64_t>{128, 2 * 16 * 7 * 7});
  CHECK(p.contains("router.fc.weight"));
  CHECK(model->channel_groups() != nullptr);
  CHECK(model->expert_parameters().size() + model->router_parameters().size() ==
        model->parameters().size());

  Moe wide(moe_cnn_spec("cnn-s", 4, 0.25));
  CHECK(wide->named_parameters()["body.groups.3.conv1.weight"].size(0) == 4);
  Moe resnet(moe_cnn_spec("resnet18", 2, 0.5));
  CHECK(resnet->named_parameters()["body.groups.1.layer4.1.conv2.weight"].size(0) == 256);
  CHECK(resnet->named_parameters()["body.linear.weight"].size(1) == 2 * 256);
}

TEST_CASE("MoE-CNN: an unselected group is not computed", "[unit][models]") {
  torch::manual_seed(4);
  Moe model(moe_cnn_spec());
  {
    torch::NoGradGuard g;  // route every sample to group 0
    auto r = model->router()->named_parameters();
    r["fc.weight"].zero_();
    r["fc.bias"].copy_(torch::tensor({5.0f, 0.0f}));
  }
  auto x = torch::rand({16, 1, 28, 28});
  model->forward(x).sum().backward();
  auto p = model->named_parameters();
  CHECK(p["body.groups.0.conv1.weight"].grad().defined());
  CHECK(p["body.groups.0.conv1.weight"].grad().abs().sum().item<double>() > 0);
  // Group 1 takes no part in the graph: no gradient at all, not a masked zero.
  CHECK(!p["body.groups.1.conv1.weight"].grad().defined());
  CHECK(!p["body.groups.1.conv2.weight"].grad().defined());
  // fc1's column block of group 1 gets exactly zero gradient.
  auto g1 = p["body.fc1.weight"].grad().narrow(1, 16 * 49, 16 * 49);
  CHECK(g1.abs().sum().item<double>() == 0.0);
}

TEST_CASE("MoE-CNN: the router learns through the straight-through channel gate",
          "[unit][models]") {
  torch::manual_seed(5);
  Moe model(moe_cnn_spec());
  auto x = torch::rand({32, 1, 28, 28});
  auto y = torch::randint(0, 10, {32}, torch::kLong);
  torch::nll_loss(model->forward(x), y).backward();
  CHECK(sum_abs_grad(model->router_parameters()) > 0.0);
  // The forward value does not depend on the gate: F is the selected path's softmax.
  torch::NoGradGuard g;
  model->eval();
  auto routing = model->route(x);
  CHECK((routing.gate - 1).abs().max().item<double>() == 0.0);
  auto lp = model->forward(x);
  for (int64_t b = 0; b < 4; ++b) {
    auto e = routing.selected[b][0].item<int64_t>();
    auto direct = torch::log_softmax(model->expert_logits(e, x.narrow(0, b, 1)), 1);
    CHECK((direct[0] - lp[b]).abs().max().item<double>() < 1e-5);
  }
}

TEST_CASE("MoE-CNN: the manifest round-trips and bad specs are rejected", "[unit][models]") {
  auto spec = moe_cnn_spec("cnn-s", 3, 0.25);
  auto back = ModelSpec::from_json(spec.to_json());
  CHECK(back.kind == "moe-cnn");
  CHECK(back.experts == 3);
  CHECK(back.scale == 0.25);
  // A manifest written before MoE-CNN existed has no kind: a model-level MoE.
  auto old = ModelSpec().to_json();
  old.erase("kind");
  old.erase("scale");
  CHECK(ModelSpec::from_json(old).kind == "moe");

  auto bad = spec;
  bad.experts = 1;
  CHECK_THROWS_AS(bad.validate(), ConfigError);
  bad = spec, bad.routing = Routing::soft;
  CHECK_THROWS_AS(bad.validate(), ConfigError);
  bad = spec, bad.top_k = 2;
  CHECK_THROWS_AS(bad.validate(), ConfigError);
  bad = spec, bad.scale = 0.0;
  CHECK_THROWS_AS(bad.validate(), ConfigError);
  bad = spec, bad.scale = 1.5;
  CHECK_THROWS_AS(bad.validate(), ConfigError);
  bad = spec, bad.kind = "moe-vit";
  CHECK_THROWS_WITH(bad.validate(), Catch::Contains("moe-vit"));
}

TEST_CASE("MoE-CNN: BatchNorm shared across channel groups (paper 2's layout)", "[unit][models]") {
  for (const auto& backbone : {std::string("resnet18"), std::string("wrn-10-1")}) {
    INFO(backbone);
    auto spec = moe_cnn_spec(backbone, 3, 0.25);
    spec.in_channels = 3, spec.height = 32, spec.width = 32;
    spec.mean = {0.5, 0.5, 0.5}, spec.std = {0.25, 0.25, 0.25};
    auto per_group = spec;
    spec.shared_batch_norm = true;
    torch::manual_seed(4);
    Moe model(spec);
    Moe separate(per_group);
    // Every BatchNorm tensor of group g is group 0's; every convolution is its own.
    int64_t bn_values = 0, shared = 0;
    auto params = model->named_parameters();
    auto buffers = model->named_buffers();
    for (const auto& p : params) {
      const auto& k = p.key();
      if (k.rfind("body.groups.0.", 0) != 0) continue;
      const std::string rest = k.substr(std::string("body.groups.0.").size());
      for (int g = 1; g < 3; ++g) {
        const auto& other = params["body.groups." + std::to_string(g) + "." + rest];
        const bool same = other.unsafeGetTensorImpl() == p.value().unsafeGetTensorImpl();
        const bool is_bn =  // a parameter of a module with running statistics
            buffers.contains("body.groups.0." + rest.substr(0, rest.rfind('.')) + ".running_mean");
        CHECK(same == is_bn);
        if (is_bn && g == 1) bn_values += p.value().numel(), ++shared;
      }
    }
    CHECK(shared > 0);
    for (const auto& b : buffers)
      if (b.key().rfind("body.groups.0.", 0) == 0)
        CHECK(buffers["body.groups.2." + b.key().substr(14)].unsafeGetTensorImpl() ==
              b.value().unsafeGetTensorImpl());
    // Counted once: the per-group model has N − 1 more copies of them.
    CHECK(module_parameter_count(*separate) - module_parameter_count(*model) == 2 * bn_values);
    auto experts = model->expert_parameters();
    CHECK(unique_tensors(experts).size() == experts.size());
    CHECK(experts.size() + model->router_parameters().size() ==
          unique_tensors(model->parameters()).size());

    // A training step moves the shared γ once, and every path sees it; its running
    // statistics are the same tensor for every path too.
    model->train();
    torch::optim::SGD opt(experts, torch::optim::SGDOptions(0.1));
    auto x = torch::rand({8, 3, 32, 32});
    const auto& gamma = params["body.groups.0.bn1.weight"];
    auto before = gamma.clone();
    opt.zero_grad();
    model->forward(x).mean().backward();
    opt.step();
    CHECK((gamma - before).abs().max().item<double>() > 0);
    CHECK(torch::equal(params["body.groups.2.bn1.weight"], gamma));
    // Each path's graph (what certify bounds) against its forward, with the shared
    // BatchNorm: the registry-wide test "every MoE-CNN backbone: each path's graph …".
  }
  // The manifest names the layout; a file without the field has per-group BatchNorm.
  auto spec = moe_cnn_spec("resnet18", 2, 0.25);
  spec.shared_batch_norm = true;
  auto j = spec.to_json();
  CHECK(j["batch_norm"] == "shared");
  CHECK(ModelSpec::from_json(j).shared_batch_norm);
  j.erase("batch_norm");
  CHECK_FALSE(ModelSpec::from_json(j).shared_batch_norm);
  j["batch_norm"] = "pooled";
  CHECK_THROWS_WITH(ModelSpec::from_json(j), Catch::Contains("batch_norm"));
  auto flat = ModelSpec();
  flat.shared_batch_norm = true;
  CHECK_THROWS_WITH(flat.validate(), Catch::Contains("moe-cnn"));
}
