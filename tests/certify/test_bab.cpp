// Branch and bound (certify/bab.h, docs/certification.md §22) on MoEs small enough to
// know the exact answer: 2-D inputs, a linear top-1 router and one-hidden-layer ReLU
// experts, whose margin is linear on every cell of the arrangement of the hidden units'
// lines, the router's boundaries and the box, so its minimum over each route region is
// the least value at a vertex of that arrangement (bab_toys.h). Also: β-CROWN's split
// passes and the route constraints against sampling.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>

#include "bab_toys.h"
#include "bab_trace.h"
#include "moecert/bounds.h"

using namespace moecert;
using moecert_test::f64;
using moecert_test::Line;
using moecert_test::random_points;
using moecert_test::Toy;
using moecert_test::vertices_in_box;

namespace {

struct Tally {
  int verified = 0, falsified = 0, unknown = 0, disagreements = 0, undecided_clear = 0;
};

/// Runs branch and bound on `count` random problems of `toy` and checks every answer
/// against the exact one.
Tally run_exact(const Toy& toy, bab::Split split, int count, double seconds) {
  Tally t;
  bab::Config cfg;
  cfg.split = split;
  const bab::Logits logits = toy.logits();
  for (int i = 0; i < count; ++i) {
    auto x = 0.2 + 0.6 * torch::rand({1, 1, 1, 2}, f64);
    const int64_t y = toy.logits32(x.to(torch::kFloat)).argmax(1)[0].item<int64_t>();
    auto box = [&](double e, int i) {
      return std::pair{std::max(0.0, x[0][0][0][i].item<double>() - e),
                       std::min(1.0, x[0][0][0][i].item<double>() + e)};
    };
    auto margin_at = [&](double e) {
      auto [l0, h0] = box(e, 0);
      auto [l1, h1] = box(e, 1);
      return toy.exact_margin({l0, l1}, {h0, h1}, y);
    };
    // The exact robust radius by bisection; half the problems lie inside it, half outside.
    double r_lo = 0, r_hi = 0.5;
    if (margin_at(r_hi) <= 0)
      for (int it = 0; it < 30; ++it) {
        const double mid = 0.5 * (r_lo + r_hi);
        (margin_at(mid) > 0 ? r_lo : r_hi) = mid;
      }
    const double eps = std::min(0.5, r_hi * (i % 2 ? 1.5 : 0.6));
    bab::Problem p{{&toy.graphs}, 1.0, x, y, eps, Norm::linf, true, true};
    const auto out =
        bab::solve(p, cfg, logits, random_points(toy, p),
                   bab::Clock::now() + std::chrono::duration_cast<bab::Clock::duration>(
                                           std::chrono::duration<double>(seconds)));
    const double exact = margin_at(eps);
    INFO("problem " << i << ": eps " << eps << ", exact margin " << exact);
    moecert_test::check_trace(out, false);
    // Every subproblem is accounted for: verified or open.
    if (out.verdict != bab::Verdict::falsified)
      CHECK(out.verified_mass + out.open_mass == Approx(1.0).margin(1e-12));
    if (out.verdict == bab::Verdict::verified) {
      ++t.verified;
      if (!(exact > -1e-9)) ++t.disagreements;
      CHECK(out.verified_mass == Approx(1.0).margin(1e-12));
    } else if (out.verdict == bab::Verdict::falsified) {
      ++t.falsified;
      if (!(exact < 1e-6)) ++t.disagreements;
      // The counterexample lies in the region and the float32 model misclassifies it.
      auto d = (out.counterexample.to(torch::kFloat64) - x).abs().max().item<double>();
      CHECK(d <= eps);
      CHECK(out.distance == d);
      CHECK(toy.logits32(out.counterexample).argmax(1)[0].item<int64_t>() != y);
      // What found it: an attack round's point (drawn again here), or a piece's centre.
      using Found = bab::Outcome::Found;
      CHECK((out.found_by == Found::attack || out.found_by == Found::centre));
      if (out.found_by == Found::attack) {
        REQUIRE(out.found_round >= 0);
        const auto again = random_points(toy, p)(out.found_round, torch::Tensor());
        REQUIRE(again.defined());
        CHECK(torch::allclose(again, out.counterexample, 0, 1e-6));
      }
    } else {
      CHECK(out.found_by == bab::Outcome::Found::none);
      ++t.unknown;
      if (std::abs(exact) > 1e-3) ++t.undecided_clear;
    }
  }
  return t;
}

/// The root pass (α-CROWN, `steps` per bound) of `toy` over the L∞ ball of radius
/// kEps around kCentre in every coordinate, label 0; and `pts` [20000, 2] of the ball.
constexpr double kCentre = 0.5, kEps = 0.3;
forms::MemberPass centre_pass(const Toy& toy, int steps, torch::Tensor& pts) {
  auto x = torch::full({1, 1, 1, 2}, kCentre, f64);
  BoundOptions opt;
  opt.method = BoundMethod::alpha_crown;
  opt.alpha_steps = steps;
  const InputDomain d{x, torch::full({1}, kEps, f64), Norm::linf, true};
  pts = (x - kEps + 2 * kEps * torch::rand({20000, 1, 1, 2}, f64)).view({-1, 2});
  return forms::member_prepare(toy.graphs, d, torch::zeros({1}, torch::kLong), opt, true);
}

}  // namespace

