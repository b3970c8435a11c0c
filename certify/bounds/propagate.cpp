// The forward sweep: interval bounds of every
// node, CROWN bounds on the inputs of relaxed nodes, float32 error bounds.
// docs/certification.md §10–§12.
#include <ATen/Parallel.h>

#include <algorithm>

#include "bounds-impl.h"
#include "moecert/error.h"

namespace moecert {

namespace {

using bp::rho;

}  // namespace

std::pair<torch::Tensor, torch::Tensor> bp::region_ends(const InputDomain& d) {
  if (d.lower.defined()) return {d.lower, d.upper};
  auto eps = d.eps.view({-1, 1, 1, 1});
  auto lo = d.x - eps, hi = d.x + eps;
  if (d.box) lo = lo.clamp_min(0.0), hi = hi.clamp_max(1.0);
  return {lo, hi};
}

NodeBounds bp::region_box(const InputDomain& d) {
  auto [lo, hi] = region_ends(d);
  NodeBounds in{{}, {}, {}, torch::zeros_like(lo)};
  if (d.lower.defined()) {
    // A given box: widened by the rounding allowance ρ·|·| like the ball's.
    in.lo = lo - rho * lo.abs(), in.hi = hi + rho * hi.abs();
  } else {
    // ρ·(|x| + ε) outwards, then into the box again (a clamped end stays where it was).
    auto m = d.x.abs() + d.eps.view({-1, 1, 1, 1});
    in.lo = lo - rho * m, in.hi = hi + rho * m;
    if (d.box) in.lo = in.lo.clamp_min(0.0), in.hi = in.hi.clamp_max(1.0);
  }
  in.mag = torch::max(in.lo.abs(), in.hi.abs());
  return in;
}

namespace {

/// Whether a node's interval is worth tightening by a backward pass, and over which
/// units: the inputs of relaxed operators, for CROWN (the units that decide their
/// relaxations: a ReLU's unstable ones) and, for p = 2, in the affine prefix (every
/// unit: there IBP of the ball's box is loose where a backward pass is exact).
bool refine_wanted(const BoundNode& n, const BoundPass& pass, bool& all_units) {
  if (!n.feeds_relaxed) return false;
  const bool prefix = !n.after_relaxed;
  if (prefix && pass.domain.norm == Norm::l2) {
    all_units = interval_intermediates(pass.opt.method);
    return true;
  }
  all_units = false;
  return !interval_intermediates(pass.opt.method) && !prefix;
}

/// Rows ±e_u for the units `u` [m, 1 + dims] (sample, then coordinates) of a node of
/// shape `shape`: lower bounds first, then upper bounds (negated). A unit of a grid is
/// a one-entry patch (channel c at site (i, j)); a unit of a vector or of a token
/// sequence a one-hot row.
Coeffs unit_rows(const torch::Tensor& u, const Shape& shape, const torch::TensorOptions& opts) {
  const int64_t m = u.size(0);
  auto sign = torch::cat({torch::ones({m}, opts), -torch::ones({m}, opts)}).view({-1, 1});
  auto uu = torch::cat({u, u});
  Coeffs c;
  c.sample = uu.select(1, 0).contiguous();
  if (shape.size() == 3) {
    c.patches = true;
    c.Ht = shape[1], c.Wt = shape[2];
    c.site = (c.sample * shape[1] + uu.select(1, 2)) * shape[2] + uu.select(1, 3);
    c.A = (torch::nn::functional::one_hot(uu.select(1, 1), shape[0]).to(opts) * sign)
              .view({2 * m, shape[0], 1, 1});
  } else {  // a one-hot row over the node's (row-major) coordinates: vectors, tokens
    int64_t numel = 1;
    auto flat = torch::zeros({2 * m}, uu.options());
    for (size_t d = 0; d < shape.size(); ++d) {
      flat = flat * shape[d] + uu.select(1, static_cast<int64_t>(d) + 1);
      numel *= shape[d];
    }
    std::vector<int64_t> rows{2 * m};
    rows.insert(rows.end(), shape.begin(), shape.end());
    c.A = (torch::nn::functional::one_hot(flat, numel).to(opts) * sign).view(rows);
  }
  return c;
}

/// The units of node `k` whose bounds decide the relaxation of a consumer.
torch::Tensor relaxed_mask(const BoundPass& pass, size_t k) {
  const auto& nb = pass.nodes[k];
  auto mask = torch::zeros_like(nb.lo, torch::kBool);
  for (int c : pass.graph->nodes()[k].consumers) {
    const auto& consumer = pass.graph->nodes()[static_cast<size_t>(c)];
    if (consumer.rule->relaxed()) mask = mask | consumer.rule->relaxed_units(*consumer.layer, nb);
  }
  return mask;
}

/// The rows of the units `keep` [j] (indices into r.pos) of some kept rows.
RefinedRows pick_rows(const RefinedRows& r, const torch::Tensor& keep) {
  auto both = torch::cat({keep, keep + r.pos.size(0)});  // each unit's lower and upper row
  RefinedRows t;
  t.pos = r.pos.index_select(0, keep);
  t.b = r.b.index_select(0, both), t.mag = r.mag.index_select(0, both);
  if (r.at_input.A.defined()) {
    t.at_input = r.at_input;
    t.at_input.A = r.at_input.A.index_select(0, both);
    t.at_input.sample = r.at_input.sample.index_select(0, both);
    if (r.at_input.site.defined()) t.at_input.site = r.at_input.site.index_select(0, both);
  }
  return t;
}

/// Intersects a node's interval with bounds of some of its units: lo at `pos` from
/// rows lower[0, m), hi from −lower[m, 2m).
void tighten(NodeBounds& nb, const torch::Tensor& pos, const torch::Tensor& lower) {
  const int64_t m = pos.size(0);
  auto flat_lo = nb.lo.view({-1}), flat_hi = nb.hi.view({-1});
  flat_lo.index_put_({pos}, torch::max(flat_lo.index({pos}), lower.narrow(0, 0, m)));
  flat_hi.index_put_({pos}, torch::min(flat_hi.index({pos}), -lower.narrow(0, m, m)));
}

/// The flat positions in a node's [B, *shape] tensors of units [m, 1 + dims]. -> [m]
torch::Tensor flat_positions(const NodeBounds& nb, const torch::Tensor& units) {
  auto strides = torch::tensor(nb.lo.strides().vec(), torch::kLong).to(units.device());
  return (units * strides).sum(1);
}

/// Tightens node `k`'s interval by lower bounds of ±e_u for the chosen units, in
/// chunks of rows (sized by a one-row dry run) processed in parallel; keeps the
/// chunks' input-level rows of the samples whose kept rows fit in opt.keep_elements.
/// With opt.intermediate_alpha_steps under α-CROWN, each row's slopes are optimised
/// instead, and no rows are kept.
void refine(BoundPass& pass, int k, bool all_units) {
  auto& nb = pass.nodes[static_cast<size_t>(k)];
  const Shape& shape = pass.graph->nodes()[static_cast<size_t>(k)].out_shape;
  auto mask = all_units ? torch::ones_like(nb.lo, torch::kBool) : relaxed_mask(pass, k);
  auto units = mask.nonzero();  // [n, 1 + dims]: sample, then the unit's coordinates
  const int64_t n = units.size(0);
  if (n == 0) return;
  const auto opts = nb.lo.options();
  int64_t walked = pass.input.lo[0].numel();  // one dense row's coefficients, every node
  for (int m = 0; m < k; ++m) walked += pass.nodes[static_cast<size_t>(m)].lo[0].numel();
  if (pass.opt.intermediate_alpha_steps > 0 && pass.opt.method == BoundMethod::alpha_crown &&
      n * walked <= defaults::intermediate_alpha_elements) {
    // Optimised slopes (docs §10): dense rows, chunks in turn, each with autograd inside
    // (which keeps a few copies of every row's coefficients at every node it walks).
    const int64_t units_at_once = std::max<int64_t>(1, pass.opt.chunk_elements / (8 * walked));
    for (int64_t from = 0; from < n; from += units_at_once) {
      const int64_t len = std::min(units_at_once, n - from);
      tighten(nb, flat_positions(nb, units.narrow(0, from, len)),
              bp::alpha_rows(pass, k, unit_rows(units.narrow(0, from, len), shape, opts), nullptr,
                             pass.opt.intermediate_alpha_steps, nullptr, nullptr, nullptr,
                             /*planes_last=*/true));
    }
    return;
  }
  auto bound = [&](const torch::Tensor& u, int64_t* widest, RefinedRows* keep) {
    return bp::lower_rows(pass, k, unit_rows(u, shape, opts), torch::zeros({2 * u.size(0)}, opts),
                          nullptr, -1, widest, keep);
  };
  int64_t widest = 1;
  bound(units.narrow(0, 0, 1), &widest, nullptr);
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t chunk = std::clamp<int64_t>(pass.opt.chunk_elements / (2 * widest * threads), 1,
                                            (n + threads - 1) / threads);
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::vector<torch::Tensor> lows(static_cast<size_t>(chunks)), poss(lows.size());
  std::vector<RefinedRows> kept(static_cast<size_t>(chunks));
  // Which samples keep this node's rows: those whose kept rows, these included, stay
  // within opt.keep_elements each. Decided per sample, so that what a sample keeps (and
  // so its narrowed bounds) never depends on the other samples of its batch.
  const int64_t B = nb.lo.size(0);
  auto held = torch::zeros({B}, torch::kLong);
  for (const auto& per_node : pass.refined)
    for (const auto& r : per_node)
      if (r.at_input.A.defined())
        held += torch::bincount(r.at_input.sample.cpu(), {}, B) *
                (r.at_input.A.numel() / r.at_input.A.size(0));
  auto sample_units = torch::bincount(units.select(1, 0).cpu(), {}, B);
  const int64_t row_elements =
      pass.input.lo[0].numel();  // a dense input-level row, the most one holds
  auto keeps =
      (held + 2 * row_elements * sample_units).le(pass.opt.keep_elements) & sample_units.gt(0);
  const bool keep = keeps.any().item<bool>();
  auto unit_keeps = keeps.to(units.device()).index_select(0, units.select(1, 0));
  auto pos = flat_positions(nb, units);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t from = c * chunk, len = std::min(chunk, n - from);
      auto chosen = keep ? unit_keeps.narrow(0, from, len).nonzero().flatten() : torch::Tensor();
      RefinedRows rows;
      auto* kc = keep && chosen.numel() > 0 ? &rows : nullptr;
      lows[static_cast<size_t>(c)] = bound(units.narrow(0, from, len), nullptr, kc);
      poss[static_cast<size_t>(c)] = pos.narrow(0, from, len);
      if (!kc) continue;
      rows.pos = poss[static_cast<size_t>(c)];
      kept[static_cast<size_t>(c)] =
          chosen.numel() == len ? std::move(rows) : pick_rows(rows, chosen);
    }
  });
  for (size_t c = 0; c < lows.size(); ++c) tighten(nb, poss[c], lows[c]);
  for (auto& kc : kept)
    if (kc.pos.defined()) pass.refined[static_cast<size_t>(k)].push_back(std::move(kc));
}

