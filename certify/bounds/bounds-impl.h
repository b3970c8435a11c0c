// Private pieces of the bound-propagation engine shared by its files.
#pragma once

#include <torch/torch.h>

#include <functional>
#include <limits>

#include "moecert/bounds.h"

namespace moecert::bp {

/// Relative rounding allowance of every float64 sum the engine forms: ρ >= γ_n for
/// every sum length n <= 9·10^5 that occurs (fan-ins, patch sizes, input sizes), times
/// a margin of 2 for the few extra roundings per step (docs §12).
inline constexpr double rho = 2e-10;
inline constexpr int64_t max_sum_length = 900000;

/// Per-node α-CROWN slopes (undefined where a node has none), dense [R, *shape].
using Alphas = std::vector<torch::Tensor>;

/// β-CROWN's Lagrangian terms (docs §22), added to rows as they reach a node's output
/// (`at_node`, per node [R, *shape], undefined where none) and at the graph input before
/// concretisation (`at_input`, [R, *input_shape], or undefined).
struct Lagrangian {
  std::vector<torch::Tensor> at_node;
  torch::Tensor at_input;
};

/// Gathers a per-sample tensor [B, *shape] of a node's grid into the layout of `c`.
std::function<torch::Tensor(const torch::Tensor&)> gatherer(const Coeffs& c);

/// Lower bounds of R rows whose coefficients `c` stand at the output of node `start`
/// (constant `b0` [R]), walking back to the graph input (or, after `max_steps` rule
/// steps or where a rule cannot take the layout, concretising with node intervals).
/// Sound: the rounding allowance ρ·mag is subtracted. With `widest`, records the
/// largest number of coefficients a row reached. -> [R]
/// With `keep`, the rows as they reached the input, before concretisation. With `lag`,
/// its terms are added on the way (rows of every node of the walk: dense there).
/// `planes`: whether input planes (opt.input_planes) apply to this walk.
torch::Tensor lower_rows(const BoundPass& pass, int start, Coeffs c, torch::Tensor b0,
                         const Alphas* alphas, int max_steps, int64_t* widest = nullptr,
                         RefinedRows* keep = nullptr, const Lagrangian* lag = nullptr,
                         bool planes = true);

/// Lower bounds of rows over node `start`'s output by α-CROWN in `steps` steps, with
/// β-CROWN's multipliers for a split pass's splits and for `ic` (specs.cpp; docs §11,
/// §22). -> [R]
/// With `primal`, also each row's minimiser (SpecBounds::primal) for the last step's rows.
/// `warm`, `best`: RowParams (bound_spec_rows). `planes_last`: input planes on the
/// first step (CROWN's) and the last only; the slopes are tuned on the chords between
/// (intermediate nodes' many rows).
torch::Tensor alpha_rows(const BoundPass& pass, int start, const Coeffs& rows,
                         const InputConstraints* ic, int steps, torch::Tensor* primal = nullptr,
                         const RowParams* warm = nullptr, RowParams* best = nullptr,
                         bool planes_last = false);

/// Per row (`sample` [R] its samples), the point of the pass's region where the row's
/// input-level form `kept.at_input` is least (SpecBounds::primal). -> [R, *input_shape]
torch::Tensor primal_points(const BoundPass& pass, const RefinedRows& kept,
                            const torch::Tensor& sample);

/// An upper bound on Σ |A|·t per row (t >= 0 a per-sample tensor of the rows' node):
/// ‖A_row‖_1 times the largest t of the row's sample. Only rounding allowances use it,
/// which are ~1e-10 of it, so the looser product costs nothing and saves a gather. -> [R]
torch::Tensor abs_dot(const Coeffs& c, const torch::Tensor& t);

/// Patch rows as dense rows over a node of `shape` [C, H, W].
Coeffs patches_to_dense(const Coeffs& c, const Shape& shape);

/// Input planes (planes.cpp, docs §10, input planes): the affine node `a` that ReLU node `m` reads
/// when the walk may step through both at once with hull planes (an L∞ pass; `a` a conv
/// or dense layer of the graph input or of its per-channel normalisation, read by `m`
/// alone), else -1.
int input_planes_node(const BoundPass& pass, int m);
/// That step: rows over node m's output (slopes `alpha` laid out like them, or undefined;
/// the Lagrangian term `extra` of node a or null, which needs dense rows) -> rows over
/// node a's input; b and mag updated.
Coeffs input_planes_step(const BoundPass& pass, int m, const Coeffs& rows,
                         const torch::Tensor& alpha, const torch::Tensor* extra, torch::Tensor& b,
                         torch::Tensor& mag);

/// lower_rows without α, its rows split over the threads.
torch::Tensor lower_rows_parallel(const BoundPass& pass, int start, const Coeffs& c,
                                  const torch::Tensor& b0, int max_steps);

/// b += min over the pass's input region of Σ A·x for rows over the graph input; mag
/// += the magnitudes of that sum (box for L∞; ball, with the box by duality, for L2).
void concretise_input(const Coeffs& c, const BoundPass& pass, torch::Tensor& b, torch::Tensor& mag);

/// The ends of a region's coordinate box, exactly: [x − ε, x + ε] (∩ [0, 1]), or the
/// domain's [lower, upper]. [B, C, H, W] each
std::pair<torch::Tensor, torch::Tensor> region_ends(const InputDomain& d);

/// The coordinate box of a region (region_ends), outward-rounded.
NodeBounds region_box(const InputDomain& d);

/// Rows Σ_k C[b, s, k] h_k at the output node, dense. C: [B, S, K]
Coeffs spec_rows(const torch::Tensor& C);

}  // namespace moecert::bp
