// Certification (SPEC §4): Lipschitz constants of routers and experts, per-sample
// certified radii (Theorem 5.4 for one MoE, Theorem 5.5 for a dual-model), and the
// cross-check against PGD. The proofs of every bound are in docs/certification.md.
#pragma once

#include "moecert/attacks.h"
#include "moecert/data.h"
#include "moecert/defaults.h"
#include "moecert/graph.h"
#include "moecert/model_io.h"
#include "moecert/rules.h"
#include "moecert/spectral.h"

#include <nlohmann/json.hpp>

#include <string>
#include <vector>

namespace moecert {

// --- Lipschitz constants of a logit map h: ‖·‖_p (pixels) -> ‖·‖_∞ (logits) --------

/// One layer's operator norm ‖·‖_p -> ‖·‖_p, or ‖·‖_p -> ‖·‖_∞ with `to_inf`
/// (used for a graph's last linear layer), from its rule. in_shape: the layer input
/// without the batch dimension ([C, H, W] or [F]). Throws UnsupportedLayerError for a
/// layer with branches (a residual block).
double layer_operator_norm(const Layer& l, Norm p, const std::vector<int64_t>& in_shape,
                           bool to_inf = false);

struct GlobalBound {
  double value = 0;  ///< sound: L >= sup_x ‖J_h(x)‖_{p->∞}
  std::vector<std::pair<std::string, double>> layers;  ///< per-layer factors (top level)
};

/// `global`: the product of per-layer operator norms (residual: 1 + L_main or
/// L_main + L_shortcut), composed node by node by the rules. input_shape: [C, H, W].
GlobalBound lipschitz_global(const LayerGraph& g, Norm p, const std::vector<int64_t>& input_shape);

/// `local`: per sample b, a sound bound on sup over B_p(x_b, eps_b) of ‖J_h‖_{p->∞}:
/// interval bounds on the pre-activations (float64), then backward interval
/// propagation of the Jacobian rows. x: [B, C, H, W] pixels, eps: [B] -> [B] float64.
torch::Tensor lipschitz_local(const LayerGraph& g, Norm p, const torch::Tensor& x,
                              const torch::Tensor& eps);

/// `lower`: the largest dual-norm gradient of any logit found at the given points
/// and along signed-gradient ascent paths of each logit within `radius` (each is a
/// gradient actually attained, so a true lower bound on L). x: [N, C, H, W]
double lipschitz_lower(const LayerGraph& g, Norm p, const torch::Tensor& x, int steps,
                       double radius);

/// `clever` (NOT sound): CLEVER-style estimate. For each of `batches` batches, the
/// largest dual-norm gradient over `per_batch` uniform samples in B_p(x_n, radius)
/// around the points; a reverse-Weibull fit of the batch maxima gives its location.
double lipschitz_clever(const LayerGraph& g, Norm p, const torch::Tensor& x, double radius,
                        int batches, int per_batch, uint64_t seed);

// --- Per-sample radii (Theorems 5.4 and 5.5) -----------------------------------------

/// One MoE evaluated at one sample (float64).
struct MemberEval {
  std::vector<double> g;               ///< router logits [E] (empty for a dense model)
  std::vector<std::vector<double>> h;  ///< expert logits [E][C]
  Routing routing = Routing::top_k;
  int64_t top_k = 1;
};

/// Lipschitz constants (‖·‖_p -> ‖·‖_∞ of the logits) valid on the ball considered.
struct MemberConstants {
  double router = 0;            ///< L_g
  std::vector<double> experts;  ///< L_{h_i}
};

/// What the bounds use of one member: the selected experts, their renormalised
/// weights a_i, F(x), the selection-stability radius, and the two denominators.
struct MemberView {
  std::vector<int64_t> selected;
  std::vector<double> weights;  ///< a_i of the selected experts
  std::vector<double> probs;    ///< F(x) [C]
  double stability = 0;         ///< top-k: (g_(k) - g_(k+1)) / (2 L_g); +inf if it cannot change
  double tight_den = 0;         ///< K = L_g' + Σ_sel a_i L_{h_i}
  double paper_den = 0;         ///< 2 Σ_sel (r_a M + r_f) = Σ_sel (L_g' + L_{h_i}) with M = 1
};
MemberView member_view(const MemberEval& m, const MemberConstants& c);

/// Radii of a single MoE; NaN where a form does not apply. All are lower bounds of the
/// exact-real formula (outward-rounded intervals, margins reduced by the allowance).
struct SingleRadii {
  double paper = 0;      ///< Theorem 5.4, paper form
  double tight = 0;      ///< Theorem 5.4, tight form
  double candidate = 0;  ///< top-1: every expert that could be selected classifies y (NaN otherwise)
  double margin = 0;     ///< dense: min_k (h_y - h_k) / (2 L_h) (NaN for E > 1)
};
SingleRadii radii_single(const MemberEval& m, const MemberConstants& c, int64_t label);

struct DualRadii {
  double eps_a = 0, eps_b = 0;  ///< Lipschitz combination; robust dominance
  double thm55 = 0;             ///< max(eps_a, eps_b)
  double tight = 0;             ///< exact solution of the piecewise-linear condition
};
DualRadii radii_dual(const MemberEval& standard, const MemberConstants& cs,
                     const MemberEval& robust, const MemberConstants& cr, double alpha,
                     int64_t label);

// --- The certification run -------------------------------------------------------

struct CertifyConfig {
  Norm norm = Norm::linf;
  bool global = true, local = true;  ///< estimators to run
  std::vector<double> eps_grid{0.01, 0.02, 0.05, 0.1};
  int bisect_steps = 10;             ///< local radius bisection steps
  bool empirical = true;             ///< PGD-bisection cross-check
  PgdConfig attack;                  ///< empirical attack (steps, restarts, loss, norm)
  double empirical_max = 0.5;        ///< upper end of the empirical bisection
  double empirical_tol = 1e-3;       ///< bisection tolerance (absolute, in ε)
  int64_t batch_size = 100;
  std::string shard;                 ///< "i/n" label when this run is one shard
  uint64_t seed = 0;                 ///< with the sample index, seeds each sample's PGD starts
};

/// Certifies the samples `indices` of `data`. Returns results.json (schema
/// "moecert.certify/1"): config, model fingerprint, per-sample rows, aggregates.
nlohmann::json certify_run(LoadedModel& model, const Dataset& data,
                           const std::vector<int64_t>& indices, const CertifyConfig& cfg,
                           torch::Device device, bool progress);

/// Recomputes the aggregates (certified / empirical accuracy per ε, medians,
/// violations) of a results object from its rows, in place.
void certify_aggregate(nlohmann::json& results);

}  // namespace moecert
