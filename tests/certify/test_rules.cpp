// Per-rule soundness: every rule's interval bounds, CROWN step, operator norm,
// Jacobian step and float32 error bound enclose what 10^4 sampled points of a random
// small layer do; and a hand-worked example per rule with its numbers written out.
// The transformer rules' own tests are in test_rules_transformer.cpp.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "moecert/error.h"
#include "moecert/rules.h"
#include "rules_helpers.h"

using namespace moecert;
using namespace moecert_test::rules_helpers;

namespace {

/// A random small layer of a kind, with the shape of its input.
struct Case {
  std::string name;
  Layer layer;
  Shape in;
};

std::vector<Case> cases() {
  torch::manual_seed(11);
  std::vector<Case> c;
  c.push_back({"channel_affine",
               Layer::affine("bn", torch::randn({3}, f64), torch::randn({3}, f64),
                             torch::rand({3}, f64) + 1),
               {3, 5, 5}});
  c.push_back({"conv s1",
               Layer::conv2d("conv", torch::randn({4, 3, 3, 3}, f64), torch::randn({4}, f64), 1, 1),
               {3, 6, 6}});
  c.push_back({"conv s2",
               Layer::conv2d("conv", torch::randn({4, 2, 3, 3}, f64), torch::randn({4}, f64), 2, 1),
               {2, 7, 7}});
  c.push_back(
      {"linear", Layer::dense("fc", torch::randn({5, 7}, f64), torch::randn({5}, f64)), {7}});
  c.push_back({"relu", Layer::simple(Layer::Kind::relu), {3, 4, 4}});
  c.push_back({"flatten", Layer::simple(Layer::Kind::flatten), {2, 3, 3}});
  c.push_back({"global_avgpool", Layer::simple(Layer::Kind::global_avgpool), {3, 4, 4}});
  c.push_back({"maxpool 2/2", Layer::max_pool("pool", 2, 2, 0), {2, 6, 6}});
  c.push_back({"maxpool 3/2 pad 1", Layer::max_pool("pool", 3, 2, 1), {2, 5, 5}});
  // Transformer operators (single-input ones; the attention products are tested below).
  c.push_back({"linear on tokens",
               Layer::dense("fc", torch::randn({5, 7}, f64), torch::randn({5}, f64)),
               {3, 7}});
  c.push_back({"tokens",
               Layer::tokens_of("pos", torch::randn({4}, f64), torch::randn({5, 4}, f64)),
               {4, 2, 2}});
  {
    Layer sel = Layer::simple(Layer::Kind::token_select, "cls");
    sel.kernel = 1;
    c.push_back({"token_select", sel, {3, 4}});
  }
  c.push_back({"layernorm",
               Layer::layer_norm("ln", torch::randn({6}, f64), torch::randn({6}, f64),
                                 static_cast<float>(1e-5)),
               {3, 6}});
  c.push_back({"gelu", Layer::simple(Layer::Kind::gelu), {3, 5}});
  c.push_back({"softmax", Layer::simple(Layer::Kind::softmax), {2, 5}});
  return c;
}

}  // namespace

TEST_CASE("every rule's interval bounds enclose 10^4 sampled outputs",
          "[soundness][certify][rules]") {
  for (const auto& k : cases()) {
    INFO(k.name);
    const auto& rule = rule_for(k.layer);
    auto g = region(k.in);
    auto y = rule.forward(k.layer, {g.points});
    auto b = rule.bounds(k.layer, {&g.in});
    auto lo = b.lo.repeat_interleave(kPerSample, 0), hi = b.hi.repeat_interleave(kPerSample, 0);
    const double tol = 1e-12 * (1 + y.abs().max().item<double>());
    CHECK((y >= lo - tol).all().item<bool>());
    CHECK((y <= hi + tol).all().item<bool>());
    CHECK((b.mag.repeat_interleave(kPerSample, 0) >= y.abs() - tol).all().item<bool>());
  }
}

