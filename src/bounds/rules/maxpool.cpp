// maxpool: y = max of x over k × k windows, stride s, padding p (padded positions
// never win, as in PyTorch). docs/certification.md §2, §3, §10, §11.
#include <cmath>
#include <stdexcept>

#include "moecert/error.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

namespace F = torch::nn::functional;

class MaxPoolRule final : public BoundRule {
 public:
  const char* name() const override { return "maxpool"; }
  bool relaxed() const override { return true; }
  bool takes_patches() const override { return false; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    const Shape& s = in.at(0);
    if (s.size() != 3 || l.kernel < 1 || l.stride < 1 || 2 * l.padding > l.kernel ||
        s[1] + 2 * l.padding < l.kernel || s[2] + 2 * l.padding < l.kernel)
      throw ShapeError::unexpected(
          "certify: max-pool '" + l.name + "' (kernel " + std::to_string(l.kernel) + ", stride " +
              std::to_string(l.stride) + ", padding " + std::to_string(l.padding) + ") input",
          "[C, H, W] no smaller than the kernel and padding <= kernel / 2", s);
    return {s[0], (s[1] + 2 * l.padding - l.kernel) / l.stride + 1,
            (s[2] + 2 * l.padding - l.kernel) / l.stride + 1};
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return pool(l, x[0]);
  }

  // IBP: max is monotone, [maxpool(lo), maxpool(hi)]. Magnitude maxpool(M). float32:
  // taking a maximum is exact, and |max x̂ − max x| <= max |x̂ − x|: e' = maxpool(e).
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    if (interval_only(x)) return {pool(l, x.lo), pool(l, x.hi), {}, {}};
    return {pool(l, x.lo), pool(l, x.hi), pool(l, magnitude(x)), pool(l, x.err32)};
  }

  // CROWN lower bound of Σ a·y (DeepPoly's relaxation): y >= x_j for the window's j with
  // the largest lower bound (a >= 0), and y <= max_j u_j, a constant (a < 0):
  // A_in = scatter of A⁺ to those j, b += Σ A⁻ · max u. Dense rows only.
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    if (c.patches) throw std::logic_error("certify: the max-pool rule takes dense rows only");
    const auto& x = *a.in[0];
    const Shape& in = a.in_shapes[0];
    auto [low, where] =
        F::max_pool2d_with_indices(x.lo, options(a.layer));  // argmax of the lower bounds
    auto top = pool(a.layer, x.hi);
    const int64_t R = c.A.size(0), C = in[0], HW = in[1] * in[2];
    b = b + row_sum(c.A.clamp_max(0) * a.gather(top));
    auto idx = where.index_select(0, c.sample).view({R, C, -1});
    Coeffs out = c;
    out.A = torch::zeros({R, C, HW}, c.A.options())
                .scatter_add_(2, idx, c.A.clamp_min(0).view({R, C, -1}))
                .view({R, C, in[1], in[2]});
    return {out};
  }

  // p = ∞: |max x − max x'| <= max |x − x'|: 1. p = 2: each input lies in at most
  // ceil(k/s)² windows, so ‖Δy‖² <= Σ_windows max Δ² <= ceil(k/s)² ‖Δx‖²: ceil(k/s).
  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    if (p == Norm::linf) return k.at(0);
    return k.at(0) * std::ceil(static_cast<double>(l.kernel) / static_cast<double>(l.stride));
  }

  // Jacobian rows: where y is differentiable its row is e_j for the window's winner j,
  // and only a j with u_j >= the window's largest lower bound can win. Each such j gets
  // [min(lo, 0), max(hi, 0)] of the output entry (it is the value or 0); overlapping
  // windows add.
  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    const auto& x = *a.in[0];
    const Layer& l = a.layer;
    const Shape& in = a.in_shapes[0];
    const int64_t k = l.kernel, C = in[0];
    auto win_lo = pool(l, x.lo);  // [B, C, Ho, Wo]
    auto hi_cols =
        F::unfold(x.hi, F::UnfoldFuncOptions({k, k}).stride(l.stride).padding(l.padding));
    auto can_win = hi_cols.view({x.hi.size(0), C, k * k, -1}).ge(win_lo.flatten(2).unsqueeze(2));
    auto mask = a.gather(can_win.to(j.c.dtype()));  // per row: [R, C, k·k, L]
    auto lo = (j.c - j.r).clamp_max(0).flatten(2).unsqueeze(2),
         hi = (j.c + j.r).clamp_min(0).flatten(2).unsqueeze(2);
    auto spread = [&](const torch::Tensor& v) {  // [R, C, k·k, L] -> [R, C, H, W]
      return F::fold(
          v.reshape({v.size(0), C * k * k, -1}),
          F::FoldFuncOptions({in[1], in[2]}, {k, k}).stride(l.stride).padding(l.padding));
    };
    auto cl = spread((lo * mask)), ch = spread((hi * mask));
    return {{(cl + ch) * 0.5, (ch - cl) * 0.5}};
  }

 private:
  static F::MaxPool2dFuncOptions options(const Layer& l) {
    return F::MaxPool2dFuncOptions(l.kernel).stride(l.stride).padding(l.padding);
  }
  static torch::Tensor pool(const Layer& l, const torch::Tensor& t) {
    return F::max_pool2d(t, options(l));
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_maxpool_rule() { return std::make_unique<MaxPoolRule>(); }

}  // namespace moecert::rules
