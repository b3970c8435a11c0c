// Differentiable bounds for certified training (SPEC §2 `ibp`, `crown-ibp`): the
// per-operator rules that certify uses (include/moecert/rules.h), evaluated on the
// model's live parameters (their dtype, autograd on; models.h LiveGraphs) and
// without certification's rounding and float32 allowances (rules' interval_only
// mode). IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al., ICLR 2020: IBP
// intermediate bounds, one CROWN walk back from the output), and the MoE worst case
// over the experts a top-1 router can select on the ball, by the same selection rule
// as certify's candidate form. Proofs: docs/certification.md §19.
#pragma once

#include <utility>

#include "moecert/models.h"
#include "moecert/rules.h"

namespace moecert {

/// IBP through a layer graph. in: the input box, lo/hi
/// [B, *shape] (mag, err32 undefined) -> the output's interval. Differentiable.
NodeBounds train_interval(const LayerGraph& g, const NodeBounds& in);

/// Lower bounds of rows C·h(x) over each sample's input box: β·CROWN-IBP + (1 − β)·IBP,
/// the IBP bound with C folded into the last layer when it is linear (as certify's IBP).
/// CROWN-IBP walks the graph's nodes in reverse, summing the rows of a node read by
/// several (a residual block's input).
/// C: [B, S, K] -> [B, S]. Differentiable.
torch::Tensor train_spec_lower(const LayerGraph& g, const NodeBounds& in, const torch::Tensor& C,
                               double beta);

/// The experts a top-k router can select on each region (possible) and those it
/// selects on all of it (sure), from diff [n, E, E], diff[i, j] <= g_i − g_j over the
/// region (docs/certification.md §13.1). Soft routing: all of them. -> {[n, E], [n, E]} bool
std::pair<torch::Tensor, torch::Tensor> router_selection(const torch::Tensor& diff, Routing routing,
                                                         int64_t k);

/// Lower bound of min over x' in [x − ε, x + ε] (∩ box) of a softmax probability margin
/// f_y − f_k from bounds on the logit differences δ_j = h_j − h_y (exact over that box
/// of δ; docs/certification.md §13.3). dlo, dhi: [n, K] (entry y ignored) -> [n, K]
/// (entry y = +inf). Differentiable.
torch::Tensor softmax_margin_lower(const torch::Tensor& dlo, const torch::Tensor& dhi,
                                   const torch::Tensor& labels);

/// min Σ_i a_i μ_i over {a : a_lo <= a <= a_hi, Σ a = 1} (exact; greedy on μ).
/// a_lo, a_hi, mu: [n, E] -> [n]. Differentiable.
torch::Tensor simplex_min(const torch::Tensor& a_lo, const torch::Tensor& a_hi,
                          const torch::Tensor& mu);

/// Bounds a_lo <= a <= a_hi of the router's softmax weights over the selected experts
/// on each region (§13.3), from diff [n, E, E] (router_selection's) and the possible
/// and sure experts [n, E]. -> {[n, E], [n, E]}. Differentiable.
std::pair<torch::Tensor, torch::Tensor> router_weight_bounds(const torch::Tensor& diff,
                                                             const torch::Tensor& possible,
                                                             const torch::Tensor& sure);

/// What certified training knows of a MoE (or dense model) over B_∞(x, ε) ∩ [0, 1]^d.
struct CertifiedMargins {
  /// [B, K − 1]: lower bounds of h_y − h_k over the region for the classes k != y
  /// (other_classes order), minimised over the experts the router can select there.
  torch::Tensor margin;
  torch::Tensor possible;  ///< [B, E] bool: the experts the router can select (all true for E = 1)
};

/// The route-margin term's gap (`--route-margin`, every single-model method): a lower
/// bound over B_∞(x, ε) (∩ [0, 1]^d with box) of min_{i in S, j not in S} g_i − g_j,
/// S the clean top-k experts of x (> 0: the selection cannot change on the region).
/// IBP through the router (exact for a linear router). ConfigError without a choice
/// to keep (E = 1, soft routing, top-k = E). x: [B, C, H, W], eps: [B] -> [B].
/// Differentiable in the router's parameters.
torch::Tensor route_gap_lower(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& eps,
                              bool box = true);

/// Training's bound of a MoE with top-1 routing or of a dense model (ConfigError for
/// soft or top-k > 1 routing: moe_mixture_margins). x: [B, C, H, W] in [0, 1], y: [B], eps: [B] L∞
/// radii; beta as train_spec_lower. Differentiable in the model's parameters.
CertifiedMargins moe_certified_margins(MoeImpl& model, const torch::Tensor& x,
                                       const torch::Tensor& y, const torch::Tensor& eps,
                                       double beta, bool box = true);

/// What certified training knows of a MoE with soft or top-k > 1 routing over
/// B_∞(x, ε) ∩ [0, 1]^d: certify's mixture form (docs/certification.md §13.3) without
/// its float32 allowance.
struct MixtureMargins {
  /// [B, K − 1]: lower bounds of F_y − F_k (probabilities, in [−1, 1]) over the region
  /// for the classes k != y (other_classes order).
  torch::Tensor prob_margin;
  torch::Tensor possible;  ///< [B, E] bool: the experts the router can select
};

/// The mixture bound of a MoE with soft or top-k > 1 routing (ConfigError for a dense
/// or top-1 model: moe_certified_margins). Arguments as moe_certified_margins.
/// Differentiable in the model's parameters.
MixtureMargins moe_mixture_margins(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                                   const torch::Tensor& eps, double beta, bool box = true);

/// The classes other than `ref` [n] among K, in increasing order: [n, K − 1] int64.
torch::Tensor other_classes(const torch::Tensor& ref, int64_t K);
/// The margin rows e_ref − e_k for those classes k (other_classes' order), as
/// specifications: [n, K − 1, K] in the options `o`.
torch::Tensor margin_rows(const torch::Tensor& ref, int64_t K, const torch::TensorOptions& o);

}  // namespace moecert