TEST_CASE("training's interval-only bounds: certification's interval, differentiable, in float32",
          "[soundness][certify][rules][certified]") {
  for (const auto& k : cases()) {
    INFO(k.name);
    const auto& rule = rule_for(k.layer);
    auto g = region(k.in);
    auto full = rule.bounds(k.layer, {&g.in});
    NodeBounds bare{g.in.lo, g.in.hi, {}, {}};
    auto b = rule.bounds(k.layer, {&bare});
    CHECK(!b.mag.defined());
    CHECK(!b.err32.defined());
    CHECK(torch::equal(b.lo, full.lo));
    CHECK(torch::equal(b.hi, full.hi));
    // float32 layer with autograd on, as certified training holds it
    Layer l = k.layer;
    for (auto* t : {&l.weight, &l.bias})
      if (t->defined()) *t = t->to(torch::kFloat32).detach().requires_grad_(true);
    NodeBounds in32{g.in.lo.to(torch::kFloat32), g.in.hi.to(torch::kFloat32), {}, {}};
    auto b32 = rule.bounds(l, {&in32});
    auto y = rule.forward(l, {g.points.to(torch::kFloat32)}).detach();
    auto lo = b32.lo.detach().repeat_interleave(kPerSample, 0),
         hi = b32.hi.detach().repeat_interleave(kPerSample, 0);
    const double tol = 1e-5 * (1 + y.abs().max().item<double>());
    CHECK((y >= lo - tol).all().item<bool>());
    CHECK((y <= hi + tol).all().item<bool>());
    if (l.weight.defined() && l.weight.requires_grad()) {
      (b32.hi - b32.lo).sum().backward();
      REQUIRE(l.weight.grad().defined());
      CHECK(torch::isfinite(l.weight.grad()).all().item<bool>());
    }
  }
}

TEST_CASE("float32 evaluation stays within every rule's err32", "[soundness][certify][rules]") {
  for (const auto& k : cases()) {
    INFO(k.name);
    // The layer as a float32 model holds it: float32 weights, float32 inputs.
    Layer l = k.layer;
    for (auto* t : {&l.weight, &l.bias, &l.shift_terms})
      if (t->defined()) *t = t->to(torch::kFloat32).to(torch::kFloat64);
    if (l.kind == Layer::Kind::channel_affine) l.shift_terms = l.bias.abs();
    auto g = region(k.in);
    g.in.lo = g.in.lo.to(torch::kFloat32).to(torch::kFloat64) - 1e-6;
    g.in.hi = g.in.hi.to(torch::kFloat32).to(torch::kFloat64) + 1e-6;
    auto pts = g.points.to(torch::kFloat32);
    const auto& rule = rule_for(l);
    auto b = rule.bounds(l, {&g.in});
    Layer l32 = l;
    for (auto* t : {&l32.weight, &l32.bias})
      if (t->defined()) *t = t->to(torch::kFloat32);
    auto exact = rule.forward(l, {pts.to(torch::kFloat64)});
    auto fast = rule.forward(l32, {pts}).to(torch::kFloat64);
    auto err = b.err32.repeat_interleave(kPerSample, 0);
    CHECK(((fast - exact).abs() <= err + 1e-300).all().item<bool>());
  }
}

TEST_CASE("err32 also covers errors the input already carries", "[soundness][certify][rules]") {
  for (const auto& k : cases()) {
    INFO(k.name);
    Layer l = k.layer;
    for (auto* t : {&l.weight, &l.bias, &l.shift_terms})
      if (t->defined()) *t = t->to(torch::kFloat32).to(torch::kFloat64);
    if (l.kind == Layer::Kind::channel_affine) l.shift_terms = l.bias.abs();
    auto g = region(k.in);
    // Every input entry off by up to e (plus its float32 rounding).
    const double e = 1e-3;
    g.in.err32 = torch::full_like(g.in.lo, e + 1e-5);
    g.in.mag = g.in.mag + 1e-5;
    const auto& rule = rule_for(l);
    auto b = rule.bounds(l, {&g.in});
    Layer l32 = l;
    for (auto* t : {&l32.weight, &l32.bias})
      if (t->defined()) *t = t->to(torch::kFloat32);
    auto off = g.points + e * (2 * torch::rand_like(g.points) - 1).sign();
    auto exact = rule.forward(l, {g.points});
    auto fast = rule.forward(l32, {off.to(torch::kFloat32)}).to(torch::kFloat64);
    CHECK(((fast - exact).abs() <= b.err32.repeat_interleave(kPerSample, 0)).all().item<bool>());
  }
}