/// The coordinate box of regions `d`, inside those of `wide` (when given).
NodeBounds input_box(const InputDomain& d, const BoundPass* wide) {
  NodeBounds in = bp::region_box(d);
  if (wide) in.lo = torch::max(in.lo, wide->input.lo), in.hi = torch::min(in.hi, wide->input.hi);
  return in;
}

/// The interval forward step of node `k` from its inputs' bounds in `pass`,
/// outward-rounded for the float64 arithmetic. Relational (docs §12): the inputs'
/// intervals enclose their float32 values and carry err32 = 0, so the rule's err32 is
/// the node's own rounding r at any float32 input in them; the float32 output lies in
/// the exact image widened by r, which becomes the node's interval, and r is kept in
/// round32[k] for the backward walks.
NodeBounds forward_step(BoundPass& pass, size_t k) {
  const auto& n = pass.graph->nodes()[k];
  std::vector<const NodeBounds*> in;
  for (int i : n.inputs) in.push_back(i < 0 ? &pass.input : &pass.nodes[static_cast<size_t>(i)]);
  NodeBounds nb = n.rule->bounds(*n.layer, in);
  if (pass.relational()) {
    auto r = nb.err32;
    nb.lo = nb.lo - r, nb.hi = nb.hi + r, nb.mag = nb.mag + r;
    nb.err32 = torch::zeros_like(r);
    pass.round32[k] = r;
  }
  nb.lo = nb.lo - rho * nb.mag, nb.hi = nb.hi + rho * nb.mag;
  return nb;
}

