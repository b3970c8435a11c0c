// Differentiable bounds for certified training (SPEC §2 `ibp`, `crown-ibp`): the
// per-operator rules that certify uses (include/moecert/rules.h), evaluated on the
// model's live parameters (their dtype, autograd on; models.h LiveGraphs) and
// without certification's rounding and float32 allowances (rules' interval_only
// mode). IBP (Gowal et al. 2018) and CROWN-IBP (Zhang et al., ICLR 2020: IBP
// intermediate bounds, one CROWN walk back from the output), and the MoE worst case
// over the experts a top-1 router can select on the ball, by the same selection rule
// as certify's candidate form. Proofs: docs/certification.md §19.
#pragma once

#include "moecert/models.h"
#include "moecert/rules.h"

#include <utility>

namespace moecert {

/// IBP through a layer graph (chains and residual blocks). in: the input box, lo/hi
/// [B, *shape] (mag, err32 undefined) -> the output's interval. Differentiable.
NodeBounds train_interval(const LayerGraph& g, const NodeBounds& in);

/// Lower bounds of rows C·h(x) over each sample's input box: β·CROWN-IBP + (1 − β)·IBP,
/// the IBP bound with C folded into the last layer when it is linear (as certify's IBP).
/// β > 0 needs a chain graph (no residual block): ConfigError otherwise.
/// C: [B, S, K] -> [B, S]. Differentiable.
torch::Tensor train_spec_lower(const LayerGraph& g, const NodeBounds& in, const torch::Tensor& C,
                               double beta);

/// The experts a top-k router can select on each region (possible) and those it
/// selects on all of it (sure), from diff [n, E, E], diff[i, j] <= g_i − g_j over the
/// region (docs/certification.md §13.1). Soft routing: all of them. -> {[n, E], [n, E]} bool
std::pair<torch::Tensor, torch::Tensor> router_selection(const torch::Tensor& diff, Routing routing,
                                                         int64_t k);

/// What certified training knows of a MoE (or dense model) over B_∞(x, ε) ∩ [0, 1]^d.
struct CertifiedMargins {
  /// [B, K − 1]: lower bounds of h_y − h_k over the region for the classes k != y
  /// (other_classes order), minimised over the experts the router can select there.
  torch::Tensor margin;
  torch::Tensor possible;  ///< [B, E] bool: the experts the router can select (all true for E = 1)
  /// [B]: lower bound of g_s − max_{j != s} g_j over the region, s the clean top-1
  /// expert (> 0: the route cannot change). Undefined without a router.
  torch::Tensor route_gap;
};

/// Training's bound of a MoE with top-1 routing or of a dense model (ConfigError for
/// soft or top-k > 1 routing). x: [B, C, H, W] in [0, 1], y: [B], eps: [B] L∞ radii;
/// beta as train_spec_lower. Differentiable in the model's parameters.
CertifiedMargins moe_certified_margins(MoeImpl& model, const torch::Tensor& x, const torch::Tensor& y,
                                       const torch::Tensor& eps, double beta, bool box = true);

/// The classes other than `ref` [n] among K, in increasing order: [n, K − 1] int64.
torch::Tensor other_classes(const torch::Tensor& ref, int64_t K);
/// The margin rows e_ref − e_k for those classes k (other_classes' order), as
/// specifications: [n, K − 1, K] in the options `o`.
torch::Tensor margin_rows(const torch::Tensor& ref, int64_t K, const torch::TensorOptions& o);

}  // namespace moecert
