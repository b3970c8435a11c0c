// MoE-aware certificate forms from bound propagation (see forms.h).
// docs/certification.md §13 (forms) and §14 (float32).
#include "forms.h"

#include "moecert/error.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>

namespace moecert::forms {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double u32 = std::numeric_limits<float>::epsilon() / 2;

InputDomain subset(const InputDomain& d, const torch::Tensor& rows) {
  return {d.x.index_select(0, rows), d.eps.index_select(0, rows), d.norm, d.box};
}

/// Router-logit differences over the regions: lo[b, i, j] <= ĝ_i − ĝ_j for the float32
/// router logits ĝ (a lower bound of g_i − g_j minus its float32 error). [n, E, E]
torch::Tensor router_differences(const MemberPass& p, const InputDomain& d) {
  const int64_t E = p.m->experts;
  const auto o = d.x.options();
  auto eye = torch::eye(E, o);
  auto C = (eye.unsqueeze(1) - eye.unsqueeze(0)).reshape({1, E * E, E}).expand({d.x.size(0), E * E, E});
  auto s = bound_specs(*p.router, C.contiguous(), &d);
  return (p.fp32 ? s.lower - s.err32 : s.lower).view({-1, E, E});
}

/// The router's selection on each region: its difference bounds (undefined without a
/// router) and the experts it can select / surely selects (docs §13.1).
struct Selection {
  torch::Tensor diff, possible, sure;
};
Selection select_experts(const MemberPass& p, const InputDomain& d) {
  Selection s;
  if (!p.m->router) {
    s.possible = s.sure = torch::ones({d.x.size(0), p.m->experts}, torch::kBool);
    return s;
  }
  s.diff = router_differences(p, d);
  std::tie(s.possible, s.sure) = router_selection(s.diff, p.m->routing, p.m->top_k);
  return s;
}

/// Bounds of one expert over the samples its pass covers.
struct ExpertBounds {
  torch::Tensor rows;                // [n_j] batch positions
  torch::Tensor margin;              // [n_j, K]: <= ĥ_y − ĥ_k (+inf at y)
  torch::Tensor dlo, dhi;            // [n_j, K]: ĥ_k − ĥ_y in [dlo, dhi] (probability forms)
  torch::Tensor hmax;                // [n_j]: >= max_c |ĥ_c| over the region
};

ExpertBounds expert_bounds(const MemberPass& p, size_t j, const InputDomain& d, const torch::Tensor& labels,
                           bool probs) {
  ExpertBounds e;
  e.rows = p.rows[j];
  const auto& pass = *p.experts[j];
  const int64_t K = p.m->classes;
  const auto dj = subset(d, e.rows);
  auto y = labels.index_select(0, e.rows);
  const int64_t n = y.size(0);
  // Rows e_y − e_k for the classes k != y only ([n, K − 1], `others` their k).
  auto at_y = torch::nn::functional::one_hot(y, K).to(torch::kBool);
  auto others = other_classes(y, K);
  auto C = margin_rows(y, K, d.x.options());
  if (probs) C = torch::cat({C, -C}, 1);
  auto s = bound_specs(pass, C, &dj);
  auto low = p.fp32 ? s.lower - s.err32 : s.lower;  // bounds of the float32 logits' differences
  auto place = [&](const torch::Tensor& v, double at_label) {  // [n, K − 1] -> [n, K]
    return torch::full({n, K}, at_label, v.options()).scatter_(1, others, v);
  };
  e.margin = place(low.narrow(1, 0, K - 1), kInf);
  if (probs) {
    e.dhi = -e.margin.masked_fill(at_y, 0.0);   // ĥ_k − ĥ_y <= −(lower bound of ĥ_y − ĥ_k)
    e.dlo = place(low.narrow(1, K - 1, K - 1), 0.0);  // lower bound of ĥ_k − ĥ_y
  }
  const auto& out = pass.nodes.back();
  e.hmax = (torch::max(out.lo.abs(), out.hi.abs()) + out.err32).amax(1);
  return e;
}

/// The logit-domain slack of every expert that can be selected:
/// min over such j and k != y of (ĥ_j,y − ĥ_j,k lower bound) − tie allowance. [n]
torch::Tensor logit_slack(const MemberPass& p, const InputDomain& d, const torch::Tensor& labels,
                          const torch::Tensor& possible) {
  const int64_t n = d.x.size(0);
  auto slack = torch::full({n}, kInf, d.x.options());
  auto covered = torch::zeros_like(possible);
  for (size_t j = 0; j < p.experts.size(); ++j) {
    if (!p.experts[j]) continue;
    covered.select(1, static_cast<int64_t>(j)).index_fill_(0, p.rows[j], true);
    auto e = expert_bounds(p, j, d, labels, false);
    auto s = e.margin.amin(1) - (p.fp32 ? fp32_tie(e.hmax, p.m->classes) : torch::zeros_like(e.hmax));
    auto needed = possible.select(1, static_cast<int64_t>(j)).index_select(0, e.rows);
    s = torch::where(needed, s, torch::full_like(s, kInf));
    slack.index_copy_(0, e.rows, torch::min(slack.index_select(0, e.rows), s));
  }
  // An expert the router can select here but that the pass does not cover (only if the
  // bounds at a smaller region came out looser) certifies nothing.
  auto uncovered = (possible & ~covered).any(1);
  return slack.masked_fill(uncovered, -kInf);
}

/// Router weight bounds a_lo <= a <= a_hi of the float32 model on each region
/// (docs §13.3). diff [n, E, E]; possible, sure [n, E].
std::pair<torch::Tensor, torch::Tensor> weight_bounds(const torch::Tensor& diff, const torch::Tensor& possible,
                                                      const torch::Tensor& sure) {
  const int64_t E = diff.size(1);
  auto off = 1 - torch::eye(E, diff.options()).unsqueeze(0);
  // ĝ_j − ĝ_i <= −diff[i, j] =: up[i, j]; >= diff[j, i] =: dn[i, j].
  auto up = -diff, dn = diff.transpose(1, 2);
  auto pos = possible.to(diff.dtype()).unsqueeze(1), sur = sure.to(diff.dtype()).unsqueeze(1);
  auto lo = 1.0 / (1.0 + (torch::exp(up) * off * pos).sum(2));
  auto hi = 1.0 / (1.0 + (torch::exp(dn) * off * sur).sum(2));
  lo = torch::where(sure, lo * (1 - 1e-12), torch::zeros_like(lo));
  hi = torch::where(possible, (hi * (1 + 1e-12)).clamp_max(1.0), torch::zeros_like(hi));
  return {lo, hi};
}

}  // namespace

