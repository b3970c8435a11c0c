// Wide ResNet `wrn-<depth>-<k>` (Zagoruyko & Komodakis 2016; paper 2's WRN-28-10):
// depth = 6n + 4, three stages of n pre-activation basic blocks of 16k, 32k, 64k
// channels after a 3x3 stem of 16, then BatchNorm, ReLU, global average pool, fc.
// Parameter names follow the widely used PyTorch code (conv1, block1.layer.0.bn1,
// .conv1, .bn2, .conv2, .convShortcut, bn1, fc) so state dicts map 1:1.
#include "backbone-impl.h"

namespace moecert::backbones {
namespace {

/// x -> a = relu(bn1(x)); conv2(relu(bn2(conv1(a)))) + (x, or convShortcut(a) when
/// the shape changes).
class WideBlockImpl : public nn::Module {
 public:
  WideBlockImpl(int64_t in, int64_t out, int64_t stride)
      : bn1(register_module("bn1", batch_norm(in))),
        conv1(register_module("conv1", conv3x3(in, out, stride, false))),
        bn2(register_module("bn2", batch_norm(out))),
        conv2(register_module("conv2", conv3x3(out, out, 1, false))) {
    if (in != out || stride != 1)
      shortcut = register_module("convShortcut", conv1x1(in, out, stride));
  }
  torch::Tensor forward(const torch::Tensor& x) {
    auto a = torch::relu(bn_forward(bn1, x));
    auto out = conv2(torch::relu(bn_forward(bn2, conv1(a))));
    return out + (shortcut ? shortcut(a) : x);
  }
  void append_graph(LayerGraph& g, const std::string& p) {
    const int x = g.output();
    g.add(batchnorm_layer(p + ".bn1", bn1));
    const int a = g.add(relu_layer());
    const int m =
        g.append(LayerGraph{conv_layer(p + ".conv1", conv1), batchnorm_layer(p + ".bn2", bn2),
                            relu_layer(), conv_layer(p + ".conv2", conv2)},
                 a);
    const int s = shortcut ? g.add(conv_layer(p + ".convShortcut", shortcut), {a}) : x;
    g.add(Layer::simple(Layer::Kind::residual, p), {m, s});
  }
  nn::BatchNorm2d bn1;
  nn::Conv2d conv1;
  nn::BatchNorm2d bn2;
  nn::Conv2d conv2;
  nn::Conv2d shortcut{nullptr};
};
TORCH_MODULE(WideBlock);

/// depth, k from "wrn-<depth>-<k>" (empty when it does not parse).
std::vector<int64_t> wrn_params(const std::string& kind) {
  auto p = family_params(kind, "wrn-");
  return p.size() == 2 ? p : std::vector<int64_t>{};
}

std::vector<int64_t> wrn_widths(const BackboneArgs& a) {
  const int64_t k = wrn_params(a.kind).at(1);
  return {scaled(16, a.width), scaled(16 * k, a.width), scaled(32 * k, a.width),
          scaled(64 * k, a.width)};
}

class WideResNetImpl : public BackboneImpl {
 public:
  explicit WideResNetImpl(const BackboneArgs& a) {
    const int64_t n = (wrn_params(a.kind).at(0) - 4) / 6;
    const auto w = wrn_widths(a);
    conv1 = register_module("conv1", conv3x3(a.in_channels, w[0], 1, false));
    for (int s = 1; s <= 3; ++s) {
      nn::Sequential layer;
      for (int64_t b = 0; b < n; ++b)
        layer->push_back(WideBlock(b == 0 ? w[s - 1] : w[s], w[s], b == 0 && s > 1 ? 2 : 1));
      auto block = std::make_shared<nn::Module>();
      block->register_module("layer", layer);
      register_module("block" + std::to_string(s), block);
      stages_.push_back(layer);
    }
    bn1 = register_module("bn1", batch_norm(w[3]));
    if (a.outputs > 0) fc = register_module("fc", nn::Linear(w[3], a.outputs));
  }
  torch::Tensor forward(torch::Tensor x) override {
    x = conv3x3_apply(conv1, x);
    for (auto& s : stages_) x = s->forward(x);
    x = torch::relu(bn_forward(bn1, x));
    x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(/*start_dim=*/1);
    return fc ? fc(x) : x;
  }
  LayerGraph graph() override {
    LayerGraph g = {conv_layer("conv1", conv1)};
    for (size_t s = 0; s < stages_.size(); ++s)
      for (size_t b = 0; b < stages_[s]->size(); ++b)
        std::dynamic_pointer_cast<WideBlockImpl>(stages_[s]->ptr(b))
            ->append_graph(g, "block" + std::to_string(s + 1) + ".layer." + std::to_string(b));
    g.add(batchnorm_layer("bn1", bn1));
    g.add(relu_layer());
    g.add(Layer::simple(Layer::Kind::global_avgpool));
    if (fc) g.add(linear_layer("fc", fc));
    return g;
  }
  nn::Conv2d conv1{nullptr};
  std::vector<nn::Sequential> stages_;
  nn::BatchNorm2d bn1{nullptr};
  nn::Linear fc{nullptr};
};

}  // namespace

BackboneEntry wrn_backbone() {
  BackboneEntry e{"wrn-<depth>-<k>",
                  "Wide ResNet, depth = 6n + 4, widen factor k (wrn-28-10 as in paper 2; "
                  "wrn-16-4 is small)"};
  e.matches = [](const std::string& k) { return k.rfind("wrn-", 0) == 0; };
  e.validate = [](const BackboneArgs& a) {
    const auto p = wrn_params(a.kind);
    if (p.empty() || p[0] < 10 || (p[0] - 4) % 6 != 0 || p[0] > 1000 || p[1] < 1 || p[1] > 64)
      throw ConfigError::invalid("backbone", a.kind,
                                 "wrn-<depth>-<k> with depth = 6n + 4 (10 <= depth <= 1000) and "
                                 "1 <= k <= 64, e.g. wrn-28-10");
  };
  e.example = "wrn-10-1";
  e.make = [](const BackboneArgs& a) -> std::shared_ptr<BackboneImpl> {
    return std::make_shared<WideResNetImpl>(a);
  };
  e.cost = [](const BackboneArgs& a) -> BackboneCost {
    const int64_t n = (wrn_params(a.kind).at(0) - 4) / 6;
    const auto w = wrn_widths(a);
    double params = static_cast<double>(a.in_channels * w[0] * 9), acts = 0;
    double hw = static_cast<double>(a.height) * static_cast<double>(a.width_px);
    acts += static_cast<double>(w[0]) * hw;
    for (int s = 1; s <= 3; ++s) {
      if (s > 1) hw /= 4;
      for (int64_t b = 0; b < n; ++b) {
        const int64_t in = b == 0 ? w[s - 1] : w[s];
        params += static_cast<double>(2 * in + in * w[s] * 9 + 2 * w[s] + w[s] * w[s] * 9);
        if (in != w[s]) params += static_cast<double>(in * w[s]);
        acts += 7 * static_cast<double>(w[s]) * hw;
      }
    }
    params += static_cast<double>(2 * w[3]);
    if (a.outputs > 0) params += static_cast<double>(w[3] * a.outputs + a.outputs);
    return {params, acts + static_cast<double>(w[3] + a.outputs)};
  };
  e.trunk_features = [](const BackboneArgs& a) { return wrn_widths(a)[3]; };
  return e;
}

}  // namespace moecert::backbones
