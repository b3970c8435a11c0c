// Certification (SPEC §4): Lipschitz constants of routers and experts, per-sample
// certified radii (Theorem 5.4 for one MoE, Theorem 5.5 for a dual-model), and the
// cross-check against PGD. The proofs of every bound are in docs/certification.md.
#pragma once

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "moecert/attacks.h"
#include "moecert/data.h"
#include "moecert/defaults.h"
#include "moecert/graph.h"
#include "moecert/model_io.h"
#include "moecert/results.h"
#include "moecert/rules.h"
#include "moecert/spectral.h"

namespace moecert {

// --- Lipschitz constants of a logit map h: ‖·‖_p (pixels) -> ‖·‖_∞ (logits) --------

/// One layer's operator norm ‖·‖_p -> ‖·‖_p, or ‖·‖_p -> ‖·‖_∞ with `to_inf`
/// (used for a graph's last linear layer), from its rule. in_shape: the layer input
/// without the batch dimension ([C, H, W] or [F]). Throws UnsupportedLayerError for a
/// layer with branches (a residual block).
double layer_operator_norm(const Layer& l, Norm p, const std::vector<int64_t>& in_shape,
                           bool to_inf = false);

struct GlobalBound {
  double value = 0;                                    ///< sound: L >= sup_x ‖J_h(x)‖_{p->∞}
  std::vector<std::pair<std::string, double>> layers;  ///< per-layer factors (top level)
};

/// `global`: the product of per-layer operator norms (residual: 1 + L_main or
/// L_main + L_shortcut), composed node by node by the rules. input_shape: [C, H, W].
GlobalBound lipschitz_global(const LayerGraph& g, Norm p, const std::vector<int64_t>& input_shape);

/// `local`: per sample b, a sound bound on sup over B_p(x_b, eps_b) of ‖J_h‖_{p->∞}:
/// interval bounds on the pre-activations (float64), then per logit the smaller of
/// backward interval propagation of its Jacobian row and linear bound propagation
/// through the Jacobian graph (bound_jacobian_relaxed). x: [B, C, H, W] pixels,
/// eps: [B] -> [B] float64. With `box`, over B_p(x_b, eps_b) ∩ [0, 1]^d (a convex
/// subset: the same proof holds).
torch::Tensor lipschitz_local(const LayerGraph& g, Norm p, const torch::Tensor& x,
                              const torch::Tensor& eps, bool box = false,
                              bool jacobian_crown = true);

/// The constant Theorems 5.4 / 5.5 need of a logit map (docs §6, §16): K >= sup over
/// the region of min_t ‖Δh − t·1‖_∞ / ‖Δx‖_p, the change of the logits up to a common
/// shift (softmax ignores one). K = min(lipschitz_local, max_{j} L(h_j − h_r)) with r
/// the class h predicts at x, each difference's constant bounded like a logit's.
/// Same arguments -> [B] float64.
torch::Tensor lipschitz_local_shift(const LayerGraph& g, Norm p, const torch::Tensor& x,
                                    const torch::Tensor& eps, bool box = false,
                                    bool jacobian_crown = true);

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
  /// float32 allowances on the balls considered (docs §14; 0 = exact arithmetic),
  /// subtracted from: this member's probability margins (fp32_prob: logit and router
  /// errors plus the softmax arithmetic; fp32_const: the arithmetic alone), one
  /// expert's logit margins (fp32_logit) and router-logit gaps (fp32_gap).
  double fp32_prob = 0, fp32_const = 0, fp32_logit = 0, fp32_gap = 0;
  /// fp32_prob over the balls of the certificates that involve this member alone
  /// (a dual-model's ε_b), so that they do not depend on the other member.
  double fp32_prob_alone = 0;
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
  double paper = 0;  ///< Theorem 5.4, paper form
  double tight = 0;  ///< Theorem 5.4, tight form
  double candidate =
      0;              ///< top-1: every expert that could be selected classifies y (NaN otherwise)
  double margin = 0;  ///< dense: min_k (h_y - h_k) / (2 L_h) (NaN for E > 1)
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

/// How branch and bound splits subproblems (docs §22): ReLU units, input coordinates (L∞
/// regions with few free inputs), or automatic (input splits with at most
/// CertifyConfig::bab_input_max_free free inputs, ReLU splits otherwise).
enum class BabSplit { automatic, relu, input };

struct CertifyConfig {
  Norm norm = Norm::linf;
  std::vector<Estimator> estimators{Estimator::global, Estimator::local, Estimator::crown,
                                    Estimator::alpha_crown};
  bool box = true;  ///< certify B_p(x, ε) ∩ [0, 1]^d (false: the whole ball)
  bool exact_arithmetic =
      false;  ///< no float32 allowance: radii hold for the real-valued network only
  EpsGrid eps_grid{std::vector<double>{0.01, 0.02, 0.05, 0.1}};
  int bisect_steps = 10;  ///< local Lipschitz radius bisection steps
  /// Local constants: also bound the Jacobian by CROWN through its graph (docs §16; a
  /// few times tighter, a few times slower), or by the interval Jacobian alone.
  bool jacobian_crown = true;
  int search_rounds =
      defaults::search_rounds;                ///< CROWN / IBP radius search: full passes per sample
  double search_tol = defaults::search_tol;   ///< relative width at which the search stops
  int alpha_rounds = defaults::alpha_rounds;  ///< α-CROWN radius search: full passes per sample
  int alpha_steps = defaults::alpha_steps;    ///< α-CROWN optimisation steps per bound
  /// L∞: ReLUs reading an affine layer of the input take hull planes where they bound
  /// tighter than the chord (BoundOptions::input_planes; docs/certification.md §10, input planes).
  bool input_planes = true;
  bool empirical = true;  ///< the attacks' cross-check (FMN, APGD bisection)
  /// The empirical APGD bisection (steps, restarts, loss). Loss `margin` means APGD's
  /// DLR loss (the default): a confident float32 model's cross-entropy has no gradient
  /// left (softmax saturates), the scale-free logit-difference ratio has.
  PgdConfig attack = [] {
    PgdConfig c;
    c.loss = AttackLoss::margin;
    return c;
  }();
  double empirical_max = 0.5;   ///< upper end of the empirical bisection
  int min_norm_steps = 100;     ///< FMN iterations of the empirical radius
  double empirical_tol = 1e-3;  ///< bisection tolerance (absolute, in ε)
  int64_t batch_size = 100;
  /// Parts of a batch whose Lipschitz and bound stages run side by side, each on one
  /// thread (0: as many as intra-op threads; 1: the whole batch, intra-op threads).
  /// Radii do not depend on it; only the CPU splits.
  int sample_parts = 0;
  /// Branch and bound (Estimator::bab; docs §22): per correct sample, the seconds for
  /// every ε of the grid that the other estimators leave uncertified and the attacks
  /// leave unbroken; subproblems per bound pass; how they split; the α-CROWN steps of
  /// the root's intermediate bounds (0: CROWN's).
  double bab_timeout = 60;
  int64_t bab_batch = 64;
  int bab_intermediate_steps = 8;
  /// α-β optimisation steps of every subproblem but the root (which takes alpha_steps):
  /// each starts from its parent's tuned parameters (bab_warm_start).
  int bab_steps = 3;
  /// Whether a subproblem's α-β optimisation starts from its parent's tuned parameters.
  bool bab_warm_start = true;
  /// A single mixture: one tree of ReLU splits per expert (false: one tree over all).
  bool bab_expertwise = true;
  /// A single mixture: a margin row carries to a subproblem's children (bounded no more)
  /// only when its bound is above this many logits (bab::Config::mixture_row_settled).
  double bab_row_carry = 1;
  /// Candidate units whose children are bounded before each ReLU split is chosen
  /// (filtered smart branching; 0 or 1: the first-order score alone).
  int64_t bab_fsb = 0;
  /// Bisection steps of each sample's verified radius between the grid's points, in the
  /// budget the grid leaves (0: the radius is the largest verified grid ε).
  int bab_bisect = 0;
  BabSplit bab_split = BabSplit::automatic;
  int64_t bab_input_max_free = 16;
  std::string shard;  ///< "i/n" label when this run is one shard
  uint64_t seed = 0;  ///< with the sample index, seeds each sample's PGD starts
};

/// Certifies the rows `indices` of `data`: config, model fingerprint, per-sample rows
/// (each with its image's split index, every form's radius with its estimator, and the
/// headline: the best sound one) and the aggregates.
Results certify_run(LoadedModel& model, const Dataset& data, const std::vector<int64_t>& indices,
                    const CertifyConfig& cfg, torch::Device device, bool progress);

}  // namespace moecert