TEST_CASE("every rule's CROWN step gives a lower bound at 10^4 sampled points",
          "[soundness][certify][rules]") {
  for (const auto& k : cases()) {
    INFO(k.name);
    const auto& rule = rule_for(k.layer);
    const Shape out = rule.out_shape(k.layer, {k.in});
    auto g = region(k.in);
    auto c = dense_rows(out, 3);
    auto b = torch::zeros({c.A.size(0)}, f64);
    const std::vector<Shape> in_shapes{k.in};
    auto args = dense_args(k.layer, in_shapes, out, {&g.in}, c);
    auto ins = rule.backward(args, c, b);
    REQUIRE(ins.size() == 1);
    {  // without autograd the ReLU step runs as one fused pass: the same numbers
      torch::NoGradGuard ng;
      auto b2 = torch::zeros_like(b);
      auto fused = rule.backward(args, c, b2).at(0);
      CHECK((fused.A - ins[0].A).abs().max().item<double>() < 1e-12);
      CHECK((b2 - b).abs().max().item<double>() < 1e-12);
    }
    // For every sampled z of sample s and row r of s: Σ A_r·f(z) >= Σ A_in,r·z + b_r.
    auto y = rule.forward(k.layer, {g.points}).view({kBatch, kPerSample, -1});
    auto z = g.points.view({kBatch, kPerSample, -1});
    auto A = c.A.view({kBatch, 3, -1}), Ain = ins[0].A.reshape({kBatch, 3, -1});
    auto lhs = torch::matmul(y, A.transpose(1, 2));  // [B, P, 3]
    auto rhs = torch::matmul(z, Ain.transpose(1, 2)) + b.view({kBatch, 1, 3});
    CHECK((lhs >= rhs - 1e-9 * (1 + lhs.abs())).all().item<bool>());
    if (!rule.relaxed())
      CHECK((lhs - rhs).abs().max().item<double>() < 1e-9 * (1 + lhs.abs().max().item<double>()));
  }
}

TEST_CASE("operator norms bound every sampled difference quotient", "[soundness][certify][rules]") {
  for (const auto& k : cases()) {
    INFO(k.name);
    const auto& rule = rule_for(k.layer);
    auto x1 = torch::randn(batched(5000, k.in), f64),
         x2 = x1 + 0.01 * torch::randn(batched(5000, k.in), f64);
    auto d_out = (rule.forward(k.layer, {x1}) - rule.forward(k.layer, {x2})).flatten(1);
    auto d_in = (x1 - x2).flatten(1);
    for (auto p : {Norm::linf, Norm::l2}) {
      auto norm = [&](const torch::Tensor& t) {
        return p == Norm::linf ? t.abs().amax(1) : t.norm(2, 1);
      };
      const double L = rule.lipschitz(k.layer, p, {k.in}, {1.0}, false);
      CHECK((norm(d_out) <= L * norm(d_in) * (1 + 1e-9)).all().item<bool>());
      // -> ∞ as a last layer
      const double Li = rule.lipschitz(k.layer, p, {k.in}, {1.0}, true);
      CHECK((d_out.abs().amax(1) <= Li * norm(d_in) * (1 + 1e-9)).all().item<bool>());
    }
  }
}

