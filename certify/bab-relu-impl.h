// Branch and bound by ReLU and route splits, private to certify/ (see bab-impl.h): the
// search's class, whose subproblems are regions restricted by split ReLU units and fixed
// routes (bab_relu.cpp: one tree over every graph's splits, bounded in batches by
// α-CROWN with β-CROWN multipliers), and the expert-wise search of a mixture
// (bab_expertwise.cpp: one tree of splits per expert). docs/certification.md §22.
#pragma once

#include <torch/torch.h>

#include <algorithm>
#include <set>
#include <tuple>
#include <utility>
#include <vector>

#include "bab-impl.h"

namespace moecert::bab::detail {

/// Regions some node of which has an empty interval: the splits contradict each other
/// there, and the region is empty. [n] bool
torch::Tensor empty_regions(const std::vector<forms::MemberPass>& passes, int64_t n);
/// Each subproblem's slack from its evaluation (also returned, in order) and the rows it
/// proved (Sub::known).
std::vector<double> take_slacks(const forms::Evaluation& ev, std::vector<Sub>& subs);

/// Branch and bound by ReLU and route splits: a queue of subproblems ordered by slack,
/// or with expertwise() one tree of splits per expert.
class ReluSearch : public Search {
 public:
  ReluSearch(const Problem& p, const Config& cfg, const Logits& logits, const Attack& attack,
             Clock::time_point deadline);

 private:
  std::vector<std::vector<std::vector<int>>> candidates_;  // [member][graph] split nodes
  WarmStarts warm_{p_.members[0]->classes, cfg_.warm_bytes};
  /// rows_only(): per expert [1, K], the root's lower bounds of ĥ_k − ĥ_y (every
  /// subproblem's MemberPass::known_dlo).
  std::vector<torch::Tensor> dlo_;
  std::set<std::pair<int, int>> split_graphs_;  // (member, graph) of every ReLU split made

  /// Whether subproblems carry warm starts: ReLU splits of a single member (the margin
  /// rows a parent tuned are its children's; a mixture's too, with rows_only()).
  bool warm() const { return cfg_.warm_start && p_.members.size() == 1; }

  /// Whether a single member in the mixture form bounds its margin rows only
  /// (MemberPass::margin_rows_only): then its rows carry and warm-start as a logit form's.
  bool rows_only() const {
    return p_.members.size() == 1 && forms::member_form(*p_.members[0]) == forms::Form::mixture;
  }

  /// Whether subproblems carry the experts settled on their parents: ReLU splits of a
  /// member in the mixture form.
  bool carry() const { return cfg_.carry_settled && rows_only(); }

  /// Whether the children of a ReLU split in a mixture bound only the split graph again
  /// (Config::carry_untouched): the other experts' bounds are their parent's.
  bool untouched() const { return carry() && cfg_.carry_untouched; }

  /// Whether the search keeps one tree of splits per expert (Config::expertwise, docs
  /// §22): a single member in the mixture form whose router has no unit to split.
  bool expertwise() const { return cfg_.expertwise && untouched() && candidates_[0][0].empty(); }

  /// Expert-wise search: one expert's tree of splits in a group, its open leaves and the
  /// least bounds ([K] CPU, +inf: none) and the mass of its closed ones.
  struct Tree {
    bool on = false;
    std::vector<Sub> open;
    torch::Tensor closed_low;
    double closed = 0;
  };
  /// A group: the root's region, or one route set of it. `low` [E, K] CPU: each expert's
  /// probability margin bounds over the group's region (the least over its tree's leaves).
  struct Group {
    std::vector<std::vector<int64_t>> route;  // Sub::route
    double mass = 0;
    std::vector<Tree> trees;  // per expert
    torch::Tensor low;
    /// The mixture's program on the group's region (set_programs): the router's weight
    /// bounds [E] CPU float64, the float32 allowance, and whether no point of the region
    /// selects the group's route set (every slack +inf). The router is bounded over the
    /// group's region alone, so they hold for every leaf of it.
    torch::Tensor a_lo, a_hi;
    double allowance = 0;
    bool empty = false;
    /// Verified: some tree has every leaf closed (or empty).
    bool done() const {
      return std::any_of(trees.begin(), trees.end(),
                         [](const Tree& t) { return t.on && t.open.empty(); });
    }
  };

  // The expert-wise search (bab_expertwise.cpp).

  /// The least bounds of a tree's expert over all its leaves, closed and open.
  static torch::Tensor tree_low(const Tree& t);

  static void close_leaf(Tree& t, const Sub& s);

  /// Bounds expert-wise leaves (each its own expert, the others at their group's bounds)
  /// and places them in their trees: closed when their slack is positive (or their
  /// region empty), open otherwise, with their next split.
  void bound_leaves(const std::vector<forms::MemberPass>& root, std::vector<Sub> subs,
                    std::vector<Group>& groups);

