// Compiling layer graphs to nodes, and the forward sweep: interval bounds of every
// node, CROWN bounds on the inputs of relaxed nodes, float32 error bounds.
// docs/certification.md §10–§12.
#include "bounds-impl.h"

#include "moecert/error.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace moecert {

BoundGraph::BoundGraph(LayerGraph g, Shape input_shape)
    : layers_(std::make_shared<const LayerGraph>(std::move(g))), input_(std::move(input_shape)) {
  Shape s = input_;
  add_chain(*layers_, -1, s);
  if (nodes_.empty()) throw ConfigError("certify: an empty layer graph has nothing to bound");
  for (size_t k = 0; k < nodes_.size(); ++k) {
    auto& n = nodes_[k];
    for (int i : n.inputs)
      if (i >= 0) {
        auto& in = nodes_[static_cast<size_t>(i)];
        in.consumers.push_back(static_cast<int>(k));
        n.after_relaxed = n.after_relaxed || in.after_relaxed || in.rule->relaxed();
        if (n.rule->relaxed()) in.feeds_relaxed = true;
      }
  }
  int64_t numel = 1;
  for (auto v : input_) numel *= v;
  if (numel > bp::max_sum_length)
    throw ConfigError("certify: inputs of " + std::to_string(numel) + " values exceed the " +
                      std::to_string(bp::max_sum_length) + " the rounding allowance covers");
}

int BoundGraph::add_chain(const LayerGraph& g, int input, Shape& shape) {
  for (const auto& l : g) {
    const BoundRule& r = rule_for(l);
    BoundNode n;
    n.layer = &l, n.rule = &r;
    if (r.arity() == 2) {  // a block: its branches first, then the node that joins them
      Shape a = shape, b = shape;
      n.inputs = {add_chain(l.main, input, a), add_chain(l.shortcut, input, b)};
      n.in_shapes = {a, b};
    } else {
      n.inputs = {input};
      n.in_shapes = {shape};
    }
    n.out_shape = r.out_shape(l, n.in_shapes);
    shape = n.out_shape;
    nodes_.push_back(std::move(n));
    input = static_cast<int>(nodes_.size()) - 1;
  }
  return input;
}

namespace {

using bp::rho;

}  // namespace

NodeBounds bp::region_box(const InputDomain& d) {
  auto eps = d.eps.view({-1, 1, 1, 1});
  auto m = d.x.abs() + eps;
  NodeBounds in{d.x - eps - rho * m, d.x + eps + rho * m, {}, torch::zeros_like(d.x)};
  if (d.box) in.lo = in.lo.clamp_min(0.0), in.hi = in.hi.clamp_max(1.0);
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
    all_units = pass.opt.method == BoundMethod::ibp;
    return true;
  }
  all_units = false;
  return pass.opt.method != BoundMethod::ibp && !prefix;
}

/// Rows ±e_u for the units `u` [m, 1 + dims] (sample, then coordinates) of a node of
/// shape `shape`: lower bounds first, then upper bounds (negated). A unit of a grid is
/// a one-entry patch (channel c at site (i, j)); a unit of a vector a one-hot row.
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
    c.A = (torch::nn::functional::one_hot(uu.select(1, 1), shape[0]).to(opts) * sign).view({2 * m, shape[0], 1, 1});
  } else {
    c.A = torch::nn::functional::one_hot(uu.select(1, 1), shape.at(0)).to(opts) * sign;
  }
  return c;
}

/// Tightens node `k`'s interval by lower bounds of ±e_u for the chosen units, in
/// chunks of rows (sized by a one-row dry run) processed in parallel.
void refine(BoundPass& pass, int k, bool all_units) {
  auto& nb = pass.nodes[static_cast<size_t>(k)];
  const Shape& shape = pass.graph->nodes()[static_cast<size_t>(k)].out_shape;
  auto mask = torch::full_like(nb.lo, all_units, torch::kBool);
  if (!all_units)
    for (int c : pass.graph->nodes()[static_cast<size_t>(k)].consumers) {
      const auto& rule = *pass.graph->nodes()[static_cast<size_t>(c)].rule;
      if (rule.relaxed()) mask = mask | rule.relaxed_units(nb);
    }
  auto units = mask.nonzero();  // [n, 1 + dims]: sample, then the unit's coordinates
  const int64_t n = units.size(0);
  if (n == 0) return;
  const auto opts = nb.lo.options();
  auto bound = [&](const torch::Tensor& u, int64_t* widest) {
    return bp::lower_rows(pass, k, unit_rows(u, shape, opts), torch::zeros({2 * u.size(0)}, opts), nullptr,
                          -1, widest);
  };
  int64_t widest = 1;
  bound(units.narrow(0, 0, 1), &widest);
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t chunk = std::clamp<int64_t>(pass.opt.chunk_elements / (2 * widest * threads), 1, (n + threads - 1) / threads);
  const int64_t chunks = (n + chunk - 1) / chunk;
  std::vector<torch::Tensor> lows(static_cast<size_t>(chunks));
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    for (int64_t c = c0; c < c1; ++c)
      lows[static_cast<size_t>(c)] = bound(units.narrow(0, c * chunk, std::min(chunk, n - c * chunk)), nullptr);
  });
  auto strides = torch::tensor(nb.lo.strides().vec(), torch::kLong).to(units.device());
  auto pos = (units * strides).sum(1);
  std::vector<torch::Tensor> lo_parts, hi_parts;
  for (auto& l : lows) {
    const int64_t m = l.size(0) / 2;
    lo_parts.push_back(l.narrow(0, 0, m)), hi_parts.push_back(-l.narrow(0, m, m));
  }
  auto flat_lo = nb.lo.view({-1}), flat_hi = nb.hi.view({-1});
  flat_lo.index_put_({pos}, torch::max(flat_lo.index({pos}), torch::cat(lo_parts)));
  flat_hi.index_put_({pos}, torch::min(flat_hi.index({pos}), torch::cat(hi_parts)));
}

}  // namespace

BoundPass bound_forward(const BoundGraph& g, const InputDomain& d, const BoundOptions& opt) {
  torch::NoGradGuard no_grad;
  BoundPass pass;
  pass.graph = &g, pass.domain = d, pass.opt = opt;
  pass.input = bp::region_box(d);
  for (size_t k = 0; k < g.nodes().size(); ++k) {
    const auto& n = g.nodes()[k];
    std::vector<const NodeBounds*> in;
    for (int i : n.inputs) in.push_back(i < 0 ? &pass.input : &pass.nodes[static_cast<size_t>(i)]);
    NodeBounds nb = n.rule->bounds(*n.layer, in);
    nb.lo = nb.lo - rho * nb.mag, nb.hi = nb.hi + rho * nb.mag;  // float64 rounding, outward
    pass.nodes.push_back(std::move(nb));
    bool all_units = false;
    if (refine_wanted(n, pass, all_units)) refine(pass, static_cast<int>(k), all_units);
  }
  return pass;
}

}  // namespace moecert
