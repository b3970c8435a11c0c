// Lipschitz constants of logit maps (SPEC §4.1): global (per-layer operator
// norms), local (interval bounds + backward interval Jacobian), lower and clever.
// Every constant is of the map ‖·‖_p (pixels) -> ‖·‖_∞ (logits); proofs in
// docs/certification.md.
#include "moecert/certify.h"
#include "moecert/defaults.h"
#include "moecert/error.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <random>

namespace moecert {
namespace {

using Shape = std::vector<int64_t>;

int64_t numel(const Shape& s) {
  return std::accumulate(s.begin(), s.end(), int64_t{1}, std::multiplies<int64_t>());
}

/// The output shape of a layer (without batch dimension).
Shape out_shape(const Layer& l, const Shape& in) {
  switch (l.kind) {
    case Layer::Kind::conv: {
      if (in.size() != 3 || in[0] != l.weight.size(1))
        throw ShapeError::unexpected("certify: input of conv '" + l.name + "'",
                                     "[" + std::to_string(l.weight.size(1)) + ", H, W]", in);
      const int64_t k = l.weight.size(2);
      return {l.weight.size(0), (in[1] + 2 * l.padding - k) / l.stride + 1,
              (in[2] + 2 * l.padding - k) / l.stride + 1};
    }
    case Layer::Kind::linear:
      if (numel(in) != l.weight.size(1) || in.size() != 1)
        throw ShapeError::unexpected("certify: input of linear '" + l.name + "'",
                                     "[" + std::to_string(l.weight.size(1)) + "]", in);
      return {l.weight.size(0)};
    case Layer::Kind::flatten: return {numel(in)};
    case Layer::Kind::global_avgpool: return {in.at(0)};
    case Layer::Kind::residual: {
      Shape s = in;
      for (const auto& m : l.main) s = out_shape(m, s);
      return s;
    }
    default: return in;
  }
}

/// γ_k = k·u / (1 − k·u): the relative error bound of k chained float64 operations.
double gamma_f64(double k) {
  const double u = std::numeric_limits<double>::epsilon() / 2;
  return k * u / (1.0 - k * u);
}

}  // namespace

// Proof of every step in docs/certification.md §2 ("p = 2 spectral norms").
double max_spectral_norm_upper(torch::Tensor a, double slack) {
  a = a.to(a.is_complex() ? torch::kComplexDouble : torch::kFloat64).contiguous();
  if (!torch::isfinite(a).all().item<bool>())
    throw NumericError::non_finite("layer weight", "the p = 2 operator norm");
  if (a.size(1) < a.size(2)) a = a.transpose(1, 2).conj();  // the Gram matrix is the smaller side
  const int64_t m = a.size(1), n = a.size(2), batch = a.size(0);
  const double u = std::numeric_limits<double>::epsilon() / 2;
  auto gram = torch::matmul(a.transpose(1, 2).conj(), a).contiguous();  // [F, n, n]
  auto diag = torch::real(gram.diagonal(0, 1, 2)).to(torch::kFloat64);  // [F, n], ĝ_ii >= 0
  // ‖A‖_F² <= tr(Ĝ) / (1 − γ): each ĝ_ii is a rounded sum of m squares (x2 for the trace).
  auto fro2 = diag.sum(1) / (1.0 - gamma_f64(2.0 * static_cast<double>(m + n) + 4.0));
  // ‖Ĝ − G‖_2 <= γ_{2m+4} ‖|A|^H |A|‖_2 <= γ_{2m+4} ‖A‖_F² (complex inner products).
  auto formation = gamma_f64(2.0 * static_cast<double>(m) + 4.0) * fro2;

  // 1. estimate (float32, block power iteration with Rayleigh-Ritz; no soundness role)
  const int64_t block = std::min<int64_t>(n, 8);
  auto g32 = gram.to(a.is_complex() ? torch::kComplexFloat : torch::kFloat32);
  auto gen = at::detail::createCPUGenerator(0x6d6f65);
  auto v = torch::randn({batch, n, block}, gen, torch::TensorOptions().dtype(g32.scalar_type()));
  // Orthonormalise every third product: enough to keep the block well conditioned in
  // float32, and QR costs more than the product on the small matrices.
  for (int it = 1; it <= defaults::spectral_power_iterations; ++it) {
    v = torch::matmul(g32, v);
    if (it % 3 == 0) v = std::get<0>(at::linalg_qr(v, "reduced"));
  }
  // Rayleigh-Ritz in float64: a float32 quotient may sit ~1e-7 above λ_max.
  v = std::get<0>(at::linalg_qr(v.to(gram.scalar_type()), "reduced"));
  auto ritz = at::linalg_eigvalsh(torch::matmul(v.transpose(1, 2).conj(), torch::matmul(gram, v)), "L");
  const double estimate = std::max(ritz.select(1, block - 1).max().item<double>(), 0.0);
  const double mu = estimate * (1.0 + slack) + std::numeric_limits<double>::min();

  // 2. verify λ_max(Ĝ_f) <= μ for all f at once: B = fl(μI − Ĝ) = μI − Ĝ + D with
  // |D_ii| <= u |μ − ĝ_ii|; a completed Cholesky gives R̂^H R̂ = B + ΔB with
  // ‖ΔB‖_2 <= γ ‖R̂‖_F² <= γ tr(B) / (1 − γ), so λ_max(Ĝ) <= μ + |D| + γ tr(B)/(1 − γ).
  auto eye = torch::eye(n, torch::TensorOptions().dtype(gram.scalar_type()));
  auto b = eye * mu - gram;
  auto info = std::get<1>(at::linalg_cholesky_ex(b, false, false));
  const double gc = gamma_f64(2.0 * static_cast<double>(n) + 8.0);
  auto b_diag = mu - diag;  // the diagonal of B (before its rounding)
  auto verified = mu + u * b_diag.abs().amax(1) + gc * b_diag.sum(1).abs() / (1.0 - gc);
  auto bound2 = verified;  // [F], valid where info == 0
  // 3. the frequencies Cholesky could not verify: exact eigenvalues plus the error
  // bound of a backward-stable Hermitian solver, 10 n² u ‖Ĝ‖_F (generous over LAPACK's p(n)).
  auto failed = info.ne(0).nonzero().flatten();
  if (failed.numel() > 0) {
    auto gf = gram.index_select(0, failed);
    auto top = at::linalg_eigvalsh(gf, "L").select(1, n - 1).to(torch::kFloat64);
    auto gfro = at::linalg_matrix_norm(gf, "fro", {-2, -1}, false, c10::nullopt).to(torch::kFloat64);
    bound2 = bound2.index_copy(0, failed, torch::clamp_min(top, 0.0) + 10.0 * static_cast<double>(n * n) * u * gfro);
  }
  bound2 = bound2 + formation;
  return std::sqrt(bound2.max().item<double>()) * (1.0 + 4.0 * u);  // the sum and the root round too
}

namespace {

double linear_spectral_norm(const torch::Tensor& w) { return max_spectral_norm_upper(w.unsqueeze(0)); }

double layer_chain_norm(const LayerGraph& g, Norm p, Shape& shape, bool last_to_inf,
                        std::vector<std::pair<std::string, double>>* record);

double residual_norm(const Layer& l, Norm p, const Shape& in) {
  Shape s = in;
  const double main = layer_chain_norm(l.main, p, s, false, nullptr);
  Shape t = in;
  const double sc = l.shortcut.empty() ? 1.0 : layer_chain_norm(l.shortcut, p, t, false, nullptr);
  return main + sc;
}

double layer_chain_norm(const LayerGraph& g, Norm p, Shape& shape, bool last_to_inf,
                        std::vector<std::pair<std::string, double>>* record) {
  double product = 1.0;
  for (size_t i = 0; i < g.size(); ++i) {
    const auto& l = g[i];
    const bool last = last_to_inf && i + 1 == g.size();
    const double n = l.kind == Layer::Kind::residual ? residual_norm(l, p, shape)
                                                     : layer_operator_norm(l, p, shape, last);
    if (record) record->emplace_back(l.name.empty() ? layer_kind_name(l.kind) : l.name, n);
    product *= n;
    shape = out_shape(l, shape);
  }
  return product;
}

}  // namespace

double conv_circular_norm(const torch::Tensor& weight, int64_t padding, int64_t h, int64_t w) {
  const int64_t out = weight.size(0), in = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  const int64_t nh = h + 2 * padding, nw = w + 2 * padding;
  if (nh < kh || nw < kw) throw ShapeError::unexpected("conv_circular_norm grid", ">= kernel", {nh, nw});
  auto wt = weight.to(torch::kFloat64).cpu();
  // A 1x1 kernel has the same matrix W at every frequency.
  if (kh == 1 && kw == 1) return linear_spectral_norm(wt.flatten(1));
  // K̂(ω) = Σ_taps W[:, :, t] e^{-iω·t} for the half spectrum 0 <= ω_w <= N_w/2 (a real
  // kernel has conjugate matrices at ω and −ω, equal norms): one [F, taps] x [taps, O·I]
  // product lays the frequency matrices out as [F, O, I] directly.
  const int64_t fw = nw / 2 + 1;
  auto fu = torch::arange(nh, torch::kFloat64).view({nh, 1}).expand({nh, fw}).reshape({-1, 1});
  auto fv = torch::arange(fw, torch::kFloat64).view({1, fw}).expand({nh, fw}).reshape({-1, 1});
  auto tu = torch::arange(kh, torch::kFloat64).view({kh, 1}).expand({kh, kw}).reshape({1, -1});
  auto tv = torch::arange(kw, torch::kFloat64).view({1, kw}).expand({kh, kw}).reshape({1, -1});
  auto angle = -2.0 * M_PI * (fu * tu / static_cast<double>(nh) + fv * tv / static_cast<double>(nw));
  auto phase = torch::complex(torch::cos(angle), torch::sin(angle));                // [F, taps]
  auto taps = torch::complex(wt.reshape({out * in, kh * kw}).t().contiguous(),
                             torch::zeros({kh * kw, out * in}, torch::kFloat64));  // [taps, O·I]
  return max_spectral_norm_upper(torch::matmul(phase, taps).view({-1, out, in}));
}

double layer_operator_norm(const Layer& l, Norm p, const Shape& in, bool to_inf) {
  switch (l.kind) {
    case Layer::Kind::channel_affine: return l.weight.abs().max().item<double>();
    case Layer::Kind::relu:
    case Layer::Kind::flatten: return 1.0;
    case Layer::Kind::global_avgpool:
      // Each output is the mean of H·W inputs: ∞-norm 1, 2-norm 1/sqrt(H·W).
      return p == Norm::linf ? 1.0 : 1.0 / std::sqrt(static_cast<double>(in.at(1) * in.at(2)));
    case Layer::Kind::linear:
      if (p == Norm::linf) return l.weight.abs().sum(1).max().item<double>();  // max row ℓ1
      if (to_inf) return l.weight.pow(2).sum(1).sqrt().max().item<double>();   // max row ℓ2
      return linear_spectral_norm(l.weight);
    case Layer::Kind::conv:
      // ∞ -> ∞: one output is Σ w·x over one window: max over output channels of Σ|w|.
      if (p == Norm::linf) return l.weight.abs().sum({1, 2, 3}).max().item<double>();
      if (in.size() != 3) throw ShapeError::unexpected("conv '" + l.name + "' input", "[C, H, W]", in);
      return conv_circular_norm(l.weight, l.padding, in[1], in[2]);
    case Layer::Kind::residual:
      return residual_norm(l, p, in);
  }
  throw UnsupportedLayerError("certify: layer '" + l.name + "' has an unsupported kind");
}

GlobalBound lipschitz_global(const LayerGraph& g, Norm p, const Shape& input_shape) {
  GlobalBound b;
  Shape shape = input_shape;
  const bool last_linear = !g.empty() && g.back().kind == Layer::Kind::linear;
  b.value = layer_chain_norm(g, p, shape, last_linear, &b.layers);
  b.value *= 1.0 + defaults::constant_inflation;  // float64 rounding of the products and norms
  return b;
}

// ---------------------------------------------------------------------------------
// local: interval bounds over the ball, then the backward interval Jacobian.

namespace {

/// Interval [c - r, c + r] of a batch of activations.
struct Box {
  torch::Tensor c, r;
};

/// Before the first affine layer of a p = 2 ball: the centre, the radius per sample
/// and the per-channel scale that the channel-affine layers applied so far.
struct Ball2 {
  torch::Tensor c, eps, scale;  // eps [B, 1, ...]; scale broadcastable to c
};

struct ReluRecord {
  torch::Tensor lower, upper;
};

struct LocalPass {
  std::map<const Layer*, ReluRecord> relus;
  std::map<const Layer*, Shape> inputs;  // input shape (without batch)
};

torch::Tensor broadcast_channel(const torch::Tensor& v, int64_t dim) {
  std::vector<int64_t> shape(static_cast<size_t>(dim), 1);
  shape[1] = -1;
  return v.view(shape);
}

Box forward_box(const LayerGraph& g, Box s, LocalPass& pass);

Box forward_layer(const Layer& l, Box s, LocalPass& pass) {
  pass.inputs[&l] = Shape(s.c.sizes().begin() + 1, s.c.sizes().end());
  switch (l.kind) {
    case Layer::Kind::channel_affine: {
      auto sc = broadcast_channel(l.weight, s.c.dim()), sh = broadcast_channel(l.bias, s.c.dim());
      return {s.c * sc + sh, s.r * sc.abs()};
    }
    case Layer::Kind::conv:
      return {torch::conv2d(s.c, l.weight, l.bias, l.stride, l.padding),
              torch::conv2d(s.r, l.weight.abs(), {}, l.stride, l.padding)};
    case Layer::Kind::linear:
      return {torch::linear(s.c, l.weight, l.bias), torch::linear(s.r, l.weight.abs())};
    case Layer::Kind::relu: {
      auto lo = s.c - s.r, hi = s.c + s.r;
      pass.relus[&l] = {lo, hi};
      lo = torch::relu(lo), hi = torch::relu(hi);
      return {(lo + hi) / 2, (hi - lo) / 2};
    }
    case Layer::Kind::flatten: return {s.c.flatten(1), s.r.flatten(1)};
    case Layer::Kind::global_avgpool: return {s.c.mean({2, 3}), s.r.mean({2, 3})};
    case Layer::Kind::residual: {
      Box m = forward_box(l.main, s, pass);
      Box t = l.shortcut.empty() ? s : forward_box(l.shortcut, s, pass);
      return {m.c + t.c, m.r + t.r};
    }
  }
  throw UnsupportedLayerError("certify: layer '" + l.name + "' has an unsupported kind");
}

Box forward_box(const LayerGraph& g, Box s, LocalPass& pass) {
  for (const auto& l : g) s = forward_layer(l, std::move(s), pass);
  return s;
}

/// eps [B] viewed to broadcast against a [B, ...] tensor of `dim` dimensions.
torch::Tensor per_sample(const torch::Tensor& eps, int64_t dim) {
  std::vector<int64_t> shape(static_cast<size_t>(dim), 1);
  shape[0] = -1;
  return eps.view(shape);
}

/// p = 2: carries the ball exactly through channel-affine and flatten layers and
/// bounds the first conv/linear pre-activations by eps·‖row‖_2 (rows restricted to
/// in-bounds taps); returns the index of the first layer still to run, and the box.
std::pair<size_t, Box> forward_ball2(const LayerGraph& g, Ball2 b, LocalPass& pass) {
  for (size_t i = 0; i < g.size(); ++i) {
    const auto& l = g[i];
    pass.inputs[&l] = Shape(b.c.sizes().begin() + 1, b.c.sizes().end());
    if (l.kind == Layer::Kind::channel_affine) {
      auto sc = broadcast_channel(l.weight, b.c.dim()), sh = broadcast_channel(l.bias, b.c.dim());
      b.c = b.c * sc + sh;
      b.scale = b.scale * sc.abs();
    } else if (l.kind == Layer::Kind::flatten) {
      b.scale = b.scale.expand_as(b.c.narrow(0, 0, 1)).flatten(1);
      b.c = b.c.flatten(1);
    } else if (l.kind == Layer::Kind::conv) {
      auto ws = l.weight * b.scale.view({1, -1, 1, 1});
      auto row = torch::conv2d(torch::ones_like(b.c.narrow(0, 0, 1)), ws.pow(2), {}, l.stride,
                               l.padding).sqrt();  // [1, O, H', W']
      return {i + 1, Box{torch::conv2d(b.c, l.weight, l.bias, l.stride, l.padding),
                         per_sample(b.eps, 4) * row}};
    } else if (l.kind == Layer::Kind::linear) {
      auto row = (l.weight * b.scale.reshape({1, -1})).pow(2).sum(1).sqrt();  // [O]
      return {i + 1, Box{torch::linear(b.c, l.weight, l.bias), per_sample(b.eps, 2) * row.view({1, -1})}};
    } else {
      // Any other layer: from here on a box (each coordinate moves by <= eps·scale).
      return {i, Box{b.c, per_sample(b.eps, b.c.dim()) * b.scale.expand_as(b.c)}};
    }
  }
  return {g.size(), Box{b.c, per_sample(b.eps, b.c.dim()) * b.scale.expand_as(b.c)}};
}

/// Backward interval propagation of Jacobian rows J (shape [B·K, *out]).
Box backward_box(const LayerGraph& g, Box j, const LocalPass& pass, int64_t rows_per_sample);

Box backward_layer(const Layer& l, Box j, const LocalPass& pass, int64_t K) {
  const Shape& in = pass.inputs.at(&l);
  switch (l.kind) {
    case Layer::Kind::channel_affine: {
      auto sc = broadcast_channel(l.weight, j.c.dim());
      return {j.c * sc, j.r * sc.abs()};
    }
    case Layer::Kind::linear:
      return {torch::matmul(j.c, l.weight), torch::matmul(j.r, l.weight.abs())};
    case Layer::Kind::conv: {
      const int64_t k = l.weight.size(2);
      const int64_t oh = j.c.size(2), ow = j.c.size(3);
      const int64_t ph = in[1] - ((oh - 1) * l.stride - 2 * l.padding + k);
      const int64_t pw = in[2] - ((ow - 1) * l.stride - 2 * l.padding + k);
      return {torch::conv_transpose2d(j.c, l.weight, {}, l.stride, l.padding, {ph, pw}),
              torch::conv_transpose2d(j.r, l.weight.abs(), {}, l.stride, l.padding, {ph, pw})};
    }
    case Layer::Kind::relu: {
      const auto& rec = pass.relus.at(&l);
      // Rows are [B·K, ...]: view them as [B, K, ...] so the per-sample masks broadcast.
      std::vector<int64_t> rows{rec.lower.size(0), K};
      rows.insert(rows.end(), j.c.sizes().begin() + 1, j.c.sizes().end());
      auto on = rec.lower.ge(0).unsqueeze(1), unknown = (rec.lower.lt(0) & rec.upper.gt(0)).unsqueeze(1);
      auto c = j.c.view(rows), r = j.r.view(rows);
      // Unknown units: the derivative is somewhere in [0, 1], so the interval
      // [lo, hi] becomes [min(lo, 0), max(hi, 0)]; off units give 0.
      auto lo = (c - r).clamp_max_(0.0), hi = (c + r).clamp_min_(0.0);
      auto cu = (lo + hi).mul_(0.5), ru = (hi - lo).mul_(0.5);
      auto c2 = torch::where(on, c, torch::where(unknown, cu, torch::zeros_like(cu)));
      auto r2 = torch::where(on, r, torch::where(unknown, ru, torch::zeros_like(ru)));
      return {c2.view(j.c.sizes()), r2.view(j.r.sizes())};
    }
    case Layer::Kind::flatten: {
      std::vector<int64_t> shape{j.c.size(0)};
      shape.insert(shape.end(), in.begin(), in.end());
      return {j.c.reshape(shape), j.r.reshape(shape)};
    }
    case Layer::Kind::global_avgpool: {
      const double hw = static_cast<double>(in[1] * in[2]);
      auto expand = [&](const torch::Tensor& t) {
        return (t / hw).view({t.size(0), t.size(1), 1, 1}).expand({t.size(0), t.size(1), in[1], in[2]});
      };
      return {expand(j.c), expand(j.r)};
    }
    case Layer::Kind::residual: {
      Box m = backward_box(l.main, j, pass, K);
      Box t = l.shortcut.empty() ? j : backward_box(l.shortcut, j, pass, K);
      return {m.c + t.c, m.r + t.r};
    }
  }
  throw UnsupportedLayerError("certify: layer '" + l.name + "' has an unsupported kind");
}

Box backward_box(const LayerGraph& g, Box j, const LocalPass& pass, int64_t K) {
  for (auto it = g.rbegin(); it != g.rend(); ++it) j = backward_layer(*it, std::move(j), pass, K);
  return j;
}

/// ‖v‖_q per row, q the dual of p. v: [N, ...] -> [N]
torch::Tensor dual_norm(const torch::Tensor& v, Norm p) {
  auto f = v.flatten(1);
  return p == Norm::linf ? f.abs().sum(1) : f.pow(2).sum(1).sqrt();
}

}  // namespace

torch::Tensor lipschitz_local(const LayerGraph& g, Norm p, const torch::Tensor& x_in,
                              const torch::Tensor& eps_in) {
  torch::NoGradGuard no_grad;
  auto x = x_in.to(torch::kFloat64);
  auto eps = eps_in.to(x.options()).view({-1});
  const int64_t B = x.size(0);
  LocalPass pass;
  Box out;
  if (p == Norm::linf) {
    out = forward_box(g, Box{x, eps.view({-1, 1, 1, 1}).expand_as(x)}, pass);
  } else {
    Ball2 ball{x, eps, torch::ones({1, x.size(1), 1, 1}, x.options())};
    auto [next, box] = forward_ball2(g, ball, pass);
    // Records are keyed by layer address: run the rest on the graph's own layers.
    for (size_t i = next; i < g.size(); ++i) box = forward_layer(g[i], std::move(box), pass);
    out = box;
  }
  const int64_t K = out.c.size(1);
  auto eye = torch::eye(K, x.options()).repeat({B, 1});  // [B·K, K]: one row per logit
  Box j = backward_box(g, Box{eye, torch::zeros_like(eye)}, pass, K);
  auto magnitude = j.c.abs() + j.r;                      // max |J| over the interval
  auto per_row = dual_norm(magnitude, p).view({B, K});
  return std::get<0>(per_row.max(1)) * (1.0 + defaults::constant_inflation);
}

// ---------------------------------------------------------------------------------
// lower and clever: gradients actually attained.

namespace {

/// Max over logits of the dual-norm gradient at each point. x: [N, ...] -> [N]
torch::Tensor gradient_norms(const LayerGraph& g, Norm p, const torch::Tensor& x) {
  auto xa = x.to(torch::kFloat64).detach().requires_grad_(true);
  auto logits = graph_forward(g, xa);
  torch::Tensor best;
  for (int64_t j = 0; j < logits.size(1); ++j) {
    auto grad = torch::autograd::grad({logits.select(1, j).sum()}, {xa}, {}, /*retain_graph=*/true)[0];
    auto n = dual_norm(grad, p);
    best = best.defined() ? torch::max(best, n) : n;
  }
  return best.detach();
}

}  // namespace

double lipschitz_lower(const LayerGraph& g, Norm p, const torch::Tensor& x, int steps,
                       double radius) {
  auto x0 = x.to(torch::kFloat64).detach();
  double best = gradient_norms(g, p, x0).max().item<double>();
  int64_t K;
  {
    torch::NoGradGuard ng;
    K = graph_forward(g, x0.narrow(0, 0, 1)).size(1);
  }
  // Ascend each logit from every point: ReLU networks have piecewise-constant
  // gradients, so the path visits regions whose gradients are evaluated.
  for (int64_t j = 0; j < K; ++j) {
    auto xa = x0.clone();
    for (int s = 0; s < steps; ++s) {
      auto v = xa.detach().requires_grad_(true);
      auto grad = torch::autograd::grad({graph_forward(g, v).select(1, j).sum()}, {v})[0];
      auto dir = p == Norm::linf ? grad.sign()
                                 : grad / (grad.flatten(1).norm(2, 1).view({-1, 1, 1, 1}) + 1e-12);
      xa = xa + (radius / std::max(1, steps)) * dir;
      best = std::max(best, gradient_norms(g, p, xa).max().item<double>());
    }
  }
  return best;
}

namespace {

/// Location (upper end point) of a reverse Weibull distribution fitted to the
/// sample maxima by profile maximum likelihood over a grid of locations.
double reverse_weibull_location(const std::vector<double>& maxima) {
  const double top = *std::max_element(maxima.begin(), maxima.end());
  const double spread = std::max(top - *std::min_element(maxima.begin(), maxima.end()), 1e-12 * top);
  double best_mu = top, best_ll = -std::numeric_limits<double>::infinity();
  for (int i = 0; i <= 60; ++i) {
    const double mu = top + spread * std::pow(10.0, -4.0 + 5.0 * i / 60.0);
    std::vector<double> y;
    for (double m : maxima) y.push_back(mu - m);
    // Weibull MLE of the shape k by bisection on the score, then the scale.
    auto score = [&](double k) {
      double s0 = 0, s1 = 0, sl = 0;
      for (double v : y) {
        const double yk = std::pow(v, k);
        s0 += yk, s1 += yk * std::log(v), sl += std::log(v);
      }
      return s1 / s0 - 1.0 / k - sl / static_cast<double>(y.size());
    };
    double lo = 0.05, hi = 100.0;
    if (score(lo) > 0 || score(hi) < 0) continue;
    for (int it = 0; it < 60; ++it) {
      const double mid = 0.5 * (lo + hi);
      (score(mid) > 0 ? hi : lo) = mid;
    }
    const double k = 0.5 * (lo + hi);
    double s0 = 0;
    for (double v : y) s0 += std::pow(v, k);
    const double lambda = std::pow(s0 / static_cast<double>(y.size()), 1.0 / k);
    double ll = 0;
    for (double v : y)
      ll += std::log(k / lambda) + (k - 1) * std::log(v / lambda) - std::pow(v / lambda, k);
    if (ll > best_ll) best_ll = ll, best_mu = mu;
  }
  return best_mu;
}

}  // namespace

double lipschitz_clever(const LayerGraph& g, Norm p, const torch::Tensor& x, double radius,
                        int batches, int per_batch, uint64_t seed) {
  auto x0 = x.to(torch::kFloat64).detach();
  auto gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  std::vector<double> maxima;
  for (int b = 0; b < batches; ++b) {
    auto idx = torch::randint(x0.size(0), {per_batch}, gen, torch::kLong);
    auto centre = x0.index_select(0, idx);
    torch::Tensor pts;
    if (p == Norm::linf) {
      pts = centre + (torch::rand(centre.sizes(), gen, x0.options()) * 2 - 1) * radius;
    } else {
      auto dir = torch::randn(centre.sizes(), gen, x0.options());
      dir = dir / dir.flatten(1).norm(2, 1).view({-1, 1, 1, 1});
      const double d = static_cast<double>(centre[0].numel());
      auto r = torch::rand({per_batch, 1, 1, 1}, gen, x0.options()).pow(1.0 / d) * radius;
      pts = centre + dir * r;
    }
    maxima.push_back(gradient_norms(g, p, pts).max().item<double>());
  }
  return maxima.size() >= 3 ? reverse_weibull_location(maxima)
                            : *std::max_element(maxima.begin(), maxima.end());
}

}  // namespace moecert
