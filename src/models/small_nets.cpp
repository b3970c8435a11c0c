// The small backbones: the CPU-friendly expert `cnn-s` (with its MoE-CNN body), the
// routers `linear` and `cnn`, and `mlp` (expert or router, for small inputs). Child
// names are checkpoint keys: treat them as API.
#include "backbone-impl.h"

namespace moecert::backbones {
namespace {

/// conv 3x3 C->16 s2 p1, ReLU, conv 3x3 16->32 s2 p1, ReLU, flatten, fc ->128, ReLU, fc.
class CnnSImpl : public BackboneImpl {
 public:
  explicit CnnSImpl(const BackboneArgs& a)
      : conv1(register_module("conv1", conv3x3(a.in_channels, 16, 2, true))),
        conv2(register_module("conv2", conv3x3(16, 32, 2, true))),
        fc1(register_module("fc1", nn::Linear(32 * conv_s2_size(conv_s2_size(a.height)) *
                                                  conv_s2_size(conv_s2_size(a.width_px)),
                                              128))),
        fc2(register_module("fc2", nn::Linear(128, a.outputs))) {}

  torch::Tensor forward(torch::Tensor x) override {
    x = torch::relu(conv3x3_apply(conv1, x));
    x = torch::relu(conv2(x));
    x = torch::relu(fc1(x.flatten(/*start_dim=*/1)));
    return fc2(x);
  }
  LayerGraph graph() override {
    return {conv_layer("conv1", conv1),
            relu_layer(),
            conv_layer("conv2", conv2),
            relu_layer(),
            Layer::simple(Layer::Kind::flatten),
            linear_layer("fc1", fc1),
            relu_layer(),
            linear_layer("fc2", fc2)};
  }

  nn::Conv2d conv1, conv2;
  nn::Linear fc1, fc2;
};

/// Router `cnn`: conv 3x3 C->8 s2, ReLU, conv 3x3 8->16 s2, ReLU, fc -> E.
class CnnRouterImpl : public BackboneImpl {
 public:
  explicit CnnRouterImpl(const BackboneArgs& a)
      : conv1(register_module("conv1", conv3x3(a.in_channels, 8, 2, true))),
        conv2(register_module("conv2", conv3x3(8, 16, 2, true))),
        fc(register_module("fc", nn::Linear(16 * conv_s2_size(conv_s2_size(a.height)) *
                                                conv_s2_size(conv_s2_size(a.width_px)),
                                            a.outputs))) {}

  torch::Tensor forward(torch::Tensor x) override {
    x = torch::relu(conv3x3_apply(conv1, x));
    x = torch::relu(conv2(x));
    return fc(x.flatten(/*start_dim=*/1));
  }
  LayerGraph graph() override {
    return {conv_layer("conv1", conv1),          relu_layer(),
            conv_layer("conv2", conv2),          relu_layer(),
            Layer::simple(Layer::Kind::flatten), linear_layer("fc", fc)};
  }

  nn::Conv2d conv1, conv2;
  nn::Linear fc;
};

/// flatten, fc 32, ReLU, fc 32, ReLU, fc -> outputs.
class MlpImpl : public BackboneImpl {
 public:
  explicit MlpImpl(const BackboneArgs& a)
      : fc1(register_module("fc1", nn::Linear(a.in_channels * a.height * a.width_px, 32))),
        fc2(register_module("fc2", nn::Linear(32, 32))),
        fc3(register_module("fc3", nn::Linear(32, a.outputs))) {}
  torch::Tensor forward(torch::Tensor x) override {
    return fc3(torch::relu(fc2(torch::relu(fc1(x.flatten(/*start_dim=*/1))))));
  }
  LayerGraph graph() override {
    return {Layer::simple(Layer::Kind::flatten),
            linear_layer("fc1", fc1),
            relu_layer(),
            linear_layer("fc2", fc2),
            relu_layer(),
            linear_layer("fc3", fc3)};
  }
  nn::Linear fc1, fc2, fc3;
};

/// Router `linear`: one linear layer on the flattened input (paper 1).
class LinearRouterImpl : public BackboneImpl {
 public:
  explicit LinearRouterImpl(const BackboneArgs& a)
      : fc(register_module("fc", nn::Linear(a.in_channels * a.height * a.width_px, a.outputs))) {}

