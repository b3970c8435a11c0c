// Branch and bound of mixtures (soft and top-k > 1 routing) and dual-models on the 2-D
// MoEs of bab_toys.h (certify/bab.h, docs/certification.md §22): route-set splits
// checked against a grid, the experts carried to a subproblem's children, and the margin
// rows a mixture bounds.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <chrono>
#include <cmath>
#include <vector>

#include "bab_grid.h"
#include "bab_trace.h"
#include "moecert/bounds.h"

using namespace moecert;
using moecert_test::check_trace;
using moecert_test::f64;
using moecert_test::grid_checked;
using moecert_test::grid_radius;
using moecert_test::near_boundary;
using moecert_test::random_points;
using moecert_test::Toy;

TEST_CASE("branch and bound splits top-2 MoEs by expert set and never verifies a broken region",
          "[unit][certify][bab]") {
  // The mixture's margin is not piecewise linear, so there is no exact answer here: every
  // verdict is checked against the float32 model on a 201 x 201 grid of the box (a
  // verified region has no misclassified grid point; a counterexample is real), with and
  // without route splits. The radii lie below and near the grid's robust radius, where
  // the bounds need splits.
  Toy toy(4, 3, 6, 11, /*top_k=*/2);
  const bab::Logits logits = toy.logits();
  // Points near the router's boundary between the second and third expert, so that the
  // selected pair changes inside the regions (the attacks reseed: drawn first).
  torch::manual_seed(12);
  const auto xs = near_boundary(toy, 0.2 + 0.6 * torch::rand({4000, 2}, f64), 2, 16);
  const auto t = grid_checked(logits, {&toy.graphs}, 1.0, xs, 3.0);
  INFO("verified " << t.verified[0] << " / " << t.verified[1] << ", falsified " << t.falsified[0]
                   << " / " << t.falsified[1] << " (without / with route splits), route splits "
                   << t.route_splits[1]);
  CHECK(t.route_splits[0] == 0);
  CHECK(t.route_splits[1] > 0);
  CHECK(t.verified[1] > t.verified[0]);  // regions only a route split decides
  CHECK(t.verified[1] > 0);
  CHECK(t.falsified[1] > 0);
  // Experts settled on a parent were carried to its children in both (the grid checks
  // above cover the searches that took their bounds).
  CHECK(t.carried[0] > 0);
  CHECK(t.carried[1] > 0);
}

