// Branch and bound by ReLU and route splits (see bab-relu-impl.h): subproblems restricted by
// split ReLU units and fixed routes, bounded in batches by α-CROWN with β-CROWN
// multipliers, branched route first, then on the unstable unit with the largest gain.
// docs/certification.md §22.
#include <torch/torch.h>

#include <algorithm>
#include <functional>
#include <map>
#include <set>
#include <tuple>

#include "bab-relu-impl.h"

namespace moecert::bab::detail {
namespace {

/// The nodes of a graph whose units a split can fix: the inputs of ReLU nodes.
std::vector<int> split_nodes(const BoundGraph& g) {
  std::vector<int> out;
  const auto& nodes = g.nodes();
  for (size_t k = 0; k < nodes.size(); ++k)
    for (int c : nodes[k].consumers)
      if (std::string(nodes[static_cast<size_t>(c)].rule->name()) == "relu") {
        out.push_back(static_cast<int>(k));
        break;
      }
  return out;
}

/// The graph g of a member's pass (0: the router), if the pass has it.
template <typename Pass>
auto graph_pass(Pass& p, int g) -> decltype(&*p.router) {
  if (g == 0) return p.router ? &*p.router : nullptr;
  auto& e = p.experts[static_cast<size_t>(g - 1)];
  return e ? &*e : nullptr;
}

/// The subproblems (positions in the batch of n) graph g of a member's pass covers: all
/// for the router, those routed to it for an expert. [rows] int64, CPU
torch::Tensor pass_rows(const forms::MemberPass& p, int g, int64_t n) {
  return g == 0 ? torch::arange(n, torch::kLong) : p.rows[static_cast<size_t>(g - 1)].cpu();
}

/// Per expert, the margin rows an evaluation proved (Evaluation::settled) with their
/// bounds, −inf elsewhere: what a subproblem's children take as known. [n, K − 1] CPU each
std::vector<torch::Tensor> proven_rows(const forms::Evaluation& ev) {
  std::vector<torch::Tensor> out;
  for (size_t j = 0; j < ev.settled.size(); ++j)
    out.push_back(
        torch::where(ev.settled[j], ev.margins[j], torch::full_like(ev.margins[j], -kInf)).cpu());
  return out;
}

/// The mixture form's carry of a child of `s` (Sub::known_prob, docs §22): the bounds of
/// the experts settled on `s`, and with `graph` >= 0 (a ReLU split of that graph of the
/// member: 0 the router, 1 + j expert j) those of every expert the split leaves as it was.
torch::Tensor carried_prob(const Sub& s, int graph) {
  if (!s.prob.defined()) return {};
  auto keep = s.settled.clone();
  if (graph >= 0) {
    keep.fill_(true);
    if (graph > 0) keep[graph - 1] = s.settled[graph - 1];
  }
  if (!keep.any().item<bool>()) return {};
  return torch::where(keep.unsqueeze(1), s.prob, torch::full_like(s.prob, -kInf));
}

/// A child of `s` split on `unit` with `sign`: its splits, route, depth, share of the
/// root, and what it inherits (the rows proven, the settled experts' bounds, with
/// `untouched` those of the experts the split leaves as they were, and the tuned
/// parameters of `s`).
Sub relu_child(const Sub& s, const SplitAt& unit, double sign, bool untouched) {
  Sub c;
  c.splits = s.splits;
  c.splits.push_back(unit);
  c.splits.back().sign = sign;
  c.route = s.route, c.depth = s.depth + 1, c.mass = s.mass / 2;
  c.known = s.known, c.warm = s.warm;
  c.known_prob = carried_prob(s, untouched && unit.member == 0 ? unit.graph : -1);
  c.graph_best = s.graph_best;
  if (static_cast<size_t>(unit.graph) < c.graph_best.size())
    c.graph_best[static_cast<size_t>(unit.graph)].first = 0;  // bounded again: its own
  return c;
}

/// A node's split scores [rows, units] (choose): the first-order gain where the
/// intervals' gradients are known, the relaxation gap alone otherwise (and as the
/// tie-break); 0 on stable units.
torch::Tensor unit_scores(const NodeBounds& nb) {
  auto l = nb.lo.detach().flatten(1), u = nb.hi.detach().flatten(1);
  auto unstable = l.lt(0) & u.gt(0);
  auto gap = -l * u / (u - l).clamp_min(1e-300);
  if (nb.lo.grad().defined() && nb.hi.grad().defined())
    gap = gap * 1e-6 + nb.lo.grad().flatten(1).abs() * l.abs() +
          nb.hi.grad().flatten(1).abs() * u.abs();
  return torch::where(unstable, gap.detach(), torch::zeros_like(l));
}

}  // namespace

torch::Tensor empty_regions(const std::vector<forms::MemberPass>& passes, int64_t n) {
  auto out = torch::zeros({n}, torch::kBool);
  for (const auto& mp : passes)
    for (int g = 0; g <= static_cast<int>(mp.experts.size()); ++g)
      if (const BoundPass* bp = graph_pass(mp, g)) {
        auto rows = pass_rows(mp, g, n);
        auto none = torch::zeros({rows.size(0)}, torch::kBool);
        for (const auto& nb : bp->nodes) none |= nb.lo.gt(nb.hi).flatten(1).any(1).cpu();
        out.index_put_({rows}, out.index_select(0, rows) | none);
      }
  return out;
}

std::vector<double> take_slacks(const forms::Evaluation& ev, std::vector<Sub>& subs) {
  const auto slack = ev.slack.cpu();
  const auto proven = proven_rows(ev);
  std::vector<double> out(subs.size());
  for (size_t c = 0; c < subs.size(); ++c) {
    auto& s = subs[c];
    s.slack = out[c] = slack[static_cast<int64_t>(c)].item<double>();
    s.known.clear();
    for (const auto& t : proven) s.known.push_back(t[static_cast<int64_t>(c)].clone());
  }
  return out;
}

ReluSearch::ReluSearch(const Problem& p, const Config& cfg, const Logits& logits,
                       const Attack& attack, Clock::time_point deadline)
    // ReLU splits read per-node float32 errors (bound_split).
    : Search(p, cfg, logits, attack, deadline, Float32Errors::per_node) {
  opt_.primal = true;  // the worst subproblems' minimisers (check_primal)
  for (const auto* m : p.members) {
    std::vector<std::vector<int>> per;
    per.push_back(m->router ? split_nodes(*m->router) : std::vector<int>{});
    for (const auto& g : m->nets) per.push_back(split_nodes(g));
    candidates_.push_back(std::move(per));
  }
}

void ReluSearch::route_split(const Sub& s, size_t member, std::vector<std::vector<int64_t>> sets,
                             std::vector<Sub>& children) {
  ++out_.route_splits;
  for (auto& set : sets) {
    Sub c = s;
    c.route.resize(p_.members.size());
    c.route[member] = std::move(set), c.depth = s.depth + 1;
    c.mass = s.mass / static_cast<double>(sets.size());
    children.push_back(std::move(c));
  }
}

int64_t ReluSearch::max_children() const {
  int64_t most = 2;
  for (size_t i = 0; i < p_.members.size(); ++i) {
    if (!routable(i)) continue;
    const auto& m = *p_.members[i];
    const int64_t k = forms::member_form(m) == forms::Form::candidate ? 1 : m.top_k;
    double sets = 1;  // C(E, k)
    for (int64_t t = 0; t < k; ++t)
      sets *= static_cast<double>(m.experts - t) / static_cast<double>(t + 1);
    most = std::max(most, static_cast<int64_t>(std::min(sets, double(cfg_.batch))));
  }
  return most;
}

std::pair<size_t, std::vector<std::vector<int64_t>>> ReluSearch::route_children(
    const Sub& s) const {
  for (size_t i = 0; i < p_.members.size(); ++i) {
    auto sets = route_sets(s, i);
    if (!sets.empty()) return {i, std::move(sets)};
  }
  return {0, {}};
}

std::vector<std::vector<int64_t>> ReluSearch::route_sets(const Sub& s, size_t i) const {
  std::vector<std::vector<int64_t>> sets;
  const auto &possible = of(s.possible, i), &sure = of(s.sure, i);
  if (!of(s.route, i).empty() || !routable(i) || possible.size() < 2) return sets;
  if (forms::member_form(*p_.members[i]) == forms::Form::candidate) {
    for (int64_t j : possible) sets.push_back({j});
    return sets;
  }
  std::vector<int64_t> open;  // possible, not sure
  for (int64_t j : possible)
    if (std::find(sure.begin(), sure.end(), j) == sure.end()) open.push_back(j);
  const int64_t need = p_.members[i]->top_k - static_cast<int64_t>(sure.size());
  if (need < 1 || need >= static_cast<int64_t>(open.size())) return sets;  // one set at most
  std::vector<int64_t> pick;
  std::function<void(size_t)> grow = [&](size_t from) {
    if (static_cast<int64_t>(sets.size()) > cfg_.batch) return;
    if (static_cast<int64_t>(pick.size()) == need) {
      auto set = sure;
      set.insert(set.end(), pick.begin(), pick.end());
      std::sort(set.begin(), set.end());
      sets.push_back(std::move(set));
      return;
    }
    for (size_t i = from; i < open.size(); ++i) {
      pick.push_back(open[i]);
      grow(i + 1);
      pick.pop_back();
    }
  };
  grow(0);
  if (static_cast<int64_t>(sets.size()) > cfg_.batch) sets.clear();
  return sets;
}

void ReluSearch::rank_node(const torch::Tensor& gap, const torch::Tensor& rows,
                           const torch::Tensor& in_play, const SplitAt& node,
                           std::vector<std::vector<std::pair<double, SplitAt>>>& ranked) const {
  auto [tv, ta] = gap.topk(std::min<int64_t>(cfg_.fsb_per_node, gap.size(1)), 1);
  tv = tv.cpu(), ta = ta.cpu();
  if (in_play.defined()) tv = tv.masked_fill(~in_play.unsqueeze(1), 0.0);
  const auto tva = tv.accessor<double, 2>();
  const auto taa = ta.accessor<int64_t, 2>();
  const auto at = rows.accessor<int64_t, 1>();
  for (int64_t r = 0; r < rows.size(0); ++r)
    for (int64_t q = 0; q < tv.size(1); ++q)
      if (tva[r][q] > 0) {
        auto unit = node;
        unit.unit = taa[r][q];
        ranked[static_cast<size_t>(at[r])].push_back({tva[r][q], unit});
      }
}

void ReluSearch::choose(const std::vector<forms::MemberPass>& passes,
                        const std::vector<torch::Tensor>& possible, std::vector<Sub>& subs,
                        std::vector<std::vector<std::pair<double, SplitAt>>>* ranked,
                        const torch::Tensor& settled, bool leaves) const {
  const int64_t n = static_cast<int64_t>(subs.size());
  Choice ch;
  ch.best.assign(static_cast<size_t>(n), 0.0);
  if (ranked) ranked->assign(static_cast<size_t>(n), {});
  // Expert-wise leaves bound one expert each and split only it.
  const bool inherit = untouched() && !leaves;
  const size_t G = inherit ? passes[0].experts.size() + 1 : 0;
  ch.fresh.assign(static_cast<size_t>(n), std::vector<std::pair<double, SplitAt>>(G));
  ch.bounded.assign(static_cast<size_t>(n), std::vector<char>(G, 0));
  for (size_t i = 0; i < passes.size(); ++i)
    for (int g = 0; g < static_cast<int>(candidates_[i].size()); ++g) {
      const BoundPass* bp = graph_pass(passes[i], g);
      if (!bp || (leaves && g == 0)) continue;
      // The pass's rows: all subproblems for the router, those it covers for an expert.
      auto rows = pass_rows(passes[i], g, n);
      torch::Tensor in_play;  // [rows] bool: the expert can be selected there
      if (g > 0 && i < possible.size() && possible[i].defined())
        in_play = possible[i].select(1, g - 1).cpu().index_select(0, rows);
      const auto at = rows.accessor<int64_t, 1>();
      for (int k : candidates_[i][static_cast<size_t>(g)]) {
        const SplitAt node{static_cast<int>(i), g, k, 0, 0};
        auto gap = unit_scores(bp->nodes[static_cast<size_t>(k)]);
        if (ranked && cfg_.fsb_per_node > 0) rank_node(gap, rows, in_play, node, *ranked);
        auto [val, arg] = gap.max(1);
        val = val.cpu(), arg = arg.cpu();
        if (in_play.defined()) val = val.masked_fill(~in_play, 0.0);
        auto v = val.accessor<double, 1>();
        auto a = arg.accessor<int64_t, 1>();
        for (int64_t r = 0; r < rows.size(0); ++r) {
          const auto c = static_cast<size_t>(at[r]);
          auto unit = node;
          unit.unit = a[r];
          if (i == 0 && static_cast<size_t>(g) < G) {
            auto& f = ch.fresh[c][static_cast<size_t>(g)];
            ch.bounded[c][static_cast<size_t>(g)] = 1;
            if (v[r] > f.first) f = {v[r], unit};
          }
          if (!(v[r] > ch.best[c])) continue;
          ch.best[c] = v[r];
          subs[c].can_split = true;
          subs[c].next = unit;
        }
      }
    }
  if (inherit) inherit_units(possible, settled, subs, ch);
}

void ReluSearch::inherit_units(const std::vector<torch::Tensor>& possible,
                               const torch::Tensor& settled, std::vector<Sub>& subs,
                               Choice& ch) const {
  const int64_t n = static_cast<int64_t>(subs.size());
  const size_t G = ch.fresh.empty() ? 0 : ch.fresh[0].size();
  // Experts a subproblem's unit cannot come from: settled, or not selectable there.
  auto off = torch::zeros({n, static_cast<int64_t>(G) - 1}, torch::kBool);
  if (settled.defined()) off |= settled.cpu();
  if (!possible.empty() && possible[0].defined()) off |= ~possible[0].cpu();
  const auto oa = off.accessor<bool, 2>();
  for (int64_t c = 0; c < n; ++c) {
    const auto cs = static_cast<size_t>(c);
    auto& s = subs[cs];
    s.graph_best.resize(G, {0.0, SplitAt{}});
    for (size_t g = 0; g < G; ++g) {
      auto& gb = s.graph_best[g];
      if (ch.bounded[cs][g]) {
        gb = ch.fresh[cs][g];
        continue;
      }
      if (g > 0 && oa[c][static_cast<int64_t>(g) - 1]) gb.first = 0;  // nothing to gain
      if (gb.first > ch.best[cs]) {
        ch.best[cs] = gb.first;
        s.can_split = true;
        s.next = gb.second;
      }
    }
  }
}

std::vector<forms::MemberPass> ReluSearch::split_passes(
    const std::vector<forms::MemberPass>& root, const std::vector<Sub>& subs,
    const std::vector<torch::Tensor>& need) const {
  const int64_t n = static_cast<int64_t>(subs.size());
  std::map<std::tuple<int, int, int>, std::pair<std::vector<int64_t>, std::vector<double>>> at;
  for (int64_t c = 0; c < n; ++c)
    for (const auto& s : subs[static_cast<size_t>(c)].splits) {
      const BoundPass* bp = graph_pass(root[static_cast<size_t>(s.member)], s.graph);
      const int64_t per = bp->nodes[static_cast<size_t>(s.node)].lo[0].numel();
      auto& e = at[{s.member, s.graph, s.node}];
      e.first.push_back(c * per + s.unit), e.second.push_back(s.sign);
    }
  std::vector<forms::MemberPass> out;
  for (size_t i = 0; i < root.size(); ++i) {
    forms::MemberSplits ms(root[i].experts.size() + 1);
    for (const auto& [key, val] : at) {
      if (std::get<0>(key) != static_cast<int>(i)) continue;
      const int g = std::get<1>(key), k = std::get<2>(key);
      const auto& nb = graph_pass(root[i], g)->nodes[static_cast<size_t>(k)];
      std::vector<int64_t> shape = nb.lo.sizes().vec();
      shape[0] = n;
      auto t = torch::zeros(shape, nb.lo.options());
      auto idx = torch::tensor(val.first, torch::kLong).to(t.device());
      t.view({-1}).index_put_({idx}, torch::tensor(val.second, torch::kFloat64).to(t.device()));
      auto& per_graph = ms[static_cast<size_t>(g)];
      per_graph.resize(graph_pass(root[i], g)->nodes.size());
      per_graph[static_cast<size_t>(k)] = t;
    }
    out.push_back(forms::member_split(root[i], ms, n, need[i]));
  }
  // The root's own bound takes the root's steps; every other subproblem (a split's or a
  // route split's child, depth >= 1), which starts from its parent's tuned parameters
  // (warm starts), its own.
  const bool is_root = n == 1 && subs[0].depth == 0;
  if (!is_root && warm())
    for (auto& mp : out)
      for (int g = 0; g <= static_cast<int>(mp.experts.size()); ++g)
        if (BoundPass* bp = graph_pass(mp, g)) bp->opt.alpha_steps = cfg_.sub_steps;
  return out;
}

torch::Tensor ReluSearch::route_mask(const std::vector<Sub>& subs, size_t i) const {
  if (!routable(i)) return {};
  const int64_t n = static_cast<int64_t>(subs.size()), E = p_.members[i]->experts;
  auto m = torch::ones({n, E}, torch::kBool);
  for (int64_t c = 0; c < n; ++c) {
    const auto& route = of(subs[static_cast<size_t>(c)].route, i);
    if (route.empty()) continue;
    m[c].fill_(false);
    for (int64_t j : route) m[c][j] = true;
  }
  return m.to(p_.x.device());
}

std::vector<forms::MemberPass> ReluSearch::batch_passes(const std::vector<forms::MemberPass>& root,
                                                        const std::vector<Sub>& subs,
                                                        std::vector<torch::Tensor>& only,
                                                        int64_t* carried,
                                                        const torch::Tensor& bound_only) const {
  const int64_t n = static_cast<int64_t>(subs.size());
  only.clear();
  for (size_t i = 0; i < p_.members.size(); ++i) only.push_back(route_mask(subs, i));
  auto need = only;
  torch::Tensor known_prob;  // [n, E, K]: the settled experts' bounds (carry)
  if (carry() &&
      std::any_of(subs.begin(), subs.end(), [](const Sub& s) { return s.known_prob.defined(); })) {
    const auto& m = *p_.members[0];
    known_prob = torch::full({n, m.experts, m.classes}, -kInf, torch::kFloat64);
    for (int64_t c = 0; c < n; ++c)
      if (subs[static_cast<size_t>(c)].known_prob.defined())
        known_prob[c].copy_(subs[static_cast<size_t>(c)].known_prob);
    auto settled = known_prob.amax(2).isfinite().to(p_.x.device());
    const auto allowed = need[0].defined() ? need[0] : torch::ones_like(settled);
    need[0] = allowed & ~settled;
    if (bound_only.defined()) need[0] = allowed & bound_only.to(p_.x.device());
    if (carried) *carried += (allowed & settled & ~need[0]).sum().item<int64_t>();
  } else if (bound_only.defined()) {
    const auto b = bound_only.to(p_.x.device());
    need[0] = need[0].defined() ? need[0] & b : b;
  }
  auto passes = split_passes(root, subs, need);
  if (known_prob.defined())
    for (int64_t j = 0; j < known_prob.size(1); ++j)
      passes[0].known_prob.push_back(known_prob.select(1, j).to(p_.x.device()));
  // Margin rows proven on a parent's region hold on its children's: only the others are
  // bounded again (docs §22).
  if (warm() ||
      std::any_of(subs.begin(), subs.end(), [](const Sub& s) { return !s.known.empty(); })) {
    const int64_t E = static_cast<int64_t>(passes[0].experts.size());
    const int64_t K1 = p_.members[0]->classes - 1;
    for (int64_t j = 0; j < E; ++j) {
      auto known = torch::full({n, K1}, -kInf, torch::kFloat64);
      for (int64_t c = 0; c < n; ++c)
        if (!subs[static_cast<size_t>(c)].known.empty())
          known[c].copy_(subs[static_cast<size_t>(c)].known[static_cast<size_t>(j)]);
      passes[0].known_low.push_back(known.to(p_.x.device()));
    }
  }
  if (warm()) warm_.apply(passes[0], subs);
  passes[0].known_dlo = dlo_;
  return passes;
}

void ReluSearch::track(std::vector<forms::MemberPass>& passes) const {
  for (size_t i = 0; i < passes.size(); ++i)
    for (int g = 0; g < static_cast<int>(candidates_[i].size()); ++g)
      if (BoundPass* bp = graph_pass(passes[i], g))
        for (int k : candidates_[i][static_cast<size_t>(g)]) {
          auto& nb = bp->nodes[static_cast<size_t>(k)];
          nb.lo.requires_grad_(true), nb.hi.requires_grad_(true);
        }
}

void ReluSearch::rerank(const std::vector<forms::MemberPass>& root, std::vector<Sub>& subs,
                        std::vector<std::vector<std::pair<double, SplitAt>>>& ranked) {
  std::vector<Sub> kids;
  std::vector<std::pair<size_t, SplitAt>> of;  // per pair of kids: the subproblem, the unit
  for (size_t i = 0; i < subs.size(); ++i) {
    auto& list = ranked[i];
    const auto& s = subs[i];
    if (!s.can_split || list.size() < 2 || !route_children(s).second.empty()) continue;
    std::stable_sort(list.begin(), list.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
    if (static_cast<int64_t>(list.size()) > cfg_.fsb_candidates)
      list.resize(static_cast<size_t>(cfg_.fsb_candidates));
    for (const auto& [score, unit] : list) {
      of.push_back({i, unit});
      for (double sign : {1.0, -1.0}) kids.push_back(relu_child(s, unit, sign, untouched()));
    }
  }
  if (kids.empty()) return;
  std::vector<double> worse(of.size(), -kInf);
  const size_t chunk = static_cast<size_t>(std::max<int64_t>(2, 4 * cfg_.batch) / 2 * 2);
  for (size_t from = 0; from < kids.size(); from += chunk) {
    const size_t len = std::min(chunk, kids.size() - from);
    std::vector<Sub> part(kids.begin() + static_cast<std::ptrdiff_t>(from),
                          kids.begin() + static_cast<std::ptrdiff_t>(from + len));
    std::vector<torch::Tensor> only;
    auto passes = batch_passes(root, part, only);
    for (auto& mp : passes)
      for (int g = 0; g <= static_cast<int>(mp.experts.size()); ++g)
        if (BoundPass* bp = graph_pass(mp, g)) bp->opt.alpha_steps = 0, bp->opt.primal = false;
    auto ev = evaluate(p_, passes, passes[0].domain, labels(static_cast<int64_t>(len)), only);
    auto slack = ev.slack.cpu().masked_fill(empty_regions(passes, static_cast<int64_t>(len)), kInf);
    const auto sa = slack.accessor<double, 1>();
    for (size_t c = 0; c < len; c += 2) {
      const size_t pair = (from + c) / 2;
      worse[pair] = std::min(sa[static_cast<int64_t>(c)], sa[static_cast<int64_t>(c) + 1]);
    }
  }
  out_.screened += static_cast<int64_t>(kids.size());
  std::vector<double> best(subs.size(), -kInf);
  for (size_t q = 0; q < of.size(); ++q) {
    const size_t i = of[q].first;
    if (worse[q] > best[i]) best[i] = worse[q], subs[i].next = of[q].second;
  }
}

std::vector<Sub> ReluSearch::bound_relu(const std::vector<forms::MemberPass>& root,
                                        std::vector<Sub> subs) {
  const int64_t n = static_cast<int64_t>(subs.size());
  std::vector<torch::Tensor> only;  // per member: the experts each route allows
  auto passes = batch_passes(root, subs, only, &out_.carried);
  track(passes);
  const auto& d = passes[0].domain;
  auto ev = evaluate(p_, passes, d, labels(n), only);
  auto empty = empty_regions(passes, n);
  out_.bounded += n;
  std::vector<std::vector<std::pair<double, SplitAt>>> ranked;
  choose(passes, ev.possible_of, subs, &ranked, carry() ? ev.prob_settled : torch::Tensor());
  if (warm()) warm_.keep(ev, subs);
  std::vector<torch::Tensor> possible, sure;
  for (const auto& t : ev.possible_of) possible.push_back(t.cpu());
  for (const auto& t : ev.sure_of) sure.push_back(t.cpu());
  const auto slacks = take_slacks(ev, subs);
  torch::Tensor prob, prob_settled;  // carry(): every expert's bounds ([n, E, K]), settled ones
  if (carry()) prob = ev.prob.cpu(), prob_settled = ev.prob_settled.cpu();
  std::vector<Sub> open;
  std::vector<std::vector<std::pair<double, SplitAt>>> open_ranked;
  std::vector<bool> is_open(static_cast<size_t>(n));
  for (int64_t c = 0; c < n; ++c) {
    auto& s = subs[static_cast<size_t>(c)];
    // What a route split's children carry (Sub c = s); a ReLU split's: relu_child.
    if (prob.defined()) s.prob = prob[c].clone(), s.settled = prob_settled[c].clone();
    s.known_prob = carried_prob(s, -1);
    s.possible.assign(p_.members.size(), {}), s.sure.assign(p_.members.size(), {});
    for (size_t i = 0; i < possible.size() && i < p_.members.size(); ++i) {
      if (!of(s.route, i).empty()) continue;
      const auto pa = possible[i].accessor<bool, 2>(), sa = sure[i].accessor<bool, 2>();
      for (int64_t j = 0; j < pa.size(1); ++j) {
        if (pa[c][j]) s.possible[i].push_back(j);
        if (sa[c][j]) s.sure[i].push_back(j);
      }
    }
    if (s.slack > 0 || empty[c].item<bool>()) {
      out_.verified_mass += s.mass;
    } else {
      is_open[static_cast<size_t>(c)] = true;
      open.push_back(std::move(s));
      open_ranked.push_back(std::move(ranked[static_cast<size_t>(c)]));
    }
  }
  check_primal(ev.primal, slacks, is_open);
  if (cfg_.fsb_candidates > 1 && out_.verdict != Verdict::falsified)
    rerank(root, open, open_ranked);
  return open;
}

void ReluSearch::search() {
  const auto d = ball(p_);
  auto root = prepare(d, labels(1), true);
  if (rows_only()) {
    // The lower ends of the logit differences, bounded once on the whole region.
    root[0].margin_rows_only = true;
    root[0].row_settled = cfg_.mixture_row_settled;
    dlo_ = forms::difference_lower(root[0], labels(1));
  }
  if (expertwise()) return search_expertwise(root);
  Queue q;
  for (auto& s : bound_relu(root, {Sub{}})) q.push(std::move(s));
  while (!q.empty() && out_.verdict != Verdict::falsified) {
    if (!round_fits() || attack_due()) break;
    if (static_cast<int64_t>(q.size()) + cfg_.batch > cfg_.max_queue) break;
    std::vector<Sub> children, stuck;
    while (!q.empty() && (children.empty() ||
                          static_cast<int64_t>(children.size()) + max_children() <= cfg_.batch)) {
      Sub s = q.top();
      q.pop();
      if (auto [member, sets] = route_children(s); !sets.empty()) {
        route_split(s, member, std::move(sets), children);
        continue;
      }
      if (!s.can_split || s.depth >= cfg_.max_depth) {
        stuck.push_back(std::move(s));
        continue;
      }
      split_graphs_.insert({s.next.member, s.next.graph});
      out_.graphs_split = static_cast<int64_t>(split_graphs_.size());
      for (double sign : {1.0, -1.0}) children.push_back(relu_child(s, s.next, sign, untouched()));
    }
    if (children.empty()) {  // nothing left to split: open for good
      for (auto& s : stuck) q.push(std::move(s));
      out_.exhausted = true;
      break;
    }
    round_begins();
    const auto round_start = Clock::now();
    for (auto& s : bound_relu(root, std::move(children))) q.push(std::move(s));
    last_round_ = Clock::now() - round_start;
    for (auto& s : stuck) q.push(std::move(s));
    report(q.size(), q.empty() ? kInf : q.top().slack);
    if (out_.verdict == Verdict::falsified) break;
  }
  open_left(q);
  if (out_.verdict != Verdict::falsified && q.empty()) out_.verdict = Verdict::verified;
}

Outcome relu_search(const Problem& p, const Config& cfg, const Logits& logits, const Attack& attack,
                    Clock::time_point deadline) {
  return ReluSearch(p, cfg, logits, attack, deadline).run();
}

}  // namespace moecert::bab::detail
