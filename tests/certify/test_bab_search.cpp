// Branch and bound's search around its bounds (certify/bab.h, docs/certification.md §22)
// on the 2-D MoEs of bab_toys.h: counterexamples from attacks on the float32 ball's
// edge and from the bounds' minimisers, the attack rounds' objectives, and the
// accounting of every subproblem when the budget ends.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>

#include "bab_toys.h"
#include "bab_trace.h"

using namespace moecert;
using moecert_test::f64;
using moecert_test::Toy;

TEST_CASE("an attack's point on the float32 rounding of the ball's edge is a counterexample",
          "[unit][certify][bab]") {
  // Attacks project onto the float32 ball, whose edge x + float(ε) can lie just outside
  // the float64 region; the search moves such a point into the region before it judges it.
  Toy toy(3, 3, 8, 8);
  const bab::Logits logits = toy.logits();
  const double eps = 0.1;
  int outside = 0, falsified = 0;
  for (auto norm : {Norm::linf, Norm::l2})
    for (int i = 0; i < 40; ++i) {
      auto x = moecert_test::random_centre();
      const auto x32 = x.to(torch::kFloat);
      const int64_t y = toy.logits32(x32).argmax(1)[0].item<int64_t>();
      // The float32 points at distance float(ε), rounded outwards, in 16 directions.
      auto angle = torch::arange(16, f64) * (2 * M_PI / 16);
      auto dir = torch::stack({angle.cos(), angle.sin()}, 1);
      if (norm == Norm::linf) dir = dir / dir.abs().amax(1, true);
      auto step = (dir * eps).to(torch::kFloat);
      step = torch::nextafter(step, step.sign() * 2);  // one float32 step further out
      auto pts = (x32.view({1, 2}) + step).view({16, 1, 1, 2});
      auto wrong = toy.logits32(pts).argmax(1).ne(y).nonzero().flatten();
      if (wrong.numel() == 0) continue;
      auto adv = pts.narrow(0, wrong[0].item<int64_t>(), 1);
      auto off = (adv.to(torch::kFloat64) - x).flatten();
      const double dist =
          norm == Norm::linf ? off.abs().max().item<double>() : off.norm().item<double>();
      if (!(dist > eps)) continue;
      ++outside;
      bab::Problem p{{&toy.graphs}, 1.0, x, y, eps, norm, true, true};
      bab::Config cfg;
      cfg.split = bab::Split::input;
      // No time for a search: only the attack's point can decide.
      const auto out = bab::solve(
          p, cfg, logits, [&adv](int, const torch::Tensor&) { return adv; }, bab::Clock::now());
      if (out.verdict != bab::Verdict::falsified) continue;
      ++falsified;
      CHECK(out.distance <= eps);
      auto moved = (out.counterexample.to(torch::kFloat64) - x).flatten();
      CHECK((norm == Norm::linf ? moved.abs().max() : moved.norm()).item<double>() <= eps);
      CHECK(toy.logits32(out.counterexample).argmax(1)[0].item<int64_t>() != y);
    }
  REQUIRE(outside >= 4);
  CHECK(falsified >= outside * 3 / 4);  // moved inwards by an ulp, nearly all stay wrong
}

TEST_CASE("ReLU branch and bound falsifies broken regions from its bounds' minimisers alone",
          "[unit][certify][bab]") {
  // No attack: the only counterexamples are the minimisers of the worst subproblems'
  // bounds, checked on the float32 model every round.
  Toy toy(3, 3, 8, 21);
  const bab::Logits logits = toy.logits();
  const double eps = 0.25;
  int broken = 0, falsified = 0;
  for (int i = 0; i < 40 && broken < 12; ++i) {
    auto x = moecert_test::random_centre();
    const int64_t y = toy.logits32(x.to(torch::kFloat)).argmax(1)[0].item<int64_t>();
    const std::vector<double> lo{std::max(0.0, x[0][0][0][0].item<double>() - eps),
                                 std::max(0.0, x[0][0][0][1].item<double>() - eps)},
        hi{std::min(1.0, x[0][0][0][0].item<double>() + eps),
           std::min(1.0, x[0][0][0][1].item<double>() + eps)};
    if (!(toy.exact_margin(lo, hi, y) < -0.05)) continue;  // clearly broken regions only
    ++broken;
    bab::Problem p{{&toy.graphs}, 1.0, x, y, eps, Norm::linf, true, true};
    bab::Config cfg;
    cfg.split = bab::Split::relu, cfg.batch = 8;
    const auto out = bab::solve(p, cfg, logits, {}, bab::Clock::now() + std::chrono::seconds(5));
    CHECK(out.verdict != bab::Verdict::verified);
    if (out.verdict != bab::Verdict::falsified) continue;
    ++falsified;
    CHECK(out.found_by == bab::Outcome::Found::minimiser);
    auto off = (out.counterexample.to(torch::kFloat64) - x).abs().max().item<double>();
    CHECK(off <= eps);
    CHECK(toy.logits32(out.counterexample).argmax(1)[0].item<int64_t>() != y);
  }
  REQUIRE(broken >= 6);
  CHECK(falsified >= broken * 3 / 4);
}

