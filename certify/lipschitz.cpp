// Lipschitz constants of logit maps (SPEC §4.1): global (operator norms composed
// over the graph's nodes by their rules), local (the backward interval Jacobian over
// the ball), lower and clever. Every constant is of the map ‖·‖_p (pixels) -> ‖·‖_∞
// (logits); proofs in docs/certification.md.
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

#include "moecert/bounds.h"
#include "moecert/certify.h"
#include "moecert/defaults.h"
#include "moecert/error.h"

namespace moecert {

double layer_operator_norm(const Layer& l, Norm p, const std::vector<int64_t>& in_shape,
                           bool to_inf) {
  const BoundRule& r = rule_for(l);
  if (r.arity() != 1)
    throw UnsupportedLayerError("certify: layer '" + l.name + "' (" + r.name() +
                                ") has branches: bound its graph with lipschitz_global");
  return r.lipschitz(l, p, {in_shape}, {1.0}, to_inf);
}

GlobalBound lipschitz_global(const LayerGraph& g, Norm p, const std::vector<int64_t>& input_shape) {
  const BoundGraph graph(g, input_shape);
  const auto& nodes = graph.nodes();
  // L[k]: a constant of the map from the graph input to node k's output, composed by
  // each rule from its inputs' constants (the input's own is 1); the output node's
  // norm goes to ‖·‖_∞.
  std::vector<double> L(nodes.size());
  GlobalBound b;
  for (size_t k = 0; k < nodes.size(); ++k) {
    const auto& n = nodes[k];
    std::vector<double> in;
    for (int i : n.inputs) in.push_back(i < 0 ? 1.0 : L[static_cast<size_t>(i)]);
    L[k] = n.rule->lipschitz(*n.layer, p, n.in_shapes, in, k + 1 == nodes.size());
    const double before = n.inputs.size() == 1 ? in[0] : 1.0;
    b.layers.emplace_back(n.layer->name.empty() ? n.rule->name() : n.layer->name,
                          before > 0 ? L[k] / before : L[k]);
  }
  b.value = L.back() *
            (1.0 + defaults::constant_inflation);  // float64 rounding of the products and norms
  return b;
}

namespace {

/// Per row of C [B, S, K], a sound bound on sup ‖C·J_h‖_q over each sample's region:
/// the smaller of the backward interval Jacobian and linear bound propagation through
/// the Jacobian graph (both over the ReLU states of interval bounds on the region).
/// -> [B, S]
torch::Tensor row_constants(const LayerGraph& g, Norm p, const torch::Tensor& x_in,
                            const torch::Tensor& eps_in, bool box, const torch::Tensor& C,
                            bool jacobian_crown) {
  torch::NoGradGuard no_grad;
  auto x = x_in.to(torch::kFloat64);
  const BoundGraph graph(g, {x.size(1), x.size(2), x.size(3)});
  InputDomain d{x, eps_in.to(x.options()).view({-1}), p, box};
  BoundOptions opt;
  opt.method = BoundMethod::ibp;
  const auto pass = bound_forward(graph, d, opt);
  auto rows = C.to(x.options()).expand({x.size(0), C.size(1), C.size(2)}).contiguous();
  auto interval = bound_jacobian_norms(pass, rows);
  if (!jacobian_crown) return interval;
  // CROWN bounds on the gates' inputs: with interval ones the relaxed bound is looser
  // than the interval Jacobian (measured, README).
  auto relaxed = bound_jacobian_relaxed(pass, rows, BoundMethod::crown);
  return relaxed.defined() ? torch::min(interval, relaxed) : interval;
}

/// The rows e_j (one per logit), then, with `reference` [B] (a class per sample), the
/// rows e_r − e_j for j != r. -> [B or 1, S, K]
torch::Tensor logit_rows(int64_t K, const torch::Tensor& reference, const torch::TensorOptions& o) {
  auto eye = torch::eye(K, o).unsqueeze(0);
  if (!reference.defined()) return eye;
  const int64_t B = reference.size(0);
  return torch::cat({eye.expand({B, K, K}), margin_rows(reference, K, o)},
                    1);  // ‖∇(h_r − h_k)‖ = ‖∇(h_k − h_r)‖
}

}  // namespace

torch::Tensor lipschitz_local(const LayerGraph& g, Norm p, const torch::Tensor& x,
                              const torch::Tensor& eps, bool box, bool jacobian_crown) {
  const int64_t K = graph_out_shape(g, {x.size(1), x.size(2), x.size(3)}).at(0);
  auto per_row = row_constants(
      g, p, x, eps, box, logit_rows(K, {}, x.options().dtype(torch::kFloat64)), jacobian_crown);
  return std::get<0>(per_row.max(1)) * (1.0 + defaults::constant_inflation);
}

torch::Tensor lipschitz_local_shift(const LayerGraph& g, Norm p, const torch::Tensor& x,
                                    const torch::Tensor& eps, bool box, bool jacobian_crown) {
  const int64_t K = graph_out_shape(g, {x.size(1), x.size(2), x.size(3)}).at(0);
  if (K < 2) return lipschitz_local(g, p, x, eps, box, jacobian_crown);
  torch::Tensor reference;
  {
    torch::NoGradGuard ng;
    reference = graph_forward(g, x.to(torch::kFloat64)).argmax(1);
  }
  auto per_row =
      row_constants(g, p, x, eps, box, logit_rows(K, reference, x.options().dtype(torch::kFloat64)),
                    jacobian_crown);
  auto single = std::get<0>(per_row.narrow(1, 0, K).max(1));
  auto to_reference = std::get<0>(per_row.narrow(1, K, K - 1).max(1));
  return torch::min(single, to_reference) * (1.0 + defaults::constant_inflation);
}

// ---------------------------------------------------------------------------------
// lower and clever: gradients actually attained.

namespace {

/// ‖v‖_q per row, q the dual of p. v: [N, ...] -> [N]
torch::Tensor dual_norm(const torch::Tensor& v, Norm p) {
  auto f = v.flatten(1);
  return p == Norm::linf ? f.abs().sum(1) : f.pow(2).sum(1).sqrt();
}

/// Max over logits of the dual-norm gradient at each point. x: [N, ...] -> [N]
torch::Tensor gradient_norms(const LayerGraph& g, Norm p, const torch::Tensor& x) {
  auto xa = x.to(torch::kFloat64).detach().requires_grad_(true);
  auto logits = graph_forward(g, xa);
  torch::Tensor best;
  for (int64_t j = 0; j < logits.size(1); ++j) {
    auto grad =
        torch::autograd::grad({logits.select(1, j).sum()}, {xa}, {}, /*retain_graph=*/true)[0];
    auto n = dual_norm(grad, p);
    best = best.defined() ? torch::max(best, n) : n;
  }
  return best.detach();
}

}  // namespace

double lipschitz_lower(const LayerGraph& g, Norm p, const torch::Tensor& x, int steps,
                       double radius) {
  auto x0 = x.to(torch::kFloat64).detach();
  double best = gradient_norms(g, p, x0).max().item<double>();
  int64_t K;
  {
    torch::NoGradGuard ng;
    K = graph_forward(g, x0.narrow(0, 0, 1)).size(1);
  }
  // Ascend each logit from every point: ReLU networks have piecewise-constant
  // gradients, so the path visits regions whose gradients are evaluated.
  for (int64_t j = 0; j < K; ++j) {
    auto xa = x0.clone();
    for (int s = 0; s < steps; ++s) {
      auto v = xa.detach().requires_grad_(true);
      auto grad = torch::autograd::grad({graph_forward(g, v).select(1, j).sum()}, {v})[0];
      auto dir = p == Norm::linf ? grad.sign()
                                 : grad / (grad.flatten(1).norm(2, 1).view({-1, 1, 1, 1}) + 1e-12);
      xa = xa + (radius / std::max(1, steps)) * dir;
      best = std::max(best, gradient_norms(g, p, xa).max().item<double>());
    }
  }
  return best;
}

namespace {

/// Location (upper end point) of a reverse Weibull distribution fitted to the
/// sample maxima by profile maximum likelihood over a grid of locations.
double reverse_weibull_location(const std::vector<double>& maxima) {
  const double top = *std::max_element(maxima.begin(), maxima.end());
  const double spread =
      std::max(top - *std::min_element(maxima.begin(), maxima.end()), 1e-12 * top);
  double best_mu = top, best_ll = -std::numeric_limits<double>::infinity();
  for (int i = 0; i <= 60; ++i) {
    const double mu = top + spread * std::pow(10.0, -4.0 + 5.0 * i / 60.0);
    std::vector<double> y;
    for (double m : maxima) y.push_back(mu - m);
    // Weibull MLE of the shape k by bisection on the score, then the scale.
    auto score = [&](double k) {
      double s0 = 0, s1 = 0, sl = 0;
      for (double v : y) {
        const double yk = std::pow(v, k);
        s0 += yk, s1 += yk * std::log(v), sl += std::log(v);
      }
      return s1 / s0 - 1.0 / k - sl / static_cast<double>(y.size());
    };
    double lo = 0.05, hi = 100.0;
    if (score(lo) > 0 || score(hi) < 0) continue;
    for (int it = 0; it < 60; ++it) {
      const double mid = 0.5 * (lo + hi);
      (score(mid) > 0 ? hi : lo) = mid;
    }
    const double k = 0.5 * (lo + hi);
    double s0 = 0;
    for (double v : y) s0 += std::pow(v, k);
    const double lambda = std::pow(s0 / static_cast<double>(y.size()), 1.0 / k);
    double ll = 0;
    for (double v : y)
      ll += std::log(k / lambda) + (k - 1) * std::log(v / lambda) - std::pow(v / lambda, k);
    if (ll > best_ll) best_ll = ll, best_mu = mu;
  }
  return best_mu;
}

}  // namespace

double lipschitz_clever(const LayerGraph& g, Norm p, const torch::Tensor& x, double radius,
                        int batches, int per_batch, uint64_t seed) {
  auto x0 = x.to(torch::kFloat64).detach();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<double> maxima;
  for (int b = 0; b < batches; ++b) {
    auto idx = torch::randint(x0.size(0), {per_batch}, gen, torch::kLong);
    auto centre = x0.index_select(0, idx);
    torch::Tensor pts;
    if (p == Norm::linf) {
      pts = centre + (torch::rand(centre.sizes(), gen, x0.options()) * 2 - 1) * radius;
    } else {
      auto dir = torch::randn(centre.sizes(), gen, x0.options());
      dir = dir / dir.flatten(1).norm(2, 1).view({-1, 1, 1, 1});
      const double d = static_cast<double>(centre[0].numel());
      auto r = torch::rand({per_batch, 1, 1, 1}, gen, x0.options()).pow(1.0 / d) * radius;
      pts = centre + dir * r;
    }
    maxima.push_back(gradient_norms(g, p, pts).max().item<double>());
  }
  return maxima.size() >= 3 ? reverse_weibull_location(maxima)
                            : *std::max_element(maxima.begin(), maxima.end());
}

}  // namespace moecert
