#include <torch/torch.h>

#include <Eigen/Dense>
#include <catch2/catch.hpp>

#include "moecert/certify.h"
#include "moecert/error.h"
#include "moecert/models.h"

using namespace moecert;

namespace {

auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

/// The matrix of a linear map x (shape in_shape) -> f(x), column by column.
torch::Tensor materialise(const std::function<torch::Tensor(const torch::Tensor&)>& f,
                          const std::vector<int64_t>& in_shape) {
  int64_t n = 1;
  for (auto s : in_shape) n *= s;
  std::vector<int64_t> batch{n};
  batch.insert(batch.end(), in_shape.begin(), in_shape.end());
  auto basis = torch::eye(n, f64).view(batch);
  return f(basis).flatten(1).t().contiguous();  // [out, in]
}

double spectral_norm(const torch::Tensor& m) {
  auto c = m.contiguous();
  Eigen::Map<const Eigen::Matrix<double, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>> e(
      c.data_ptr<double>(), c.size(0), c.size(1));
  return Eigen::JacobiSVD<Eigen::MatrixXd>(e).singularValues()(0);
}

double inf_norm(const torch::Tensor& m) { return m.abs().sum(1).max().item<double>(); }

/// Largest dual-norm gradient over logits at each point. x: [N, ...] -> [N]
torch::Tensor grad_norms(const LayerGraph& g, Norm p, const torch::Tensor& x) {
  auto xa = x.detach().requires_grad_(true);
  auto out = graph_forward(g, xa);
  torch::Tensor best;
  for (int64_t j = 0; j < out.size(1); ++j) {
    auto gr = torch::autograd::grad({out.select(1, j).sum()}, {xa}, {}, true)[0].flatten(1);
    auto n = p == Norm::linf ? gr.abs().sum(1) : gr.norm(2, 1);
    best = best.defined() ? torch::max(best, n) : n;
  }
  return best;
}

}  // namespace

TEST_CASE("global bound of a linear layer equals its exact operator norm", "[unit][certify]") {
  torch::manual_seed(0);
  auto w = torch::randn({7, 11}, f64);
  Layer l = Layer::dense("fc", w, torch::randn({7}, f64));
  CHECK(layer_operator_norm(l, Norm::linf, {11}) == Approx(inf_norm(w)).epsilon(1e-12));
  CHECK(layer_operator_norm(l, Norm::l2, {11}) == Approx(spectral_norm(w)).epsilon(1e-9));
  // As the last layer (-> ∞): max row norm, the exact 2 -> ∞ norm.
  CHECK(layer_operator_norm(l, Norm::l2, {11}, true) ==
        Approx(w.pow(2).sum(1).sqrt().max().item<double>()).epsilon(1e-12));
  // A graph of the single layer: the global bound is that norm (up to the 1e-9 inflation).
  LayerGraph g{Layer::simple(Layer::Kind::flatten), l};
  CHECK(lipschitz_global(g, Norm::linf, {1, 1, 11}).value == Approx(inf_norm(w)).epsilon(1e-8));
}

