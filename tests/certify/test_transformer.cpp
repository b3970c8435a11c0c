// Whole-graph soundness on a Vision Transformer: IBP, CROWN and α-CROWN lower bounds
// below sampled values over L∞ and L2 balls, and the float32 model as LibTorch runs
// it (the module's own forward) within the err32 of the output.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "moecert/backbones.h"
#include "moecert/bounds.h"

using namespace moecert;

namespace {

auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

std::shared_ptr<BackboneImpl> small_vit() {
  torch::manual_seed(31);
  BackboneArgs a;
  a.kind = "vit-2-8-2-p4", a.in_channels = 3, a.height = 8, a.width_px = 8, a.outputs = 4;
  auto net = backbone_find(a, BackboneRole::expert, "--expert").make(a);
  net->eval();
  torch::NoGradGuard ng;
  for (auto& p : net->named_parameters())  // LayerNorm affine away from (1, 0)
    if (p.key().find("norm") != std::string::npos) p.value().uniform_(-1.5, 1.5);
  return net;
}

/// Points of the ball ∩ [0, 1] box: corners of the L∞ ball and random directions.
torch::Tensor ball_points(const torch::Tensor& x, double eps, Norm p, int64_t n) {
  auto d = 2 * torch::rand({n, x.size(0), x.size(1), x.size(2)}, f64) - 1;
  if (p == Norm::linf)
    d = torch::where(torch::rand({n, 1, 1, 1}, f64).lt(0.5), d.sign(), d) * eps;
  else
    d = d / d.flatten(1).norm(2, 1).view({-1, 1, 1, 1}) * eps * torch::rand({n, 1, 1, 1}, f64);
  return (x.unsqueeze(0) + d).clamp(0, 1);
}

/// B float32 images of the test ViT's shape (exact in float64), and the rows ±e_k of
/// its K = 4 logits for each: C [B, 8, 4].
struct Float32Images {
  torch::Tensor x, C;
};
Float32Images float32_images(int64_t B, uint64_t seed) {
  torch::manual_seed(seed);
  auto x = torch::rand({B, 3, 8, 8}, f64).to(torch::kFloat32).to(torch::kFloat64);
  auto I = torch::eye(4, f64);
  return {x, torch::cat({I, -I}).unsqueeze(0).expand({B, 8, 4}).contiguous()};
}

}  // namespace

TEST_CASE("bound propagation is sound on a ViT (LayerNorm, attention, softmax, GELU)",
          "[soundness][certify][bounds]") {
  auto net = small_vit();
  const auto graph = net->graph();
  const BoundGraph g(graph, {3, 8, 8});
  const int64_t K = 4, B = 2;
  auto x = torch::rand({B, 3, 8, 8}, f64);
  auto C = torch::randn({B, 3, K}, f64);
  for (auto p : {Norm::linf, Norm::l2}) {
    const double eps = p == Norm::linf ? 0.01 : 0.1;
    INFO("p=" << norm_name(p));
    InputDomain d{x, torch::full({B}, eps, f64), p, true};
    torch::Tensor truth = torch::full({B, 3}, INFINITY, f64);
    for (int64_t b = 0; b < B; ++b) {
      auto y = graph_forward(graph, ball_points(x[b], eps, p, 3000));  // [n, K]
      truth[b] = std::get<0>(torch::matmul(y, C[b].t()).min(0));
    }
    torch::Tensor lows[3];
    int i = 0;
    for (auto m : {BoundMethod::ibp, BoundMethod::crown, BoundMethod::alpha_crown}) {
      BoundOptions opt;
      opt.method = m, opt.alpha_steps = 3;
      auto pass = bound_forward(g, d, opt);
      auto sb = bound_specs(pass, C);
      CHECK((sb.lower <= truth + 1e-9 * (1 + truth.abs())).all().item<bool>());
      CHECK(torch::isfinite(sb.lower).all().item<bool>());
      lows[i++] = sb.lower;
    }
    // CROWN's tighter intervals before the relaxed nodes do not lose against IBP here.
    CHECK(lows[1].mean().item<double>() >= lows[0].mean().item<double>() - 1e-9);
  }
}

TEST_CASE("the float32 ViT module stays within the err32 of its graph's output",
          "[soundness][certify][bounds]") {
  auto net = small_vit();
  const auto graph = net->graph();
  const BoundGraph g(graph, {3, 8, 8});
  auto x = torch::rand({2, 3, 8, 8}, f64);
  const double eps = 0.05;
  BoundOptions opt;
  opt.method = BoundMethod::ibp;
  auto pass = bound_forward(g, {x, torch::full({2}, eps, f64), Norm::linf, true}, opt);
  net->to(torch::kFloat32);
  torch::NoGradGuard ng;
  for (int t = 0; t < 50; ++t) {
    auto z = (x + eps * (2 * torch::rand_like(x) - 1)).clamp(0, 1).to(torch::kFloat32);
    auto exact = graph_forward(graph, z.to(torch::kFloat64));
    auto fast = net->forward(z).to(torch::kFloat64);
    CHECK(((fast - exact).abs() <= pass.nodes.back().err32).all().item<bool>());
  }
  // The allowance grows with the radius (the same rules over larger regions).
  auto at = [&](double r) {
    return bound_forward(g, {x, torch::full({2}, r, f64), Norm::linf, true}, opt)
        .nodes.back()
        .err32.max()
        .item<double>();
  };
  CHECK(at(0.0) <= at(0.001));
  CHECK(std::isfinite(at(0.0)));
}

