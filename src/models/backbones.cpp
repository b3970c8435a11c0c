// Expert backbones and routers. Child names are checkpoint keys: treat them as API.
// `resnet18` uses the names of the common PyTorch CIFAR code (conv1, bn1,
// layer1.0.conv1, ..., layer2.0.shortcut.0, linear) so state dicts map 1:1.
#include <torch/torch.h>
#include <torch/version.h>

#include "moecert/error.h"
#include "moecert/models.h"

namespace moecert {
namespace {

namespace nn = torch::nn;

/// Spatial size after a 3x3, stride-2, pad-1 convolution.
int64_t conv_s2_size(int64_t n) { return (n - 1) / 2 + 1; }

nn::Conv2d conv3x3(int64_t in, int64_t out, int64_t stride, bool bias) {
  return nn::Conv2d(nn::Conv2dOptions(in, out, 3).stride(stride).padding(1).bias(bias));
}

/// Convolution whose backward pass uses LibTorch's im2col kernels instead of
/// oneDNN's. For a stem with one to three input channels on the CPU oneDNN's
/// backward is ~2x slower than its own forward would suggest (measured: 3.3 ms
/// vs 1.5 ms for conv 1->16 at B = 128, 28x28); the forward stays on oneDNN.
/// The values are the same convolution; only the kernel choice differs.
class StemConvFunction : public torch::autograd::Function<StemConvFunction> {
 public:
  static torch::Tensor forward(torch::autograd::AutogradContext* ctx, const torch::Tensor& x,
                               const torch::Tensor& w, const torch::Tensor& b, int64_t stride) {
    ctx->save_for_backward({x, w});
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["has_bias"] = b.defined();
    return torch::conv2d(x, w, b, stride, /*padding=*/1);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t s = ctx->saved_data["stride"].toInt();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    auto [gx, gw, gb] = at::_slow_conv2d_backward(
        grads[0].contiguous(), saved[0], saved[1], /*kernel_size=*/{3, 3}, {s, s}, {1, 1},
        {ctx->needs_input_grad(0), ctx->needs_input_grad(1), has_bias && ctx->needs_input_grad(2)});
    return {gx, gw, has_bias ? gb : torch::Tensor(), torch::Tensor()};
  }
};

thread_local bool live_graphs = false;

/// A parameter or buffer as a graph layer holds it: a float64 copy, or (LiveGraphs)
/// the tensor itself.
torch::Tensor f64(const torch::Tensor& t) {
  if (live_graphs) return t;
  return t.defined() ? t.detach().to(torch::kFloat64).clone() : torch::Tensor();
}

/// A conv module as a graph layer; only square stride/padding, no dilation or groups.
Layer conv_layer(const std::string& name, const nn::Conv2d& c) {
  const auto& o = c->options;
#if TORCH_VERSION_MAJOR >= 2  // the padding variant became a std::variant
  const auto* pad = std::get_if<torch::ExpandingArray<2>>(&o.padding());
#else
  const auto* pad = c10::get_if<torch::ExpandingArray<2>>(&o.padding());
#endif
  if (!pad || (*pad)->at(0) != (*pad)->at(1) || o.stride()->at(0) != o.stride()->at(1) ||
      o.dilation()->at(0) != 1 || o.dilation()->at(1) != 1 || o.groups() != 1)
    throw UnsupportedLayerError("certify: convolution '" + name +
                                "' has an unsupported stride/padding/dilation/groups setting");
  return Layer::conv2d(name, f64(c->weight), f64(c->bias), o.stride()->at(0), (*pad)->at(0));
}

Layer linear_layer(const std::string& name, const nn::Linear& l) {
  return Layer::dense(name, f64(l->weight), f64(l->bias));
}

/// BatchNorm in eval mode: y = γ (x − μ) / sqrt(σ² + eps) + β, a per-channel affine map.
Layer batchnorm_layer(const std::string& name, const nn::BatchNorm2d& bn) {
  auto var = f64(bn->running_var), mean = f64(bn->running_mean);
  auto scale = torch::rsqrt(var + bn->options.eps());
  if (bn->weight.defined()) scale = scale * f64(bn->weight);
  auto shift = -mean * scale;
  auto terms = (mean * scale).abs();  // what the float32 model sums to form its shift
  if (bn->bias.defined()) shift = shift + f64(bn->bias), terms = terms + f64(bn->bias).abs();
  return Layer::affine(name, scale, shift, terms);
}

Layer relu_layer() { return Layer::simple(Layer::Kind::relu); }

/// A 3x3, padding-1 convolution module evaluated through the fastest kernels.
torch::Tensor conv3x3_apply(nn::Conv2d& conv, const torch::Tensor& x) {
  if (x.is_cpu() && x.size(1) <= 3 && torch::GradMode::is_enabled())
    return StemConvFunction::apply(x, conv->weight, conv->bias, conv->options.stride()->at(0));
  return conv(x);
}

/// The small CPU-friendly expert of SPEC §1:
/// conv 3x3 C->16 s2 p1, ReLU, conv 3x3 16->32 s2 p1, ReLU, flatten, fc ->128, ReLU, fc.
class CnnSImpl : public BackboneImpl {
 public:
  CnnSImpl(int64_t c, int64_t h, int64_t w, int64_t outputs)
      : conv1(register_module("conv1", conv3x3(c, 16, 2, true))),
        conv2(register_module("conv2", conv3x3(16, 32, 2, true))),
        fc1(register_module(
            "fc1",
            nn::Linear(32 * conv_s2_size(conv_s2_size(h)) * conv_s2_size(conv_s2_size(w)), 128))),
        fc2(register_module("fc2", nn::Linear(128, outputs))) {}

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

/// Router `cnn`: a smaller conv net, conv 3x3 C->8 s2, ReLU, conv 3x3 8->16 s2, ReLU, fc -> E.
class CnnRouterImpl : public BackboneImpl {
 public:
  CnnRouterImpl(int64_t c, int64_t h, int64_t w, int64_t outputs)
      : conv1(register_module("conv1", conv3x3(c, 8, 2, true))),
        conv2(register_module("conv2", conv3x3(8, 16, 2, true))),
        fc(register_module(
            "fc", nn::Linear(16 * conv_s2_size(conv_s2_size(h)) * conv_s2_size(conv_s2_size(w)),
                             outputs))) {}

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

/// `mlp` (router or expert, for small inputs such as the 2-D toy problems of the
/// certification tests): flatten, fc 32, ReLU, fc 32, ReLU, fc -> outputs.
class MlpImpl : public BackboneImpl {
 public:
  MlpImpl(int64_t c, int64_t h, int64_t w, int64_t outputs)
      : fc1(register_module("fc1", nn::Linear(c * h * w, 32))),
        fc2(register_module("fc2", nn::Linear(32, 32))),
        fc3(register_module("fc3", nn::Linear(32, outputs))) {}
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
  LinearRouterImpl(int64_t c, int64_t h, int64_t w, int64_t outputs)
      : fc(register_module("fc", nn::Linear(c * h * w, outputs))) {}

