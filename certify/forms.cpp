// MoE-aware certificate forms from bound propagation (see forms.h).
// docs/certification.md §13 (forms) and §14 (float32).
#include "forms.h"

#include <torch/torch.h>

#include <cmath>
#include <limits>
#include <tuple>

#include "moecert/error.h"

namespace moecert::forms {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr double u32 = std::numeric_limits<float>::epsilon() / 2;

InputDomain subset(const InputDomain& d, const torch::Tensor& rows) {
  InputDomain s{d.x.index_select(0, rows), d.eps.index_select(0, rows), d.norm, d.box};
  if (d.lower.defined())
    s.lower = d.lower.index_select(0, rows), s.upper = d.upper.index_select(0, rows);
  return s;
}

/// Constraints of the samples `rows` (undefined stays undefined).
InputConstraints subset(const InputConstraints& c, const torch::Tensor& rows) {
  if (!c.D.defined()) return c;
  return {c.D.index_select(0, rows), c.e.index_select(0, rows)};
}

/// Router-logit differences over the regions: lo[b, i, j] <= ĝ_i − ĝ_j for the float32
/// router logits ĝ (a lower bound of g_i − g_j minus its float32 error). [n, E, E]
torch::Tensor router_differences(const MemberPass& p, const InputDomain& d) {
  const int64_t E = p.m->experts;
  const auto o = d.x.options();
  auto eye = torch::eye(E, o);
  auto C =
      (eye.unsqueeze(1) - eye.unsqueeze(0)).reshape({1, E * E, E}).expand({d.x.size(0), E * E, E});
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
  torch::Tensor rows;      // [n_j] batch positions
  torch::Tensor low;       // [n_j, K − 1]: <= ĥ_y − ĥ_k, k in other_classes order
  torch::Tensor margin;    // [n_j, K]: <= ĥ_y − ĥ_k (+inf at y)
  torch::Tensor dlo, dhi;  // [n_j, K]: ĥ_k − ĥ_y in [dlo, dhi] (probability forms)
  torch::Tensor hmax;      // [n_j]: >= max_c |ĥ_c| over the region
  /// With the pass's BoundOptions::primal (logit forms): [n_j, *input] the minimiser of
  /// each region's lowest row bounded here, and [n_j] that row's bound (+inf: none).
  torch::Tensor primal, primal_low;
  /// With the pass's warm_slot: the bounded rows' tuned parameters and their keys
  /// (Evaluation::tuned).
  RowParams tuned;
  torch::Tensor tuned_keys;
};

/// The minimiser of each region's lowest bounded row: rows `low` [m] of regions `region`
/// [m] (of n), their minimisers `primal` [m, *input]. -> ([n, *input], [n] its bound).
std::pair<torch::Tensor, torch::Tensor> lowest_primal(const torch::Tensor& low,
                                                      const torch::Tensor& region,
                                                      const torch::Tensor& primal, int64_t n) {
  auto least = torch::full({n}, kInf, torch::kFloat64);
  auto pick = torch::zeros({n}, torch::kLong);
  const auto lc = low.to(torch::kCPU, torch::kFloat64).contiguous();
  const auto rc = region.to(torch::kCPU, torch::kLong).contiguous();
  auto l = lc.accessor<double, 1>();
  auto r = rc.accessor<int64_t, 1>();
  auto best = least.accessor<double, 1>();
  auto at = pick.accessor<int64_t, 1>();
  for (int64_t i = 0; i < l.size(0); ++i)
    if (l[i] < best[r[i]]) best[r[i]] = l[i], at[r[i]] = i;
  return {primal.index_select(0, pick.to(primal.device())), least.to(low.device())};
}

/// `routes`: the route constraints to bound with (default: the pass's own for a top-1
/// member; none for a top-k mixture, whose rows hold on route-set regions only).
ExpertBounds expert_bounds(const MemberPass& p, size_t j, const InputDomain& d,
                           const torch::Tensor& labels, bool probs,
                           const std::vector<InputConstraints>* routes = nullptr) {
  static const std::vector<InputConstraints> none;
  if (!routes) routes = member_form(*p.m) == Form::mixture ? &none : &p.route;
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
  InputConstraints route;
  if (j < routes->size() && (*routes)[j].D.defined()) route = subset((*routes)[j], e.rows);
  const auto* rc = route.D.defined() ? &route : nullptr;
  torch::Tensor low;  // bounds of the float32 logits' differences
  if (!probs && j < p.known_low.size() && p.known_low[j].defined()) {
    // Only the rows without a known bound (dj is the pass's own region here, branch and
    // bound's, so there is nothing to narrow).
    low = p.known_low[j].to(d.x.device()).index_select(0, e.rows).flatten();
    auto at = low.isneginf().nonzero().flatten();
    if (at.numel() > 0) {
      const auto region = torch::div(at, K - 1, "floor");
      // Warm starts: the bank rows of the margin rows' keys (region·(K − 1) + k).
      const bool tune = j < p.warm_slot.size() && p.warm_slot[j].defined();
      RowParams warm;
      if (tune) {
        e.tuned_keys = e.rows.index_select(0, region) * (K - 1) + at.remainder(K - 1);
        const auto slot = p.warm_slot[j].to(at.device()).view(-1).index_select(0, e.tuned_keys);
        const auto& bank = p.warm[j];
        if (bank.has.defined() && slot.ge(0).any().item<bool>()) {
          warm = param_rows(bank, slot.clamp_min(0));
          warm.has = slot.ge(0) & warm.has.to(slot.device());
        }
      }
      auto s = bound_spec_rows(pass, C.reshape({n * (K - 1), K}).index_select(0, at), region, rc,
                               warm.has.defined() ? &warm : nullptr, tune ? &e.tuned : nullptr);
      auto bounded = p.fp32 ? s.lower - s.err32 : s.lower;
      low.index_put_({at}, bounded);
      if (s.primal.defined())
        std::tie(e.primal, e.primal_low) = lowest_primal(bounded, region, s.primal, n);
    }
    low = low.view({n, K - 1});
  } else {
    auto s = bound_specs(pass, C, &dj, rc);
    low = p.fp32 ? s.lower - s.err32 : s.lower;
    if (s.primal.defined() && !probs) {
      auto region = torch::arange(n, y.options()).repeat_interleave(K - 1);
      std::tie(e.primal, e.primal_low) = lowest_primal(low.flatten(), region, s.primal, n);
    }
  }
  e.low = low.narrow(1, 0, K - 1);
  auto place = [&](const torch::Tensor& v, double at_label) {  // [n, K − 1] -> [n, K]
    return torch::full({n, K}, at_label, v.options()).scatter_(1, others, v);
  };
  e.margin = place(low.narrow(1, 0, K - 1), kInf);
  if (probs || p.margin_rows_only)
    e.dhi = -e.margin.masked_fill(at_y, 0.0);  // ĥ_k − ĥ_y <= −(lower bound of ĥ_y − ĥ_k)
  if (probs) e.dlo = place(low.narrow(1, K - 1, K - 1), 0.0);  // lower bound of ĥ_k − ĥ_y
  const auto& out = pass.nodes.back();
  e.hmax = (torch::max(out.lo.abs(), out.hi.abs()) + out.err32).amax(1);
  return e;
}

/// An expert without a pass: no margin row known (the placeholders record_rows fills).
void record_none(const MemberPass& p, size_t j, int64_t n, const torch::TensorOptions& o,
                 Evaluation& ev) {
  ev.margins.resize(j), ev.settled.resize(j);
  ev.margins.push_back(torch::full({n, p.m->classes - 1}, -kInf, o));
  ev.settled.push_back(torch::zeros({n, p.m->classes - 1}, o.dtype(torch::kBool)));
}

/// What an evaluation reports of expert j's margin rows (Evaluation's margins, settled,
/// tuned, primal), per expert in order; `needed` [n_j] bool: the regions where the
/// expert can be selected (its minimisers count there only); `primal_low` [n]: the
/// bound of each region's minimiser so far. Returns the tie allowance [n_j].
torch::Tensor record_rows(const MemberPass& p, size_t j, const InputDomain& d, ExpertBounds& e,
                          const torch::Tensor& needed, torch::Tensor& primal_low, Evaluation& ev) {
  record_none(p, j, d.x.size(0), d.x.options(), ev);
  if (!p.warm_slot.empty()) {
    ev.tuned.resize(p.experts.size()), ev.tuned_keys.resize(p.experts.size());
    ev.tuned[j] = std::move(e.tuned), ev.tuned_keys[j] = e.tuned_keys;
  }
  auto tie = p.fp32 ? fp32_tie(e.hmax, p.m->classes) : torch::zeros_like(e.hmax);
  ev.margins.back().index_copy_(0, e.rows, e.low);
  // A mixture's probability margins read every row's value, not only its sign (docs §22).
  auto done = tie.unsqueeze(1).clamp_min(p.margin_rows_only ? p.row_settled : 0.0);
  ev.settled.back().index_copy_(0, e.rows, e.low.gt(done));
  if (e.primal.defined()) {
    auto& primal = ev.primal;
    if (!primal.defined()) primal = d.x.clone();
    auto low = torch::where(needed, e.primal_low, torch::full_like(e.primal_low, kInf));
    auto lower = low.lt(primal_low.index_select(0, e.rows)).nonzero().flatten();
    auto at = e.rows.index_select(0, lower);
    primal.index_copy_(0, at, e.primal.index_select(0, lower));
    primal_low.index_copy_(0, at, low.index_select(0, lower));
  }
  return tie;
}

/// The logit-domain slack of every expert that can be selected:
/// min over such j and k != y of (ĥ_j,y − ĥ_j,k lower bound) − tie allowance. [n]
/// `margins`, `settled`: per expert, [n, K − 1], the rows' bounds and those above the tie
/// allowance. `primal` (with BoundOptions::primal): [n, *input], the minimiser of each
/// region's lowest row bounded here over the experts that can be selected (Evaluation::primal).
/// `tuned`, `tuned_keys`: Evaluation's.
torch::Tensor logit_slack(const MemberPass& p, const InputDomain& d, const torch::Tensor& labels,
                          const torch::Tensor& possible, Evaluation& ev) {
  const int64_t n = d.x.size(0);
  auto slack = torch::full({n}, kInf, d.x.options());
  auto primal_low = torch::full({n}, kInf, d.x.options());
  auto covered = torch::zeros_like(possible);
  ev.margins.clear(), ev.settled.clear();
  for (size_t j = 0; j < p.experts.size(); ++j) {
    if (!p.experts[j]) {
      record_none(p, j, n, d.x.options(), ev);
      continue;
    }
    covered.select(1, static_cast<int64_t>(j)).index_fill_(0, p.rows[j], true);
    auto e = expert_bounds(p, j, d, labels, false);
    auto needed = possible.select(1, static_cast<int64_t>(j)).index_select(0, e.rows);
    auto tie = record_rows(p, j, d, e, needed, primal_low, ev);
    auto s = e.margin.amin(1) - tie;
    s = torch::where(needed, s, torch::full_like(s, kInf));
    slack.index_copy_(0, e.rows, torch::min(slack.index_select(0, e.rows), s));
  }
  // An expert the router can select here but that the pass does not cover (only if the
  // bounds at a smaller region came out looser) certifies nothing.
  auto uncovered = (possible & ~covered).any(1);
  return slack.masked_fill(uncovered, -kInf);
}

/// The experts other than j, in order: [E − 1] int64, the rows of a route constraint
/// of expert j (add_route_constraints).
torch::Tensor other_experts(int64_t j, int64_t E, torch::Device device) {
  return other_classes(
      torch::full({1}, j, torch::TensorOptions().dtype(torch::kLong).device(device)), E)[0];
}

}  // namespace

