// conv2d: y = W ⋆ x + b, W [O, I, k, k], stride s, zero padding p (square only;
// the model side refuses anything else). docs/certification.md §2, §3, §10, §11.
#include "moecert/error.h"
#include "moecert/spectral.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

class Conv2dRule final : public BoundRule {
 public:
  const char* name() const override { return "conv"; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    const Shape& s = in.at(0);
    if (s.size() != 3 || s[0] != l.weight.size(1))
      throw ShapeError::unexpected("certify: input of conv '" + l.name + "'",
                                   "[" + std::to_string(l.weight.size(1)) + ", H, W]", s);
    const int64_t k = l.weight.size(2);
    if (l.weight.size(3) != k || l.stride < 1 || s[1] + 2 * l.padding < k ||
        s[2] + 2 * l.padding < k)
      throw ShapeError::unexpected(
          "certify: conv '" + l.name + "' (stride " + std::to_string(l.stride) + ", padding " +
              std::to_string(l.padding) + ") weight",
          "a square kernel no larger than the padded input, stride >= 1", l.weight.sizes().vec());
    if (l.bias.defined() && l.bias.sizes().vec() != Shape{l.weight.size(0)})
      throw ShapeError::unexpected("certify: bias of conv '" + l.name + "'",
                                   "[" + std::to_string(l.weight.size(0)) + "]",
                                   l.bias.sizes().vec());
    return {l.weight.size(0), (s[1] + 2 * l.padding - k) / l.stride + 1,
            (s[2] + 2 * l.padding - k) / l.stride + 1};
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return torch::conv2d(x[0], l.weight, l.bias, l.stride, l.padding);
  }

  // IBP: c' = W⋆c + b, r' = |W|⋆r encloses the image of the box (triangle inequality).
  // Magnitude: |W|⋆M + |b|. float32 (every output a sum of n = I·k·k products and the
  // bias, in any order): |ŷ − y| <= |W|⋆e + γ_{n+1}(|W|⋆(M + e) + |b|).
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    auto aw = l.weight.abs();
    auto ab = l.bias.defined() ? channel_view(l.bias.abs(), 4) : torch::zeros({1}, x.lo.options());
    auto conv_abs = [&](const torch::Tensor& t) {
      return torch::conv2d(t, aw, {}, l.stride, l.padding);
    };
    auto c = torch::conv2d((x.lo + x.hi) * 0.5, l.weight, l.bias, l.stride, l.padding);
    auto r = conv_abs((x.hi - x.lo) * 0.5);
    if (interval_only(x)) return {c - r, c + r, {}, {}};
    NodeBounds y{c - r, c + r, conv_abs(magnitude(x)) + ab, {}};
    const double n = static_cast<double>(l.weight[0].numel());
    auto spread = conv_abs(x.err32);
    y.err32 = spread + gamma(n + 1, u32) * (y.mag + spread);
    return y;
  }

  // CROWN: Σ A·y = Σ (Wᵀ ⋆ A)·x + Σ_o (Σ_{h,w} A_o) b_o, exactly.
  //  dense: A_in = conv_transpose(A, W, s, p) with the output padding of the input size;
  //  patches: the window of a row grows to (K−1)s + k at stride S·s and offset P·s + p,
  //  A_in = conv_transpose(A, W, s) on the window; entries on the padding are dropped.
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    const Layer& l = a.layer;
    if (l.bias.defined()) b = b + (c.A.sum({2, 3}) * l.bias.view({1, -1})).sum(1);
    const Shape& in = a.in_shapes[0];
    Coeffs out = c;
    if (!c.patches) {
      out.A = transposed(c.A, l.weight, l, in);
      return {out};
    }
    const auto& w = l.weight;
    if (c.A.size(2) == 1 && c.A.size(3) == 1)  // a one-site window: the transpose is one product
      out.A = torch::matmul(c.A.flatten(1), w.flatten(1))
                  .view({c.A.size(0), w.size(1), w.size(2), w.size(3)});
    else
      out.A = torch::conv_transpose2d(c.A, w, {}, l.stride);
    out.stride = c.stride * l.stride;
    out.pad = c.pad * l.stride + l.padding;
    out.kernel = (c.kernel - 1) * l.stride + l.weight.size(2);
    out.A = out.A * patch_valid(out, in[1], in[2]);
    return {out};
  }

  // p = ∞: one output is Σ W_o·window, so the ∞ -> ∞ norm is max_o Σ|W_o| (exact at an
  // interior position). p = 2: the circular-embedding bound (spectral.h).
  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    if (p == Norm::linf) return l.weight.abs().sum({1, 2, 3}).max().item<double>() * k.at(0);
    return conv_circular_norm(l.weight, l.padding, in.at(0).at(1), in.at(0).at(2)) * k.at(0);
  }

  // Jacobian rows: c' = c W (conv_transpose), r' = r |W|.
  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    const auto& in = a.in_shapes[0];
    return {{transposed(j.c, a.layer.weight, a.layer, in),
             transposed(j.r, a.layer.weight.abs(), a.layer, in)}};
  }

  // Derivative: the convolution without its bias.
  std::optional<Layer> derivative(const Layer& l, const DerivativeArgs&) const override {
    return Layer::conv2d(l.name, l.weight, {}, l.stride, l.padding);
  }

 private:
  static torch::Tensor transposed(const torch::Tensor& t, const torch::Tensor& w, const Layer& l,
                                  const Shape& in) {
    const int64_t k = w.size(2), oh = t.size(2), ow = t.size(3);
    const int64_t ph = in[1] - ((oh - 1) * l.stride - 2 * l.padding + k);
    const int64_t pw = in[2] - ((ow - 1) * l.stride - 2 * l.padding + k);
    return torch::conv_transpose2d(t, w, {}, l.stride, l.padding, {ph, pw});
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_conv2d_rule() { return std::make_unique<Conv2dRule>(); }

}  // namespace moecert::rules
