// Per-rule soundness: every rule's interval bounds, CROWN step, operator norm,
// Jacobian step and float32 error bound enclose what 10^4 sampled points of a random
// small layer do; and a hand-worked example per rule with its numbers written out.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <functional>

#include "moecert/error.h"
#include "moecert/rules.h"

using namespace moecert;

namespace {

auto f64 = torch::TensorOptions().dtype(torch::kFloat64);
constexpr int64_t kBatch = 4, kPerSample = 2500;  // 10^4 sampled points per check

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

std::vector<int64_t> batched(int64_t n, const Shape& s) {
  std::vector<int64_t> v{n};
  v.insert(v.end(), s.begin(), s.end());
  return v;
}

/// An input interval per sample (some entries of both signs) and points inside it.
struct Region {
  NodeBounds in;
  torch::Tensor points;  // [kBatch * kPerSample, *in]
};

Region region(const Shape& shape) {
  auto c = torch::randn(batched(kBatch, shape), f64), r = torch::rand(batched(kBatch, shape), f64);
  Region g;
  g.in = {c - r, c + r, (c.abs() + r), torch::zeros_like(c)};
  auto u = torch::rand(batched(kBatch * kPerSample, shape), f64);
  auto lo = g.in.lo.repeat_interleave(kPerSample, 0), hi = g.in.hi.repeat_interleave(kPerSample, 0);
  // Half of the points on the interval's corners (where relaxations are tight).
  auto corner = torch::rand({kBatch * kPerSample}, f64).lt(0.5);
  auto t = torch::where(corner.view(batched(-1, Shape(shape.size(), 1))), u.round(), u);
  g.points = lo + t * (hi - lo);
  return g;
}

/// Dense coefficient rows over the output: `rows` per sample.
Coeffs dense_rows(const Shape& out, int64_t rows) {
  Coeffs c;
  c.A = torch::randn(batched(kBatch * rows, out), f64);
  c.sample = torch::arange(kBatch, torch::kLong).repeat_interleave(rows);
  return c;
}

/// What a backward step of `l` sees for dense rows `c` (gathered by their samples). The
/// shapes are held by reference: they must outlive the result.
BackwardArgs dense_args(const Layer& l, const std::vector<Shape>& in_shapes, const Shape& out,
                        std::vector<const NodeBounds*> in, const Coeffs& c) {
  BackwardArgs a{l, in_shapes, out, std::move(in), {}, {}};
  a.gather = [sample = c.sample](const torch::Tensor& t) { return t.index_select(0, sample); };
  return a;
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

TEST_CASE("attention products: bounds and float32 error enclose sampled q·kᵀ and p·v",
          "[soundness][certify][rules]") {
  torch::manual_seed(5);
  const int64_t N = 3, D = 4, heads = 2;
  const double scale = static_cast<float>(1 / std::sqrt(2.0));
  Layer qk = Layer::attention_scores("attn.scores", heads, scale);
  Layer pv = Layer::attention_mix("attn.mix", heads);
  const auto &rs = rule_for(qk), &rm = rule_for(pv);
  REQUIRE(rs.arity() == 2);
  REQUIRE(rs.out_shape(qk, {{N, D}, {N, D}}) == Shape{heads, N, N});
  REQUIRE(rm.out_shape(pv, {{heads, N, N}, {N, D}}) == Shape{N, D});
  CHECK_THROWS_AS(rs.out_shape(qk, {{N, D}, {N, D + 1}}), ShapeError);
  CHECK_THROWS_AS(rm.out_shape(pv, {{heads + 1, N, N}, {N, D}}), ShapeError);
  CHECK_THROWS_AS(rs.out_shape(Layer::attention_scores("s", 3, scale), {{N, D}, {N, D}}),
                  ShapeError);
  const double e = 1e-4;
  for (int pass = 0; pass < 2; ++pass) {
    const bool scores = pass == 0;
    INFO((scores ? "attn_scores" : "attn_mix"));
    const Layer& l = scores ? qk : pv;
    const auto& rule = scores ? rs : rm;
    auto a = region(scores ? Shape{N, D} : Shape{heads, N, N}), b = region({N, D});
    auto y = rule.forward(l, {a.points, b.points});
    for (auto* r : {&a, &b}) r->in.err32 = torch::full_like(r->in.lo, e + 1e-5), r->in.mag += 1e-5;
    auto nb = rule.bounds(l, {&a.in, &b.in});
    const double tol = 1e-12 * (1 + y.abs().max().item<double>());
    CHECK((y >= nb.lo.repeat_interleave(kPerSample, 0) - tol).all().item<bool>());
    CHECK((y <= nb.hi.repeat_interleave(kPerSample, 0) + tol).all().item<bool>());
    CHECK((nb.mag.repeat_interleave(kPerSample, 0) >= y.abs() - tol).all().item<bool>());
    auto off = [&](const torch::Tensor& t) {
      return (t + e * (2 * torch::rand_like(t) - 1)).to(torch::kFloat32);
    };
    auto fast = rule.forward(l, {off(a.points), off(b.points)}).to(torch::kFloat64);
    CHECK(((fast - y).abs() <= nb.err32.repeat_interleave(kPerSample, 0)).all().item<bool>());
    // CROWN (McCormick's planes): for every sampled (a, b) of sample s and row r of s,
    // Σ A_r·y >= Σ A_a,r·a + Σ A_b,r·b + b_r. The Jacobian step refuses by name.
    const Shape out = rule.out_shape(l, {a.in.lo.sizes().slice(1).vec(), {N, D}});
    Coeffs c = dense_rows(out, 3);
    auto bias = torch::zeros({c.A.size(0)}, f64);
    const std::vector<Shape> in_shapes{a.in.lo.sizes().slice(1).vec(), {N, D}};
    auto args = dense_args(l, in_shapes, out, {&a.in, &b.in}, c);
    auto ins = rule.backward(args, c, bias);
    REQUIRE(ins.size() == 2);
    auto per = [&](const torch::Tensor& t) { return t.reshape({kBatch, kPerSample, -1}); };
    auto rows = [&](const torch::Tensor& t) { return t.reshape({kBatch, 3, -1}).transpose(1, 2); };
    auto lhs = torch::matmul(per(y), rows(c.A));
    auto rhs = torch::matmul(per(a.points), rows(ins[0].A)) +
               torch::matmul(per(b.points), rows(ins[1].A)) + bias.view({kBatch, 1, 3});
    CHECK((lhs >= rhs - 1e-9 * (1 + lhs.abs())).all().item<bool>());
    CHECK_THROWS_WITH(rule.jacobian(args, {c.A, c.A.abs()}),
                      Catch::Contains(l.name) && Catch::Contains("--estimator ibp"));
    CHECK(std::isinf(rule.lipschitz(l, Norm::linf, {}, {1.0, 1.0}, false)));
  }
}

TEST_CASE("softmax's CROWN lines hold on narrow, wide, overflowing and one-value rows",
          "[soundness][certify][rules]") {
  // Scales the generic test does not reach: widths of 1e-9 (the chord's narrow branch),
  // logits of ±300 with widths up to 600 (e^z past float64: the interval fallback),
  // near-points with differences of several hundred (S² past float64 while e^z is
  // not), and a row of one value (p = 1).
  torch::manual_seed(17);
  Layer sm = Layer::simple(Layer::Kind::softmax);
  struct Scale {
    double centre, width;
    int64_t n;
  };
  for (auto sc : {Scale{1, 1e-9, 6}, Scale{3, 1e-3, 6}, Scale{300, 600, 5}, Scale{200, 1e-6, 3},
                  Scale{40, 10, 7}, Scale{2, 1, 1}}) {
    INFO("centre " << sc.centre << ", width " << sc.width << ", n " << sc.n);
    const int64_t B = 3, P = 2000, R = 4;
    auto c = sc.centre * torch::randn({B, 2, sc.n}, f64);
    auto r = sc.width * torch::rand({B, 2, sc.n}, f64);
    NodeBounds in{c - r, c + r, (c.abs() + r), torch::zeros_like(c)};
    Coeffs rows;
    rows.A = torch::randn({B * R, 2, sc.n}, f64);
    rows.sample = torch::arange(B, torch::kLong).repeat_interleave(R);
    auto bias = torch::zeros({B * R}, f64);
    const std::vector<Shape> shapes{{2, sc.n}};
    const Shape out_shape{2, sc.n};
    auto args = dense_args(sm, shapes, out_shape, {&in}, rows);
    auto Ain = rule_for(sm).backward(args, rows, bias).at(0).A;
    REQUIRE(torch::isfinite(Ain).all().item<bool>());
    REQUIRE(torch::isfinite(bias).all().item<bool>());
    auto t = torch::rand({B, P, 2, sc.n}, f64);
    t = torch::where(torch::rand({B, P, 1, 1}, f64).lt(0.5), t.round(), t);
    auto x = (in.lo.unsqueeze(1) + t * (in.hi - in.lo).unsqueeze(1)).view({B * P, 2, sc.n});
    auto y = rule_for(sm).forward(sm, {x}).view({B, P, -1});
    auto A = rows.A.view({B, R, -1}).transpose(1, 2), Ai = Ain.view({B, R, -1}).transpose(1, 2);
    auto lhs = torch::matmul(y, A);
    auto rhs = torch::matmul(x.view({B, P, -1}), Ai) + bias.view({B, 1, R});
    CHECK((lhs >= rhs - 1e-12 * (1 + lhs.abs())).all().item<bool>());
  }
}

TEST_CASE("hand-worked examples of the transformer rules", "[unit][certify][rules]") {
  SECTION("softmax of x0 = 0, x1 in [0, ln 3]: p1 in [1/2, 3/4]") {
    Layer sm = Layer::simple(Layer::Kind::softmax);
    NodeBounds in{
        torch::tensor({{0.0, 0.0}}, f64), torch::tensor({{0.0, std::log(3.0)}}, f64), {}, {}};
    auto b = rule_for(sm).bounds(sm, {&in});
    CHECK(b.lo[0][1].item<double>() == Approx(0.5).epsilon(1e-14));
    CHECK(b.hi[0][1].item<double>() == Approx(0.75).epsilon(1e-14));
    CHECK(b.lo[0][0].item<double>() == Approx(0.25).epsilon(1e-14));
    CHECK(b.hi[0][0].item<double>() == Approx(0.5).epsilon(1e-14));
  }
  SECTION("softmax's CROWN lines for p0 on the same box (z = x1 − x0 in [0, ln 3])") {
    // S = 1 + e^z in [2, 4]. Below: chord slope α = 2/ln 3, β = 1, tangent of 1/S at
    // S0 = 3: p0 >= 2/3 − (2 + αz)/9. Above: tangent of e^z at t = ln 3/2 (E = √3), chord
    // of 1/S: p0 <= (6 − 1 − √3(1 + z − t))/8.
    Layer sm = Layer::simple(Layer::Kind::softmax);
    NodeBounds in{
        torch::tensor({{0.0, 0.0}}, f64), torch::tensor({{0.0, std::log(3.0)}}, f64), {}, {}};
    Coeffs c;
    c.A = torch::tensor({{1.0, 0.0}, {-1.0, 0.0}}, f64);
    c.sample = torch::zeros({2}, torch::kLong);
    auto bias = torch::zeros({2}, f64);
    const std::vector<Shape> shapes{{2}};
    const Shape out_shape{2};
    auto args = dense_args(sm, shapes, out_shape, {&in}, c);
    auto out = rule_for(sm).backward(args, c, bias).at(0).A;
    const double alpha = 2 / std::log(3.0), t = std::log(3.0) / 2, E = std::sqrt(3.0);
    CHECK(out[0][0].item<double>() == Approx(alpha / 9).epsilon(1e-9));
    CHECK(out[0][1].item<double>() == Approx(-alpha / 9).epsilon(1e-9));
    CHECK(bias[0].item<double>() == Approx(4.0 / 9).epsilon(1e-9));
    CHECK(out[1][0].item<double>() == Approx(-E / 8).epsilon(1e-9));
    CHECK(out[1][1].item<double>() == Approx(E / 8).epsilon(1e-9));
    CHECK(bias[1].item<double>() == Approx(-(5 - E * (1 - t)) / 8).epsilon(1e-9));
    CHECK(bias[0].item<double>() <= 4.0 / 9);  // the rounding widening only lowers bounds
  }
  SECTION("attn_scores' planes on one product: q in [1, 2], k in [-1, 3], s = 1/2") {
    // A = 1: q·k >= k_l q + q_l k − q_l k_l = −q + k + 1; A = −1: −q·k >= −(3q + k − 3).
    Layer qk = Layer::attention_scores("s", 1, 0.5);
    NodeBounds q{torch::tensor({{{1.0}}}, f64), torch::tensor({{{2.0}}}, f64), {}, {}};
    NodeBounds k{torch::tensor({{{-1.0}}}, f64), torch::tensor({{{3.0}}}, f64), {}, {}};
    Coeffs c;
    c.A = torch::tensor({1.0, -1.0}, f64).view({2, 1, 1, 1});
    c.sample = torch::zeros({2}, torch::kLong);
    auto bias = torch::zeros({2}, f64);
    BackwardArgs args{qk, {}, {1, 1, 1}, {&q, &k}, {}, {}};
    auto ins = rule_for(qk).backward(args, c, bias);
    CHECK(ins.at(0).A.flatten().allclose(torch::tensor({-0.5, -1.5}, f64)));
    CHECK(ins.at(1).A.flatten().allclose(torch::tensor({0.5, -0.5}, f64)));
    CHECK(bias.allclose(torch::tensor({0.5, 1.5}, f64)));
  }
  SECTION("layernorm of x0 in [0, 1], x1 in [2, 3]: variance >= 1/4, n0 in [-1, -1/sqrt(1+4eps)]") {
    // The variance (x1 − x0)²/4 is smallest at x0 = 1, x1 = 2; n = ∓1·sqrt(v/(v + ε)).
    const double eps = 1e-3;
    Layer ln = Layer::layer_norm("ln", torch::ones({2}, f64), torch::zeros({2}, f64), eps);
    NodeBounds in{torch::tensor({{0.0, 2.0}}, f64), torch::tensor({{1.0, 3.0}}, f64), {}, {}};
    auto b = rule_for(ln).bounds(ln, {&in});
    // d0 = (x0 − x1)/2 in [−3/2, −1/2]; v in [1/4, 9/4]: n0 >= −(3/2)/sqrt(1/4 + ε) clamps
    // to −sqrt(D − 1) = −1, n0 <= −(1/2)/sqrt(9/4 + ε).
    CHECK(b.lo[0][0].item<double>() == Approx(-1.0));
    CHECK(b.hi[0][0].item<double>() == Approx(-0.5 / std::sqrt(2.25 + eps)).epsilon(1e-8));
    CHECK(b.hi[0][1].item<double>() == Approx(1.0));
    // At the box's closest pair x = (1, 2) the output is (−1, 1)·sqrt(0.25/(0.25 + ε)):
    // inside the bounds.
    auto y = rule_for(ln).forward(ln, {torch::tensor({{1.0, 2.0}}, f64)});
    CHECK(y[0][0].item<double>() == Approx(-std::sqrt(0.25 / (0.25 + eps))));
    CHECK(y[0][0].item<double>() >= b.lo[0][0].item<double>());
  }
  SECTION("layernorm CROWN on a narrow box: nearly the Jacobian, below n at sampled points") {
    // x = (0, 1, 2, 3) ± 0.01: v = 1.25, n_0 = d_0/sqrt(v + ε) with ∂n_0/∂x ≈ (e_0 − 1/4)/σ
    // (the n_0 n_j/D term is small next to it only in part: compare within 30%).
    const double eps = 1e-5;
    Layer ln = Layer::layer_norm("ln", torch::ones({4}, f64), torch::zeros({4}, f64), eps);
    auto x0 = torch::tensor({{0.0, 1.0, 2.0, 3.0}}, f64);
    NodeBounds in{x0 - 0.01, x0 + 0.01, x0.abs() + 0.01, torch::zeros_like(x0)};
    Coeffs c;
    c.A = torch::tensor({{1.0, 0.0, 0.0, 0.0}}, f64);
    c.sample = torch::zeros({1}, torch::kLong);
    auto bias = torch::zeros({1}, f64);
    const std::vector<Shape> ins{{4}};
    const Shape out_shape{4};
    auto a = dense_args(ln, ins, out_shape, {&in}, c);
    auto back = rule_for(ln).backward(a, c, bias).at(0);
    CHECK(back.A.sum().item<double>() == Approx(0.0).margin(1e-12));  // a shift changes nothing
    const double sigma = std::sqrt(1.25 + eps);
    CHECK(back.A[0][0].item<double>() == Approx(0.75 / sigma).epsilon(0.3));
    auto pts = x0 + 0.01 * (2 * torch::rand({500, 4}, f64) - 1);
    auto n0 = rule_for(ln).forward(ln, {pts}).select(1, 0);
    auto line = (pts * back.A).sum(1) + bias;
    CHECK((line <= n0 + 1e-12).all().item<bool>());
    CHECK((n0 - line).max().item<double>() < 0.02);  // tight: the box is narrow
  }
  SECTION("gelu on [-1, 2]: the chord's slope (g(2) − g(−1))/3 and offsets around it") {
    Layer gelu = Layer::simple(Layer::Kind::gelu);
    const double g2 = 2 * 0.5 * (1 + std::erf(2 / std::sqrt(2.0))),
                 gm1 = -0.5 * (1 + std::erf(-1 / std::sqrt(2.0)));
    NodeBounds in{torch::tensor({{-1.0}}, f64), torch::tensor({{2.0}}, f64),
                  torch::tensor({{2.0}}, f64), torch::zeros({1, 1}, f64)};
    auto b = rule_for(gelu).bounds(gelu, {&in});
    CHECK(b.lo.item<double>() == -0.17);  // the minimum −0.16997 at −0.75 lies inside
    CHECK(b.hi.item<double>() == Approx(g2));
    Coeffs c;
    c.A = torch::tensor({{1.0}, {-1.0}}, f64);
    c.sample = torch::zeros({2}, torch::kLong);
    auto bias = torch::zeros({2}, f64);
    const std::vector<Shape> ins{{1}};
    const Shape out_shape{1};
    auto a = dense_args(gelu, ins, out_shape, {&in}, c);
    auto back = rule_for(gelu).backward(a, c, bias).at(0);
    const double k = (g2 - gm1) / 3;
    CHECK(back.A[0][0].item<double>() == Approx(k));
    CHECK(back.A[1][0].item<double>() == Approx(-k));
    // Both lines pass within the sampling slack of the chord's end points and stay
    // below / above g at its minimum.
    const double lo_off = bias[0].item<double>(), hi_off = -bias[1].item<double>();
    CHECK(lo_off <= gm1 + k);     // below g(−1) = gm1 on the line k·x + lo_off at x = −1
    CHECK(hi_off >= g2 - 2 * k);  // above g(2)
    CHECK(k * -0.7518 + lo_off <= -0.16997);
    // g − k·x is largest at the ends (0.5457) and about −0.027 near x = 0.3: the offsets
    // are those, up to the sampling slack 0.1·(3/32)² < 0.001.
    CHECK(hi_off == Approx(gm1 + k).margin(0.001));
    CHECK(lo_off < -0.02);
    CHECK(lo_off > -0.03);
  }
  SECTION("tokens: class token first, then the patches row by row, plus the position embedding") {
    Layer t = Layer::tokens_of("pos", torch::tensor({9.0}, f64),
                               torch::tensor({{0.5}, {0.0}, {0.0}, {1.0}}, f64));
    auto x = torch::tensor({1.0, 2.0, 3.0}, f64).view({1, 1, 1, 3});
    auto y = rule_for(t).forward(t, {x});
    CHECK(torch::equal(y, torch::tensor({{{9.5}, {1.0}, {2.0}, {4.0}}}, f64)));
  }
}

TEST_CASE("the local estimator names the rules without a Jacobian step", "[unit][certify][rules]") {
  LayerGraph g;
  g.add(Layer::layer_norm("blocks.0.norm1", torch::ones({4}, f64), torch::zeros({4}, f64), 1e-6));
  g.add(Layer::simple(Layer::Kind::gelu, "blocks.0.mlp.act"));
  g.add(Layer::simple(Layer::Kind::softmax, "blocks.0.attn.softmax"));
  auto no_jac = no_jacobian_nodes(g);  // LayerNorm has a CROWN step but no Jacobian one
  REQUIRE(no_jac.size() == 2);
  CHECK(no_jac[0] == "layernorm 'blocks.0.norm1'");
  CHECK(no_jac[1] == "softmax 'blocks.0.attn.softmax'");
  CHECK(no_jacobian_nodes(LayerGraph{Layer::simple(Layer::Kind::gelu)}).empty());
}

// docs/certification.md §14, §20 assume LibTorch's float32 erf and exp within 4 ulp
// (8u relative); this checks it on a dense grid of the ranges the models use.
TEST_CASE("float32 erf and exp are within 8u of the exact values", "[unit][certify][rules]") {
  const double u = std::ldexp(1.0, -24);
  auto t = torch::linspace(-6, 6, 2000001, torch::kFloat32);
  auto erf64 = torch::erf(t.to(torch::kFloat64));
  auto erf_rel = (torch::erf(t).to(torch::kFloat64) - erf64).abs() / erf64.abs().clamp_min(1e-300);
  CHECK(erf_rel.max().item<double>() <= 8 * u);
  auto s = torch::linspace(-87, 0, 2000001, torch::kFloat32);
  auto exp64 = torch::exp(s.to(torch::kFloat64));
  auto exp_rel = (torch::exp(s).to(torch::kFloat64) - exp64).abs() / exp64;
  CHECK(exp_rel.max().item<double>() <= 8 * u);
}