RowParams param_rows(const RowParams& q, const torch::Tensor& idx) {
  auto take = [&](const torch::Tensor& t) {
    return t.defined() ? t.index_select(0, idx.to(t.device())) : torch::Tensor();
  };
  RowParams out;
  for (const auto& t : q.alpha) out.alpha.push_back(take(t));
  for (const auto& t : q.beta) out.beta.push_back(take(t));
  out.beta_in = take(q.beta_in), out.has = take(q.has);
  return out;
}

const char* form_name(Form f) {
  switch (f) {
    case Form::margin:
      return "margin";
    case Form::candidate:
      return "candidate";
    case Form::mixture:
      return "mixture";
    case Form::dual:
      return "dual";
  }
  return "?";
}

Form member_form(const MemberGraphs& m) {
  if (m.experts == 1) return Form::margin;
  if (m.routing == Routing::top_k && m.top_k == 1) return Form::candidate;
  return Form::mixture;
}

MemberGraphs member_graphs(const ModelSpec& s, const LayerGraph& router,
                           const std::vector<LayerGraph>& experts) {
  MemberGraphs m;
  m.experts = s.experts, m.classes = s.num_classes, m.top_k = s.top_k, m.routing = s.routing;
  const Shape input{s.in_channels, s.height, s.width};
  if (!router.empty()) m.router.emplace(router, input);
  for (const auto& e : experts) m.nets.emplace_back(e, input);
  return m;
}

