// The radius search (see search.h). All arithmetic on [n] float64 tensors of a batch.
#include "search.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "moecert/bounds.h"

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
//  - below a failed pass at b, cheap probes (the pass narrowed) at cfg.scan fractions
//    of b (0.98, 0.95, 0.9) down to the first that certifies, then cfg.bisections
//    between it and the failure above it (close below b they certify about what a
//    full pass would; far below, bounds taken above the cliff lose most: measured);
//  - a pass failed at b and something certified at l: the next pass at sqrt(l b);
//  - nothing certified yet: the next pass below the lowest probe, by `step`.
// Every pass below a failed one starts from the smallest failed pass above it (its
// seed), so it walks back from the units its seed left unstable only.
Result radius_search(const Prepare& prepare, const torch::Tensor& todo, const torch::Tensor& guess,
                     const torch::Tensor& lo_in, const Config& cfg) {
  Result res;
  auto lo = lo_in.clone();              // certified (by any probe)
  auto b = torch::full_like(lo, kInf);  // the smallest failed full pass
  auto next = torch::max(guess, lo * (1 + 4 * cfg.tol)).clamp_max(cfg.cap);
  auto s0 = torch::full_like(lo, kInf);  // the slack at ε = 0 (a cheap pass: no unstable unit)
  {
    auto rows = (todo & lo.le(0)).nonzero().flatten();
    if (rows.numel() > 0) {
      auto zero = torch::zeros({rows.numel()}, lo.options());
      s0.index_copy_(0, rows, prepare(rows, zero, nullptr, {}).probe(zero));
    }
  }
  // The passes that may seed later ones, the rows each covered, and per sample the
  // pass that failed at its b (-1: none).
  std::vector<Pass> passes;
  std::vector<torch::Tensor> covered;
  auto seed_of = torch::full(lo.sizes(), -1, torch::kLong).to(lo.device());
  // One full pass of `rows` with its probes; updates the search's state.
  auto run = [&](const torch::Tensor& rows, int64_t seed) {
    auto sel = [&](const torch::Tensor& t) { return t.index_select(0, rows); };
    auto e = sel(next).clamp_min(1e-9);
    torch::Tensor seed_index;
    if (seed >= 0) {
      seed_index =
          positions_in(covered[static_cast<size_t>(seed)], lo.size(0)).index_select(0, rows);
    }
    auto pass =
        prepare(rows, e, seed >= 0 ? &passes[static_cast<size_t>(seed)] : nullptr, seed_index);
    ++res.full_passes;
    auto slack = pass.probe(e);
    auto ok = slack.gt(0);
    ++res.probes;
    // Cheap probes below a failed pass: `good` the highest certified, `bad` the lowest
    // failed above it (both start at the pass).
    auto l_rows = sel(lo);
    auto good = torch::zeros_like(e), bad = e.clone();
    auto cheap = [&](const torch::Tensor& t, const torch::Tensor& want) {
      auto pass_ok = pass.probe(torch::where(want, t, e)).gt(0) & want;
      ++res.probes;
      good = torch::where(pass_ok, t, good);
      bad = torch::where(want & ~pass_ok, t, bad);
    };
    for (double f : cfg.scan) {
      auto t = e * f;
      auto want = ~ok & good.le(0) & t.gt(l_rows);
      if (!want.any().item<bool>()) break;
      cheap(t, want);
    }
    for (int i = 0; i < cfg.bisections; ++i) {
      auto t = torch::sqrt(good * bad);
      auto want = ~ok & good.gt(0) & bad.gt(good * (1 + cfg.tol));
      if (!want.any().item<bool>()) break;
      cheap(t, want);
    }
    l_rows = torch::max(l_rows, torch::where(ok, e, good));
    lo.index_copy_(0, rows, l_rows);
    auto rb = torch::where(ok, sel(b), e);
    b.index_copy_(0, rows, rb);
    auto kept = slack / sel(s0);
    auto stride = torch::where(kept.gt(0.99), torch::full_like(l_rows, 2.0),
                               torch::full_like(l_rows, cfg.step));
    auto down = torch::min(rb, bad) / cfg.step;
    auto step = torch::where(rb.isinf(), l_rows * stride,
                             torch::where(l_rows.gt(0), torch::sqrt(l_rows * rb), down));
    next.index_copy_(0, rows, step.clamp_max(cfg.cap));
    const auto id = static_cast<int64_t>(passes.size());
    passes.push_back(std::move(pass));
    covered.push_back(rows);
    seed_of.index_copy_(0, rows,
                        torch::where(ok, sel(seed_of), torch::full_like(sel(seed_of), id)));
  };
  for (int round = 0; round < cfg.rounds; ++round) {
    auto open = todo & lo.lt(cfg.cap) & (b.isinf() | b.gt(lo * (1 + cfg.tol)));
    if (!open.any().item<bool>()) break;
    // One pass per seed: the samples whose smallest failed pass is the same.
    auto seeds = std::get<0>(torch::_unique(seed_of.masked_select(open))).cpu();
    for (int64_t i = 0; i < seeds.size(0); ++i) {
      const int64_t s = seeds[i].item<int64_t>();
      run((open & seed_of.eq(s)).nonzero().flatten(), s);
    }
    // Passes no sample starts from any more: their bounds are dropped.
    for (size_t i = 0; i < passes.size(); ++i)
      if (passes[i].state && !seed_of.eq(static_cast<int64_t>(i)).any().item<bool>())
        passes[i] = {};
  }
  // The grid radii the rounds left open (lo < g < b): one full pass each, ascending,
  // so that a sample's certified accuracy at g is a pass at g itself (docs §15).
  auto grid = cfg.grid;
  std::sort(grid.begin(), grid.end());
  for (double g : grid) {
    if (!(g > 0) || g > cfg.cap) continue;
    auto open = todo & lo.lt(g) & b.gt(g);
    if (!open.any().item<bool>()) continue;
    next = torch::where(open, torch::full_like(next, g), next);
    run(open.nonzero().flatten(), -1);
  }
  res.radius = lo;
  res.failed = b;
  return res;
}

}  // namespace moecert::search
