// softmax over the last dimension (n values): p_i = 1/(1 + Σ_{j≠i} exp(x_j − x_i)).
// IBP; CROWN with p_i between two lines over the row's n inputs (exp and 1/S relaxed
// by tangents and chords, as Shi et al. 2020 decompose softmax); no Jacobian step.
// docs/certification.md §10, §12, §20.
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

/// The interval of p over the box (from bounds()), before outward rounding.
std::pair<torch::Tensor, torch::Tensor> interval(const torch::Tensor& l, const torch::Tensor& u) {
  return {torch::sigmoid(l - logsumexp_others(u)), torch::sigmoid(u - logsumexp_others(l))};
}

/// Lines of every output k of a row over the row's inputs j: for each row of the
/// input (leading dimensions G, n values), p_k >= c_lo_k + Σ_j a_lo[k, j] x_j and
/// p_k <= c_hi_k + Σ_j a_hi[k, j] x_j on the box. a: [..., n, n], c: [..., n].
struct Lines {
  torch::Tensor a_lo, c_lo, a_hi, c_hi;
};

// With z_kj = x_j − x_k ∈ [l_j − u_k, u_j − l_k] and S_k = 1 + Σ_{j≠k} e^{z_kj} ∈ [S_l, S_h]:
// below p_k: e^z <= α z + β (the chord's slope α; β = max over the two ends of e^z − αz,
// valid for any α as e^z is convex), and 1/S >= 2/S₀ − S/S₀² (tangent at S₀, the
// middle of [S_l, S_h]), so p_k >= 2/S₀ − (1 + Σ_j α_j z_kj + β_j)/S₀²;
// above p_k: e^z >= E(1 + z − t) (tangent at t, the middle of z's interval, E = e^t),
// and 1/S <= (S_l + S_h − S)/(S_l S_h) on [S_l, S_h] (the chord), so
// p_k <= (S_l + S_h − 1 − Σ_j E_j(1 + z_kj − t_j))/(S_l S_h).
// The float64 evaluation is covered by widening z's interval, S's, β, the tangent's
// offset and the lines' constants (docs §20). Rows whose lines are farther apart than
// p's interval is wide, or not finite (e^z overflows), keep the interval's constants.
Lines relax(const NodeBounds& x) {
  const auto &l = x.lo, &u = x.hi;
  const int64_t n = l.size(-1);
  const double nn = static_cast<double>(n), u64r = u64;
  auto eye = torch::eye(n, l.options().dtype(torch::kBool));
  auto lj = l.unsqueeze(-2), uj = u.unsqueeze(-2), lk = l.unsqueeze(-1), uk = u.unsqueeze(-1);
  auto zl = (lj - uk) - 2 * u64r * (lj.abs() + uk.abs());
  auto zu = (uj - lk) + 2 * u64r * (uj.abs() + lk.abs());
  // Beyond 300, the lines' arithmetic (S² <= n²e^{2z}, n <= 65536) could overflow:
  // such rows keep the interval.
  auto overflow = zu.gt(300).masked_fill(eye, false).any(-1);
  zl = zl.clamp_max(300), zu = zu.clamp_max(300);
  auto off = [&](const torch::Tensor& t) { return t.masked_fill(eye, 0); };
  auto el = off(torch::exp(zl)), eu = off(torch::exp(zu));
  const double gs = 2 * gamma(nn + 8, u64r);
  auto Sl = (1 + el.sum(-1)) * (1 - gs), Sh = (1 + eu.sum(-1)) * (1 + gs);
  // Chord of e^z: α the slope (e^{z_u} where the interval is too narrow to divide).
  auto w = zu - zl;
  auto narrow = w.le(1e-6 * (1 + zl.abs() + zu.abs()));
  auto alpha =
      off(torch::where(narrow, eu, (eu - el) / torch::where(narrow, torch::ones_like(w), w)));
  auto zm = torch::max(zl.abs(), zu.abs());
  auto beta = off(torch::max(el - alpha * zl, eu - alpha * zu) + 8 * u64r * (eu + alpha * zm));
  // Tangent of e^z at the middle t (its offset lowered for exp's and the products' rounding).
  auto t = (zl + zu) * 0.5;
  auto E = off(torch::exp(t));
  auto tau = off(E * (1 - t) - 8 * u64r * E * (2 + t.abs() + zm));  // e^z >= E z + τ
  // Coefficients over z_kj (j ≠ k) -> over x: a[k, j] = g_kj, a[k, k] = −Σ_j g_kj.
  auto over_x = [&](const torch::Tensor& g) { return g - torch::diag_embed(g.sum(-1)); };
  auto S0 = (Sl + Sh) * 0.5;
  auto S02 = S0 * S0, SlSh = Sl * Sh;
  auto g_lo = -alpha / S02.unsqueeze(-1);
  auto c_lo = 2 / S0 - (1 + beta.sum(-1)) / S02;
  auto g_hi = -E / SlSh.unsqueeze(-1);
  auto c_hi = (Sl + Sh - 1 - tau.sum(-1)) / SlSh;
  // The lines' own rounding (coefficients, sums, quotients): γ_{n+8} of their terms.
  auto M = torch::max(l.abs(), u.abs());
  auto Mk = M.unsqueeze(-1), Mj = M.unsqueeze(-2);
  const double gl = 2 * gamma(nn + 8, u64r);
  auto T_lo = 2 / S0 + (1 + beta.abs().sum(-1) + (alpha * (Mj + Mk)).sum(-1)) / S02;
  auto T_hi = (Sl + Sh + 1 + tau.abs().sum(-1) + (E * (Mj + Mk)).sum(-1)) / SlSh;
  Lines r{over_x(g_lo), c_lo - gl * T_lo, over_x(g_hi), c_hi + gl * T_hi};
  // The constants of p's interval where the lines do worse (or are not finite).
  auto [plo, phi] = interval(l, u);
  auto slack = 1e-10 * (1 + std::get<0>(M.max(-1, true)));
  plo = plo - slack, phi = (phi + slack).clamp_max(1);
  auto da = r.a_hi - r.a_lo;
  auto gap = (torch::max(da * lj, da * uj)).sum(-1) + r.c_hi - r.c_lo;
  auto flat = overflow | ~torch::isfinite(gap) | ~torch::isfinite(S02) | ~torch::isfinite(SlSh) |
              gap.gt(phi - plo);
  auto zero = torch::zeros_like(r.a_lo);
  auto keep = [&](const torch::Tensor& a) {
    return torch::where(flat.unsqueeze(-1), zero, torch::nan_to_num(a, 0, 0, 0));
  };
  return {keep(r.a_lo), torch::where(flat, plo, torch::nan_to_num(r.c_lo, 0, 0, 0)), keep(r.a_hi),
          torch::where(flat, phi, torch::nan_to_num(r.c_hi, 0, 0, 0))};
}