MemberPass member_prepare(const MemberGraphs& m, const InputDomain& d, const torch::Tensor& labels,
                          const BoundOptions& opt, bool fp32, const MemberPass* seed,
                          const torch::Tensor& seed_index) {
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
    if (seed &&
        seed->experts[uj]) {  // this expert's samples as positions in the seed's expert pass
      auto at = positions_in(seed->rows[uj], seed->domain.x.size(0));
      auto index = at.index_select(0, seed_index.index_select(0, rows));
      if (index.ge(0).all().item<bool>()) s = bound_subset(*seed->experts[uj], index);
    }
    p.experts.back() = bound_forward(m.nets[uj], subset(d, rows), opt, s ? &*s : nullptr);
  }
  return p;
}

MemberPass member_split(const MemberPass& root, const MemberSplits& splits, int64_t n,
                        const torch::Tensor& need) {
  MemberPass p;
  p.m = root.m, p.fp32 = root.fp32, p.margin_rows_only = root.margin_rows_only;
  p.row_settled = root.row_settled;
  const auto o = torch::TensorOptions().dtype(torch::kLong).device(root.domain.x.device());
  const auto index = torch::zeros({n}, o);
  p.domain = subset(root.domain, index);
  auto signs = [&](size_t g) {
    return g < splits.size() ? splits[g] : std::vector<torch::Tensor>{};
  };
  if (root.router) p.router = bound_split(*root.router, index, signs(0));
  for (size_t j = 0; j < root.experts.size(); ++j) {
    p.experts.emplace_back();
    if (!root.experts[j]) {
      p.rows.push_back(torch::zeros({0}, o));
      continue;
    }
    auto rows = need.defined()
                    ? need.select(1, static_cast<int64_t>(j)).nonzero().flatten().to(o.device())
                    : torch::arange(n, o);
    p.rows.push_back(rows);
    if (rows.numel() == 0) continue;
    auto sj = signs(j + 1);
    for (auto& t : sj)
      if (t.defined()) t = t.index_select(0, rows);
    p.experts.back() = bound_split(*root.experts[j], index.index_select(0, rows), sj);
  }
  for (const auto& r : root.route) p.route.push_back(subset(r, index));
  return p;
}

