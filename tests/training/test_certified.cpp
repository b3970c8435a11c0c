// Certified training (ibp, crown-ibp): the training bound is the certificate's worst
// case, it encloses sampled MoE margins, the ε/κ/β schedule, gradients, and resume
// mid-ramp.
#include <catch2/catch.hpp>
#include <torch/torch.h>

#include "certify/forms.h"
#include "fixtures.h"
#include "moecert/error.h"
#include "moecert/train_bounds.h"
#include "test_util.h"

using namespace moecert;
using moecert_test::synthetic;

namespace {

/// A float64 copy of a model (the fixtures are float32 and shared).
Moe as_double(Moe& m) {
  Moe copy(m->spec());
  torch::NoGradGuard ng;
  auto src = m->named_parameters(), dst = copy->named_parameters();
  for (const auto& p : src) dst[p.key()].copy_(p.value());
  auto sb = m->named_buffers(), db = copy->named_buffers();
  for (const auto& b : sb) db[b.key()].copy_(b.value());
  copy->to(torch::kFloat64);
  copy->eval();
  return copy;
}

/// Margins h_y − h_k (k != y, other_classes order) of the expert the model's router
/// selects at x. x: [N, C, H, W] -> [N, K − 1]
torch::Tensor routed_margins(MoeImpl& m, const torch::Tensor& x, const torch::Tensor& y) {
  torch::NoGradGuard ng;
  const int64_t K = m.spec().num_classes;
  torch::Tensor h;
  if (m.num_experts() == 1) {
    h = m.expert_logits(0, x);
  } else {
    auto sel = m.router_logits(x).argmax(1);
    h = torch::zeros({x.size(0), K}, x.options());
    for (int64_t e = 0; e < m.num_experts(); ++e) {
      auto rows = sel.eq(e).nonzero().flatten();
      if (rows.numel()) h.index_copy_(0, rows, m.expert_logits(e, x.index_select(0, rows)));
    }
  }
  auto hy = h.gather(1, y.view({-1, 1}));
  return hy - h.gather(1, other_classes(y, K));
}

/// All of a data set's images as floats in [0, 1] and its labels.
std::pair<torch::Tensor, torch::Tensor> all_of(const Dataset& d) {
  auto idx = torch::arange(d.size(), torch::kLong);
  return {d.batch_images(idx), d.batch_labels(idx)};
}

TrainConfig certified_config(const std::string& method) {
  TrainConfig c;
  c.method = method;
  c.attack.eps = 0.1;
  return c;
}

}  // namespace

TEST_CASE("the IBP training bound equals the certificate's worst case (candidate form, IBP)",
          "[unit][training][certified]") {
  auto m = as_double(moecert_test::trained_moe());
  auto [x32, y] = all_of(synthetic(64, 3, false));
  auto x = x32.to(torch::kFloat64);
  for (double e : {0.01, 0.05}) {
    INFO("eps " << e);
    auto eps = torch::full({x.size(0)}, e, x.options());
    auto train = moe_certified_margins(*m, x, y, eps, /*beta=*/0.0);
    // certify's candidate form over the same regions, IBP, exact arithmetic
    std::vector<LayerGraph> experts;
    for (int64_t j = 0; j < m->num_experts(); ++j) experts.push_back(m->component_graph(j));
    auto graphs = forms::member_graphs(m->spec(), m->component_graph(-1), experts);
    InputDomain d{x, eps, Norm::linf, true};
    BoundOptions opt;
    opt.method = BoundMethod::ibp;
    auto pass = forms::member_prepare(graphs, d, y, opt, /*fp32=*/false);
    auto ev = forms::member_evaluate(pass, d, y);
    CHECK(torch::equal(train.possible, ev.possible));
    auto got = train.margin.detach().amin(1);
    auto diff = (got - ev.slack).abs() / (1 + ev.slack.abs());
    CHECK(diff.max().item<double>() < 1e-6);  // certify's rounding allowance (docs §11)
    // certify subtracts its rounding allowance: never above the training bound by more than it
    CHECK((ev.slack <= got + 1e-12).all().item<bool>());
  }
}