TEST_CASE("branch and bound with input splits gives the exact answer on 2-D MoEs",
          "[unit][certify][bab]") {
  for (auto [E, seed] : {std::pair<int64_t, uint64_t>{1, 3}, {3, 4}}) {
    Toy toy(E, 3, 8, seed);
    const auto t = run_exact(toy, bab::Split::input, 24, 20.0);
    INFO("E = " << E << ": verified " << t.verified << ", falsified " << t.falsified << ", unknown "
                << t.unknown);
    CHECK(t.disagreements == 0);
    CHECK(t.undecided_clear == 0);  // complete away from ties
    CHECK(t.verified > 0);
    CHECK(t.falsified > 0);
  }
}

TEST_CASE("branch and bound with ReLU and route splits is sound on 2-D MoEs",
          "[unit][certify][bab]") {
  Toy toy(3, 3, 8, 4);
  const auto t = run_exact(toy, bab::Split::relu, 24, 5.0);
  INFO("verified " << t.verified << ", falsified " << t.falsified << ", unknown " << t.unknown);
  CHECK(t.disagreements == 0);
  CHECK(t.verified > 0);
}

TEST_CASE("alpha-CROWN started from its tuned parameters resumes at their bound",
          "[unit][certify][bab]") {
  Toy toy(3, 3, 12, 6);
  torch::manual_seed(11);
  torch::Tensor pts;
  const auto root = centre_pass(toy, 20, pts);
  int checked = 0;
  for (int64_t j = 0; j < 3; ++j) {
    if (!root.experts[static_cast<size_t>(j)]) continue;
    auto pass = *root.experts[static_cast<size_t>(j)];
    const int64_t R = 6;
    auto C = torch::randn({R, 3}, f64);
    auto sample = torch::zeros({R}, torch::kLong);
    RowParams tuned;
    auto optimised = bound_spec_rows(pass, C, sample, nullptr, nullptr, &tuned).lower;
    REQUIRE(tuned.has.defined());
    REQUIRE(tuned.has.size(0) == R);
    pass.opt.alpha_steps = 0;  // one evaluation at the starting point
    auto crown = bound_spec_rows(pass, C, sample).lower;
    auto warm = tuned;
    warm.has[0] = false;  // row 0 starts cold
    auto resumed = bound_spec_rows(pass, C, sample, nullptr, &warm).lower;
    INFO("expert " << j << ": CROWN " << crown << ", optimised " << optimised << ", resumed "
                   << resumed);
    // The tuned parameters (held in float32) give the optimised bound again at once.
    CHECK(torch::allclose(resumed.narrow(0, 1, R - 1), optimised.narrow(0, 1, R - 1), 0, 1e-5));
    CHECK(resumed[0].item<double>() == crown[0].item<double>());
    CHECK((optimised >= crown - 1e-12).all().item<bool>());
    CHECK((optimised > crown + 1e-6).any().item<bool>());  // the optimisation moved them
    // And the resumed bounds hold at every sampled point of the region.
    auto values = toy.expert64(j, pts).matmul(C.t());  // [m, R]
    CHECK((resumed <= std::get<0>(values.min(0)) + 1e-9).all().item<bool>());
    ++checked;
  }
  CHECK(checked > 0);
}

