// DenseNet-BC for CIFAR, `densenet-bc-<depth>-<k>` (Huang et al. 2017; paper 2's
// DenseNet; `densenet` = densenet-bc-100-12): a 3x3 stem of 2k channels, three
// dense blocks of n = (depth − 4) / 6 bottleneck layers (BN, ReLU, 1x1 conv to 4k,
// BN, ReLU, 3x3 conv to k, concatenated after the layer's input), transitions
// halving the channels (BN, ReLU, 1x1 conv, 2x2 average pool), then BN, ReLU,
// global average pool, linear. Names follow the common PyTorch CIFAR code (conv1,
// dense1.<i>.bn1/conv1/bn2/conv2, trans1.bn/conv, bn, linear).
#include "backbone-impl.h"

namespace moecert::backbones {
namespace {

/// y = concat(conv2(relu(bn2(conv1(relu(bn1(x)))))), x).
class BottleneckImpl : public nn::Module {
 public:
  BottleneckImpl(int64_t in, int64_t growth)
      : bn1(register_module("bn1", batch_norm(in))),
        conv1(register_module("conv1", conv1x1(in, 4 * growth, 1))),
        bn2(register_module("bn2", batch_norm(4 * growth))),
        conv2(register_module("conv2", conv3x3(4 * growth, growth, 1, false))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    auto out = conv1(torch::relu(bn_forward(bn1, x)));
    out = conv2(torch::relu(bn_forward(bn2, out)));
    return torch::cat({out, x}, 1);
  }
  void append_graph(LayerGraph& g, const std::string& p) {
    const int x = g.output();
    const int out = g.append(
        LayerGraph{batchnorm_layer(p + ".bn1", bn1), relu_layer(), conv_layer(p + ".conv1", conv1),
                   batchnorm_layer(p + ".bn2", bn2), relu_layer(), conv_layer(p + ".conv2", conv2)},
        x);
    g.add(Layer::simple(Layer::Kind::concat, p), {out, x});
  }
  nn::BatchNorm2d bn1;
  nn::Conv2d conv1;
  nn::BatchNorm2d bn2;
  nn::Conv2d conv2;
};
TORCH_MODULE(Bottleneck);

/// avg_pool2d(conv(relu(bn(x))), 2).
class TransitionImpl : public nn::Module {
 public:
  TransitionImpl(int64_t in, int64_t out)
      : bn(register_module("bn", batch_norm(in))),
        conv(register_module("conv", conv1x1(in, out, 1))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::avg_pool2d(conv(torch::relu(bn_forward(bn, x))), 2);
  }
  void append_graph(LayerGraph& g, const std::string& p) {
    g.add(batchnorm_layer(p + ".bn", bn));
    g.add(relu_layer());
    g.add(conv_layer(p + ".conv", conv));
    g.add(avgpool2_layer(p + ".pool", conv->weight.size(0), conv->weight));
  }
  nn::BatchNorm2d bn;
  nn::Conv2d conv;
};
TORCH_MODULE(Transition);

/// depth, k from "densenet-bc-<depth>-<k>" or "densenet" (empty when it does not parse).
std::vector<int64_t> densenet_params(const std::string& kind) {
  if (kind == "densenet") return {100, 12};
  auto p = family_params(kind, "densenet-bc-");
  return p.size() == 2 ? p : std::vector<int64_t>{};
}

/// Channel counts: the stem, then after each dense block and transition; the last
/// is the feature count.
std::vector<int64_t> densenet_channels(const BackboneArgs& a) {
  const auto p = densenet_params(a.kind);
  const int64_t n = (p[0] - 4) / 6, k = scaled(p[1], a.width);
  std::vector<int64_t> c{2 * k};
  for (int b = 0; b < 3; ++b) {
    c.push_back(c.back() + n * k);
    if (b < 2) c.push_back(c.back() / 2);
  }
  return c;
}

class DenseNetImpl : public BackboneImpl {
 public:
  explicit DenseNetImpl(const BackboneArgs& a) {
    const auto p = densenet_params(a.kind);
    const int64_t n = (p[0] - 4) / 6, k = scaled(p[1], a.width);
    const auto c = densenet_channels(a);
    conv1 = register_module("conv1", conv3x3(a.in_channels, c[0], 1, false));
    int64_t in = c[0];
    for (int b = 0; b < 3; ++b) {
      nn::Sequential dense;
      for (int64_t i = 0; i < n; ++i) dense->push_back(Bottleneck(in + i * k, k));
      blocks_.push_back(register_module("dense" + std::to_string(b + 1), dense));
      in += n * k;
      if (b < 2) {
        trans_.push_back(register_module("trans" + std::to_string(b + 1), Transition(in, in / 2)));
        in /= 2;
      }
    }
    bn = register_module("bn", batch_norm(in));
    if (a.outputs > 0) linear = register_module("linear", nn::Linear(in, a.outputs));
  }
  torch::Tensor forward(torch::Tensor x) override {
    x = conv3x3_apply(conv1, x);
    for (size_t b = 0; b < blocks_.size(); ++b) {
      x = blocks_[b]->forward(x);
      if (b < trans_.size()) x = trans_[b]->forward(x);
    }
    x = torch::relu(bn_forward(bn, x));
    x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(/*start_dim=*/1);
    return linear ? linear(x) : x;
  }
  LayerGraph graph() override {
    LayerGraph g = {conv_layer("conv1", conv1)};
    for (size_t b = 0; b < blocks_.size(); ++b) {
      const std::string name = "dense" + std::to_string(b + 1);
      for (size_t i = 0; i < blocks_[b]->size(); ++i)
        blocks_[b]->ptr<BottleneckImpl>(i)->append_graph(g, name + "." + std::to_string(i));
      if (b < trans_.size()) trans_[b]->append_graph(g, "trans" + std::to_string(b + 1));
    }
    g.add(batchnorm_layer("bn", bn));
    g.add(relu_layer());
    g.add(Layer::simple(Layer::Kind::global_avgpool));
    if (linear) g.add(linear_layer("linear", linear));
    return g;
  }
  nn::Conv2d conv1{nullptr};
  std::vector<nn::Sequential> blocks_;
  std::vector<Transition> trans_;
  nn::BatchNorm2d bn{nullptr};
  nn::Linear linear{nullptr};
};

}  // namespace

BackboneEntry densenet_backbone() {
  BackboneEntry e{"densenet-bc-<depth>-<k>",
                  "CIFAR DenseNet-BC, depth = 6n + 4, growth k (densenet = densenet-bc-100-12); "
                  "inputs of at least 4x4"};
  e.matches = [](const std::string& k) { return k.rfind("densenet", 0) == 0; };
  e.validate = [](const BackboneArgs& a) {
    const auto p = densenet_params(a.kind);
    if (p.empty() || p[0] < 10 || (p[0] - 4) % 6 != 0 || p[0] > 400 || p[1] < 1 || p[1] > 128)
      throw ConfigError::invalid("backbone", a.kind,
                                 "densenet | densenet-bc-<depth>-<k> with depth = 6n + 4 "
                                 "(10 <= depth <= 400) and 1 <= k <= 128, e.g. densenet-bc-100-12");
    if (a.height < 4 || a.width_px < 4)
      throw ConfigError::invalid("input size",
                                 std::to_string(a.height) + "x" + std::to_string(a.width_px),
                                 "at least 4x4 for " + a.kind + " (two 2x2 average pools)");
  };
  e.example = "densenet-bc-10-2";
  e.make = [](const BackboneArgs& a) -> std::shared_ptr<BackboneImpl> {
    return std::make_shared<DenseNetImpl>(a);
  };
  e.cost = [](const BackboneArgs& a) -> BackboneCost {
    const auto p = densenet_params(a.kind);
    const double n = static_cast<double>((p[0] - 4) / 6),
                 k = static_cast<double>(scaled(p[1], a.width));
    const auto c = densenet_channels(a);
    double params = static_cast<double>(a.in_channels) * 9 * 2 * k, acts = 0;
    double hw = static_cast<double>(a.height) * static_cast<double>(a.width_px);
    double in = static_cast<double>(c[0]);
    for (int b = 0; b < 3; ++b) {
      for (int64_t i = 0; i < static_cast<int64_t>(n); ++i) {
        params += 2 * in + in * 4 * k + 8 * k + 4 * k * k * 9;
        acts += (3 * in + 12 * k + 2 * k) * hw;  // BN, ReLU of the input; bottleneck; concat
        in += k;
      }
      if (b < 2) {
        params += 2 * in + in * std::floor(in / 2);
        acts += (2 * in + in / 2) * hw + in / 2 * hw / 4;
        in = std::floor(in / 2), hw /= 4;
      }
    }
    params += 2 * in;
    acts += 2 * in * hw;
    const double K = static_cast<double>(a.outputs);
    if (a.outputs > 0) params += in * K + K;
    return {params, acts + in + K};
  };
  e.trunk_features = [](const BackboneArgs& a) { return densenet_channels(a).back(); };
  return e;
}

}  // namespace moecert::backbones