// Branch and bound carries a mixture's settled experts to a subproblem's children
// (forms::MemberPass::known_prob): an expert whose pass is skipped takes the known bounds
// of its probability margins, one that is bounded takes the larger of the two.
TEST_CASE("a mixture's experts settled on a region stand on its subproblems unbounded",
          "[unit][certify][bab]") {
  Toy toy(4, 3, 6, 11, /*top_k=*/2);
  BoundOptions opt;
  opt.method = BoundMethod::alpha_crown;
  torch::manual_seed(5);
  int cases = 0;
  for (int i = 0; i < 30 && cases < 6; ++i) {
    auto x = 0.2 + 0.6 * torch::rand({1, 1, 1, 2}, f64);
    const int64_t y = toy.logits32(x.to(torch::kFloat)).argmax(1)[0].item<int64_t>();
    const auto labels = torch::full({1}, y, torch::kLong);
    const InputDomain d{x, torch::full({1}, 0.06, f64), Norm::linf, true};
    const auto root = forms::member_prepare(toy.graphs, d, labels, opt, true);
    const auto plain = forms::member_evaluate(root, d, labels);
    REQUIRE(plain.prob.defined());
    REQUIRE(plain.prob.sizes() == torch::IntArrayRef({1, 4, 3}));
    const auto settled = plain.prob_settled[0];
    // Settled: every margin (k != y) above the float32 allowance, which lies in (0, 1e-4).
    auto least = plain.prob[0].index_fill(1, torch::tensor({y}), INFINITY).amin(1);
    CHECK_FALSE((settled & least.le(0)).any().item<bool>());
    CHECK_FALSE((~settled & least.ge(1e-4)).any().item<bool>());
    if (!settled.any().item<bool>() || settled.all().item<bool>()) continue;
    ++cases;
    INFO("case " << i << ", settled " << settled);
    // A subproblem of the region (no split: the region itself) whose settled experts are
    // not bounded, their bounds known.
    auto sub = forms::member_split(root, {}, 1, (~settled).unsqueeze(0));
    for (int64_t j = 0; j < 4; ++j)
      sub.known_prob.push_back(settled[j].item<bool>() ? plain.prob.select(1, j)
                                                       : torch::full({1, 3}, -INFINITY, f64));
    const auto ev = forms::member_evaluate(sub, sub.domain, labels);
    for (int64_t j = 0; j < 4; ++j) {
      const auto J = static_cast<size_t>(j);  // (no pass where the router cannot select j)
      CHECK(sub.experts[J].has_value() == (!settled[j].item<bool>() && root.experts[J]));
      CHECK(torch::allclose(ev.prob.select(1, j), plain.prob.select(1, j), 1e-9, 1e-12));
    }
    CHECK(ev.slack[0].item<double>() == Approx(plain.slack[0].item<double>()).margin(1e-12));
    CHECK(torch::equal(ev.prob_settled, plain.prob_settled));
    // Without them the skipped experts count −1: a lower slack.
    auto bare = sub;
    bare.known_prob.clear();
    const auto lost = forms::member_evaluate(bare, bare.domain, labels);
    CHECK(lost.slack[0].item<double>() < ev.slack[0].item<double>());
    // Every expert bounded, with (made-up) known bounds of 0.2: each margin is the larger.
    auto both = forms::member_split(root, {}, 1);
    for (int64_t j = 0; j < 4; ++j) both.known_prob.push_back(torch::full({1, 3}, 0.2, f64));
    const auto mx = forms::member_evaluate(both, both.domain, labels);
    CHECK(torch::allclose(mx.prob, plain.prob.clamp_min(0.2), 1e-9, 1e-12));
    // No expert bounded (the expert-wise search's retests): the slack is the program of
    // the router's weight bounds, which no expert's bounds change, and the known bounds
    // (−1 where lower).
    // The second case restricts the region to the expert set the float32 router selects at x.
    const auto g32 = x.flatten(1).to(torch::kFloat).matmul(toy.R.to(torch::kFloat).t()) +
                     toy.c.to(torch::kFloat);
    const auto top2 = std::get<1>(g32.topk(2, 1));
    for (int set = 0; set < 2; ++set) {
      auto only = torch::zeros({1, 4}, torch::kBool);
      if (set == 1) only.index_fill_(1, top2[0], true);
      for (double v : {-2.0, 0.2}) {  // −2: below every bound, so it counts −1
        auto none = forms::member_split(root, {}, 1, torch::zeros({1, 4}, torch::kBool));
        for (int64_t j = 0; j < 4; ++j)
          none.known_prob.push_back(j == 1 ? plain.prob.select(1, j) : torch::full({1, 3}, v, f64));
        const auto ev0 = set == 0 ? forms::member_evaluate(none, none.domain, labels)
                                  : forms::member_evaluate(none, none.domain, labels, only);
        const auto ref = set == 0 ? plain : forms::member_evaluate(root, d, labels, only);
        REQUIRE(ev0.weight_lo.defined());
        CHECK(torch::equal(ev0.weight_lo, ref.weight_lo));
        CHECK(torch::equal(ev0.weight_hi, ref.weight_hi));
        auto mu = torch::stack(none.known_prob, 1).clamp_min(-1.0);
        const double program = forms::mixture_lower(ev0.weight_lo, ev0.weight_hi, mu, labels)
                                   .amin(1)[0]
                                   .item<double>() -
                               forms::prob_allowance(none);
        CHECK(ev0.slack[0].item<double>() == program);
        CHECK(std::isfinite(program));
      }
    }
  }
  CHECK(cases >= 3);
}

