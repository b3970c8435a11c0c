// Lipschitz constants of logit maps (SPEC §4.1): global (per-layer operator
// norms), local (interval bounds + backward interval Jacobian), lower and clever.
// Every constant is of the map ‖·‖_p (pixels) -> ‖·‖_∞ (logits); proofs in
// docs/certification.md.
#include "moecert/certify.h"
#include "moecert/defaults.h"
#include "moecert/error.h"

#include <Eigen/Dense>
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

std::string shape_text(const Shape& s) {
  std::string t = "[";
  for (size_t i = 0; i < s.size(); ++i) t += (i ? ", " : "") + std::to_string(s[i]);
  return t + "]";
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

/// Spectral norm of each matrix of a batch [F, m, n] (complex or real), bounded
/// from above by Gram iteration: σ1(A) <= ‖G_T‖_F^(1/2^T) with G_{t+1} = G_t^H G_t,
/// rescaled by the Frobenius norm at every step (tracked in log space).
torch::Tensor gram_spectral_bound(torch::Tensor a, int iterations) {
  if (a.size(1) < a.size(2)) a = a.transpose(1, 2).conj();  // the Gram matrix is the smaller side
  auto log_scale = torch::zeros({a.size(0)}, torch::kFloat64);
  double weight = 1.0;
  for (int t = 0; t < iterations; ++t) {
    auto fro = torch::linalg::matrix_norm(a, "fro", {-2, -1}, false, c10::nullopt).to(torch::kFloat64);
    fro = torch::clamp_min(fro, 1e-300);
    log_scale = log_scale + weight * torch::log(fro);
    a = a / fro.view({-1, 1, 1}).to(a.dtype());
    a = torch::matmul(a.transpose(1, 2).conj(), a);
    weight /= 2.0;
  }
  auto fro = torch::linalg::matrix_norm(a, "fro", {-2, -1}, false, c10::nullopt).to(torch::kFloat64);
  return torch::exp(log_scale + weight * torch::log(torch::clamp_min(fro, 1e-300)));
}

double linear_spectral_norm(const torch::Tensor& w) {
  auto wc = w.to(torch::kFloat64).contiguous().cpu();
  Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> m(
      wc.data_ptr<double>(), wc.size(0), wc.size(1));
  Eigen::BDCSVD<Eigen::MatrixXd> svd(m);
  return svd.singularValues().size() ? svd.singularValues()(0) : 0.0;
}

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
  const int64_t k = weight.size(2), nh = h + 2 * padding, nw = w + 2 * padding;
  auto wt = weight.to(torch::kFloat64).cpu();
  if (nh < k || nw < k) throw ShapeError::unexpected("conv_circular_norm grid", ">= kernel", {nh, nw});
  auto padded = torch::zeros({wt.size(0), wt.size(1), nh, nw}, torch::kFloat64);
  padded.narrow(2, 0, k).narrow(3, 0, wt.size(3)).copy_(wt);
  // Real kernel: frequency (u, v) and (-u, -v) have conjugate matrices, same norms,
  // so the half spectrum of rfft2 covers all of them.
  auto spec = torch::fft::rfft2(padded);                     // [O, I, nh, nw/2+1] complex
  auto mats = spec.permute({2, 3, 0, 1}).reshape({-1, wt.size(0), wt.size(1)});
  // A few Gram steps bound every frequency within a factor rank^(1/2^(T0+1)); only
  // the frequencies whose cheap bound reaches the best proven lower value can hold
  // the maximum, and only those get the full iteration count.
  const int cheap_iterations = 4;
  auto cheap = gram_spectral_bound(mats, cheap_iterations);
  const double rank = static_cast<double>(std::min(wt.size(0), wt.size(1)));
  const double best_lower = cheap.max().item<double>() / std::pow(rank, 1.0 / std::pow(2.0, cheap_iterations + 1));
  auto keep = cheap.ge(best_lower).nonzero().flatten();
  return gram_spectral_bound(mats.index_select(0, keep), defaults::gram_iterations).max().item<double>();
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