  torch::Tensor forward(torch::Tensor x) override { return fc(x.flatten(/*start_dim=*/1)); }
  LayerGraph graph() override {
    return {Layer::simple(Layer::Kind::flatten), linear_layer("fc", fc)};
  }

  nn::Linear fc;
};

/// ResNet basic block: relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x)).
class BasicBlockImpl : public nn::Module {
 public:
  BasicBlockImpl(int64_t in, int64_t out, int64_t stride)
      : conv1(register_module("conv1", conv3x3(in, out, stride, false))),
        bn1(register_module("bn1", nn::BatchNorm2d(out))),
        conv2(register_module("conv2", conv3x3(out, out, 1, false))),
        bn2(register_module("bn2", nn::BatchNorm2d(out))),
        shortcut(register_module("shortcut", nn::Sequential())) {
    if (stride != 1 || in != out) {
      shortcut->push_back(nn::Conv2d(nn::Conv2dOptions(in, out, 1).stride(stride).bias(false)));
      shortcut->push_back(nn::BatchNorm2d(out));
    }
  }

  torch::Tensor forward(const torch::Tensor& x) {
    auto out = torch::relu(bn1(conv1(x)));
    out = bn2(conv2(out));
    out = out + (shortcut->is_empty() ? x : shortcut->forward(x));
    return torch::relu(out);
  }
  /// residual(main, shortcut) then ReLU; `prefix` is the block's parameter path.
  LayerGraph graph(const std::string& prefix) {
    LayerGraph main = {conv_layer(prefix + ".conv1", conv1), batchnorm_layer(prefix + ".bn1", bn1),
                       relu_layer(), conv_layer(prefix + ".conv2", conv2),
                       batchnorm_layer(prefix + ".bn2", bn2)};
    LayerGraph sc;
    if (!shortcut->is_empty()) {
      sc.push_back(
          conv_layer(prefix + ".shortcut.0",
                     nn::Conv2d(std::dynamic_pointer_cast<nn::Conv2dImpl>(shortcut->ptr(0)))));
      sc.push_back(batchnorm_layer(
          prefix + ".shortcut.1",
          nn::BatchNorm2d(std::dynamic_pointer_cast<nn::BatchNorm2dImpl>(shortcut->ptr(1)))));
    }
    return {Layer::residual_block(prefix, std::move(main), std::move(sc)), relu_layer()};
  }

