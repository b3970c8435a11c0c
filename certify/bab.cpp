// Branch and bound for one sample and one ε (see bab.h). docs/certification.md §22.
#include "bab.h"

#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <iostream>
#include <map>
#include <queue>
#include <tuple>

#include "moecert/error.h"
#include "moecert/runtime.h"

namespace moecert::bab {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

/// One ReLU split: unit `unit` (flat, per sample) of node `node` of graph `graph` (0: the
/// router, 1 + j: expert j) of member `member`, restricted to sign·z >= 0.
struct SplitAt {
  int member = 0, graph = 0, node = 0;
  int64_t unit = 0;
  double sign = 0;
};

struct Sub {
  std::vector<SplitAt> splits;  // ReLU mode
  torch::Tensor lower, upper;   // input mode: [1, C, H, W] float64
  /// ReLU mode, per routable member (absent or empty: not fixed): the experts its router
  /// selects here (top-1: the one; top-k mixture: exactly these k).
  std::vector<std::vector<int64_t>> route;
  int depth = 0;
  double mass = 1;  // the share of the root this subproblem stands for (halved by a split)
  double slack = -kInf;
  bool can_split = false;  // ReLU mode: `next` is an unstable unit
  SplitAt next;
  /// Per member whose route is not fixed: the experts its router can select here, and
  /// those it selects everywhere here.
  std::vector<std::vector<int64_t>> possible, sure;
  /// Logit-domain forms, per expert: [K − 1] float64 CPU, the margin bounds proven above
  /// the tie allowance on a region containing this one (−inf: not proven). Empty: none.
  std::vector<torch::Tensor> known;
};
struct Worse {  // the lowest slack on top
  bool operator()(const Sub& a, const Sub& b) const { return a.slack > b.slack; }
};
using Queue = std::priority_queue<Sub, std::vector<Sub>, Worse>;

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

/// Certificate slack of every region of the passes (> 0: verified), and the experts each
/// member's router can select there; `only`: per member, its route splits (forms' `only`).
forms::Evaluation evaluate(const Problem& p, const std::vector<forms::MemberPass>& passes,
                           const InputDomain& d, const torch::Tensor& labels,
                           const std::vector<torch::Tensor>& only = {}) {
  auto at = [&](size_t i) { return i < only.size() ? only[i] : torch::Tensor(); };
  if (p.members.size() == 2)
    return forms::dual_evaluate(passes[0], passes[1], p.alpha, d, labels, at(0), at(1));
  return forms::member_evaluate(passes[0], d, labels, at(0));
}

/// Regions some node of which has an empty interval: the splits contradict each other
/// there, and the region is empty. [n] bool
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

class Solver {
 public:
  Solver(const Problem& p, const Config& cfg, const Logits& logits, const Attack& attack,
         Clock::time_point deadline)
      : p_(p), cfg_(cfg), logits_(logits), attack_(attack), deadline_(deadline) {
    opt_.method = BoundMethod::alpha_crown;
    opt_.alpha_steps = cfg.alpha_steps;
    for (const auto* m : p.members) {
      std::vector<std::vector<int>> per;
      per.push_back(m->router ? split_nodes(*m->router) : std::vector<int>{});
      for (const auto& g : m->nets) per.push_back(split_nodes(g));
      candidates_.push_back(std::move(per));
    }
  }

  Outcome run() {
    const auto start = Clock::now();
    auto finish = [&]() {
      out_.seconds = std::chrono::duration<double>(Clock::now() - start).count();
      return out_;
    };
    if (try_attack(0)) return finish();
    last_attack_ = Clock::now();
    const bool input = use_input_splits();
    // ReLU splits read per-node float32 errors (bound_split); input splits any.
    opt_.fp32 = p_.fp32 && input ? Float32Errors::automatic : Float32Errors::per_node;
    if (input)
      input_search();
    else
      relu_search();
    return finish();
  }

