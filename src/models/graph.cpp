// Layer graph constructors. Evaluation and bounds of each kind are its rule's
// (src/bounds/rules/).
#include "moecert/graph.h"

namespace moecert {

Layer Layer::affine(std::string name, torch::Tensor scale, torch::Tensor shift,
                    torch::Tensor shift_terms) {
  Layer l;
  l.kind = Kind::channel_affine, l.name = std::move(name);
  l.weight = std::move(scale), l.bias = std::move(shift), l.shift_terms = std::move(shift_terms);
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

Layer Layer::max_pool(std::string name, int64_t kernel, int64_t stride, int64_t padding) {
  Layer l;
  l.kind = Kind::maxpool, l.name = std::move(name);
  l.kernel = kernel, l.stride = stride, l.padding = padding;
  return l;
}

Layer Layer::gate(std::string name, torch::Tensor lo, torch::Tensor hi) {
  Layer l;
  l.kind = Kind::gate, l.name = std::move(name);
  l.weight = std::move(lo), l.bias = std::move(hi);
  return l;
}

Layer Layer::simple(Kind kind, std::string name) {
  Layer l;
  l.kind = kind, l.name = std::move(name);
  return l;
}

Layer Layer::residual_block(std::string name, std::vector<Layer> main,
                            std::vector<Layer> shortcut) {
  Layer l;
  l.kind = Kind::residual, l.name = std::move(name);
  l.main = std::move(main), l.shortcut = std::move(shortcut);
  return l;
}

}  // namespace moecert