void add_route_constraints(MemberPass& p) {
  const auto& m = *p.m;
  p.route.clear();
  const auto form = member_form(m);
  if (!p.router ||
      !(form == Form::candidate || (form == Form::mixture && m.routing == Routing::top_k)))
    return;
  const int64_t E = m.experts, n = p.domain.x.size(0);
  const auto o = p.domain.x.options();
  auto eye = torch::eye(E, o);
  for (int64_t j = 0; j < E; ++j) {
    // Rows e_t − e_j for t != j.
    auto idx = other_experts(j, E, o.device());
    auto C = (eye.index_select(0, idx) - eye[j]).unsqueeze(0).expand({n, E - 1, E}).contiguous();
    auto lin = bound_linear(*p.router, C);
    // |C·(ĝ − g)| <= |C|·err32 (per-node errors; 0 in a relational pass, whose b already
    // holds for the float32 logits).
    auto err = (C.abs() * p.router->nodes.back().err32.unsqueeze(1)).sum(2);
    if (!p.fp32) err = torch::zeros_like(err);
    // e = err − b in float64, rounded up by a relative 2^-50 (two roundings of sums of
    // two nonnegative terms).
    auto e = (err - lin.b) + std::ldexp(1.0, -50) * (err + lin.b.abs());
    p.route.push_back({lin.A, e});
  }
}