 private:
  const Problem& p_;
  const Config& cfg_;
  const Logits& logits_;
  const Attack& attack_;
  Clock::time_point deadline_;
  BoundOptions opt_;
  std::vector<std::vector<std::vector<int>>> candidates_;  // [member][graph] split nodes
  Outcome out_;
  Clock::time_point start_ = Clock::now(), last_report_ = Clock::now();
  Clock::time_point last_attack_;

  /// A progress line on stderr every 5 s (Config::progress): subproblems, their rate, the
  /// queue, the verified share and the worst open slack.
  void report(size_t queued, double worst) {
    if (cfg_.progress.empty() || Clock::now() - last_report_ < std::chrono::seconds(5)) return;
    last_report_ = Clock::now();
    const double secs = std::chrono::duration<double>(last_report_ - start_).count();
    std::cerr << cfg_.progress << ": " << out_.bounded << " subproblems ("
              << fmt_fixed(static_cast<double>(out_.bounded) / secs, 1) << "/s), " << queued
              << " queued, " << fmt_fixed(100 * out_.verified_mass, 1)
              << "% verified, worst open slack " << fmt_fixed(worst, 4) << "\n";
  }
  int attack_round_ = 0;
  Clock::duration last_round_{0};  // how long the last round of bounding took

  /// Whether another round fits in the budget (the last round's length as its estimate):
  /// a round is not interrupted, so one that cannot end before the deadline is not begun.
  bool round_fits() const { return Clock::now() + last_round_ <= deadline_; }

  InputDomain ball() const {
    const auto o = p_.x.options();
    return {p_.x, torch::full({1}, p_.eps, o), p_.norm, p_.box};
  }

  /// The root box of the region (L∞): [x − ε, x + ε], ∩ [0, 1] with the box.
  std::pair<torch::Tensor, torch::Tensor> root_box() const {
    auto lo = p_.x - p_.eps, hi = p_.x + p_.eps;
    if (p_.box) lo = lo.clamp_min(0.0), hi = hi.clamp_max(1.0);
    return {lo, hi};
  }

  bool use_input_splits() const {
    if (cfg_.split == Split::relu || p_.norm != Norm::linf) return false;
    if (cfg_.split == Split::input) return true;
    auto [lo, hi] = root_box();
    return hi.gt(lo).sum().item<int64_t>() <= cfg_.input_max_free;
  }

  /// Whether x32 (float32 [1, C, H, W]) lies in the region and the model misclassifies
  /// it; records it as the counterexample when so.
  bool counterexample(const torch::Tensor& x32) {
    torch::NoGradGuard ng;
    const auto xd = x32.to(torch::kFloat64).to(p_.x.device());
    const auto d = (xd - p_.x).flatten();
    const double dist =
        p_.norm == Norm::linf ? d.abs().max().item<double>() : d.norm().item<double>();
    if (!(dist <= p_.eps)) return false;
    if (p_.box && (xd.lt(0).any().item<bool>() || xd.gt(1).any().item<bool>())) return false;
    const auto pred = logits_(x32).argmax(1).cpu()[0].item<int64_t>();
    if (pred == p_.label) return false;
    out_.verdict = Verdict::falsified, out_.counterexample = x32.cpu(), out_.distance = dist;
    return true;
  }

  bool try_attack(int round) {
    if (!attack_) return false;
    auto x = attack_(round);
    return x.defined() && counterexample(x);
  }

  /// An attack round when its interval has passed since the last one.
  bool attack_due() {
    if (std::chrono::duration<double>(Clock::now() - last_attack_).count() < cfg_.attack_interval)
      return false;
    const bool found = try_attack(++attack_round_);
    last_attack_ = Clock::now();
    return found;
  }

