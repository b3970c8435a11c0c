// Branch and bound against a grid (the branch-and-bound tests on the 2-D MoEs of
// bab_toys.h whose margin has no exact minimum: mixtures, dual-models): every verdict is
// checked against the float32 model on a 201 x 201 grid of the box.
#pragma once

#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <chrono>
#include <functional>
#include <vector>

#include "bab_toys.h"
#include "bab_trace.h"

namespace moecert_test {

/// Verdicts without [0] and with [1] route splits, each checked against the float32
/// model on a 201 x 201 grid of the box.
struct GridTally {
  int verified[2] = {0, 0}, falsified[2] = {0, 0};
  int64_t route_splits[2] = {0, 0}, carried[2] = {0, 0};
};

/// Whether the float32 model `logits32` misclassifies (label y) a point of a 201 x 201
/// grid of the box around x [1, 1, 1, 2] of radius e (∩ [0, 1]²).
inline bool grid_broken(const bab::Logits& logits32, const torch::Tensor& x, int64_t y, double e) {
  auto lo = (x - e).clamp_min(0.0).flatten(), hi = (x + e).clamp_max(1.0).flatten();
  auto g = torch::linspace(0, 1, 201, f64);
  auto grid =
      torch::stack(
          torch::meshgrid({lo[0] + (hi[0] - lo[0]) * g, lo[1] + (hi[1] - lo[1]) * g}, "ij"), 2)
          .view({-1, 1, 1, 2})
          .to(torch::kFloat);
  return logits32(grid).argmax(1).ne(y).any().item<bool>();
}

/// The grid's robust radius around x (grid_broken), by 12 bisection steps below 0.5
/// (0.5 when the grid is not broken there): the largest radius found unbroken.
inline double grid_radius(const bab::Logits& logits32, const torch::Tensor& x, int64_t y) {
  double r_lo = 0, r_hi = 0.5;
  if (!grid_broken(logits32, x, y, r_hi)) return r_hi;
  for (int it = 0; it < 12; ++it) {
    const double mid = 0.5 * (r_lo + r_hi);
    (grid_broken(logits32, x, y, mid) ? r_hi : r_lo) = mid;
  }
  return r_lo;
}

/// Branch and bound of the model `logits32` (the members `members`, a dual-model's α)
/// around each point of xs [n, 1, 1, 2], at radii below and near the grid's robust
/// radius, where the bounds need splits: a verified region has no misclassified grid
/// point, a counterexample is real, and the masses add up. `tweak` changes the search's
/// configuration; without `without_routes` only the searches with route splits run.
inline GridTally grid_checked(const bab::Logits& logits32,
                              const std::vector<const forms::MemberGraphs*>& members, double alpha,
                              const torch::Tensor& xs, double seconds,
                              const std::function<void(bab::Config&)>& tweak = {},
                              bool without_routes = true) {
  GridTally t;
  for (int64_t i = 0; i < xs.size(0); ++i) {
    auto x = xs.narrow(0, i, 1);
    const int64_t y = logits32(x.to(torch::kFloat)).argmax(1)[0].item<int64_t>();
    const double eps = grid_radius(logits32, x, y) *
                       std::vector<double>{0.5, 0.8, 0.95, 1.3}[static_cast<size_t>(i % 4)];
    const bool broken = grid_broken(logits32, x, y, eps);
    for (int with = without_routes ? 0 : 1; with < 2; ++with) {
      bab::Config cfg;
      cfg.split = bab::Split::relu;
      cfg.route_splits = with == 1;
      if (tweak) tweak(cfg);
      bab::Problem p{members, alpha, x, y, eps, Norm::linf, true, true};
      const auto out =
          bab::solve(p, cfg, logits32, random_points(logits32, p),
                     bab::Clock::now() + std::chrono::duration_cast<bab::Clock::duration>(
                                             std::chrono::duration<double>(seconds)));
      INFO("problem " << i << ", eps " << eps << ", route splits " << with << ", grid broken "
                      << broken);
      t.route_splits[with] += out.route_splits, t.carried[with] += out.carried;
      check_trace(out, false);
      if (out.verdict != bab::Verdict::falsified)
        CHECK(out.verified_mass + out.open_mass == Approx(1.0).margin(1e-12));
      if (out.verdict == bab::Verdict::verified) {
        ++t.verified[with];
        CHECK_FALSE(broken);
      } else if (out.verdict == bab::Verdict::falsified) {
        ++t.falsified[with];
        CHECK((out.counterexample.to(torch::kFloat64) - x).abs().max().item<double>() <= eps);
        CHECK(logits32(out.counterexample).argmax(1)[0].item<int64_t>() != y);
      }
    }
  }
  return t;
}

/// The points of `pool` [m, 2] nearest the boundary between the router's r-th and
/// (r + 1)-th largest logits (so that the selection changes inside their regions). [n, 1, 1, 2]
inline torch::Tensor near_boundary(const Toy& toy, const torch::Tensor& pool, int64_t r,
                                   int64_t n) {
  auto top = std::get<0>((pool.matmul(toy.R.t()) + toy.c).topk(r + 1, 1));
  auto near = std::get<1>((top.select(1, r - 1) - top.select(1, r)).topk(n, 0, /*largest=*/false));
  return pool.index_select(0, near).view({n, 1, 1, 2});
}

}  // namespace moecert_test