torch::Tensor fp32_tie(const torch::Tensor& hmax, int64_t classes) {
  return u32 * (10.0 * hmax + 2.0 * std::log(static_cast<double>(classes)) + 4.0);
}

double fp32_prob_constant(const MemberGraphs& m) {
  auto lsm = [](double n) { return n + 10.0 * std::log(n) + 12.0; };
  const double K = static_cast<double>(m.classes);
  if (member_form(m) != Form::mixture) return lsm(K);
  const double k =
      m.routing == Routing::soft ? static_cast<double>(m.experts) : static_cast<double>(m.top_k);
  return lsm(K) + lsm(k) + 2.0 * k + 16.0;
}

namespace {

/// Lower bounds of the member's probability margins F^y − F^k of its float32
/// probabilities on each region (docs §13.2–13.3), given its selection there. [n, K], +inf at y.
/// `mu_out`: the experts' margin bounds [n, E, K] (Evaluation::prob).
/// `ev` (with MemberPass::margin_rows_only): receives the margin rows (record_rows).
torch::Tensor prob_lower(const MemberPass& p, const InputDomain& d, const torch::Tensor& labels,
                         const Selection& sel,
                         const std::vector<InputConstraints>* routes = nullptr,
                         torch::Tensor* mu_out = nullptr, Evaluation* ev = nullptr) {
  const auto& m = *p.m;
  const int64_t n = d.x.size(0), E = m.experts, K = m.classes;
  const auto o = d.x.options();
  auto mu =
      torch::full({n, E, K}, -1.0, o);  // expert margins; −1 (always valid) where no pass covers
  const bool rows_only = p.margin_rows_only && ev;
  auto primal_low = torch::full({n}, kInf, o);
  if (rows_only) ev->margins.clear(), ev->settled.clear();
  for (size_t j = 0; j < p.experts.size(); ++j) {
    auto mu_j = mu.select(1, static_cast<int64_t>(j));
    if (p.experts[j]) {
      auto e = expert_bounds(p, j, d, labels, !rows_only, routes);
      auto y = labels.index_select(0, e.rows);
      if (rows_only) {
        // The lower ends known from a containing region, or none (docs §13.3, §22).
        e.dlo = torch::full_like(e.dhi, -kInf);
        if (j < p.known_dlo.size() && p.known_dlo[j].defined())
          e.dlo = p.known_dlo[j].to(o.device()).expand({n, K}).index_select(0, e.rows);
        record_rows(p, j, d, e,
                    sel.possible.select(1, static_cast<int64_t>(j)).index_select(0, e.rows),
                    primal_low, *ev);
      }
      auto mj = softmax_margin_lower(e.dlo, e.dhi, y);
      mu_j.index_copy_(0, e.rows, mj.masked_fill(mj.isinf(), 0.0));
    } else if (rows_only) {
      record_none(p, j, n, o, *ev);
    }
    // Bounds known from a containing region hold here too (docs §22): the larger counts.
    if (j < p.known_prob.size() && p.known_prob[j].defined())
      mu_j.copy_(torch::max(mu_j, p.known_prob[j].to(mu.device())));
  }
  if (mu_out) *mu_out = mu;
  torch::Tensor out;
  if (member_form(m) != Form::mixture) {  // the output is one expert's f: the worst possible one
    out = mu.masked_fill(~sel.possible.unsqueeze(2), kInf).amin(1);
  } else {
    auto [a_lo, a_hi] = router_weight_bounds(
        sel.diff.defined() ? sel.diff : torch::zeros({n, E, E}, o), sel.possible, sel.sure);
    if (ev) ev->weight_lo = a_lo, ev->weight_hi = a_hi;
    return mixture_lower(a_lo, a_hi, mu, labels);
  }
  auto at_y = torch::nn::functional::one_hot(labels, K).to(torch::kBool);
  return out.masked_fill(at_y, kInf);
}

}  // namespace