TEST_CASE("the batched spectral bound is sound and tight through both of its paths",
          "[unit][certify]") {
  torch::manual_seed(5);
  // Complex frequency-like matrices, tall and wide, with one clear maximum and near ties.
  for (auto shape : std::vector<std::vector<int64_t>>{{6, 9, 5}, {4, 5, 9}, {3, 12, 12}}) {
    auto a = torch::complex(torch::randn(shape, f64), torch::randn(shape, f64));
    double exact = 0;
    for (int64_t f = 0; f < shape[0]; ++f) {
      // σ_max of a complex A = that of the real embedding [[Re, -Im], [Im, Re]].
      auto re = torch::real(a[f]), im = torch::imag(a[f]);
      auto embed = torch::cat({torch::cat({re, -im}, 1), torch::cat({im, re}, 1)}, 0);
      exact = std::max(exact, spectral_norm(embed));
    }
    // Default slack: within 1e-9 of exact, never below.
    const double bound = max_spectral_norm_upper(a);
    CHECK(bound >= exact);
    CHECK(bound <= exact * (1 + 1e-9));
    // A generous slack: every matrix is verified by Cholesky at μ = 1.21 · estimate.
    const double loose = max_spectral_norm_upper(a, 0.21);
    CHECK(loose >= exact);
    CHECK(loose <= exact * 1.1 * (1 + 1e-9));
    // A negative slack puts μ below every top eigenvalue: every Cholesky fails and the
    // exact eigenvalue path alone gives the bound.
    const double eig = max_spectral_norm_upper(a, -0.5);
    CHECK(eig >= exact);
    CHECK(eig <= exact * (1 + 1e-12));
  }
  // Real matrices (linear layers) take the same route.
  auto w = torch::randn({1, 7, 11}, f64);
  CHECK(max_spectral_norm_upper(w) == Approx(spectral_norm(w[0])).epsilon(1e-9));
  CHECK(max_spectral_norm_upper(w) >= spectral_norm(w[0]));
  // A non-finite weight is an error, not a NaN constant.
  w[0][2][3] = std::numeric_limits<double>::quiet_NaN();
  CHECK_THROWS_AS(max_spectral_norm_upper(w), NumericError);
}

TEST_CASE("global bound of a conv layer: exact for p = inf, the circular norm for p = 2",
          "[unit][certify]") {
  torch::manual_seed(1);
  for (int64_t stride : {1, 2}) {
    auto w = torch::randn({3, 2, 3, 3}, f64);
    Layer l = Layer::conv2d("conv", w, {}, stride, 1);
    const int64_t n = 6;
    auto zero_padded = materialise(
        [&](const torch::Tensor& x) { return torch::conv2d(x, w, {}, stride, 1); }, {2, n, n});
    CHECK(layer_operator_norm(l, Norm::linf, {2, n, n}) ==
          Approx(inf_norm(zero_padded)).epsilon(1e-12));
    // The circular convolution on the (n + 2)-grid, materialised: its norm is what the
    // FFT/Gram bound computes, and it bounds the zero-padded, strided conv.
    const int64_t N = n + 2;
    auto circular = materialise(
        [&](const torch::Tensor& x) {
          auto xp = torch::cat({x, x.narrow(2, 0, 2)}, 2);
          xp = torch::cat({xp, xp.narrow(3, 0, 2)}, 3);
          return torch::conv2d(xp, w);
        },
        {2, N, N});
    const double bound = layer_operator_norm(l, Norm::l2, {2, n, n});
    CHECK(bound == Approx(spectral_norm(circular)).epsilon(1e-8));
    CHECK(bound >= spectral_norm(circular) * (1 - 1e-12));
    CHECK(bound >= spectral_norm(zero_padded));
  }
}

TEST_CASE("global bounds of whole backbones bound every attained gradient", "[unit][certify]") {
  torch::manual_seed(2);
  ModelSpec spec;
  spec.experts = 2, spec.router = "cnn";
  Moe model(spec);
  model->eval();
  auto x = torch::rand({16, 1, 28, 28}, f64);
  for (int64_t c = -1; c < 2; ++c) {
    auto g = model->component_graph(c);
    for (auto p : {Norm::linf, Norm::l2}) {
      const double L = lipschitz_global(g, p, {1, 28, 28}).value;
      CHECK(grad_norms(g, p, x).max().item<double>() <= L);
      CHECK(lipschitz_lower(g, p, x.narrow(0, 0, 2), 2, 0.05) <= L);
    }
  }
  // ResNet-18 (as the narrow paths of a MoE-CNN, to keep the test fast): residual
  // blocks and BatchNorm (eval) are bounded too.
  ModelSpec rs;
  rs.kind = "moe-cnn", rs.scale = 0.125;
  rs.experts = 2, rs.expert = "resnet18", rs.in_channels = 3, rs.height = 8, rs.width = 8;
  rs.mean = {0.5, 0.5, 0.5}, rs.std = {0.25, 0.25, 0.25};
  Moe resnet(rs);
  resnet->eval();
  auto g = resnet->component_graph(1);
  auto xr = torch::rand({4, 3, 8, 8}, f64);
  {
    torch::NoGradGuard ng;
    // graph_forward reproduces the float32 module in eval mode
    auto ref = resnet->expert_logits(1, xr.to(torch::kFloat32)).to(torch::kFloat64);
    CHECK((graph_forward(g, xr) - ref).abs().max().item<double>() < 1e-3);
  }
  for (auto p : {Norm::linf, Norm::l2})
    CHECK(grad_norms(g, p, xr).max().item<double>() <= lipschitz_global(g, p, {3, 8, 8}).value);
}

