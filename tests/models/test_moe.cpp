#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "moecert/error.h"
#include "moecert/models.h"

using namespace moecert;

namespace {

ModelSpec small_spec(int64_t E, Routing routing, int64_t k, const std::string& router = "linear") {
  ModelSpec s;
  s.experts = E, s.routing = routing, s.top_k = k, s.router = router;
  return s;
}

/// Batched log F against the per-sample reference (probability space).
double dispatch_error(const ModelSpec& spec, int64_t B) {
  torch::manual_seed(7);
  Moe model(spec);
  model->eval();
  torch::NoGradGuard g;
  auto x = torch::rand({B, spec.in_channels, spec.height, spec.width});
  auto batched = model->forward(x).exp();
  auto reference = moe_reference_probs(*model, x);
  return (batched - reference).abs().max().item<double>();
}

}  // namespace

TEST_CASE("batched dispatch equals the per-sample reference", "[unit][models]") {
  CHECK(dispatch_error(small_spec(4, Routing::soft, 4), 64) < 1e-5);
  CHECK(dispatch_error(small_spec(4, Routing::top_k, 1), 64) < 1e-5);
  CHECK(dispatch_error(small_spec(4, Routing::top_k, 2), 64) < 1e-5);
  CHECK(dispatch_error(small_spec(4, Routing::top_k, 4), 64) < 1e-5);
  CHECK(dispatch_error(small_spec(3, Routing::top_k, 2, "cnn"), 33) < 1e-5);
  CHECK(dispatch_error(small_spec(1, Routing::top_k, 1), 16) < 1e-5);
}

TEST_CASE("batched dispatch equals the reference for ResNet-18 experts", "[unit][models]") {
  ModelSpec s = small_spec(2, Routing::top_k, 1);
  s.expert = "resnet18", s.in_channels = 3, s.height = 32, s.width = 32;
  s.mean = {0.5, 0.5, 0.5}, s.std = {0.25, 0.25, 0.25};
  CHECK(dispatch_error(s, 6) < 1e-5);
}

TEST_CASE("F is a probability vector", "[unit][models]") {
  for (auto routing : {Routing::soft, Routing::top_k}) {
    torch::manual_seed(1);
    Moe model(small_spec(4, routing, 2));
    torch::NoGradGuard g;
    auto p = model->forward(torch::rand({32, 1, 28, 28})).exp();
    CHECK(p.min().item<double>() >= 0.0);
    CHECK((p.sum(1) - 1).abs().max().item<double>() < 1e-5);
  }
}

TEST_CASE("log F stays finite for extreme router logits", "[unit][models]") {
  torch::manual_seed(2);
  Moe model(small_spec(4, Routing::soft, 4));
  {
    torch::NoGradGuard g;
    auto fc = model->router()->named_parameters()["fc.weight"];
    fc.mul_(1e5);  // softmax weights underflow to exactly 0 for most experts
  }
  auto lp = model->forward(torch::rand({16, 1, 28, 28}));
  CHECK(torch::isfinite(lp).all().item<bool>());
  CHECK((lp.exp().sum(1) - 1).abs().max().item<double>() < 1e-5);
}

TEST_CASE("top-k computes only the selected experts", "[unit][models]") {
  // Expert 3 holds NaN weights and its router logit is pushed far down: if the
  // dispatch computed it (computed-then-masked), NaN would leak into F.
  torch::manual_seed(3);
  Moe model(small_spec(4, Routing::top_k, 2));
  torch::NoGradGuard g;
  model->router()->named_parameters()["fc.bias"][3] = -1e6;
  for (auto& p : model->expert(3).parameters()) p.fill_(std::numeric_limits<float>::quiet_NaN());
  auto lp = model->forward(torch::rand({32, 1, 28, 28}));
  CHECK(torch::isfinite(lp).all().item<bool>());
  auto routing = model->route(torch::rand({32, 1, 28, 28}));
  CHECK(routing.selected.ne(3).all().item<bool>());
}

TEST_CASE("top-1 passes a straight-through gradient to the router", "[unit][models]") {
  torch::manual_seed(4);
  Moe model(small_spec(4, Routing::top_k, 1));
  auto x = torch::rand({32, 1, 28, 28});
  auto y = torch::randint(10, {32}, torch::kLong);
  auto out = model->forward_full(x);
  CHECK(out.routing.log_w.abs().max().item<double>() == 0.0);  // weight exactly 1 forward
  torch::nll_loss(out.log_probs, y).backward();
  auto grad = model->router()->named_parameters()["fc.weight"].grad();
  REQUIRE(grad.defined());
  CHECK(grad.abs().sum().item<double>() > 0.0);
}