/// Σ_k A⁺_k a_lo[s, k, :] + A⁻_k a_hi[s, k, :] for rows A [R, ..., n] of samples s,
/// one batched product per sample present (the lines are per sample, [B, ..., n, n]).
torch::Tensor through_lines(const Coeffs& c, const torch::Tensor& a_lo, const torch::Tensor& a_hi) {
  const int64_t R = c.A.size(0), n = c.A.size(-1), G = c.A.numel() / std::max<int64_t>(R, 1) / n;
  auto A = c.A.reshape({R, G, n});
  auto lo = a_lo.reshape({a_lo.size(0), G, n, n}), hi = a_hi.reshape({a_hi.size(0), G, n, n});
  std::vector<torch::Tensor> parts, where;
  auto samples = std::get<0>(at::_unique(c.sample)).cpu();
  for (int64_t i = 0; i < samples.numel(); ++i) {
    const int64_t s = samples[i].item<int64_t>();
    auto idx = c.sample.eq(s).nonzero().flatten();
    auto As = A.index_select(0, idx);
    parts.push_back(torch::einsum("rgk,gkj->rgj", {As.clamp_min(0), lo[s]}) +
                    torch::einsum("rgk,gkj->rgj", {As.clamp_max(0), hi[s]}));
    where.push_back(idx);
  }
  if (parts.empty()) return torch::zeros_like(c.A);
  auto order = torch::argsort(torch::cat(where));
  return torch::cat(parts).index_select(0, order).view(c.A.sizes());
}

class SoftmaxRule final : public NoJacobianRule {
 public:
  const char* name() const override { return "softmax"; }
  bool compounds_rounding() const override { return true; }

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
  // logistic function). Magnitude 1 + |x|. float32 (§20): min(½, 2p̄_i)·max e (row i
  // of the Jacobian sums to 2p_i(1 − p_i) in absolute value, p_i <= p̄_i = p_hi + ½ max e
  // on the segment) + 1.05(u/e + p̄_i(17u + u·n/e + γ_{n−1})) + n·2⁻¹²⁵, at most 1.
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    auto [lo, hi] = interval(x.lo, x.hi);
    if (interval_only(x)) return {lo, hi, {}, {}};
    const double n = static_cast<double>(x.lo.size(-1)), u = u32;
    auto E = last_max(x.err32);
    auto pbar = (hi + 0.5 * E).clamp_max(1);
    auto e = E * torch::clamp_max(2 * pbar, 0.5) +
             1.05 * (u / M_E + pbar * (17 * u + u * n / M_E + gamma(n - 1, u))) +
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

  // CROWN: positive coefficients take each p_k's lower line, negative its upper one;
  // the step's own float64 rounding, 2γ_{m+n+4}·Σ_k |A_k|(|c_k| + Σ_j |a_kj| M_j) (m the
  // row's number of outputs, all summed into its constant), is subtracted.
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    if (c.patches) return {};
    const auto& x = *a.in[0];
    const Lines r = relax(x);
    auto pos = c.A.clamp_min(0), neg = c.A.clamp_max(0);
    b = b + row_sum(pos * a.gather(r.c_lo) + neg * a.gather(r.c_hi));
    if (!interval_only(x)) {
      const double n = static_cast<double>(x.lo.size(-1)), m = static_cast<double>(c.A[0].numel());
      auto M = magnitude(x).unsqueeze(-2);
      auto t = torch::max(r.c_lo.abs() + (r.a_lo.abs() * M).sum(-1),
                          r.c_hi.abs() + (r.a_hi.abs() * M).sum(-1));
      b = b - 2 * gamma(m + n + 4, u64) * row_sum(c.A.abs() * a.gather(t));
    }
    Coeffs out = c;
    out.A = through_lines(c, r.a_lo, r.a_hi);
    return {out};
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_softmax_rule() { return std::make_unique<SoftmaxRule>(); }

}  // namespace moecert::rules
