// Bound propagation over whole graphs: IBP, CROWN-IBP, CROWN and α-CROWN lower bounds of
// specifications lie below every value that sampling and projected descent find on
// the ball ∩ box (and on the whole ball), for every backbone and router; float32
// evaluations stay within err32; relational errors and CROWN-IBP's walks. Passes beyond
// one walk: test_propagate_passes.cpp.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "certify/bounds/bounds-impl.h"
#include "moecert/bounds.h"
#include "moecert/models.h"
#include "sampled_min.h"
#include "test_nets.h"

using namespace moecert;
using moecert_test::nets;
using moecert_test::sampled_min;

namespace {

auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

/// IBP, CROWN-IBP, CROWN and α-CROWN lower bounds of random rows C·h below everything sampling
/// and descent reach, over the ball ∩ box and the whole ball, L∞ and L2.
void check_backbone(size_t which) {
  const auto net = nets().at(which);
  const BoundGraph g(net.graph, net.input);
  const int64_t K = g.output_shape()[0], B = 2;
  auto x = torch::rand(std::vector<int64_t>{B, net.input[0], net.input[1], net.input[2]}, f64);
  x.index_put_({0}, x[0].round());  // a sample with pixels on the box's faces
  auto C = torch::randn({B, 3, K}, f64);
  for (auto p : {Norm::linf, Norm::l2}) {
    for (bool box : {true, false}) {
      const double eps = p == Norm::linf ? 0.01 : 0.2;
      INFO(net.name << " p=" << norm_name(p) << " box=" << box);
      InputDomain d{x, torch::full({B}, eps, f64), p, box};
      auto truth = sampled_min(net.graph, x, C, eps, p, box);
      torch::Tensor lows[4];
      int i = 0;
      for (auto m : {BoundMethod::ibp, BoundMethod::crown, BoundMethod::alpha_crown,
                     BoundMethod::crown_ibp}) {
        BoundOptions opt;
        opt.method = m;
        opt.alpha_steps = 5;
        auto pass = bound_forward(g, d, opt);
        auto sb = bound_specs(pass, C);
        CHECK((sb.lower <= truth + 1e-9 * (1 + truth.abs())).all().item<bool>());
        CHECK((sb.err32 >= 0).all().item<bool>());
        lows[i++] = sb.lower;
      }
      {  // relational float32 errors (the rounding of every node in the walks, patches too)
        BoundOptions opt;
        opt.method = BoundMethod::crown, opt.fp32 = Float32Errors::relational;
        auto sb = bound_specs(bound_forward(g, d, opt), C);
        CHECK((sb.lower <= truth + 1e-9 * (1 + truth.abs())).all().item<bool>());
        CHECK(sb.err32.abs().max().item<double>() == 0.0);
      }
      CHECK((lows[2] >= lows[1] - 1e-12 * (1 + lows[1].abs()))
                .all()
                .item<bool>());  // α-CROWN starts at CROWN
      CHECK(lows[1].mean().item<double>() >= lows[0].mean().item<double>());  // CROWN beats IBP
    }
  }
}

}  // namespace

TEST_CASE("bound propagation is sound on a cnn-s expert", "[soundness][certify][bounds]") {
  check_backbone(0);
}
TEST_CASE("bound propagation is sound on a cnn router", "[soundness][certify][bounds]") {
  check_backbone(1);
}
TEST_CASE("bound propagation is sound on an mlp expert", "[soundness][certify][bounds]") {
  check_backbone(2);
}
TEST_CASE("bound propagation is sound on a ResNet-18 MoE-CNN path (residual sums, BatchNorm)",
          "[soundness][certify][bounds]") {
  check_backbone(3);
}
TEST_CASE("bound propagation is sound on a cnn-s MoE-CNN path", "[soundness][certify][bounds]") {
  check_backbone(4);
}
TEST_CASE("bound propagation is sound on a WRN MoE-CNN path (pre-activation, 1x1 shortcuts)",
          "[soundness][certify][bounds]") {
  check_backbone(5);
}
TEST_CASE("bound propagation is sound on a DenseNet-BC MoE-CNN path (concatenation)",
          "[soundness][certify][bounds]") {
  check_backbone(6);
}
TEST_CASE("bound propagation is sound through max-pooling", "[soundness][certify][bounds]") {
  check_backbone(7);
}

