#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "fixtures.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "moecert/model_io.h"
#include "test_util.h"

using namespace moecert;
using moecert_test::synthetic;

namespace {

std::vector<torch::Tensor> snapshot(torch::nn::Module& m) {
  std::vector<torch::Tensor> out;
  for (auto& p : m.parameters()) out.push_back(p.detach().clone());
  return out;
}

/// No gradient reached the module (undefined or all-zero after zero_grad()).
bool no_grad_reached(torch::nn::Module& m) {
  for (auto& p : m.parameters())
    if (p.grad().defined() && p.grad().abs().sum().item<double>() != 0.0) return false;
  return true;
}

bool unchanged(torch::nn::Module& m, const std::vector<torch::Tensor>& before) {
  auto now = m.parameters();
  for (size_t i = 0; i < now.size(); ++i)
    if (!torch::equal(now[i], before[i])) return false;
  return true;
}

TrainConfig jtd_config() {
  TrainConfig cfg;
  cfg.method = "jtdmoe", cfg.epochs = 1, cfg.batch_size = 64, cfg.log_every = 0;
  cfg.attack.eps = 0.1, cfg.attack.steps = 2, cfg.attack.step_size = 0.05;
  cfg.eval_attack = cfg.attack;
  return cfg;
}

}  // namespace

TEST_CASE("JTDMoE's steps each move only their own member", "[unit][training]") {
  torch::manual_seed(3);
  ModelSpec spec;
  spec.experts = 2;
  Dual dual(Moe{spec}, Moe{spec}, 0.7);
  auto data = synthetic(64, 0);
  auto x = data.batch_images(torch::arange(64)), y = data.batch_labels(torch::arange(64));
  for (double gamma : {0.0, 1.0}) {
    auto cfg = jtd_config();
    cfg.jtd_gamma = gamma;
    torch::optim::SGD opt_r(dual->robust().parameters(), 0.1),
        opt_s(dual->standard().parameters(), 0.1);

    auto standard_before = snapshot(dual->standard()), robust_before = snapshot(dual->robust());
    auto r = jtdmoe_robust_step(*dual, x, y, cfg);
    dual->zero_grad();
    r.loss.backward();
    CHECK(no_grad_reached(dual->standard()));
    opt_r.step();
    CHECK(unchanged(dual->standard(), standard_before));
    CHECK(!unchanged(dual->robust(), robust_before));

    standard_before = snapshot(dual->standard()), robust_before = snapshot(dual->robust());
    auto s = jtdmoe_standard_step(*dual, x, y, cfg);
    dual->zero_grad();
    s.loss.backward();
    CHECK(no_grad_reached(dual->robust()));
    opt_s.step();
    CHECK(unchanged(dual->robust(), robust_before));
    CHECK(!unchanged(dual->standard(), standard_before));
    CHECK((s.adv_correct >= 0) == (gamma > 0));
    // Every parameter requires gradients again after the steps.
    for (auto& p : dual->parameters()) CHECK(p.requires_grad());
  }
}

TEST_CASE("JTDMoE's standard loss is CE of the dual-model", "[unit][training]") {
  torch::manual_seed(4);
  ModelSpec spec;
  spec.experts = 2;
  Dual dual(Moe{spec}, Moe{spec}, 0.6);
  auto data = synthetic(32, 0);
  auto x = data.batch_images(torch::arange(32)), y = data.batch_labels(torch::arange(32));
  auto s = jtdmoe_standard_step(*dual, x, y, jtd_config());
  auto p = 0.4 * dual->standard().forward(x).exp() + 0.6 * dual->robust().forward(x).exp();
  CHECK(s.loss.item<double>() == Approx(torch::nll_loss(p.log(), y).item<double>()).epsilon(1e-5));
}

TEST_CASE("train_dual_run trains, checkpoints and reloads a dual-model", "[unit][training]") {
  moecert_test::TempDir tmp;
  torch::manual_seed(5);
  ModelSpec spec;
  spec.experts = 2;
  Dual dual(Moe{spec}, Moe{spec}, 0.8);
  auto cfg = jtd_config();
  cfg.epochs = 2, cfg.out_dir = tmp / "jtd";
  auto summary = train_dual_run(*dual, synthetic(256, 0), synthetic(64, 0, false), cfg,
                                nlohmann::json::object(), torch::kCPU);
  CHECK(summary.history.size() == 2);
  auto loaded = model_load(tmp / "jtd", torch::kCPU);
  REQUIRE(loaded.is_dual());
  CHECK(loaded.dual->alpha() == 0.8);
  auto x = torch::rand({4, 1, 28, 28});
  dual->eval();
  torch::NoGradGuard g;
  CHECK(torch::equal(loaded.dual->forward(x), dual->forward(x)));
  cfg.method = "at";
  CHECK_THROWS_AS(train_dual_run(*dual, synthetic(64, 0), synthetic(16, 0, false), cfg,
                                 nlohmann::json::object(), torch::kCPU),
                  ConfigError);
}
