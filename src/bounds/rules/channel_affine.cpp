// channel_affine: y[c] = s[c]·x[c] + t[c] — the input normalisation and eval-mode
// BatchNorm (s = γ/sqrt(σ² + eps), t = β − μ s). docs/certification.md §1, §10.
#include "moecert/error.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

class ChannelAffineRule final : public BoundRule {
 public:
  const char* name() const override { return "channel_affine"; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    const Shape& s = in.at(0);
    const Shape channels{s.empty() ? 0 : s[0]};
    for (const auto* t : {&l.weight, &l.bias, &l.shift_terms})
      if (t->defined() && t->sizes().vec() != channels)
        throw ShapeError::unexpected("certify: scale, shift or shift terms of channel_affine '" +
                                         l.name + "' on input " + shape_str(s),
                                     shape_str(channels), t->sizes().vec());
    return s;
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    const int64_t d = x[0].dim();
    return x[0] * channel_view(l.weight, d) + channel_view(l.bias, d);
  }

  // IBP: the image of a box under a diagonal map is the box c' = s c + t, r' = |s| r.
  // Magnitude: |s|·M + |t| (M = max(|lo|, |hi|)).
  // float32: the model computes (x − μ)/σ, or x·ŝ + t̂ with ŝ, t̂ rounded from the
  // BatchNorm parameters: |ŷ − y| <= |s| e + γ_8 (|s| (M + e) + T), T = shift_terms
  // (|β| + |μ s|) or |t|.
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    const int64_t d = x.lo.dim();
    auto s = channel_view(l.weight, d), t = channel_view(l.bias, d);
    auto terms = channel_view(l.shift_terms.defined() ? l.shift_terms : l.bias.abs(), d);
    auto c = (x.lo + x.hi) * 0.5, r = (x.hi - x.lo) * 0.5;
    auto cy = c * s + t, ry = r * s.abs();
    if (interval_only(x)) return {cy - ry, cy + ry, {}, {}};
    NodeBounds y{cy - ry, cy + ry, magnitude(x) * s.abs() + t.abs(), {}};
    y.err32 = x.err32 * s.abs() + gamma(8, u32) * ((magnitude(x) + x.err32) * s.abs() + terms);
    return y;
  }

  // CROWN: Σ A·y = Σ (A s)·x + Σ A t, exactly: A_in = A ⊙ s per channel, b += Σ A t.
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    const int64_t d = c.A.dim();
    Coeffs out = c;
    out.A = c.A * channel_view(a.layer.weight, d);
    b = b + row_sum(c.A * channel_view(a.layer.bias, d));
    return {out};
  }

  // ‖diag(s)‖_{p->p} = max |s| for p = ∞ and 2 (the ∞ target of a last layer too).
  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    return l.weight.abs().max().item<double>() * k.at(0);
  }

  // Jacobian rows through a diagonal map: c' = c s, r' = r |s|.
  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    auto s = channel_view(a.layer.weight, j.c.dim());
    return {{j.c * s, j.r * s.abs()}};
  }

  // Derivative: the per-channel scale without the shift.
  std::optional<Layer> derivative(const Layer& l, const DerivativeArgs&) const override {
    return Layer::affine(l.name, l.weight, torch::zeros_like(l.bias));
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_channel_affine_rule() {
  return std::make_unique<ChannelAffineRule>();
}

}  // namespace moecert::rules
