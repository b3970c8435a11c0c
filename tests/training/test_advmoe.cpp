#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "fixtures.h"
#include "moecert/error.h"
#include "moecert/training.h"

using namespace moecert;
using moecert_test::synthetic;

namespace {

Moe moe_cnn(uint64_t seed) {
  torch::manual_seed(seed);
  ModelSpec s;
  s.kind = "moe-cnn", s.experts = 2, s.scale = 0.5;
  return Moe(s);
}

TrainConfig advmoe_config() {
  TrainConfig cfg;
  cfg.method = "advmoe";
  cfg.attack.eps = 0.1, cfg.attack.steps = 2, cfg.attack.step_size = 0.05;
  return cfg;
}

std::vector<torch::Tensor> snapshot(const std::vector<torch::Tensor>& ps) {
  std::vector<torch::Tensor> out;
  for (auto& p : ps) out.push_back(p.detach().clone());
  return out;
}

bool unchanged(const std::vector<torch::Tensor>& before, const std::vector<torch::Tensor>& after) {
  for (size_t i = 0; i < before.size(); ++i)
    if (!torch::equal(before[i], after[i].detach())) return false;
  return true;
}

/// One optimizer step on `params` with the loss of `s`.
void sgd_step(const std::vector<torch::Tensor>& params, const StepStats& s) {
  torch::optim::SGD opt(params, torch::optim::SGDOptions(0.1));
  opt.zero_grad();
  s.loss.backward();
  opt.step();
}

}  // namespace

TEST_CASE("AdvMoE's router step does not change the experts", "[unit][training]") {
  auto model = moe_cnn(1);
  auto data = synthetic(64, 0);
  auto x = data.batch_images(torch::arange(64)), y = data.batch_labels(torch::arange(64));
  auto experts = snapshot(model->expert_parameters());
  auto router = snapshot(model->router_parameters());
  // Even an optimizer over *all* parameters moves only the router: the experts get no gradient.
  auto s = advmoe_router_step(*model, x, y, advmoe_config());
  sgd_step(model->parameters(), s);
  CHECK(unchanged(experts, model->expert_parameters()));
  CHECK_FALSE(unchanged(router, model->router_parameters()));
}

TEST_CASE("AdvMoE's expert step does not change the router", "[unit][training]") {
  auto model = moe_cnn(2);
  auto data = synthetic(64, 0);
  auto x = data.batch_images(torch::arange(64)), y = data.batch_labels(torch::arange(64));
  auto experts = snapshot(model->expert_parameters());
  auto router = snapshot(model->router_parameters());
  auto s = advmoe_expert_step(*model, x, y, advmoe_config());
  CHECK(s.adv_correct >= 0);
  CHECK(s.clean_correct >= 0);
  sgd_step(model->parameters(), s);
  CHECK(unchanged(router, model->router_parameters()));
  CHECK_FALSE(unchanged(experts, model->expert_parameters()));
}

TEST_CASE("AdvMoE's attack raises the output KL plus the router-score KL inside the ball",
          "[unit][training]") {
  auto model = moe_cnn(3);
  auto data = synthetic(64, 0);
  auto x = data.batch_images(torch::arange(64)), y = data.batch_labels(torch::arange(64));
  auto cfg = advmoe_config();
  cfg.attack.steps = 5, cfg.attack.step_size = 0.03;
  StepStats s;
  auto x_adv = advmoe_attack(*model, x, y, cfg, s);
  CHECK((x_adv - x).abs().max().item<double>() <= cfg.attack.eps + 1e-6);
  CHECK(x_adv.min().item<double>() >= 0.0);
  CHECK(x_adv.max().item<double>() <= 1.0);
  torch::NoGradGuard g;
  model->eval();
  auto objective = [&](const torch::Tensor& xp) {
    auto clean = model->forward_full(x), other = model->forward_full(xp);
    return (kl_rows(clean.log_probs, other.log_probs) +
            kl_rows(torch::log_softmax(clean.routing.logits, 1),
                    torch::log_softmax(other.routing.logits, 1)))
        .mean()
        .item<double>();
  };
  auto x_rand = (x + torch::empty_like(x).uniform_(-0.1, 0.1)).clamp(0, 1);
  CHECK(objective(x_adv) > objective(x_rand));
  // With a zero-radius attack the objective is zero: the clean point itself.
  cfg.attack.eps = 0, cfg.attack.steps = 0, cfg.attack.random_start = false;
  CHECK(objective(advmoe_attack(*model, x, y, cfg, s)) == Approx(0.0).margin(1e-7));
}

TEST_CASE("AdvMoE needs a router", "[unit][training]") {
  ModelSpec dense;
  dense.experts = 1;
  Moe model(dense);
  auto data = synthetic(8, 0);
  auto x = data.batch_images(torch::arange(8)), y = data.batch_labels(torch::arange(8));
  CHECK_THROWS_AS(advmoe_expert_step(*model, x, y, advmoe_config()), ConfigError);
  auto train = synthetic(64, 0), val = synthetic(16, 0, false);
  auto cfg = advmoe_config();
  cfg.epochs = 1, cfg.log_every = 0;
  CHECK_THROWS_WITH(train_run(*model, train, val, cfg, nlohmann::json::object(), torch::kCPU),
                    Catch::Contains("--experts >= 2"));
}

TEST_CASE("AdvMoE trains a MoE-CNN on the synthetic set", "[integration][training]") {
  auto model = moe_cnn(4);
  auto train = synthetic(1500, 0), val = synthetic(200, 0, false);
  auto cfg = advmoe_config();
  cfg.epochs = 3, cfg.batch_size = 64, cfg.log_every = 0;
  cfg.eval_attack = cfg.attack;
  auto summary = train_run(*model, train, val, cfg, nlohmann::json::object(), torch::kCPU);
  const auto& last = summary.history.back();
  CHECK(last.at("heldout_sa").get<double>() > 0.6);
  CHECK(last.at("heldout_ra").get<double>() > 0.2);
  // Both groups stay in use.
  auto usage = last.at("expert_usage_clean").get<std::vector<double>>();
  REQUIRE(usage.size() == 2);
  CHECK(usage[0] > 0.02);
  CHECK(usage[1] > 0.02);
}
