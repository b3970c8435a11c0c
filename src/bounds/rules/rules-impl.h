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

}  // namespace moecert::rules
