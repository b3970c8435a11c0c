// Compiling a layer graph against an input shape, and the float evaluation that
// walks the compiled nodes.
#include "moecert/compiled_graph.h"

#include "moecert/error.h"

namespace moecert {

CompiledGraph::CompiledGraph(LayerGraph g, Shape input_shape)
    : layers_(std::make_shared<const LayerGraph>(std::move(g))), input_(std::move(input_shape)) {
  if (layers_->empty()) throw ConfigError("certify: an empty layer graph has nothing to bound");
  for (const auto& gn : *layers_) {
    CompiledNode n;
    n.layer = &gn.layer, n.rule = &rule_for(gn.layer), n.inputs = gn.inputs;
    const int arity = n.rule->arity(), got = static_cast<int>(n.inputs.size());
    if (arity > 0 ? got != arity : got < 1)
      throw UnsupportedLayerError("graph: layer '" + gn.layer.name + "' (" + n.rule->name() +
                                  ") reads " + std::to_string(got) + " inputs, its rule takes " +
                                  (arity > 0 ? std::to_string(arity) : "one or more"));
    for (int i : n.inputs) n.in_shapes.push_back(i < 0 ? input_ : nodes_[i].out_shape);
    n.out_shape = n.rule->out_shape(gn.layer, n.in_shapes);
    nodes_.push_back(std::move(n));
  }
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
}

torch::Tensor CompiledGraph::forward(const torch::Tensor& x) const {
  return graph_forward(*layers_, x);
}

}  // namespace moecert
