// layernorm over the last dimension (D values): y = γ·n + β, n = d·r, d = x − mean(x)
// (linear), r = 1/sqrt(v + ε), v = mean(d²). IBP; CROWN with n between two lines in d
// over d's interval and r's (the product's corners); no Jacobian step.
// docs/certification.md §10, §12, §20.
#include <cmath>

#include "moecert/error.h"
#include "moecert/functional.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

/// f(c) = mean((l − c)₊² + (c − u)₊²) and f'(c) over the last dimension; c [..., 1].
std::pair<torch::Tensor, torch::Tensor> spread_at(const torch::Tensor& l, const torch::Tensor& u,
                                                  const torch::Tensor& c) {
  auto below = (l - c).clamp_min(0), above = (c - u).clamp_min(0);
  return {(below * below + above * above).mean(-1, true), 2 * (above - below).mean(-1, true)};
}

/// A lower bound of the variance over the box [l, u] (last dimension), [..., 1]:
/// v(x) = min_c mean((x − c)²) >= min_c f(c), f convex with f' <= 0 at min(u) and
/// >= 0 at max(l); bisection brackets its minimiser in [a, b] and the tangent at a,
/// decreasing on [a, b], stays below f there.
torch::Tensor variance_lower(const torch::Tensor& l, const torch::Tensor& u) {
  torch::Tensor a, b;
  {
    torch::NoGradGuard no_grad;
    auto umin = std::get<0>(u.min(-1, true)), lmax = std::get<0>(l.max(-1, true));
    a = torch::min(umin, lmax), b = torch::max(umin, lmax);
    for (int it = 0; it < 60; ++it) {
      auto m = (a + b) * 0.5;
      auto up = spread_at(l.detach(), u.detach(), m).second.ge(0);
      b = torch::where(up, m, b), a = torch::where(up, a, m);
    }
  }
  auto [fa, da] = spread_at(l, u, a);
  auto [fb, db] = spread_at(l, u, b);
  auto v = torch::max(fa + da.clamp_max(0) * (b - a), fb - db.clamp_min(0) * (b - a));
  return (v * (1 - 1e-9)).clamp_min(0);
}

/// Interval of d = x − mean(x) over the box: d_i = (1 − 1/D)x_i − (1/D)Σ_{j≠i} x_j.
std::pair<torch::Tensor, torch::Tensor> deviation(const torch::Tensor& l, const torch::Tensor& u) {
  const double D = static_cast<double>(l.size(-1));
  auto sl = l.sum(-1, true), su = u.sum(-1, true);
  return {l - (sl + (u - l).sum(-1, true) - (u - l)) / D,  // l_i − (Σ_{j≠i} u_j + l_i)/D
          u - (su - (u - l).sum(-1, true) + (u - l)) / D};
}

struct Normalised {
  torch::Tensor lo, hi, vlo, vhi, dl, du;  // n's interval; v's bounds [..., 1]; d's interval
};

/// n = d/sqrt(v + ε) over the box, |n_i| <= sqrt(D − 1) (d_i² <= (D − 1)/D·Σ d_j²).
Normalised normalised(const torch::Tensor& l, const torch::Tensor& u, double eps) {
  const int64_t D = l.size(-1);
  auto [dl, du] = deviation(l, u);
  auto c = (l + u).mean(-1, true) * 0.5;
  auto vhi = torch::max((l - c) * (l - c), (u - c) * (u - c)).mean(-1, true) * (1 + 1e-9);
  auto vlo = variance_lower(l, u);
  auto slo = torch::sqrt(vlo + eps), shi = torch::sqrt(vhi + eps);
  const double cap = std::sqrt(static_cast<double>(D - 1));
  auto lo = torch::where(dl.ge(0), dl / shi, dl / slo).clamp(-cap, cap);
  auto hi = torch::where(du.ge(0), du / slo, du / shi).clamp(-cap, cap);
  return {lo, hi, vlo, vhi, dl, du};
}

/// n = d·r >= a_lo·d + c_lo and <= a_hi·d + c_hi for every d in [dl, du], r in [rl, rh]:
/// the slopes are the chords of min(d·rl, d·rh) (concave in d) and max(d·rl, d·rh)
/// (convex), the intercepts the extremes of d·(r − a) over the four corners (a
/// bilinear function of (d, r) takes them at corners), widened for float64.
struct Lines {
  torch::Tensor a_lo, c_lo, a_hi, c_hi;
};
Lines relax(const NodeBounds& x, double eps) {
  const auto n = normalised(x.lo, x.hi, eps);
  const auto &dl = n.dl, &du = n.du;
  auto rl = 1 / torch::sqrt(n.vhi + eps), rh = 1 / torch::sqrt(n.vlo + eps);
  auto w = du - dl;
  auto wide = w.gt(1e-12 * (dl.abs() + du.abs()));
  auto mid = ((rl + rh) * 0.5).expand_as(dl);
  auto lower = [&](const torch::Tensor& d) { return torch::min(d * rl, d * rh); };
  auto upper = [&](const torch::Tensor& d) { return torch::max(d * rl, d * rh); };
  auto a_lo = torch::where(wide, (lower(du) - lower(dl)) / w.clamp_min(1e-300), mid);
  auto a_hi = torch::where(wide, (upper(du) - upper(dl)) / w.clamp_min(1e-300), mid);
  auto corners = [&](const torch::Tensor& a, bool lower) {
    auto v = torch::stack({dl * (rl - a), dl * (rh - a), du * (rl - a), du * (rh - a)});
    return lower ? std::get<0>(v.min(0)) : std::get<0>(v.max(0));
  };
  auto slack = 1e-12 * (dl.abs() + du.abs()) * (rh + a_lo.abs() + a_hi.abs());
  Lines out{a_lo, corners(a_lo, true) - slack, a_hi, corners(a_hi, false) + slack};
  // Where r's range is wide (v near 0) the lines lie further apart than n's interval
  // is wide (it knows |n| < sqrt(D − 1)): the constant lines n.lo <= n <= n.hi instead.
  auto gap =
      torch::max((out.a_hi - out.a_lo) * dl, (out.a_hi - out.a_lo) * du) + out.c_hi - out.c_lo;
  auto flat = gap.gt(n.hi - n.lo);
  auto zero = torch::zeros_like(dl);
  return {torch::where(flat, zero, out.a_lo), torch::where(flat, n.lo, out.c_lo),
          torch::where(flat, zero, out.a_hi), torch::where(flat, n.hi, out.c_hi)};
}