torch::Tensor mixture_lower(const torch::Tensor& a_lo, const torch::Tensor& a_hi,
                            const torch::Tensor& mu, const torch::Tensor& labels) {
  const int64_t K = mu.size(2);
  std::vector<torch::Tensor> per;
  for (int64_t k = 0; k < K; ++k) per.push_back(simplex_min(a_lo, a_hi, mu.select(2, k)));
  auto at_y = torch::nn::functional::one_hot(labels.to(mu.device()), K).to(torch::kBool);
  return torch::stack(per, 1).masked_fill(at_y, kInf);
}

double prob_allowance(const MemberPass& p) {
  return p.fp32 ? 2.0 * u32 * fp32_prob_constant(*p.m) * 1.05 : 0.0;
}

std::vector<torch::Tensor> difference_lower(const MemberPass& p, const torch::Tensor& labels) {
  const int64_t n = p.domain.x.size(0), K = p.m->classes;
  const auto o = p.domain.x.options();
  std::vector<torch::Tensor> out;
  for (size_t j = 0; j < p.experts.size(); ++j) {
    out.push_back(torch::full({n, K}, -kInf, o));
    if (!p.experts[j]) continue;
    const auto& rows = p.rows[j];
    auto y = labels.to(rows.device()).index_select(0, rows);
    // Rows e_k − e_y for k != y (in other_classes order), then placed at k.
    auto s = bound_specs(*p.experts[j], -margin_rows(y, K, o));
    auto low = p.fp32 ? s.lower - s.err32 : s.lower;
    auto placed = torch::zeros({y.size(0), K}, o).scatter_(1, other_classes(y, K), low);
    out.back().index_copy_(0, rows, placed);
  }
  return out;
}

std::vector<InputConstraints> route_set_constraints(const MemberPass& p,
                                                    const torch::Tensor& only) {
  std::vector<InputConstraints> out(p.route.size());
  const int64_t E = p.m->experts;
  const auto o = only.to(torch::kBool).to(p.domain.x.device());
  const auto fixed = o.sum(1).eq(p.m->top_k);
  for (int64_t j = 0; j < static_cast<int64_t>(out.size()); ++j) {
    auto ts = other_experts(j, E, o.device());
    // Row t (g_t − g_j <= ...) holds where j is selected and t is not: on route-set
    // regions with j in the set and t outside it. Elsewhere it becomes 0 <= 0.
    auto active = (fixed & o.select(1, j)).unsqueeze(1) & ~o.index_select(1, ts);  // [n, E − 1]
    const auto& r = p.route[static_cast<size_t>(j)];
    auto a = active.to(r.e.dtype());
    std::vector<int64_t> shape(static_cast<size_t>(r.D.dim()), 1);
    shape[0] = a.size(0), shape[1] = a.size(1);
    out[static_cast<size_t>(j)] = {r.D * a.view(shape), r.e * a};
  }
  return out;
}

