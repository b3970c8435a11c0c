// The layer graph of a logit map, as the certifier sees it: every operator with
// its weights in float64, detached from autograd. Built from a model by
// BackboneImpl::graph() (and MoeImpl::component_graph, which prepends the input
// normalisation). How each kind is bounded lives in its rule (src/bounds/rules/,
// include/moecert/rules.h); a kind without a registered rule is an
// UnsupportedLayerError naming the layer.
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
    maxpool,         ///< 2-D max pooling: kernel × kernel windows, stride, padding
    gate,            ///< y = δ ⊙ x with δ in [weight, bias] per sample and unit ([B, *shape]):
                     ///< a ReLU's derivative in a Jacobian graph (certify/jacobian.cpp)
  };
  Kind kind;
  std::string name;  ///< the parameter path it came from ("conv1", "layer2.0", ...)
  torch::Tensor weight,
      bias;  ///< conv/linear weights; channel_affine: scale, shift [C]; gate: δ's bounds
  /// channel_affine only: per-channel size of the terms the float32 model sums to
  /// form its shift (eval BatchNorm: |β| + |μ·scale|); undefined means |shift|.
  torch::Tensor shift_terms;
  int64_t stride = 1, padding = 0, kernel = 0;  ///< conv / max-pool geometry
  std::vector<Layer> main, shortcut;            ///< residual branches

  static Layer affine(std::string name, torch::Tensor scale, torch::Tensor shift,
                      torch::Tensor shift_terms = {});
  static Layer conv2d(std::string name, torch::Tensor w, torch::Tensor b, int64_t stride,
                      int64_t padding);
  static Layer dense(std::string name, torch::Tensor w, torch::Tensor b);
  static Layer max_pool(std::string name, int64_t kernel, int64_t stride, int64_t padding);
  /// δ in [lo, hi] elementwise, per sample: lo, hi [B, *shape].
  static Layer gate(std::string name, torch::Tensor lo, torch::Tensor hi);
  static Layer simple(Kind kind, std::string name = "");
  static Layer residual_block(std::string name, std::vector<Layer> main,
                              std::vector<Layer> shortcut);
};

using LayerGraph = std::vector<Layer>;

}  // namespace moecert