// Node k of `pass` (its regions inside those of `wide`, same samples) intersected with
// what `wide` knows of it: every bound of `wide` holds over its larger regions, hence
// over the smaller ones; its kept rows' walks used relaxations of the larger
// intervals, valid on the smaller ones, so only their concretisation is redone — for
// CROWN only where it can change a relaxation (the relaxed units: any valid interval
// is sound, tighter ones elsewhere would change nothing but IBP further on), and only
// for the samples whose region changed (`changed` [B]; for the others the kept rows'
// bounds over the same region are the pass's own, already in its interval).
void narrow_node(const BoundPass& wide, size_t k, BoundPass& pass, const torch::Tensor& changed) {
  auto& nb = pass.nodes[k];
  const auto& w = wide.nodes[k];
  nb.lo = torch::max(nb.lo, w.lo), nb.hi = torch::min(nb.hi, w.hi);
  nb.mag = torch::min(nb.mag, w.mag), nb.err32 = torch::min(nb.err32, w.err32);
  // Both roundings bound the node's own at any float32 input in its inputs' intervals,
  // and the narrow pass's inputs lie in both passes' intervals.
  if (pass.relational()) pass.round32[k] = torch::min(pass.round32[k], wide.round32[k]);
  if (wide.refined[k].empty()) return;
  const bool intervals = interval_intermediates(pass.opt.method);
  const bool all = intervals && changed.all().item<bool>();
  torch::Tensor wanted;
  if (!all) {
    auto units = intervals ? torch::ones_like(nb.lo, torch::kBool) : relaxed_mask(pass, k);
    std::vector<int64_t> per_sample(static_cast<size_t>(nb.lo.dim()), 1);
    per_sample[0] = -1;
    wanted = (units & changed.view(per_sample)).view({-1});
  }
  for (const auto& r : wide.refined[k]) {
    RefinedRows picked;
    if (!all) {
      auto keep = wanted.index_select(0, r.pos).nonzero().flatten();
      if (keep.numel() == 0) continue;
      picked = pick_rows(r, keep);
    }
    const RefinedRows& u = all ? r : picked;
    auto b = u.b.clone(), mag = u.mag.clone();
    if (u.at_input.A.defined()) bp::concretise_input(u.at_input, pass, b, mag);
    tighten(nb, u.pos, b - rho * mag);
  }
}

}  // namespace