TEST_CASE("every rule's Jacobian step encloses sampled Jacobian rows",
          "[soundness][certify][rules]") {
  for (const auto& k : cases()) {
    INFO(k.name);
    const auto& rule = rule_for(k.layer);
    const Shape out = rule.out_shape(k.layer, {k.in});
    auto g = region(k.in);
    auto c = dense_rows(out, 2);
    const std::vector<Shape> in_shapes{k.in};
    auto args = dense_args(k.layer, in_shapes, out, {&g.in}, c);
    // Rows over the output as an interval c ± r (r > 0 on half the entries).
    auto r = torch::rand_like(c.A) * torch::rand_like(c.A).lt(0.5);
    if (!rule.has_jacobian()) {  // no Jacobian step: named refusal
      CHECK_THROWS_AS(rule.jacobian(args, {c.A, r}), UnsupportedLayerError);
      continue;
    }
    auto box = rule.jacobian(args, {c.A, r}).at(0);
    // A row v inside the output interval, pulled back by the true Jacobian at a point z.
    for (int t = 0; t < 50; ++t) {
      auto v = c.A + (2 * torch::rand_like(r) - 1) * r;
      auto pick =
          torch::randint(kPerSample, {kBatch}, torch::kLong) + torch::arange(kBatch) * kPerSample;
      auto z = g.points.index_select(0, pick).repeat_interleave(2, 0).requires_grad_(true);
      auto y = rule.forward(k.layer, {z});
      auto grad = torch::autograd::grad({(y * v).sum()}, {z})[0];
      CHECK(((grad - box.c).abs() <= box.r + 1e-9).all().item<bool>());
    }
  }
}

TEST_CASE("residual sum: bounds, CROWN step, norm and Jacobian of a + b",
          "[soundness][certify][rules]") {
  Layer res = Layer::simple(Layer::Kind::residual, "block");
  const auto& rule = rule_for(res);
  REQUIRE(rule.arity() == 2);
  auto a = region({2, 3, 3}), b = region({2, 3, 3});
  auto y = rule.forward(res, {a.points, b.points});
  auto nb = rule.bounds(res, {&a.in, &b.in});
  CHECK((y >= nb.lo.repeat_interleave(kPerSample, 0) - 1e-12).all().item<bool>());
  CHECK((y <= nb.hi.repeat_interleave(kPerSample, 0) + 1e-12).all().item<bool>());
  auto c = dense_rows({2, 3, 3}, 2);
  auto bias = torch::zeros({c.A.size(0)}, f64);
  const std::vector<Shape> ins{{2, 3, 3}, {2, 3, 3}};
  BackwardArgs args{res, ins, ins[0], {&a.in, &b.in}, {}, {}};
  auto back = rule.backward(args, c, bias);
  REQUIRE(back.size() == 2);
  CHECK(torch::equal(back[0].A, c.A));
  CHECK(torch::equal(back[1].A, c.A));
  CHECK(rule.lipschitz(res, Norm::l2, ins, {2.5, 1.0}, false) == 3.5);
  CHECK(rule_for(res).out_shape(res, ins) == ins[0]);
}