TEST_CASE("beta-CROWN bounds of split passes and route constraints hold at sampled points",
          "[unit][certify][bab]") {
  Toy toy(3, 3, 12, 6);
  torch::manual_seed(7);
  torch::Tensor pts;
  auto root = centre_pass(toy, BoundOptions{}.alpha_steps, pts);
  forms::add_route_constraints(root);
  REQUIRE(root.route.size() == 3);
  // The float32 router's choice, as the model makes it.
  auto sel = (pts.to(torch::kFloat).matmul(toy.R.to(torch::kFloat).t()) + toy.c.to(torch::kFloat))
                 .argmax(1);
  auto C = torch::randn({1, 4, 3}, f64);
  int checked = 0;
  for (int64_t j = 0; j < 3; ++j) {
    if (!root.experts[static_cast<size_t>(j)]) continue;
    const auto& pass = *root.experts[static_cast<size_t>(j)];
    // Random signs on two unstable hidden units (node 1: fc1, the ReLU's input).
    const auto& z = pass.nodes[1];
    auto unstable = (z.lo.lt(0) & z.hi.gt(0)).to(torch::kFloat64);
    unstable = unstable * unstable.cumsum(1).le(2);
    REQUIRE(unstable.sum().item<double>() == 2);
    auto signs = torch::where(torch::rand(z.lo.sizes(), f64).lt(0.5), 1.0, -1.0) * unstable;
    std::vector<torch::Tensor> per_node(pass.nodes.size());
    per_node[1] = signs.to(torch::kFloat64);
    auto split = bound_split(pass, torch::zeros({1}, torch::kLong), per_node);
    const auto& route = root.route[static_cast<size_t>(j)];
    auto with = bound_specs(split, C, nullptr, &route).lower;
    auto plain = bound_specs(split, C).lower;
    // The points of the subregion: the router selects j, the split units have their signs.
    auto zpts = pts.matmul(toy.W1[j].t()) + toy.b1[j];
    auto s = signs.view({1, -1});
    auto in_split = ((zpts * s) >= 0).all(1);
    auto keep = (sel.eq(j) & in_split).nonzero().flatten();
    if (keep.numel() == 0) continue;
    auto h = toy.expert64(j, pts.index_select(0, keep));  // [m, K]
    auto values = h.matmul(C[0].t());                     // [m, 4]
    auto low = std::get<0>(values.min(0));
    INFO("expert " << j << ": " << keep.numel() << " points");
    CHECK((with[0] <= low + 1e-9).all().item<bool>());
    CHECK((plain[0] <= low + 1e-9).all().item<bool>());
    ++checked;
  }
  CHECK(checked > 0);
}