// The children of a mixture's ReLU split bound only the split graph again
// (bab::Config::carry_untouched): every other expert takes its parent's bounds, and offers
// its parent's best unit for the next split, so the search still reaches every expert.
TEST_CASE("a mixture's ReLU split bounds only the split graph again and still splits every expert",
          "[unit][certify][bab]") {
  // Every expert weighs everywhere (top-3 of three: soft routing), so the searches need
  // splits of several experts. Radii at 0.6 of the grid's robust radius, where the
  // mixture form can verify once the experts are split: what the search with every
  // expert bounded on every subproblem verifies, the one that bounds the split graph
  // alone verifies too (it would end stuck if a carried expert's units could not be split).
  Toy toy(3, 3, 12, 31, /*top_k=*/3);
  torch::manual_seed(32);
  const auto xs = (0.2 + 0.6 * torch::rand({10, 2}, f64)).view({10, 1, 1, 2});
  int verified[2] = {0, 0}, rooted = 0;
  int64_t carried[2] = {0, 0}, graphs[2] = {0, 0};
  for (int64_t i = 0; i < xs.size(0); ++i) {
    auto x = xs.narrow(0, i, 1);
    const int64_t y = toy.logits32(x.to(torch::kFloat)).argmax(1)[0].item<int64_t>();
    const double r = grid_radius(toy.logits(), x, y), eps = 0.6 * r;
    bab::Outcome out[2];
    for (int untouched = 0; untouched < 2; ++untouched) {
      bab::Config cfg;
      cfg.split = bab::Split::relu;
      cfg.carry_untouched = untouched == 1;
      cfg.expertwise = false;    // one tree over every expert's splits
      cfg.input_planes = false;  // (the planes make a 2-D net's root nearly exact)
      bab::Problem p{{&toy.graphs}, 1.0, x, y, eps, Norm::linf, true, true};
      out[untouched] = bab::solve(
          p, cfg, toy.logits(), random_points(toy, p),
          bab::Clock::now() +
              std::chrono::duration_cast<bab::Clock::duration>(std::chrono::duration<double>(5.0)));
      verified[untouched] += out[untouched].verdict == bab::Verdict::verified;
      carried[untouched] += out[untouched].carried;
      graphs[untouched] = std::max(graphs[untouched], out[untouched].graphs_split);
      CHECK(out[untouched].verdict != bab::Verdict::falsified);  // inside the grid's radius
    }
    INFO("problem " << i << ", eps " << eps << " (grid radius " << r << "): subproblems "
                    << out[0].bounded << " / " << out[1].bounded);
    if (out[0].verdict == bab::Verdict::verified) CHECK(out[1].verdict == bab::Verdict::verified);
    rooted += out[1].verdict == bab::Verdict::verified && out[1].bounded == 1;
  }
  INFO("verified " << verified[0] << " / " << verified[1] << ", carried " << carried[0] << " / "
                   << carried[1] << ", most graphs split in a search " << graphs[0] << " / "
                   << graphs[1] << " (every expert bounded / the split graph only)");
  CHECK(carried[1] > carried[0]);
  // Some search split units of several experts: a child that did not bound an expert
  // still offered its unit (with nothing carried over, only the graph split last could be).
  CHECK(graphs[1] >= 2);
  CHECK(verified[1] >= verified[0]);
  CHECK(verified[1] > rooted);  // a search that needed splits
}

