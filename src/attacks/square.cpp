// Square Attack (Andriushchenko, Croce, Flammarion, Hein, ECCV 2020), score-based:
// no gradients, only the judge's class margin m(x) = z_y − max_{i≠y} z_i.
//  L∞: start at x + ε·(vertical stripes of random sign per channel); at query i
//      pick a square window of side s_i = max(1, round(sqrt(p_i·H·W))) at a random
//      place and set it to ±ε (one random sign per channel); keep the change if the
//      margin drops. p_i = p0 = 0.8 halved at 10, 50, 200, 500, 1000, 2000, 4000, 6000,
//      8000 of 10,000 (the schedule rescaled to the query budget).
//  L2 (a simplification of the paper's update, docs/attacks.md): the window gets
//      ±(its share of ε) per channel and the whole perturbation is rescaled to norm ε.
// Samples stop once their margin is negative; each query evaluates only the samples
// still searching.
#include <torch/torch.h>

#include <cmath>

#include "moecert/attack_suite.h"

namespace moecert {

namespace {

double p_schedule(double p0, int i, int queries) {
  const int it = static_cast<int>(static_cast<double>(i) / std::max(queries, 1) * 10000);
  const int marks[] = {10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000};
  double p = p0;
  for (int m : marks)
    if (it > m) p /= 2;
  return p;
}

}  // namespace

AttackFound attack_square(const Judge& judge, const AttackBall& ball, const torch::Tensor& y,
                          const RowSampler& sampler, int queries, uint64_t stream,
                          const std::function<Judge(const torch::Tensor& rows)>& on_rows) {
  torch::NoGradGuard ng;
  const auto& x = ball.x;
  const int64_t B = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  auto e = ball.eps.to(x.options()).view({-1, 1, 1, 1});
  auto margin_of = [&](const torch::Tensor& xa, const torch::Tensor& ya) {
    return class_margin(judge(xa), ya);
  };
  auto signs = [](const torch::Tensor& u) {
    return torch::where(u.lt(0.5), -torch::ones_like(u), torch::ones_like(u));
  };
  // Random numbers of every query, per sample from its own stream: [B, queries, 2 + C].
  auto draws = sampler.uniform(torch::empty({B, std::max(queries, 1), 2 + C}, x.options()), stream);
  torch::Tensor delta;
  if (ball.norm == Norm::linf) {
    delta = signs(sampler.uniform(torch::empty({B, C, 1, W}, x.options()), stream + 1))
                .expand({B, C, H, W}) *
            e;
  } else {
    delta = sampler.normal(x, stream + 1);
    delta = delta / delta.flatten(1).norm(2, 1).clamp_min(1e-12).view({-1, 1, 1, 1}) * e;
  }
  auto x_best = ball.project(x + delta);
  delta = x_best - x;
  auto margin = margin_of(x_best, y);
  auto rows_h = torch::arange(H, x.options()).view({1, 1, H, 1}),
       rows_w = torch::arange(W, x.options()).view({1, 1, 1, W});
  const double p0 = ball.norm == Norm::linf ? 0.8 : 0.1;
  for (int i = 0; i < queries - 1; ++i) {
    auto active = margin.gt(0).nonzero().flatten();
    if (active.numel() == 0) break;
    const double p = p_schedule(p0, i, queries);
    const int64_t s = std::clamp<int64_t>(static_cast<int64_t>(std::lround(std::sqrt(p * H * W))),
                                          1, std::min(H, W));
    auto d = draws.index_select(0, active).select(1, i);  // [m, 2 + C]
    auto top = (d.select(1, 0) * static_cast<double>(H - s + 1)).floor().view({-1, 1, 1, 1});
    auto left = (d.select(1, 1) * static_cast<double>(W - s + 1)).floor().view({-1, 1, 1, 1});
    auto window = rows_h.ge(top) & rows_h.lt(top + s) & rows_w.ge(left) &
                  rows_w.lt(left + s);  // [m, 1, H, W]
    auto sign = signs(d.narrow(1, 2, C)).view({-1, C, 1, 1});
    auto ea = e.index_select(0, active);
    auto old = delta.index_select(0, active);
    torch::Tensor cand;
    if (ball.norm == Norm::linf) {
      cand = torch::where(window, sign * ea, old);
    } else {
      auto share = ea * std::sqrt(static_cast<double>(s * s) / static_cast<double>(H * W));
      cand = torch::where(window, sign * share / static_cast<double>(s), old);
      cand = cand / cand.flatten(1).norm(2, 1).clamp_min(1e-12).view({-1, 1, 1, 1}) * ea;
    }
    auto sub = ball.subset(active);
    auto xa = sub.project(sub.x + cand);
    auto ya = y.index_select(0, active);
    auto m =
        on_rows && active.numel() < B ? class_margin(on_rows(active)(xa), ya) : margin_of(xa, ya);
    auto better = m.lt(margin.index_select(0, active));
    auto keep = active.masked_select(better);
    if (keep.numel() == 0) continue;
    auto sel = better.nonzero().flatten();
    x_best.index_copy_(0, keep, xa.index_select(0, sel));
    delta.index_copy_(0, keep, (xa - sub.x).index_select(0, sel));
    margin.index_copy_(0, keep, m.index_select(0, sel));
  }
  auto success = judge(x_best).argmax(1).ne(y);
  return {x_best, success};
}

}  // namespace moecert