TEST_CASE("top-2 route-set bounds hold at the sampled points that select the set",
          "[unit][certify][bab]") {
  // A wide region of a 2-D top-2 MoE across a boundary of its router: for each pair T, the mixture
  // slack restricted to T (weights over T, route constraints g_t <= g_j for j in T and t outside)
  // lies below the float32 model's probability margin at every sampled point whose top-2 set is T.
  // The first seeded MoE whose second and third router logits tie inside the square,
  // and the centre where they do (of a grid of it).
  auto t = torch::linspace(0.25, 0.75, 51, f64);
  auto grid = torch::stack(torch::meshgrid({t, t}, "ij"), 2).view({-1, 2});
  uint64_t seed = 21;
  auto gap = [&](const Toy& m) {
    auto top3 = std::get<0>((grid.matmul(m.R.t()) + m.c).topk(3, 1));
    return top3.select(1, 1) - top3.select(1, 2);
  };
  while (gap(Toy(4, 3, 8, seed, 2)).min().item<double>() > 0.02) ++seed;
  Toy toy(4, 3, 8, seed, /*top_k=*/2);
  auto x = grid[gap(toy).argmin()].view({1, 1, 1, 2});
  const double eps = 0.2;
  BoundOptions opt;
  opt.method = BoundMethod::alpha_crown;
  const InputDomain d{x, torch::full({1}, eps, f64), Norm::linf, true};
  auto labels = toy.logits32(x.to(torch::kFloat)).argmax(1);
  auto root = forms::member_prepare(toy.graphs, d, labels, opt, true);
  forms::add_route_constraints(root);
  REQUIRE(root.route.size() == 4);
  const double whole = forms::member_evaluate(root, d, labels).slack[0].item<double>();
  torch::manual_seed(8);
  auto pts = (x - eps + 2 * eps * torch::rand({20000, 1, 1, 2}, f64)).to(torch::kFloat);
  auto g = pts.flatten(1).matmul(toy.R.to(torch::kFloat).t()) + toy.c.to(torch::kFloat);
  auto top = std::get<1>(g.topk(2, 1));
  auto probs = toy.logits32(pts).exp().to(torch::kFloat64);
  const int64_t y = labels[0].item<int64_t>();
  auto margin = probs.select(1, y) - probs.index_fill(1, torch::tensor({y}), -1.0).amax(1);
  auto C = torch::randn({1, 6, 3}, f64);
  int checked = 0, tighter = 0, constrained = 0;
  for (int64_t a = 0; a < 4; ++a)
    for (int64_t b = a + 1; b < 4; ++b) {
      auto only = torch::zeros({1, 4}, torch::kBool);
      only[0][a] = true, only[0][b] = true;
      const double slack = forms::member_evaluate(root, d, labels, only).slack[0].item<double>();
      auto in_set = ((top.select(1, 0).eq(a) & top.select(1, 1).eq(b)) |
                     (top.select(1, 0).eq(b) & top.select(1, 1).eq(a)))
                        .nonzero()
                        .flatten();
      INFO("set {" << a << ", " << b << "}: " << in_set.numel() << " points, slack " << slack
                   << ", whole region " << whole);
      if (in_set.numel() == 0) continue;
      CHECK(slack <= margin.index_select(0, in_set).min().item<double>() + 1e-9);
      ++checked;
      tighter += slack > whole;
      // Each selected expert's bounds under the set's route constraints hold at the
      // set's points (rows g_t − g_j for t inside the set would cut off points where
      // the other selected expert leads).
      const auto routes = forms::route_set_constraints(root, only);
      for (int64_t j : {a, b}) {
        if (!root.experts[static_cast<size_t>(j)]) continue;
        const auto& pass = *root.experts[static_cast<size_t>(j)];
        auto with = bound_specs(pass, C, nullptr, &routes[static_cast<size_t>(j)]).lower[0];
        auto plain = bound_specs(pass, C).lower[0];
        auto h = toy.expert64(j, pts.index_select(0, in_set).flatten(1).to(torch::kFloat64));
        auto low = std::get<0>(h.matmul(C[0].t()).min(0));
        INFO("expert " << j << ": with " << with << ", without " << plain << ", sampled " << low);
        CHECK((with <= low + 1e-9).all().item<bool>());
        constrained += (with > plain + 1e-9).any().item<bool>();
      }
    }
  CHECK(checked >= 2);
  CHECK(tighter > 0);
  CHECK(constrained > 0);  // the constraints cut the experts' regions somewhere
}

