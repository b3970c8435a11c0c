// The two bilinear products of multi-head self-attention, with D = heads·d columns,
// head h = columns [h·d, (h+1)·d):
//   attn_scores (q, k [N, D]) -> S [heads, N, N], S_h = s·q_h k_hᵀ (s the scale);
//   attn_mix (p [heads, N, N], v [N, D]) -> [N, D], p_h v_h side by side.
// IBP: the midpoint-radius product of Rump. CROWN: each product of two bounded
// quantities between McCormick's planes (as auto_LiRPA's bilinear product and Shi et
// al. 2020 relax it). No Jacobian step. docs/certification.md §10, §12, §20.
#include <limits>

#include "moecert/error.h"
#include "moecert/functional.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

/// Interval matrix product [a]·[b] with a, b given as per-sample tensors laid out for
/// matmul: midpoint a_c b_c, radius |a_c| b_r + a_r |b_c| + a_r b_r (each term's
/// product is enclosed, and sums of enclosures enclose the sum).
std::pair<torch::Tensor, torch::Tensor> interval_matmul(const torch::Tensor& alo,
                                                        const torch::Tensor& ahi,
                                                        const torch::Tensor& blo,
                                                        const torch::Tensor& bhi) {
  auto ac = (alo + ahi) * 0.5, ar = (ahi - alo) * 0.5, bc = (blo + bhi) * 0.5,
       br = (bhi - blo) * 0.5;
  auto c = torch::matmul(ac, bc);
  auto r = torch::matmul(ac.abs(), br) + torch::matmul(ar, bc.abs() + br);
  return {c - r, c + r};
}

/// float32 error of a product of n-term sums a·b (a, b with magnitudes M and errors e):
/// e_a (M_b + e_b) + M_a e_b summed, plus γ_{n+1}·Σ(M_a + e_a)(M_b + e_b) for the
/// rounded products and sum (any order; the +1 covers the scale's product).
torch::Tensor product_err(const torch::Tensor& ma, const torch::Tensor& ea, const torch::Tensor& mb,
                          const torch::Tensor& eb, int64_t n) {
  return torch::matmul(ea, mb + eb) + torch::matmul(ma, eb) +
         gamma(static_cast<double>(n) + 1, u32) * torch::matmul(ma + ea, mb + eb);
}

/// The planes of a product x·y over x ∈ [x_l, x_u], y ∈ [y_l, y_u] (McCormick):
///   x·y >= y_l·x + x_l·y − x_l·y_l   ((x − x_l)(y − y_l) >= 0),
///   x·y <= y_u·x + x_l·y − x_l·y_u   ((x − x_l)(y_u − y) >= 0).
/// A row's positive coefficients take the lower plane, negative ones the upper: the
/// coefficient of x is y_l or y_u by the sign, that of y is x_l either way.
/// The step's float64 rounding: every product term |A|·(|y_·||x| + |x_l||y| + |x_l y_·|) is
/// at most 3|A|·M_x M_y, and the nested sums (an inner product, then the row's sum)
/// have `len` terms in all: γ_{len+4} of 3 Σ|A|·mag (docs §20).
torch::Tensor rounding(const Coeffs& c, const torch::Tensor& mag, int64_t len) {
  return 3 * gamma(static_cast<double>(len) + 4, u64) *
         row_sum(c.A.abs() * mag.index_select(0, c.sample));
}

class AttnScoresRule final : public NoJacobianRule {
 public:
  const char* name() const override { return "attn_scores"; }
  bool compounds_rounding() const override { return true; }
  int arity() const override { return 2; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    if (in.size() != 2 || in[0].size() != 2 || in[0] != in[1] || l.heads < 1 ||
        in[0][1] % l.heads != 0 || !(l.scale > 0))
      throw ShapeError::unexpected("certify: inputs of attn_scores '" + l.name + "' (" +
                                       std::to_string(l.heads) + " heads, scale " +
                                       std::to_string(l.scale) + ")",
                                   "q and k of one shape [N, D], D a multiple of the heads, "
                                   "a positive scale",
                                   in.at(0));
    return {l.heads, in[0][0], in[0][0]};
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return attention_scores(x[0], x[1], l.heads, l.scale);
  }