TEST_CASE("local bounds: sound over the ball, between lower and global, growing with eps",
          "[soundness][certify]") {
  torch::manual_seed(3);
  ModelSpec spec;
  spec.experts = 2;
  Moe model(spec);
  model->eval();
  auto g = model->component_graph(0);
  auto x = torch::rand({8, 1, 28, 28}, f64);
  for (auto p : {Norm::linf, Norm::l2}) {
    const double eps = p == Norm::linf ? 0.01 : 0.3;
    auto local = lipschitz_local(g, p, x, torch::full({8}, eps, f64));
    auto at0 = lipschitz_local(g, p, x, torch::zeros({8}, f64));
    auto wider = lipschitz_local(g, p, x, torch::full({8}, 2 * eps, f64));
    // At eps = 0 every ReLU is decided: the bound is the gradient at x (up to rounding).
    CHECK((at0 - grad_norms(g, p, x)).abs().max().item<double>() < 1e-6 * at0.max().item<double>());
    CHECK((local >= at0 * (1 - 1e-12)).all().item<bool>());
    CHECK((wider >= local * (1 - 1e-12)).all().item<bool>());
    if (p == Norm::linf)
      CHECK(local.max().item<double>() <= lipschitz_global(g, p, {1, 28, 28}).value);
    // lower <= local: the ascent paths of `lower` stay inside each sample's ball, so
    // every gradient they attain is one the local bound must cover.
    for (int64_t i = 0; i < 8; ++i) {
      const double lower = lipschitz_lower(g, p, x.narrow(0, i, 1), 3, eps);
      CHECK(lower > 0);
      CHECK(lower <= local[i].item<double>() * (1 + 1e-9));
    }
    // Gradients at random points of each ball stay below that ball's bound.
    for (int t = 0; t < 5; ++t) {
      torch::Tensor pts;
      if (p == Norm::linf) {
        pts = x + (torch::rand_like(x) * 2 - 1) * eps;
      } else {
        auto d = torch::randn_like(x);
        pts = x + d / d.flatten(1).norm(2, 1).view({-1, 1, 1, 1}) * eps *
                      torch::rand({8, 1, 1, 1}, f64);
      }
      CHECK((grad_norms(g, p, pts) <= local * (1 + 1e-9)).all().item<bool>());
    }
  }
}

TEST_CASE("clever is reported as an estimate between lower and global", "[unit][certify]") {
  torch::manual_seed(4);
  ModelSpec spec;
  spec.experts = 2;
  Moe model(spec);
  model->eval();
  auto g = model->component_graph(1);
  auto x = torch::rand({8, 1, 28, 28}, f64);
  const double clever = lipschitz_clever(g, Norm::linf, x, 0.05, 10, 16, 0);
  CHECK(clever > 0);
  CHECK(clever <= lipschitz_global(g, Norm::linf, {1, 28, 28}).value);
}

TEST_CASE("an unsupported layer is a clear error, never a guess", "[unit][certify]") {
  Layer odd = Layer::conv2d("odd", torch::zeros({1, 1, 3, 3}, f64), {}, 1, 1);
  odd.kind = static_cast<Layer::Kind>(99);
  CHECK_THROWS_AS(layer_operator_norm(odd, Norm::linf, {1, 4, 4}), UnsupportedLayerError);
  CHECK_THROWS_WITH(layer_operator_norm(odd, Norm::linf, {1, 4, 4}), Catch::Contains("odd"));
}
