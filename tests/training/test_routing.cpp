// Router training (issue: MoEs that use their experts): the top-2 router gradient,
// load balancing against collapse, a fixed router, and the routing health gate.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>

#include "fixtures.h"
#include "moecert/error.h"
#include "test_util.h"

using namespace moecert;
using moecert_test::synthetic;

namespace {

/// Two cnn-s experts whose outputs do not depend on the input (zero weights, logits
/// = their last bias) and a linear router with zero weights and biases g.
Moe constant_moe(const std::vector<float>& g,
                 const std::vector<std::vector<float>>& expert_logits) {
  ModelSpec spec;
  spec.experts = static_cast<int64_t>(g.size());
  spec.num_classes = static_cast<int64_t>(expert_logits[0].size());
  Moe model(spec);
  torch::NoGradGuard no_grad;
  auto r = model->router()->named_parameters();
  r["fc.weight"].zero_();
  r["fc.bias"].copy_(torch::tensor(g));
  for (int64_t i = 0; i < spec.experts; ++i) {
    auto p = model->expert(i).named_parameters();
    for (auto& kv : p) kv.value().zero_();
    p["fc2.bias"].copy_(torch::tensor(expert_logits[static_cast<size_t>(i)]));
  }
  return model;
}

std::vector<torch::Tensor> clones(const std::vector<torch::Tensor>& ps) {
  std::vector<torch::Tensor> out;
  for (const auto& p : ps) out.push_back(p.detach().clone());
  return out;
}

bool all_equal(const std::vector<torch::Tensor>& a, const std::vector<torch::Tensor>& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (!torch::equal(a[i], b[i].detach())) return false;
  return true;
}

TrainConfig quick_config(const std::string& method) {
  TrainConfig cfg;
  cfg.method = method, cfg.epochs = 1, cfg.batch_size = 64, cfg.log_every = 0;
  cfg.attack.eps = 0.1, cfg.attack.steps = 1, cfg.attack.step_size = 0.1;
  cfg.eval_attack = cfg.attack;
  return cfg;
}

}  // namespace

TEST_CASE("the top-2 router gradient favours the expert with the lower loss, not the selected one",
          "[unit][training]") {
  // Router logits g = (1, 0): expert 0 is selected. For class y = 0 expert 0 gives
  // f0_y = e^0 / (e^0 + e^1) and expert 1 gives f1_y = e^2 / (e^2 + 1): expert 1 is better.
  auto model = constant_moe({1.0f, 0.0f}, {{0.0f, 1.0f}, {2.0f, 0.0f}});
  auto x = torch::rand({3, 1, 28, 28});
  auto y = torch::zeros({3}, torch::kLong);
  const double a0 = 1 / (1 + std::exp(-1.0)), a1 = 1 - a0;  // softmax of the two best logits
  const double f0 = 1 / (1 + std::exp(1.0)), f1 = std::exp(2.0) / (std::exp(2.0) + 1);
  const double F2 = a0 * f0 + a1 * f1;
  auto router_bias_grad = [&](RouterGradient mode) {
    model->set_router_gradient(mode);
    model->train();
    model->zero_grad();
    auto lp = model->forward(x);
    // The forward value is the selected expert's output whatever the estimator.
    CHECK(lp.select(1, 0).exp()[0].item<double>() == Approx(f0).epsilon(1e-6));
    torch::nll_loss(lp, y).backward();
    return model->router()->named_parameters()["fc.bias"].grad().clone();
  };
  // L = −log F_y; ∂L/∂g0 = −ã0 ã1 (f0_y − f1_y) / F2_y, ∂L/∂g1 = −∂L/∂g0 (mean over identical
  // samples).
  auto top2 = router_bias_grad(RouterGradient::top2);
  const double expected = -a0 * a1 * (f0 - f1) / F2;
  CHECK(expected > 0);  // gradient descent lowers the selected expert's logit
  CHECK(top2[0].item<double>() == Approx(expected).epsilon(1e-5));
  CHECK(top2[1].item<double>() == Approx(-expected).epsilon(1e-5));
  // The unselected expert's parameters get no gradient: it only informs the router.
  for (auto& p : model->expert(1).parameters())
    CHECK((!p.grad().defined() || p.grad().abs().sum().item<double>() == 0));
  // The straight-through weight raises the selected expert whatever its quality:
  // ∂L/∂g0 = −a0 (1 − a0) < 0.
  auto st = router_bias_grad(RouterGradient::straight_through);
  CHECK(st[0].item<double>() == Approx(-a0 * a1).epsilon(1e-5));
  CHECK(st[0].item<double>() < 0);
  // Eval mode (attacks, evaluation) never pays for the second expert: same value, ST gradient.
  model->set_router_gradient(RouterGradient::top2);
  model->eval();
  model->zero_grad();
  torch::nll_loss(model->forward(x), y).backward();
  CHECK(model->router()->named_parameters()["fc.bias"].grad()[0].item<double>() ==
        Approx(-a0 * a1).epsilon(1e-5));
}