TEST_CASE("beta-CROWN multipliers reach the optimum of a fully split one-layer net",
          "[unit][certify][bab]") {
  // With every unstable unit split, the net is linear on the subregion, a polygon; its
  // least margin sits at a vertex. β's Lagrangian closes the gap the interval clamps
  // leave (the bound over the box ignores the splits' constraints on x).
  Toy toy(1, 3, 6, 9);
  BoundOptions opt;
  opt.method = BoundMethod::alpha_crown;
  opt.alpha_steps = 200;
  BoundOptions no_beta = opt;
  no_beta.beta_lr = 0;
  int closer = 0, cases = 0;
  for (int i = 0; i < 8; ++i) {
    auto x = 0.3 + 0.4 * torch::rand({1, 1, 1, 2}, f64);
    const double eps = 0.2;
    const InputDomain d{x, torch::full({1}, eps, f64), Norm::linf, true};
    auto root = bound_forward(toy.graphs.nets[0], d, opt);
    const auto& z = root.nodes[1];
    auto unstable = (z.lo.lt(0) & z.hi.gt(0)).to(torch::kFloat64);
    if (unstable.sum().item<double>() < 2) continue;
    // The signs of the units at a random point of the box: a non-empty subregion.
    auto at = (x + eps * (2 * torch::rand({1, 1, 1, 2}, f64) - 1)).clamp(0, 1).view({1, 2});
    auto zs = at.matmul(toy.W1[0].t()) + toy.b1[0];
    auto signs = torch::where(zs.ge(0), 1.0, -1.0) * unstable;
    std::vector<torch::Tensor> per_node(root.nodes.size());
    per_node[1] = signs;
    auto C = torch::randn({1, 3, 3}, f64);
    auto split = bound_split(root, torch::zeros({1}, torch::kLong), per_node);
    auto with = bound_specs(split, C).lower[0];
    split.opt = no_beta;
    auto without = bound_specs(split, C).lower[0];
    // The exact minimum: vertices of the polygon box ∩ {s_u z_u >= 0}.
    const auto xv = x.view({2});
    const double l0 = std::max(0.0, xv[0].item<double>() - eps),
                 h0 = std::min(1.0, xv[0].item<double>() + eps);
    const double l1 = std::max(0.0, xv[1].item<double>() - eps),
                 h1 = std::min(1.0, xv[1].item<double>() + eps);
    std::vector<Line> lines;
    for (int64_t u = 0; u < toy.hidden; ++u)
      lines.push_back({toy.W1[0][u][0].item<double>(), toy.W1[0][u][1].item<double>(),
                       -toy.b1[0][u].item<double>()});
    auto v = vertices_in_box(lines, {l0, l1}, {h0, h1});
    auto inside = ((v.matmul(toy.W1[0].t()) + toy.b1[0]) * signs >= -1e-9).all(1);
    auto feasible = v.index_select(0, inside.nonzero().flatten());
    REQUIRE(feasible.size(0) > 0);
    auto exact = std::get<0>(toy.expert64(0, feasible).matmul(C[0].t()).min(0));  // [3]
    INFO("case " << i << ": exact " << exact << ", with beta " << with << ", without " << without);
    CHECK((with <= exact + 1e-7).all().item<bool>());                     // sound
    CHECK((without <= exact + 1e-7).all().item<bool>());                  // sound
    CHECK((with >= exact - 0.1 * (exact.abs() + 1)).all().item<bool>());  // near the optimum
    closer += (with - without).gt(1e-3).any().item<bool>();
    ++cases;
  }
  CHECK(cases >= 4);
  CHECK(closer > 0);  // the multipliers matter
}