TEST_CASE("parameter names are stable checkpoint keys", "[unit][models]") {
  ModelSpec s = small_spec(2, Routing::top_k, 1);
  s.expert = "resnet18", s.in_channels = 3, s.height = 32, s.width = 32;
  s.mean = {0.5, 0.5, 0.5}, s.std = {0.25, 0.25, 0.25};
  Moe model(s);
  auto params = model->named_parameters();
  for (const char* key : {"router.fc.weight", "experts.0.conv1.weight", "experts.1.bn1.weight",
                          "experts.0.layer1.0.conv2.weight", "experts.0.layer2.0.shortcut.0.weight",
                          "experts.0.layer2.0.shortcut.1.bias", "experts.1.linear.weight"})
    CHECK(params.contains(key));
  CHECK(model->named_buffers().contains("experts.0.layer4.1.bn2.running_var"));
  CHECK(model->named_buffers().contains("mean"));
  Moe cnn(small_spec(4, Routing::top_k, 1));
  for (const char* key : {"experts.3.conv1.weight", "experts.3.conv2.bias", "experts.3.fc1.weight",
                          "experts.3.fc2.bias"})
    CHECK(cnn->named_parameters().contains(key));
}

TEST_CASE("a wrong-shape input is a ShapeError with exit code 2", "[unit][models]") {
  Moe model(small_spec(2, Routing::top_k, 1));
  try {
    model->forward(torch::rand({4, 3, 32, 32}));
    FAIL("no error");
  } catch (const ShapeError& e) {
    CHECK(e.exit_code() == 2);
    CHECK(std::string(e.what()).find("[4, 3, 32, 32]") != std::string::npos);
  }
}

TEST_CASE("invalid architectures are ConfigErrors", "[unit][models]") {
  CHECK_THROWS_AS(Moe(small_spec(2, Routing::top_k, 3)), ConfigError);
  ModelSpec s = small_spec(2, Routing::top_k, 1);
  s.expert = "vgg99";
  CHECK_THROWS_AS(Moe(s), ConfigError);
  auto j = small_spec(2, Routing::soft, 2).to_json();
  CHECK(ModelSpec::from_json(j).to_json() == j);
  j.erase("experts");
  CHECK_THROWS_AS(ModelSpec::from_json(j), ConfigError);
}

TEST_CASE("the cnn-s stem's custom backward equals LibTorch's convolution gradient",
          "[unit][models]") {
  torch::manual_seed(5);
  Moe model(small_spec(1, Routing::top_k, 1));
  auto x = torch::rand({8, 1, 28, 28});
  auto y = torch::randint(10, {8}, torch::kLong);
  auto params = model->named_parameters();
  // Reference: the same network written with plain torch::conv2d / linear.
  auto reference = [&](const torch::Tensor& in) {
    auto h = model->normalise(in);
    h = torch::relu(
        torch::conv2d(h, params["experts.0.conv1.weight"], params["experts.0.conv1.bias"], 2, 1));
    h = torch::relu(
        torch::conv2d(h, params["experts.0.conv2.weight"], params["experts.0.conv2.bias"], 2, 1));
    h = torch::relu(
        torch::linear(h.flatten(1), params["experts.0.fc1.weight"], params["experts.0.fc1.bias"]));
    return torch::log_softmax(
        torch::linear(h, params["experts.0.fc2.weight"], params["experts.0.fc2.bias"]), 1);
  };
  auto grads = [&](const std::function<torch::Tensor(const torch::Tensor&)>& f) {
    auto xr = x.clone().requires_grad_(true);
    std::vector<torch::Tensor> inputs{xr, params["experts.0.conv1.weight"],
                                      params["experts.0.conv1.bias"]};
    return torch::autograd::grad({torch::nll_loss(f(xr), y)}, inputs);
  };
  auto ours = grads([&](const torch::Tensor& in) { return model->forward(in); });
  auto ref = grads(reference);
  for (size_t i = 0; i < ours.size(); ++i) {
    INFO(i);
    CHECK((ours[i] - ref[i]).abs().max().item<double>() < 1e-6);
  }
}
