// Sampling the least value of specifications over a region (ball ∩ box, or the whole
// ball): random points and projected descent, the "truth" that bound propagation's lower
// bounds must stay below in the propagation tests.
#pragma once

#include <torch/torch.h>

#include "moecert/bounds.h"
#include "moecert/models.h"

namespace moecert_test {

using namespace moecert;

/// Projects points onto B_p(x, eps) (∩ [0, 1]); L2 ∩ box by Dykstra's alternating projections.
inline torch::Tensor project(const torch::Tensor& z, const torch::Tensor& x, double eps, Norm p,
                             bool box) {
  if (p == Norm::linf) {
    auto y = torch::max(torch::min(z, x + eps), x - eps);
    return box ? y.clamp(0, 1) : y;
  }
  auto ball = [&](const torch::Tensor& v) {
    auto d = v - x;
    auto n = d.flatten(1).norm(2, 1).view({-1, 1, 1, 1});
    return x + d * torch::clamp_max(eps / (n + 1e-300), 1.0);
  };
  if (!box) return ball(z);
  auto y = z.clone(), pp = torch::zeros_like(z), q = torch::zeros_like(z);
  for (int i = 0; i < 60; ++i) {
    auto t = ball(y + pp);
    pp = y + pp - t;
    y = (t + q).clamp(0, 1);
    q = t + q - y;
  }
  return ball(y).clamp(
      0, 1);  // a point of the ball ∩ box (the ball projection of a box point stays in the box)
}

/// The smallest value of every row of C·h that random points and projected descent
/// reach on each sample's region (all rows descend at once). -> [B, S]
inline torch::Tensor sampled_min(const LayerGraph& g, const torch::Tensor& x,
                                 const torch::Tensor& C, double eps, Norm p, bool box) {
  const int64_t B = x.size(0), S = C.size(1);
  auto xr = x.repeat_interleave(S, 0);  // one copy of x per row
  auto cr = C.reshape({B * S, C.size(2)});
  auto value = [&](const torch::Tensor& z) { return (graph_forward(g, z) * cr).sum(1); };
  auto best = torch::full({B * S}, INFINITY, torch::kFloat64);
  for (int t = 0; t < 30; ++t) {  // random points
    auto z = project(xr + eps * (2 * torch::rand_like(xr) - 1) * (p == Norm::l2 ? 2.0 : 1.0), xr,
                     eps, p, box);
    best = torch::min(best, value(z).detach());
  }
  auto z = xr.clone();
  for (int it = 0; it < 30; ++it) {  // projected descent on each row's own value
    auto v = z.detach().requires_grad_(true);
    auto grad = torch::autograd::grad({value(v).sum()}, {v})[0];
    auto dir = p == Norm::linf ? grad.sign()
                               : grad / (grad.flatten(1).norm(2, 1).view({-1, 1, 1, 1}) + 1e-12);
    z = project(z - 0.2 * eps * dir, xr, eps, p, box);
    best = torch::min(best, value(z).detach());
  }
  return best.view({B, S});
}

}  // namespace moecert_test