namespace {

/// A member's selection on route-split regions (docs §22): with `only` [n, E] bool, each
/// region is restricted to the points where the router selects one of those experts
/// (the candidate form, whose pass has route constraints) or exactly those k (a top-k
/// mixture). `empty` [n] bool: regions no point of which does; `routes`: a top-k
/// mixture's route constraints there (none elsewhere: they hold on route-set regions only).
struct Restricted {
  Selection sel;
  torch::Tensor empty;
  std::vector<InputConstraints> routes;
  /// The route constraints its expert bounds take (prob_lower's `routes`): the route-set
  /// ones on route-set regions, else the member's default (a candidate's own).
  const std::vector<InputConstraints>* route_constraints() const {
    return routes.empty() ? nullptr : &routes;
  }
};
Restricted restrict_routes(const MemberPass& p, const InputDomain& d, const torch::Tensor& only) {
  Restricted r;
  r.sel = select_experts(p, d);
  auto& sel = r.sel;
  r.empty = torch::zeros({d.x.size(0)}, sel.possible.options());
  if (!only.defined()) return r;
  const auto o = only.to(sel.possible.device());
  const Form form = member_form(*p.m);
  if (form == Form::candidate && !p.route.empty()) {
    sel.possible = sel.possible & o;
    r.empty = ~sel.possible.any(1);
  } else if (form == Form::mixture && p.m->routing == Routing::top_k) {
    // Rows whose `only` holds k experts: the points where the router selects exactly
    // those. There they are all selected and no other is; none exists when one of them
    // cannot be selected anywhere in the region or another is sure. Rows allowing every
    // expert (no route fixed) keep their selection.
    const auto fixed = o.sum(1).eq(p.m->top_k);
    r.empty = fixed & ((sel.possible & o).sum(1).lt(p.m->top_k) | (sel.sure & ~o).any(1));
    sel.possible = sel.possible & o;
    sel.sure = torch::where(fixed.unsqueeze(1), sel.possible, sel.sure);
    r.routes = route_set_constraints(p, o);
  } else {
    throw Error(ExitCode::internal,
                "certify: route splits of a member without route constraints or top-k mixture");
  }
  return r;
}

}  // namespace

Evaluation member_evaluate(const MemberPass& p, const InputDomain& d, const torch::Tensor& labels,
                           const torch::Tensor& only) {
  Evaluation ev;
  auto r = restrict_routes(p, d, only);
  ev.possible = r.sel.possible;
  ev.possible_of = {r.sel.possible}, ev.sure_of = {r.sel.sure};
  if (member_form(*p.m) != Form::mixture) {
    ev.slack = logit_slack(p, d, labels, ev.possible, ev);
  } else {
    const double allowance = prob_allowance(p);
    ev.slack =
        prob_lower(p, d, labels, r.sel, r.route_constraints(), &ev.prob, &ev).amin(1) - allowance;
    // An expert is settled where its every margin (k != y) is above the allowance.
    auto at_y = torch::nn::functional::one_hot(labels.to(ev.prob.device()), p.m->classes)
                    .to(torch::kBool)
                    .unsqueeze(1);
    ev.prob_settled = ev.prob.masked_fill(at_y, kInf).amin(2).gt(allowance);
  }
  // Empty regions certify anything (a candidate's slack there is +inf already).
  ev.slack = ev.slack.masked_fill(r.empty.to(ev.slack.device()), kInf);
  return ev;
}

Evaluation dual_evaluate(const MemberPass& standard, const MemberPass& robust, double alpha,
                         const InputDomain& d, const torch::Tensor& labels,
                         const torch::Tensor& only_standard, const torch::Tensor& only_robust) {
  Evaluation ev;
  auto rs = restrict_routes(standard, d, only_standard);
  auto rr = restrict_routes(robust, d, only_robust);
  ev.possible = rr.sel.possible;
  ev.possible_of = {rs.sel.possible, rr.sel.possible}, ev.sure_of = {rs.sel.sure, rr.sel.sure};
  auto ls = prob_lower(standard, d, labels, rs.sel, rs.route_constraints()).clamp_min(-1.0);
  auto lr = prob_lower(robust, d, labels, rr.sel, rr.route_constraints());
  const double C =
      (1 - alpha) * fp32_prob_constant(*standard.m) + alpha * fp32_prob_constant(*robust.m) + 8.0;
  auto mixed =
      (1 - alpha) * ls + alpha * lr - 1e-12 * (ls.abs() + lr.abs());  // + the rounding of the sum
  mixed = mixed.masked_fill(lr.isinf(), kInf);                        // the label's own column
  ev.slack = mixed.amin(1) - (robust.fp32 ? 2.0 * u32 * C * 1.05 : 0.0);
  // Route-split regions no point of which selects the fixed experts: empty.
  ev.slack = ev.slack.masked_fill((rs.empty | rr.empty).to(ev.slack.device()), kInf);
  return ev;
}

}  // namespace moecert::forms
