// ResNets of the CIFAR code: `resnet18` (expert, MoE-CNN) with the names of the
// common PyTorch CIFAR code (conv1, bn1, layer1.0.conv1, ..., layer2.0.shortcut.0,
// linear) so state dicts map 1:1, and `resnet20` (router, as paper 2's: 3 stages of
// 3 basic blocks, 16/32/64 channels, parameter-free shortcuts, fc).
#include "backbone-impl.h"

namespace moecert::backbones {
namespace {

/// How a block whose shape changes reaches its sum: a 1x1 conv + BatchNorm
/// (option B, ResNet-18) or subsampling with zero channels added (option A, ResNet-20).
enum class Shortcut { conv, pad };

/// relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).
class BasicBlockImpl : public nn::Module {
 public:
  BasicBlockImpl(int64_t in, int64_t out, int64_t stride, Shortcut mode)
      : conv1(register_module("conv1", conv3x3(in, out, stride, false))),
        bn1(register_module("bn1", batch_norm(out))),
        conv2(register_module("conv2", conv3x3(out, out, 1, false))),
        bn2(register_module("bn2", batch_norm(out))),
        in_(in),
        out_(out),
        stride_(stride),
        pad_(mode == Shortcut::pad && (stride != 1 || in != out)) {
    if (mode == Shortcut::conv && (stride != 1 || in != out)) {
      shortcut = register_module("shortcut", nn::Sequential());
      shortcut->push_back(conv1x1(in, out, stride));
      shortcut->push_back(batch_norm(out));
    }
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto out = torch::relu(bn_forward(bn1, conv1(x)));
    out = bn_forward(bn2, conv2(out));
    return torch::relu(out + skip(x));
  }
  /// Appends residual(main, shortcut) then ReLU to `g`; `prefix` is the block's
  /// parameter path.
  void append_graph(LayerGraph& g, const std::string& prefix) {
    LayerGraph main = {conv_layer(prefix + ".conv1", conv1), batchnorm_layer(prefix + ".bn1", bn1),
                       relu_layer(), conv_layer(prefix + ".conv2", conv2),
                       batchnorm_layer(prefix + ".bn2", bn2)};
    LayerGraph sc;
    if (shortcut) {
      sc.add(conv_layer(prefix + ".shortcut.0",
                        nn::Conv2d(std::dynamic_pointer_cast<nn::Conv2dImpl>(shortcut->ptr(0)))));
      sc.add(batchnorm_layer(
          prefix + ".shortcut.1",
          nn::BatchNorm2d(std::dynamic_pointer_cast<nn::BatchNorm2dImpl>(shortcut->ptr(1)))));
    } else if (pad_) {
      // x[:, :, ::s, ::s] placed at channels [p, p + in): a 1x1 stride-s conv with a
      // 0/1 weight, exactly.
      auto w =
          torch::zeros({out_, in_, 1, 1},
                       conv1->weight.options().dtype(
                           LiveGraphs::active() ? conv1->weight.scalar_type() : torch::kFloat64));
      w.narrow(0, (out_ - in_) / 2, in_).view({in_, in_}).copy_(torch::eye(in_, w.options()));
      sc.add(Layer::conv2d(prefix + ".shortcut", w, {}, stride_, 0));
    }
    g.add_residual(prefix, main, sc, g.output());
    g.add(relu_layer());
  }

  nn::Conv2d conv1;
  nn::BatchNorm2d bn1;
  nn::Conv2d conv2;
  nn::BatchNorm2d bn2;
  nn::Sequential shortcut{nullptr};

 private:
  torch::Tensor skip(const torch::Tensor& x) {
    if (shortcut)
      return bn_forward(
          nn::BatchNorm2d(std::dynamic_pointer_cast<nn::BatchNorm2dImpl>(shortcut->ptr(1))),
          shortcut->ptr<nn::Conv2dImpl>(0)->forward(x));
    if (!pad_) return x;
    const int64_t p = (out_ - in_) / 2;
    auto sub = x.slice(2, 0, x.size(2), stride_).slice(3, 0, x.size(3), stride_);
    return torch::constant_pad_nd(sub, {0, 0, 0, 0, p, out_ - in_ - p});
  }
  int64_t in_, out_, stride_;
  bool pad_;
};
TORCH_MODULE(BasicBlock);

/// A CIFAR ResNet: 3x3 stem, no max-pool, stages of basic blocks (the first block of
/// each stage after the first strides 2), global average pool, linear head named
/// `head`. outputs = 0 leaves out the head: forward then returns the pooled features.
class ResNetImpl : public BackboneImpl {
 public:
  ResNetImpl(int64_t c, int64_t outputs, int64_t stem, std::vector<int64_t> widths, int64_t blocks,
             Shortcut mode, const std::string& head)
      : conv1(register_module("conv1", conv3x3(c, stem, 1, false))),
        bn1(register_module("bn1", batch_norm(stem))),
        head_(head) {
    int64_t in = stem;
    for (size_t s = 0; s < widths.size(); ++s) {
      nn::Sequential stage;
      for (int64_t b = 0; b < blocks; ++b)
        stage->push_back(
            BasicBlock(b == 0 ? in : widths[s], widths[s], b == 0 && s > 0 ? 2 : 1, mode));
      stages_.push_back(register_module("layer" + std::to_string(s + 1), stage));
      in = widths[s];
    }
    if (outputs > 0) linear = register_module(head, nn::Linear(in, outputs));
  }

