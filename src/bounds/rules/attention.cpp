// The two bilinear products of multi-head self-attention, with D = heads·d columns,
// head h = columns [h·d, (h+1)·d):
//   attn_scores (q, k [N, D]) -> S [heads, N, N], S_h = s·q_h k_hᵀ (s the scale);
//   attn_mix (p [heads, N, N], v [N, D]) -> [N, D], p_h v_h side by side.
// Interval bounds only (IBP, the midpoint-radius product of Rump); CROWN concretises
// their rows at the node's interval and names them. docs/certification.md §10, §12, §20.
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

class AttnScoresRule final : public IntervalOnlyRule {
 public:
  const char* name() const override { return "attn_scores"; }
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
};

class AttnMixRule final : public IntervalOnlyRule {
 public:
  const char* name() const override { return "attn_mix"; }
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
};

}  // namespace

std::unique_ptr<BoundRule> make_attn_scores_rule() { return std::make_unique<AttnScoresRule>(); }
std::unique_ptr<BoundRule> make_attn_mix_rule() { return std::make_unique<AttnMixRule>(); }

}  // namespace moecert::rules
