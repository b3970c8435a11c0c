// Private helpers of the backbone files: building blocks of the LibTorch modules
// and their graph layers, and the MoE-CNN body over trunks.
#pragma once

#include <torch/torch.h>

#include <string>

#include "moecert/backbones.h"
#include "moecert/error.h"

namespace moecert::backbones {

namespace nn = torch::nn;

/// Spatial size after a 3x3, stride-2, pad-1 convolution.
inline int64_t conv_s2_size(int64_t n) { return (n - 1) / 2 + 1; }

/// Width of a layer of `channels` at width multiplier `scale`: round(scale·C), >= 1.
inline int64_t scaled(int64_t channels, double scale) {
  return std::max<int64_t>(1, static_cast<int64_t>(scale * static_cast<double>(channels) + 0.5));
}

inline nn::Conv2d conv3x3(int64_t in, int64_t out, int64_t stride, bool bias) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(bias));
}
inline nn::Conv2d conv1x1(int64_t in, int64_t out, int64_t stride) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, 1).stride(stride).bias(false));
}

/// A 3x3, padding-1 convolution module evaluated through the fastest kernels (a
/// stem with a bias on 1-3 channels uses LibTorch's im2col backward on the CPU).
torch::Tensor conv3x3_apply(nn::Conv2d& conv, const torch::Tensor& x);

/// A parameter or buffer as a graph layer holds it: a float64 copy, or (LiveGraphs)
/// the tensor itself.
torch::Tensor f64(const torch::Tensor& t);
/// A conv module as a graph layer; only square stride/padding, no dilation or groups.
Layer conv_layer(const std::string& name, const nn::Conv2d& c);
Layer linear_layer(const std::string& name, const nn::Linear& l);
/// BatchNorm in eval mode: y = γ (x − μ) / sqrt(σ² + eps) + β, a per-channel affine map.
Layer batchnorm_layer(const std::string& name, const nn::BatchNorm2d& bn);
/// A new BatchNorm over `channels`; inside a MoE-CNN with shared BatchNorm, the first
/// trunk's module of the same position. Every backbone makes its BatchNorms with it.
nn::BatchNorm2d batch_norm(int64_t channels);
/// A BatchNorm layer's forward: its own, or in training mode inside a
/// SyncBatchNormScope, with the global batch's statistics (distributed.h).
torch::Tensor bn_forward(nn::BatchNorm2d bn, const torch::Tensor& x);
inline Layer relu_layer() { return Layer::simple(Layer::Kind::relu); }
/// 2x2 average pooling, stride 2, as the convolution it is (weight 1/4 on the
/// diagonal channel pairs): exact, and bounded by the conv rule. `like`: a tensor of
/// the module whose dtype and device the live graph takes.
Layer avgpool2_layer(const std::string& name, int64_t channels, const torch::Tensor& like);

/// The trunk of `a` (outputs = 0) built by its entry, as a module with its pooled
/// features count.
struct Trunk {
  std::shared_ptr<BackboneImpl> net;
  int64_t features;
};

/// MoE-CNN body over trunks: per group a trunk of width `scale` (every conv of the
/// group is its own; every BatchNorm too, or with `shared_batch_norm` one module per
/// layer shared by all groups, paper 2's layout), the linear head shared, group g
/// reading its column block of the N·F pooled features.
std::shared_ptr<ChannelGroupNetImpl> trunk_groups_make(const BackboneEntry& e,
                                                       const BackboneArgs& a, int64_t groups,
                                                       double scale, bool shared_batch_norm);
BackboneCost trunk_groups_cost(const BackboneEntry& e, const BackboneArgs& a, int64_t groups,
                               double scale);

/// Parses "<prefix><n>-<m>..." style families: the integers after `prefix`, split at
/// '-'. Empty when `kind` does not start with `prefix` or a part is not a number.
std::vector<int64_t> family_params(const std::string& kind, const std::string& prefix);

}  // namespace moecert::backbones
