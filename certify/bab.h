// Complete verification of one sample at one ε by branch and bound (SPEC §4.7), private
// to certify/: subproblems (the region restricted by ReLU splits, or pieces of the input
// box), each bounded by α-CROWN with β-CROWN multipliers for its splits and its route
// constraints, pruned when its certificate slack is positive, branched on the unstable
// ReLU unit with the largest relaxation gap (or the widest input), with attacks on the
// region between rounds. Proofs: docs/certification.md §22.
#pragma once

#include <chrono>
#include <functional>
#include <limits>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "forms.h"
#include "moecert/certify.h"

namespace moecert::bab {

using Clock = std::chrono::steady_clock;

using Split = BabSplit;

struct Config {
  int64_t batch = 64;           ///< subproblems bounded in one pass (each round)
  int64_t max_queue = 1 << 16;  ///< open subproblems at most (memory bound)
  Split split = Split::automatic;
  int64_t input_max_free = 16;  ///< automatic: input splits with at most this many free inputs
  int max_depth = 64;           ///< splits of one subproblem at most
  int alpha_steps = 20;         ///< α-β optimisation steps of the root's bound
  /// α-β optimisation steps of every other subproblem of a ReLU or route search when
  /// they start from their parent's tuned parameters (warm_start; else alpha_steps).
  int sub_steps = CertifyConfig{}.bab_steps;
  /// Steps of α-CROWN on the intermediate bounds of the root (ReLU splits; 0: CROWN's).
  int intermediate_steps = CertifyConfig{}.bab_intermediate_steps;
  double attack_interval = 2.0;  ///< seconds of branching between two attack rounds
  /// Attack rounds after round 0 that pass once through the objectives (0: not known).
  /// Once they have run, a round is begun only while the attacks' seconds stay within
  /// `attack_share` of the search's (attack_allowed).
  int64_t attack_cycle = 0;
  double attack_share = 0.05;
  bool route_splits = true;  ///< split by each member router's selection (top-1, top-k mixture)
  /// ReLU splits: children start their α-β optimisation from their parent's tuned
  /// parameters (β-CROWN's warm start); false: from CROWN's slopes and zero multipliers.
  bool warm_start = true;
  int64_t warm_bytes = int64_t{1} << 30;  ///< the warm starts held at most (then cold)
  /// ReLU splits: the candidate units whose children are bounded before a split is
  /// chosen (filtered smart branching; <= 1: the first-order score alone), taken from
  /// the best `fsb_per_node` of every split node.
  int64_t fsb_candidates = 0, fsb_per_node = 4;
  /// ReLU splits of a mixture: an expert settled on a subproblem (its bounds alone would
  /// certify it) is not bounded again on its children, which take its bounds (docs §22).
  bool carry_settled = true;
  /// ReLU splits of a mixture: the children of a split on one graph (the router or an
  /// expert) bound only that graph again; every other expert's bounds are its parent's,
  /// which the split leaves as they were (docs §22).
  bool carry_untouched = true;
  /// ReLU splits of a single mixture whose router has no unit to split: one tree of
  /// splits per expert, each leaf bounded with the other experts' bounds over the whole
  /// region (the least over their leaves), in place of one tree over all experts'
  /// splits together (docs §22).
  bool expertwise = true;
  /// ReLU splits of a single mixture: a margin row carries to a subproblem's children
  /// (bounded no more) only when its bound is above this too, in logits (docs §22).
  double mixture_row_settled = 1;
  bool input_planes = true;  ///< BoundOptions::input_planes of every pass
  std::string progress;      ///< when not empty: the label of a progress line every 5 s
};

enum class Verdict { verified, falsified, unknown };

/// What branch and bound found. The masses count subproblems as 2^-depth: the verified
/// ones (and empty ones) and the open ones (queued, or not yet examined when a
/// counterexample ended the search) sum to 1.
struct Outcome {
  Verdict verdict = Verdict::unknown;
  torch::Tensor
      counterexample;  ///< [1, C, H, W] float32: a point of the region the model misclassifies
  double distance = std::numeric_limits<double>::infinity();  ///< its distance to x
  /// What found the counterexample: an attack (round `found_round` of the attacks on the
  /// region, 0 the one before the search), a subproblem bound's minimiser
  /// (Evaluation::primal) or an input piece's centre; none when none was found.
  enum class Found { none, attack, minimiser, centre } found_by = Found::none;
  int found_round = -1;
  int64_t bounded = 0;  ///< subproblems bounded (the root included)
  int64_t rounds = 0;
  int64_t route_splits = 0;  ///< subproblems split by route
  int64_t screened = 0;      ///< candidate children bounded to choose splits (fsb)
  int64_t carried = 0;  ///< experts a subproblem's route allows, not bounded: settled on a parent
                        ///< or left as they were by its ReLU split
  int64_t graphs_split = 0;  ///< the graphs (routers, experts) some ReLU split fixed a unit of
  int64_t trees =
      0;  ///< the expert-wise search's trees of splits (0: one tree, Config::expertwise)
  double verified_mass = 0, open_mass = 0;
  /// The lowest slack of a subproblem left open when the search ended (NaN: none was).
  double worst_slack = std::numeric_limits<double>::quiet_NaN();
  double seconds = 0;
  /// Of `seconds`, those before the first round of splits began: the attack before the
  /// search and, with ReLU splits, the root's bounds (its optimised intermediate bounds,
  /// a mixture's lower ends, the root's route split). The whole search when no round ran.
  double root_seconds = 0;
  bool exhausted = false;  ///< some open subproblem had nothing left to split
  /// The search's course: after rounds of splits, its subproblems, verified share and
  /// worst open slack (the progress line's), at most kTracePoints of them (every other one
  /// dropped when full, so they stay spread over the search), and a last one when it
  /// ended (its outcome's). A worst slack that has stopped rising suggests more time
  /// would not decide the search (docs §22).
  struct Point {
    double seconds = 0;
    int64_t subproblems = 0;
    double verified_share = 0;
    double worst_slack = std::numeric_limits<double>::quiet_NaN();  ///< NaN: none open
  };
  std::vector<Point> trace;
  static constexpr size_t kTracePoints = 32;
  /// A mixture's expert-wise search left open (docs §22): the program of the open group
  /// whose value is least, at the class k where it is least. Each expert's least bound
  /// of its probability margin f_y − f_k over the group's region (−1 where it has none:
  /// the trivial bound), and the router's weight bounds there: what holds the search open.
  struct OpenProgram {
    int64_t cls = -1;            ///< k; -1: none (another search, or nothing open)
    std::vector<int64_t> route;  ///< the group's expert set (empty: the root's region)
    std::vector<double> weight_lo, weight_hi, margin_low;  ///< per expert
    /// The program's least value, its float32 allowance taken (at most the worst slack).
    double value = std::numeric_limits<double>::quiet_NaN();
  } open_program;
};

/// The results' form of an OpenProgram (null when it has no class).
nlohmann::json open_program_json(const Outcome::OpenProgram& o);
/// The results' form of a trace: one object per point (a NaN slack as null).
nlohmann::json trace_json(const std::vector<Outcome::Point>& trace);
/// Builds an Outcome::trace that stays short and spread over a search: points on a grid
/// of every `stride`-th call (every other one dropped and the stride doubled when the
/// trace is full, the first kept), and the latest point whatever its place, in place of
/// the last one when that was off the grid or no subproblem was bounded since.
class TraceBuilder {
 public:
  void add(std::vector<Outcome::Point>& trace, const Outcome::Point& p);