  nn::Conv2d conv1;
  nn::BatchNorm2d bn1;
  nn::Conv2d conv2;
  nn::BatchNorm2d bn2;
  nn::Sequential shortcut;
};
TORCH_MODULE(BasicBlock);

/// CIFAR ResNet-18 (3x3 stem, no max-pool, [2,2,2,2] basic blocks, global average
/// pool) of stage widths base·(1, 2, 4, 8). outputs = 0 leaves out the linear head:
/// forward then returns the pooled features [B, 8·base] (a MoE-CNN trunk).
class ResNet18Impl : public BackboneImpl {
 public:
  ResNet18Impl(int64_t c, int64_t outputs, int64_t base = 64)
      : conv1(register_module("conv1", conv3x3(c, base, 1, false))),
        bn1(register_module("bn1", nn::BatchNorm2d(base))),
        layer1(register_module("layer1", make_layer(base, base, 1))),
        layer2(register_module("layer2", make_layer(base, 2 * base, 2))),
        layer3(register_module("layer3", make_layer(2 * base, 4 * base, 2))),
        layer4(register_module("layer4", make_layer(4 * base, 8 * base, 2))) {
    if (outputs > 0) linear = register_module("linear", nn::Linear(8 * base, outputs));
  }

  torch::Tensor forward(torch::Tensor x) override {
    x = torch::relu(bn1(conv1(x)));
    x = layer4->forward(layer3->forward(layer2->forward(layer1->forward(x))));
    x = torch::adaptive_avg_pool2d(x, {1, 1}).flatten(/*start_dim=*/1);
    return linear ? linear(x) : x;
  }
  LayerGraph graph() override {
    LayerGraph g = {conv_layer("conv1", conv1), batchnorm_layer("bn1", bn1), relu_layer()};
    const std::pair<const char*, nn::Sequential*> layers[] = {
        {"layer1", &layer1}, {"layer2", &layer2}, {"layer3", &layer3}, {"layer4", &layer4}};
    for (const auto& [name, seq] : layers)
      for (size_t b = 0; b < (*seq)->size(); ++b) {
        auto block = std::dynamic_pointer_cast<BasicBlockImpl>((*seq)->ptr(b));
        for (auto& l : block->graph(std::string(name) + "." + std::to_string(b))) g.push_back(l);
      }
    g.push_back(Layer::simple(Layer::Kind::global_avgpool));
    if (linear) g.push_back(linear_layer("linear", linear));
    return g;
  }

  nn::Conv2d conv1;
  nn::BatchNorm2d bn1;
  nn::Sequential layer1, layer2, layer3, layer4;
  nn::Linear linear{nullptr};

