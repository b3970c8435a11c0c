// Per-sample certified radii (SPEC §4.2-4.4): Theorem 5.4 (paper and tight forms,
// top-k routing stability, top-1 candidate experts), the dense margin bound, and
// Theorem 5.5 for a dual-model. The final arithmetic of every radius runs in
// Boost.Interval with outward rounding and takes the lower end, after reducing
// each margin by defaults::margin_allowance: the printed radius never exceeds the
// exact-real value of the formula. Proofs: docs/certification.md.
#include <algorithm>
#include <boost/numeric/interval.hpp>
#include <cmath>
#include <limits>
#include <numeric>

#include "moecert/certify.h"
#include "moecert/defaults.h"
#include "moecert/error.h"

namespace moecert {
namespace {

using I = boost::numeric::interval<double>;
constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double kNaN = std::numeric_limits<double>::quiet_NaN();

std::vector<double> softmax(const std::vector<double>& z) {
  const double m = *std::max_element(z.begin(), z.end());
  std::vector<double> e(z.size());
  double s = 0;
  for (size_t i = 0; i < z.size(); ++i) s += (e[i] = std::exp(z[i] - m));
  for (auto& v : e) v /= s;
  return e;
}

/// A margin as an interval guaranteed to lie below the exact value: m − allowance,
/// less `fp32` for the float32 evaluation of the model (docs §8, §14).
I margin_interval(double m, double fp32 = 0) {
  return I(m) - I(defaults::margin_allowance) - I(fp32);
}

/// Lower end of num / den, rounded outward; den > 0. A non-positive numerator
/// certifies nothing (0); a zero denominator certifies every radius (+inf).
double radius_lower(const I& num, const I& den) {
  if (!(num.lower() > 0)) return 0.0;
  if (!(den.upper() > 0)) return kInf;
  return (num / I(den.upper())).lower();
}

/// Max over k != y of v[k].
double best_other(const std::vector<double>& v, int64_t y) {
  double b = -kInf;
  for (size_t k = 0; k < v.size(); ++k)
    if (static_cast<int64_t>(k) != y) b = std::max(b, v[k]);
  return b;
}

void check_member(const MemberEval& m, const MemberConstants& c, int64_t label) {
  if (m.h.empty() || c.experts.size() != m.h.size() || (!m.g.empty() && m.g.size() != m.h.size()))
    throw Error(ExitCode::internal, "certify: member evaluation and constants disagree in size");
  if (label < 0 || label >= static_cast<int64_t>(m.h[0].size()))
    throw Error(ExitCode::internal, "certify: label out of range");
}

}  // namespace

MemberView member_view(const MemberEval& m, const MemberConstants& c) {
  MemberView v;
  const int64_t E = static_cast<int64_t>(m.h.size());
  v.stability = kInf;
  if (m.g.empty()) {
    v.selected = {0};
    v.weights = {1.0};
  } else {
    std::vector<int64_t> order(static_cast<size_t>(E));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(),
                     [&](int64_t a, int64_t b) { return m.g[a] > m.g[b]; });
    const int64_t k = m.routing == Routing::soft ? E : std::min(m.top_k, E);
    v.selected.assign(order.begin(), order.begin() + k);
    std::vector<double> gs;
    for (auto i : v.selected) gs.push_back(m.g[static_cast<size_t>(i)]);
    v.weights = softmax(gs);
    if (k < E) {
      // Each router logit moves by at most L_g·ε, so the top-k set cannot change
      // while the gap between the k-th and (k+1)-th logit exceeds 2·L_g·ε.
      const double gap =
          m.g[static_cast<size_t>(order[k - 1])] - m.g[static_cast<size_t>(order[k])];
      v.stability = radius_lower(margin_interval(gap, m.fp32_gap), I(2.0) * I(c.router));
    }
  }
  // With one selected expert its weight is the constant 1 on the stable ball: no router term.
  const I lg = v.selected.size() > 1 ? I(c.router) : I(0.0);
  I tight = lg, paper(0.0);
  v.probs.assign(m.h[0].size(), 0.0);
  for (size_t j = 0; j < v.selected.size(); ++j) {
    const auto i = static_cast<size_t>(v.selected[j]);
    tight += I(v.weights[j]) * I(c.experts[i]);
    paper += lg + I(c.experts[i]);
    auto f = softmax(m.h[i]);
    for (size_t k = 0; k < f.size(); ++k) v.probs[k] += v.weights[j] * f[k];
  }
  v.tight_den = tight.upper();
  v.paper_den = paper.upper();
  return v;
}

