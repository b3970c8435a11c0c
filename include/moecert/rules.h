// Per-operator bound rules (SPEC §4.6): one rule per layer kind, each a small
// pure-virtual interface (output shape, evaluation, interval forward with rounding
// magnitudes and float32 error, backward linear-bound step, operator norm,
// Jacobian bound step), and a registry from kind to rule. The engine that walks a
// graph with them is include/moecert/bounds.h; the proofs are in
// docs/certification.md. Adding a kind: one file in src/bounds/rules/ and one line in
// src/bounds/rules/registry.cpp.
#pragma once

#include <torch/types.h>

#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "moecert/attacks.h"
#include "moecert/graph.h"

namespace moecert {

using Shape = std::vector<int64_t>;  ///< a node's shape without the batch dimension

/// What the forward sweep knows of one node's output over each sample's input
/// region. All [B, *shape], float64.
struct NodeBounds {
  torch::Tensor lo, hi;  ///< encloses the exact-real output (outward-rounded by the engine)
  torch::Tensor
      mag;  ///< >= |output| and >= the sum of |terms| its arithmetic adds (rounding allowances)
  torch::Tensor
      err32;  ///< >= |float32 output − exact output| of the model as LibTorch evaluates it
};

/// Linear coefficients of R bound rows over one node's output. Row r stands for
/// Σ A[r]·z (its constant is kept by the engine). Dense, or as patches: in a conv
/// chain a row only sees a window, so A holds that window alone.
struct Coeffs {
  torch::Tensor A;       ///< dense: [R, *shape]; patches: [R, C, K, K]
  torch::Tensor sample;  ///< [R] int64: the sample (batch row) of each bound row
  bool patches = false;
  /// Patches: row r has target site s = site[r] = b·Ht·Wt + i·Wt + j, and its entry
  /// (c, u, v) multiplies the node's value at (c, i·stride − pad + u, j·stride − pad + v).
  /// Entries outside the node's grid are zero.
  torch::Tensor site;
  int64_t stride = 1, pad = 0, kernel = 1, Ht = 0, Wt = 0;
};

/// Interval enclosure {c ± r} of Jacobian rows over a node's output: [R, *shape].
struct JacobianBox {
  torch::Tensor c, r;
};

/// What a backward (CROWN) step of one node sees.
struct BackwardArgs {
  const Layer& layer;
  const std::vector<Shape>& in_shapes;
  const Shape& out_shape;
  std::vector<const NodeBounds*> in;  ///< bounds of each input node over the region
  /// A per-sample tensor [B, *out_shape] laid out like the coefficients (gathered by
  /// row: dense index_select, patches unfold): what a step multiplies A by.
  std::function<torch::Tensor(const torch::Tensor&)> gather;
  /// α-CROWN: the lower ReLU slopes of this node's rows, laid out like A (else undefined).
  torch::Tensor alpha;
};

/// What a rule's derivative step sees (docs §16): the bounds of the layer's first
/// input over the region.
struct DerivativeArgs {
  const NodeBounds& input;
};

/// One layer kind. The formula of each method sits above its code in the rule's
/// file; every rule has a sampling soundness test (tests/certify/test_rules*.cpp).
class BoundRule {
 public:
  virtual ~BoundRule() = default;
  /// The kind's name in messages ("conv", "relu", ...).
  virtual const char* name() const = 0;
  /// Number of inputs: 1, 2 for the residual sum (main, shortcut), 0 for any
  /// number >= 1 (concatenation).
  virtual int arity() const { return 1; }
  /// Whether the engine needs tight bounds on this node's input (a piecewise-linear
  /// operator that is relaxed: ReLU, max-pool).
  virtual bool relaxed() const { return false; }
  /// The units of a relaxed operator's input whose bounds decide its relaxation, as a
  /// mask over `in` [B, *shape] (the engine tightens only those). Default: all of them.
  virtual torch::Tensor relaxed_units(const Layer& l, const NodeBounds& in) const {
    return torch::ones_like(in.lo, torch::kBool);
  }
  /// Whether per-node float32 error bounds compound by orders of magnitude through this
  /// operator (LayerNorm, softmax, attention products): Float32Errors::automatic then
  /// counts the graph's rounding relationally (bounds.h).
  virtual bool compounds_rounding() const { return false; }
  /// Whether jacobian() bounds Jacobian rows; false: it throws UnsupportedLayerError
  /// naming the layer, and certify leaves out the local Lipschitz estimator.
  virtual bool has_jacobian() const { return true; }
  /// Whether backward() takes patch rows; if not, the engine hands it dense rows.
  virtual bool takes_patches() const { return true; }
  /// α-CROWN: the initial lower slopes in [0, 1] of a relaxed operator's units over
  /// its input bounds, [B, *shape] (undefined: nothing to optimise).
  virtual torch::Tensor alpha_init(const Layer& l, const NodeBounds& in) const { return {}; }
  /// Output shape from the input shapes; throws ShapeError naming the layer.
  virtual Shape out_shape(const Layer& l, const std::vector<Shape>& in) const = 0;
  /// Evaluation in the tensors' dtype. x: one [N, *in] per input -> [N, *out]
  virtual torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const = 0;
  /// Interval forward (IBP) with the magnitude and float32-error bounds of the output.
  virtual NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const = 0;
  /// CROWN step for lower bounds: the rows' coefficients over the output -> over each
  /// input (one per input, undefined A = no contribution); the rows' constant terms are
  /// added to `b` [R]. Returns {} when this layout (patches) is not handled: the engine
  /// then concretises the rows with this node's interval instead.
  virtual std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                                       torch::Tensor& b) const = 0;
  /// Global Lipschitz step: the constant of this node's output (‖·‖_p of the graph
  /// input -> ‖·‖_p, or ‖·‖_∞ with `to_inf`) from its inputs' constants.
  virtual double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                           const std::vector<double>& in_constants, bool to_inf) const = 0;
  /// Jacobian bound step (local Lipschitz, Fast-Lip style): an interval enclosure of
  /// Jacobian rows over the output -> over each input. `sample` [R]: each row's sample.
  virtual std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const = 0;
  /// The layer of the derivative graph (docs §16): the map s -> J·s of this layer at
  /// any point of the region, reading the derivatives of the layer's inputs in the
  /// same order. nullopt: none in the form of a layer (the relaxed Jacobian bound then
  /// falls back to the interval one).
  virtual std::optional<Layer> derivative(const Layer& l, const DerivativeArgs& a) const {
    return std::nullopt;
  }
};

/// The rule of a layer's kind; UnsupportedLayerError naming the layer and saying
/// what to add when there is none.
const BoundRule& rule_for(const Layer& l);

/// "kind 'name'" of every node whose rule has no Jacobian step (has_jacobian).
std::vector<std::string> no_jacobian_nodes(const LayerGraph& g);

/// Output shape of a whole graph. in: [C, H, W]; throws as CompiledGraph does.
Shape graph_out_shape(const LayerGraph& g, const Shape& in);

/// Evaluates a graph in its tensors' dtype (float64 for certification).
/// x: [B, C, H, W] -> logits [B, K]
torch::Tensor graph_forward(const LayerGraph& g, const torch::Tensor& x);

}  // namespace moecert
