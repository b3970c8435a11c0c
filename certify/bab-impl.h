// Branch and bound's search (SPEC §4.7, see bab.h), private to certify/: the subproblems;
// what every search shares (bab.cpp: the budget, the attacks between rounds, the
// counterexample, progress) with input splitting; ReLU and route splitting
// (bab-relu-impl.h: bab_relu.cpp, and bab_expertwise.cpp for a mixture's expert-wise
// search). docs/certification.md §22.
#pragma once

#include <limits>
#include <memory>
#include <queue>
#include <utility>
#include <vector>

#include "bab.h"

namespace moecert::bab::detail {

constexpr double kInf = std::numeric_limits<double>::infinity();

/// One ReLU split: unit `unit` (flat, per sample) of node `node` of graph `graph` (0: the
/// router, 1 + j: expert j) of member `member`, restricted to sign·z >= 0.
struct SplitAt {
  int member = 0, graph = 0, node = 0;
  int64_t unit = 0;
  double sign = 0;
};

/// The α-CROWN parameters a region's margin rows were last tuned to (docs §22), per
/// expert: RowParams of its rows and their margin indices k (in other_classes order).
/// A parent's are its children's warm start (shared by them).
struct Tuned {
  std::vector<RowParams> params;
  std::vector<std::vector<int64_t>> k;
};

/// A subproblem: the region restricted by ReLU splits and routes (ReLU mode) or a piece
/// of the root box (input mode), with what its last bound found.
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
  /// The mixture form: [E, K] float64 CPU, per expert settled on a region containing this
  /// one, the bounds of its probability margins there (−inf rows: the others). Such an
  /// expert is not bounded again. Undefined: none.
  torch::Tensor known_prob;
  /// The mixture form, after its bound: [E, K] float64 CPU, every expert's probability
  /// margin bounds on this region, and [E] bool those settled (their children's carry,
  /// carried_prob). Undefined before the bound.
  torch::Tensor prob, settled;
  /// The mixture form: per graph of the member (0: the router, 1 + j: expert j), its
  /// unstable unit whose split promised most when the graph was last bounded on a region
  /// containing this one (score <= 0: none). A graph its children do not bound again
  /// offers that unit (ReluSearch::choose).
  std::vector<std::pair<double, SplitAt>> graph_best;
  std::shared_ptr<const Tuned> warm;  ///< ReLU mode: the warm start (null: CROWN's slopes)
  /// Expert-wise search (Config::expertwise): the expert whose tree of splits this leaf
  /// belongs to, and its group (a route set of the root, or the root); -1: none.
  int expert = -1, group = -1;
};
struct Worse {  // the lowest slack on top
  bool operator()(const Sub& a, const Sub& b) const { return a.slack > b.slack; }
};
using Queue = std::priority_queue<Sub, std::vector<Sub>, Worse>;

/// The problem's region as an input domain: the ε-ball around x (∩ [0, 1] with the box).
InputDomain ball(const Problem& p);
/// The root box of the problem's region (L∞): [x − ε, x + ε], ∩ [0, 1] with the box.
std::pair<torch::Tensor, torch::Tensor> root_box(const Problem& p);

/// The warm starts of a ReLU search's subproblems (bab_warm.cpp), for a member in a
/// logit-domain form: each subproblem's tuned parameters, kept while the bytes they hold
/// stay within a cap, are its children's start (shared by them; released with the last).
class WarmStarts {
 public:
  WarmStarts(int64_t classes, int64_t cap_bytes) : K1_(classes - 1), cap_(cap_bytes) {}
  WarmStarts(const WarmStarts&) = delete;  // the kept parameters' deleters refer to it
  WarmStarts& operator=(const WarmStarts&) = delete;
  /// MemberPass::warm and warm_slot of `pass` for `subs`: their parents' tuned parameters,
  /// one bank row per distinct parent row.
  void apply(forms::MemberPass& pass, const std::vector<Sub>& subs) const;
  /// Each subproblem's tuned parameters from its evaluation (Evaluation::tuned), kept as
  /// its warm start (Sub::warm; none beyond the cap).
  void keep(const forms::Evaluation& ev, std::vector<Sub>& subs);

 private:
  int64_t K1_, cap_, held_ = 0;  // K − 1; the bytes allowed; those held
};

