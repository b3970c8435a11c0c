// Linear bound propagation of the Jacobian (docs §16): the gate rule encloses its
// relation at 10^4 sampled (δ, x) and matches a hand-worked example; the relaxed
// Jacobian bounds every sampled gradient of every backbone, L∞ and L2, and beats the
// interval Jacobian; the theorem constant (logits up to a common shift) bounds every
// sampled softmax change and never exceeds the plain local constant.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "moecert/bounds.h"
#include "moecert/certify.h"
#include "moecert/models.h"
#include "test_nets.h"

using namespace moecert;
using moecert_test::nets;
using moecert_test::random_probe;

namespace {

auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

/// ‖v‖_q per row, q the dual of p. [N, ...] -> [N]
torch::Tensor dual_norm(const torch::Tensor& v, Norm p) {
  auto f = v.flatten(1);
  return p == Norm::linf ? f.abs().sum(1) : f.norm(2, 1);
}

/// A point of B_p(x, eps) ∩ [0, 1] per copy of x: random, scaled into the ball.
torch::Tensor random_point(const torch::Tensor& x, double eps, Norm p) {
  auto d = 2 * torch::rand_like(x) - 1;
  if (p == Norm::l2)
    d = d / d.flatten(1).norm(2, 1).view({-1, 1, 1, 1}) * torch::rand({x.size(0), 1, 1, 1}, f64);
  return (x + eps * d).clamp(0, 1);
}

/// The largest ‖C_s·J_h(z)‖_q over sampled z of each sample's region, and along
/// ascent of that norm. x: [B, ...], C: [B, S, K] -> [B, S]
torch::Tensor sampled_gradient_norms(const LayerGraph& g, const torch::Tensor& x,
                                     const torch::Tensor& C, double eps, Norm p) {
  const int64_t B = x.size(0), S = C.size(1);
  auto xr = x.repeat_interleave(S, 0);
  auto cr = C.reshape({B * S, -1});
  auto norms_at = [&](const torch::Tensor& z) {
    auto v = z.detach().requires_grad_(true);
    auto grad = torch::autograd::grad({(graph_forward(g, v) * cr).sum()}, {v})[0];
    return dual_norm(grad, p);
  };
  auto best = torch::zeros({B * S}, f64);
  for (int t = 0; t < 25; ++t) best = torch::max(best, norms_at(random_point(xr, eps, p)));
  return best.view({B, S});
}

}  // namespace

TEST_CASE("gate: interval bounds and CROWN step enclose 10^4 sampled (δ, x)",
          "[soundness][certify][rules]") {
  torch::manual_seed(3);
  const int64_t B = 4, P = 2500, U = 6;
  // Per unit: δ in {1}, {0} or [0, 1], and also a general [a, b] with negative a.
  auto kind = torch::randint(4, {B, U}, torch::kLong);
  auto a = torch::where(kind.eq(0), torch::ones({B, U}, f64), torch::zeros({B, U}, f64));
  auto b = torch::where(kind.eq(1), torch::zeros({B, U}, f64), torch::ones({B, U}, f64));
  a = torch::where(kind.eq(3), torch::full({B, U}, -0.5, f64), a);
  Layer gate = Layer::gate("g", a, b);
  auto c = torch::randn({B, U}, f64), r = torch::rand({B, U}, f64) * 2;
  NodeBounds in{c - r, c + r, c.abs() + r, torch::zeros({B, U}, f64)};
  const auto& rule = rule_for(gate);
  REQUIRE(rule.out_shape(gate, {{U}}) == Shape{U});
  // Samples: x in [l, u] (half at corners), δ in [a, b] (half at its ends).
  auto t = torch::rand({B, P, U}, f64), s = torch::rand({B, P, U}, f64);
  t = torch::where(torch::rand({B, P, 1}, f64).lt(0.5), t.round(), t);
  s = torch::where(torch::rand({B, P, 1}, f64).lt(0.5), s.round(), s);
  auto x = in.lo.unsqueeze(1) + t * (in.hi - in.lo).unsqueeze(1);
  auto delta = a.unsqueeze(1) + s * (b - a).unsqueeze(1);
  auto y = delta * x;  // [B, P, U]
  auto nb = rule.bounds(gate, {&in});
  CHECK((y >= nb.lo.unsqueeze(1) - 1e-12).all().item<bool>());
  CHECK((y <= nb.hi.unsqueeze(1) + 1e-12).all().item<bool>());
  CHECK((nb.mag.unsqueeze(1) >= y.abs()).all().item<bool>());
  Coeffs rows;
  rows.A = torch::randn({B * 3, U}, f64);
  rows.sample = torch::arange(B, torch::kLong).repeat_interleave(3);
  auto bias = torch::zeros({B * 3}, f64);
  BackwardArgs args{gate,
                    {{U}},
                    {U},
                    {&in},
                    [&](const torch::Tensor& v) { return v.index_select(0, rows.sample); },
                    {}};
  auto back = rule.backward(args, rows, bias).at(0);
  auto A = rows.A.view({B, 3, U}), Ain = back.A.view({B, 3, U});
  auto lhs = torch::matmul(y, A.transpose(1, 2)),
       rhs = torch::matmul(x, Ain.transpose(1, 2)) + bias.view({B, 1, 3});
  CHECK((lhs >= rhs - 1e-12 * (1 + lhs.abs())).all().item<bool>());
  // Exact units (a = b) pass the rows through unchanged.
  auto exact = a.eq(b).index_select(0, rows.sample);
  CHECK(torch::equal(back.A.masked_select(exact),
                     (rows.A * a.index_select(0, rows.sample)).masked_select(exact)));
}