SingleRadii radii_single(const MemberEval& m, const MemberConstants& c, int64_t label) {
  check_member(m, c, label);
  const auto v = member_view(m, c);
  const auto y = static_cast<size_t>(label);
  SingleRadii r;
  r.candidate = r.margin = kNaN;
  const I margin = margin_interval(v.probs[y] - best_other(v.probs, label), m.fp32_prob);
  r.tight = std::min(v.stability, radius_lower(margin, I(v.tight_den)));
  r.paper = std::min(v.stability, radius_lower(margin, I(v.paper_den)));
  const bool top1 = !m.g.empty() && m.routing == Routing::top_k && m.top_k == 1;
  auto expert_radius = [&](size_t j) {
    // Expert j alone: f^y - f^k is 1-Lipschitz in the logits' ∞-norm, and each
    // logit difference moves by at most 2·L_h·ε; either certifies.
    auto f = softmax(m.h[j]);
    const double by_prob =
        radius_lower(margin_interval(f[y] - best_other(f, label), m.fp32_prob), I(c.experts[j]));
    const double by_logit =
        radius_lower(margin_interval(m.h[j][y] - best_other(m.h[j], label), m.fp32_logit),
                     I(2.0) * I(c.experts[j]));
    return std::max(by_prob, by_logit);
  };
  if (top1) {
    // Every expert that could become the top choice on the ball must classify y on
    // it: expert j can overtake the top one only once ε >= (g_top - g_j) / (2 L_g).
    const double top = *std::max_element(m.g.begin(), m.g.end());
    double cand = kInf;
    for (size_t j = 0; j < m.h.size(); ++j) {
      const double reach =
          radius_lower(margin_interval(top - m.g[j], m.fp32_gap), I(2.0) * I(c.router));
      cand = std::min(cand, std::max(expert_radius(j), reach));
    }
    r.candidate = v.probs[y] > best_other(v.probs, label) ? cand : 0.0;
  }
  if (m.g.empty())
    r.margin =
        expert_radius(0) > 0
            ? radius_lower(margin_interval(m.h[0][y] - best_other(m.h[0], label), m.fp32_logit),
                           I(2.0) * I(c.experts[0]))
            : 0.0;
  return r;
}

DualRadii radii_dual(const MemberEval& standard, const MemberConstants& cs,
                     const MemberEval& robust, const MemberConstants& cr, double alpha,
                     int64_t label) {
  check_member(standard, cs, label);
  check_member(robust, cr, label);
  const auto vs = member_view(standard, cs), vr = member_view(robust, cr);
  const I a(alpha), one_minus = I(1.0) - I(alpha);
  DualRadii d;
  double eps_a = kInf, eps_b = kInf, tight = kInf;
  const size_t C = vs.probs.size();
  bool correct = true;
  for (size_t k = 0; k < C; ++k) {
    if (static_cast<int64_t>(k) == label) continue;
    const auto y = static_cast<size_t>(label);
    const double ms = vs.probs[y] - vs.probs[k], mr = vr.probs[y] - vr.probs[k];
    if (!((1 - alpha) * ms + alpha * mr > 0)) correct = false;
    // (a) F_D is Lipschitz with constant (1-α) K_S + α K_R while both selections hold.
    const I num_a = one_minus * margin_interval(ms, standard.fp32_prob) +
                    a * margin_interval(mr, robust.fp32_prob);
    const I den_a = one_minus * I(vs.tight_den) + a * I(vr.tight_den);
    const double ea = std::min({radius_lower(num_a, den_a), vs.stability, vr.stability});
    // (b) F_S can lower the pairwise margin to -1 at worst; only F_R must hold it.
    double eb = 0.0;
    if (alpha > 0) {
      // F_S's float32 margin is >= −1 − its arithmetic allowance, whatever F_S is.
      const I num_b = margin_interval(mr, robust.fp32_prob_alone) -
                      one_minus * (I(1.0) + I(standard.fp32_const)) / a;
      eb = std::min(radius_lower(num_b, I(vr.tight_den)), vr.stability);
    }
    eps_a = std::min(eps_a, ea);
    eps_b = std::min(eps_b, eb);
    // φ_k(ε) = α(m_R - K_R ε) + (1-α) max(-1, m_S - K_S ε) is positive iff one of its two
    // linear minorants (the two branches of the max) is: its root is max(ea, eb).
    tight = std::min(tight, std::max(ea, eb));
  }
  if (!correct) return d;  // F_D misclassifies x: nothing is certified
  d.eps_a = std::max(0.0, eps_a);
  d.eps_b = std::max(0.0, eps_b);
  d.thm55 = std::max(d.eps_a, d.eps_b);
  d.tight = std::max(0.0, tight);
  return d;
}

}  // namespace moecert
