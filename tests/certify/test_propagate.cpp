// Bound propagation over whole graphs: IBP, CROWN-IBP, CROWN and α-CROWN lower bounds of
// specifications lie below every value that sampling and projected descent find on
// the ball ∩ box (and on the whole ball), for every backbone and router; patch rows
// agree with dense rows; the L2 ∩ box concretisation is tight; float32 evaluations
// stay within err32.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "certify/bounds/bounds-impl.h"
#include "moecert/bounds.h"
#include "moecert/models.h"
#include "test_nets.h"

using namespace moecert;
using moecert_test::nets;
using moecert_test::random_probe;

namespace {

auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

/// Projects points onto B_p(x, eps) (∩ [0, 1]); L2 ∩ box by Dykstra's alternating projections.
torch::Tensor project(const torch::Tensor& z, const torch::Tensor& x, double eps, Norm p,
                      bool box) {
  if (p == Norm::linf) {
    auto y = torch::max(torch::min(z, x + eps), x - eps);
    return box ? y.clamp(0, 1) : y;
  }
  auto ball = [&](const torch::Tensor& v) {
    auto d = v - x;
    auto n = d.flatten(1).norm(2, 1).view({-1, 1, 1, 1});
    return x + d * torch::clamp_max(eps / (n + 1e-300), 1.0);
  };
  if (!box) return ball(z);
  auto y = z.clone(), pp = torch::zeros_like(z), q = torch::zeros_like(z);
  for (int i = 0; i < 60; ++i) {
    auto t = ball(y + pp);
    pp = y + pp - t;
    y = (t + q).clamp(0, 1);
    q = t + q - y;
  }
  return ball(y).clamp(
      0, 1);  // a point of the ball ∩ box (the ball projection of a box point stays in the box)
}

/// The smallest value of every row of C·h that random points and projected descent
/// reach on each sample's region (all rows descend at once). -> [B, S]
torch::Tensor sampled_min(const LayerGraph& g, const torch::Tensor& x, const torch::Tensor& C,
                          double eps, Norm p, bool box) {
  const int64_t B = x.size(0), S = C.size(1);
  auto xr = x.repeat_interleave(S, 0);  // one copy of x per row
  auto cr = C.reshape({B * S, C.size(2)});
  auto value = [&](const torch::Tensor& z) { return (graph_forward(g, z) * cr).sum(1); };
  auto best = torch::full({B * S}, INFINITY, f64);
  for (int t = 0; t < 30; ++t) {  // random points
    auto z = project(xr + eps * (2 * torch::rand_like(xr) - 1) * (p == Norm::l2 ? 2.0 : 1.0), xr,
                     eps, p, box);
    best = torch::min(best, value(z).detach());
  }
  auto z = xr.clone();
  for (int it = 0; it < 30; ++it) {  // projected descent on each row's own value
    auto v = z.detach().requires_grad_(true);
    auto grad = torch::autograd::grad({value(v).sum()}, {v})[0];
    auto dir = p == Norm::linf ? grad.sign()
                               : grad / (grad.flatten(1).norm(2, 1).view({-1, 1, 1, 1}) + 1e-12);
    z = project(z - 0.2 * eps * dir, xr, eps, p, box);
    best = torch::min(best, value(z).detach());
  }
  return best.view({B, S});
}

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

TEST_CASE("patch rows give the same bounds as dense rows", "[soundness][certify][bounds]") {
  for (const auto& net : nets()) {
    const BoundGraph g(net.graph, net.input);
    auto x = torch::rand(std::vector<int64_t>{2, net.input[0], net.input[1], net.input[2]}, f64);
    BoundOptions opt;
    opt.method = BoundMethod::crown;
    for (auto p : {Norm::linf, Norm::l2}) {
      auto pass =
          bound_forward(g, {x, torch::full({2}, p == Norm::linf ? 0.01 : 0.2, f64), p, true}, opt);
      // Every grid node feeding a ReLU: bounds of 6 of its units both ways.
      for (size_t k = 0; k < g.nodes().size(); ++k) {
        const auto& shape = g.nodes()[k].out_shape;
        if (!g.nodes()[k].feeds_relaxed || shape.size() != 3) continue;
        INFO(net.name << " node " << k << " p=" << norm_name(p));
        const int64_t units = 6, C = shape[0], H = shape[1], W = shape[2];
        auto ch = torch::randint(C, {units}, torch::kLong),
             i = torch::randint(H, {units}, torch::kLong),
             j = torch::randint(W, {units}, torch::kLong),
             s = torch::randint(2, {units}, torch::kLong);
        Coeffs patch, dense;
        patch.patches = true, patch.Ht = H, patch.Wt = W;
        patch.sample = dense.sample = s;
        patch.site = (s * H + i) * W + j;
        patch.A = torch::nn::functional::one_hot(ch, C).to(f64).view({units, C, 1, 1});
        dense.A = torch::zeros({units, C, H, W}, f64);
        for (int64_t u = 0; u < units; ++u) dense.A[u][ch[u]][i[u]][j[u]] = 1.0;
        auto zero = torch::zeros({units}, f64);
        auto a = bp::lower_rows(pass, static_cast<int>(k), patch, zero, nullptr, -1);
        auto b = bp::lower_rows(pass, static_cast<int>(k), dense, zero, nullptr, -1);
        CHECK((a - b).abs().max().item<double>() <= 1e-9 * (1 + b.abs().max().item<double>()));
      }
    }
  }
}

TEST_CASE("L2 ball ∩ box: the dual bound of a linear function is tight",
          "[unit][certify][bounds]") {
  torch::manual_seed(3);
  const int64_t n = 12;
  LayerGraph lin{Layer::simple(Layer::Kind::flatten),
                 Layer::dense("fc", torch::randn({3, n}, f64), torch::zeros({3}, f64))};
  const BoundGraph g(lin, {1, 1, n});
  auto x = torch::rand({1, 1, 1, n}, f64);
  x[0][0][0][0] = 0.0, x[0][0][0][1] = 1.0;  // on the faces
  auto C = torch::eye(3, f64).unsqueeze(0);
  for (double eps : {0.05, 0.4, 3.0}) {
    INFO("eps " << eps);
    auto pass = bound_forward(g, {x, torch::full({1}, eps, f64), Norm::l2, true}, {});
    auto low = bound_specs(pass, C).lower[0];
    // Feasible points of ball ∩ box: the box's own minimiser when it lies in the ball, and
    // clip(x − a/(2λ)) at the λ where it reaches the sphere (bisection: its distance to x
    // falls as λ grows). Their value is >= the minimum, so the bound must be below it, and
    // a small gap shows the bound is tight (no duality gap).
    auto x0 = x.flatten(), lo = (x0 - eps).clamp_min(0), hi = (x0 + eps).clamp_max(1);
    auto W = lin[1].layer.weight;
    for (int64_t r = 0; r < 3; ++r) {
      auto a = W[r];
      double best = INFINITY;
      auto consider = [&](const torch::Tensor& z) {
        if ((z - x0).norm().item<double>() <= eps * (1 + 1e-12))
          best = std::min(best, (a * z).sum().item<double>());
      };
      consider(torch::where(a.gt(0), lo, hi));
      auto at = [&](double lam) { return torch::max(torch::min(x0 - a / (2 * lam), hi), lo); };
      double l0 = 1e-12, l1 = 1e12;
      for (int it = 0; it < 200; ++it) {
        const double mid = std::sqrt(l0 * l1);
        ((at(mid) - x0).norm().item<double>() > eps ? l0 : l1) = mid;
      }
      consider(at(l1));
      REQUIRE(std::isfinite(best));
      CHECK(low[r].item<double>() <= best + 1e-12);
      CHECK(low[r].item<double>() >= best - 1e-6 * (1 + std::abs(best)));
    }
  }
}

// A pass at ε_b narrowed to ε < ε_b (docs §15): its bounds hold on the smaller regions
// (sampling), its intervals lie inside the pass's, and re-concretising the kept rows
// of refined units makes it tighter than the pass's intervals alone.
TEST_CASE("a pass narrowed to smaller regions is sound and uses its kept rows",
          "[soundness][certify][bounds]") {
  const auto all = nets();
  for (size_t which : {size_t{0}, size_t{2}, size_t{3}}) {
    const auto& net = all.at(which);
    const BoundGraph g(net.graph, net.input);
    const int64_t K = g.output_shape()[0], B = 2;
    const auto probe = random_probe(net, K, B);
    auto x = probe.x, C = probe.C;
    for (auto p : {Norm::linf, Norm::l2}) {
      const double wide = p == Norm::linf ? 0.03 : 0.6;
      BoundOptions opt;
      opt.method = BoundMethod::crown;
      // Room for every refined unit's rows: whether a sample's unstable units fit the
      // default budget is a matter of one unit more or less, which rounding decides.
      opt.keep_elements = int64_t{1} << 24;
      auto pass = bound_forward(g, {x, torch::full({B}, wide, f64), p, true}, opt);
      BoundOptions bare = opt;
      bare.keep_elements = 0;  // the same pass without kept rows
      auto stale = bound_forward(g, {x, torch::full({B}, wide, f64), p, true}, bare);
      for (double f : {0.95, 0.5}) {
        INFO(net.name << " p=" << norm_name(p) << " eps " << f * wide);
        const InputDomain small{x, torch::full({B}, f * wide, f64), p, true};
        auto truth = sampled_min(net.graph, x, C, f * wide, p, true);
        auto low = bound_specs(pass, C, &small).lower;
        CHECK((low <= truth + 1e-9 * (1 + truth.abs())).all().item<bool>());
        CHECK((low >= bound_specs(pass, C).lower - 1e-12)
                  .all()
                  .item<bool>());  // never looser than the pass
        auto narrowed = bound_narrow(pass, small);
        for (size_t k = 0; k < pass.nodes.size(); ++k) {
          CHECK((narrowed.nodes[k].lo >= pass.nodes[k].lo).all().item<bool>());
          CHECK((narrowed.nodes[k].hi <= pass.nodes[k].hi).all().item<bool>());
        }
        if (which == 0 && f == 0.5) {  // the cnn-s expert has refined units whose rows tighten
          auto loose = bound_narrow(stale, small);
          double gained = 0;
          for (size_t k = 0; k < pass.nodes.size(); ++k)
            gained += (loose.nodes[k].hi - loose.nodes[k].lo - narrowed.nodes[k].hi +
                       narrowed.nodes[k].lo)
                          .sum()
                          .item<double>();
          CHECK(gained > 0);
        }
      }
    }
  }
}

// The kept-rows budget is per sample (docs §15): a sample keeps the same rows, and so
// narrows to the same bounds, alone or in a batch whose other samples need far more.
TEST_CASE("what a sample keeps for narrowing does not depend on its batch",
          "[soundness][certify][bounds]") {
  const auto net = nets().at(0);
  const BoundGraph g(net.graph, net.input);
  auto x = torch::rand({3, 1, 28, 28}, f64);
  BoundOptions opt;
  opt.method = BoundMethod::crown;
  // Input-level row coefficients a pass holds for each of its samples.
  auto held = [](const BoundPass& p, int64_t B) {
    auto h = torch::zeros({B}, torch::kLong);
    for (const auto& per_node : p.refined)
      for (const auto& r : per_node)
        if (r.at_input.A.defined())
          h += torch::bincount(r.at_input.sample, {}, B) *
               (r.at_input.A.numel() / r.at_input.A.size(0));
    return h;
  };
  const auto eps = torch::tensor({0.03, 0.08, 0.08}, f64);
  const InputDomain first{x.narrow(0, 0, 1), eps.narrow(0, 0, 1), Norm::linf, true};
  opt.keep_elements = int64_t{1} << 40;
  const int64_t need = held(bound_forward(g, first, opt), 1)[0].item<int64_t>();
  REQUIRE(need > 0);
  opt.keep_elements = need;  // what the first sample needs: the others need more
  auto alone = bound_forward(g, first, opt);
  auto batch = bound_forward(g, {x, eps, Norm::linf, true}, opt);
  auto kept = held(batch, 3);
  CHECK(held(alone, 1)[0].item<int64_t>() > 0);
  CHECK(kept[0].item<int64_t>() == held(alone, 1)[0].item<int64_t>());
  CHECK((kept <= need).all().item<bool>());  // each sample within its own budget
  // Narrowed to half the radius, the first sample's bounds are those it has alone.
  auto small = eps * 0.5;
  auto a = bound_narrow(alone, {x.narrow(0, 0, 1), small.narrow(0, 0, 1), Norm::linf, true});
  auto b = bound_narrow(batch, {x, small, Norm::linf, true});
  for (size_t k = 0; k < a.nodes.size(); ++k) {
    CHECK(torch::allclose(a.nodes[k].lo, b.nodes[k].lo.narrow(0, 0, 1), 1e-12, 1e-12));
    CHECK(torch::allclose(a.nodes[k].hi, b.nodes[k].hi.narrow(0, 0, 1), 1e-12, 1e-12));
  }
}

// A pass seeded by one over larger regions (docs §15): sound, walks back from no more
// units than a fresh pass, and bounds about as tight.
TEST_CASE("a seeded pass is sound and refines fewer units", "[soundness][certify][bounds]") {
  const auto net = nets().at(0);
  const BoundGraph g(net.graph, net.input);
  const int64_t K = g.output_shape()[0], B = 2;
  auto x = torch::rand({B, 1, 28, 28}, f64);
  auto C = torch::randn({B, 3, K}, f64);
  BoundOptions opt;
  opt.method = BoundMethod::crown;
  opt.keep_elements = int64_t{1} << 40;  // every refined unit keeps its rows: they count them
  auto units = [](const BoundPass& p) {
    int64_t n = 0;
    for (const auto& per_node : p.refined)
      for (const auto& r : per_node) n += r.pos.size(0);
    return n;
  };
  for (auto p : {Norm::linf, Norm::l2}) {
    const double eps = p == Norm::linf ? 0.02 : 0.4;
    INFO("p=" << norm_name(p));
    const InputDomain d{x, torch::full({B}, eps, f64), p, true};
    auto seed = bound_forward(g, {x, torch::full({B}, eps / 0.9, f64), p, true}, opt);
    auto fresh = bound_forward(g, d, opt);
    auto seeded = bound_forward(g, d, opt, &seed);
    CHECK(units(seeded) < units(fresh));
    auto truth = sampled_min(net.graph, x, C, eps, p, true);
    auto ls = bound_specs(seeded, C).lower, lf = bound_specs(fresh, C).lower;
    CHECK((ls <= truth + 1e-9 * (1 + truth.abs())).all().item<bool>());
    CHECK(ls.mean().item<double>() >=
          lf.mean().item<double>() - 1e-6 * (1 + lf.abs().mean().item<double>()));
  }
}

// bound_subset: the pass of some samples equals those samples' part of the pass, kept
// rows included (narrowing the subset = the subset of the narrowed pass).
TEST_CASE("a pass's subset is its samples' part of the pass", "[unit][certify][bounds]") {
  const auto net = nets().at(0);
  const BoundGraph g(net.graph, net.input);
  const int64_t K = g.output_shape()[0], B = 3;
  auto x = torch::rand({B, 1, 28, 28}, f64);
  BoundOptions opt;
  opt.method = BoundMethod::crown;
  auto pass = bound_forward(g, {x, torch::full({B}, 0.02, f64), Norm::linf, true}, opt);
  auto index = torch::tensor({2, 0}, torch::kLong);
  auto sub = bound_subset(pass, index);
  for (size_t k = 0; k < pass.nodes.size(); ++k)
    CHECK(torch::equal(sub.nodes[k].lo, pass.nodes[k].lo.index_select(0, index)));
  const InputDomain small{x, torch::full({B}, 0.012, f64), Norm::linf, true};
  const InputDomain small_sub{x.index_select(0, index), torch::full({2}, 0.012, f64), Norm::linf,
                              true};
  auto C = torch::randn({B, 4, K}, f64);
  auto whole = bound_specs(pass, C, &small).lower.index_select(0, index);
  auto part = bound_specs(sub, C.index_select(0, index), &small_sub).lower;
  CHECK((whole - part).abs().max().item<double>() <= 1e-9 * (1 + whole.abs().max().item<double>()));
}

// α-CROWN on intermediate bounds (BoundOptions::intermediate_alpha_steps): every node's
// interval still holds at sampled points of the region (vertices and interior points,
// each node evaluated by the graph's prefix ending there), lies inside CROWN's, and is
// strictly tighter somewhere; the specifications' bounds stay sound.
TEST_CASE("alpha-optimised intermediate bounds hold at sampled points and beat CROWN's",
          "[soundness][certify][bounds]") {
  for (size_t which : {size_t{0}, size_t{2}}) {
    const auto net = nets().at(which);
    const BoundGraph g(net.graph, net.input);
    const int64_t K = g.output_shape()[0], B = 2;
    const auto probe = random_probe(net, K, B);
    const double eps = which == 0 ? 0.03 : 0.1;
    INFO(net.name);
    const InputDomain d{probe.x, torch::full({B}, eps, f64), Norm::linf, true};
    BoundOptions crown, alpha;
    crown.method = alpha.method = BoundMethod::alpha_crown;
    crown.alpha_steps = alpha.alpha_steps = 5;
    alpha.intermediate_alpha_steps = 10;
    const auto pc = bound_forward(g, d, crown), pa = bound_forward(g, d, alpha);
    // Points of the ball ∩ box: random vertices, then random interior points.
    const auto xs = probe.x.repeat({200, 1, 1, 1});
    const auto u = torch::rand_like(xs), w = torch::rand_like(xs);
    const auto pts =
        torch::cat({xs + eps * (2 * u.lt(0.5).to(torch::kFloat64) - 1), xs + eps * (2 * w - 1)})
            .clamp(0, 1);
    const auto owner = torch::arange(400 * B).remainder(B);  // the sample each point belongs to
    LayerGraph prefix;
    double tighter = 0;
    for (size_t k = 0; k < net.graph.size(); ++k) {
      prefix.add(net.graph[k].layer, net.graph[k].inputs);
      INFO("node " << k);
      const auto v = graph_forward(prefix, pts).flatten(1);
      const auto lo = pa.nodes[k].lo.flatten(1).index_select(0, owner);
      const auto hi = pa.nodes[k].hi.flatten(1).index_select(0, owner);
      const auto tol = 1e-9 * (1 + v.abs());
      CHECK((v >= lo - tol).all().item<bool>());
      CHECK((v <= hi + tol).all().item<bool>());
      CHECK((pa.nodes[k].lo >= pc.nodes[k].lo - 1e-12).all().item<bool>());
      CHECK((pa.nodes[k].hi <= pc.nodes[k].hi + 1e-12).all().item<bool>());
      tighter += ((pc.nodes[k].hi - pc.nodes[k].lo) - (pa.nodes[k].hi - pa.nodes[k].lo))
                     .sum()
                     .item<double>();
    }
    CHECK(tighter > 0);
    const auto truth = sampled_min(net.graph, probe.x, probe.C, eps, Norm::linf, true);
    const auto low = bound_specs(pa, probe.C).lower;
    CHECK((low <= truth + 1e-9 * (1 + truth.abs())).all().item<bool>());
  }
}

TEST_CASE("alpha-CROWN's row minimisers lie in the region and attain an affine graph's bound",
          "[unit][certify][bounds]") {
  const int64_t B = 3, S = 4, K = 5;
  LayerGraph affine, relu;
  for (auto* g : {&affine, &relu}) g->add(Layer::simple(Layer::Kind::flatten));
  affine.add(Layer::dense("fc", torch::randn({K, 16}, f64), torch::randn({K}, f64)));
  relu.add(Layer::dense("fc1", torch::randn({12, 16}, f64), torch::randn({12}, f64) * 0.5));
  relu.add(Layer::simple(Layer::Kind::relu));
  relu.add(Layer::dense("fc2", torch::randn({K, 12}, f64), torch::randn({K}, f64)));
  auto x = torch::rand({B, 1, 4, 4}, f64);
  auto C = torch::randn({B, S, K}, f64);
  for (const auto* net : {&affine, &relu})
    for (auto p : {Norm::linf, Norm::l2})
      for (bool box : {true, false}) {
        const double eps = p == Norm::linf ? 0.1 : 0.5;
        INFO("affine=" << (net == &affine) << " p=" << norm_name(p) << " box=" << box);
        const BoundGraph g(*net, {1, 4, 4});
        BoundOptions opt;
        opt.method = BoundMethod::alpha_crown, opt.alpha_steps = 3, opt.primal = true;
        auto sb = bound_specs(bound_forward(g, {x, torch::full({B}, eps, f64), p, box}, opt), C);
        REQUIRE(sb.primal.defined());
        REQUIRE(sb.primal.sizes() == torch::IntArrayRef({B * S, 1, 4, 4}));
        auto xr = x.repeat_interleave(S, 0);
        auto off = (sb.primal - xr).flatten(1);
        auto dist = p == Norm::linf ? off.abs().amax(1) : off.norm(2, 1);
        CHECK((dist <= eps * (1 + 1e-9)).all().item<bool>());
        if (box) CHECK((sb.primal.ge(0) & sb.primal.le(1)).all().item<bool>());
        auto value = (graph_forward(*net, sb.primal) * C.reshape({B * S, K})).sum(1);
        auto low = sb.lower.flatten();
        CHECK((value >= low - 1e-9 * (1 + low.abs())).all().item<bool>());
        // An affine row's bound is its least value, at the minimiser (L2 ∩ box clamps the
        // ball's minimiser, which then need not be the least).
        if (net == &affine && (p == Norm::linf || !box))
          CHECK(((value - low).abs() <= 1e-7 * (1 + low.abs())).all().item<bool>());
      }
  // Without the option there are none.
  const BoundGraph g(affine, {1, 4, 4});
  BoundOptions opt;
  opt.method = BoundMethod::alpha_crown;
  CHECK_FALSE(
      bound_specs(bound_forward(g, {x, torch::full({B}, 0.1, f64), Norm::linf, true}, opt), C)
          .primal.defined());
}
