// gelu: y = x·Φ(x) = (x/2)(1 + erf(x/√2)), elementwise. Not monotone (minimum
// −0.16997 at x = −0.7518), derivative g'(x) = Φ(x) + xφ(x) in [−0.1290, 1.1290]
// (extremes at ∓√2), |g''| = φ(x)|2 − x²| <= 2φ(0) < 0.8. docs/certification.md §10, §12, §20.
#include <cmath>

#include "moecert/functional.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

constexpr double kMinValue = -0.17;                        // < min g = −0.169971
constexpr double kMinAt = -0.7517915;                      // argmin g
constexpr double kSlopeMin = -0.1290, kSlopeMax = 1.1290;  // enclose g' (±0.1289041 + 1)
constexpr int kSamples = 33;                               // relaxation samples per unit

torch::Tensor gelu_slope(const torch::Tensor& x) {
  return 0.5 * (1 + torch::erf(x * M_SQRT1_2)) + x * torch::exp(-0.5 * x * x) / std::sqrt(2 * M_PI);
}

/// Interval of g' over [l, u]: g' falls on (−∞, −√2], rises on [−√2, √2], falls after.
std::pair<torch::Tensor, torch::Tensor> slope_range(const torch::Tensor& l,
                                                    const torch::Tensor& u) {
  auto sl = gelu_slope(l), su = gelu_slope(u);
  auto lo = torch::min(sl, su), hi = torch::max(sl, su);
  lo = torch::where(l.le(-M_SQRT2) & u.ge(-M_SQRT2), torch::full_like(lo, kSlopeMin), lo);
  hi = torch::where(l.le(M_SQRT2) & u.ge(M_SQRT2), torch::full_like(hi, kSlopeMax), hi);
  return {lo - 1e-12, hi + 1e-12};
}

/// The relaxation k·x + lo <= g(x) <= k·x + hi on [l, u], k the chord's slope: the
/// offsets h = g − k·x sampled at 33 points, widened by the interpolation error
/// max|h''|Δ²/8 <= 0.1Δ² and the float64 evaluation (1e-12 (1 + |x|)(1 + |k|)).
struct Relaxation {
  torch::Tensor k, lo, hi;
};
Relaxation relax(const NodeBounds& x) {
  auto l = x.lo, u = x.hi, w = u - l;
  auto k = torch::where(w.gt(0), (gelu_erf(u) - gelu_erf(l)) / w.clamp_min(1e-300),
                        torch::zeros_like(w));
  auto s = torch::linspace(0, 1, kSamples, l.options());
  auto t = l.unsqueeze(-1) + w.unsqueeze(-1) * s;  // [..., 33]
  auto h = gelu_erf(t) - k.unsqueeze(-1) * t;
  auto delta = w / (kSamples - 1);
  auto slack = 0.1 * delta * delta + 1e-12 * (1 + torch::max(l.abs(), u.abs())) * (1 + k.abs());
  return {k, std::get<0>(h.min(-1)) - slack, std::get<0>(h.max(-1)) + slack};
}

class GeluRule final : public BoundRule {
 public:
  const char* name() const override { return "gelu"; }
  bool relaxed() const override { return true; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override { return in.at(0); }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return gelu_erf(x[0]);
  }

  // IBP: the maximum of g on [l, u] is at an end; the minimum at an end or at the
  // global minimiser. Magnitude |x| + 1. float32 (§20): 1.13·e + 6.1u(M + e) + 0.61u.
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    auto gl = gelu_erf(x.lo), gu = gelu_erf(x.hi);
    auto inside = x.lo.le(kMinAt) & x.hi.ge(kMinAt);
    auto lo = torch::where(inside, torch::full_like(gl, kMinValue), torch::min(gl, gu));
    auto hi = torch::max(gl, gu);
    if (interval_only(x)) return {lo, hi, {}, {}};
    auto m = magnitude(x);
    return {lo, hi, m + 1, 1.13 * x.err32 + 6.1 * u32 * (m + x.err32) + 0.61 * u32 + 1e-40};
  }

  // CROWN: positive coefficients take the lower line, negative ones the upper line:
  // A_in = A·k, b += Σ A⁺·lo + A⁻·hi.
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    const Relaxation r = relax(*a.in[0]);
    Coeffs out = c;
    b = b + row_sum(c.A.clamp_min(0) * a.gather(r.lo) + c.A.clamp_max(0) * a.gather(r.hi));
    out.A = c.A * a.gather(r.k);
    return {out};
  }

  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    return 1.13 * k.at(0);  // coordinate-wise, |g'| <= 1.1290
  }

  // Jacobian rows: each entry times g' somewhere in its interval over the region.
  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    auto [lo, hi] = slope_range(a.in[0]->lo, a.in[0]->hi);
    return {interval_scale(j, a.gather(lo), a.gather(hi))};
  }

  // Derivative: the gate δ ⊙ s with δ in g'([l, u]).
  std::optional<Layer> derivative(const Layer& l, const DerivativeArgs& a) const override {
    auto [lo, hi] = slope_range(a.input.lo, a.input.hi);
    return Layer::gate(l.name, lo, hi);
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_gelu_rule() { return std::make_unique<GeluRule>(); }

}  // namespace moecert::rules