  torch::Tensor forward(torch::Tensor x) override { return fc(x.flatten(/*start_dim=*/1)); }
  LayerGraph graph() override {
    return {Layer::simple(Layer::Kind::flatten), linear_layer("fc", fc)};
  }

  nn::Linear fc;
};

/// The conv layers of cnn-s at group width: conv 3x3 C->w1 s2, ReLU, conv 3x3 w1->w2 s2,
/// ReLU, flatten. -> [B, w2·H'·W']
class CnnSTrunkImpl : public nn::Module {
 public:
  CnnSTrunkImpl(int64_t c, int64_t w1, int64_t w2)
      : conv1(register_module("conv1", conv3x3(c, w1, 2, true))),
        conv2(register_module("conv2", conv3x3(w1, w2, 2, true))) {}
  torch::Tensor forward(const torch::Tensor& x) {
    return torch::relu(conv2(torch::relu(conv3x3_apply(conv1, x)))).flatten(/*start_dim=*/1);
  }
  LayerGraph graph(const std::string& prefix) {
    return {conv_layer(prefix + "conv1", conv1), relu_layer(), conv_layer(prefix + "conv2", conv2),
            relu_layer(), Layer::simple(Layer::Kind::flatten)};
  }
  nn::Conv2d conv1, conv2;
};
TORCH_MODULE(CnnSTrunk);

/// MoE-CNN of cnn-s: per group its own two conv layers (the MoE layers); the head
/// fc1 (N·F -> 128) is shared, group g reading its column block, then ReLU and fc2.
class ChannelGroupCnnSImpl : public ChannelGroupNetImpl {
 public:
  ChannelGroupCnnSImpl(const BackboneArgs& a, int64_t n_groups, double scale)
      : features_(scaled(32, scale) * conv_s2_size(conv_s2_size(a.height)) *
                  conv_s2_size(conv_s2_size(a.width_px))),
        groups(register_module("groups", nn::ModuleList())),
        fc1(register_module("fc1", nn::Linear(n_groups * features_, 128))),
        fc2(register_module("fc2", nn::Linear(128, a.outputs))) {
    for (int64_t g = 0; g < n_groups; ++g) {
      trunks_.emplace_back(a.in_channels, scaled(16, scale), scaled(32, scale));
      groups->push_back(trunks_.back());
    }
  }
  torch::Tensor forward_path(int64_t g, const torch::Tensor& x,
                             const torch::Tensor& gate) override {
    auto f = trunks_.at(static_cast<size_t>(g))->forward(x);
    if (gate.defined()) f = f * gate.view({-1, 1});
    auto h = torch::linear(f, fc1->weight.narrow(1, g * features_, features_), fc1->bias);
    return fc2(torch::relu(h));
  }
  LayerGraph path_graph(int64_t g) override {
    auto graph = trunks_.at(static_cast<size_t>(g))->graph("groups." + std::to_string(g) + ".");
    graph.add(Layer::dense("fc1[group " + std::to_string(g) + "]",
                           f64(fc1->weight.narrow(1, g * features_, features_)), f64(fc1->bias)));
    graph.add(relu_layer());
    graph.add(linear_layer("fc2", fc2));
    return graph;
  }

 private:
  int64_t features_;
  std::vector<CnnSTrunk> trunks_;