const char* form_name(Form f) {
  switch (f) {
    case Form::margin: return "margin";
    case Form::candidate: return "candidate";
    case Form::mixture: return "mixture";
    case Form::dual: return "dual";
  }
  return "?";
}

Form member_form(const MemberGraphs& m) {
  if (m.experts == 1) return Form::margin;
  if (m.routing == Routing::top_k && m.top_k == 1) return Form::candidate;
  return Form::mixture;
}

MemberGraphs member_graphs(const ModelSpec& s, const LayerGraph& router, const std::vector<LayerGraph>& experts) {
  MemberGraphs m;
  m.experts = s.experts, m.classes = s.num_classes, m.top_k = s.top_k, m.routing = s.routing;
  const Shape input{s.in_channels, s.height, s.width};
  if (!router.empty()) m.router.emplace(router, input);
  for (const auto& e : experts) m.nets.emplace_back(e, input);
  return m;
}

MemberPass member_prepare(const MemberGraphs& m, const InputDomain& d, const torch::Tensor& labels,
                          const BoundOptions& opt, bool fp32, const MemberPass* seed, const torch::Tensor& seed_index) {
  MemberPass p;
  p.m = &m, p.domain = d, p.fp32 = fp32;
  if (m.router) {
    std::optional<BoundPass> s;
    if (seed) s = bound_subset(*seed->router, seed_index);
    p.router = bound_forward(*m.router, d, opt, s ? &*s : nullptr);
  }
  const auto possible = select_experts(p, d).possible;
  for (int64_t j = 0; j < m.experts; ++j) {
    const auto uj = static_cast<size_t>(j);
    auto rows = possible.select(1, j).nonzero().flatten();
    p.rows.push_back(rows);
    p.experts.emplace_back();
    if (rows.numel() == 0) continue;
    std::optional<BoundPass> s;
    if (seed && seed->experts[uj]) {  // this expert's samples as positions in the seed's expert pass
      auto at = positions_in(seed->rows[uj], seed->domain.x.size(0));
      auto index = at.index_select(0, seed_index.index_select(0, rows));
      if (index.ge(0).all().item<bool>()) s = bound_subset(*seed->experts[uj], index);
    }
    p.experts.back() = bound_forward(m.nets[uj], subset(d, rows), opt, s ? &*s : nullptr);
  }
  return p;
}

torch::Tensor softmax_margin_lower(const torch::Tensor& dlo, const torch::Tensor& dhi, const torch::Tensor& labels) {
  const int64_t K = dlo.size(1);
  auto at_y = torch::nn::functional::one_hot(labels, K).to(torch::kBool);
  constexpr double big = 700;  // exp(700) is finite; see the proof for the clamps
  auto elo = torch::exp(dlo.clamp_max(big)).masked_fill(at_y, 0.0);
  auto ehi = torch::exp(dhi.clamp_max(big)).masked_fill(at_y, 0.0);
  auto r_lo = elo.sum(1, true) - elo, r_hi = ehi.sum(1, true) - ehi;  // Σ over j != y, k
  auto num = 1.0 - ehi;
  auto val = torch::where(num.ge(0), num / (1.0 + ehi + r_hi), num / (1.0 + ehi + r_lo));
  val = val - 1e-12 * val.abs() - 1e-300;  // the rounding of exp and of the quotient
  auto hi_over = dhi.ge(big);
  val = torch::where(hi_over, torch::full_like(val, -1.0), val);                // f_y − f_k >= −1
  auto others_over = (hi_over & ~at_y).any(1, true).expand_as(val) & num.ge(0);
  val = torch::where(others_over & ~hi_over, torch::zeros_like(val), val);       // N >= 0: >= 0
  return val.clamp_min(-1.0).masked_fill(at_y, kInf);
}