  /// Bounds the router over each group's region once (with no expert bounded) and keeps
  /// its program (Group::a_lo, a_hi, allowance, empty).
  void set_programs(const std::vector<forms::MemberPass>& root, std::vector<Group>& groups);

  /// The slack with no expert bounded of a region of group `group_of[c]` whose experts'
  /// bounds are `known[c]` ([E, K]): the group's program (forms::mixture_lower with
  /// the group's weight bounds), on the CPU.
  std::vector<double> program_slacks(const std::vector<Group>& groups,
                                     const std::vector<int64_t>& group_of,
                                     const torch::Tensor& known) const;

  /// What each open leaf `at` (group, expert, index in the tree's open leaves) is bounded
  /// with, [n, E, K] CPU float64: its group's bounds of the other experts, its own of its
  /// expert (for a child: its parent's, a floor of its own). Filled in one pass.
  torch::Tensor knowns(const std::vector<Group>& groups,
                       const std::vector<std::tuple<size_t, size_t, size_t>>& at) const;

  /// Bounds every open leaf of the groups not done again with no expert bounded (its own
  /// expert at its bounds, the others at their group's, which only rise): the group's
  /// program (program_slacks); closes those whose slack is now positive.
  void retest(std::vector<Group>& groups);

  /// Per group (not done) and expert with a tree: how much the group's slack rises when
  /// that expert's bounds are raised to 1 (a perfect expert), with the others at theirs;
  /// 0 elsewhere. Steers which trees are split.
  std::vector<std::vector<double>> gains(const std::vector<Group>& groups) const;

  /// The expert-wise search (docs §22): the root, split by route when its router can
  /// select more than one expert set, then per group one tree of ReLU splits per expert
  /// it can select. A leaf is closed when the mixture's program, with its expert's
  /// bounds on the leaf and every other expert's over the group's region, is positive;
  /// a group is verified when one of its trees has every leaf closed.
  void search_expertwise(const std::vector<forms::MemberPass>& root);

  /// An open leaf of the expert-wise search: its slack, group, expert and index in its
  /// tree's open leaves.
  using LeafAt = std::tuple<double, size_t, size_t, size_t>;
  /// The groups of the expert-wise search from the root's bounded heads (the root, or its
  /// route sets): per head, a tree per expert it can select, whose one open leaf is the
  /// head (its next unit the best one of that expert's graph).
  std::vector<Group> plant(const std::vector<Sub>& heads);
  /// The open leaves of the groups not done that can be split, with their count (`open`,
  /// all open leaves) and lowest slack (`worst`).
  std::vector<LeafAt> open_leaves(const std::vector<Group>& groups, size_t& open,
                                  double& worst) const;
  /// The leaves of `cand` a round splits (half a batch): given to the trees in proportion
  /// to their gains (the lowest slack first in each), the rest to the lowest slack anywhere.
  std::vector<LeafAt> pick_leaves(const std::vector<Group>& groups, std::vector<LeafAt> cand) const;
  /// Splits `leaves` on their next unit: their children (floored at their bounds), the
  /// leaves leaving their trees.
  std::vector<Sub> split_leaves(std::vector<Group>& groups, std::vector<LeafAt> leaves);

  /// Records the verified and open shares of the expert-wise search (`base`: the route
  /// sets verified whole; per group, all of it when done, else its tree with most
  /// closed) and the worst open slack (the open leaves of the groups not done); returns
  /// whether every group is done.
  bool tally(const std::vector<Group>& groups, double base);
  /// Outcome::open_program: the least program of the open groups, at its least class.
  void record_open_program(const std::vector<Group>& groups);

  // Splits, passes and the queue's search (bab_relu.cpp).