  // IBP: s·[q_h][k_h]ᵀ (s > 0). Magnitude s·M_q M_kᵀ. float32 (§20): s·product_err.
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto &q = *in[0], &k = *in[1];
    auto h = [&](const torch::Tensor& t) { return split_heads(t, l.heads); };
    auto ht = [&](const torch::Tensor& t) { return split_heads(t, l.heads).transpose(-2, -1); };
    auto [lo, hi] = interval_matmul(h(q.lo), h(q.hi), ht(k.lo), ht(k.hi));
    lo = lo * l.scale, hi = hi * l.scale;
    if (interval_only(q) || interval_only(k)) return {lo, hi, {}, {}};
    auto mq = h(magnitude(q)), mk = ht(magnitude(k));
    auto mag = torch::matmul(mq, mk) * l.scale;
    auto e = product_err(mq, h(q.err32), mk, ht(k.err32), q.lo.size(-1) / l.heads) * l.scale;
    return {lo, hi, mag, e};
  }

  // CROWN, per head h and row A [N, N] over S_h = s·Σ_t q_it k_jt (x = q, y = k):
  // over q: s(A⁺ k_l + A⁻ k_u); over k: s·Aᵀ q_l; constant −s Σ A⁺∘(q_l k_lᵀ) + A⁻∘(q_l k_uᵀ).
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    if (c.patches) return {};
    const auto &q = *a.in[0], &k = *a.in[1];
    const int64_t H = a.layer.heads;
    auto rows = [&](const torch::Tensor& t) {  // [B, N, D] -> per row [R, H, N, d]
      return split_heads(t.index_select(0, c.sample), H);
    };
    auto ql = rows(q.lo), kl = rows(k.lo), ku = rows(k.hi);
    auto pos = c.A.clamp_min(0) * a.layer.scale, neg = c.A.clamp_max(0) * a.layer.scale;
    auto A = c.A * a.layer.scale;
    b = b - row_sum(pos * torch::matmul(ql, kl.transpose(-2, -1)) +
                    neg * torch::matmul(ql, ku.transpose(-2, -1)));
    if (!interval_only(q) && !interval_only(k))
      b = b - rounding(c,
                       torch::matmul(split_heads(magnitude(q), H),
                                     split_heads(magnitude(k), H).transpose(-2, -1)) *
                           a.layer.scale,
                       q.lo.size(-1) / H + H * q.lo.size(1) * q.lo.size(1) + q.lo.size(1));
    Coeffs over_q = c, over_k = c;
    over_q.A = merge_heads(torch::matmul(pos, kl) + torch::matmul(neg, ku));
    over_k.A = merge_heads(torch::matmul(A.transpose(-2, -1), ql));
    return {over_q, over_k};
  }
};

class AttnMixRule final : public NoJacobianRule {
 public:
  const char* name() const override { return "attn_mix"; }
  bool compounds_rounding() const override { return true; }
  int arity() const override { return 2; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    const bool ok = in.size() == 2 && in[0].size() == 3 && in[1].size() == 2 &&
                    in[0][0] == l.heads && in[0][1] == in[1][0] && in[0][2] == in[1][0] &&
                    in[1][1] % l.heads == 0;
    if (!ok)
      throw ShapeError::unexpected(
          "certify: inputs of attn_mix '" + l.name + "' (" + std::to_string(l.heads) + " heads)",
          "p [heads, N, N] and v [N, D], D a multiple of the heads",
          in.size() > 1 ? in[1] : Shape{});
    return in[1];
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return attention_mix(x[0], x[1], l.heads);
  }

  // IBP: [p_h][v_h] per head. float32 (§20): product_err over N terms.
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto &p = *in[0], &v = *in[1];
    auto h = [&](const torch::Tensor& t) { return split_heads(t, l.heads); };
    auto [lo, hi] = interval_matmul(p.lo, p.hi, h(v.lo), h(v.hi));
    if (interval_only(p) || interval_only(v)) return {merge_heads(lo), merge_heads(hi), {}, {}};
    auto mp = magnitude(p), mv = h(magnitude(v));
    auto mag = torch::matmul(mp, mv);
    auto e = product_err(mp, p.err32, mv, h(v.err32), v.lo.size(1));
    return {merge_heads(lo), merge_heads(hi), merge_heads(mag), merge_heads(e)};
  }

  // CROWN, per head h and row A [N, d] over O_h = p_h v_h (x = p, y = v):
  // over p: A⁺ v_lᵀ + A⁻ v_uᵀ; over v: p_lᵀ A; constant −Σ A⁺∘(p_l v_l) + A⁻∘(p_l v_u).
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    if (c.patches) return {};
    const auto &p = *a.in[0], &v = *a.in[1];
    const int64_t H = a.layer.heads;
    auto pl = p.lo.index_select(0, c.sample);  // [R, H, N, N]
    auto vl = split_heads(v.lo.index_select(0, c.sample), H),
         vu = split_heads(v.hi.index_select(0, c.sample), H);
    auto A = split_heads(c.A, H), pos = A.clamp_min(0), neg = A.clamp_max(0);
    b = b - row_sum(pos * torch::matmul(pl, vl) + neg * torch::matmul(pl, vu));
    if (!interval_only(p) && !interval_only(v))
      b = b - rounding(c, merge_heads(torch::matmul(magnitude(p), split_heads(magnitude(v), H))),
                       2 * v.lo.size(1) + v.lo.size(1) * v.lo.size(2));
    Coeffs over_p = c, over_v = c;
    over_p.A = torch::matmul(pos, vl.transpose(-2, -1)) + torch::matmul(neg, vu.transpose(-2, -1));
    over_v.A = merge_heads(torch::matmul(pl.transpose(-2, -1), A));
    return {over_p, over_v};
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_attn_scores_rule() { return std::make_unique<AttnScoresRule>(); }
std::unique_ptr<BoundRule> make_attn_mix_rule() { return std::make_unique<AttnMixRule>(); }

}  // namespace moecert::rules