TEST_CASE("a training attack under top2 sees which of the two best experts is worse",
          "[unit][training]") {
  // Constant experts, so an input gradient can only come from the router; g0 = 1 + c·Σx,
  // g1 = 0. The selected expert 0 is the worse one for y = 0 (as above).
  auto model = constant_moe({1.0f, 0.0f}, {{0.0f, 1.0f}, {2.0f, 0.0f}});
  {
    torch::NoGradGuard g;
    auto p = model->router()->named_parameters();
    p["fc.weight"][0].fill_(0.01f);  // on normalised pixels 2x − 1
    p["fc.bias"][0] = 1.0f + 0.01f * 784;
  }
  auto x = torch::full({2, 1, 28, 28}, 0.0f);  // g = (1, 0) at x = 0, as in the hand computation
  auto y = torch::zeros({2}, torch::kLong);
  model->eval();
  FrozenParameters frozen(*model);
  auto input_grad = [&](bool relaxed) {
    model->set_attack_relaxation(relaxed);
    auto xr = x.clone().requires_grad_(true);
    torch::nll_loss(model->forward(xr), y).backward();
    model->set_attack_relaxation(false);
    return xr.grad().sum().item<double>();
  };
  // Relaxed: raising g0 keeps the sample on the worse expert, so the loss grows with Σx.
  CHECK(input_grad(true) > 0);
  // Straight-through always points the attack away from the selected expert — here
  // towards the better one: the direction that masks a healthy MoE from PGD.
  CHECK(input_grad(false) < 0);
  // The forward value does not change.
  model->set_attack_relaxation(true);
  torch::NoGradGuard ng;
  auto relaxed = model->forward(x);
  model->set_attack_relaxation(false);
  CHECK(torch::equal(relaxed, model->forward(x)));
}

TEST_CASE("load balancing drives a collapsed router back to mixed usage",
          "[integration][training]") {
  auto train = synthetic(1500, 0), val = synthetic(300, 0, false);
  auto run = [&](double balance) {
    torch::manual_seed(3);
    ModelSpec spec;
    spec.mean = train.mean, spec.std = train.std;
    Moe model(spec);
    {
      torch::NoGradGuard g;  // collapsed: expert 0 wins every input by a margin of 3
      model->router()->named_parameters()["fc.bias"].copy_(torch::tensor({3.0f, 0.0f, 0.0f, 0.0f}));
    }
    auto cfg = quick_config("st");
    cfg.epochs = 3, cfg.balance = balance;
    auto s = train_run(*model, train, val, cfg, nlohmann::json::object(), torch::kCPU);
    return s.heldout_usage;
  };
  const auto collapsed = run(0.0);
  const auto balanced = run(0.5);
  INFO("without balancing: " << collapsed.max_share() << ", with: " << balanced.max_share());
  CHECK(collapsed.max_share() > 0.9);
  CHECK(balanced.max_share() < 0.6);
  for (auto share : ExpertUsage::shares(balanced.clean)) CHECK(share > 0.05);
}

