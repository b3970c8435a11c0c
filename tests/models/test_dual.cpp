#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "moecert/dual.h"
#include "moecert/error.h"

using namespace moecert;

namespace {

Dual make_dual(double alpha) {
  torch::manual_seed(21);
  ModelSpec s;
  s.experts = 2;
  ModelSpec r = s;
  r.routing = Routing::soft, r.top_k = 2;
  return Dual(Moe(s), Moe(r), alpha);
}

}  // namespace

TEST_CASE("the dual-model is (1 - alpha) F_S + alpha F_R", "[unit][models]") {
  auto dual = make_dual(0.7);
  dual->eval();
  torch::NoGradGuard g;
  auto x = torch::rand({16, 1, 28, 28});
  auto expected = 0.3 * dual->standard().forward(x).exp() + 0.7 * dual->robust().forward(x).exp();
  CHECK((dual->forward(x).exp() - expected).abs().max().item<double>() < 1e-6);
  dual->set_alpha(1.0);
  CHECK(torch::equal(dual->forward(x), dual->robust().forward(x)));
  dual->set_alpha(0.0);
  CHECK(torch::equal(dual->forward(x), dual->standard().forward(x)));
  CHECK_THROWS_AS(dual->set_alpha(1.5), ConfigError);
}

TEST_CASE("dual-model attack targets combine both members", "[unit][models]") {
  auto dual = make_dual(0.6);
  dual->eval();
  auto subject = attack_subject(*dual);
  CHECK(subject.has_router);
  auto x = torch::rand({8, 1, 28, 28});
  torch::NoGradGuard g;
  for (auto t : {AttackTarget::whole, AttackTarget::experts, AttackTarget::router})
    CHECK((subject.target(t, x)(x) - dual->forward(x)).abs().max().item<double>() < 1e-6);
}

TEST_CASE("dual-model members must agree on shapes", "[unit][models]") {
  ModelSpec s, r;
  r.num_classes = 5;
  CHECK_THROWS_AS(Dual(Moe(s), Moe(r), 0.5), ConfigError);
}
