// APGD (Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble
// of diverse parameter-free attacks", ICML 2020, Algorithm 1), batched over samples
// with a radius per sample:
//   x1 = P(x0 + η ∇̂f(x0));  z = P(xk + η ∇̂f(xk));
//   x_{k+1} = P(xk + α(z − xk) + (1 − α)(xk − x_{k−1})),  α = 0.75, η0 = 2ε,
// with ∇̂ the steepest-ascent direction of the norm (sign for L∞, g/‖g‖2 for L2) and P
// the projection onto the ball ∩ box. At the checkpoints w_j = ⌈p_j N⌉ (p0 = 0,
// p1 = 0.22, p_{j+1} = p_j + max(p_j − p_{j−1} − 0.03, 0.06)) a sample halves η and
// restarts from its best point when (1) the objective rose in fewer than ρ = 0.75 of
// the steps since the last checkpoint, or (2) neither η nor the best objective changed
// since then.
#include <torch/torch.h>

#include <cmath>

#include "moecert/attack_suite.h"

namespace moecert {

namespace {

std::vector<int> checkpoints(int steps) {
  std::vector<double> p{0.0, 0.22};
  while (p.back() < 1.0)
    p.push_back(p.back() + std::max(p[p.size() - 1] - p[p.size() - 2] - 0.03, 0.06));
  std::vector<int> w;
  for (size_t i = 1; i < p.size(); ++i) {
    const int c = static_cast<int>(std::ceil(std::min(p[i], 1.0) * steps));
    if (c > 0 && (w.empty() || c > w.back())) w.push_back(c);
  }
  return w;
}

torch::Tensor as_image(const torch::Tensor& v, const torch::Tensor& like) {
  std::vector<int64_t> shape(static_cast<size_t>(like.dim()), 1);
  shape[0] = v.size(0);
  return v.view(shape);
}

}  // namespace

AttackFound attack_apgd(const Objective& objective, const Judge& judge, const AttackBall& ball,
                        const torch::Tensor& y, const RowSampler& sampler, int steps,
                        uint64_t stream, const torch::Tensor& start) {
  const auto& x = ball.x;
  auto value_and_grad = [&](const torch::Tensor& xa) {
    auto v = xa.detach().requires_grad_(true);
    auto l = objective(v);
    auto g = torch::autograd::grad({l.sum()}, {v})[0];
    return std::make_pair(l.detach(), g.detach());
  };
  auto misclassified = [&](const torch::Tensor& xa) {
    torch::NoGradGuard ng;
    return judge(xa).argmax(1).ne(y);
  };
  auto direction = [&](const torch::Tensor& g) {
    if (ball.norm == Norm::linf) return g.sign();
    return g / as_image(g.flatten(1).norm(2, 1).clamp_min(1e-12), g);
  };
  auto take = [&](const torch::Tensor& mask, const torch::Tensor& a, const torch::Tensor& b) {
    return torch::where(as_image(mask, a), a, b);
  };

  auto x_cur = start.defined() ? ball.project(start.to(x.options())) : sampler.start(ball, stream);
  auto found = misclassified(x_cur);
  auto x_found = x_cur.clone();
  if (steps <= 0 || found.all().item<bool>()) return {x_found.detach(), found};
  auto [l_cur, g] = value_and_grad(x_cur);
  auto x_best = x_cur, g_best = g, l_best = l_cur;
  auto eta = as_image(ball.eps.to(x.options()) * 2.0, x);
  auto x_prev = x_cur;
  const auto checks = checkpoints(steps);
  size_t next_check = 0;
  int last_check = 0;
  auto rises = torch::zeros_like(l_cur);
  auto eta_at_check = eta.clone(), best_at_check = l_best.clone();
  for (int k = 0; k < steps; ++k) {
    torch::Tensor x_next;
    {
      torch::NoGradGuard ng;
      auto z = ball.project(x_cur + eta * direction(g));
      x_next = k == 0 ? z : ball.project(x_cur + 0.75 * (z - x_cur) + 0.25 * (x_cur - x_prev));
    }
    x_prev = x_cur, x_cur = x_next;
    auto [l_new, g_new] = value_and_grad(x_cur);
    auto wrong = misclassified(x_cur);
    x_found = take(wrong & ~found, x_cur, x_found);
    found = found | wrong;
    if (found.all().item<bool>()) break;
    rises += l_new.gt(l_cur).to(rises.dtype());
    auto better = l_new.gt(l_best);
    x_best = take(better, x_cur, x_best), g_best = take(better, g_new, g_best);
    l_best = torch::where(better, l_new, l_best);
    l_cur = l_new, g = g_new;
    if (next_check < checks.size() && k + 1 == checks[next_check]) {
      const int h = checks[next_check] - last_check;
      auto stalled = rises.lt(0.75 * h) |
                     (eta.flatten().eq(eta_at_check.flatten()) & l_best.eq(best_at_check));
      eta = torch::where(as_image(stalled, eta), eta / 2, eta);
      x_cur = take(stalled, x_best, x_cur), g = take(stalled, g_best, g);
      x_prev = take(stalled, x_cur, x_prev);
      l_cur = torch::where(stalled, l_best, l_cur);
      rises.zero_();
      eta_at_check = eta.clone(), best_at_check = l_best.clone();
      last_check = checks[next_check++];
    }
  }
  return {take(found, x_found, x_best).detach(), found};
}

}  // namespace moecert