TEST_CASE("CROWN's lines through softmax and attention make a ViT's logit intervals far narrower",
          "[soundness][certify][bounds]") {
  // With every node relaxed linearly, CROWN's logit interval at a small radius is a
  // fraction of IBP's (interval LayerNorm and attention blow widths up; measured ~180×
  // on this model at ε = 10⁻⁴); an interval-only step anywhere would lose most of it.
  auto net = small_vit();
  const auto graph = net->graph();
  const BoundGraph g(graph, {3, 8, 8});
  const int64_t K = 4, B = 2;
  torch::manual_seed(3);
  auto x = torch::rand({B, 3, 8, 8}, f64);
  auto I = torch::eye(K, f64);
  auto C = torch::cat({I, -I}).unsqueeze(0).expand({B, 2 * K, K}).contiguous();
  InputDomain d{x, torch::full({B}, 1e-4, f64), Norm::linf, true};
  auto width = [&](BoundMethod m) {
    BoundOptions opt;
    opt.method = m;
    auto sb = bound_specs(bound_forward(g, d, opt), C);
    return (-sb.lower.narrow(1, K, K) - sb.lower.narrow(1, 0, K)).mean().item<double>();
  };
  const double ibp = width(BoundMethod::ibp), crown = width(BoundMethod::crown);
  INFO("IBP " << ibp << ", CROWN " << crown);
  CHECK(crown > 0);
  CHECK(crown < ibp / 20);
}

TEST_CASE("relational float32 bounds hold for the float32 ViT module and the exact graph",
          "[soundness][certify][bounds]") {
  // Every interval of a relational pass encloses the float32 values, and each node's own
  // rounding enters the walks: at ε = 0 (a single float32 image) rows ±e_k must bound
  // both the module's float32 logits and the exact ones, which differ (checked), so a
  // rounding left out anywhere fails one sign.
  auto net = small_vit();
  const auto graph = net->graph();
  const BoundGraph g(graph, {3, 8, 8});
  const int64_t K = 4, B = 2;
  const auto images = float32_images(B, 5);
  const auto& x = images.x;
  auto C = torch::cat({images.C, torch::randn({3, K}, f64).unsqueeze(0).expand({B, 3, K})}, 1);
  auto net32 = small_vit();
  net32->to(torch::kFloat32);
  torch::NoGradGuard ng;
  double spread = 0;
  for (double eps : {0.0, 0.003}) {
    for (auto m :
         {BoundMethod::ibp, BoundMethod::crown_ibp, BoundMethod::crown, BoundMethod::alpha_crown}) {
      INFO("eps " << eps << ", method " << static_cast<int>(m));
      BoundOptions opt;
      opt.method = m, opt.alpha_steps = 2, opt.fp32 = Float32Errors::relational;
      auto pass = bound_forward(g, {x, torch::full({B}, eps, f64), Norm::linf, true}, opt);
      REQUIRE(pass.relational());
      auto sb = bound_specs(pass, C);
      CHECK(sb.err32.abs().max().item<double>() == 0.0);
      const auto& out = pass.nodes.back();
      for (int t = 0; t < (eps == 0 ? 1 : 40); ++t) {
        auto z = eps == 0 ? x : (x + eps * (2 * torch::rand_like(x) - 1)).clamp(0, 1);
        z = z.to(torch::kFloat32);
        auto exact = graph_forward(graph, z.to(torch::kFloat64));
        auto fast = net32->forward(z).to(torch::kFloat64);
        spread = std::max(spread, (fast - exact).abs().max().item<double>());
        for (const auto& y : {exact, fast}) {
          CHECK((out.lo <= y).all().item<bool>());
          CHECK((y <= out.hi).all().item<bool>());
          auto value = torch::matmul(C, y.unsqueeze(2)).squeeze(2);  // [B, S]
          CHECK((sb.lower <= value + 1e-12 * (1 + value.abs())).all().item<bool>());
        }
      }
    }
  }
  INFO("largest |float32 - exact| logit " << spread);
  CHECK(spread > 1e-8);  // the float32 module differs from the exact graph: the test has power
}

TEST_CASE("relational float32 errors are far below per-node worst cases on a ViT",
          "[certify][bounds]") {
  // Per node, LayerNorm and the attention products multiply an incoming error bound by
  // their largest slopes, so the logits' allowance compounds to ~4 on this model at
  // ε = 0 (docs §20); carried through CROWN's rows, each node's rounding is weighed by
  // the rows' real sensitivity. The allowance below is what a row gives away at a
  // single image: C·h − (lower − err32).
  auto net = small_vit();
  const auto graph = net->graph();
  const BoundGraph g(graph, {3, 8, 8});
  const int64_t B = 2;
  const auto images = float32_images(B, 6);
  const auto &x = images.x, &C = images.C;
  auto value = torch::matmul(C, graph_forward(graph, x).unsqueeze(2)).squeeze(2);
  auto allowance = [&](Float32Errors e) {
    BoundOptions opt;
    opt.method = BoundMethod::crown, opt.fp32 = e;
    auto sb = bound_specs(bound_forward(g, {x, torch::zeros({B}, f64), Norm::linf, true}, opt), C);
    return (value - (sb.lower - sb.err32)).max().item<double>();
  };
  const double per_node = allowance(Float32Errors::per_node);
  const double relational = allowance(Float32Errors::relational);
  INFO("per node " << per_node << ", relational " << relational);
  CHECK(relational > 0);
  CHECK(relational < per_node / 100);
  // automatic picks the relational model on a graph with LayerNorm / softmax / attention.
  CHECK(allowance(Float32Errors::automatic) == relational);
}
