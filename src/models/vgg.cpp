// VGG with BatchNorm, `vgg<11|13|16|19>-bn` (paper 2's VGG-16): the standard
// configurations of 3x3 conv + BatchNorm + ReLU layers and 2x2 max-pools (five, so
// inputs of at least 32x32), then a linear classifier on the flattened features.
// Names follow the common PyTorch CIFAR code (features.<i> in one Sequential with
// the ReLU and pooling indices counted, classifier).
#include "backbone-impl.h"

namespace moecert::backbones {
namespace {

constexpr int64_t M = 0;  // a max-pool in a configuration

std::vector<int64_t> vgg_config(const std::string& kind) {
  if (kind == "vgg11-bn") return {64, M, 128, M, 256, 256, M, 512, 512, M, 512, 512, M};
  if (kind == "vgg13-bn") return {64, 64, M, 128, 128, M, 256, 256, M, 512, 512, M, 512, 512, M};
  if (kind == "vgg16-bn")
    return {64, 64, M, 128, 128, M, 256, 256, 256, M, 512, 512, 512, M, 512, 512, 512, M};
  if (kind == "vgg19-bn")
    return {64,  64,  M,   128, 128, M,   256, 256, 256, 256, M,
            512, 512, 512, 512, M,   512, 512, 512, 512, M};
  return {};
}

/// The spatial size after the configuration's five pools.
int64_t pooled(int64_t n) { return n / 32; }

class VggImpl : public BackboneImpl {
 public:
  explicit VggImpl(const BackboneArgs& a)
      : features(register_module("features", nn::Sequential())) {
    int64_t in = a.in_channels;
    for (int64_t v : vgg_config(a.kind)) {
      if (v == M) {
        features->push_back(nn::MaxPool2d(nn::MaxPool2dOptions(2).stride(2)));
        kinds_.push_back('M');
        continue;
      }
      const int64_t out = scaled(v, a.width);
      features->push_back(nn::Conv2d(nn::Conv2dOptions(in, out, 3).padding(1)));
      features->push_back(batch_norm(out));
      features->push_back(nn::Functional(torch::relu));
      kinds_.insert(kinds_.end(), {'C', 'B', 'R'});
      in = out;
    }
    features_ = in * pooled(a.height) * pooled(a.width_px);
    if (a.outputs > 0) classifier = register_module("classifier", nn::Linear(features_, a.outputs));
  }
  torch::Tensor forward(torch::Tensor x) override {
    for (size_t i = 0; i < kinds_.size(); ++i)
      x = kinds_[i] == 'B'
              ? bn_forward(nn::BatchNorm2d(
                               std::dynamic_pointer_cast<nn::BatchNorm2dImpl>(features->ptr(i))),
                           x)
              : (features->begin() + static_cast<std::ptrdiff_t>(i))->forward(x);
    x = x.flatten(/*start_dim=*/1);
    return classifier ? classifier(x) : x;
  }
  LayerGraph graph() override {
    LayerGraph g;
    for (size_t i = 0; i < kinds_.size(); ++i) {
      const std::string name = "features." + std::to_string(i);
      if (kinds_[i] == 'C')
        g.add(conv_layer(name, features->ptr<nn::Conv2dImpl>(i)));
      else if (kinds_[i] == 'B')
        g.add(batchnorm_layer(name,
                              std::dynamic_pointer_cast<nn::BatchNorm2dImpl>(features->ptr(i))));
      else if (kinds_[i] == 'R')
        g.add(relu_layer());
      else
        g.add(Layer::max_pool(name, 2, 2, 0));
    }
    g.add(Layer::simple(Layer::Kind::flatten));
    if (classifier) g.add(linear_layer("classifier", classifier));
    return g;
  }
  int64_t feature_count() const { return features_; }
  nn::Sequential features;
  nn::Linear classifier{nullptr};

 private:
  std::vector<char> kinds_;
  int64_t features_ = 0;
};

}  // namespace

BackboneEntry vgg_backbone() {
  BackboneEntry e{"vgg<11|13|16|19>-bn",
                  "VGG with BatchNorm (vgg16-bn as in paper 2); inputs of at least 32x32"};
  e.matches = [](const std::string& k) { return k.rfind("vgg", 0) == 0; };
  e.validate = [](const BackboneArgs& a) {
    if (vgg_config(a.kind).empty())
      throw ConfigError::invalid("backbone", a.kind, "vgg11-bn | vgg13-bn | vgg16-bn | vgg19-bn");
    if (a.height < 32 || a.width_px < 32)
      throw ConfigError::invalid("input size",
                                 std::to_string(a.height) + "x" + std::to_string(a.width_px),
                                 "at least 32x32 for " + a.kind + " (five 2x2 max-pools)");
  };
  e.example = "vgg11-bn";
  e.make = [](const BackboneArgs& a) -> std::shared_ptr<BackboneImpl> {
    return std::make_shared<VggImpl>(a);
  };
  e.cost = [](const BackboneArgs& a) -> BackboneCost {
    double params = 0, acts = 0;
    double hw = static_cast<double>(a.height) * static_cast<double>(a.width_px);
    int64_t in = a.in_channels;
    for (int64_t v : vgg_config(a.kind)) {
      if (v == M) {
        hw /= 4;
        continue;
      }
      const int64_t out = scaled(v, a.width);
      params += static_cast<double>(in * out * 9 + 3 * out);
      acts += 3 * static_cast<double>(out) * hw;
      in = out;
    }
    const double f = static_cast<double>(in * pooled(a.height) * pooled(a.width_px));
    if (a.outputs > 0)
      params += f * static_cast<double>(a.outputs) + static_cast<double>(a.outputs);
    return {params, acts + f + static_cast<double>(a.outputs)};
  };
  e.trunk_features = [](const BackboneArgs& a) {
    int64_t in = a.in_channels;
    for (int64_t v : vgg_config(a.kind))
      if (v != M) in = scaled(v, a.width);
    return in * pooled(a.height) * pooled(a.width_px);
  };
  return e;
}

}  // namespace moecert::backbones
