// The radius search (see search.h). All arithmetic on [n] float64 tensors of a batch.
#include "search.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>

namespace moecert::search {
namespace {
constexpr double kInf = std::numeric_limits<double>::infinity();
}

// Bisection in log ε with full passes. The slack of a ReLU network's bound falls off a
// cliff as ε grows (units turn unstable together), so its values say little about
// where the root is; the search uses its signs, and its size only to stride:
//  - the first pass goes to `guess`;
//  - no pass failed yet: up x2 while the slack keeps 99 % of its value at ε = 0 (the
//    bound has hardly moved), else by `step`;
//  - a pass failed at b and something certified at l: sqrt(l b);
//  - below a failed pass, two cheap probes reuse its slightly looser intermediate
//    bounds at 0.97 b and 0.93 b, where they lose little (further below, bounds taken
//    above the cliff certify next to nothing: measured);
//  - nothing certified yet: the next pass goes to b / step.
Result radius_search(const Prepare& prepare, const torch::Tensor& todo, const torch::Tensor& guess,
                     const torch::Tensor& lo_in, const Config& cfg) {
  Result res;
  auto lo = lo_in.clone();                // certified (by any probe)
  auto a = lo.clone();                    // the largest certified full pass
  auto b = torch::full_like(lo, kInf);    // the smallest failed full pass
  auto next = torch::max(guess, lo * (1 + 4 * cfg.tol)).clamp_max(cfg.cap);
  auto s0 = torch::full_like(lo, kInf);   // the slack at ε = 0 (a cheap pass: no unstable unit)
  {
    auto rows = (todo & lo.le(0)).nonzero().flatten();
    if (rows.numel() > 0) {
      auto zero = torch::zeros({rows.numel()}, lo.options());
      s0.index_copy_(0, rows, prepare(rows, zero)(zero));
    }
  }
  for (int round = 0; round < cfg.rounds; ++round) {
    auto open = todo & lo.lt(cfg.cap) & (b.isinf() | b.gt(lo * (1 + cfg.tol)));
    auto rows = open.nonzero().flatten();
    if (rows.numel() == 0) break;
    auto sel = [&](const torch::Tensor& t) { return t.index_select(0, rows); };
    auto e = sel(next).clamp_min(1e-9);
    auto probe = prepare(rows, e);
    ++res.full_passes;
    auto slack = probe(e);
    auto ok = slack.gt(0);
    ++res.probes;
    for (double f : {0.97, 0.93}) {
      auto t = e * f;
      auto try_it = ~ok & t.gt(sel(lo));
      if (!try_it.any().item<bool>()) continue;
      auto good = probe(torch::where(try_it, t, e)).gt(0) & try_it;
      ++res.probes;
      lo.index_copy_(0, rows, torch::where(good, torch::max(sel(lo), t), sel(lo)));
    }
    lo.index_copy_(0, rows, torch::where(ok, torch::max(sel(lo), e), sel(lo)));
    auto ra = torch::where(ok, e, sel(a)), rb = torch::where(ok, sel(b), e);
    a.index_copy_(0, rows, ra);
    b.index_copy_(0, rows, rb);
    auto l = torch::max(ra, sel(lo));
    auto kept = slack / sel(s0);
    auto stride = torch::where(kept.gt(0.99), torch::full_like(l, 2.0), torch::full_like(l, cfg.step));
    auto step = torch::where(rb.isinf(), l * stride, torch::where(l.gt(0), torch::sqrt(l * rb), rb / cfg.step));
    next.index_copy_(0, rows, step.clamp_max(cfg.cap));
  }
  res.radius = lo;
  res.failed = b;
  return res;
}

}  // namespace moecert::search