bool relational_errors(const BoundGraph& g, const BoundOptions& opt) {
  if (opt.fp32 != Float32Errors::automatic) return opt.fp32 == Float32Errors::relational;
  return std::any_of(g.nodes().begin(), g.nodes().end(),
                     [](const BoundNode& n) { return n.rule->compounds_rounding(); });
}

BoundPass bound_forward(const BoundGraph& g, const InputDomain& d, const BoundOptions& opt,
                        const BoundPass* seed) {
  torch::NoGradGuard no_grad;
  int64_t numel = 1;
  for (auto v : g.input_shape()) numel *= v;
  if (numel > bp::max_sum_length)
    throw ConfigError("certify: inputs of " + std::to_string(numel) + " values exceed the " +
                      std::to_string(bp::max_sum_length) + " the rounding allowance covers");
  BoundPass pass;
  pass.graph = &g, pass.domain = d, pass.opt = opt;
  pass.input = input_box(d, seed);
  pass.refined.resize(g.nodes().size());
  if (relational_errors(g, opt)) pass.round32.resize(g.nodes().size());
  if (seed && seed->relational() != pass.relational())
    throw Error(ExitCode::internal, "certify: a seed pass with another float32 error model");
  torch::Tensor changed;
  if (seed) changed = d.eps.ne(seed->domain.eps);
  for (size_t k = 0; k < g.nodes().size(); ++k) {
    pass.nodes.push_back(forward_step(pass, k));
    if (seed) narrow_node(*seed, k, pass, changed);
    bool all_units = false;
    if (refine_wanted(g.nodes()[k], pass, all_units)) refine(pass, static_cast<int>(k), all_units);
  }
  return pass;
}

BoundPass bound_narrow(const BoundPass& wide, const InputDomain& d) {
  torch::NoGradGuard no_grad;
  BoundPass pass;
  pass.graph = wide.graph, pass.domain = d, pass.opt = wide.opt;
  pass.input = input_box(d, &wide);
  pass.refined.resize(wide.nodes.size());
  pass.round32.resize(wide.round32.size());
  pass.split = wide.split;
  const auto changed = d.eps.ne(wide.domain.eps);
  for (size_t k = 0; k < wide.nodes.size(); ++k) {
    pass.nodes.push_back(forward_step(pass, k));
    narrow_node(wide, k, pass, changed);
  }
  return pass;
}

