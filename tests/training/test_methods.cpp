#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>

#include "fixtures.h"
#include "moecert/checkpoint.h"
#include "moecert/error.h"
#include "test_util.h"

using namespace moecert;
using moecert_test::synthetic;

namespace {

TrainConfig no_attack_config(const std::string& method) {
  TrainConfig cfg;
  cfg.method = method;
  cfg.balance = 0;  // the method's own loss, without the load-balancing term
  cfg.attack.eps = 0, cfg.attack.steps = 0, cfg.attack.random_start = false;
  return cfg;
}

/// A 4-expert model whose router ranks expert 1 first and expert 2 second for
/// every input (zero weights, fixed biases).
Moe fixed_router_model() {
  torch::manual_seed(11);
  ModelSpec spec;
  Moe model(spec);
  torch::NoGradGuard g;
  auto p = model->router()->named_parameters();
  p["fc.weight"].zero_();
  p["fc.bias"].copy_(torch::tensor({0.0f, 100.0f, 50.0f, 0.0f}));
  return model;
}

}  // namespace

TEST_CASE("kl_rows matches hand-computed values", "[unit][training]") {
  auto p = torch::tensor({{0.5, 0.5}, {1.0, 0.0}}).log();
  auto q = torch::tensor({{0.9, 0.1}, {0.5, 0.5}}).log();
  auto kl = kl_rows(p, q);
  // 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1) and 1 ln(1/0.5) (the 0 ln 0 term is 0).
  CHECK(kl[0].item<double>() == Approx(0.5 * std::log(0.5 / 0.9) + 0.5 * std::log(5.0)));
  CHECK(kl[1].item<double>() == Approx(std::log(2.0)));
}

TEST_CASE("load_balance_loss is 1 when balanced and larger when collapsed", "[unit][training]") {
  const double l3 = std::log(3.0);
  auto balanced = torch::tensor({{l3, 0.0}, {0.0, l3}});
  auto collapsed = torch::tensor({{l3, 0.0}, {l3, 0.0}});
  CHECK(load_balance_loss(balanced).item<double>() == Approx(1.0));   // 2 (0.5·0.5 + 0.5·0.5)
  CHECK(load_balance_loss(collapsed).item<double>() == Approx(1.5));  // 2 (1 · 0.75)
}

TEST_CASE("RT-ER's KL term involves only each sample's second-ranked expert", "[unit][training]") {
  auto model = fixed_router_model();
  auto data = synthetic(16, 0, false);
  auto x = data.batch_images(torch::arange(16)), y = data.batch_labels(torch::arange(16));
  PgdConfig attack;
  attack.eps = 0.2, attack.steps = 3, attack.step_size = 0.1;
  auto reg = rter_regulariser(*model, x, y, attack);
  CHECK(reg.item<double>() > 0.0);
  reg.backward();
  auto grad_norm = [&](int64_t i) {
    double n = 0;
    for (auto& p : model->expert(i).parameters())
      if (p.grad().defined()) n += p.grad().abs().sum().item<double>();
    return n;
  };
  CHECK(grad_norm(2) > 0.0);  // expert 2 is everyone's second choice
  CHECK(grad_norm(0) == 0.0);
  CHECK(grad_norm(1) == 0.0);  // the top expert is not regularised
  CHECK(grad_norm(3) == 0.0);
  for (auto& p : model->router()->parameters()) CHECK(!p.grad().defined());
  // With a zero-radius attack the adversarial point is the clean one: KL = 0.
  PgdConfig none;
  none.eps = 0, none.steps = 0, none.random_start = false;
  CHECK(rter_regulariser(*model, x, y, none).item<double>() == 0.0);
}

TEST_CASE("with a zero-radius attack every method's loss is the clean CE", "[unit][training]") {
  auto model = fixed_router_model();
  auto data = synthetic(32, 0, false);
  auto x = data.batch_images(torch::arange(32)), y = data.batch_labels(torch::arange(32));
  model->train();
  const double ce = torch::nll_loss(model->forward(x), y).item<double>();
  for (const char* m : {"st", "at", "trades", "rt-er"}) {
    auto cfg = no_attack_config(m);
    auto s = train_method_make(m)->step(*model, x, y, cfg);
    INFO(m);
    CHECK(s.loss.item<double>() == Approx(ce).epsilon(1e-6));
    CHECK(s.clean_correct >= 0);
    REQUIRE(s.usage_clean.defined());
    CHECK(s.usage_clean[1].item<int64_t>() == 32);  // the router sends all to expert 1
  }
}

TEST_CASE("TRADES' attack raises the KL term", "[integration][training]") {
  auto& model = moecert_test::trained_moe();
  auto data = synthetic(64, 0, false);
  auto x = data.batch_images(torch::arange(64)), y = data.batch_labels(torch::arange(64));
  auto cfg = no_attack_config("trades");
  cfg.attack.eps = 0.1, cfg.attack.steps = 5, cfg.attack.step_size = 0.03;
  cfg.attack.random_start = true;
  const double ce = [&] {
    model->train();
    return torch::nll_loss(model->forward(x), y).item<double>();
  }();
  auto s = train_method_make("trades")->step(*model, x, y, cfg);
  CHECK(s.loss.item<double>() > ce + 1e-3);  // β · KL > 0
  model->eval();
}

TEST_CASE("a NaN router score stops training naming the tensor", "[unit][training]") {
  auto train = synthetic(128, 0), val = synthetic(32, 0, false);
  ModelSpec spec;
  spec.experts = 2;
  Moe model(spec);
  {
    torch::NoGradGuard g;
    model->router()->named_parameters()["fc.bias"][0] = std::numeric_limits<float>::quiet_NaN();
  }
  auto cfg = no_attack_config("st");
  cfg.epochs = 1, cfg.log_every = 0;
  try {
    train_run(*model, train, val, cfg, nlohmann::json::object(), torch::kCPU);
    FAIL("no error");
  } catch (const NumericError& e) {
    CHECK(std::string(e.what()).find("router logits") != std::string::npos);
    CHECK(std::string(e.what()).find("epoch 1, step 1") != std::string::npos);
  }
}

TEST_CASE("training records expert usage and keeps the best epoch", "[unit][training]") {
  moecert_test::TempDir tmp;
  auto train = synthetic(300, 0), val = synthetic(64, 0, false);
  ModelSpec spec;
  spec.experts = 3;
  Moe model(spec);
  TrainConfig cfg;
  cfg.method = "rt-er", cfg.epochs = 2, cfg.batch_size = 64, cfg.log_every = 0;
  cfg.balance = 0.01, cfg.keep_best = true, cfg.out_dir = tmp / "run";
  cfg.attack.eps = 0.1, cfg.attack.steps = 1, cfg.attack.step_size = 0.1;
  cfg.eval_attack = cfg.attack;
  auto summary = train_run(*model, train, val, cfg, nlohmann::json::object(), torch::kCPU);
  for (const auto& row : summary.history) {
    double total = 0;
    for (double v : row["expert_usage_clean"]) total += v;
    CHECK(total == Approx(1.0));
    CHECK(row["expert_usage_adv"].size() == 3);
  }
  auto best = checkpoint_read_manifest(tmp / "run-best");
  const int best_epoch = best["metrics"]["best_epoch"];
  const double best_ra = summary.history[static_cast<size_t>(best_epoch - 1)]["heldout_ra"];
  for (const auto& row : summary.history) CHECK(row["heldout_ra"].get<double>() <= best_ra);
}