namespace {

// An expert-wise search of a soft mixture left open reports its least open program
// (bab::Outcome::OpenProgram): the router's weights and each expert's probability margin
// against the program's class hold at points sampled over the region, and the simplex
// step over them (worked here apart from simplex_min) is the reported value.
void check_open_program(const Toy& toy, const bab::Problem& p, const bab::Outcome& out) {
  const auto& o = out.open_program;
  REQUIRE(o.cls >= 0);
  CHECK(o.cls != p.label);
  CHECK(o.cls < toy.K);
  CHECK(o.route.empty());  // soft routing: one group, the root's region
  const auto E = static_cast<size_t>(toy.E);
  REQUIRE(o.margin_low.size() == E);
  REQUIRE(o.weight_lo.size() == E);
  REQUIRE(o.weight_hi.size() == E);
  CHECK(o.value <= out.worst_slack + 1e-12);  // the group's program is below its leaves'
  std::vector<size_t> order(E);
  for (size_t j = 0; j < E; ++j) order[j] = j;
  std::sort(order.begin(), order.end(),
            [&](size_t a, size_t b) { return o.margin_low[a] < o.margin_low[b]; });
  double left = 1, step = 0;
  for (size_t j = 0; j < E; ++j) {
    CHECK(o.weight_lo[j] >= 0);
    CHECK(o.weight_lo[j] <= o.weight_hi[j]);
    CHECK(o.weight_hi[j] <= 1);
    CHECK(o.margin_low[j] >= -1);
    CHECK(o.margin_low[j] <= 1);
    step += o.weight_lo[j] * o.margin_low[j], left -= o.weight_lo[j];
  }
  for (size_t j : order) {
    const double add = std::max(0.0, std::min(left, o.weight_hi[j] - o.weight_lo[j]));
    step += add * o.margin_low[j], left -= add;
  }
  // Its results' form (certify's rows, bab.searches[].open_program).
  const auto j = bab::open_program_json(o);
  CHECK(j["class"].get<int64_t>() == o.cls);
  CHECK(j["route"].get<std::vector<int64_t>>() == o.route);
  CHECK(j["weight_lo"].get<std::vector<double>>() == o.weight_lo);
  CHECK(j["weight_hi"].get<std::vector<double>>() == o.weight_hi);
  CHECK(j["margin_low"].get<std::vector<double>>() == o.margin_low);
  CHECK(j["value"].get<double>() == o.value);
  CHECK(bab::open_program_json(bab::Outcome::OpenProgram{}).is_null());
  CHECK(step >= o.value);
  CHECK(step - o.value <= 1e-5);  // the float32 allowance
  // (a generator of its own: the searches' attacks draw from the global one)
  const auto draw = torch::rand({4000, 1, 1, 2}, at::detail::createCPUGenerator(3), f64);
  auto xs = (p.x + (2 * draw - 1) * p.eps).clamp(0, 1).flatten(1);
  const auto a = torch::softmax(xs.matmul(toy.R.t()) + toy.c, 1);
  for (size_t j = 0; j < E; ++j) {
    const auto aj = a.select(1, static_cast<int64_t>(j));
    CHECK(aj.min().item<double>() >= o.weight_lo[j] - 1e-9);
    CHECK(aj.max().item<double>() <= o.weight_hi[j] + 1e-9);
    const auto f = torch::softmax(toy.expert64(static_cast<int64_t>(j), xs), 1);
    const auto margin = f.select(1, p.label) - f.select(1, o.cls);
    CHECK(margin.min().item<double>() >= o.margin_low[j] - 1e-6);
  }
}

}  // namespace

