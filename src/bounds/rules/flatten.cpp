// flatten: [C, H, W] -> [C·H·W], a relabelling of coordinates (exact everywhere).
#include "rules-impl.h"

namespace moecert::rules {
namespace {

class FlattenRule final : public BoundRule {
 public:
  const char* name() const override { return "flatten"; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    int64_t n = 1;
    for (auto s : in.at(0)) n *= s;
    return {n};
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return x[0].flatten(1);
  }

  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    if (interval_only(x)) return {x.lo.flatten(1), x.hi.flatten(1), {}, {}};
    return {x.lo.flatten(1), x.hi.flatten(1), x.mag.flatten(1), x.err32.flatten(1)};
  }

  // Dense rows are reshaped back; rows in patches never reach a flatten (it ends the
  // conv part), so that layout is not handled.
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    if (c.patches) return {};
    Coeffs out = c;
    out.A = c.A.reshape(rows_shape(c.A.size(0), a.in_shapes[0]));
    return {out};
  }

  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    return k.at(0);
  }

  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    const auto shape = rows_shape(j.c.size(0), a.in_shapes[0]);
    return {{j.c.reshape(shape), j.r.reshape(shape)}};
  }

  // Derivative: the layer itself (it is linear without a constant).
  std::optional<Layer> derivative(const Layer& l, const DerivativeArgs&) const override {
    return l;
  }

 private:
  static std::vector<int64_t> rows_shape(int64_t rows, const Shape& in) {
    std::vector<int64_t> s{rows};
    s.insert(s.end(), in.begin(), in.end());
    return s;
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_flatten_rule() { return std::make_unique<FlattenRule>(); }

}  // namespace moecert::rules
