// The expert-wise search of a mixture (see bab-relu-impl.h): per group of the root's
// region (a route set, or the root), one tree of ReLU splits per expert it can select, a
// leaf closed when the mixture's program with its expert's bounds on the leaf and every
// other expert's over the group is positive. docs/certification.md §22.
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <tuple>

#include "bab-relu-impl.h"
#include "moecert/error.h"

namespace moecert::bab::detail {

namespace {

/// The lesser of two bounds, NaN if either is (as torch::min).
double lesser(double a, double b) { return std::isnan(a) || std::isnan(b) ? NAN : std::min(a, b); }

/// A leaf's bounds of its own expert's margins: row `expert` of its [E, K] CPU float64 `prob`.
const double* own_row(const Sub& s) {
  if (s.prob.dim() != 2 || !s.prob.is_contiguous() || s.prob.device() != torch::kCPU)
    throw Error(ExitCode::internal, "certify: a leaf's bounds are not a dense [E, K] CPU tensor");
  return s.prob.data_ptr<double>() + static_cast<int64_t>(s.expert) * s.prob.size(1);
}

}  // namespace

torch::Tensor ReluSearch::tree_low(const Tree& t) {
  // Plain loops: a tree has thousands of open leaves, each [K] doubles, every round.
  auto low = t.closed_low.clone().contiguous();
  double* l = low.data_ptr<double>();
  const int64_t K = low.numel();
  for (const auto& s : t.open) {
    const double* r = own_row(s);
    for (int64_t k = 0; k < K; ++k) l[k] = lesser(l[k], r[k]);
  }
  return low;
}

void ReluSearch::close_leaf(Tree& t, const Sub& s) {
  t.closed += s.mass;
  t.closed_low = torch::min(t.closed_low, s.prob[s.expert]);
}

void ReluSearch::bound_leaves(const std::vector<forms::MemberPass>& root, std::vector<Sub> subs,
                              std::vector<Group>& groups) {
  const int64_t n = static_cast<int64_t>(subs.size()), E = p_.members[0]->experts;
  auto bound_only = torch::zeros({n, E}, torch::kBool);
  for (int64_t c = 0; c < n; ++c) bound_only[c][subs[static_cast<size_t>(c)].expert] = true;
  std::vector<torch::Tensor> only;
  auto passes = batch_passes(root, subs, only, &out_.carried, bound_only);
  track(passes);
  auto ev = evaluate(p_, passes, passes[0].domain, labels(n), only);
  auto empty = empty_regions(passes, n);
  out_.bounded += n;
  choose(passes, ev.possible_of, subs, nullptr, {}, /*leaves=*/true);
  if (warm()) warm_.keep(ev, subs);
  const auto slacks = take_slacks(ev, subs);
  auto prob = ev.prob.cpu();
  std::vector<bool> is_open(static_cast<size_t>(n));
  for (int64_t c = 0; c < n; ++c) {
    auto& s = subs[static_cast<size_t>(c)];
    s.prob = prob[c].clone();
    s.known_prob = torch::Tensor();
    Tree& t = groups[static_cast<size_t>(s.group)].trees[static_cast<size_t>(s.expert)];
    if (empty[c].item<bool>()) {
      t.closed += s.mass;  // no point: no bound to keep
    } else if (s.slack > 0) {
      close_leaf(t, s);
    } else {
      is_open[static_cast<size_t>(c)] = true;
      t.open.push_back(std::move(s));
    }
  }
  check_primal(ev.primal, slacks, is_open);
}

void ReluSearch::set_programs(const std::vector<forms::MemberPass>& root,
                              std::vector<Group>& groups) {
  const int64_t E = p_.members[0]->experts;
  for (auto& G : groups) {
    Sub c;
    c.route = G.route, c.known_prob = G.low.clone();
    std::vector<torch::Tensor> only;
    auto passes = batch_passes(root, {c}, only, nullptr, torch::zeros({1, E}, torch::kBool));
    auto ev = evaluate(p_, passes, passes[0].domain, labels(1), only);
    G.a_lo = ev.weight_lo[0].cpu(), G.a_hi = ev.weight_hi[0].cpu();
    G.allowance = forms::prob_allowance(passes[0]);
    // The program of a group's region is finite (every bound of mu is in [−1, 1]) unless
    // no point of it selects the route set.
    G.empty = ev.slack[0].item<double>() == kInf;
  }
}

std::vector<double> ReluSearch::program_slacks(const std::vector<Group>& groups,
                                               const std::vector<int64_t>& group_of,
                                               const torch::Tensor& known) const {
  if (group_of.empty()) return {};
  const int64_t n = static_cast<int64_t>(group_of.size());
  std::vector<torch::Tensor> lo, hi;
  for (const auto& G : groups) lo.push_back(G.a_lo), hi.push_back(G.a_hi);
  const auto at = torch::tensor(group_of, torch::kLong);
  auto y = torch::full({n}, p_.label, torch::kLong);
  // An expert without a pass takes −1 (always valid), or a known bound where larger.
  const auto least =
      forms::mixture_lower(torch::stack(lo).index_select(0, at),
                           torch::stack(hi).index_select(0, at), known.clamp_min(-1.0), y)
          .amin(1)
          .contiguous();
  const double* v = least.data_ptr<double>();  // (one read, not an item() per leaf)
  std::vector<double> out;
  for (int64_t c = 0; c < n; ++c) {
    const auto& G = groups[static_cast<size_t>(group_of[static_cast<size_t>(c)])];
    out.push_back(G.empty ? kInf : v[c] - G.allowance);
  }
  return out;
}

torch::Tensor ReluSearch::knowns(const std::vector<Group>& groups,
                                 const std::vector<std::tuple<size_t, size_t, size_t>>& at) const {
  const int64_t E = p_.members[0]->experts, K = p_.members[0]->classes;
  auto out = torch::empty({static_cast<int64_t>(at.size()), E, K}, torch::kFloat64);
  double* o = out.data_ptr<double>();
  std::vector<torch::Tensor> low;
  for (const auto& G : groups) low.push_back(G.low.to(torch::kFloat64).contiguous());
  for (const auto& [g, j, i] : at) {
    std::copy_n(low[g].data_ptr<double>(), E * K, o);
    std::copy_n(own_row(groups[g].trees[j].open[i]), K, o + static_cast<int64_t>(j) * K);
    o += E * K;
  }
  return out;
}

void ReluSearch::retest(std::vector<Group>& groups) {
  std::vector<std::tuple<size_t, size_t, size_t>> at;
  std::vector<int64_t> group_of;
  for (size_t g = 0; g < groups.size(); ++g) {
    if (groups[g].done()) continue;
    for (size_t j = 0; j < groups[g].trees.size(); ++j)
      for (size_t i = 0; i < groups[g].trees[j].open.size(); ++i) {
        at.push_back({g, j, i});
        group_of.push_back(static_cast<int64_t>(g));
      }
  }
  const auto slack = program_slacks(groups, group_of, knowns(groups, at));
  for (size_t c = 0; c < at.size(); ++c) {
    auto [g, j, i] = at[c];
    groups[g].trees[j].open[i].slack = slack[c];
  }
  for (auto& g : groups)
    for (auto& t : g.trees) {
      std::vector<Sub> keep;
      for (auto& s : t.open)
        if (s.slack > 0)
          close_leaf(t, s);
        else
          keep.push_back(std::move(s));
      t.open = std::move(keep);
    }
}

std::vector<std::vector<double>> ReluSearch::gains(const std::vector<Group>& groups) const {
  std::vector<torch::Tensor> known;
  std::vector<std::pair<size_t, int64_t>> at;  // group, expert (-1: as they are)
  std::vector<int64_t> group_of;
  const int64_t E = p_.members[0]->experts;
  for (size_t g = 0; g < groups.size(); ++g) {
    if (groups[g].done()) continue;
    for (int64_t j = -1; j < E; ++j) {
      if (j >= 0 && !groups[g].trees[static_cast<size_t>(j)].on) continue;
      auto k = groups[g].low.clone();
      if (j >= 0) k[j].fill_(1.0);
      known.push_back(std::move(k));
      at.push_back({g, j});
      group_of.push_back(static_cast<int64_t>(g));
    }
  }
  std::vector<std::vector<double>> out(groups.size(),
                                       std::vector<double>(static_cast<size_t>(E), 0.0));
  const auto slack =
      program_slacks(groups, group_of, known.empty() ? torch::Tensor() : torch::stack(known));
  double base = 0;
  for (size_t c = 0; c < at.size(); ++c) {
    auto [g, j] = at[c];
    if (j < 0)
      base = slack[c];
    else
      out[g][static_cast<size_t>(j)] = std::max(0.0, slack[c] - base);
  }
  return out;
}

std::vector<ReluSearch::Group> ReluSearch::plant(const std::vector<Sub>& heads) {
  const int64_t E = p_.members[0]->experts, K = p_.members[0]->classes;
  std::vector<Group> groups;
  for (const auto& h : heads) {
    Group g;
    g.route = h.route, g.mass = h.mass, g.low = h.prob.clone();
    g.trees.resize(static_cast<size_t>(E));
    const auto& in_play = !of(h.route, 0).empty() ? of(h.route, 0) : of(h.possible, 0);
    for (int64_t j : in_play) {
      auto& t = g.trees[static_cast<size_t>(j)];
      t.on = true, t.closed_low = torch::full({K}, kInf, torch::kFloat64);
      Sub leaf = h;
      leaf.expert = static_cast<int>(j), leaf.group = static_cast<int>(groups.size());
      const auto gb = static_cast<size_t>(j + 1) < h.graph_best.size()
                          ? h.graph_best[static_cast<size_t>(j + 1)]
                          : std::pair<double, SplitAt>{0.0, SplitAt{}};
      leaf.can_split = gb.first > 0, leaf.next = gb.second;
      t.open.push_back(std::move(leaf));
      ++out_.trees;
    }
    groups.push_back(std::move(g));
  }
  return groups;
}

std::vector<ReluSearch::LeafAt> ReluSearch::open_leaves(const std::vector<Group>& groups,
                                                        size_t& open, double& worst) const {
  std::vector<LeafAt> out;
  open = 0, worst = kInf;
  for (size_t g = 0; g < groups.size(); ++g) {
    const auto& G = groups[g];
    if (G.done()) continue;
    for (size_t j = 0; j < G.trees.size(); ++j)
      for (size_t i = 0; i < G.trees[j].open.size(); ++i) {
        const Sub& s = G.trees[j].open[i];
        ++open, worst = std::min(worst, s.slack);
        if (s.can_split && s.depth < cfg_.max_depth) out.push_back({s.slack, g, j, i});
      }
  }
  return out;
}

std::vector<ReluSearch::LeafAt> ReluSearch::pick_leaves(const std::vector<Group>& groups,
                                                        std::vector<LeafAt> cand) const {
  const size_t E = static_cast<size_t>(p_.members[0]->experts);
  const size_t take =
      std::min(cand.size(), static_cast<size_t>(std::max<int64_t>(1, cfg_.batch / 2)));
  std::sort(cand.begin(), cand.end());
  const auto gain = gains(groups);
  double total = 0;
  for (const auto& gg : gain)
    for (double v : gg) total += v;
  std::vector<std::vector<size_t>> quota(groups.size(), std::vector<size_t>(E, 0));
  if (total > 0)
    for (size_t g = 0; g < groups.size(); ++g)
      for (size_t j = 0; j < E; ++j)
        quota[g][j] =
            static_cast<size_t>(std::ceil(static_cast<double>(take) * gain[g][j] / total));
  std::vector<LeafAt> pick, rest;
  for (const auto& c : cand) {
    auto& q = quota[std::get<1>(c)][std::get<2>(c)];
    if (q > 0 && pick.size() < take)
      --q, pick.push_back(c);
    else
      rest.push_back(c);
  }
  for (size_t r = 0; pick.size() < take && r < rest.size(); ++r) pick.push_back(rest[r]);
  return pick;
}

std::vector<Sub> ReluSearch::split_leaves(std::vector<Group>& groups, std::vector<LeafAt> leaves) {
  std::vector<Sub> children;
  std::vector<std::tuple<size_t, size_t, size_t>> at;
  for (const auto& [slack, g, j, i] : leaves) at.push_back({g, j, i});
  const auto known = knowns(groups, at);  // a child starts from its parent's
  for (size_t l = 0; l < leaves.size(); ++l) {
    const auto& [slack, g, j, i] = leaves[l];
    const Sub& s = groups[g].trees[j].open[i];
    split_graphs_.insert({s.next.member, s.next.graph});
    for (double sign : {1.0, -1.0}) {
      Sub c;
      c.splits = s.splits;
      c.splits.push_back(s.next);
      c.splits.back().sign = sign;
      c.route = s.route, c.depth = s.depth + 1, c.mass = s.mass / 2;
      c.known = s.known, c.warm = s.warm;
      c.expert = s.expert, c.group = s.group;
      c.known_prob = known[static_cast<int64_t>(l)];
      children.push_back(std::move(c));
    }
  }
  out_.graphs_split = static_cast<int64_t>(split_graphs_.size());
  // The split leaves leave their trees (latest index first, so the others stay put).
  std::sort(leaves.begin(), leaves.end(),
            [](const auto& a, const auto& b) { return std::get<3>(a) > std::get<3>(b); });
  for (const auto& [slack, g, j, i] : leaves) {
    auto& o = groups[g].trees[j].open;
    o.erase(o.begin() + static_cast<std::ptrdiff_t>(i));
  }
  return children;
}

void ReluSearch::search_expertwise(const std::vector<forms::MemberPass>& root) {
  auto heads = bound_relu(root, {Sub{}});
  if (!heads.empty() && out_.verdict != Verdict::falsified) {
    if (auto [member, sets] = route_children(heads[0]); !sets.empty()) {
      std::vector<Sub> kids;
      route_split(heads[0], member, std::move(sets), kids);
      for (auto& c : kids)
        c.known_prob = torch::Tensor();  // every expert bounded: each tree's first unit
      heads = bound_relu(root, std::move(kids));
    }
  }
  const double base = out_.verified_mass;  // the route sets verified whole
  auto groups = plant(heads);
  set_programs(root, groups);
  while (out_.verdict != Verdict::falsified) {
    size_t open = 0;
    double worst = kInf;
    auto cand = open_leaves(groups, open, worst);
    if (open == 0) break;
    if (!round_fits() || attack_due()) break;
    if (static_cast<int64_t>(open) + cfg_.batch > cfg_.max_queue) break;
    if (cand.empty()) {
      out_.exhausted = true;
      break;
    }
    auto children = split_leaves(groups, pick_leaves(groups, std::move(cand)));
    round_begins();
    const auto round_start = Clock::now();
    bound_leaves(root, std::move(children), groups);
    for (auto& G : groups)
      for (size_t j = 0; j < G.trees.size(); ++j)
        if (G.trees[j].on) G.low[static_cast<int64_t>(j)].copy_(tree_low(G.trees[j]));
    retest(groups);
    last_round_ = Clock::now() - round_start;
    tally(groups, base);  // the progress line's verified share and worst slack, after the round
    report(open, out_.worst_slack);
  }
  const bool all = tally(groups, base);
  if (out_.verdict != Verdict::falsified && all) out_.verdict = Verdict::verified;
  if (out_.verdict == Verdict::unknown) record_open_program(groups);
}

void ReluSearch::record_open_program(const std::vector<Group>& groups) {
  auto& o = out_.open_program;
  const auto y = torch::full({1}, p_.label, torch::kLong);
  for (const auto& G : groups) {
    if (G.done() || G.empty) continue;
    // The group's program per class, with every expert's least bounds over its region
    // (program_slacks' reading: no bound is the trivial −1).
    const auto low = G.low.clamp_min(-1.0);
    const auto per =
        forms::mixture_lower(G.a_lo.unsqueeze(0), G.a_hi.unsqueeze(0), low.unsqueeze(0), y)[0];
    const int64_t k = per.argmin().item<int64_t>();
    const double value = per[k].item<double>() - G.allowance;
    if (o.cls >= 0 && !(value < o.value)) continue;
    o.cls = k, o.value = value, o.route = of(G.route, 0);
    const auto as_vector = [](const torch::Tensor& t) {
      const auto c = t.to(torch::kFloat64).contiguous();
      return std::vector<double>(c.data_ptr<double>(), c.data_ptr<double>() + c.numel());
    };
    o.weight_lo = as_vector(G.a_lo), o.weight_hi = as_vector(G.a_hi);
    o.margin_low = as_vector(low.select(1, k));
  }
}

bool ReluSearch::tally(const std::vector<Group>& groups, double base) {
  double verified = base, worst = kInf;
  bool all = true;
  for (const auto& G : groups) {
    double best = 0;
    for (const auto& t : G.trees) best = std::max(best, t.closed);
    verified += G.done() ? G.mass : best;
    all = all && G.done();
    if (!G.done())
      for (const auto& t : G.trees)
        for (const auto& s : t.open) worst = std::min(worst, s.slack);
  }
  out_.verified_mass = verified, out_.open_mass = std::max(0.0, 1.0 - verified);
  worst_left(worst);
  return all;
}

}  // namespace moecert::bab::detail
