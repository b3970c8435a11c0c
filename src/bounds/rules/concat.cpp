// concat: y = (x_1, ..., x_n) stacked along the first unbatched dimension (the
// channels of [C, H, W]; the features of a vector): a relabelling of coordinates,
// exact everywhere (DenseNet's dense connections). docs/certification.md §2, §3, §10.
#include <algorithm>
#include <cmath>

#include "moecert/error.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

class ConcatRule final : public BoundRule {
 public:
  const char* name() const override { return "concat"; }
  int arity() const override { return 0; }  // any number >= 1

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    Shape out = in.at(0);
    for (size_t i = 1; i < in.size(); ++i) {
      Shape a = in[i], b = out;
      if (a.empty() || a.size() != b.size() || !std::equal(a.begin() + 1, a.end(), b.begin() + 1))
        throw ShapeError::unexpected("concat '" + l.name + "': input " + std::to_string(i),
                                     "[*, " + shape_str(Shape(b.begin() + 1, b.end())) + "]", a);
      out[0] += a[0];
    }
    return out;
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return torch::cat(x, 1);
  }

  // IBP: the enclosures side by side; magnitudes and float32 errors likewise (no
  // arithmetic, so no rounding).
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    auto cat = [&](torch::Tensor NodeBounds::*f) {
      std::vector<torch::Tensor> parts;
      for (const auto* x : in) parts.push_back(x->*f);
      return torch::cat(parts, 1);
    };
    const bool plain = std::any_of(in.begin(), in.end(), [](auto* x) { return interval_only(*x); });
    if (plain) return {cat(&NodeBounds::lo), cat(&NodeBounds::hi), {}, {}};
    return {cat(&NodeBounds::lo), cat(&NodeBounds::hi), cat(&NodeBounds::mag),
            cat(&NodeBounds::err32)};
  }

  // CROWN: Σ A·y = Σ_i A_i·x_i, exactly, with A_i the block of A over x_i's channels
  // (dense rows and patch rows alike: the spatial grid is unchanged).
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    std::vector<Coeffs> out;
    int64_t at = 0;
    for (const auto& s : a.in_shapes) {
      Coeffs part = c;
      part.A = c.A.narrow(1, at, s[0]);
      out.push_back(std::move(part));
      at += s[0];
    }
    return out;
  }

  // ‖y‖_2 = sqrt(Σ ‖x_i‖²) <= sqrt(Σ k_i²)·‖x‖; ‖y‖_∞ = max ‖x_i‖_∞ <= max k_i·‖x‖.
  // Into ‖·‖_∞ (the output node): max_i of the inputs' constants, each >= its
  // ‖·‖_∞ constant since ‖·‖_∞ <= ‖·‖_p.
  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    if (p == Norm::linf || to_inf) return *std::max_element(k.begin(), k.end());
    double s = 0;
    for (double v : k) s += v * v;
    return std::sqrt(s);
  }

  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    std::vector<JacobianBox> out;
    int64_t at = 0;
    for (const auto& s : a.in_shapes) {
      out.push_back({j.c.narrow(1, at, s[0]), j.r.narrow(1, at, s[0])});
      at += s[0];
    }
    return out;
  }

  // Derivative: the layer itself (the concatenation of the inputs' derivatives).
  std::optional<Layer> derivative(const Layer& l, const DerivativeArgs&) const override {
    return l;
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_concat_rule() { return std::make_unique<ConcatRule>(); }

}  // namespace moecert::rules
