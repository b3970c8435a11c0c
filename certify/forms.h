// MoE-aware certificate forms from bound propagation (SPEC §4.6), private to
// certify/: for one member (an MoE or a dense model) over a batch of regions, the
// router-logit differences, the experts that can be selected, logit-margin and
// probability-margin lower bounds; the forms `margin` (dense), `candidate` (top-1),
// `mixture` (soft and top-k > 1) and `dual`; and the float32 allowances that make
// them hold for the model as LibTorch evaluates it. Proofs: docs/certification.md §13–§14.
#pragma once

#include <optional>

#include "moecert/bounds.h"
#include "moecert/models.h"

namespace moecert::forms {

/// The compiled graphs of one member.
struct MemberGraphs {
  int64_t experts = 1, classes = 0, top_k = 1;
  Routing routing = Routing::top_k;
  std::optional<BoundGraph> router;  ///< none for a dense model
  std::vector<BoundGraph> nets;      ///< one per expert
};
/// From the member's spec and its float64 layer graphs (router: empty for a dense model).
MemberGraphs member_graphs(const ModelSpec& s, const LayerGraph& router,
                           const std::vector<LayerGraph>& experts);

/// Which form a member (or the dual pair) is certified with.
enum class Form { margin, candidate, mixture, dual };
const char* form_name(Form f);
/// The form of a single member: margin (E = 1), candidate (top-1), mixture (else).
Form member_form(const MemberGraphs& m);

/// The intermediate bounds of one member over a batch of regions (a full pass):
/// the router's pass and, for every expert that can be selected on some region, its
/// pass over those samples. Probes at any ε <= the pass's ε per sample reuse them.
struct MemberPass {
  const MemberGraphs* m = nullptr;
  InputDomain domain;  ///< the regions of the intermediate bounds
  std::optional<BoundPass> router;
  std::vector<std::optional<BoundPass>> experts;
  std::vector<torch::Tensor> rows;  ///< [n_j] int64: the batch positions expert j's pass covers
  bool fp32 = true;                 ///< apply the float32 allowances (false: exact arithmetic)
  /// Top-1 routers (add_route_constraints): per expert j, linear constraints [n, ...] that
  /// hold wherever the router selects j; expert j's bounds then cover only its route.
  /// Top-k mixtures: the same rows (g_t − g_j for t != j), which hold where j is selected
  /// and t is not: member_evaluate applies them on route-set regions only. Empty: none.
  std::vector<InputConstraints> route;
  /// Branch and bound (docs §22), logit-domain forms: per expert j, [n, K − 1] float64
  /// lower bounds of the float32 margins ĥ_y − ĥ_k (k in other_classes order) known from
  /// a region containing this one; a row with a finite one is not bounded again and takes
  /// it, the others (−inf) are bounded. Undefined (or empty): every row is bounded.
  std::vector<torch::Tensor> known_low;
  /// Branch and bound, logit-domain forms with known_low: per expert j, warm starts of
  /// its margin rows (docs §22): `warm_slot[j]` [n, K − 1] int64, the row of `warm[j]`
  /// (a bank of RowParams) each margin row starts from (−1: CROWN's slopes). With it,
  /// the evaluation returns the rows' tuned parameters (Evaluation::tuned). Empty: none.
  std::vector<RowParams> warm;
  std::vector<torch::Tensor> warm_slot;
  /// Branch and bound, the mixture form: per expert j, [n, K] float64 lower bounds of its
  /// float32 probability margins F_j^y − F_j^k known from a region containing this one
  /// (−inf: none). Where expert j's pass does not cover a region they stand for its
  /// bounds there (instead of the trivial −1); where it does, the larger of the two
  /// counts. Empty: none.
  std::vector<torch::Tensor> known_prob;
  /// The mixture form: bound only the margin rows ĥ_y − ĥ_k (the upper ends of
  /// ĥ_k − ĥ_y), taking the lower ends as −∞ (docs §13.3: a larger box of the logit
  /// differences, so a bound no larger); the rows then take known_low, warm starts and
  /// primal points as in the logit-domain forms, and the evaluation reports margins and
  /// settled rows. Branch and bound's ReLU splits set it.
  bool margin_rows_only = false;
  /// With margin_rows_only: a row counts as settled (Evaluation::settled) only when its
  /// bound is above this as well as above the tie allowance.
  double row_settled = 0;
  /// With margin_rows_only: per expert j, [1 or n, K] float64 lower bounds of the float32
  /// ĥ_k − ĥ_y (0 at y) known from a region containing this one, which stand for the
  /// lower ends left out (branch and bound: the root's, difference_lower). Empty: −∞.
  std::vector<torch::Tensor> known_dlo;
};
/// Per expert j of the pass: [n, K] float64 lower bounds of the float32 ĥ_k − ĥ_y on
/// each region its pass covers (0 at y; −∞ elsewhere and for experts without a pass).
std::vector<torch::Tensor> difference_lower(const MemberPass& p, const torch::Tensor& labels);
/// Rows `idx` [r] int64 of every tensor of `q` (a copy, not a view).
RowParams param_rows(const RowParams& q, const torch::Tensor& idx);
/// With `seed` (a pass of the same member whose regions contain these; `seed_index`
/// [n] the positions of this batch's samples in its batch), the router's and every
/// expert's pass start from what the seed's know (bound_forward's seed); an expert
/// whose seed pass does not cover all its samples here starts afresh.
MemberPass member_prepare(const MemberGraphs& m, const InputDomain& d, const torch::Tensor& labels,
                          const BoundOptions& opt, bool fp32, const MemberPass* seed = nullptr,
                          const torch::Tensor& seed_index = {});

/// Branch and bound (docs §22): the ReLU splits of a member's subproblems, per graph
/// (0: the router, 1 + j: expert j), per node [n, *shape] signs (undefined: none).
using MemberSplits = std::vector<std::vector<torch::Tensor>>;

/// The member's pass over n subproblems of `root`'s single sample: every graph's pass is
/// bound_split of the root's with its splits (`splits` may be shorter than the graphs,
/// or empty: no split there); the root's route constraints carry over.
/// With `need` [n, E] bool, expert j's pass covers only the subproblems where need[:, j].
MemberPass member_split(const MemberPass& root, const MemberSplits& splits, int64_t n,
                        const torch::Tensor& need = {});

/// A top-1 router's route constraints (docs §22): where the float32 router selects
/// expert j, ĝ_t <= ĝ_j for every t; with a linear lower bound A·x + b <= g_t − g_j over
/// the region (exact for an affine router) and |(ĝ_t − ĝ_j) − (g_t − g_j)| <= err, every
/// such point satisfies A·x <= err − b. Fills p.route for a top-1 or top-k member with a
/// router (α-CROWN bounds then enforce them; a top-k member's rows only on route-set
/// regions, where j is selected and t is not); nothing otherwise.
void add_route_constraints(MemberPass& p);

/// A top-k mixture member's route constraints on route-set regions: `only` [n, E] bool
/// (rows with k experts: the region's points where the router selects exactly those),
/// per expert j the pass's rows g_t − g_j for the t outside the set where j is in it,
/// the others 0 <= 0 (docs §22).
std::vector<InputConstraints> route_set_constraints(const MemberPass& p, const torch::Tensor& only);

/// Per-sample certificate slack of a form at regions inside the pass's (> 0 certifies
/// the region). `labels` [n]. The dual form takes both members' passes and α.
/// probs: also probability-margin bounds (the mixture and dual forms need them).
struct Evaluation {
  torch::Tensor slack;     ///< [n]
  torch::Tensor possible;  ///< [n, E] bool: experts the router can select (of the form's member)
  /// Per member (one; a dual-model's standard, then robust): [n, E] bool, the experts its
  /// router can select / selects at every point of each region.
  std::vector<torch::Tensor> possible_of, sure_of;
  /// Logit-domain forms (and the mixture form with MemberPass::margin_rows_only), per
  /// expert j: [n, K − 1] the lower bounds of the float32 margins ĥ_y − ĥ_k (−inf where
  /// expert j's pass does not cover the region), and [n, K − 1] bool, those above the
  /// tie allowance. Empty for the other forms.
  std::vector<torch::Tensor> margins, settled;
  /// Logit-domain forms (and margin_rows_only) bounded with BoundOptions::primal: [n, *input]
  /// float64, per region the minimiser of its lowest margin row bounded in this evaluation (the
  /// region's centre where none was): where the bounds place the worst point, a start for
  /// attacks. Undefined otherwise.
  torch::Tensor primal;
  /// With MemberPass::warm_slot: per expert j, the parameters of the margin rows bounded
  /// in this evaluation at their best step (RowParams, `has` undefined where none were)
  /// and `tuned_keys[j]` [r] int64 those rows, as region·(K − 1) + k.
  std::vector<RowParams> tuned;
  std::vector<torch::Tensor> tuned_keys;
  /// The mixture form: [n, E, K] the lower bounds of every expert's float32 probability
  /// margins F_j^y − F_j^k on each region (0 at y; −1 where none is known), and [n, E]
  /// bool the experts whose every margin bound exceeds the form's float32 allowance
  /// (settled: that expert alone would certify the region). Undefined otherwise.
  torch::Tensor prob, prob_settled;
  /// The mixture form: [n, E] the bounds of the router's weights on each region that
  /// its program takes (mixture_lower). Undefined otherwise.
  torch::Tensor weight_lo, weight_hi;
};
/// With `only` [n, E] bool, each region is restricted further to the points where the
/// router selects one of those experts (the candidate form, whose pass has route
/// constraints), or exactly those k experts (the mixture form of a top-k router; a
/// region where one of them cannot be selected is empty: slack +inf): branch and
/// bound's route splits (docs §22).
Evaluation member_evaluate(const MemberPass& pass, const InputDomain& d,
                           const torch::Tensor& labels, const torch::Tensor& only = {});
/// The dual form; `only_standard`, `only_robust`: each member's route splits, as `only`.
Evaluation dual_evaluate(const MemberPass& standard, const MemberPass& robust, double alpha,
                         const InputDomain& d, const torch::Tensor& labels,
                         const torch::Tensor& only_standard = {},
                         const torch::Tensor& only_robust = {});

// The probability-domain pieces live in core (include/moecert/train_bounds.h), shared
// with certified training.
using moecert::simplex_min;
using moecert::softmax_margin_lower;

/// The mixture's program (docs §13.3): per region and class k, the least of
/// Σ_j a_j·mu[:, j, k] over the router weights a in [a_lo, a_hi] [n, E] on the simplex,
/// rounded down; [n, K], +inf at the label. `mu` [n, E, K]: lower bounds of the
/// experts' float32 probability margins. A member's mixture slack is its least class
/// minus prob_allowance.
torch::Tensor mixture_lower(const torch::Tensor& a_lo, const torch::Tensor& a_hi,
                            const torch::Tensor& mu, const torch::Tensor& labels);

/// The float32 allowances (docs §14): the tie allowance of an argmax over a
/// log-softmax of logits bounded by `hmax` [n] (in logit units), and the constant C of
/// the probability-domain error u32·C of a member's float32 probabilities.
torch::Tensor fp32_tie(const torch::Tensor& hmax, int64_t classes);
double fp32_prob_constant(const MemberGraphs& m);
/// The float32 allowance u32·C of a member's probability-domain slack (0 for an exact-real
/// pass), with C = fp32_prob_constant.
double prob_allowance(const MemberPass& p);

}  // namespace moecert::forms