TEST_CASE("concat: bounds, CROWN step (dense and patches), norm and Jacobian of (a, b)",
          "[soundness][certify][rules]") {
  Layer cat = Layer::simple(Layer::Kind::concat, "dense1.0");
  const auto& rule = rule_for(cat);
  REQUIRE(rule.arity() == 0);
  const std::vector<Shape> ins{{2, 3, 3}, {3, 3, 3}};
  REQUIRE(rule.out_shape(cat, ins) == Shape{5, 3, 3});
  CHECK_THROWS_AS(rule.out_shape(cat, {{2, 3, 3}, {3, 4, 3}}), ShapeError);
  auto a = region(ins[0]), b = region(ins[1]);
  auto y = rule.forward(cat, {a.points, b.points});
  auto nb = rule.bounds(cat, {&a.in, &b.in});
  // (the points lie in their input boxes up to the rounding of lo + t·(hi − lo))
  CHECK((y >= nb.lo.repeat_interleave(kPerSample, 0) - 1e-12).all().item<bool>());
  CHECK((y <= nb.hi.repeat_interleave(kPerSample, 0) + 1e-12).all().item<bool>());
  CHECK((nb.mag.repeat_interleave(kPerSample, 0) >= y.abs() - 1e-12).all().item<bool>());
  // CROWN: Σ A·y = Σ A_a·a + Σ A_b·b exactly, at every sampled point.
  auto c = dense_rows({5, 3, 3}, 2);
  auto bias = torch::zeros({c.A.size(0)}, f64);
  BackwardArgs args{cat, ins, {5, 3, 3}, {&a.in, &b.in}, {}, {}};
  auto back = rule.backward(args, c, bias);
  REQUIRE(back.size() == 2);
  CHECK(back[0].A.sizes() == torch::IntArrayRef{c.A.size(0), 2, 3, 3});
  auto pick = torch::arange(kBatch).repeat_interleave(2) * kPerSample;  // one point per sample
  auto ya = y.index_select(0, pick), pa = a.points.index_select(0, pick),
       pb = b.points.index_select(0, pick);
  auto lhs = (c.A * ya).flatten(1).sum(1);
  auto rhs = (back[0].A * pa).flatten(1).sum(1) + (back[1].A * pb).flatten(1).sum(1);
  CHECK((lhs - rhs).abs().max().item<double>() < 1e-12);
  // Patch rows keep their geometry and split their channels.
  Coeffs p = c;
  p.patches = true, p.A = torch::randn({4, 5, 3, 3}, f64), p.kernel = 3, p.Ht = 3, p.Wt = 3;
  p.sample = torch::zeros({4}, torch::kLong), p.site = torch::arange(4);
  auto pb2 = rule.backward(args, p, bias);
  CHECK(torch::equal(torch::cat({pb2[0].A, pb2[1].A}, 1), p.A));
  CHECK(pb2[1].patches);
  CHECK(torch::equal(pb2[1].site, p.site));
  // ‖(a, b)‖_2 <= sqrt(k_a² + k_b²)·‖x‖, ‖(a, b)‖_∞ <= max(k_a, k_b)·‖x‖.
  CHECK(rule.lipschitz(cat, Norm::l2, ins, {3.0, 4.0}, false) == Approx(5.0));
  CHECK(rule.lipschitz(cat, Norm::linf, ins, {3.0, 4.0}, false) == 4.0);
  CHECK(rule.lipschitz(cat, Norm::l2, ins, {3.0, 4.0}, true) == 4.0);
  JacobianBox j{torch::randn({2, 5, 3, 3}, f64), torch::rand({2, 5, 3, 3}, f64)};
  auto jb = rule.jacobian(args, j);
  REQUIRE(jb.size() == 2);
  CHECK(torch::equal(torch::cat({jb[0].c, jb[1].c}, 1), j.c));
  CHECK(torch::equal(torch::cat({jb[0].r, jb[1].r}, 1), j.r));
  CHECK(rule.derivative(cat, DerivativeArgs{a.in}).has_value());
  // Three inputs, vectors: the features side by side.
  auto v = rule.forward(
      cat, {torch::ones({1, 2}, f64), torch::zeros({1, 1}, f64), torch::full({1, 2}, 2.0, f64)});
  CHECK(torch::equal(v, torch::tensor({{1.0, 1.0, 0.0, 2.0, 2.0}}, f64)));
}

