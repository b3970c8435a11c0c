// The radius search (certify/search.cpp) on a synthetic slack with a known root per
// sample: every pass it seeds starts from a pass that failed over larger regions of
// the same samples (the soundness condition of seeding, docs §15), the radius never
// exceeds the root, and the search gets within the tolerance of it.
#include <torch/torch.h>

#include <algorithm>
#include <catch2/catch.hpp>
#include <memory>
#include <vector>

#include "certify/search.h"

using namespace moecert;

namespace {

auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

/// What a synthetic pass remembers: its samples' radii and whether each failed.
struct Remembered {
  std::vector<double> eps;
  std::vector<bool> failed;
};

}  // namespace

TEST_CASE("the radius search seeds passes only from failed passes over larger regions",
          "[unit][certify][search]") {
  torch::manual_seed(5);
  const int64_t n = 40;
  auto root = torch::rand({n}, f64) * 0.2 + 0.01;           // the largest ε a full pass certifies
  auto guess = root * (torch::rand({n}, f64) * 1.6 + 0.4);  // off by up to x2 either way
  int64_t seeded = 0;
  std::vector<double> seen_eps;
  search::Prepare prepare = [&](const torch::Tensor& rows, const torch::Tensor& eps,
                                const search::Pass* seed, const torch::Tensor& seed_index) {
    auto mine = std::make_shared<Remembered>();
    for (int64_t i = 0; i < rows.size(0); ++i) {
      const double e = eps[i].item<double>(), r = root[rows[i].item<int64_t>()].item<double>();
      mine->eps.push_back(e);
      mine->failed.push_back(!(e < r));
      if (seed) {
        const auto* from = static_cast<const Remembered*>(seed->state.get());
        const auto at = static_cast<size_t>(seed_index[i].item<int64_t>());
        CHECK(from->eps.at(at) >= e);  // the seed's region contains this one
        CHECK(from->failed.at(at));    // and its pass failed there
        ++seeded;
      }
    }
    // Probes below the pass: the true slack, less a looseness that grows with the
    // distance below the pass (narrowed bounds), never above the true slack.
    auto r = root.index_select(0, rows);
    auto e0 = eps.clone();
    search::Prober probe = [r, e0](const torch::Tensor& t) {
      return (r - t) - 2.0 * (e0 - t).clamp_min(0);
    };
    return search::Pass{probe, mine};
  };
  search::Config cfg;
  cfg.rounds = 8, cfg.tol = 0.01;
  auto todo = torch::ones({n}, torch::kBool);
  auto res = search::radius_search(prepare, todo, guess, torch::zeros({n}, f64), cfg);
  CHECK(seeded > 0);
  CHECK((res.radius < root).all().item<bool>());  // sound: only certified probes count
  CHECK((res.radius >= root * (1 - 3 * cfg.tol)).all().item<bool>());  // and close
  CHECK((res.failed >= root).all().item<bool>());
}

TEST_CASE("radii of the grid that the rounds leave open get a full pass of their own",
          "[unit][certify][search]") {
  const int64_t n = 6;
  // Roots far above a poor first guess: one round cannot reach them.
  auto root = torch::tensor({0.3, 0.12, 0.09, 0.06, 0.04, 0.015}, f64);
  auto guess = torch::full({n}, 0.005, f64);
  std::vector<double> full_passes_at;
  search::Prepare prepare = [&](const torch::Tensor& rows, const torch::Tensor& eps,
                                const search::Pass*, const torch::Tensor&) {
    for (int64_t i = 0; i < eps.size(0); ++i) full_passes_at.push_back(eps[i].item<double>());
    auto r = root.index_select(0, rows);
    search::Prober probe = [r](const torch::Tensor& t) { return r - t; };
    return search::Pass{probe, nullptr};
  };
  search::Config cfg;
  cfg.rounds = 1;
  auto todo = torch::ones({n}, torch::kBool);
  auto before = search::radius_search(prepare, todo, guess, torch::zeros({n}, f64), cfg);
  CHECK((before.radius < 0.01).all().item<bool>());  // one round stops far below every root
  cfg.grid = {0.1, 0.02, 0.05};                      // any order
  full_passes_at.clear();
  auto res = search::radius_search(prepare, todo, guess, torch::zeros({n}, f64), cfg);
  CHECK((res.radius < root).all().item<bool>());  // sound
  // certified at every grid radius below its root, and no grid pass above a failure
  for (int64_t i = 0; i < n; ++i) {
    const double r = root[i].item<double>(), got = res.radius[i].item<double>();
    for (double g : {0.02, 0.05, 0.1})
      if (g < r) CHECK(got >= g);
  }
  const auto passes_at_01 = std::count(full_passes_at.begin(), full_passes_at.end(), 0.1);
  CHECK(passes_at_01 ==
        4);  // the samples certified at 0.05 (roots 0.3 to 0.06); the others failed below
}
