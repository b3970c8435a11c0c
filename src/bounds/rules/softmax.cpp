// softmax over the last dimension (n values): p_i = 1/(1 + Σ_{j≠i} exp(x_j − x_i)).
// Interval bounds only (IBP); CROWN concretises its rows at this node's interval and
// names it. docs/certification.md §10, §12, §20.
#include <cmath>

#include "moecert/error.h"
#include "moecert/functional.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

/// log Σ_{j≠i} exp(x_j) for every i of the last dimension, without cancellation: for
/// i other than the row's argmax m the sum keeps the term exp(x_m) >= every other, so
/// removing term i loses at most a factor 1 − 1/n of accuracy; for i = m it is summed
/// directly, shifted by the second largest value. −∞ when n = 1.
torch::Tensor logsumexp_others(const torch::Tensor& x) {
  const int64_t n = x.size(-1);
  if (n == 1) return torch::full_like(x, -std::numeric_limits<double>::infinity());
  auto [m1, am] = x.max(-1, true);
  auto is_max = torch::zeros_like(x, torch::kBool).scatter_(-1, am, true);
  auto rest = x.masked_fill(is_max, -std::numeric_limits<double>::infinity());
  auto m2 = std::get<0>(rest.max(-1, true));
  auto s1 = torch::exp(x - m1).sum(-1, true);
  auto others = m1 + torch::log(s1 - torch::exp(x - m1));
  auto of_max = m2 + torch::log(torch::exp(rest - m2).sum(-1, true));
  return torch::where(is_max, of_max.expand_as(x), others);
}

class SoftmaxRule final : public IntervalOnlyRule {
 public:
  const char* name() const override { return "softmax"; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    const Shape& s = in.at(0);
    if (s.empty() || s.back() > 65536)
      throw ShapeError::unexpected("certify: input of softmax '" + l.name + "'",
                                   "[..., n] with n <= 65536", s);
    return s;
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return softmax_last(x[0]);
  }

  // IBP: p_i is increasing in x_i and decreasing in every other x_j, so
  // p_i >= σ(l_i − log Σ_{j≠i} e^{u_j}) and <= σ(u_i − log Σ_{j≠i} e^{l_j}) (σ the
  // logistic function). Magnitude 1 + |x|. float32 (§20): ½·max e (the Jacobian's
  // rows sum to 2p_i(1 − p_i) <= ½) + 1.05(u/e + p̄_i(17u + u·n/e + γ_{n−1})) + n·2⁻¹²⁵,
  // at most 1.
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    auto lo = torch::sigmoid(x.lo - logsumexp_others(x.hi));
    auto hi = torch::sigmoid(x.hi - logsumexp_others(x.lo));
    if (interval_only(x)) return {lo, hi, {}, {}};
    const double n = static_cast<double>(x.lo.size(-1)), u = u32;
    auto half = 0.5 * last_max(x.err32);
    auto pbar = (hi + half).clamp_max(1);
    auto e = half + 1.05 * (u / M_E + pbar * (17 * u + u * n / M_E + gamma(n - 1, u))) +
             n * std::ldexp(1.0, -125);
    // Both values lie in [0, 1] (the float32 quotient of z <= S rounds to at most 1).
    return {lo, hi, 1 + magnitude(x), e.clamp_max(1)};
  }

  // The Jacobian diag(p) − ppᵀ is symmetric with rows summing in absolute value to
  // 2p_i(1 − p_i) <= ½: ‖J‖_∞ <= ½ and ‖J‖_2 <= ½ (Gershgorin), per row of n.
  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    return 0.5 * k.at(0);
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_softmax_rule() { return std::make_unique<SoftmaxRule>(); }

}  // namespace moecert::rules