/// Certificate slack of every region of the passes (> 0: verified), and the experts each
/// member's router can select there; `only`: per member, its route splits (forms' `only`).
forms::Evaluation evaluate(const Problem& p, const std::vector<forms::MemberPass>& passes,
                           const InputDomain& d, const torch::Tensor& labels,
                           const std::vector<torch::Tensor>& only = {});

/// One search of a problem: its budget, its attacks and what it has found.
class Search {
 public:
  Search(const Problem& p, const Config& cfg, const Logits& logits, const Attack& attack,
         Clock::time_point deadline, Float32Errors fp32);
  virtual ~Search() = default;
  /// An attack on the region, then the search (when the attack found nothing).
  Outcome run();

 protected:
  /// Branching, until no subproblem is open, a counterexample, or the budget's end.
  virtual void search() = 0;

  /// A progress line on stderr every 5 s (Config::progress): subproblems, their rate, the
  /// queue, the verified share and the worst open slack; and a point of Outcome::trace.
  void report(size_t queued, double worst);
  /// Adds a point to Outcome::trace (TraceBuilder): now, with `worst` its worst open slack.
  void trace(double worst);
  /// Whether another round fits in the budget (the last round's length as its estimate):
  /// a round is not interrupted, so one that cannot end before the deadline is not begun.
  bool round_fits() const { return Clock::now() + last_round_ <= deadline_; }
  /// Whether x32 (float32 [1, C, H, W]), moved into the region (into_region), lies in
  /// it and the model misclassifies it; records it as the counterexample when so, found
  /// by `by` (Outcome::found_by; `round`: the attack round).
  bool counterexample(const torch::Tensor& x32, Outcome::Found by, int round = -1);
  /// A float32 point of the region near x32: attacks project onto the float32 ball,
  /// whose rounded ends can lie just outside the float64 region (x ± ε); L∞ clamps to
  /// the region's float32 box rounded inwards, L2 scales the offset into the ball.
  torch::Tensor into_region(const torch::Tensor& x32) const;
  /// An attack round when its interval has passed since the last one (from `starts_`)
  /// and attack_allowed allows it.
  bool attack_due();
  /// The minimisers of the open subproblems with the lowest slack (Evaluation::primal,
  /// `slack` [n] of the batch, `open` which of them stay open): each is checked on the
  /// model at once, and the worst kStarts become the next attack round's starts.
  bool check_primal(const torch::Tensor& primal, const std::vector<double>& slack,
                    const std::vector<bool>& open);
  /// The member passes of regions `d`; `root`: the root of ReLU splits, whose
  /// intermediate bounds every subproblem inherits (optimised by Config::intermediate_steps).
  std::vector<forms::MemberPass> prepare(const InputDomain& d, const torch::Tensor& labels,
                                         bool root = false) const;
  torch::Tensor labels(int64_t n) const;
  /// Counts a round of splits about to be bounded; the first one ends the root's time
  /// (Outcome::root_seconds).
  void round_begins();
  /// Records the open share and the worst open slack: the queue's subproblems and `extra`.
  void open_left(const Queue& q, const std::vector<Sub>& extra = {});
  /// Records the lowest slack of the open subproblems (+inf: none open; Outcome::worst_slack).
  void worst_left(double worst);

  const Problem& p_;
  const Config& cfg_;
  Clock::time_point deadline_;
  BoundOptions opt_;
  Outcome out_;
  Clock::duration last_round_{0};  // how long the last round of bounding took
  static constexpr int64_t kStarts = 8;
  torch::Tensor starts_;  // [m, C, H, W] float32: the next attack round's starts

 private:
  bool try_attack(int round);

  const Logits& logits_;
  const Attack& attack_;
  Clock::time_point start_ = Clock::now(), last_report_ = Clock::now(), last_attack_;
  TraceBuilder trace_;
  int attack_round_ = 0;
  double attack_seconds_ = 0;  // the attack rounds' seconds so far
};

/// Branch and bound by ReLU and route splits (bab_relu.cpp).
Outcome relu_search(const Problem& p, const Config& cfg, const Logits& logits, const Attack& attack,
                    Clock::time_point deadline);

}  // namespace moecert::bab::detail