TEST_CASE("hand-worked examples of each rule", "[unit][certify][rules]") {
  SECTION("ReLU on [-1, 3]: the chord 0.75 x + 0.75, lower slope 1 (u >= -l)") {
    Layer relu = Layer::simple(Layer::Kind::relu);
    NodeBounds in{torch::tensor({{-1.0, -2.0, 0.5}}, f64), torch::tensor({{3.0, 1.0, 2.0}}, f64),
                  torch::tensor({{3.0, 2.0, 2.0}}, f64), torch::zeros({1, 3}, f64)};
    Coeffs c;
    c.A = torch::tensor({{1.0, 1.0, 1.0}, {-2.0, -1.0, -1.0}}, f64);
    c.sample = torch::zeros({2}, torch::kLong);
    auto b = torch::zeros({2}, f64);
    const std::vector<Shape> ins{{3}};
    const Shape out_shape{3};
    auto a = dense_args(relu, ins, out_shape, {&in}, c);
    auto out = rule_for(relu).backward(a, c, b).at(0);
    // Row 1 (positive): unit 0 slope 1 (3 >= 1), unit 1 slope 0 (1 < 2), unit 2 active: 1.
    CHECK(out.A[0][0].item<double>() == 1.0);
    CHECK(out.A[0][1].item<double>() == 0.0);
    CHECK(out.A[0][2].item<double>() == 1.0);
    CHECK(b[0].item<double>() == 0.0);
    // Row 2 (negative): chords s = u/(u-l): 0.75 and 1/3, intercepts 0.75 and 2/3; active 1.
    CHECK(out.A[1][0].item<double>() == Approx(-1.5));
    CHECK(out.A[1][1].item<double>() == Approx(-1.0 / 3));
    CHECK(out.A[1][2].item<double>() == -1.0);
    CHECK(b[1].item<double>() == Approx(-2.0 * 0.75 - 1.0 * 2.0 / 3).epsilon(1e-12));
    CHECK(b[1].item<double>() <=
          -2.0 * 0.75 - 1.0 * 2.0 / 3);  // the rounding margin only lowers it
    auto nb = rule_for(relu).bounds(relu, {&in});
    CHECK(torch::equal(nb.lo, torch::tensor({{0.0, 0.0, 0.5}}, f64)));
    CHECK(torch::equal(nb.hi, torch::tensor({{3.0, 1.0, 2.0}}, f64)));
  }
  SECTION("linear [[1, -2], [3, 0.5]] + [1, -1] on x in [0, 1] x [-1, 1]") {
    Layer fc = Layer::dense("fc", torch::tensor({{1.0, -2.0}, {3.0, 0.5}}, f64),
                            torch::tensor({1.0, -1.0}, f64));
    NodeBounds in{torch::tensor({{0.0, -1.0}}, f64), torch::tensor({{1.0, 1.0}}, f64),
                  torch::tensor({{1.0, 1.0}}, f64), torch::zeros({1, 2}, f64)};
    auto nb = rule_for(fc).bounds(fc, {&in});
    // y1 = x1 - 2 x2 + 1 in [-1, 4]; y2 = 3 x1 + 0.5 x2 - 1 in [-1.5, 2.5]
    CHECK(nb.lo[0][0].item<double>() == Approx(-1.0));
    CHECK(nb.hi[0][0].item<double>() == Approx(4.0));
    CHECK(nb.lo[0][1].item<double>() == Approx(-1.5));
    CHECK(nb.hi[0][1].item<double>() == Approx(2.5));
    CHECK(rule_for(fc).lipschitz(fc, Norm::linf, {{2}}, {1.0}, false) == 3.5);  // max row ℓ1
    CHECK(rule_for(fc).lipschitz(fc, Norm::l2, {{2}}, {1.0}, true) == Approx(std::sqrt(9.25)));
  }
  SECTION("conv 1x1 kernel [[2]] with bias 1, and channel affine 0.5 x - 1") {
    Layer conv =
        Layer::conv2d("c", torch::full({1, 1, 1, 1}, 2.0, f64), torch::ones({1}, f64), 1, 0);
    Layer aff = Layer::affine("a", torch::full({1}, 0.5, f64), torch::full({1}, -1.0, f64));
    NodeBounds in{torch::full({1, 1, 2, 2}, -1.0, f64), torch::full({1, 1, 2, 2}, 2.0, f64),
                  torch::full({1, 1, 2, 2}, 2.0, f64), torch::zeros({1, 1, 2, 2}, f64)};
    auto y = rule_for(conv).bounds(conv, {&in});
    CHECK(y.lo.min().item<double>() == Approx(-1.0));
    CHECK(y.hi.max().item<double>() == Approx(5.0));
    auto z = rule_for(aff).bounds(aff, {&y});
    CHECK(z.lo.min().item<double>() == Approx(-1.5));
    CHECK(z.hi.max().item<double>() == Approx(1.5));
  }
  SECTION(
      "max-pool 2x2 of [[-1..2, 0..1], [-3..-2, 1..4]]: [1, 4]; lower row takes x_3 (lower bound "
      "1)") {
    Layer pool = Layer::max_pool("pool", 2, 2, 0);
    NodeBounds in{torch::tensor({-1.0, 0.0, -3.0, 1.0}, f64).view({1, 1, 2, 2}),
                  torch::tensor({2.0, 1.0, -2.0, 4.0}, f64).view({1, 1, 2, 2}),
                  torch::full({1, 1, 2, 2}, 4.0, f64), torch::zeros({1, 1, 2, 2}, f64)};
    const auto& rule = rule_for(pool);
    auto y = rule.bounds(pool, {&in});
    CHECK(y.lo.item<double>() == 1.0);
    CHECK(y.hi.item<double>() == 4.0);
    Coeffs c;
    c.A = torch::tensor({2.0, -3.0}, f64).view({2, 1, 1, 1});
    c.sample = torch::zeros({2}, torch::kLong);
    auto b = torch::zeros({2}, f64);
    const std::vector<Shape> ins{{1, 2, 2}};
    const Shape out_shape{1, 1, 1};
    auto a = dense_args(pool, ins, out_shape, {&in}, c);
    auto out = rule.backward(a, c, b).at(0);
    // 2·y >= 2·x_3 (the entry with the largest lower bound); −3·y >= −3·max u = −12.
    CHECK(out.A[0].flatten()[3].item<double>() == 2.0);
    CHECK(out.A[0].abs().sum().item<double>() == 2.0);
    CHECK(out.A[1].abs().sum().item<double>() == 0.0);
    CHECK(b[1].item<double>() == -12.0);
    CHECK(rule.lipschitz(pool, Norm::l2, ins, {1.0}, false) == 1.0);
    CHECK(rule.lipschitz(Layer::max_pool("p", 3, 2, 1), Norm::l2, {{1, 5, 5}}, {1.0}, false) ==
          2.0);
  }
  SECTION("global average pool of a 2x2 channel in [0, 4]: [0, 4]; p = 2 norm 1/2") {
    Layer pool = Layer::simple(Layer::Kind::global_avgpool);
    NodeBounds in{torch::zeros({1, 1, 2, 2}, f64), torch::full({1, 1, 2, 2}, 4.0, f64),
                  torch::full({1, 1, 2, 2}, 4.0, f64), torch::zeros({1, 1, 2, 2}, f64)};
    auto y = rule_for(pool).bounds(pool, {&in});
    CHECK(y.lo.item<double>() == 0.0);
    CHECK(y.hi.item<double>() == 4.0);
    CHECK(rule_for(pool).lipschitz(pool, Norm::l2, {{1, 2, 2}}, {1.0}, false) == 0.5);
  }
}

