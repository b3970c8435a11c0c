// relu: y = max(x, 0), with x in [l, u] over the region. The linear relaxation of
// CROWN (Zhang et al., NeurIPS 2018) and α-CROWN (Xu et al., ICLR 2021).
// docs/certification.md §3, §10, §11.
#include "../kernels.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

/// The relaxation of every unit of a sample: y >= low·x, y <= up·x + icpt.
struct Relaxation {
  torch::Tensor unstable, active, low, up, icpt;  // [B, *shape]
};

// active (l >= 0): y = x;  inactive (u <= 0): y = 0;  unstable (l < 0 < u):
//   lower  y >= α x for any α in [0, 1]; CROWN's adaptive choice α = 1 if u >= −l else 0
//   upper  y <= s x + t, s = u / (u − l), t = −l s: the chord through (l, 0) and (u, u).
// The chord is computed in float64; its intercept is raised by 4u(|l| s + u), which
// covers the rounding of s and t, so the line stays above relu on [l, u] (relu_chord).
Relaxation relax(const NodeBounds& x) {
  auto l = x.lo, u = x.hi;
  Relaxation r;
  r.active = l.ge(0);
  r.unstable = l.lt(0) & u.gt(0);
  auto ones = torch::ones_like(l), zeros = torch::zeros_like(l);
  auto [s, t] = bp::relu_chord(l, u);
  r.up = torch::where(r.active, ones, s);
  r.icpt = t;
  r.low = torch::where(r.active, ones, torch::where(r.unstable & u.ge(-l), ones, zeros));
  return r;
}

class ReluRule final : public BoundRule {
 public:
  const char* name() const override { return "relu"; }
  bool relaxed() const override { return true; }

  torch::Tensor alpha_init(const Layer& l, const NodeBounds& in) const override {
    return relax(in).low;
  }

  // Only unstable units (l < 0 < u) are relaxed; the others are exact whatever l, u are.
  torch::Tensor relaxed_units(const Layer& l, const NodeBounds& in) const override {
    return in.lo.lt(0) & in.hi.gt(0);
  }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override { return in.at(0); }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return torch::relu(x[0]);
  }

  // IBP: relu is monotone, [relu(l), relu(u)]. Magnitude 2·M covers the relaxation's
  // products and intercepts. float32: relu is exact and 1-Lipschitz, so e' = e.
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    if (interval_only(x)) return {torch::relu(x.lo), torch::relu(x.hi), {}, {}};
    return {torch::relu(x.lo), torch::relu(x.hi), 2 * magnitude(x), x.err32};
  }

  // CROWN lower bound of Σ A·y: positive coefficients take the lower line, negative
  // ones the upper line: A_in = A⁺ λ + A⁻ s, b += Σ A⁻ t (λ = α with α-CROWN).
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    const Relaxation r = relax(*a.in[0]);
    Coeffs out = c;
    if (!a.alpha.defined() && bp::rows_fusable(c)) {  // the same arithmetic in one pass
      auto [coef, icpt] = bp::rows_relu(c, r.low, r.up, r.icpt);
      out.A = coef, b = b + icpt;
      return {out};
    }
    auto low = a.gather(r.low);
    if (a.alpha.defined())
      low = torch::where(a.gather(r.unstable.to(r.low.dtype())).gt(0), a.alpha, low);
    auto pos = c.A.clamp_min(0), neg = c.A.clamp_max(0);
    b = b + row_sum(neg * a.gather(r.icpt));
    out.A = pos * low + neg * a.gather(r.up);
    return {out};
  }

  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    return k.at(0);  // coordinate-wise 1-Lipschitz
  }

  // Jacobian rows: relu'(x) is 1 on active units, 0 on inactive ones and somewhere
  // in [0, 1] on unstable ones, where the interval [lo, hi] of a row entry becomes
  // [min(lo, 0), max(hi, 0)] (it contains d·v for every d in [0, 1], v in [lo, hi]).
  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    const auto& x = *a.in[0];
    auto on = a.gather(x.lo.ge(0).to(x.lo.dtype())).gt(0);
    auto unknown = a.gather((x.lo.lt(0) & x.hi.gt(0)).to(x.lo.dtype())).gt(0);
    auto lo = (j.c - j.r).clamp_max(0.0), hi = (j.c + j.r).clamp_min(0.0);
    auto cu = (lo + hi) * 0.5, ru = (hi - lo) * 0.5;
    auto zero = torch::zeros_like(cu);
    return {{torch::where(on, j.c, torch::where(unknown, cu, zero)),
             torch::where(on, j.r, torch::where(unknown, ru, zero))}};
  }

  // Derivative: the gate δ ⊙ s with relu' over the region: 1 where the input is >= 0
  // throughout (relu is the identity there), 0 where it is <= 0, anything in [0, 1]
  // elsewhere (Clarke).
  std::optional<Layer> derivative(const Layer& l, const DerivativeArgs& a) const override {
    const NodeBounds& x = a.input;
    auto on = (x.lo.ge(0) & x.hi.gt(0)).to(x.lo.dtype()), may = x.hi.gt(0).to(x.lo.dtype());
    return Layer::gate(l.name, on, may);
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_relu_rule() { return std::make_unique<ReluRule>(); }

}  // namespace moecert::rules