 private:
  static nn::Sequential make_layer(int64_t in, int64_t out, int64_t stride) {
    return nn::Sequential(BasicBlock(in, out, stride), BasicBlock(out, out, 1));
  }
};

/// Width of one channel group: round(scale · channels), at least 1.
int64_t group_width(int64_t channels, double scale) {
  return std::max<int64_t>(1, static_cast<int64_t>(scale * static_cast<double>(channels) + 0.5));
}

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
  ChannelGroupCnnSImpl(int64_t c, int64_t h, int64_t w, int64_t outputs, int64_t n_groups,
                       double scale)
      : features_(group_width(32, scale) * conv_s2_size(conv_s2_size(h)) *
                  conv_s2_size(conv_s2_size(w))),
        groups(register_module("groups", nn::ModuleList())),
        fc1(register_module("fc1", nn::Linear(n_groups * features_, 128))),
        fc2(register_module("fc2", nn::Linear(128, outputs))) {
    for (int64_t g = 0; g < n_groups; ++g) {
      trunks_.emplace_back(c, group_width(16, scale), group_width(32, scale));
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
    graph.push_back(Layer::dense("fc1[group " + std::to_string(g) + "]",
                                 f64(fc1->weight.narrow(1, g * features_, features_)),
                                 f64(fc1->bias)));
    graph.push_back(relu_layer());
    graph.push_back(linear_layer("fc2", fc2));
    return graph;
  }

 private:
  int64_t features_;
  std::vector<CnnSTrunk> trunks_;

 public:
  nn::ModuleList groups;
  nn::Linear fc1, fc2;
};

/// MoE-CNN of ResNet-18: per group a ResNet-18 trunk of width round(64·scale) (every
/// conv and BatchNorm is a MoE layer); the linear head is shared, group g reading
/// its column block of the N·8·width pooled features.
class ChannelGroupResNetImpl : public ChannelGroupNetImpl {
 public:
  ChannelGroupResNetImpl(int64_t c, int64_t outputs, int64_t n_groups, double scale)
      : features_(8 * group_width(64, scale)),
        groups(register_module("groups", nn::ModuleList())),
        linear(register_module("linear", nn::Linear(n_groups * features_, outputs))) {
    for (int64_t g = 0; g < n_groups; ++g) {
      trunks_.push_back(std::make_shared<ResNet18Impl>(c, 0, group_width(64, scale)));
      groups->push_back(trunks_.back());
    }
  }
  torch::Tensor forward_path(int64_t g, const torch::Tensor& x,
                             const torch::Tensor& gate) override {
    auto f = trunks_.at(static_cast<size_t>(g))->forward(x);
    if (gate.defined()) f = f * gate.view({-1, 1});
    return torch::linear(f, linear->weight.narrow(1, g * features_, features_), linear->bias);
  }
  LayerGraph path_graph(int64_t g) override {
    auto graph = trunks_.at(static_cast<size_t>(g))->graph();  // ends with the average pool
    graph.push_back(Layer::dense("linear[group " + std::to_string(g) + "]",
                                 f64(linear->weight.narrow(1, g * features_, features_)),
                                 f64(linear->bias)));
    return graph;
  }

 private:
  int64_t features_;
  std::vector<std::shared_ptr<ResNet18Impl>> trunks_;

