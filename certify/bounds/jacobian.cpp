// Linear bound propagation of the Jacobian (Shi et al., NeurIPS 2022), in the form
// that reuses the engine: sup over the region of ‖C·J_h(x)‖_q equals the sup over x in
// the region and directions s in the unit p-ball of C·J_h(x)·s, and J_h(x)·s is the
// output of the derivative graph — every bias dropped, every ReLU replaced by its
// derivative gate δ — fed with s. Over the region δ is 1 or 0 on the units the pass
// finds stable and lies in [0, 1] on the others, so CROWN over s in the unit ball,
// with each gate relaxed (certify/rules/gate.cpp), bounds it. docs/certification.md §16.
#include "bounds-impl.h"

#include <map>
#include <optional>

namespace moecert {
namespace {

using Inputs = std::map<const Layer*, const NodeBounds*>;  // each ReLU layer -> its input's bounds

/// The derivative graph of `g` (nullopt: a layer has no gate form).
std::optional<LayerGraph> derivative_graph(const LayerGraph& g, const Inputs& relu_in) {
  LayerGraph d;
  for (const auto& l : g) {
    switch (l.kind) {
      case Layer::Kind::conv:
        d.push_back(Layer::conv2d(l.name, l.weight, {}, l.stride, l.padding));
        break;
      case Layer::Kind::linear:
        d.push_back(Layer::dense(l.name, l.weight, {}));
        break;
      case Layer::Kind::channel_affine:
        d.push_back(Layer::affine(l.name, l.weight, torch::zeros_like(l.bias)));
        break;
      case Layer::Kind::relu: {
        // relu' over the region: 1 where the input is >= 0 throughout (relu is the
        // identity there), 0 where it is <= 0, anything in [0, 1] elsewhere (Clarke).
        const NodeBounds& x = *relu_in.at(&l);
        auto on = (x.lo.ge(0) & x.hi.gt(0)).to(x.lo.dtype()), may = x.hi.gt(0).to(x.lo.dtype());
        d.push_back(Layer::gate(l.name, on, may));
        break;
      }
      case Layer::Kind::flatten:
      case Layer::Kind::global_avgpool:
        d.push_back(l);
        break;
      case Layer::Kind::residual: {
        auto main = derivative_graph(l.main, relu_in), shortcut = derivative_graph(l.shortcut, relu_in);
        if (!main || !shortcut) return std::nullopt;
        d.push_back(Layer::residual_block(l.name, std::move(*main), std::move(*shortcut)));
        break;
      }
      default:  // max-pool's derivative selects within a window: no elementwise gate
        return std::nullopt;
    }
  }
  return d;
}

}  // namespace

torch::Tensor bound_jacobian_relaxed(const BoundPass& pass, const torch::Tensor& C, BoundMethod intermediate) {
  torch::NoGradGuard no_grad;
  const BoundGraph& g = *pass.graph;
  Inputs relu_in;
  for (const auto& n : g.nodes())
    if (n.layer->kind == Layer::Kind::relu)
      relu_in[n.layer] = n.inputs[0] < 0 ? &pass.input : &pass.nodes[static_cast<size_t>(n.inputs[0])];
  auto dg = derivative_graph(g.layers(), relu_in);
  if (!dg) return {};
  const BoundGraph jg(std::move(*dg), g.input_shape());
  const auto& x = pass.domain.x;
  const InputDomain directions{torch::zeros_like(x), torch::ones({x.size(0)}, x.options()), pass.domain.norm, false};
  BoundOptions opt = pass.opt;
  opt.method = intermediate == BoundMethod::ibp ? BoundMethod::ibp : BoundMethod::crown;
  opt.keep_elements = 0;  // nothing narrows this pass
  const auto jp = bound_forward(jg, directions, opt);
  // The relation is symmetric (s -> −s maps it to itself), but the bound is taken
  // directly: an upper bound of C·J·s is minus a lower bound of −C·J·s.
  const int64_t B = C.size(0), S = C.size(1);
  auto low = bp::lower_rows_parallel(jp, jg.output(), bp::spec_rows(-C), torch::zeros({B * S}, C.options()), -1);
  return (-low).clamp_min(0).view({B, S});
}

}  // namespace moecert