  static const std::vector<int64_t>& of(const std::vector<std::vector<int64_t>>& v, size_t i) {
    static const std::vector<int64_t> none;
    return i < v.size() ? v[i] : none;
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

  /// A route split of `s`: one child per expert set `member`'s router can select (their
  /// regions cover the parent's: every point selects one of them), added to `children`.
  void route_split(const Sub& s, size_t member, std::vector<std::vector<int64_t>> sets,
                   std::vector<Sub>& children);

  /// The most children one subproblem has: 2, or the expert sets of a route split (at
  /// most a batch: a route split with more children is not made).
  int64_t max_children() const;

  /// A route split's children: the first member (standard first) whose route is not
  /// fixed and has more than one expert set its router may select on the subproblem
  /// (top-1: each possible expert; top-k: each k-set between the sure and the possible
  /// experts), and those sets. Every point of the region selects one of them, so their
  /// regions cover the parent's. No sets when no member has more than one, or only
  /// more than a batch.
  std::pair<size_t, std::vector<std::vector<int64_t>>> route_children(const Sub& s) const;

  /// route_children's sets of member i.
  std::vector<std::vector<int64_t>> route_sets(const Sub& s, size_t i) const;

  /// The unstable unit of every region of the passes (over the router and the experts it
  /// can select) whose split promises most: the first-order change of the bound when
  /// its interval's end moves to 0 in either child, |∂B/∂l|·|l| + |∂B/∂u|·u (the
  /// gradients of the α-β optimisation's bounds with respect to the intervals, summed
  /// over its steps), with the relaxation gap −l·u / (u − l) breaking ties. Regions
  /// without an unstable unit get can_split = false.
  ///
  /// With untouched(), a subproblem that did not bound a graph of the member (its parent's
  /// bounds carried) offers that graph's unit from the last region that bounded it
  /// (Sub::graph_best), unless the expert is settled (`settled` [n, E] bool) or cannot be
  /// selected; each subproblem's graph_best is updated for its children. `leaves`:
  /// expert-wise leaves, whose unit comes from their own expert's fresh bounds alone.
  void choose(const std::vector<forms::MemberPass>& passes,
              const std::vector<torch::Tensor>& possible, std::vector<Sub>& subs,
              std::vector<std::vector<std::pair<double, SplitAt>>>* ranked = nullptr,
              const torch::Tensor& settled = {}, bool leaves = false) const;
  /// What choose finds per subproblem: its best score so far, and (untouched()) per graph
  /// its best fresh unit (score 0: none) and whether the graph was bounded there.
  struct Choice {
    std::vector<double> best;
    std::vector<std::vector<std::pair<double, SplitAt>>> fresh;
    std::vector<std::vector<char>> bounded;
  };
  /// choose's best few units of one node (`gap` [rows, units] its scores; `rows` the
  /// subproblems they stand for; `in_play` [rows] bool, undefined: all) into `ranked`.
  void rank_node(const torch::Tensor& gap, const torch::Tensor& rows, const torch::Tensor& in_play,
                 const SplitAt& node,
                 std::vector<std::vector<std::pair<double, SplitAt>>>& ranked) const;
  /// choose with untouched(): every subproblem's graph_best from the graphs it bounded,
  /// and the units of those it did not bound offered from graph_best.
  void inherit_units(const std::vector<torch::Tensor>& possible, const torch::Tensor& settled,
                     std::vector<Sub>& subs, Choice& ch) const;

  /// The member passes of `subs` (their splits as sign tensors; `need`: per member, the
  /// experts each subproblem bounds, undefined: all).
  std::vector<forms::MemberPass> split_passes(const std::vector<forms::MemberPass>& root,
                                              const std::vector<Sub>& subs,
                                              const std::vector<torch::Tensor>& need) const;

  /// [n, E] bool: the experts each subproblem's route of member i allows (undefined: no
  /// routes).
  torch::Tensor route_mask(const std::vector<Sub>& subs, size_t i) const;

  /// The member passes of `subs` with what they carry (proven rows, settled experts, warm
  /// starts); `only`: per member, the experts each route allows; `carried` (when given):
  /// adds the settled experts the routes allow, which are not bounded. `bound_only` [n, E]
  /// bool (expert-wise leaves): the experts each subproblem bounds, whatever it carries
  /// (a bounded expert's carried bounds are a floor of its new ones).
  std::vector<forms::MemberPass> batch_passes(const std::vector<forms::MemberPass>& root,
                                              const std::vector<Sub>& subs,
                                              std::vector<torch::Tensor>& only,
                                              int64_t* carried = nullptr,
                                              const torch::Tensor& bound_only = {}) const;

  /// Tracks the split candidates' intervals in `passes`: the bounds' sensitivity to them
  /// steers branching (choose).
  void track(std::vector<forms::MemberPass>& passes) const;

  /// Filtered smart branching (De Palma et al., 2021): for every subproblem in `subs`
  /// with more than one candidate in `ranked` (choose's best few per node), both
  /// children of each candidate are bounded at once with the subproblem's tuned
  /// parameters and no optimisation step, and the candidate whose worse child is best
  /// becomes its next split (ties: the first-order score's order).
  void rerank(const std::vector<forms::MemberPass>& root, std::vector<Sub>& subs,
              std::vector<std::vector<std::pair<double, SplitAt>>>& ranked);

  /// Bounds `subs`: their slack and next split; returns the open ones (verified and empty
  /// ones add to the verified mass).
  std::vector<Sub> bound_relu(const std::vector<forms::MemberPass>& root, std::vector<Sub> subs);

  void search() override;
};

}  // namespace moecert::bab::detail