 public:
  nn::ModuleList groups;
  nn::Linear fc1, fc2;
};

bool named(const std::string& kind, const char* name) { return kind == name; }

/// Sizes of the two stride-2 convolutions' outputs.
double hw2(const BackboneArgs& a) {
  return static_cast<double>(conv_s2_size(a.height) * conv_s2_size(a.width_px));
}
double hw4(const BackboneArgs& a) {
  return static_cast<double>(conv_s2_size(conv_s2_size(a.height)) *
                             conv_s2_size(conv_s2_size(a.width_px)));
}
double pixels(const BackboneArgs& a) {
  return static_cast<double>(a.in_channels) * static_cast<double>(a.height) *
         static_cast<double>(a.width_px);
}

}  // namespace

BackboneEntry cnn_s_backbone() {
  BackboneEntry e{"cnn-s", "small CPU-friendly conv net (2 stride-2 convs, fc 128)"};
  e.matches = [](const std::string& k) { return named(k, "cnn-s"); };
  e.make = [](const BackboneArgs& a) -> std::shared_ptr<BackboneImpl> {
    return std::make_shared<CnnSImpl>(a);
  };
  e.cost = [](const BackboneArgs& a) -> BackboneCost {
    const double c = a.in_channels, k = static_cast<double>(a.outputs);
    return {c * 16 * 9 + 16 + 16 * 32 * 9 + 32 + 32 * hw4(a) * 128 + 128 + 128 * k + k,
            2 * (16 * hw2(a) + 32 * hw4(a) + 128) + k};
  };
  e.make_groups = [](const BackboneArgs& a, int64_t groups,
                     double scale) -> std::shared_ptr<ChannelGroupNetImpl> {
    return std::make_shared<ChannelGroupCnnSImpl>(a, groups, scale);
  };
  e.group_cost = [](const BackboneArgs& a, int64_t groups, double scale) -> BackboneCost {
    const double n = static_cast<double>(groups), k = static_cast<double>(a.outputs);
    const double w1 = static_cast<double>(scaled(16, scale)),
                 w2 = static_cast<double>(scaled(32, scale));
    const double f = w2 * hw4(a), c = static_cast<double>(a.in_channels);
    const double trunk = c * w1 * 9 + w1 + w1 * w2 * 9 + w2;
    return {n * trunk + n * f * 128 + 128 + 128 * k + k, 2 * (w1 * hw2(a) + f + 128) + k};
  };
  return e;
}

BackboneEntry linear_router_backbone() {
  BackboneEntry e{"linear", "one linear layer on the flattened input (paper 1's router)", false,
                  true};
  e.matches = [](const std::string& k) { return named(k, "linear"); };
  e.make = [](const BackboneArgs& a) -> std::shared_ptr<BackboneImpl> {
    return std::make_shared<LinearRouterImpl>(a);
  };
  e.cost = [](const BackboneArgs& a) -> BackboneCost {
    const double k = static_cast<double>(a.outputs);
    return {pixels(a) * k + k, k};
  };
  return e;
}

BackboneEntry cnn_router_backbone() {
  BackboneEntry e{"cnn", "small conv net (2 stride-2 convs of 8 and 16 channels, fc)", false, true};
  e.matches = [](const std::string& k) { return named(k, "cnn"); };
  e.make = [](const BackboneArgs& a) -> std::shared_ptr<BackboneImpl> {
    return std::make_shared<CnnRouterImpl>(a);
  };
  e.cost = [](const BackboneArgs& a) -> BackboneCost {
    const double c = a.in_channels, k = static_cast<double>(a.outputs);
    return {c * 8 * 9 + 8 + 8 * 16 * 9 + 16 + 16 * hw4(a) * k + k,
            2 * (8 * hw2(a) + 16 * hw4(a)) + k};
  };
  return e;
}

BackboneEntry mlp_backbone() {
  BackboneEntry e{"mlp", "flatten, fc 32, ReLU, fc 32, ReLU, fc (small inputs, 2-D toys)", true,
                  true};
  e.matches = [](const std::string& k) { return named(k, "mlp"); };
  e.make = [](const BackboneArgs& a) -> std::shared_ptr<BackboneImpl> {
    return std::make_shared<MlpImpl>(a);
  };
  e.cost = [](const BackboneArgs& a) -> BackboneCost {
    const double k = static_cast<double>(a.outputs);
    return {pixels(a) * 32 + 32 + 32 * 32 + 32 + 32 * k + k, 4 * 32 + k};
  };
  return e;
}

}  // namespace moecert::backbones