class LayerNormRule final : public NoJacobianRule {
 public:
  const char* name() const override { return "layernorm"; }
  bool compounds_rounding() const override { return true; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    const Shape& s = in.at(0);
    if (s.empty() || l.weight.dim() != 1 || l.weight.size(0) != s.back() ||
        l.bias.sizes() != l.weight.sizes())
      throw ShapeError::unexpected("certify: input of layernorm '" + l.name + "'",
                                   "[..., " + std::to_string(l.weight.numel()) + "]", s);
    if (!(l.eps > 0))
      throw ShapeError("certify: layernorm '" + l.name + "' has eps " + std::to_string(l.eps) +
                       "; the bounds need eps > 0");
    return s;
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return layer_norm_last(x[0], l.weight, l.bias, l.eps);
  }

  // IBP: n's interval (normalised) times γ, plus β. float32 (§20): the input error
  // through the Jacobian, |γ|(2 + N_i)·max e / sqrt(v_lo + ε) over the box widened by
  // e (N_i >= |n_i| there), plus the rounding of the mean, the deviations, the variance, the
  // square root, the quotient, the product and the sum.
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    const auto n = normalised(x.lo, x.hi, l.eps);
    auto g = l.weight, ag = g.abs(), ab = l.bias.abs();
    auto lo = torch::where(g.ge(0), g * n.lo, g * n.hi) + l.bias;
    auto hi = torch::where(g.ge(0), g * n.hi, g * n.lo) + l.bias;
    if (interval_only(x)) return {lo, hi, {}, {}};
    const int64_t D = x.lo.size(-1);
    const double Dd = static_cast<double>(D), root = std::sqrt(Dd - 1), u = u32;
    auto nmax = torch::max(n.lo.abs(), n.hi.abs());
    auto mag = ag * (nmax + 2 * last_max(magnitude(x)) / torch::sqrt(n.vlo + l.eps)) + ab;

    auto e = x.err32, E = last_max(e);
    const auto w = normalised(x.lo - e, x.hi + e, l.eps);  // over the widened box
    auto sw = torch::sqrt(w.vlo + l.eps);
    // Per coordinate the Jacobian's row sum is at most (2 + |n_i|)/s, |n_i| <= N_i over
    // the widened box; and never more than |γ|·|n_i(x̂) − n_i(x)| <= 2|γ| N_i.
    auto Ni = torch::max(w.lo.abs(), w.hi.abs());
    auto prop = torch::min(ag * (2 + Ni) * E / sw, 2 * Ni * ag);
    auto Mh = last_max(magnitude(x) + e);
    auto a = gamma(Dd + 2, u) * Mh;  // |computed mean − mean|
    auto N = torch::clamp_max(torch::max(w.dl.abs(), w.du.abs()) / sw, root);
    const double gv = gamma(Dd + 3, u);
    const double k1 = (2 * u + u * u) * (1 + gv) + gv;
    auto k2 = 2 * a * u * (2 + u) * (1 + gv), k3 = a * a * (1 + u) * (1 + u) * (1 + gv);
    auto kappa = k1 + k2 / (2 * std::sqrt(l.eps)) + k3 / (w.vlo + l.eps);
    auto safe = kappa.le(0.5);
    auto lambda = (1 + u) / (torch::sqrt(1 - kappa.clamp_max(0.5)) * (1 - 1.51 * u)) - 1;
    auto dn = (a * (1 + u) / sw + u * N) * (1 + lambda) + N * lambda;
    auto round = (1 + 3 * u) * ag * dn + 2.01 * u * ag * N + 1.01 * u * ab;
    auto crude = ag * (N + 1.0001 * (2 * Mh + a) / std::sqrt(l.eps)) * 1.0001 + 2.0001 * ab;
    return {lo, hi, mag, prop + torch::where(safe, round, crude)};
  }

  // CROWN: Σ A·y = Σ (Aγ)·n + A·β; n by its lines (positive coefficients the lower,
  // negative the upper) gives coefficients g over d and constants; and
  // Σ_i g_i d_i = Σ_i (g_i − mean(g)) x_i.
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    if (c.patches) return {};
    const Lines r = relax(*a.in[0], a.layer.eps);
    b = b + row_sum(c.A * a.layer.bias);
    auto An = c.A * a.layer.weight;
    auto pos = An.clamp_min(0), neg = An.clamp_max(0);
    b = b + row_sum(pos * a.gather(r.c_lo) + neg * a.gather(r.c_hi));
    auto g = pos * a.gather(r.a_lo) + neg * a.gather(r.a_hi);
    Coeffs out = c;
    out.A = g - g.mean(-1, true);
    return {out};
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_layernorm_rule() { return std::make_unique<LayerNormRule>(); }

}  // namespace moecert::rules