// The expert-wise search (bab::Config::expertwise): one tree of splits per expert, a leaf
// closed by the mixture's program with its expert's bounds there and the others' over
// the whole region. It verifies what one tree over every expert's splits verifies, never
// a broken region, and where both run out of units to split it has bounded fewer
// subproblems (one tree makes one expert's splits again under every leaf of the others').
TEST_CASE("a mixture's expert-wise trees verify what one tree over every expert does, soundly",
          "[unit][certify][bab]") {
  // Soft routing (top-3 of three). Radii at 0.6 of the grid's robust radius (three of
  // every four problems) and at 1.3: every verdict is checked on the 201 x 201 grid, and
  // the masses add up. (On these random experts many regions stay open for both: an
  // expert wrong where it weighs much defeats any bound of the experts apart.)
  Toy toy(3, 3, 12, 31, /*top_k=*/3);
  torch::manual_seed(33);
  const auto xs = (0.2 + 0.6 * torch::rand({24, 2}, f64)).view({24, 1, 1, 2});
  int verified[2] = {0, 0}, falsified[2] = {0, 0}, unknown[2] = {0, 0}, split = 0;
  int64_t trees[2] = {0, 0}, spent[2] = {0, 0}, blind_searched = 0;
  for (int64_t i = 0; i < xs.size(0); ++i) {
    auto x = xs.narrow(0, i, 1);
    const int64_t y = toy.logits32(x.to(torch::kFloat)).argmax(1)[0].item<int64_t>();
    const double eps = grid_radius(toy.logits(), x, y) * (i % 4 == 3 ? 1.3 : 0.6);
    const bool broken = moecert_test::grid_broken(toy.logits(), x, y, eps);
    const bab::Problem p{{&toy.graphs}, 1.0, x, y, eps, Norm::linf, true, true};
    auto search = [&](bool expertwise, const bab::Attack& attack, double seconds) {
      bab::Config cfg;
      cfg.split = bab::Split::relu;
      cfg.expertwise = expertwise;
      cfg.input_planes = false;  // (the planes make a 2-D net's root nearly exact)
      return bab::solve(p, cfg, toy.logits(), attack,
                        bab::Clock::now() + std::chrono::duration_cast<bab::Clock::duration>(
                                                std::chrono::duration<double>(seconds)));
    };
    bab::Outcome out[2];
    for (int ew = 0; ew < 2; ++ew) {
      out[ew] = search(ew == 1, random_points(toy, p), 4.0);
      INFO("problem " << i << ", eps " << eps << ", expert-wise " << ew << ", grid broken "
                      << broken << ": subproblems " << out[ew].bounded);
      trees[ew] += out[ew].trees;
      if (out[ew].verdict != bab::Verdict::falsified)
        CHECK(out[ew].verified_mass + out[ew].open_mass == Approx(1.0).margin(1e-12));
      CHECK(out[ew].root_seconds >= 0);
      CHECK(out[ew].root_seconds <= out[ew].seconds);
      check_trace(out[ew], ew == 1);
      if (out[ew].verdict == bab::Verdict::unknown) {  // an open leaf's slack, never positive
        ++unknown[ew];
        CHECK(out[ew].worst_slack <= 0);
        if (ew == 1) check_open_program(toy, p, out[ew]);
      }
      if (out[ew].verdict != bab::Verdict::unknown || ew == 0) CHECK(out[ew].open_program.cls < 0);
      if (out[ew].verdict == bab::Verdict::verified) {
        ++verified[ew];
        CHECK_FALSE(broken);
        CHECK(std::isnan(out[ew].worst_slack));  // nothing left open
      } else if (out[ew].verdict == bab::Verdict::falsified) {
        ++falsified[ew];
        CHECK((out[ew].counterexample.to(torch::kFloat64) - x).abs().max().item<double>() <= eps);
        CHECK(toy.logits32(out[ew].counterexample).argmax(1)[0].item<int64_t>() != y);
      }
    }
    if (out[0].verdict == bab::Verdict::verified) CHECK(out[1].verdict == bab::Verdict::verified);
    split += out[1].verdict == bab::Verdict::verified && out[1].bounded > 1;
    if (out[0].exhausted && out[1].exhausted)
      for (int ew = 0; ew < 2; ++ew) spent[ew] += out[ew].bounded;
    if (broken) {
      // Blind to attacks, an expert-wise search of a broken region must still not verify
      // it: its leaves close on their bounds and the group's program alone.
      const auto blind = search(
          true, [](int, const torch::Tensor&) { return torch::Tensor(); }, 1.5);
      CHECK(blind.verdict != bab::Verdict::verified);
      blind_searched += blind.bounded > 1;
    }
  }
  CHECK(blind_searched > 0);
  INFO("verified " << verified[0] << " / " << verified[1] << ", falsified " << falsified[0] << " / "
                   << falsified[1] << ", subproblems of the searches both exhausted " << spent[0]
                   << " / " << spent[1] << " (one tree / expert-wise)");
  CHECK(trees[0] == 0);  // the switch decides which search runs
  CHECK(trees[1] > 0);
  CHECK(verified[1] >= verified[0]);
  CHECK(split > 0);  // some expert-wise search verified after splits
  CHECK(falsified[1] > 0);
  CHECK(unknown[1] > 0);
  CHECK(spent[1] > 0);
  CHECK(2 * spent[1] < spent[0]);
}

