// Compiling layer graphs to nodes, and the forward sweep: interval bounds of every
// node, CROWN bounds on the inputs of relaxed nodes, float32 error bounds.
// docs/certification.md §10–§12.
#include "bounds-impl.h"

#include "moecert/error.h"

namespace moecert {

BoundGraph::BoundGraph(LayerGraph g, Shape input_shape)
    : layers_(std::make_shared<const LayerGraph>(std::move(g))), input_(std::move(input_shape)) {
  Shape s = input_;
  add_chain(*layers_, -1, s);
  if (nodes_.empty()) throw ConfigError("certify: an empty layer graph has nothing to bound");
  for (auto& n : nodes_)
    for (int i : n.inputs)
      if (i >= 0) {
        n.after_relaxed = n.after_relaxed || nodes_[static_cast<size_t>(i)].after_relaxed ||
                          nodes_[static_cast<size_t>(i)].rule->relaxed();
        if (n.rule->relaxed()) nodes_[static_cast<size_t>(i)].feeds_relaxed = true;
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

/// The coordinate box of the region: [x − ε, x + ε] (∩ [0, 1]), outward-rounded.
NodeBounds input_bounds(const InputDomain& d) {
  auto eps = d.eps.view({-1, 1, 1, 1});
  auto m = d.x.abs() + eps;
  NodeBounds in{d.x - eps - rho * m, d.x + eps + rho * m, {}, torch::zeros_like(d.x)};
  if (d.box) in.lo = in.lo.clamp_min(0.0), in.hi = in.hi.clamp_max(1.0);
  in.mag = torch::max(in.lo.abs(), in.hi.abs());
  return in;
}

/// Whether a node's interval is worth tightening by a backward pass, and over which
/// units: the inputs of ReLUs, for CROWN (unstable units: they decide the
/// relaxations) and, for p = 2, in the affine prefix (every unit: there IBP of the
/// ball's box is loose where a backward pass is exact).
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

/// Tightens node `k`'s interval by lower bounds of ±e_u for the chosen units.
void refine(BoundPass& pass, int k, bool all_units) {
  auto& nb = pass.nodes[static_cast<size_t>(k)];
  const Shape& shape = pass.graph->nodes()[static_cast<size_t>(k)].out_shape;
  auto mask = all_units ? torch::ones_like(nb.lo, torch::kBool) : (nb.lo.lt(0) & nb.hi.gt(0));
  auto units = mask.nonzero();  // [n, 1 + dims]: sample, then the unit's coordinates
  const int64_t n = units.size(0);
  if (n == 0) return;
  int64_t biggest = 1;
  for (const auto& node : pass.graph->nodes()) {
    int64_t e = 1;
    for (auto v : node.out_shape) e *= v;
    biggest = std::max(biggest, e);
  }
  const int64_t chunk = std::max<int64_t>(2, pass.opt.chunk_elements / biggest) / 2;
  auto flat_lo = nb.lo.view({-1}), flat_hi = nb.hi.view({-1});
  auto strides = torch::tensor(nb.lo.strides().vec(), torch::kLong).to(units.device());
  for (int64_t s = 0; s < n; s += chunk) {
    auto u = units.narrow(0, s, std::min(chunk, n - s));
    const int64_t m = u.size(0);
    auto sign = torch::cat({torch::ones({m}, nb.lo.options()), -torch::ones({m}, nb.lo.options())});
    auto uu = torch::cat({u, u});
    Coeffs c;
    c.sample = uu.select(1, 0);
    if (shape.size() == 3) {  // a patch of one entry per unit: channel c at site (i, j)
      c.patches = true;
      c.Ht = shape[1], c.Wt = shape[2];
      c.site = (c.sample * shape[1] + uu.select(1, 2)) * shape[2] + uu.select(1, 3);
      c.A = torch::nn::functional::one_hot(uu.select(1, 1), shape[0]).to(nb.lo.options());
      c.A = (c.A * sign.view({-1, 1})).view({2 * m, shape[0], 1, 1});
    } else {
      int64_t width = 1;
      for (auto v : shape) width *= v;
      auto flat = (uu.narrow(1, 1, uu.size(1) - 1) * strides.narrow(0, 1, strides.size(0) - 1)).sum(1);
      c.A = torch::nn::functional::one_hot(flat, width).to(nb.lo.options()) * sign.view({-1, 1});
    }
    auto low = bp::lower_rows(pass, k, c, torch::zeros({2 * m}, nb.lo.options()), nullptr, -1);
    auto pos = (u * strides).sum(1);
    flat_lo.index_put_({pos}, torch::max(flat_lo.index({pos}), low.narrow(0, 0, m)));
    flat_hi.index_put_({pos}, torch::min(flat_hi.index({pos}), -low.narrow(0, m, m)));
  }
}

}  // namespace

BoundPass bound_forward(const BoundGraph& g, const InputDomain& d, const BoundOptions& opt) {
  torch::NoGradGuard no_grad;
  BoundPass pass;
  pass.graph = &g, pass.domain = d, pass.opt = opt;
  pass.input = input_bounds(d);
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
