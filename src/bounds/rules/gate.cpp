// gate: y = δ ⊙ x with δ in [a, b] per sample and unit (a = weight, b = bias,
// [B, *shape]) — a ReLU's derivative in a Jacobian graph (docs/certification.md §16;
// Shi et al., NeurIPS 2022): a = b = 1 on active units, 0 on inactive ones, [0, 1]
// on unstable ones. With x in [l, u], the graph of the relation {(x, δx)} is a
// "bowtie" whose convex hull the two chords below span.
#include "moecert/error.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

/// The two lines of every unit: lower y >= sl·x + tl, upper y <= su·x + tu on [l, u].
struct Lines {
  torch::Tensor sl, tl, su, tu;  // [B, *shape]
};

// max over δ in [a, b] of δ·x is convex in x (a max of lines), min is concave, so on
// [l, u] they lie below / above their chords:
//   upper  through (l, max(al, bl)) and (u, max(au, bu));
//   lower  through (l, min(al, bl)) and (u, min(au, bu)).
// A unit with a = b is exact: y = a·x. The chords are computed in float64; their
// intercepts move outward by 4u(|s|(|l| + |u|) + |y(l)| + |y(u)|), which covers the
// rounding of the slope and of the intercept, so the lines stay valid on [l, u].
Lines chords(const Layer& g, const NodeBounds& x) {
  auto a = g.weight, b = g.bias, l = x.lo, u = x.hi;
  auto width = (u - l).clamp_min(1e-300);
  auto lo_l = torch::min(a * l, b * l), lo_u = torch::min(a * u, b * u);
  auto hi_l = torch::max(a * l, b * l), hi_u = torch::max(a * u, b * u);
  auto exact = a.eq(b);
  auto line = [&](const torch::Tensor& yl, const torch::Tensor& yu, double side) {
    auto s = torch::where(exact, a, (yu - yl) / width);
    auto slack = 4 * u64 * (s.abs() * (l.abs() + u.abs()) + yl.abs() + yu.abs());
    auto t = torch::where(exact, torch::zeros_like(s), yl - s * l + side * slack);
    return std::pair{s, t};
  };
  auto [sl, tl] = line(lo_l, lo_u, -1.0);
  auto [su, tu] = line(hi_l, hi_u, 1.0);
  return {sl, tl, su, tu};
}

void check_gate(const Layer& g, const Shape& in) {
  if (!g.weight.defined() || !g.bias.defined() || g.weight.sizes() != g.bias.sizes() ||
      g.weight.dim() != static_cast<int64_t>(in.size()) + 1 ||
      !std::equal(in.begin(), in.end(), g.weight.sizes().begin() + 1))
    throw ShapeError::unexpected("certify: input of gate '" + g.name + "'", "the gate's [*shape]",
                                 in);
}

class GateRule final : public BoundRule {
 public:
  const char* name() const override { return "gate"; }
  bool relaxed() const override { return true; }

  // Only the units with δ free and x of either sign are relaxed: elsewhere the two
  // chords are the exact hull whatever [l, u] is.
  torch::Tensor relaxed_units(const Layer& l, const NodeBounds& in) const override {
    return l.weight.ne(l.bias) & in.lo.lt(0) & in.hi.gt(0);
  }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    check_gate(l, in.at(0));
    return in.at(0);
  }

  // One member of the relation: δ at the midpoint of [a, b].
  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return x[0] * ((l.weight + l.bias) * 0.5).to(x[0].dtype());
  }

  // IBP: the product of intervals [a, b]·[l, u] spans its four corner products.
  // Magnitude: 2·max(|a|, |b|)·M covers the chords' products and intercepts. The graph
  // is not a float32 model: no float32 error (0).
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    auto p1 = l.weight * x.lo, p2 = l.weight * x.hi, p3 = l.bias * x.lo, p4 = l.bias * x.hi;
    auto lo = torch::min(torch::min(p1, p2), torch::min(p3, p4));
    auto hi = torch::max(torch::max(p1, p2), torch::max(p3, p4));
    if (interval_only(x)) return {lo, hi, {}, {}};
    auto d = torch::max(l.weight.abs(), l.bias.abs());
    return {lo, hi, 2 * d * magnitude(x), torch::zeros_like(lo)};
  }

  // CROWN lower bound of Σ A·y: positive coefficients take the lower chord, negative
  // ones the upper: A_in = A⁺ sl + A⁻ su, b += Σ (A⁺ tl + A⁻ tu).
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    const Lines r = chords(a.layer, *a.in[0]);
    auto pos = c.A.clamp_min(0), neg = c.A.clamp_max(0);
    b = b + row_sum(pos * a.gather(r.tl) + neg * a.gather(r.tu));
    Coeffs out = c;
    out.A = pos * a.gather(r.sl) + neg * a.gather(r.su);
    return {out};
  }

  // Coordinate-wise max(|a|, |b|)-Lipschitz.
  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    return torch::max(l.weight.abs(), l.bias.abs()).max().item<double>() * k.at(0);
  }

  // Jacobian rows: ∂y/∂x = δ in [a, b]; the product of intervals δ·[c − r, c + r].
  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    auto da = a.gather(a.layer.weight), db = a.gather(a.layer.bias);
    auto lo = j.c - j.r, hi = j.c + j.r;
    auto p1 = da * lo, p2 = da * hi, p3 = db * lo, p4 = db * hi;
    auto mn = torch::min(torch::min(p1, p2), torch::min(p3, p4));
    auto mx = torch::max(torch::max(p1, p2), torch::max(p3, p4));
    return {{(mn + mx) * 0.5, (mx - mn) * 0.5}};
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_gate_rule() { return std::make_unique<GateRule>(); }

}  // namespace moecert::rules
