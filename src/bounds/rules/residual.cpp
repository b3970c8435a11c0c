// residual: y = a + b, the sum node of a residual block (its inputs: the main
// path's last node and the shortcut's, or the block's input for an identity).
// docs/certification.md §2, §3, §10.
#include "moecert/error.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

class ResidualRule final : public BoundRule {
 public:
  const char* name() const override { return "residual"; }
  int arity() const override { return 2; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    if (in.size() != 2 || in[0] != in[1])
      throw ShapeError::unexpected("certify: residual block '" + l.name +
                                       "' adds branches of shapes " + shape_str(in.at(0)) + " and",
                                   "equal shapes", in.size() > 1 ? in[1] : Shape{});
    return in[0];
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return x[0] + x[1];
  }

  // IBP: the sum of two enclosures encloses the sum. Magnitude M_a + M_b.
  // float32: one rounded addition, e' = e_a + e_b + u (M_a + M_b + e_a + e_b).
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto &a = *in[0], &b = *in[1];
    if (interval_only(a) || interval_only(b)) return {a.lo + b.lo, a.hi + b.hi, {}, {}};
    auto m = magnitude(a) + magnitude(b), e = a.err32 + b.err32;
    return {a.lo + b.lo, a.hi + b.hi, m, e + u32 * (m + e)};
  }

  // CROWN: Σ A·(a + b) = Σ A·a + Σ A·b, exactly: the same rows to both branches.
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    return {c, c};
  }

  // L(a + b) <= L(a) + L(b) (for the identity shortcut, 1 + L(main)).
  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    return k.at(0) + k.at(1);
  }

  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    return {j, j};
  }

  // Derivative: the sum of the inputs' derivatives.
  std::optional<Layer> derivative(const Layer& l, const DerivativeArgs&) const override {
    return l;
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_residual_rule() { return std::make_unique<ResidualRule>(); }

}  // namespace moecert::rules
