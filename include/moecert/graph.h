// The operator graph of a logit map, as the certifier sees it: a flat list of nodes
// in topological order, each an operator (its parameters in float64, detached from
// autograd) with the indices of the earlier nodes it reads (-1: the graph input).
// The last node is the output. Multi-input operators (the residual sum) are ordinary
// nodes. Built by BackboneImpl::graph() (and MoeImpl::component_graph, which
// prepends the input normalisation). How each operator is evaluated and bounded
// lives in its rule (src/bounds/rules/, include/moecert/rules.h); every walker —
// forward, shapes, training's IBP, certify's bound propagation, the Jacobian graph —
// iterates these nodes. An operator without a registered rule is an
// UnsupportedLayerError naming the layer.
#pragma once

#include <torch/types.h>

#include <initializer_list>
#include <string>
#include <vector>

namespace moecert {

/// One operator with its parameters.
struct Layer {
  enum class Kind {
    channel_affine,  ///< y[c] = scale[c]·x[c] + shift[c] (input normalisation, eval BatchNorm)
    conv,            ///< 2-D convolution, weight [O, I, k, k], bias [O] or undefined
    linear,          ///< weight [O, I], bias [O] or undefined
    relu,
    flatten,         ///< [B, C, H, W] -> [B, C·H·W]
    global_avgpool,  ///< [B, C, H, W] -> [B, C] (mean over H·W)
    residual,        ///< the sum of its two inputs (a residual block's main path + shortcut)
    maxpool,         ///< 2-D max pooling: kernel × kernel windows, stride, padding
    gate,            ///< y = δ ⊙ x with δ in [weight, bias] per sample and unit ([B, *shape]):
                     ///< a ReLU's derivative in a Jacobian graph (certify/jacobian.cpp)
    concat,          ///< its inputs concatenated along the channels (DenseNet)
    // Transformer operators (ViT); a token sequence is [N, D] without the batch.
    tokens,        ///< [D, h, w] patch grid -> [1 + h·w, D]: class token `bias` [D] first,
                   ///< position embedding `weight` [1 + h·w, D] added
    token_select,  ///< [N, D] -> [D]: token `kernel` (the class token, 0)
    layernorm,     ///< over the last dimension: weight γ, bias β [D], `eps`
    gelu,          ///< x·Φ(x) (the exact, erf form)
    softmax,       ///< over the last dimension
    attn_scores,   ///< (q, k) [N, D] -> [heads, N, N]: scale·q_h k_hᵀ per head
    attn_mix,      ///< (p [heads, N, N], v [N, D]) -> [N, D]: p_h v_h per head, heads side by side
  };
  Kind kind;
  std::string name;  ///< the parameter path it came from ("conv1", "layer2.0", ...)
  torch::Tensor weight,
      bias;  ///< conv/linear weights; channel_affine: scale, shift [C]; gate: δ's bounds
  /// channel_affine only: per-channel size of the terms the float32 model sums to
  /// form its shift (eval BatchNorm: |β| + |μ·scale|); undefined means |shift|.
  torch::Tensor shift_terms;
  int64_t stride = 1, padding = 0, kernel = 0;  ///< conv / max-pool geometry
  int64_t heads = 1;                            ///< attention heads
  double eps = 0, scale = 1;  ///< layernorm's ε; attention's score scale (float32 values)

  static Layer affine(std::string name, torch::Tensor scale, torch::Tensor shift,
                      torch::Tensor shift_terms = {});
  /// Eval-mode BatchNorm γ (x − μ) / sqrt(σ² + eps) + β as the affine map it is, with the
  /// shift's terms |β| + |μ·scale| (what a float32 model sums). γ, β may be undefined (1, 0).
  static Layer batch_norm(std::string name, const torch::Tensor& gamma, const torch::Tensor& beta,
                          const torch::Tensor& mean, const torch::Tensor& var, double eps);
  static Layer conv2d(std::string name, torch::Tensor w, torch::Tensor b, int64_t stride,
                      int64_t padding);
  static Layer dense(std::string name, torch::Tensor w, torch::Tensor b);
  static Layer max_pool(std::string name, int64_t kernel, int64_t stride, int64_t padding);
  /// δ in [lo, hi] elementwise, per sample: lo, hi [B, *shape].
  static Layer gate(std::string name, torch::Tensor lo, torch::Tensor hi);
  static Layer simple(Kind kind, std::string name = "");
  static Layer layer_norm(std::string name, torch::Tensor gamma, torch::Tensor beta, double eps);
  static Layer tokens_of(std::string name, torch::Tensor cls, torch::Tensor pos);
  static Layer attention_scores(std::string name, int64_t heads, double scale);
  static Layer attention_mix(std::string name, int64_t heads);
};

/// A layer and the earlier nodes it reads, in its rule's input order.
struct GraphNode {
  Layer layer;
  std::vector<int> inputs;  ///< earlier node indices; -1 is the graph input
};

class LayerGraph {
 public:
  LayerGraph() = default;
  /// A chain: each layer reads the one before it (the first reads the input).
  LayerGraph(std::initializer_list<Layer> chain);

  /// Appends a node reading `inputs` (each -1 or an existing node; ShapeError
  /// otherwise) and returns its index.
  int add(Layer l, std::vector<int> inputs);
  /// Appends a node reading the current output (the input when empty).
  int add(Layer l) { return add(std::move(l), {output()}); }
  /// Appends the nodes of `sub`, its graph input bound to node `input`; returns
  /// the index of sub's output here (`input` itself when sub is empty).
  int append(const LayerGraph& sub, int input);
  /// Appends `sub` after the current output.
  int append(const LayerGraph& sub) { return append(sub, output()); }
  /// A residual block after node `input`: main(x) + shortcut(x), an empty shortcut
  /// being the identity. Returns the sum node.
  int add_residual(const std::string& name, const LayerGraph& main, const LayerGraph& shortcut,
                   int input);

  int output() const { return static_cast<int>(nodes_.size()) - 1; }  ///< -1 when empty
  bool empty() const { return nodes_.empty(); }
  size_t size() const { return nodes_.size(); }
  const std::vector<GraphNode>& nodes() const { return nodes_; }
  const GraphNode& operator[](size_t k) const { return nodes_[k]; }
  const GraphNode& back() const { return nodes_.back(); }
  std::vector<GraphNode>::const_iterator begin() const { return nodes_.begin(); }
  std::vector<GraphNode>::const_iterator end() const { return nodes_.end(); }

 private:
  std::vector<GraphNode> nodes_;
};

}  // namespace moecert
