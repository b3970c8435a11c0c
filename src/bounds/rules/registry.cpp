// The registry from layer kind to bound rule, and the graph-level helpers that
// only dispatch through it. One line per rule.
#include <map>

#include "moecert/compiled_graph.h"
#include "moecert/error.h"
#include "rules-impl.h"

namespace moecert {
namespace {

const std::map<Layer::Kind, std::unique_ptr<BoundRule>>& registry() {
  static const auto table = [] {
    std::map<Layer::Kind, std::unique_ptr<BoundRule>> t;
    t[Layer::Kind::channel_affine] = rules::make_channel_affine_rule();
    t[Layer::Kind::conv] = rules::make_conv2d_rule();
    t[Layer::Kind::linear] = rules::make_linear_rule();
    t[Layer::Kind::relu] = rules::make_relu_rule();
    t[Layer::Kind::flatten] = rules::make_flatten_rule();
    t[Layer::Kind::global_avgpool] = rules::make_global_avgpool_rule();
    t[Layer::Kind::residual] = rules::make_residual_rule();
    t[Layer::Kind::maxpool] = rules::make_maxpool_rule();
    t[Layer::Kind::gate] = rules::make_gate_rule();
    t[Layer::Kind::concat] = rules::make_concat_rule();
    t[Layer::Kind::tokens] = rules::make_tokens_rule();
    t[Layer::Kind::token_select] = rules::make_token_select_rule();
    t[Layer::Kind::layernorm] = rules::make_layernorm_rule();
    t[Layer::Kind::gelu] = rules::make_gelu_rule();
    t[Layer::Kind::softmax] = rules::make_softmax_rule();
    t[Layer::Kind::attn_scores] = rules::make_attn_scores_rule();
    t[Layer::Kind::attn_mix] = rules::make_attn_mix_rule();
    return t;
  }();
  return table;
}

}  // namespace

const BoundRule& rule_for(const Layer& l) {
  const auto it = registry().find(l.kind);
  if (it == registry().end())
    throw UnsupportedLayerError(
        "certify: layer '" + l.name + "' has kind #" + std::to_string(static_cast<int>(l.kind)) +
        ", which has no bound rule: add src/bounds/rules/<kind>.cpp implementing "
        "BoundRule (include/moecert/rules.h) and register it in "
        "src/bounds/rules/registry.cpp");
  return *it->second;
}

namespace {

std::vector<std::string> nodes_where(const LayerGraph& g, bool (BoundRule::*has)() const) {
  std::vector<std::string> out;
  for (const auto& n : g) {
    const auto& r = rule_for(n.layer);
    if (!(r.*has)()) out.push_back(std::string(r.name()) + " '" + n.layer.name + "'");
  }
  return out;
}

}  // namespace

std::vector<std::string> no_jacobian_nodes(const LayerGraph& g) {
  return nodes_where(g, &BoundRule::has_jacobian);
}

Shape graph_out_shape(const LayerGraph& g, const Shape& in) {
  return CompiledGraph(g, in).output_shape();
}

torch::Tensor graph_forward(const LayerGraph& g, const torch::Tensor& input) {
  std::vector<torch::Tensor> value;
  value.reserve(g.size());
  for (const auto& n : g) {
    std::vector<torch::Tensor> x;
    for (int i : n.inputs) x.push_back(i < 0 ? input : value[static_cast<size_t>(i)]);
    value.push_back(rule_for(n.layer).forward(n.layer, x));
  }
  return g.empty() ? input : value.back();
}

namespace rules {

void no_jacobian(const char* rule, const Layer& l) {
  throw UnsupportedLayerError("certify: " + std::string(rule) + " '" + l.name +
                              "' has no Jacobian bound step, which the local Lipschitz "
                              "estimator needs: use --estimator ibp, crown or alpha-crown");
}

JacobianBox interval_scale(const JacobianBox& j, const torch::Tensor& lo, const torch::Tensor& hi) {
  auto m = (lo + hi) * 0.5, w = (hi - lo) * 0.5;
  return {j.c * m, j.c.abs() * w + j.r * (m.abs() + w)};
}

torch::Tensor patch_valid(const Coeffs& c, int64_t h, int64_t w) {
  auto opts = torch::TensorOptions().dtype(torch::kLong).device(c.A.device());
  const int64_t sites = c.Ht * c.Wt;
  auto local = c.site.remainder(sites);
  auto i = torch::div(local, c.Wt, "floor"), j = local.remainder(c.Wt);
  auto k = torch::arange(c.kernel, opts).view({1, -1});
  auto rows = i.view({-1, 1}) * c.stride - c.pad + k, cols = j.view({-1, 1}) * c.stride - c.pad + k;
  auto vr = (rows >= 0) & (rows < h), vc = (cols >= 0) & (cols < w);  // [R, K]
  return (vr.unsqueeze(2) & vc.unsqueeze(1)).unsqueeze(1).to(c.A.options());
}

}  // namespace rules
}  // namespace moecert
