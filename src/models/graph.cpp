// Layer graph constructors and its float64 reference evaluation.
#include "moecert/error.h"
#include "moecert/graph.h"

#include <torch/torch.h>

namespace moecert {

Layer Layer::affine(std::string name, torch::Tensor scale, torch::Tensor shift) {
  Layer l;
  l.kind = Kind::channel_affine, l.name = std::move(name);
  l.weight = std::move(scale), l.bias = std::move(shift);
  return l;
}

Layer Layer::conv2d(std::string name, torch::Tensor w, torch::Tensor b, int64_t stride,
                    int64_t padding) {
  Layer l;
  l.kind = Kind::conv, l.name = std::move(name);
  l.weight = std::move(w), l.bias = std::move(b), l.stride = stride, l.padding = padding;
  return l;
}

Layer Layer::dense(std::string name, torch::Tensor w, torch::Tensor b) {
  Layer l;
  l.kind = Kind::linear, l.name = std::move(name);
  l.weight = std::move(w), l.bias = std::move(b);
  return l;
}

Layer Layer::simple(Kind kind, std::string name) {
  Layer l;
  l.kind = kind, l.name = std::move(name);
  return l;
}

Layer Layer::residual_block(std::string name, std::vector<Layer> main, std::vector<Layer> shortcut) {
  Layer l;
  l.kind = Kind::residual, l.name = std::move(name);
  l.main = std::move(main), l.shortcut = std::move(shortcut);
  return l;
}

std::string layer_kind_name(Layer::Kind k) {
  switch (k) {
    case Layer::Kind::channel_affine: return "channel_affine";
    case Layer::Kind::conv: return "conv";
    case Layer::Kind::linear: return "linear";
    case Layer::Kind::relu: return "relu";
    case Layer::Kind::flatten: return "flatten";
    case Layer::Kind::global_avgpool: return "global_avgpool";
    case Layer::Kind::residual: return "residual";
  }
  return "?";
}

torch::Tensor graph_forward(const LayerGraph& g, const torch::Tensor& input) {
  torch::Tensor x = input;
  for (const auto& l : g) {
    switch (l.kind) {
      case Layer::Kind::channel_affine: {
        std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
        shape[1] = -1;
        x = x * l.weight.view(shape) + l.bias.view(shape);
        break;
      }
      case Layer::Kind::conv: x = torch::conv2d(x, l.weight, l.bias, l.stride, l.padding); break;
      case Layer::Kind::linear: x = torch::linear(x, l.weight, l.bias); break;
      case Layer::Kind::relu: x = torch::relu(x); break;
      case Layer::Kind::flatten: x = x.flatten(1); break;
      case Layer::Kind::global_avgpool: x = x.mean({2, 3}); break;
      case Layer::Kind::residual:
        x = graph_forward(l.main, x) + (l.shortcut.empty() ? x : graph_forward(l.shortcut, x));
        break;
    }
  }
  return x;
}

}  // namespace moecert