 private:
  int64_t stride_ = 1, calls_ = 0;
  bool provisional_ = false;  // the trace's last point is off the grid
};
/// The worst open slack of the trace's last point at or before `seconds` (NaN: none).
double slack_at(const std::vector<Outcome::Point>& trace, double seconds);

/// One sample and one ε of a member (or a dual-model's two members, standard first).
struct Problem {
  std::vector<const forms::MemberGraphs*> members;
  double alpha = 1;  ///< a dual-model's α
  torch::Tensor x;   ///< [1, C, H, W] float64
  int64_t label = 0;
  double eps = 0;
  Norm norm = Norm::linf;
  bool box = true;
  bool fp32 = true;  ///< the float32 allowances (false: exact arithmetic)
};

/// Input splitting (docs §21, §22): the box [lower, upper] halved across its widest
/// coordinate relative to the root box's widths `scale` (only `free` coordinates, those
/// of positive root width). All of one shape; returns the two halves' (lower, upper).
std::pair<std::pair<torch::Tensor, torch::Tensor>, std::pair<torch::Tensor, torch::Tensor>>
bisect_widest(const torch::Tensor& lower, const torch::Tensor& upper, const torch::Tensor& free,
              const torch::Tensor& scale);

/// The float32 model's logits at float32 points [n, C, H, W] -> [n, K].
using Logits = std::function<torch::Tensor(const torch::Tensor&)>;
/// An attack on the problem's region, round r: a float32 point [1, C, H, W] of the
/// region, or undefined when it found none. `starts` ([m, C, H, W] float32, or
/// undefined: random starts of its own) are points where the bounds of the worst open
/// subproblems are least (their minimisers, Evaluation::primal). A point within the
/// float32 rounding of the region's edge (an attack's projection onto the float32 ball)
/// is moved into the region before it is judged.
using Attack = std::function<torch::Tensor(int round, const torch::Tensor& starts)>;

/// Which objective attack round `round` runs (certify's rounds, docs §22): round 0 the
/// cross-check's APGD (untargeted); round r >= 1 the (r − 1)-th, cyclically, of the
/// `aware` MoE-aware objectives followed by `targets` targeted ones (the other classes,
/// the most likely first); `cycle` counts the passes through them (fresh random starts).
struct AttackRound {
  enum class Kind { untargeted, aware, targeted } kind = Kind::untargeted;
  int64_t index = 0, cycle = 0;
};
AttackRound attack_round(int round, int64_t aware, int64_t targets);

/// Whether an attack round may begin once the interval has passed (docs §22): always
/// while the rounds run so far (`done`, after round 0) have not passed once through the
/// `cycle` objectives, then only while the attacks' `attack_seconds` are at most `share`
/// of the search's `elapsed` seconds.
bool attack_allowed(int done, int64_t cycle, double attack_seconds, double elapsed, double share);

Outcome solve(const Problem& p, const Config& cfg, const Logits& logits, const Attack& attack,
              Clock::time_point deadline);

}  // namespace moecert::bab