TEST_CASE("the attack rounds visit every MoE-aware and targeted objective in turn",
          "[unit][certify][bab]") {
  using Kind = bab::AttackRound::Kind;
  CHECK(bab::attack_round(0, 4, 9).kind == Kind::untargeted);
  CHECK(bab::attack_round(3, 0, 0).kind == Kind::untargeted);  // nothing else to run
  for (int64_t aware : {0, 1, 4}) {
    const int64_t targets = 9, kinds = aware + targets;
    std::vector<int> seen_aware(static_cast<size_t>(aware)),
        seen_target(static_cast<size_t>(targets));
    for (int r = 1; r <= 2 * kinds; ++r) {
      const auto a = bab::attack_round(r, aware, targets);
      REQUIRE(a.kind != Kind::untargeted);
      CHECK(a.cycle == (r - 1) / kinds);
      if (a.kind == Kind::aware) {
        REQUIRE(a.index < aware);
        ++seen_aware[static_cast<size_t>(a.index)];
      } else {
        REQUIRE(a.index < targets);
        ++seen_target[static_cast<size_t>(a.index)];
      }
      if (r <= aware) CHECK(a.kind == Kind::aware);  // the MoE-aware ones first
    }
    for (int n : seen_aware) CHECK(n == 2);
    for (int n : seen_target) CHECK(n == 2);
    CHECK(bab::attack_round(static_cast<int>(aware) + 1, aware, targets).kind == Kind::targeted);
  }
}

TEST_CASE("after one pass through the objectives the attack rounds keep to their share",
          "[unit][certify][bab]") {
  // A search's timeline: 0.1 s of branching between checks, rounds of 0.4 s at least
  // 2 s apart (round 0 before the search), 300 s in all.
  const double cost = 0.4, interval = 2, share = 0.05, budget = 300;
  for (int64_t cycle : {0, 13}) {
    double t = cost, attacks = cost, last = t;
    int done = 0;
    std::vector<double> begun;
    while (t < budget) {
      t += 0.1;
      if (t - last < interval || !bab::attack_allowed(done, cycle, attacks, t, share)) continue;
      if (cycle > 0 && done >= cycle) CHECK(attacks <= share * t);
      begun.push_back(t);
      t += cost, attacks += cost, last = t, ++done;
    }
    INFO("cycle " << cycle << ": " << done << " rounds, " << attacks << " s of attacks");
    // The first pass (every round without a known cycle) runs at the interval.
    const size_t paced = cycle > 0 ? static_cast<size_t>(cycle) : begun.size();
    REQUIRE(begun.size() >= paced);
    for (size_t r = 1; r < paced; ++r) CHECK(begun[r] - begun[r - 1] <= interval + cost + 0.11);
    if (cycle == 0) {
      CHECK(attacks > 0.15 * budget);
    } else {
      CHECK(attacks <= share * budget + cost);  // the share, up to the last round begun
      CHECK(done > cycle);                      // later passes still run, more sparsely
    }
  }
  CHECK(bab::attack_allowed(3, 13, 100, 1, share));  // the first pass runs regardless
  CHECK_FALSE(bab::attack_allowed(13, 13, 2, 10, share));
  CHECK(bab::attack_allowed(13, 13, 0.5, 10, share));
}