 public:
  nn::ModuleList groups;
  nn::Linear linear;
};

}  // namespace

std::shared_ptr<BackboneImpl> backbone_make(const std::string& kind, int64_t in_channels,
                                            int64_t height, int64_t width, int64_t outputs) {
  if (kind == "cnn-s") return std::make_shared<CnnSImpl>(in_channels, height, width, outputs);
  if (kind == "resnet18") return std::make_shared<ResNet18Impl>(in_channels, outputs);
  if (kind == "linear")
    return std::make_shared<LinearRouterImpl>(in_channels, height, width, outputs);
  if (kind == "cnn") return std::make_shared<CnnRouterImpl>(in_channels, height, width, outputs);
  if (kind == "mlp") return std::make_shared<MlpImpl>(in_channels, height, width, outputs);
  throw ConfigError::invalid("backbone", kind,
                             "cnn-s | resnet18 | mlp (experts), linear | cnn | mlp (routers)");
}

std::shared_ptr<ChannelGroupNetImpl> channel_group_make(const std::string& kind,
                                                        int64_t in_channels, int64_t height,
                                                        int64_t width, int64_t outputs,
                                                        int64_t groups, double scale) {
  if (kind == "cnn-s")
    return std::make_shared<ChannelGroupCnnSImpl>(in_channels, height, width, outputs, groups,
                                                  scale);
  if (kind == "resnet18")
    return std::make_shared<ChannelGroupResNetImpl>(in_channels, outputs, groups, scale);
  throw ConfigError::invalid("--expert", kind, "cnn-s | resnet18 (MoE-CNN backbones)");
}

namespace {

/// ResNet-18 of base width b (a trunk without head when outputs == 0).
BackboneCost resnet18_cost(int64_t c, int64_t h, int64_t w, int64_t outputs, int64_t b) {
  auto block = [](int64_t in, int64_t out, int64_t stride) {
    int64_t p = in * out * 9 + 2 * out + out * out * 9 + 2 * out;
    if (stride != 1 || in != out) p += in * out + 2 * out;
    return p;
  };
  double params = static_cast<double>(c * b * 9 + 2 * b);
  const int64_t widths[] = {b, 2 * b, 4 * b, 8 * b};
  int64_t in = b;
  for (int i = 0; i < 4; ++i) {
    params +=
        static_cast<double>(block(in, widths[i], i == 0 ? 1 : 2) + block(widths[i], widths[i], 1));
    in = widths[i];
  }
  if (outputs > 0) params += static_cast<double>(8 * b * outputs + outputs);
  // Conv, BatchNorm and ReLU outputs of each stage: 5 maps at full size, 4 at 1/4, ...
  const double hw = static_cast<double>(h) * static_cast<double>(w);
  return {params, 3.0 * static_cast<double>(b) * hw * (5 + 2 + 1 + 0.5)};
}

}  // namespace

BackboneCost backbone_cost(const std::string& kind, int64_t c, int64_t h, int64_t w,
                           int64_t outputs) {
  const double hw4 =
      static_cast<double>(conv_s2_size(conv_s2_size(h)) * conv_s2_size(conv_s2_size(w)));
  const double hw2 = static_cast<double>(conv_s2_size(h) * conv_s2_size(w));
  const double in = static_cast<double>(c) * static_cast<double>(h) * static_cast<double>(w);
  const double k = static_cast<double>(outputs), ch = static_cast<double>(c);
  if (kind == "cnn-s")
    return {ch * 16 * 9 + 16 + 16 * 32 * 9 + 32 + 32 * hw4 * 128 + 128 + 128 * k + k,
            2 * (16 * hw2 + 32 * hw4 + 128) + k};
  if (kind == "resnet18") return resnet18_cost(c, h, w, outputs, 64);
  if (kind == "linear") return {in * k + k, k};
  if (kind == "cnn")
    return {ch * 8 * 9 + 8 + 8 * 16 * 9 + 16 + 16 * hw4 * k + k, 2 * (8 * hw2 + 16 * hw4) + k};
  if (kind == "mlp") return {in * 32 + 32 + 32 * 32 + 32 + 32 * k + k, 4 * 32 + k};
  throw ConfigError::invalid("backbone", kind,
                             "cnn-s | resnet18 | mlp (experts), linear | cnn | mlp (routers)");
}

BackboneCost channel_group_cost(const std::string& kind, int64_t c, int64_t h, int64_t w,
                                int64_t outputs, int64_t groups, double scale) {
  const double n = static_cast<double>(groups), k = static_cast<double>(outputs);
  if (kind == "cnn-s") {
    const int64_t w1 = group_width(16, scale), w2 = group_width(32, scale);
    const double f =
        static_cast<double>(w2 * conv_s2_size(conv_s2_size(h)) * conv_s2_size(conv_s2_size(w)));
    const double trunk = static_cast<double>(c * w1 * 9 + w1 + w1 * w2 * 9 + w2);
    const double hw2 = static_cast<double>(conv_s2_size(h) * conv_s2_size(w));
    return {n * trunk + n * f * 128 + 128 + 128 * k + k,
            2 * (static_cast<double>(w1) * hw2 + f + 128) + k};
  }
  if (kind == "resnet18") {
    const int64_t b = group_width(64, scale);
    const auto trunk = resnet18_cost(c, h, w, 0, b);
    return {n * trunk.parameters + n * 8 * static_cast<double>(b) * k + k, trunk.activations + k};
  }
  throw ConfigError::invalid("--expert", kind, "cnn-s | resnet18 (MoE-CNN backbones)");
}

int64_t module_parameter_count(const torch::nn::Module& module) {
  int64_t n = 0;
  for (const auto& p : module.parameters()) n += p.numel();
  return n;
}

LiveGraphs::LiveGraphs() : previous_(live_graphs) { live_graphs = true; }
LiveGraphs::~LiveGraphs() { live_graphs = previous_; }
bool LiveGraphs::active() { return live_graphs; }

}  // namespace moecert