// Branch and bound carries the margin rows a subproblem proved to its children
// (forms::MemberPass::known_low): a row with a known bound takes it and is not bounded
// again, the others are bounded as without it, and the settled rows are those above
// the tie allowance.
TEST_CASE("margin rows known from a larger region are taken, the others bounded again",
          "[unit][certify][bab]") {
  Toy toy(3, 4, 12, 9);
  auto x = torch::full({1, 1, 1, 2}, 0.5, f64);
  BoundOptions opt;
  opt.method = BoundMethod::alpha_crown;
  const InputDomain d{x, torch::full({1}, 0.2, f64), Norm::linf, true};
  auto labels = torch::zeros({1}, torch::kLong);
  auto root = forms::member_prepare(toy.graphs, d, labels, opt, true);
  forms::add_route_constraints(root);
  const auto plain = forms::member_evaluate(root, d, labels);
  REQUIRE(plain.margins.size() == 3);
  REQUIRE(plain.settled.size() == 3);
  int covered = 0;
  for (size_t j = 0; j < 3; ++j) {
    if (!root.experts[j]) continue;
    ++covered;
    CHECK(plain.margins[j].isfinite().all().item<bool>());
  }
  REQUIRE(covered > 0);
  // The first row known (a value far above the tie allowance), the others not.
  auto known = root;
  for (size_t j = 0; j < 3; ++j) {
    auto k = torch::full({1, 3}, -INFINITY, f64);
    k[0][0] = 5.0;
    known.known_low.push_back(k);
  }
  const auto ev = forms::member_evaluate(known, d, labels);
  for (size_t j = 0; j < 3; ++j) {
    if (!root.experts[j]) continue;
    INFO("expert " << j);
    CHECK(ev.margins[j][0][0].item<double>() == 5.0);
    CHECK(ev.settled[j][0][0].item<bool>());
    auto rest = ev.margins[j][0].narrow(0, 1, 2), before = plain.margins[j][0].narrow(0, 1, 2);
    CHECK(((rest - before).abs() <= 1e-9 * (1 + before.abs())).all().item<bool>());
    CHECK(torch::equal(ev.settled[j][0].narrow(0, 1, 2), plain.settled[j][0].narrow(0, 1, 2)));
  }
  // Every row known: the slack is the known bounds' less the tie allowance, nothing bounded.
  auto all = root;
  for (size_t j = 0; j < 3; ++j) all.known_low.push_back(torch::full({1, 3}, 7.0, f64));
  const auto full = forms::member_evaluate(all, d, labels);
  CHECK(full.slack[0].item<double>() > 0);
  CHECK(full.slack[0].item<double>() <= 7.0);
  if (plain.slack[0].item<double>() < 0)
    CHECK(full.slack[0].item<double>() > plain.slack[0].item<double>());
}

TEST_CASE("router_selection: where only k experts can be selected, all k are", "[unit][certify]") {
  // diff[i, j] <= g_i − g_j. Experts 2 and 3 are each beaten everywhere by two others,
  // so only 0 and 1 can be in the top 2. Expert 1 alone has two rivals that may reach it
  // (0 and 2), yet top-2 selects two experts at every point: 1 is selected everywhere.
  auto diff = torch::zeros({1, 4, 4}, f64);
  auto set = [&](int i, int j, double lo, double hi) {  // lo <= g_i − g_j <= hi
    diff[0][i][j] = lo, diff[0][j][i] = -hi;
  };
  set(0, 1, -1, 1), set(0, 2, 0.5, 2), set(0, 3, 0.5, 2);
  set(1, 2, -1, 1), set(1, 3, 0.5, 2), set(3, 2, 0.5, 2);
  auto [possible, sure] = router_selection(diff, Routing::top_k, 2);
  const auto expected = torch::tensor({true, true, false, false}).view({1, 4});
  CHECK(torch::equal(possible, expected));
  CHECK(torch::equal(sure, expected));
  // Top-1: expert 0 and 1 may each reach the other; neither is sure.
  std::tie(possible, sure) = router_selection(diff, Routing::top_k, 1);
  CHECK(torch::equal(possible, torch::tensor({true, true, false, false}).view({1, 4})));
  CHECK_FALSE(sure.any().item<bool>());
}
