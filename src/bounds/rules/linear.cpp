// linear: y = W x + b, W [O, I], on the last dimension (a vector [I], or every
// token of a sequence [N, I] alike). docs/certification.md §2, §3, §10, §11.
#include "moecert/error.h"
#include "moecert/spectral.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

class LinearRule final : public BoundRule {
 public:
  const char* name() const override { return "linear"; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    Shape s = in.at(0);
    if (s.empty() || s.back() != l.weight.size(1))
      throw ShapeError::unexpected("certify: input of linear '" + l.name + "'",
                                   "[..., " + std::to_string(l.weight.size(1)) + "]", s);
    if (l.bias.defined() && l.bias.sizes().vec() != Shape{l.weight.size(0)})
      throw ShapeError::unexpected("certify: bias of linear '" + l.name + "'",
                                   "[" + std::to_string(l.weight.size(0)) + "]",
                                   l.bias.sizes().vec());
    s.back() = l.weight.size(0);
    return s;
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return torch::linear(x[0], l.weight, l.bias);
  }

  // IBP: c' = W c + b, r' = |W| r. Magnitude: |W| M + |b|. float32 (sums of n = I
  // products and the bias, any order): |ŷ − y| <= |W| e + γ_{n+1}(|W|(M + e) + |b|).
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    auto aw = l.weight.abs();
    auto c = torch::linear((x.lo + x.hi) * 0.5, l.weight, l.bias);
    auto r = torch::linear((x.hi - x.lo) * 0.5, aw);
    if (interval_only(x)) return {c - r, c + r, {}, {}};
    auto ab = l.bias.defined() ? l.bias.abs() : torch::zeros({1}, x.lo.options());
    NodeBounds y{c - r, c + r, torch::linear(magnitude(x), aw) + ab, {}};
    auto spread = torch::linear(x.err32, aw);
    y.err32 = spread + gamma(static_cast<double>(l.weight.size(1)) + 1, u32) * (y.mag + spread);
    return y;
  }

  // CROWN: Σ A·y = (A W)·x + A·b exactly. Rows over a flat vector: dense only. Rows
  // with one non-zero entry v at u (a unit's bound rows, in the intermediate bounds of
  // the next relaxation) are v·W[u]: the same single product per entry that the matrix
  // product forms, without its O(R·O·I) work. Token rows [R, N, O] -> [R, N, I] alike.
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    if (c.patches) return {};
    if (a.layer.bias.defined()) b = b + row_sum(c.A * a.layer.bias);
    Coeffs out = c;
    if (c.A.dim() == 2 && !c.A.requires_grad() && c.A.size(0) > 0 &&
        c.A.ne(0).sum(1).eq(1).all().item<bool>()) {
      auto u = c.A.abs().argmax(1);
      out.A = a.layer.weight.index_select(0, u) * c.A.gather(1, u.view({-1, 1}));
      return {out};
    }
    out.A = torch::matmul(c.A, a.layer.weight);
    return {out};
  }

  // p = ∞: max row ℓ1 (exact). p = 2: σ_max(W) (verified bound, spectral.h); as the
  // last layer (-> ∞): max row ℓ2, exact by Cauchy–Schwarz. On tokens the map is
  // block diagonal (W once per token): the same constants.
  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    double n;
    if (p == Norm::linf)
      n = l.weight.abs().sum(1).max().item<double>();
    else if (to_inf)
      n = l.weight.pow(2).sum(1).sqrt().max().item<double>();
    else
      n = max_spectral_norm_upper(l.weight.unsqueeze(0));
    return n * k.at(0);
  }

  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    return {{torch::matmul(j.c, a.layer.weight), torch::matmul(j.r, a.layer.weight.abs())}};
  }

  // Derivative: the matrix without its bias.
  std::optional<Layer> derivative(const Layer& l, const DerivativeArgs&) const override {
    return Layer::dense(l.name, l.weight, {});
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_linear_rule() { return std::make_unique<LinearRule>(); }

}  // namespace moecert::rules