torch::Tensor simplex_min(const torch::Tensor& a_lo, const torch::Tensor& a_hi, const torch::Tensor& mu) {
  auto [sorted, order] = mu.sort(1);
  auto lo = a_lo.gather(1, order), room = (a_hi - a_lo).clamp_min(0).gather(1, order);
  auto value = (lo * sorted).sum(1), left = (1.0 - lo.sum(1)).clamp_min(0);
  for (int64_t i = 0; i < mu.size(1); ++i) {
    auto add = torch::min(left, room.select(1, i));
    value = value + add * sorted.select(1, i);
    left = left - add;
  }
  // Mass the bounds could not place (only by rounding) goes to the smallest margin.
  value = value + left * sorted.select(1, 0);
  return value - 1e-12 * (a_hi * mu.abs()).sum(1) - 1e-300;
}

torch::Tensor fp32_tie(const torch::Tensor& hmax, int64_t classes) {
  return u32 * (10.0 * hmax + 2.0 * std::log(static_cast<double>(classes)) + 4.0);
}

double fp32_prob_constant(const MemberGraphs& m) {
  auto lsm = [](double n) { return n + 10.0 * std::log(n) + 12.0; };
  const double K = static_cast<double>(m.classes);
  if (member_form(m) != Form::mixture) return lsm(K);
  const double k = m.routing == Routing::soft ? static_cast<double>(m.experts) : static_cast<double>(m.top_k);
  return lsm(K) + lsm(k) + 2.0 * k + 16.0;
}

namespace {

/// Lower bounds of the member's probability margins F^y − F^k of its float32
/// probabilities on each region (docs §13.2–13.3), given its selection there. [n, K], +inf at y.
torch::Tensor prob_lower(const MemberPass& p, const InputDomain& d, const torch::Tensor& labels,
                         const Selection& sel) {
  const auto& m = *p.m;
  const int64_t n = d.x.size(0), E = m.experts, K = m.classes;
  const auto o = d.x.options();
  auto mu = torch::full({n, E, K}, -1.0, o);  // expert margins; −1 (always valid) where no pass covers
  for (size_t j = 0; j < p.experts.size(); ++j) {
    if (!p.experts[j]) continue;
    auto e = expert_bounds(p, j, d, labels, true);
    auto mj = softmax_margin_lower(e.dlo, e.dhi, labels.index_select(0, e.rows));
    mu.select(1, static_cast<int64_t>(j)).index_copy_(0, e.rows, mj.masked_fill(mj.isinf(), 0.0));
  }
  torch::Tensor out;
  if (member_form(m) != Form::mixture) {  // the output is one expert's f: the worst possible one
    out = mu.masked_fill(~sel.possible.unsqueeze(2), kInf).amin(1);
  } else {
    auto [a_lo, a_hi] =
        weight_bounds(sel.diff.defined() ? sel.diff : torch::zeros({n, E, E}, o), sel.possible, sel.sure);
    std::vector<torch::Tensor> per;
    for (int64_t k = 0; k < K; ++k) per.push_back(simplex_min(a_lo, a_hi, mu.select(2, k)));
    out = torch::stack(per, 1);
  }
  auto at_y = torch::nn::functional::one_hot(labels, K).to(torch::kBool);
  return out.masked_fill(at_y, kInf);
}

}  // namespace

Evaluation member_evaluate(const MemberPass& p, const InputDomain& d, const torch::Tensor& labels) {
  Evaluation ev;
  const auto sel = select_experts(p, d);
  ev.possible = sel.possible;
  if (member_form(*p.m) != Form::mixture) {
    ev.slack = logit_slack(p, d, labels, ev.possible);
  } else {
    ev.slack = prob_lower(p, d, labels, sel).amin(1) - (p.fp32 ? 2.0 * u32 * fp32_prob_constant(*p.m) * 1.05 : 0.0);
  }
  return ev;
}

Evaluation dual_evaluate(const MemberPass& standard, const MemberPass& robust, double alpha,
                         const InputDomain& d, const torch::Tensor& labels) {
  Evaluation ev;
  const auto sel = select_experts(robust, d);
  ev.possible = sel.possible;
  auto ls = prob_lower(standard, d, labels, select_experts(standard, d)).clamp_min(-1.0);
  auto lr = prob_lower(robust, d, labels, sel);
  const double C = (1 - alpha) * fp32_prob_constant(*standard.m) + alpha * fp32_prob_constant(*robust.m) + 8.0;
  auto mixed = (1 - alpha) * ls + alpha * lr - 1e-12 * (ls.abs() + lr.abs());  // + the rounding of the sum
  mixed = mixed.masked_fill(lr.isinf(), kInf);  // the label's own column
  ev.slack = mixed.amin(1) - (robust.fp32 ? 2.0 * u32 * C * 1.05 : 0.0);
  return ev;
}

}  // namespace moecert::forms