TEST_CASE("linear: one-hot rows (a unit's bound rows) step as the matrix product does",
          "[unit][certify][rules]") {
  torch::manual_seed(4);
  Layer fc = Layer::dense("fc", torch::randn({6, 9}, f64), torch::randn({6}, f64));
  NodeBounds in{torch::zeros({2, 9}, f64), torch::ones({2, 9}, f64), torch::ones({2, 9}, f64),
                torch::zeros({2, 9}, f64)};
  Coeffs rows;
  rows.A = torch::zeros({4, 6}, f64);
  rows.A.index_put_({0, 2}, 1.0), rows.A.index_put_({1, 5}, -1.0), rows.A.index_put_({2, 0}, 2.5),
      rows.A.index_put_({3, 2}, -0.5);
  rows.sample = torch::tensor({0, 0, 1, 1}, torch::kLong);
  auto b = torch::zeros({4}, f64);
  const std::vector<Shape> ins{{9}};
  const Shape out_shape{6};
  auto a = dense_args(fc, ins, out_shape, {&in}, rows);
  torch::NoGradGuard ng;
  auto out = rule_for(fc).backward(a, rows, b).at(0);
  CHECK(torch::equal(out.A, torch::matmul(rows.A, fc.weight)));
  CHECK(torch::allclose(b, torch::mv(rows.A, fc.bias)));
}

TEST_CASE("an unregistered layer kind is an error naming the layer and the fix",
          "[unit][certify][rules]") {
  Layer odd = Layer::simple(Layer::Kind::relu, "mystery");
  odd.kind = static_cast<Layer::Kind>(77);
  CHECK_THROWS_WITH(rule_for(odd), Catch::Contains("mystery") && Catch::Contains("registry.cpp"));
}
