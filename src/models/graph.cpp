// Layer and graph constructors. Evaluation and bounds of each operator are its
// rule's (src/bounds/rules/).
#include "moecert/graph.h"

#include "moecert/error.h"

namespace moecert {

Layer Layer::affine(std::string name, torch::Tensor scale, torch::Tensor shift,
                    torch::Tensor shift_terms) {
  Layer l;
  l.kind = Kind::channel_affine, l.name = std::move(name);
  l.weight = std::move(scale), l.bias = std::move(shift), l.shift_terms = std::move(shift_terms);
  return l;
}

Layer Layer::batch_norm(std::string name, const torch::Tensor& gamma, const torch::Tensor& beta,
                        const torch::Tensor& mean, const torch::Tensor& var, double eps) {
  auto scale = torch::rsqrt(var + eps);
  if (gamma.defined()) scale = scale * gamma;
  auto shift = -mean * scale;
  auto terms = (mean * scale).abs();
  if (beta.defined()) shift = shift + beta, terms = terms + beta.abs();
  return affine(std::move(name), scale, shift, terms);
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

Layer Layer::layer_norm(std::string name, torch::Tensor gamma, torch::Tensor beta, double eps) {
  Layer l = simple(Kind::layernorm, std::move(name));
  l.weight = std::move(gamma), l.bias = std::move(beta), l.eps = eps;
  return l;
}

Layer Layer::tokens_of(std::string name, torch::Tensor cls, torch::Tensor pos) {
  Layer l = simple(Kind::tokens, std::move(name));
  l.weight = std::move(pos), l.bias = std::move(cls);
  return l;
}

Layer Layer::attention_scores(std::string name, int64_t heads, double scale) {
  Layer l = simple(Kind::attn_scores, std::move(name));
  l.heads = heads, l.scale = scale;
  return l;
}

Layer Layer::attention_mix(std::string name, int64_t heads) {
  Layer l = simple(Kind::attn_mix, std::move(name));
  l.heads = heads;
  return l;
}

LayerGraph::LayerGraph(std::initializer_list<Layer> chain) {
  for (const auto& l : chain) add(l);
}

int LayerGraph::add(Layer l, std::vector<int> inputs) {
  for (int i : inputs)
    if (i < -1 || i > output())
      throw ShapeError("graph: node '" + l.name + "' reads node " + std::to_string(i) +
                       ", but only the input (-1) and nodes 0.." + std::to_string(output()) +
                       " come before it");
  nodes_.push_back({std::move(l), std::move(inputs)});
  return output();
}

int LayerGraph::append(const LayerGraph& sub, int input) {
  const int offset = static_cast<int>(nodes_.size());
  for (const auto& n : sub.nodes_) {
    std::vector<int> in;
    for (int i : n.inputs) in.push_back(i < 0 ? input : i + offset);
    add(n.layer, std::move(in));
  }
  return sub.empty() ? input : output();
}

int LayerGraph::add_residual(const std::string& name, const LayerGraph& main,
                             const LayerGraph& shortcut, int input) {
  const int m = append(main, input);
  const int s = append(shortcut, input);
  return add(Layer::simple(Layer::Kind::residual, name), {m, s});
}

}  // namespace moecert