// A trace keeps at most kTracePoints, spread evenly over the search (TraceBuilder): the
// first round's point, then every stride-th, and the latest; a point with no new
// subproblem replaces the last one.
TEST_CASE("a search's trace stays short and spread over the search", "[unit][certify][bab]") {
  std::vector<bab::Outcome::Point> t;
  bab::TraceBuilder b;
  const size_t cap = bab::Outcome::kTracePoints;
  for (int64_t r = 1; r <= 1000; ++r) {
    b.add(t, {static_cast<double>(r), 10 * r, 0, -1.0 / static_cast<double>(r)});
    REQUIRE(t.size() <= cap);
    CHECK(t.front().subproblems == 10);     // the first round's, always
    CHECK(t.back().subproblems == 10 * r);  // the latest
  }
  CHECK(t.size() > cap / 2);
  // Evenly spread but for the latest ones: the gaps between the kept points are equal.
  const double gap = t[1].seconds - t[0].seconds;
  CHECK(gap > 1);
  for (size_t i = 1; i + 1 < t.size(); ++i) CHECK(t[i].seconds - t[i - 1].seconds == gap);
  double before = 0;  // the last point at or before 500 s: within one gap of it
  for (const auto& p : t)
    if (p.seconds <= 500) before = p.seconds;
  CHECK(500 - before < gap);
  CHECK(bab::slack_at(t, 500.0) == -1.0 / before);
  CHECK(std::isnan(bab::slack_at(t, 0.5)));
  // A point with no new subproblem takes the place of the last one, on the grid too.
  std::vector<bab::Outcome::Point> u;
  bab::TraceBuilder ub;
  ub.add(u, {1, 10, 0, -0.5});  // the first call: on every grid
  ub.add(u, {2, 10, 0.5, -0.25});
  REQUIRE(u.size() == 1);
  CHECK(u.back().seconds == 2);
  CHECK(u.back().verified_share == 0.5);
  ub.add(u, {3, 20, 0.5, -0.25});
  CHECK(u.size() == 2);
}