  /// The member passes of regions `d`; `root`: the root of ReLU splits, whose
  /// intermediate bounds every subproblem inherits (optimised by Config::intermediate_steps).
  std::vector<forms::MemberPass> prepare(const InputDomain& d, const torch::Tensor& labels,
                                         bool root = false) const {
    std::vector<forms::MemberPass> passes;
    auto opt = opt_;
    if (root) opt.intermediate_alpha_steps = cfg_.intermediate_steps;
    for (const auto* m : p_.members) {
      passes.push_back(forms::member_prepare(*m, d, labels, opt, p_.fp32));
      forms::add_route_constraints(passes.back());
    }
    return passes;
  }

  torch::Tensor labels(int64_t n) const {
    return torch::full({n}, p_.label,
                       torch::TensorOptions().dtype(torch::kLong).device(p_.x.device()));
  }

  void open_left(const Queue& q, const std::vector<Sub>& extra = {}) {
    auto copy = q;
    double open = 0;
    while (!copy.empty()) open += copy.top().mass, copy.pop();
    for (const auto& s : extra) open += s.mass;
    out_.open_mass = open;
  }

  // --- ReLU splits ------------------------------------------------------------------

  /// The most children one subproblem has: 2, or the expert sets of a route split (at
  /// most a batch: a route split with more children is not made).
  int64_t max_children() const {
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

  static const std::vector<int64_t>& of(const std::vector<std::vector<int64_t>>& v, size_t i) {
    static const std::vector<int64_t> none;
    return i < v.size() ? v[i] : none;
  }

  /// A route split's children: the first member (standard first) whose route is not
  /// fixed and has more than one expert set its router may select on the subproblem
  /// (top-1: each possible expert; top-k: each k-set between the sure and the possible
  /// experts), and those sets. Every point of the region selects one of them, so their
  /// regions cover the parent's. No sets when no member has more than one, or only
  /// more than a batch.
  std::pair<size_t, std::vector<std::vector<int64_t>>> route_children(const Sub& s) const {
    for (size_t i = 0; i < p_.members.size(); ++i) {
      auto sets = route_sets(s, i);
      if (!sets.empty()) return {i, std::move(sets)};
    }
    return {0, {}};
  }

  /// route_children's sets of member i.
  std::vector<std::vector<int64_t>> route_sets(const Sub& s, size_t i) const {
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

  /// The unstable unit of every region of the passes (over the router and the experts it
  /// can select) whose split promises most: the first-order change of the bound when
  /// its interval's end moves to 0 in either child, |∂B/∂l|·|l| + |∂B/∂u|·u (the
  /// gradients of the α-β optimisation's bounds with respect to the intervals, summed
  /// over its steps), with the relaxation gap −l·u / (u − l) breaking ties. Regions
  /// without an unstable unit get can_split = false.
  void choose(const std::vector<forms::MemberPass>& passes,
              const std::vector<torch::Tensor>& possible, std::vector<Sub>& subs) const {
    const int64_t n = static_cast<int64_t>(subs.size());
    auto best = torch::zeros({n}, torch::kFloat64);
    for (size_t i = 0; i < passes.size(); ++i)
      for (int g = 0; g < static_cast<int>(candidates_[i].size()); ++g) {
        const BoundPass* bp = graph_pass(passes[i], g);
        if (!bp) continue;
        // The pass's rows: all subproblems for the router, those it covers for an expert.
        auto rows = pass_rows(passes[i], g, n);
        torch::Tensor in_play;  // [rows] bool: the expert can be selected there
        if (g > 0 && i < possible.size() && possible[i].defined())
          in_play = possible[i].select(1, g - 1).cpu().index_select(0, rows);
        const auto at = rows.accessor<int64_t, 1>();
        for (int k : candidates_[i][static_cast<size_t>(g)]) {
          const auto& nb = bp->nodes[static_cast<size_t>(k)];
          auto l = nb.lo.detach().flatten(1), u = nb.hi.detach().flatten(1);
          auto unstable = l.lt(0) & u.gt(0);
          auto gap = -l * u / (u - l).clamp_min(1e-300);
          if (nb.lo.grad().defined() && nb.hi.grad().defined())
            gap = gap * 1e-6 + nb.lo.grad().flatten(1).abs() * l.abs() +
                  nb.hi.grad().flatten(1).abs() * u.abs();
          gap = torch::where(unstable, gap.detach(), torch::zeros_like(l));
          auto [val, arg] = gap.max(1);
          val = val.cpu(), arg = arg.cpu();
          if (in_play.defined()) val = val.masked_fill(~in_play, 0.0);
          auto v = val.accessor<double, 1>();
          auto a = arg.accessor<int64_t, 1>();
          auto bv = best.accessor<double, 1>();
          for (int64_t r = 0; r < rows.size(0); ++r) {
            const int64_t c = at[r];
            if (!(v[r] > bv[c])) continue;
            bv[c] = v[r];
            auto& s = subs[static_cast<size_t>(c)];
            s.can_split = true;
            s.next = {static_cast<int>(i), g, k, a[r], 0};
          }
        }
      }
  }

  /// The member passes of `subs` (their splits as sign tensors).
  std::vector<forms::MemberPass> split_passes(const std::vector<forms::MemberPass>& root,
                                              const std::vector<Sub>& subs) const {
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
      out.push_back(forms::member_split(root[i], ms, n, route_mask(subs, i)));
    }
    return out;
  }

  /// Whether the subproblems can be split by member i's route: a member with a router,
  /// top-1 (its route constraints enforce the split) or a top-k mixture (each child knows
  /// exactly which experts are selected, docs §22).
  bool routable(size_t i) const {
    if (!cfg_.route_splits || !p_.members[i]->router) return false;
    const auto& m = *p_.members[i];
    const auto form = forms::member_form(m);
    return form == forms::Form::candidate ||
           (form == forms::Form::mixture && m.routing == Routing::top_k && m.top_k < m.experts);
  }

  /// [n, E] bool: the experts each subproblem's route of member i allows (undefined: no
  /// routes).
  torch::Tensor route_mask(const std::vector<Sub>& subs, size_t i) const {
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

  /// Bounds `subs`: their slack and next split; returns the open ones (verified and empty
  /// ones add to the verified mass).
  std::vector<Sub> bound_relu(const std::vector<forms::MemberPass>& root, std::vector<Sub> subs) {
    const int64_t n = static_cast<int64_t>(subs.size());
    auto passes = split_passes(root, subs);
    // Margin rows proven on a parent's region hold on its children's: only the others are
    // bounded again (docs §22).
    if (std::any_of(subs.begin(), subs.end(), [](const Sub& s) { return !s.known.empty(); })) {
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
    // The bounds' sensitivity to the split candidates' intervals steers branching.
    for (size_t i = 0; i < passes.size(); ++i)
      for (int g = 0; g < static_cast<int>(candidates_[i].size()); ++g)
        if (BoundPass* bp = graph_pass(passes[i], g))
          for (int k : candidates_[i][static_cast<size_t>(g)]) {
            auto& nb = bp->nodes[static_cast<size_t>(k)];
            nb.lo.requires_grad_(true), nb.hi.requires_grad_(true);
          }
    const auto& d = passes[0].domain;
    std::vector<torch::Tensor> only;
    for (size_t i = 0; i < p_.members.size(); ++i) only.push_back(route_mask(subs, i));
    auto ev = evaluate(p_, passes, d, labels(n), only);
    auto slack = ev.slack.cpu();
    auto empty = empty_regions(passes, n);
    out_.bounded += n;
    choose(passes, ev.possible_of, subs);
    std::vector<torch::Tensor> possible, sure;
    for (const auto& t : ev.possible_of) possible.push_back(t.cpu());
    for (const auto& t : ev.sure_of) sure.push_back(t.cpu());
    std::vector<torch::Tensor> proven;  // per expert [n, K − 1]
    for (size_t j = 0; j < ev.settled.size(); ++j)
      proven.push_back(
          torch::where(ev.settled[j], ev.margins[j], torch::full_like(ev.margins[j], -kInf)).cpu());
    std::vector<Sub> open;
    for (int64_t c = 0; c < n; ++c) {
      auto& s = subs[static_cast<size_t>(c)];
      s.slack = slack[c].item<double>();
      s.known.clear();
      for (const auto& t : proven) s.known.push_back(t[c].clone());
      s.possible.assign(p_.members.size(), {}), s.sure.assign(p_.members.size(), {});
      for (size_t i = 0; i < possible.size() && i < p_.members.size(); ++i) {
        if (!of(s.route, i).empty()) continue;
        const auto pa = possible[i].accessor<bool, 2>(), sa = sure[i].accessor<bool, 2>();
        for (int64_t j = 0; j < pa.size(1); ++j) {
          if (pa[c][j]) s.possible[i].push_back(j);
          if (sa[c][j]) s.sure[i].push_back(j);
        }
      }
      if (s.slack > 0 || empty[c].item<bool>())
        out_.verified_mass += s.mass;
      else
        open.push_back(std::move(s));
    }
    return open;
  }

  void relu_search() {
    const auto d = ball();
    const auto root = prepare(d, labels(1), true);
    Queue q;
    for (auto& s : bound_relu(root, {Sub{}})) q.push(std::move(s));
    while (!q.empty()) {
      if (!round_fits() || attack_due()) break;
      if (static_cast<int64_t>(q.size()) + cfg_.batch > cfg_.max_queue) break;
      std::vector<Sub> children, stuck;
      while (!q.empty() && (children.empty() ||
                            static_cast<int64_t>(children.size()) + max_children() <= cfg_.batch)) {
        Sub s = q.top();
        q.pop();
        if (auto [member, sets] = route_children(s); !sets.empty()) {
          // A route split: one child per expert set the member's router can select (their
          // regions cover the parent's: every point selects one of them).
          ++out_.route_splits;
          for (auto& set : sets) {
            Sub c = s;
            c.route.resize(p_.members.size());
            c.route[member] = std::move(set), c.depth = s.depth + 1;
            c.mass = s.mass / static_cast<double>(sets.size());
            children.push_back(std::move(c));
          }
          continue;
        }
        if (!s.can_split || s.depth >= cfg_.max_depth) {
          stuck.push_back(std::move(s));
          continue;
        }
        for (double sign : {1.0, -1.0}) {
          Sub c;
          c.splits = s.splits;
          c.splits.push_back(s.next);
          c.splits.back().sign = sign;
          c.route = s.route, c.depth = s.depth + 1, c.mass = s.mass / 2;
          c.known = s.known;
          children.push_back(std::move(c));
        }
      }
      if (children.empty()) {  // nothing left to split: open for good
        for (auto& s : stuck) q.push(std::move(s));
        out_.exhausted = true;
        break;
      }
      ++out_.rounds;
      const auto round_start = Clock::now();
      for (auto& s : bound_relu(root, std::move(children))) q.push(std::move(s));
      last_round_ = Clock::now() - round_start;
      report(q.size(), q.empty() ? 0.0 : q.top().slack);
      for (auto& s : stuck) q.push(std::move(s));
      if (out_.verdict == Verdict::falsified) break;
    }
    open_left(q);
    if (out_.verdict != Verdict::falsified && q.empty()) out_.verdict = Verdict::verified;
  }

  // --- input splits -----------------------------------------------------------------

  void input_search() {
    auto [lo0, hi0] = root_box();
    const auto width0 = (hi0 - lo0)[0];
    const auto free = width0.gt(0);
    const auto scale = torch::where(free, width0, torch::ones_like(width0));
    Queue q;
    std::vector<Sub> stuck;  // open pieces at the depth limit
    Sub root;
    root.lower = lo0, root.upper = hi0;
    q.push(std::move(root));
    bool first = true;
    while (!q.empty()) {
      if (!round_fits() || (!first && attack_due())) break;
      if (static_cast<int64_t>(q.size()) + 2 * cfg_.batch > cfg_.max_queue) break;
      first = false;
      std::vector<Sub> batch;
      while (!q.empty() && static_cast<int64_t>(batch.size()) < cfg_.batch)
        batch.push_back(q.top()), q.pop();
      const int64_t n = static_cast<int64_t>(batch.size());
      std::vector<torch::Tensor> lo, hi;
      for (const auto& s : batch) lo.push_back(s.lower[0]), hi.push_back(s.upper[0]);
      InputDomain d;
      d.lower = torch::stack(lo), d.upper = torch::stack(hi);
      d.x = (d.lower + d.upper) * 0.5;
      d.eps = std::get<0>(((d.upper - d.lower) * 0.5).flatten(1).max(1));
      d.norm = Norm::linf, d.box = false;
      const auto round_start = Clock::now();
      const auto passes = prepare(d, labels(n));
      auto slack = evaluate(p_, passes, d, labels(n)).slack.cpu();
      last_round_ = Clock::now() - round_start;
      out_.bounded += n, ++out_.rounds;
      report(q.size() + static_cast<size_t>(n), slack.min().item<double>());
      // The open pieces' centres on the float32 model (inside the piece when rounding kept them).
      const auto centres = d.x.to(torch::kFloat);
      std::vector<Sub> open;
      for (int64_t c = 0; c < n; ++c) {
        auto& s = batch[static_cast<size_t>(c)];
        s.slack = slack[c].item<double>();
        if (s.slack > 0) {
          out_.verified_mass += s.mass;
          continue;
        }
        const auto xc = centres.narrow(0, c, 1);
        const auto xd = xc.to(torch::kFloat64);
        if (xd.ge(s.lower).all().item<bool>() && xd.le(s.upper).all().item<bool>() &&
            counterexample(xc)) {
          for (int64_t r = c; r < n; ++r) open.push_back(batch[static_cast<size_t>(r)]);
          break;
        }
        open.push_back(std::move(s));
      }
      if (out_.verdict == Verdict::falsified) {
        open.insert(open.end(), stuck.begin(), stuck.end());
        open_left(q, open);
        return;
      }
      for (auto& s : open) {
        if (s.depth >= cfg_.max_depth) {
          out_.exhausted = true;
          stuck.push_back(std::move(s));
          continue;
        }
        auto [lower_half, upper_half] =
            bisect_widest(s.lower, s.upper, free.unsqueeze(0), scale.unsqueeze(0));
        for (const auto& [lo, hi] : {lower_half, upper_half}) {
          Sub c;
          c.lower = lo, c.upper = hi, c.depth = s.depth + 1, c.slack = s.slack, c.mass = s.mass / 2;
          q.push(std::move(c));
        }
      }
    }
    open_left(q, stuck);
    if (out_.verdict != Verdict::falsified && q.empty() && stuck.empty())
      out_.verdict = Verdict::verified;
  }
};

}  // namespace

std::pair<std::pair<torch::Tensor, torch::Tensor>, std::pair<torch::Tensor, torch::Tensor>>
bisect_widest(const torch::Tensor& lower, const torch::Tensor& upper, const torch::Tensor& free,
              const torch::Tensor& scale) {
  auto rel = torch::where(free, (upper - lower) / scale, torch::zeros_like(scale));
  const int64_t dim = rel.flatten().argmax().item<int64_t>();
  const double mid = ((lower.flatten()[dim] + upper.flatten()[dim]) * 0.5).item<double>();
  auto a_upper = upper.clone(), b_lower = lower.clone();
  a_upper.view({-1})[dim] = mid;
  b_lower.view({-1})[dim] = mid;
  return {{lower, a_upper}, {b_lower, upper}};
}

Outcome solve(const Problem& p, const Config& cfg, const Logits& logits, const Attack& attack,
              Clock::time_point deadline) {
  if (p.members.empty() || p.members.size() > 2)
    throw Error(ExitCode::internal, "certify: branch and bound of one member or a dual pair");
  return Solver(p, cfg, logits, attack, deadline).run();
}

}  // namespace moecert::bab