TEST_CASE("gate: hand-worked chords of δ·x, δ in [0, 1], x in [-1, 3]", "[unit][certify][rules]") {
  // Hull of {(x, δx)}: vertices (-1, 0), (-1, -1), (3, 0), (3, 3).
  //   upper chord through (-1, 0) and (3, 3): y <= 0.75 x + 0.75
  //   lower chord through (-1, -1) and (3, 0): y >= 0.25 x - 0.75
  Layer gate = Layer::gate("g", torch::zeros({1, 1}, f64), torch::ones({1, 1}, f64));
  NodeBounds in{torch::full({1, 1}, -1.0, f64), torch::full({1, 1}, 3.0, f64),
                torch::full({1, 1}, 3.0, f64), torch::zeros({1, 1}, f64)};
  Coeffs rows;
  rows.A = torch::tensor({{2.0}, {-1.0}}, f64);
  rows.sample = torch::zeros({2}, torch::kLong);
  auto b = torch::zeros({2}, f64);
  BackwardArgs args{gate,
                    {{1}},
                    {1},
                    {&in},
                    [&](const torch::Tensor& v) { return v.index_select(0, rows.sample); },
                    {}};
  auto out = rule_for(gate).backward(args, rows, b).at(0);
  CHECK(out.A[0][0].item<double>() == Approx(0.5));    // 2 · 0.25
  CHECK(b[0].item<double>() == Approx(-1.5));          // 2 · (-0.75)
  CHECK(b[0].item<double>() <= -1.5);                  // rounding moves it outward only
  CHECK(out.A[1][0].item<double>() == Approx(-0.75));  // -1 · 0.75
  CHECK(b[1].item<double>() == Approx(-0.75));
  CHECK(b[1].item<double>() <= -0.75);
  auto nb = rule_for(gate).bounds(gate, {&in});
  CHECK(nb.lo.item<double>() == -1.0);
  CHECK(nb.hi.item<double>() == 3.0);
}

TEST_CASE("the relaxed Jacobian bounds every sampled gradient, for every backbone",
          "[soundness][certify][bounds]") {
  auto all = nets();
  all.pop_back();  // the max-pool graph has no relaxed Jacobian (tested below)
  for (const auto& net : all) {
    const BoundGraph g(net.graph, net.input);
    const int64_t K = g.output_shape()[0], B = 2;
    const auto probe = random_probe(net, K, B);
    auto x = probe.x, C = probe.C;
    for (auto p : {Norm::linf, Norm::l2}) {
      const double eps = p == Norm::linf ? 0.02 : 0.3;
      INFO(net.name << " p=" << norm_name(p));
      BoundOptions opt;
      opt.method = BoundMethod::ibp;
      auto pass = bound_forward(g, {x, torch::full({B}, eps, f64), p, true}, opt);
      auto interval = bound_jacobian_norms(pass, C);
      auto truth = sampled_gradient_norms(net.graph, x, C, eps, p);
      for (auto m : {BoundMethod::ibp, BoundMethod::crown}) {
        auto relaxed = bound_jacobian_relaxed(pass, C, m);
        REQUIRE(relaxed.defined());
        CHECK((relaxed >= truth * (1 - 1e-9)).all().item<bool>());
      }
      CHECK((interval >= truth * (1 - 1e-9)).all().item<bool>());
    }
  }
}

