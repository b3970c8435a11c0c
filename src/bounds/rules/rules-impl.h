// Private helpers shared by the rule files: rounding constants, channel views,
// the patch validity mask, and the rule factories the registry lists.
#pragma once

#include <torch/torch.h>

#include <limits>
#include <memory>

#include "moecert/rules.h"

namespace moecert::rules {

/// Unit roundoff of float64 and of float32 (round to nearest).
inline constexpr double u64 = std::numeric_limits<double>::epsilon() / 2;
inline constexpr double u32 = std::numeric_limits<float>::epsilon() / 2;

/// γ_n = n·u / (1 − n·u): the relative error bound of an n-term sum of products
/// in any order, with or without FMA (Higham, Accuracy and Stability, §3.1).
inline double gamma(double n, double u) { return n * u / (1.0 - n * u); }

/// A per-channel vector [C] viewed to broadcast against [N, C, ...] of `dim` dims.
inline torch::Tensor channel_view(const torch::Tensor& v, int64_t dim) {
  std::vector<int64_t> shape(static_cast<size_t>(dim), 1);
  shape[1] = -1;
  return v.view(shape);
}

/// Whether a node's bounds are training's (include/moecert/train_bounds.h): the
/// interval alone, in the parameters' dtype, differentiable, without the rounding
/// magnitude and float32 error that certification carries (mag, err32 undefined).
/// Every rule's bounds() returns the same interval either way and skips those two.
inline bool interval_only(const NodeBounds& x) { return !x.err32.defined(); }

/// max(|lo|, |hi|): a bound on |value| over the interval.
inline torch::Tensor magnitude(const NodeBounds& b) { return torch::max(b.lo.abs(), b.hi.abs()); }

/// Sums every dimension but the first: [R, ...] -> [R].
/// The rows' bounds over the last dimension: max over it, kept as a size-1 dimension.
inline torch::Tensor last_max(const torch::Tensor& t) {
  return std::get<0>(t.max(-1, /*keepdim=*/true));
}

inline torch::Tensor row_sum(const torch::Tensor& t) { return t.flatten(1).sum(1); }

/// Patches: 1 where entry (c, u, v) of a row lies inside an H x W grid, else 0.
/// -> [R, 1, K, K] float64
torch::Tensor patch_valid(const Coeffs& c, int64_t h, int64_t w);

std::unique_ptr<BoundRule> make_channel_affine_rule();
std::unique_ptr<BoundRule> make_conv2d_rule();
std::unique_ptr<BoundRule> make_linear_rule();
std::unique_ptr<BoundRule> make_relu_rule();
std::unique_ptr<BoundRule> make_flatten_rule();
std::unique_ptr<BoundRule> make_global_avgpool_rule();
std::unique_ptr<BoundRule> make_residual_rule();
std::unique_ptr<BoundRule> make_maxpool_rule();
std::unique_ptr<BoundRule> make_gate_rule();
std::unique_ptr<BoundRule> make_concat_rule();
std::unique_ptr<BoundRule> make_tokens_rule();
std::unique_ptr<BoundRule> make_token_select_rule();
std::unique_ptr<BoundRule> make_layernorm_rule();
std::unique_ptr<BoundRule> make_gelu_rule();
std::unique_ptr<BoundRule> make_softmax_rule();
std::unique_ptr<BoundRule> make_attn_scores_rule();
std::unique_ptr<BoundRule> make_attn_mix_rule();

/// A rule without a Jacobian step: UnsupportedLayerError naming the layer and the
/// bound methods that do handle it.
[[noreturn]] void no_jacobian(const char* rule, const Layer& l);

/// A rule without a Jacobian step (has_jacobian false: the local estimator leaves the
/// model out) that wants tight input intervals (relaxed), takes dense rows, and whose
/// global Lipschitz constant is unbounded unless it says otherwise.
class NoJacobianRule : public BoundRule {
 public:
  bool has_jacobian() const override { return false; }
  bool relaxed() const override { return true; }
  bool takes_patches() const override { return false; }
  double lipschitz(const Layer&, Norm, const std::vector<Shape>&, const std::vector<double>&,
                   bool) const override {
    return std::numeric_limits<double>::infinity();
  }
  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox&) const override {
    no_jacobian(name(), a.layer);
  }
};

/// Rows [R, *shape] of a per-sample [B, *shape] interval product: the midpoint-radius
/// enclosure of {c ± r}·[lo, hi] (Rump): c·m ± (|c|·w + r·|m| + r·w), m, w the midpoint
/// and radius of [lo, hi].
JacobianBox interval_scale(const JacobianBox& j, const torch::Tensor& lo, const torch::Tensor& hi);

}  // namespace moecert::rules
