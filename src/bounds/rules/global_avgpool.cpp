// global_avgpool: y_c = (1 / HW) Σ_{h,w} x_{c,h,w}, [C, H, W] -> [C].
// docs/certification.md §2, §3, §10.
#include <cmath>

#include "rules-impl.h"

namespace moecert::rules {
namespace {

class GlobalAvgPoolRule final : public BoundRule {
 public:
  const char* name() const override { return "global_avgpool"; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    return {in.at(0).at(0)};
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return x[0].mean({2, 3});
  }

  // IBP: the mean of a box is the box of means (exact). Magnitude mean(M).
  // float32 (a sum of HW terms, then a division): e' = mean(e) + γ_{HW+1} mean(M + e).
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    if (interval_only(x)) return {x.lo.mean({2, 3}), x.hi.mean({2, 3}), {}, {}};
    const double n = static_cast<double>(x.lo.size(2) * x.lo.size(3));
    auto m = magnitude(x).mean({2, 3});
    auto e = x.err32.mean({2, 3});
    return {x.lo.mean({2, 3}), x.hi.mean({2, 3}), m, e + gamma(n + 1, u32) * (m + e)};
  }

  // CROWN: Σ_c A_c y_c = Σ_{c,h,w} (A_c / HW) x_{c,h,w}. Dense only (the output is flat).
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    if (c.patches) return {};
    Coeffs out = c;
    out.A = spread(c.A, a.in_shapes[0]);
    return {out};
  }

  // p = ∞: each output averages its channel: 1. p = 2: ‖y‖_2² = Σ_c (mean x_c)² <=
  // Σ_c ‖x_c‖² / HW (Cauchy–Schwarz), so 1/sqrt(HW).
  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    if (p == Norm::linf) return k.at(0);
    return k.at(0) / std::sqrt(static_cast<double>(in.at(0).at(1) * in.at(0).at(2)));
  }

  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    return {{spread(j.c, a.in_shapes[0]), spread(j.r, a.in_shapes[0])}};
  }

  // Derivative: the layer itself (it is linear without a constant).
  std::optional<Layer> derivative(const Layer& l, const DerivativeArgs&) const override {
    return l;
  }

 private:
  /// [R, C] -> [R, C, H, W], each entry divided by HW.
  static torch::Tensor spread(const torch::Tensor& t, const Shape& in) {
    const double hw = static_cast<double>(in[1] * in[2]);
    return (t / hw).view({t.size(0), t.size(1), 1, 1}).expand({t.size(0), t.size(1), in[1], in[2]});
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_global_avgpool_rule() {
  return std::make_unique<GlobalAvgPoolRule>();
}

}  // namespace moecert::rules
