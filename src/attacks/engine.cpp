// The projected-step engine of the attack suite: per-sample balls (L∞, L2, the [0,1]
// box), the per-sample seeded sampler, and the losses (CE, DLR, targeted DLR, margin).
#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <limits>

#include "moecert/attack_suite.h"
#include "moecert/error.h"

namespace moecert {

namespace {

/// [B] -> [B, 1, 1, ...] broadcastable over `like`.
torch::Tensor per_sample(const torch::Tensor& v, const torch::Tensor& like) {
  std::vector<int64_t> shape(static_cast<size_t>(like.dim()), 1);
  shape[0] = v.size(0);
  return v.to(like.options()).view(shape);
}

}  // namespace

torch::Tensor AttackBall::project(const torch::Tensor& x_adv) const {
  auto delta = x_adv - x;
  auto e = per_sample(eps, x);
  if (norm == Norm::linf) {
    delta = torch::max(torch::min(delta, e), -e);
  } else {
    auto n = per_sample(delta.flatten(1).norm(2, 1), x);
    delta = delta * torch::clamp_max(e / n.clamp_min(1e-12), 1.0);
  }
  return box ? (x + delta).clamp(0.0, 1.0) : x + delta;
}

torch::Tensor AttackBall::distance(const torch::Tensor& x_adv) const {
  auto d = (x_adv - x).flatten(1);
  return norm == Norm::linf ? d.abs().amax(1) : d.norm(2, 1);
}

AttackBall AttackBall::subset(const torch::Tensor& rows) const {
  auto r = rows.to(x.device());
  return {x.index_select(0, r), eps.index_select(0, r.to(eps.device())), norm, box};
}

namespace {

/// One draw per row, each from the row's own generator (seed, stream).
template <class Draw>
torch::Tensor rows_of(const std::vector<uint64_t>& seeds, const torch::Tensor& like,
                      uint64_t stream, Draw draw) {
  if (static_cast<int64_t>(seeds.size()) != like.size(0))
    throw ShapeError::unexpected("attack sampler", "one seed per sample",
                                 {static_cast<int64_t>(seeds.size())});
  auto shape = like.sizes().vec();
  shape[0] = 1;
  const auto opts = like.options().device(torch::kCPU);
  std::vector<torch::Tensor> rows;
  rows.reserve(seeds.size());
  for (uint64_t s : seeds) {
    auto gen = at::make_generator<at::CPUGeneratorImpl>(s * 1000003ULL + stream * 7919ULL + 17);
    rows.push_back(draw(shape, gen, opts));
  }
  if (rows.empty()) return torch::empty_like(like);
  return torch::cat(rows, 0).to(like.device());
}

}  // namespace

torch::Tensor RowSampler::uniform(const torch::Tensor& like, uint64_t stream) const {
  return rows_of(seeds_, like, stream,
                 [](auto& shape, auto& gen, auto& opts) { return torch::rand(shape, gen, opts); });
}

torch::Tensor RowSampler::normal(const torch::Tensor& like, uint64_t stream) const {
  return rows_of(seeds_, like, stream,
                 [](auto& shape, auto& gen, auto& opts) { return torch::randn(shape, gen, opts); });
}

torch::Tensor RowSampler::start(const AttackBall& ball, uint64_t stream) const {
  auto e = per_sample(ball.eps, ball.x);
  if (ball.norm == Norm::linf) return ball.project(ball.x + (uniform(ball.x, stream) * 2 - 1) * e);
  auto dir = normal(ball.x, stream);
  dir = dir / per_sample(dir.flatten(1).norm(2, 1).clamp_min(1e-12), dir);
  auto radius = uniform(ball.eps.view({-1, 1}), stream + 1).view({-1});
  return ball.project(ball.x + dir * per_sample(radius, dir) * e);
}

RowSampler RowSampler::subset(const torch::Tensor& rows) const {
  auto r = rows.cpu().to(torch::kLong);
  std::vector<uint64_t> out;
  for (int64_t i = 0; i < r.size(0); ++i)
    out.push_back(seeds_.at(static_cast<size_t>(r[i].item<int64_t>())));
  return RowSampler(std::move(out));
}

// −log F_y straight from the log-probabilities, not re-normalised: a top-1 MoE's log F
// carries its router's straight-through weight as a common shift (value 0, gradient of
// the router probability), which a log_softmax here — like every shift-invariant loss
// (DLR, margins) — would cancel from the gradient.
torch::Tensor loss_ce(const torch::Tensor& lp, const torch::Tensor& y) {
  return -lp.gather(1, y.unsqueeze(1)).squeeze(1);
}

torch::Tensor class_margin(const torch::Tensor& lp, const torch::Tensor& y) {
  auto zy = lp.gather(1, y.unsqueeze(1)).squeeze(1);
  auto others = lp.scatter(1, y.unsqueeze(1), -std::numeric_limits<double>::infinity());
  return zy - std::get<0>(others.max(1));
}

// DLR (Croce & Hein 2020, eq. 5): −(z_y − max_{i≠y} z_i) / (z_π1 − z_π3 + 1e-12), with
// π the classes by decreasing logit. Invariant to a shift and a positive scaling of z.
torch::Tensor loss_dlr(const torch::Tensor& lp, const torch::Tensor& y) {
  auto sorted = std::get<0>(lp.sort(1, /*descending=*/true));
  auto scale = sorted.select(1, 0) - sorted.select(1, std::min<int64_t>(2, lp.size(1) - 1));
  return -class_margin(lp, y) / (scale + 1e-12);
}

// Targeted DLR (ibid., eq. 6): −(z_y − z_t) / (z_π1 − (z_π3 + z_π4)/2 + 1e-12).
torch::Tensor loss_dlr_targeted(const torch::Tensor& lp, const torch::Tensor& y,
                                const torch::Tensor& t) {
  auto sorted = std::get<0>(lp.sort(1, /*descending=*/true));
  const int64_t K = lp.size(1);
  auto third = sorted.select(1, std::min<int64_t>(2, K - 1)),
       fourth = sorted.select(1, std::min<int64_t>(3, K - 1));
  auto zy = lp.gather(1, y.unsqueeze(1)).squeeze(1), zt = lp.gather(1, t.unsqueeze(1)).squeeze(1);
  return -(zy - zt) / (sorted.select(1, 0) - (third + fourth) / 2 + 1e-12);
}

}  // namespace moecert
