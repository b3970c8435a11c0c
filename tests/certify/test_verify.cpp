// verify's input-domain branch and bound on a two-input ReLU network whose minimum over
// the box is known to within a proven margin (a dense grid plus the network's Lipschitz
// constant): properties just below the minimum are proven by splitting where CROWN on
// the whole box cannot, properties just above it are falsified, and the pieces refuted
// and left open always add up to the whole box.
#include <torch/torch.h>

#include <catch2/catch.hpp>
#include <cstdio>

#include "moecert/verify.h"

using namespace moecert;

namespace {

auto f64 = torch::TensorOptions().dtype(torch::kFloat64);

/// 2 -> 16 -> 16 -> 1, float32-representable weights (as an ONNX file holds them).
OnnxModel small_net() {
  torch::manual_seed(7);
  auto w = [](int64_t o, int64_t i) {
    return torch::randn({o, i}).div(std::sqrt(i)).to(torch::kFloat64);
  };
  auto b = [](int64_t o) { return (0.3 * torch::randn({o})).to(torch::kFloat64); };
  OnnxModel m;
  m.path = "small.onnx";
  m.graph = LayerGraph{Layer::dense("fc1", w(16, 2), b(16)), Layer::simple(Layer::Kind::relu),
                       Layer::dense("fc2", w(16, 16), b(16)), Layer::simple(Layer::Kind::relu),
                       Layer::dense("fc3", w(1, 16), b(1))};
  m.input_shape = m.onnx_input_shape = {2};
  m.outputs = 1;
  return m;
}

/// The minimum of the output over [-1, 1]² within [lo, hi]: hi = the least value on a
/// grid of spacing 2/1000; lo = hi minus the ∞ -> ∞ Lipschitz constant (product of the
/// layers' largest absolute row sums) times 1/1000, the farthest any point is from
/// the grid in ∞ norm.
std::pair<double, double> minimum(const OnnxModel& m) {
  auto t = torch::linspace(-1, 1, 1001, f64);
  auto grid = torch::stack(torch::meshgrid({t, t}, "ij"), -1).view({-1, 2});
  const double hi = graph_forward(m.graph, grid).min().item<double>();
  double lip = 1;
  for (const auto& n : m.graph)
    if (n.layer.kind == Layer::Kind::linear)
      lip *= n.layer.weight.abs().sum(1).max().item<double>();
  return {hi - lip * 1e-3, hi};
}

VnnProperty below(double threshold) {
  char text[512];
  std::snprintf(text, sizeof text,
                "(declare-const X_0 Real)\n(declare-const X_1 Real)\n(declare-const Y_0 Real)\n"
                "(assert (>= X_0 -1))\n(assert (<= X_0 1))\n(assert (>= X_1 -1))\n"
                "(assert (<= X_1 1))\n(assert (<= Y_0 %.17g))\n",
                threshold);
  return vnnlib_parse_text(text, "test.vnnlib");
}

}  // namespace

TEST_CASE("verify: input splitting proves what CROWN on the whole box cannot",
          "[integration][certify][verify]") {
  const auto m = small_net();
  const auto [lo, hi] = minimum(m);
  const double range =
      graph_forward(m.graph, torch::rand({20000, 2}, f64) * 2 - 1).max().item<double>() - hi;
  REQUIRE(range > 0.1);
  VerifyOptions o;
  o.timeout = 120, o.attack_steps = 20, o.restarts = 4, o.alpha_crown = false;

  // Below the minimum (by 2% of the output's range): no counterexample exists.
  const auto holds = below(lo - 0.02 * range);
  o.split_max_inputs = 0;  // bounds on the whole box alone leave it open ...
  const auto whole = verify_property(m, holds, o);
  REQUIRE(whole.result == VnnResult::unknown);
  CHECK(whole.boxes == 0);
  o.split_max_inputs = 16;  // ... splitting refutes every piece
  const auto split = verify_property(m, holds, o);
  INFO(split.detail);
  CHECK(split.result == VnnResult::holds);
  CHECK(split.boxes > 1);
  CHECK(split.refuted_fraction == 1.0);
  CHECK(split.open_fraction == 0.0);

  // Above the minimum: a counterexample exists, and the one returned is one.
  const auto broken = below(hi + 0.01 * range);
  const auto found = verify_property(m, broken, o);
  INFO(found.detail);
  REQUIRE(found.result == VnnResult::violated);
  CHECK(vnnlib_case_satisfied(broken.cases.at(0), found.x, found.y, 0));
}

TEST_CASE("verify: input splitting never drops a piece of the box",
          "[integration][certify][verify]") {
  const auto m = small_net();
  const auto [lo, hi] = minimum(m);
  VerifyOptions o;
  o.timeout = 120, o.attack_steps = 5, o.restarts = 1, o.alpha_crown = false;
  // Below the minimum the splitting refutes the box in a few dozen pieces; a depth
  // or queue budget below that stops it with pieces open.
  for (auto [depth, cap] :
       {std::pair<int, int64_t>{2, 1 << 20}, {3, 1 << 20}, {48, 4}, {48, 1 << 20}}) {
    INFO("depth " << depth << ", queue cap " << cap);
    o.split_max_depth = depth, o.split_max_boxes = cap, o.split_batch = 3;
    const auto r = verify_property(m, below(lo - 1e-6), o);
    // Every piece is refuted or open: the fractions (sums of 2^-depth, exact in
    // float64 at these depths) add up to the one case's box.
    CHECK(r.refuted_fraction + r.open_fraction == 1.0);
    const bool budget = depth < 48 || cap < 1 << 20;
    CHECK(r.result == (budget ? VnnResult::unknown : VnnResult::holds));
    CHECK((r.open_fraction > 0) == budget);
  }
}