// Branch and bound bounds a mixture's margin rows only (forms::MemberPass::margin_rows_only):
// the probability margins then take no lower end of the logit differences (a larger box),
// and the evaluation reports the rows as a logit form does, for row carry, warm starts and
// attack starts.
TEST_CASE("a mixture bounded by its margin rows holds, and with the lower ends apart equals both",
          "[unit][certify][bab]") {
  Toy toy(4, 3, 6, 11, /*top_k=*/2);
  BoundOptions opt;
  opt.method = BoundMethod::alpha_crown;
  opt.primal = true;
  torch::manual_seed(6);
  int looser = 0, unsettled = 0;
  for (int i = 0; i < 12; ++i) {
    auto x = 0.2 + 0.6 * torch::rand({1, 1, 1, 2}, f64);
    const double eps = 0.03 + 0.01 * i;
    const int64_t y = toy.logits32(x.to(torch::kFloat)).argmax(1)[0].item<int64_t>();
    const auto labels = torch::full({1}, y, torch::kLong);
    const InputDomain d{x, torch::full({1}, eps, f64), Norm::linf, true};
    auto both = forms::member_prepare(toy.graphs, d, labels, opt, true);
    auto rows = both;
    rows.margin_rows_only = true;
    const auto full = forms::member_evaluate(both, d, labels);
    const auto ev = forms::member_evaluate(rows, d, labels);
    INFO("problem " << i << ", eps " << eps << ": slack " << ev.slack[0].item<double>()
                    << ", with both ends " << full.slack[0].item<double>());
    CHECK(full.margins.empty());
    REQUIRE(ev.margins.size() == 4);
    REQUIRE(ev.settled.size() == 4);
    CHECK(ev.primal.defined());
    // No tighter than with both ends, expert by expert, margin by margin.
    CHECK(ev.slack[0].item<double>() <= full.slack[0].item<double>() + 1e-12);
    CHECK((ev.prob <= full.prob + 1e-12).all().item<bool>());
    looser += ev.slack[0].item<double>() < full.slack[0].item<double>() - 1e-9;
    // A row settles (and carries in branch and bound) above the tie allowance, and with
    // row_settled above that value too: the same bounds, fewer rows settled.
    auto strict = rows;
    strict.row_settled = 2.0;
    const auto ev2 = forms::member_evaluate(strict, d, labels);
    for (size_t j = 0; j < ev.settled.size(); ++j) {
      CHECK(torch::equal(ev2.margins[j], ev.margins[j]));
      CHECK_FALSE((ev2.settled[j] & ~ev.settled[j]).any().item<bool>());
      CHECK_FALSE((ev2.settled[j] & ev2.margins[j].le(2.0)).any().item<bool>());
      unsettled += (ev.settled[j] & ~ev2.settled[j]).sum().item<int>();
    }
    // With the lower ends bounded apart (branch and bound: once, at the root).
    rows.known_dlo = forms::difference_lower(both, labels);
    const auto lo = forms::member_evaluate(rows, d, labels);
    // The same rows, the same lower ends: both ends' bounds to the rounding.
    CHECK(lo.slack[0].item<double>() == Approx(full.slack[0].item<double>()).margin(1e-12));
    CHECK(torch::allclose(lo.prob, full.prob, 1e-12, 1e-12));
    // Sound: below the float32 model's probability margin at sampled points, and each
    // reported row below the expert's logit margin there.
    auto pts = (x - eps + 2 * eps * torch::rand({4000, 1, 1, 2}, f64)).clamp(0, 1);
    auto probs = toy.logits32(pts.to(torch::kFloat)).exp().to(torch::kFloat64);
    auto margin = probs.select(1, y) - probs.index_fill(1, torch::tensor({y}), -1.0).amax(1);
    CHECK(ev.slack[0].item<double>() <= margin.min().item<double>());
    for (int64_t j = 0; j < 4; ++j) {
      const auto& m = ev.margins[static_cast<size_t>(j)];
      if (!m.isfinite().any().item<bool>()) continue;  // no pass (not selectable)
      auto h = toy.expert64(j, pts.flatten(1));
      auto others = torch::tensor(y == 0   ? std::vector<int64_t>{1, 2}
                                  : y == 1 ? std::vector<int64_t>{0, 2}
                                           : std::vector<int64_t>{0, 1});
      auto low = std::get<0>((h.select(1, y).unsqueeze(1) - h.index_select(1, others)).min(0));
      CHECK((m[0] <= low + 1e-9).all().item<bool>());
    }
  }
  CHECK(looser > 0);     // with three classes the lower ends count (hence known_dlo)
  CHECK(unsettled > 0);  // rows between the allowance and 2: settled only without it
}

TEST_CASE(
    "branch and bound splits both members' routes of a dual-model and never verifies a "
    "broken region",
    "[unit][certify][bab]") {
  // A top-1 standard member and a top-2 robust one (the candidate and the mixture form
  // inside the dual form), blended at α = 0.6: F = 0.4·F_S + 0.6·F_R. Checked on the grid
  // as the top-2 test above; route splits fix the standard's expert, then the robust's set.
  Toy standard(3, 3, 6, 22), robust(4, 3, 6, 24, /*top_k=*/2);
  const double alpha = 0.6;
  const bab::Logits logits = [&](const torch::Tensor& v) {
    auto f = (1 - alpha) * torch::softmax(standard.logits32(v), 1) +
             alpha * torch::softmax(robust.logits32(v), 1);
    return torch::log(f);
  };
  torch::manual_seed(23);
  auto pool = 0.2 + 0.6 * torch::rand({4000, 2}, f64);
  const auto xs =
      torch::cat({near_boundary(standard, pool, 1, 8), near_boundary(robust, pool, 2, 8)});
  const auto t = grid_checked(logits, {&standard.graphs, &robust.graphs}, alpha, xs, 3.0);
  INFO("verified " << t.verified[0] << " / " << t.verified[1] << ", falsified " << t.falsified[0]
                   << " / " << t.falsified[1] << " (without / with route splits), route splits "
                   << t.route_splits[1]);
  CHECK(t.route_splits[0] == 0);
  CHECK(t.route_splits[1] > 0);
  CHECK(t.verified[1] > t.verified[0]);
  CHECK(t.falsified[1] > 0);
}
