#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "fixtures.h"
#include "moecert/attacks.h"

using namespace moecert;
using moecert_test::synthetic;

namespace {

/// Max per-sample perturbation norm. [B, ...] -> scalar
double max_norm(const torch::Tensor& d, Norm norm) {
  auto flat = d.flatten(1);
  return (norm == Norm::linf ? flat.abs().amax(1) : flat.norm(2, 1)).max().item<double>();
}

}  // namespace

TEST_CASE("PGD stays in the eps-ball and in [0,1]", "[integration][attacks]") {
  auto& model = moecert_test::trained_moe();
  auto data = synthetic(64, 0, false);
  auto idx = torch::arange(64);
  // Push pixels to the box edges so that the [0,1] projection matters.
  auto x = (data.batch_images(idx) * 3 - 1).clamp(0, 1);
  auto y = data.batch_labels(idx);
  for (auto norm : {Norm::linf, Norm::l2}) {
    for (auto loss : {AttackLoss::ce, AttackLoss::margin}) {
      PgdConfig cfg;
      cfg.norm = norm, cfg.loss = loss;
      cfg.eps = norm == Norm::linf ? 0.1 : 1.5;
      cfg.step_size = cfg.eps / 2, cfg.steps = 5, cfg.restarts = 2;
      auto f = attack_target_fn(*model, AttackTarget::whole, x);
      auto x_adv = attack_pgd(f, x, y, cfg);
      CHECK(max_norm(x_adv - x, norm) <= cfg.eps * (1 + 1e-5));
      CHECK(x_adv.min().item<double>() >= 0.0);
      CHECK(x_adv.max().item<double>() <= 1.0);
      CHECK(max_norm(x_adv - x, norm) > cfg.eps * 0.5);  // it did move
    }
  }
  auto x_fgsm =
      attack_fgsm(attack_target_fn(*model, AttackTarget::whole, x), x, y, Norm::linf, 0.05);
  CHECK(max_norm(x_fgsm - x, Norm::linf) <= 0.05 + 1e-6);
}

TEST_CASE("PGD reduces the accuracy of a trained model", "[unit][attacks]") {
  auto& model = moecert_test::trained_dense();
  auto test = synthetic(400, 0, false);
  PgdConfig cfg;
  cfg.eps = 0.15, cfg.steps = 10, cfg.step_size = 0.04;
  auto r = attack_evaluate(*model, test, cfg, false, 128, torch::kCPU, false);
  CHECK(r.sa > 0.9);
  CHECK(r.ra < r.sa - 0.2);
  PgdConfig none = cfg;
  none.eps = 0, none.steps = 0;
  CHECK(attack_evaluate(*model, test, none, false, 128, torch::kCPU, false).ra == Approx(r.sa));
}

TEST_CASE("RA-R perturbs only the router input", "[unit][attacks]") {
  auto model = moecert_test::train_small(4, "st", 1, 3);
  auto data = synthetic(32, 0, false);
  auto x = data.batch_images(torch::arange(32));
  auto y = data.batch_labels(torch::arange(32));
  {
    torch::NoGradGuard g;
    for (auto& p : model->router()->parameters()) p.zero_();  // the router ignores its input
  }
  auto f = attack_target_fn(*model, AttackTarget::router, x);
  auto xa = (x + 0.1 * torch::randn_like(x)).clamp(0, 1).requires_grad_(true);
  auto grad = torch::autograd::grad({f(xa).sum()}, {xa}, {}, {}, /*allow_unused=*/true)[0];
  CHECK((!grad.defined() || grad.abs().max().item<double>() == 0.0));
  torch::NoGradGuard g;
  CHECK(torch::allclose(f(xa), model->forward(x)));  // experts still see the clean input
}

TEST_CASE("RA-E freezes the routing at the clean choice", "[unit][attacks]") {
  auto model = moecert_test::train_small(4, "st", 1, 5);
  auto data = synthetic(64, 0, false);
  auto x = data.batch_images(torch::arange(64));
  auto y = data.batch_labels(torch::arange(64));
  auto f = attack_target_fn(*model, AttackTarget::experts, x);
  PgdConfig cfg;
  cfg.eps = 0.3, cfg.steps = 5, cfg.step_size = 0.1;
  auto x_adv = attack_pgd(f, x, y, cfg);
  torch::NoGradGuard g;
  auto clean = model->route(x);
  auto moved = model->route(x_adv);
  // The attack moved the router's choice on the real model ...
  CHECK(moved.selected.ne(clean.selected).any().item<bool>());
  // ... but what RA-E evaluates is the experts under the clean routing.
  auto expected = model->forward_parts(x_adv, x_adv, &clean).log_probs;
  CHECK(torch::equal(f(x_adv), expected));
  // Changing the router's weights after the fact changes nothing in RA-E.
  for (auto& p : model->router()->parameters()) p.normal_();
  CHECK(torch::equal(f(x_adv), expected));
}
