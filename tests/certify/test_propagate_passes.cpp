// Bound passes beyond one walk: patch rows agree with dense rows; the L2 ∩ box
// concretisation is tight; passes narrowed to smaller regions, seeded passes and a
// pass's subsets stay sound; α-optimised intermediate bounds and α-CROWN's row
// minimisers (split from test_propagate.cpp, which holds the whole-graph soundness).
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "certify/bounds/bounds-impl.h"
#include "moecert/bounds.h"
#include "moecert/models.h"
#include "sampled_min.h"
#include "test_nets.h"

using namespace moecert;
using moecert_test::nets;
using moecert_test::random_probe;
using moecert_test::sampled_min;

namespace {

auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

}  // namespace

TEST_CASE("patch rows give the same bounds as dense rows", "[soundness][certify][bounds]") {
  int with_slopes = 0;
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
        // With α-CROWN's slopes (random, per row): patch rows read each row's slopes at
        // their window, dense rows all of them; the bounds agree.
        bp::Alphas alphas(g.nodes().size());
        int optimised = 0;
        for (size_t m = 0; m <= k; ++m) {
          const int in = g.nodes()[m].inputs[0];
          auto init = g.nodes()[m].rule->alpha_init(
              *g.nodes()[m].layer, in < 0 ? pass.input : pass.nodes[static_cast<size_t>(in)]);
          if (!init.defined()) continue;
          alphas[m] = torch::rand_like(init.index_select(0, s));
          ++optimised;
        }
        if (optimised == 0) continue;
        auto pa = bp::lower_rows(pass, static_cast<int>(k), patch, zero, &alphas, -1);
        auto da = bp::lower_rows(pass, static_cast<int>(k), dense, zero, &alphas, -1);
        CHECK((pa - da).abs().max().item<double>() <= 1e-9 * (1 + da.abs().max().item<double>()));
        CHECK_FALSE(pa.isnan().any().item<bool>());
        ++with_slopes;
      }
    }
  }
  CHECK(with_slopes > 0);  // some node was walked with optimised slopes both ways
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
