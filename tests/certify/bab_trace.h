// The course of a branch-and-bound search (bab::Outcome::trace), checked against its
// outcome on every search of the branch-and-bound tests that run rounds of splits.
#pragma once

#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cmath>
#include <limits>

#include "bab_toys.h"

namespace moecert_test {

/// A search's course (bab::Outcome::trace): in order of time, its subproblems rising and
/// its verified share never falling; at most kTracePoints; every worst slack an open
/// subproblem's (<= 0) or none; the last point the outcome's. `rising`: an expert-wise
/// search, whose leaves start at their parents' bounds and whose other experts' bounds
/// only rise, so its worst open slack never falls (none open: +inf).
inline void check_trace(const bab::Outcome& out, bool rising) {
  const auto& t = out.trace;
  if (out.rounds == 0) {
    CHECK(t.empty());
    return;
  }
  REQUIRE_FALSE(t.empty());
  CHECK(t.size() <= bab::Outcome::kTracePoints);
  const auto worst = [](double w) {
    return std::isnan(w) ? std::numeric_limits<double>::infinity() : w;
  };
  for (const auto& p : t)
    if (!std::isnan(p.worst_slack)) CHECK(p.worst_slack <= 0);  // an open one's
  for (size_t i = 1; i < t.size(); ++i) {
    CHECK(t[i].seconds >= t[i - 1].seconds);
    CHECK(t[i].subproblems > t[i - 1].subproblems);
    CHECK(t[i].verified_share >= t[i - 1].verified_share);
    if (rising)  // (up to simplex_min's rounding allowance, of order 1e-12)
      CHECK(worst(t[i].worst_slack) >= worst(t[i - 1].worst_slack) - 1e-9);
  }
  CHECK(t.back().seconds == out.seconds);
  CHECK(t.back().subproblems == out.bounded);
  CHECK(t.back().verified_share == out.verified_mass);
  CHECK(worst(t.back().worst_slack) == worst(out.worst_slack));
  // The slack at half the time (certify's stderr line) is a point's, or none before it.
  const double half = bab::slack_at(t, out.seconds / 2);
  if (t.front().seconds > out.seconds / 2) CHECK(std::isnan(half));
  const auto j = bab::trace_json(t);
  REQUIRE(j.size() == t.size());
  CHECK(j.back()["subproblems"].get<int64_t>() == out.bounded);
  CHECK(j.back()["worst_slack"].is_null() == std::isnan(t.back().worst_slack));
}

}  // namespace moecert_test
