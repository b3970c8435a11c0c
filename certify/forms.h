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
};
/// With `seed` (a pass of the same member whose regions contain these; `seed_index`
/// [n] the positions of this batch's samples in its batch), the router's and every
/// expert's pass start from what the seed's know (bound_forward's seed); an expert
/// whose seed pass does not cover all its samples here starts afresh.
MemberPass member_prepare(const MemberGraphs& m, const InputDomain& d, const torch::Tensor& labels,
                          const BoundOptions& opt, bool fp32, const MemberPass* seed = nullptr,
                          const torch::Tensor& seed_index = {});

/// Per-sample certificate slack of a form at regions inside the pass's (> 0 certifies
/// the region). `labels` [n]. The dual form takes both members' passes and α.
/// probs: also probability-margin bounds (the mixture and dual forms need them).
struct Evaluation {
  torch::Tensor slack;     ///< [n]
  torch::Tensor possible;  ///< [n, E] bool: experts the router can select (of the form's member)
};
Evaluation member_evaluate(const MemberPass& pass, const InputDomain& d,
                           const torch::Tensor& labels);
Evaluation dual_evaluate(const MemberPass& standard, const MemberPass& robust, double alpha,
                         const InputDomain& d, const torch::Tensor& labels);

// The probability-domain pieces live in core (include/moecert/train_bounds.h), shared
// with certified training.
using moecert::simplex_min;
using moecert::softmax_margin_lower;

/// The float32 allowances (docs §14): the tie allowance of an argmax over a
/// log-softmax of logits bounded by `hmax` [n] (in logit units), and the constant C of
/// the probability-domain error u32·C of a member's float32 probabilities.
torch::Tensor fp32_tie(const torch::Tensor& hmax, int64_t classes);
double fp32_prob_constant(const MemberGraphs& m);

}  // namespace moecert::forms
