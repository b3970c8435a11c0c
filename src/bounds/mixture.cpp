// The probability-domain pieces of the mixture form (docs/certification.md §13.3),
// shared by certify's forms and certified training of soft / top-k > 1 MoEs: the
// softmax margin bound over a box of logit differences, the router-weight bounds and
// the simplex LP. Tensor ops only, so they are differentiable; in float64 they are
// certify's, in float32 (training) the exponent clamps are lower (never unsound: a
// clamped term only lowers a lower bound or raises an upper one).
#include <torch/torch.h>

#include <limits>

#include "moecert/train_bounds.h"

namespace moecert {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

/// The largest exponent evaluated: exp(700) is finite in float64; float32 stays far
/// from its overflow (88) so that gradients stay finite.
double exponent_cap(const torch::Tensor& t) {
  return t.scalar_type() == torch::kFloat64 ? 700.0 : 30.0;
}

}  // namespace

torch::Tensor softmax_margin_lower(const torch::Tensor& dlo, const torch::Tensor& dhi,
                                   const torch::Tensor& labels) {
  const int64_t K = dlo.size(1);
  auto at_y = torch::nn::functional::one_hot(labels, K).to(torch::kBool);
  const double big = exponent_cap(dlo);  // see the proof for the clamps
  auto elo = torch::exp(dlo.clamp_max(big)).masked_fill(at_y, 0.0);
  auto ehi = torch::exp(dhi.clamp_max(big)).masked_fill(at_y, 0.0);
  auto r_lo = elo.sum(1, true) - elo, r_hi = ehi.sum(1, true) - ehi;  // Σ over j != y, k
  auto num = 1.0 - ehi;
  auto val = torch::where(num.ge(0), num / (1.0 + ehi + r_hi), num / (1.0 + ehi + r_lo));
  val = val - 1e-12 * val.abs() - 1e-300;  // the rounding of exp and of the quotient
  auto hi_over = dhi.ge(big);
  val = torch::where(hi_over, torch::full_like(val, -1.0), val);  // f_y − f_k >= −1
  auto others_over = (hi_over & ~at_y).any(1, true).expand_as(val) & num.ge(0);
  val = torch::where(others_over & ~hi_over, torch::zeros_like(val), val);  // N >= 0: >= 0
  return val.clamp_min(-1.0).masked_fill(at_y, kInf);
}

torch::Tensor simplex_min(const torch::Tensor& a_lo, const torch::Tensor& a_hi,
                          const torch::Tensor& mu) {
  auto [sorted, order] = mu.sort(1);
  auto lo = a_lo.gather(1, order), room = (a_hi - a_lo).clamp_min(0).gather(1, order);
  auto value = (lo * sorted).sum(1), left = (1.0 - lo.sum(1)).clamp_min(0);
  for (int64_t i = 0; i < mu.size(1); ++i) {
    auto add = torch::min(left, room.select(1, i));
    value = value + add * sorted.select(1, i);
    left = left - add;
  }
  // Mass the bounds could not place (only by rounding) goes to the smallest margin.
  value = value + left * sorted.select(1, 0);
  return value - 1e-12 * (a_hi * mu.abs()).sum(1) - 1e-300;
}

std::pair<torch::Tensor, torch::Tensor> router_weight_bounds(const torch::Tensor& diff,
                                                             const torch::Tensor& possible,
                                                             const torch::Tensor& sure) {
  const int64_t E = diff.size(1);
  const double big = exponent_cap(diff);
  auto off = ~torch::eye(E, diff.options().dtype(torch::kBool)).unsqueeze(0);
  // g_j − g_i <= −diff[i, j] =: up[i, j]; >= diff[j, i] =: dn[i, j].
  auto up = -diff, dn = diff.transpose(1, 2);
  auto over_pos = off & possible.unsqueeze(1), over_sure = off & sure.unsqueeze(1);
  // Σ_j e^{t[i, j]} over the mask's j, exponents capped at `big`; and whether one was above it.
  auto masked_sum = [&](const torch::Tensor& t, const torch::Tensor& mask) {
    auto e = torch::where(mask, t.clamp_max(big), torch::full_like(t, -kInf));
    return std::make_pair(torch::exp(e).sum(2), (t.gt(big) & mask).any(2));
  };
  auto [s_lo, capped_lo] = masked_sum(up, over_pos);
  auto [s_hi, capped_hi] = masked_sum(dn, over_sure);
  auto lo = 1.0 / (1.0 + s_lo), hi = 1.0 / (1.0 + s_hi);
  lo = torch::where(capped_lo, torch::zeros_like(lo), lo);                 // a_i >= 0
  hi = torch::where(capped_hi, torch::full_like(hi, std::exp(-big)), hi);  // a_i <= e^{−big}
  lo = torch::where(sure, lo * (1 - 1e-12), torch::zeros_like(lo));
  hi = torch::where(possible, (hi * (1 + 1e-12)).clamp_max(1.0), torch::zeros_like(hi));
  return {lo, hi};
}

}  // namespace moecert
