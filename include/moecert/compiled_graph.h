// A layer graph compiled once against an input shape: every node with its rule, its
// input and output shapes and its consumers, in topological order. The one walk
// structure behind shapes and forward (here), training's IBP and CROWN-IBP
// (train_bounds.h), bound propagation and the Jacobian graph (bounds.h).
#pragma once

#include <memory>

#include "moecert/rules.h"

namespace moecert {

/// One node of a compiled graph: a layer with its rule, inputs and shapes.
struct CompiledNode {
  const Layer* layer = nullptr;
  const BoundRule* rule = nullptr;
  std::vector<int> inputs;  ///< earlier node indices; -1 is the graph input
  std::vector<Shape> in_shapes;
  Shape out_shape;
  std::vector<int> consumers;  ///< later nodes that take this one as an input
  bool feeds_relaxed = false;  ///< some consumer is a relaxed operator (ReLU, max-pool)
  bool after_relaxed = false;  ///< some ancestor is relaxed: not in the affine prefix
};

/// Throws UnsupportedLayerError (no rule, or a node with the wrong number of inputs),
/// ShapeError (shapes that do not fit) or ConfigError (an empty graph).
class CompiledGraph {
 public:
  CompiledGraph(LayerGraph g, Shape input_shape);
  const std::vector<CompiledNode>& nodes() const { return nodes_; }
  const Shape& input_shape() const { return input_; }
  const LayerGraph& layers() const { return *layers_; }  ///< what the nodes' layers point into
  const Shape& output_shape() const { return nodes_.back().out_shape; }
  int output() const { return static_cast<int>(nodes_.size()) - 1; }
  /// Evaluates every node in its tensors' dtype. x: [B, *input_shape] -> [B, *output_shape]
  torch::Tensor forward(const torch::Tensor& x) const;

 private:
  std::shared_ptr<const LayerGraph> layers_;  // the nodes point into it
  std::vector<CompiledNode> nodes_;
  Shape input_;
};

}  // namespace moecert