TEST_CASE("branch and bound accounts for every subproblem when its budget ends",
          "[unit][certify][bab]") {
  Toy toy(3, 3, 8, 8);
  const bab::Logits logits = toy.logits();
  int unknown = 0;
  for (auto split : {bab::Split::input, bab::Split::relu}) {
    for (int i = 0; i < 12; ++i) {
      auto x = 0.2 + 0.6 * torch::rand({1, 1, 1, 2}, f64);
      const int64_t y = toy.logits32(x.to(torch::kFloat)).argmax(1)[0].item<int64_t>();
      bab::Problem p{{&toy.graphs}, 1.0, x, y, 0.25, Norm::linf, true, true};
      bab::Config cfg;
      cfg.split = split, cfg.batch = 4, cfg.max_queue = 24;  // a small queue ends it early
      const auto out = bab::solve(p, cfg, logits, {}, bab::Clock::now() + std::chrono::seconds(5));
      if (out.verdict == bab::Verdict::unknown) {
        ++unknown;
        CHECK(out.open_mass > 0);
      }
      CHECK(out.verified_mass + out.open_mass == Approx(1.0).margin(1e-12));
      CHECK(out.bounded >= 1);
      moecert_test::check_trace(out, false);
    }
  }
  CHECK(unknown > 0);
}

TEST_CASE("warm starts, screened splits and unoptimised subproblems keep the answers exact",
          "[unit][certify][bab]") {
  // Regions wide enough that the root's bounds rarely decide and the ReLU search runs (no
  // attack: only the search can falsify); every verdict is checked against the exact
  // margin, with and without warm starts and filtered smart branching, and with no α-β
  // step on the subproblems after the root (each bound at its starting parameters).
  Toy toy(3, 3, 8, 8);
  const bab::Logits logits = toy.logits();
  for (int variant : {0, 1, 2}) {
    const bool plain = variant == 1;
    const char* name = variant == 0 ? "warm, fsb" : variant == 1 ? "cold, first-order" : "no steps";
    torch::manual_seed(21);
    int64_t screened = 0, searched = 0;
    int decided = 0;  // by a search (more than the root bounded)
    for (int i = 0; i < 40; ++i) {
      auto x = 0.2 + 0.6 * torch::rand({1, 1, 1, 2}, f64);
      const int64_t y = toy.logits32(x.to(torch::kFloat)).argmax(1)[0].item<int64_t>();
      const double eps = 0.05 + 0.01 * (i % 20);
      bab::Problem p{{&toy.graphs}, 1.0, x, y, eps, Norm::linf, true, true};
      bab::Config cfg;
      cfg.split = bab::Split::relu, cfg.batch = 8;
      cfg.warm_start = !plain, cfg.fsb_candidates = variant == 0 ? 4 : 0;
      if (variant == 2) cfg.sub_steps = 0;
      const auto out = bab::solve(p, cfg, logits, {}, bab::Clock::now() + std::chrono::seconds(3));
      std::vector<double> lo(2), hi(2);
      for (int k = 0; k < 2; ++k) {
        const double c = x[0][0][0][k].item<double>();
        lo[static_cast<size_t>(k)] = std::max(0.0, c - eps);
        hi[static_cast<size_t>(k)] = std::min(1.0, c + eps);
      }
      const double exact = toy.exact_margin(lo, hi, y);
      INFO(name << ": problem " << i << ", exact margin " << exact << ", " << out.bounded
                << " subproblems");
      if (out.verdict == bab::Verdict::verified) CHECK(exact > -1e-9);
      if (out.verdict == bab::Verdict::falsified) CHECK(exact < 1e-6);
      if (out.verdict != bab::Verdict::falsified)
        CHECK(out.verified_mass + out.open_mass == Approx(1.0).margin(1e-12));
      decided += out.verdict != bab::Verdict::unknown && out.bounded > 1;
      screened += out.screened, searched += out.bounded > 1;
    }
    INFO(name << ": " << searched << " searches, " << screened << " screened");
    CHECK(searched > 0);
    CHECK(decided > 0);
    CHECK((screened > 0) == (variant == 0));
  }
}
