// Bound propagation over a layer graph (SPEC §4.6): IBP, CROWN (backward linear
// relaxation with CROWN intermediate bounds) and α-CROWN (lower ReLU slopes
// optimised by projected gradient), for any batch of linear specifications C·h(x)
// over B_p(x, ε) ∩ [0, 1]^d (or the whole ball), batched over samples and rows, in
// float64 with a rounding allowance, plus a bound on the float32 evaluation error of
// the model over the same region. Built on the per-operator rules of rules.h.
// Proofs: docs/certification.md §10–§12.
#pragma once

#include <memory>

#include "moecert/compiled_graph.h"
#include "moecert/defaults.h"
#include "moecert/rules.h"
#include "moecert/train_bounds.h"  // other_classes, margin_rows, router_selection

namespace moecert {

/// Bound propagation walks the core's compiled graph (include/moecert/compiled_graph.h).
using BoundNode = CompiledNode;
using BoundGraph = CompiledGraph;

/// ibp: intervals throughout; crown_ibp: CROWN's backward walk for the specifications only,
/// on the interval bounds of every intermediate node (Zhang et al., ICLR 2020: one walk
/// per bound, so it scales to models where CROWN's per-unit walks do not); crown: CROWN
/// bounds on every relaxed operator's input too; alpha_crown: CROWN with optimised slopes.
enum class BoundMethod { ibp, crown_ibp, crown, alpha_crown };
/// Whether a method's intermediate bounds are intervals (ibp, crown_ibp).
inline bool interval_intermediates(BoundMethod m) {
  return m == BoundMethod::ibp || m == BoundMethod::crown_ibp;
}

/// The input region of each sample: B_p(x_b, ε_b), intersected with [0, 1]^d when `box`.
struct InputDomain {
  torch::Tensor x;    ///< [B, C, H, W] float64 centres (pixels)
  torch::Tensor eps;  ///< [B] float64 radii
  Norm norm = Norm::linf;
  bool box = true;
  /// When defined (L∞ only): the region is the box [lower, upper] ([B, C, H, W] float64)
  /// instead, whatever x, eps and `box` say (`moecert verify`'s per-pixel input boxes).
  torch::Tensor lower{}, upper{};
};

/// How the float32 evaluation error of the model enters the bounds (docs §12).
/// per_node: every node carries a worst-case bound on |float32 − exact| (NodeBounds::err32,
/// its input's error propagated by the operator's largest slope plus its own rounding), and
/// bound_specs returns |C|·err32 of the output. relational: every interval encloses the
/// float32 values as well as the exact ones, each node's own rounding r (BoundPass::round32)
/// enters the backward walks as a bounded additive input (−Σ|A|·r at the node), so rows
/// weigh it by their real sensitivity instead of compounding worst cases; bound_specs'
/// lower bound then holds for the float32 model itself and its err32 is 0. automatic:
/// relational on graphs with LayerNorm, softmax or attention nodes (where per-node worst
/// cases compound by orders of magnitude), per_node elsewhere. err32 of a relational pass's
/// nodes is 0: a caller that needs |ĥ − h| itself runs a per_node pass.
enum class Float32Errors { per_node, relational, automatic };

struct BoundOptions {
  BoundMethod method = BoundMethod::crown;
  Float32Errors fp32 = Float32Errors::per_node;
  int alpha_steps = defaults::alpha_steps;  ///< α-CROWN iteration budget
  double alpha_lr = defaults::alpha_lr;     ///< α-CROWN Adam step size
  double beta_lr = defaults::beta_lr;       ///< β-CROWN's multipliers: Adam step size
  /// α-CROWN: when > 0, the bounds of the relaxed units of intermediate nodes are
  /// optimised too, each unit's row by its own slopes, for this many steps (0: CROWN's).
  /// Tighter, and about that many times the cost of those walks; their rows are not kept.
  /// Nodes beyond defaults::intermediate_alpha_elements keep CROWN's.
  int intermediate_alpha_steps = 0;
  int64_t chunk_elements = defaults::bound_chunk_elements;  ///< row coefficients held at once
  /// Coefficients of refined units' input-level rows a pass keeps per sample for narrowing.
  int64_t keep_elements = defaults::bound_keep_elements;
  /// α-CROWN specifications: also return each row's minimiser (SpecBounds::primal).
  bool primal = false;
  /// L∞: a ReLU reading a conv or dense layer of the input box takes, per row and unit,
  /// the lower of its chord and a face of the convex hull of its graph over the box
  /// (docs/certification.md §10, input planes), where the row needs an upper line.
  bool input_planes = true;
};

/// The rows that refined some units of a node, as they stood at the graph input
/// before concretisation: over any region inside the pass's, each unit's lower bound
/// is b + min Σ A·x − ρ(mag + the concretisation's magnitude); the first half of the
/// rows bound +z_u, the second −z_u (docs §11, §15).
struct RefinedRows {
  torch::Tensor pos;     ///< [m] flat positions of the units in the node's [B, *shape] tensor
  Coeffs at_input;       ///< [2m] rows over the input (A undefined: none reached it)
  torch::Tensor b, mag;  ///< [2m] constants and accumulated magnitudes of the walks
};

/// The forward sweep of one batch: the bounds of every node over every sample's
/// region (with CROWN / α-CROWN: CROWN bounds on the input of every ReLU).
struct BoundPass {
  const BoundGraph* graph = nullptr;
  InputDomain domain;
  BoundOptions opt;
  NodeBounds input;               ///< the region's coordinate box
  std::vector<NodeBounds> nodes;  ///< one per graph node
  /// Per node, the input-level rows of its refined units (within opt.keep_elements per sample).
  std::vector<std::vector<RefinedRows>> refined;
  /// Relational float32 errors (Float32Errors): per node [B, *shape], a bound on its own
  /// float32 rounding at any float32 input inside its inputs' intervals; empty otherwise.
  std::vector<torch::Tensor> round32;
  bool relational() const { return !round32.empty(); }
  /// Branch and bound's ReLU splits (bound_split; docs §22): per node [B, *shape] float64
  /// signs s in {−1, 0, 1}, undefined where none; the region of sample b is restricted to
  /// the points where s·z >= 0 for every unit z of the node with s != 0. Empty: no splits.
  std::vector<torch::Tensor> split;
};
/// Whether `opt` makes a pass over `g` relational (Float32Errors::automatic resolved).
bool relational_errors(const BoundGraph& g, const BoundOptions& opt);
/// With `seed` (a pass over the same samples whose regions contain `d`'s), every
/// interval starts from what the seed knows of it (as bound_narrow), so fewer units
/// need a backward walk.
BoundPass bound_forward(const BoundGraph& g, const InputDomain& d, const BoundOptions& opt,
                        const BoundPass* seed = nullptr);

/// For each of `size` slots, its position in `index` [m] (-1 where it does not occur):
/// the inverse of a selection of batch positions. -> [size] int64
torch::Tensor positions_in(const torch::Tensor& index, int64_t size);

/// The pass of the samples `index` [m] (positions in the pass's batch, in that
/// order), with their kept rows.
BoundPass bound_subset(const BoundPass& pass, const torch::Tensor& index);

/// The pass restricted to smaller regions `d` (same samples, each region inside the
/// pass's): every node's interval is the intersection of the pass's, IBP over `d`,
/// and the kept rows of its refined units concretised over `d`. No new backward walk:
/// a cheap pass for a smaller ε, never looser than the pass itself (docs §15).
BoundPass bound_narrow(const BoundPass& pass, const InputDomain& d);

/// Branch and bound's subproblems (docs §22): the pass of the samples `index` [n] of
/// `root` (repeats allowed), each restricted further by the ReLU splits `sign` (per node
/// [n, *shape] in {−1, 0, 1}, undefined where none; only on the inputs of ReLU nodes).
/// Every interval is the root's, intersected with IBP of the clamped intervals before
/// it, and clamped at 0 on the split units (z >= 0 where s = 1, z <= 0 where s = −1):
/// no new backward walk. α-CROWN bounds of such a pass add β-CROWN's multipliers for
/// the splits. A per-node float32 model only (ConfigError::internal for a relational root).
BoundPass bound_split(const BoundPass& root, const torch::Tensor& index,
                      const std::vector<torch::Tensor>& sign);

/// Linear constraints D·x <= e that every point of a sample's region satisfies (branch
/// and bound's route constraints). D: [B, q, *input_shape], e: [B, q], float64, real
/// arithmetic (the caller includes its own rounding in e).
struct InputConstraints {
  torch::Tensor D, e;
};

/// Linear lower bounds of rows C·h(x) as functions of the input: C·h(x) >= A·x + b at
/// every point x of the sample's region, for the exact-real graph, with the float64
/// rounding of the walk and of A·x (for |x| up to the region's box) taken out of b.
/// From one CROWN walk with the pass's intermediate bounds. A: [B, S, *input_shape], b: [B, S]
struct LinearBounds {
  torch::Tensor A, b;
};
LinearBounds bound_linear(const BoundPass& pass, const torch::Tensor& C);

/// Lower bounds of rows C·h(x) over each sample's region, sound for the exact-real
/// graph (its float64 rounding subtracted), and a bound on |C·(ĥ − h)| where ĥ is the
/// float32 model's output there; lower − err32 bounds C·ĥ. In a relational pass lower
/// bounds both C·h and C·ĥ, and err32 is 0. C: [B, S, K] -> lower, err32: [B, S]
struct SpecBounds {
  torch::Tensor lower, err32;
  /// With BoundOptions::primal under α-CROWN: per row (bound_specs: [B·S], sample-major)
  /// [*input_shape] float64, a point of the region's coordinate box (L∞; L2: of the ball,
  /// then clamped to the box) where the row's last linear lower bound A·x + b is least:
  /// where the bound says the row is smallest, a start for attacks (branch and bound's
  /// subproblem starts; docs §22). It may violate split or route constraints. Else undefined.
  torch::Tensor primal;
};
/// With `final_domain` (each region inside the pass's), the rows are bounded over
/// that smaller region with the pass narrowed to it (bound_narrow): a cheap bound
/// for a smaller ε.
/// With `constraints` (α-CROWN only; other methods ignore them, which is sound), the
/// region is also restricted to D·x <= e, enforced by Lagrange multipliers optimised
/// with the slopes (docs §22); so are a split pass's ReLU splits.
SpecBounds bound_specs(const BoundPass& pass, const torch::Tensor& C,
                       const InputDomain* final_domain = nullptr,
                       const InputConstraints* constraints = nullptr);

/// α-CROWN's parameters of R rows (branch and bound's warm starts, docs §22): per node
/// [R, *shape] float32 the lower ReLU slopes and the split multipliers (undefined where
/// a node has none), [R, D] the input constraints' multipliers, and `has` [R] bool, the
/// rows that carry them (as a warm start; the others start from CROWN's slopes and zero
/// multipliers). Any values give sound bounds: they only steer the optimisation.
struct RowParams {
  std::vector<torch::Tensor> alpha, beta;
  torch::Tensor beta_in, has;
};

/// bound_specs for rows of their own samples (any number per sample): row r is C[r]·h
/// over the region of sample `sample[r]`. C: [R, K], sample: [R] int64 -> lower, err32: [R]
/// Under α-CROWN, `warm` (rows aligned with C) starts the optimisation, and `best`
/// receives each row's parameters at its best step.
SpecBounds bound_spec_rows(const BoundPass& pass, const torch::Tensor& C,
                           const torch::Tensor& sample,
                           const InputConstraints* constraints = nullptr,
                           const RowParams* warm = nullptr, RowParams* best = nullptr);

/// Sound upper bound on sup over the region of ‖C·J_h‖_q (q the dual of the domain's
/// norm) per row, from the backward interval Jacobian with the pass's ReLU states.
/// C: [B, S, K] -> [B, S]
torch::Tensor bound_jacobian_norms(const BoundPass& pass, const torch::Tensor& C);

/// The same quantity bounded by linear bound propagation through the Jacobian graph
/// (Shi et al., NeurIPS 2022; docs §16): sup ‖C·J_h‖_q = sup over the unit p-ball of
/// directions s of C·J_h·s, and J_h·s is the graph with every bias dropped and every
/// ReLU replaced by its derivative gate δ (1 / 0 on the pass's stable units, [0, 1] on
/// its unstable ones), a network in s that CROWN bounds; `intermediate` chooses CROWN
/// or interval bounds on the gates' inputs. Undefined when the graph has an operator
/// with no gate form (max-pool). C: [B, S, K] -> [B, S]
torch::Tensor bound_jacobian_relaxed(const BoundPass& pass, const torch::Tensor& C,
                                     BoundMethod intermediate);

}  // namespace moecert