TEST_CASE("the relaxed Jacobian is tighter than the interval one on a cnn-s expert",
          "[unit][certify][bounds]") {
  const auto net = nets().at(0);
  const BoundGraph g(net.graph, net.input);
  auto x = torch::rand({4, 1, 28, 28}, f64);
  auto C = torch::randn({4, 5, 10}, f64);
  BoundOptions opt;
  opt.method = BoundMethod::ibp;
  auto pass = bound_forward(g, {x, torch::full({4}, 0.02, f64), Norm::linf, true}, opt);
  auto interval = bound_jacobian_norms(pass, C),
       relaxed = bound_jacobian_relaxed(pass, C, BoundMethod::crown);
  CHECK(relaxed.sum().item<double>() < 0.95 * interval.sum().item<double>());
  // At ε = 0 no unit is unstable: both are the exact gradient norm.
  auto at0 = bound_forward(g, {x, torch::zeros({4}, f64), Norm::linf, true}, opt);
  auto e1 = bound_jacobian_norms(at0, C), e2 = bound_jacobian_relaxed(at0, C, BoundMethod::crown);
  CHECK(((e1 - e2).abs() <= 1e-6 * e1).all().item<bool>());
}

TEST_CASE("a graph with max-pooling has no relaxed Jacobian (the interval one stays)",
          "[unit][certify][bounds]") {
  LayerGraph g{Layer::conv2d("c", torch::randn({2, 1, 3, 3}, f64), torch::randn({2}, f64), 1, 1),
               Layer::max_pool("p", 2, 2, 0), Layer::simple(Layer::Kind::flatten),
               Layer::dense("fc", torch::randn({3, 8}, f64), torch::randn({3}, f64))};
  const BoundGraph bg(g, {1, 4, 4});
  BoundOptions opt;
  opt.method = BoundMethod::ibp;
  auto x = torch::rand({1, 1, 4, 4}, f64);
  auto pass = bound_forward(bg, {x, torch::full({1}, 0.1, f64), Norm::linf, true}, opt);
  CHECK_FALSE(
      bound_jacobian_relaxed(pass, torch::randn({1, 2, 3}, f64), BoundMethod::crown).defined());
  auto L = lipschitz_local(g, Norm::linf, x, torch::full({1}, 0.1, f64), true);
  CHECK(L.item<double>() > 0);
}

TEST_CASE(
    "the theorem constant bounds sampled softmax changes and never exceeds the local constant",
    "[soundness][certify]") {
  const auto net = nets().at(0);
  torch::manual_seed(8);
  auto x = torch::rand({3, 1, 28, 28}, f64);
  for (auto p : {Norm::linf, Norm::l2}) {
    const double eps = p == Norm::linf ? 0.02 : 0.3;
    INFO("p=" << norm_name(p));
    auto e = torch::full({3}, eps, f64);
    auto K = lipschitz_local_shift(net.graph, p, x, e, true);
    auto L = lipschitz_local(net.graph, p, x, e, true);
    CHECK((K <= L).all().item<bool>());
    // For sampled pairs in the region: every softmax margin f^y − f^k and the
    // half-range of the logit change move by at most K·‖Δx‖_p.
    for (int t = 0; t < 20; ++t) {
      auto z1 = random_point(x, eps, p), z2 = random_point(x, eps, p);
      auto h1 = graph_forward(net.graph, z1), h2 = graph_forward(net.graph, z2);
      auto dx =
          p == Norm::linf ? (z1 - z2).flatten(1).abs().amax(1) : (z1 - z2).flatten(1).norm(2, 1);
      auto dh = h2 - h1;
      auto half_range = 0.5 * (std::get<0>(dh.max(1)) - std::get<0>(dh.min(1)));
      CHECK((half_range <= K * dx * (1 + 1e-9) + 1e-12).all().item<bool>());
      auto f1 = torch::softmax(h1, 1), f2 = torch::softmax(h2, 1);
      auto m1 = f1.unsqueeze(2) - f1.unsqueeze(1), m2 = f2.unsqueeze(2) - f2.unsqueeze(1);
      auto change = std::get<0>((m2 - m1).abs().flatten(1).max(1));
      CHECK((change <= K * dx * (1 + 1e-9) + 1e-12).all().item<bool>());
    }
  }
}
