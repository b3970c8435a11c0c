// The transformer rules' soundness (see test_rules.cpp for every rule's): the attention
// products' bounds, float32 errors and CROWN planes at sampled points, softmax's CROWN
// lines at extreme scales, hand-worked softmax, attention, LayerNorm, GELU and token
// examples, the rules the local estimator cannot take, and float32 erf and exp.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>

#include "moecert/error.h"
#include "moecert/rules.h"
#include "rules_helpers.h"

using namespace moecert;
using namespace moecert_test::rules_helpers;

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
    // 500 points of the box (their own seed: the check does not depend on the tests run
    // before it) and its 16 corners, where the gap is largest (0.0216 at (−, +, +, +)).
    torch::manual_seed(3);
    auto corners = torch::zeros({16, 4}, f64);
    for (int v = 0; v < 16; ++v)
      for (int k = 0; k < 4; ++k) corners[v][k] = (v >> k) & 1 ? 1.0 : -1.0;
    auto pts = x0 + 0.01 * torch::cat({2 * torch::rand({500, 4}, f64) - 1, corners});
    auto n0 = rule_for(ln).forward(ln, {pts}).select(1, 0);
    auto line = (pts * back.A).sum(1) + bias;
    CHECK((line <= n0 + 1e-12).all().item<bool>());
    CHECK((n0 - line).max().item<double>() < 0.025);  // tight: the box is narrow
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
