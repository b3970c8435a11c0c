// The layer graph of a logit map, as the certifier sees it: every operator with
// its weights in float64, detached from autograd. Built from a model by
// BackboneImpl::graph() (and MoeImpl::component_graph, which prepends the input
// normalisation). An operator the certifier cannot bound has no Layer kind: a
// backbone that contains one throws UnsupportedLayerError naming it.
#pragma once

#include <torch/types.h>

#include <string>
#include <vector>

namespace moecert {

struct Layer {
  enum class Kind {
    channel_affine,  ///< y[c] = scale[c]·x[c] + shift[c] (input normalisation, eval BatchNorm)
    conv,            ///< 2-D convolution, weight [O, I, k, k], bias [O] or undefined
    linear,          ///< weight [O, I], bias [O] or undefined
    relu,
    flatten,         ///< [B, C, H, W] -> [B, C·H·W]
    global_avgpool,  ///< [B, C, H, W] -> [B, C] (mean over H·W)
    residual,        ///< main(x) + shortcut(x); an empty shortcut is the identity
  };
  Kind kind;
  std::string name;           ///< the parameter path it came from ("conv1", "layer2.0", ...)
  torch::Tensor weight, bias;  ///< conv/linear weights; channel_affine: scale, shift [C]
  int64_t stride = 1, padding = 0;
  std::vector<Layer> main, shortcut;  ///< residual branches

  static Layer affine(std::string name, torch::Tensor scale, torch::Tensor shift);
  static Layer conv2d(std::string name, torch::Tensor w, torch::Tensor b, int64_t stride,
                      int64_t padding);
  static Layer dense(std::string name, torch::Tensor w, torch::Tensor b);
  static Layer simple(Kind kind, std::string name = "");
  static Layer residual_block(std::string name, std::vector<Layer> main, std::vector<Layer> shortcut);
};

using LayerGraph = std::vector<Layer>;

/// Human-readable kind name ("conv", "relu", ...).
std::string layer_kind_name(Layer::Kind k);

/// Evaluates a graph in its tensors' dtype (float64 for certification).
/// x: [B, C, H, W] -> logits [B, K]
torch::Tensor graph_forward(const LayerGraph& g, const torch::Tensor& x);

}  // namespace moecert
