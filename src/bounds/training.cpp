// Certified training's bounds (include/moecert/train_bounds.h): IBP and CROWN-IBP
// through the certify rules on live parameters, and the MoE worst case over the
// experts a top-1 router can select. docs/certification.md §19.
#include <torch/torch.h>

#include <limits>
#include <tuple>

#include "moecert/compiled_graph.h"
#include "moecert/error.h"
#include "moecert/train_bounds.h"

namespace moecert {
namespace {

/// The graph compiled for inputs shaped like `in` (its sizes without the batch).
CompiledGraph compile(const LayerGraph& g, const NodeBounds& in) {
  auto s = in.lo.sizes().vec();
  return CompiledGraph(g, Shape(s.begin() + 1, s.end()));
}

/// IBP of every node, in node order. -> one interval per node
std::vector<NodeBounds> walk(const CompiledGraph& g, const NodeBounds& in) {
  std::vector<NodeBounds> out;
  out.reserve(g.nodes().size());
  for (const auto& n : g.nodes()) {
    std::vector<const NodeBounds*> x;
    for (int i : n.inputs) x.push_back(i < 0 ? &in : &out[static_cast<size_t>(i)]);
    out.push_back(n.rule->bounds(*n.layer, x));
  }
  return out;
}

/// The interval of node `i` (-1: the input).
const NodeBounds& at(const std::vector<NodeBounds>& nodes, const NodeBounds& in, int i) {
  return i < 0 ? in : nodes[static_cast<size_t>(i)];
}

/// min over the box [lo, hi] of A·z per row: A·c − |A|·r. A: [B, S, n], box [B, n] -> [B, S]
torch::Tensor box_min(const torch::Tensor& A, const torch::Tensor& lo, const torch::Tensor& hi) {
  auto c = ((lo + hi) * 0.5).unsqueeze(2), r = ((hi - lo) * 0.5).unsqueeze(2);
  return torch::matmul(A, c).squeeze(2) - torch::matmul(A.abs(), r).squeeze(2);
}

/// IBP bound of C·h: C folded into the last layer when it is linear (the same
/// quantity as certify's IBP, docs §11), else the output's interval.
torch::Tensor ibp_lower(const CompiledGraph& g, const std::vector<NodeBounds>& nodes,
                        const NodeBounds& in, const torch::Tensor& C) {
  const auto& last = g.nodes().back();
  if (last.layer->kind == Layer::Kind::linear) {
    const NodeBounds& z = at(nodes, in, last.inputs[0]);
    auto A = torch::matmul(C, last.layer->weight);  // [B, S, I]
    auto low = box_min(A, z.lo.flatten(1), z.hi.flatten(1));
    if (last.layer->bias.defined()) low = low + torch::matmul(C, last.layer->bias);
    return low;
  }
  return box_min(C, nodes.back().lo.flatten(1), nodes.back().hi.flatten(1));
}

/// CROWN-IBP: one backward walk of the rows C from the output through the nodes in
/// reverse order (a node with several consumers sums their rows), each relaxed
/// operator relaxed over its IBP input interval, concretised over the input box.
torch::Tensor crown_ibp_lower(const CompiledGraph& g, const std::vector<NodeBounds>& nodes,
                              const NodeBounds& in, const torch::Tensor& C) {
  const int64_t B = C.size(0), S = C.size(1);
  const auto sample = torch::arange(B, C.options().dtype(torch::kLong)).repeat_interleave(S);
  auto gather = [&sample](const torch::Tensor& t) { return t.index_select(0, sample); };
  auto b = torch::zeros({B * S}, C.options());
  std::vector<torch::Tensor> rows(g.nodes().size());  // dense rows over each node's output
  rows.back() = C.reshape({B * S, C.size(2)});
  torch::Tensor at_input;
  auto add_to = [](torch::Tensor& acc, const torch::Tensor& A) {
    acc = acc.defined() ? acc + A : A;
  };
  for (size_t k = g.nodes().size(); k-- > 0;) {
    if (!rows[k].defined()) continue;
    const auto& n = g.nodes()[k];
    std::vector<const NodeBounds*> x;
    for (int i : n.inputs) x.push_back(&at(nodes, in, i));
    BackwardArgs args{*n.layer, n.in_shapes, n.out_shape, x, gather, {}};
    Coeffs c;
    c.A = rows[k], c.sample = sample;
    auto next = n.rule->backward(args, c, b);
    if (next.size() != n.inputs.size())
      throw ConfigError("crown-ibp: the rule of layer '" + n.layer->name +
                        "' has no dense backward step");
    for (size_t j = 0; j < next.size(); ++j)
      if (next[j].A.defined())
        add_to(n.inputs[j] < 0 ? at_input : rows[static_cast<size_t>(n.inputs[j])], next[j].A);
    rows[k] = torch::Tensor();
  }
  if (!at_input.defined()) return b.view({B, S});
  auto A = at_input.flatten(1);
  auto lo = gather(in.lo).flatten(1), hi = gather(in.hi).flatten(1);
  auto low = b + (A.clamp_min(0) * lo + A.clamp_max(0) * hi).sum(1);
  return low.view({B, S});
}

}  // namespace

NodeBounds train_interval(const LayerGraph& g, const NodeBounds& in) {
  if (g.empty()) return in;
  return walk(compile(g, in), in).back();
}

torch::Tensor train_spec_lower(const LayerGraph& g, const NodeBounds& in, const torch::Tensor& C,
                               double beta) {
  if (g.empty()) return box_min(C, in.lo.flatten(1), in.hi.flatten(1));
  const CompiledGraph cg = compile(g, in);
  const auto nodes = walk(cg, in);
  torch::Tensor low;
  if (beta < 1) low = (1 - beta) * ibp_lower(cg, nodes, in, C);
  if (beta > 0) {
    auto crown = beta * crown_ibp_lower(cg, nodes, in, C);
    low = low.defined() ? low + crown : crown;
  }
  return low;
}

std::pair<torch::Tensor, torch::Tensor> router_selection(const torch::Tensor& diff, Routing routing,
                                                         int64_t k) {
  const int64_t E = diff.size(1);
  if (routing == Routing::soft) {
    auto all = torch::ones({diff.size(0), E}, diff.options().dtype(torch::kBool));
    return {all, all};
  }
  auto off = 1 - torch::eye(E, diff.options()).unsqueeze(0);
  // j surely beats i: g_j > g_i everywhere, diff[j, i] > 0 (summed over j: dim 1).
  auto beaten = (diff.gt(0).to(diff.dtype()) * off).sum(1);
  // j may reach i (tie or beat): i does not surely beat j, diff[i, j] <= 0 (over j: dim 2).
  auto rivals = (diff.le(0).to(diff.dtype()) * off).sum(2);
  auto possible = beaten.lt(static_cast<double>(k)), sure = rivals.lt(static_cast<double>(k));
  // Top-k selects exactly k experts at every point, each a possible one: where only k
  // are possible, all k are selected (docs §13.3).
  return {possible, sure | (possible & possible.sum(1, /*keepdim=*/true).eq(k))};
}

torch::Tensor other_classes(const torch::Tensor& ref, int64_t K) {
  const int64_t n = ref.size(0);
  auto at_ref = torch::nn::functional::one_hot(ref, K).to(torch::kBool);
  return torch::arange(K, ref.options()).expand({n, K}).masked_select(~at_ref).view({n, K - 1});
}

torch::Tensor margin_rows(const torch::Tensor& ref, int64_t K, const torch::TensorOptions& o) {
  auto e_ref = torch::nn::functional::one_hot(ref, K).to(o).unsqueeze(1);
  return e_ref - torch::nn::functional::one_hot(other_classes(ref, K), K).to(o);
}

namespace {

/// B_∞(x, ε) (∩ [0, 1]^d with box) as an interval without certification's extras.
NodeBounds input_region(const torch::Tensor& x, const torch::Tensor& eps, bool box) {
  auto r = eps.to(x.dtype()).view({x.size(0), 1, 1, 1});
  NodeBounds in{x - r, x + r, {}, {}};
  if (box) in.lo = in.lo.clamp_min(0.0), in.hi = in.hi.clamp_max(1.0);
  return in;
}

/// diff[b, i, j] <= g_i − g_j over sample b's region: rows e_i − e_j of the router's
/// logits. -> [B, E, E]
torch::Tensor router_differences(MoeImpl& model, const NodeBounds& in, double beta) {
  const int64_t E = model.num_experts(), B = in.lo.size(0);
  auto eye = torch::eye(E, in.lo.options());
  auto Cr = (eye.unsqueeze(1) - eye.unsqueeze(0))
                .reshape({1, E * E, E})
                .expand({B, E * E, E})
                .contiguous();
  return train_spec_lower(model.component_graph(-1), in, Cr, beta).view({B, E, E});
}

/// min over i in S, j not in S of diff[i, j], S the clean top-k experts of x. -> [B]
torch::Tensor gap_of(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& diff) {
  const int64_t E = diff.size(1), B = diff.size(0);
  torch::Tensor chosen;  // [B, E] bool: the clean top-k set
  {
    torch::NoGradGuard no_grad;
    const int64_t k = model.spec().top_k;
    auto top = std::get<1>(model.router_logits(x).topk(k, 1));
    chosen = torch::zeros({B, E}, x.options().dtype(torch::kBool)).scatter(1, top, true);
  }
  // Pairs (i chosen, j not chosen); every other entry masked to +inf.
  auto pair = chosen.unsqueeze(2).logical_and(chosen.logical_not().unsqueeze(1));
  return diff.masked_fill(pair.logical_not(), std::numeric_limits<double>::infinity())
      .flatten(1)
      .amin(1);
}

}  // namespace

MixtureMargins moe_mixture_margins(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                                   const torch::Tensor& eps, double beta, bool box) {
  const ModelSpec& spec = model.spec();
  const int64_t E = spec.experts, K = spec.num_classes, B = x.size(0);
  if (E < 2 || (spec.routing == Routing::top_k && spec.top_k == 1))
    throw ConfigError(
        "moe_mixture_margins: the model is dense or routes top-1 (moe_certified_margins bounds "
        "it)");
  LiveGraphs live;
  const NodeBounds in = input_region(x, eps, box);
  MixtureMargins out;
  auto diff = router_differences(model, in, beta);
  torch::Tensor sure;
  std::tie(out.possible, sure) = router_selection(diff.detach(), spec.routing, spec.top_k);
  // Each possible expert's probability margins μ_e [B, K] (−1, always valid, elsewhere;
  // 0 at y): from lower bounds of h_y − h_k and of h_k − h_y (rows ±(e_y − e_k)).
  const auto C = margin_rows(y, K, x.options());
  const auto others = other_classes(y, K);
  const auto at_y = torch::nn::functional::one_hot(y, K).to(torch::kBool);
  std::vector<torch::Tensor> mu;
  for (int64_t e = 0; e < E; ++e) {
    auto rows = out.possible.select(1, e).nonzero().flatten();
    auto full = torch::full({B, K}, -1.0, x.options());
    if (rows.numel() > 0) {
      NodeBounds sub{in.lo.index_select(0, rows), in.hi.index_select(0, rows), {}, {}};
      auto Ce = C.index_select(0, rows);
      auto low = train_spec_lower(model.component_graph(e), sub, torch::cat({Ce, -Ce}, 1), beta);
      auto idx = others.index_select(0, rows);
      auto zero = torch::zeros({rows.size(0), K}, x.options());
      auto dhi =
          zero.scatter(1, idx, -low.narrow(1, 0, K - 1));  // δ_k = h_k − h_y <= −LB(h_y − h_k)
      auto dlo = zero.scatter(1, idx, low.narrow(1, K - 1, K - 1));  // δ_k >= LB(h_k − h_y)
      auto yr = y.index_select(0, rows);
      auto m = softmax_margin_lower(dlo, dhi, yr).masked_fill(at_y.index_select(0, rows), 0.0);
      full = full.index_copy(0, rows, m);
    }
    mu.push_back(full);
  }
  auto mus = torch::stack(mu, 1);  // [B, E, K]
  auto [a_lo, a_hi] = router_weight_bounds(diff, out.possible, sure);
  std::vector<torch::Tensor> per;
  for (int64_t k = 0; k < K; ++k) per.push_back(simplex_min(a_lo, a_hi, mus.select(2, k)));
  out.prob_margin = torch::stack(per, 1).gather(1, others);
  return out;
}

torch::Tensor route_gap_lower(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& eps,
                              bool box) {
  const ModelSpec& spec = model.spec();
  if (spec.experts < 2 || spec.routing != Routing::top_k || spec.top_k >= spec.experts)
    throw ConfigError("--route-margin: the model has " +
                      std::string(spec.experts < 2                ? "no router (E = 1)"
                                  : spec.routing == Routing::soft ? "soft routing"
                                                                  : "top-k = E (no choice)") +
                      "; the route-margin term keeps a top-k router's choice on the ball");
  LiveGraphs live;
  const NodeBounds in = input_region(x, eps, box);
  return gap_of(model, x, router_differences(model, in, /*beta=*/0.0));
}

CertifiedMargins moe_certified_margins(MoeImpl& model, const torch::Tensor& x,
                                       const torch::Tensor& y, const torch::Tensor& eps,
                                       double beta, bool box) {
  const ModelSpec& spec = model.spec();
  const int64_t E = spec.experts, K = spec.num_classes, B = x.size(0);
  if (E > 1 && (spec.routing != Routing::top_k || spec.top_k != 1))
    throw ConfigError("moe_certified_margins: the model routes " +
                      std::string(spec.routing == Routing::soft
                                      ? "softly"
                                      : "to its top " + std::to_string(spec.top_k)) +
                      "; its bound is the mixture form (moe_mixture_margins)");
  LiveGraphs live;
  const NodeBounds in = input_region(x, eps, box);
  CertifiedMargins out;
  const auto C = margin_rows(y, K, x.options());
  if (E == 1) {
    out.margin = train_spec_lower(model.component_graph(0), in, C, beta);
    out.possible = torch::ones({B, 1}, x.options().dtype(torch::kBool));
    return out;
  }
  auto diff = router_differences(model, in, beta);
  out.possible = router_selection(diff.detach(), spec.routing, 1).first;
  out.margin = torch::full({B, K - 1}, std::numeric_limits<double>::infinity(), x.options());
  for (int64_t e = 0; e < E; ++e) {
    auto rows = out.possible.select(1, e).nonzero().flatten();
    if (rows.numel() == 0) continue;
    NodeBounds sub{in.lo.index_select(0, rows), in.hi.index_select(0, rows), {}, {}};
    auto low = train_spec_lower(model.component_graph(e), sub, C.index_select(0, rows), beta);
    auto worst = out.margin.index_select(0, rows);
    out.margin = out.margin.index_copy(0, rows, torch::min(worst, low));
  }
  return out;
}

}  // namespace moecert