  torch::Tensor forward(torch::Tensor x) override {
    x = torch::relu(bn_forward(bn1, conv3x3_apply(conv1, x)));
    for (auto& stage : stages_) x = stage->forward(x);
    x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(/*start_dim=*/1);
    return linear ? linear(x) : x;
  }
  LayerGraph graph() override {
    LayerGraph g = {conv_layer("conv1", conv1), batchnorm_layer("bn1", bn1), relu_layer()};
    for (size_t s = 0; s < stages_.size(); ++s)
      for (size_t b = 0; b < stages_[s]->size(); ++b)
        std::dynamic_pointer_cast<BasicBlockImpl>(stages_[s]->ptr(b))
            ->append_graph(g, "layer" + std::to_string(s + 1) + "." + std::to_string(b));
    g.add(Layer::simple(Layer::Kind::global_avgpool));
    if (linear) g.add(linear_layer(head_, linear));
    return g;
  }

  nn::Conv2d conv1;
  nn::BatchNorm2d bn1;
  std::vector<nn::Sequential> stages_;
  nn::Linear linear{nullptr};

 private:
  std::string head_;
};

std::vector<int64_t> resnet18_widths(double width) {
  const int64_t b = scaled(64, width);
  return {b, 2 * b, 4 * b, 8 * b};
}
/// ResNet-18's stem keeps 64 channels at every width: paper 2's MoE-CNN narrows only the
/// blocks' convolutions (the first block then gets a 1x1 shortcut from 64 channels).
constexpr int64_t kResnet18Stem = 64;
std::vector<int64_t> resnet20_widths(double width) {
  return {scaled(16, width), scaled(32, width), scaled(64, width)};
}

/// Parameters and activations of a CIFAR ResNet of these stage widths.
BackboneCost resnet_cost(const BackboneArgs& a, int64_t stem, const std::vector<int64_t>& widths,
                         int64_t blocks, bool conv_shortcut) {
  auto block = [&](int64_t in, int64_t out, int64_t stride) {
    int64_t p = in * out * 9 + 2 * out + out * out * 9 + 2 * out;
    if (conv_shortcut && (stride != 1 || in != out)) p += in * out + 2 * out;
    return p;
  };
  double params = static_cast<double>(a.in_channels * stem * 9 + 2 * stem);
  double acts = 0, hw = static_cast<double>(a.height) * static_cast<double>(a.width_px);
  int64_t in = stem;
  for (size_t s = 0; s < widths.size(); ++s) {
    if (s > 0) hw /= 4;
    for (int64_t b = 0; b < blocks; ++b) {
      params +=
          static_cast<double>(block(b == 0 ? in : widths[s], widths[s], b == 0 && s > 0 ? 2 : 1));
      acts += 7 * static_cast<double>(widths[s]) * hw;  // conv, BN, ReLU x2, sum, ReLU, skip
    }
    in = widths[s];
  }
  acts += 3 * static_cast<double>(stem) * static_cast<double>(a.height * a.width_px);
  if (a.outputs > 0) params += static_cast<double>(in * a.outputs + a.outputs);
  return {params, acts + static_cast<double>(in + a.outputs)};
}

}  // namespace

BackboneEntry resnet18_backbone() {
  BackboneEntry e{"resnet18",
                  "CIFAR ResNet-18 (paper 1, paper 2; state-dict names of the common "
                  "PyTorch CIFAR code)"};
  e.matches = [](const std::string& k) { return k == "resnet18"; };
  e.make = [](const BackboneArgs& a) -> std::shared_ptr<BackboneImpl> {
    return std::make_shared<ResNetImpl>(a.in_channels, a.outputs, kResnet18Stem,
                                        resnet18_widths(a.width), 2, Shortcut::conv, "linear");
  };
  e.cost = [](const BackboneArgs& a) {
    return resnet_cost(a, kResnet18Stem, resnet18_widths(a.width), 2, true);
  };
  e.trunk_features = [](const BackboneArgs& a) { return resnet18_widths(a.width).back(); };
  return e;
}

BackboneEntry resnet20_backbone() {
  BackboneEntry e{"resnet20",
                  "CIFAR ResNet-20 (16/32/64 channels, parameter-free shortcuts, fc): paper 2's "
                  "router",
                  true, true};
  e.matches = [](const std::string& k) { return k == "resnet20"; };
  e.make = [](const BackboneArgs& a) -> std::shared_ptr<BackboneImpl> {
    const auto widths = resnet20_widths(a.width);
    return std::make_shared<ResNetImpl>(a.in_channels, a.outputs, widths[0], widths, 3,
                                        Shortcut::pad, "fc");
  };
  e.cost = [](const BackboneArgs& a) {
    const auto widths = resnet20_widths(a.width);
    return resnet_cost(a, widths[0], widths, 3, false);
  };
  e.trunk_features = [](const BackboneArgs& a) { return resnet20_widths(a.width).back(); };
  return e;
}

}  // namespace moecert::backbones