TEST_CASE("a fixed router (router-train none) keeps its parameters bit-identical",
          "[unit][training]") {
  auto train = synthetic(400, 0), val = synthetic(64, 0, false);
  torch::manual_seed(5);
  ModelSpec spec;
  spec.mean = train.mean, spec.std = train.std;
  Moe model(spec);
  const auto router_before = clones(model->router_parameters());
  const auto experts_before = clones(model->expert_parameters());
  for (const char* method : {"st", "at", "rt-er"}) {
    auto cfg = quick_config(method);
    cfg.router_train = "none", cfg.balance = 0.1;  // a balancing term must not move it either
    train_run(*model, train, val, cfg, nlohmann::json::object(), torch::kCPU);
    INFO(method);
    CHECK(all_equal(router_before, model->router_parameters()));
  }
  CHECK_FALSE(all_equal(experts_before, model->expert_parameters()));
  for (auto& p : model->router_parameters()) CHECK(p.requires_grad());  // restored afterwards
  auto cfg = quick_config("advmoe");
  cfg.router_train = "none";
  CHECK_THROWS_AS(cfg.validate(), ConfigError);
  cfg.router_train = "sometimes";
  CHECK_THROWS_AS(cfg.validate(), ConfigError);
}

TEST_CASE("the routing health gate fails naming the expert and exits 1", "[e2e][cli]") {
  moecert_test::TempDir tmp;
  // Four experts cannot all stay under a 20% share: the gate must fail, after the
  // checkpoint is written; at 100% it is off.
  const std::string train =
      "--dataset synthetic --samples 300 --quiet train --experts 4 --epochs 1 --steps 1 "
      "--eval-steps 1 --val-samples 64 --out " +
      (tmp / "m");
  auto fail = moecert_test::run_moecert(train + " --max-expert-share 0.2");
  CHECK(fail.code == 1);
  CHECK(fail.output.find("routing health: expert") != std::string::npos);
  CHECK(fail.output.find("--max-expert-share 20.0%") != std::string::npos);
  CHECK(moecert_test::run_moecert("info " + (tmp / "m")).code == 0);
  auto pass = moecert_test::run_moecert(train + " --force --max-expert-share 1");
  CHECK(pass.code == 0);
  CHECK(pass.output.find("held-out expert usage: clean ") != std::string::npos);
  auto info = moecert_test::run_moecert("info " + (tmp / "m"));
  CHECK(info.output.find("experts ") != std::string::npos);
  // attack: usage in the JSON, the same gate on the test set.
  const std::string attack = "--dataset synthetic --samples 40 --quiet attack " + (tmp / "m") +
                             " --suite pgd --steps 2 --no-components --json " + (tmp / "a.json");
  auto gate = moecert_test::run_moecert(attack + " --max-expert-share 0.2");
  CHECK(gate.code == 1);
  CHECK(gate.output.find("of the") != std::string::npos);
  auto j =
      nlohmann::json::parse(moecert_test::read_text(tmp / "a.json"));  // written before the gate
  int64_t total = 0;
  for (auto c : j["expert_usage"]["clean"]) total += c.get<int64_t>();
  CHECK(total == 40);
  CHECK(j["expert_usage"]["max_share"].get<double>() > 0.2);
  CHECK(moecert_test::run_moecert(attack + " --max-expert-share 1.5").code == 2);
  // The dead-expert gate: of four experts one takes at most 25%, so a 26% floor fails.
  auto floor = moecert_test::run_moecert(attack + " --min-expert-share 0.26");
  CHECK(floor.code == 1);
  CHECK(floor.output.find("less than --min-expert-share 26.0%") != std::string::npos);
  CHECK(moecert_test::run_moecert(attack + " --min-expert-share 0").code == 0);
  CHECK(moecert_test::run_moecert(attack + " --min-expert-share 1").code == 2);
  CHECK(moecert_test::run_moecert(train + " --force --router-train sometimes").code == 2);
}
