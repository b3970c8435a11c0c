// Input planes (docs/certification.md §10, input planes): a ReLU reading an affine layer of the
// input box takes a face of the convex hull of its graph over the box where a row needs its upper
// line. The bounds stay below the least values a dense grid (2-D inputs) or sampling and descent
// (images) find, and they are tighter than the chord's.
#include <torch/torch.h>

#include <catch2/catch.hpp>

#include "moecert/bounds.h"
#include "moecert/models.h"
#include "sampled_min.h"

using namespace moecert;
using moecert_test::sampled_min;

namespace {

auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

SpecBounds bounds(const BoundGraph& g, const InputDomain& d, const torch::Tensor& C, BoundMethod m,
                  bool planes) {
  BoundOptions opt;
  opt.method = m, opt.alpha_steps = 10, opt.input_planes = planes;
  return bound_specs(bound_forward(g, d, opt), C);
}

}  // namespace

TEST_CASE("hull planes of an input layer's ReLUs are sound on a 2-D net and tighter than chords",
          "[soundness][certify][bounds]") {
  torch::manual_seed(5);
  const int64_t H = 8, K = 3, B = 6;
  LayerGraph net{Layer::simple(Layer::Kind::flatten),
                 Layer::dense("fc1", torch::randn({H, 2}, f64), torch::randn({H}, f64) * 0.3),
                 Layer::simple(Layer::Kind::relu),
                 Layer::dense("fc2", torch::randn({K, H}, f64), torch::randn({K}, f64))};
  const BoundGraph g(net, {1, 1, 2});
  auto x = torch::rand({B, 1, 1, 2}, f64);
  auto C = torch::randn({B, 4, K}, f64);
  const double eps = 0.3;
  // The least value of every row on a 401 x 401 grid of each region (ball ∩ [0, 1]²):
  // above the exact minimum, so a bound above it is unsound.
  auto t = torch::linspace(0, 1, 401, f64);
  auto grid = torch::stack(torch::meshgrid({t, t}, "ij"), -1).reshape({-1, 1, 1, 2});
  auto truth = torch::empty({B, 4}, f64);
  for (int64_t b = 0; b < B; ++b) {
    auto lo = (x[b] - eps).clamp(0, 1), hi = (x[b] + eps).clamp(0, 1);
    auto pts = lo + grid * (hi - lo);
    auto v = torch::matmul(graph_forward(net, pts), C[b].t());  // [points, 4]
    truth[b] = std::get<0>(v.min(0));
  }
  InputDomain d{x, torch::full({B}, eps, f64), Norm::linf, true};
  for (auto m : {BoundMethod::crown, BoundMethod::alpha_crown}) {
    INFO("method " << static_cast<int>(m));
    auto with = bounds(g, d, C, m, true).lower, without = bounds(g, d, C, m, false).lower;
    CHECK((with <= truth + 1e-9).all().item<bool>());
    CHECK((without <= truth + 1e-9).all().item<bool>());
    // Per row the step keeps the chord where the planes would bound it lower, and the rest
    // of the walk (flatten, the box) is exact: never looser, and tighter on some rows.
    CHECK((with >= without - 1e-9).all().item<bool>());
    CHECK((with > without + 1e-3).any().item<bool>());
  }
}

TEST_CASE("hull planes are sound on a normalised conv layer and tighten later layers' bounds",
          "[soundness][certify][bounds]") {
  torch::manual_seed(8);
  const int64_t K = 5, B = 2;
  LayerGraph net{
      Layer::affine("normalise", torch::full({1}, 1 / 0.3, f64), torch::full({1}, -0.5 / 0.3, f64)),
      Layer::conv2d("conv1", torch::randn({6, 1, 3, 3}, f64) * 0.4, torch::randn({6}, f64) * 0.1, 2,
                    1),
      Layer::simple(Layer::Kind::relu),
      Layer::conv2d("conv2", torch::randn({8, 6, 3, 3}, f64) * 0.3, torch::randn({8}, f64) * 0.1, 2,
                    1),
      Layer::simple(Layer::Kind::relu),
      Layer::simple(Layer::Kind::flatten),
      Layer::dense("fc1", torch::randn({16, 8 * 3 * 3}, f64) * 0.2, torch::randn({16}, f64) * 0.1),
      Layer::simple(Layer::Kind::relu),
      Layer::dense("fc2", torch::randn({K, 16}, f64), torch::randn({K}, f64))};
  const BoundGraph g(net, {1, 10, 10});
  auto x = torch::rand({B, 1, 10, 10}, f64);
  auto C = torch::randn({B, 4, K}, f64);
  const double eps = 0.08;
  auto truth = sampled_min(net, x, C, eps, Norm::linf, true);
  InputDomain d{x, torch::full({B}, eps, f64), Norm::linf, true};
  for (auto m : {BoundMethod::crown, BoundMethod::alpha_crown}) {
    INFO("method " << static_cast<int>(m));
    auto with = bounds(g, d, C, m, true).lower, without = bounds(g, d, C, m, false).lower;
    CHECK((with <= truth + 1e-9 * (1 + truth.abs())).all().item<bool>());
    CHECK(with.mean().item<double>() > without.mean().item<double>());
  }
  // The intermediate bounds of conv2 (the walks step through conv1's ReLU) are tighter too.
  BoundOptions on, off;
  on.method = off.method = BoundMethod::crown, off.input_planes = false;
  auto p_on = bound_forward(g, d, on), p_off = bound_forward(g, d, off);
  auto width = [](const BoundPass& p) {
    return (p.nodes[3].hi - p.nodes[3].lo).sum().item<double>();
  };
  CHECK(width(p_on) < width(p_off));
  INFO("worst " << (p_on.nodes[3].lo - p_off.nodes[3].lo).min().item<double>() << " mean "
                << (p_on.nodes[3].lo - p_off.nodes[3].lo).mean().item<double>());
  CHECK((p_on.nodes[3].lo >= p_off.nodes[3].lo - 1e-9).all().item<bool>());
}