BoundPass bound_split(const BoundPass& root, const torch::Tensor& index,
                      const std::vector<torch::Tensor>& sign) {
  torch::NoGradGuard no_grad;
  if (root.relational())
    throw Error(ExitCode::internal,
                "certify: ReLU splits of a pass with relational float32 errors");
  auto pick = [&](const NodeBounds& nb) {
    return NodeBounds{nb.lo.index_select(0, index), nb.hi.index_select(0, index),
                      nb.mag.index_select(0, index), nb.err32.index_select(0, index)};
  };
  BoundPass pass;
  pass.graph = root.graph, pass.opt = root.opt;
  pass.domain = {root.domain.x.index_select(0, index), root.domain.eps.index_select(0, index),
                 root.domain.norm, root.domain.box};
  if (root.domain.lower.defined())
    pass.domain.lower = root.domain.lower.index_select(0, index),
    pass.domain.upper = root.domain.upper.index_select(0, index);
  pass.input = pick(root.input);
  pass.refined.resize(root.nodes.size());
  pass.split = sign;
  pass.split.resize(root.nodes.size());
  // The root's intervals of every subregion: broadcast, not copied, from a root of one region.
  const bool one = root.domain.x.size(0) == 1;
  auto wide = [&](const NodeBounds& nb) {
    if (!one) return pick(nb);
    const auto n = index.size(0);
    auto at = [&](const torch::Tensor& t) {
      auto shape = t.sizes().vec();
      shape[0] = n;
      return t.expand(shape);
    };
    return NodeBounds{at(nb.lo), at(nb.hi), at(nb.mag), at(nb.err32)};
  };
  for (size_t k = 0; k < root.nodes.size(); ++k) {
    // IBP of the (clamped) inputs, inside the root's interval: both hold on the subregion.
    NodeBounds nb = forward_step(pass, k);
    const NodeBounds w = wide(root.nodes[k]);
    nb.lo = torch::max(nb.lo, w.lo), nb.hi = torch::min(nb.hi, w.hi);
    nb.mag = torch::min(nb.mag, w.mag), nb.err32 = torch::min(nb.err32, w.err32);
    if (const auto& s = pass.split[k]; s.defined()) {
      // On the subregion s·z >= 0: z >= 0 where s = 1, z <= 0 where s = −1.
      nb.lo = torch::where(s.gt(0), nb.lo.clamp_min(0.0), nb.lo);
      nb.hi = torch::where(s.lt(0), nb.hi.clamp_max(0.0), nb.hi);
    }
    pass.nodes.push_back(std::move(nb));
  }
  return pass;
}

torch::Tensor positions_in(const torch::Tensor& index, int64_t size) {
  auto at = torch::full({size}, -1, index.options());
  return at.index_copy_(0, index, torch::arange(index.size(0), index.options()));
}

BoundPass bound_subset(const BoundPass& p, const torch::Tensor& index) {
  torch::NoGradGuard no_grad;
  auto pick = [&](const NodeBounds& nb) {
    return NodeBounds{nb.lo.index_select(0, index), nb.hi.index_select(0, index),
                      nb.mag.index_select(0, index), nb.err32.index_select(0, index)};
  };
  BoundPass s;
  s.graph = p.graph, s.opt = p.opt;
  s.domain = {p.domain.x.index_select(0, index), p.domain.eps.index_select(0, index), p.domain.norm,
              p.domain.box};
  if (p.domain.lower.defined())
    s.domain.lower = p.domain.lower.index_select(0, index),
    s.domain.upper = p.domain.upper.index_select(0, index);
  s.input = pick(p.input);
  for (const auto& nb : p.nodes) s.nodes.push_back(pick(nb));
  for (const auto& r : p.round32) s.round32.push_back(r.index_select(0, index));
  // Old sample -> new position (-1: dropped); kept rows follow their samples.
  auto to_new = positions_in(index, p.domain.x.size(0));
  s.refined.resize(p.refined.size());
  for (size_t k = 0; k < p.refined.size(); ++k) {
    const int64_t per_sample = p.nodes[k].lo[0].numel();
    for (const auto& r : p.refined[k]) {
      auto owner = to_new.index_select(0, torch::div(r.pos, per_sample, "floor"));
      auto keep = owner.ge(0).nonzero().flatten();
      if (keep.numel() == 0) continue;
      RefinedRows t = pick_rows(r, keep);
      t.pos = owner.index_select(0, keep) * per_sample + t.pos.remainder(per_sample);
      if (t.at_input.A.defined()) {
        Coeffs& c = t.at_input;
        c.sample = to_new.index_select(0, c.sample);
        if (c.patches) c.site = c.sample * (c.Ht * c.Wt) + c.site.remainder(c.Ht * c.Wt);
      }
      s.refined[k].push_back(std::move(t));
    }
  }
  return s;
}

}  // namespace moecert
