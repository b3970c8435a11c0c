// Linear bound propagation of the Jacobian (Shi et al., NeurIPS 2022), in the form
// that reuses the engine: sup over the region of ‖C·J_h(x)‖_q equals the sup over x in
// the region and directions s in the unit p-ball of C·J_h(x)·s, and J_h(x)·s is the
// output of the derivative graph — every bias dropped, every ReLU replaced by its
// derivative gate δ — fed with s. Over the region δ is 1 or 0 on the units the pass
// finds stable and lies in [0, 1] on the others, so CROWN over s in the unit ball,
// with each gate relaxed (src/bounds/rules/gate.cpp), bounds it. docs/certification.md §16.
#include <optional>

#include "bounds-impl.h"

namespace moecert {
namespace {

/// The derivative graph of the pass's graph, node by node from the rules, with the
/// same inputs (nullopt: a node has none; max-pool's derivative selects within a
/// window, no elementwise gate).
std::optional<LayerGraph> derivative_graph(const BoundPass& pass) {
  LayerGraph d;
  for (const auto& n : pass.graph->nodes()) {
    const int first = n.inputs.at(0);
    const DerivativeArgs args{first < 0 ? pass.input : pass.nodes[static_cast<size_t>(first)]};
    auto dl = n.rule->derivative(*n.layer, args);
    if (!dl) return std::nullopt;
    d.add(std::move(*dl), n.inputs);
  }
  return d;
}

}  // namespace

torch::Tensor bound_jacobian_relaxed(const BoundPass& pass, const torch::Tensor& C,
                                     BoundMethod intermediate) {
  torch::NoGradGuard no_grad;
  const BoundGraph& g = *pass.graph;
  auto dg = derivative_graph(pass);
  if (!dg) return {};
  const BoundGraph jg(std::move(*dg), g.input_shape());
  const auto& x = pass.domain.x;
  const InputDomain directions{torch::zeros_like(x), torch::ones({x.size(0)}, x.options()),
                               pass.domain.norm, false};
  BoundOptions opt = pass.opt;
  opt.method = interval_intermediates(intermediate) ? BoundMethod::crown_ibp : BoundMethod::crown;
  opt.keep_elements = 0;               // nothing narrows this pass
  opt.fp32 = Float32Errors::per_node;  // J·s is exact mathematics: its err32 is never read
  const auto jp = bound_forward(jg, directions, opt);
  // The relation is symmetric (s -> −s maps it to itself), but the bound is taken
  // directly: an upper bound of C·J·s is minus a lower bound of −C·J·s.
  const int64_t B = C.size(0), S = C.size(1);
  auto low = bp::lower_rows_parallel(jp, jg.output(), bp::spec_rows(-C),
                                     torch::zeros({B * S}, C.options()), -1);
  return (-low).clamp_min(0).view({B, S});
}

}  // namespace moecert