TEST_CASE("float32 evaluations of every backbone stay within err32",
          "[soundness][certify][bounds]") {
  for (const auto& net : nets()) {
    INFO(net.name);
    const BoundGraph g(net.graph, net.input);
    auto x = torch::rand(std::vector<int64_t>{2, net.input[0], net.input[1], net.input[2]}, f64);
    const double eps = 0.05;
    BoundOptions opt;
    opt.method = BoundMethod::ibp;
    auto pass = bound_forward(g, {x, torch::full({2}, eps, f64), Norm::linf, true}, opt);
    auto rel_opt = opt;  // relational: the output's interval itself encloses the float32 values
    rel_opt.fp32 = Float32Errors::relational;
    const auto rel_pass =
        bound_forward(g, {x, torch::full({2}, eps, f64), Norm::linf, true}, rel_opt);
    const auto& rel = rel_pass.nodes.back();
    // Automatic keeps per-node errors on piecewise-linear networks.
    CHECK_FALSE(relational_errors(g, [] {
      BoundOptions o;
      o.fp32 = Float32Errors::automatic;
      return o;
    }()));
    LayerGraph g32;
    for (const auto& n : net.graph) {
      Layer l = n.layer;
      for (auto* t : {&l.weight, &l.bias})
        if (t->defined()) *t = t->to(torch::kFloat32);
      g32.add(l, n.inputs);
    }
    for (int t = 0; t < 20; ++t) {
      auto z = (x + eps * (2 * torch::rand_like(x) - 1)).clamp(0, 1).to(torch::kFloat32);
      auto exact = graph_forward(net.graph, z.to(torch::kFloat64));
      auto fast = graph_forward(g32, z).to(torch::kFloat64);
      CHECK(((fast - exact).abs() <= pass.nodes.back().err32).all().item<bool>());
      CHECK(((rel.lo <= fast) & (fast <= rel.hi)).all().item<bool>());
    }
  }
}

TEST_CASE("relational float32 errors reach the rows through the walks (wide linear layers)",
          "[soundness][certify][bounds]") {
  // Linear layers relax exactly, so at ε = 0 a walk without the nodes' own roundings
  // would return the exact value (less ρ·mag, ~10⁻¹⁰ of it), which the float32 model misses
  // by ~10⁻⁷ of it on one sign of ±e_k: every row must bound the float32 logits.
  torch::manual_seed(8);
  LayerGraph g64, g32;
  g64.add(Layer::simple(Layer::Kind::flatten));
  g64.add(Layer::dense("l1", torch::randn({16, 1024}, f64), torch::randn({16}, f64)));
  g64.add(Layer::dense("l2", torch::randn({4, 16}, f64), torch::randn({4}, f64)));
  for (const auto& n : g64) {  // float32 weights, held exactly by the float64 graph
    Layer l = n.layer;
    for (auto* t : {&l.weight, &l.bias})
      if (t->defined()) *t = t->to(torch::kFloat32);
    g32.add(l, n.inputs);
  }
  LayerGraph exact;
  for (const auto& n : g32) {
    Layer l = n.layer;
    for (auto* t : {&l.weight, &l.bias})
      if (t->defined()) *t = t->to(torch::kFloat64);
    exact.add(l, n.inputs);
  }
  const BoundGraph g(exact, {1, 32, 32});
  const int64_t B = 8, K = 4;
  auto x = torch::rand({B, 1, 32, 32}, f64).to(torch::kFloat32).to(f64);
  auto I = torch::eye(K, f64);
  auto C = torch::cat({I, -I}).unsqueeze(0).expand({B, 2 * K, K}).contiguous();
  auto h = graph_forward(exact, x);
  auto hat = graph_forward(g32, x.to(torch::kFloat32)).to(f64);
  CHECK((hat - h).abs().max().item<double>() > 1e-6);  // float32 differs: the test has power
  auto value = torch::matmul(C, hat.unsqueeze(2)).squeeze(2);
  // The first layer's float32 values (as LibTorch computes them) lie in its interval.
  const auto& l1 = g32[1].layer;
  auto hat1 = torch::linear(x.to(torch::kFloat32).flatten(1), l1.weight, l1.bias).to(f64);
  for (auto m : {BoundMethod::ibp, BoundMethod::crown}) {
    BoundOptions opt;
    opt.method = m, opt.fp32 = Float32Errors::relational;
    auto pass = bound_forward(g, {x, torch::zeros({B}, f64), Norm::linf, true}, opt);
    CHECK(((pass.nodes[1].lo <= hat1) & (hat1 <= pass.nodes[1].hi)).all().item<bool>());
    auto sb = bound_specs(pass, C);
    CHECK((sb.lower <= value).all().item<bool>());
    // and not by a per-node worst case: within 10⁴ of the float32 error actually made
    CHECK(((value - sb.lower).max() < 1e4 * (hat - h).abs().max()).item<bool>());
  }
}