TEST_CASE("IBP and CROWN-IBP training bounds enclose sampled margins of the routed expert",
          "[soundness][training][certified]") {
  torch::manual_seed(5);
  for (auto* fixture : {&moecert_test::trained_moe(), &moecert_test::trained_dense()}) {
    auto m = as_double(*fixture);
    auto [x32, y] = all_of(synthetic(16, 4, false));
    auto x = x32.to(torch::kFloat64);
    const double e = 0.03;
    auto eps = torch::full({x.size(0)}, e, x.options());
    for (double beta : {0.0, 0.5, 1.0}) {
      INFO("experts " << m->num_experts() << ", beta " << beta);
      auto bound = moe_certified_margins(*m, x, y, eps, beta).margin.detach();
      // 400 points per sample: half on corners of the box, half inside, all in [0, 1]
      const int64_t P = 400;
      auto xr = x.repeat_interleave(P, 0), yr = y.repeat_interleave(P, 0);
      auto u = torch::rand_like(xr);
      auto corner = torch::rand({xr.size(0), 1, 1, 1}, x.options()).lt(0.5);
      u = torch::where(corner, u.round(), u);
      auto pts = ((xr - e) + u * 2 * e).clamp(0.0, 1.0);
      auto got = routed_margins(*m, pts, yr).view({x.size(0), P, -1});
      auto low = bound.unsqueeze(1);
      CHECK((got >= low - 1e-9 * (1 + got.abs())).all().item<bool>());
    }
    // CROWN-IBP and IBP differ (else the CROWN walk would not be exercised)
    auto a = moe_certified_margins(*m, x, y, eps, 0.0).margin, b = moe_certified_margins(*m, x, y, eps, 1.0).margin;
    CHECK((a - b).abs().max().item<double>() > 1e-6);
  }
}

TEST_CASE("the training bound's loss has finite gradients for every expert it bounds",
          "[unit][training][certified]") {
  torch::manual_seed(6);
  auto data = synthetic(32, 5, false);
  auto [images, labels] = all_of(data);
  ModelSpec s;
  s.experts = 3;
  s.mean = data.mean, s.std = data.std;
  Moe m(s);
  m->train();
  for (double e : {1e-9, 0.05}) {  // e -> 0: units with l = u (the relaxation's 0/0 guarded)
    for (double beta : {0.0, 1.0}) {
      INFO("eps " << e << ", beta " << beta);
      m->zero_grad();
      auto eps = torch::full({images.size(0)}, e);
      auto r = moe_certified_margins(*m, images, labels, eps, beta);
      auto z = torch::cat({torch::zeros({images.size(0), 1}), -r.margin}, 1);
      (torch::logsumexp(z, 1).mean() + torch::relu(-r.route_gap).mean()).backward();
      for (int64_t j = 0; j < 3; ++j) {
        if (!r.possible.select(1, j).any().item<bool>()) continue;
        for (const auto& p : m->expert(j).parameters()) {
          REQUIRE(p.grad().defined());
          CHECK(torch::isfinite(p.grad()).all().item<bool>());
        }
        CHECK(m->expert(j).parameters()[0].grad().abs().sum().item<double>() > 0);
      }
      // the route-margin term reaches the router
      for (const auto& p : m->router_parameters()) CHECK(torch::isfinite(p.grad()).all().item<bool>());
    }
  }
}

TEST_CASE("certified training's schedule: warm-up, linear ramps of eps, kappa and beta, then constant",
          "[unit][training][certified]") {
  auto c = certified_config("ibp");
  c.epochs = 10;  // 10 steps per epoch below
  c.certified.warmup = 1, c.certified.ramp = 4;
  auto at = [&](int64_t step) { return certified_schedule(c, step, 100); };
  CHECK(at(0).eps == 0);
  CHECK(at(9).eps == 0);
  CHECK(at(9).kappa == 1);
  CHECK(at(10).eps == 0);  // the ramp starts from 0
  CHECK(at(30).eps == Approx(0.05));
  CHECK(at(30).kappa == Approx(0.75));  // ibp: κ 1 -> 0.5 (Gowal et al.)
  CHECK(at(30).beta == 0);
  CHECK(at(50).eps == Approx(0.1));
  CHECK(at(99).eps == Approx(0.1));
  CHECK(at(99).kappa == Approx(0.5));
  // lengths are epochs, not shares: the same step of a longer run has the same values
  c.epochs = 20;
  CHECK(certified_schedule(c, 30, 200).eps == Approx(0.05));
  c.epochs = 10;
  c.method = "crown-ibp";  // κ 1 -> 0 and β 1 -> 0 (Zhang et al.)
  CHECK(at(5).beta == 1);
  CHECK(at(30).kappa == Approx(0.5));
  CHECK(at(30).beta == Approx(0.5));
  CHECK(at(70).kappa == Approx(0));
  CHECK(at(70).beta == Approx(0));
  c.certified.eps = 0.2, c.certified.kappa_end = 0.2;  // explicit radius and κ end
  CHECK(at(70).eps == Approx(0.2));
  CHECK(at(70).kappa == Approx(0.2));
  c.certified.ramp = 0;  // no ramp: the target straight after the warm-up
  CHECK(at(10).eps == Approx(0.2));
  c.certified.warmup = c.certified.ramp = -1;  // defaults: 5% and 25% of the epochs
  CHECK(at(4).eps == 0);
  CHECK(at(5).eps == 0);
  CHECK(at(30).eps == Approx(0.2));
  CHECK(at(18).eps == Approx(0.2 * 13 / 25.0));
  // bad schedules are refused, naming the option
  c.certified.warmup = 2, c.certified.ramp = std::nan("");
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("--eps-warmup/--eps-ramp"));
  c.certified.ramp = 5, c.certified.eps = 2;
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("--train-eps"));
  c.certified.eps = -1, c.certified.kappa_start = 1.5;
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("--kappa-start"));
  c.certified.kappa_start = 1, c.attack.norm = Norm::l2;
  CHECK_THROWS_WITH(c.validate(), Catch::Contains("--norm 2"));
  c.attack.norm = Norm::linf;
  CHECK_NOTHROW(c.validate());
}

