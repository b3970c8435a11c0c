// The per-sample radius search of the bound-propagation forms (private to certify/).
// A full pass (intermediate bounds at ε_I) is the expensive step; a probe at ε <= ε_I
// narrows its intermediate bounds to the smaller region (valid: they hold on the
// larger one) and walks only the final rows, so it is cheap but a little looser; and
// a full pass below a failed one starts from the failed one's bounds (a seed), so it
// walks back from fewer units. Every probe that certifies is a
// certificate of its own ε, so the result is sound whatever path the search takes.
#pragma once

#include <torch/types.h>

#include <functional>
#include <memory>
#include <vector>

namespace moecert::search {

struct Config {
  int rounds = 3;      ///< full passes per sample at most
  double tol = 0.01;   ///< stop when the bracket is within this relative width
  double step = 1.25;  ///< factor between full passes until the radius is bracketed
  double cap = 1.0;    ///< never search above this radius
  /// Cheap probes below a failed pass at b: at these fractions of b down to the first
  /// that certifies, then this many bisections between it and the failure above it.
  std::vector<double> scan = {0.98, 0.95, 0.9};
  int bisections = 1;
  /// Radii checked by a full pass of their own after the rounds wherever the search
  /// left them open (certified below, not failed at or below): the certified accuracy
  /// at these radii is then a direct check, not the reach of `rounds` passes.
  std::vector<double> grid;
};

/// Slack of every prepared sample at radii `eps` [m] (each <= its prepared ε_I): > 0 certifies.
using Prober = std::function<torch::Tensor(const torch::Tensor& eps)>;
/// A full pass of some samples: its probe, and its bounds, opaque to the search,
/// which a later pass over smaller regions of the same samples can start from.
struct Pass {
  Prober probe;
  std::shared_ptr<const void> state;
};
/// A full pass for the samples `rows` [m] (batch positions) at radii `eps_i` [m]; with
/// `seed` a pass whose regions contain these, `seed_index` [m] the samples' positions
/// in it (the order of the rows it was prepared for).
using Prepare = std::function<Pass(const torch::Tensor& rows, const torch::Tensor& eps_i,
                                   const Pass* seed, const torch::Tensor& seed_index)>;

struct Result {
  torch::Tensor radius;  ///< [n] the largest certified probe (0 if none)
  torch::Tensor failed;  ///< [n] the smallest ε whose full pass did not certify (+inf if none)
  int64_t full_passes = 0, probes = 0;
};

/// Searches every sample with `todo` [n] set, starting from a first full pass at
/// `guess` [n]; samples start certified at `lo` [n] (0, or a weaker method's radius).
Result radius_search(const Prepare& prepare, const torch::Tensor& todo, const torch::Tensor& guess,
                     const torch::Tensor& lo, const Config& cfg);

}  // namespace moecert::search
