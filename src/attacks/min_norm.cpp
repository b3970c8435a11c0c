// Fast Minimum-Norm attack (Pintor, Roli, Brendel, Biggio, NeurIPS 2021, Algorithm 1),
// untargeted, L∞ and L2, batched:
//   m(δ) = z_y − max_{i≠y} z_i at x + δ (adversarial: m < 0);
//   ε_k = (‖δ‖ + m/‖∇m‖_q)(1 + γ_k)   while nothing adversarial was found (just beyond
//         the linearised boundary: on it, the step would stop short of crossing),
//       = ε_{k−1}(1 + γ_k) while the point is not adversarial,
//       = min(ε_{k−1}(1 − γ_k), ‖δ*‖) while it is;
//   δ ← Π_{ε_k}(δ − α_k ε̄ ∇̂m),  then x + δ clipped to the box;
// γ_k and α_k cosine-annealed (γ: 0.05 -> 0.001, α: 1 -> 0.01), ∇̂ the steepest-descent
// direction of the norm, ε̄ = max(ε_k, 1e-3) the step's scale. δ* is the smallest
// perturbation whose point the judge (the float32 model) misclassifies; its norm is
// an upper bound on the sample's minimal adversarial radius.
#include <torch/torch.h>

#include <cmath>
#include <limits>

#include "moecert/attack_suite.h"

namespace moecert {

MinNormFound attack_min_norm(const LogProbFn& f, const Judge& judge, const torch::Tensor& x,
                             const torch::Tensor& y, Norm norm, bool box, int steps) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  const int64_t B = x.size(0);
  auto img = [&](const torch::Tensor& v) { return v.to(x.options()).view({-1, 1, 1, 1}); };
  auto dual_norm = [&](const torch::Tensor& g) {
    auto f1 = g.flatten(1);
    return norm == Norm::linf ? f1.abs().sum(1) : f1.norm(2, 1);
  };
  auto dist = [&](const torch::Tensor& d) {
    auto f1 = d.flatten(1).to(torch::kFloat64);
    return norm == Norm::linf ? f1.abs().amax(1) : f1.norm(2, 1);
  };
  auto delta = torch::zeros_like(x);
  auto eps = torch::zeros({B}, x.options().dtype(torch::kFloat64));
  auto best = torch::full({B}, kInf, eps.options());
  auto x_best = x.clone();
  auto found_any = torch::zeros({B}, torch::kBool).to(x.device());
  for (int k = 0; k < steps; ++k) {
    const double c = 0.5 * (1 + std::cos(M_PI * k / std::max(steps, 1)));
    const double gamma = 0.001 + (0.05 - 0.001) * c, alpha = 0.01 + (1.0 - 0.01) * c;
    auto v = (x + delta).detach().requires_grad_(true);
    auto m = class_margin(f(v), y);
    auto g = torch::autograd::grad({m.sum()}, {v})[0].detach();
    torch::NoGradGuard ng;
    auto xa = v.detach();
    auto wrong = judge(xa).argmax(1).ne(y);
    auto d = dist(xa - x);
    auto smaller = wrong & d.lt(best);
    best = torch::where(smaller, d, best);
    x_best = torch::where(smaller.view({-1, 1, 1, 1}), xa, x_best);
    found_any = found_any | wrong;
    auto md = m.detach().to(torch::kFloat64);
    auto linear = d + md.clamp_min(0) / dual_norm(g).to(torch::kFloat64).clamp_min(1e-12);
    eps = torch::where(wrong, torch::min(eps * (1 - gamma), best),
                       torch::where(found_any, eps * (1 + gamma), linear * (1 + gamma)));
    auto dir = norm == Norm::linf ? g.sign() : g / img(g.flatten(1).norm(2, 1).clamp_min(1e-12));
    delta = delta - img(eps.clamp_min(1e-3) * alpha) * dir;
    // Projection onto the ε_k ball, then the box.
    if (norm == Norm::linf) {
      delta = torch::max(torch::min(delta, img(eps)), -img(eps));
    } else {
      auto n = delta.flatten(1).norm(2, 1).to(torch::kFloat64);
      delta = delta * img(torch::clamp_max(eps / n.clamp_min(1e-12), 1.0));
    }
    if (box) delta = (x + delta).clamp(0.0, 1.0) - x;
  }
  {
    torch::NoGradGuard ng;
    auto xa = (x + delta).detach();
    auto wrong = judge(xa).argmax(1).ne(y);
    auto d = dist(xa - x);
    auto smaller = wrong & d.lt(best);
    best = torch::where(smaller, d, best);
    x_best = torch::where(smaller.view({-1, 1, 1, 1}), xa, x_best);
  }
  return {x_best.detach(), best};
}

}  // namespace moecert