TEST_CASE("certified training refuses soft and top-k > 1 routing with a clear error", "[unit][training][certified]") {
  auto data = synthetic(8, 1, false);
  auto [images, labels] = all_of(data);
  ModelSpec s;
  s.experts = 3, s.routing = Routing::soft;
  s.mean = data.mean, s.std = data.std;
  Moe m(s);
  auto eps = torch::full({8}, 0.1);
  CHECK_THROWS_WITH(moe_certified_margins(*m, images, labels, eps, 0.0), Catch::Contains("top-1"));
  // and training stops at its first step, also inside the warm-up (ε = 0)
  auto cfg = certified_config("ibp");
  cfg.epochs = 4, cfg.log_every = 0, cfg.batch_size = 8;
  const auto before = m->parameters()[0].clone();
  CHECK_THROWS_AS(train_run(*m, data, data, cfg, nlohmann::json::object(), torch::kCPU), ConfigError);
  CHECK(torch::equal(before, m->parameters()[0]));
}

TEST_CASE("ibp and crown-ibp raise the certified accuracy; resume mid-ramp equals the uninterrupted run",
          "[unit][training][certified]") {
  moecert_test::TempDir tmp;
  auto train = synthetic(1000, 0), val = synthetic(100, 0, false);
  auto run = [&](const std::string& method, const std::string& dir, int epochs, bool resume) {
    torch::manual_seed(31);
    ModelSpec s;
    s.experts = 2;
    s.mean = train.mean, s.std = train.std;
    Moe model(s);
    auto cfg = certified_config(method);
    cfg.epochs = epochs, cfg.batch_size = 64, cfg.log_every = 0, cfg.out_dir = dir;
    cfg.eval_attack.eps = 0.1, cfg.eval_attack.steps = 2, cfg.eval_attack.step_size = 0.05;
    // A constant learning rate and a ramp in epochs (epoch 1 warm-up, epochs 2-3 ramp):
    // a 2-epoch run stands for a 4-epoch run killed mid-ramp after epoch 2.
    cfg.schedule = "constant";
    cfg.certified.warmup = 1, cfg.certified.ramp = 2, cfg.certified.eps = 0.01;
    cfg.resume = resume;
    auto summary = train_run(*model, train, val, cfg, nlohmann::json::object(), torch::kCPU);
    return std::make_pair(model, summary);
  };
  // This set's pixel noise (σ = 0.2) and blended templates leave small margins: trained
  // at 0.01, checked at 0.002 (measured: ibp certifies 29.5 % there, st 2 %).
  auto eps = torch::full({val.size()}, 0.002);
  auto [vx, vy] = all_of(val);
  auto certified_count = [&, vx = vx, vy = vy](Moe& m) {
    m->eval();
    torch::NoGradGuard ng;
    return moe_certified_margins(*m, vx, vy, eps, 0.0).margin.amin(1).gt(0).sum().item<int64_t>();
  };
  const int64_t st_certified = certified_count(moecert_test::trained_dense());
  for (std::string method : {"ibp", "crown-ibp"}) {
    INFO(method);
    auto [full, summary] = run(method, tmp / (method + "-full"), 4, false);
    CHECK(summary.epochs_done == 4);
    CHECK(certified_count(full) > st_certified + 5);  // certified training certifies what st does not
    run(method, tmp / (method + "-part"), 2, false);  // "killed" after epoch 2, mid-ramp
    auto [resumed, rs] = run(method, tmp / (method + "-part"), 4, true);
    CHECK(rs.start_epoch == 2);
    auto a = full->named_parameters(), b = resumed->named_parameters();
    for (const auto& p : a) CHECK(torch::equal(p.value(), b[p.key()]));
  }
}