TEST_CASE("CROWN-IBP walks the specifications on IBP's intermediate intervals",
          "[soundness][certify][bounds]") {
  torch::manual_seed(5);
  auto layer = [](const char* name, int64_t out, int64_t in) {
    return Layer::dense(name, torch::randn({out, in}, f64) / std::sqrt(static_cast<double>(in)),
                        torch::randn({out}, f64) * 0.1);
  };
  LayerGraph deep;  // flatten, three hidden ReLU layers
  deep.add(Layer::simple(Layer::Kind::flatten));
  deep.add(layer("l1", 24, 16));
  deep.add(Layer::simple(Layer::Kind::relu));
  deep.add(layer("l2", 24, 24));
  deep.add(Layer::simple(Layer::Kind::relu));
  deep.add(layer("l3", 24, 24));
  deep.add(Layer::simple(Layer::Kind::relu));
  deep.add(layer("out", 5, 24));
  const Shape input{1, 4, 4};
  const BoundGraph g(deep, input);
  const int64_t B = 6;
  auto x = torch::rand({B, 1, 4, 4}, f64);
  auto C = torch::randn({B, 4, 5}, f64);
  const InputDomain d{x, torch::full({B}, 0.08, f64), Norm::linf, true};
  BoundOptions opt;
  opt.method = BoundMethod::ibp;
  const auto ibp = bound_forward(g, d, opt);
  opt.method = BoundMethod::crown_ibp;
  const auto cibp = bound_forward(g, d, opt);
  opt.method = BoundMethod::crown;
  const auto crown = bound_forward(g, d, opt);
  // Its intermediate bounds are IBP's, with no per-unit walk; CROWN's are tighter somewhere.
  bool crown_tighter = false;
  for (size_t k = 0; k < g.nodes().size(); ++k) {
    CHECK(torch::equal(cibp.nodes[k].lo, ibp.nodes[k].lo));
    CHECK(torch::equal(cibp.nodes[k].hi, ibp.nodes[k].hi));
    CHECK(cibp.refined[k].empty());
    crown_tighter =
        crown_tighter || (crown.nodes[k].hi < ibp.nodes[k].hi - 1e-9).any().item<bool>();
  }
  CHECK(crown_tighter);
  // Its specification bounds are a backward walk: sound, and unlike IBP's.
  const auto truth = sampled_min(deep, x, C, 0.08, Norm::linf, true);
  const auto low_cibp = bound_specs(cibp, C).lower, low_ibp = bound_specs(ibp, C).lower;
  CHECK((low_cibp <= truth + 1e-9 * (1 + truth.abs())).all().item<bool>());
  CHECK(!torch::allclose(low_cibp, low_ibp));

  // One hidden layer: the ReLU's input is affine in x, where IBP is exact on the box, so
  // CROWN-IBP is CROWN.
  LayerGraph shallow;
  shallow.add(Layer::simple(Layer::Kind::flatten));
  shallow.add(layer("l1", 24, 16));
  shallow.add(Layer::simple(Layer::Kind::relu));
  shallow.add(layer("out", 5, 24));
  const BoundGraph h(shallow, input);
  opt.method = BoundMethod::crown_ibp;
  const auto a = bound_specs(bound_forward(h, d, opt), C).lower;
  opt.method = BoundMethod::crown;
  const auto b = bound_specs(bound_forward(h, d, opt), C).lower;
  CHECK(torch::allclose(a, b, 1e-9, 1e-9));
}
