// tokens: a ViT's patch grid [D, h, w] -> the token sequence [1 + h·w, D]: the class
// token c (`bias` [D]) first, then patch t = i·w + j, and the position embedding P
// (`weight` [1 + h·w, D]) added: y_0 = c + P_0, y_{1+t} = x[:, t] + P_{1+t}. Affine
// and exact under CROWN. docs/certification.md §10, §12, §20.
#include "moecert/error.h"
#include "rules-impl.h"

namespace moecert::rules {
namespace {

/// [R, D, h, w] -> [R, h·w, D]
torch::Tensor to_tokens(const torch::Tensor& x) { return x.flatten(2).transpose(1, 2); }
/// [R, h·w, D] -> [R, D, h, w]
torch::Tensor to_grid(const torch::Tensor& t, const Shape& grid) {
  return t.transpose(1, 2).reshape({t.size(0), grid[0], grid[1], grid[2]});
}

class TokensRule final : public BoundRule {
 public:
  const char* name() const override { return "tokens"; }
  bool takes_patches() const override { return false; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    const Shape& s = in.at(0);
    if (s.size() != 3)
      throw ShapeError::unexpected("certify: input of tokens '" + l.name + "'", "[D, h, w]", s);
    const Shape out{1 + s[1] * s[2], s[0]};
    if (l.weight.sizes().vec() != out || l.bias.sizes().vec() != Shape{s[0]})
      throw ShapeError::unexpected(
          "certify: position embedding of tokens '" + l.name + "'",
          shape_str(out) + " and a class token [" + std::to_string(s[0]) + "]",
          l.weight.sizes().vec());
    return out;
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    auto t = to_tokens(x[0]);
    auto cls = l.bias.view({1, 1, -1}).expand({t.size(0), 1, t.size(2)});
    return torch::cat({cls, t}, 1) + l.weight;
  }

  // IBP: the enclosure relabelled, plus P. Magnitude |x| + |P| (row 0: |c| + |P_0|).
  // float32: one rounded addition per entry, e' = e + u(M + e + |P|) (row 0: u|c + P_0|).
  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    auto place = [&](const torch::Tensor& v, const torch::Tensor& first) {
      auto t = to_tokens(v);
      return torch::cat({first.view({1, 1, -1}).expand({t.size(0), 1, t.size(2)}), t}, 1);
    };
    auto lo = place(x.lo, l.bias) + l.weight, hi = place(x.hi, l.bias) + l.weight;
    if (interval_only(x)) return {lo, hi, {}, {}};
    auto ap = l.weight.abs();
    auto mag = place(x.mag, l.bias.abs()) + ap;
    auto e = place(x.err32, torch::zeros_like(l.bias));
    return {lo, hi, mag, e + u32 * (place(x.mag + x.err32, l.bias.abs()) + ap)};
  }

  // CROWN: Σ A·y = Σ_t A_{1+t}·x[:, t] + A_0·c + Σ A·P, exactly.
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    if (c.patches) return {};
    b = b + row_sum(c.A * a.layer.weight) + torch::mv(c.A.select(1, 0), a.layer.bias);
    Coeffs out = c;
    out.A = to_grid(c.A.narrow(1, 1, c.A.size(1) - 1), a.in_shapes[0]);
    return {out};
  }

  // A relabelling of coordinates plus a constant: the input's constant, in any norm.
  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    return k.at(0);
  }

  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    auto grid = [&](const torch::Tensor& t) {
      return to_grid(t.narrow(1, 1, t.size(1) - 1), a.in_shapes[0]);
    };
    return {{grid(j.c), grid(j.r)}};
  }

  // Derivative: the relabelling without its constants.
  std::optional<Layer> derivative(const Layer& l, const DerivativeArgs&) const override {
    return Layer::tokens_of(l.name, torch::zeros_like(l.bias), torch::zeros_like(l.weight));
  }
};

// token_select: [N, D] -> [D], the token `kernel` (ViT's class token, 0). Exact.
class TokenSelectRule final : public BoundRule {
 public:
  const char* name() const override { return "token_select"; }
  bool takes_patches() const override { return false; }

  Shape out_shape(const Layer& l, const std::vector<Shape>& in) const override {
    const Shape& s = in.at(0);
    if (s.size() != 2 || l.kernel < 0 || l.kernel >= s[0])
      throw ShapeError::unexpected("certify: input of token_select '" + l.name + "' (token " +
                                       std::to_string(l.kernel) + ")",
                                   "[N, D] with N > " + std::to_string(l.kernel), s);
    return {s[1]};
  }

  torch::Tensor forward(const Layer& l, const std::vector<torch::Tensor>& x) const override {
    return x[0].select(1, l.kernel);
  }

  NodeBounds bounds(const Layer& l, const std::vector<const NodeBounds*>& in) const override {
    const auto& x = *in[0];
    auto pick = [&](const torch::Tensor& t) { return t.select(1, l.kernel); };
    if (interval_only(x)) return {pick(x.lo), pick(x.hi), {}, {}};
    return {pick(x.lo), pick(x.hi), pick(x.mag), pick(x.err32)};
  }

  // CROWN: the rows over the selected token, zero over the others.
  std::vector<Coeffs> backward(const BackwardArgs& a, const Coeffs& c,
                               torch::Tensor& b) const override {
    if (c.patches) return {};
    Coeffs out = c;
    out.A = spread(c.A, a.in_shapes[0], a.layer.kernel);
    return {out};
  }

  double lipschitz(const Layer& l, Norm p, const std::vector<Shape>& in,
                   const std::vector<double>& k, bool to_inf) const override {
    return k.at(0);
  }

  std::vector<JacobianBox> jacobian(const BackwardArgs& a, const JacobianBox& j) const override {
    return {
        {spread(j.c, a.in_shapes[0], a.layer.kernel), spread(j.r, a.in_shapes[0], a.layer.kernel)}};
  }

  std::optional<Layer> derivative(const Layer& l, const DerivativeArgs&) const override {
    return l;
  }

 private:
  /// [R, D] -> [R, N, D], zero but token `at`.
  static torch::Tensor spread(const torch::Tensor& rows, const Shape& in, int64_t at) {
    auto out = torch::zeros({rows.size(0), in[0], in[1]}, rows.options());
    out.select(1, at).copy_(rows);
    return out;
  }
};

}  // namespace

std::unique_ptr<BoundRule> make_tokens_rule() { return std::make_unique<TokensRule>(); }
std::unique_ptr<BoundRule> make_token_select_rule() { return std::make_unique<TokenSelectRule>(); }

}  // namespace moecert::rules
